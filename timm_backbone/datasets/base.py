"""What every dataset reader shares: the sample type, reading images and label PNGs with errors that name the file,
pairing images with their label files, class names, and the full label check run before training."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# the label value of unlabelled pixels handed to the metrics (semantic tasks)
IGNORE_INDEX = 255


@dataclass
class Sample:
    """One training or evaluation example.

    Attributes:
        image: ``(3, H, W)`` uint8 RGB.
        segmentation: ``(H, W)`` int64 labels as stored on disk: class ids (semantic layouts) or segment ids
            (panoptic layouts).
        instance_classes: Panoptic layouts: class index of each segment id in ``segmentation``; else ``None``.
        name: The image file name, for messages.
    """

    image: torch.Tensor
    segmentation: torch.Tensor
    instance_classes: dict[int, int] | None
    name: str


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` uint8 RGB tensor.

    Raises:
        OSError: the file cannot be decoded as an image; the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for broken files
        raise OSError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels.

    Raises:
        OSError: the file is not an image PIL recognises; the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return height, width


def read_label_png(path: str | os.PathLike, rgb_ids: bool = False) -> torch.Tensor:
    """A label PNG as an ``(H, W)`` int64 tensor: its values (a palette PNG gives its indices), or with ``rgb_ids``
    the COCO panoptic segment id ``R + 256 G + 256^2 B``.

    Raises:
        OSError: the file cannot be decoded; the message names it.
        ValueError: a label image with several channels where one is expected.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB") if rgb_ids else image)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read label image {path}: {err}") from err
    if rgb_ids:
        array = array.astype(np.int64)
        return torch.from_numpy(array[..., 0] + 256 * array[..., 1] + 256 * 256 * array[..., 2])
    if array.ndim != 2:
        raise ValueError(
            f"label image {path} has {array.shape[-1]} channels; semantic labels must be single-channel PNGs "
            f"(mode L or P) holding one class id per pixel"
        )
    return torch.from_numpy(array.astype(np.int64))


def require_dir(path: Path, layout: str) -> Path:
    """``path`` if it is a folder.

    Raises:
        OSError: it is missing; the message shows the expected layout.
    """
    if not path.is_dir():
        raise OSError(f"{path} is not a folder; the layout expected is:\n{layout}")
    return path


def pair_files(image_dir: Path, label_dir: Path, label_suffix: str = ".png") -> list[tuple[Path, Path]]:
    """Images of ``image_dir`` with the label file of the same stem in ``label_dir``, sorted by name.

    Raises:
        OSError: no images, or images without a label file (named, up to ten).
    """
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise OSError(f"{image_dir} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)})")
    pairs, orphans = [], []
    for image in images:
        label = label_dir / (image.stem + label_suffix)
        (pairs.append((image, label)) if label.is_file() else orphans.append(image.name))
    if orphans:
        raise OSError(
            f"{len(orphans)} images in {image_dir} have no label file of the same name in {label_dir}: "
            f"{abbreviate(orphans)}"
        )
    return pairs


def abbreviate(items: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are (for messages)."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def read_id2label(path: Path) -> dict[int, str] | None:
    """Class names from an ``id2label.json`` (``{"0": "wall", ...}``, ids 0..N-1), or ``None`` when absent.

    Raises:
        ValueError: the file is not such a mapping.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in data.items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise ValueError(f'{path} must be a JSON object of class id -> name ({{"0": "wall", ...}}): {err}') from err
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"{path} must number its classes 0..{len(id2label) - 1} without gaps; got {sorted(id2label)}")
    return id2label


def resolve_labels(found: dict[int, str] | None, num_labels: int | None, where: str) -> dict[int, str]:
    """Class names from the dataset when it has them, else ``class_i`` for ``num_labels`` classes.

    Raises:
        ValueError: neither is known, or both are and they disagree.
    """
    if found is not None:
        if num_labels is not None and num_labels != len(found):
            raise ValueError(f"--num-labels is {num_labels} but {where} names {len(found)} classes")
        return found
    if num_labels is None:
        raise ValueError(f"{where} has no id2label.json: pass --num-labels (the number of classes; ADE20K has 150)")
    if num_labels < 1:
        raise ValueError(f"--num-labels must be at least 1, got {num_labels}")
    return {i: f"class_{i}" for i in range(num_labels)}


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a dataset on disk. Subclasses list the files and read one sample.

    Attributes:
        id2label: Class index -> name.
        task: ``"semantic"`` or ``"panoptic"``.
        fill_value: The stored label of unlabelled pixels (used to pad crops).
        processor_kwargs: The :class:`MaskFormerImageProcessor` fields that turn the stored labels into targets.
        thing_ids: Panoptic layouts: the class indices that are countable things (the others are stuff).
    """

    format: ClassVar[str] = ""
    task: ClassVar[str] = "semantic"
    fill_value: ClassVar[int] = IGNORE_INDEX
    processor_kwargs: ClassVar[dict[str, Any]] = {"ignore_index": IGNORE_INDEX, "do_reduce_labels": False}

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        self.id2label: dict[int, str] = {}
        self.thing_ids: set[int] = set()
        self.pairs: list[tuple[Path, Path]] = []

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        segmentation, instance_classes = self.read_target(index)
        image_path = self.pairs[index][0]
        image = read_image(image_path)
        if tuple(image.shape[-2:]) != tuple(segmentation.shape):
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[-2:])} but its labels {self.pairs[index][1]} are "
                f"{tuple(segmentation.shape)}; they must be the same size"
            )
        return Sample(image, segmentation, instance_classes, image_path.name)

    def read_target(self, index: int, check: bool = False) -> tuple[torch.Tensor, dict[int, int] | None]:
        """The stored labels of sample ``index`` and, for panoptic layouts, each segment's class.

        Args:
            index: The sample.
            check: Raise ``ValueError`` for labels the layout does not define, instead of reading them as unlabelled.
        """
        raise NotImplementedError

    def class_map(self, segmentation: torch.Tensor, instance_classes: dict[int, int] | None) -> torch.Tensor:
        """Stored labels -> class index per pixel, :data:`IGNORE_INDEX` where unlabelled."""
        raise NotImplementedError

    def check_item(self, index: int) -> torch.Tensor:
        """Read sample ``index``'s labels (and its image header) and return its pixel count per class.

        Raises:
            OSError: an unreadable file.
            ValueError: labels outside the classes, or an image whose size differs from its labels'.
        """
        image_path, label_path = self.pairs[index]
        segmentation, instance_classes = self.read_target(index, check=True)
        if image_size(image_path) != tuple(segmentation.shape):
            raise ValueError(
                f"{image_path.name} is {image_size(image_path)} but its labels {label_path.name} are "
                f"{tuple(segmentation.shape)}"
            )
        classes = self.class_map(segmentation, instance_classes)
        valid = classes != IGNORE_INDEX
        bad = classes[valid & ((classes < 0) | (classes >= self.num_labels))]
        if bad.numel():
            raise ValueError(
                f"{label_path.name} holds labels {self.stored_labels(torch.unique(bad))} outside the "
                f"{self.num_labels} classes ({self.valid_labels()})"
            )
        return torch.bincount(classes[valid], minlength=self.num_labels)

    def stored_labels(self, classes: torch.Tensor) -> list[int]:
        """Class indices back to the values stored on disk (for messages)."""
        return classes.tolist()

    def valid_labels(self) -> str:
        """The stored values that are valid, in words (for messages)."""
        return f"valid: 0..{self.num_labels - 1} and {IGNORE_INDEX} for unlabelled"


class _Checked(torch.utils.data.Dataset):
    """Runs :meth:`SegmentationDataset.check_item` in DataLoader workers, returning errors instead of raising."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, str]:
        try:
            return self.dataset.check_item(index), "", ""
        except (OSError, ValueError) as err:
            return None, type(err).__name__, str(err)


def _as_is(item: Any) -> Any:
    return item


def check_dataset(dataset: SegmentationDataset, workers: int = 0, progress: bool = True) -> torch.Tensor:
    """Read every label file (and every image header) of ``dataset`` and return the pixel count of each class.

    Raises:
        OSError: unreadable files (up to five named).
        ValueError: labels outside the classes or images whose size differs from their labels' (up to five named).
    """
    from tqdm.auto import tqdm

    counts = torch.zeros(dataset.num_labels, dtype=torch.int64)
    errors: dict[str, list[str]] = {}
    loader = torch.utils.data.DataLoader(_Checked(dataset), batch_size=None, num_workers=workers, collate_fn=_as_is)
    desc = f"checking {dataset.split} labels"
    for item_counts, kind, message in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if item_counts is None:
            errors.setdefault(kind, []).append(message)
        else:
            counts += item_counts
    for kind, exc in (("OSError", OSError), ("ValueError", ValueError)):
        if kind in errors:
            found = errors[kind]
            more = f"; ... (+{len(found) - 5} more)" if len(found) > 5 else ""
            where = f"{dataset.format} {dataset.split} split at {dataset.root}"
            raise exc(f"{len(found)} bad files in the {where}: " + "; ".join(found[:5]) + more)
    return counts
