"""Shared fixtures: a tiny random model with a byte-level tokenizer (milliseconds), and the real
SmolLM2-135M GGUF with Hugging Face transformers as the independent reference (seconds)."""
import contextlib
import json

import pytest
import torch

from plinth.config import preset
from plinth.model import Transformer
from plinth.tokenizer import BYTE_CHARS, Tokenizer

# A pretraining recipe small enough for unit tests: 40 stdlib files, a 320-token BPE, a 2-layer model.
TINY = dict(sources=["python-stdlib"], max_docs_per_source=40, val_fraction=0.1, vocab_size=320, seq_len=32, batch_size=4,
            model={"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
            max_steps=300, warmup_steps=10, save_every=10, eval_every=100, log_every=1000, lr=0.01)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> Tokenizer:
    """Every byte is one token (ids 0-255), then three chat specials; <|im_end|> (258) ends a turn."""
    tokens = [BYTE_CHARS[b] for b in range(256)] + SPECIALS
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3] * 3, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 258}
    return Tokenizer.from_gguf(meta)


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=259, **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


@pytest.fixture
def no_grad():
    """For inference tests; per test, because a global autograd switch would leak into training tests."""
    with torch.no_grad():
        yield


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def smollm2_path():
    from plinth import hub
    return hub.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    """plinth's float32 model: exact dequantisation, so it must match transformers closely."""
    import plinth
    return plinth.load(str(smollm2_path), dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Prepared (cleaned, tokenized) data of the TINY recipe, shared by the training tests."""
    from plinth.data.prepare import prepare
    from plinth.train.recipe import PretrainRecipe
    out = tmp_path_factory.mktemp("run")
    prepare(PretrainRecipe(**TINY, out_dir=str(out / "base")), log=lambda *_: None)
    return out / "base" / "data"


def recipe(tmp_path, data_dir, name, **overrides):
    """A TINY recipe whose run folder `tmp_path/name` reads the shared prepared data."""
    from plinth.train.recipe import PretrainRecipe
    (tmp_path / name).mkdir()
    (tmp_path / name / "data").symlink_to(data_dir)
    return PretrainRecipe(**{**TINY, **overrides}, out_dir=str(tmp_path / name))


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def server_state(model, tokenizer, **engine_options):
    """What a served app shares (plinth/serve/state.py) around a started engine of `model`; the
    engine stops after."""
    from plinth.engine import Engine
    from plinth.serve.state import ServerState
    engine = Engine(model, tokenizer, **engine_options)
    engine.start()
    try:
        yield ServerState(engine, tokenizer, "tiny")
    finally:
        engine.stop()
