"""Quality filters and exact deduplication, with a report of what each step removed.

Near-duplicate removal (MinHash-LSH with datasketch) is the next step for this module.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable, Iterator

from plinth.data.sources import Document


def too_repetitive(text: str) -> bool:
    """More than half of the lines are copies of other lines (generated tables, logs)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 10 and len(set(lines)) < len(lines) / 2


def clean(docs: Iterable[Document], min_chars: int, report: Counter) -> Iterator[Document]:
    """Yield the documents that pass; count removed documents and bytes per reason in `report`."""
    seen: set[bytes] = set()
    for doc in docs:
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
            seen.add(digest)
        if reason:
            report[f"{reason}: documents"] += 1
            report[f"{reason}: bytes"] += size
            continue
        report["kept: documents"] += 1
        report["kept: bytes"] += size
        yield doc
