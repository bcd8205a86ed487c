"""MaskFormer over any backbone of this package."""

from .configuration import MaskFormerConfig
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
    "MaskFormerModel",
    "MaskFormerModelOutput",
]
