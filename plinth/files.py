"""Atomic files, folders and links: everything plinth writes appears whole or not at all.

Each writer fills a temporary name beside its target and renames it into place, so a kill at any
moment leaves either the old output or the new one, never half of one (checkpoints, indexes,
exports, eval results, data shards, tokenizers).

    write_atomic(run / "results.json", json.dumps(results))
    with atomic_folder(out / "step-000050") as tmp:    # fill tmp; it becomes the target on success
        save_file(state, str(tmp / "model.safetensors"))
    point_link(out / "latest", "step-000050")
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sibling(path: Path, suffix: str) -> Path:
    """A hidden name beside `path` (same folder, so a rename never crosses file systems)."""
    return path.with_name(f".{path.name}.{suffix}")


def write_atomic(path, data: str | bytes) -> Path:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """A temporary path to write the file at; renamed to `path` when the block ends without error,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path) -> Iterator[Path]:
    """An empty temporary folder to fill; when the block ends without error it takes the place of
    `path` (an existing folder there is swapped out, then deleted), and when it raises it is deleted.
    Replacing a folder takes two renames: a kill between them leaves the old one at `.NAME.old`."""
    path = Path(path)
    tmp, old = sibling(path, "tmp"), sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.replace(old)  # two renames: a folder cannot replace a non-empty one in one step
    try:
        tmp.replace(path)
    except BaseException:
        if old.exists():
            old.replace(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def point_link(link, target: str):
    """Make the symlink `link` point at `target` (a name in the same folder) in one rename."""
    link = Path(link)
    tmp = sibling(link, "tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
