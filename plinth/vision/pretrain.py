"""`plinth pretrain` for images: a ViT pretrained by masked autoencoding (plinth/vision/mae.py)
through the one training loop — atomic checkpoints, bit-exact --resume, torchrun DDP/FSDP2,
metrics.jsonl, progress in images/s.

    plinth pretrain recipes/mae-fashion.yaml            # kill at any time, then --resume
    plinth finetune recipes/vit-fashion.yaml            # starts from runs/mae-fashion/final

A checkpoint is an ordinary plinth model folder holding the encoder (config.json +
model.safetensors: what fine-tuning and `plinth.load` read) plus the decoder beside it
(mae_decoder.safetensors + mae.json: for --resume and `plinth plot`'s reconstructions).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig, preset
from plinth.errors import PlinthError
from plinth.files import point_link
from plinth.model import Transformer
from plinth.train import checkpoint
from plinth.train.dist import setup
from plinth.train.loop import autocast, target_count, train
from plinth.train.recipe import LoopRecipe
from plinth.vision.data import ImageData
from plinth.vision.images import ImagePrep, unlabelled_images
from plinth.vision.mae import MaskedAutoencoder, PixelDecoder, decoder_config
from plinth.weights.native import read_native, write_model

DECODER_FILE, MAE_CONFIG = "mae_decoder.safetensors", "mae.json"


@dataclass
class MaeRecipe(LoopRecipe):
    name: str = "mae"
    objective: str = "mae"               # what `plinth pretrain` reads to pick this recipe (text: next-token)
    data: str = "fashion-mnist"          # fashion-mnist, a folder of images, or a JSONL of {"image": path}
    val_images: int = 1000               # held out of the data for the validation loss
    preset: str = "vit-tiny"             # a plinth.config preset of an image model, then `model` overrides
    model: dict = field(default_factory=dict)
    mask_ratio: float = 0.75             # share of each image's patches hidden from the encoder
    norm_pix_loss: bool = True           # reconstruct each patch's pixels normalised by its own mean and spread
    decoder_dim: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    flip: bool = False                   # mirror training images left-right at random
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    sample_prompt: str = ""              # text runs only

    def __post_init__(self):
        super().__post_init__()
        if self.objective != "mae":
            raise PlinthError(f"objective={self.objective!r}; image pretraining is objective: mae")
        if not 0 < self.mask_ratio < 1:
            raise PlinthError(f"mask_ratio={self.mask_ratio} must be between 0 and 1 (MAE hides 0.75)")
        if self.sample_prompt:
            raise PlinthError("sample_prompt is for text runs; `plinth plot` shows an image run's reconstructions")

    def config(self) -> ModelConfig:
        config = preset(self.preset, **self.model)
        if not config.is_image:
            raise PlinthError(f"preset {self.preset!r} with {self.model} is not an image model: set patch_size and "
                              "image_size (e.g. preset: vit-fashion)")
        hidden = int(round(config.n_patches * self.mask_ratio))
        if not 0 < hidden < config.n_patches:
            raise PlinthError(f"mask_ratio={self.mask_ratio} hides {hidden} of an image's {config.n_patches} patches; "
                              "something must be hidden and something seen (MAE hides 0.75)")
        return config


class MaeWeights(checkpoint.Weights):
    """The encoder as a plinth model folder, the decoder beside it (see the module docstring)."""

    def __init__(self, r: MaeRecipe, state: dict | None = None):
        self.r, self.state = r, state

    def write(self, model: MaskedAutoencoder, folder: Path):
        state = self.state if self.state is not None else model.state_dict()
        part = {name: {k.removeprefix(f"{name}."): v.detach().contiguous() for k, v in state.items()
                       if k.startswith(f"{name}.")} for name in ("encoder", "decoder")}
        write_model(model.encoder, folder, part["encoder"])
        save_file(part["decoder"], str(folder / DECODER_FILE))
        (folder / MAE_CONFIG).write_text(json.dumps({
            "decoder": model.decoder.config.to_dict(), "norm_pix_loss": model.norm_pix_loss,
            "mask_ratio": self.r.mask_ratio}, indent=2))

    def read(self, model: MaskedAutoencoder, folder: Path):
        model.encoder.load_weights(read_native(folder)[1])
        model.decoder.load_state_dict(load_file(str(folder / DECODER_FILE)))

    def gathered(self, state: dict) -> "MaeWeights":
        return MaeWeights(self.r, state)


def read_mae(folder) -> tuple[MaskedAutoencoder, dict]:
    """A saved masked autoencoder (for plots) and its settings (mae.json)."""
    folder = Path(folder)
    if not (folder / MAE_CONFIG).is_file():
        raise PlinthError(f"{folder} holds no masked autoencoder ({MAE_CONFIG}); give a checkpoint of "
                          "`plinth pretrain` with objective: mae")
    settings = json.loads((folder / MAE_CONFIG).read_text())
    config, state = read_native(folder)
    encoder = Transformer(config)
    encoder.load_weights(state)
    decoder = PixelDecoder(ModelConfig.from_dict(settings["decoder"]), config.dim)
    decoder.to_empty(device="cpu")
    decoder.load_state_dict(load_file(str(folder / DECODER_FILE)))
    return MaskedAutoencoder(encoder, decoder, settings["norm_pix_loss"]).eval(), settings


@torch.no_grad()
def evaluate(model, data: ImageData, r) -> dict:
    """Validation loss: the mean squared error per hidden patch, over the held-out images with
    masks fixed per batch (comparable from evaluation to evaluation)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(r.eval_batches):
        with autocast(r):
            total += float(model(x, targets=y))
        count += target_count(y)
    model.train()
    return {"val_loss": total / max(1, count)}


def held_out(total: int, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the `count` images held out for validation, and of the rest, fixed by `seed`."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[:count], order[count:]


def image_data(r: MaeRecipe, config: ModelConfig) -> ImageData:
    pixels = unlabelled_images(r.data, ImagePrep.from_config(config))
    if len(pixels) <= r.val_images:
        raise PlinthError(f"{r.data} has {len(pixels)} images, not more than val_images={r.val_images}; "
                          "lower val_images or add images")
    held, kept = held_out(len(pixels), r.seed, r.val_images)
    visible = config.n_patches - int(round(config.n_patches * r.mask_ratio))
    return ImageData(pixels[kept], ImagePrep.from_config(config), r.batch_size, r.seed, r.grad_accum,
                     val=(pixels[held], None), patches=config.n_patches, mask_ratio=r.mask_ratio, flip=r.flip,
                     tokens_per_image=visible + config.class_token)  # what the encoder computes per image


def pretrain_mae(r: MaeRecipe, resume: bool = False, log=print, dist_mode: str = "none") -> Path:
    d = setup(dist_mode, r.batch_size)
    try:
        config = r.config()
        data = image_data(r, config)
        torch.manual_seed(r.seed)  # the same initial weights on every process
        encoder = Transformer(config)
        encoder.to_empty(device=d.device)
        encoder.init_weights()
        decoder = PixelDecoder(decoder_config(config, r.decoder_dim, r.decoder_layers, r.decoder_heads), config.dim)
        decoder.init_weights(d.device)
        model = MaskedAutoencoder(encoder, decoder, r.norm_pix_loss)
        if d.main:
            log(f"masked autoencoder on {r.data}: {len(data.train)} images ({len(data.val)} held out), "
                f"{sum(p.numel() for p in encoder.parameters()):,} encoder + "
                f"{sum(p.numel() for p in decoder.parameters()):,} decoder parameters")
        latest = train(model, None, data, r, resume, log if d.main else lambda *_: None, evaluate=evaluate,
                       store=MaeWeights(r), d=d)
        if d.main:
            point_link(Path(r.out_dir) / "final", latest.resolve().name)
        return Path(r.out_dir) / "final"
    finally:
        d.close()
