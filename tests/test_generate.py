"""Sampling, stop strings, UTF-8-safe streaming and logprobs, on a tiny random model."""
import math

import pytest
import torch

from plinth.errors import PlinthError
from plinth.generate import Sampler, SamplingParams, Sequence, TextStream, filter_probs, generate_stream

pytestmark = pytest.mark.usefixtures("no_grad")
PROMPT = list(b"Hello")


def run(model, tokenizer, **options):
    return list(generate_stream(model, tokenizer, PROMPT, SamplingParams(**options)))


def test_greedy_equals_argmax_of_full_recompute(model, tokenizer):
    steps = run(model, tokenizer, max_tokens=12, temperature=0, ignore_eos=True)
    ids = list(PROMPT)
    for step in steps:
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert step.choice.token == ids[-1]
    assert steps[-1].finish_reason == "length" and len(steps) == 12


def test_seeded_sampling_is_reproducible(model, tokenizer):
    first = [s.choice.token for s in run(model, tokenizer, max_tokens=16, seed=7, ignore_eos=True)]
    again = [s.choice.token for s in run(model, tokenizer, max_tokens=16, seed=7, ignore_eos=True)]
    other = [s.choice.token for s in run(model, tokenizer, max_tokens=16, seed=8, ignore_eos=True)]
    assert first == again and first != other


@pytest.mark.parametrize("narrow", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_are_greedy(model, tokenizer, narrow):
    greedy = [s.choice.token for s in run(model, tokenizer, max_tokens=8, temperature=0, ignore_eos=True)]
    sampled = [s.choice.token for s in run(model, tokenizer, max_tokens=8, temperature=5.0, seed=1,
                                           ignore_eos=True, **narrow)]
    assert sampled == greedy


def test_filter_probs_semantics():
    p = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert filter_probs(p, 2, 1.0, 0.0).tolist() == pytest.approx([0, 0.4, 0.3, 0])
    assert filter_probs(p, 0, 0.6, 0.0).tolist() == pytest.approx([0, 0.4, 0.3, 0])  # 0.4 < 0.6 ≤ 0.7
    assert filter_probs(p, 0, 0.4, 0.0).tolist() == pytest.approx([0, 0.4, 0, 0])
    assert filter_probs(p, 0, 1.0, 0.6).tolist() == pytest.approx([0, 0.4, 0.3, 0])  # ≥ 0.6 × 0.4


def test_penalties_and_bias_against_hand_computation():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={3: 10.0})
    sampler = Sampler(params, prompt=[0], vocab_size=4)
    sampler.observe(1)
    sampler.observe(1)
    out = sampler.adjust(torch.tensor([2.0, -2.0, 1.0, 0.0]))
    # token 0: seen in prompt → 2/2; token 1: generated twice → -2*2 - 2*0.5 - 0.25; token 3: +10 bias
    assert out.tolist() == pytest.approx([1.0, -5.25, 1.0, 10.0])


def test_logit_bias_forces_a_token(model, tokenizer):
    steps = run(model, tokenizer, max_tokens=5, seed=3, logit_bias={ord("z"): 100.0})
    assert "".join(s.text for s in steps) == "zzzzz"


def test_logprobs_are_the_models(model, tokenizer):
    steps = run(model, tokenizer, max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    expected = torch.log_softmax(model(torch.tensor([PROMPT]))[0, -1], -1)
    first = steps[0].choice
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t for t, _ in first.top] == expected.topk(4).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(first.top, first.top[1:]))
    assert sum(math.exp(lp) for _, lp in first.top) <= 1.0


def feed(stream, text):
    pieces, stopped = [], False
    for byte in text.encode():  # one token per byte: the worst case for splitting
        piece, stopped = stream.add(byte)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped


def test_stop_string_split_across_tokens(tokenizer):
    stream = TextStream(tokenizer, ["STOP", "\n\n"])
    pieces, stopped = feed(stream, "Hello STOP world")
    assert stopped and "".join(pieces) == "Hello "
    assert not any("S" in p for p in pieces)


def test_partial_stop_is_released_when_it_does_not_complete(tokenizer):
    stream = TextStream(tokenizer, ["STOP"])
    pieces, stopped = feed(stream, "a STOrm")
    assert not stopped and "".join(pieces) + stream.finish() == "a STOrm"
    assert pieces == ["a", " ", "", "", "", "STOr", "m"]  # "STO" held back until "r" ruled "STOP" out


def test_streaming_never_splits_a_utf8_character(tokenizer):
    text = "café 😀 naïve — 東京"
    stream = TextStream(tokenizer, [])
    pieces, _ = feed(stream, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == text


def test_sequence_stops_on_end_token_and_stop_string(tokenizer):
    seq = Sequence([1], SamplingParams(temperature=0, stop=["xy"]), tokenizer, 259)
    logits = torch.zeros(259)
    logits[ord("x")] = 1
    assert seq.step(logits).finish_reason is None
    logits[ord("y")] = 2
    step = seq.step(logits)
    assert step.finish_reason == "stop" and step.text == ""
    seq = Sequence([1], SamplingParams(temperature=0), tokenizer, 259)
    logits[258] = 10  # <|im_end|>
    assert seq.step(logits).finish_reason == "stop"


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_p=0), dict(top_k=-1),
                                 dict(min_p=2), dict(max_tokens=0), dict(repetition_penalty=0),
                                 dict(presence_penalty=3), dict(temperature=float("nan")), dict(logprobs=50),
                                 dict(stop=[""]), dict(logit_bias={999: 1.0})])
def test_invalid_sampling_values_name_the_field(bad):
    with pytest.raises(PlinthError, match=next(iter(bad)) if "logit_bias" not in bad else "logit_bias"):
        SamplingParams(**bad).validate(vocab_size=259)


def test_prompt_longer_than_context_is_a_clear_error(model, tokenizer):
    with pytest.raises(PlinthError, match="300 tokens.*context window is 256"):
        list(generate_stream(model, tokenizer, [1] * 300, SamplingParams()))


def test_generation_stops_at_the_context_window(model, tokenizer):
    steps = list(generate_stream(model, tokenizer, [1] * 250, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    assert len(steps) == 6 and steps[-1].finish_reason == "length"
