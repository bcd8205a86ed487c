"""The COCO panoptic layout: a JSON of images, segments and categories beside one PNG of segment ids per image."""

from __future__ import annotations

import os

import torch

from ..hub import read_json
from .base import IGNORE_INDEX, SegmentationDataset, abbreviate, read_label_png, require_dir

LAYOUT = """ROOT/annotations/panoptic_train2017.json  ROOT/annotations/panoptic_train2017/*.png  ROOT/train2017/*.jpg
ROOT/annotations/panoptic_val2017.json    ROOT/annotations/panoptic_val2017/*.png    ROOT/val2017/*.jpg
PNG segment id = R + 256 G + 256^2 B (0 = void); the JSON's segments_info gives each id's category_id and iscrowd"""


class CocoPanopticDataset(SegmentationDataset):
    """One split (``train``/``val``) of a COCO-panoptic-layout folder.

    Categories become class indices in the order of their ids; the classes with ``isthing`` are :attr:`thing_ids`.
    Crowd segments are read as void, as are pixels of id 0.

    Args:
        root: The folder holding ``annotations/`` and ``{split}2017/``.
        split: ``train`` or ``val``.
        num_labels: Optional; must equal the number of categories when given.

    Raises:
        OSError: a missing folder or JSON file, or images without their segment PNG (named).
        ValueError: a malformed JSON, segments of unknown categories, or ``num_labels`` that disagrees.
    """

    format = "coco-panoptic"
    task = "panoptic"
    fill_value = 0
    processor_kwargs = {"ignore_index": 0, "do_reduce_labels": False}  # noqa: RUF012

    def __init__(self, root: str | os.PathLike, split: str, num_labels: int | None = None) -> None:
        super().__init__(root, split)
        require_dir(self.root, LAYOUT)
        annotations = require_dir(self.root / "annotations", LAYOUT)
        png_dir = require_dir(annotations / f"panoptic_{split}2017", LAYOUT)
        image_dir = require_dir(self.root / f"{split}2017", LAYOUT)
        json_path = annotations / f"panoptic_{split}2017.json"
        if not json_path.is_file():
            raise OSError(f"{json_path} is missing; the layout expected is:\n{LAYOUT}")
        data = read_json(json_path)
        try:
            categories = sorted(data["categories"], key=lambda c: c["id"])
            images = {image["id"]: image["file_name"] for image in data["images"]}
            entries = [(a["image_id"], a["file_name"], a["segments_info"]) for a in data["annotations"]]
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"{json_path} is not a COCO panoptic file (needs categories, images and annotations with image_id, "
                f"file_name, segments_info): missing {err}"
            ) from err
        class_of = {c["id"]: i for i, c in enumerate(categories)}
        self.id2label = {i: c.get("name", f"class_{i}") for i, c in enumerate(categories)}
        self.thing_ids = {i for i, c in enumerate(categories) if c.get("isthing", 1)}
        if num_labels is not None and num_labels != len(categories):
            raise ValueError(f"--num-labels is {num_labels} but {json_path} has {len(categories)} categories")
        unknown = sorted({s["category_id"] for _, _, segs in entries for s in segs} - set(class_of))
        if unknown:
            raise ValueError(
                f"{json_path} has segments of category ids {unknown} that are not in its categories "
                f"(valid ids: {sorted(class_of)})"
            )
        annotated = {image_id for image_id, _, _ in entries}
        missing = [images[i] for i in images if i not in annotated]
        missing += [file_name for image_id, file_name, _ in entries if not (png_dir / file_name).is_file()]
        if missing:
            raise OSError(
                f"{len(missing)} images of {json_path.name} have no segment PNG in {png_dir}: {abbreviate(missing)}"
            )
        absent = [images.get(image_id, f"image id {image_id}") for image_id, _, _ in entries]
        absent = [name for name in absent if not (image_dir / name).is_file()]
        if absent:
            raise OSError(
                f"{len(absent)} images listed in {json_path.name} are not in {image_dir}: {abbreviate(absent)}"
            )
        entries.sort(key=lambda e: images[e[0]])
        self.pairs = [(image_dir / images[image_id], png_dir / file_name) for image_id, file_name, _ in entries]
        self.segments = [
            {s["id"]: class_of[s["category_id"]] for s in segs if not s.get("iscrowd", 0)} for _, _, segs in entries
        ]
        self.known_ids = [{s["id"] for s in segs} for _, _, segs in entries]

    def read_target(self, index: int, check: bool = False) -> tuple[torch.Tensor, dict[int, int]]:
        segmentation = read_label_png(self.pairs[index][1], rgb_ids=True)
        mapping = self.segments[index]
        ids = set(torch.unique(segmentation).tolist()) - {0}
        if check and ids - self.known_ids[index]:
            raise ValueError(
                f"{self.pairs[index][1].name} holds segment ids {sorted(ids - self.known_ids[index])} that its "
                f"segments_info does not list"
            )
        if ids - set(mapping):  # crowd (and unlisted) segments are void
            segmentation = torch.where(
                torch.isin(segmentation, torch.tensor(sorted(mapping), dtype=torch.int64)), segmentation, 0
            )
        return segmentation, mapping

    def class_map(self, segmentation: torch.Tensor, instance_classes: dict[int, int] | None) -> torch.Tensor:
        classes = torch.full_like(segmentation, IGNORE_INDEX)
        for segment_id, class_index in (instance_classes or {}).items():
            classes[segmentation == segment_id] = class_index
        return classes

    def valid_labels(self) -> str:
        return f"{self.num_labels} categories"
