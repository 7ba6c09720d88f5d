"""One place that turns a path into a model: the format is recognised from the path itself.

    model, tokenizer, dtype = read_model(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))

Formats: a `.gguf` file (llama.cpp's), a Hugging Face folder (config.json + safetensors), a plinth
folder (weights/native.py: checkpoints, full fine-tunes). A fine-tuning run that holds only an
adapter or a head names its base in finetune.json; `plinth.adapt.adapted` reads those on top of
this. Names of known models become paths in `plinth.hub`.
"""
from __future__ import annotations

from pathlib import Path

from plinth.config import ModelConfig
from plinth.errors import PlinthError
from plinth.model import Transformer
from plinth.tokenizer import Tokenizer
from plinth.weights.gguf import read_gguf
from plinth.weights.hf import is_hf_folder, read_hf_folder
from plinth.weights.native import is_native, read_native


def read_model(path: Path) -> tuple[Transformer, Tokenizer | None, str]:
    """A float32 model, its tokenizer (None for an image model), and the compact dtype suited to
    the file's precision."""
    if path.is_file() and path.suffix == ".gguf":
        config, state_dict, tokenizer, dtype = read_gguf(path)
    elif is_hf_folder(path):
        (config, state_dict), tokenizer, dtype = read_hf_folder(path), Tokenizer.from_folder(path), "int8"
    elif is_native(path):
        config, state_dict = read_native(path)
        tokenizer, dtype = (None if config.is_image else Tokenizer.from_folder(path)), "int8"  # images need none
    else:
        raise PlinthError(f"cannot load {path}: plinth reads .gguf files, Hugging Face model folders, plinth "
                          "checkpoint folders and fine-tuning runs; give the path of one or a known model name "
                          "(`plinth list`)")
    return build(config, state_dict), tokenizer, dtype


def build(config: ModelConfig, state_dict: dict) -> Transformer:
    """The Transformer of `config` holding `state_dict` (strict: every weight present, none extra)."""
    model = Transformer(config)
    model.load_weights(state_dict)
    return model.eval()
