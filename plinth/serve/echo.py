"""`echo` for /v1/completions: the prompt comes back in front of the completion, with the
log-probability of every prompt token when `logprobs` is set (OpenAI's legacy completions shape:
the first token's logprob is null, nothing comes before it). With `max_tokens: 0` nothing is
generated. This is how log-likelihood evaluations score text through an API: EleutherAI's
lm-evaluation-harness (`--model local-completions`) sends context + continuation with
`echo: true, logprobs: 1, max_tokens: 1` and reads the continuation's logprobs.
"""
from __future__ import annotations

import codecs
import time
import uuid
from functools import partial

from fastapi import Request

from plinth.loglik import BATCH_TOKENS, score
from plinth.serve.schemas import APIError, CompletionRequest
from plinth.serve.state import ServerState


# Prompt tokens scored per request: 16 full windows of the server's default 2,048-token context,
# more than lm-evaluation-harness batches of a few dozen questions need. Scoring runs in engine
# tasks of about one scoring batch each (`in_steps`), so the budget bounds a request's time and
# memory, not how long decoding waits.
MAX_SCORED_TOKENS = 32_768


def check_scoring_budget(prompts: list[list[int]]):
    """A 400 naming `prompt` when echo with logprobs would score more than MAX_SCORED_TOKENS."""
    total = sum(len(p) for p in prompts)
    if total > MAX_SCORED_TOKENS:
        raise APIError(400, f"echo with logprobs would score {total} prompt tokens, max {MAX_SCORED_TOKENS} per "
                            "request: send fewer or shorter prompts", param="prompt")


def prompt_logprobs(model, prompts: list[list[int]], top: int):
    """`plinth.loglik.Scored` of tokens 1.. of each prompt (None for a one-token prompt); runs on
    the engine thread, which owns the model."""
    scorable = [i for i, p in enumerate(prompts) if len(p) > 1]
    scored = score(model, [(prompts[i][:1], prompts[i][1:]) for i in scorable], top=top)
    found = dict(zip(scorable, scored))
    return [found.get(i) for i in range(len(prompts))]


def echoed(tokenizer, prompt: list[int], scored, top: int | None) -> tuple[str, dict | None]:
    """The prompt's text and, when logprobs were asked for, its legacy-shape logprobs lists."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, offsets = "", []
    for token in prompt:  # a token inside a multi-byte character starts where that character does
        offsets.append(len(text))
        text += decoder.decode(tokenizer.token_bytes(token))
    text += decoder.decode(b"", final=True)
    if top is None:
        return text, None
    logprobs = [None] + (scored.logprobs if scored else [])
    tops = [None] + ([{tokenizer.token_text(t): lp for t, lp in pairs} for pairs in scored.top] if scored and top
                     else [{} for _ in prompt[1:]])
    tokens = [tokenizer.token_text(t) for t in prompt]
    return text, {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def join(prompt_text: str, prompt_logprobs: dict | None, choice: dict) -> dict:
    """A completion choice with the echoed prompt in front of its text and logprobs."""
    completion = choice.get("logprobs")
    if prompt_logprobs is not None and completion is not None:
        shifted = [offset + len(prompt_text) for offset in completion["text_offset"]]
        merged = {key: prompt_logprobs[key] + completion[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
        completion = {**merged, "text_offset": prompt_logprobs["text_offset"] + shifted}
    elif prompt_logprobs is not None:
        completion = prompt_logprobs
    return {**choice, "text": prompt_text + choice["text"], "logprobs": completion}


def nothing_generated(model: str, prompts: list[list[int]], n: int, with_logprobs: bool) -> dict:
    """The response to `max_tokens: 0`: empty completions, to which the echoed prompts are added."""
    empty = {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")} if with_logprobs else None
    prompt_tokens = sum(len(p) for p in prompts)  # counted once per prompt, as for completions
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "text": "", "logprobs": empty, "finish_reason": "length"}
                        for i in range(len(prompts) * n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}


async def echo_response(state: ServerState, body: CompletionRequest, prompts: list[list[int]], response: dict,
                        http_request: Request) -> dict:
    """`response` (the completions, or `nothing_generated`) with each choice echoing its prompt."""
    top = body.logprob_count()
    scored = (await state.in_steps(partial(prompt_logprobs, state.engine.model, top=top or 0), prompts, len,
                                   BATCH_TOKENS, http_request)
              if top is not None else [None] * len(prompts))
    choices = []
    for choice in response["choices"]:
        p = choice["index"] // body.n  # choices come n per prompt
        choices.append(join(*echoed(state.tokenizer, prompts[p], scored[p], top), choice))
    return {**response, "choices": choices}
