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

import os
import re
from typing import Any

import torch
from torch import nn

from ..backbone import BackboneMixin, BackboneOutput
from ..configuration import NativeBackboneConfigMixin, PretrainedConfig
from ..hub import load_weights
from ..layers import FoldedConv, freeze_batch_norm_2d, get_activation, onednn_fusion_available
from ..modeling import PreTrainedModel

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
        **kwargs: Any,
    ) -> None:
        kwargs.pop("stage_names", None)  # derived from depths
        super().__init__(**kwargs)
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
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
        self._init_stage_selection(out_features, out_indices)

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
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
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
    ) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
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
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        layer_type: str = "bottleneck",
        activation: str = "relu",
        downsample_in_bottleneck: bool = False,
    ) -> None:
        super().__init__()
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = ResNetShortCut(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        if layer_type == "basic":
            layers = [
                ResNetConvLayer(in_channels, out_channels, stride=stride),
                ResNetConvLayer(out_channels, out_channels, activation=None),
            ]
        else:
            mid = out_channels // 4
            first_stride, mid_stride = (stride, 1) if downsample_in_bottleneck else (1, stride)
            layers = [
                ResNetConvLayer(in_channels, mid, kernel_size=1, stride=first_stride),
                ResNetConvLayer(mid, mid, stride=mid_stride),
                ResNetConvLayer(mid, out_channels, kernel_size=1, activation=None),
            ]
        self.layer = nn.Sequential(*layers)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        return self.activation(self.layer(x).add_(residual))


class ResNetStage(nn.Module):
    """``depth`` blocks; the first one changes channels and stride."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int, **block_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ResNetBlock(in_channels, out_channels, stride, **block_kwargs),
            *[ResNetBlock(out_channels, out_channels, 1, **block_kwargs) for _ in range(depth - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        strides = [2 if i > 0 or config.downsample_in_first_stage else 1 for i in range(len(config.depths))]
        self.stages = nn.ModuleList(
            ResNetStage(channels[i], channels[i + 1], depth, strides[i], **block_kwargs)
            for i, depth in enumerate(config.depths)
        )


# inference path --------------------------------------------------------------------------------------------------
def _no_plan() -> None:
    return None


class _InferencePlan:
    """The folded convolutions of a :class:`ResNetBackbone`, run as a plain function of the input.

    It reads the model's weights when built and records their versions; the model rebuilds it when they change.
    Copies and pickles of the model carry no plan (packed tensors cannot be copied) and rebuild it on first use.
    """

    def __init__(self, model: ResNetBackbone, signature: tuple) -> None:
        self.signature = signature
        stem = model.embedder.embedder
        param = stem.convolution.weight
        pack = param.device.type == "cpu" and param.dtype == torch.float32 and onednn_fusion_available()
        self.relu_out = isinstance(stem.activation, nn.ReLU)  # transformers' hidden_act; inner convs are ReLU
        self.act = stem.activation
        self.pool = model.embedder.pooler
        self.stem = FoldedConv(stem.convolution, stem.normalization, pack)
        self.stages = [
            [
                (
                    FoldedConv(blk.shortcut.convolution, blk.shortcut.normalization, pack)
                    if isinstance(blk.shortcut, ResNetShortCut)
                    else None,
                    [FoldedConv(layer.convolution, layer.normalization, pack) for layer in blk.layer],
                )
                for blk in stage.layers
            ]
            for stage in model.encoder.stages
        ]

    def __reduce__(self) -> tuple:
        return _no_plan, ()

    def __call__(self, x: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        x = self.stem(x, relu=self.relu_out)
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
        self.stage_names = config.stage_names
        self.num_features = [config.embedding_size, *config.hidden_sizes]
        first = 8 if config.downsample_in_first_stage else 4
        self.stage_strides = [4] + [first * 2**i for i in range(len(config.depths))]
        self.embedder = ResNetEmbeddings(config.num_channels, config.embedding_size, config.hidden_act)
        self.encoder = ResNetEncoder(config)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if config.freeze_batch_norm_2d:
            freeze_batch_norm_2d(self)
        self.to(memory_format=torch.channels_last)
        deepest = max(self.out_indices)
        for stage in self.encoder.stages[deepest:]:
            stage.requires_grad_(False)
        self._optimized = False
        self._plan: _InferencePlan | None = None

    def optimize_for_inference(self, enabled: bool = True) -> ResNetBackbone:
        """Switch the eval-mode forward to BatchNorm folded into the convolutions, fused with ReLU and the residual
        sum (oneDNN kernels on pre-packed weights on CPU; folded ``F.conv2d`` elsewhere), in ``channels_last``.

        The parameters are not changed: the fast path applies only in eval mode with autograd off (``torch.no_grad``
        / ``torch.inference_mode``), training and gradients use the plain modules, its weights are re-folded when
        the parameters change, and ``optimize_for_inference(False)`` turns it off. Numbers match the plain forward
        to float rounding (about 1e-6 relative). The maps it returns are NCHW tensors in ``channels_last`` memory
        format (no copy): ``.view`` on them needs a ``.contiguous()`` first; ``reshape``/``flatten`` work as is.

        Returns:
            The model, in eval mode.
        """
        self._optimized = enabled
        self._plan = None
        return self.eval() if enabled else self

    def _inference_plan(self) -> _InferencePlan:
        signature = tuple(_tensor_version(t) for t in (*self.parameters(), *self.buffers()))
        if self._plan is None or self._plan.signature != signature:
            with torch.no_grad():
                self._plan = _InferencePlan(self, signature)
        return self._plan

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """Feature maps of the selected stages (NCHW).

        Args:
            pixel_values: Images (batch, num_channels, height, width), any height and width.
            output_hidden_states: Also return every stage's output (stem first), as transformers does.
            output_attentions: ResNet has no attention; ``True`` raises ``ValueError``.
            return_dict: ``False`` returns a tuple.
        """
        self.check_pixel_values(pixel_values, min_size=1)  # padded convs and pools take any size, as in transformers
        if output_attentions:
            raise ValueError("ResNet has no attention to return; call it with output_attentions=False")
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(cfg, "output_hidden_states", False))
        num_stages = len(self.encoder.stages) if output_hidden_states else max(self.out_indices)

        if self._optimized and not self.training and not torch.is_grad_enabled():
            states = self._inference_plan()(pixel_values.contiguous(memory_format=torch.channels_last), num_stages)
        else:
            weight = self.embedder.embedder.convolution.weight
            if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            x = self.embedder(pixel_values)
            states = [x]
            for stage in self.encoder.stages[:num_stages]:
                x = stage(x)
                states.append(x)
            for i in range(len(states)) if output_hidden_states else self.out_indices:  # only returned maps
                states[i] = states[i].contiguous()

        output = BackboneOutput(
            feature_maps=tuple(states[i] for i in self.out_indices),
            hidden_states=tuple(states) if output_hidden_states else None,
        )
        if return_dict is False or (return_dict is None and getattr(cfg, "return_dict", True) is False):
            return output.to_tuple()
        return output

    # checkpoints -------------------------------------------------------------------------------------------------
    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> dict:
        """transformers' layouts pass through (the ``resnet.`` prefix is matched later); timm's and torchvision's
        are renamed by :func:`resnet_timm_to_transformers`."""
        state_dict = _unwrap(state_dict)
        if any(_TIMM_KEY.match(k) for k in state_dict):
            return resnet_timm_to_transformers(state_dict)
        return state_dict

    @classmethod
    def from_pretrained(
        cls, src: str | os.PathLike, *, config: ResNetConfig | None = None, strict: bool = False, **kwargs: Any
    ) -> ResNetBackbone:
        """Build the backbone and load its weights; returned in eval mode.

        Args:
            src: A folder or hub id holding transformers' ``ResNetModel`` / ``ResNetForImageClassification`` /
                ``ResNetBackbone`` files or a timm ResNet repo (``config.json`` with ``architecture``); a timm name
                with or without tag (``resnet50.a1_in1k``, ``hf-hub:timm/resnet50.a1_in1k``), resolved to its hub
                repo (the local cache when offline); or a weights file (timm, torchvision or transformers keys)
                together with ``config``.
            config: Use this config instead of the source's.
            strict: Raise ``ValueError`` on missing or unexpected keys.
            **kwargs: Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``) and config
                overrides (``out_indices``, ``freeze_batch_norm_2d``...).

        Raises:
            ValueError: a weights file without ``config``; a timm name that is not a plain ResNet.
            OSError: the source or its weights are not found.
        """
        src = os.fspath(src)
        if os.path.isfile(src):
            if config is None:
                raise ValueError(
                    f"loading the weights file {src} needs config=, e.g. ResNetConfig.from_timm('resnet50') for a "
                    f"timm or torchvision checkpoint"
                )
            config = type(config).from_dict(config.to_dict(), **kwargs) if kwargs else config
            model = cls(config)
            model.load_checkpoint(load_weights(src), strict=strict, source=src)
            return model.eval()
        return super().from_pretrained(_timm_repo(src), config=config, strict=strict, **kwargs)


def _tensor_version(t: torch.Tensor) -> tuple[int, int]:
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference tensors keep no version counter
        return t.data_ptr(), -1


def _timm_repo(src: str) -> str:
    """The hub repo of a timm name (``resnet50.a1_in1k`` -> ``timm/resnet50.a1_in1k``); other sources unchanged."""
    if src.startswith("hf-hub:"):
        return src[len("hf-hub:") :]
    if "/" in src or os.path.exists(src):
        return src
    import timm

    if src.split(".")[0] not in TIMM_RESNET_VARIANTS:
        if timm.is_model(src.split(".")[0]):
            ResNetConfig.timm_fields(src)  # raises: a timm model, but not a plain ResNet
        return src
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(src)
    except RuntimeError as err:  # an unknown tag
        raise ValueError(f"timm has no pretrained weights named {src!r}: {err}") from err
    if pretrained_cfg is None or not pretrained_cfg.hf_hub_id:
        raise OSError(f"timm's weights for {src!r} are not on the hub; pass a weights file with config=")
    return pretrained_cfg.hf_hub_id


# checkpoint layouts ----------------------------------------------------------------------------------------------
# timm / torchvision keys: conv1, bn1, layer{1..4}.{block}.(conv|bn){k} / .downsample.{0,1}, fc
_TIMM_KEY = re.compile(r"^(conv1|bn1)\.|^layer\d+\.\d+\.")
_TIMM_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(?:(conv|bn)(\d)|downsample\.([01]))\.(\w+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d)|shortcut)\.(convolution|normalization)\.(\w+)$"
)
_STEM = {"conv1.": "embedder.embedder.convolution.", "bn1.": "embedder.embedder.normalization.",
         "fc.": "classifier.1."}  # fmt: skip


def _unwrap(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def resnet_timm_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm or torchvision ResNet state dict in transformers' ``ResNetModel`` / ``ResNetBackbone`` layout.

    ``fc`` becomes ``classifier.1``; prefix every other key with ``resnet.`` for ``ResNetForImageClassification``.
    Keys that are not part of a plain ResNet are kept as they are (they show up as unexpected when loaded).
    """
    out = {}
    for key, value in _unwrap(state_dict).items():
        block = _TIMM_BLOCK.match(key)
        if block:
            stage, index, kind, k, downsample, param = block.groups()
            prefix = f"encoder.stages.{int(stage) - 1}.layers.{index}."
            if kind is not None:
                name = f"layer.{int(k) - 1}.{'convolution' if kind == 'conv' else 'normalization'}"
            else:
                name = f"shortcut.{'convolution' if downsample == '0' else 'normalization'}"
            key = f"{prefix}{name}.{param}"
        else:
            for old, new in _STEM.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    return out


def resnet_transformers_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ResNet state dict (``ResNetModel``, ``ResNetBackbone``, or ``ResNetForImageClassification``
    with its ``resnet.`` prefix) in timm's and torchvision's ``ResNet`` layout; ``classifier.1`` becomes ``fc``."""
    state_dict = _unwrap(state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("resnet.")
        block = _HF_BLOCK.match(key)
        if block:
            stage, index, k, kind, param = block.groups()
            prefix = f"layer{int(stage) + 1}.{index}."
            if k is not None:
                name = f"{'conv' if kind == 'convolution' else 'bn'}{int(k) + 1}"
            else:
                name = f"downsample.{0 if kind == 'convolution' else 1}"
            key = f"{prefix}{name}.{param}"
        else:
            for new, old in _STEM.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    return out
