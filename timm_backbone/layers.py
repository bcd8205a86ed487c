"""Building blocks shared by the native models: MLP, window partitioning and frozen BatchNorm."""

from __future__ import annotations

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
