"""Sliding-window perplexity and bits per byte of a text file, a folder, or a corpus source.

A document longer than the window is scored in windows that start `stride` tokens apart; each
window scores only the tokens no earlier window scored, with the rest of the window as context,
so each token (past the first window) sees at least `window - stride` tokens before it. stride =
window is plain chunking; a smaller stride gives more context per token for more compute.
Each document starts with the tokenizer's BOS token, so its first text token is scored too; bits
per byte divide the total negative log-likelihood by the document's UTF-8 bytes, which makes
models with different tokenizers comparable.

    from plinth.eval.perplexity import perplexity
    perplexity(plinth.load("smollm2-135m-instruct"), "python-docs", limit=20, window=512, stride=256)
"""
from __future__ import annotations

import math

from tqdm import tqdm

from plinth.data.sources import read_source
from plinth.errors import PlinthError
from plinth.loglik import score


def sliding_windows(ids: list[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score ids[1:] exactly once (ids[0] has nothing before it).
    Each pair is one model input of at most `window` positions: the input at `begin` predicts
    ids[begin+1 : begin+window+1], of which only the tokens not scored before count."""
    pairs, scored_up_to = [], 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window + 1, len(ids))
        if end > scored_up_to:
            pairs.append((ids[begin:scored_up_to], ids[scored_up_to:end]))
            scored_up_to = end
        if end == len(ids):
            break
    return pairs


def check_window(window: int, stride: int, max_len: int):
    if not 1 <= window <= max_len:
        raise PlinthError(f"window={window}: it must be between 1 and the model's context ({max_len} tokens)")
    if not 1 <= stride <= window:
        raise PlinthError(f"stride={stride}: it must be between 1 and the window ({window} tokens)")


def perplexity(loaded, source: str, limit: int = 0, window: int | None = None, stride: int | None = None,
               batch_tokens: int = 4096) -> dict:
    """Perplexity and bits per byte of `source` (a name in plinth.data.sources.SOURCES or a path),
    over its first `limit` documents (0 = all), each with its standard error."""
    model, tok = loaded.model, loaded.tokenizer
    window = window or min(1024, model.config.max_seq_len)
    stride = stride or max(1, window // 2)
    check_window(window, stride, model.config.max_seq_len)
    requests, n_bytes, documents = [], 0, 0
    for doc in read_source(source, limit=limit):
        ids = tok.encode(doc.text, add_bos=False)
        if not ids:
            continue
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + ids
        requests += sliding_windows(ids, window, stride)
        n_bytes += len(doc.text.encode("utf-8"))
        documents += 1
    if not requests:
        raise PlinthError(f"source {source!r} has no text to score; give a file, folder or source with text in it")
    with tqdm(total=len(requests), desc=f"perplexity {source}", unit="window", disable=None) as bar:
        nll = [-lp for scored in score(model, requests, batch_tokens=batch_tokens, progress=bar.update)
               for lp in scored.logprobs]
    return summarise(nll, n_bytes) | {"source": source, "documents": documents, "window": window, "stride": stride}


def summarise(nll: list[float], n_bytes: int) -> dict:
    """Token negative log-likelihoods (nats) → perplexity and bits per byte, each ± a standard error
    (tokens treated as independent draws, so the errors are a little optimistic)."""
    n = len(nll)
    mean = sum(nll) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in nll) / (n - 1) / n) if n > 1 else 0.0
    bits_per_token_to_byte = n / n_bytes / math.log(2)
    return {"tokens": n, "bytes": n_bytes, "nll_per_token": mean,
            "perplexity": math.exp(mean), "perplexity_stderr": math.exp(mean) * stderr,  # delta method
            "bits_per_byte": mean * bits_per_token_to_byte, "bits_per_byte_stderr": stderr * bits_per_token_to_byte}
