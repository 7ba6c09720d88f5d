"""Speculative decoding by prompt lookup: the drafter, exact-match acceptance, and generation that is
token for token plain decoding's (tiny random models; the real SmolLM2 in the slow test)."""
import copy

import pytest
import torch

from plinth.generate import SamplingParams, Sequence, generate_stream
from plinth.kv_cache import KVCache
from plinth.quant import compact_
from plinth.speculative import ROWS, PromptLookup, Speculator, verify
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")
REPETITIVE = list(b"the cat sat on the mat; the cat sat on the")
OTHER = list(b"Hello, world")


def sharp_model(dtype: str = "int4", scale: float = 6):
    """A tiny model with its weights scaled up: at its init scale a random model just repeats its
    last token, which any decoder gets right. Scaled 6×, its greedy output varies and often repeats
    itself, so drafts are both kept and rejected; scaled 10×, it rarely repeats. int4 and int8 are
    the compact weights `plinth.load` gives, with bfloat16 activations."""
    model = tiny_model()
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.mul_(scale)
    return compact_(model, dtype)


def generate(model, tokenizer, prompt, speculate, **options):
    return list(generate_stream(model, tokenizer, prompt, SamplingParams(**options), speculate=speculate))


def same_steps(plain, fast):
    assert [s.choice.token for s in fast] == [s.choice.token for s in plain]
    assert [s.text for s in fast] == [s.text for s in plain]  # the same text pieces at the same steps
    assert [s.finish_reason for s in fast] == [s.finish_reason for s in plain]
    assert [(s.choice.logprob, s.choice.top) for s in fast] == [(s.choice.logprob, s.choice.top) for s in plain]


# ---- the drafter -------------------------------------------------------------------------------------
def test_lookup_continues_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup.propose(tokens) == [7, 8, 5]  # "2 3" last occurred before 7 (the 3-gram "5 2 3" never did)
    assert lookup.propose(tokens + [4]) == []   # 4 never occurred before
    assert lookup.propose(tokens + [4, 5], limit=2) == [2, 3]  # "5" → what followed it, cut at the limit


def test_lookup_repeats_a_match_that_runs_into_the_end():
    lookup = PromptLookup(max_ngram=2, min_ngram=2)
    assert lookup.propose([7, 1, 2, 1, 2]) == [1, 2, 1]  # "1 2" last seen just before: period 2


def test_drafts_grow_while_all_are_kept_in_passes_of_whole_row_groups():
    lookup = PromptLookup(min_ngram=1, max_draft=11)
    tokens = list(range(20)) + [0]
    lengths = []
    for kept in (True, True, True, False, True):
        drafts = lookup.propose(tokens)
        lengths.append(len(drafts))
        lookup.record(len(drafts), len(drafts) if kept else 1)
    assert lengths == [ROWS - 1, 2 * ROWS - 1, 11, 11, ROWS - 1]  # passes of 4, 8, 12 tokens; a miss: back to 4


def test_lookup_switches_off_when_drafts_keep_failing_and_retries_later():
    lookup = PromptLookup(max_ngram=1, min_ngram=1, patience=2, backoff=3, max_backoff=6)
    tokens = [5, 6, 5]
    def drafts_over(calls):
        return [bool(lookup.propose(tokens)) for _ in range(calls)]
    assert drafts_over(1) == [True]
    lookup.record(proposed=4, accepted=0)
    assert drafts_over(1) == [True]  # one failure is within patience
    lookup.record(proposed=4, accepted=0)
    assert drafts_over(4) == [False] * 3 + [True]  # off for `backoff` calls, then one retry
    lookup.record(4, 0)
    lookup.record(4, 0)
    assert drafts_over(7) == [False] * 6 + [True]  # failing again: off twice as long
    lookup.record(4, 0)
    lookup.record(4, 0)
    assert drafts_over(7) == [False] * 6 + [True]  # capped at max_backoff
    lookup.record(4, 1)                            # a kept draft resets it
    lookup.record(4, 0)
    lookup.record(4, 0)
    assert drafts_over(4) == [False] * 3 + [True]
    assert (lookup.proposed, lookup.accepted) == (36, 1)


@pytest.mark.parametrize("bad", [dict(max_ngram=1, min_ngram=2), dict(max_draft=0), dict(max_draft=15)])
def test_bad_drafter_settings_are_named(bad):
    with pytest.raises(ValueError, match="max_draft ≤ 14"):
        PromptLookup(**bad)


# ---- acceptance ----------------------------------------------------------------------------------
def one_hot(tokens, vocab=259):
    """Logit rows whose greedy choice is each of `tokens`."""
    rows = torch.zeros(len(tokens), vocab)
    rows[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return rows


def sequence(tokenizer, **options):
    return Sequence(list(b"ab"), SamplingParams(temperature=0, **options), tokenizer, 259)


def test_verify_keeps_drafts_up_to_the_first_mismatch_and_adds_the_models_token(tokenizer):
    seq = sequence(tokenizer)
    steps = verify(seq, list(b"xyz"), one_hot(list(b"xyQ?")))
    assert [s.choice.token for s in steps] == list(b"xyQ") and seq.output == list(b"xyQ")
    steps = verify(seq, list(b"12"), one_hot(list(b"123")))  # every draft kept: the last row's token too
    assert [s.choice.token for s in steps] == list(b"123")


def test_verify_stops_at_a_finished_step(tokenizer):
    seq = sequence(tokenizer, max_tokens=2)
    assert [s.finish_reason for s in verify(seq, list(b"xyz"), one_hot(list(b"xyzw")))] == [None, "length"]
    seq = sequence(tokenizer, stop=["y"])
    steps = verify(seq, list(b"xyz"), one_hot(list(b"xyzw")))
    assert [s.finish_reason for s in steps] == [None, "stop"] and "".join(s.text for s in steps) == "x"


def test_speculator_never_drafts_past_the_token_limit(tokenizer):
    seq = Sequence(list(b"abababab"), SamplingParams(max_tokens=3), tokenizer, 259)
    speculator = Speculator(seq, PromptLookup())
    assert speculator.propose() == list(b"ab")  # 3 tokens left: the pass's first one plus 2 drafts
    seq.output = list(b"ab")
    assert speculator.propose() == []


# ---- generation: the same output as plain decoding -----------------------------------------------
@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_a_verify_pass_gives_each_token_the_bits_of_decoding_it_alone(tokenizer, dtype):
    """What makes speculative output plain decoding's: over the keys decoding wrote, a pass over the
    next 8 tokens gives, bit for bit, the logits decoding them one per pass gave, at every position."""
    model = sharp_model(dtype)
    new = [s.choice.token for s in generate(model, tokenizer, REPETITIVE, False, max_tokens=64, temperature=0,
                                            ignore_eos=True)]
    tokens, start = REPETITIVE + new, len(REPETITIVE)
    cache = KVCache.for_model(model, 1, len(tokens))
    model(torch.tensor([REPETITIVE]), cache=cache.view())
    alone = torch.cat([model(torch.tensor([[t]]), cache=cache.view(start + i))[0] for i, t in enumerate(new)])
    for p in range(start, len(tokens) - 8):
        together = model(torch.tensor([tokens[p:p + 8]]), cache=copy.deepcopy(cache).view(p))[0]
        assert torch.equal(together, alone[p - start:p - start + 8]), f"position {p}"


@pytest.mark.parametrize("dtype", ["int4", "int8"])
@pytest.mark.parametrize("prompt", [REPETITIVE, OTHER], ids=["repetitive", "other"])
def test_greedy_output_is_plain_decodings(tokenizer, prompt, dtype):
    model = sharp_model(dtype)
    options = dict(max_tokens=60, temperature=0, ignore_eos=True, logprobs=2)
    lookup = PromptLookup()
    fast = generate(model, tokenizer, prompt, lookup, **options)
    same_steps(generate(model, tokenizer, prompt, False, **options), fast)
    assert lookup.accepted > 0
    if prompt is OTHER:
        assert lookup.accepted < lookup.proposed  # drafts were rejected too


def test_float32_greedy_tokens_are_plain_decodings(tokenizer):
    """With float32 weights PyTorch's matrix product sums a row differently depending on how many
    rows it multiplies, so a verify pass's logits differ from decoding's in the last bits (so do
    logprobs); the chosen tokens differ only where two candidates tie to those bits."""
    model = sharp_model("float32")
    lookup = PromptLookup()
    fast = generate(model, tokenizer, OTHER, lookup, max_tokens=60, temperature=0, ignore_eos=True)
    plain = generate(model, tokenizer, OTHER, False, max_tokens=60, temperature=0, ignore_eos=True)
    assert [s.choice.token for s in fast] == [s.choice.token for s in plain] and lookup.accepted > 0


def test_seeded_sampling_with_penalties_is_plain_decodings(tokenizer):
    model = sharp_model()
    options = dict(max_tokens=60, temperature=0.5, top_k=5, seed=3, repetition_penalty=1.05,
                   frequency_penalty=0.1, ignore_eos=True, logprobs=0)
    lookup = PromptLookup()
    fast = generate(model, tokenizer, OTHER, lookup, **options)
    same_steps(generate(model, tokenizer, OTHER, False, **options), fast)
    assert 0 < lookup.accepted < lookup.proposed


@pytest.mark.parametrize("limits", [dict(max_tokens=11), dict(stop=["ttt"])], ids=["max_tokens", "stop"])
def test_limits_and_stops_are_honoured_exactly(tokenizer, limits):
    model = tiny_model()  # at its init scale it repeats its last token: drafts of it are kept
    prompt = list(b"it sat on the mat; it sat on the matt")
    lookup = PromptLookup(min_ngram=1)
    fast = generate(model, tokenizer, prompt, lookup, temperature=0, ignore_eos=True, **limits)
    same_steps(generate(model, tokenizer, prompt, False, temperature=0, ignore_eos=True, **limits), fast)
    assert lookup.accepted > 0
    if "stop" in limits:  # the stop string completes inside a pass's drafts
        assert [s.finish_reason for s in fast] == [None, None, "stop"] and "".join(s.text for s in fast) == ""
    else:
        assert len(fast) == 11 and fast[-1].finish_reason == "length"


def test_the_drafter_switches_off_where_guesses_keep_failing(tokenizer):
    """On output that rarely repeats, a drafter that switches itself off feeds far fewer guesses
    through the model than one that never gives up; both give plain decoding's output."""
    model = sharp_model("int8", scale=10)
    options = dict(max_tokens=120, temperature=0, ignore_eos=True)
    plain = generate(model, tokenizer, OTHER, False, **options)
    fed = {}
    for patience in (2, 10**9):
        lookup = PromptLookup(min_ngram=1, patience=patience)
        same_steps(plain, generate(model, tokenizer, OTHER, lookup, **options))
        assert lookup.accepted < lookup.proposed / 4  # the guesses do fail here
        fed[patience] = lookup.proposed
    assert fed[2] < fed[10**9] / 3


@pytest.mark.slow
def test_real_model_copies_a_given_file_as_plain_decoding_does():
    import plinth
    from pathlib import Path
    m = plinth.load()
    code = (Path(__file__).resolve().parent.parent / "plinth" / "files.py").read_text()
    code = code[code.index("def write_atomic"):][:700]
    prompt = m.tokenizer.encode(m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Rewrite this code with type hints:\n\n" + code}], add_generation_prompt=True))
    lookup = PromptLookup()
    fast = generate(m.model, m.tokenizer, prompt, lookup, max_tokens=160, temperature=0)
    same_steps(generate(m.model, m.tokenizer, prompt, False, max_tokens=160, temperature=0), fast)
    assert lookup.accepted > len(fast) // 4  # it did copy: many tokens came from drafts
