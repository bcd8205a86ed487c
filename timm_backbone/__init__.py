"""timm-backbone: any timm model, and native Swin and ResNet, as a backbone for dense prediction."""

from .auto import AutoBackbone, AutoConfig, AutoImageProcessor, load_backbone
from .backbone import BackboneMixin, BackboneOutput, BackboneType, ModelOutput, align_stage_selection
from .configuration import BackboneConfigMixin, PreTrainedConfig, PretrainedConfig
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
    DetrConfig,
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
    "BackboneConfigMixin",
    "BackboneMixin",
    "BackboneOutput",
    "BackboneType",
    "BaseImageProcessor",
    "BatchFeature",
    "BitImageProcessor",
    "CLIPImageProcessor",
    "ConvNextImageProcessor",
    "DeiTImageProcessor",
    "DetrConfig",
    "LoadReport",
    "MaskFormerConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
    "ModelOutput",
    "PreTrainedConfig",
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
    "load_backbone",
]
