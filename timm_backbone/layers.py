"""Building blocks shared by the native models: activations, the oneDNN fused linear (and its cached autocast
weights), MLP, window partitioning and frozen BatchNorm."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# activation names of transformers' ``hidden_act`` -> module classes (exact GELU, as transformers' "gelu")
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def get_activation(name: str) -> nn.Module:
    """The activation module for a transformers ``hidden_act`` name.

    Raises:
        ValueError: ``name`` is not a known activation; the message lists the choices.
    """
    if name == "gelu_new" or name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted([*_ACTIVATIONS, 'gelu_new', 'gelu_pytorch_tanh'])}"
        )
    return _ACTIVATIONS[name]()


_HAS_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_MKLDNN_BF16: bool | None = None


def _mkldnn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX); checked once."""
    global _MKLDNN_BF16
    if _MKLDNN_BF16 is None:
        _MKLDNN_BF16 = bool(_HAS_MKLDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return _MKLDNN_BF16


def _mkldnn_linear_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype oneDNN's linear runs in for this call, or ``None`` for ``F.linear``.

    It serves CPU inference only (no autograd, not inside torch.compile): fp32, bf16 where the CPU has bf16 kernels,
    and fp32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (run in bf16, as autocast would).
    """
    if not _HAS_MKLDNN_LINEAR or x.device.type != "cpu" or is_tracing():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    if torch.is_autocast_enabled("cpu"):
        autocast_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and weight.dtype == torch.float32
        return (
            torch.bfloat16 if autocast_bf16 and x.dtype in (torch.float32, torch.bfloat16) and _mkldnn_bf16() else None
        )
    if x.dtype == weight.dtype == torch.float32:
        return torch.float32
    if x.dtype == weight.dtype == torch.bfloat16 and _mkldnn_bf16():
        return torch.bfloat16
    return None


def tensor_version(t: torch.Tensor) -> tuple[int, int]:
    """``(data_ptr, version counter)``: changes when the tensor is replaced or modified in place, so caches derived
    from weights (cast copies, folded inference weights) know when to rebuild."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change in place outside it)
        return t.data_ptr(), -1


# layer -> (key, weight, bias) in the autocast dtype; kept beside the layer (not in it: copies and pickles of a model
# carry no cast weights), and gone with the layer
_AUTOCAST_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _autocast_weights(layer: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias in ``dtype``, cast once and kept on the layer until the parameters change.

    Autocast casts a weight on every call of a forward (its cache lives only inside one ``autocast`` block); for
    inference that is a pass over every weight per forward. The cached copy costs half the fp32 weight's memory.
    """
    weight, bias = layer.weight, layer.bias
    key = (dtype, *tensor_version(weight), *(tensor_version(bias) if bias is not None else ()))
    return _kept_beside(
        _AUTOCAST_WEIGHTS, layer, key, lambda: (weight.to(dtype), bias.to(dtype) if bias is not None else None)
    )


def _kept_beside(store: weakref.WeakKeyDictionary, layer: nn.Module, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept in ``store`` beside ``layer`` and made again when ``key`` (what it derives from) changes. It is
    made outside inference mode, so that it also serves later calls outside it, and without autograd."""
    cached = store.get(layer)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, make())
        store[layer] = cached
    return cached[1]


# layer -> (key, packed weight) for layers with ``pack_weights`` set (see :func:`pack_linears`); beside the layers,
# not in them: packed (mkldnn) tensors cannot be copied or pickled, so copies pack their own on first use
_PACKED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def pack_linears(module: nn.Module, enabled: bool = True) -> None:
    """Let the ``nn.Linear`` layers of ``module`` that run through :func:`linear` read their weight pre-packed.

    oneDNN's linear otherwise reorders the plain weight into its blocked layout on every call; the packed copy (made
    on the first inference call, per dtype, and again when the weight changes) saves that: 2-7% per layer on Swin-T's
    shapes in fp32, 3-22% in bf16, with the same numbers. It costs one more copy of the weights in memory;
    ``enabled=False`` drops it. The setting is an attribute of each layer (``pack_weights``), so copies and pickles
    keep it; training and autograd never use the packed copy.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.pack_weights = enabled
            if not enabled:
                _PACKED_WEIGHTS.pop(layer, None)


def _packed_weight(layer: nn.Linear, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (``layer``'s, or its autocast copy) packed for oneDNN's linear, kept until the parameter changes."""
    key = (weight.dtype, *tensor_version(layer.weight))
    return _kept_beside(
        _PACKED_WEIGHTS, layer, key, lambda: torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 1))
    )


def is_tracing() -> bool:
    """Inside torch.compile / torch.export / TorchScript tracing, where caches and oneDNN-only ops must stay out."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or bool(exporting and exporting())


def linear(x: torch.Tensor, layer: nn.Linear, act: str = "none", fast: bool = True) -> torch.Tensor:
    """``act(layer(x))`` with ``act`` in ``"none"`` / ``"gelu"`` (exact).

    With ``fast``, CPU inference (fp32, bf16, and fp32 weights under bf16 autocast, which here use bf16 copies of the
    weights cast once) runs through oneDNN's linear, which adds the bias and the GELU inside the matmul instead of in
    extra passes over the output (torch's CPU ``addmm`` first copies the bias into it), on pre-packed weights for
    layers marked by :func:`pack_linears`; everything else, and ``fast=False``, is ``F.linear``.
    """
    dtype = _mkldnn_linear_dtype(x, layer.weight) if fast else None
    if dtype is not None:
        weight, bias = (layer.weight, layer.bias) if layer.weight.dtype == dtype else _autocast_weights(layer, dtype)
        if layer.__dict__.get("pack_weights"):
            weight = _packed_weight(layer, weight, x.numel() // max(x.shape[-1], 1))
        post = "none" if act == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, act, [], post)
    x = F.linear(x, layer.weight, layer.bias)
    return F.gelu(x) if act == "gelu" else x


class Mlp(nn.Module):
    """Two linear layers with an activation between them: ``fc2(drop(act(fc1(x))))``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act: str = "gelu",
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = get_activation(act)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.fast = True  # see :func:`linear`
        self._fused_act = "gelu" if act == "gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self._fused_act and not (self.training and self.drop.p > 0):
            return linear(linear(x, self.fc1, self._fused_act), self.fc2)
        return self.fc2(self.drop(self.act(self.fc1(x))))


def window_partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """Cut a ``(B, H, W, C)`` map into non-overlapping windows; H and W must be multiples of the window.

    Returns:
        ``(B, num_windows, wh * ww, C)``, windows in row-major order.
    """
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window_size: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, num_windows, wh * ww, C)`` back to ``(B, H, W, C)``."""
    b, c = windows.shape[0], windows.shape[-1]
    wh, ww = window_size
    x = windows.view(b, height // wh, width // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all held as buffers: nothing trains, ``train()`` changes
    nothing. State-dict keys are BatchNorm2d's, so checkpoints load either way (detection fine-tuning)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` / ``SyncBatchNorm`` in ``module`` by a :class:`FrozenBatchNorm2d` holding its
    values; children are replaced in place, and the (possibly new) module is returned."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        like = next(iter([*module.parameters(), *module.buffers()]), None)
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if like is not None:
            frozen.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
                frozen.num_batches_tracked.copy_(module.num_batches_tracked)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batch_norm_2d(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
