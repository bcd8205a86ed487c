"""MaskFormer's config: any backbone of this package, a DETR-style query decoder, loss weights.

``config.json`` is transformers' ``maskformer`` file: theirs loads here and ours loads there.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

from ...auto import AutoConfig, register
from ...configuration import MAX_DEPTH, PretrainedConfig, check_int

# transformers' DETR defaults (the ``decoder_config`` of every MaskFormer checkpoint); MaskFormer reads d_model,
# num_queries, decoder_layers/heads/ffn_dim, the dropouts and activation_function, the rest is kept for the file
DETR_DEFAULTS: dict[str, Any] = {
    "model_type": "detr",
    "num_channels": 3,
    "num_queries": 100,
    "encoder_layers": 6,
    "encoder_ffn_dim": 2048,
    "encoder_attention_heads": 8,
    "decoder_layers": 6,
    "decoder_ffn_dim": 2048,
    "decoder_attention_heads": 8,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "is_encoder_decoder": True,
    "activation_function": "relu",
    "d_model": 256,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "init_std": 0.02,
    "init_xavier_std": 1.0,
    "auxiliary_loss": False,
    "position_embedding_type": "sine",
    "dilation": False,
    "class_cost": 1,
    "bbox_cost": 5,
    "giou_cost": 2,
    "mask_loss_coefficient": 1,
    "dice_loss_coefficient": 1,
    "bbox_loss_coefficient": 5,
    "giou_loss_coefficient": 2,
    "eos_coefficient": 0.1,
}


class DetrConfig(PretrainedConfig):
    """MaskFormer's ``decoder_config``: transformers' ``DetrConfig`` fields (defaults in :data:`DETR_DEFAULTS`), read
    as attributes (``config.decoder_config.decoder_layers``) or, as before, as a dict (``decoder_config["d_model"]``,
    ``"d_model" in decoder_config``, ``decoder_config.get(...)``). Unknown keys are kept; the JSON is the same.
    """

    model_type = "detr"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        super().__init__(**{k: copy.deepcopy(v) for k, v in {**DETR_DEFAULTS, **kwargs}.items() if k != "model_type"})

    def __getitem__(self, key: str) -> Any:
        if key == "model_type":
            return self.model_type
        if not isinstance(key, str) or key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return list(self.to_dict())

    def items(self) -> list[tuple[str, Any]]:
        return list(self.to_dict().items())


# transformers' default backbone: Swin-B at 384 (facebook/maskformer-swin-base-ade)
DEFAULT_BACKBONE: dict[str, Any] = {
    "model_type": "swin",
    "depths": [2, 2, 18, 2],
    "drop_path_rate": 0.3,
    "image_size": 384,
    "embed_dim": 128,
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


def resolve_backbone_config(
    backbone_config: Any = None,
    backbone: str | None = None,
    use_timm_backbone: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """The backbone config described by MaskFormer's backbone fields (transformers' rules).

    ``backbone_config`` wins; otherwise ``backbone`` names a timm model (always with ``use_timm_backbone``) or a
    folder / hub id whose ``config.json`` describes the backbone, and ``backbone_kwargs`` override its fields;
    with neither, the default is Swin-B at 384.

    Raises:
        ValueError: both ``backbone_config`` and ``backbone`` (or ``backbone_kwargs``) are given, or a dict without a
            known ``model_type``.
        TypeError: ``backbone_config`` is neither a config nor a dict.
    """
    from ..timm_backbone import TimmBackboneConfig

    if backbone_config is not None and backbone is not None:
        raise ValueError(
            f"give either backbone_config or backbone ({backbone!r}), not both: backbone_config already names the "
            f"backbone"
        )
    if backbone_config is not None and backbone_kwargs:
        raise ValueError("backbone_kwargs only apply with backbone=<name>; set those fields on backbone_config")
    if backbone_config is None and backbone is not None:
        if not isinstance(backbone, str):
            raise TypeError(f"backbone must be a timm name, folder or hub id (str), got {type(backbone).__name__}")
        kwargs = dict(backbone_kwargs or {})
        if use_timm_backbone:
            return TimmBackboneConfig(backbone=backbone, **kwargs)
        return AutoConfig.from_pretrained(backbone, **kwargs)
    if backbone_config is None:
        return AutoConfig.from_dict(copy.deepcopy(DEFAULT_BACKBONE))
    if isinstance(backbone_config, PretrainedConfig):
        return copy.deepcopy(backbone_config)
    if not isinstance(backbone_config, dict) and hasattr(backbone_config, "to_dict"):
        backbone_config = backbone_config.to_dict()  # a transformers config object
    if isinstance(backbone_config, dict):
        config_dict = dict(backbone_config)
        config_dict.setdefault("model_type", "swin")  # transformers' default for MaskFormer
        return AutoConfig.from_dict(config_dict)
    raise TypeError(
        f"backbone_config must be a backbone config (SwinConfig, ResNetConfig, TimmBackboneConfig...) or a dict with "
        f"'model_type', got {type(backbone_config).__name__}"
    )


class MaskFormerConfig(PretrainedConfig):
    """Config of :class:`MaskFormerModel` and :class:`MaskFormerForInstanceSegmentation`.

    Args:
        backbone_config: The backbone: a config of this package (``SwinConfig``, ``ResNetConfig``,
            ``TimmBackboneConfig``...) or a dict with ``model_type``. Left at its default output selection (only the
            last stage), MaskFormer asks for the multi-scale stages its pixel decoder needs when the model is built.
        decoder_config: The DETR decoder settings, a :class:`DetrConfig` or its dict: ``d_model`` (256),
            ``num_queries`` (100), ``decoder_layers`` (6), ``decoder_attention_heads`` (8), ``decoder_ffn_dim`` (2048),
            ``dropout`` (0.1), ``attention_dropout``, ``activation_dropout``, ``activation_function``. Missing keys
            take these defaults.
        fpn_feature_size: Channels of the FPN maps (a multiple of 32: the FPN uses GroupNorm with 32 groups).
        mask_feature_size: Channels of the pixel embeddings and of the mask embeddings.
        no_object_weight: Cross-entropy weight of the "no object" class.
        use_auxiliary_loss: Add the losses of every decoder layer (transformers' rule).
        init_std: Std of normal initialisations.
        init_xavier_std: Gain of the Xavier initialisations.
        dice_weight: Weight of the dice loss (and of the dice matching cost).
        cross_entropy_weight: Weight of the classification loss.
        mask_weight: Weight of the sigmoid focal mask loss (and of its matching cost).
        output_auxiliary_logits: Return the per-layer logits by default.
        backbone: Instead of ``backbone_config``: a timm model name, or a folder / hub id of a backbone.
        use_timm_backbone: Read ``backbone`` as a timm model name.
        use_pretrained_backbone: Build the model with the backbone's pretrained weights, read from where the
            backbone config came from (``backbone``'s timm name, folder or hub id; a ``backbone_config`` loaded with
            ``from_pretrained``; a ``TimmBackboneConfig``'s timm name), from the hub cache when offline. The config
            itself never downloads; saved models write ``false`` (their file holds the backbone's weights).
        backbone_kwargs: Field overrides for the config that ``backbone`` names (``out_indices``...), and the hub
            arguments it is read with (``revision``, ``cache_dir``, ``subfolder``, ``token``...); with
            ``use_pretrained_backbone`` the weights come from the same revision, cache folder and subfolder (a
            ``token`` is not kept: the weights are read with the one huggingface_hub finds, ``HF_TOKEN`` or the login).
        **kwargs: ``num_labels`` / ``id2label`` and any other field, kept as attributes.
    """

    model_type = "maskformer"
    sub_configs: ClassVar[dict[str, type]] = {"backbone_config": AutoConfig, "decoder_config": DetrConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        decoder_config: dict[str, Any] | None = None,
        fpn_feature_size: int = 256,
        mask_feature_size: int = 256,
        no_object_weight: float = 0.1,
        use_auxiliary_loss: bool = False,
        init_std: float = 0.02,
        init_xavier_std: float = 1.0,
        dice_weight: float = 1.0,
        cross_entropy_weight: float = 1.0,
        mask_weight: float = 20.0,
        output_auxiliary_logits: bool | None = None,
        backbone: str | None = None,
        use_timm_backbone: bool = False,
        use_pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # derived from decoder_config on save, as transformers writes them
        kwargs.pop("num_attention_heads", None)
        kwargs.pop("num_hidden_layers", None)
        kwargs.pop("hidden_size", None)
        num_queries = kwargs.pop("num_queries", None)  # a top-level spelling of decoder_config["num_queries"]
        super().__init__(**kwargs)
        self.backbone_config = resolve_backbone_config(backbone_config, backbone, use_timm_backbone, backbone_kwargs)
        if decoder_config is not None and not isinstance(decoder_config, dict):
            if not hasattr(decoder_config, "to_dict"):
                raise TypeError(f"decoder_config must be a DetrConfig or a dict, got {type(decoder_config).__name__}")
            decoder_config = decoder_config.to_dict()
        decoder_config = copy.deepcopy(decoder_config or {})
        if num_queries is not None:
            decoder_config.setdefault("num_queries", num_queries)
        if decoder_config.get("model_type", "detr") != "detr":
            raise ValueError(f"decoder_config model_type must be 'detr', got {decoder_config['model_type']!r}")
        decoder_config = {**DETR_DEFAULTS, **decoder_config}
        for key in ("d_model", "decoder_attention_heads", "decoder_ffn_dim", "num_queries"):
            check_int(f"decoder_config[{key!r}]", decoder_config[key])
        check_int("decoder_config['decoder_layers']", decoder_config["decoder_layers"], low=0, high=MAX_DEPTH)
        check_int("fpn_feature_size", fpn_feature_size)
        check_int("mask_feature_size", mask_feature_size)
        d_model, heads = decoder_config["d_model"], decoder_config["decoder_attention_heads"]
        if d_model % heads:
            raise ValueError(
                f"decoder_config d_model ({d_model}) must be divisible by decoder_attention_heads ({heads})"
            )
        if fpn_feature_size % 32:
            raise ValueError(
                f"fpn_feature_size must be a multiple of 32 (the FPN normalises with GroupNorm(32)), got "
                f"{fpn_feature_size}"
            )
        self.decoder_config = DetrConfig(**decoder_config)
        self.fpn_feature_size = fpn_feature_size
        self.mask_feature_size = mask_feature_size
        self.no_object_weight = no_object_weight
        self.use_auxiliary_loss = use_auxiliary_loss
        self.init_std = init_std
        self.init_xavier_std = init_xavier_std
        self.dice_weight = dice_weight
        self.cross_entropy_weight = cross_entropy_weight
        self.mask_weight = mask_weight
        self.output_auxiliary_logits = output_auxiliary_logits
        # the backbone lives in backbone_config now; the alternative fields are written back empty, as transformers
        self.backbone = None
        self.use_timm_backbone = False
        self.use_pretrained_backbone = use_pretrained_backbone
        self.backbone_kwargs = None

    @classmethod
    def from_backbone_and_decoder_configs(
        cls, backbone_config: PretrainedConfig, decoder_config: DetrConfig | dict[str, Any], **kwargs: Any
    ) -> MaskFormerConfig:
        """A config from a backbone config and a decoder config (transformers' constructor of the same name)."""
        return cls(backbone_config=backbone_config, decoder_config=decoder_config, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.mask_feature_size

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> MaskFormerConfig:
        """As the base; a file may not name its ``backbone`` by local path, and its ``backbone_kwargs`` may not make
        timm fetch weights (see :func:`~timm_backbone.models.timm_backbone.check_file_model_args`)."""
        from ..timm_backbone import check_file_model_args

        backbone = None if config_dict.get("use_timm_backbone") else config_dict.get("backbone")  # timm: a name
        if isinstance(backbone, str) and (os.path.isabs(backbone) or os.path.exists(backbone) or ".." in backbone):
            raise ValueError(
                f"backbone {backbone!r} names a local path; a config file may name its backbone by timm name or hub "
                f"id only (pass backbone_config=..., or backbone= in code, for a local folder)"
            )
        if config_dict.get("backbone_kwargs"):
            check_file_model_args(config_dict["backbone_kwargs"], "backbone_kwargs")
            check_file_model_args(config_dict["backbone_kwargs"].get("model_args") or {}, "backbone_kwargs.model_args")
        return super().from_dict(config_dict, **overrides)

    def num_parameters_estimate(self) -> int | None:
        """The backbone's estimate (a lower bound for the whole model)."""
        return self.backbone_config.num_parameters_estimate()

    @property
    def num_queries(self) -> int:
        return self.decoder_config["num_queries"]

    @num_queries.setter
    def num_queries(self, value: int) -> None:
        self.decoder_config["num_queries"] = value

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["num_attention_heads"] = self.decoder_config["encoder_attention_heads"]
        out["num_hidden_layers"] = self.decoder_config["encoder_layers"]
        return dict(sorted(out.items()))


register("detr", DetrConfig, exist_ok=True)
register("maskformer", MaskFormerConfig, exist_ok=True)  # a task model: AutoBackbone gives its backbone
