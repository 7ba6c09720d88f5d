"""An image+text model, LLaVA-style, from parts plinth already has: a ViT (the image encoder), a
small projector, and a plinth language model. The encoder's patch features, merged 2×2 and
projected to the language model's width, become "image tokens" spliced into the token sequence
where the chat template puts the image; the language model reads them like token embeddings.

    model = ImageTextModel(encoder, language)           # both plinth Transformers
    tokens = ... IMAGE_SLOT where image tokens go ...   # (B, T), see plinth/vision/image_chat.py
    loss = model((tokens, images), targets=targets)     # images (B, C, S, S): one per row, in order

Merging neighbouring patches (as Qwen2-VL's patch merger) keeps each patch's detail in the
projector's input while the language model, by far the larger network, reads a quarter as many
image tokens. The class token, if the encoder has one, is not an image token: the patches are.

On disk a model is its language model (a plinth or GGUF base with a LoRA adapter) plus
`vision.json` (the encoder's ModelConfig, the merge) and `vision.safetensors` (encoder and projector).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.loss import IGNORE
from plinth.model import Transformer

IMAGE_SLOT = -2  # a token position that an image token fills (training batches; PAD is -1)
VISION_CONFIG, VISION_WEIGHTS = "vision.json", "vision.safetensors"


class Projector(nn.Module):
    """Merged patch features → the language model's width: two linear layers with a GELU between
    (LLaVA-1.5's projector)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class ImageEncoder(nn.Module):
    """Images (M, C, S, S) normalised → image tokens (M, tokens_per_image, language width)."""

    def __init__(self, encoder: Transformer, language_dim: int, merge: int = 2):
        super().__init__()
        config = encoder.config
        if not config.is_image:
            raise PlinthError("the image encoder must be an image model (a ViT config with patch_size), e.g. an "
                              "MAE run (plinth pretrain recipes/mae-shapes.yaml)")
        if config.grid % merge:
            raise PlinthError(f"merge={merge} does not divide the encoder's {config.grid}×{config.grid} patch grid")
        self.encoder, self.merge = encoder, merge
        self.projector = Projector(config.dim * merge * merge, language_dim)

    @property
    def tokens_per_image(self) -> int:
        return (self.encoder.config.grid // self.merge) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c, m = self.encoder.config, self.merge
        patches = self.encoder.features(images=images)[:, int(c.class_token):]  # (M, G², E)
        M, g = patches.shape[0], c.grid // m
        merged = patches.reshape(M, g, m, g, m, c.dim).permute(0, 1, 3, 2, 4, 5).reshape(M, g * g, m * m * c.dim)
        return self.projector(merged.to(self.projector.fc1.weight.dtype))

    def init_projector(self, seed: int):
        """Fresh projector weights: PyTorch's default Linear init, seeded."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for layer in (self.projector.fc1, self.projector.fc2):
                layer.reset_parameters()

    def save(self, folder: Path):
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(folder) / VISION_WEIGHTS))
        config = {"encoder": json.loads(self.encoder.config.to_json()), "merge": self.merge,
                  "language_dim": self.projector.fc2.out_features}
        (Path(folder) / VISION_CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "ImageEncoder":
        folder = Path(folder)
        try:
            config = json.loads((folder / VISION_CONFIG).read_text())
            state = load_file(str(folder / VISION_WEIGHTS))
        except (OSError, ValueError, KeyError) as e:
            raise PlinthError(f"{folder} holds no readable image encoder ({VISION_CONFIG} + {VISION_WEIGHTS}): {e}; "
                              "train one with plinth finetune recipes/vqa-easy.yaml") from e
        vision = cls(Transformer(ModelConfig.from_dict(config["encoder"])), config["language_dim"], config["merge"])
        vision.to_empty(device="cpu")
        try:
            vision.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise PlinthError(f"{folder / VISION_WEIGHTS} does not fit {VISION_CONFIG}: {e}") from e
        vision.encoder.init_buffers()
        return vision


def has_image_encoder(folder) -> bool:
    return Path(folder).is_dir() and (Path(folder) / VISION_CONFIG).is_file()


class ImageTextModel(nn.Module):
    """What the training loop trains: the image encoder and the language model together. Its config
    is the language model's (the loop sizes memory and FLOPs by it)."""

    def __init__(self, vision: ImageEncoder, language: Transformer):
        super().__init__()
        self.vision, self.language = vision, language
        self.config = language.config
        self.lr_scales: dict[str, float] = {}  # parameter name prefix → learning-rate factor (the loop reads it)

    def embed(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, T) ids with IMAGE_SLOT where image tokens go (and PAD, negative, after each row's end),
        images (M, C, S, S) in row-major slot order → input vectors (B, T, C)."""
        slots = tokens == IMAGE_SLOT
        x = self.language.tok_embeddings(tokens.clamp(min=0))
        image_tokens = self.vision(images).flatten(0, 1)  # (M · tokens_per_image, C)
        if image_tokens.shape[0] != int(slots.sum()):
            raise ValueError(f"{int(slots.sum())} image slots for {images.shape[0]} images of "
                             f"{self.vision.tokens_per_image} tokens")
        return x.masked_scatter(slots[..., None], image_tokens.to(x.dtype))

    def forward(self, x, targets=None):
        """x = (tokens, images). Logits (B, T, V); with targets (B, T), the loss summed over the
        targets other than IGNORE, the output layer applied only where a target counts."""
        if targets is None:
            return self.language(embeds=self.embed(*x))
        return self.language.output_loss(*self.features_at_targets(x, targets))

    def features_at_targets(self, x, targets):
        """Final hidden states (N, C) and targets (N,) of the positions whose target counts (the
        vocabulary projection is the largest matmul of a small model: only where it is needed)."""
        keep = targets != IGNORE
        return self.language.features(embeds=self.embed(*x))[keep], targets[keep]
