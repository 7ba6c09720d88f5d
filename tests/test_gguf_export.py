"""`plinth export --to gguf` (and `--to hf` for Gemma 3): a written GGUF read back by plinth, by Hugging
Face transformers' GGUF loader and by llama.cpp (the independent references); quantised files
byte for byte as llama.cpp's own quantizer writes them; SmolLM2 and Gemma 3 exported and read back;
and what cannot be written."""
import contextlib
import ctypes
import json
import os

import gguf
import numpy as np
import pytest
import torch

import plinth
from plinth.config import preset
from plinth.adapt.classify import Head
from plinth.cli import main
from plinth.errors import PlinthError
from plinth.model import Transformer
from plinth.weights.native import write_model
from plinth.weights.gguf import metadata, open_gguf, read_gguf
from plinth.weights.gguf_writer import GGUF_TYPES, write_gguf
from plinth.weights.hf import read_hf_folder, write_hf_folder
from plinth.tokenizer import Tokenizer
from tests.conftest import byte_tokenizer, tiny_model
from tests import test_gemma3
from tests.test_gemma3 import MIXED_TEXT, sentencepiece_meta

pytestmark = pytest.mark.usefixtures("no_grad")
IDS = torch.tensor([[104, 105, 32, 116, 104, 101, 114, 101, 256, 258]])
TEXTS = ["Hello, world!", "The naïve café served 1234 guests 😀", "def f(x):\n    return x  # ok",
         "<|im_start|>user\nHi<|im_end|>"]
# The flags of Gemma 3 (see plinth/weights/gguf.py), with a 4-token window.
GEMMA3 = dict(mlp="geglu", qk_norm=True, sandwich_norm=True, embed_scale=True, sliding_window=4, rope_theta=1e6,
              rope_local_theta=1e4, global_every=6)


def random_model(**overrides) -> Transformer:
    """tiny_model with another vocabulary size."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


@contextlib.contextmanager
def llama(llama_cpp, path):
    """llama.cpp on the GGUF at `path`, keeping every position's logits; closed after."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def assert_same_choices(model, ids, llm):
    """llama.cpp picks the next token plinth's `model` picks at every position of `ids`."""
    llm.eval(ids)
    theirs, ours = torch.tensor(llm.scores[:len(ids)]), model(torch.tensor([ids]))[0]
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min()) > 0.999


def reread(path) -> Transformer:
    config, state, tokenizer, _ = read_gguf(path)
    model = Transformer(config)
    model.to_empty(device="cpu")
    model.load_weights(state)
    return model.eval(), tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(tie_embeddings=tied)
    if not tied:
        torch.nn.init.normal_(model.output.weight, std=0.02)  # differs from the embedding
    write_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", dtype="f32")
    back, tokenizer = reread(tmp_path / "m.gguf")
    assert back.config.to_dict() == {**model.config.to_dict(), "norm_eps": pytest.approx(1e-5)}  # GGUF floats are f32
    names = {t.name for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (not tied)
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    torch.testing.assert_close(back(IDS), model(IDS), atol=1e-6, rtol=1e-6)
    assert tokenizer.encode("hi<|im_end|>") == [104, 105, 258] and tokenizer.eos_id == 258


@pytest.mark.parametrize("dtype, tolerance", [("q8_0", 0.02), ("bf16", 0.02), ("f16", 2e-3), ("q5_1", 0.03),
                                              ("q5_0", 0.03), ("q4_1", 0.03), ("q4_0", 0.03)])
def test_compact_types_round_trip_closely(tmp_path, dtype, tolerance):
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(10)  # logits of a few units, so the tolerance means something
    write_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", dtype=dtype)
    meta = metadata(open_gguf(tmp_path / "m.gguf"))
    assert meta["general.file_type"] == {"q8_0": 7, "bf16": 32, "f16": 1, "q5_1": 9, "q5_0": 8, "q4_1": 3,
                                         "q4_0": 2}[dtype]
    back, _ = reread(tmp_path / "m.gguf")
    ours, theirs = model(IDS), back(IDS)
    assert float((ours - theirs).abs().max()) < tolerance * float(ours.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(metadata(open_gguf(smollm2_path)))


def test_a_fused_inference_model_exports_its_parts(tmp_path):
    model = tiny_model()
    write_gguf(tiny_model().fuse(), byte_tokenizer(), tmp_path / "m.gguf", dtype="f32")  # wqkv, w_gate_up split
    back, _ = reread(tmp_path / "m.gguf")
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_llama_cpp_runs_the_export(tmp_path):
    """llama.cpp itself (through llama-cpp-python): same tokens, and the same next-token choices.
    It quantises activations, so logits agree by top-1 and cosine, not exactly (see DESIGN.md)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = Tokenizer.train([TEXTS[1] * 20, TEXTS[2] * 20], vocab_size=300)  # llama.cpp needs merges
    model = random_model(vocab_size=320)  # 20 embedding rows past the tokenizer: written as unused tokens
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(10)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f16")
    assert metadata(open_gguf(tmp_path / "m.gguf"))["tokenizer.ggml.pre"] == "smollm"  # what plinth trains
    text = "The naïve café served 1234 guests<|im_end|>"
    ids = tokenizer.encode(text)
    with llama(llama_cpp, tmp_path / "m.gguf") as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert_same_choices(model, ids, llm)


@pytest.mark.slow
def test_transformers_loads_the_export(tmp_path, smollm2_tokenizer):
    """A small random model with SmolLM2's real tokenizer (transformers loads it in seconds; the
    135M model takes half a minute), exported f16: transformers' GGUF loader gives plinth's logits."""
    transformers = pytest.importorskip("transformers")
    model = random_model(vocab_size=49152, n_kv_heads=1, rope_theta=100000.0, tie_embeddings=False)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    write_gguf(model, smollm2_tokenizer, tmp_path / "small.gguf", dtype="f16")
    assert metadata(open_gguf(tmp_path / "small.gguf"))["tokenizer.ggml.pre"] == "smollm"  # kept from the source

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="small.gguf",
                                                               dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="small.gguf")
    back, tokenizer = reread(tmp_path / "small.gguf")
    ids = torch.tensor([tokenizer.encode(" ".join(TEXTS))])
    torch.testing.assert_close(theirs(ids).logits, back(ids), atol=1e-4, rtol=1e-4)  # same f16 weights
    torch.testing.assert_close(theirs(ids).logits, model(ids), atol=0.05, rtol=0.01)  # f16 rounding
    for text in TEXTS:
        expected = smollm2_tokenizer.encode(text)
        assert tokenizer.encode(text) == expected
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    assert (tokenizer.bos_id, tokenizer.eos_id) == (smollm2_tokenizer.bos_id, smollm2_tokenizer.eos_id)


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    write_model(tiny_model(), folder)
    byte_tokenizer().save(folder)
    return folder


def test_cli_exports_a_checkpoint_and_never_overwrites(tmp_path, base, capsys):
    out = tmp_path / "new" / "out.gguf"
    assert main(["export", str(base), "--to", "gguf", str(out), "--gguf-type", "f32"]) == 0
    ours, theirs = plinth.load(str(base), dtype="float32"), plinth.load(str(out), dtype="float32")
    torch.testing.assert_close(theirs.model(IDS), ours.model(IDS), atol=1e-5, rtol=1e-5)
    assert metadata(open_gguf(out))["tokenizer.ggml.pre"] == "gpt2"  # the byte tokenizer's split
    before = out.read_bytes()
    assert main(["export", str(base), "--to", "gguf", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert not list(out.parent.glob(".*.tmp"))


def test_a_head_cannot_go_into_gguf(tmp_path, base, capsys):
    Head(64, ["negative", "positive"]).save(base)
    assert main(["export", str(base), "--to", "gguf", str(tmp_path / "out.gguf")]) == 2
    assert "classification head" in capsys.readouterr().err and not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("overrides, named", [
    (dict(qk_norm=True), "llama cannot express qk_norm=True"),
    (dict(mlp="geglu", embed_scale=True, sliding_window=16, final_softcap=30.0), "gemma3 cannot express qk_norm=False"),
    (dict(GEMMA3, attn_scale=0.1), "gemma3 cannot express attn_scale=0.1"),  # llama.cpp derives it from head_dim
])
def test_unsupported_architecture_is_named(tmp_path, overrides, named):
    with pytest.raises(PlinthError, match="writes the llama or gemma3 architecture, and this model is none") as error:
        write_gguf(tiny_model(**overrides), byte_tokenizer(), tmp_path / "m.gguf")
    assert named in str(error.value) and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("dtype, why", [("q4_k", "the gguf package cannot quantize to it"), ("int4", "")])
def test_a_type_the_writer_cannot_produce_lists_those_it_can(tmp_path, base, capsys, dtype, why):
    with pytest.raises(PlinthError, match=f"cannot write GGUF type '{dtype}'") as error:
        write_gguf(tiny_model(), byte_tokenizer(), tmp_path / "m.gguf", dtype=dtype)
    assert why in str(error.value) and "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0" in str(error.value)
    with pytest.raises(SystemExit):
        main(["export", str(base), "--to", "gguf", str(tmp_path / "m.gguf"), "--gguf-type", dtype])
    assert "invalid choice" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


# ---- quantized files, against llama.cpp's own quantizer -------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_quantized_files_hold_the_bytes_llama_cpps_quantizer_writes(tmp_path, dtype, tied):
    """llama.cpp's llama-quantize (through llama-cpp-python) turns the f32 export into `dtype`: the same
    tensor types (norms f32; the output matrix, or the tied embedding, q8_0 under 8 bits: llama.cpp's
    Q6_K does not fit 64-wide rows) and the same bytes as plinth's own quantized export."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_model(tie_embeddings=tied)
    if not tied:
        torch.nn.init.normal_(model.output.weight, std=0.02)
    write_gguf(model, byte_tokenizer(), tmp_path / "f32.gguf", dtype="f32")
    write_gguf(model, byte_tokenizer(), tmp_path / "ours.gguf", dtype=dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = GGUF_TYPES[dtype][2], 1
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    ours, theirs = ({t.name: t for t in gguf.GGUFReader(tmp_path / f"{who}.gguf").tensors} for who in ("ours", "theirs"))
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    for name, tensor in ours.items():
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data)), name
    assert ours["token_embd.weight" if tied else "output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert ours["blk.1.ffn_up.weight"].tensor_type == GGUF_TYPES[dtype][0]


@pytest.mark.parametrize("dtype, overrides, compact", [
    ("q4_0", {}, "int4"), ("q4_1", {}, "int4"), ("q5_0", {}, "int8"), ("q8_0", {}, "int8"),
    # A "q4_0" file whose 48-wide rows fell back to f16 but for w_down's, as Gemma 3's "Q4_K_M" rows
    # of 640 fall back to Q5_0 and Q8_0: the file's type says 4 bits, most of its weights are not.
    ("q4_0", dict(dim=48, n_heads=4, n_kv_heads=2), "int8")])
def test_the_compact_dtype_a_file_loads_as_follows_its_blocks_types(tmp_path, dtype, overrides, compact):
    """int4 only where 4-bit matrices are most of the blocks: others would be rounded again."""
    write_gguf(tiny_model(**overrides), byte_tokenizer(), tmp_path / "m.gguf", dtype=dtype, log=lambda note: None)
    assert read_gguf(tmp_path / "m.gguf")[3] == compact


def test_rows_that_are_not_whole_blocks_fall_back_to_f16_and_say_so(tmp_path):
    model = tiny_model(dim=48, n_heads=4, n_kv_heads=2)  # 48-wide rows: not whole 32-value blocks; w_down's 128 are
    notes = []
    write_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", dtype="q4_0", log=notes.append)
    types = {t.name: t.tensor_type.name for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert {types[f"blk.0.{name}.weight"] for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                       "ffn_up")} == {types["token_embd.weight"]} == {"F16"}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert len(notes) == 1 and "written as f16" in notes[0] and "blk.1.ffn_up.weight" in notes[0]
    assert "ffn_down" not in notes[0] and "13 matrices" in notes[0]
    back, _ = reread(tmp_path / "m.gguf")
    torch.testing.assert_close(back.state_dict()["layers.0.attn.wq.weight"],
                               model.state_dict()["layers.0.attn.wq.weight"], atol=1e-4, rtol=1e-3)  # f16 rounding


# ---- Gemma 3: a tiny random one with a made-up SentencePiece vocabulary (fast) -----------------------
def tiny_gemma(**overrides) -> Transformer:
    """Six layers (layer 5 global, the rest in a 4-token window), head_dim 32 ≠ width/heads, random
    weights and norms (plinth's, i.e. Gemma's 1 + w) away from 1."""
    model = random_model(**{**GEMMA3, "vocab_size": len(sentencepiece_meta()["tokenizer.ggml.tokens"]), "n_layers": 6,
                            "head_dim": 32, "attn_scale": 32 ** -0.5, "norm_eps": 1e-6, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1, 0.1) if p.ndim == 1 else p.normal_(0, 0.1)
    return model


def spm_meta() -> dict:
    """test_gemma3's made-up SentencePiece vocabulary, with "ab" scored above "▁a": merges ranked
    otherwise than by id, so only the scores can put them in order."""
    meta = sentencepiece_meta()
    scores = list(meta["tokenizer.ggml.scores"])
    scores[meta["tokenizer.ggml.tokens"].index("ab")] = -3.5
    return {**meta, "tokenizer.ggml.scores": scores}


@pytest.fixture(scope="module")
def spm_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(spm_meta(), chat_template="T")


SPM_TEXT = " ab ü é  a\nb ba<end_of_turn> ab"


def test_a_gemma3_export_reads_back_exactly(tmp_path, spm_tokenizer):
    # Not llama.cpp's every-6th layer global, nor its 10,000 local rotary base: both are written.
    model = tiny_gemma(global_every=2, final_softcap=30.0, rope_local_theta=5e4)
    write_gguf(model, spm_tokenizer, tmp_path / "g.gguf", dtype="f32")
    back, tokenizer = reread(tmp_path / "g.gguf")
    assert back.config.to_dict() == {**model.config.to_dict(), "norm_eps": pytest.approx(1e-6)}
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    ids = torch.tensor([spm_tokenizer.encode(SPM_TEXT)])
    torch.testing.assert_close(back(ids), model(ids), atol=1e-6, rtol=1e-6)

    meta, source = metadata(open_gguf(tmp_path / "g.gguf")), spm_meta()
    assert (meta["general.architecture"], meta["gemma3.attention.sliding_window"], meta["gemma3.attention.key_length"],
            meta["gemma3.final_logit_softcapping"]) == ("gemma3", 4, 32, 30.0)
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False] * 3
    assert (meta["gemma3.rope.freq_base"], meta["gemma3.rope.freq_base_swa"]) == (1e6, 5e4)
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id", "add_bos_token",
                "add_space_prefix", "model"):
        assert meta[f"tokenizer.ggml.{key}"] == source[f"tokenizer.ggml.{key}"], key
    # Scores are written afresh from the merges; read back, they rank the same merges.
    assert json.loads(tokenizer.backend.to_str())["model"]["merges"] == json.loads(spm_tokenizer.backend.to_str())["model"]["merges"]
    assert tokenizer.encode(SPM_TEXT) == spm_tokenizer.encode(SPM_TEXT) and tokenizer.chat_template == "T"


def test_transformers_reads_a_gemma3_gguf_export(tmp_path, spm_tokenizer):
    """transformers' GGUF loader, the independent reader. It knows no sliding_window_pattern (every
    sixth layer global, as llama.cpp's converter leaves it), and takes the softmax scale from its
    default query_pre_attn_scalar (256) where llama.cpp takes 1/√head_dim: told here."""
    transformers = pytest.importorskip("transformers")
    model = tiny_gemma()
    write_gguf(model, spm_tokenizer, tmp_path / "g.gguf", dtype="f32")
    assert "gemma3.attention.sliding_window_pattern" not in metadata(open_gguf(tmp_path / "g.gguf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", dtype=torch.float32,
                                                               query_pre_attn_scalar=32)
    ids = torch.randint(5, 270, (1, 20), generator=torch.Generator().manual_seed(1))  # 5x the window
    expected = theirs.eval()(ids).logits
    assert float((model(ids) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_llama_cpp_runs_a_gemma3_export(tmp_path, spm_tokenizer):
    """llama.cpp's gemma3 graph on the export: the same SentencePiece tokens, the same next-token choices,
    with the layer layout and local rotary base (`rope.freq_base_swa`) the file gives, not its defaults."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_gemma(global_every=3, rope_local_theta=5e4)
    write_gguf(model, spm_tokenizer, tmp_path / "g.gguf", dtype="f16")
    ids = spm_tokenizer.encode(SPM_TEXT * 2)
    with llama(llama_cpp, tmp_path / "g.gguf") as llm:
        assert llm.tokenize(SPM_TEXT.encode(), add_bos=True, special=True) == spm_tokenizer.encode(SPM_TEXT)
        assert_same_choices(model, ids, llm)


@pytest.mark.parametrize("overrides", [{}, dict(global_every=2, attn_scale=0.1, rope_local_theta=5e4, final_softcap=30.0)])
def test_a_gemma3_hf_export_loads_in_transformers_and_plinth(tmp_path, overrides):
    """Hugging Face keeps Gemma's norms as w (applied as 1 + w): written as plinth's weight - 1. The
    softmax scale, layer layout and local rotary base, which llama.cpp's gemma3 fixes, are config.json
    fields here."""
    transformers = pytest.importorskip("transformers")
    model = tiny_gemma(**overrides)
    write_hf_folder(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(dict(theirs.named_parameters())["model.layers.2.post_feedforward_layernorm.weight"] + 1,
                               model.state_dict()["layers.2.post_mlp_norm.weight"])
    ids = torch.randint(5, 270, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = theirs(ids).logits
    assert float((model(ids) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    config, state = read_hf_folder(tmp_path)
    assert config == model.config
    back = Transformer(config)
    back.to_empty(device="cpu")
    back.load_weights(state)
    torch.testing.assert_close(back.eval()(ids), model(ids), atol=1e-6, rtol=1e-6)


def test_hf_export_names_what_neither_architecture_expresses(tmp_path):
    with pytest.raises(PlinthError, match="Hugging Face export writes the llama or gemma3_text architecture.*"
                                          "gemma3_text cannot express mlp='swiglu'"):
        write_hf_folder(tiny_model(qk_norm=True), tmp_path)


# ---- the real models: SmolLM2 (Q4_1) and Gemma 3 270M (Q4_K_M) ---------------------------------------
PROSE = ("The Eiffel Tower was finished in 1889 for the World's Fair in Paris, and for forty-one years it was "
         "the tallest structure in the world. Engineers at first doubted that its iron frame would stand in "
         "strong wind, but it has stood for well over a century. A good cup of coffee needs fresh beans, "
         "clean water just off the boil, and a little patience.")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return reread(smollm2_path)


@pytest.mark.slow
def test_smollm2_as_q4_1_is_its_source_file_again(tmp_path, smollm2_path, smollm2):
    """Its own type loses nothing: Q4_1 blocks re-quantize to themselves (the tied embedding stays Q8_0,
    as in the source), so the export is the source's size and gives bit-identical logits."""
    model, tokenizer = smollm2
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q4_1")
    types = [(t.name, t.tensor_type) for t in open_gguf(tmp_path / "m.gguf").tensors]
    assert sorted(types) == sorted((t.name, t.tensor_type) for t in open_gguf(smollm2_path).tensors)
    assert abs(os.path.getsize(tmp_path / "m.gguf") / os.path.getsize(smollm2_path) - 1) < 0.001
    back, _ = reread(tmp_path / "m.gguf")
    ids = torch.tensor([tokenizer.encode(PROSE)])
    assert torch.equal(back(ids), model(ids))


@pytest.mark.slow
def test_smollm2_as_q4_0_is_smaller_and_mostly_keeps_its_choices(tmp_path, smollm2_path, smollm2):
    """Q4_1 values re-rounded to Q4_0's symmetric blocks: a 7% smaller file, and a rounding error of
    about a tenth of each weight matrix, which moves a third of this small model's top-1 choices
    (measured 0.69 on PROSE; llama.cpp on the same export agrees with plinth on 97%: benchmarks/export_check.py)."""
    model, tokenizer = smollm2
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q4_0")
    assert 0.9 < os.path.getsize(tmp_path / "m.gguf") / os.path.getsize(smollm2_path) < 0.95
    back, again = reread(tmp_path / "m.gguf")
    ids = torch.tensor([tokenizer.encode(PROSE)])
    assert again.encode(PROSE) == ids[0].tolist() and ids.shape[1] > 60
    assert float((back(ids).argmax(-1) == model(ids).argmax(-1)).float().mean()) >= 0.6


gemma_path = test_gemma3.gemma_path  # the installed Gemma 3 270M file, or a skip saying how to install it


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return reread(gemma_path)


@pytest.mark.slow
def test_gemma3_as_q4_0_keeps_its_vocabulary_and_config(tmp_path, gemma_path, gemma):
    """The 262,144-token SentencePiece vocabulary (scores rewritten from the merges, which read back
    the same), llama.cpp's converter's metadata keys, every matrix rounded to Q4_0 (the tied
    embedding to Q8_0, as in the source) and nothing else changed: smaller than the Q4_K_M source."""
    model, tokenizer = gemma
    write_gguf(model, tokenizer, tmp_path / "g.gguf", dtype="q4_0")
    assert os.path.getsize(tmp_path / "g.gguf") < os.path.getsize(gemma_path)
    reader = open_gguf(tmp_path / "g.gguf")
    theirs, ours = metadata(open_gguf(gemma_path)), metadata(reader)
    shared = [k for k in theirs if k.startswith(("gemma3.", "tokenizer.ggml.")) and k not in ("tokenizer.ggml.scores",
              "tokenizer.ggml.pre", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_sep_token")]
    assert len(shared) == 19 and {k: ours.get(k) for k in shared} == {k: theirs[k] for k in shared}
    back, again = reread(tmp_path / "g.gguf")
    assert back.config == model.config
    assert json.loads(again.backend.to_str())["model"]["merges"] == json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert again.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)
    for t in reader.tensors:
        assert t.tensor_type.name == ("F32" if t.name.endswith("norm.weight") else "Q8_0" if t.name == "token_embd.weight"
                                      else "Q4_0"), t.name
    # What plinth reads back is the source's weight rounded to Q4_0, under its own name (no Q/K permutation).
    q4_0, state = gguf.GGMLQuantizationType.Q4_0, back.state_dict()
    for name in ("layers.0.attn.wq.weight", "layers.17.mlp.w_down.weight"):
        rounded = gguf.quants.dequantize(gguf.quants.quantize(model.state_dict()[name].numpy(), q4_0), q4_0)
        assert torch.equal(state[name], torch.as_tensor(rounded)), name
    assert torch.equal(state["layers.5.attn.k_norm.weight"], model.state_dict()["layers.5.attn.k_norm.weight"])


@pytest.mark.slow
def test_gemma3_hf_export_gives_transformers_plinths_logits(tmp_path, gemma):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = gemma
    write_hf_folder(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(MIXED_TEXT * 3)[:64]])
    expected = theirs(ids).logits
    assert float((model(ids) - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
