"""MaskFormer's set loss: Hungarian matching of queries to ground-truth masks, then cross-entropy on the classes
(with a down-weighted "no object" class) and sigmoid focal + dice losses on the matched masks.

The arithmetic is transformers' ``MaskFormerLoss``, so the same logits, labels and matching give the same values.
scipy is needed only here (``linear_sum_assignment``), imported when a loss is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MaskFormer loss needs scipy for Hungarian matching: pip install 'timm-backbone[train]'"
        ) from err
    return linear_sum_assignment


# losses between every prediction and every target: (num_queries, num_targets) -----------------------------------
def pairwise_sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Focal loss of each predicted mask ``(Q, HW)`` against each target mask ``(T, HW)``, averaged over pixels."""
    prob = logits.sigmoid()
    bce_pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    bce_neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    focal_pos = ((1 - prob) ** gamma * bce_pos) * alpha
    focal_neg = (prob**gamma * bce_neg) * (1 - alpha)
    loss = focal_pos @ targets.T + focal_neg @ (1 - targets).T
    return loss / logits.shape[1]


def pairwise_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of each predicted mask ``(Q, HW)`` against each target mask ``(T, HW)``."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


# losses of matched pairs, summed and divided by the number of masks -------------------------------------------------
def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (RetinaNet) of matched masks ``(N, HW)``: pixel mean per mask, summed, divided by ``num_masks``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2|x∩y| + 1) / (|x| + |y| + 1)`` of matched masks ``(N, HW)``, summed over masks."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class MaskFormerHungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets that minimises class + focal + dice cost (scipy's Hungarian).

    Queries left unmatched are "no object". Costs are computed with the targets resized (nearest) to the predicted
    mask size; NaN or infinite costs become the largest float so that they are matched last.

    Args:
        cost_class: Weight of the class cost ``-p(target class)``.
        cost_mask: Weight of the sigmoid focal cost.
        cost_dice: Weight of the dice cost.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("the matcher needs at least one non-zero cost (cost_class, cost_mask, cost_dice)")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice

    @torch.no_grad()
    def forward(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: Sequence[torch.Tensor],
        class_labels: Sequence[torch.Tensor],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Returns:
            Per image, ``(query_indices, target_indices)`` int64 tensors of length ``min(num_queries, num_targets)``.
        """
        linear_sum_assignment = _linear_sum_assignment()
        matches = []
        for pred_logits, pred_masks, target_masks, labels in zip(
            class_queries_logits, masks_queries_logits, mask_labels, class_labels
        ):
            if len(labels) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty))
                continue
            target_masks = F.interpolate(target_masks[:, None].to(pred_masks.dtype), size=pred_masks.shape[-2:])
            target_flat = target_masks[:, 0].flatten(1)  # T, h*w
            pred_flat = pred_masks.flatten(1)  # Q, h*w
            cost = (
                self.cost_mask * pairwise_sigmoid_focal_loss(pred_flat, target_flat)
                - self.cost_class * pred_logits.softmax(-1)[:, labels]
                + self.cost_dice * pairwise_dice_loss(pred_flat, target_flat)
            )
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}"


def average_num_masks(class_labels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The number of target masks per process: summed over ``torch.distributed`` ranks when it runs, divided by the
    world size, at least 1 (so that every rank normalises its loss by the same number)."""
    num_masks = torch.as_tensor(float(sum(len(c) for c in class_labels)), device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_masks)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(num_masks / world_size, min=1)


def check_labels(
    mask_labels: Sequence[torch.Tensor],
    class_labels: Sequence[torch.Tensor],
    num_labels: int,
    batch_size: int,
    image_size: tuple[int, int],
) -> None:
    """Raise a clear error for targets the loss cannot use.

    Raises:
        ValueError: a batch size that differs from the images', a class outside ``[0, num_labels)``, mask and class
            counts that differ, masks whose size is not the images' ``(height, width)``, or masks holding values other
            than 0 and 1 (NaN, or the 255 of padded segmentation maps).
        TypeError: labels that are not lists/tuples of tensors, or class ids that are not integers.
    """
    for name, labels in (("mask_labels", mask_labels), ("class_labels", class_labels)):
        if not isinstance(labels, (list, tuple, torch.Tensor)) or (
            isinstance(labels, torch.Tensor) and labels.dim() == 0
        ):
            raise TypeError(f"{name} must be a list with one tensor per image, got {type(labels).__name__}")
        if len(labels) != batch_size:
            raise ValueError(f"{name} has {len(labels)} entries but the batch has {batch_size} images")
    for i, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if not isinstance(masks, torch.Tensor) or not isinstance(classes, torch.Tensor):
            raise TypeError(f"mask_labels[{i}] and class_labels[{i}] must be tensors")
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"class_labels[{i}] must be a 1-D integer tensor of class ids, got {classes.dtype}")
        if classes.dim() != 1:
            raise ValueError(
                f"class_labels[{i}] must be a 1-D integer tensor, got {classes.dtype} {tuple(classes.shape)}"
            )
        if masks.is_complex():
            raise TypeError(f"mask_labels[{i}] must be binary (bool, integer or float 0/1), got {masks.dtype}")
        if masks.dtype != torch.bool and masks.numel():
            not_binary = (masks != 0) & (masks != 1)
            if bool(not_binary.any()):
                found = masks[not_binary].unique()[:5].tolist()
                raise ValueError(
                    f"mask_labels[{i}] must be binary (0 and 1), but holds {found}; NaN or the 255 that pads "
                    f"segmentation maps is not a mask value: turn a segmentation map into per-instance 0/1 masks "
                    f"(MaskFormerImageProcessor does)"
                )
        if masks.dim() != 3 or masks.shape[0] != classes.shape[0]:
            raise ValueError(
                f"mask_labels[{i}] must have shape (num_instances, height, width) with one mask per class label "
                f"({classes.shape[0]}), got {tuple(masks.shape)}"
            )
        if tuple(masks.shape[-2:]) != tuple(image_size):
            raise ValueError(
                f"mask_labels[{i}] has masks of size {tuple(masks.shape[-2:])}, but the images are "
                f"{tuple(image_size)}; masks must cover the (padded) image, as MaskFormerImageProcessor returns them"
            )
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_labels):
            bad = classes[(classes < 0) | (classes >= num_labels)].tolist()
            raise ValueError(
                f"class_labels[{i}] holds {bad}, outside [0, {num_labels}) (num_labels={num_labels}); the 'no object' "
                f"class {num_labels} is added by the model and must not appear in the labels"
            )


class MaskFormerLoss(nn.Module):
    """Hungarian-matched set loss of MaskFormer, with optional auxiliary losses of the intermediate decoder layers.

    Args:
        num_labels: Number of classes, without "no object".
        matcher: The query-to-target matcher.
        eos_coef: Cross-entropy weight of the "no object" class.
    """

    def __init__(self, num_labels: int, matcher: MaskFormerHungarianMatcher, eos_coef: float) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.matcher = matcher
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_labels + 1)
        empty_weight[-1] = eos_coef
        # persistent, as in transformers' checkpoints (criterion.empty_weight)
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self, class_queries_logits: torch.Tensor, class_labels: Sequence[torch.Tensor], matches: list
    ) -> torch.Tensor:
        batch_size, num_queries, _ = class_queries_logits.shape
        target = torch.full(
            (batch_size, num_queries), self.num_labels, dtype=torch.int64, device=class_queries_logits.device
        )
        batch_idx, query_idx = _query_index(matches)
        target[batch_idx, query_idx] = torch.cat([labels[j] for labels, (_, j) in zip(class_labels, matches)]).to(
            target.device, torch.int64
        )
        weight = self.empty_weight.to(class_queries_logits.dtype)
        return F.cross_entropy(class_queries_logits.transpose(1, 2), target, weight=weight)

    def loss_masks(
        self,
        masks_queries_logits: torch.Tensor,
        mask_labels: Sequence[torch.Tensor],
        matches: list,
        num_masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred = masks_queries_logits[_query_index(matches)]  # N, h, w
        targets = _pad_to_largest(mask_labels).to(pred.dtype)
        target_batch = torch.cat([torch.full_like(j, i) for i, (_, j) in enumerate(matches)])
        target_idx = torch.cat([j for _, j in matches])
        targets = targets[target_batch, target_idx]  # N, H, W
        pred = F.interpolate(pred[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False)
        pred, targets = pred[:, 0].flatten(1), targets.flatten(1)
        return sigmoid_focal_loss(pred, targets, num_masks), dice_loss(pred, targets, num_masks)

    def forward(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: Sequence[torch.Tensor],
        class_labels: Sequence[torch.Tensor],
        auxiliary_predictions: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted losses ``loss_cross_entropy``, ``loss_mask``, ``loss_dice``, and ``<name>_<i>`` for the
        i-th auxiliary prediction."""
        matches = self.matcher(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        num_masks = average_num_masks(class_labels, masks_queries_logits.device)
        loss_mask, loss_dice = self.loss_masks(masks_queries_logits, mask_labels, matches, num_masks)
        losses = {
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
            "loss_cross_entropy": self.loss_labels(class_queries_logits, class_labels, matches),
        }
        for i, aux in enumerate(auxiliary_predictions or ()):
            aux_losses = self(aux["masks_queries_logits"], aux["class_queries_logits"], mask_labels, class_labels)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses


def _query_index(matches: list) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(matches)])
    return batch, torch.cat([i for i, _ in matches])


def _pad_to_largest(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image ``(n_i, H_i, W_i)`` masks into ``(B, max n, max H, max W)``, zero-padded bottom-right."""
    sizes = [tuple(m.shape) for m in masks]
    n, h, w = (max(s[d] for s in sizes) for d in range(3))
    out = masks[0].new_zeros((len(masks), n, h, w))
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out
