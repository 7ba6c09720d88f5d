"""plinth's own weights format: a folder with `model.safetensors` and `config.json` (the
`ModelConfig` as JSON), plus the tokenizer's files. Training checkpoints and full fine-tunes are
written this way, and `plinth.load` reads them like any other model.

    write_model(model, folder)
    config, state_dict = read_native(folder)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plinth.config import ModelConfig
from plinth.errors import PlinthError

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def write_model(model, folder: Path, state: dict | None = None):
    """model.safetensors + config.json into `folder` (the caller makes the folder atomic).
    state: the weights when they are already gathered elsewhere (FSDP2 shards), else the model's."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)  # the same tensor as the token embedding
    save_file(state, str(Path(folder) / WEIGHTS_FILE))
    (Path(folder) / CONFIG_FILE).write_text(model.config.to_json())


def is_native(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def read_native(folder) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not is_native(folder):
        raise PlinthError(f"{folder} is not a plinth model folder ({WEIGHTS_FILE} + {CONFIG_FILE})")
    config = ModelConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    return config, load_file(str(folder / WEIGHTS_FILE))
