"""Images as sequences: square patches in, square patches out, and where each patch sits.

A ViT reads an image as a row of patch vectors (`patchify`), the Transformer's blocks see them as
they see token embeddings, and a pixel decoder (the masked autoencoder's) writes patches back
(`unpatchify`). Shapes: B batch, C channels, S image side, P patch side, G = S / P patches per
side, N = G² patches, D = C·P² pixels per patch.

    patches = patchify(images, 4)        # (B, 1, 28, 28) -> (B, 49, 16)
    images = unpatchify(patches, 4, 1)   # and back
"""
from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, N, D), patches in row-major order, each patch's pixels channel by channel
    within a pixel (row, column, channel), as MAE's code orders them."""
    B, C, S, _ = images.shape
    G = S // patch
    x = images.reshape(B, C, G, patch, G, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, N, D) -> (B, C, S, S): the inverse of `patchify`."""
    B, N, _ = patches.shape
    G = int(round(N ** 0.5))
    x = patches.reshape(B, G, G, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, G * patch, G * patch)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid², dim) fixed position vectors of a grid of patches: half the width encodes the row,
    half the column, each as sines and cosines at geometrically spaced frequencies (MAE, ViT-B/16
    "sincos2d"). Fixed, so they cost no parameters and need no training to tell patches apart."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                   torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), columns.reshape(-1)):
        angles = torch.outer(coordinate, frequencies)  # (grid², dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()
