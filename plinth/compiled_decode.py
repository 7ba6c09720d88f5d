"""Decoding through a compiled step: `plinth.load(MODEL).compile()`, `plinth generate --compile`,
`plinth serve --compile` (every decoding step of the batch).

An eager decoding step of a small model is hundreds of small operations (norms, casts, rotations,
residual adds, the attention of each layer), each a separate call into PyTorch, and on a CPU they
cost as much as the weight-reading matrix products. AOTInductor compiles the step ahead of time
into one shared library: the small operations are fused into a few loops, and with `max_autotune`
and the weights frozen in as constants, inductor also generates its own int4 and int8
matrix-vector kernels for the model's shapes where they beat PyTorch's (benchmarks/decode.py
measures the step; docs/speed.md). A step is then one call into C++, with no Python, dynamo or
guards between the operations.

The step reads and writes the same `KVCache` as the eager passes (the prompt is prefilled eagerly),
through `StepView`, a cache view with `CacheView`'s decoding interface whose shapes export can
trace: the rows, their positions and the keys' length are tensors or dynamic sizes, so one program
serves every batch at every position. Its kernels loop over rows the same way at every batch size,
so a row gets the same bits alone or beside any others, as in eager decoding (the tests check it).
Its arithmetic is not the eager step's (fused loops sum in another order), so a sequence decoded
compiled is not bit for bit the one decoded eagerly, and prompt-lookup speculation (whose verify
passes are eager and must give plain decoding's bits) is off while compiled.

Compiling takes a minute or two for a model. The library is kept in PROGRAM_CACHE
(~/.cache/plinth/programs, or $PLINTH_PROGRAM_CACHE) under a name that digests everything it was
built from (`program_digests`): the weights, the config, the cache's layout, the thread count (the
program's loops keep the one it was compiled with), plinth's and PyTorch's versions and the CPU's
instruction set. A later process loads it in well under a second; anything changed makes another
name, never a stale program, and a new build of the same step replaces the old one. The weights are
frozen into the program when it is built; once loaded, it reads the model's own tensors where its
constants are copies of them (`share_model_tensors`). A model whose weights change afterwards needs
a new CompiledDecoder.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

import plinth
from plinth.errors import PlinthError
from plinth.files import atomic_file
from plinth.kv_cache import KEY_BLOCK, KVCache, ring_positions, whole_key_blocks
from plinth.model import attention_mask

MADV_DONTNEED = 4
PROGRAM_CACHE = Path(os.environ.get("PLINTH_PROGRAM_CACHE", Path.home() / ".cache" / "plinth" / "programs"))
# The weights appended to the library, which the runtime maps at load (see `release_read_pages`).
OPTIONS = {"max_autotune": True, "cpp_wrapper": True, "freezing": True, "aot_inductor.force_mmap_weights": True}


class StepView:
    """A compiled step's view of a KVCache: `CacheView`'s decoding interface (write, decode_keys,
    spread, gather, decode_bias) over a span of S consecutive cache rows, B of which (`rows`, indices
    into the span) feed one token each at `positions` (B,); `length`, the keys read by layers that
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
        self._biases = {}

    def write(self, layer: int, k, v):
        ring = self.rings[layer]
        index = self.positions if ring is None else self.positions % ring
        self.keys[layer][self.rows, :, index] = k[:, :, 0].to(self.dtype)  # (B, K, D) at each row's position
        self.values[layer][self.rows, :, index] = v[:, :, 0].to(self.dtype)

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
        if (window, ring) not in self._biases:
            query = self.ends[:, None] - 1  # (S, 1)
            if ring is None:
                keys = torch.arange(self.length, device=query.device)[None]
            else:
                keys = ring_positions(query, ring, ring)
            allowed = attention_mask(query, keys, True, window)[:, 0]  # (S, 1, L)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            self._biases[window, ring] = bias[:, None].expand(-1, heads, -1, -1).flatten(0, 1)  # (S·heads, 1, L)
        return self._biases[window, ring]


class DecodeStep(torch.nn.Module):
    """What is compiled: next-token logits (B, V) after the tokens whose input vectors are `x` (B, 1, C),
    at `positions` (B,), in the span's rows `rows` (B,), reading and writing a span of S cache rows
    (each layer's keys and values, (S, K, L, D)); `length`'s size is the keys' length. The embedding
    lookup stays outside: frozen in, the table (a large share of a small model) would be one more
    copy in memory for a single gather."""

    def __init__(self, model, windows: list, rings: list):
        super().__init__()
        self.model, self.windows, self.rings = model, windows, rings

    def forward(self, x, rows, positions, length, keys: list, values: list):
        model = self.model
        view = StepView(keys, values, rows, positions, length.shape[0], self.windows, self.rings)
        h = model.blocks(x, model.ropes_at(positions[:, None]), None, view)
        return model.project(h[:, 0])  # (B, C) rows: inductor's output-layer kernel takes 2-D rows


class CompiledDecoder:
    """Next-token logits for a batch of sequences, one token each a call, from a compiled step over
    `cache` (made by `new_cache`, or a serving engine's, already holding the positions before). A
    program for the cache's layout is loaded, or built and kept, at the first call with it."""

    def __init__(self, model):
        self.model = model
        # per layout of cache (its dtype and rings): the program, and the tensors it reads and does not
        # own (`share_model_tensors`), which must live as long as it
        self._programs = {}

    def new_cache(self, length: int) -> KVCache:
        """A KVCache for a sequence of `length` positions, one KEY_BLOCK longer than it: the keys a
        step reads are then never the cache's whole length (which export would not keep apart from a
        shorter read)."""
        return KVCache.for_model(self.model, 1, length + KEY_BLOCK, slack=0)

    @staticmethod
    def positions_needed(cache: KVCache, position: int) -> int:
        """The positions a cache that grows (`KVCache.reserve`) must hold for a step at `position`:
        the keys it reads, and every ring whole (a step reads its whole ring)."""
        return max(whole_key_blocks(position + 1), cache.ring or 0)

    def __call__(self, tokens: list[int], positions: list[int], cache: KVCache,
                 slots: list[int] | None = None) -> torch.Tensor:
        """Logits (B, V) after `tokens` at `positions`, in cache rows `slots` (default 0..B-1; a
        serving engine's cache grows: see `positions_needed`)."""
        layout = str(cache.dtype), tuple(cache.rings)
        if layout not in self._programs:
            program = self._load(cache)
            self._programs[layout] = program, share_model_tensors(program, self.model)
        device, slots = cache.device, slots or list(range(len(tokens)))
        first = min(slots)
        keys, values = ([t[first:max(slots) + 1] for t in tensors] for tensors in (cache.k, cache.v))
        length = torch.empty(whole_key_blocks(max(positions) + 1), device=device)
        inputs = [self._input(torch.tensor(tokens, device=device)[:, None]), torch.tensor(slots, device=device) - first,
                  torch.tensor(positions, device=device), length, *keys, *values]
        program, _ = self._programs[layout]
        return program.run(inputs)[0]

    def _input(self, token: torch.Tensor) -> torch.Tensor:
        return self.model.scaled_input(self.model.tok_embeddings(token))  # (B, 1, C)

    def _load(self, cache: KVCache):
        step, build = program_digests(self.model, cache)
        path, alone = PROGRAM_CACHE / f"{step}-{build}.so", None
        if not path.exists():
            try:
                with atomic_file(path) as tmp:
                    self._build(cache, tmp)
                for older in PROGRAM_CACHE.glob(f"{step}-*.so"):  # this step built by an earlier plinth or torch
                    if older != path:
                        older.unlink(missing_ok=True)
            except OSError as e:  # a read-only home, a full disk: compile for this process alone
                print(f"plinth: could not keep the compiled decoding step in {PROGRAM_CACHE} ({e}); the next "
                      "start will compile it again", file=sys.stderr)
                alone = Path(tempfile.mkdtemp(prefix="plinth-program-"))
                path = alone / "step.so"
                self._build(cache, path)
        program = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        release_read_pages(path)
        if alone is not None:  # the loaded library stays mapped after its file is removed
            shutil.rmtree(alone, ignore_errors=True)
        return program

    def _build(self, cache: KVCache, target: Path):
        """Export the step for caches like `cache`, compile it with AOTInductor, and write
        the library to `target`."""
        from torch._inductor import aoti_compile_and_package, config, exc  # imported only to build: seconds
        model = self.model
        longest = model.config.max_seq_len + KEY_BLOCK
        with torch.inference_mode(False), torch.no_grad():  # export traces ordinary tensors
            # Two of a span's three rows feed a token: the example has every size a step varies in.
            keys, values = ([torch.zeros(3, t.shape[1], 2 * KEY_BLOCK if ring is None else ring, t.shape[3],
                                         dtype=t.dtype, device=t.device)
                             for t, ring in zip(tensors, cache.rings)] for tensors in (cache.k, cache.v))
            example = (self._input(torch.tensor([[0], [0]])), torch.tensor([0, 2]), torch.tensor([0, 5]),
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
                with tempfile.TemporaryDirectory() as folder, config.patch(OPTIONS):
                    package = aoti_compile_and_package(program, package_path=f"{folder}/step.pt2")
                    with zipfile.ZipFile(package) as archive, open(target, "wb") as out:
                        library = next(n for n in archive.namelist() if n.endswith(".so"))
                        shutil.copyfileobj(archive.open(library), out)
            except (exc.InductorError, exc.CppCompileError) as e:
                raise PlinthError(f"compiling the decoding step failed: {str(e).strip().splitlines()[0]}. Inductor "
                                  "compiles C++ with the machine's compiler (g++; apt-get install g++); or decode "
                                  "without --compile") from e


def share_model_tensors(program, model) -> dict:
    """Make the program read the model's own tensors where its constants are copies of them (the
    same name, layout and values: the int4 layers' codes, scales and zeros, the output layer's int8
    rows), and free its copies: a process then holds those weights once, for prefill and decoding
    alike. Constants of the program's own (weights in a kernel's layout, tables) are copied out of
    the buffer that is freed. The program owns none of the tensors it is handed (`user_managed`):
    the returned dict holds them, and must live as long as the program."""
    own = dict(model.named_buffers()) | dict(model.named_parameters())
    name_of = {fqn: name for name, fqn in program.get_constant_names_to_original_fqns().items()}
    constants = {}
    for fqn, tensor in program.extract_constants_map(False).items():
        mine = own.get(fqn.removeprefix("model."))  # DecodeStep holds the model as `model`
        same = mine is not None and mine.dtype == tensor.dtype and mine.shape == tensor.shape \
            and mine.stride() == tensor.stride() and torch.equal(mine, tensor)
        constants[name_of.get(fqn, fqn)] = mine if same else tensor.clone()
    # every constant into the unused buffer, which then serves, and the old one is freed
    program.update_constant_buffer(constants, True, True, True)
    program.swap_constant_buffer()
    program.free_inactive_constant_buffer()
    return constants


def release_read_pages(path: Path):
    """AOTInductor's runtime maps the weights appended to the library, copies them into memory of
    its own and keeps the mapping: the pages it read would stay counted in the process's memory
    beside the copy. Mappings of the library never written to (no anonymous pages, so nothing a
    relocation changed) whose size is most of the file's give them back (MADV_DONTNEED: Linux reads
    them from the file again if they are ever touched)."""
    try:
        maps = Path("/proc/self/smaps").read_text()
    except OSError:  # not Linux
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = path.stat().st_size
    for mapping in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", maps):
        header, *fields = mapping.splitlines()
        if not header.endswith(f" {path}"):
            continue
        start, end = (int(address, 16) for address in header.split()[0].split("-"))
        anonymous = next(int(f.split()[1]) for f in fields if f.startswith("Anonymous:"))
        if anonymous == 0 and end - start > size // 2:
            madvise(start, end - start, MADV_DONTNEED)


def program_digests(model, cache: KVCache) -> tuple[str, str]:
    """Two names for the program compiled from `model` for caches like `cache`: what the step
    computes and how it runs (the weights, the config, the cache's layout, the thread count), and
    what built it (plinth's sources, PyTorch's version, the CPU's instruction set, the options). A
    new build of a step replaces the step's older ones."""
    step = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        step.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        step.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    step.update(json.dumps([model.config.to_json(), str(cache.dtype), cache.windows, cache.rings,
                            torch.get_num_threads()]).encode())
    build = hashlib.sha256()
    for source in sorted(Path(plinth.__file__).parent.rglob("*.py")):
        build.update(source.read_bytes())
    build.update(json.dumps([torch.__version__, torch.backends.cpu.get_cpu_capability(), repr(OPTIONS)]).encode())
    return step.hexdigest()[:32], build.hexdigest()[:32]
