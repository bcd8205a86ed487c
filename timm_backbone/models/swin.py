"""Native Swin Transformer backbone: transformers' numbers and files, any input size, only the stages asked for.

Loads transformers ``SwinModel`` / ``SwinForImageClassification`` / ``SwinBackbone`` checkpoints, MaskFormer's own
Swin layout (``maskformer-swin``) and timm's ``swin_*`` checkpoints; saves in transformers' layout. Inside, q/k/v are
one matmul and attention runs through ``scaled_dot_product_attention`` with the relative position bias and the shift
mask as one cached additive mask.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..auto import ModelFamily, register_family
from ..backbone import BackboneMixin
from ..configuration import (
    MAX_DEPTH,
    MAX_WIDTH,
    NativeBackboneConfigMixin,
    PretrainedConfig,
    check_float,
    check_int,
    check_ints,
)
from ..layers import Mlp, is_tracing, linear, pack_linears, tensor_version, window_partition
from ..modeling import LoadReport, PreTrainedModel
from . import swin_convert
from .swin_convert import (
    native_keys_from_any,
    native_to_transformers,
    swin_timm_to_transformers,
    swin_transformers_to_timm,
)

__all__ = ["TIMM_SWIN_VARIANTS", "SwinBackbone", "SwinConfig", "swin_timm_to_transformers", "swin_transformers_to_timm"]

WINDOW_SEMANTICS = ("transformers", "timm")

# timm's standard variants: name -> (embed_dim, depths, num_heads, window_size, image_size)
TIMM_SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int, int]] = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}
# keys of a timm hub config.json that describe timm's model, not Swin fields


class SwinConfig(NativeBackboneConfigMixin, PretrainedConfig):
    """Config of :class:`SwinBackbone`, field for field transformers' ``SwinConfig``.

    Args:
        image_size: Pretraining resolution (only sizes absolute position embeddings; any input size runs).
        patch_size: Side of the square patches of the patch embedding.
        num_channels: Input channels.
        embed_dim: Channels of the patch embedding; stage ``i`` has ``embed_dim * 2**(i-1)``.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Side of the attention windows.
        mlp_ratio: Hidden width of the MLPs relative to their input.
        qkv_bias: Learn biases for query, key and value.
        hidden_dropout_prob: Dropout on the attention and MLP outputs.
        attention_probs_dropout_prob: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value over all blocks.
        hidden_act: MLP activation (``"gelu"``...).
        use_absolute_embeddings: Add learned absolute position embeddings after the patch embedding.
        initializer_range: Std of the normal initialisation of linear and conv weights.
        layer_norm_eps: Epsilon of the block and final layer norms.
        encoder_stride: Kept for transformers compatibility (SimMIM decoder).
        out_features: Stages to output by name (``stem``, ``stage1``...).
        out_indices: Stages to output by index (0 is the stem).
        window_semantics: ``"transformers"`` (transformers' ``SwinBackbone``: always full windows, zero padding
            before the cyclic shift) or ``"timm"`` (timm and the original Swin: a feature map that fits in one
            window is attended unshifted with the window clamped to it, and the shift comes before the padding).
        **kwargs: Further fields, kept and written back to ``config.json``.
    """

    model_type = "swin"
    compatible_model_types = ("maskformer-swin",)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        num_channels: int = 3,
        embed_dim: int = 96,
        depths: list[int] | tuple[int, ...] = (2, 2, 6, 2),
        num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.1,
        hidden_act: str = "gelu",
        use_absolute_embeddings: bool = False,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        encoder_stride: int = 32,
        out_features: list[str] | None = None,
        out_indices: list[int] | tuple[int, ...] | None = None,
        window_semantics: str = "transformers",
        **kwargs: Any,
    ) -> None:
        for derived in ("stage_names", "num_layers", "hidden_size"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        check_ints("depths", depths, high=MAX_DEPTH)
        check_ints("num_heads", num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must be non-empty, equal length")
        if window_semantics not in WINDOW_SEMANTICS:
            raise ValueError(f"window_semantics must be one of {WINDOW_SEMANTICS}, got {window_semantics!r}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.hidden_act = hidden_act
        self.use_absolute_embeddings = use_absolute_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.encoder_stride = encoder_stride
        self.window_semantics = window_semantics
        self.num_layers = len(self.depths)
        self.validate()
        self.hidden_size = int(embed_dim * 2 ** (len(self.depths) - 1))
        self._init_stage_selection(out_features, out_indices)

    size_fields = ("embed_dim", "depths", "num_heads", "mlp_ratio")

    def validate(self) -> None:
        """Types and ranges of the fields that shape the model (see :meth:`PretrainedConfig.validate`)."""
        image_size = self.image_size if isinstance(self.image_size, (list, tuple)) else [self.image_size]
        check_ints("image_size", list(image_size), max_len=2)
        check_int("patch_size", self.patch_size)
        check_int("num_channels", self.num_channels)
        check_int("embed_dim", self.embed_dim)
        check_ints("depths", self.depths, high=MAX_DEPTH)
        check_ints("num_heads", self.num_heads)
        check_int("window_size", self.window_size)
        check_float("mlp_ratio", self.mlp_ratio, high=64, low_open=True)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            check_float(name, getattr(self, name), high=1)
        check_float("layer_norm_eps", self.layer_norm_eps, high=1, low_open=True)
        check_float("initializer_range", self.initializer_range)
        if not isinstance(self.hidden_act, str):
            raise TypeError(f"hidden_act must be an activation name (str), got {self.hidden_act!r}")
        widths = [self.embed_dim * 2**i for i in range(len(self.depths))]
        if widths[-1] > MAX_WIDTH:
            raise ValueError(
                f"embed_dim {self.embed_dim} doubled over {len(self.depths)} stages (depths) gives {widths[-1]} "
                f"channels, more than the limit {MAX_WIDTH}"
            )
        for i, (width, heads) in enumerate(zip(widths, self.num_heads)):
            if width % heads:
                raise ValueError(
                    f"stage {i + 1} has {width} channels, not divisible by {heads} heads (num_heads[{i}]; "
                    f"embed_dim={self.embed_dim} x 2**{i})"
                )
        super().validate()

    def num_parameters_estimate(self) -> int:
        """Linear weights only: attention (4 d^2) and MLP (2 mlp_ratio d^2) per block, patch merging (8 d^2)."""
        total = self.patch_size**2 * self.num_channels * self.embed_dim
        for i, depth in enumerate(self.depths):
            width = self.embed_dim * 2**i
            total += int(depth * (4 + 2 * self.mlp_ratio) * width * width)
            total += 8 * width * width if i < len(self.depths) - 1 else 0
        return total

    @staticmethod
    def timm_fields(architecture: str, **model_args: Any) -> dict[str, Any]:
        """SwinConfig fields for a timm Swin name (``swin_tiny_patch4_window7_224[.tag]``) and its model args.

        Raises:
            ValueError: not one of timm's standard Swin variants; the message lists them.
        """
        name = architecture.split(".")[0]
        if name not in TIMM_SWIN_VARIANTS:
            raise ValueError(f"{architecture!r} is not a standard timm Swin; choose one of {list(TIMM_SWIN_VARIANTS)}")
        embed_dim, depths, num_heads, window_size, image_size = TIMM_SWIN_VARIANTS[name]
        fields = dict(
            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
            image_size=image_size, patch_size=4, window_semantics="timm",
        )  # fmt: skip
        renames = {"img_size": "image_size", "in_chans": "num_channels"}
        fields.update({renames.get(k, k): v for k, v in model_args.items() if renames.get(k, k) in _TIMM_ARGS})
        return fields


_TIMM_ARGS = {"embed_dim", "depths", "num_heads", "window_size", "image_size", "patch_size", "num_channels",
              "mlp_ratio", "qkv_bias", "drop_path_rate"}  # fmt: skip


# helpers ---------------------------------------------------------------------------------------------------------
def _relative_position_index(window: tuple[int, int], table_window: int) -> torch.Tensor:
    """Index into a ``(2*table_window-1)**2`` bias table for every token pair of a (possibly smaller) window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (table_window - 1)  # 2, N, N
    return rel[0] * (2 * table_window - 1) + rel[1]


def _shift_region_mask(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (num_windows, 1, N, N) that keeps shifted windows from mixing regions: 0 or -100."""
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    h_region = (h >= height - window[0]).long() + (h >= height - shift[0]).long()
    w_region = (w >= width - window[1]).long() + (w >= width - shift[1]).long()
    regions = (h_region[:, None] * 3 + w_region[None, :])[None, :, :, None]  # 1, H, W, 1
    regions = window_partition(regions, window)[0, :, :, 0]  # nW, N
    mask = (regions[:, None, :] != regions[:, :, None]).to(dtype) * -100.0
    return mask[:, None]  # nW, 1, N, N


def _window_indices(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], roll_first: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that pad, cyclically shift and partition a map in one copy, and undo it in one more.

    Returns:
        ``forward`` (nW * N,): for every window slot the source token (``height * width`` is an all-zero padding
        row), and ``inverse`` (height * width,): for every token the slot holding it.
    """
    hp, wp = -(-height // window[0]) * window[0], -(-width // window[1]) * window[1]
    i = torch.arange(hp, device=device)[:, None]
    j = torch.arange(wp, device=device)[None, :]
    if roll_first:  # timm: roll the map, then pad it
        real = (i < height) & (j < width)
        src_i, src_j = (i + shift[0]) % height, (j + shift[1]) % width
    else:  # transformers: pad the map, then roll the padded map
        src_i, src_j = (i + shift[0]) % hp, (j + shift[1]) % wp
        real = (src_i < height) & (src_j < width)
    source = torch.where(real, src_i * width + src_j, height * width)
    forward = window_partition(source[None, :, :, None], window).reshape(-1)
    slots = torch.arange(forward.numel(), device=device)
    # padding slots all land on the extra last entry, which is dropped (no data-dependent shapes: compile-friendly)
    inverse = torch.zeros(height * width + 1, dtype=torch.long, device=device).scatter_(0, forward, slots)
    return forward, inverse[:-1]


def _cached(fn: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
    """LRU-cached ``fn`` whose tensors are never inference tensors, so they serve later autograd-tracked calls."""

    def build(*args: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args)

    return lru_cache(maxsize=maxsize)(build)


_cached_relative_position_index = _cached(_relative_position_index, 16)
_cached_shift_region_mask = _cached(_shift_region_mask, 32)
_cached_window_indices = _cached(_window_indices, 64)
# above this many mask elements, the mask is not repeated per image: windows are folded into heads instead
_BATCHED_MASK_MAX_NUMEL = 1 << 22


# blocks ----------------------------------------------------------------------------------------------------------
class SwinPatchEmbed(nn.Module):
    """Patch embedding: zero-pad to a patch multiple, conv patchify, layer norm, optional absolute positions."""

    def __init__(
        self, patch_size: int, in_channels: int, embed_dim: int, grid_size: tuple[int, int] | None, drop: float
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # transformers leaves this one at torch's default eps
        self.position_embeddings = None
        if grid_size is not None:
            self.position_embeddings = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
            self.grid_size = grid_size
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:  # F.pad copies even when it pads nothing
            x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))  # B, H, W, C
        if self.position_embeddings is not None:
            _, h, w, c = x.shape
            pos = self.position_embeddings
            if (h, w) != tuple(self.grid_size):
                pos = pos.reshape(1, *self.grid_size, c).permute(0, 3, 1, 2)
                pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
            x = x + pos.reshape(1, h, w, c)
        return self.drop(x)


class SwinPatchMerging(nn.Module):
    """2x2 neighbourhood concat (zero-padding odd sizes), layer norm, and a linear reduction to twice the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.fast = True  # see :func:`linear`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1] // 2, x.shape[2] // 2
        # channel order (row, col) = (0,0), (1,0), (0,1), (1,1), as the original Swin and transformers
        x = x.view(b, h, 2, w, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h, w, 4 * c)
        return linear(self.norm(x), self.reduction, fast=self.fast)


class SwinWindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    The bias and the shift mask are added into one mask; in eval it is cached per window geometry (bounded LRU)
    and rebuilt when the bias table changes. ``fused_attn`` selects ``scaled_dot_product_attention`` over the plain
    softmax reference path.
    """

    cache_size: ClassVar[int] = 4

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, attn_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.attn_drop = attn_drop
        self.fused_attn = True
        self._mask_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def relative_position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """The bias (heads, N, N) for a ``window`` no larger than the table's."""
        index_fn = _relative_position_index if is_tracing() else _cached_relative_position_index
        index = index_fn(window, self.window_size).to(self.relative_position_bias_table.device)
        n = window[0] * window[1]
        return self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def attention_mask(
        self,
        window: tuple[int, int],
        num_windows: int,
        batch: int,
        region_mask: torch.Tensor | None,
        key: tuple,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Bias plus shift mask, cached per geometry unless the bias table needs a gradient; in ``dtype`` when given
        (the attention's under autocast, so that the cached mask is not cast on every call).

        Returns:
            (B * nW, heads, N, N), or (1, nW * heads, N, N) when repeating it per image would be too large.
        """
        table = self.relative_position_bias_table
        if is_tracing() or (torch.is_grad_enabled() and table.requires_grad):
            return self._build_mask(window, num_windows, batch, region_mask)
        key = (*key, batch, *tensor_version(table), table.dtype, torch.is_inference_mode_enabled(), dtype)
        mask = self._mask_cache.get(key)
        # threads share the cache: an entry may be evicted by another thread between these steps, which only
        # costs a rebuild, never a wrong mask (each key fully determines its mask)
        try:
            if mask is None:
                mask = self._build_mask(window, num_windows, batch, region_mask)
                mask = self._mask_cache[key] = mask if dtype is None else mask.to(dtype)
                while len(self._mask_cache) > self.cache_size:
                    self._mask_cache.popitem(last=False)
            else:
                self._mask_cache.move_to_end(key)
        except KeyError:
            pass
        return mask

    def _build_mask(
        self, window: tuple[int, int], num_windows: int, batch: int, region_mask: torch.Tensor | None
    ) -> torch.Tensor:
        bias = self.relative_position_bias(window)  # heads, N, N
        n = bias.shape[-1]
        mask = bias.expand(num_windows, -1, -1, -1) if region_mask is None else bias + region_mask  # nW, heads, N, N
        # CPU flash attention takes 4-D masks only; one per (image, window) lets q/k/v stay views of the qkv output
        if batch * mask.numel() <= _BATCHED_MASK_MAX_NUMEL:
            return mask.expand(batch, -1, -1, -1, -1).reshape(batch * num_windows, self.num_heads, n, n)
        return mask.reshape(1, num_windows * self.num_heads, n, n)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over ``x`` (B, nW, N, C) with a mask from :meth:`attention_mask`.

        Returns:
            The output (B, nW, N, C) and, with ``need_weights``, the weights (B * nW, heads, N, N).
        """
        b, nw, n, c = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        qkv = linear(x, self.qkv, fast=self.fused_attn)
        if mask.shape[0] == b * nw:  # views: (B * nW, heads, N, head_dim)
            q, k, v = qkv.view(b * nw, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # windows folded into heads: (B, nW * heads, N, head_dim)
            qkv = qkv.view(b, nw, n, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
            q, k, v = qkv.reshape(3, b, nw * heads, n, head_dim).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        weights = None
        if self.fused_attn and not need_weights:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=drop, scale=self.scale)
        else:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale + mask, dim=-1, dtype=torch.float32)
            weights = weights.to(q.dtype)
            x = F.dropout(weights, drop, self.training) @ v
            weights = weights.view(b * nw, heads, n, n)
        x = x.view(b, nw, heads, n, head_dim).transpose(2, 3).reshape(b, nw, n, c)
        return linear(x, self.proj, fast=self.fused_attn), weights


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each with a residual connection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act: str = "gelu",
        eps: float = 1e-5,
        window_semantics: str = "transformers",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shifted else 0
        self.window_semantics = window_semantics
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SwinWindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def window_and_shift(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Window and shift per axis for a ``height`` x ``width`` map under this block's window semantics."""
        ws, shift = self.window_size, self.shift_size
        if self.window_semantics == "transformers":
            return (ws, ws), (shift, shift)
        window = (min(height, ws), min(width, ws))
        return window, (0 if height <= ws else shift, 0 if width <= ws else shift)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, h, w, c = x.shape
        window, shift = self.window_and_shift(h, w)
        hp, wp = h + (-h % window[0]), w + (-w % window[1])
        compiling = is_tracing()
        index_fn = _window_indices if compiling else _cached_window_indices
        forward, inverse = index_fn(h, w, window, shift, self.window_semantics == "timm", x.device)

        y = self.norm1(x).reshape(b, h * w, c)
        if hp != h or wp != w:
            y = F.pad(y, (0, 0, 0, 1))  # the zero token that padding slots gather
        num_windows = (hp // window[0]) * (wp // window[1])  # explicit sizes keep an empty batch reshapeable
        windows = y.index_select(1, forward).view(b, num_windows, window[0] * window[1], c)  # B, nW, N, C

        region = None
        if shift[0] or shift[1]:
            region_fn = _shift_region_mask if compiling else _cached_shift_region_mask
            region = region_fn(hp, wp, window, shift, x.device, x.dtype if x.is_floating_point() else torch.float32)
        autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and self.attn.fused_attn
        dtype = torch.get_autocast_dtype("cpu") if autocast and not need_weights else None
        mask = self.attn.attention_mask(window, windows.shape[1], b, region, (hp, wp, window, shift, x.device), dtype)
        y, weights = self.attn(windows, mask, need_weights)

        y = y.reshape(b, num_windows * window[0] * window[1], c).index_select(1, inverse).view(b, h, w, c)  # B, H, W, C
        if self.training or torch.is_grad_enabled() or y.dtype != x.dtype:
            x = x + self.drop_path(self.drop(y))
        else:  # eval without autograd: dropout and drop path are identities, and y is this call's own temporary
            x = y.add_(x)
        x = x + self.drop_path(self.drop(self.mlp(self.norm2(x))))
        return x, weights


class SwinStage(nn.Module):
    """Blocks at one resolution, then (if not the last stage) patch merging to half the resolution."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: list[float],
        downsample: bool,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shifted=i % 2 == 1, drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks; returns the stage output (before merging) and the last block's attention weights."""
        weights = None
        for i, block in enumerate(self.blocks):
            last = need_weights and i == len(self.blocks) - 1
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not last:
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, weights = block(x, last)
        return x, weights


# the model -------------------------------------------------------------------------------------------------------
class SwinBackbone(BackboneMixin, PreTrainedModel):
    """Swin Transformer as a backbone: stages ``stem, stage1..N``, NCHW maps normalised by per-stage layer norms.

    Only the stages up to the deepest one in ``out_indices`` run (all of them when hidden states or attentions are
    requested); the parameters of the others are frozen (``requires_grad=False``) so that DDP needs no
    ``find_unused_parameters``.
    """

    config_class = SwinConfig
    has_attentions = True
    # heads, final norm and buffers of full models, and norms of stages this selection does not output
    ignore_unexpected = (r"^classifier\.", r"^(swin\.)?layernorm\.", r"^pooler\.", r"^decoder\.", r"mask_token$",
                         r"^hidden_states_norms\.", r"^head\.")  # fmt: skip

    def __init__(self, config: SwinConfig) -> None:
        super().__init__(config)
        c = config
        num_stages = len(c.depths)
        for i, heads in enumerate(c.num_heads):
            if (c.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i + 1} has {c.embed_dim * 2**i} channels, not divisible by {heads} heads")
        self.num_features = [c.embed_dim] + [c.embed_dim * 2**i for i in range(num_stages)]
        self.stage_strides = [c.patch_size] + [c.patch_size * 2**i for i in range(num_stages)]
        image_size = c.image_size if isinstance(c.image_size, (list, tuple)) else (c.image_size, c.image_size)
        grid = (image_size[0] // c.patch_size, image_size[1] // c.patch_size) if c.use_absolute_embeddings else None
        self.patch_embed = SwinPatchEmbed(c.patch_size, c.num_channels, c.embed_dim, grid, c.hidden_dropout_prob)
        dpr = [c.drop_path_rate * i / max(sum(c.depths) - 1, 1) for i in range(sum(c.depths))]
        block_kwargs = dict(
            mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop=c.hidden_dropout_prob,
            attn_drop=c.attention_probs_dropout_prob, act=c.hidden_act, eps=c.layer_norm_eps,
            window_semantics=c.window_semantics,
        )  # fmt: skip
        self.layers = nn.ModuleList(
            SwinStage(
                self.num_features[i + 1],
                c.depths[i],
                c.num_heads[i],
                c.window_size,
                drop_path=dpr[sum(c.depths[:i]) : sum(c.depths[: i + 1])],
                downsample=i < num_stages - 1,
                **block_kwargs,
            )
            for i in range(num_stages)
        )
        # a norm for every stage, so that any stage can be selected later; files hold the selected ones only, as
        # transformers' (which builds just those)
        self.hidden_states_norms = nn.ModuleDict(
            {name: nn.LayerNorm(width) for name, width in zip(c.stage_names, self.num_features)}
        )
        self.apply(self._init_weights)
        self.init_stages(c.stage_names, self.num_features, self.stage_strides)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SwinWindowAttention):
            nn.init.zeros_(module.relative_position_bias_table)

    def stage_modules(self, index: int) -> list[nn.Module]:
        if index == 0:
            return [self.patch_embed]
        merging = self.layers[index - 2].downsample if index >= 2 else None  # transformers merges at a stage's end
        return [self.layers[index - 1].blocks, *([merging] if merging is not None else [])]

    def output_modules(self, index: int) -> list[nn.Module]:
        return [self.hidden_states_norms[self.stage_names[index]]]

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (transformers' ``SwinBackbone.get_input_embeddings()``)."""
        return self.patch_embed

    def missing_ok(self) -> tuple[str, ...]:
        """Norms of stages not selected are not in transformers' files (it builds the selected ones only)."""
        unselected = [name for name in self.stage_names if name not in self.out_features]
        return (*self.ignore_missing, *(rf"^hidden_states_norms\.{name}\." for name in unselected))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass instead of storing them (training memory)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """timm's Swin parameter grouping (layer-wise learning-rate decay), as a function of parameter names: the
        patch embedding, then each block (each stage when ``coarse``); a patch merging goes with the stage it feeds
        (timm holds it at that stage's start, transformers at the previous one's end); the output norms join the
        last block, as timm's final norm."""

        def ordinal(name: str) -> tuple[float, ...]:
            if name.startswith("patch_embed."):
                return (0.0,)
            match = re.match(r"layers\.(\d+)\.(?:blocks\.(\d+)|downsample)\.", name)
            if match:
                stage = int(match[1]) + (match[2] is None)
                return (1.0, float(stage)) if coarse else (1.0, float(stage), float(match[2] or 0))
            if name.startswith("hidden_states_norms.") and not coarse:
                return (1.0, 99999.0)  # timm's MATCH_PREV_GROUP: joins the group before it
            return (float("inf"),)

        return ordinal

    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables and absolute position embeddings (timm's Swin and ViT rule)."""
        return {
            name
            for name, _ in self.named_parameters()
            if "relative_position_bias_table" in name or name.endswith("position_embeddings")
        }

    def input_conv_keys(self) -> tuple[str, ...]:
        return ("patch_embed.proj.weight",)

    def set_fast_path(self, enable: bool = True) -> None:
        """Choose the fast path (default: ``scaled_dot_product_attention``, oneDNN linears with fused bias/GELU in
        fp32 CPU inference) or the plain reference path (softmax attention, ``F.linear``)."""
        for module in self.modules():
            if isinstance(module, SwinWindowAttention):
                module.fused_attn = enable
            elif isinstance(module, (Mlp, SwinPatchMerging)):
                module.fast = enable

    def optimize_for_inference(self, enabled: bool = True) -> SwinBackbone:
        """Let the linear layers of CPU inference (eval, autograd off, fp32 or bf16, also under autocast) read weights
        pre-packed for oneDNN instead of having them reordered on every call: the same numbers; for Swin-T about 4% less
        time in fp32 and 7% in bf16 (``benchmarks/bench_swin.py``); one more copy of the linear weights in
        memory. The parameters are not changed; training and gradients use them as before; the packed copies follow
        weight changes, and ``optimize_for_inference(False)`` drops them. MaskFormer turns this on for its backbone.

        Returns:
            The model, in eval mode.
        """
        pack_linears(self, enabled)
        return self.eval() if enabled else self

    def forward_stages(
        self, pixel_values: torch.Tensor, indices: tuple[int, ...], output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], list[torch.Tensor | None]]:
        """Stage outputs before the stage norm (NCHW views of the B, H, W, C maps), and each stage's last-block
        attention weights, (batch * windows, heads, window tokens, window tokens) as transformers returns them."""
        num_run = max(indices)
        x = self.patch_embed(pixel_values)  # B, H, W, C
        states, attentions = [x], []
        for i in range(num_run):
            stage = self.layers[i]
            out, weights = stage(x, output_attentions)
            states.append(out)
            attentions.append(weights)
            if i + 1 < num_run:
                x = stage.downsample(out)
        return {i: states[i].permute(0, 3, 1, 2) for i in indices}, attentions

    def feature_map(self, index: int, state: torch.Tensor) -> torch.Tensor:
        """The stage output normalised by its stage norm, NCHW."""
        norm = self.hidden_states_norms[self.stage_names[index]]
        return norm(state.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    # checkpoints -------------------------------------------------------------------------------------------------
    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> dict:
        """Any supported layout (transformers, maskformer-swin, timm, original Swin) to this module's keys."""
        return native_keys_from_any(state_dict)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """transformers' ``SwinBackbone`` layout: separate query/key/value, ``embeddings.`` / ``encoder.`` keys, the
        norms of the selected stages."""
        unselected = tuple(f"hidden_states_norms.{n}." for n in self.stage_names if n not in self.out_features)
        return native_to_transformers({k: v for k, v in self.state_dict().items() if not k.startswith(unselected)})

    def load_checkpoint(
        self, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> LoadReport:
        report = super().load_checkpoint(state_dict, strict=strict, source=source)
        for module in self.modules():  # weights changed: drop cached masks
            if isinstance(module, SwinWindowAttention):
                module._mask_cache.clear()
        return report


register_family(
    ModelFamily(
        name="swin",
        config_class=SwinConfig,
        backbone_class=SwinBackbone,
        timm_to_transformers=swin_timm_to_transformers,
        transformers_to_timm=swin_transformers_to_timm,
        detect_layout=swin_convert.detect_layout,
        timm_architecture=swin_convert.timm_architecture,
        complete_timm_state_dict=swin_convert.complete_timm_state_dict,
        transformers_heads=("head.fc.weight", "classifier.weight", "swin.", "SwinForImageClassification", "SwinModel"),
        transformers_backbone="SwinBackbone",
        timm_stage=swin_convert.timm_stage,
        timm_as_native=swin_convert.timm_as_native,
        comparison_note=swin_convert.COMPARISON_NOTE,
        benchmark_timm_args=lambda input_size: {"img_size": input_size},
        task_layouts={"maskformer": swin_convert.to_maskformer_layout},
        image_processor="ViTImageProcessor",
        benchmark_models={
            "swin_t": "swin_tiny_patch4_window7_224",
            "swin_s": "swin_small_patch4_window7_224",
            "swin_b": "swin_base_patch4_window7_224",
        },
    ),
    exist_ok=True,
)
