"""`plinth export --to gguf`: a written GGUF read back by plinth and by Hugging Face transformers'
GGUF loader (the independent reference), quantised round trips, and what cannot be written."""
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
from plinth.weights.gguf_writer import write_gguf
from plinth.tokenizer import Tokenizer
from tests.conftest import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")
IDS = torch.tensor([[104, 105, 32, 116, 104, 101, 114, 101, 256, 258]])
TEXTS = ["Hello, world!", "The naïve café served 1234 guests 😀", "def f(x):\n    return x  # ok",
         "<|im_start|>user\nHi<|im_end|>"]


def random_model(**overrides) -> Transformer:
    """tiny_model with another vocabulary size."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


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


@pytest.mark.parametrize("dtype, tolerance", [("q8_0", 0.02), ("bf16", 0.02), ("f16", 2e-3)])
def test_compact_types_round_trip_closely(tmp_path, dtype, tolerance):
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(10)  # logits of a few units, so the tolerance means something
    write_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", dtype=dtype)
    meta = metadata(open_gguf(tmp_path / "m.gguf"))
    assert meta["general.file_type"] == {"q8_0": 7, "bf16": 32, "f16": 1}[dtype]
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
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        text = "The naïve café served 1234 guests<|im_end|>"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
        ids = tokenizer.encode(text)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[:len(ids)])
    finally:
        llm.close()
    ours = model(torch.tensor([ids]))[0]
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min()) > 0.999


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
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(mlp="geglu", embed_scale=True, sliding_window=16, final_softcap=30.0), "mlp='geglu'"),  # Gemma-like
])
def test_unsupported_architecture_is_named(tmp_path, overrides, named):
    with pytest.raises(PlinthError, match=f"llama architecture cannot express") as error:
        write_gguf(tiny_model(**overrides), byte_tokenizer(), tmp_path / "m.gguf")
    assert named in str(error.value) and not (tmp_path / "m.gguf").exists()
