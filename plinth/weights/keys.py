"""Tensor-name tables: foreign checkpoint names ↔ plinth names, with `{}` standing for the layer number.

One table per format, one `map_key()` for all of them: an unknown name is an error that names it,
and the reverse direction is the same table inverted.
"""
from __future__ import annotations

import re

from plinth.errors import PlinthError

_LAYER = re.compile(r"\.(\d+)\.")


def map_key(name: str, table: dict[str, str]) -> str:
    """Translate `name` through `table` (e.g. 'blk.3.attn_q.weight' → 'layers.3.attn.wq.weight')."""
    layer = _LAYER.search(name)
    pattern = _LAYER.sub(".{}.", name, count=1) if layer else name
    if pattern not in table:
        raise PlinthError(f"unknown tensor {name!r}: plinth has no mapping for it; this model may use an "
                          "architecture feature plinth does not support yet")
    return table[pattern].format(layer.group(1)) if layer else table[pattern]


def invert(table: dict[str, str]) -> dict[str, str]:
    return {ours: theirs for theirs, ours in table.items()}
