"""The batched log-likelihood scorer and sliding-window perplexity, checked against direct
one-sequence-at-a-time computations on the tiny model, and against Hugging Face transformers on
SmolLM2 (slow)."""
import math

import pytest
import torch

from plinth.errors import PlinthError
from plinth.eval.perplexity import perplexity, sliding_windows
from plinth.loaded import LoadedModel
from plinth.loglik import score


def direct_logprobs(model, context, continuation):
    """Reference: one unpadded forward pass of the whole sequence, full logits."""
    ids = torch.tensor([context + continuation[:-1]])  # the last token predicts nothing that is scored
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids)[0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return [float(logprobs[p, t]) for p, t in zip(positions, continuation)], logprobs


def test_batched_scores_match_one_sequence_at_a_time(model):
    g = torch.Generator().manual_seed(1)
    def ids(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    requests = [(ids(n), ids(k)) for n, k in [(5, 1), (30, 4), (1, 7), (17, 17), (60, 2), (3, 3)]]
    for context in (ids(9), ids(40), ids(2)):  # choices sharing a context run it once, from the KV cache
        requests += [(context, ids(k)) for k in (1, 3, 1, 12)]
    for batch_tokens in (64, 100_000):  # several padded batches, and one
        scored = score(model, requests, top=3, batch_tokens=batch_tokens)
        for (context, continuation), s in zip(requests, scored):
            expected, logprobs = direct_logprobs(model, context, continuation)
            assert s.logprobs == pytest.approx(expected, abs=1e-4)
            positions = range(len(context) - 1, len(context) + len(continuation) - 1)
            greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation))
            assert s.greedy == greedy
            assert [t for t, _ in s.top[0]] == logprobs[len(context) - 1].topk(3).indices.tolist()


def test_greedy_flag_is_true_for_the_models_own_choice(model):
    context = [72, 101, 108, 108, 111]
    choice = int(model(torch.tensor([context]))[0, -1].argmax())
    assert score(model, [(context, [choice])])[0].greedy


def test_context_longer_than_the_window_is_cut_from_the_left(model):
    context, continuation = list(range(250)) * 2, [5, 6]
    cut = score(model, [(context, continuation)])[0].logprobs
    window = model.config.max_seq_len
    expected, _ = direct_logprobs(model, context[-(window + 1 - len(continuation)):], continuation)
    assert cut == pytest.approx(expected, abs=1e-4)


def test_requests_that_cannot_be_scored_are_refused(model):
    with pytest.raises(PlinthError, match="empty continuation"):
        score(model, [([1, 2], [])])
    with pytest.raises(PlinthError, match="at least one context token"):
        score(model, [([], [1, 2])])


@pytest.mark.parametrize("length,window,stride", [(10, 4, 2), (10, 4, 4), (9, 3, 1), (5, 8, 3), (2, 1, 1)])
def test_sliding_windows_score_every_token_once_within_the_window(length, window, stride):
    ids = list(range(100, 100 + length))
    pairs = sliding_windows(ids, window, stride)
    assert [t for _, cont in pairs for t in cont] == ids[1:]
    for context, continuation in pairs:
        assert context and len(context) + len(continuation) - 1 <= window
        assert ids[ids.index(context[0]):ids.index(continuation[-1]) + 1] == context + continuation


def text_file(tmp_path, text):
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_perplexity_with_stride_one_matches_each_token_scored_from_its_window(model, tokenizer, tmp_path):
    text = "def add(a, b):\n    return a + b\n" * 2  # 66 bytes: 66 byte tokens, plus BOS
    result = perplexity(LoadedModel(model, tokenizer), text_file(tmp_path, text), window=16, stride=1)
    ids = [tokenizer.bos_id] + tokenizer.encode(text, add_bos=False)
    nll = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            context = ids[max(0, i - 16):i]  # exactly the 16 tokens before (fewer at the start)
            nll.append(-float(torch.log_softmax(model(torch.tensor([context]))[0, -1], -1)[ids[i]]))
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(text.encode())
    assert result["nll_per_token"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(sum(nll) / math.log(2) / len(text.encode()), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert 0 < result["bits_per_byte_stderr"] < result["bits_per_byte"]


def test_perplexity_with_a_window_over_the_whole_text_is_the_full_sequence_loss(model, tokenizer, tmp_path):
    text = "plinth measures models the way the field does. é ✓"
    result = perplexity(LoadedModel(model, tokenizer), text_file(tmp_path, text), window=200, stride=50)
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text, add_bos=False)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    assert result["nll_per_token"] == pytest.approx(float(loss), abs=1e-5)
    assert result["documents"] == 1


def test_bad_perplexity_settings_are_explained(model, tokenizer, tmp_path):
    loaded, path = LoadedModel(model, tokenizer), text_file(tmp_path, "some text")
    with pytest.raises(PlinthError, match="stride=9"):
        perplexity(loaded, path, window=8, stride=9)
    with pytest.raises(PlinthError, match="window=999"):
        perplexity(loaded, path, window=999)
    with pytest.raises(PlinthError, match="no text"):
        perplexity(loaded, text_file(tmp_path, ""))


@pytest.mark.slow
def test_scores_match_hugging_face_transformers_on_smollm2(smollm2_fp32, hf_smollm2):
    hf, _ = hf_smollm2
    tok = smollm2_fp32.tokenizer
    requests = [(tok.encode("The capital of France is"), tok.encode(" Paris")),
                (tok.encode("def fibonacci(n):\n    if n < 2:\n        return"), tok.encode(" n\n    return fib")),
                (tok.encode("Sentiment of 'a dull, lifeless film':"), tok.encode(" negative"))]
    for (context, continuation), s in zip(requests, score(smollm2_fp32.model, requests)):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([context + continuation])).logits[0], dim=-1)
        expected = [float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation)]
        assert s.logprobs == pytest.approx(expected, abs=2e-3)
