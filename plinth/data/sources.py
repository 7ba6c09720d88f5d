"""Where pretraining text comes from: built-in sources (found on every machine) or user paths.

    for doc in read_source("python-stdlib", limit=100): print(doc.source, doc.id, len(doc.text))

A source is a name in SOURCES, or a path: a .txt/.md/.py file, a .jsonl file (one {"text": ...}
per line), or a folder of such files.
"""
from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plinth.errors import PlinthError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}


@dataclass
class Document:
    source: str
    id: str
    text: str


def python_stdlib() -> Iterator[Document]:
    """The standard library's Python source (tests left out: they are repetitive)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or rel.startswith(("idlelib", "lib2to3/tests")):
            continue
        yield Document("python-stdlib", rel, path.read_text(encoding="utf-8", errors="replace"))


def python_docs() -> Iterator[Document]:
    """Language-reference prose shipped with Python (pydoc's topic texts)."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield Document("python-docs", name, topics[name])


SOURCES = {"python-stdlib": python_stdlib, "python-docs": python_docs}


def from_path(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PlinthError(f"{f}:{n}: each line must be a JSON object with a 'text' field ({e})") from e
                yield Document(str(path), f"{f.name}:{n}", text)
        elif f.suffix in TEXT_SUFFIXES:
            yield Document(str(path), f.name, f.read_text(encoding="utf-8", errors="replace"))


def read_source(name: str, limit: int = 0) -> Iterator[Document]:
    if name in SOURCES:
        docs = SOURCES[name]()
    elif Path(name).exists():
        docs = from_path(Path(name))
    else:
        raise PlinthError(f"unknown data source {name!r}: not one of {', '.join(SOURCES)} and no such path")
    for i, doc in enumerate(docs):
        if limit and i >= limit:
            return
        yield doc
