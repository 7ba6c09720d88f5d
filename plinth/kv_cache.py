"""The KV cache: keys and values of past tokens for up to `slots` sequences, and the view of it that
one forward pass gets.

Whoever decodes (the engine, `generate_stream`, the log-likelihood scorer, prompting) owns a
`KVCache` and hands the model a `CacheView` per forward pass: where each of the pass's B rows starts
and, for the engine, which cache row (slot) each one uses. The model sees only the view's small
interface — `start`, `dtype`, `update`, and for passes of a few tokens `write`, `decode_keys`,
`spread`, `gather`, `decode_bias` — and knows nothing of slots or rings.

    cache = KVCache.for_model(model, slots=16, max_len=2048)
    logits = model(prompt, cache=cache.view())                                   # rows 0..B-1 from position 0
    logits = model(next_tokens, cache=cache.view(start=torch.tensor([12, 40]), slots=torch.tensor([3, 7])))

Sliding-window layers (Gemma 3: 15 of 18, in a 512-token window) may keep a ring of their last
positions instead of all of them (`slack`), so that a long context costs memory only in the layers
that attend globally.
"""
from __future__ import annotations

import math

import torch

from plinth.config import ModelConfig
from plinth.model import DECODE_TOKENS, attention_mask

KEY_BLOCK = 64  # decoding reads each row's keys in whole blocks of this many positions (see `CacheView`)


def whole_key_blocks(positions: int) -> int:
    """`positions` rounded up to a whole number of KEY_BLOCKs."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


def ring_positions(last: torch.Tensor, length: int, ring: int) -> torch.Tensor:
    """(N, length): the position that each of a ring's first `length` indices holds once a row has
    written every position up to last (N, 1): index i holds the latest p ≤ last with p % ring == i
    (negative: nothing written there yet)."""
    return last - (last - torch.arange(length, device=last.device)) % ring


class KVCache:
    """k, v: one (rows, K, positions, D) tensor per layer. A forward pass writes its new tokens'
    keys at their positions and attends over its rows' keys up to its own.

    A layer holds position p at index p, up to `positions`, unless it keeps a ring. With `slack`
    (a number), each sliding-window layer of a causal model keeps only a row's last `ring`
    positions, p at index p % ring (positions 0..ring-1 as any layer until the row passes them):
    ring = window + DECODE_TOKENS + slack, in whole KEY_BLOCKs. A pass still finds every key its
    window needs as long as its row was written no more than DECODE_TOKENS + slack positions past
    the pass's start (`resumable`): a decoding pass's own tokens, and guesses a verify pass
    rejected, always are. A caller whose passes go further back (scoring several continuations of
    one context, each written over the last) keeps every position: `slack` None, the default.

    A cache made with `grow=True` (the serving engine's) starts empty and holds only what is used:
    `reserve` adds rows and positions before a pass needs them (rows doubling, positions by at
    least a quarter, so a growing cache is copied now and then, not at every request or block), and
    `fit` gives memory back when what is held needs half of it or less. Otherwise it holds
    `slots` × `max_len` from the start."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype=torch.float32, device="cpu",
                 grow: bool = False, slack: int | None = None):
        self.layers, self.heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.slots, self.max_len, self.dtype, self.device = slots, max_len, dtype, device
        self.window = config.sliding_window
        self.windows = [self.window if config.is_sliding(layer) else None for layer in range(self.layers)]
        ring = None if slack is None or not config.causal or self.window is None else \
            whole_key_blocks(self.window + DECODE_TOKENS + slack)
        self.ring = ring if ring is not None and ring < whole_key_blocks(max_len) else None  # else it would hold all
        self.rings = [self.ring if window else None for window in self.windows]
        self.k, self.v = [None] * self.layers, [None] * self.layers
        self.positions = 0
        self._resize(0, 0) if grow else self._resize(slots, whole_key_blocks(max_len))

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, grow: bool = False,
                  slack: int | None = None) -> "KVCache":
        """A cache shaped for `model`. On CPU it, and so attention over it, is float32 even for
        bfloat16 or int4 weights: without AMX, float32 attention is faster than bfloat16, and its
        batched kernels give a row the same bits in any batch."""
        weight = model.tok_embeddings.weight
        dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        return cls(model.config, slots, max_len or model.config.max_seq_len, dtype, weight.device, grow, slack)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * sum(k.numel() for k in self.k) * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """What a row's next position costs while its rings fill: every layer holds it."""
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.itemsize

    def bytes_per_row(self, positions: int) -> int:
        """What one row of `positions` positions holds: every layer, a ring at most its length."""
        held = sum(positions if ring is None else min(positions, ring) for ring in self.rings)
        return 2 * held * self.heads * self.head_dim * self.dtype.itemsize

    def resumable(self, start: int, written: int) -> bool:
        """Whether a row whose passes wrote positions up to written-1 still holds every key a pass
        from position `start` attends to: a ring writes over the oldest key of the window before
        `start` once the row is written `ring` positions past it."""
        return self.ring is None or written <= max(0, start - self.window + 1) + self.ring

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
        # A ring keeps its first indices: a row held in fewer positions than the ring never passed them.
        self.positions = positions
        for tensors in (self.k, self.v):
            for layer, old in enumerate(tensors):
                ring = self.rings[layer]
                tensors[layer] = self._resized(old, rows, positions if ring is None else min(positions, ring))

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
        shared prefix, see plinth/engine.py). A ring holds the window before them at those indices
        too (or is shorter than them) while `resumable` says it holds it at all."""
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
        self._pass = None    # the pass's rows and positions, and where they are stored, worked out once
        self._decode = None  # the span of rows passes of a few tokens compute over, worked out once per pass

    # ---- every pass --------------------------------------------------------------------------
    def update(self, layer: int, k, v):
        """Store the new tokens' keys and values k, v (B, K, T, D); return what the pass's queries
        attend over: keys and values (B, K, L, D), and the keys' positions: None for 0..L-1, or
        (B, L) for a ring's (the window's keys before each row's first new token, then the new ones;
        negative: none)."""
        ring, B, T = self.cache.rings[layer], k.shape[0], k.shape[2]
        where = self._where(B, T)
        if ring is None:
            self.write(layer, k, v)
            rows, key_len = slice(0, B) if self.slots is None else self.slots, where["key_len"]  # a slice: views, no copies
            return self.cache.k[layer][rows, :, :key_len], self.cache.v[layer][rows, :, :key_len], None
        before = self._before(B, T)
        rows, slots = where["rows"][:, None], before.clamp(min=0) % ring
        old_k, old_v = (t[rows, :, slots].transpose(1, 2) for t in (self.cache.k[layer], self.cache.v[layer]))
        self.write(layer, k, v)  # after reading: a pass longer than ring - window writes over the window's keys
        k, v = k.to(self.dtype), v.to(self.dtype)
        return torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), torch.cat([before, where["positions"]], 1)

    def write(self, layer: int, k, v):
        """Store the new tokens' keys and values k, v (B, K, T, D) at their rows and positions (in a
        ring, only the last `ring` tokens of a longer pass)."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        k, v = k.to(keys.dtype), v.to(values.dtype)
        B, T = k.shape[0], k.shape[2]
        ring = self.cache.rings[layer]
        if ring is None and self.slots is None and isinstance(self.start, int):  # rows 0..B-1 at one offset: slicing
            keys[:B, :, self.start:self.start + T] = k
            values[:B, :, self.start:self.start + T] = v
            return
        where = self._where(B, T)
        if ring not in where["index"]:
            positions = where["positions"] if ring is None else where["positions"][:, -ring:] % ring
            where["index"][ring] = where["rows"][:, None], positions
        rows, slots = where["index"][ring]
        kept = slots.shape[1]
        keys[rows, :, slots] = k[:, :, -kept:].transpose(1, 2)  # the indexed view is (B, T, K, D)
        values[rows, :, slots] = v[:, :, -kept:].transpose(1, 2)

    def _where(self, B: int, T: int) -> dict:
        """The pass's cache rows (B,), first positions (B,), new tokens' positions (B, T) and keys'
        end, and per kind of layer, where its new tokens go."""
        if self._pass is None:
            device = self.cache.device
            rows = torch.arange(B, device=device) if self.slots is None else self.slots
            starts = torch.as_tensor(self.start, device=device).reshape(-1).expand(B)
            last = self.start if isinstance(self.start, int) else int(starts.max())
            self._pass = {"rows": rows, "starts": starts, "positions": starts[:, None] + torch.arange(T, device=device),
                          "key_len": last + T, "index": {}}
        return self._pass

    def _before(self, B: int, T: int) -> torch.Tensor:
        """(B, n) the positions of the window's keys before each row's first new token: window - 1 of
        them, negative where the row starts closer to 0 (no key), or for one start, those there are."""
        where, window = self._where(B, T), self.cache.window
        if "before" not in where:
            if isinstance(self.start, int):
                before = torch.arange(max(0, self.start - window + 1), self.start, device=self.cache.device).expand(B, -1)
            else:
                before = where["starts"][:, None] - window + 1 + torch.arange(window - 1, device=self.cache.device)
            where["before"] = before
        return where["before"]

    # ---- a few new tokens per row: decoding, or checking speculative guesses -------------------
    # Decoding attends to keys read in place: every row reads a whole number of KEY_BLOCKs of keys,
    # the positions it may not see masked out, so the matmul and softmax kernels sum each row's
    # scores in the same blocks whether the row runs alone or in a batch, and batching never
    # changes a sequence's output (padding to the batch's exact longest row, or calling SDPA,
    # changes low bits with the batch). A ring is read whole once its rows have filled it (its
    # length is whole KEY_BLOCKs too), each index masked by the position it holds. A pass of T > 1
    # new tokens per row (speculative decoding checking its guesses) attends for each of its tokens
    # in turn exactly so, and gives each the bits decoding it alone gives. Rows whose slots have
    # gaps between them are computed as the whole span of slots; `spread` and `gather` move the
    # pass's rows in and out of it.
    def decode_keys(self, layer: int, B: int, T: int = 1):
        """Keys and values of the span's S rows, each of the K key heads its own batch: two
        (S·K, L, D) views, no copies; L is the longest row's keys rounded up to whole KEY_BLOCKs
        (at most a ring's length)."""
        span = self._span(B, T)
        (lo, hi), length = span["span"], self._length(layer)
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

    def decode_bias(self, layer: int, heads: int, t: int = 0) -> torch.Tensor:
        """(S·heads, 1, L): 0 where a row's new token t may attend in `layer` (its own keys so far,
        within the layer's window), -inf elsewhere; added to the attention scores."""
        span, window, ring = self._decode, self.cache.windows[layer], self.cache.rings[layer]
        if (window, ring, t) not in span["biases"]:
            length, query = self._length(layer), span["ends"][:, None] - 1 + t  # (S, 1)
            keys = length  # positions 0..length-1; in a ring, index i holds the last position written there
            if ring is not None:
                keys = ring_positions(span["ends"][:, None] - 2 + span["T"], length, ring)  # (S, L)
            allowed = attention_mask(query, keys, True, window)  # (S, 1, 1, L)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            span["biases"][window, ring, t] = bias.repeat_interleave(heads, dim=0).view(-1, 1, length)
        return span["biases"][window, ring, t]

    def _length(self, layer: int) -> int:
        ring = self.cache.rings[layer]
        return self._decode["length"] if ring is None else min(self._decode["length"], ring)

    def _span(self, B: int, T: int = 1) -> dict:
        if self._decode is None:
            device = self.cache.device
            where = self._where(B, T)
            rows = where["rows"]
            lo, hi = int(rows.min()), int(rows.max()) + 1  # cache rows lo..hi-1 hold every row of the pass
            gaps = not torch.equal(rows, torch.arange(lo, hi, device=device))
            ends = torch.ones(hi - lo, dtype=torch.long, device=device)  # rows of the span outside the pass see key 0
            ends[rows - lo] = where["starts"] + 1
            self._decode = {"span": (lo, hi), "rows": rows - lo if gaps else None, "ends": ends, "biases": {},
                            "T": T, "length": whole_key_blocks(where["key_len"])}
        return self._decode
