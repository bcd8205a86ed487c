"""Any timm model as a backbone, through timm's public feature API (``features_only`` / ``forward_intermediates``)."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet, _module_list
from torch import nn

from ..auto import ModelFamily, register_family
from ..backbone import BackboneMixin, BackboneType
from ..configuration import PretrainedConfig
from ..modeling import LoadReport, PreTrainedModel, check_weight_dtypes
from ..necks import SimpleFeaturePyramid
from .timm_config import FETCHING_ARGS, TimmBackboneConfig, _create_args, check_file_model_args

__all__ = ["FETCHING_ARGS", "TimmBackbone", "TimmBackboneConfig", "check_file_model_args"]


def _feature_net(arch: str, kwargs: dict[str, Any], features_only: bool, out_indices: tuple[int, ...]) -> nn.Module:
    import timm

    if features_only:
        try:
            return timm.create_model(arch, features_only=True, out_indices=out_indices, **kwargs)
        except (RuntimeError, AssertionError, TypeError, AttributeError, KeyError) as err:
            raise ValueError(
                f"timm model {arch!r} cannot be built as a feature extractor (features_only) with {kwargs}: {err}"
            ) from err
    model = timm.create_model(arch, **kwargs)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {arch!r} has no forward_intermediates; use features_only=True")
    if hasattr(model, "prune_intermediate_layers"):
        # as timm's own feature getter does: blocks after the deepest tap, the final norm (taps are read before it)
        # and the classifier are not kept, so every parameter left takes part in the forward (DistributedDataParallel
        # needs no find_unused_parameters)
        model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
    return model


def _stage_info(arch: str, kwargs: dict[str, Any], features_only: bool) -> list[dict[str, Any]]:
    """Every feature stage of the model (timm's ``feature_info``), read from a copy built on the meta device (without
    pretrained weights: nothing is read for it)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in FETCHING_ARGS}
    with torch.device("meta"):
        probe = _feature_net(arch, kwargs, features_only, out_indices=(-1,)) if features_only else None
        if probe is None:
            import timm

            probe = timm.create_model(arch, **kwargs)
    info = probe.feature_info
    info = info.info if hasattr(info, "info") else info
    return [dict(d) for d in info]


def _stage_names(info: list[dict[str, Any]]) -> list[str]:
    """Unique stage names from timm's ``feature_info`` module names: a name that several stages share (the branches
    of coat and crossvit) or an empty one (tresnet's first stage) gets ``:<feature index>`` appended."""
    modules = [d["module"] for d in info]
    return [
        f"{module or 'feature'}:{i}" if not module or modules.count(module) > 1 else module
        for i, module in enumerate(modules)
    ]


def _input_size_rule(model: nn.Module, num_channels: int) -> tuple[str, tuple[int, int]] | None:
    """What timm's input patch embedding asserts about the image size: ``("fixed", img_size)`` for a strict size,
    ``("multiple", patch_size)`` when sizes must divide into patches, ``None`` when any size runs. Only a patch
    embedding that takes the image itself counts (visformer's inner ones see a stem's output, not the image)."""
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if img_size is None or not hasattr(module, "strict_img_size"):
            continue
        proj = getattr(module, "proj", None)
        if getattr(proj, "in_channels", num_channels) != num_channels:
            continue
        if module.strict_img_size:
            return "fixed", tuple(img_size)
        if not getattr(module, "dynamic_img_pad", False) and hasattr(module, "patch_size"):
            return "multiple", tuple(module.patch_size)
        return None
    return None


def _takes_prefix_tokens(model: nn.Module | None) -> bool:
    return model is not None and "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters


def _pyramid_taps(arch: str, stage_names: list[str]) -> list[int]:
    """Four evenly spaced taps ending at the last one (2, 5, 8, 11 of 12 blocks, as BEiT's and ViTDet's setups)."""
    if len(stage_names) < 4:
        raise ValueError(
            f"the simple feature pyramid needs four taps, but timm model {arch!r} has {len(stage_names)} stages "
            f"({stage_names})"
        )
    return [(k + 1) * len(stage_names) // 4 - 1 for k in range(4)]


def _pyramid(config: TimmBackboneConfig, arch: str, info: list[dict[str, Any]]) -> SimpleFeaturePyramid | None:
    """The feature pyramid ``config`` asks for, built from the selected taps' widths and strides."""
    if config.feature_pyramid is None:
        return None
    strides = [d["reduction"] for d in info]
    if len(set(strides)) != 1:
        raise ValueError(
            f"feature_pyramid={config.feature_pyramid!r} needs a single-stride token model (ViT, DeiT, EVA, DINOv2, "
            f"SAM's encoder); timm model {arch!r} is already multi-scale (strides {strides}): build it with "
            f"feature_pyramid=None"
        )
    taps = config.out_indices
    if len(taps) != 4:
        raise ValueError(
            f"the simple feature pyramid takes four taps, one per level, got out_indices={taps}; select four, e.g. "
            f"out_indices={_pyramid_taps(arch, [d['module'] for d in info])}"
        )
    widths = [info[i]["num_chs"] for i in taps]
    return SimpleFeaturePyramid(
        widths, [strides[i] for i in taps], out_channels=config.feature_pyramid_channels or widths[-1]
    )


class TimmBackbone(BackboneMixin, PreTrainedModel):
    """A timm model behind the backbone API: ``feature_maps`` NCHW, stages named as timm's ``feature_info``.

    Only the stages up to the deepest selected one are built and run.
    """

    config_class = TimmBackboneConfig
    checkpoint_prefixes = ("_backbone.",)
    # earlier files held the ViT's weights twice, also under `_getter.` (now a property, not a submodule)
    ignore_unexpected = (r"^_getter\.",)
    backbone_type = BackboneType.TIMM

    def __init__(self, config: TimmBackboneConfig, *, timm_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Build the backbone with random weights, or around ``timm_state_dict`` (a timm-format checkpoint, adapted
        by timm's own filters: classifier dropped, ``in_chans`` and position embeddings resized)."""
        super().__init__(config)
        arch, create_kwargs = _create_args(config)
        info = _stage_info(arch, create_kwargs, config.features_only)
        if config.features_only and any(not d["module"] for d in info):
            # timm's FeatureListNet taps stages by module name and cannot tap an unnamed one (tresnet's first
            # stage): read the stages through the model's forward_intermediates instead
            create_kwargs["feature_cls"] = "getter"
        stage_names = _stage_names(info)
        if config.stage_names == [d["module"] for d in info]:
            config.stage_names = stage_names  # saved with timm's raw names (transformers writes those)
        if config.stage_names is not None and config.stage_names != stage_names:
            raise ValueError(
                f"config.stage_names {config.stage_names} do not match the stages of timm model {arch!r} "
                f"({stage_names}); the config was saved for another model or timm version"
            )
        config.stage_names = stage_names
        if config.feature_pyramid is not None and config.out_indices is None and config.out_features is None:
            config.set_output_features_output_indices(None, _pyramid_taps(arch, stage_names))
        else:
            config.set_output_features_output_indices(config.out_features, config.out_indices)
        # timm builds stages up to the deepest selected one only (its feature nets prune the rest): those are held
        held = max(config.out_indices) + 1
        # the recipe of the meta-device copy that supported_input_sizes runs (without the weights)
        self._timm_args = (arch, dict(create_kwargs), tuple(range(held)))
        if timm_state_dict is not None:
            overlay = {"state_dict": timm_state_dict, "source": "", "hf_hub_id": None, "url": None, "file": None}
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        self._backbone = _feature_net(arch, create_kwargs, config.features_only, tuple(range(held)))
        self._probe: list[nn.Module] = []  # the meta-device copy, built on first use (a list: not a submodule)
        self._runs: dict[tuple[int, int], bool] = {}
        if config.freeze_batch_norm_2d:
            from timm.layers import freeze_batch_norm_2d

            self._backbone = freeze_batch_norm_2d(self._backbone)
        self._nhwc = str(getattr(self._backbone, "output_fmt", "NCHW")).endswith("NHWC")
        self._size_rule = _input_size_rule(self._backbone, config.num_channels)
        if config.output_prefix_tokens and not _takes_prefix_tokens(self._getter):
            raise ValueError(
                f"output_prefix_tokens=True needs a token model whose forward_intermediates returns prefix tokens "
                f"(ViT, DeiT, EVA...); timm model {arch!r} has none; build it with output_prefix_tokens=False"
            )
        self.neck = _pyramid(config, arch, info)
        strides = [d["reduction"] for d in info]
        if create_kwargs.get("feature_cls") == "getter" and config.features_only:
            strides = self._measured_strides(strides)
        self.init_stages(stage_names, [d["num_chs"] for d in info], strides, held)

    @property
    def _getter(self) -> nn.Module | None:
        """The timm model whose ``forward_intermediates`` computes just the selected stages, if there is one."""
        if isinstance(self._backbone, FeatureGetterNet):
            return self._backbone.model
        return None if self.config.features_only else self._backbone

    def forward_stages(
        self, pixel_values: torch.Tensor, indices: tuple[int, ...], output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], None]:
        empty = pixel_values.shape[0] == 0
        if empty:  # timm's ViTs cannot reshape an empty batch: run one blank image and keep none of it
            pixel_values = pixel_values.new_zeros(1, *pixel_values.shape[1:])
        try:
            if self._getter is not None:
                features = self._getter.forward_intermediates(
                    pixel_values,
                    indices=list(indices),
                    # a feature net's own flag; a whole model's `norm` is its final norm layer, not a flag
                    norm=self._backbone.norm if isinstance(self._backbone, FeatureGetterNet) else False,
                    output_fmt="NCHW",
                    intermediates_only=True,
                    **({"return_prefix_tokens": True} if self.config.output_prefix_tokens else {}),
                )
                if self.config.output_prefix_tokens:
                    # timm returns (map, prefix) pairs, or bare maps for a model without prefix tokens
                    prefix = {
                        i: f[1] if isinstance(f, tuple) else f.new_zeros(f.shape[0], 0, f.shape[1])
                        for i, f in zip(indices, features)
                    }
                    features = [f[0] if isinstance(f, tuple) else f for f in features]
                by_stage = dict(zip(indices, features))
            else:
                features = self._backbone(pixel_values)
                if isinstance(features, dict):
                    features = list(features.values())
                by_stage = dict(enumerate(features))
        except (AssertionError, RuntimeError, ValueError, IndexError) as err:
            # timm checks some sizes with asserts (often without a message); others fail deep inside the model. A
            # shape that fails on the meta device too is a size the model cannot run: say which sizes do
            if self._runs_at(tuple(pixel_values.shape[-2:])):
                raise
            reason = str(err).strip() or f"{type(err).__name__} without a message"
            largest = 2 * max(self._default_input_size(), *pixel_values.shape[-2:])
            found = self.supported_input_sizes(limit=1, largest=largest)
            runs = f"it runs {found[0]}x{found[0]}" if found else f"no square size up to {largest} runs"
            raise ValueError(
                f"timm model {self.config.backbone!r} cannot run pixel_values of shape {tuple(pixel_values.shape)} "
                f"({reason}); {runs} (model.supported_input_sizes() lists the square sizes that run); resize or pad "
                f"the input"
            ) from err
        if self._nhwc:
            by_stage = {i: f.permute(0, 3, 1, 2) for i, f in by_stage.items()}
        if empty:
            by_stage = {i: f[:0] for i, f in by_stage.items()}
        if not self.config.output_prefix_tokens:
            return by_stage, None
        return by_stage, None, {"prefix_tokens": tuple(prefix[i][:0] if empty else prefix[i] for i in self.out_indices)}

    # the feature pyramid ------------------------------------------------------------------------------------------
    def transform_features(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return feature_maps if self.neck is None else self.neck(feature_maps)

    # (written out rather than through super(): torch.compile cannot follow super() into a property)
    @property
    def channels(self) -> list[int]:
        if self.neck is not None:
            return list(self.neck.channels)
        return [self.num_features[i] for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        if self.neck is not None:
            return list(self.neck.strides)
        return [self.stage_strides[i] for i in self.out_indices]

    def sync_selection(self) -> None:
        """As the base; with a feature pyramid, also check that four taps of the width it was built for are
        selected."""
        if self.neck is not None:
            selected = [self.stage_names[i] for i in self.config.out_indices]
            widths = [self.num_features[i] for i in self.config.out_indices]
            if len(selected) != len(self.neck.levels) or widths != self.neck.in_channels:
                raise ValueError(
                    f"the simple feature pyramid takes {len(self.neck.levels)} taps of widths {self.neck.in_channels}, "
                    f"got {selected} (widths {widths}); select four taps, e.g. out_indices="
                    f"{_pyramid_taps('', self.stage_names)}"
                )
        super().sync_selection()

    def check_pixel_values(self, pixel_values: Any, min_size: int | None = None) -> None:
        """The base checks, plus the fixed or patch-multiple image size that timm's patch embedding requires, and a
        feature pyramid's coarsest level at least one pixel."""
        super().check_pixel_values(pixel_values, min_size)
        coarsest = max(self.neck.strides) if self.neck is not None else 0
        if min(pixel_values.shape[-2:]) < coarsest:
            raise ValueError(
                f"pixel_values is {pixel_values.shape[-2]}x{pixel_values.shape[-1]} (height x width), smaller than "
                f"the minimum {coarsest}x{coarsest}: the feature pyramid's coarsest level has stride {coarsest}; "
                f"resize or pad the images"
            )
        if self._size_rule is None:
            return
        kind, (rule_h, rule_w) = self._size_rule
        height, width = pixel_values.shape[-2:]
        if kind == "fixed" and (height, width) != (rule_h, rule_w):
            raise ValueError(
                f"timm model {self.config.backbone!r} takes {rule_h}x{rule_w} images only, got {height}x{width}; "
                f"resize the input, or build it for another size with model_args={{'img_size': ...}} (or "
                f"'dynamic_img_size': True where timm supports it)"
            )
        if kind == "multiple" and (height % rule_h or width % rule_w):
            raise ValueError(
                f"timm model {self.config.backbone!r} needs height and width divisible by its patch size "
                f"{rule_h}x{rule_w}, got {height}x{width}; resize or pad the input (or pass "
                f"model_args={{'dynamic_img_pad': True}})"
            )

    # fine-tuning --------------------------------------------------------------------------------------------------
    def stage_modules(self, index: int) -> list[nn.Module]:
        """The modules that feed tap ``index`` from tap ``index - 1``, in timm's execution order.

        Feature nets (``features_only``; timm's ``FeatureListNet``/``FeatureDictNet``) hold the model's top-level
        children in order: tap ``k`` is the child timm returns as feature ``k``, and stage ``k`` is every child after
        tap ``k - 1`` up to and including it (stage 0: ``conv1, bn1, act1`` for a ResNet; ``stem, stages_0`` for a
        flattened net). Models read through ``forward_intermediates`` (ViTs) are walked the same way, descending
        into containers that hold a tap: stage 0 of a ViT is ``patch_embed`` (and the position and class tokens,
        see :meth:`stage_parameters`), ``pos_drop``, ``norm_pre`` and ``blocks.0``; stage ``k`` is ``blocks.k``.
        Empty when timm's taps cannot be found among the modules (freezing then raises).
        """
        stages = self._stage_map()
        return stages[index] if stages is not None and index < len(stages) else []

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        """As the base, and for models read through ``forward_intermediates`` the parameters held directly by the
        model (ViT's ``pos_embed``, ``cls_token``, ``reg_token``) in stage 0: they feed the first tap."""
        params = super().stage_parameters(index)
        if index == 0 and self._getter is not None and params:
            params += list(self._getter.parameters(recurse=False))
        return params

    def _stage_map(self) -> list[list[nn.Module]] | None:
        if "_stages" not in self.__dict__:  # plain attribute: module lists must not register as submodules
            self.__dict__["_stages"] = _tap_stages(
                self._backbone if self._getter is None else self._getter, self.stage_names[: self.num_built_stages]
            )
        return self.__dict__["_stages"]

    def _timm_model(self) -> nn.Module:
        """The timm model whose ``group_matcher`` / ``no_weight_decay`` / parameter names apply: the held model for
        ``forward_intermediates`` nets, otherwise a copy of the whole model built on the meta device."""
        if self._getter is not None:
            return self._getter
        if "_reference" not in self.__dict__:
            import timm

            arch, kwargs = _create_args(self.config)
            with torch.device("meta"):
                self.__dict__["_reference"] = timm.create_model(arch, **kwargs)
        return self.__dict__["_reference"]

    def timm_parameter_names(self) -> dict[str, str]:
        """This backbone's parameter names -> the names of the same parameters in the timm model (feature nets
        rename flattened children: ``layers_0.`` is timm's ``layers.0.``)."""
        if "_timm_names" in self.__dict__:
            return self.__dict__["_timm_names"]
        reference = self._timm_model()
        prefix = "_backbone.model." if self._getter is not None and self._getter is not self._backbone else "_backbone."
        renames: dict[str, str] = {}
        if isinstance(self._backbone, FeatureDictNet):
            for flatten in (False, True):
                renames = {new: old for new, old, _ in _module_list(reference, flatten_sequential=flatten)}
                if all(key in renames for key in self._backbone.keys()):
                    break
        known = {name for name, _ in reference.named_parameters()}
        names = {}
        for name, _ in self.named_parameters():
            head, _, rest = name[len(prefix) :].partition(".")
            timm_name = f"{renames.get(head, head)}.{rest}" if rest else renames.get(head, head)
            if timm_name in known:
                names[name] = timm_name
        self.__dict__["_timm_names"] = names
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own ``set_grad_checkpointing``: per child of a feature net, per block of a ViT.

        Raises:
            ValueError: the timm model does not support it.
        """
        target = self._getter if self._getter is not None else self._backbone
        try:
            target.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError) as err:
            raise ValueError(
                f"timm model {self.config.backbone!r} does not support gradient checkpointing ({err or 'no support'})"
            ) from err

    def group_matcher(self, coarse: bool = False) -> Any:
        """timm's parameter grouping of the model (its own ``group_matcher``, grouped by timm's
        ``group_parameters``), as a function of this backbone's parameter names; parameters timm does not group
        come last.

        Raises:
            ValueError: the timm model has no ``group_matcher``.
        """
        from timm.models import group_parameters

        reference = self._timm_model()
        try:
            matcher = reference.group_matcher(coarse=coarse)
        except (NotImplementedError, AttributeError) as err:
            raise ValueError(f"timm model {self.config.backbone!r} has no group_matcher ({err})") from err
        layer_of = group_parameters(reference, matcher, reverse=True)
        names = self.timm_parameter_names()

        def ordinal(name: str) -> tuple[float, ...]:
            return (float(layer_of.get(names.get(name), float("inf"))),)

        return ordinal

    def no_weight_decay(self) -> set[str]:
        """The parameters that timm's ``no_weight_decay()`` names for the model (``pos_embed``, ``cls_token``...),
        under this backbone's names."""
        reference = self._timm_model()
        patterns = set(reference.no_weight_decay()) if hasattr(reference, "no_weight_decay") else set()
        return {
            ours
            for ours, theirs in self.timm_parameter_names().items()
            if any(fnmatch.fnmatch(theirs, pattern) for pattern in patterns)
        }

    def input_conv_keys(self) -> tuple[str, ...]:
        """The weights of timm's ``pretrained_cfg["first_conv"]``, under this backbone's names."""
        cfg = getattr(self._timm_model(), "pretrained_cfg", None) or {}
        first = cfg.get("first_conv") or ()
        first = {f"{name}.weight" for name in ((first,) if isinstance(first, str) else first)}
        weights = {id(p) for n, p in self.named_parameters() if self.timm_parameter_names().get(n) in first}
        # every name of those weights: forward_intermediates models are also registered as ``_getter``
        return tuple(n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in weights)

    def _measured_strides(self, reported: list[int]) -> list[int]:
        """``reported`` (timm's ``feature_info``) with each stage held checked against the output sizes of a meta-device
        run at timm's default input size; a stride that does not match is replaced by the measured one (tresnet's
        first stage is reported at stride 2 but comes after a 4x space-to-depth)."""
        size = self._default_input_size() or 224
        if not self._runs_at((size, size)):
            return reported
        with torch.no_grad():
            maps = self._probe[0](torch.empty(1, self.config.num_channels, size, size, device="meta"))
        maps = list(maps.values()) if isinstance(maps, dict) else list(maps)
        strides = list(reported)
        for i, f in enumerate(maps):
            side = f.shape[1] if self._nhwc else f.shape[-2]
            if side and side not in (size // reported[i], -(-size // reported[i])):
                strides[i] = round(size / side)
        return strides

    def _default_input_size(self) -> int:
        cfg = getattr(self._backbone, "pretrained_cfg", None) or getattr(self._getter, "pretrained_cfg", None) or {}
        return int(dict(cfg).get("input_size", (0, 0, 0))[-1])

    def supported_input_sizes(self, limit: int = 3, largest: int = 1024) -> list[int]:
        """Square input sizes (height = width) that the model runs, smallest first, found by running a copy on the meta
        device (no memory, no compute) at multiples of the deepest selected stride, from :attr:`min_input_size` up to
        ``largest``, and at timm's default input size. Some timm models hold size limits inside (levit, volo,
        coatnet...) that the stride rule does not show; this tells the truth for them.

        Args:
            limit: Return at most this many sizes.
            largest: Largest size tried.
        """
        step = max(self.min_input_size, 1)
        default = self._default_input_size()
        # timm's default size first: the one size every model runs (many limited models run only that one)
        candidates = [default] if default else []
        candidates += [size for size in range(step, largest + 1, step) if size != default]
        if self._size_rule is not None and self._size_rule[0] == "fixed":
            candidates = [self._size_rule[1][0]] if self._size_rule[1][0] == self._size_rule[1][1] else []
        found = []
        for size in candidates:
            if size >= self.min_input_size and self._runs_at((size, size)):
                found.append(size)
                if len(found) == limit:
                    break
        return sorted(found)

    def _runs_at(self, size: tuple[int, int]) -> bool:
        """Whether the meta-device copy of the model runs an input of ``size`` (height, width); remembered."""
        if size in self._runs:
            return self._runs[size]
        if not self._probe:
            arch, kwargs, indices = self._timm_args
            with torch.device("meta"):
                self._probe.append(_feature_net(arch, kwargs, self.config.features_only, indices).eval())
        x = torch.empty(1, self.config.num_channels, *size, device="meta")
        try:
            with torch.no_grad():
                if self._getter is not None and not self.config.features_only:
                    self._probe[0].forward_intermediates(x, intermediates_only=True)
                else:
                    self._probe[0](x)
        except (AssertionError, RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            self._runs[size] = False
            return False
        self._runs[size] = True
        return True

    # loading ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, config: PretrainedConfig, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> TimmBackbone:
        """Our own files (keys under ``_backbone.``) load key for key; timm-format checkpoints go through timm's own
        filters (classifier dropped, ``in_chans`` and position embeddings adapted)."""
        if any(k.startswith("_backbone.") for k in state_dict):
            return super().from_state_dict(config, state_dict, strict=strict, source=source)
        # timm copies any dtype into its parameters: weights and biases must at least be floating point
        learned = {k: torch.empty(0) for k in state_dict if k.endswith((".weight", ".bias"))}
        check_weight_dtypes(state_dict, learned, source)
        model = cls(config, timm_state_dict=state_dict).eval()
        # timm loads the checkpoint strictly into the whole model before keeping the feature stages: every key of
        # the backbone took the file's value (or timm's in_chans / position-embedding adaptation of it)
        model.load_report = LoadReport(source=source, loaded_keys=list(model.state_dict()))
        return model


def _tap_stages(root: nn.Module, taps: list[str]) -> list[list[nn.Module]] | None:
    """The modules computing each tap of ``root`` (see :meth:`TimmBackbone.stage_modules`), or ``None`` when a tap
    is not among them."""
    if isinstance(root, FeatureDictNet):
        by_output = {int(v): k for k, v in root.return_layers.items()}
        units = list(root.items())
        tap_names = [by_output.get(i) for i in range(len(taps))]
    else:
        units = []

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in module.named_children():
                path = prefix + name
                if any(tap.startswith(path + ".") for tap in taps):
                    walk(child, path + ".")
                else:
                    units.append((path, child))

        walk(root, "")
        tap_names = list(taps)
    names = [name for name, _ in units]
    if any(tap not in names for tap in tap_names):
        return None
    ends = [names.index(tap) for tap in tap_names]
    starts = [0] + [end + 1 for end in ends[:-1]]
    return [[module for _, module in units[a : b + 1]] for a, b in zip(starts, ends)]


register_family(ModelFamily(name="timm", config_class=TimmBackboneConfig, backbone_class=TimmBackbone), exist_ok=True)
