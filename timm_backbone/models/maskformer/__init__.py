"""MaskFormer over any backbone of this package."""

from .configuration import DetrConfig, MaskFormerConfig
from .image_processing import MaskFormerImageProcessor
from .modeling import (
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerModel,
    MaskFormerModelOutput,
)

__all__ = [
    "DetrConfig",
    "MaskFormerConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
]
