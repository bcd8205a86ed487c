"""A generated instance-segmentation dataset (coloured shapes on noise) and a matched instance-IoU metric.

Nothing is downloaded: every sample is drawn from a seed, so a training run and its evaluation are reproducible
anywhere. Each image holds 1 to ``max_shapes`` shapes of three classes (circle, square, triangle); a class has its own
base colour, jittered per shape, and shapes may overlap (the later one is on top). The background is uniform
colour noise darker than the shapes.
"""

from __future__ import annotations

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle")
_BASE_COLOURS = np.array([(235, 70, 60), (70, 215, 90), (80, 120, 245)], dtype=np.float32)


def _shape_mask(kind: int, cy: float, cx: float, radius: float, angle: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
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
    rng: np.random.Generator, image_size: int = 64, max_shapes: int = 3, min_pixels: int = 12
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One sample: a ``(H, W, 3)`` uint8 image, a ``(H, W)`` int64 instance map (0 = background) and the class of
    each instance id.

    Args:
        rng: The generator (``np.random.default_rng(seed)``).
        image_size: Height and width.
        max_shapes: At most this many shapes (at least one).
        min_pixels: Shapes left with fewer visible pixels (occluded) are painted over by the background.
    """
    image = rng.uniform(0, 120, (image_size, image_size, 3)).astype(np.float32)
    instances = np.zeros((image_size, image_size), dtype=np.int64)
    classes: dict[int, int] = {}
    for instance_id in range(1, int(rng.integers(1, max_shapes + 1)) + 1):
        kind = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(0.12, 0.22) * image_size
        cy, cx = rng.uniform(radius, image_size - radius, size=2)
        mask = _shape_mask(kind, cy, cx, radius, rng.uniform(0, 2 * np.pi), image_size)
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


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` samples; sample ``i`` is drawn from the seed ``(seed, i)``, the same on every machine and call.

    Items are ``(image, instance_map, instance_id_to_class)`` as :func:`make_sample` returns them; give them to
    ``MaskFormerImageProcessor(ignore_index=0)`` with ``instance_id_to_semantic_id``.
    """

    def __init__(self, length: int, image_size: int = 64, seed: int = 0, max_shapes: int = 3) -> None:
        self.length, self.image_size, self.seed, self.max_shapes = length, image_size, seed, max_shapes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} samples")
        return make_sample(np.random.default_rng([self.seed, index]), self.image_size, self.max_shapes)


def instance_masks(instance_map: np.ndarray, classes: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth as ``(G, H, W)`` bool masks and ``(G,)`` class ids, in instance-id order."""
    ids = sorted(classes)
    masks = torch.from_numpy(np.stack([instance_map == i for i in ids]) if ids else np.zeros((0, *instance_map.shape)))
    return masks.bool(), torch.tensor([classes[i] for i in ids], dtype=torch.long)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of every predicted mask ``(P, H, W)`` with every target mask ``(G, H, W)``: a ``(P, G)`` tensor."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = pred @ target.T
    union = pred.sum(1)[:, None] + target.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def matched_instance_iou(
    pred_masks: torch.Tensor,
    gt_masks: torch.Tensor,
    pred_labels: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
) -> list[float]:
    """The IoU of each ground-truth instance with the prediction matched to it one-to-one (Hungarian, maximising
    total IoU); 0 for instances left without a prediction. With labels, only same-class pairs may match.

    Returns:
        One IoU per ground-truth instance (average them over a dataset for the mean matched instance IoU).
    """
    from scipy.optimize import linear_sum_assignment

    num_gt = gt_masks.shape[0]
    if num_gt == 0 or pred_masks.shape[0] == 0:
        return [0.0] * num_gt
    iou = mask_iou(pred_masks, gt_masks)
    if pred_labels is not None and gt_labels is not None:
        iou = iou * (pred_labels[:, None] == gt_labels[None, :])
    rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
    per_gt = [0.0] * num_gt
    for r, c in zip(rows, cols):
        per_gt[c] = float(iou[r, c])
    return per_gt
