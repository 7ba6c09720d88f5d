"""Reading adapted models: a fine-tuning run's folder (finetune.json naming the base, plus a LoRA
adapter, full weights and/or a classification or regression head), or any model with an adapter
folder merged in. `plinth.load` reads every model through `read_adapted`.

    net, tokenizer, dtype, head, vision = read_adapted(Path("runs/lora-sentiment/final"))
"""
from __future__ import annotations

import json
from pathlib import Path

from plinth import hub
from plinth.adapt import lora
from plinth.adapt.classify import HEAD_CONFIG, Head
from plinth.vision.multimodal import ImageEncoder, has_image_encoder
from plinth.weights.load import read_model
from plinth.weights.native import is_native

FINETUNE_CONFIG = "finetune.json"  # written by plinth/adapt/finetune.py beside what was trained


def base_reference(base: str) -> str:
    """How finetune.json names the base: a known name as is, a path made absolute."""
    return base if base in hub.KNOWN_MODELS else str(Path(base).resolve())


def read_adapted(path: Path, adapter: str | None = None):
    """The float model at `path` (adapters merged in), its tokenizer, the compact dtype, a
    classification/regression head or None, and an image+text model's image encoder or None.
    `path` may be any format `read_model` reads, or a fine-tuning output whose base is read first;
    `adapter` is one more LoRA folder to merge."""
    config_path = path / FINETUNE_CONFIG if path.is_dir() else None
    merged = adapter is not None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        source = path if is_native(path) else hub.resolve(config["base"])  # full weights, or only what was trained
        net, tokenizer, dtype = read_model(source)
        if (path / lora.ADAPTER_CONFIG).is_file():
            lora.load_adapter(net, path)
            merged = True
    else:
        net, tokenizer, dtype = read_model(path)
    head = Head.load(path) if path.is_dir() and (path / HEAD_CONFIG).is_file() else None  # a run, or an export of one
    vision = ImageEncoder.load(path) if has_image_encoder(path) else None
    if adapter is not None:
        lora.load_adapter(net, adapter)
    if merged and dtype == "int4":  # int4 keeps a 4-bit file's own codes; an adapter's small changes to the
        dtype = "int8"              # weights fall between them and would round away
    return lora.merge_lora(net), tokenizer, dtype, head, vision
