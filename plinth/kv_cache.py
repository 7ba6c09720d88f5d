"""The KV cache: keys and values of past tokens for up to `slots` sequences, and the view of it that
one forward pass gets.

Whoever decodes (the engine, `generate_stream`, the log-likelihood scorer, prompting) owns a
`KVCache` and hands the model a `CacheView` per forward pass: where each of the pass's B rows starts
and, for the engine, which cache row (slot) each one uses. The model sees only the view's small
interface — `start`, `dtype`, `write`, `read`, and for one-token passes `decode_keys`, `spread`,
`gather`, `decode_bias` — and knows nothing of slots.

    cache = KVCache.for_model(model, slots=16, max_len=2048)
    logits = model(prompt, cache=cache.view())                                   # rows 0..B-1 from position 0
    logits = model(next_tokens, cache=cache.view(start=torch.tensor([12, 40]), slots=torch.tensor([3, 7])))
"""
from __future__ import annotations

import math

import torch

from plinth.config import ModelConfig
from plinth.model import attention_mask

KEY_BLOCK = 64  # decoding reads each row's keys in whole blocks of this many positions (see `CacheView`)


def whole_key_blocks(positions: int) -> int:
    """`positions` rounded up to a whole number of KEY_BLOCKs."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


class KVCache:
    """k, v: one (rows, K, positions, D) tensor per layer. A forward pass writes its new tokens'
    keys at their absolute positions and attends over positions 0..start+T-1 of its rows.

    A cache made with `grow=True` (the serving engine's) starts empty and holds only what is used:
    `reserve` adds rows and positions before a pass needs them (rows doubling, positions by at
    least a quarter, so a growing cache is copied now and then, not at every request or block), and
    `fit` gives memory back when what is held needs half of it or less. Otherwise it holds
    `slots` × `max_len` from the start."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype=torch.float32, device="cpu",
                 grow: bool = False):
        self.layers, self.heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.slots, self.max_len, self.dtype, self.device = slots, max_len, dtype, device
        self.k, self.v = [None] * self.layers, [None] * self.layers
        self._resize(0, 0) if grow else self._resize(slots, whole_key_blocks(max_len))

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, grow: bool = False) -> "KVCache":
        """A cache shaped for `model`. On CPU it, and so attention over it, is float32 even for
        bfloat16 or int4 weights: without AMX, float32 attention is faster than bfloat16, and its
        batched kernels give a row the same bits in any batch."""
        weight = model.tok_embeddings.weight
        dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        return cls(model.config, slots, max_len or model.config.max_seq_len, dtype, weight.device, grow)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def positions(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * sum(k.numel() for k in self.k) * self.k[0].element_size()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.k[0].element_size()

    def reserve(self, rows: int, positions: int):
        """Hold at least rows 0..rows-1 and positions 0..positions-1 (never more than the cache's
        slots × max_len)."""
        if rows > self.slots or positions > self.max_len:
            raise ValueError(f"{rows} rows × {positions} positions exceed the cache's {self.slots} × {self.max_len}")
        if rows > self.rows or positions > self.positions:
            grown = whole_key_blocks(max(positions, self.positions * 5 // 4)) if positions > self.positions else self.positions
            more = min(max(rows, 2 * self.rows), self.slots) if rows > self.rows else self.rows
            self._resize(more, min(grown, whole_key_blocks(self.max_len)))

    def fit(self, rows: int, positions: int):
        """Give memory back when rows 0..rows-1 and positions 0..positions-1 are all that must be
        kept and they need at most half of what is held."""
        positions = whole_key_blocks(positions)
        if rows * positions <= self.rows * self.positions // 2:
            self._resize(rows, positions)

    def _resize(self, rows: int, positions: int):
        # Tensor by tensor, so that growing holds one layer's old keys beside the new ones, not all.
        for tensors in (self.k, self.v):
            for layer, old in enumerate(tensors):
                tensors[layer] = self._resized(old, rows, positions)

    def _resized(self, old: torch.Tensor | None, rows: int, positions: int) -> torch.Tensor:
        new = torch.zeros(rows, self.heads, positions, self.head_dim, dtype=self.dtype, device=self.device)
        if old is not None:
            r, p = min(rows, old.shape[0]), min(positions, old.shape[2])
            new[:r, :, :p] = old[:r, :, :p]
        return new

    def take_rows(self, rows: torch.Tensor):
        """Row i becomes what row rows[i] held (e.g. to give each of several requests a copy of one context)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]

    def copy_row(self, source: int, target: int, positions: int):
        """Row `target` gets the keys and values of row `source`'s first `positions` positions (a
        shared prefix, see plinth/engine.py)."""
        for tensors in (self.k, self.v):
            for layer in tensors:
                layer[target, :, :positions] = layer[source, :, :positions]

    def view(self, start: int | torch.Tensor = 0, slots: torch.Tensor | None = None) -> "CacheView":
        """What one forward pass reads and writes. start: the absolute position of each row's first
        new token (an int for all rows, or (B,)); slots: (B,) cache rows (default rows 0..B-1)."""
        return CacheView(self, start, slots)


class CacheView:
    """One forward pass's rows of a KVCache. Built per pass; the model calls it layer by layer."""

    def __init__(self, cache: KVCache, start: int | torch.Tensor, slots: torch.Tensor | None):
        self.cache, self.start, self.slots = cache, start, slots
        self.dtype = cache.dtype
        self._index = None   # (rows (B, 1), positions (B, T)) for scattered writes, worked out once per pass
        self._decode = None  # the span of rows one-token passes compute over, worked out once per pass

    # ---- every pass --------------------------------------------------------------------------
    def write(self, layer: int, k, v):
        """Store the new tokens' keys and values k, v (B, K, T, D) at their rows and positions."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        k, v = k.to(keys.dtype), v.to(values.dtype)
        B, T = k.shape[0], k.shape[2]
        if self.slots is None and isinstance(self.start, int):  # rows 0..B-1 at one offset: slicing
            keys[:B, :, self.start:self.start + T] = k
            values[:B, :, self.start:self.start + T] = v
            return
        if self._index is None:
            starts = torch.as_tensor(self.start, device=keys.device).reshape(-1).expand(B)
            self._index = self._rows(B)[:, None], starts[:, None] + torch.arange(T, device=keys.device)
        rows, positions = self._index
        keys[rows, :, positions] = k.transpose(1, 2)  # the indexed view is (B, T, K, D)
        values[rows, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, B: int, key_len: int):
        """All keys and values of the pass's B rows, positions 0..key_len-1: (B, K, L, D)."""
        if self.slots is None:  # rows 0..B-1: views, no copies
            return self.cache.k[layer][:B, :, :key_len], self.cache.v[layer][:B, :, :key_len]
        return self.cache.k[layer][self.slots, :, :key_len], self.cache.v[layer][self.slots, :, :key_len]

    def _rows(self, B: int) -> torch.Tensor:
        return torch.arange(B, device=self.cache.device) if self.slots is None else self.slots

    # ---- a few new tokens per row: decoding, or checking speculative guesses -------------------
    # Decoding attends to keys read in place: every row reads a whole number of KEY_BLOCKs of keys,
    # the positions it may not see masked out, so the matmul and softmax kernels sum each row's
    # scores in the same blocks whether the row runs alone or in a batch, and batching never
    # changes a sequence's output (padding to the batch's exact longest row, or calling SDPA,
    # changes low bits with the batch). A pass of T > 1 new tokens per row (speculative decoding
    # checking its guesses) attends for each of its tokens in turn exactly so, and gives each the
    # bits decoding it alone gives. Rows whose slots have gaps between them are computed as
    # the whole span of slots; `spread` and `gather` move the pass's rows in and out of it.
    def decode_keys(self, layer: int, B: int, T: int = 1):
        """Keys and values of the span's S rows, each of the K key heads its own batch: two
        (S·K, L, D) views, no copies; L is the longest row's keys rounded up to whole KEY_BLOCKs."""
        span = self._span(B, T)
        (lo, hi), length = span["span"], span["length"]
        keys = self.cache.k[layer][lo:hi, :, :length].flatten(0, 1)
        values = self.cache.v[layer][lo:hi, :, :length].flatten(0, 1)
        return keys, values

    def spread(self, x):
        """(B, ...) rows of the pass → (S, ...) rows of the span, zeros where the span has no row."""
        span = self._span(x.shape[0])
        if span["rows"] is None:
            return x
        return x.new_zeros(span["span"][1] - span["span"][0], *x.shape[1:]).index_copy_(0, span["rows"], x)

    def gather(self, x):
        """(S, ...) rows of the span → the pass's (B, ...) rows."""
        rows = self._decode["rows"]
        return x if rows is None else x.index_select(0, rows)

    def decode_bias(self, window: int | None, heads: int, t: int = 0) -> torch.Tensor:
        """(S·heads, 1, L): 0 where a row's new token t may attend (its own keys so far,
        within `window`), -inf elsewhere; added to the attention scores."""
        span = self._decode
        if (window, t) not in span["biases"]:
            allowed = attention_mask(span["ends"][:, None] - 1 + t, span["length"], True, window)  # (S, 1, 1, L)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            span["biases"][window, t] = bias.repeat_interleave(heads, dim=0).view(-1, 1, span["length"])
        return span["biases"][window, t]

    def _span(self, B: int, T: int = 1) -> dict:
        if self._decode is None:
            device = self.cache.device
            rows = self._rows(B)
            starts = torch.as_tensor(self.start, device=device).reshape(-1).expand(B)
            lo, hi = int(rows.min()), int(rows.max()) + 1  # cache rows lo..hi-1 hold every row of the pass
            gaps = not torch.equal(rows, torch.arange(lo, hi, device=device))
            ends = torch.ones(hi - lo, dtype=torch.long, device=device)  # rows of the span outside the pass see key 0
            ends[rows - lo] = starts + 1
            self._decode = {"span": (lo, hi), "rows": rows - lo if gaps else None, "ends": ends, "biases": {},
                            "length": whole_key_blocks(int(starts.max()) + T)}
        return self._decode
