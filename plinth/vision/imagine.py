"""A trained image generator, ready to use: prompts in, images out (`plinth imagine`, the server's
/v1/images/generations, `plinth.load(RUN).imagine`).

A run of `plinth pretrain` with objective: flow saves its denoiser (with the moving average of its
weights) as denoiser.safetensors and what it needs besides as diffusion.json: the model config, the
sentence encoder that embeds prompts, the classes it was trained on and its sampling defaults.
Sampling uses the moving average.

    generator = ImageGenerator.load("runs/dit-fashion/final")
    pixels = generator.generate(["an ankle boot"] * 4, seed=0)       # uint8 (4, 1, 28, 28)
    image_grid(pixels).save("boots.png")
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.onednn import float32_on_onednn
from plinth.retrieval.embedder import Embedder
from plinth.vision.diffusion import Denoiser, sample
from plinth.vision.images import ImagePrep

DENOISER_FILE, DIFFUSION_CONFIG = "denoiser.safetensors", "diffusion.json"
MAX_STEPS = 1000


def is_image_generator(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DIFFUSION_CONFIG).is_file()


def prompt_vectors(embedder: Embedder, prompts: list[str]) -> torch.Tensor:
    """(N, dim) sentence vectors; an empty prompt is the zero vector: no prompt (unconditional)."""
    vectors = torch.zeros(len(prompts), embedder.dimensions)
    given = [i for i, prompt in enumerate(prompts) if prompt.strip()]
    if given:
        vectors[given] = embedder.embed([prompts[i] for i in given]).float()
    return vectors


def to_pixels(images: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """Images in the model's normalisation (N, C, S, S) → uint8 pixels, clipped to 0..255."""
    return ((images.float() * prep.std + prep.mean).clamp(0, 1) * 255).round().to(torch.uint8)


def image_grid(pixels: torch.Tensor, columns: int | None = None, gap: int = 2) -> Image.Image:
    """uint8 (N, C, S, S) → one PIL image: the images in rows of `columns` (default: a square-ish
    grid), `gap` black pixels apart."""
    n, c, s, _ = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (s + gap) - gap, columns * (s + gap) - gap, c), dtype=np.uint8)
    for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
        top, left = (i // columns) * (s + gap), (i % columns) * (s + gap)
        canvas[top:top + s, left:left + s] = image
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """uint8 (C, S, S) → a PIL image (grey or RGB)."""
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


class ImageGenerator:
    def __init__(self, denoiser: Denoiser, embedder: Embedder, settings: dict, name: str = "model"):
        self.denoiser, self.embedder, self.settings, self.name = denoiser.eval(), embedder, settings, name
        self.prep = ImagePrep.from_config(denoiser.config)

    @classmethod
    def load(cls, folder, name: str | None = None) -> "ImageGenerator":
        folder = Path(folder)
        if not is_image_generator(folder):
            raise PlinthError(f"{folder} holds no image generator ({DIFFUSION_CONFIG}); give a checkpoint of "
                              "`plinth pretrain` with objective: flow (e.g. recipes/dit-fashion.yaml)")
        settings = json.loads((folder / DIFFUSION_CONFIG).read_text())
        embedder = Embedder.load(settings["prompt_encoder"])
        denoiser = Denoiser(ModelConfig.from_dict(settings["model"]), embedder.dimensions, settings["ema_decay"])
        denoiser.load(load_file(str(folder / DENOISER_FILE))).use_average()
        return cls(denoiser, embedder, settings, name or folder.resolve().name)

    @property
    def size(self) -> int:
        return self.denoiser.config.image_size

    @property
    def channels(self) -> int:
        return self.denoiser.config.channels

    def check(self, steps: int, guidance: float):
        if not 1 <= steps <= MAX_STEPS:
            raise PlinthError(f"steps={steps}; give 1 to {MAX_STEPS} sampling steps (16 is the default)")
        if not math.isfinite(guidance) or not 0 <= guidance <= 20:
            raise PlinthError(f"guidance={guidance}; give a number from 0 (no prompt) to 20 (1 = the prompt alone)")

    @torch.inference_mode()
    def generate(self, prompts: list[str], seed: int = 0, steps: int | None = None,
                 guidance: float | None = None) -> torch.Tensor:
        """uint8 (N, C, S, S): one image per prompt ("" = unconditional). The noise comes from
        `seed`: the same prompts, seed, steps and guidance give the same images."""
        steps = self.settings["steps"] if steps is None else steps
        guidance = self.settings["guidance"] if guidance is None else guidance
        self.check(steps, guidance)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), self.channels, self.size, self.size, generator=generator)
        prompts = prompt_vectors(self.embedder, prompts)
        with float32_on_onednn():  # every step is large float32 products over the whole batch (plinth/onednn.py)
            images = sample(self.denoiser, prompts, noise, steps, guidance)
        return to_pixels(images, self.prep)
