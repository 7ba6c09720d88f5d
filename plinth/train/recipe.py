"""Recipes: small YAML files over dataclass defaults, with `--key=value` overrides from the CLI.

    recipe = load_recipe(PretrainRecipe, "recipes/pretrain-tiny.yaml", ["--max_steps=50"])

An unknown key or a value of the wrong type is an error that names it, before any work is done.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from plinth.errors import PlinthError
from plinth.tokenizer import TRAINED_SPECIALS


@dataclass
class LoopRecipe:
    """What the one training loop reads: optimisation and bookkeeping, shared by every recipe."""
    name: str = "run"
    out_dir: str = ""                    # default: runs/<name>
    seq_len: int = 256
    batch_size: int = 8                  # sequences per micro-batch (per process)
    grad_accum: int = 1                  # micro-batches per optimizer step
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1            # final lr = lr × this
    warmup_steps: int = 20
    schedule: str = "cosine"             # "cosine" or "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2          # wsd: last fraction of steps that decays
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    autocast: str = "auto"               # "auto" (bfloat16 where the CPU/GPU has it), "bfloat16" or "none"
    compile: bool = False                # torch.compile each block (pays on GPUs; measured slower on this CPU)
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    sample_prompt: str = ""              # greedy sample logged at each evaluation ("" = none)

    def __post_init__(self):
        if not self.out_dir:
            self.out_dir = f"runs/{self.name}"
        if self.schedule not in ("cosine", "wsd"):
            raise PlinthError(f"schedule={self.schedule!r}; choose cosine or wsd")
        if self.autocast not in ("auto", "none", "bfloat16"):
            raise PlinthError(f"autocast={self.autocast!r}; choose auto, none or bfloat16")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise PlinthError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass
class PretrainRecipe(LoopRecipe):
    name: str = "pretrain"
    objective: str = "next-token"        # "next-token" (text); "mae" and "flow" are read by plinth/vision/
    # data (plinth data prepare)
    sources: list[str] = field(default_factory=lambda: ["python-stdlib", "python-docs"])
    max_docs_per_source: int = 0         # 0 = all
    min_chars: int = 64                  # drop shorter documents
    vocab_size: int = 4096               # BPE vocabulary trained on the data
    val_fraction: float = 0.02           # documents held out for validation
    # model
    preset: str = "tiny"                 # a plinth.config preset, then `model` overrides
    model: dict = field(default_factory=dict)
    mixture: dict = field(default_factory=dict)  # source: weight (sampled share of training rows); {} = by size
    sample_prompt: str = "def fibonacci("  # greedy sample logged at each evaluation

    def __post_init__(self):
        super().__post_init__()
        if self.objective != "next-token":
            raise PlinthError(f"objective={self.objective!r}; pretraining objectives are next-token (text), mae "
                              "(image encoders) and flow (image generators)")
        smallest = 256 + len(TRAINED_SPECIALS) + 1
        if self.vocab_size < smallest:
            raise PlinthError(f"vocab_size={self.vocab_size} is too small: 256 byte tokens and "
                              f"{len(TRAINED_SPECIALS)} special tokens need at least {smallest}")

    @property
    def data_dir(self) -> Path:
        return Path(self.out_dir) / "data"

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.out_dir) / "tokenizer"


def _coerce(name: str, value, kind):
    """Check `value` against the field's type; YAML and the CLI give strings, ints for floats, ..."""
    origin = typing.get_origin(kind) or kind
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and origin in (int, float, list, dict):
        parsed = yaml.safe_load(value)  # a --key=value override arrives as text
        if not isinstance(parsed, str):
            return _coerce(name, parsed, kind)
    if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
        return value
    raise PlinthError(f"recipe field {name!r} must be {getattr(origin, '__name__', origin)}, got {value!r}")


def recipe_values(path=None, overrides: list[str] | None = None) -> dict:
    """A recipe file's fields with the `--key=value` overrides on top, not yet checked."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PlinthError(f"no such recipe: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise PlinthError(f"{path} must be a YAML mapping of field: value")
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise PlinthError(f"override {item!r} must look like --key=value")
        values[key.replace("-", "_")] = value
    return values


def load_recipe(cls, path=None, overrides: list[str] | None = None):
    values = recipe_values(path, overrides)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PlinthError(f"unknown recipe key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
