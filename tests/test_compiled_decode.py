"""The compiled decoding step (plinth/compiled_decode.py): each step's logits are those of the whole
sequence computed eagerly without a cache (the independent reference), through a sliding-window
layer whose ring of keys wraps around and a global layer whose keys grow, in float32 and with int4
weights; and `plinth.load(...).compile()` generates through it plain decoding's greedy text."""
import os
from pathlib import Path

import pytest
import torch

from plinth.compiled_decode import CONSTANTS, LIBRARY, OPTIONS, RELEASE_EVERY, CompiledDecoder, row_tables
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.kv_cache import KEY_BLOCK, KVCache
from plinth.loaded import LoadedModel
from plinth.quant import compact_
from tests.conftest import byte_tokenizer, tiny_model

# Gemma 3's differences from llama, at tiny size: layer 0 attends in a 4-token window (a ring of 64
# key positions when the cache keeps rings), layer 1 globally.
GEMMA_LIKE = dict(mlp="geglu", qk_norm=True, sandwich_norm=True, embed_scale=True, sliding_window=4, global_every=2,
                  rope_local_theta=100.0)
PROMPT, LENGTH = 10, 150  # past the ring's 64 positions, and past two key blocks of the global layer


@pytest.fixture(scope="module", params=["float32", "int4"])
def compiled(request):
    model = compact_(tiny_model(**GEMMA_LIKE), request.param)
    loaded = LoadedModel(model, byte_tokenizer()).compile()
    assert isinstance(loaded.decoder, CompiledDecoder)
    return request.param, loaded


def test_each_compiled_step_gives_the_whole_sequences_logits(compiled):
    dtype, loaded = compiled
    model, decoder = loaded.model, loaded.decoder
    tokens = torch.randint(0, 256, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    cache = decoder.new_cache(LENGTH)
    assert cache.rings == [64, None]
    with torch.inference_mode():
        whole = model(tokens)[0].float()  # (LENGTH, V), every position at once, no cache
        model(tokens[:, :PROMPT], cache=cache.view())
        steps = torch.cat([decoder([int(tokens[0, p])], [p], cache) for p in range(PROMPT, LENGTH)]).float()
    expected = whole[PROMPT:]
    if dtype == "float32":
        torch.testing.assert_close(steps, expected, rtol=1e-4, atol=1e-4)
    else:  # bfloat16 activations: the fused step rounds in other places than the eager passes
        scale = expected.abs().max()
        assert (steps - expected).abs().max() < 0.02 * scale
        assert (steps.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


# float32 only: bfloat16 activations round differently when fused, and near-ties could break apart
@pytest.mark.parametrize("compiled", ["float32"], indirect=True)
def test_a_compiled_model_generates_plain_decodings_greedy_text(compiled):
    _, loaded = compiled
    tok, params = loaded.tokenizer, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    prompt = tok.encode("The window slides")
    plain = [s.choice.token for s in generate_stream(loaded.model, tok, prompt, params, speculate=False)]
    assert len(plain) == 80
    assert loaded.generate(prompt, max_tokens=80, temperature=0, ignore_eos=True) == tok.decode(plain)


@pytest.mark.parametrize("compiled", ["int4"], indirect=True)
def test_the_program_reads_the_models_own_int4_weights_not_a_copy(compiled):
    from plinth import compiled_decode
    _, loaded = compiled
    decoder, cache = loaded.decoder, loaded.decoder.new_cache(4)
    with torch.inference_mode():
        decoder([1], [0], cache)
    own = {f"model.{name}": t for name, t in loaded.model.named_buffers()}
    for program, _ in decoder._programs.values():
        constants = program.extract_constants_map(False)
        codes = [name for name in constants if name.endswith((".packed", ".scales_zeros"))]
        assert len(codes) == 2 * 4 * len(loaded.model.layers)  # wqkv, wo, w_gate_up, w_down
        assert all(constants[name].data_ptr() == own[name].data_ptr() for name in codes)
    # and neither the library nor the constants kept beside it hold a copy of them
    # named by the fixture's thread count, not whatever count earlier tests left in force
    folder = compiled_decode.PROGRAM_CACHE / "-".join(compiled_decode.program_digests(loaded.model, cache,
                                                                                    threads=decoder.threads))
    kept = torch.load(folder / CONSTANTS, weights_only=True)
    assert kept and not any(name.endswith((".packed", ".scales_zeros", "output.q")) for name in kept)
    library = (folder / LIBRARY).read_bytes()
    assert all(own[name].view(-1).view(torch.uint8).numpy().tobytes() not in library for name in codes if own[name].nbytes >= 1024)


def test_two_decoders_in_one_process_each_run_their_own_model(monkeypatch):
    """Programs are kept under a digest of the weights they froze in: two models of one config never
    share one."""
    # int4 (no floating-point layers for oneDNN to prepack, which only autotuning keeps out), untuned:
    # builds in seconds
    monkeypatch.setattr("plinth.compiled_decode.OPTIONS", {**OPTIONS, "max_autotune": False})
    models = [compact_(tiny_model(seed=seed), "int4") for seed in (1, 2)]
    decoders = [CompiledDecoder(model) for model in models]
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = []
        for model, decoder in zip(models, decoders):
            cache = decoder.new_cache(12)
            model(tokens[:, :11], cache=cache.view())
            logits.append((decoder([int(tokens[0, 11])], [11], cache)[0].float(), model(tokens)[0, 11].float()))
    for (compiled, eager), (_, others) in zip(logits, logits[::-1]):  # bfloat16 activations round elsewhere fused
        assert (compiled - eager).abs().max() < 0.02 * eager.abs().max() < (others - eager).abs().max()


@pytest.mark.parametrize("compiled", ["float32"], indirect=True)
def test_a_later_decoder_loads_the_kept_program_without_compiling(compiled, monkeypatch):
    _, loaded = compiled
    model, first = loaded.model, loaded.decoder
    monkeypatch.setattr(CompiledDecoder, "_build", lambda *args: pytest.fail("compiled again"))
    later = CompiledDecoder(model, first.threads)
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = []
        for decoder in (first, later):
            cache = decoder.new_cache(20)
            model(tokens[:, :19], cache=cache.view())
            logits.append(decoder([int(tokens[0, 19])], [19], cache))
    assert torch.equal(*logits)


@pytest.fixture
def loaded_without_compiling(monkeypatch) -> list:
    """`_build` writes a stand-in library and opening records (folder, library's contents): the
    program cache's bookkeeping, without compiling."""
    monkeypatch.setattr(CompiledDecoder, "_build",
                        lambda self, cache, tokens, folder: (folder / LIBRARY).write_bytes(b"built"))
    loaded = []
    monkeypatch.setattr("plinth.compiled_decode.open_program",
                        lambda folder, model, held: loaded.append((folder, (folder / LIBRARY).read_bytes())))
    return loaded


def test_a_new_build_of_a_step_replaces_its_older_builds_and_keeps_other_steps(tmp_path, monkeypatch,
                                                                              loaded_without_compiling):
    from plinth import compiled_decode
    model = compact_(tiny_model(seed=4), "float32")
    decoder = CompiledDecoder(model)
    cache = decoder.new_cache(8)
    step, build = compiled_decode.program_digests(model, cache)
    monkeypatch.setattr(compiled_decode, "PROGRAM_CACHE", tmp_path)
    older, other = tmp_path / f"{step}-{'0' * 32}", tmp_path / f"{'1' * 32}-{build}"
    for folder, library in ((older, b"an earlier build"), (other, b"another model's step")):
        folder.mkdir()
        (folder / LIBRARY).write_bytes(library)
    (tmp_path / f"{step}-{'2' * 32}.so").write_bytes(b"a library of plinth's earlier one-file layout")
    decoder._load(cache, 1)
    assert loaded_without_compiling == [(tmp_path / f"{step}-{build}", b"built")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, f"{step}-{build}"])
    assert (other / LIBRARY).read_bytes() == b"another model's step"
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1  # other weights: another step
    assert compiled_decode.program_digests(model, cache)[0] != step


def test_a_cache_that_cannot_be_written_costs_only_the_next_start(tmp_path, monkeypatch, capsys,
                                                                  loaded_without_compiling):
    from plinth import compiled_decode
    model = compact_(tiny_model(seed=5), "float32")
    decoder = CompiledDecoder(model)
    (tmp_path / "file").write_text("a file where the cache's folder would be")
    monkeypatch.setattr(compiled_decode, "PROGRAM_CACHE", tmp_path / "file" / "programs")
    decoder._load(decoder.new_cache(8), 1)
    assert "could not keep the compiled decoding step" in capsys.readouterr().err
    [(path, built)] = loaded_without_compiling
    assert built == b"built"  # built for this process alone, and its file removed once loaded
    assert not os.path.exists(path)


def test_a_failed_compile_says_what_to_do(monkeypatch):
    # no autotuning: each of its candidate kernels would fail to compile on its own first
    options = {**OPTIONS, "max_autotune": False, "cpp.cxx": ("no-such-c++-compiler",)}
    monkeypatch.setattr("plinth.compiled_decode.OPTIONS", options)
    model = compact_(tiny_model(seed=3), "float32")
    decoder = CompiledDecoder(model)
    cache = decoder.new_cache(8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache.view())
        with pytest.raises(PlinthError, match="compiling the decoding step failed.*g\\+\\+.*without --compile"):
            decoder([4], [3], cache)


def test_a_rows_compiled_logits_are_the_same_bits_alone_or_in_any_batch(compiled):
    """The batch invariance eager decoding has: a row's logits, and the keys it writes, do not depend
    on which rows decode beside it, nor on gaps between their cache rows; rows at other positions,
    one past its sliding window's ring, a span of rows the program was not built for."""
    _, loaded = compiled
    model, decoder = loaded.model, loaded.decoder
    lengths = [10, 30, 70, 12, 100, 5]
    cache = KVCache.for_model(model, len(lengths), LENGTH + KEY_BLOCK, slack=0)  # new_cache's layout, 6 rows
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            model(torch.randint(0, 256, (1, n), generator=generator), cache=cache.view(0, torch.tensor([row])))
        tokens = [40 + row for row in range(len(lengths))]

        def step(rows):  # row 2's logits and the keys it wrote, decoding beside `rows`
            logits = decoder([tokens[r] for r in rows], [lengths[r] for r in rows], cache, rows)
            return logits[rows.index(2)], [k[2, :, lengths[2] % k.shape[2]].clone() for k in cache.k]

        alone, keys = step([2])
        for rows in ([0, 1, 2], [2, 5], [1, 2, 4], list(range(6))):
            logits, written = step(rows)
            assert torch.equal(logits, alone), rows
            assert all(torch.equal(*pair) for pair in zip(written, keys)), rows


@pytest.mark.parametrize("compiled", ["float32"], indirect=True)
def test_a_compiling_engine_decodes_every_step_compiled_and_a_rows_text_is_the_same_alone_or_batched(compiled, monkeypatch):
    """`plinth serve --compile`: the decoding steps of every request go through the compiled step,
    batched; a request decoded beside another, then alone in row 1, gets the greedy text it gets
    generated alone through the same program, and (float32) plain decoding's."""
    from plinth.engine import Engine
    _, loaded = compiled
    tok, model = loaded.tokenizer, loaded.model
    # chunk=64: the engine's rings are then new_cache's, and the fixture's program serves it as well;
    # no speculation: the request decoding alone would check guesses (the test below)
    engine = Engine(model, tok, max_batch=2, max_len=256, chunk=64, compile=True, speculate=False)
    engine.decoder = loaded.decoder
    calls = []
    real = engine.decoder.__call__
    monkeypatch.setattr(type(engine.decoder), "__call__", lambda self, *a: calls.append(a[3:]) or real(*a))
    assert engine.use_compiled()
    assert engine.cache.rows == 0  # loading the programs wrote nothing into the cache
    greedy = dict(temperature=0, ignore_eos=True)
    prompts = [tok.encode("The window slides"), tok.encode("Keys grow past the ring")]
    heads, head = [], model.output.forward
    monkeypatch.setattr(model.output, "forward", lambda h: heads.append(h.shape) or head(h))
    short, long = engine.generate_many(prompts, [SamplingParams(max_tokens=5, **greedy),
                                                 SamplingParams(max_tokens=90, **greedy)])
    assert len(short.steps) == 5
    assert heads == []  # the model's own output layer never ran: the program gave every token
    # each prompt prefilled up to its last token, which the program feeds at once, alone (its first
    # token); the two requests' next 4 tokens together, then the long one's in row 1
    assert calls == [([0],), ([1],)] + [([0, 1],)] * 4 + [([1],)] * 85
    text = tok.decode([s.choice.token for s in long.steps])
    assert text == compiled_text(loaded, prompts[1], 90)
    plain = [s.choice.token for s in generate_stream(model, tok, prompts[1], SamplingParams(max_tokens=90, **greedy),
                                                     speculate=False)]
    assert text == tok.decode(plain)


def mapped_kib(path) -> int:
    """This process's resident memory mapped from `path`, in KiB."""
    import re
    mappings = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text())
    return sum(int(re.search(r"\nRss:\s+(\d+)", m)[1]) for m in mappings if m.split("\n")[0].endswith(str(path)))


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads Linux's page map")
def test_hashing_a_mapped_model_gives_back_the_pages_it_read_and_keeps_what_was_written(tmp_path):
    """Hashing the weights for the program's name reads every page of a model mapped from its packed
    cache; those pages are given back (the file still holds them), never a page written to."""
    from plinth.compiled_decode import release_file_pages
    torch.save({"read": torch.randn(2**20), "written": torch.randn(2**20)}, tmp_path / "model.pt")
    mapped = torch.load(tmp_path / "model.pt", mmap=True, weights_only=True)
    read, written = mapped["read"], mapped["written"]
    total = float(read.sum())
    written[-1] = 7.0  # a private copy of that page: the mapping no longer matches the file there
    assert mapped_kib(tmp_path / "model.pt") >= 4096  # read's 4 MiB are in
    release_file_pages(read)
    assert mapped_kib(tmp_path / "model.pt") < 256  # the page written to and the file's first pages
    assert float(read.sum()) == total  # read from the file again
    release_file_pages(written)
    assert written[-1] == 7.0
    own = torch.arange(2**20, dtype=torch.float32)  # not a file's: left alone
    release_file_pages(own)
    assert torch.equal(own, torch.arange(2**20, dtype=torch.float32))


def test_the_tables_a_pass_reads_a_few_rows_of_are_given_back_every_so_many_rows(compiled, monkeypatch):
    """The input embedding's pages, and the int8 output layer's rows where the program multiplies
    by a rearranged copy of its own (`refine_top` still reads the model's rows for the top
    candidates), would pile up pass after pass: they are given back every RELEASE_EVERY rows fed."""
    from plinth import compiled_decode
    from plinth.quant import Int8Head
    int8 = compact_(tiny_model(), "int8")
    assert isinstance(int8.output, Int8Head)
    embedding, rows = int8.tok_embeddings.weight, int8.output.q
    assert [t is embedding for t in row_tables(int8, [])] == [True]  # the program reads these rows whole
    assert [t is u for t, u in zip(row_tables(int8, [torch.empty_like(rows)]), [embedding, rows])] == [True, True]

    _, loaded = compiled
    released = []
    monkeypatch.setattr(compiled_decode, "release_file_pages", released.append)
    decoder = CompiledDecoder(loaded.model, loaded.decoder.threads)  # loads the kept program; counts its own rows
    cache = decoder.new_cache(2 * RELEASE_EVERY)
    decoder.program(cache)
    released.clear()  # what hashing the weights for the program's name gave back
    with torch.inference_mode():
        for position in range(2 * RELEASE_EVERY):
            decoder([position + 1], [position], cache)
    tables = row_tables(loaded.model, decoder.held())
    assert loaded.model.tok_embeddings.weight is tables[0]
    assert [id(t) for t in released] == [id(t) for t in tables] * 2


def compiled_text(loaded, prompt: list[int], n: int, speculate=False) -> str:
    """`n` greedy tokens after `prompt` through the loaded model's compiled programs."""
    steps = generate_stream(loaded.model, loaded.tokenizer, prompt, SamplingParams(max_tokens=n, temperature=0,
                            ignore_eos=True), speculate=speculate, decoder=loaded.decoder)
    return loaded.tokenizer.decode([s.choice.token for s in steps])


def test_a_verify_pass_gives_each_token_the_bits_of_feeding_it_alone(compiled):
    """The compiled verify pass (a second program, of VERIFY_TOKENS a row) against the decoding step
    fed the same tokens one at a time: the same logits and keys, bit for bit, past the ring's wrap."""
    _, loaded = compiled
    model, decoder = loaded.model, loaded.decoder
    T = decoder.verify_tokens
    tokens = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        caches = [decoder.new_cache(80) for _ in range(2)]
        for cache in caches:
            model(tokens[:, :62], cache=cache.view())  # the pass writes positions 62..65: the 64-position ring wraps
        fed = tokens[0, 62:62 + T].tolist()
        alone = torch.cat([decoder([token], [62 + i], caches[0]) for i, token in enumerate(fed)])
        verified = decoder.verify(fed, 62, caches[1])
    assert torch.equal(alone, verified)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))


def test_compiled_speculation_keeps_compiled_decodings_tokens(compiled):
    """Prompt lookup's guesses checked in compiled verify passes: the greedy text of decoding one
    token a step through the compiled step, with guesses kept."""
    from plinth.speculative import PromptLookup
    _, loaded = compiled
    tok = loaded.tokenizer
    prompt = tok.encode("one two three four five six seven " * 6)
    lookup = PromptLookup(max_draft=loaded.decoder.guesses)
    assert compiled_text(loaded, prompt, 60, speculate=lookup) == compiled_text(loaded, prompt, 60)
    assert lookup.accepted > 0


def test_a_compiling_engine_speculates_compiled_for_a_lone_request(compiled, monkeypatch):
    from plinth.engine import Engine
    _, loaded = compiled
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, max_batch=2, max_len=256, chunk=64, compile=True)
    engine.decoder = loaded.decoder
    passes = []
    real = engine.decoder.verify
    monkeypatch.setattr(engine.decoder, "verify", lambda *a: passes.append(a[1]) or real(*a))
    prompt = tok.encode("one two three four five six seven " * 6)
    [completion] = engine.generate_many([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    assert passes and tok.decode(completion.tokens) == compiled_text(loaded, prompt, 60)


@pytest.mark.parametrize("compiled", ["int4"], indirect=True)
def test_a_verify_pass_that_would_change_the_bits_checks_no_guesses(compiled, monkeypatch):
    """Kernels are tuned per program: where the verify program's differ from the step's on a machine,
    speculation would change the output, so it checks no guesses there and the text stays the same."""
    from plinth.speculative import PromptLookup
    _, loaded = compiled
    decoder, tok = loaded.decoder, loaded.tokenizer
    real = decoder.verify
    monkeypatch.setattr(decoder, "verify", lambda *a: real(*a) + 1e-3)  # as another kernel's rounding would
    monkeypatch.setattr(decoder, "_verifies", {})
    prompt = tok.encode("one two three four five six seven " * 6)
    lookup = PromptLookup(max_draft=decoder.guesses)
    assert compiled_text(loaded, prompt, 30, speculate=lookup) == compiled_text(loaded, prompt, 30)
    assert lookup.proposed == 0 and decoder._verifies == {(str(torch.float32), (64, None)): False}


@pytest.mark.parametrize("compiled", ["int4"], indirect=True)
def test_a_compiled_step_gives_the_same_bits_on_one_thread_as_on_two(compiled):
    """The program's loops take the thread count in force at each call (CpuShare lowers it beside a
    busy process), and a row's logits do not depend on it."""
    _, loaded = compiled
    model, decoder = loaded.model, loaded.decoder
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    threads, logits = torch.get_num_threads(), []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            cache = decoder.new_cache(40)
            with torch.inference_mode():
                model(tokens[:, :39], cache=cache.view())
                logits.append(decoder([int(tokens[0, 39])], [39], cache))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*logits)
