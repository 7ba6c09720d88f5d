"""Log-likelihood of continuations: the batched scorer behind `plinth eval` and the server's `echo`.

A request is (context ids, continuation ids); the answer is the log-probability of each
continuation token given everything before it. Where the time is saved:
- many requests share one forward pass: sorted by length, right-padded into batches of about
  `batch_tokens` tokens (right padding never changes a causal model's earlier positions);
- requests with the same context (the choices of one question) compute it once, into the KV
  cache, and then only their own continuation tokens;
- the output layer, the largest matrix of a small model, runs only at the scored positions;
- float32 products run on oneDNN's kernels where they stay float32 (plinth/onednn.py).

    scored = score(model, [(tok.encode("The sky is"), tok.encode(" blue"))])
    sum(scored[0].logprobs), scored[0].greedy
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from plinth.errors import PlinthError
from plinth.kv_cache import KVCache
from plinth.onednn import float32_on_onednn

# Padded tokens per forward pass. Bigger batches are slower per token on a CPU once a layer's
# activations outgrow the CPU's caches (benchmarks/eval.py --batch-tokens compares sizes).
BATCH_TOKENS = 1024
TAIL_TOKENS = 1024  # padded continuation tokens per forward pass when continuations follow a shared context
PROJECT_ROWS = 512  # positions projected to the vocabulary at once: bounds the (rows, V) logits in memory


@dataclass
class Scored:
    logprobs: list[float]                          # log p(token | everything before it), per continuation token
    greedy: bool                                   # every continuation token was the most likely next token
    top: list[list[tuple[int, float]]] | None = None  # with top=k: the k most likely (token, logprob) per position


def _window(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], int]:
    """The model's input (at most max_len tokens, the context cut from the left if need be) and the
    number of continuation tokens it predicts at its end."""
    if not continuation:
        raise PlinthError("a log-likelihood request has an empty continuation; give at least one token to score")
    full = (list(context) + list(continuation))[-(max_len + 1):]
    if len(full) <= len(continuation):
        raise PlinthError(f"a continuation of {len(continuation)} tokens needs at least one context token before it "
                          f"within the context window ({max_len} tokens); shorten it or add context")
    return full[:-1], len(continuation)


def _batches(units: list, size: Callable[[list], int], budget: int,
             length: Callable[[object], int] | None = None) -> list[list]:
    """Consecutive units (sorted largest first by the caller) grouped so that `size(group)`, the
    padded tokens a group costs, stays within `budget` (a single unit may exceed it alone); with
    `length`, a unit less than half as long as its group's first starts a new group (less padding)."""
    groups, group = [], []
    for unit in units:
        if group and (size(group + [unit]) > budget or length and 2 * length(unit) < length(group[0])):
            groups.append(group)
            group = []
        group.append(unit)
    return groups + [group] if group else groups


def _plain_hidden(model, windows, group: list[int]):
    """One right-padded row per request: (N, C) hidden states at its scored positions."""
    tokens = torch.zeros(len(group), len(windows[group[0]][0]), dtype=torch.long)
    rows, cols = [], []
    for row, i in enumerate(group):
        ids, n = windows[i]
        tokens[row, :len(ids)] = torch.tensor(ids)
        rows += [row] * n
        cols += range(len(ids) - n, len(ids))  # the position before each continuation token predicts it
    return model.features(tokens)[torch.tensor(rows), torch.tensor(cols)]


def _shared_hidden(model, windows, batch: list[tuple[list[int], list[int]]]):
    """Requests that share a context (the choices of one question) run it once: the contexts are
    prefilled into one KV-cache slot each, copied to a slot per request, and only each request's
    own continuation tokens run after it. Returns (request order, (N, C) hidden states)."""
    order = [i for _, members in batch for i in members]
    suffix = {i: windows[i][0][len(context):] for context, members in batch for i in members}  # continuation[:-1]
    width, tail = max(len(c) for c, _ in batch), max(len(t) for t in suffix.values())
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    slot_of_context = []  # the slot of each request's context after prefill: its group's row
    for g, (context, members) in enumerate(batch):
        tokens[g, :len(context)] = torch.tensor(context)
        slot_of_context += [g] * len(members)
    tail_h = {}  # slot → hidden states of that request's continuation tokens (but the last)
    if not tail:  # one-token continuations: the context's last position predicts them all
        context_h = model.features(tokens)  # (G, width, C)
    else:
        cache = KVCache.for_model(model, len(order), width + tail)
        context_h = model.features(tokens, cache=cache.view())  # contexts into slots 0..G-1 (plain slicing)
        cache.take_rows(slot_of_context)  # slot s: request order[s]
        # Continuations run longest first in chunks of similar length, so little of the work is padding.
        running = sorted((s for s, i in enumerate(order) if suffix[i]), key=lambda s: -len(suffix[order[s]]))
        for chunk in _batches(running, lambda c: len(c) * len(suffix[order[c[0]]]), TAIL_TOKENS,
                              length=lambda s: len(suffix[order[s]])):
            tail_tokens = torch.zeros(len(chunk), len(suffix[order[chunk[0]]]), dtype=torch.long)
            for row, s in enumerate(chunk):
                tail_tokens[row, :len(suffix[order[s]])] = torch.tensor(suffix[order[s]])
            starts = torch.tensor([len(windows[order[s]][0]) - len(suffix[order[s]]) for s in chunk])
            h = model.features(tail_tokens, cache=cache.view(starts, torch.tensor(chunk)))
            tail_h.update((s, h[row, :len(suffix[order[s]])]) for row, s in enumerate(chunk))
    rows = []
    for slot, i in enumerate(order):
        context_len = len(windows[i][0]) - len(suffix[i])
        rows.append(context_h[slot_of_context[slot], context_len - 1][None])  # predicts the first token
        if suffix[i]:
            rows.append(tail_h[slot])
    return order, torch.cat(rows)


@torch.inference_mode()
@float32_on_onednn()  # padded batches are large float32 products (see plinth/onednn.py)
def score(model, requests: list[tuple[list[int], list[int]]], top: int = 0, batch_tokens: int = BATCH_TOKENS,
          progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Score every (context, continuation) request; results come back in the requests' order.
    `progress(n)` is called after each batch with the number of requests it finished."""
    windows = [_window(c, t, model.config.max_seq_len) for c, t in requests]
    by_context: dict[tuple, list[int]] = {}
    for i, (ids, n) in enumerate(windows):
        by_context.setdefault(tuple(ids[:len(ids) - n + 1]), []).append(i)
    shared = sorted(((list(c), m) for c, m in by_context.items() if len(m) > 1), key=lambda g: -len(g[0]))
    alone = sorted((m[0] for m in by_context.values() if len(m) == 1), key=lambda i: -len(windows[i][0]))

    def shared_size(batch):  # padded context tokens, or the KV-cache positions when continuations run after them
        tail = max(len(windows[i][0]) - len(c) for c, m in batch for i in m)
        if len(batch[0][0]) + tail > model.config.max_seq_len:  # padded positions would pass the context window
            return math.inf
        return len(batch[0][0]) * len(batch) if not tail else sum(len(m) for _, m in batch) * (len(batch[0][0]) + tail)

    work = [(group, None) for group in _batches(alone, lambda g: len(g) * len(windows[g[0]][0]), batch_tokens,
                                                length=lambda i: len(windows[i][0]))]
    work += [(None, batch) for batch in _batches(shared, shared_size, batch_tokens, length=lambda g: len(g[0]))]
    results: list[Scored | None] = [None] * len(requests)
    for group, batch in work:
        order, hidden = (group, _plain_hidden(model, windows, group)) if batch is None \
            else _shared_hidden(model, windows, batch)
        picked, best, tops = _token_logprobs(model, hidden, torch.tensor([t for i in order for t in requests[i][1]]), top)
        start = 0
        for i in order:
            n = windows[i][1]
            results[i] = Scored(picked[start:start + n].tolist(), bool(best[start:start + n].all()),
                                tops[start:start + n] if top else None)
            start += n
        if progress:
            progress(len(order))
    return results


def _token_logprobs(model, hidden, targets, top: int):
    """Log-probability of each target (N,), whether it was the argmax (N,), and the top-k lists."""
    picked, best, tops = [], [], []
    for begin in range(0, len(targets), PROJECT_ROWS):
        logprobs = torch.log_softmax(model.project(hidden[begin:begin + PROJECT_ROWS]).float(), dim=-1)  # (n, V)
        chunk = targets[begin:begin + PROJECT_ROWS]
        picked.append(logprobs.gather(1, chunk[:, None])[:, 0])
        best.append(logprobs.argmax(-1) == chunk)
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            tops += [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    return torch.cat(picked), torch.cat(best), tops
