"""A generated instance-segmentation dataset (coloured shapes on noise) and a matched instance-IoU metric.

Nothing is downloaded: every sample is drawn from a seed, so a training run and its evaluation are reproducible
anywhere. The drawing (:func:`make_sample`) lives in :mod:`timm_backbone.datasets.synthetic`, which also writes such
data to disk in the layouts ``timm-backbone train`` reads.
"""

from __future__ import annotations

import numpy as np
import torch

from timm_backbone.datasets.synthetic import CLASSES, make_sample

__all__ = ["CLASSES", "ShapesDataset", "instance_masks", "make_sample", "mask_iou", "matched_instance_iou"]


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
