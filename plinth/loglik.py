"""Log-likelihood of continuations: the batched scorer behind `plinth eval` and the server's `echo`.

A request is (context ids, continuation ids); the answer is the log-probability of each
continuation token given everything before it. Many requests share one forward pass: they are
sorted by length, right-padded into batches of about `batch_tokens` tokens (right padding never
changes a causal model's earlier positions), and the output layer, the largest matrix of a small
model, runs only at the positions that are scored.

    scored = score(model, [(tok.encode("The sky is"), tok.encode(" blue"))])
    sum(scored[0].logprobs), scored[0].greedy
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from plinth.errors import PlinthError

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


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Request indices grouped longest first, each group padded to its first (longest) row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, group = [], []
    for i in order:
        if group and (len(group) + 1) * lengths[group[0]] > batch_tokens:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


@torch.inference_mode()
def score(model, requests: list[tuple[list[int], list[int]]], top: int = 0, batch_tokens: int = 4096,
          progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Score every (context, continuation) request; results come back in the requests' order.
    `progress(n)` is called after each batch with the number of requests it finished."""
    windows = [_window(c, t, model.config.max_seq_len) for c, t in requests]
    results: list[Scored | None] = [None] * len(requests)
    for group in _batches([len(w[0]) for w in windows], batch_tokens):
        width = len(windows[group[0]][0])
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        rows, cols, targets = [], [], []
        for row, i in enumerate(group):
            ids, n = windows[i]
            tokens[row, :len(ids)] = torch.tensor(ids)
            rows += [row] * n
            cols += range(len(ids) - n, len(ids))  # the position before each continuation token predicts it
            targets += requests[i][1]
        hidden = model.features(tokens)[torch.tensor(rows), torch.tensor(cols)]  # (N, C): scored positions only
        picked, best, tops = _token_logprobs(model, hidden, torch.tensor(targets), top)
        start = 0
        for i in group:
            n = windows[i][1]
            results[i] = Scored(picked[start:start + n].tolist(), bool(best[start:start + n].all()),
                                tops[start:start + n] if top else None)
            start += n
        if progress:
            progress(len(group))
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
