"""MaskFormer over any backbone of this package."""

from .configuration import MaskFormerConfig
from .image_processing import MaskFormerImageProcessor
from .modeling import (
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerModel,
    MaskFormerModelOutput,
)

__all__ = [
    "MaskFormerConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
]
