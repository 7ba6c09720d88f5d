"""Decoding one sequence one token a step through a compiled step: `generate_stream(...,
compile=True)`, `plinth generate --compile`.

An eager decoding step of a small model is hundreds of small operations (norms, casts, rotations,
residual adds, the attention of each layer), each a separate call into PyTorch, and on a CPU they
cost as much as the weight-reading matrix products. torch.compile (inductor) turns the step into
one C++ program (`cpp_wrapper`): the small operations are fused into a few loops, and with
`max_autotune` and the weights frozen in as constants, inductor also generates its own int4 and int8
matrix-vector kernels for the model's shapes where they beat PyTorch's (benchmarks/decode.py
measures the step; docs/speed.md).

The step reads and writes the same `KVCache` as the eager passes (the prompt is prefilled eagerly),
through `StepView`, a cache view with `CacheView`'s decoding interface whose shapes inductor can
trace: the position is a tensor and the keys' length a dynamic size, so one compiled program serves
every position. Its arithmetic is not the eager step's (fused loops sum in another order), so a
sequence decoded compiled is not bit for bit the one decoded eagerly, and prompt-lookup speculation
(whose verify passes are eager and must give plain decoding's bits) is off while compiled.

Compiling takes a minute or two the first time for a model; inductor keeps what it built (and the
kernels it chose) in its cache folder, so a later process starts in seconds. The weights are
frozen into the program: a model whose weights change afterwards needs a new CompiledDecoder.
"""
from __future__ import annotations

import math
import types

import torch

from plinth.errors import PlinthError
from plinth.kv_cache import KEY_BLOCK, KVCache, ring_positions, whole_key_blocks
from plinth.model import attention_mask

OPTIONS = {"max_autotune": True, "cpp_wrapper": True, "freezing": True}


class StepView:
    """One compiled step's view of a one-row KVCache: `CacheView`'s decoding interface (write,
    decode_keys, spread, gather, decode_bias), with the new token's position a (1,) tensor and
    `length` the keys read by layers that keep every position (whole KEY_BLOCKs, a dynamic size).
    A ring layer (a sliding window's) reads its whole ring, each index masked by the position it
    holds, as the eager view does once the ring has filled."""

    def __init__(self, keys: list, values: list, position: torch.Tensor, length: int, windows: list, rings: list):
        self.keys, self.values, self.position, self.length = keys, values, position, length
        self.windows, self.rings = windows, rings
        self.dtype = keys[0].dtype
        self._biases = {}

    def write(self, layer: int, k, v):
        ring = self.rings[layer]
        index = self.position if ring is None else self.position % ring
        self.keys[layer].index_copy_(2, index, k.to(self.dtype))
        self.values[layer].index_copy_(2, index, v.to(self.dtype))

    def decode_keys(self, layer: int, B: int, T: int = 1):
        # The one row's (K, L, D) by narrowing, always a view: a slice or a flatten that copies or not
        # depending on whether L is the cache's whole length would compile a program for each case.
        length = self.length if self.rings[layer] is None else self.rings[layer]
        return tuple(t[layer][0].narrow(1, 0, length) for t in (self.keys, self.values))

    def spread(self, x):
        return x

    def gather(self, x):
        return x

    def decode_bias(self, layer: int, heads: int, t: int = 0) -> torch.Tensor:
        window, ring = self.windows[layer], self.rings[layer]
        if (window, ring) not in self._biases:
            query = self.position[:, None]  # (1, 1)
            if ring is None:
                keys = torch.arange(self.length, device=query.device)[None]
            else:
                keys = ring_positions(query, ring, ring)
            allowed = attention_mask(query, keys, True, window)[0, 0]  # (1, L)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            self._biases[window, ring] = bias.expand(heads, -1)[:, None]  # (heads, 1, L)
        return self._biases[window, ring]


class CompiledDecoder:
    """Next-token logits for one sequence, one token a call, from a compiled step over `cache` (made
    by `new_cache`, already holding the positions before)."""

    def __init__(self, model):
        self.model = model
        # Guards on the model's modules would be checked before every step, and its weights are frozen
        # into the program anyway: they are dropped. Then nothing would tell two decoders' models
        # apart, and dynamo keeps compiled programs per code object: each decoder compiles a copy
        # of the step function with a code object of its own.
        step = self._eager_step.__func__
        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__)
        self._step = torch.compile(types.MethodType(own, self), fullgraph=True,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def new_cache(self, length: int) -> KVCache:
        """A KVCache for a sequence of `length` positions, one KEY_BLOCK longer than it: the keys a
        step reads are then never the cache's whole length, which would make them a contiguous
        tensor, and the program would be compiled a second time for that case."""
        return KVCache.for_model(self.model, 1, length + KEY_BLOCK, slack=0)

    @staticmethod
    def positions_needed(cache: KVCache, position: int) -> int:
        """The positions a cache that grows (`KVCache.reserve`) must hold for a step at `position`:
        the keys it reads, and every ring whole (a step reads its whole ring)."""
        return max(whole_key_blocks(position + 1), cache.ring or 0)

    def __call__(self, token: int, position: int, cache: KVCache, row: int = 0) -> torch.Tensor:
        """Logits (V,) after `token` at `position`, in row `row` of `cache` (a serving engine's
        grows: see `positions_needed`)."""
        device = cache.device
        length = torch.empty(whole_key_blocks(position + 1), device=device)  # its size is the keys' length
        keys, values = ([t[row:row + 1] for t in tensors] for tensors in (cache.k, cache.v))
        # Sizes that change from step to step or cache to cache stay symbols in the one program.
        torch._dynamo.mark_dynamic(length, 0)
        for tensor, ring in zip(keys + values, cache.rings * 2):
            if ring is None:
                torch._dynamo.mark_dynamic(tensor, 2)
        # Set around the call (which compiles when it must) rather than as torch.compile's options:
        # there, freezing does not reach inductor's lowering, and without frozen weights it has no
        # kernels of its own to choose for the int4 and int8 products.
        try:
            with torch._inductor.config.patch(OPTIONS):
                return self._step(torch.tensor([[token]], device=device), torch.tensor([position], device=device),
                                  length, keys, values, cache.windows, cache.rings)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise PlinthError(f"compiling the decoding step failed: {str(e).splitlines()[0]}. Inductor compiles C++ "
                              "with the machine's compiler (g++; apt-get install g++); or decode without --compile"
                              ) from e

    def _eager_step(self, token, position, length, keys, values, windows, rings):
        model = self.model
        view = StepView(keys, values, position, length.shape[0], windows, rings)
        x = model.scaled_input(model.tok_embeddings(token))  # (1, 1, C)
        h = model.blocks(x, model.ropes_at(position[None]), None, view)
        return model.project(h[:, 0])[0]  # one row in, one out: inductor's output-layer kernel takes 2-D rows
