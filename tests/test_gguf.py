"""The real SmolLM2-135M GGUF: plinth against Hugging Face transformers, and damaged or unsupported files."""
import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q

from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.weights.gguf import dequantize, open_gguf, read_gguf

pytestmark = pytest.mark.usefixtures("no_grad")
MIXED_TEXT = ("Hello, world! The naïve café served crème brûlée 😀🚀 to 1234 guests.\n"
              "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2**n)\n"
              "東京 and Zürich — «quotes», tabs\tand   spaces.")


@pytest.mark.slow
def test_tokenization_matches_transformers(smollm2_fp32, hf_smollm2):
    _, hf_tok = hf_smollm2
    ours = smollm2_fp32.tokenizer
    assert ours.encode(MIXED_TEXT) == hf_tok(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(MIXED_TEXT)) == MIXED_TEXT
    assert ours.encode("<|im_start|>user") == hf_tok("<|im_start|>user", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_chat_template_matches_transformers(smollm2_fp32, hf_smollm2):
    _, hf_tok = hf_smollm2
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    ours = smollm2_fp32.tokenizer.apply_chat_template(messages)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_transformers(smollm2_fp32, hf_smollm2):
    hf_model, _ = hf_smollm2
    ids = smollm2_fp32.tokenizer.encode(MIXED_TEXT * 3)[:64]
    assert len(ids) == 64
    ours = smollm2_fp32.logits(ids)
    theirs = hf_model(torch.tensor([ids])).logits[0]
    assert float((ours - theirs).abs().max()) < 1e-3

    prompt = smollm2_fp32.tokenizer.encode("The capital of France is")
    reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    eos = smollm2_fp32.tokenizer.eos_id  # min_new_tokens masks EOS out; a -100 bias does the same here
    steps = list(generate_stream(smollm2_fp32.model, smollm2_fp32.tokenizer, prompt,
                                 SamplingParams(max_tokens=32, temperature=0, logit_bias={eos: -100})))
    assert [s.choice.token for s in steps] == reference[0, len(prompt):].tolist()
    assert "".join(s.text for s in steps).startswith(" Paris")


@pytest.mark.slow
def test_real_model_knows_the_capital_of_france():
    import plinth
    model = plinth.load("smollm2-135m-instruct")  # the default compact weights
    answer = model.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30)
    assert "Paris" in answer


def tiny_gguf(path, arch="llama", tensor_type=Q.F32, tokens=True):
    """A minimal one-layer llama GGUF written with the `gguf` package."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64,
                           head_count=2, head_count_kv=1).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    if tokens:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([chr(c) for c in range(33, 33 + 64)])
        writer.add_token_merges([])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
              "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    originals = {}
    for name, shape in shapes.items():
        value = rng.standard_normal(shape).astype(np.float32)
        originals[name] = value
        kind = tensor_type if len(shape) == 2 and shape[-1] % 32 == 0 else Q.F32
        data = value if kind == Q.F32 else gguf.quants.quantize(value, kind)
        writer.add_tensor(name, data, raw_dtype=None if kind == Q.F32 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


@pytest.mark.parametrize("kind, tolerance", [(Q.F32, 0), (Q.F16, 2e-3), (Q.BF16, 2e-2), (Q.Q8_0, 3e-2),
                                             (Q.Q4_0, 0.5), (Q.Q4_1, 0.4), (Q.Q5_0, 0.25), (Q.Q5_1, 0.2)])
def test_tensor_types_load_in_the_right_shape_and_order(tmp_path, kind, tolerance):
    originals = tiny_gguf(tmp_path / "m.gguf", tensor_type=kind)
    config, state, tokenizer, _ = read_gguf(tmp_path / "m.gguf")
    assert (config.dim, config.n_heads, config.n_kv_heads, config.ffn_dim) == (32, 2, 1, 64)
    assert config.tie_embeddings and tokenizer.vocab_size == 64
    up = originals["blk.0.ffn_up.weight"]
    assert state["layers.0.mlp.w_up.weight"].shape == up.shape
    assert np.abs(state["layers.0.mlp.w_up.weight"].numpy() - up).max() <= tolerance


def test_rotary_rows_are_unpermuted_from_llama_cpp_layout(tmp_path):
    originals = tiny_gguf(tmp_path / "m.gguf")
    _, state, _, _ = read_gguf(tmp_path / "m.gguf")
    stored = originals["blk.0.attn_k.weight"]  # one head of 16 rows stored as (x0, y0, x1, y1, ...)
    assert np.array_equal(state["layers.0.attn.wk.weight"].numpy(), np.concatenate([stored[0::2], stored[1::2]]))


class FakeTensor:
    def __init__(self, kind, blocks: bytes, shape):
        self.name, self.tensor_type, self.shape = "t", kind, shape
        self.data = np.frombuffer(blocks, dtype=np.uint8).reshape(1, -1)


def test_k_quant_blocks_dequantize_to_known_values():
    one, zero = np.float16(1).tobytes(), np.float16(0).tobytes()
    # Q4_K: d=1, dmin=0, all eight 6-bit scales 1 and mins 0, every 4-bit code 5 → every value 5.
    q4k = one + zero + bytes([1] * 4 + [0] * 4 + [1] * 4) + bytes([0x55] * 128)
    assert dequantize(FakeTensor(Q.Q4_K, q4k, [256])).unique().tolist() == [5.0]
    # Q6_K: every 6-bit code 0 (stored offset by 32), scales 1, d=1 → every value -32.
    q6k = bytes(128) + bytes(64) + bytes([1] * 16) + one
    assert dequantize(FakeTensor(Q.Q6_K, q6k, [256])).unique().tolist() == [-32.0]


def test_unsupported_tensor_type_names_it():
    with pytest.raises(PlinthError, match="IQ2_XXS.*supported types"):
        dequantize(FakeTensor(Q.IQ2_XXS, bytes(66), [256]))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, I am not a model")
    with pytest.raises(PlinthError, match="not a readable GGUF file"):
        open_gguf(path)


def test_truncated_gguf(tmp_path):
    tiny_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(PlinthError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")


def test_unsupported_architecture_names_it(tmp_path):
    tiny_gguf(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(PlinthError, match="architecture 'mamba' is not supported; plinth reads: llama, gemma3"):
        read_gguf(tmp_path / "m.gguf")
