"""Speculative decoding by prompt lookup: guess the next tokens from the text so far, check every
guess in one forward pass, keep the ones the model itself would have chosen.

Input-grounded generation (rewriting a given file, quoting a passage) copies long runs of its input.
When the latest few tokens occurred before, in the prompt or the output, the tokens that followed
them there are a good guess of what comes next. Decoding one token is bound by reading the weights,
so a pass over the last token plus a few guesses costs little more than a pass over one, and every
guess the model confirms is a token for almost nothing. Where guesses keep failing (open-ended
writing), the drafter stops guessing for a while, so that text decodes as fast as without it.

Acceptance is by exact match: the sequence chooses its token at each position of the verify pass
with its own sampler, exactly as plain decoding would, and the next position counts only while the
chosen token equals the guess. Every position it reaches has the logits plain decoding would have
computed (the same tokens precede it), and the sampler draws its random numbers in the same order,
so the output is plain decoding's for any settings: greedy, seeded sampling, penalties, grammars,
logprobs. Rejected guesses leave keys in the KV cache past the accepted tokens; the next pass
writes over them (plinth/kv_cache.py writes at absolute positions).

One `Speculator` per `plinth.generate.Sequence`, two calls per forward pass:

    speculator = Speculator(seq, PromptLookup())     # Speculator(seq, None): plain decoding

    drafts = speculator.propose()                    # [] when there is nothing worth guessing
    rows = model(torch.tensor([[last] + drafts]), cache=cache.view(position))[0]   # (1 + len(drafts), V)
    steps = speculator.accept(drafts, rows)          # 1 to len(drafts) + 1 Steps; feed steps[-1]'s token next
"""
from __future__ import annotations

import torch

from plinth.model import DECODE_TOKENS

# A verify pass feeds the last chosen token plus the drafts. The int4 kernel unpacks its weights
# once per ROWS tokens (plinth/quant.py), so a pass of 4 tokens costs little more than a pass of 1,
# and one of 5 almost as much as one of 8: drafts come in lengths that fill whole groups of ROWS.
# Passes stay under PASS_LIMIT tokens, which the model attends token by token exactly as it
# decodes; longer passes take the prompt kernels, other bits.
ROWS = 4
MAX_DRAFT = 2 * ROWS - 1
PASS_LIMIT = DECODE_TOKENS


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the last n tokens
    (n from `max_ngram` down to `min_ngram`: the longest match is the likeliest to continue).

    Starts with passes of ROWS tokens (ROWS - 1 drafts), the cheap ones; after a pass that kept
    every draft it drafts ROWS more, up to `max_draft`, and after one that did not, drops back.
    Switches itself off when its guesses keep failing: after `patience` passes in a row that kept
    none of its drafts it proposes nothing for `backoff` calls, twice as long after each further
    failing retry (up to `max_backoff`), and back to `backoff` after a pass that kept a draft.

    One instance follows one growing token list: `propose` indexes only what was appended since."""

    def __init__(self, max_ngram: int = 8, min_ngram: int = 2, max_draft: int = MAX_DRAFT,
                 patience: int = 2, backoff: int = 8, max_backoff: int = 256):
        if not 1 <= min_ngram <= max_ngram or not 1 <= max_draft < PASS_LIMIT - 1:
            raise ValueError(f"need 1 ≤ min_ngram ≤ max_ngram and 1 ≤ max_draft ≤ {PASS_LIMIT - 2}, got "
                             f"min_ngram={min_ngram}, max_ngram={max_ngram}, max_draft={max_draft}")
        self.ngrams = range(max_ngram, min_ngram - 1, -1)
        self.max_draft = max_draft
        self.first = min(ROWS - 1, max_draft)  # drafts in a pass after one that missed
        self.length = self.first               # drafts in the next pass
        self.patience, self.backoff, self.max_backoff = patience, backoff, max_backoff
        self.after: dict[tuple[int, ...], int] = {}  # n-gram → index of the token after its latest occurrence
        self.indexed = 0       # tokens[:indexed] are in `after`
        self.proposed = 0      # drafts verified so far
        self.accepted = 0      # of which kept
        self.failures = 0      # passes in a row that kept none of their drafts
        self.pause = backoff   # how many calls the next switch-off lasts
        self.paused = 0        # calls left before proposing again

    def propose(self, tokens: list[int], limit: int | None = None) -> list[int]:
        """Up to `limit` guesses of the tokens after `tokens`; [] for none."""
        self._index(tokens)
        if self.paused:
            self.paused -= 1
            return []
        limit = self.length if limit is None else min(limit, self.length)
        for n in self.ngrams:
            start = self.after.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if start is not None:
                draft = list(tokens[start:start + limit])
                period = len(tokens) - start  # a match that runs into the end repeats with this period
                while len(draft) < limit:
                    draft.append(draft[-period])
                return draft
        return []

    def record(self, proposed: int, accepted: int):
        """What the verify pass made of `proposed` drafts: the first `accepted` were kept."""
        if not proposed:
            return
        self.proposed += proposed
        self.accepted += accepted
        self.length = min(self.length + ROWS, self.max_draft) if accepted == proposed else self.first
        if accepted:
            self.failures, self.pause = 0, self.backoff
            return
        self.failures += 1
        if self.failures >= self.patience:
            self.failures, self.paused = 0, self.pause
            self.pause = min(2 * self.pause, self.max_backoff)

    def _index(self, tokens: list[int]):
        """Map each n-gram ending before index i to i, for every i whose token exists: the last
        n-gram of `tokens` has no successor yet, so a lookup finds only earlier occurrences."""
        for i in range(max(self.indexed, 1), len(tokens)):
            for n in self.ngrams:
                if i >= n:
                    self.after[tuple(tokens[i - n:i])] = i
        self.indexed = max(self.indexed, len(tokens))


def verify(seq, drafts: list[int], rows: torch.Tensor) -> list:
    """Advance `seq` (a plinth.generate.Sequence) through a verify pass: rows (len(drafts) + 1, V)
    are the logits after the pass's first token and after each draft. Chooses a token per row in
    order, going on while the choice equals that row's draft; returns the Steps made: the kept
    drafts and one token more (the choice that differed, or the one after the last draft), fewer
    when a step finishes the sequence."""
    steps = []
    for i, row in enumerate(rows[:len(drafts) + 1]):
        steps.append(seq.step(row))
        if steps[-1].finish_reason or i == len(drafts) or steps[-1].choice.token != drafts[i]:
            break
    return steps


class Speculator:
    """Speculative decoding for one sequence: a Sequence and its drafter (None: plain decoding,
    one token per pass)."""

    def __init__(self, seq, drafter: PromptLookup | None):
        self.seq = seq
        self.drafter = drafter

    def propose(self) -> list[int]:
        """Drafts for the next pass, after the sequence's last chosen token; never more than the
        sequence may still generate, so the pass stays inside its KV cache and token limit."""
        room = self.seq.max_new - len(self.seq.output) - 1
        if self.drafter is None or room < 1:
            return []
        return self.drafter.propose(self.seq.prompt + self.seq.output, room)

    def accept(self, drafts: list[int], rows: torch.Tensor) -> list:
        """`verify`, and tell the drafter how it did. rows: (len(drafts) + 1, V)."""
        steps = verify(self.seq, drafts, rows)
        if self.drafter is not None:
            self.drafter.record(len(drafts), sum(s.choice.token == d for s, d in zip(steps, drafts)))
        return steps
