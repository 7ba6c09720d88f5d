"""Decoding through a compiled step: what `plinth serve` (every decoding step of the batch) and
`plinth generate` do by default once the programs are kept (`plinth compile`, or a first `plinth
serve`, which builds them in the background: plinth/serve/background_build.py), and
`plinth.load(MODEL).compile()`.

An eager decoding step of a small model is hundreds of small operations (norms, casts, rotations,
residual adds, the attention of each layer), each a separate call into PyTorch, and on a CPU they
cost as much as the weight-reading matrix products. AOTInductor compiles the step ahead of time
into one shared library: the small operations are fused into a few loops, and with `max_autotune`
and the weights frozen in as constants, inductor also generates its own int4 and int8
matrix-vector kernels for the model's shapes where they beat PyTorch's (benchmarks/decode.py
measures the step; docs/speed.md). A step is then one call into C++, with no Python, dynamo or
guards between the operations.

The step reads and writes the same `KVCache` as the eager passes (the prompt is prefilled eagerly up
to its last token, which the step feeds), through `StepView`, a cache view with `CacheView`'s decoding interface whose shapes export can
trace: the rows, their positions and the keys' length are tensors or dynamic sizes, so one program
serves every batch at every position. Its kernels loop over rows the same way at every batch size,
so a row gets the same bits alone or beside any others, as in eager decoding (the tests check it).
Its arithmetic is not the eager step's (fused loops sum in another order), so a sequence decoded
compiled is not bit for bit the one decoded eagerly. Prompt-lookup speculation checks its guesses
in a second program, of VERIFY_TOKENS tokens a row, whose logits are the step's bits (`verifies`
checks it), so that it keeps compiled decoding's output.

Compiling takes a minute or two for a program (a decoder made with build=False runs only kept
ones: `ready`, `runs`). A program is kept in PROGRAM_CACHE
(~/.cache/plinth/programs, or $PLINTH_PROGRAM_CACHE), a folder per program named by a digest of
everything it was built from (`program_digests`): the weights, the config, the cache's layout, the
tokens a row, the thread count it was tuned on (its loops take the count of each call), plinth's
and PyTorch's versions and the CPU's instruction set. A later process loads it in well under a second; anything
changed makes another name, never a stale program, and a new build of the same step replaces the
old one. The weights are frozen in when it is built (kernels are chosen for them, some rearranged
into a kernel's layout), but the library holds none: the program reads the model's own tensors,
and the few constants of its own are kept beside it (`keep_program`), so a process holds the
weights once. A model whose weights change afterwards needs a new CompiledDecoder.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

import plinth
from plinth.errors import PlinthError
from plinth.kv_cache import KEY_BLOCK, KVCache, ring_positions, whole_key_blocks
from plinth.model import attention_mask
from plinth.quant import Int8Head
from plinth.speculative import ROWS

PROGRAM_CACHE = Path(os.environ.get("PLINTH_PROGRAM_CACHE", Path.home() / ".cache" / "plinth" / "programs"))
# The constants stay out of the library, each stored whole beside it in the package (`keep_program`);
# the loops run on the thread count in force at each call (`CpuShare` lowers it beside a busy process).
OPTIONS = {"max_autotune": True, "cpp_wrapper": True, "freezing": True, "aot_inductor.package_constants_in_so": False,
           "aot_inductor.package_constants_on_disk_format": "pickle_weights", "cpp.dynamic_threads": True}
LIBRARY, CONSTANTS = "step.so", "constants.pt"
VERIFY_TOKENS = ROWS  # a verify pass: the last chosen token and ROWS - 1 guesses (plinth/speculative.py)
# Rows fed (tokens of all passes) between giving back the file pages of the tables a pass reads a
# few rows of (`row_tables`): a pass of many rows reads many, a lone sequence's step few.
RELEASE_EVERY = 64
PAGE, MADV_DONTNEED = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096, 4


class StepView:
    """A compiled step's view of a KVCache: `CacheView`'s decoding interface (write, decode_keys,
    spread, gather, decode_bias) over a span of S consecutive cache rows, B of which (`rows`, indices
    into the span) feed T tokens each from `positions` (B,); T (1, or a verify pass's) is fixed in a
    program, attended token by token as the eager view does; `length`, the keys read by layers that
    keep every position (whole KEY_BLOCKs), is a dynamic size, as B and S are. Rows of the span
    outside the pass attend to their key 0 and their results are dropped, as in `CacheView`. A ring
    layer (a sliding window's) reads its whole ring, each index masked by the position it holds, as
    the eager view does once the ring has filled."""

    def __init__(self, keys: list, values: list, rows: torch.Tensor, positions: torch.Tensor, length: int,
                 windows: list, rings: list):
        self.keys, self.values, self.rows, self.positions, self.length = keys, values, rows, positions, length
        self.windows, self.rings = windows, rings
        self.dtype = keys[0].dtype
        self.span = keys[0].shape[0]
        # each span row's keys end after its new token; a row feeding nothing sees its key 0
        self.ends = torch.ones(self.span, dtype=positions.dtype, device=positions.device).index_copy(
            0, rows, positions + 1)
        self._biases, self.T = {}, 1

    def write(self, layer: int, k, v):
        ring, T = self.rings[layer], k.shape[2]
        if T == 1:
            index = self.positions if ring is None else self.positions % ring
            self.keys[layer][self.rows, :, index] = k[:, :, 0].to(self.dtype)  # (B, K, D) at each row's position
            self.values[layer][self.rows, :, index] = v[:, :, 0].to(self.dtype)
            return
        index = self.positions[:, None] + torch.arange(T, device=k.device)  # (B, T)
        index = index if ring is None else index % ring
        self.keys[layer][self.rows[:, None], :, index] = k.transpose(1, 2).to(self.dtype)  # (B, T, K, D)
        self.values[layer][self.rows[:, None], :, index] = v.transpose(1, 2).to(self.dtype)
        self.T = T

    def decode_keys(self, layer: int, B: int, T: int = 1):
        # The span's (S·K, L, D) by narrowing, always a view: a slice or a flatten that copies or not
        # depending on whether L is the cache's whole length would compile a program for each case.
        length = self.length if self.rings[layer] is None else self.rings[layer]
        return tuple(t[layer].narrow(2, 0, length).flatten(0, 1) for t in (self.keys, self.values))

    def spread(self, x):
        return x.new_zeros(self.span, *x.shape[1:]).index_copy(0, self.rows, x)

    def gather(self, x):
        return x.index_select(0, self.rows)

    def decode_bias(self, layer: int, heads: int, t: int = 0) -> torch.Tensor:
        window, ring = self.windows[layer], self.rings[layer]
        if (window, ring, t) not in self._biases:
            query = self.ends[:, None] - 1 + t  # (S, 1)
            if ring is None:
                keys = torch.arange(self.length, device=query.device)[None]
            else:
                keys = ring_positions(self.ends[:, None] - 2 + self.T, ring, ring)
            allowed = attention_mask(query, keys, True, window)[:, 0]  # (S, 1, L)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            self._biases[window, ring, t] = bias[:, None].expand(-1, heads, -1, -1).flatten(0, 1)  # (S·heads, 1, L)
        return self._biases[window, ring, t]


class DecodeStep(torch.nn.Module):
    """What is compiled: next-token logits (B·T, V) after each of the tokens whose input vectors are
    `x` (B, T, C), from `positions` (B,), in the span's rows `rows` (B,), reading and writing a span of S cache rows
    (each layer's keys and values, (S, K, L, D)); `length`'s size is the keys' length. The embedding
    lookup stays outside: frozen in, the table (a large share of a small model) would be one more
    copy in memory for a single gather."""

    def __init__(self, model, windows: list, rings: list):
        super().__init__()
        self.model, self.windows, self.rings = model, windows, rings

    def forward(self, x, rows, positions, length, keys: list, values: list):
        model = self.model
        view = StepView(keys, values, rows, positions, length.shape[0], self.windows, self.rings)
        T = x.shape[1]
        at = positions[:, None] if T == 1 else positions[:, None] + torch.arange(T, device=x.device)
        h = model.blocks(x, model.ropes_at(at), None, view)
        return model.project(h[:, 0] if T == 1 else h.flatten(0, 1))  # (B·T, C) rows: inductor's output-layer kernel takes 2-D rows


def compile_by_default() -> bool:
    """Whether `plinth serve` and `plinth generate` decode compiled when not told (--compile,
    --no-compile): unless $PLINTH_COMPILE is 0, as in the test suite, whose many short-lived models
    would otherwise each start a build."""
    return os.environ.get("PLINTH_COMPILE", "1") != "0"


class CompiledDecoder:
    """Next-token logits for a batch of sequences, one token each a call, from a compiled step over
    `cache` (made by `new_cache`, or a serving engine's, already holding the positions before); and
    for one sequence, the logits after each token of a verify pass of VERIFY_TOKENS (its last chosen
    token and guesses: plinth/speculative.py), from a second program, where `verifies`. A program
    for the cache's layout is loaded, or built and kept, at the first call that needs it."""

    verify_tokens = VERIFY_TOKENS
    guesses = VERIFY_TOKENS - 1  # a verify pass feeds the last chosen token and this many guesses

    def __init__(self, model, threads: int | None = None, build: bool = True):
        """threads: the thread count its programs are tuned on, a part of their names (default: the
        count in force when one is loaded). build: compile a program not kept yet at the first call
        that needs it (minutes); False: only kept programs run (`ready`: `plinth compile` keeps them)."""
        self.model, self.threads, self.build = model, threads, build
        # per layout of cache (its dtype and rings) and tokens a row: the program, and the tensors it
        # reads and does not own (`open_program`), which must live as long as it
        self._programs = {}
        self._verifies = {}  # per layout of cache: whether its verify pass gives the step's bits
        self._weights = None  # `weights_digest`, once: every program of the model names its weights
        self._fed, self._tables = 0, None  # rows fed since pages were last given back; `row_tables`

    def new_cache(self, length: int) -> KVCache:
        """A KVCache for a sequence of `length` positions, one KEY_BLOCK longer than it: the keys a
        step reads are then never the cache's whole length (which export would not keep apart from a
        shorter read), and a verify pass's guesses past the last position still have room."""
        return KVCache.for_model(self.model, 1, length + KEY_BLOCK, slack=0)

    def runs(self, length: int) -> bool:
        """Whether a sequence of `length` positions decodes compiled: this decoder builds what is not
        kept, or the step for `new_cache(length)`'s layout is kept and loads (checked on an empty
        cache of it; a kept program that does not load is reported, and decoding is eager)."""
        if self.build:
            return True
        layout = KVCache.for_model(self.model, 1, length + KEY_BLOCK, grow=True, slack=0)
        if not self.ready(layout):
            return False
        try:
            self.program(layout)
        except Exception as e:  # a damaged or foreign file: decoding goes on without it
            print(f"plinth: the compiled decoding program kept in {self._folder(layout, 1)} does not load ({e}); "
                  "decoding eagerly (remove the folder, and `plinth compile` builds it again)", file=sys.stderr)
            return False
        return True

    @staticmethod
    def positions_needed(cache: KVCache, position: int, tokens: int = 1) -> int:
        """The positions a cache that grows (`KVCache.reserve`) must hold for a pass of `tokens` from
        `position`: the keys it reads, and every ring whole (a step reads its whole ring)."""
        return max(whole_key_blocks(position + tokens), cache.ring or 0)

    def ready(self, cache: KVCache, tokens: int = 1) -> bool:
        """Whether the program of `tokens` tokens a row for caches like `cache` runs without
        compiling: loaded, or kept in PROGRAM_CACHE."""
        return self._key(cache, tokens) in self._programs or (self._folder(cache, tokens) / LIBRARY).exists()

    def __call__(self, tokens: list[int], positions: list[int], cache: KVCache,
                 slots: list[int] | None = None) -> torch.Tensor:
        """Logits (B, V) after `tokens` at `positions`, in cache rows `slots` (default 0..B-1; a
        serving engine's cache grows: see `positions_needed`)."""
        return self._run([[token] for token in tokens], positions, cache, slots)

    def checked(self, drafts: list[int]) -> list[int]:
        """The guesses of `drafts` a verify pass checks: the first `guesses` when there are as many,
        else none (the next pass is a plain step)."""
        return drafts[:self.guesses] if len(drafts) >= self.guesses else []

    def verify(self, tokens: list[int], position: int, cache: KVCache, slot: int = 0) -> torch.Tensor:
        """Logits (VERIFY_TOKENS, V) after each of `tokens` (VERIFY_TOKENS of them) fed from `position`
        in cache row `slot`: bit for bit those of feeding them one a call."""
        if len(tokens) != VERIFY_TOKENS:
            raise ValueError(f"a verify pass feeds {VERIFY_TOKENS} tokens, got {len(tokens)}")
        return self._run([tokens], [position], cache, [slot])

    def verifies(self, cache: KVCache) -> bool:
        """Whether verify passes over caches like `cache` give each token the decoding step's bits,
        so that checking guesses in them keeps plain decoding's output. Kernels are chosen per program
        by timing them, so the two programs could choose differently: the first call for a layout
        loads (or builds) the verify program and compares the two on a few tokens of scratch caches.
        False: guesses are not checked, compiled."""
        layout = str(cache.dtype), tuple(cache.rings)
        if layout not in self._verifies and not self.build and not self.ready(cache, VERIFY_TOKENS):
            self._verifies[layout] = False
        if layout not in self._verifies:
            scratch = [copy.copy(cache) for _ in range(2)]
            for each in scratch:
                each.k, each.v = empty_rows(cache, 1)
            tokens = list(range(1, VERIFY_TOKENS + 1))
            alone = torch.cat([self([token], [position], scratch[0]) for position, token in enumerate(tokens)])
            self._verifies[layout] = torch.equal(alone, self.verify(tokens, 0, scratch[1]))
        return self._verifies[layout]

    def _run(self, tokens: list[list[int]], positions: list[int], cache: KVCache, slots: list[int] | None):
        """Logits (B·T, V) after each of the B rows' T tokens, fed from `positions`."""
        program, _ = self.program(cache, len(tokens[0]))
        device, slots = cache.device, slots or list(range(len(tokens)))
        first = min(slots)
        keys, values = ([t[first:max(slots) + 1] for t in tensors] for tensors in (cache.k, cache.v))
        length = torch.empty(whole_key_blocks(max(positions) + len(tokens[0])), device=device)
        inputs = [self._input(torch.tensor(tokens, device=device)), torch.tensor(slots, device=device) - first,
                  torch.tensor(positions, device=device), length, *keys, *values]
        logits = program.run(inputs)[0]
        self._fed += len(tokens) * len(tokens[0])
        if self._fed >= RELEASE_EVERY:
            self._fed = 0
            self._tables = self._tables or row_tables(self.model, self.held())
            for table in self._tables:
                release_file_pages(table)
        return logits

    def _input(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.scaled_input(self.model.tok_embeddings(tokens))  # (B, T, C)

    def program(self, cache: KVCache, tokens: int = 1):
        """The program of `tokens` tokens a row for caches like `cache`, and the tensors it reads
        (`open_program`): loaded at the first call for them, from PROGRAM_CACHE, or built and kept."""
        key = self._key(cache, tokens)
        if key not in self._programs:
            self._programs[key] = self._load(cache, tokens)
        return self._programs[key]

    def held(self) -> list[torch.Tensor]:
        """The tensors the loaded programs read and do not own (`open_program`)."""
        return [tensor for _, held in self._programs.values() for tensor in held.values()]

    @staticmethod
    def _key(cache: KVCache, tokens: int) -> tuple:
        return str(cache.dtype), tuple(cache.rings), tokens

    def _folder(self, cache: KVCache, tokens: int) -> Path:
        self._weights = self._weights or weights_digest(self.model)
        return PROGRAM_CACHE / "-".join(program_digests(self.model, cache, tokens, self._weights, self.threads))

    def _load(self, cache: KVCache, tokens: int):
        folder, alone = self._folder(cache, tokens), None
        step = folder.name.split("-")[0]
        if not (folder / LIBRARY).exists():
            if not self.build:
                raise PlinthError(f"no compiled decoding program of {tokens} tokens a row is kept for this model in "
                                  f"{PROGRAM_CACHE}; `plinth compile MODEL` builds them")
            try:
                PROGRAM_CACHE.mkdir(parents=True, exist_ok=True)
                # a folder of this process's own: another may be building the same program meanwhile
                tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=PROGRAM_CACHE))
                try:
                    with tuned_on(self.threads):
                        self._build(cache, tokens, tmp)
                    if not (folder / LIBRARY).exists():  # else another process kept it first
                        shutil.rmtree(folder, ignore_errors=True)  # a folder without its library
                        try:
                            tmp.rename(folder)
                        except OSError:
                            if not (folder / LIBRARY).exists():
                                raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                for older in PROGRAM_CACHE.glob(f"{step}-*"):  # this step built by an earlier plinth or torch
                    if older != folder:
                        shutil.rmtree(older, ignore_errors=True)
                for library in PROGRAM_CACHE.glob("*.so"):  # a program of plinth's earlier one-file layout
                    library.unlink(missing_ok=True)
            except OSError as e:  # a read-only home, a full disk: compile for this process alone
                print(f"plinth: could not keep the compiled decoding step in {PROGRAM_CACHE} ({e}); the next "
                      "start will compile it again", file=sys.stderr)
                folder = alone = Path(tempfile.mkdtemp(prefix="plinth-program-"))
                with tuned_on(self.threads):
                    self._build(cache, tokens, folder)
        try:
            # the programs of one model hold the same tables and rearranged weights: each is held once
            return open_program(folder, self.model, self.held())
        finally:
            if alone is not None:  # the loaded library stays mapped after its file is removed
                shutil.rmtree(alone, ignore_errors=True)

    def _build(self, cache: KVCache, tokens: int, folder: Path):
        """Export the step of `tokens` tokens a row for caches like `cache`, compile it with
        AOTInductor, and keep the library and the constants the model does not hold in `folder`
        (`keep_program`)."""
        from torch._inductor import aoti_compile_and_package, config, exc  # imported only to build: seconds
        model = self.model
        longest = model.config.max_seq_len + KEY_BLOCK
        with torch.inference_mode(False), torch.no_grad():  # export traces ordinary tensors
            # Two of a span's three rows feed a token: the example has every size a step varies in.
            keys, values = empty_rows(cache, 3)
            example = (self._input(torch.zeros(2, tokens, dtype=torch.long)), torch.tensor([0, 2]), torch.tensor([0, 5]),
                       torch.empty(KEY_BLOCK), keys, values)
            # The batch, the span of cache rows, the keys' length and the cache's, which change from step
            # to step and cache to cache, stay sizes of the one program; rings keep theirs.
            batch, span = torch.export.Dim("batch", min=1), torch.export.Dim("span", min=1)
            length, held = torch.export.Dim("length", max=longest), torch.export.Dim("held", max=longest)
            grows = [{0: span} if ring else {0: span, 2: held} for ring in cache.rings]
            shapes = {"x": {0: batch}, "rows": {0: batch}, "positions": {0: batch}, "length": {0: length},
                      "keys": grows, "values": grows}
            step = DecodeStep(model, cache.windows, cache.rings).eval()
            try:
                program = torch.export.export(step, example, dynamic_shapes=shapes, strict=False)
                with tempfile.TemporaryDirectory() as work, config.patch(OPTIONS):
                    package = aoti_compile_and_package(program, package_path=f"{work}/step.pt2")
                    keep_program(package, model, folder)
            except (exc.InductorError, exc.CppCompileError) as e:
                raise PlinthError(f"compiling the decoding step failed: {str(e).strip().splitlines()[0]}. Inductor "
                                  "compiles C++ with the machine's compiler (g++; apt-get install g++); or decode "
                                  "without --compile") from e


@contextlib.contextmanager
def tuned_on(threads: int | None):
    """Kernels are chosen by timing them on the threads in force: `threads` (None: as they are),
    the count a program's name says it was tuned on."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def empty_rows(cache: KVCache, rows: int) -> tuple[list, list]:
    """Keys and values laid out as `cache`'s, per layer: `rows` rows of zeros, two KEY_BLOCKs of
    positions (the keys a step reads are then never a row's whole length), a ring's whole length."""
    return tuple([torch.zeros(rows, t.shape[1], 2 * KEY_BLOCK if ring is None else ring, t.shape[3], dtype=t.dtype,
                              device=t.device) for t, ring in zip(tensors, cache.rings)] for tensors in (cache.k, cache.v))


def model_tensors(model) -> dict:
    """The model's parameters and buffers by the names a program gives them (`DecodeStep` holds the
    model as `model`)."""
    return {f"model.{name}": t for name, t in (*model.named_parameters(), *model.named_buffers())}


def keep_program(package: str, model, folder: Path):
    """From an AOTInductor package built without its constants in the library (they are listed
    beside it, each stored whole), keep the library and, of the constants, those the model does not
    hold: weights in a kernel's layout, tables. The program reads the model's own tensors for the
    rest (the int4 layers' codes, scales and zeros, the output layer's int8 rows), which the model
    holds anyway for prefill: a process holds those weights once, and loading copies nothing."""
    own = model_tensors(model)
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
        with archive.open(next(n for n in names if n.endswith(".so"))) as library, open(folder / LIBRARY, "wb") as out:
            shutil.copyfileobj(library, out)
        listing = next(n for n in names if n.endswith("/weights_config.json"))
        stored, constants = {}, {}
        for fqn, (file, shape, stride, offset) in json.loads(archive.read(listing)).items():
            if file not in stored:
                data = archive.read(next(n for n in names if n.endswith(f"/data/weights/{file}")))
                stored[file] = torch.load(io.BytesIO(data), weights_only=True)
            value = stored[file].as_strided(shape, stride, offset)
            if not same_tensor(own.get(fqn), value):
                constants[fqn] = torch.empty_strided(shape, stride, dtype=value.dtype).copy_(value)
    torch.save(constants, folder / CONSTANTS)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Whether a program may read `a` for `b`: the same dtype, layout and values."""
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() \
        and torch.equal(a, b)


def open_program(folder: Path, model, held: list[torch.Tensor]):
    """The program kept in `folder`, reading the model's own tensors and the constants kept beside
    it, or an equal tensor of `held` (another program's) instead of one; and those tensors by the
    program's names for them, which it does not own (`user_managed`): the dict must live as long as
    the program."""
    program = torch._C._aoti.AOTIModelContainerRunnerCpu(str(folder / LIBRARY), 1)
    own, kept = model_tensors(model), torch.load(folder / CONSTANTS, weights_only=True)
    for fqn, tensor in kept.items():
        kept[fqn] = next((t for t in held if same_tensor(t, tensor)), tensor)
    constants = {name: kept[fqn] if fqn in kept else own[fqn]
                 for name, fqn in program.get_constant_names_to_original_fqns().items()}
    program.update_constant_buffer(constants, False, True, True)
    return program, constants


def program_digests(model, cache: KVCache, tokens: int = 1, weights: bytes | None = None,
                    threads: int | None = None) -> tuple[str, str]:
    """Two names for the program compiled from `model` for caches like `cache`, feeding `tokens` a
    row: what the step computes and how it runs (the weights, by `weights_digest` unless given, the
    config, the cache's layout, the tokens, the thread count its kernels were tuned on, by default
    the count in force), and
    what built it (plinth's sources, PyTorch's version, the CPU's instruction set, the options). A
    new build of a step replaces the step's older ones."""
    step = hashlib.sha256(weights or weights_digest(model))
    step.update(json.dumps([model.config.to_json(), str(cache.dtype), cache.windows, cache.rings,
                            threads or torch.get_num_threads()] + ([tokens] if tokens > 1 else [])).encode())
    build = hashlib.sha256(sources_digest())
    build.update(json.dumps([torch.__version__, torch.backends.cpu.get_cpu_capability(), repr(OPTIONS)]).encode())
    return step.hexdigest()[:32], build.hexdigest()[:32]


@functools.cache
def sources_digest() -> bytes:
    """A digest of plinth's sources, read once a process."""
    sources = hashlib.sha256()
    for source in sorted(Path(plinth.__file__).parent.rglob("*.py")):
        sources.update(source.read_bytes())
    return sources.digest()


def weights_digest(model) -> bytes:
    """A digest of the model's tensors: their names, layouts and values."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        # The step never reads the input embedding (looked up outside it; a tied output layer's
        # tensors are listed under its own names too), whose pages would be read in only to hash them.
        if name == "tok_embeddings.weight":
            continue
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)} {tensor.stride()}".encode())
        weights.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
        release_file_pages(tensor)
    return weights.digest()


def row_tables(model, held: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's tensors that a decoding pass reads a few rows of, other rows each pass: the input
    embedding (looked up before the program), and the output layer's rows that `refine_top` reads
    for each row's top candidates, where the program multiplies by a rearranged copy of its own
    (in `held`) rather than by them. Mapped from the model's file, the pages read would pile up in
    the process's memory, pass after pass, up to the whole tables; `release_file_pages` gives them
    back now and then, and the next pass that needs a row reads it from the page cache again."""
    head, tables = model.output, [model.tok_embeddings.weight]
    rows = getattr(head, "rows", None)  # an Int4Head's: the embedding's own rows
    if rows is None and isinstance(head, Int8Head) and any(same_layout_size(t, head.q) for t in held):
        rows = head.q
    if rows is not None and rows.data_ptr() != tables[0].data_ptr():
        tables.append(rows)
    return tables


def same_layout_size(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.numel() == b.numel()


def release_file_pages(tensor: torch.Tensor):
    """Give back the pages of `tensor`'s memory that are still its file's: a model loaded from its
    packed cache is mapped from the file (plinth/weights/packed.py), and every page hashing reads
    would stay counted in the process's memory, where the program never reads some of them (the
    output layer's rows, when every token is sampled through it). Linux reads a page given back from
    the file again if it is touched. Memory that is not a file's (a tensor of its own, or a mapped
    page written to, which then became a private copy) is left alone: then nothing is given back."""
    storage = tensor.untyped_storage()
    first = -(-storage.data_ptr() // PAGE)  # whole pages only: the ends may hold other tensors
    end = (storage.data_ptr() + storage.nbytes()) // PAGE
    if end <= first:
        return
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:  # 8 bytes per page: bit 63 present, 61 a file's
            pagemap.seek(first * 8)
            flags = torch.frombuffer(bytearray(pagemap.read((end - first) * 8)), dtype=torch.int64)
    except OSError:  # not Linux
        return
    present, swapped, files = flags < 0, (flags >> 62) & 1 == 1, (flags >> 61) & 1 == 1
    if (present & ~files).any() or swapped.any():  # a private copy, in memory or swapped out
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise(first * PAGE, (end - first) * PAGE, MADV_DONTNEED)
