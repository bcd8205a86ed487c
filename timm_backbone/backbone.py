"""The stage contract shared by every backbone: stage selection, output container and input checks."""

from __future__ import annotations

import enum
import functools
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.utils._pytree as pytree


class BackboneType(enum.Enum):
    """Where a backbone's stages come from, as transformers' ``BackboneType`` (``model.backbone_type``)."""

    TIMM = "timm"
    TRANSFORMERS = "transformers"


def _as_list(value: Any, name: str, containers: tuple[type, ...]) -> list | None:
    # transformers' rules: out_features is a list, out_indices a list or tuple; a bare name or int is not a selection
    if value is None:
        return None
    if not isinstance(value, containers):
        kinds = " or ".join(t.__name__ for t in containers[:2])
        example = list(value) if isinstance(value, (tuple, list, range)) else [value]
        raise ValueError(f"{name} must be a {kinds}, got {type(value).__name__} {value!r}; e.g. {name}={example!r}")
    return list(value)


def align_stage_selection(
    out_features: Sequence[str] | None,
    out_indices: Sequence[int] | None,
    stage_names: Sequence[str],
) -> tuple[list[str], list[int]]:
    """Validate a stage selection and return it as aligned ``(out_features, out_indices)``.

    Either argument may be given; both given must name the same stages; neither selects the last stage. Negative
    indices count from the end and come back non-negative.

    Args:
        out_features: Stage names to output, in stage order.
        out_indices: Stage indices to output, in stage order.
        stage_names: Every stage of the backbone, in order.

    Raises:
        ValueError: No ``stage_names``, ``out_features`` that is not a list or ``out_indices`` that is not a list or
            tuple (transformers' rules), an index out of range, an unknown name, duplicates, entries out of stage
            order, or ``out_features`` and ``out_indices`` that disagree. The message names the valid choices.
        TypeError: An entry that is not an int (``out_indices``) or a string (``out_features``).
    """
    if stage_names is None:
        raise ValueError("stage_names must be set to select stages (out_features / out_indices)")
    stage_names = list(stage_names)
    num_stages = len(stage_names)
    if num_stages == 0:
        raise ValueError("the backbone has no stages to select from")
    features = _as_list(out_features, "out_features", (list,))
    indices = _as_list(out_indices, "out_indices", (list, tuple, range))
    choices = ", ".join(f"{i}: {name!r}" for i, name in enumerate(stage_names))

    if indices is not None:
        if not indices:
            raise ValueError(f"out_indices must not be empty; valid stages are {{{choices}}}")
        normalised = []
        for idx in indices:
            if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
                raise TypeError(f"out_indices must contain ints, got {idx!r} ({type(idx).__name__})")
            idx = int(idx)  # numpy integers too
            if not -num_stages <= idx < num_stages:
                raise ValueError(
                    f"out_indices entry {idx} is out of range for {num_stages} stages; valid indices are "
                    f"{-num_stages}..{num_stages - 1} ({{{choices}}})"
                )
            normalised.append(idx + num_stages if idx < 0 else idx)
        _check_unique_and_ordered(normalised, [stage_names[i] for i in normalised], "out_indices", indices, choices)
    if features is not None:
        if not features:
            raise ValueError(f"out_features must not be empty; valid stages are {stage_names}")
        for name in features:
            if not isinstance(name, str):
                raise TypeError(f"out_features must contain stage names (str), got {name!r}")
            if name not in stage_names:
                raise ValueError(f"unknown stage {name!r} in out_features; valid stage names are {stage_names}")
        from_names = [stage_names.index(name) for name in features]
        _check_unique_and_ordered(from_names, features, "out_features", features, choices)

    if indices is None and features is None:
        return [stage_names[-1]], [num_stages - 1]
    if indices is None:
        return list(features), from_names
    if features is not None and from_names != normalised:
        raise ValueError(
            f"out_features {features} and out_indices {indices} select different stages "
            f"({[stage_names[i] for i in normalised]}); give one of them, or both naming the same stages"
        )
    return [stage_names[i] for i in normalised], normalised


def _check_unique_and_ordered(positions: list[int], names: list[str], arg: str, given: list, choices: str) -> None:
    if len(set(positions)) != len(positions):
        raise ValueError(f"{arg} {given} selects a stage more than once ({names}); valid stages are {{{choices}}}")
    if positions != sorted(positions):
        raise ValueError(
            f"{arg} {given} must follow stage order (expected {[v for _, v in sorted(zip(positions, given))]}); "
            f"valid stages are {{{choices}}}"
        )


def _flatten_output(output: ModelOutput) -> tuple[list[Any], list[str]]:
    names = [f.name for f in fields(output)]
    return [getattr(output, name) for name in names], names


def _unflatten_output(cls: type, values: Iterable[Any], names: list[str]) -> ModelOutput:
    return cls(**dict(zip(names, values)))


class ModelOutput:
    """Base for output dataclasses: attribute access, and an ordered mapping of the fields that are not ``None``, as
    transformers' outputs are.

    Iterating yields field names; ``keys()``, ``values()``, ``items()``, ``out["name"]`` and ``out["name"] = value``
    work as on a dict, ``out[i]`` / ``out[i:j]`` index :meth:`to_tuple`. Subclasses are registered as pytree nodes,
    so ``torch.export``, ONNX export and ``torch.compile`` can return them.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _flatten_output,
            functools.partial(_unflatten_output, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def to_tuple(self) -> tuple:
        """The values of the fields that are not ``None``, in field order."""
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        names = [f.name for f in fields(self)]
        if key not in names:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields are {names}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BackboneOutput(ModelOutput):
    """Multi-scale outputs of a backbone.

    Attributes:
        feature_maps: One NCHW tensor per selected stage, in stage order.
        hidden_states: NCHW output of every stage, when requested.
        attentions: Attention weights per block, when requested and supported.
        prefix_tokens: Class/register tokens ``(batch, num_prefix_tokens, channels)`` of each selected stage, for
            token models built with ``output_prefix_tokens=True``.
    """

    feature_maps: tuple[torch.Tensor, ...] = ()
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    prefix_tokens: tuple[torch.Tensor, ...] | None = None


class BackboneMixin:
    """The backbone contract shared by every backbone: stage bookkeeping, the one ``forward``, input checks, and which
    stages train.

    A family calls :meth:`init_stages` at the end of its constructor and implements :meth:`forward_stages` (the
    outputs of the stages asked for, NCHW); it may override :meth:`feature_map` (a per-output transform such as
    Swin's stage norm) and :meth:`stage_modules` (the modules computing each stage, so that stages after the deepest
    selected one do not train). The selection lives on ``config`` so that a saved config reloads to the same outputs;
    it may change after construction within the stages the model holds (:attr:`num_built_stages`).
    """

    stage_names: list[str]
    num_features: list[int]
    stage_strides: list[int]
    num_built_stages: int
    has_attentions: bool = False
    # transformers' BackboneType: TIMM for the timm wrapper, TRANSFORMERS for the native families
    backbone_type: BackboneType = BackboneType.TRANSFORMERS

    def init_stages(
        self,
        stage_names: list[str],
        num_features: list[int],
        stage_strides: list[int],
        num_built_stages: int | None = None,
    ) -> None:
        """Record every stage (name, channels, stride) and how many of them the model holds (all by default), then
        apply the config's selection."""
        self.stage_names = list(stage_names)
        self.num_features = list(num_features)
        self.stage_strides = list(stage_strides)
        self.num_built_stages = len(stage_names) if num_built_stages is None else num_built_stages
        self._applied_selection: tuple = ()  # (out_indices, frozen_stages) last applied
        self.sync_selection()

    # the forward pass ---------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """Feature maps of the selected stages, NCHW, in stage order.

        Args:
            pixel_values: Float images, ``(batch, num_channels, height, width)``.
            output_hidden_states: Also return the output of every stage the model holds (``None``: the config's).
            output_attentions: Also return attention weights, for backbones that have them (``None``: the config's).
            return_dict: ``False`` returns a tuple instead of :class:`BackboneOutput` (``None``: the config's).

        Raises:
            TypeError, ValueError: input the backbone cannot run (see :meth:`check_pixel_values`), attentions asked
                of a backbone without them, or a selection deeper than the stages the model holds.
        """
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        return_dict = return_dict if return_dict is not None else config.use_return_dict
        if output_attentions and not self.has_attentions:
            raise ValueError(
                f"{type(self).__name__} cannot return attentions: it has no attention weights to return; call it "
                f"with output_attentions=False"
            )
        self.sync_selection()
        self.check_pixel_values(pixel_values)
        indices = self.out_indices
        every = tuple(range(self.num_built_stages))
        states, attentions, *extra = self.forward_stages(
            pixel_values, every if output_hidden_states or output_attentions else tuple(indices), output_attentions
        )
        output = BackboneOutput(
            feature_maps=self.transform_features(tuple(self.feature_map(i, states[i]) for i in indices)),
            hidden_states=tuple(states[i] for i in every) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **(extra[0] if extra else {}),
        )
        return output if return_dict else output.to_tuple()

    def forward_with_filtered_kwargs(self, *args: Any, **kwargs: Any) -> BackboneOutput | tuple:
        """``forward`` without the keyword arguments it does not take (transformers' heads call backbones this way);
        ``output_attentions`` is dropped for backbones without attentions."""
        if not self.has_attentions:
            kwargs.pop("output_attentions", None)
        allowed = ("output_hidden_states", "output_attentions", "return_dict", "pixel_values")
        return self(*args, **{k: v for k, v in kwargs.items() if k in allowed})

    def forward_stages(
        self, pixel_values: torch.Tensor, indices: tuple[int, ...], output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], Sequence[torch.Tensor] | None]:
        """Run the stages up to ``max(indices)`` and return the outputs of ``indices`` (NCHW, before
        :meth:`feature_map`), and the attention weights when asked for. Implemented by each family; it may return a
        third item, a dict of further :class:`BackboneOutput` fields (``prefix_tokens``)."""
        raise NotImplementedError

    def feature_map(self, index: int, state: torch.Tensor) -> torch.Tensor:
        """The feature map returned for selected stage ``index`` from its output ``state``; the output itself."""
        return state

    def transform_features(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A neck over all selected feature maps at once (after :meth:`feature_map`), such as a feature pyramid; the
        maps themselves by default. A family that overrides it reports the new shapes in :attr:`channels` and
        :attr:`strides`."""
        return feature_maps

    # which stages run and train -----------------------------------------------------------------------------------
    def stage_modules(self, index: int) -> list[torch.nn.Module]:
        """The modules that compute stage ``index`` from the previous stage's output (none known by default)."""
        return []

    def output_modules(self, index: int) -> list[torch.nn.Module]:
        """Modules applied to stage ``index`` only when it is selected (Swin's stage norms)."""
        return []

    def stage_parameters(self, index: int) -> list[torch.nn.Parameter]:
        """The parameters that compute stage ``index``: those of :meth:`stage_modules` (families add loose ones)."""
        return [p for module in self.stage_modules(index) for p in module.parameters()]

    def sync_selection(self) -> None:
        """Apply the config's selection and ``frozen_stages``: check them against the stages the model holds, and
        make the stages after the frozen ones up to the deepest selected one (and the output modules of the selected
        ones) trainable, the others not, so that ``DistributedDataParallel`` needs no ``find_unused_parameters``.

        This is the one place that decides which stages train. It runs at construction, when the model's selection
        setters or :meth:`freeze_stages` are used, and at each forward (the config may have been changed directly).
        Only the stages whose role changed are touched, so parameters frozen by hand stay frozen.

        Raises:
            ValueError: a stage deeper than the model holds is selected, or ``frozen_stages`` is out of range.
        """
        selection = tuple(self.config.out_indices)
        frozen = self._frozen_stages()
        if (selection, frozen) == self._applied_selection:
            return
        if frozen >= 0 and not self.stage_modules(0):
            raise ValueError(
                f"{type(self).__name__} cannot freeze stages: it does not know which modules compute them; "
                f"freeze parameters by hand (requires_grad_(False))"
            )
        deepest = max(selection)
        if deepest >= self.num_built_stages:
            built = self.num_built_stages - 1
            raise ValueError(
                f"stage {deepest} ({self.stage_names[deepest]!r}) is selected, but this {type(self).__name__} was "
                f"built with stages 0..{built} only (up to {self.stage_names[built]!r}); select within those, or "
                f"build it with the deeper selection (from_pretrained(src, out_indices=[..., {deepest}]))"
            )
        before, old_frozen = self._applied_selection or ((), -1)
        old_deepest = max(before) if before else None
        for i in range(self.num_built_stages):
            trains = frozen < i <= deepest
            if old_deepest is None or trains != (old_frozen < i <= old_deepest):
                for param in self.stage_parameters(i):
                    param.requires_grad_(trains)
            selected = i in selection and i > frozen
            if not before or selected != (i in before and i > old_frozen):
                for module in self.output_modules(i):
                    module.requires_grad_(selected)
        self._applied_selection = (selection, frozen)

    # fine-tuning controls -----------------------------------------------------------------------------------------
    def _frozen_stages(self) -> int:
        """The config's ``frozen_stages``, validated (-1: none; ``k``: stages ``0..k``, index 0 being the stem)."""
        frozen = getattr(self.config, "frozen_stages", -1)
        last = len(self.stage_names) - 1
        if isinstance(frozen, bool) or not isinstance(frozen, int):
            raise TypeError(f"frozen_stages must be an int (-1 for none, 0..{last}), got {frozen!r}")
        if not -1 <= frozen <= last:
            choices = ", ".join(f"{i}: {name!r}" for i, name in enumerate(self.stage_names))
            raise ValueError(
                f"frozen_stages {frozen} is out of range: -1 freezes nothing, k freezes stages 0..k of {{{choices}}}"
            )
        return frozen

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze stages ``0..frozen_stages`` (mmdetection's ``frozen_stages``: -1 none, 0 the stem, ``k`` the stem
        and stages 1..k): their parameters get ``requires_grad=False`` and their BatchNorm layers stay in eval mode
        in ``train()``. Sets ``config.frozen_stages``, so a saved config keeps it; a smaller value unfreezes.

        Raises:
            ValueError, TypeError: not an int in ``-1..len(stage_names) - 1``; the previous value stays.
        """
        previous = getattr(self.config, "frozen_stages", -1)
        self.config.frozen_stages = frozen_stages
        try:
            self.sync_selection()
        except (ValueError, TypeError):
            self.config.frozen_stages = previous
            raise
        self.train(self.training)

    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``, except that BatchNorm layers stay in eval mode (statistics frozen) in the frozen
        stages (``config.frozen_stages``) and, with ``config.norm_eval``, everywhere in the backbone."""
        super().train(mode)
        if not mode or not hasattr(self, "stage_names"):  # before init_stages nothing is known about stages
            return self
        if getattr(self.config, "norm_eval", False):
            modules: Iterable[torch.nn.Module] = [self]
        else:
            frozen = self._frozen_stages()
            modules = [m for i in range(min(frozen + 1, self.num_built_stages)) for m in self.stage_modules(i)]
        for module in modules:
            for norm in module.modules():
                if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                    norm.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (implemented by each family).

        Raises:
            ValueError: the backbone cannot checkpoint.
        """
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Turn gradient checkpointing on (transformers' name for :meth:`set_grad_checkpointing`); training then
        stores the inputs of each block only and recomputes the rest in the backward pass. Gradients are unchanged.

        Raises:
            ValueError: the backbone cannot checkpoint.
        """
        self.set_grad_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        """Turn gradient checkpointing off."""
        self.set_grad_checkpointing(False)

    # stage bookkeeping --------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @out_features.setter
    def out_features(self, value: Sequence[str]) -> None:
        self._select(value, None)

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, value: Sequence[int]) -> None:
        self._select(None, value)

    def _select(self, out_features: Any, out_indices: Any) -> None:
        """Change the selection (validated against the stages the model holds); the previous one stays on error."""
        previous = (self.config.out_features, self.config.out_indices)
        self.config.set_output_features_output_indices(out_features, out_indices)
        try:
            self.sync_selection()
        except ValueError:
            self.config.set_output_features_output_indices(*previous)
            raise

    @property
    def out_feature_channels(self) -> dict[str, int]:
        return dict(zip(self.stage_names, self.num_features))

    @property
    def channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    @property
    def strides(self) -> list[int]:
        return [self.stage_strides[i] for i in self.out_indices]

    @property
    def reductions(self) -> list[int]:
        return self.strides

    def output_shape(self) -> dict[str, dict[str, int]]:
        """Channels and stride of each selected stage, as detectron2's ``Backbone.output_shape()``."""
        return {
            name: {"channels": channels, "stride": stride}
            for name, channels, stride in zip(self.out_features, self.channels, self.strides)
        }

    @property
    def min_input_size(self) -> int:
        """Smallest height and width the forward pass accepts: the stride of the deepest selected stage."""
        return self.stage_strides[max(self.out_indices)]

    def check_pixel_values(self, pixel_values: Any, min_size: int | None = None) -> None:
        """Raise a clear error for input that the backbone cannot run.

        Args:
            pixel_values: The forward pass's input.
            min_size: Smallest height and width; defaults to :attr:`min_input_size`, the stride of the deepest
                selected stage (smaller images would leave that stage nothing but padding).

        Raises:
            TypeError: not a tensor, not floating point, or a dtype other than the weights' (outside autocast).
            ValueError: not 4-D, the wrong channel count, or smaller than ``min_size``.
        """
        expected = self.config.num_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be a 4-D batch (batch, channels, height, width), got shape "
                f"{tuple(pixel_values.shape)}; add a batch dimension with pixel_values[None] for one image"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating point tensor, got {pixel_values.dtype}; convert with "
                f".float() (and normalise) or use the image processor"
            )
        if pixel_values.shape[1] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the backbone expects {expected} "
                f"(shape {tuple(pixel_values.shape)}; channels come second, NCHW)"
            )
        min_size = self.min_input_size if min_size is None else min_size
        height, width = pixel_values.shape[-2:]
        if height < min_size or width < min_size:
            deepest = max(self.out_indices)
            why = (
                f"the deepest selected stage {self.stage_names[deepest]!r} has stride {self.stage_strides[deepest]}; "
                f"resize or pad the images, or select shallower stages"
                if min_size == self.stage_strides[deepest]
                else f"{type(self).__name__} needs images of at least that size; resize or pad the images"
            )
            raise ValueError(
                f"pixel_values is {height}x{width} (height x width), smaller than the minimum {min_size}x{min_size}: "
                f"{why}"
            )
        weight = next(self.parameters(), None) if isinstance(self, torch.nn.Module) else None
        if (
            weight is not None
            and weight.is_floating_point()
            and pixel_values.dtype != weight.dtype
            and not torch.is_autocast_enabled(pixel_values.device.type)
        ):
            raise TypeError(
                f"pixel_values is {pixel_values.dtype} but the weights are {weight.dtype}; convert the input with "
                f".to({weight.dtype}), the model with .to({pixel_values.dtype}), or run under torch.autocast"
            )
