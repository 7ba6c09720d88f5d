"""Task registry, multiple-choice scoring, data loaders and statistics (tiny model, generated data)."""
import json
import math
import statistics

import pytest
import torch

from plinth.data.shards import split_of
from plinth.errors import PlinthError
from plinth.eval import datasets
from plinth.eval.datasets import ChoiceItem
from plinth.eval.stats import mean_stderr, pass_at_k
from plinth.eval.tasks import EvalOptions, check_tasks, encode_pair, multiple_choice, run_task
from plinth.loaded import LoadedModel


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 4), (20, 19, 2), (200, 7, 100)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # Chen et al. 2021, by exact combinatorics
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_stderr_is_the_sample_standard_error():
    values = [1, 0, 1, 1, 0, 1, 1]
    mean, stderr = mean_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_stderr([0.5]) == (0.5, 0.0)


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "Answer: ", "yes")
    assert tokenizer.decode(context) == "Answer:" and tokenizer.decode(continuation) == " yes"


def test_multiple_choice_picks_the_likeliest_choice_by_sum_and_per_byte(model, tokenizer):
    items = [ChoiceItem("The sky is", (" blue", " a very long answer", " x"), 0),
             ChoiceItem("1 + 1 =", (" 2", " 3"), 1),
             ChoiceItem("def f(", ("x):", "):", "self, y):"), 2)]
    result = multiple_choice(LoadedModel(model, tokenizer), items, EvalOptions())
    correct, correct_norm = [], []
    for item in items:  # reference: each choice alone, full logits, no batching
        totals = []
        for choice in item.choices:
            ids = tokenizer.encode(item.context + choice)
            n = len(tokenizer.encode(item.context))
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
            totals.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(n, len(ids))))
        norm = [t / len(c.encode()) for t, c in zip(totals, item.choices)]
        correct.append(totals.index(max(totals)) == item.gold)
        correct_norm.append(norm.index(max(norm)) == item.gold)
    assert result["value"] == pytest.approx(sum(correct) / 3)
    assert result["accuracy_norm"] == pytest.approx(sum(correct_norm) / 3)
    assert result["stderr"] == pytest.approx(mean_stderr([float(c) for c in correct])[1])
    assert result["n"] == 3 and result["choices_scored"] == 8
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def write_items(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_a_jsonl_task_file_runs_as_a_task(model, tokenizer, tmp_path):
    path = write_items(tmp_path / "items.jsonl", [{"context": "a", "choices": [" b", " c"], "gold": 1}] * 3)
    result = run_task(path, LoadedModel(model, tokenizer), EvalOptions(limit=2))
    assert result["n"] == 2 and result["metric"] == "accuracy" and result["seconds"] > 0


@pytest.mark.parametrize("row,message", [
    ("{not json", "not JSON"),
    ({"choices": [" a", " b"], "gold": 0}, "'context'"),
    ({"context": "q", "choices": " a", "gold": 0}, "'choices' must be a list"),
    ({"context": "q", "choices": [" a"], "gold": 0}, "2 or more"),
    ({"context": "q", "choices": [" a", " b"], "gold": 2}, "'gold' must be an index from 0 to 1"),
    ({"context": "q", "choices": [" a", " b"], "gold": "0"}, "'gold'"),
])
def test_a_task_file_with_a_wrong_schema_names_the_line_and_the_field(tmp_path, row, message):
    good = {"context": "q", "choices": [" a", " b"], "gold": 0}
    path = write_items(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(PlinthError, match=message) as error:
        datasets.choice_file(tmp_path / "bad.jsonl")
    assert f"{path}:2" in str(error.value)


def test_unknown_tasks_and_bad_limits_are_explained():
    with pytest.raises(PlinthError, match="unknown task .sentimnet.*perplexity.*sentiment.*topic.*humaneval"):
        check_tasks(["sentiment", "sentimnet"])
    for limit in (0, -3):
        with pytest.raises(PlinthError, match=f"limit={limit}"):
            EvalOptions(limit=limit)


RATINGS = "1\t2.5\tA gorgeous, moving film.\n2\t-3.1\tDull and lifeless.\n3\t0.2\tIt exists.\n" + "".join(
    f"{i}\t{(-1) ** i * 1.5}\tSentence number {i}.\n" for i in range(4, 400))


def test_sentiment_items_are_held_out_labelled_sentences():
    items = datasets.sentiment_items(tsv=RATINGS)
    held_out = [i for i in range(1, 400) if split_of(f"movie-{i}", 0.2) == "val" and i != 3]
    assert len(items) == len(held_out) and 40 < len(items) < 120  # ~20%, the near-neutral one dropped
    assert all(item.choices == (" negative", " positive") for item in items)
    by_text = {item.context: item.gold for item in items}
    for i in held_out:
        text = {1: "A gorgeous, moving film.", 2: "Dull and lifeless."}.get(i, f"Sentence number {i}.")
        assert by_text[f"Review: {text}\nSentiment:"] == int(i == 1 or (i >= 4 and i % 2 == 0))
    assert datasets.sentiment_items(limit=5, tsv=RATINGS) == items[:5]  # --limit: the same items every time
    with pytest.raises(PlinthError, match="line 2"):
        datasets.sentiment_items(tsv="1\t1.0\tfine\nbroken line\n")


def wordnet_folder(tmp_path):
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    lines = {"noun": [f"0000{i:04d} {5 + i % 3:02d} n 01 word{i} 0 000 | gloss number {i}; \"an example\""
                      for i in range(30)],
             "verb": ["00001740 29 v 01 breathe 0 000 | draw air into, and expel out of, the lungs"],
             "adj": ["00001740 00 a 01 able 0 000 | having the necessary means"], "adv": []}
    for pos, rows in lines.items():
        (tmp_path / f"data.{pos}").write_text(header + "".join(r + "  \n" for r in rows))
    return tmp_path


def test_topic_items_offer_the_gold_class_among_four_others(tmp_path):
    folder = wordnet_folder(tmp_path)
    items = datasets.topic_items(folder=folder)
    assert len(items) == 32
    glosses = dict(datasets.wordnet_glosses(folder))
    for item in items:
        gloss = item.context.removeprefix("Definition: ").removesuffix("\nTopic:")
        assert len(item.choices) == 5 == len(set(item.choices))
        assert item.choices[item.gold] == " " + datasets.LEXNAMES[glosses[gloss]]
    assert glosses["gloss number 4"] == 6 and "example" not in "".join(glosses)
    assert datasets.topic_items(limit=3, folder=folder) == items[:3]
    assert {item.gold for item in items} != {items[0].gold}  # the answer's position varies
    with pytest.raises(PlinthError, match="wordnet-base"):
        datasets.topic_items(folder=tmp_path / "missing")
