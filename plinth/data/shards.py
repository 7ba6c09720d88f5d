"""Tokenized data on disk and the deterministic loader that reads it.

`plinth data prepare` writes, per run, `train.bin` and `val.bin` (token ids as uint16, or uint32 for
vocabularies over 65,535; an end-of-text token after every document) plus `meta.json`. Documents
go to train or validation by a hash of their id, so the split never depends on the order read.

`TokenData.batch(step, micro)` is a pure function of (seed, step, micro-batch index): a resumed run,
or the same global batch split over any number of processes, reads exactly the same sequences.
Documents arrive source by source, so each source is one contiguous range of each file; a mixture
({source: weight}) draws each row's source by weight, then a window inside that source's range.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from plinth.errors import PlinthError


def split_of(doc_id: str, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little") / 2**64
    return "val" if h < val_fraction else "train"


class ShardWriter:
    """Appends tokenized documents to train.bin / val.bin in `folder`, which the caller fills as a
    temporary folder (plinth.files.atomic_folder), so a half-written data folder is never mistaken
    for a finished one."""

    def __init__(self, folder: Path, vocab_size: int, eos_id: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= 2**16 - 1 else np.uint32
        self.files = {split: open(folder / f"{split}.bin", "wb") for split in ("train", "val")}
        self.tokens = {"train": 0, "val": 0}
        self.bytes = {"train": 0, "val": 0}
        self.per_source: dict[str, dict] = {}
        self.ranges = {"train": {}, "val": {}}  # per split and source: its contiguous token range, and bytes
        self.eos_id, self.vocab_size = eos_id, vocab_size

    def add(self, split: str, source: str, ids: list[int], text_bytes: int):
        array = np.asarray(ids + [self.eos_id], dtype=self.dtype)
        entry = self.ranges[split].setdefault(source, {"start": self.tokens[split], "end": 0, "bytes": 0})
        entry["end"] = self.tokens[split] + len(array)
        entry["bytes"] += text_bytes
        self.files[split].write(array.tobytes())
        self.tokens[split] += len(array)
        self.bytes[split] += text_bytes
        stats = self.per_source.setdefault(source, {"documents": 0, "tokens": 0, "bytes": 0})
        stats["documents"] += 1
        stats["tokens"] += len(ids)
        stats["bytes"] += text_bytes

    def close(self, extra: dict):
        for split, f in self.files.items():
            f.close()
        meta = {"dtype": np.dtype(self.dtype).name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "tokens": self.tokens, "bytes": self.bytes, "sources": self.per_source,
                "train_sources": self.ranges["train"], "val_sources": self.ranges["val"], **extra}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2))


class TokenData:
    def __init__(self, folder, seq_len: int, batch_size: int, seed: int, mixture: dict | None = None):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise PlinthError(f"no prepared data in {folder}; run `plinth data prepare RECIPE` first")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        for split in ("train", "val"):
            if self.meta["tokens"][split] <= seq_len + 1:
                raise PlinthError(f"the {split} split has {self.meta['tokens'][split]} tokens, fewer than "
                                  f"seq_len+1={seq_len + 1}; add data, lower seq_len, or raise val_fraction")
        self.train = np.memmap(folder / "train.bin", dtype=self.meta["dtype"], mode="r")
        self.val = np.memmap(folder / "val.bin", dtype=self.meta["dtype"], mode="r")
        self.mixture = self._mixture(mixture or {})

    def _mixture(self, weights: dict) -> tuple[list[dict], np.ndarray] | None:
        """The weighted sources' train ranges and their probabilities, checked against the data."""
        if not weights:
            return None
        ranges = self.meta.get("train_sources")
        if ranges is None:
            raise PlinthError("this data was prepared before mixtures existed; run `plinth data prepare` again")
        unknown = sorted(set(weights) - set(ranges))
        if unknown:
            raise PlinthError(f"mixture names {', '.join(unknown)}, not in the prepared data; its sources are "
                              f"{', '.join(ranges)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or not sum(weights.values()):
            raise PlinthError(f"mixture weights must be non-negative numbers, not all zero: {weights}")
        for name, w in weights.items():
            if w and ranges[name]["end"] - ranges[name]["start"] <= self.seq_len + 1:
                raise PlinthError(f"source {name} has too few training tokens for seq_len={self.seq_len}")
        names = [n for n, w in weights.items() if w]
        p = np.array([weights[n] for n in names], dtype=np.float64)
        return [ranges[n] for n in names], p / p.sum()

    def starts(self, step: int, micro: int) -> np.ndarray:
        """Offsets in train.bin of one micro-batch's rows, seeded by (seed, step, micro)."""
        rng = np.random.default_rng([self.seed, step, micro])
        if self.mixture is None:  # every training token equally likely: sources weighted by size
            return rng.integers(0, len(self.train) - self.seq_len - 1, size=self.batch_size)
        ranges, p = self.mixture
        picks = rng.choice(len(ranges), size=self.batch_size, p=p)
        return np.array([rng.integers(ranges[i]["start"], ranges[i]["end"] - self.seq_len - 1) for i in picks])

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (batch_size, seq_len) of one micro-batch."""
        rows = np.stack([self.train[s:s + self.seq_len + 1] for s in self.starts(step, micro)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def val_batches(self, count: int, source: str | None = None):
        """The same `count` validation micro-batches every time: consecutive windows from the start
        of the validation tokens (of one source, if given)."""
        val = self.val
        if source is not None:
            entry = self.meta["val_sources"][source]
            val = val[entry["start"]:entry["end"]]
        T, B = self.seq_len, self.batch_size
        windows = (len(val) - 1) // T
        for b in range(min(count, -(-windows // B))):
            rows = [val[w * T:w * T + T + 1] for w in range(b * B, min(windows, b * B + B))]
            rows = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield rows[:, :-1], rows[:, 1:]

    def val_sources(self) -> list[str]:
        """Sources with at least one validation window of their own."""
        return [s for s, e in self.meta.get("val_sources", {}).items() if e["end"] - e["start"] > self.seq_len]

    def val_bytes_per_token(self, source: str | None = None) -> float:
        if source is None:
            return self.meta["bytes"]["val"] / max(1, self.meta["tokens"]["val"])
        entry = self.meta["val_sources"][source]
        return entry["bytes"] / max(1, entry["end"] - entry["start"])
