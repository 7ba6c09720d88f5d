"""Checkpoints: a folder per save, written under a temporary name and renamed when complete, and
a `latest` link switched atomically, so a kill at any moment leaves the last good checkpoint.

    <out_dir>/step-000050/  model.safetensors  config.json  tokenizer.json  trainer.pt  COMPLETE
    <out_dir>/latest -> step-000050
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError

KEEP = 2  # checkpoints kept besides the newest


class Weights:
    """What a checkpoint holds of the model: all its weights (pretraining, full fine-tuning).
    Fine-tuning subclasses it to save only what it trains (a LoRA adapter, a classifier head)."""

    def write(self, model, folder: Path):
        write_model(model, folder)

    def read(self, model, folder: Path):
        model.load_weights(read_checkpoint(folder)[1])


MODEL_WEIGHTS = Weights()


class GatheredWeights(Weights):
    """All weights, already gathered by the caller (from FSDP2 shards: see train/dist.py)."""

    def __init__(self, state: dict):
        self.state = state

    def write(self, model, folder: Path):
        write_model(model, folder, self.state)


def write_model(model, folder: Path, state: dict | None = None):
    """model.safetensors + config.json: a folder `plinth.load` reads."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)  # the same tensor as the token embedding
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(model.config.to_json())


def save(out_dir, step: int, model, tokenizer, trainer_state: dict, weights: Weights = MODEL_WEIGHTS):
    out_dir = Path(out_dir)
    final = out_dir / f"step-{step:06d}"
    tmp = out_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights.write(model, tmp)
    tokenizer.save(tmp)
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "COMPLETE").write_text(str(step))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    link = out_dir / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, out_dir / "latest")
    for old in sorted(out_dir.glob("step-*"))[:-(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)


def latest(out_dir) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    done = [p for p in sorted(Path(out_dir).glob("step-*")) if (p / "COMPLETE").is_file()]
    return done[-1] if done else None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def read_checkpoint(folder) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise PlinthError(f"{folder} is not a plinth checkpoint (model.safetensors + config.json)")
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return config, load_file(str(folder / "model.safetensors"))


def trainer_state(folder) -> dict:
    # weights_only: plain tensors and containers, never arbitrary pickled objects
    return torch.load(Path(folder) / "trainer.pt", weights_only=True)
