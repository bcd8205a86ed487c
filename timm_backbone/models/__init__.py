"""Model families: the timm wrapper and the native implementations; each file registers its family on import."""

from . import maskformer, resnet, swin, timm_backbone

__all__ = ["maskformer", "resnet", "swin", "timm_backbone"]
