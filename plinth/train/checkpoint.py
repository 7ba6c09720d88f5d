"""Checkpoints: a folder per save, written under a temporary name and renamed when complete, and
a `latest` link switched atomically, so a kill at any moment leaves the last good checkpoint.

    <out_dir>/step-000050/  model.safetensors  config.json  tokenizer.json  trainer.pt  COMPLETE
    <out_dir>/latest -> step-000050
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from plinth.files import atomic_folder, point_link
from plinth.weights.native import read_native, write_model

KEEP = 2  # checkpoints kept besides the newest


class Weights:
    """What a checkpoint holds of the model: all its weights (pretraining, full fine-tuning).
    Fine-tuning subclasses it to save only what it trains (a LoRA adapter, a classifier head)."""

    def write(self, model, folder: Path):
        write_model(model, folder)

    def read(self, model, folder: Path):
        model.load_weights(read_native(folder)[1])

    def gathered(self, state: dict) -> "Weights":
        """The same, writing `state`: the weights gathered from FSDP2 shards (see train/dist.py)."""
        return GatheredWeights(state)


MODEL_WEIGHTS = Weights()


class GatheredWeights(Weights):
    """All weights, already gathered by the caller (from FSDP2 shards: see train/dist.py)."""

    def __init__(self, state: dict):
        self.state = state

    def write(self, model, folder: Path):
        write_model(model, folder, self.state)


def save(out_dir, step: int, model, tokenizer, trainer_state: dict, weights: Weights = MODEL_WEIGHTS):
    out_dir = Path(out_dir)
    name = f"step-{step:06d}"
    with atomic_folder(out_dir / name) as tmp:
        weights.write(model, tmp)
        if tokenizer is not None:  # image models have none
            tokenizer.save(tmp)
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "COMPLETE").write_text(str(step))
    point_link(out_dir / "latest", name)
    for old in sorted(out_dir.glob("step-*"))[:-(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)


def latest(out_dir) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    done = [p for p in sorted(Path(out_dir).glob("step-*")) if (p / "COMPLETE").is_file()]
    return done[-1] if done else None


def trainer_state(folder) -> dict:
    # weights_only: plain tensors and containers, never arbitrary pickled objects
    return torch.load(Path(folder) / "trainer.pt", weights_only=True)
