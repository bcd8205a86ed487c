"""timm-backbone: any timm model, and native Swin and ResNet, as a backbone for dense prediction."""

from .backbone import BackboneMixin, BackboneOutput, align_stage_selection
from .configuration import PretrainedConfig
from .modeling import LoadReport, PreTrainedModel
from .models.maskformer import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerImageProcessor,
    MaskFormerModel,
    MaskFormerModelOutput,
)
from .models.timm_backbone import TimmBackbone, TimmBackboneConfig

__version__ = "0.1.0"

__all__ = [
    "BackboneMixin",
    "BackboneOutput",
    "LoadReport",
    "MaskFormerConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
    "PreTrainedModel",
    "PretrainedConfig",
    "TimmBackbone",
    "TimmBackboneConfig",
    "align_stage_selection",
]
