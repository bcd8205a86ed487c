"""Building blocks shared by the native models: stochastic depth, MLP, window partitioning, frozen BatchNorm and
BatchNorm-folded (oneDNN-fused) convolutions."""

from __future__ import annotations

import threading

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


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``drop_prob`` and rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or with ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


_HAS_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mkldnn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's linear serves fp32 CPU inference only: no autograd, no autocast, not inside torch.compile."""
    return (
        _HAS_MKLDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not is_tracing()
    )


def is_tracing() -> bool:
    """Inside torch.compile / torch.export / TorchScript tracing, where caches and oneDNN-only ops must stay out."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or bool(exporting and exporting())


def linear(x: torch.Tensor, layer: nn.Linear, act: str = "none", fast: bool = True) -> torch.Tensor:
    """``act(layer(x))`` with ``act`` in ``"none"`` / ``"gelu"`` (exact).

    With ``fast``, fp32 CPU inference runs through oneDNN's linear, which adds the bias and the GELU inside the
    matmul instead of in extra passes over the output (torch's CPU ``addmm`` first copies the bias into it);
    everything else, and ``fast=False``, is ``F.linear``.
    """
    if fast and _mkldnn_linear_ok(x, layer.weight):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, act, [], "none" if act == "gelu" else "")
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


_ONEDNN_CONV_FUSION: bool | None = None


def onednn_fusion_available() -> bool:
    """Whether oneDNN's fused convolution kernels (those torch.compile's CPU backend emits) exist and compute right."""
    global _ONEDNN_CONV_FUSION
    if _ONEDNN_CONV_FUSION is None:
        _ONEDNN_CONV_FUSION = False
        if torch.backends.mkldnn.is_available():
            try:
                x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
                w, b = torch.randn(4, 4, 3, 3), torch.randn(4)
                packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
                got = torch.ops.mkldnn._convolution_pointwise.binary(
                    x, x, packed, b, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], ""
                )
                want = torch.relu(nn.functional.conv2d(x, w, b, 1, 1) + x)
                _ONEDNN_CONV_FUSION = torch.allclose(got, want, atol=1e-4, rtol=1e-4)
            except (RuntimeError, AttributeError, TypeError):
                pass
    return _ONEDNN_CONV_FUSION


class FoldedConv:
    """Inference only: a ``Conv2d`` with the eval-mode ``BatchNorm2d`` after it folded into its weight and bias.

    Calling it computes ``relu(conv(x) + bias [+ residual])`` (ReLU optional). With ``onednn`` (fp32 CPU) that is one
    oneDNN kernel with the bias, residual sum and ReLU fused, on weights packed for the first input's shape (other
    shapes run correctly on the same packing); otherwise ``F.conv2d`` on the folded weights. The source modules are
    only read, at construction.

    Args:
        conv: The convolution (no bias, groups 1).
        norm: The BatchNorm after it (``BatchNorm2d`` or :class:`FrozenBatchNorm2d`).
        onednn: Use oneDNN's fused kernels; see :func:`onednn_fusion_available`.
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, onednn: bool = False) -> None:
        if conv.bias is not None or conv.groups != 1:
            raise ValueError("FoldedConv takes a convolution without bias and with groups=1 (as ResNet's)")
        with torch.no_grad():  # in float64: the folded terms then differ from BatchNorm's arithmetic by rounding only
            scale = norm.weight.double() * torch.rsqrt(norm.running_var.double() + norm.eps)
            weight = conv.weight.double() * scale[:, None, None, None]
            self.bias = (norm.bias.double() - norm.running_mean.double() * scale).to(conv.weight.dtype)
        self.weight = weight.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.onednn, self.packed = onednn, False
        self._pack_lock = threading.Lock()

    def __call__(self, x: torch.Tensor, relu: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:
            if not self.packed:
                with self._pack_lock:  # threads sharing the model must not pack the already-packed weight again
                    if not self.packed:
                        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
                            self.weight, self.padding, self.stride, self.dilation, 1, list(x.shape)
                        )
                        self.packed = True
            args = (self.weight, self.bias, self.padding, self.stride, self.dilation, 1)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
            unary = "relu" if relu else None
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", 1.0, unary, [], "")
        y = nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if residual is not None:
            y = y.add_(residual)
        return torch.relu_(y) if relu else y
