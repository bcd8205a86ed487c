"""MaskFormer over any backbone: pixel-level module (backbone + FPN pixel decoder), transformer module (a DETR
decoder over learned queries), class and mask heads, and the set loss.

Module names follow transformers' checkpoint layout (``model.pixel_level_module.decoder.fpn...``,
``model.transformer_module.decoder.layers.N...``, ``class_predictor``, ``mask_embedder``); the backbone sits at
``model.pixel_level_module.encoder`` and is saved under its own on-disk names, so transformers loads what is saved
here and the other way round.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...auto import family_of
from ...backbone import ModelOutput
from ...modeling import LoadReport, PreTrainedModel, match_prefix
from ...winograd import use_winograd
from .configuration import MaskFormerConfig, resolve_backbone_config
from .decoders import MaskFormerPixelDecoder, MaskFormerTransformerModule, fused_mask_logits
from .loss import MaskFormerHungarianMatcher, MaskFormerLoss, check_labels


# outputs ------------------------------------------------------------------------------------------------------------
@dataclass
class MaskFormerModelOutput(ModelOutput):
    """Outputs of :class:`MaskFormerModel`.

    Attributes:
        encoder_last_hidden_state: The backbone's last feature map ``(B, C, H/32, W/32)``.
        pixel_decoder_last_hidden_state: Pixel embeddings ``(B, mask_feature_size, H/4, W/4)``.
        transformer_decoder_last_hidden_state: Query embeddings ``(B, num_queries, d_model)``.
        encoder_hidden_states: The backbone feature maps fed to the pixel decoder, when requested.
        pixel_decoder_hidden_states: The FPN maps, coarse to fine, when requested.
        transformer_decoder_hidden_states: The decoder input and each layer's output, when requested.
        hidden_states: The three above, concatenated.
        attentions: Self-attention weights of each decoder layer, when requested.
    """

    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskFormerForInstanceSegmentationOutput(ModelOutput):
    """Outputs of :class:`MaskFormerForInstanceSegmentation`; ``MaskFormerImageProcessor``'s post-processing reads
    ``class_queries_logits`` and ``masks_queries_logits``.

    Attributes:
        loss: Weighted sum of the losses, when labels are given.
        class_queries_logits: ``(B, num_queries, num_labels + 1)``; the last class is "no object".
        masks_queries_logits: ``(B, num_queries, H/4, W/4)``.
        auxiliary_logits: Per intermediate decoder layer, a dict with both logits (with ``use_auxiliary_loss``).
        The other fields are those of :class:`MaskFormerModelOutput`.
    """

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    auxiliary_logits: list[dict[str, torch.Tensor]] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class MaskFormerPixelLevelModule(nn.Module):
    """The backbone (``encoder``) and the pixel decoder (``decoder``), sized from the backbone's ``channels``."""

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__()
        from ...auto import AutoBackbone

        if config.backbone_config is None:  # backbone fields set on the config after it was built (transformers' way)
            config.backbone_config = resolve_backbone_config(
                None, config.backbone, config.use_timm_backbone, config.backbone_kwargs
            )
            config.backbone, config.use_timm_backbone, config.backbone_kwargs = None, False, None
        select_multiscale_stages(config.backbone_config)
        if config.use_pretrained_backbone:
            # the backbone's weights from its source (the hub cache when offline); the pixel decoder stays random
            source, hub_kwargs = pretrained_backbone_source(config.backbone_config)
            self.encoder = AutoBackbone.from_pretrained(source, config=config.backbone_config, **hub_kwargs)
            self.encoder.train(self.training)
        else:
            self.encoder = AutoBackbone.from_config(config.backbone_config)
        strides = list(self.encoder.strides)
        if strides != sorted(strides):
            raise ValueError(f"the backbone's selected stages must go from fine to coarse; their strides are {strides}")
        self.decoder = MaskFormerPixelDecoder(
            list(self.encoder.channels), config.fpn_feature_size, config.mask_feature_size
        )
        self.decoder_channels_per_group = config.fpn_feature_size // 32
        if hasattr(self.encoder, "optimize_for_inference"):
            # the backbone's own inference path (same numbers, eval without autograd only) is on by default here:
            # its maps are consumed by the FPN, so their memory format never reaches the user's code (ResNet), and a
            # packed copy of the linear weights is the price of a faster forward (Swin)
            self.encoder.optimize_for_inference(True).train(self.training)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """The backbone's input checks, and the one size MaskFormer adds: where the FPN's GroupNorm(32) normalises
        one channel per group, a single image must give its coarsest map more than one cell (a group of one value
        cannot be normalised).

        Raises:
            TypeError, ValueError: as the backbone's ``check_pixel_values``, or a single image that is too small.
        """
        self.encoder.check_pixel_values(pixel_values)
        stride = max(self.encoder.strides)
        height, width = pixel_values.shape[-2:]
        if pixel_values.shape[0] * self.decoder_channels_per_group == 1 and max(height, width) < 2 * stride:
            raise ValueError(
                f"a single {height}x{width} image is too small for MaskFormer with this backbone: its coarsest "
                f"selected stage (stride {stride}) would be one cell, which the FPN's GroupNorm(32) over "
                f"{32 * self.decoder_channels_per_group} channels cannot normalise; make one side at least "
                f"{2 * stride} pixels, batch several images, or use fpn_feature_size >= 64"
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list]:
        features = tuple(self.encoder(pixel_values, return_dict=True).feature_maps)
        pixel_embeddings, fpn_maps = self.decoder(features)
        return features, pixel_embeddings, fpn_maps


def pretrained_backbone_source(backbone_config: Any) -> tuple[str, dict[str, Any]]:
    """Where ``use_pretrained_backbone=True`` reads the backbone's weights: the folder or hub id the backbone config
    was loaded from (``MaskFormerConfig(backbone=...)``, ``XConfig.from_pretrained(...)``), at the same revision and
    from the same cache folder, else the timm name of a :class:`TimmBackboneConfig`.

    Returns:
        The name, and the hub arguments it was read with (``revision``, ``cache_dir``, ``subfolder``).

    Raises:
        ValueError: the config says nothing about where its weights are.
    """
    source = getattr(backbone_config, "name_or_path", "") or getattr(backbone_config, "backbone", None)
    if not source:
        raise ValueError(
            f"use_pretrained_backbone=True, but the {type(backbone_config).__name__} does not say where its weights "
            f"are; pass backbone='<timm name, folder or hub id>', or a backbone_config from "
            f"{type(backbone_config).__name__}.from_pretrained('<folder or hub id>')"
        )
    return str(source), dict(getattr(backbone_config, "_source_kwargs", None) or {})


def select_multiscale_stages(backbone_config: Any) -> None:
    """Give a backbone left at its default output (only the last stage) the stages MaskFormer needs: the last stage
    of each stride from 4 on, stems excluded (``stage1..stage4`` of ResNet and Swin, ``layer1..layer4`` of a timm
    ResNet). Strides are read from a copy of the backbone built on the meta device, so nothing is allocated."""
    from ...auto import AutoBackbone

    stage_names = getattr(backbone_config, "stage_names", None)
    indices = getattr(backbone_config, "out_indices", None)
    features = getattr(backbone_config, "out_features", None)
    if stage_names is None:
        if indices is not None or features is not None:
            return  # chosen by the user; the backbone validates it
    elif list(indices or []) != [len(stage_names) - 1]:
        return
    with torch.device("meta"):
        probe = AutoBackbone.from_config(copy.deepcopy(backbone_config))
    wanted: dict[int, int] = {}
    for i, (name, stride) in enumerate(zip(probe.stage_names, probe.stage_strides)):
        if stride >= 4 and name != "stem":
            wanted[stride] = i  # the last stage of each stride
    chosen = sorted(wanted.values()) or [len(probe.stage_names) - 1]
    if len(set(probe.strides)) > 1:  # the backbone's own default is multi-scale already (a ViT's feature pyramid)
        chosen = list(probe.out_indices)
    if getattr(backbone_config, "stage_names", None) is None:
        backbone_config.stage_names = list(probe.stage_names)
    backbone_config.set_output_features_output_indices(None, chosen)


# checkpoint layout --------------------------------------------------------------------------------------------------
ENCODER = "pixel_level_module.encoder."
_MLP_DISK = re.compile(r"(transformer_module\.decoder\.layers\.\d+\.)(fc[12]\.)")
_MLP_MODULE = re.compile(r"(transformer_module\.decoder\.layers\.\d+\.)mlp\.(fc[12]\.)")


def _decoder_key_from_disk(key: str) -> str:
    """transformers' files (``layers.N.fc1``, ``out_proj``) and in-memory names (``mlp.fc1``, ``o_proj``) -> ours."""
    if "transformer_module.decoder.layers." not in key:
        return key
    return _MLP_DISK.sub(r"\1mlp.\2", key).replace(".o_proj.", ".out_proj.")


class _MaskFormerWeights:
    """Saving and loading in transformers' layout, the backbone part through the backbone's own key mapping."""

    encoder_prefix: ClassVar[str] = ENCODER

    def _backbone(self) -> nn.Module:
        return self.get_submodule(self.encoder_prefix[:-1])

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(self.encoder_prefix)}
        out = {_MLP_MODULE.sub(r"\1\2", k): v for k, v in own.items()}
        backbone = self._backbone()
        saved = backbone.state_dict_for_save() if hasattr(backbone, "state_dict_for_save") else backbone.state_dict()
        family = family_of(backbone.config)
        to_task_layout = (family.task_layouts or {}).get("maskformer") if family is not None else None
        if to_task_layout is not None:
            saved = to_task_layout(saved, backbone)
        out.update({self.encoder_prefix + k: v for k, v in saved.items()})
        return out

    def missing_ok(self) -> tuple[str, ...]:
        """The model's own, and the backbone's (under its prefix)."""
        backbone = self._backbone().missing_ok() if hasattr(self._backbone(), "missing_ok") else ()
        inner = tuple(re.escape(ENCODER) + p[1:] if p.startswith("^") else p for p in backbone)
        return (*self.ignore_missing, *inner)

    def load_checkpoint(
        self, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> LoadReport:
        """Load a MaskFormer checkpoint (transformers' or ours, with or without the ``model.`` prefix); the backbone
        keys go through the backbone's ``convert_state_dict`` (maskformer-swin, timm, transformers layouts)."""
        backbone = self._backbone()
        rest, encoder, head = {}, {}, None
        for key, value in state_dict.items():
            before, sep, after = key.partition(ENCODER)
            if sep:
                encoder[after], head = value, before
            else:
                rest[_decoder_key_from_disk(key)] = value
        if encoder:
            own = backbone.state_dict()
            converted = type(backbone).convert_state_dict(encoder, backbone.config)
            converted = match_prefix(converted, own, getattr(backbone, "checkpoint_prefixes", ()))
            ignored = getattr(backbone, "ignore_unexpected", ())
            converted = {k: v for k, v in converted.items() if k in own or not any(re.search(p, k) for p in ignored)}
            rest.update({f"{head}{ENCODER}{k}": v for k, v in converted.items()})
        return PreTrainedModel.load_checkpoint(self, rest, strict=strict, source=source)

    # pretrained backbone and fine-tuning -----------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, config: MaskFormerConfig, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> PreTrainedModel:
        """As the base; the checkpoint holds the backbone's weights, so ``use_pretrained_backbone`` does not load
        them from the backbone's source first (a saved model reloads without it)."""
        flag = config.use_pretrained_backbone
        config.use_pretrained_backbone = False
        try:
            return super().from_state_dict(config, state_dict, strict=strict, source=source)
        finally:
            config.use_pretrained_backbone = flag

    def save_pretrained(self, save_directory: Any) -> None:
        """As the base; ``config.json`` says ``use_pretrained_backbone: false``, since the file holds the backbone's
        weights (transformers then reads it too: it refuses ``backbone_config`` with a pretrained backbone)."""
        flag = self.config.use_pretrained_backbone
        self.config.use_pretrained_backbone = False
        try:
            super().save_pretrained(save_directory)
        finally:
            self.config.use_pretrained_backbone = flag

    @property
    def backbone_load_report(self) -> LoadReport | None:
        """What loading the pretrained backbone matched (loaded, missing, unexpected keys); ``None`` for a backbone
        built with random weights."""
        return self._backbone().load_report

    def input_conv_keys(self) -> tuple[str, ...]:
        """The backbone's input convolutions, under the backbone's prefix."""
        backbone = self._backbone()
        keys = backbone.input_conv_keys() if hasattr(backbone, "input_conv_keys") else ()
        return tuple(self.encoder_prefix + k for k in keys)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Gradient checkpointing in the backbone (see the backbone's ``set_grad_checkpointing``).

        Raises:
            ValueError: the backbone cannot checkpoint.
        """
        self._backbone().gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self._backbone().gradient_checkpointing_disable()

    def group_matcher(self, coarse: bool = False) -> Any:
        """timm's parameter grouping for layer-wise learning-rate decay: the backbone's groups (from its own
        ``group_matcher``, grouped by timm's ``group_parameters``), then everything else (pixel decoder, query
        decoder, heads) in the last group, which keeps the full learning rate."""
        from timm.models import group_parameters

        backbone = self._backbone()
        layer_of = group_parameters(backbone, backbone.group_matcher(coarse=coarse), reverse=True)
        prefix = self.encoder_prefix

        def ordinal(name: str) -> tuple[float, ...]:
            inner = name[len(prefix) :] if name.startswith(prefix) else None
            return (float(layer_of[inner]),) if inner in layer_of else (float("inf"),)

        return ordinal

    def no_weight_decay(self) -> set[str]:
        """The backbone's ``no_weight_decay()`` names, under its prefix."""
        backbone = self._backbone()
        names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
        return {self.encoder_prefix + name for name in names}


def _init_weights(module: nn.Module, std: float, xavier_gain: float) -> None:
    """transformers' initialisation of MaskFormer's own layers (the backbone initialises itself)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, gain=xavier_gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=xavier_gain)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _flag(value: bool | None, config: MaskFormerConfig, name: str) -> bool:
    return bool(value if value is not None else getattr(config, name, False))


# models -------------------------------------------------------------------------------------------------------------
class MaskFormerModel(_MaskFormerWeights, PreTrainedModel):
    """MaskFormer without heads: backbone, FPN pixel decoder and DETR decoder.

    The backbone is built from ``config.backbone_config`` by :class:`AutoBackbone`; the pixel decoder is sized from
    its ``channels`` and the query decoder reads its coarsest map.
    """

    config_class = MaskFormerConfig
    checkpoint_prefixes = ("model.",)
    ignore_unexpected = (r"^class_predictor\.", r"^mask_embedder\.", r"^criterion\.")
    ignore_missing = (r"num_batches_tracked$",)

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__(config)
        self.pixel_level_module = MaskFormerPixelLevelModule(config)
        self.transformer_module = MaskFormerTransformerModule(self.pixel_level_module.encoder.channels[-1], config)
        _init_weights(self.pixel_level_module.decoder, config.init_std, config.init_xavier_std)
        _init_weights(self.transformer_module, config.init_std, config.init_xavier_std)

    @property
    def backbone(self) -> nn.Module:
        return self.pixel_level_module.encoder

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskFormerModelOutput | tuple:
        """Run the model.

        Args:
            pixel_values: Float images ``(B, C, H, W)``, normalised as the backbone expects.
            pixel_mask: Accepted for compatibility and ignored, as in transformers' MaskFormer.
            output_hidden_states: Return the backbone, pixel-decoder and query-decoder hidden states.
            output_attentions: Return the decoder's self-attention weights.
            return_dict: ``False`` returns a tuple.
        """
        output_hidden_states = _flag(output_hidden_states, self.config, "output_hidden_states")
        output_attentions = _flag(output_attentions, self.config, "output_attentions")
        self.pixel_level_module.check_pixel_values(pixel_values)
        if pixel_values.shape[0] == 0:
            return _empty_batch(
                self,
                pixel_values,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                return_dict=return_dict,
            )
        features, pixel_embeddings, fpn_maps = self.pixel_level_module(pixel_values)
        queries, decoder_states, attentions = self.transformer_module(
            features[-1], output_hidden_states, output_attentions
        )
        output = MaskFormerModelOutput(
            encoder_last_hidden_state=features[-1],
            pixel_decoder_last_hidden_state=pixel_embeddings,
            transformer_decoder_last_hidden_state=queries,
            attentions=attentions,
        )
        if output_hidden_states:
            output.encoder_hidden_states = features
            output.pixel_decoder_hidden_states = tuple(fpn_maps)
            output.transformer_decoder_hidden_states = decoder_states
            output.hidden_states = features + tuple(fpn_maps) + decoder_states
        return output if return_dict is not False else output.to_tuple()


class MaskFormerForInstanceSegmentation(_MaskFormerWeights, PreTrainedModel):
    """MaskFormer with its class and mask heads, and the Hungarian-matched loss when labels are given.

    Example::

        config = MaskFormerConfig(backbone_config=ResNetConfig(), num_labels=150)
        model = MaskFormerForInstanceSegmentation(config)
        out = model(pixel_values, mask_labels=[...], class_labels=[...])
        out.loss.backward()
    """

    config_class = MaskFormerConfig
    checkpoint_prefixes = ("model.",)
    encoder_prefix = "model." + ENCODER
    ignore_missing = (r"num_batches_tracked$", r"^criterion\.empty_weight$")

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__(config)
        self.model = MaskFormerModel(config)
        dim = config.decoder_config["d_model"]
        self.class_predictor = nn.Linear(dim, config.num_labels + 1)
        layers = [(dim, dim, nn.ReLU()), (dim, dim, nn.ReLU()), (dim, config.mask_feature_size, nn.Identity())]
        self.mask_embedder = nn.Sequential(*[nn.Sequential(nn.Linear(i, o), act) for i, o, act in layers])
        _init_weights(self.class_predictor, config.init_std, config.init_xavier_std)
        _init_weights(self.mask_embedder, config.init_std, config.init_xavier_std)
        matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=config.mask_weight, cost_dice=config.dice_weight)
        self.criterion = MaskFormerLoss(config.num_labels, matcher, eos_coef=config.no_object_weight)
        self.weight_dict = {
            "loss_cross_entropy": config.cross_entropy_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }

    @property
    def backbone(self) -> nn.Module:
        return self.model.pixel_level_module.encoder

    def optimize_for_inference(self, enabled: bool = True) -> MaskFormerForInstanceSegmentation:
        """Switch the eval-mode forward without autograd to a faster path with the same logits (to float rounding):
        the mask projection folded into the query embeddings (:func:`fused_mask_logits`), the backbone's own
        inference path when it has one (ResNet: BatchNorm folded into fused oneDNN convolutions; Swin: linear weights
        pre-packed for oneDNN) and the pixel decoder's wide 3x3 convolutions as Winograd F(2x2, 3x3)
        (:mod:`timm_backbone.winograd`); MaskFormer turns the last two on when it is built.

        The parameters are not changed; training and gradients use the plain path, and
        ``optimize_for_inference(False)`` turns all three off (the pixel decoder's convolutions are then
        ``nn.Conv2d``'s, bit for bit). On the fast path ``pixel_decoder_last_hidden_state`` is not
        computed (``None``), and hidden states or auxiliary logits, when asked for, take the plain path.

        Returns:
            The model, in eval mode.
        """
        self._fast_path = enabled
        if hasattr(self.backbone, "optimize_for_inference"):
            self.backbone.optimize_for_inference(enabled)
        use_winograd(self.model.pixel_level_module.decoder, enabled)
        return self.eval() if enabled else self

    def _fast_forward(self, pixel_values: torch.Tensor, output_attentions: bool | None) -> tuple:
        features = tuple(self.backbone(pixel_values, return_dict=True).feature_maps)
        decoder = self.model.pixel_level_module.decoder
        fpn_map = decoder.fpn(features)[-1]
        queries, _, attentions = self.model.transformer_module(
            features[-1], output_attentions=_flag(output_attentions, self.config, "output_attentions")
        )
        masks = fused_mask_logits(self.mask_embedder(queries), fpn_map, decoder.mask_projection)
        return self.class_predictor(queries), masks, features[-1], queries, attentions

    def get_logits(
        self, outputs: MaskFormerModelOutput
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Class and mask logits of the final queries and, with ``use_auxiliary_loss``, of every earlier decoder
        state (transformers' rule: the states before the last, the decoder input included)."""
        pixel_embeddings = outputs.pixel_decoder_last_hidden_state
        if not self.config.use_auxiliary_loss:
            queries = outputs.transformer_decoder_last_hidden_state
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embedder(queries), pixel_embeddings)
            return self.class_predictor(queries), masks, []
        states = torch.stack(outputs.transformer_decoder_hidden_states)  # L, B, Q, C
        classes = self.class_predictor(states)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embedder(states), pixel_embeddings)
        aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], classes[:-1])]
        return classes[-1], masks[-1], aux

    def get_loss_dict(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        auxiliary_logits: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each loss times its weight (``cross_entropy_weight``, ``mask_weight``, ``dice_weight``), auxiliary ones
        included."""
        losses = self.criterion(masks_queries_logits, class_queries_logits, mask_labels, class_labels, auxiliary_logits)
        return {
            name: value * next(w for key, w in self.weight_dict.items() if name.startswith(key))
            for name, value in losses.items()
        }

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_auxiliary_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskFormerForInstanceSegmentationOutput | tuple:
        """Predict ``num_queries`` (class, mask) pairs per image, and the loss when labels are given.

        Args:
            pixel_values: Float images ``(B, C, H, W)``.
            mask_labels: Per image, binary masks ``(num_instances, H, W)`` at the images' size (an image may have
                none).
            class_labels: Per image, the class of each mask, ``(num_instances,)`` in ``[0, num_labels)``.
            pixel_mask: Accepted for compatibility and ignored, as in transformers.
            output_auxiliary_logits: Return the per-layer logits (with ``use_auxiliary_loss``).
            output_hidden_states: Return the hidden states of every part.
            output_attentions: Return the decoder's self-attention weights.
            return_dict: ``False`` returns a tuple (``None`` fields left out).

        Raises:
            ValueError: only one of ``mask_labels`` / ``class_labels`` is given, or labels that do not fit (see
                :func:`check_labels`).
        """
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("give both mask_labels and class_labels to compute the loss, or neither")
        self.model.pixel_level_module.check_pixel_values(pixel_values)
        if mask_labels is not None:
            check_labels(
                mask_labels, class_labels, self.config.num_labels, pixel_values.shape[0], pixel_values.shape[-2:]
            )
            class_labels = [c.long() for c in class_labels]  # any integer width
        if pixel_values.shape[0] == 0:
            if mask_labels is not None:
                raise ValueError("an empty batch has no loss: call the model without labels, or skip the batch")
            return _empty_batch(
                self,
                pixel_values,
                output_auxiliary_logits=output_auxiliary_logits,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                return_dict=return_dict,
            )
        output_hidden_states = _flag(output_hidden_states, self.config, "output_hidden_states")
        if (
            getattr(self, "_fast_path", False)
            and not self.training
            and not torch.is_grad_enabled()
            and not output_hidden_states
            and not self.config.use_auxiliary_loss
        ):
            class_logits, mask_logits, image_features, queries, attentions = self._fast_forward(
                pixel_values, output_attentions
            )
            loss = None
            if mask_labels is not None:
                loss = sum(self.get_loss_dict(mask_logits, class_logits, mask_labels, class_labels).values())
            output = MaskFormerForInstanceSegmentationOutput(
                loss=loss,
                class_queries_logits=class_logits,
                masks_queries_logits=mask_logits,
                encoder_last_hidden_state=image_features,
                transformer_decoder_last_hidden_state=queries,
                attentions=attentions,
            )
            return output if return_dict is not False else output.to_tuple()
        outputs = self.model(
            pixel_values,
            output_hidden_states=output_hidden_states or self.config.use_auxiliary_loss,
            output_attentions=output_attentions,
            return_dict=True,
        )
        class_logits, mask_logits, aux = self.get_logits(outputs)
        loss = None
        if mask_labels is not None:
            loss = sum(self.get_loss_dict(mask_logits, class_logits, mask_labels, class_labels, aux).values())
        if not _flag(output_auxiliary_logits, self.config, "output_auxiliary_logits"):
            aux = None
        if not output_hidden_states:
            for name in ("encoder", "pixel_decoder", "transformer_decoder"):
                setattr(outputs, f"{name}_hidden_states", None)
            outputs.hidden_states = None
        output = MaskFormerForInstanceSegmentationOutput(
            loss=loss,
            class_queries_logits=class_logits,
            masks_queries_logits=mask_logits,
            auxiliary_logits=aux,
            **{k: getattr(outputs, k) for k in outputs.keys()},
        )
        return output if return_dict is not False else output.to_tuple()


def _empty_batch(model: nn.Module, pixel_values: torch.Tensor, **flags: Any) -> Any:
    """The outputs of an empty batch: those of one blank image, cut to zero images (the decoders cannot reshape an
    empty batch)."""
    output = model(pixel_values.new_zeros(1, *pixel_values.shape[1:]), **{**flags, "return_dict": True})

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[:0]
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    for name in output.keys():
        setattr(output, name, cut(getattr(output, name)))
    return output if flags["return_dict"] is not False else output.to_tuple()
