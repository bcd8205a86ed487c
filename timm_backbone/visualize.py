"""Pictures drawn with Pillow: feature maps (per requested stage, a grid of its most active channels) and the stage
benchmark's latency chart."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# viridis, sampled at nine evenly spaced points; intermediate values are interpolated linearly
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float32,
)
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (110, 110, 110)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (any shape) to RGB ``uint8`` with the viridis colour map (shape + ``(3,)``)."""
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.floor(values).astype(np.int64).clip(0, len(_VIRIDIS) - 2)
    frac = (values - low)[..., None]
    rgb = _VIRIDIS[low] * (1.0 - frac) + _VIRIDIS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def normalize_map(channel: np.ndarray, low_q: float = 1.0, high_q: float = 99.0) -> np.ndarray:
    """Scale one 2-D map to ``[0, 1]`` between its percentiles (robust to a few extreme activations).

    A constant map becomes all zeros.
    """
    channel = np.nan_to_num(channel.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = np.percentile(channel, [low_q, high_q])
    if not high > low:
        low, high = float(channel.min()), float(channel.max())
    if not high > low:
        return np.zeros_like(channel)
    return np.clip((channel - low) / (high - low), 0.0, 1.0)


def select_channels(feature_map: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels of a ``(C, H, W)`` map with the largest spatial spread, in channel order."""
    spread = feature_map.flatten(1).float().std(dim=1, correction=0).nan_to_num(0.0)
    count = min(count, feature_map.shape[0])
    return sorted(torch.topk(spread, count).indices.tolist())


def principal_components(feature_map: torch.Tensor, count: int = 3, max_samples: int = 16384) -> torch.Tensor:
    """The first ``count`` principal components across the channels of a ``(C, H, W)`` map, as ``(count, H, W)``.

    Each component's sign is fixed so that its largest channel loading is positive; components that explain
    (almost) nothing are returned as zeros, so that noise is not drawn as structure. The covariance is estimated
    from at most ``max_samples`` evenly spaced positions; every position is projected.
    """
    channels, height, width = feature_map.shape
    x = feature_map.reshape(channels, height * width).T.double()  # HW, C
    x = x - x.mean(dim=0)
    fit = x[:: max(1, x.shape[0] // max_samples)]
    if fit.shape[0] < channels:  # fewer positions than channels: eigenvectors through the Gram matrix
        values, vectors = torch.linalg.eigh(fit @ fit.T)
        vectors = fit.T @ vectors
        vectors = vectors / vectors.norm(dim=0).clamp_min(1e-12)
    else:
        values, vectors = torch.linalg.eigh(fit.T @ fit)
    top = torch.argsort(values, descending=True)[:count]
    values, vectors = values[top], vectors[:, top]  # C, count
    peak = vectors.abs().argmax(dim=0)
    vectors = vectors * torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    scores = x @ vectors  # HW, count
    scores[:, values <= 1e-9 * values.max().clamp_min(1e-300)] = 0.0
    out = torch.zeros(count, height * width, dtype=torch.float32)
    out[: scores.shape[1]] = scores.T.float()
    return out.reshape(count, height, width)


def _pca_rgb(feature_map: torch.Tensor) -> np.ndarray:
    components = principal_components(feature_map)
    rgb = np.stack([normalize_map(c.numpy()) for c in components], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _as_chw(feature_map: Any, sample: int, name: str) -> torch.Tensor:
    if not isinstance(feature_map, torch.Tensor):
        raise TypeError(f"feature map {name!r} must be a torch.Tensor, got {type(feature_map).__name__}")
    if feature_map.ndim == 4:
        if not 0 <= sample < feature_map.shape[0]:
            raise ValueError(
                f"sample {sample} is out of range for feature map {name!r} with batch {feature_map.shape[0]}"
            )
        feature_map = feature_map[sample]
    if feature_map.ndim != 3:
        raise ValueError(
            f"feature map {name!r} must be (batch, channels, height, width) or (channels, height, width), "
            f"got shape {list(feature_map.shape)}"
        )
    return feature_map.detach().to("cpu", torch.float32)


def feature_plot(
    feature_maps: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    image: Any = None,
    max_channels: int = 16,
    columns: int = 8,
    cell: int = 64,
    sample: int = 0,
    title: str | None = None,
) -> Any:
    """Draw the feature maps of one image: one block per stage, a grid of channels in each.

    Every block starts with the first three principal components across channels drawn as red, green and blue
    (``pca``: what varies most over the map, also for layer-normalised features whose channel mean is flat),
    followed by the ``max_channels - 1`` channels with the largest spatial spread in viridis. Each map is scaled
    between its own 1st and 99th percentile and enlarged with nearest-neighbour sampling, so one pixel of the feature
    map stays one visible square.

    Args:
        feature_maps: NCHW (or CHW) tensors, one per stage.
        names: The stage name of each map (the header of its block).
        image: The input picture (PIL image), drawn above the stages.
        max_channels: Cells per stage, the ``pca`` cell included.
        columns: Cells per row.
        cell: Cell size in pixels.
        sample: Which image of the batch to draw.
        title: A line of text at the top.

    Returns:
        A ``PIL.Image.Image`` (RGB).

    Raises:
        ValueError: names and maps differ in number, a map has the wrong rank, or a size argument is not positive.
        TypeError: a feature map is not a tensor.
    """
    from PIL import Image, ImageDraw

    if len(feature_maps) != len(names):
        raise ValueError(f"got {len(feature_maps)} feature maps but {len(names)} names; pass one name per map")
    if not feature_maps:
        raise ValueError("no feature maps to draw")
    for arg, value in (("max_channels", max_channels), ("columns", columns), ("cell", cell)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    maps = [_as_chw(f, sample, n) for f, n in zip(feature_maps, names)]

    pad, gap = 12, 2
    header_font, label_font = _font(15), _font(10)
    header_h = 26
    cols = min(columns, max(min(max_channels, m.shape[0] + 1) for m in maps))
    grid_w = cols * (cell + gap) - gap
    blocks = []
    for fmap in maps:
        n_cells = min(max_channels, fmap.shape[0] + 1)
        rows = -(-n_cells // cols)
        blocks.append((n_cells, rows * (cell + gap) - gap))

    image_h = 0
    if image is not None:
        thumb = image.convert("RGB")
        thumb.thumbnail((grid_w, 2 * cell + gap), Image.Resampling.BICUBIC)
        image_h = header_h + thumb.height + pad
    title_h = header_h if title else 0
    width = max(grid_w, 360) + 2 * pad
    height = pad + title_h + image_h + sum(header_h + h + pad for _, h in blocks)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    y = pad
    if title:
        draw.text((pad, y), title, fill=_INK, font=header_font)
        y += title_h
    if image is not None:
        draw.text((pad, y), f"input {image.width}x{image.height}", fill=_INK, font=header_font)
        canvas.paste(thumb, (pad, y + header_h))
        draw.rectangle((pad - 1, y + header_h - 1, pad + thumb.width, y + header_h + thumb.height), outline=_MUTED)
        y += image_h

    for name, fmap, (n_cells, block_h) in zip(names, maps, blocks):
        channels, height_f, width_f = fmap.shape
        shown = n_cells - 1
        header = f"{name}   {channels} x {height_f} x {width_f}"
        draw.text((pad, y), header, fill=_INK, font=header_font)
        note = f"pca + {shown} of {channels} channels"
        note_w = draw.textlength(note, font=label_font)
        draw.text((width - pad - note_w, y + 4), note, fill=_MUTED, font=label_font)
        y += header_h
        cells = [("pca", _pca_rgb(fmap))]
        cells += [(f"c{c}", colorize(normalize_map(fmap[c].numpy()))) for c in select_channels(fmap, shown)]
        for k, (label, rgb) in enumerate(cells):
            x0 = pad + (k % cols) * (cell + gap)
            y0 = y + (k // cols) * (cell + gap)
            tile = Image.fromarray(rgb, "RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0, y0))
            label_w = draw.textlength(label, font=label_font)
            draw.rectangle((x0, y0, x0 + label_w + 4, y0 + 12), fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + 1), label, fill=(255, 255, 255), font=label_font)
        y += block_h + pad
    return canvas


def save_feature_plot(
    feature_maps: Sequence[torch.Tensor],
    names: Sequence[str],
    path: str | os.PathLike,
    *,
    image: Any = None,
    **kwargs: Any,
) -> None:
    """Draw :func:`feature_plot` and write it to ``path`` (PNG unless the suffix names another format), atomically.

    Args:
        feature_maps: NCHW (or CHW) tensors, one per stage.
        names: The stage name of each map.
        path: The output file.
        image: The input picture (PIL image), drawn above the stages.
        **kwargs: Layout options of :func:`feature_plot` (``max_channels``, ``columns``, ``cell``, ``sample``,
            ``title``).

    Raises:
        OSError: the file cannot be written.
    """
    from .hub import atomic_write

    picture = feature_plot(feature_maps, names, image=image, **kwargs)
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP"}.get(suffix, "PNG")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"cannot write {path}: the folder {directory} does not exist")
    with atomic_write(path) as f:
        picture.save(f, format=fmt)
