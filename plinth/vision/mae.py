"""Masked autoencoding (MAE, He et al. 2021): pretrain a ViT without labels by hiding most of each
image's patches and reconstructing their pixels from the rest.

The encoder is the plinth Transformer of an image config and sees only the visible patches (a
quarter: cheap, and what makes the task hard enough to learn from). A light decoder made of the
same blocks gets the encoded patches back in place among learned mask vectors and predicts every
patch's pixels; the loss is the squared error on the hidden patches only, against pixels
normalised per patch (sharper features than raw pixels, as MAE measured). After pretraining only
the encoder is kept: it is an ordinary plinth model folder that `plinth finetune` starts from.

Which patches are hidden arrives as the training loop's targets, (B, N) longs: IGNORE where a
patch is visible, the patch's index where it is hidden, so the loop counts hidden patches as it
counts target tokens, and masks are data (drawn from the step's seed: resume is bit-exact).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from plinth.config import ModelConfig
from plinth.loss import IGNORE
from plinth.model import Block, Positions, RMSNorm, Transformer, make_norm
from plinth.vision.patches import patchify, sincos_2d, unpatchify


def hidden_count(patches: int, ratio: float) -> int:
    """How many of an image's `patches` a mask of `ratio` hides."""
    return int(round(patches * ratio))


def random_masks(batch: int, patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, patches) targets: a random `ratio` of each row's patches hidden (their index), the
    rest IGNORE. Every row hides the same number, so the visible patches stack into one tensor."""
    hidden = hidden_count(patches, ratio)
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    masks = torch.full((batch, patches), IGNORE, dtype=torch.long)
    rows = torch.arange(batch)[:, None]
    masks[rows, order[:, :hidden]] = order[:, :hidden]
    return masks


def visible(masks: torch.Tensor) -> torch.Tensor:
    """(B, n) indices of each row's visible patches, in order."""
    B = masks.shape[0]
    return (masks == IGNORE).nonzero()[:, 1].view(B, -1)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's pixel mean and spread, (B, N, 1) each: what norm_pix_loss normalises by."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def decoder_config(encoder: ModelConfig, dim: int, layers: int, heads: int) -> ModelConfig:
    """The decoder's blocks: the encoder's kind of block, narrower and fewer."""
    return dataclasses.replace(encoder, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, head_dim=None,
                               ffn_dim=4 * dim)


class PixelDecoder(nn.Module):
    """MAE's light decoder: encoded visible patches back in place among mask vectors, given their
    positions, through a few blocks of the encoder's kind, to each patch's pixels."""

    def __init__(self, config: ModelConfig, encoder_dim: int):
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self.embed = nn.Linear(encoder_dim, config.dim)
            self.mask_token = nn.Parameter(torch.empty(1, 1, config.dim))
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = make_norm(config, config.dim)
            self.pixels = nn.Linear(config.dim, config.patch_dim)

    @torch.no_grad()
    def init_weights(self, device="cpu"):
        """Linear layers normal(0, 0.02) with zero biases, norms 1 (and 0), the mask vector
        normal(0, 0.02): as the encoder's `Transformer.init_weights`."""
        self.to_empty(device=device)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, 0.0, 0.02)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, patches: int, class_token: bool) -> torch.Tensor:
        """encoded (B, [1 +] n, C_enc), keep (B, n) their patch indices → (B, N, D) pixels."""
        x = self.embed(encoded)
        cls, x = (x[:, :1], x[:, 1:]) if class_token else (None, x)
        B = x.shape[0]
        grid = self.mask_token.to(x.dtype).expand(B, patches, -1)
        x = grid.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)  # (B, N, C)
        x = x + sincos_2d(self.config.grid, self.config.dim).to(x.device, x.dtype)
        if cls is not None:
            x = torch.cat([cls, x], dim=1)
        where = Positions(B, x.shape[1], 0, x.device)
        for block in self.blocks:
            x = block(x, None, where, None)
        x = self.pixels(self.norm(x))
        return x[:, 1:] if cls is not None else x


class MaskedAutoencoder(nn.Module):
    """What the loop trains: encoder (a ViT `Transformer`) + `PixelDecoder`. `forward(images,
    targets=masks)` returns the summed per-patch squared error over hidden patches."""

    def __init__(self, encoder: Transformer, decoder: PixelDecoder, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder, self.decoder, self.norm_pix_loss = encoder, decoder, norm_pix_loss
        self.config = encoder.config  # what the loop reads (layers, width) for its FLOP estimate

    def predict(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, N, D) predicted pixels of every patch (normalised per patch if norm_pix_loss)."""
        keep = visible(masks)
        encoded = self.encoder.features(images=images, keep=keep)
        return self.decoder(encoded, keep, masks.shape[1], self.encoder.class_token is not None)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) what each patch should be: its pixels, normalised per patch if norm_pix_loss."""
        patches = patchify(images.float(), self.config.patch_size)
        if not self.norm_pix_loss:
            return patches
        mean, spread = patch_stats(patches)
        return (patches - mean) / spread

    def forward(self, images, targets):
        """Σ over hidden patches of the mean squared pixel error (the loop divides by their number)."""
        error = (self.predict(images, targets).float() - self.targets(images)).pow(2).mean(-1)  # (B, N)
        return error[targets != IGNORE].sum()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction), both (B, C, S, S) in the images' normalisation: hidden
        patches blanked (0) in the first; in the second, predicted where hidden (brought back to
        each patch's own pixel mean and spread, as MAE's figures do) and the input where visible."""
        p, c = self.config.patch_size, self.config.channels
        patches = patchify(images.float(), p)
        predicted = self.predict(images, masks).float()
        if self.norm_pix_loss:
            mean, spread = patch_stats(patches)
            predicted = predicted * spread + mean
        hidden = (masks != IGNORE)[..., None]
        masked = unpatchify(patches.masked_fill(hidden, 0.0), p, c)
        return masked, unpatchify(torch.where(hidden, predicted, patches), p, c)
