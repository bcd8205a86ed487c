"""Training augmentation on tensors: random rescale, random crop and horizontal flip of an image and its labels
together (labels by nearest neighbour), drawn from a generator seeded per sample and epoch so a run replays exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import Sample, SegmentationDataset


def _nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an integer ``(H, W)`` map by picking the source pixel under each output pixel's centre (exact for any
    label value, unlike interpolating floats)."""
    height, width = labels.shape
    rows = ((torch.arange(size[0]) + 0.5) * height / size[0]).long().clamp_(max=height - 1)
    cols = ((torch.arange(size[1]) + 0.5) * width / size[1]).long().clamp_(max=width - 1)
    return labels[rows][:, cols]


def random_resized_crop_flip(
    sample: Sample,
    size: int,
    generator: torch.Generator,
    scale: Sequence[float] = (0.5, 2.0),
    fill: int = 255,
) -> Sample:
    """Rescale so the short side is ``size`` times a factor drawn from ``scale``, crop a random ``size`` x ``size``
    window (padding the image with 0 and the labels with ``fill`` where the rescaled image is smaller), and flip
    horizontally with probability 1/2.

    Args:
        sample: The sample; its ``segmentation`` is resized by nearest neighbour.
        size: Side of the output square.
        generator: Source of every random draw.
        scale: Range of the rescale factor.
        fill: Label of padded pixels (the layout's unlabelled value).
    """
    height, width = sample.image.shape[-2:]
    factor = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item()
    ratio = size * factor / min(height, width)
    new = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    image = F.interpolate(sample.image[None].float(), size=new, mode="bilinear", antialias=True, align_corners=False)
    image = image[0].round_().clamp_(0, 255).to(torch.uint8)
    labels = _nearest(sample.segmentation, new)
    pad_h, pad_w = max(0, size - new[0]), max(0, size - new[1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=fill)
    top = int(torch.randint(0, image.shape[-2] - size + 1, (), generator=generator))
    left = int(torch.randint(0, image.shape[-1] - size + 1, (), generator=generator))
    image, labels = image[:, top : top + size, left : left + size], labels[top : top + size, left : left + size]
    if torch.rand((), generator=generator).item() < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    return Sample(image.contiguous(), labels.contiguous(), sample.instance_classes, sample.name)


class AugmentedDataset(torch.utils.data.Dataset):
    """``dataset`` with :func:`random_resized_crop_flip` applied; sample ``i`` of epoch ``e`` is augmented with a
    generator seeded from ``(seed, e, i)``, whichever worker or process reads it.

    Args:
        dataset: The training split.
        size: Output side in pixels.
        seed: Seed of the run.
        scale: Range of the rescale factor.
    """

    def __init__(
        self, dataset: SegmentationDataset, size: int, seed: int = 0, scale: Sequence[float] = (0.5, 2.0)
    ) -> None:
        self.dataset, self.size, self.seed, self.scale = dataset, size, seed, tuple(scale)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch`` (set before each epoch's DataLoader iterator is made)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return random_resized_crop_flip(self.dataset[index], self.size, generator, self.scale, self.dataset.fill_value)
