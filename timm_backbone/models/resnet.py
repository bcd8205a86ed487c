"""Native ResNet backbone: transformers' numbers and files, timm and torchvision weights, a fused inference path.

The modules mirror transformers' ``ResNetModel`` (same state-dict keys, so its checkpoints load as they are and saved
files load in transformers). timm's and torchvision's ``resnet18/26/34/50/101/152/200`` checkpoints share one layout
and map onto it key for key (:func:`resnet_timm_to_transformers`).

Speed: convolution weights are ``channels_last`` and the forward computes in that layout (returned maps are plain
contiguous NCHW); in eval mode without autograd BatchNorm runs in place on the conv output; only the stages up to the
deepest selected one run.
:meth:`ResNetBackbone.optimize_for_inference` adds an eval-only path with BatchNorm folded into the convolutions
and, on CPU, oneDNN's fused conv+bias+add+ReLU kernels on pre-packed weights; the parameters are left untouched,
so it is reversible and saving is unaffected.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..auto import ModelFamily, register_family
from ..backbone import BackboneMixin
from ..configuration import MAX_DEPTH, NativeBackboneConfigMixin, PretrainedConfig, check_int, check_ints
from ..hub import unwrap_state_dict
from ..layers import freeze_batch_norm_2d, get_activation, tensor_version
from ..modeling import PreTrainedModel
from . import resnet_convert
from .resnet_convert import resnet_timm_to_transformers, resnet_transformers_to_timm

__all__ = ["TIMM_RESNET_VARIANTS", "ResNetBackbone", "ResNetConfig", "resnet_timm_to_transformers",
           "resnet_transformers_to_timm"]  # fmt: skip

LAYER_TYPES = ("basic", "bottleneck")

# timm / torchvision ResNets whose architecture is exactly transformers' (7x7 stem, 1x1-conv shortcut, stride on the
# 3x3): name -> (layer_type, depths)
TIMM_RESNET_VARIANTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet26": ("bottleneck", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnet200": ("bottleneck", (3, 24, 36, 3)),
}
# timm model arguments that do not change the backbone's eval-mode numbers (head and initialisation only)
_TIMM_HEAD_ARGS = ("num_classes", "global_pool", "drop_rate", "zero_init_last")


class ResNetConfig(NativeBackboneConfigMixin, PretrainedConfig):
    """Config of :class:`ResNetBackbone`, field for field transformers' ``ResNetConfig`` (resnet-50 defaults).

    Args:
        num_channels: Input channels.
        embedding_size: Channels of the stem (7x7 stride-2 conv + max pool).
        hidden_sizes: Output channels of each stage.
        depths: Residual blocks per stage.
        layer_type: ``"basic"`` (two 3x3 convs: resnet-18/34) or ``"bottleneck"`` (1x1, 3x3, 1x1: resnet-50 up).
        hidden_act: Activation of the stem and of each block's output (inside blocks it is always ReLU, as in
            transformers).
        downsample_in_first_stage: Stride 2 in the first stage as well.
        downsample_in_bottleneck: Put a bottleneck's stride on its first 1x1 conv instead of the 3x3 (v1 vs v1.5).
        freeze_batch_norm_2d: Use frozen BatchNorm (fixed statistics and affine terms), for detection fine-tuning.
        output_stride: Total stride of the last stage: 32 (``None``, the default), 16 or 8. Below 32 the last stages
            keep their resolution and dilate their 3x3 convolutions instead (DeepLab style, as timm's
            ``output_stride``); not a transformers field (transformers builds stride 32).
        out_features: Stages to output by name (``stem``, ``stage1``...).
        out_indices: Stages to output by index (0 is the stem).
        **kwargs: Further fields, kept and written back to ``config.json``.
    """

    model_type = "resnet"

    def __init__(
        self,
        num_channels: int = 3,
        embedding_size: int = 64,
        hidden_sizes: list[int] | tuple[int, ...] = (256, 512, 1024, 2048),
        depths: list[int] | tuple[int, ...] = (3, 4, 6, 3),
        layer_type: str = "bottleneck",
        hidden_act: str = "relu",
        downsample_in_first_stage: bool = False,
        downsample_in_bottleneck: bool = False,
        freeze_batch_norm_2d: bool = False,
        out_features: list[str] | None = None,
        out_indices: list[int] | tuple[int, ...] | None = None,
        output_stride: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("stage_names", None)  # derived from depths
        super().__init__(**kwargs)
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
        check_ints("hidden_sizes", hidden_sizes)
        check_ints("depths", depths, high=MAX_DEPTH)
        if not depths or len(depths) != len(hidden_sizes):
            raise ValueError(
                f"hidden_sizes {list(hidden_sizes)} and depths {list(depths)} must be non-empty and of equal length "
                f"(one entry per stage)"
            )
        self.num_channels = num_channels
        self.embedding_size = embedding_size
        self.hidden_sizes = list(hidden_sizes)
        self.depths = list(depths)
        self.layer_type = layer_type
        self.hidden_act = hidden_act
        self.downsample_in_first_stage = downsample_in_first_stage
        self.downsample_in_bottleneck = downsample_in_bottleneck
        self.freeze_batch_norm_2d = freeze_batch_norm_2d
        if output_stride not in (None, 8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32 (None: 32), got {output_stride!r}")
        if output_stride is not None:  # written to config.json only when set: transformers has no such field
            self.output_stride = output_stride
        self.validate()
        self._init_stage_selection(out_features, out_indices)

    size_fields = ("embedding_size", "hidden_sizes", "depths")

    def validate(self) -> None:
        """Types and ranges of the fields that shape the model (see :meth:`PretrainedConfig.validate`)."""
        check_int("num_channels", self.num_channels)
        check_int("embedding_size", self.embedding_size)
        check_ints("hidden_sizes", self.hidden_sizes)
        check_ints("depths", self.depths, high=MAX_DEPTH)
        if not isinstance(self.hidden_act, str):
            raise TypeError(f"hidden_act must be an activation name (str), got {self.hidden_act!r}")
        if self.layer_type == "bottleneck" and min(self.hidden_sizes) < 4:
            raise ValueError(f"hidden_sizes of bottleneck blocks must be at least 4, got {self.hidden_sizes}")
        super().validate()

    def num_parameters_estimate(self) -> int:
        """Convolution weights only: the stem, each block's convolutions and the projection shortcuts."""
        total = 49 * self.num_channels * self.embedding_size
        width = self.embedding_size
        for out, depth in zip(self.hidden_sizes, self.depths):
            for _ in range(depth):
                if self.layer_type == "bottleneck":
                    mid = out // 4
                    total += width * mid + 9 * mid * mid + mid * out
                else:
                    total += 9 * width * out + 9 * out * out
                total += width * out if width != out else 0
                width = out
        return total

    @staticmethod
    def timm_fields(architecture: str, **model_args: Any) -> dict[str, Any]:
        """ResNetConfig fields for a timm/torchvision ResNet name (``resnet50``, ``resnet50.a1_in1k``).

        Raises:
            ValueError: not one of the plain ResNets (``resnet50d``, ``wide_resnet50_2``... differ from transformers'
                architecture), or model arguments that change it; the message lists what is supported.
        """
        name = architecture.split(".")[0]
        if name not in TIMM_RESNET_VARIANTS:
            raise ValueError(
                f"{architecture!r} is not a plain ResNet with transformers' architecture; choose one of "
                f"{list(TIMM_RESNET_VARIANTS)} (with any pretrained tag), or use TimmBackbone for other variants"
            )
        unsupported = sorted(k for k in model_args if k not in (*_TIMM_HEAD_ARGS, "in_chans"))
        if unsupported:
            raise ValueError(
                f"timm model arguments {unsupported} change the architecture of {name}; ResNetConfig supports "
                f"in_chans and the head arguments {list(_TIMM_HEAD_ARGS)}"
            )
        layer_type, depths = TIMM_RESNET_VARIANTS[name]
        widths = (64, 128, 256, 512) if layer_type == "basic" else (256, 512, 1024, 2048)
        return dict(
            num_channels=model_args.get("in_chans", 3), embedding_size=64, hidden_sizes=list(widths),
            depths=list(depths), layer_type=layer_type, hidden_act="relu", downsample_in_first_stage=False,
            downsample_in_bottleneck=False,
        )  # fmt: skip


# blocks ----------------------------------------------------------------------------------------------------------
def _activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    act = get_activation(name)
    if isinstance(act, nn.ReLU):
        act.inplace = True  # applied to a BatchNorm / residual-sum output that nothing else reads
    return act


def _conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))``. In eval mode with autograd off, BatchNorm (then an affine map of its running statistics)
    scales and shifts the conv output in place: one pass and no new tensor, where ``F.batch_norm`` writes a copy."""
    y = conv(x)
    if torch.is_grad_enabled() or (norm.training and isinstance(norm, nn.BatchNorm2d)):
        return norm(y)
    weight, bias, mean, var = (t.float() for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var))
    scale = weight * torch.rsqrt(var + norm.eps)  # in fp32 also for bf16 models and under autocast
    shift = bias - mean * scale
    # in the conv output's dtype: addcmul over mixed dtypes (bf16 map, fp32 terms) is about 100x slower on CPU
    scale, shift = scale.to(y.dtype), shift.to(y.dtype)
    return torch.addcmul(shift[:, None, None], y, scale[:, None, None], out=y)


class ResNetConvLayer(nn.Module):
    """Convolution (no bias, ``kernel_size // 2`` padding) + BatchNorm + activation (none when ``activation`` is
    ``None``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        activation: str | None = "relu",
        dilation: int = 1,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(_conv_norm(self.convolution, self.normalization, x))


class ResNetShortCut(nn.Module):
    """1x1 convolution + BatchNorm projecting the residual to the block's channels and stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_norm(self.convolution, self.normalization, x)


class ResNetBlock(nn.Module):
    """A residual block, transformers' ``ResNetBasicLayer`` or ``ResNetBottleNeckLayer``: ``act(layer(x) +
    shortcut(x))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (a bottleneck works at a quarter of them).
        stride: Spatial stride of the block.
        layer_type: ``"basic"`` or ``"bottleneck"``.
        activation: Activation after the residual sum.
        downsample_in_bottleneck: Stride on the bottleneck's first 1x1 conv instead of its 3x3.
        dilation: Dilation of the 3x3 convolutions (``output_stride`` below 32).
        first_dilation: Dilation of the first 3x3 convolution (timm's rule: the previous stage's dilation); defaults
            to ``dilation``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        layer_type: str = "bottleneck",
        activation: str = "relu",
        downsample_in_bottleneck: bool = False,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = ResNetShortCut(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        if layer_type == "basic":
            layers = [
                ResNetConvLayer(in_channels, out_channels, stride=stride, dilation=first_dilation),
                ResNetConvLayer(out_channels, out_channels, activation=None, dilation=dilation),
            ]
        else:
            mid = out_channels // 4
            first_stride, mid_stride = (stride, 1) if downsample_in_bottleneck else (1, stride)
            layers = [
                ResNetConvLayer(in_channels, mid, kernel_size=1, stride=first_stride),
                ResNetConvLayer(mid, mid, stride=mid_stride, dilation=first_dilation),
                ResNetConvLayer(mid, out_channels, kernel_size=1, activation=None),
            ]
        self.layer = nn.Sequential(*layers)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        return self.activation(self.layer(x).add_(residual))


class ResNetStage(nn.Module):
    """``depth`` blocks; the first one changes channels and stride. With ``grad_checkpointing`` (training only) each
    block's activations are recomputed in the backward pass."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        stride: int,
        dilation: int = 1,
        first_dilation: int | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ResNetBlock(in_channels, out_channels, stride, dilation=dilation, first_dilation=first_dilation,
                        **block_kwargs),
            *[ResNetBlock(out_channels, out_channels, 1, dilation=dilation, **block_kwargs) for _ in range(depth - 1)],
        )  # fmt: skip
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.layers:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.layers(x)


class ResNetEmbeddings(nn.Module):
    """The stem: 7x7 stride-2 conv + BatchNorm + activation, then a 3x3 stride-2 max pool."""

    def __init__(self, num_channels: int, embedding_size: int, activation: str) -> None:
        super().__init__()
        self.embedder = ResNetConvLayer(num_channels, embedding_size, kernel_size=7, stride=2, activation=activation)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(x))


class ResNetEncoder(nn.Module):
    """The stages, as transformers' ``encoder.stages``."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        channels = [config.embedding_size, *config.hidden_sizes]
        block_kwargs = dict(
            layer_type=config.layer_type, activation=config.hidden_act,
            downsample_in_bottleneck=config.downsample_in_bottleneck,
        )  # fmt: skip
        strides, dilations = stage_strides_and_dilations(config)
        self.stages = nn.ModuleList(
            ResNetStage(
                channels[i],
                channels[i + 1],
                depth,
                strides[i],
                dilation=dilations[i],
                first_dilation=dilations[i - 1] if i else 1,
                **block_kwargs,
            )
            for i, depth in enumerate(config.depths)
        )


def stage_strides_and_dilations(config: ResNetConfig) -> tuple[list[int], list[int]]:
    """Each stage's own stride and dilation. Once the total stride reaches ``output_stride``, later stages keep the
    resolution and multiply the dilation by the stride they skip (timm's rule, DeepLab's dilated ResNet)."""
    output_stride = getattr(config, "output_stride", None)
    net_stride, dilation = 4, 1
    strides, dilations = [], []
    for i in range(len(config.depths)):
        stride = 2 if i > 0 or config.downsample_in_first_stage else 1
        if output_stride is not None and net_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            net_stride *= stride
        strides.append(stride)
        dilations.append(dilation)
    return strides, dilations


# inference path --------------------------------------------------------------------------------------------------
# the fused inference path ----------------------------------------------------------------------------------
_ONEDNN_CONV_FUSION: bool | None = None


def onednn_fusion_available() -> bool:
    """Whether oneDNN's fused convolution kernels (those torch.compile's CPU backend emits) exist and compute right."""
    global _ONEDNN_CONV_FUSION
    if _ONEDNN_CONV_FUSION is None:
        _ONEDNN_CONV_FUSION = False
        if torch.backends.mkldnn.is_available():
            # in fp32 whatever the caller's autocast: under bf16 autocast the F.conv2d reference would run in bf16,
            # miss the tolerance, and turn the fused kernels off for the rest of the process
            try:
                with torch.autocast("cpu", enabled=False):
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

    Calling it computes ``relu(conv(x) + bias [+ residual])`` (ReLU optional). With ``onednn`` (fp32 or bf16 CPU) that
    is one oneDNN kernel with the bias, residual sum and ReLU fused, on weights packed for the first input's shape
    (other shapes run correctly on the same packing); otherwise ``F.conv2d`` on the folded weights. The source modules
    are only read, at construction.

    Args:
        conv: The convolution (no bias, groups 1).
        norm: The BatchNorm after it (``BatchNorm2d`` or :class:`FrozenBatchNorm2d`).
        onednn: Use oneDNN's fused kernels; see :func:`onednn_fusion_available`.
        dtype: The dtype of the folded weight and bias (default: the convolution's); bf16 under autocast, where the
            folding is done once from the fp32 parameters instead of casting them on every call.
    """

    def __init__(
        self, conv: nn.Conv2d, norm: nn.Module, onednn: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        if conv.bias is not None or conv.groups != 1:
            raise ValueError("FoldedConv takes a convolution without bias and with groups=1 (as ResNet's)")
        with torch.no_grad():  # in float64: the folded terms then differ from BatchNorm's arithmetic by rounding only
            scale = norm.weight.double() * torch.rsqrt(norm.running_var.double() + norm.eps)
            weight = conv.weight.double() * scale[:, None, None, None]
            dtype = dtype or conv.weight.dtype
            self.bias = (norm.bias.double() - norm.running_mean.double() * scale).to(dtype)
        self.weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
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


def _no_plan() -> None:
    return None


def _onednn_dtype(dtype: torch.dtype) -> bool:
    """oneDNN's fused convolutions run fp32, and bf16 where the CPU has bf16 support (AVX-512 BF16, AMX)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def _autocast_dtype(param: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes convolutions in for fp32 CPU parameters (``None``: autocast off or not CPU)."""
    if param.device.type != "cpu" or param.dtype != torch.float32 or not torch.is_autocast_enabled("cpu"):
        return None
    return torch.get_autocast_dtype("cpu")


class _InferencePlan:
    """The folded convolutions of a :class:`ResNetBackbone`, run as a plain function of the input.

    It reads the model's weights when built and records their versions; the model rebuilds it when they change.
    Copies and pickles of the model carry no plan (packed tensors cannot be copied) and rebuild it on first use.
    """

    def __init__(self, model: ResNetBackbone, signature: tuple, dtype: torch.dtype | None = None) -> None:
        self.signature = signature
        stem = model.embedder.embedder
        param = stem.convolution.weight
        self.dtype = dtype or param.dtype
        pack = param.device.type == "cpu" and _onednn_dtype(self.dtype) and onednn_fusion_available()
        self.relu_out = isinstance(stem.activation, nn.ReLU)  # transformers' hidden_act; inner convs are ReLU
        self.act = stem.activation
        self.pool = model.embedder.pooler
        self.stem = FoldedConv(stem.convolution, stem.normalization, pack, self.dtype)
        self.stages = [
            [
                (
                    FoldedConv(blk.shortcut.convolution, blk.shortcut.normalization, pack, self.dtype)
                    if isinstance(blk.shortcut, ResNetShortCut)
                    else None,
                    [FoldedConv(layer.convolution, layer.normalization, pack, self.dtype) for layer in blk.layer],
                )
                for blk in stage.layers
            ]
            for stage in model.encoder.stages
        ]

    def __reduce__(self) -> tuple:
        return _no_plan, ()

    def __call__(self, x: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        x = self.stem(x.to(self.dtype), relu=self.relu_out)
        if not self.relu_out:
            x = self.act(x)
        x = self.pool(x)
        states = [x]
        for blocks in self.stages[:num_stages]:
            for shortcut, convs in blocks:
                residual = shortcut(x, relu=False) if shortcut is not None else x
                for conv in convs[:-1]:
                    x = conv(x, relu=True)
                x = convs[-1](x, relu=self.relu_out, residual=residual)
                if not self.relu_out:
                    x = self.act(x)
            states.append(x)
        return states


# the backbone ----------------------------------------------------------------------------------------------------
class ResNetBackbone(BackboneMixin, PreTrainedModel):
    """ResNet as a backbone: stages ``stem, stage1..N``, transformers' ``ResNetBackbone`` numbers and keys.

    Only the stages up to the deepest one in ``out_indices`` run (all of them when hidden states are requested);
    the others keep their weights, so files stay transformers-compatible, but their parameters are frozen
    (``requires_grad=False``) so that DDP needs no ``find_unused_parameters``.

    Convolution weights are ``channels_last`` (as timm's ``--channels-last``), so the forward computes in that
    layout; it returns contiguous NCHW maps. ``model.to(memory_format=torch.contiguous_format)`` computes in NCHW.
    ``save_pretrained`` writes contiguous tensors; to write ``state_dict()`` with safetensors' ``save_file``
    yourself, make its tensors ``.contiguous()`` (``save_model`` does).
    """

    config_class = ResNetConfig
    checkpoint_prefixes = ("resnet.",)
    ignore_unexpected = (r"^classifier\.", r"^fc\.")

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__(config)
        strides = [4]
        for stride in stage_strides_and_dilations(config)[0]:
            strides.append(strides[-1] * stride)
        self.embedder = ResNetEmbeddings(config.num_channels, config.embedding_size, config.hidden_act)
        self.encoder = ResNetEncoder(config)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if config.freeze_batch_norm_2d:
            freeze_batch_norm_2d(self)
        self.to(memory_format=torch.channels_last)
        self._optimized = False
        self._plan: _InferencePlan | None = None
        self._autocast_plan: _InferencePlan | None = None
        self.init_stages(config.stage_names, [config.embedding_size, *config.hidden_sizes], strides)

    def stage_modules(self, index: int) -> list[nn.Module]:
        return [self.embedder if index == 0 else self.encoder.stages[index - 1]]

    # fine-tuning -------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass instead of storing them. BatchNorm in
        training mode then updates its running statistics twice per step (as in timm and transformers)."""
        for stage in self.encoder.stages:
            stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter grouping (layer-wise learning-rate decay): the stem, then each block (each stage when
        ``coarse``), as timm's ResNet."""
        return dict(
            stem=r"^embedder\.",
            blocks=r"^encoder\.stages\.(\d+)" if coarse else r"^encoder\.stages\.(\d+)\.layers\.(\d+)",
        )

    def no_weight_decay(self) -> set[str]:
        """Parameters to train without weight decay beyond biases and norms: none (as timm's ResNet)."""
        return set()

    def input_conv_keys(self) -> tuple[str, ...]:
        return ("embedder.embedder.convolution.weight",)

    @property
    def min_input_size(self) -> int:
        """1: padded convolutions and pools take any size, as in transformers (1x1 maps at worst)."""
        return 1

    def optimize_for_inference(self, enabled: bool = True) -> ResNetBackbone:
        """Switch the eval-mode forward to BatchNorm folded into the convolutions, fused with ReLU and the residual
        sum (oneDNN kernels on pre-packed weights on CPU; folded ``F.conv2d`` elsewhere), in ``channels_last``.

        The parameters are not changed: the fast path applies only in eval mode with autograd off (``torch.no_grad``
        / ``torch.inference_mode``), training and gradients use the plain modules, its weights are re-folded when
        the parameters change, and ``optimize_for_inference(False)`` turns it off. Numbers match the plain forward
        to float rounding (about 1e-6 relative). The maps it returns are NCHW tensors in ``channels_last`` memory
        format (no copy): ``.view`` on them needs a ``.contiguous()`` first; ``reshape``/``flatten`` work as is.
        In bf16 (``model.to(torch.bfloat16)``, or fp32 under ``torch.autocast("cpu", dtype=torch.bfloat16)``, where
        the folded weights are cast to bf16 once, not per call) the same oneDNN kernels run in bf16.

        Returns:
            The model, in eval mode.
        """
        self._optimized = enabled
        self._plan = self._autocast_plan = None
        return self.eval() if enabled else self

    def _inference_plan(self) -> _InferencePlan:
        """The plan for the parameters' dtype or, under CPU autocast, one folded once into the autocast dtype (so
        that no weight is cast per call, and the oneDNN kernels run in bf16 rather than ignore autocast)."""
        autocast = _autocast_dtype(self.embedder.embedder.convolution.weight)
        signature = tuple(tensor_version(t) for t in (*self.parameters(), *self.buffers()))
        plan = self._plan if autocast is None else getattr(self, "_autocast_plan", None)
        if plan is None or plan.signature != signature or (autocast is not None and plan.dtype != autocast):
            with torch.no_grad():
                plan = _InferencePlan(self, signature, autocast)
            if autocast is None:
                self._plan = plan
            else:
                self._autocast_plan = plan
        return plan

    def forward_stages(
        self, pixel_values: torch.Tensor, indices: tuple[int, ...], output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], None]:
        num_stages = max(indices)
        if self._optimized and not self.training and not torch.is_grad_enabled():
            states = self._inference_plan()(pixel_values.contiguous(memory_format=torch.channels_last), num_stages)
            return {i: states[i] for i in indices}, None
        weight = self.embedder.embedder.convolution.weight
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.embedder(pixel_values)
        states = [x]
        for stage in self.encoder.stages[:num_stages]:
            x = stage(x)
            states.append(x)
        return {i: states[i].contiguous() for i in indices}, None  # returned maps in plain NCHW

    # checkpoints -------------------------------------------------------------------------------------------------
    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> dict:
        """transformers' layouts pass through (the ``resnet.`` prefix is matched later); timm's and torchvision's
        are renamed by :func:`resnet_timm_to_transformers`."""
        state_dict = unwrap_state_dict(state_dict)
        if resnet_convert.is_timm_layout(state_dict):
            return resnet_timm_to_transformers(state_dict)
        return state_dict


# classifier key in timm's and transformers' layouts, transformers' task prefix, task class and base class
_HEADS = ("fc.weight", "classifier.1.weight", "resnet.", "ResNetForImageClassification", "ResNetModel")
register_family(
    ModelFamily(
        name="resnet",
        config_class=ResNetConfig,
        backbone_class=ResNetBackbone,
        timm_to_transformers=resnet_timm_to_transformers,
        transformers_to_timm=resnet_transformers_to_timm,
        detect_layout=resnet_convert.detect_layout,
        timm_architecture=resnet_convert.timm_architecture,
        fields_from_timm=resnet_convert.fields_from_timm,
        transformers_heads=_HEADS,
        transformers_backbone="ResNetBackbone",
        timm_stage=lambda native_index: native_index,
        timm_as_native=resnet_convert.timm_as_native,
        comparison_note=resnet_convert.COMPARISON_NOTE,
        image_processor="ConvNextImageProcessor",
        benchmark_models={"resnet18": "resnet18", "resnet50": "resnet50", "resnet101": "resnet101"},
    ),
    exist_ok=True,
)
