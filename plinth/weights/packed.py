"""Compact weights kept between runs: what `plinth.load` made of a GGUF file, ready to map.

Loading a GGUF file the long way parses its vocabulary, dequantizes every tensor to float32 and
quantizes it again into the int4/int8 kernels' layouts; the result is the same each time for the
same file. The first load therefore writes it to PACKED_CACHE/<the file's SHA-256>-<dtype>/
(~/.cache/plinth/packed, or $PLINTH_PACKED_CACHE): the compact tensors, config.json and the
tokenizer. Later loads map that folder: no float32 copy of the model is made on the way in. The
tensors are in PyTorch's own file format, not safetensors, because it aligns every tensor to 64
bytes, which the int8/int4 kernels need of weights they read in place from the mapped file. A changed file has another hash, so it never meets a stale folder;
FORMAT names the layout, so a plinth whose compact layers changed ignores older folders.

    folder = packed_folder(path, dtype)
    model, tokenizer, dtype = read_packed(folder)           # None: not kept yet, then load and
    write_packed(folder, path, dtype, model, tokenizer)     # keep it
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from plinth.config import ModelConfig
from plinth.files import atomic_folder
from plinth.model import Transformer
from plinth.quant import compact_shape_
from plinth.tokenizer import Tokenizer

PACKED_CACHE = Path(os.environ.get("PLINTH_PACKED_CACHE", Path.home() / ".cache" / "plinth" / "packed"))
FORMAT = 2  # 2: Int4Head output layers, and a GGUF's default dtype chosen by its tensors' types
WEIGHTS = "model.pt"
ABOUT = "packed.json"  # the source file, the dtype and FORMAT


def packed_folder(path: Path, dtype: str | None) -> Path:
    """Where the compact weights of the GGUF file `path` in `dtype` (None: plinth's default) live."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return PACKED_CACHE / f"{digest}-{dtype or 'default'}"


def read_packed(folder: Path) -> tuple[Transformer, Tokenizer, str] | None:
    """The compact model, tokenizer and dtype kept in `folder`, or None when there is none to use."""
    try:
        about = json.loads((folder / ABOUT).read_text())
    except (OSError, ValueError):
        return None
    if about.get("format") != FORMAT:
        return None
    try:
        config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
        model = compact_shape_(Transformer(config), about["dtype"])  # built on the meta device: no memory yet
        weights = torch.load(folder / WEIGHTS, mmap=True, weights_only=True)
        model.load_state_dict(weights, strict=True, assign=True)
        tokenizer = Tokenizer.from_folder(folder)
    except Exception as e:  # damaged on disk (a full disk, a hand edit): the model file is still there
        print(f"plinth: the compact weights kept in {folder} are unreadable ({e}); reading the model file "
              "again", file=sys.stderr)
        return None
    model.init_buffers()
    return model.eval(), tokenizer, about["dtype"]


def write_packed(folder: Path, source: Path, dtype: str, model: Transformer, tokenizer: Tokenizer):
    """Keep `model` (made compact as `dtype`) and its tokenizer in `folder`. A cache that cannot be
    written (a read-only home, a full disk) costs only the next load's time: say so and go on."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:
            # Tensors sharing storage (an Int4Head's `rows` and the input embedding) are saved once and
            # load sharing it again.
            torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
            (tmp / "config.json").write_text(model.config.to_json())
            tokenizer.save(tmp)
            (tmp / ABOUT).write_text(json.dumps({"source": str(source), "dtype": dtype, "format": FORMAT}))
    except OSError as e:
        print(f"plinth: could not keep the compact weights in {folder} ({e}); the next load will "
              "read the model file again", file=sys.stderr)
