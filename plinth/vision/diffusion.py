"""Image generation by flow matching (rectified flow) with a diffusion transformer (DiT).

Training pairs an image x0 with noise ε at a random time t in [0, 1]: the model sees the straight
line between them, x_t = (1 − t)·x0 + t·ε, and learns the velocity along it, v = ε − x0. Sampling
starts from pure noise at t = 1 and follows the predicted velocity back to t = 0 in a few Euler
steps. Why flow matching rather than DDPM: one line of objective, no noise-schedule tables, and
straight paths that few-step Euler sampling follows well (Stable Diffusion 3 trains this way).

The denoiser is the plinth Transformer of an image config with `adaptive_norm` (adaLN-Zero: the
conditioning vector scales and shifts every norm and gates every residual branch, from zero at
init) and a thin adapter around it: the timestep and the prompt's sentence vector embedded into
that conditioning vector, and one linear layer from each patch's features back to its pixels.
Classifier-free guidance: training drops the prompt (a zero vector) for a fraction of examples, so
the same network also predicts unconditionally, and sampling extrapolates from that prediction
toward the prompted one.

    loss = denoiser((noised(x0, noise, t), t, prompts), targets=velocity_target(x0, noise))
    images = sample(denoiser, prompts, noise, steps=16, guidance=4.0)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from plinth.config import ModelConfig
from plinth.model import Transformer
from plinth.vision.patches import unpatchify

TIME_FEATURES = 256  # sinusoidal features of the timestep, before its MLP (DiT's frequency embedding size)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point at time t (B,) on the straight line from the image x0 (t = 0) to the noise (t = 1)."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t along that line: what the denoiser learns to predict."""
    return noise - x0


def time_features(t: torch.Tensor, size: int = TIME_FEATURES) -> torch.Tensor:
    """(B,) times in [0, 1] → (B, size) sines and cosines at geometrically spaced frequencies (on
    the 0..1000 scale of DiT's timesteps, so the fastest ones still separate nearby times)."""
    half = size // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def mlp(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width))


def average_key(name: str) -> str:
    """The buffer holding the moving average of parameter `name` (buffer names cannot hold dots)."""
    return "ema-" + name.replace(".", "-")


class Denoiser(nn.Module):
    """What the loop trains: `forward((x_t, t, prompts), targets=v)` returns the squared error of
    the predicted velocity summed over every pixel (the loop divides by their number).

    prompts: (B, prompt_dim) sentence vectors (plinth/retrieval/embedder.py); a zero row is no
    prompt (unconditional). Keeps an exponential moving average of its weights as buffers (saved
    and resumed with them), updated by the loop after each optimizer step (`after_step`); sampling
    uses the average (`use_average`)."""

    def __init__(self, config: ModelConfig, prompt_dim: int, ema_decay: float = 0.999):
        super().__init__()
        if not (config.is_image and config.adaptive_norm) or config.class_token:
            raise ValueError("a denoiser is an image model with adaptive_norm and no class token (preset dit-*)")
        self.config, self.prompt_dim, self.ema_decay = config, prompt_dim, ema_decay
        self.net = Transformer(config)
        with torch.device("meta"):
            self.time_embed = mlp(TIME_FEATURES, config.dim)
            self.prompt_embed = mlp(prompt_dim, config.dim)
            self.pixels = nn.Linear(config.dim, config.patch_dim)

    @torch.no_grad()
    def init_weights(self, device="cpu"):
        """The Transformer's init (adaLN-Zero modulations at 0); the timestep and prompt MLPs
        normal(0, 0.02) with zero biases; the pixel layer 0, so the first prediction is 0 (DiT's
        zero-initialised final layer); the moving average a copy of these weights."""
        self.to_empty(device=device)
        self.net.init_weights()
        for layer in [*self.time_embed, *self.prompt_embed]:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 0.02)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.pixels.weight)
        nn.init.zeros_(self.pixels.bias)
        self.track_average()

    def track_average(self):
        """Register the moving average, starting from the current weights, and its update count."""
        for name, p in self.named_parameters():
            self.register_buffer(average_key(name), p.detach().clone())
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long, device=self.pixels.weight.device))

    def average_of(self, name: str) -> torch.Tensor:
        """The moving average of parameter `name` (a buffer, registered by `track_average`)."""
        return getattr(self, average_key(name))

    def load(self, state: dict, device="cpu") -> "Denoiser":
        """Weights and moving average from a state dict (strict: a missing or unexpected key is an error)."""
        self.to_empty(device=device)
        self.track_average()
        self.load_state_dict(state)
        self.net.init_buffers()
        return self

    @torch.no_grad()
    def after_step(self):
        """Move the average toward the new weights; its decay ramps up over the first updates
        (1+n)/(10+n), so the early average is not dominated by the random init."""
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        for name, p in self.named_parameters():
            value = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards: the whole tensor
            self.average_of(name).lerp_(value.detach(), 1 - decay)
        self.ema_updates += 1

    @torch.no_grad()
    def use_average(self) -> "Denoiser":
        """Put the averaged weights in place of the trained ones (for sampling; not to train on)."""
        for name, p in self.named_parameters():
            p.copy_(self.average_of(name))
        return self

    def per_row_parameters(self) -> int:
        """Parameters acting once per image: the conditioning MLPs and the blocks' modulations."""
        embedders = sum(p.numel() for part in (self.time_embed, self.prompt_embed) for p in part.parameters())
        return embedders + self.net.per_row_parameters()

    def condition(self, t: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, C): the timestep's and the prompt's embeddings, summed (DiT adds time and class)."""
        dtype = self.time_embed[0].weight.dtype
        return self.time_embed(time_features(t).to(dtype)) + self.prompt_embed(prompts.to(dtype))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, channels, S, S) noisy images at times t (B,) → the predicted velocity, same shape."""
        h = self.net.features(images=x, condition=self.condition(t, prompts))  # (B, N, C)
        return unpatchify(self.pixels(h).float(), self.config.patch_size, self.config.channels)

    def forward(self, x, targets):
        noisy, t, prompts = x
        return (self.velocity(noisy, t, prompts) - targets.float()).pow(2).sum()


@torch.no_grad()
def guided_velocity(denoiser: Denoiser, x, t, prompts, guidance: float):
    """Classifier-free guidance: v_uncond + guidance · (v_prompt − v_uncond). Guidance 1 is the
    prompted model alone, 0 the unconditional one alone (each a single pass)."""
    unconditional = torch.zeros_like(prompts)
    if guidance == 1:
        return denoiser.velocity(x, t, prompts)
    if guidance == 0:
        return denoiser.velocity(x, t, unconditional)
    both = denoiser.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([prompts, unconditional]))
    prompted, plain = both.chunk(2)
    return plain + guidance * (prompted - plain)


@torch.no_grad()
def sample(denoiser: Denoiser, prompts: torch.Tensor, noise: torch.Tensor, steps: int = 16,
           guidance: float = 4.0) -> torch.Tensor:
    """Images (B, channels, S, S) in the model's pixel normalisation, from noise (the same shape)
    at t = 1 to t = 0 in `steps` Euler steps along the guided velocity."""
    if steps < 1:
        raise ValueError(f"steps={steps}; sampling needs at least one step")
    x = noise.float()
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        v = guided_velocity(denoiser, x, t.expand(len(x)), prompts, guidance)
        x = x + (t_next - t) * v
    return x


def prompt_dropout(prompts: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Training's classifier-free guidance: each row's prompt replaced by the zero vector (no
    prompt) with probability `rate`."""
    dropped = torch.rand(len(prompts), generator=generator) < rate
    return prompts.masked_fill(dropped[:, None], 0.0)

