"""Evaluation of a segmentation model on a dataset split with torchmetrics: mIoU and pixel accuracy for semantic
layouts, PQ/SQ/RQ for panoptic ones. Predictions come from ``MaskFormerImageProcessor``'s post-processing at each
image's own size; under ``torch.distributed`` each process scores its share and torchmetrics reduces the totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .datasets import IGNORE_INDEX, Sample, SegmentationDataset

MAIN_METRIC = {"semantic": "miou", "panoptic": "pq"}
METRIC_NAMES = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy", "pq": "PQ", "sq": "SQ", "rq": "RQ"}


class SegmentationMetrics:
    """The metrics of a task, fed one image at a time.

    Args:
        task: ``semantic`` (``MulticlassJaccardIndex`` macro-averaged over the classes present in the predictions or
            the labels, and micro-averaged ``MulticlassAccuracy``, both ignoring :data:`IGNORE_INDEX`) or
            ``panoptic`` (``PanopticQuality`` with SQ and RQ; a target segment left without a prediction counts as
            missed, as in panopticapi).
        num_labels: Number of classes.
        thing_ids: Panoptic: the class indices that are things; the others are stuff.
        process_group: The ``torch.distributed`` group that sums the counts (default: the default group); the
            metrics live on the CPU, so under nccl this must be a gloo group.
    """

    def __init__(self, task: str, num_labels: int, thing_ids: Sequence[int] = (), process_group: Any = None) -> None:
        self.task, self.num_labels = task, num_labels
        sync = {"process_group": process_group}
        if task == "semantic":
            from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

            self.metrics = {
                "miou": MulticlassJaccardIndex(num_labels, average="macro", ignore_index=IGNORE_INDEX, **sync),
                "pixel_accuracy": MulticlassAccuracy(num_labels, average="micro", ignore_index=IGNORE_INDEX, **sync),
            }
        elif task == "panoptic":
            from torchmetrics.detection import PanopticQuality

            things = set(thing_ids)
            stuffs = set(range(num_labels)) - things
            # Pixels outside every predicted segment get the extra thing class ``num_labels`` rather than
            # torchmetrics' void: a target segment mostly covered by predicted void is not counted as missed there,
            # which would let a model that predicts nothing score well. The extra class is left out of the average.
            self.metrics = {
                "pq": PanopticQuality(
                    things | {num_labels}, stuffs, return_sq_and_rq=True, return_per_class=True, **sync
                )
            }
        else:
            raise ValueError(f"unknown task {task!r}; valid tasks: semantic, panoptic")

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image: ``(H, W)`` class maps (semantic) or ``(H, W, 2)`` (class, segment id) maps (panoptic)."""
        for metric in self.metrics.values():
            metric.update(prediction[None], target[None])

    def compute(self) -> dict[str, float]:
        """The metrics over every image added (on every process, when ``torch.distributed`` runs)."""
        if self.task == "semantic":
            return {name: float(metric.compute()) for name, metric in self.metrics.items()}
        metric = self.metrics["pq"]
        per_class = metric.compute()  # (classes, 3): torchmetrics' PQ, SQ and RQ of each class
        with metric.sync_context():  # the counts of every process
            counted = metric.true_positives + metric.false_positives + metric.false_negatives > 0
        # torchmetrics' average (over the classes with a true positive, false positive or false negative), taken
        # over the dataset's classes only
        columns = [i for c, i in metric.cat_id_to_continuous_id.items() if c < self.num_labels and counted[i]]
        if not columns:
            return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan")}
        pq, sq, rq = per_class[columns].mean(0).tolist()
        return {"pq": pq, "sq": sq, "rq": rq}


def panoptic_target(dataset: SegmentationDataset, sample: Sample) -> torch.Tensor:
    """``(H, W, 2)`` pairs (class, segment id); unlabelled pixels get a class torchmetrics does not know (void)."""
    classes = dataset.class_map(sample.segmentation, sample.instance_classes)
    classes = torch.where(classes == IGNORE_INDEX, dataset.num_labels + 1, classes)
    return torch.stack([classes, sample.segmentation], -1)


def panoptic_prediction(result: dict[str, Any], num_labels: int) -> torch.Tensor:
    """``post_process_panoptic_segmentation``'s output for one image as ``(H, W, 2)`` pairs (class, segment id);
    pixels of no segment get the class ``num_labels`` (see :class:`SegmentationMetrics`)."""
    segmentation = result["segmentation"].long()
    classes = torch.full_like(segmentation, num_labels)
    for segment in result["segments_info"]:
        classes[segmentation == segment["id"]] = segment["label_id"]
    return torch.stack([classes, segmentation.clamp(min=0)], -1)


class EvalCollate:
    """Batches for evaluation: ``(pixel_values, samples)``, images resized by the processor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[Sample]) -> tuple[torch.Tensor, list[Sample]]:
        return self.processor([s.image for s in samples], return_tensors="pt")["pixel_values"], samples


def shard(length: int) -> range:
    """This process's share of ``length`` images (every world_size-th one): no image is scored twice, unlike with a
    padded ``DistributedSampler``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return range(length)
    return range(torch.distributed.get_rank(), length, torch.distributed.get_world_size())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    processor: Any,
    dataset: SegmentationDataset,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    progress: bool = False,
    process_group: Any = None,
) -> dict[str, float]:
    """Score ``model`` on ``dataset``: :data:`MAIN_METRIC` of its task and the others, as fractions in [0, 1].

    Args:
        model: A ``MaskFormerForInstanceSegmentation`` (not wrapped in DistributedDataParallel).
        processor: The ``MaskFormerImageProcessor`` used for training.
        dataset: The split to score.
        batch_size: Images per forward pass.
        device: Where the model runs.
        precision: ``fp32`` or ``bf16`` (autocast).
        workers: DataLoader worker processes.
        progress: Show a progress bar.
        process_group: See :class:`SegmentationMetrics`.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = torch.device(device)
    metrics = SegmentationMetrics(dataset.task, dataset.num_labels, sorted(dataset.thing_ids), process_group)
    stuff = set(range(dataset.num_labels)) - dataset.thing_ids
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard(len(dataset))),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=EvalCollate(processor),
    )
    for pixel_values, samples in tqdm(loader, desc="eval", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(pixel_values=pixel_values.to(device))
        outputs = {
            "class_queries_logits": outputs.class_queries_logits.float().cpu(),
            "masks_queries_logits": outputs.masks_queries_logits.float().cpu(),
        }
        sizes = [tuple(s.image.shape[-2:]) for s in samples]
        if dataset.task == "semantic":
            predictions = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            for prediction, sample in zip(predictions, samples):
                metrics.update(prediction, dataset.class_map(sample.segmentation, sample.instance_classes))
        else:
            results = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=stuff, target_sizes=sizes)
            for result, sample in zip(results, samples):
                metrics.update(panoptic_prediction(result, dataset.num_labels), panoptic_target(dataset, sample))
    model.train(was_training)
    return metrics.compute()


def constant_baseline(dataset: SegmentationDataset, class_index: int, process_group: Any = None) -> dict[str, float]:
    """The metrics of predicting ``class_index`` everywhere (panoptic: one segment of it per image), to read a
    model's scores against (``process_group``: see :class:`SegmentationMetrics`)."""
    metrics = SegmentationMetrics(dataset.task, dataset.num_labels, sorted(dataset.thing_ids), process_group)
    for index in shard(len(dataset)):
        segmentation, instance_classes = dataset.read_target(index)
        sample = Sample(torch.empty(0), segmentation, instance_classes, "")
        if dataset.task == "semantic":
            metrics.update(
                torch.full_like(segmentation, class_index), dataset.class_map(segmentation, instance_classes)
            )
        else:
            prediction = torch.stack([torch.full_like(segmentation, class_index), torch.ones_like(segmentation)], -1)
            metrics.update(prediction, panoptic_target(dataset, sample))
    return metrics.compute()


def format_results(results: dict[str, float], baseline: dict[str, float] | None = None, title: str = "") -> str:
    """A small table of the metrics in percent, with the constant baseline beside them when given."""
    rows = [("metric", "model", "constant") if baseline else ("metric", "model")]
    for key, value in results.items():
        row = (METRIC_NAMES.get(key, key), f"{100 * value:.2f}")
        rows.append((*row, f"{100 * baseline[key]:.2f}") if baseline else row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(([title] if title else []) + lines)
