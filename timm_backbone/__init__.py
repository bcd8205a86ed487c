"""timm-backbone: any timm model, and native Swin and ResNet, as a backbone for dense prediction."""

from .auto import AutoBackbone, AutoConfig, AutoImageProcessor
from .backbone import BackboneMixin, BackboneOutput, align_stage_selection
from .configuration import PretrainedConfig
from .image_processing import (
    BaseImageProcessor,
    BatchFeature,
    BitImageProcessor,
    CLIPImageProcessor,
    ConvNextImageProcessor,
    DeiTImageProcessor,
    TimmImageProcessor,
    ViTImageProcessor,
)
from .modeling import LoadReport, PreTrainedModel
from .models.maskformer import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerImageProcessor,
    MaskFormerModel,
    MaskFormerModelOutput,
)
from .models.resnet import ResNetBackbone, ResNetConfig
from .models.swin import SwinBackbone, SwinConfig
from .models.timm_backbone import TimmBackbone, TimmBackboneConfig

__version__ = "0.1.0"

__all__ = [
    "AutoBackbone",
    "AutoConfig",
    "AutoImageProcessor",
    "BackboneMixin",
    "BackboneOutput",
    "BaseImageProcessor",
    "BatchFeature",
    "BitImageProcessor",
    "CLIPImageProcessor",
    "ConvNextImageProcessor",
    "DeiTImageProcessor",
    "LoadReport",
    "MaskFormerConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
    "PreTrainedModel",
    "PretrainedConfig",
    "ResNetBackbone",
    "ResNetConfig",
    "SwinBackbone",
    "SwinConfig",
    "TimmBackbone",
    "TimmBackboneConfig",
    "TimmImageProcessor",
    "ViTImageProcessor",
    "align_stage_selection",
]
