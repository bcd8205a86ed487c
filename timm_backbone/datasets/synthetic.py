"""Generated datasets of coloured shapes on noise, written in every layout that ``timm-backbone train`` reads.

Nothing is downloaded: sample ``i`` of a split is drawn from the seed ``(seed, split, i)``, so the same command writes
the same files anywhere. Each image holds 1 to ``max_shapes`` shapes of three classes (circle, square, triangle); a
class has its own base colour, jittered per shape, and later shapes may cover earlier ones. The background is
uniform colour noise darker than the shapes. One-pixel borders between regions are left unlabelled (ignore / void),
as in Pascal VOC, so the ignore handling of each layout is exercised.

    python -m timm_backbone.datasets.synthetic --format ade20k data/shapes-ade --train 200 --val 50 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..hub import atomic_write
from . import FORMATS

CLASSES = ("circle", "square", "triangle")
_BASE_COLOURS = np.array([(235, 70, 60), (70, 215, 90), (80, 120, 245)], dtype=np.float32)
# COCO-style category ids: deliberately not contiguous, the reader must map them to class indices
COCO_THING_IDS = (1, 2, 3)
COCO_BACKGROUND_ID = 200


def _shape_mask(kind: int, cy: float, cx: float, radius: float, angle: float, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if kind == 0:  # circle
        return dy**2 + dx**2 <= radius**2
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated frame
    if kind == 1:  # square of half-side radius * 0.85 (about the area of the circle)
        half = radius * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle inscribed in a circle of 1.2 * radius: inside all three edges
    r = radius * 1.2
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = 2 * np.pi * k / 3
        inside &= np.cos(theta) * u + np.sin(theta) * v <= r / 2
    return inside


def make_sample(
    rng: np.random.Generator, image_size: int | tuple[int, int] = 64, max_shapes: int = 3, min_pixels: int = 12
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One sample: a ``(H, W, 3)`` uint8 image, a ``(H, W)`` int64 instance map (0 = background) and the class of
    each instance id.

    Args:
        rng: The generator (``np.random.default_rng(seed)``).
        image_size: Height and width, or ``(height, width)``.
        max_shapes: At most this many shapes (at least one).
        min_pixels: Shapes left with fewer visible pixels (occluded) are painted over by the background.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = rng.uniform(0, 120, (height, width, 3)).astype(np.float32)
    instances = np.zeros((height, width), dtype=np.int64)
    classes: dict[int, int] = {}
    for instance_id in range(1, int(rng.integers(1, max_shapes + 1)) + 1):
        kind = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(0.12, 0.22) * min(height, width)
        cy, cx = rng.uniform(radius, np.array([height - radius, width - radius]), size=2)
        mask = _shape_mask(kind, cy, cx, radius, rng.uniform(0, 2 * np.pi), height, width)
        colour = np.clip(_BASE_COLOURS[kind] + rng.uniform(-25, 25, 3), 0, 255)
        image[mask] = colour + rng.uniform(-10, 10, (int(mask.sum()), 3))
        instances[mask] = instance_id
        classes[instance_id] = kind
    out_classes: dict[int, int] = {}
    for instance_id, kind in classes.items():
        visible = instances == instance_id
        if visible.sum() < min_pixels:
            instances[visible] = 0
            image[visible] = rng.uniform(0, 120, (int(visible.sum()), 3))
        else:
            out_classes[instance_id] = kind
    return np.clip(image, 0, 255).astype(np.uint8), instances, out_classes


def region_borders(regions: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour in another region: the one-pixel border on each side of every region boundary."""
    border = np.zeros(regions.shape, dtype=bool)
    vertical = regions[1:] != regions[:-1]
    horizontal = regions[:, 1:] != regions[:, :-1]
    border[1:] |= vertical
    border[:-1] |= vertical
    border[:, 1:] |= horizontal
    border[:, :-1] |= horizontal
    return border


def _sample_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Height ``size``, width varied between 3/4 and 4/3 of it (a multiple of 8), as real datasets vary."""
    return size, int(round(size * rng.uniform(0.75, 4 / 3) / 8) * 8)


def _save_image(array: np.ndarray, path: Path, **options) -> None:
    from PIL import Image

    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format=fmt, **options)


def _write_json(data: dict | list, path: Path, indent: int | None = 2) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=indent) + "\n")


def _samples(split_index: int, count: int, size: int, seed: int):
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        image, instances, classes = make_sample(rng, _sample_size(rng, size))
        yield i, image, instances, classes


def write_semantic(root: Path, layout: str, counts: dict[str, int], size: int, seed: int) -> None:
    """ADE20K (``images/training``, ``annotations/training``; 0 = ignore, class k stored as k + 1) or the folder
    layout (``images/train``, ``masks/train``; class ids, 255 = ignore). Class 0 is the background."""
    names = ("background", *CLASSES)
    splits = {"train": "training", "val": "validation"} if layout == "ade20k" else {"train": "train", "val": "val"}
    mask_dir, ignore, shift = ("annotations", 0, 1) if layout == "ade20k" else ("masks", 255, 0)
    for split_index, (split, count) in enumerate(counts.items()):
        folder = splits[split]
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / mask_dir / folder).mkdir(parents=True, exist_ok=True)
        for i, image, instances, classes in _samples(split_index, count, size, seed):
            semantic = np.zeros(instances.shape, dtype=np.int64)  # background
            for instance_id, kind in classes.items():
                semantic[instances == instance_id] = kind + 1
            labels = np.where(region_borders(semantic), ignore, semantic + shift).astype(np.uint8)
            stem = f"ADE_{folder}_{i + 1:08d}" if layout == "ade20k" else f"{i:05d}"
            _save_image(image, root / "images" / folder / f"{stem}.jpg", quality=95)
            _save_image(labels, root / mask_dir / folder / f"{stem}.png")
    _write_json({str(i): name for i, name in enumerate(names)}, root / "id2label.json")


def write_coco_panoptic(root: Path, counts: dict[str, int], size: int, seed: int) -> None:
    """COCO panoptic: ``{split}2017/*.jpg``, ``annotations/panoptic_{split}2017.json`` and its PNG folder (segment
    id = R + 256 G + 256^2 B, 0 = void); the shapes are things, the background one stuff segment."""
    categories = [
        {"id": cid, "name": name, "supercategory": "shape", "isthing": 1} for cid, name in zip(COCO_THING_IDS, CLASSES)
    ]
    categories.append({"id": COCO_BACKGROUND_ID, "name": "background", "supercategory": "background", "isthing": 0})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(counts.items()):
        image_dir, png_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
        image_dir.mkdir(exist_ok=True)
        png_dir.mkdir(exist_ok=True)
        images, annotations = [], []
        for i, image, instances, classes in _samples(split_index, count, size, seed):
            image_id = 1000 * split_index + i + 1
            # segment ids large enough to use all three channels of the PNG
            segment_of = {0: COCO_BACKGROUND_ID * 1000}
            segment_of.update({k: COCO_THING_IDS[kind] * 1000 + k for k, kind in classes.items()})
            category_of = {COCO_BACKGROUND_ID * 1000: COCO_BACKGROUND_ID}
            category_of.update({segment_of[k]: COCO_THING_IDS[kind] for k, kind in classes.items()})
            lookup = np.zeros(int(instances.max()) + 1, dtype=np.int64)
            for instance_id, segment_id in segment_of.items():
                lookup[instance_id] = segment_id
            segments = lookup[instances]
            segments[region_borders(instances)] = 0
            rgb = np.stack([segments % 256, segments // 256 % 256, segments // 256**2], -1).astype(np.uint8)
            stem = f"{image_id:012d}"
            _save_image(image, image_dir / f"{stem}.jpg", quality=95)
            _save_image(rgb, png_dir / f"{stem}.png")
            height, width = instances.shape
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
            segments_info = []
            for segment_id, category_id in category_of.items():
                ys, xs = np.nonzero(segments == segment_id)
                if len(ys) == 0:
                    continue
                box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                segments_info.append(
                    {"id": segment_id, "category_id": category_id, "iscrowd": 0, "area": len(ys), "bbox": box}
                )
            annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})
        _write_json(
            {"images": images, "annotations": annotations, "categories": categories},
            root / "annotations" / f"panoptic_{split}2017.json",
            indent=None,
        )


def write_dataset(
    root: str | os.PathLike, format: str, train: int = 64, val: int = 16, size: int = 64, seed: int = 0
) -> Path:
    """Write a generated dataset in ``format``'s layout under ``root`` and return ``root``.

    Args:
        root: Output folder (created).
        format: ``ade20k``, ``folder`` or ``coco-panoptic``.
        train: Number of training images.
        val: Number of validation images.
        size: Image height; widths vary between 3/4 and 4/3 of it.
        seed: Seed of the whole dataset.

    Raises:
        ValueError: an unknown format, or counts/size out of range.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; valid formats: {', '.join(FORMATS)}")
    if train < 1 or val < 1 or size < 16:
        raise ValueError(f"need train >= 1, val >= 1 and size >= 16; got train={train}, val={val}, size={size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": train, "val": val}
    if format == "coco-panoptic":
        write_coco_panoptic(root, counts, size, seed)
    else:
        write_semantic(root, format, counts, size, seed)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m timm_backbone.datasets.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", help="folder to write the dataset into")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout to write")
    parser.add_argument("--train", type=int, default=64, help="training images (default 64)")
    parser.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    parser.add_argument("--size", type=int, default=64, help="image height in pixels; widths vary (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole dataset (default 0)")
    args = parser.parse_args(argv)
    try:
        root = write_dataset(args.output, args.format, args.train, args.val, args.size, args.seed)
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} training and {args.val} validation images ({args.format} layout) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
