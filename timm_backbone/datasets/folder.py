"""A plain image/mask folder: one single-channel PNG per image holding class ids, 255 for unlabelled pixels."""

from __future__ import annotations

import os

import torch

from .base import (
    SegmentationDataset,
    pair_files,
    read_id2label,
    read_label_png,
    require_dir,
    resolve_labels,
)

LAYOUT = """ROOT/images/train/NAME.jpg (or .png ...)   ROOT/masks/train/NAME.png   (same file stems)
ROOT/images/val/NAME.jpg                   ROOT/masks/val/NAME.png
ROOT/id2label.json (optional class names); mask values: class ids 0..N-1, 255 = unlabelled"""


class FolderDataset(SegmentationDataset):
    """One split (``train``/``val``) of an image/mask folder (see :data:`LAYOUT`).

    Args:
        root: The folder holding ``images/`` and ``masks/``.
        split: ``train`` or ``val``.
        num_labels: The number of classes when the folder has no ``id2label.json``.

    Raises:
        OSError: a missing folder, or images without a mask.
        ValueError: no class names and no ``num_labels``, or both and they disagree.
    """

    format = "folder"

    def __init__(self, root: str | os.PathLike, split: str, num_labels: int | None = None) -> None:
        super().__init__(root, split)
        require_dir(self.root, LAYOUT)
        images = require_dir(self.root / "images" / split, LAYOUT)
        masks = require_dir(self.root / "masks" / split, LAYOUT)
        self.id2label = resolve_labels(read_id2label(self.root / "id2label.json"), num_labels, str(self.root))
        self.pairs = pair_files(images, masks)

    def read_target(self, index: int, check: bool = False) -> tuple[torch.Tensor, None]:
        return read_label_png(self.pairs[index][1]), None

    def class_map(self, segmentation: torch.Tensor, instance_classes: None = None) -> torch.Tensor:
        return segmentation
