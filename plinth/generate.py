"""Text generation: sampling parameters, the per-sequence sampler, stop handling and streaming.

A `Sequence` holds everything one request needs between steps (its sampler, its text so far,
why it finished); `generate_stream` runs one sequence on a model with a KV cache, checking guessed
tokens in the same passes (plinth/speculative.py). The serving engine drives many `Sequence`s
through one batched model call per step.

    for step in generate_stream(model, tokenizer, tokenizer.encode("Once"), SamplingParams(max_tokens=20)):
        print(step.text, end="", flush=True)
"""
from __future__ import annotations

import codecs
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from plinth.constrain import Constraint
from plinth.errors import PlinthError
from plinth.kv_cache import KVCache
from plinth.speculative import MAX_DRAFT, PromptLookup, Speculator


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # nucleus: smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0                # drop tokens below min_p × the top token's probability
    repetition_penalty: float = 1.0   # divide logits of tokens already seen (prompt or output); 1 = off
    frequency_penalty: float = 0.0    # subtract count × this from logits of generated tokens
    presence_penalty: float = 0.0     # subtract this once from logits of generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None       # None: none; 0: the chosen token's; k: plus the k most likely
    ignore_eos: bool = False
    grammar: str | None = None        # the output must match it (plinth.constrain: JSON schema, Lark)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def bad(name, rule):
            raise PlinthError(f"invalid {name}={getattr(self, name)!r}: {rule}")

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "it must be a finite number")
            return value

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "it must be a whole number ≥ 1")
        if number("temperature") < 0:
            bad("temperature", "it must be ≥ 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "it must be a whole number ≥ 0 (0 turns it off)")
        if not 0 < number("top_p") <= 1:
            bad("top_p", "it must be in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", "it must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", "it must be > 0 (1 turns it off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= number(name) <= 2:
                bad(name, "it must be between -2 and 2")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "it must be a whole number from 0 to 20")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "it must be a list of non-empty strings")
        for token, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= int(token) < vocab_size:
                raise PlinthError(f"invalid logit_bias token id {token}: ids run from 0 to {vocab_size - 1}")
            if not -100 <= bias <= 100:
                raise PlinthError(f"invalid logit_bias value {bias} for token {token}: it must be in [-100, 100]")
        return self


GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it overflows float32)


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None                # log-probability under the model (before sampling filters)
    top: list[tuple[int, float]] | None = None  # the `logprobs` most likely (token, logprob) pairs


class Sampler:
    """Chooses each next token of one sequence. Seeded per sequence, so a request's output does not
    depend on what else runs in the same batch."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int):
        self.params = params
        seed = params.seed % 2**63 if params.seed is not None else random.getrandbits(63)  # any int is a seed
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = torch.zeros(vocab_size)        # times each token was generated
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        if prompt:
            self.seen[torch.tensor(prompt).clamp(0, vocab_size - 1)] = True
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, value in params.logit_bias.items():
                self.bias[int(token)] = value

    def observe(self, token: int):
        self.counts[token] += 1
        self.seen[token] = True

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Bias and penalties, applied to raw logits (V,) before temperature and filtering."""
        p = self.params
        if self.bias is not None:
            logits = logits + self.bias
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.frequency_penalty or p.presence_penalty:
            logits = logits - self.counts * p.frequency_penalty - (self.counts > 0) * p.presence_penalty
        return logits

    def choose(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> TokenChoice:
        """`allowed` (V,) bool: a grammar's mask; logprobs stay the model's own, before it."""
        p = self.params
        raw = logits.float()
        logits = self.adjust(raw)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        probs = None
        if p.temperature >= GREEDY_BELOW:
            probs = filter_probs(torch.softmax(logits / p.temperature, dim=-1), p.top_k, p.top_p, p.min_p)
            if not torch.isfinite(probs).all() or not probs.sum() > 0:  # overflowed: fall back to greedy
                probs = None
        token = int(logits.argmax()) if probs is None else int(torch.multinomial(probs, 1, generator=self.generator))
        choice = TokenChoice(token)
        if p.logprobs is not None:
            logprobs = torch.log_softmax(raw, dim=-1)
            choice.logprob = float(logprobs[token])
            if p.logprobs:
                values, ids = logprobs.topk(p.logprobs)
                choice.top = list(zip(ids.tolist(), values.tolist()))
        self.observe(token)
        return choice


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Zero out tokens outside top-k, outside the top-p nucleus, or below min_p × max (V,)."""
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    if top_k > 0 or top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if top_k > 0:
            keep[top_k:] = False
        if top_p < 1:
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
            keep &= before < top_p * sorted_probs.sum()
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return probs


class TextStream:
    """Generated tokens → text increments. Never emits half a UTF-8 character, stops at any stop
    string even when it arrives split across tokens, and never emits the stop string itself."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""     # decoded so far (cut at a stop string once one is found)
        self.sent = 0      # characters of `text` already emitted

    def add(self, token: int) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was reached)."""
        self.text += self.decoder.decode(self.tokenizer.token_bytes(token))
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def finish(self) -> str:
        """Everything not yet emitted, at the end of generation (no stop string came)."""
        self.text += self.decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        tail = self.text[self.sent:]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class Step:
    """One generated token as the caller sees it."""
    text: str                        # text this token completes (may be "" while a character or stop is pending)
    choice: TokenChoice | None
    finish_reason: str | None = None  # None while running; then "stop" (end token or stop string) or "length"


class Sequence:
    """The state of one generation request between model steps."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer, vocab_size: int,
                 max_new: int | None = None):
        self.prompt = list(prompt)
        self.params = params
        self.tokenizer = tokenizer
        self.sampler = Sampler(params, self.prompt, vocab_size)  # the model's vocabulary: what logits cover
        self.stream = TextStream(tokenizer, params.stop)
        self.output: list[int] = []
        self.max_new = min(params.max_tokens, max_new) if max_new is not None else params.max_tokens
        self.finish_reason: str | None = None
        self.constraint = Constraint(params.grammar, tokenizer, vocab_size) if params.grammar else None

    def step(self, logits: torch.Tensor) -> Step:
        """Choose the next token from the model's logits (V,) and advance."""
        choice = self.sampler.choose(logits, self.constraint.allowed() if self.constraint else None)
        self.output.append(choice.token)
        if choice.token in self.tokenizer.stop_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return Step(self.stream.finish(), choice, "stop")
        text, stopped = self.stream.add(choice.token)
        if self.constraint and not stopped:
            self.constraint.advance(choice.token)
            if self.constraint.complete:  # only a stop token could follow: end now and save a model step
                stopped = True
                text += self.stream.finish()
        if stopped:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new:
            self.finish_reason = "length"
            text += self.stream.finish()
        return Step(text, choice, self.finish_reason)


def check_prompt(prompt_len: int, context: int):
    if prompt_len == 0:
        raise PlinthError("the prompt is empty; give at least one token of text")
    if prompt_len >= context:
        raise PlinthError(f"the prompt has {prompt_len} tokens but the model's context window is {context}; "
                          "shorten the prompt so there is room for at least one new token")


@torch.inference_mode()
def generate_stream(model, tokenizer, prompt: list[int], params: SamplingParams, embeds=None,
                    speculate: bool | PromptLookup = True, decoder=None, cpu_share=None) -> Iterator[Step]:
    """Generate for one prompt, yielding a `Step` per token until a stop or the token limit.
    embeds: (1, len(prompt), C) the prompt's input vectors, where they are not its tokens'
    embeddings (an image+text model's image tokens).
    speculate: guess upcoming tokens from the prompt and output so far and check the guesses in the
    same forward pass (plinth/speculative.py); the output is the same either way, only faster where
    it repeats its input (rewriting or quoting a given text). False: one token per pass; a
    `PromptLookup`: guess with that one (to tune it, or read how many guesses it got right).
    decoder: a `CompiledDecoder` of this model (plinth/compiled_decode.py) to decode with, from the
    prompt's last token on, where it runs (`runs`); its verify passes check a fixed number of guesses.
    cpu_share: a `CpuShare` (plinth/cpu_share.py) that sets this thread's thread count between
    steps, leaving room for other processes."""
    params.validate(model.config.vocab_size)
    context = model.config.max_seq_len
    check_prompt(len(prompt), context)
    seq = Sequence(prompt, params, tokenizer, model.config.vocab_size, max_new=context - len(prompt))
    length = len(prompt) + seq.max_new  # passes only go forward: rings suffice (slack=0)
    if decoder is not None and not decoder.runs(length):  # a decoder of kept programs, none kept for this length
        decoder = None
    cache = decoder.new_cache(length) if decoder is not None else KVCache.for_model(model, 1, length, slack=0)
    # a compiled verify pass has room for a fixed number of guesses
    guesses = MAX_DRAFT if decoder is None else decoder.guesses if speculate and decoder.verifies(cache) else 0
    drafter = None if not speculate or not guesses else \
        speculate if isinstance(speculate, PromptLookup) else PromptLookup(max_draft=guesses)
    speculator = Speculator(seq, drafter)
    device = model.tok_embeddings.weight.device
    if decoder is not None and embeds is None:  # the prompt's last token through the compiled step too
        if len(prompt) > 1:
            model.features(torch.tensor([prompt[:-1]], device=device), cache=cache.view())
        rows = decoder([prompt[-1]], [len(prompt) - 1], cache)  # (1, V)
    else:
        rows = model(None if embeds is not None else torch.tensor([prompt], device=device), embeds=embeds,
                     cache=cache.view(), last=torch.tensor([len(prompt) - 1], device=device))  # (1, V)
    drafts: list[int] = []
    while True:
        steps = speculator.accept(drafts, rows.cpu())
        yield from steps
        if steps[-1].finish_reason:
            return
        drafts = speculator.propose()
        if cpu_share is not None:
            cpu_share.adjust()
        position = len(prompt) + len(seq.output) - 1  # where the last chosen token goes; drafts follow it
        if decoder is not None:
            drafts = decoder.checked(drafts)  # a verify pass, or one token
            rows = decoder.verify([steps[-1].choice.token, *drafts], position, cache) if drafts else \
                decoder([steps[-1].choice.token], [position], cache)  # (1 + len(drafts), V)
        else:
            tokens = torch.tensor([[steps[-1].choice.token, *drafts]], device=device)
            rows = model(tokens, cache=cache.view(position))[0]  # (1 + len(drafts), V)
