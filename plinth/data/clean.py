"""Quality filters, exact deduplication (hash of the whitespace-normalised text) and near-duplicate
removal (MinHash-LSH over word 5-grams, with datasketch), with a report of what each step removed.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Iterator

from datasketch import MinHash, MinHashLSH

from plinth.data.sources import CorpusText

NEAR_DUPLICATE = 0.8   # estimated Jaccard similarity of word 5-gram sets that counts as a copy
PERMUTATIONS = 64


def minhash(text: str) -> MinHash:
    words = text.split()
    shingles = {" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))}
    signature = MinHash(num_perm=PERMUTATIONS, seed=1)
    signature.update_batch(list(shingles))
    return signature


def too_repetitive(text: str) -> bool:
    """More than half of the lines are copies of other lines (generated tables, logs)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 10 and len(set(lines)) < len(lines) / 2


def clean(docs: Iterable[CorpusText], min_chars: int, report: Counter) -> Iterator[CorpusText]:
    """Yield the documents that pass; count removed documents and bytes per reason in `report`."""
    seen: set[bytes] = set()
    near = MinHashLSH(threshold=NEAR_DUPLICATE, num_perm=PERMUTATIONS)
    for n, doc in enumerate(docs):
        size = len(doc.text.encode("utf-8", errors="replace"))
        reason = None
        if len(doc.text) < min_chars:
            reason = "too short"
        elif "\x00" in doc.text:
            reason = "not text"
        elif too_repetitive(doc.text):
            reason = "repetitive"
        else:
            digest = hashlib.sha1(" ".join(doc.text.split()).encode()).digest()  # whitespace-insensitive
            if digest in seen:
                reason = "exact duplicate"
            else:
                seen.add(digest)
                signature = minhash(doc.text)
                if near.query(signature):
                    reason = "near duplicate"
                else:
                    near.insert(str(n), signature)
        if reason:
            report[f"{reason}: documents"] += 1
            report[f"{reason}: bytes"] += size
            continue
        report["kept: documents"] += 1
        report["kept: bytes"] += size
        yield doc
