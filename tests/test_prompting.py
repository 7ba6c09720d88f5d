"""Zero-/k-shot prompting: prompt building, answer parsing, label scoring (with a shared-prefix KV
cache) against plain full-prompt forward passes, and the `plinth prompt` command."""
import json

import pytest
import torch

from plinth.adapt.prompting import PromptTask, answer_tokens, parse_answer, pick_shots, prompt_ids, score
from plinth.data.sentiment import LabelledText
from plinth.errors import PlinthError

TASK = PromptTask("Mood?", ("negative", "positive"))


def test_k_shot_prompt_shows_examples_as_earlier_turns(tokenizer):
    task = TASK.with_shots([("great fun", "positive"), ("dull", "negative")])
    messages = task.messages("lovely")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages[1::2]] == ["positive", "negative"]
    assert messages[-1]["content"].endswith("lovely") and "negative or positive" in messages[-1]["content"]
    text = tokenizer.decode(prompt_ids(tokenizer, task, "lovely"))
    assert text.endswith("lovely\nassistant\n")  # specials decode to nothing; the generation prompt ends it


def test_answers_are_parsed_into_the_label_set():
    assert parse_answer("It is Positive, clearly.", TASK.labels) == "positive"
    assert parse_answer("negative... or maybe positive", TASK.labels) == "negative"  # the first one named
    assert parse_answer("I cannot tell", TASK.labels) is None
    assert parse_answer("unpositive", TASK.labels) is None  # whole words only


def test_scoring_with_a_shared_prefix_matches_full_forward_passes(model, tokenizer):
    task = TASK.with_shots([("so dull", "negative")])
    texts = ["lovely", "awful film", "meh", "a superb and moving story"]
    choices = answer_tokens(tokenizer, task)
    expected = []
    with torch.no_grad():
        for text in texts:
            logits = model(torch.tensor([prompt_ids(tokenizer, task, text)]))[0, -1]
            expected.append(task.labels[int(logits[choices].argmax())])
            assert logits[choices[0]] != logits[choices[1]]  # a real decision, not a tie
    assert score(model, tokenizer, task, texts) == expected


def test_labels_must_be_distinct_and_start_differently(tokenizer):
    with pytest.raises(PlinthError, match="two or more distinct"):
        PromptTask("?", ("yes", "yes"))
    with pytest.raises(PlinthError, match="start with the same token"):
        answer_tokens(tokenizer, PromptTask("?", ("good", "great")))
    with pytest.raises(PlinthError, match="not in the label set"):
        TASK.messages("x", answer="neutral")


def test_shots_take_turns_over_the_labels():
    pool = [LabelledText(str(i), f"text {i}", ("negative", "positive")[i % 3 == 0]) for i in range(30)]
    shots = pick_shots(pool, 8, TASK.labels, seed=1)
    assert [label for _, label in shots] == ["negative", "positive"] * 4
    assert len({text for text, _ in shots}) == 8 and shots == pick_shots(pool, 8, TASK.labels, seed=1)


def test_prompt_command_labels_texts(tmp_path, capsys, monkeypatch, model, tokenizer):
    import plinth.cli.adapt
    from plinth.loaded import LoadedModel
    monkeypatch.setattr(plinth.cli.adapt, "load_model", lambda args: LoadedModel(model, tokenizer))
    examples = tmp_path / "train.jsonl"
    examples.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                                  [("fun", "positive"), ("bad", "negative")] * 2))
    code = plinth.cli.main(["prompt", "tiny", "lovely", "awful", "--labels", "negative,positive", "--shots", "2", "--instruction", "Mood?",
                            "--examples", str(examples)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 2 and all(line.split("\t")[0] in TASK.labels for line in lines)
    assert plinth.cli.main(["prompt", "tiny", "x", "--labels", "negative,positive", "--shots", "2"]) == 2
