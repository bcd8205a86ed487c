"""The ADE20K scene-parsing layout (``ADEChallengeData2016``): label PNGs where 0 is unlabelled and class k is stored as
k + 1, as ``MaskFormerImageProcessor(do_reduce_labels=True, ignore_index=255)`` reads them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from .base import (
    IGNORE_INDEX,
    SegmentationDataset,
    pair_files,
    read_id2label,
    read_label_png,
    require_dir,
    resolve_labels,
)

LAYOUT = """ROOT/images/training/*.jpg         ROOT/annotations/training/*.png    (same file stems)
ROOT/images/validation/*.jpg       ROOT/annotations/validation/*.png
ROOT/id2label.json or ROOT/objectInfo150.csv (optional class names); labels: 0 = unlabelled, class k stored as k + 1"""
SPLITS = {"train": "training", "val": "validation"}


def read_object_info(path: Path) -> dict[int, str] | None:
    """Class names from ADE20K's ``objectInfo150.csv`` (``Idx,Ratio,Train,Val,Name``; first name of each row)."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {int(row["Idx"]) - 1: row["Name"].split(";")[0].strip() for row in rows}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} is not ADE20K's objectInfo150.csv (columns Idx,Ratio,Train,Val,Name): {err}") from err


class ADE20kDataset(SegmentationDataset):
    """One split (``train``/``val``) of an ADE20K-layout folder.

    Args:
        root: The folder holding ``images/`` and ``annotations/``.
        split: ``train`` (``training``) or ``val`` (``validation``).
        num_labels: The number of classes when the folder names none (ADE20K has 150).

    Raises:
        OSError: a missing folder, or images without a label PNG.
        ValueError: no class names and no ``num_labels``, or both and they disagree.
    """

    format = "ade20k"
    fill_value = 0
    processor_kwargs = {"ignore_index": IGNORE_INDEX, "do_reduce_labels": True}  # noqa: RUF012

    def __init__(self, root: str | os.PathLike, split: str, num_labels: int | None = None) -> None:
        super().__init__(root, split)
        folder = SPLITS[split]
        require_dir(self.root, LAYOUT)
        images = require_dir(self.root / "images" / folder, LAYOUT)
        labels = require_dir(self.root / "annotations" / folder, LAYOUT)
        found = read_id2label(self.root / "id2label.json") or read_object_info(self.root / "objectInfo150.csv")
        self.id2label = resolve_labels(found, num_labels, str(self.root))
        self.pairs = pair_files(images, labels)

    def read_target(self, index: int, check: bool = False) -> tuple[torch.Tensor, None]:
        return read_label_png(self.pairs[index][1]), None

    def class_map(self, segmentation: torch.Tensor, instance_classes: None = None) -> torch.Tensor:
        return torch.where(segmentation == 0, IGNORE_INDEX, segmentation - 1)

    def stored_labels(self, classes: torch.Tensor) -> list[int]:
        return (classes + 1).tolist()

    def valid_labels(self) -> str:
        return f"valid: 0 for unlabelled and 1..{self.num_labels} for the classes"
