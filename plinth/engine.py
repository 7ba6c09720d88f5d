"""The continuous-batching engine: many generation requests share one model, one step at a time.

Each request's state is two counters: `computed` (tokens whose keys/values are in the KV cache) and
`len(tokens)` (prompt + generated so far). Every step feeds each running request its next
`min(len(tokens) - computed, chunk)` tokens, so a long prompt is prefilled in chunks while the
others decode, and a request joins or leaves the batch at any step. All requests that feed one
token share a single batched forward pass (the weights are read once for all of them).

An image+text model's request also carries its images (normalised pixels) and the prompt positions
its image tokens fill: the engine encodes a request's images, alone, when its prefill starts, and
feeds those vectors in place of the token embeddings there — image tokens are prefilled like any
prompt tokens, and a request's output does not depend on what it is batched with.

One thread owns the model: when several threads take turns calling into PyTorch, each becomes
the master of its own OpenMP team, the teams oversubscribe the cores and every barrier sleeps.
Other threads only `submit()` and `cancel()`, and receive `Step`s through a callback. Without a
thread, `generate_many` drives the same steps from the caller's thread (eval, tests, scripts).
Other model work (embeddings, scoring, an image generator's sampling) runs on the same thread as
tasks between steps (`call`); `Engine.tasks_only()` is that thread alone, for a served model that
is not a language model.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.start()
    engine.submit(prompt_ids, SamplingParams(max_tokens=32), emit=print)

    completions = Engine(model, tokenizer).generate_many(prompts, SamplingParams(max_tokens=32))
    completions[0].text, completions[0].tokens, completions[0].finish_reason
"""
from __future__ import annotations

import itertools
import sys
import threading
from concurrent.futures import Future
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from plinth.cpu_share import CpuShare, usable_cpus
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, Sequence, Step, check_prompt
from plinth.kv_cache import KEY_BLOCK, KVCache, whole_key_blocks
from plinth.speculative import MAX_DRAFT, PASS_LIMIT, PromptLookup, Speculator


@dataclass
class Request:
    id: int
    seq: Sequence
    emit: Callable[[Step | Exception], None]  # called on the engine thread; must not block
    tokens: list[int]                         # prompt + generated tokens
    computed: int = 0                         # tokens already in the KV cache
    slot: int | None = None
    cancelled: bool = False
    adapter: int = 0                          # LoRA adapter id (plinth/adapt/multi_lora.py); 0 = base model
    images: "ImageInput | None" = None        # an image+text model's images, and where their tokens go
    cached: int = 0                           # prompt tokens whose keys and values came from the prefix cache
    prompt_len: int = 0
    speculator: Speculator | None = None      # guesses tokens when the request decodes alone

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed

    @property
    def prefilled(self) -> list[int]:
        """The prompt tokens whose keys and values are in its cache row (computed in prefill pieces)."""
        return self.tokens[:min(self.computed, self.prompt_len)]


@dataclass
class ImageInput:
    pixels: torch.Tensor                      # (M, C, S, S) normalised images
    positions: torch.Tensor                   # (M · tokens per image,) prompt positions of their tokens
    vectors: torch.Tensor | None = None       # (M · tokens per image, C) once encoded, on the engine thread


@dataclass
class Completion:
    """What one request of `generate_many` produced: its steps (one per token), or an error."""
    steps: list[Step] = field(default_factory=list)
    error: Exception | None = None

    def add(self, event: Step | Exception):
        if isinstance(event, Exception):
            self.error = event
        else:
            self.steps.append(event)

    @property
    def text(self) -> str:
        return "".join(step.text for step in self.steps)

    @property
    def tokens(self) -> list[int]:
        return [step.choice.token for step in self.steps]

    @property
    def finish_reason(self) -> str | None:
        return self.steps[-1].finish_reason if self.steps else None


@dataclass
class Stats:
    """What /metrics reports; updated on the engine thread only."""
    steps: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0                    # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    last_batch: int = 0
    heartbeat: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_len: int | None = None, chunk: int = 256,
                 max_queue: int = 256, threads: int | None = None, vision=None, prefix_cache: bool = True,
                 speculate: bool = True, compile: bool = False):
        """vision: an image+text model's image encoder (plinth/vision/multimodal.py ImageEncoder).
        model None: an engine that only runs `call`ed tasks (see `tasks_only`). prefix_cache: reuse
        the rows of prompts seen before (see `_admit`). speculate: a request decoding alone checks
        guessed tokens in its passes (see `_speculate`). compile: decoding steps go through a compiled
        programs (see `_decode_compiled` and `_speculate`; a request through a LoRA adapter decodes
        eagerly): faster, and a row's tokens are the same in any batch, but they are not eager
        decoding's tokens."""
        self.model, self.tokenizer, self.vision = model, tokenizer, vision
        self.threads = threads or default_threads()
        # Threads not given otherwise: all cores while nothing else runs, fewer while other processes keep one busy.
        self.cpu_share = CpuShare(self.threads) if threads is None else None
        self.decoder = None  # a CompiledDecoder while decoding compiled (`use_compiled`)
        self._unready = None  # one whose programs were not all kept: its weights are hashed already
        if compile and model is not None:
            from plinth.compiled_decode import CompiledDecoder
            self.decoder = CompiledDecoder(model, self.threads)
        self.chunk, self.max_queue, self.prefix_cache = chunk, max_queue, prefix_cache
        self.speculate = speculate
        # Prompt tokens per forward pass: the int4 kernel's cost is the same per row in any pass,
        # so small passes prefill as fast as large ones and let the prefix cache reuse finer prefixes.
        self.piece = min(chunk, KEY_BLOCK)
        if model is None:  # no text model: nothing to cache, no slot to give a request
            self.max_len, self.cache, max_batch = 0, None, 0
        else:
            self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
            # Sliding-window layers keep rings (plinth/kv_cache.py) with room for a request to run a
            # prefill chunk past a prefix that another one waits to reuse (see `_prefix_coming`).
            # A compiled step reads whole KEY_BLOCKs of keys, up to the last one's end.
            self.cache = KVCache.for_model(model, max_batch, whole_key_blocks(self.max_len), grow=True,
                                           slack=self.chunk - self.piece)
        self.free_slots = list(range(max_batch))
        # The prefix cache: free slots whose cache rows still hold a finished request's keys and values,
        # slot → (adapter, the tokens they are of), least recently freed first, and how far each
        # row was written (a ring keeps the window before a prefix only so far: see `_reusable`).
        self.kept: dict[int, tuple[int, list[int]]] = {}
        self.written: dict[int, int] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.tasks: deque[tuple[Callable, Future]] = deque()  # other model work, run between steps
        self.stats = Stats()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def tasks_only(cls, threads: int | None = None) -> "Engine":
        """An engine without a text model, whose thread runs only `call`ed tasks: how the server keeps
        a model that is not a language model (an image generator) on the one model thread. It has
        no KV cache, and `submit` refuses."""
        return cls(None, None, threads=threads)

    # ---- called from any thread ----------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, emit, adapter: int = 0,
               images: ImageInput | None = None) -> Request:
        return self.submit_all([(prompt, params, emit, adapter, images)])[0]

    def submit_all(self, jobs: list[tuple], queue_limit: bool = True) -> list[Request]:
        """Queue every (prompt, params, emit, adapter[, images]) job, or none: each is checked before any is
        queued, and the queue limit applies to all of them together (`queue_limit=False`: the caller
        chose the batch, as `generate_many` does)."""
        requests = [self._request(*job) for job in jobs]
        with self._wake:
            if queue_limit and len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry shortly")
            self.waiting.extend(requests)
            self._wake.notify()
        return requests

    def _request(self, prompt: list[int], params: SamplingParams, emit, adapter: int,
                 images: ImageInput | None = None) -> Request:
        """A request checked against the model: bad parameters or a prompt too long raise here."""
        if self._thread is not None and not self._thread.is_alive():
            raise EngineDown("the engine thread has stopped; restart the server")
        if self.model is None:
            raise PlinthError("this engine has no text model (Engine.tasks_only): it runs tasks, not "
                              "generation requests")
        vocab = self.model.config.vocab_size
        params.validate(vocab)
        check_prompt(len(prompt), self.max_len)
        seen = prompt  # what penalties count as seen: the prompt's tokens, not its image tokens' placeholders
        if images is not None:
            self._check_images(images, len(prompt))
            slots = set(images.positions.tolist())
            seen = [t for p, t in enumerate(prompt) if p not in slots]
        seq = Sequence(seen, params, self.tokenizer, vocab, max_new=self.max_len - len(prompt))
        # a compiled verify pass has room for a fixed number of guesses
        guesses = self.decoder.guesses if self.decoder is not None and not adapter else MAX_DRAFT
        return Request(next(self._ids), seq, emit, list(prompt), adapter=adapter, images=images, prompt_len=len(prompt),
                       speculator=Speculator(seq, PromptLookup(max_draft=guesses) if self.speculate else None))

    def _check_images(self, images: ImageInput, prompt_len: int):
        if self.vision is None:
            raise TextOnly()
        expected = len(images.pixels) * self.vision.tokens_per_image
        positions = images.positions
        if len(positions) != expected or (len(positions) and not 0 <= int(positions.min()) <= int(positions.max()) < prompt_len):
            raise PlinthError(f"{len(images.pixels)} images need {expected} image positions inside the prompt, "
                              f"got {len(positions)}")

    def cancel(self, request: Request):
        """Stop a request wherever it is (queued, prefilling or decoding); its slot frees next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the engine thread between steps (e.g. an embedding model), so that all
        model compute stays on one thread."""
        future: Future = Future()
        with self._wake:
            self.tasks.append((lambda: fn(*args), future))
            self._wake.notify()
        return future

    def abort_all(self, error: Exception) -> Future:
        """End every queued and running request with `error`, delivered to its emit as a fault would
        be (e.g. a server whose shutdown grace is over). The engine thread does it between steps,
        since only it may touch the batch; the future is done once it has."""
        return self.call(self._fail_all, error)

    def generate_many(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                      adapters: list[int] | None = None, timeout: float | None = None,
                      images: list[ImageInput | None] | None = None) -> list[Completion]:
        """Generate for every prompt (one `params` for all, or one each), batched continuously, and
        return when all have finished: one Completion per prompt, in order. On the engine thread
        once `start()`ed; otherwise this thread runs the steps (then it is the one model thread).

        Every prompt is checked before any is queued, and the server's queue limit does not apply
        (the caller chose the batch). A request's error is raised once every request has ended;
        after `timeout` seconds the unfinished requests are cancelled and TimeoutError is raised."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        completions = [Completion() for _ in prompts]
        left, done = [len(prompts)], threading.Event()

        def receiver(completion: Completion):
            def emit(event: Step | Exception):
                completion.add(event)
                if isinstance(event, Exception) or event.finish_reason:
                    left[0] -= 1  # only the thread that runs the steps calls emit: no race
                    if not left[0]:
                        done.set()
            return emit

        if not prompts:
            return []
        requests = self.submit_all([(prompt, p, receiver(c), adapters[i] if adapters else 0, images[i] if images else None)
                                    for i, (prompt, p, c) in enumerate(zip(prompts, params, completions))],
                                   queue_limit=False)
        if self.thread_alive():
            done.wait(timeout)
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            with torch.no_grad():
                while not done.is_set() and (deadline is None or time.monotonic() < deadline):
                    self._step_or_fail_all()
        if not done.is_set():
            for request in requests:
                self.cancel(request)
            raise TimeoutError(f"generate_many: {left[0]} of {len(requests)} requests unfinished after {timeout} s")
        for completion in completions:
            if completion.error is not None:
                raise completion.error
        return completions

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def threads_in_use(self) -> int:
        """The model's compute threads now: fewer than `threads` while other processes keep a core busy."""
        return self.cpu_share.threads if self.cpu_share is not None else self.threads

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="plinth-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout)
        with self._wake:  # tasks the stopped thread will never run: their callers must not wait forever
            tasks, self.tasks = list(self.tasks), deque()
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the engine stopped"))

    def thread_alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def alive(self, stall_seconds: float = 30.0) -> bool:
        """The engine thread runs and has not been stuck in one step for `stall_seconds`."""
        return self.thread_alive() and time.monotonic() - self.stats.heartbeat < stall_seconds

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self):
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running and not self.tasks:
                    self.stats.heartbeat = time.monotonic()
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                tasks, self.tasks = list(self.tasks), deque()
            for fn, future in tasks:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller gets the error; the engine goes on
                        future.set_exception(e)
                self.stats.heartbeat = time.monotonic()
            if self.waiting or self.running:
                if self.cpu_share is not None:
                    self.cpu_share.adjust()
                self._step_or_fail_all()

    def _step_or_fail_all(self):
        try:
            self.step()
        except Exception as e:  # a bug outside any one request: fail them all, keep serving
            self._fail_all(e)

    def step(self):
        """schedule → run → postprocess. All sequences feeding one token decode together; prompts
        are prefilled one chunk each, at most `chunk` prompt tokens per step, so decoding streams
        never stall behind a burst of long prompts. A chunk is fed in forward passes of `piece`
        tokens from position 0, so a prompt is cut the same way however it is scheduled (and the
        prefix cache can reuse whole pieces: see `_admit`)."""
        self.stats.heartbeat = time.monotonic()
        self._schedule()
        if len(self.running) == 1 and not self.waiting and self.running[0].pending == 1:
            if self._speculate(self.running[0]):
                self.stats.steps += 1
                return
        decoding = [r for r in self.running if r.pending == 1]
        compiled = [r for r in decoding if self._compiled(r, r.computed)]
        prefills, budget = [], self.chunk
        for r in self.running:
            if r.pending > 1 and (budget > 0 or not prefills):
                prefills.append([r])
                budget -= min(r.pending, self.chunk)
        for group in filter(None, [compiled, [r for r in decoding if r not in compiled], *prefills]):
            try:
                logits = self._decode_compiled(group) if group is compiled else \
                    self._run(group) if group[0].pending == 1 else self._prefill(group)
            except Exception as e:  # a failure must not kill the engine: fail this group, go on
                for request in group:
                    self._finish(request, e)
                continue
            self._postprocess(group, logits)
            self.stats.heartbeat = time.monotonic()
        self.stats.steps += 1

    def _schedule(self):
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, None)
        with self._wake:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self.stats.cancelled += 1
            for request in list(self.waiting):
                if not self.free_slots:
                    break
                if self._prefix_coming(request):
                    continue
                self.waiting.remove(request)
                try:
                    self._admit(request)
                except Exception as e:  # its own failure (e.g. no memory for its rows), not the engine's
                    self._finish(request, e)

    # ---- the prefix cache ------------------------------------------------------------------------
    # A request whose prompt starts with tokens some cache row already holds (a system prompt, the
    # history of a chat, which clients resend every turn) starts from them: from a free slot that
    # kept a finished request's rows, taking that slot, or from a running request's, copying its
    # rows. What is reused is whole prefill pieces of prompt positions from position 0: the keys and
    # values a prompt gets depend on how it is cut into forward passes (each pass's shape picks its
    # own summation order in the matrix kernels), and a request prefills in pieces from position 0
    # or from such a reused prefix, so reusing whole pieces gives it, bit for bit, the rows it would
    # have computed; outputs never depend on what was cached. A sliding-window layer's ring keeps
    # the window before a prefix only until its row is written about ring − window positions past
    # it (plinth/kv_cache.py `resumable`): a row that has moved on further is not reused. Eviction
    # takes the slot freed longest ago, never a running request's.
    def _admit(self, request: Request):
        slot, shared, source = self._free_slot(), 0, None
        if self.prefix_cache and request.images is None:  # image tokens are placeholders: equal ids, other images
            for kept_slot, (adapter, prefilled) in self.kept.items():
                n = self._reusable(prefilled, self.written[kept_slot], request) if adapter == request.adapter else 0
                if n > shared:
                    slot, shared = kept_slot, n
            for r in self.running:
                n = self._reusable(r.prefilled, written_end(r), request) if self._donor(r, request) else 0
                if n > shared:
                    shared, source = n, r.slot
        with torch.inference_mode():  # the cache's tensors may have been made in a forward pass's inference mode
            self.cache.reserve(slot + 1, max(shared, 1))
            if source is not None:
                self.cache.copy_row(source, slot, shared)
        self.free_slots.remove(slot)
        self.kept.pop(slot, None)
        self.written.pop(slot, None)
        request.slot, request.computed, request.cached = slot, shared, shared
        self.running.append(request)
        self.stats.prompt_tokens += len(request.tokens)
        self.stats.cached_tokens += shared

    def _reusable(self, prefilled: list[int], written: int, request: Request) -> int:
        """How many of `request`'s first tokens can start from a row holding `prefilled`, written up
        to position written-1: whole pieces, leaving at least its last prompt token to feed (its
        logits are needed); none where the row's rings have moved on past the window before them."""
        n = shared_prefix(prefilled, request.tokens, request.prompt_len - 1) // self.piece * self.piece
        return n if self.cache.resumable(n, written) else 0

    def _free_slot(self) -> int:
        """The lowest free slot that keeps nothing (a batch in rows 0..B-1 needs no KV copies), else
        the one freed longest ago."""
        empty = [s for s in self.free_slots if s not in self.kept]
        return min(empty) if empty else next(s for s in self.kept if s in self.free_slots)

    @staticmethod
    def _donor(running: Request, request: Request) -> bool:
        return running.adapter == request.adapter and running.images is None

    def _prefix_coming(self, request: Request) -> bool:
        """A running request is still prefilling a piece this request could reuse: wait for it, then
        start from its rows (16 clients with one system prompt prefill it once)."""
        if not self.prefix_cache or request.images is not None:
            return False
        for r in self.running:
            if self._donor(r, request):
                n = self._reusable(r.tokens[:r.prompt_len], written_end(r), request)
                if n and r.computed < n:
                    return True
        return False

    def _fit_cache(self):
        """Give back cache memory beyond the rows and positions that running requests and kept
        prefixes hold."""
        held = [(r.slot, len(r.tokens)) for r in self.running] + [(s, len(t)) for s, (_, t) in self.kept.items()]
        self.cache.fit(max((s + 1 for s, _ in held), default=0), max((n for _, n in held), default=0))

    def _prefill(self, group: list[Request]) -> torch.Tensor | None:
        """Up to `chunk` more prompt tokens of one request, `piece` tokens per forward pass; the
        logits of the last one fed, if it ended the prompt. A prompt whose last token the compiled
        step feeds is prefilled up to it, and that token fed at once, alone: its first token then
        comes as soon as its prompt is in, not after the rest of this step's prefills (a row's
        logits are the same bits alone as in the next step's batch)."""
        (request,), fed = group, 0
        held = 1 if self._compiled(request, request.prompt_len - 1) else 0
        while True:
            most = min(request.pending - held, self.piece)
            fed += most
            logits = self._run(group, most)
            if request.pending == held:
                return self._decode_compiled(group) if held else logits
            if fed >= self.chunk:
                return logits

    def _compiled(self, request: Request, position: int) -> bool:
        """Whether the token at `position` goes through the compiled step: not through an adapter
        (the program has none), nor an image's vector (the step looks tokens up)."""
        return self.decoder is not None and not request.adapter and \
            (request.images is None or position not in request.images.positions)

    @torch.inference_mode()
    def _run(self, group: list[Request], most: int = 1) -> torch.Tensor | None:
        """One forward pass for a group of requests, each fed at most `most` tokens; returns the
        logits of each one's last fed token, or None when no request's prompt ends in this pass (a
        prefill piece samples nothing, and the output layer is the largest matrix)."""
        group.sort(key=lambda r: r.slot)
        counts = [min(r.pending, most) for r in group]
        width = max(counts)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for row, (r, n) in enumerate(zip(group, counts)):
            tokens[row, :n] = torch.tensor(r.tokens[r.computed:r.computed + n])
        slots = [r.slot for r in group]
        self.cache.reserve(max(slots) + 1, max(r.computed + n for r, n in zip(group, counts)))
        in_order = slots == list(range(len(group)))
        # One request's pass starts at one position whatever its slot, so a prompt's first piece
        # takes the same attention kernel in every slot.
        start = group[0].computed if len(group) == 1 else torch.tensor([r.computed for r in group])
        adapters = torch.tensor([r.adapter for r in group]) if any(r.adapter for r in group) else None
        embeds = self._with_images(group, tokens, counts) if any(r.images is not None for r in group) else None
        inputs = dict(embeds=embeds, cache=self.cache.view(start, None if in_order else torch.tensor(slots)),
                      adapters=adapters)
        tokens = None if embeds is not None else tokens
        sampled = any(r.pending == n for r, n in zip(group, counts))
        logits = self.model(tokens, last=torch.tensor(counts) - 1, **inputs) if sampled else \
            self.model.features(tokens, **inputs)
        for r, n in zip(group, counts):
            r.computed += n
        self.stats.last_batch = len(group)
        return logits.float() if sampled else None

    def _with_images(self, group: list[Request], tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The token embeddings of this step's inputs (B, W, C), with image vectors where the fed
        positions are image tokens. A request's images are encoded alone, when first needed."""
        x = self.model.tok_embeddings(tokens)
        for row, (r, n) in enumerate(zip(group, counts)):
            if r.images is None:
                continue
            if r.images.vectors is None:
                r.images.vectors = self.vision(r.images.pixels).flatten(0, 1)
            at = r.images.positions - r.computed
            inside = (at >= 0) & (at < n)
            x[row, at[inside]] = r.images.vectors[inside].to(x.dtype)
        return x

    def _speculate(self, request: Request) -> bool:
        """Decode a lone request's next tokens with guesses checked in the same pass (plinth/
        speculative.py), compiled where its decoding is: its output is plain decoding's, bit for
        bit. False when it has no guess."""
        drafts = request.speculator.propose()
        compiled = self._compiled(request, request.computed)
        if drafts and compiled:  # where a compiled verify pass keeps the step's bits
            drafts = self.decoder.checked(drafts) if self.decoder.verifies(self.cache) else []
        if not drafts:
            return False
        start = request.computed
        try:
            with torch.inference_mode():
                if compiled:
                    tokens = request.tokens[start:] + drafts
                    self.cache.reserve(request.slot + 1, self.decoder.positions_needed(self.cache, start, len(tokens)))
                    logits = self.decoder.verify(tokens, start, self.cache, request.slot)
                else:
                    self.cache.reserve(request.slot + 1, start + 1 + len(drafts))
                    slots = None if request.slot == 0 else torch.tensor([request.slot])
                    logits = self.model(torch.tensor([request.tokens[start:] + drafts]), cache=self.cache.view(start, slots),
                                        adapters=torch.tensor([request.adapter]) if request.adapter else None)[0]
            steps = request.speculator.accept(drafts, logits.float())
        except Exception as e:  # as a failing step: the request's failure is its own
            self._finish(request, e)
            return True
        request.computed = start + len(steps)  # the kept guesses' keys; the last chosen token is fed next
        self.stats.last_batch = 1
        for step in steps:
            if not self._deliver(request, step):
                break
        return True

    @torch.inference_mode()
    def _decode_compiled(self, group: list[Request]) -> torch.Tensor:
        """Feed each request's next token through the compiled step, all in one call; the logits of
        each. A row's logits are the same bits alone or in any batch (plinth/compiled_decode.py)."""
        group.sort(key=lambda r: r.slot)
        positions = [r.computed for r in group]
        self.cache.reserve(group[-1].slot + 1, self.decoder.positions_needed(self.cache, max(positions)))
        logits = self.decoder([r.tokens[r.computed] for r in group], positions, self.cache, [r.slot for r in group])
        for r in group:
            r.computed += 1
        self.stats.last_batch = len(group)
        return logits.float()

    def use_compiled(self, build: bool = True) -> bool:
        """Decode through compiled programs from now on (and check a lone request's guesses in them,
        where the verify pass gives the step's bits), on the engine thread:
        `engine.call(engine.use_compiled).result()`. build: compile the programs not kept yet (minutes
        the first time for a model, under a second once kept); False: only if `plinth compile`, or an
        earlier build, kept them (the verify pass's too, when speculating). Returns whether decoding
        is compiled. Requests decoding already go on through the programs from their next token.
        Writes nothing into the cache."""
        from plinth.compiled_decode import VERIFY_TOKENS, CompiledDecoder
        decoder = self.decoder or self._unready or CompiledDecoder(self.model, self.threads, build)
        decoder.build = decoder.build or build
        if not decoder.build and not (decoder.ready(self.cache) and
                                      (not self.speculate or decoder.ready(self.cache, VERIFY_TOKENS))):
            self._unready = decoder
            return False
        with torch.inference_mode():
            decoder.program(self.cache)
            if self.speculate and not decoder.verifies(self.cache):
                print("plinth: the compiled verify pass does not give the decoding step's bits on this machine (or "
                      "is not kept); a lone request decodes without guesses", file=sys.stderr)
        self.decoder, self._unready = decoder, None
        return True

    def _postprocess(self, group: list[Request], logits: torch.Tensor | None):
        if logits is None:  # every request of the group is still prefilling
            return
        for request, row in zip(group, logits):
            if request.pending or request.cancelled:  # still prefilling, or gone
                continue
            try:
                step = request.seq.step(row)
            except Exception as e:  # one request's failure is its own
                self._finish(request, e)
                continue
            self._deliver(request, step)

    def _deliver(self, request: Request, step: Step) -> bool:
        """Give `request` its next token; False once the request has ended (the step finished it,
        or its receiver failed: one request's failure is its own)."""
        request.tokens.append(step.choice.token)
        self.stats.generated_tokens += 1
        try:
            request.emit(step)
        except Exception as e:
            self._finish(request, e)
            return False
        if step.finish_reason:
            self._finish(request, None)
            return False
        return True

    def _fail_all(self, error: Exception):
        for request in list(self.running):
            self._finish(request, error)
        with self._wake:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            self._finish(request, error)

    def _finish(self, request: Request, error: Exception | None):
        if request in self.running:
            self.running.remove(request)
            self.free_slots.append(request.slot)
            if error is None and request.images is None and request.computed >= self.piece:  # its rows stay
                self.kept[request.slot] = (request.adapter, request.prefilled)
                self.written[request.slot] = written_end(request)
            self._fit_cache()
        if error is not None:
            self.stats.failed += 1
            try:
                request.emit(error)
            except Exception:  # noqa: BLE001 - the receiver is gone; nothing more to tell it
                pass
        elif request.cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1


def written_end(request: Request) -> int:
    """How far a request's passes may have written its row: a verify pass leaves the keys of the
    guesses it rejected past what it computed (fewer than PASS_LIMIT)."""
    return request.computed + PASS_LIMIT


def shared_prefix(held: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens of `prompt` (at most `limit`) equal those of `held`."""
    n = 0
    for a, b in zip(held[:limit], prompt):
        if a != b:
            break
        n += 1
    return n


def default_threads() -> int:
    """Every core this process may use. The HTTP layer needs little CPU (about 4% of a core while
    streaming 16 clients), and the server keeps its main thread off OpenMP (see app.serve), so the
    model's threads spin-wait between kernels instead of sleeping and waking."""
    return len(usable_cpus())


class QueueFull(PlinthError):
    """Too many requests waiting; the caller should retry later (HTTP 429)."""


class TextOnly(PlinthError):
    """Images sent to a model without an image encoder (HTTP 400)."""

    def __init__(self):
        super().__init__("this model reads text only: it has no image encoder; send text, or use an image+text "
                         "model (plinth finetune recipes/vqa-easy.yaml)")


class EngineDown(PlinthError):
    """The engine thread is not running (HTTP 503)."""
