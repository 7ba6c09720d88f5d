"""Images as the training loop's data: `batch(step, micro)` → (inputs, targets), as text data gives.

Inputs are normalised images (B, C, S, S). Targets are class ids (B, 1) for classification, or,
without labels, masked-autoencoder masks (B, N) drawn for that very step (plinth/vision/mae.py).
The order is a fresh permutation of the training images each epoch, and every random choice is
seeded by (seed, step, micro-batch): a resumed run sees exactly the batches it would have seen.

    data = ImageData(pixels, prep, batch_size=64, seed=0, labels=labels, val=(val_pixels, val_labels))
    x, y = data.batch(step=0, micro=0)
"""
from __future__ import annotations

import numpy as np
import torch

from plinth.vision.images import ImagePrep
from plinth.vision.mae import random_masks, visible


def step_generator(*key: int) -> torch.Generator:
    """A generator seeded from a tuple of non-negative ints (numpy's SeedSequence mixes them)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


def mirror_at_random(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, S, S) mirrored left-right with probability 1/2."""
    mirrored = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images)


def shift_at_random(images: torch.Tensor, most: int, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, S, S) moved by up to `most` pixels up or down and left or right, drawn per
    image, the uncovered border zero: torchvision's RandomCrop(S, padding=most)."""
    B, S = len(images), images.shape[-1]
    padded = torch.nn.functional.pad(images, (most,) * 4)
    rows = torch.randint(0, 2 * most + 1, (B, 1), generator=generator) + torch.arange(S)
    cols = torch.randint(0, 2 * most + 1, (B, 1), generator=generator) + torch.arange(S)
    return padded[torch.arange(B)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class ImageData:
    """labels: (N,) class ids for classification (then `choices` is the class count); None for
    masked autoencoding with `mask_ratio` of each image's `patches` hidden. val: held-out
    (pixels, labels or None). flip: mirror each training image left-right with probability 1/2;
    shift: move each by up to that many pixels each way (zero-filled).
    tokens_per_image: positions the model computes per image (the loop's speed and MFU figures)."""

    def __init__(self, pixels: torch.Tensor, prep: ImagePrep, batch_size: int, seed: int, grad_accum: int = 1,
                 labels: torch.Tensor | None = None, val: tuple | None = None, classes: int | None = None,
                 patches: int = 0, mask_ratio: float = 0.75, flip: bool = False, tokens_per_image: int = 1,
                 keep_patches: float = 1.0, shift: int = 0):
        self.train, self.labels, self.prep = pixels, labels, prep
        self.val, self.val_labels = val if val is not None else (pixels[:0], None)
        self.batch_size, self.seed, self.grad_accum = batch_size, seed, grad_accum
        self.choices = classes
        self.patches, self.mask_ratio, self.flip, self.shift = patches, mask_ratio, flip, shift
        self.tokens_per_image, self.keep_patches = tokens_per_image, keep_patches
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, torch.randperm(len(self.train), generator=step_generator(self.seed, epoch))
        return self._order

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (step * self.grad_accum + micro) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, places = positions // len(self.train), positions % len(self.train)
        rows = torch.stack([self.order(int(e))[int(p)] for e, p in zip(epochs, places)])
        generator = step_generator(self.seed, step, micro, 1)
        images = self.train[rows]
        if self.shift:  # before normalising: the border is black, as in the raw pixels
            images = shift_at_random(images, self.shift, generator)
        images = self.prep.normalize(images)
        if self.flip:
            images = mirror_at_random(images, generator)
        targets = self.targets(rows, self.labels, generator)
        if self.labels is not None and self.keep_patches < 1:
            targets = torch.cat([targets, visible(random_masks(len(rows), self.patches, 1 - self.keep_patches,
                                                               generator))], dim=1)
        return images, targets

    def targets(self, rows: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        if labels is not None:
            return labels[rows][:, None]
        return random_masks(len(rows), self.patches, self.mask_ratio, generator)

    def val_batches(self, count: int = 0):
        """Held-out batches in order (count 0 = all of them); masks fixed per batch."""
        total = len(self.val)
        for i, start in enumerate(range(0, total, self.batch_size)):
            if count and i >= count:
                return
            rows = torch.arange(start, min(start + self.batch_size, total))
            yield self.prep.normalize(self.val[rows]), self.targets(rows, self.val_labels,
                                                                     step_generator(self.seed, i, 0, 2))
