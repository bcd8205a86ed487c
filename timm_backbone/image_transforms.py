"""Image operations on ``(C, H, W)`` tensors, shared by every processor (and model-specific ones).

- :func:`make_list_of_images` — one image or a batch (list, or a 4-D array/tensor) -> list of images.
- :func:`to_chw_tensor` — a PIL image, HWC/CHW numpy array or CHW tensor -> ``torch.Tensor`` (C, H, W), ``uint8``
  kept as it is and other dtypes as ``float32``; grayscale and RGBA converted to RGB.
- :func:`normalize_size` — any legacy ``size`` value (int, tuple, dict) -> a size dict.
- :func:`get_output_size` — the (height, width) a size dict gives for an image of a given size.
- :func:`resize` — resize with torchvision (antialiased, like transformers' default processors) or Pillow (like
  timm's eval transforms and transformers' ``*ImageProcessorPil``).
- :func:`center_crop`, :func:`pad` (bottom/right, with a pixel mask), :func:`rescale_and_normalize`.
- :class:`BatchFeature` — the dict processors return; ``model(**batch)`` takes it. :func:`stack_outputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PIL's integer resampling constants, as stored in preprocessor_config.json ("resample": 3)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_CODES = {name: code for code, name in RESAMPLE_NAMES.items()}
BACKENDS = ("torchvision", "pil")


# ---------------------------------------------------------------------------------------------------------- inputs
def _is_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor))


def make_list_of_images(images: Any) -> list[Any]:
    """One image, a list/tuple of images, or a 4-D (batch) array/tensor -> a flat list of single images.

    Raises:
        TypeError: something that is not a PIL image, numpy array or torch tensor.
        ValueError: an empty batch, or arrays of rank other than 2 to 4.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (an empty list)")
        out = []
        for image in images:
            out.extend(make_list_of_images(image) if isinstance(image, (list, tuple)) else [image])
        for image in out:
            if not _is_image(image):
                raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")
        return out
    if not _is_image(images):
        raise TypeError(
            f"images must be a PIL image, numpy array or torch tensor (or a list of them), got {type(images).__name__}"
        )
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim not in (2, 3):
            raise ValueError(
                f"an image array must have 2 (H, W), 3 (H, W, C or C, H, W) or 4 (batch) dimensions, got shape "
                f"{tuple(images.shape)}"
            )
    return [images]


def _channels_first(shape: Sequence[int], prefer_first: bool, input_data_format: str | None) -> bool:
    if input_data_format is not None:
        if input_data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}"
            )
        return input_data_format == "channels_first"
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if first and last:
        return prefer_first
    if first or last:
        return first
    raise ValueError(
        f"cannot tell the channel axis of an image of shape {tuple(shape)}: neither the first nor the last dimension "
        f"is 1, 3 or 4 channels; pass input_data_format='channels_first' or 'channels_last'"
    )


def _pil_to_rgb(image: Any) -> Any:
    """RGB, with transparency composited onto white (what transformers does, rather than dropping alpha)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def to_chw_tensor(image: Any, do_convert_rgb: bool = True, input_data_format: str | None = None) -> torch.Tensor:
    """One image as a ``(C, H, W)`` tensor: ``uint8`` stays ``uint8``, every other dtype becomes ``float32``.

    Args:
        image: A PIL image (any mode), a numpy array (``H, W``, ``H, W, C`` or ``C, H, W``; channels-last is
            assumed when both ends could be channels) or a torch tensor (``C, H, W`` assumed when ambiguous).
        do_convert_rgb: Turn 1 channel into 3 and composite 4 channels (RGBA) onto a white background.
        input_data_format: ``"channels_first"`` or ``"channels_last"`` to skip guessing the channel axis.

    Raises:
        TypeError: an unsupported dtype (complex, object).
        ValueError: a rank other than 2/3, an unknown channel axis, or float RGBA outside [0, 1].
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if do_convert_rgb:
            image = _pil_to_rgb(image)
        array = np.array(image)  # a writable copy
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        if isinstance(image, np.ndarray):
            if image.dtype == object or np.iscomplexobj(image):
                raise TypeError(f"image arrays must be real numbers, got dtype {image.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(image))
            prefer_first = False
        else:
            tensor = image.detach().cpu()
            prefer_first = True
        if tensor.is_complex():
            raise TypeError(f"images must be real numbers, got dtype {tensor.dtype}")
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim == 3:
            if not _channels_first(tensor.shape, prefer_first, input_data_format):
                tensor = tensor.permute(2, 0, 1)
        else:
            raise ValueError(f"one image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8) * 255
    elif tensor.dtype != torch.uint8:
        tensor = tensor.to(torch.float32)
    if do_convert_rgb:
        tensor = _tensor_to_rgb(tensor)
    return tensor  # a CHW view of HWC memory for PIL and HWC arrays: the Pillow backend reads it without a copy


def _tensor_to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1)
    if tensor.shape[0] != 4:
        return tensor
    if tensor.is_floating_point():
        if tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(
                f"a float RGBA image must hold values in [0, 1] to composite its alpha, got "
                f"[{tensor.min().item():.3g}, {tensor.max().item():.3g}]"
            )
        alpha = tensor[3:]
        return tensor[:3] * alpha + (1 - alpha)
    alpha = tensor[3:].double() / 255
    return (tensor[:3].double() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------- size dicts
def normalize_size(
    size: Any, default_to_square: bool = True, max_size: int | None = None, param_name: str = "size"
) -> dict[str, int] | None:
    """Any ``size`` value hub configs carry -> a size dict.

    An int is ``{"height": s, "width": s}`` when ``default_to_square`` (ViT) and ``{"shortest_edge": s}`` otherwise
    (ConvNeXt, plus ``longest_edge`` from a legacy ``max_size``); a pair is ``(height, width)``; dicts are checked.

    Raises:
        ValueError: a dict with a set of keys no processor understands (the valid sets are listed).
    """
    if size is None:
        return None if max_size is None else {"longest_edge": int(max_size)}
    if isinstance(size, bool):
        raise TypeError(f"{param_name} must be an int, a (height, width) pair or a dict, got {size!r}")
    if isinstance(size, int):
        if default_to_square:
            return {"height": size, "width": size}
        return {"shortest_edge": size} if max_size is None else {"shortest_edge": size, "longest_edge": int(max_size)}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        size = {k: int(v) for k, v in size.items() if v is not None}
        if set(size) in _VALID_SIZE_KEYS:
            return size
    raise ValueError(
        f"{param_name} {size!r} is not understood; use an int, a (height, width) pair or a dict with keys "
        f"{' or '.join(str(sorted(k)) for k in _VALID_SIZE_KEYS)}"
    )


_VALID_SIZE_KEYS = (
    {"height", "width"},
    {"shortest_edge"},
    {"shortest_edge", "longest_edge"},
    {"longest_edge"},
    {"max_height", "max_width"},
)


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    # the short side becomes `shortest`; the long side is truncated, as torchvision and transformers do
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


def get_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """The ``(height, width)`` that ``size`` (a dict from :func:`normalize_size`) gives an image of this size."""
    if "height" in size:
        return size["height"], size["width"]
    if "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return max(1, int(height * scale)), max(1, int(width * scale))
    if "shortest_edge" in size:
        short, long = min(height, width), max(height, width)
        target = size["shortest_edge"]
        if "longest_edge" in size and long / short * target > size["longest_edge"]:
            # the long side is capped; it comes from the unrounded short side, as in transformers (DETR)
            raw = size["longest_edge"] * short / long
            target = round(raw)
            if short == target:
                return height, width
            return (int(raw * height / width), target) if width < height else (target, int(raw * width / height))
        return shortest_edge_size(height, width, target)
    scale = size["longest_edge"] / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


# ------------------------------------------------------------------------------------------------------ operations
def resample_name(resample: Any) -> str:
    """``3``, ``"bicubic"``, ``PIL.Image.Resampling.BICUBIC`` or ``InterpolationMode.BICUBIC`` -> ``"bicubic"``."""
    if isinstance(resample, str):
        name = resample.lower()
    elif isinstance(resample, int):  # PIL's Resampling is an IntEnum
        name = RESAMPLE_NAMES.get(int(resample), "")
    else:
        name = str(getattr(resample, "value", "")).lower()
    name = {"nearest-exact": "nearest", "nearest_exact": "nearest", "antialias": "lanczos"}.get(name, name)
    if name not in RESAMPLE_CODES:
        raise ValueError(
            f"unknown resample {resample!r}; use one of {sorted(RESAMPLE_CODES)} or PIL's codes {RESAMPLE_NAMES}"
        )
    return name


def resize(
    image: torch.Tensor, size: tuple[int, int], resample: Any = "bilinear", backend: str = "torchvision"
) -> torch.Tensor:
    """Resize a ``(C, H, W)`` tensor to ``size`` = (height, width); the dtype is kept (``uint8`` rounds).

    Args:
        image: The image, ``uint8`` or float.
        size: Output (height, width).
        resample: Interpolation (name, PIL code, PIL or torchvision enum).
        backend: ``"torchvision"`` (antialiased tensor resize: transformers' default processors) or ``"pil"``
            (Pillow: timm's eval transforms and transformers' ``*ImageProcessorPil``; floats go channel by channel
            through Pillow's 32-bit float mode).

    Raises:
        ValueError: an unknown backend or interpolation, or one the backend cannot do (box/hamming need Pillow).
    """
    name = resample_name(resample)
    height, width = int(size[0]), int(size[1])
    if (height, width) == tuple(image.shape[-2:]):
        return image
    if backend == "pil":
        from PIL import Image

        pil_resample = Image.Resampling(RESAMPLE_CODES[name])
        if image.dtype == torch.uint8 and image.shape[0] in (1, 3):
            array = image.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[..., 0] if image.shape[0] == 1 else array)
            out = np.array(pil.resize((width, height), pil_resample))
            out = torch.from_numpy(np.ascontiguousarray(out))
            return out[None] if out.ndim == 2 else out.permute(2, 0, 1)
        planes = [
            np.array(Image.fromarray(c.float().numpy(), mode="F").resize((width, height), pil_resample)) for c in image
        ]
        out = torch.from_numpy(np.stack(planes))
        return out.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out
    if backend != "torchvision":
        raise ValueError(f"unknown resize backend {backend!r}; choose one of {BACKENDS}")
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    mode = InterpolationMode.NEAREST_EXACT if name == "nearest" else InterpolationMode(name)
    try:
        return tvF.resize(image, [height, width], interpolation=mode, antialias=True)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"torchvision cannot resize tensors with {name!r} ({err}); use backend='pil'") from err


def center_crop(
    image: torch.Tensor, size: tuple[int, int], rounding: str = "floor", fill: float | Sequence[float] = 0
) -> torch.Tensor:
    """Crop the centre ``size`` = (height, width) of a ``(C, H, W)`` tensor, padding with ``fill`` where it is smaller.

    Args:
        rounding: Where an odd margin puts the extra pixel: ``"floor"`` (transformers) or ``"round"``
            (torchvision's and timm's ``CenterCrop``).
    """
    from torchvision.transforms.v2 import functional as tvF

    crop_h, crop_w = int(size[0]), int(size[1])
    height, width = image.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        ltrb = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
        fill_value = list(fill) if isinstance(fill, Sequence) else fill
        image = tvF.pad(image, ltrb, fill=fill_value)
        height, width = image.shape[-2:]
    offset = (lambda margin: round(margin / 2.0)) if rounding == "round" else (lambda margin: margin // 2)
    top, left = offset(height - crop_h), offset(width - crop_w)
    return image[..., top : top + crop_h, left : left + crop_w]


def pad(image: torch.Tensor, size: tuple[int, int], fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a ``(C, H, W)`` tensor at the bottom and right to ``size``; returns it with a ``(H, W)`` int64 mask
    (1 on the image, 0 on the padding).

    Raises:
        ValueError: the image is larger than ``size``.
    """
    height, width = image.shape[-2:]
    if height > size[0] or width > size[1]:
        raise ValueError(f"cannot pad an image of size {(height, width)} to the smaller size {tuple(size)}")
    out = image.new_full((*image.shape[:-2], int(size[0]), int(size[1])), fill)
    out[..., :height, :width] = image
    mask = torch.zeros(int(size[0]), int(size[1]), dtype=torch.int64)
    mask[:height, :width] = 1
    return out, mask


def rescale_and_normalize(
    image: torch.Tensor,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean: Sequence[float] | float = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] | float = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """``(image * rescale_factor - mean) / std`` in float32, computed as transformers does (one fused step)."""
    image = image.to(torch.float32)
    if not do_normalize:
        return image * rescale_factor if do_rescale else image
    channels = image.shape[0]
    mean = torch.tensor(image_mean, dtype=torch.float32).reshape(-1).expand(channels)
    std = torch.tensor(image_std, dtype=torch.float32).reshape(-1).expand(channels)
    if len(set(mean.shape) | set(std.shape)) != 1:
        raise ValueError(f"image_mean and image_std must have one value per channel ({channels})")
    if do_rescale:
        mean, std = mean * (1.0 / rescale_factor), std * (1.0 / rescale_factor)
    return (image - mean[:, None, None]) / std[:, None, None]


# -------------------------------------------------------------------------------------------------------- outputs
class BatchFeature(dict):
    """The processor's output: a dict (so ``model(**batch)`` works) with attribute access and ``.to()``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move (or cast) every tensor, like ``Tensor.to``; integer masks keep their dtype when casting."""
        out = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                dtype_args = [a for a in args if isinstance(a, torch.dtype)] or kwargs.get("dtype")
                if dtype_args and not value.is_floating_point():
                    value = value.to(*[a for a in args if not isinstance(a, torch.dtype)], device=kwargs.get("device"))
                else:
                    value = value.to(*args, **kwargs)
            out[key] = value
        return out


def stack_outputs(values: list[Any], return_tensors: str | None, name: str = "pixel_values") -> Any:
    """A list of per-image tensors as ``return_tensors`` asks: ``"pt"`` (one stacked tensor), ``"np"`` or ``None``.

    Raises:
        ValueError: an unknown ``return_tensors``, or images of different sizes to stack.
    """
    if return_tensors is None:
        return values
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack {name} of different sizes {sorted(shapes)} into one batch; resize to one size "
            f"(do_resize=True with a fixed size) or use return_tensors=None"
        )
    stacked = torch.stack(values)
    return stacked.numpy() if return_tensors == "np" else stacked
