"""3x3 convolutions as Winograd F(2x2, 3x3) for CPU inference.

A stride-1 3x3 convolution computes each 2x2 block of output from a 4x4 tile of input. Winograd's minimal filtering
algorithm transforms the tile and the kernel so that the block costs 16 multiplications per input-output channel pair
instead of 36: the convolution becomes 16 matrix products ``(tiles, C_in) @ (C_in, C_out)``, 2.25x fewer FLOPs,
between an input transform and an output transform made of additions only (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). The kernel transform has halves in it, so it is done once per weight, in
float64, and kept beside the layer.

The products run as oneDNN linears on kernels packed once (where torch has them), about 15% faster than ``torch.mm``
at these shapes. The tiles are processed a band of tile rows at a time (about a thousand tiles): the transform buffers
are allocated once per call and reused, a fraction of what transforming the whole map at once would allocate (4x the
input, 4x the output), and the products keep near their best speed; one pass over the whole map measured slower.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .layers import _HAS_MKLDNN_LINEAR, _kept_beside, is_tracing, tensor_version

# G of F(2x2, 3x3): the kernel transform, U = G g G^T
_KERNEL_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

# about this many tiles per band (512 to 1024 measured fastest on MaskFormer's maps)
_TILES_PER_BAND = 1024

# conv -> (key, its 16 transformed kernels); beside the layer, as the packed linear weights in ``layers``
_TRANSFORMED_KERNELS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def winograd_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`winograd_conv3x3` serves ``conv(x)``: a 3x3, stride-1, padding-1 dense convolution with zero
    padding, fp32 on the CPU without autograd, autocast or tracing, and big enough that the products rather than the
    transforms and the per-call work dominate: both channel counts at least 256, the map at least 12 on each side and
    ``N * H * W * C_in * C_out`` at least 2**26 (about 1.2 GFLOP). Narrower or smaller layers measured slower than
    oneDNN's direct convolution, or no faster from one run to the next (``benchmarks/bench_winograd.py``)."""
    if not (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= 256
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == conv.weight.dtype == torch.float32
    ):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu") or is_tracing():
        return False
    n, _, height, width = x.shape
    return min(height, width) >= 12 and n * height * width * conv.in_channels * conv.out_channels >= 2**26


def _transformed_kernels(conv: nn.Conv2d, rows: int) -> list[torch.Tensor]:
    """``G g G^T`` for every kernel ``g`` of ``conv``: 16 ``(C_out, C_in)`` matrices, packed for oneDNN's linear where
    torch has it (its products on packed weights measured about 15% faster than ``torch.mm`` at these shapes); kept
    until the weight changes."""
    weight = conv.weight

    def make() -> list[torch.Tensor]:
        g = torch.tensor(_KERNEL_TRANSFORM, dtype=torch.float64)
        u = torch.einsum("ik,ockl,jl->ijoc", g, weight.detach().double(), g).reshape(16, conv.out_channels, -1)
        u = u.to(weight.dtype)
        if _HAS_MKLDNN_LINEAR:
            return [torch.ops.mkldnn._reorder_linear_weight(k.contiguous(), rows) for k in u]
        return list(u)

    return _kept_beside(_TRANSFORMED_KERNELS, conv, (weight.dtype, *tensor_version(weight)), make)


def _product(tiles: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``tiles @ kernel.T`` for one of the 16 tile positions."""
    if _HAS_MKLDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(tiles, kernel, None, "none", [], "")
    return torch.mm(tiles, kernel.t())


def _input_transform(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """``B^T d`` along one axis, from the tile's four rows (or columns) ``d``, into ``out[0..3]``."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _output_transform(m: Sequence[torch.Tensor], out0: torch.Tensor, out1: torch.Tensor) -> None:
    """``A^T m`` along one axis: the two outputs from the four products ``m[0..3]``."""
    torch.add(m[0], m[1], out=out0).add_(m[2])
    torch.sub(m[1], m[2], out=out1).sub_(m[3])


def winograd_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` by Winograd F(2x2, 3x3), for a ``conv`` where :func:`winograd_applies`; the result is in
    channels-last memory (for an odd height or width, a view cropping the last tile's extra row or column). Same
    numbers as the direct convolution to float rounding: the error against a float64 reference is 2-3x the direct
    convolution's, about 1e-6 of the output's magnitude (``benchmarks/bench_winograd.py`` prints both)."""
    n, c_in, height, width = x.shape
    c_out = conv.out_channels
    tile_rows, tile_cols = (height + 1) // 2, (width + 1) // 2
    band = max(1, min(tile_rows, _TILES_PER_BAND // (n * tile_cols)))
    kernels = _transformed_kernels(conv, band * n * tile_cols)
    rows = x.permute(2, 0, 3, 1)  # H, N, W, C: a band of rows is then one block of each buffer below

    # per band: the zero-padded input rows, the tiles transformed along W, then along H (16 tile planes), the 16
    # products, transformed back along H; the band's output is transformed along W into ``out``
    padded = x.new_zeros(2 * band + 2, n, 2 * tile_cols + 2, c_in)
    along_w = x.new_empty(4, 2 * band + 2, n, tile_cols, c_in)
    tiles = x.new_empty(4, 4, band, n, tile_cols, c_in)
    back_h = x.new_empty(2, 4, band, n, tile_cols, c_out)
    out = x.new_empty(n, tile_rows, 2, tile_cols, 2, c_out)

    for first in range(0, tile_rows, band):
        r = min(band, tile_rows - first)
        # padded rows 0 .. 2r+1 of the band are input rows 2*first-1 .. 2*(first+r); outside the input they are zero
        top, bottom = 2 * first - 1, 2 * (first + r) + 1
        lo, hi = max(top, 0), min(bottom, height)
        padded[: lo - top].zero_()
        padded[hi - top : 2 * r + 2].zero_()
        padded[lo - top : hi - top, :, 1 : 1 + width].copy_(rows[lo:hi])

        w = along_w[:, : 2 * r + 2]
        _input_transform([padded[: 2 * r + 2, :, j : j + 2 * tile_cols : 2] for j in range(4)], w)
        t = tiles[:, :, :r]
        _input_transform([w[:, i : i + 2 * r : 2] for i in range(4)], t)

        h = back_h[:, :, :r]
        for j in range(4):
            products = [_product(t[i, j].reshape(-1, c_in), kernels[4 * i + j]) for i in range(4)]
            _output_transform([p.view(r, n, tile_cols, c_out) for p in products], h[0, j], h[1, j])
        band_out = out[:, first : first + r].permute(2, 4, 1, 0, 3, 5)  # (2, 2, r, N, tile_cols, C_out) view
        for a in range(2):
            _output_transform(h[a], band_out[a, 0], band_out[a, 1])

    if conv.bias is not None:
        out.add_(conv.bias)
    return out.view(n, 2 * tile_rows, 2 * tile_cols, c_out)[:, :height, :width].permute(0, 3, 1, 2)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (same parameters and keys) whose CPU fp32 inference forward on wide
    layers runs as Winograd F(2x2, 3x3) (:func:`winograd_conv3x3`) unless :func:`use_winograd` turned that off;
    everything else is ``nn.Conv2d``'s forward."""

    winograd = True  # per layer, see use_winograd

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and winograd_applies(x, self):
            return winograd_conv3x3(x, self)
        return super().forward(x)


def use_winograd(module: nn.Module, enabled: bool = True) -> None:
    """Let the :class:`Conv3x3` layers of ``module`` run as Winograd where it applies (the default), or, with
    ``enabled=False``, always as torch's direct convolution (the numbers of ``nn.Conv2d``, bit for bit) and without
    their kept kernels. The setting is an attribute of each layer, so copies and pickles keep it."""
    for layer in module.modules():
        if isinstance(layer, Conv3x3):
            layer.winograd = enabled
            if not enabled:
                _TRANSFORMED_KERNELS.pop(layer, None)
