"""Necks that turn a backbone's selected feature maps into other scales: ViTDet's simple feature pyramid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn

from .winograd import Conv3x3

__all__ = ["FEATURE_PYRAMIDS", "SimpleFeaturePyramid"]

FEATURE_PYRAMIDS = ("simple",)


def _rescale(in_channels: int, scale: float) -> tuple[nn.Module, int]:
    """ViTDet's resampling for one level: ``(module, output channels)``."""
    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2),
                LayerNorm2d(in_channels // 2),
                nn.GELU(),
                nn.ConvTranspose2d(in_channels // 2, in_channels // 4, kernel_size=2, stride=2),
            ),
            in_channels // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2), in_channels // 2
    if scale == 1.0:
        return nn.Identity(), in_channels
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2), in_channels
    raise ValueError(f"scale factor {scale} is not one of ViTDet's (4.0, 2.0, 1.0, 0.5)")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022; detectron2's ``SimpleFeaturePyramid``) over the taps of a
    single-stride model: level ``k`` rescales tap ``k`` by ``scale_factors[k]`` (two 2x2 transposed convolutions with
    LayerNorm and GELU between them for 4x, one for 2x, identity for 1x, 2x2 max pooling for 0.5x), then projects it
    with a 1x1 and a 3x3 convolution, each followed by LayerNorm, to ``out_channels``.

    ViTDet builds every level from the last block; given the same tap ``k`` times, this module is that pyramid.

    Example::

        >>> neck = SimpleFeaturePyramid([384] * 4, [16] * 4, out_channels=256)
        >>> [tuple(m.shape) for m in neck([torch.randn(1, 384, 14, 14)] * 4)]
        [(1, 256, 56, 56), (1, 256, 28, 28), (1, 256, 14, 14), (1, 256, 7, 7)]
        >>> neck.strides
        [4, 8, 16, 32]

    Args:
        in_channels: Channels of each tap.
        in_strides: Stride of each tap.
        out_channels: Width of every level.
        scale_factors: Upsampling factor of each level (one per tap).

    Raises:
        ValueError: as many taps as levels are not given, or a scale factor is not one of ViTDet's.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    ) -> None:
        super().__init__()
        if not len(in_channels) == len(in_strides) == len(scale_factors):
            raise ValueError(
                f"the simple feature pyramid has {len(scale_factors)} levels and needs one tap for each; got "
                f"{len(in_channels)} taps"
            )
        self.in_channels = list(in_channels)
        self.levels = nn.ModuleList()
        for channels, scale in zip(in_channels, scale_factors):
            rescale, width = _rescale(channels, scale)
            self.levels.append(
                nn.Sequential(
                    rescale,
                    nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
                    LayerNorm2d(out_channels),
                    Conv3x3(out_channels, out_channels, bias=False),
                    LayerNorm2d(out_channels),
                )
            )
        self.channels = [out_channels] * len(scale_factors)
        self.strides = [_as_stride(stride / scale) for stride, scale in zip(in_strides, scale_factors)]

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One NCHW map per level, fine to coarse, from one NCHW map per tap (NCHW-contiguous: the levels whose 3x3
        convolution ran as Winograd come out of it channels-last)."""
        return tuple(level(x).contiguous() for level, x in zip(self.levels, feature_maps))


def _as_stride(value: float) -> int | float:
    """An integral stride as an int; patch-14 models give 3.5 for the finest level, kept as it is."""
    return int(value) if float(value).is_integer() else value
