"""MaskFormer pre- and post-processing: resize, normalise, pad with a pixel mask, segmentation maps to mask targets,
and model outputs back to semantic, instance and panoptic maps at the sizes asked for.

The arithmetic follows transformers' ``MaskFormerImageProcessor`` (torchvision backend) step by step, so the same
inputs give the same tensors. The shared image steps (input conversion, antialiased resize, fused
rescale/normalise, padding) come from :mod:`timm_backbone.image_transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ...image_processing import BaseImageProcessor
from ...image_transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    BatchFeature,
    make_list_of_images,
    pad,
    resize,
    stack_outputs,
    to_chw_tensor,
)

# MaskFormer's longest-edge cap when a config gives the shortest edge as a bare int (transformers 4.x behaviour)
DEFAULT_MAX_SIZE = 1333
_LEGACY_KEYS = {"size_divisibility": "size_divisor", "reduce_labels": "do_reduce_labels"}


# sizes -------------------------------------------------------------------------------------------------------------
def _shortest_edge_size(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Scale so the short side is ``size`` unless the long side would pass ``max_size`` (DETR's rule: the long side
    is computed from the unrounded capped size, then truncated)."""
    raw = None
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            raw = max_size * short / long
            size = round(raw)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale = raw if raw is not None else size
    if width < height:
        return int(scale * height / width), size
    return size, int(scale * width / height)


def output_size(height: int, width: int, size: dict[str, int], size_divisor: int = 0) -> tuple[int, int]:
    """The resized ``(height, width)`` of an image, rounded up to a multiple of ``size_divisor`` when it is > 0.

    Args:
        height: Input height.
        width: Input width.
        size: ``shortest_edge`` (+ ``longest_edge``), ``height``/``width`` or ``max_height``/``max_width``.
        size_divisor: Backbones with strided stages need sides divisible by their total stride (32 for Swin).
    """
    if "shortest_edge" in size:
        new = _shortest_edge_size(height, width, size["shortest_edge"], size.get("longest_edge"))
    elif "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        new = int(height * scale), int(width * scale)
    elif "height" in size:
        new = size["height"], size["width"]
    else:
        raise ValueError(f"MaskFormer needs size with shortest_edge, height/width or max_height/max_width; got {size}")
    if size_divisor > 0:
        new = tuple(int(math.ceil(s / size_divisor) * size_divisor) for s in new)
    return new


# segmentation targets ----------------------------------------------------------------------------------------------
def segmentation_to_masks(
    segmentation: torch.Tensor,
    instance_id_to_semantic_id: dict[int, int] | None = None,
    ignore_index: int | None = None,
    do_reduce_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``(H, W)`` semantic or instance map into binary masks ``(N, H, W)`` and their class ids ``(N,)``.

    Args:
        segmentation: Class ids per pixel, or instance ids when ``instance_id_to_semantic_id`` is given.
        instance_id_to_semantic_id: Maps each instance id to its class id.
        ignore_index: Pixels with this value make no mask (background, void).
        do_reduce_labels: Map 0 to ``ignore_index`` and shift every other id down by one (ADE20k style); the
            instance mapping is then looked up with the original ids and its classes shifted as well.
    """
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError("do_reduce_labels=True needs an ignore_index for the pixels labelled 0")
        segmentation = torch.where(segmentation == 0, ignore_index, segmentation - 1)
    ids = torch.unique(segmentation)
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    masks = (segmentation[None] == ids[:, None, None]).float()
    if instance_id_to_semantic_id is None:
        return masks, ids.long()
    shift = 1 if do_reduce_labels else 0
    labels = []
    for i in ids.tolist():
        if i + shift not in instance_id_to_semantic_id:
            raise ValueError(
                f"instance id {i + shift} is in the segmentation map but not in instance_id_to_semantic_id "
                f"(ids there: {sorted(instance_id_to_semantic_id)})"
            )
        labels.append(instance_id_to_semantic_id[i + shift] - shift)
    return masks, torch.tensor(labels, dtype=torch.long)


def _list_of_maps(segmentation_maps: Any, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """One ``(H, W)`` integer tensor per image (PIL, numpy or torch; a 3-D array is a batch), sizes checked."""
    if isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 3:
        segmentation_maps = list(segmentation_maps)
    elif not isinstance(segmentation_maps, (list, tuple)):
        segmentation_maps = [segmentation_maps]
    maps = []
    for m in segmentation_maps:
        tensor = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.array(m))
        if tensor.ndim != 2:
            raise ValueError(f"a segmentation map must be 2-D (height, width); got shape {tuple(tensor.shape)}")
        maps.append(tensor)
    if len(maps) != len(images):
        raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps; pass one per image")
    for i, (image, m) in enumerate(zip(images, maps)):
        if tuple(m.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"segmentation map {i} has size {tuple(m.shape)} but its image is {tuple(image.shape[-2:])}"
            )
    return maps


# post-processing ---------------------------------------------------------------------------------------------------
def _check_target_sizes(target_sizes: Sequence | None, batch_size: int) -> None:
    if target_sizes is not None and len(target_sizes) != batch_size:
        raise ValueError(f"target_sizes has {len(target_sizes)} entries but the outputs hold {batch_size} images")


def _compute_segments(
    mask_probs: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: set[int],
    target_size: tuple[int, int] | None,
) -> tuple[torch.Tensor, list[dict]]:
    """Give each pixel to the query with the highest score-weighted probability; keep a query's segment only when
    it holds enough (``overlap_mask_area_threshold``) of the query's own thresholded mask."""
    if target_size is not None:
        mask_probs = F.interpolate(mask_probs[None], size=tuple(target_size), mode="bilinear", align_corners=False)[0]
    height, width = mask_probs.shape[-2:]
    segmentation = torch.zeros((height, width), dtype=torch.int32, device=mask_probs.device)
    mask_probs = mask_probs * scores.view(-1, 1, 1)
    owner = mask_probs.argmax(0)  # H, W
    segments: list[dict] = []
    segment_id = 0
    fused: dict[int, int] = {}
    for k in range(labels.shape[0]):
        label = labels[k].item()
        mask_k = owner == k
        area, original_area = mask_k.sum(), (mask_probs[k] >= mask_threshold).sum()
        if not (area > 0 and original_area > 0 and (area / original_area).item() > overlap_mask_area_threshold):
            continue
        segment_id = fused[label] if label in fused else segment_id + 1
        segmentation[mask_k] = segment_id
        should_fuse = label in label_ids_to_fuse
        segments.append(
            {"id": segment_id, "label_id": label, "was_fused": should_fuse, "score": round(scores[k].item(), 6)}
        )
        if should_fuse:
            fused[label] = segment_id
    return segmentation, segments


def binary_mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """COCO-style uncompressed run-length encoding of a binary ``(H, W)`` mask (tensor or numpy) in row-major order."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    pixels = torch.cat([mask.new_zeros(1), mask.flatten(), mask.new_zeros(1)])
    runs = torch.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2].clone()
    return runs.tolist()


class MaskFormerImageProcessor(BaseImageProcessor):
    """Prepares images (and segmentation targets) for MaskFormer and turns its outputs into segmentation maps.

    Args:
        size_divisor: Round resized heights and widths up to a multiple of this (legacy name ``size_divisibility``).
        ignore_index: Label of pixels that make no mask (background, void).
        do_reduce_labels: Treat label 0 as background (it becomes ``ignore_index``) and shift the other labels down by
            one (legacy name ``reduce_labels``).
        num_labels: Number of classes, kept for the config file.
        pad_size: ``{"height", "width"}`` to pad every batch to; by default the largest image of the batch.
        **kwargs: The fields of :class:`~timm_backbone.image_processing.BaseImageProcessor` (``size`` is the
            shortest edge when an int, capped by the legacy ``max_size``, 1333 when absent), and legacy keys.
    """

    processor_type = "MaskFormerImageProcessor"
    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_mask"]
    default_to_square = False
    size: ClassVar[Any] = {"shortest_edge": 800, "longest_edge": 1333}
    image_mean: ClassVar[Any] = IMAGENET_DEFAULT_MEAN
    image_std: ClassVar[Any] = IMAGENET_DEFAULT_STD
    _extra_fields = ("size_divisor", "ignore_index", "do_reduce_labels", "num_labels", "pad_size")

    def __init__(
        self,
        *,
        size_divisor: int = 32,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        num_labels: int | None = None,
        pad_size: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs = self._prepare_dict(kwargs)
        size_divisor = kwargs.pop("size_divisor", size_divisor)
        do_reduce_labels = kwargs.pop("do_reduce_labels", do_reduce_labels)
        super().__init__(**kwargs)
        self.size_divisor = int(size_divisor or 0)
        self.ignore_index = ignore_index
        self.do_reduce_labels = bool(do_reduce_labels)
        self.num_labels = num_labels
        self.pad_size = pad_size

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> MaskFormerImageProcessor:
        """As the base; an override under a legacy name (``from_dict(d, size_divisibility=8)``) replaces the dict's
        field, as transformers 4.x did."""
        overrides = dict(overrides)
        for old, new in _LEGACY_KEYS.items():
            if old in overrides:
                overrides[new] = overrides.pop(old)
        config_dict = {k: v for k, v in config_dict.items() if _LEGACY_KEYS.get(k, k) not in overrides}
        return super().from_dict(config_dict, **overrides)

    @classmethod
    def _prepare_dict(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Legacy keys: ``size_divisibility``, ``reduce_labels``, and an int ``size`` without ``max_size``."""
        out = dict(config_dict)
        for old, new in _LEGACY_KEYS.items():
            if old in out:
                out.setdefault(new, out.pop(old))
        if out.get("size") is None and out.get("max_size") is not None:
            out["size"] = {"shortest_edge": cls.size["shortest_edge"], "longest_edge": out.pop("max_size")}
        elif isinstance(out.get("size"), int) and not isinstance(out["size"], bool) and out.get("max_size") is None:
            out["max_size"] = DEFAULT_MAX_SIZE
        return out

    def extra_fields(self) -> tuple[str, ...]:
        return self._extra_fields

    # preprocessing -------------------------------------------------------------------------------------------------
    def __call__(self, images: Any, segmentation_maps: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, segmentation_maps, **kwargs)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: dict[int, int] | Sequence[dict[int, int]] | None = None,
        return_tensors: str | None = None,
        input_data_format: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Resize, normalise and pad a batch; with ``segmentation_maps``, also build the mask targets.

        Args:
            images: One image or a list (PIL, numpy HWC/CHW, torch CHW), or a batched array/tensor.
            segmentation_maps: One ``(H, W)`` map per image: class ids, or instance ids when
                ``instance_id_to_semantic_id`` is given.
            instance_id_to_semantic_id: One mapping for all images, or one per image.
            return_tensors: ``"pt"`` for stacked tensors, ``"np"`` for numpy, ``None`` for lists of tensors.
            input_data_format: ``"channels_first"``/``"channels_last"`` when the channel axis is ambiguous.
            **kwargs: Any field for this call only (``size``, ``ignore_index``...).

        Returns:
            ``pixel_values`` ``(B, 3, H, W)`` float32 and ``pixel_mask`` ``(B, H, W)`` int64 (1 on image pixels, 0 on
            padding); with maps also ``mask_labels`` (a list of ``(N_i, H, W)`` float binary masks, 0 on padding) and
            ``class_labels`` (a list of ``(N_i,)`` int64 class ids).

        Raises:
            ValueError: unknown keywords, or maps that do not pair up with the images.
        """
        kwargs.pop("pad_and_return_pixel_mask", None)  # transformers 4.x: the batch is always padded and masked
        unknown = sorted(set(kwargs) - set(self.fields) - set(self.extra_fields()) - {"max_size"})
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown arguments {unknown}; valid: "
                f"{sorted(self.fields + self.extra_fields())}"
            )
        params = {k: getattr(self, k) for k in self.fields + self.extra_fields()}
        params.update({k: v for k, v in self._prepare_dict(kwargs).items() if v is not None})
        params = self._checked(params, max_size=params.pop("max_size", None))
        tensors = [
            to_chw_tensor(image, params["do_convert_rgb"], input_data_format) for image in make_list_of_images(images)
        ]
        maps = None if segmentation_maps is None else _list_of_maps(segmentation_maps, tensors)
        if isinstance(instance_id_to_semantic_id, (list, tuple)) and len(instance_id_to_semantic_id) != len(tensors):
            raise ValueError(
                f"instance_id_to_semantic_id holds {len(instance_id_to_semantic_id)} mappings for {len(tensors)} images"
            )
        if params["do_resize"] and maps is not None:
            maps = [resize(m[None], self._output_size(t, params), "nearest")[0] for m, t in zip(maps, tensors)]
        pixel_values = [self.process_image(t, params) for t in tensors]
        if params["pad_size"] is not None:
            pad_to = (int(params["pad_size"]["height"]), int(params["pad_size"]["width"]))
        else:
            pad_to = (max(v.shape[-2] for v in pixel_values), max(v.shape[-1] for v in pixel_values))
        padded = [pad(v, pad_to) for v in pixel_values]
        out = BatchFeature(
            pixel_values=stack_outputs([p for p, _ in padded], return_tensors),
            pixel_mask=stack_outputs([m for _, m in padded], return_tensors, "pixel_mask"),
        )
        if maps is not None:
            mask_labels, class_labels = [], []
            for i, m in enumerate(maps):
                mapping = instance_id_to_semantic_id
                if isinstance(mapping, (list, tuple)):
                    mapping = mapping[i]
                masks, labels = segmentation_to_masks(m, mapping, params["ignore_index"], params["do_reduce_labels"])
                mask_labels.append(pad(masks, pad_to)[0])
                class_labels.append(labels)
            out["mask_labels"], out["class_labels"] = mask_labels, class_labels
        return out

    @staticmethod
    def _output_size(image: torch.Tensor, params: dict[str, Any]) -> tuple[int, int]:
        return output_size(*image.shape[-2:], params["size"], int(params["size_divisor"] or 0))

    def resize_image(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """Resize to ``size`` (DETR's shortest/longest-edge rule), rounded up to a multiple of ``size_divisor``."""
        return resize(image, self._output_size(image, params), params["resample"], params["backend"])

    # post-processing -----------------------------------------------------------------------------------------------
    @staticmethod
    def _logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        get = outputs.get if isinstance(outputs, dict) else lambda k: getattr(outputs, k, None)
        class_logits, mask_logits = get("class_queries_logits"), get("masks_queries_logits")
        if class_logits is None or mask_logits is None:
            raise TypeError("outputs must carry class_queries_logits and masks_queries_logits (MaskFormer's outputs)")
        return class_logits, mask_logits

    def post_process_segmentation(self, outputs: Any, target_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-class scores ``(B, num_labels, H, W)``: class probabilities (no-object dropped) times mask
        probabilities, summed over queries; the masks resized to ``target_size`` first (transformers 4.x's
        ``post_process_segmentation``; :meth:`post_process_semantic_segmentation` gives class maps)."""
        class_logits, mask_logits = self._logits(outputs)
        if target_size is not None:
            mask_logits = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
    ) -> list:
        """Per-pixel class ids: class probabilities (no-object dropped) times mask probabilities, summed over queries.

        Args:
            outputs: MaskFormer's outputs (``class_queries_logits``, ``masks_queries_logits``).
            target_sizes: One ``(height, width)`` per image to resize the scores to (bilinear) before the argmax.
            return_segmentation_scores: Return dicts with ``segmentation`` and the ``(C, H, W)``
                ``segmentation_scores`` instead of bare maps.

        Returns:
            One ``(H, W)`` int64 map per image (or a dict per image, see above).
        """
        class_logits, mask_logits = self._logits(outputs)
        _check_target_sizes(target_sizes, class_logits.shape[0])
        scores = torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
        results = []
        for i in range(scores.shape[0]):
            score = scores[i]
            if target_sizes is not None:
                score = F.interpolate(score[None], size=tuple(target_sizes[i]), mode="bilinear", align_corners=False)[0]
            seg = score.argmax(0)
            results.append(
                BatchFeature(segmentation=seg, segmentation_scores=score) if return_segmentation_scores else seg
            )
        return results

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
    ) -> list[dict]:
        """Instances from the top ``num_queries`` (query, class) scores, each scored by class probability times its
        mean mask probability inside the mask (logit > 0).

        Args:
            outputs: MaskFormer's outputs.
            threshold: Minimum instance score kept.
            mask_threshold: Unused (masks are binarised at logit 0); kept for signature compatibility.
            overlap_mask_area_threshold: Unused; kept for signature compatibility.
            target_sizes: One ``(height, width)`` per image; masks are resized to it (nearest).
            return_coco_annotation: Return the segmentation as run-length encodings, one per segment id.
            return_binary_maps: Return the kept instances as a ``(N, H, W)`` stack of binary masks.

        Returns:
            Per image, ``{"segmentation", "segments_info"}``: segment ids per pixel (-1 where none; later instances
            overwrite earlier ones), and per segment ``id``, ``label_id``, ``was_fused`` and ``score``.
        """
        if return_coco_annotation and return_binary_maps:
            raise ValueError("return_coco_annotation and return_binary_maps cannot both be True")
        class_logits, mask_logits = self._logits(outputs)
        _check_target_sizes(target_sizes, class_logits.shape[0])
        num_queries, num_classes = class_logits.shape[-2], class_logits.shape[-1] - 1
        labels = torch.arange(num_classes, device=class_logits.device).repeat(num_queries)
        results = []
        for i in range(class_logits.shape[0]):
            probs = class_logits[i].softmax(-1)[:, :-1]
            # sorted=False on purpose: the pick order then matches transformers' exactly
            top_scores, top = probs.flatten().topk(num_queries, sorted=False)
            mask_pred = mask_logits[i][torch.div(top, num_classes, rounding_mode="floor")]
            masks = (mask_pred > 0).float()
            mask_scores = (mask_pred.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
            scores = top_scores * mask_scores
            size = tuple(target_sizes[i]) if target_sizes is not None else tuple(mask_logits.shape[-2:])
            if target_sizes is not None:
                masks = F.interpolate(masks[None], size=size, mode="nearest")[0]
            segmentation = torch.full(size, -1.0)
            kept, segments = [], []
            for j in range(num_queries):
                score = scores[j].item()
                if score >= threshold and bool(masks[j].any()):
                    segmentation[masks[j] == 1] = len(segments)
                    segments.append(
                        {
                            "id": len(segments),
                            "label_id": labels[top[j]].item(),
                            "was_fused": False,
                            "score": round(score, 6),
                        }
                    )
                    kept.append(masks[j])
            if return_coco_annotation:
                segmentation = [binary_mask_to_rle(segmentation == k) for k in torch.unique(segmentation)]
            if return_binary_maps and kept:
                segmentation = torch.stack(kept)
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict]:
        """Non-overlapping segments: queries that predict an object with probability above ``threshold`` compete for
        pixels; classes in ``label_ids_to_fuse`` (stuff) merge into one segment per class.

        Args:
            outputs: MaskFormer's outputs.
            threshold: Minimum class probability of a kept query.
            mask_threshold: Mask probability that counts a pixel as the query's own.
            overlap_mask_area_threshold: Fraction of its own mask a query must win to make a segment.
            label_ids_to_fuse: Class ids whose instances are fused into one segment.
            target_sizes: One ``(height, width)`` per image; probabilities are resized to it (bilinear).

        Returns:
            Per image, ``{"segmentation", "segments_info"}``: segment ids per pixel (0 where none; a map of -1 when
            no query passes ``threshold``), and per segment ``id``, ``label_id``, ``was_fused`` and ``score``.
        """
        class_logits, mask_logits = self._logits(outputs)
        _check_target_sizes(target_sizes, class_logits.shape[0])
        fuse = set(label_ids_to_fuse or ())
        num_classes = class_logits.shape[-1] - 1
        mask_probs = mask_logits.sigmoid()
        scores, labels = class_logits.softmax(-1).max(-1)
        results = []
        for i in range(class_logits.shape[0]):
            keep = labels[i].ne(num_classes) & (scores[i] > threshold)
            target = tuple(target_sizes[i]) if target_sizes is not None else None
            if not bool(keep.any()):
                size = target if target is not None else tuple(mask_logits.shape[-2:])
                results.append({"segmentation": torch.full(size, -1.0), "segments_info": []})
                continue
            segmentation, segments = _compute_segments(
                mask_probs[i][keep],
                scores[i][keep],
                labels[i][keep],
                mask_threshold,
                overlap_mask_area_threshold,
                fuse,
                target,
            )
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results
