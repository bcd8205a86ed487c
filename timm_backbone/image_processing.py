"""Image processors: pictures in (PIL, numpy, torch; one or a batch), ``{"pixel_values": float32 NCHW}`` out.

``preprocessor_config.json`` is read in every form hub repos carry (``size`` as a bare int, ``feature_extractor_type``,
``resample`` as an int); timm's pretrained configs give a :class:`TimmImageProcessor`.

A model-specific processor (``MaskFormerImageProcessor``) derives from :class:`BaseImageProcessor`: it gets the config
fields with class defaults, ``to_dict``/``save_pretrained``/``from_pretrained``/``from_dict``, legacy keys, and
``preprocess`` built from two hooks, :meth:`~BaseImageProcessor.resize_image` and
:meth:`~BaseImageProcessor.process_image`. The image operations it needs (``to_chw_tensor``, ``resize``, ``pad``...)
live in :mod:`timm_backbone.image_transforms` and are re-exported here.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .configuration import pop_hub_kwargs
from .hub import CONFIG_NAME, atomic_write, read_json, resolve_file
from .image_transforms import (
    BACKENDS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    RESAMPLE_CODES,
    RESAMPLE_NAMES,
    BatchFeature,
    center_crop,
    get_output_size,
    make_list_of_images,
    normalize_size,
    pad,
    resample_name,
    rescale_and_normalize,
    resize,
    shortest_edge_size,
    stack_outputs,
    to_chw_tensor,
)

__all__ = [
    "BACKENDS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "PROCESSOR_NAME",
    "RESAMPLE_CODES",
    "RESAMPLE_NAMES",
    "BaseImageProcessor",
    "BatchFeature",
    "BitImageProcessor",
    "CLIPImageProcessor",
    "ConvNextImageProcessor",
    "DeiTImageProcessor",
    "TimmImageProcessor",
    "ViTImageProcessor",
    "center_crop",
    "get_output_size",
    "load_processor_dict",
    "make_list_of_images",
    "normalize_size",
    "pad",
    "resample_name",
    "rescale_and_normalize",
    "resize",
    "shortest_edge_size",
    "stack_outputs",
    "to_chw_tensor",
]

logger = logging.getLogger("timm_backbone")

PROCESSOR_NAME = "preprocessor_config.json"


# ------------------------------------------------------------------------------------------------------ processors
class BaseImageProcessor:
    """Resize, optionally centre-crop, rescale and normalise; fields default to class attributes.

    Subclasses change the class defaults and, when their geometry differs, override :meth:`resize_image` (or
    :meth:`process_image` for the whole per-image pipeline). Keys of a ``preprocessor_config.json`` that are not
    fields are kept as attributes and written back by :meth:`to_dict`.

    Args:
        do_resize: Resize to ``size``.
        size: An int (square for ViT-style, shortest edge for ``default_to_square = False`` classes), a
            (height, width) pair or a dict (``height``/``width``, ``shortest_edge`` [+ ``longest_edge``],
            ``longest_edge``, ``max_height``/``max_width``).
        resample: Interpolation: a PIL code (``3``), a name (``"bicubic"``) or an enum.
        do_center_crop: Crop the centre ``crop_size`` after resizing.
        crop_size: An int (square) or the like of ``size``.
        do_rescale: Multiply pixel values by ``rescale_factor`` (applied to every dtype, as in transformers: pass
            ``False`` for float images that are in [0, 1] already).
        rescale_factor: Usually ``1 / 255``.
        do_normalize: Subtract ``image_mean`` and divide by ``image_std`` (per channel).
        image_mean: Mean per channel, or one value for all.
        image_std: Standard deviation per channel, or one value for all.
        do_convert_rgb: Turn grayscale and RGBA (composited onto white) into RGB.
        backend: Who resizes: ``"torchvision"`` or ``"pil"`` (see :func:`resize`).
        **kwargs: Further keys (kept), including the legacy ``max_size``.
    """

    processor_type: ClassVar[str] = "BaseImageProcessor"
    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    default_to_square: ClassVar[bool] = True
    crop_rounding: ClassVar[str] = "floor"
    fields: ClassVar[tuple[str, ...]] = (
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
        "backend",
    )
    # keys describing the file rather than the processing; dropped on reading
    _file_keys: ClassVar[tuple[str, ...]] = (
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "auto_map",
        "_processor_class",
        "use_fast",
    )

    do_resize = True
    size: ClassVar[Any] = {"height": 224, "width": 224}
    resample: ClassVar[Any] = 2
    do_center_crop = False
    crop_size: ClassVar[Any] = None
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean: ClassVar[Any] = IMAGENET_STANDARD_MEAN
    image_std: ClassVar[Any] = IMAGENET_STANDARD_STD
    do_convert_rgb = True
    backend = "torchvision"

    def __init__(
        self,
        *,
        do_resize: bool | None = None,
        size: int | Sequence[int] | dict[str, int] | None = None,
        resample: Any = None,
        do_center_crop: bool | None = None,
        crop_size: int | Sequence[int] | dict[str, int] | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        given = {
            "do_resize": do_resize,
            "size": size,
            "resample": resample,
            "do_center_crop": do_center_crop,
            "crop_size": crop_size,
            "do_rescale": do_rescale,
            "rescale_factor": rescale_factor,
            "do_normalize": do_normalize,
            "image_mean": image_mean,
            "image_std": image_std,
            "do_convert_rgb": do_convert_rgb,
            "backend": backend,
        }
        given = {k: v for k, v in given.items() if v is not None}
        for key in self._file_keys:
            kwargs.pop(key, None)
        max_size = kwargs.pop("max_size", None)
        default_to_square = kwargs.pop("default_to_square", None)
        for key, value in kwargs.items():
            setattr(self, key, value)
        for key in self.fields:
            setattr(self, key, copy.deepcopy(given.get(key, getattr(type(self), key))))
        self.__dict__.update(self._checked(vars(self), max_size=max_size, default_to_square=default_to_square))

    def _checked(
        self, params: dict[str, Any], max_size: int | None = None, default_to_square: bool | None = None
    ) -> dict[str, Any]:
        """Field values normalised (size dicts, resample name valid, tuples) and validated."""
        square = self.default_to_square if default_to_square is None else default_to_square
        out = dict(params)
        out["size"] = normalize_size(params.get("size"), square, max_size)
        out["crop_size"] = normalize_size(params.get("crop_size"), True, param_name="crop_size")
        if params.get("resample") is not None:
            resample_name(params["resample"])
        if params.get("backend") not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {params.get('backend')!r}")
        for key in ("image_mean", "image_std"):
            if isinstance(out.get(key), list):
                out[key] = tuple(out[key])
        if out.get("do_resize") and out["size"] is None:
            raise ValueError(f"{type(self).__name__}: do_resize needs a size")
        if out.get("do_center_crop") and out["crop_size"] is None:
            raise ValueError(f"{type(self).__name__}: do_center_crop needs a crop_size")
        return out

    # ------------------------------------------------------------------------------------------------ processing
    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = None,
        input_data_format: str | None = None,
        data_format: str = "channels_first",
        **kwargs: Any,
    ) -> BatchFeature:
        """Turn one image or a batch into ``{"pixel_values": ...}``.

        Args:
            images: A PIL image, numpy array (HWC or CHW, ``uint8`` or float), torch tensor (CHW), a batch
                array/tensor (4-D), or a list of any of them.
            return_tensors: ``"pt"`` for one float32 ``(N, C, H, W)`` tensor, ``"np"`` for a numpy array, ``None``
                for a list of ``(C, H, W)`` tensors.
            input_data_format: ``"channels_first"``/``"channels_last"`` when the channel axis is ambiguous.
            data_format: Output layout; only ``"channels_first"`` (NCHW, what every backbone takes).
            **kwargs: Any field (``size``, ``do_resize``...) for this call only.

        Raises:
            ValueError: an unknown keyword (the valid ones are listed), or images that cannot be stacked.
        """
        if getattr(data_format, "value", data_format) != "channels_first":
            raise ValueError(f"data_format must be 'channels_first' (NCHW output), got {data_format!r}")
        unknown = sorted(set(kwargs) - set(self.fields) - set(self.extra_fields()))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown arguments {unknown}; valid: "
                f"{sorted(self.fields + self.extra_fields())}"
            )
        params = {k: getattr(self, k) for k in self.fields + self.extra_fields()}
        params.update({k: v for k, v in kwargs.items() if v is not None})
        params = self._checked(params)
        tensors = [
            to_chw_tensor(image, params["do_convert_rgb"], input_data_format) for image in make_list_of_images(images)
        ]
        if params["do_rescale"] and any(t.is_floating_point() and t.numel() and t.max() <= 1 for t in tensors):
            logger.warning(
                "float images with values in [0, 1] are rescaled by %s again; pass do_rescale=False if they are "
                "scaled already",
                params["rescale_factor"],
            )
        pixel_values = [self.process_image(t, params).contiguous() for t in tensors]
        return BatchFeature(pixel_values=stack_outputs(pixel_values, return_tensors))

    def extra_fields(self) -> tuple[str, ...]:
        """Fields of a subclass beyond :attr:`fields` that ``preprocess`` accepts per call (e.g. ``crop_pct``)."""
        return ()

    def process_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """One ``(C, H, W)`` tensor from :func:`to_chw_tensor` -> float32 pixel values, with ``params`` = fields."""
        if params["do_resize"]:
            image = self.resize_image(image, params)
        if params["do_center_crop"]:
            crop = params["crop_size"]
            image = center_crop(image, (crop["height"], crop["width"]), rounding=self.crop_rounding)
        return rescale_and_normalize(
            image,
            params["do_rescale"],
            params["rescale_factor"],
            params["do_normalize"],
            params["image_mean"],
            params["image_std"],
        )

    def resize_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """Resize to ``params["size"]`` (see :func:`get_output_size`)."""
        out_size = get_output_size(*image.shape[-2:], params["size"])
        return resize(image, out_size, params["resample"], params["backend"])

    # ------------------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content (transformers-compatible keys, ``resample`` as PIL's code)."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        if out.get("resample") is not None:
            out["resample"] = RESAMPLE_CODES[resample_name(out["resample"])]
        for key in ("image_mean", "image_std"):
            if isinstance(out.get(key), tuple):
                out[key] = list(out[key])
        if out.get("backend") == type(self).backend:
            del out["backend"]  # transformers' processors have a read-only `backend`: write only a non-default one
        out["image_processor_type"] = self.processor_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        """:meth:`to_dict` as JSON, the content of ``preprocessor_config.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write :meth:`to_json_string` to ``json_file_path``, atomically."""
        with atomic_write(Path(json_file_path), "w") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> BaseImageProcessor:
        """The processor a ``preprocessor_config.json`` file describes (legacy keys included).

        Raises:
            OSError: the file cannot be read or is not JSON.
        """
        return cls.from_dict(read_json(json_file))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``save_directory`` (atomically) and return its path."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / PROCESSOR_NAME
        with atomic_write(path, "w") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> BaseImageProcessor:
        """Build from a ``preprocessor_config.json`` dict; ``overrides`` replace its fields."""
        return cls(**cls._prepare_dict({**config_dict, **overrides}))

    @classmethod
    def _prepare_dict(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Hook for legacy keys of one processor family (called before ``__init__``)."""
        return config_dict

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **kwargs: Any) -> BaseImageProcessor:
        """Read ``preprocessor_config.json`` from a folder, a hub id (cache first when offline) or the file itself.

        Args:
            src: A folder, hub repo id, or path to a ``preprocessor_config.json``.
            **kwargs: Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``)
                and field overrides.

        Raises:
            OSError: the source or its ``preprocessor_config.json`` is not found.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        kwargs.pop("use_fast", None)
        return cls.from_dict(load_processor_dict(src, **hub_kwargs), **kwargs)


def load_processor_dict(src: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The ``preprocessor_config.json`` of a folder or hub id (or the JSON file itself).

    Raises:
        OSError: not found; the message names what was looked for.
    """
    if os.path.isfile(src):
        return read_json(src)
    path = resolve_file(src, PROCESSOR_NAME, **hub_kwargs)
    if path is None:
        raise OSError(f"{os.fspath(src)!r} has no {PROCESSOR_NAME}")
    return read_json(path)


class ViTImageProcessor(BaseImageProcessor):
    """Fixed-size resize (``size`` {height, width}; a bare int means a square), rescale, normalise.

    transformers' default for ViT, Swin, DeiT-style repos (``feature_extractor_type: ViTFeatureExtractor``).
    """

    processor_type = "ViTImageProcessor"


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DeiTImageProcessor(BaseImageProcessor):
    """Fixed-size resize (256 px by default) then a centre crop (224 px): DeiT-style repos."""

    processor_type = "DeiTImageProcessor"
    size: ClassVar[Any] = {"height": 256, "width": 256}
    resample: ClassVar[Any] = 3
    do_center_crop = True
    crop_size: ClassVar[Any] = {"height": 224, "width": 224}


class CLIPImageProcessor(BaseImageProcessor):
    """Shortest edge to ``size`` then a centre crop, with CLIP's statistics: CLIP and BiT/DINOv2-style repos
    (``BitImageProcessor`` is the same pipeline)."""

    processor_type = "CLIPImageProcessor"
    default_to_square = False
    size: ClassVar[Any] = {"shortest_edge": 224}
    resample: ClassVar[Any] = 3
    do_center_crop = True
    crop_size: ClassVar[Any] = {"height": 224, "width": 224}
    image_mean: ClassVar[Any] = OPENAI_CLIP_MEAN
    image_std: ClassVar[Any] = OPENAI_CLIP_STD


class BitImageProcessor(CLIPImageProcessor):
    """BiT and DINOv2 repos: :class:`CLIPImageProcessor`'s pipeline and defaults under transformers' name."""

    processor_type = "BitImageProcessor"


class ConvNextImageProcessor(BaseImageProcessor):
    """ConvNeXt/ResNet-style: below 384 px, resize the shortest edge to ``size / crop_pct`` then crop the centre
    ``size`` square; at 384 px or more, resize to the square directly. A bare int ``size`` is the shortest edge.

    Args:
        crop_pct: Fraction of the resized image kept by the crop (default 224 / 256).
        **kwargs: The fields of :class:`BaseImageProcessor`.
    """

    processor_type = "ConvNextImageProcessor"
    default_to_square = False
    size: ClassVar[Any] = {"shortest_edge": 384}
    resample: ClassVar[Any] = 3
    crop_pct = 224 / 256

    def __init__(self, *, crop_pct: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crop_pct = type(self).crop_pct if crop_pct is None else float(crop_pct)

    def extra_fields(self) -> tuple[str, ...]:
        return ("crop_pct",)

    def resize_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        size = params["size"]
        if "shortest_edge" not in size:
            raise ValueError(f"ConvNextImageProcessor needs size={{'shortest_edge': n}}, got {size}")
        edge = size["shortest_edge"]
        if edge >= 384:
            return resize(image, (edge, edge), params["resample"], params["backend"])
        crop_pct = params["crop_pct"] if params.get("crop_pct") is not None else type(self).crop_pct
        scaled = shortest_edge_size(*image.shape[-2:], int(edge / crop_pct))
        image = resize(image, scaled, params["resample"], params["backend"])
        return center_crop(image, (edge, edge), rounding="floor")


class TimmImageProcessor(BaseImageProcessor):
    """timm's evaluation transform (``timm.data.create_transform(..., is_training=False)``) from a pretrained config.

    The image is resized to ``input_size / crop_pct`` (shortest edge, or both edges with ``crop_mode="squash"``, or
    the longest edge with ``"border"``), the centre ``input_size`` is cropped, then rescaled and normalised.
    Resizing defaults to Pillow, as timm resizes PIL images.

    Args:
        crop_pct: Fraction of the resized image kept by the crop.
        crop_mode: ``"center"``, ``"squash"`` or ``"border"``.
        **kwargs: The fields of :class:`BaseImageProcessor`; ``size`` is the crop (the model's input size).
    """

    processor_type = "TimmImageProcessor"
    crop_rounding = "round"
    resample: ClassVar[Any] = "bicubic"
    image_mean: ClassVar[Any] = IMAGENET_DEFAULT_MEAN
    image_std: ClassVar[Any] = IMAGENET_DEFAULT_STD
    backend = "pil"
    crop_pct = 0.875
    crop_mode = "center"
    _crop_modes = ("center", "squash", "border")

    def __init__(self, *, crop_pct: float | None = None, crop_mode: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crop_pct = type(self).crop_pct if crop_pct is None else float(crop_pct)
        self.crop_mode = type(self).crop_mode if crop_mode is None else crop_mode
        if self.crop_mode not in self._crop_modes:
            raise ValueError(f"crop_mode must be one of {self._crop_modes}, got {self.crop_mode!r}")
        if "height" not in self.size:
            raise ValueError(
                f"TimmImageProcessor needs size={{'height': h, 'width': w}} (the input size), got {self.size}"
            )

    def extra_fields(self) -> tuple[str, ...]:
        return ("crop_pct", "crop_mode")

    @classmethod
    def from_pretrained_cfg(cls, pretrained_cfg: dict[str, Any] | Any, **overrides: Any) -> TimmImageProcessor:
        """From a timm ``pretrained_cfg`` (dict or ``PretrainedCfg``), resolved by ``timm.data.resolve_data_config``."""
        from timm.data import resolve_data_config

        if hasattr(pretrained_cfg, "to_dict"):
            pretrained_cfg = pretrained_cfg.to_dict()
        data = resolve_data_config(pretrained_cfg=dict(pretrained_cfg or {}))
        _, height, width = data["input_size"]
        fields = {
            "size": {"height": int(height), "width": int(width)},
            "resample": data["interpolation"] if data["interpolation"] != "random" else "bilinear",
            "image_mean": tuple(data["mean"]),
            "image_std": tuple(data["std"]),
            "crop_pct": data["crop_pct"],
            "crop_mode": data["crop_mode"] or "center",
        }
        return cls(**{**fields, **overrides})

    @classmethod
    def from_timm_name(cls, name: str, **overrides: Any) -> TimmImageProcessor:
        """From timm's registry (no download): ``resnet50``, ``resnet50.a1_in1k``.

        Raises:
            ValueError: timm does not know the name.
        """
        import timm

        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        if pretrained_cfg is None:
            if not timm.is_model(name.partition(".")[0]):
                raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
            pretrained_cfg = timm.models.get_pretrained_cfg(name.partition(".")[0]) or {}
        return cls.from_pretrained_cfg(pretrained_cfg, **overrides)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **kwargs: Any) -> TimmImageProcessor:
        """From a timm name (``resnet50.a1_in1k``, ``hf-hub:org/name``), a timm hub repo (folder or id; its
        ``config.json`` carries ``pretrained_cfg``), a folder saved by ``TimmBackbone``, or a
        ``preprocessor_config.json`` (folder, id or file).

        Raises:
            OSError: none of these files was found.
            ValueError: an unknown timm name.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        kwargs.pop("use_fast", None)
        name = os.fspath(src)
        if name.startswith("hf-hub:"):
            name = name[len("hf-hub:") :]
        elif "/" not in name and not os.path.exists(name):
            return cls.from_timm_name(name, **kwargs)
        if os.path.isfile(name):
            return cls.from_dict(read_json(name), **kwargs)
        path = resolve_file(name, PROCESSOR_NAME, **hub_kwargs)
        if path is not None:
            return cls.from_dict(read_json(path), **kwargs)
        config_path = resolve_file(name, CONFIG_NAME, **hub_kwargs)
        config = read_json(config_path) if config_path is not None else {}
        if "pretrained_cfg" in config:
            return cls.from_pretrained_cfg(config["pretrained_cfg"], **kwargs)
        if config.get("model_type") == "timm_backbone" and config.get("backbone"):
            return cls.from_pretrained(config["backbone"], **hub_kwargs, **kwargs)
        raise OSError(
            f"{name!r} has no {PROCESSOR_NAME} and no {CONFIG_NAME} with a timm pretrained_cfg (or a timm_backbone "
            f"config naming the model)"
        )

    def resize_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        target_h, target_w = params["size"]["height"], params["size"]["width"]
        crop_pct, mode = params["crop_pct"], params["crop_mode"]
        scale_h, scale_w = math.floor(target_h / crop_pct), math.floor(target_w / crop_pct)
        height, width = image.shape[-2:]
        if mode == "squash":
            out = (scale_h, scale_w)
        elif mode == "center" and scale_h == scale_w:
            out = shortest_edge_size(height, width, scale_h)
        else:  # keep the ratio, matching the shortest ("center") or longest ("border") edge to the scale size
            ratio_h, ratio_w = height / scale_h, width / scale_w
            ratio = max(ratio_h, ratio_w) if mode == "border" else min(ratio_h, ratio_w)
            out = (round(height / ratio), round(width / ratio))
        image = resize(image, out, params["resample"], params["backend"])
        fill: Any = 0
        if mode == "border":
            fill = [round(255 * m) for m in params["image_mean"]]
            if image.is_floating_point():
                fill = [f / 255 for f in fill] if image.max() <= 1 else fill
        return center_crop(image, (target_h, target_w), rounding="round", fill=fill)

    def process_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if params["do_resize"]:
            image = self.resize_image(image, params)
        image = image.to(torch.float32)
        if params["do_rescale"]:
            image = image * params["rescale_factor"]  # timm's ToTensor, then Normalize, in two steps
        return rescale_and_normalize(
            image, False, 1.0, params["do_normalize"], params["image_mean"], params["image_std"]
        )
