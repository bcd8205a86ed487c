"""Segmentation datasets read from local folders, in the layouts ``timm-backbone train`` takes (``--format``).

dataset = build_dataset("ade20k", "ADEChallengeData2016", "val")
sample = dataset[0]   # Sample(image=(3, H, W) uint8, segmentation=(H, W) int64, instance_classes, name)
"""

from __future__ import annotations

import os

from .ade20k import ADE20kDataset
from .base import IGNORE_INDEX, Sample, SegmentationDataset, check_dataset, read_image, read_label_png
from .coco_panoptic import CocoPanopticDataset
from .folder import FolderDataset

DATASETS: dict[str, type[SegmentationDataset]] = {
    "ade20k": ADE20kDataset,
    "folder": FolderDataset,
    "coco-panoptic": CocoPanopticDataset,
}
FORMATS = tuple(DATASETS)


def build_dataset(
    format: str, root: str | os.PathLike, split: str, num_labels: int | None = None
) -> SegmentationDataset:
    """One split (``train`` or ``val``) of the dataset at ``root`` in the layout ``format``.

    Raises:
        ValueError: an unknown format (the valid ones are listed), or class names that cannot be settled.
        OSError: missing folders or files.
    """
    if format not in DATASETS:
        raise ValueError(f"unknown dataset format {format!r}; valid formats: {', '.join(FORMATS)}")
    return DATASETS[format](root, split, num_labels=num_labels)


__all__ = [
    "DATASETS",
    "FORMATS",
    "IGNORE_INDEX",
    "ADE20kDataset",
    "CocoPanopticDataset",
    "FolderDataset",
    "Sample",
    "SegmentationDataset",
    "build_dataset",
    "check_dataset",
    "read_image",
    "read_label_png",
]
