"""Shared fixtures: a tiny random model with a byte-level tokenizer (milliseconds), and the real
SmolLM2-135M GGUF with Hugging Face transformers as the independent reference (seconds)."""
import pytest
import torch

from plinth.config import preset
from plinth.model import Transformer
from plinth.tokenizer import BYTE_CHARS, Tokenizer

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
