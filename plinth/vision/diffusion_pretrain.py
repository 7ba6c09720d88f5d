"""`plinth pretrain` for image generation: a diffusion transformer trained by flow matching
(plinth/vision/diffusion.py) on captioned images, through the one training loop — atomic
checkpoints, bit-exact --resume, metrics.jsonl, progress in images/s, and a grid of samples (one
per class, from the moving average of the weights) at each evaluation.

    plinth pretrain recipes/dit-fashion.yaml            # kill at any time, then --resume
    plinth imagine runs/dit-fashion/final "an ankle boot" --n 16 --out boots.png

Captions: each image is paired, per step, with a random caption of its class
(plinth/vision/captions.py; a folder or JSONL of labelled images gets "{label}"-style captions),
embedded once by the sentence encoder; a fraction of them are dropped (classifier-free guidance).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig, preset
from plinth.errors import PlinthError
from plinth.files import atomic_file, point_link
from plinth.hub import DEFAULT_EMBEDDER
from plinth.retrieval.embedder import Embedder
from plinth.train import checkpoint
from plinth.train.dist import setup
from plinth.train.loop import autocast, target_count, train
from plinth.train.recipe import LoopRecipe
from plinth.vision.captions import FASHION_CLASS_NAMES, PHRASINGS, class_captions
from plinth.vision.data import ImageData, step_generator
from plinth.vision.diffusion import Denoiser, noised, prompt_dropout, sample, velocity_target
from plinth.vision.images import FASHION_MNIST, ImagePrep, labelled_images
from plinth.vision.imagine import DENOISER_FILE, DIFFUSION_CONFIG, image_grid, prompt_vectors, to_pixels
from plinth.vision.pretrain import held_out

SAMPLES = "samples"  # the run folder's sub-folder of sample grids, one PNG per evaluation


@dataclass
class DiffusionRecipe(LoopRecipe):
    name: str = "dit"
    objective: str = "flow"              # what `plinth pretrain` reads to pick this recipe (flow matching)
    data: str = "fashion-mnist"          # fashion-mnist, a folder with a sub-folder per class, or a JSONL of {"image", "label"}
    val_images: int = 1000               # held out of the data for the validation loss
    preset: str = "dit-fashion"          # a plinth.config preset of an image model with adaptive_norm, then `model` overrides
    model: dict = field(default_factory=dict)
    prompt_encoder: str = DEFAULT_EMBEDDER  # the sentence encoder that embeds captions and prompts
    prompt_dropout: float = 0.1          # share of training captions dropped (the unconditional model guidance needs)
    ema_decay: float = 0.999             # moving average of the weights, used for sampling
    guidance: float = 4.0                # sampling defaults (sample grids, `plinth imagine`, the server)
    sample_steps: int = 16
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    sample_prompt: str = ""              # text runs only

    def __post_init__(self):
        super().__post_init__()
        if self.objective != "flow":
            raise PlinthError(f"objective={self.objective!r}; image generation is objective: flow")
        if not 0 <= self.prompt_dropout < 1:
            raise PlinthError(f"prompt_dropout={self.prompt_dropout} must be in [0, 1) (0.1 is usual)")
        if not 0 < self.ema_decay < 1:
            raise PlinthError(f"ema_decay={self.ema_decay} must be between 0 and 1 (0.999 is usual)")
        if self.sample_prompt:
            raise PlinthError("sample_prompt is for text runs; an image generator's runs write sample grids")

    def config(self) -> ModelConfig:
        config = preset(self.preset, **self.model)
        if not (config.is_image and config.adaptive_norm) or config.class_token:
            raise PlinthError(f"preset {self.preset!r} with {self.model} is not a denoiser: it needs patch_size, "
                              "image_size and adaptive_norm: true, and no class_token (e.g. preset: dit-fashion)")
        return config


class CaptionedImages(ImageData):
    """`batch(step, micro)` → ((noisy images, times, prompt vectors), velocities): each image with a
    random caption of its class (some dropped), noise and a time drawn for that very step."""

    def __init__(self, *args, captions: torch.Tensor, caption_classes: torch.Tensor, dropout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.captions, self.caption_classes, self.dropout = captions, caption_classes, dropout

    def batch(self, step: int, micro: int):
        images, labels = super().batch(step, micro)
        return self.flow_pair(images, labels[:, 0], step_generator(self.seed, step, micro, 3), self.dropout)

    def val_batches(self, count: int = 0):
        for i, (images, labels) in enumerate(super().val_batches(count)):
            yield self.flow_pair(images, labels[:, 0], step_generator(self.seed, i, 0, 4), 0.0)

    def flow_pair(self, images, labels, generator: torch.Generator, dropout: float):
        choice = torch.stack([self.random_caption(int(label), generator) for label in labels])
        prompts = prompt_dropout(self.captions[choice], dropout, generator)
        noise = torch.randn(images.shape, generator=generator)
        t = torch.rand(len(images), generator=generator)
        return (noised(images, noise, t), t, prompts), velocity_target(images, noise)

    def random_caption(self, label: int, generator: torch.Generator) -> torch.Tensor:
        mine = (self.caption_classes == label).nonzero()[:, 0]
        return mine[torch.randint(len(mine), (), generator=generator)]


def captions_for(r: DiffusionRecipe, names: list[str]) -> list[list[str]]:
    """Per class, its captions: Fashion-MNIST's wordings, or each label in every phrasing."""
    if r.data == FASHION_MNIST:
        return class_captions(FASHION_CLASS_NAMES)
    return class_captions([[name] for name in names], PHRASINGS)


def captioned_data(r: DiffusionRecipe, config: ModelConfig, embedder: Embedder) -> tuple[CaptionedImages, list, list]:
    """The training and held-out images with their captions' vectors; the captions and class names."""
    prep = ImagePrep.from_config(config)
    data = labelled_images(r.data, prep)
    if len(data.pixels) <= r.val_images:
        raise PlinthError(f"{r.data} has {len(data.pixels)} images, not more than val_images={r.val_images}; "
                          "lower val_images or add images")
    captions = captions_for(r, data.names)
    flat = [caption for per_class in captions for caption in per_class]
    classes = torch.tensor([label for label, per_class in enumerate(captions) for _ in per_class])
    held, kept = held_out(len(data.pixels), r.seed, r.val_images)
    images = CaptionedImages(data.pixels[kept], prep, r.batch_size, r.seed, r.grad_accum, labels=data.labels[kept],
                             val=(data.pixels[held], data.labels[held]), tokens_per_image=config.n_patches,
                             captions=prompt_vectors(embedder, flat), caption_classes=classes, dropout=r.prompt_dropout)
    return images, captions, data.names


class DiffusionWeights(checkpoint.Weights):
    """The denoiser with its moving average (denoiser.safetensors) and diffusion.json."""

    def __init__(self, settings: dict, state: dict | None = None):
        self.settings, self.state = settings, state

    def write(self, model: Denoiser, folder: Path):
        state = self.state if self.state is not None else model.state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / DENOISER_FILE))
        (folder / DIFFUSION_CONFIG).write_text(json.dumps(self.settings, indent=2))

    def read(self, model: Denoiser, folder: Path):
        model.load(load_file(str(folder / DENOISER_FILE)), model.pixels.weight.device)

    def gathered(self, state: dict) -> "DiffusionWeights":
        return DiffusionWeights(self.settings, state)


class Evaluation:
    """Validation loss (squared velocity error per pixel on held-out images, noise fixed per
    batch), and a grid of samples from the moving average: one row per class, the same noise each
    time, written to <out_dir>/samples/step-NNNNNN.png by the main process (`main`; under torchrun
    every process samples, as each takes part in the model's collectives, but one writes)."""

    def __init__(self, r: DiffusionRecipe, config: ModelConfig, captions: list[list[str]], embedder: Embedder,
                 prep: ImagePrep, main: bool = True):
        self.r, self.prep, self.main = r, prep, main
        per_row = 8
        self.prompts = prompt_vectors(embedder, [per_class[0] for per_class in captions]).repeat_interleave(per_row, 0)
        self.noise = torch.randn(len(self.prompts), config.channels, config.image_size, config.image_size,
                                 generator=torch.Generator().manual_seed(0))
        self.per_row = per_row

    @torch.no_grad()
    def __call__(self, model, data: CaptionedImages, r) -> dict:
        inner = getattr(model, "module", model)
        model.eval()
        total, count = 0.0, 0
        for x, y in data.val_batches(r.eval_batches):
            with autocast(r):
                total += float(model(x, targets=y))
            count += target_count(y)
        averaged = copy.deepcopy(inner).use_average()
        with autocast(r):
            images = sample(averaged, self.prompts, self.noise, r.sample_steps, r.guidance)
        if self.main:
            out = Path(r.out_dir) / SAMPLES / f"step-{int(inner.ema_updates):06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(out) as tmp:
                image_grid(to_pixels(images, self.prep), self.per_row).save(tmp, format="png")
        model.train()
        return {"val_loss": total / max(1, count)}


def pretrain_diffusion(r: DiffusionRecipe, resume: bool = False, log=print, dist_mode: str = "none") -> Path:
    d = setup(dist_mode, r.batch_size)
    try:
        config = r.config()
        embedder = Embedder.load(r.prompt_encoder)
        data, captions, names = captioned_data(r, config, embedder)
        torch.manual_seed(r.seed)  # the same initial weights on every process
        model = Denoiser(config, embedder.dimensions, r.ema_decay)
        model.init_weights(d.device)
        settings = {"model": config.to_dict(), "prompt_encoder": r.prompt_encoder, "ema_decay": r.ema_decay,
                    "guidance": r.guidance, "steps": r.sample_steps, "classes": names,
                    "captions": captions}
        if d.main:
            log(f"flow matching on {r.data}: {len(data.train)} images ({len(data.val)} held out), "
                f"{sum(len(c) for c in captions)} captions, {sum(p.numel() for p in model.parameters()):,} parameters")
        evaluate = Evaluation(r, config, captions, embedder, data.prep, d.main)
        latest = train(model, None, data, r, resume, log if d.main else lambda *_: None, evaluate=evaluate,
                       store=DiffusionWeights(settings), d=d)
        if d.main:
            point_link(Path(r.out_dir) / "final", latest.resolve().name)
        return Path(r.out_dir) / "final"
    finally:
        d.close()

