"""Regression heads: one number per text on pooled hidden states, trained with squared error
through the one training loop; validation MSE and correlations; save → load; bad input."""
import json
import random

import numpy as np
import pytest
import torch

import plinth
from plinth.adapt.classify import Head
from plinth.adapt.finetune import evaluate, finetune, prepare
from plinth.errors import PlinthError
from plinth.cli import main
from plinth.loss import summed_loss
from plinth.train.loop import target_count
from tests.test_finetune import BAD, GOOD, base, quiet, recipe, write_lines  # noqa: F401 (base is a fixture)


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """Generated texts whose score is the count of good words minus the count of bad ones (−3 … +3)."""
    rng = random.Random(0)
    rows = []
    for _ in range(240):
        words = rng.choices(GOOD + BAD, k=3)
        rows.append({"text": " ".join(words), "score": sum(w in GOOD for w in words) - sum(w in BAD for w in words)})
    path = tmp_path_factory.mktemp("data") / "rated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def regress(tmp_path, base, data, **fields):
    values = dict(task="regress", method="probe", pooling="mean", lr=0.05, max_steps=40, eval_every=40, save_every=40)
    return recipe(tmp_path, base, data, **{**values, **fields})


def test_float_targets_take_squared_error_and_every_one_counts():
    scores, targets = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, -1.0, 0.0])
    assert float(summed_loss(scores, targets)) == pytest.approx(0.25 + 0 + 4)
    assert target_count(targets[:, None]) == 3
    ids = torch.tensor([[3, -100], [-100, -100]])
    assert target_count(ids) == 1  # token ids: IGNORE takes no part, as before


def test_probe_learns_scores_and_the_run_loads_as_a_predictor(tmp_path, base, rated):
    r = regress(tmp_path, base, rated)
    model, _, data = prepare(r, log=quiet)
    before = evaluate(model, data, r)
    final = finetune(r, log=quiet)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after = metrics[-1]
    assert after["val_loss"] < 0.3 * before["val_loss"] and after["val_pearson"] > 0.85 and after["val_spearman"] > 0.85
    assert "val_acc" not in after
    assert json.loads((final / "head.json").read_text())["kind"] == "regression"
    assert json.loads((final / "finetune.json").read_text())["labels"] is None
    loaded = plinth.load(str(final), dtype="float32")
    assert loaded.head.labels is None and loaded.head.kind == "regression"
    texts = ["superb lovely fun", "boring awful dull", "great bad fun"]
    predictions = loaded.predict(texts)
    assert all(isinstance(p, float) for p in predictions)
    assert predictions[0] > 1.5 and predictions[1] < -1.5 and predictions[0] > predictions[2] > predictions[1]
    with pytest.raises(PlinthError, match=r"regression head.*\.predict"):
        loaded.classify(texts)


def test_lora_regression_run_loads_with_adapter_and_head_as_trained(tmp_path, base, rated):
    """plinth.load merges the adapter into the base and attaches the head: the same numbers as the
    training-time model (unmerged LoRA + head) read back from the checkpoint."""
    from plinth.adapt.finetune import FinetuneWeights
    r = regress(tmp_path, base, rated, method="lora", lr=0.01, max_steps=6, eval_every=6, save_every=6,
                lora_dropout=0.0)
    final = finetune(r, log=quiet)
    assert {"adapter.safetensors", "head.safetensors", "head.json"} <= {p.name for p in final.iterdir()}
    trained, tokenizer, _ = prepare(r, log=quiet)
    FinetuneWeights(r).read(trained, final)
    texts = ["superb lovely fun", "dull"]
    with torch.no_grad():
        expected = [float(trained.eval()(torch.tensor([tokenizer.encode(t)]))[0]) for t in texts]
    assert plinth.load(str(final), dtype="float32").predict(texts) == pytest.approx(expected, abs=1e-4)
    # exported merged, the head goes along as a regression head: the folder predicts the same numbers
    assert main(["export", str(final), "--merge", "--to", "hf", str(tmp_path / "hf")]) == 0
    assert plinth.load(str(tmp_path / "hf"), dtype="float32").predict(texts) == pytest.approx(expected, abs=1e-4)


def test_validation_metrics_match_a_direct_computation(tmp_path, base, rated):
    """evaluate() against one forward per example: mean squared error, and numpy's Pearson r."""
    r = regress(tmp_path, base, rated, val_examples=24, batch_size=5)
    model, _, data = prepare(r, log=quiet)
    model.eval()
    with torch.no_grad():
        predicted = np.array([float(model(torch.tensor([e.tokens]))[0]) for e in data.val])
    truth = np.array([e.targets[0] for e in data.val])
    result = evaluate(model, data, r)
    assert result["val_loss"] == pytest.approx(float(np.mean((predicted - truth) ** 2)), rel=1e-5)
    assert result["val_pearson"] == pytest.approx(float(np.corrcoef(predicted, truth)[0, 1]), abs=1e-5)
    assert -1 <= result["val_spearman"] <= 1


def test_head_save_load_round_trip_keeps_kind_and_outputs(tmp_path):
    hidden, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    for labels in (None, ["a", "b", "c"]):
        torch.manual_seed(0)
        head = Head(16, labels, pooling="mean")
        folder = tmp_path / str(labels is None)
        folder.mkdir()
        head.save(folder)
        again = Head.load(folder)
        assert (again.kind, again.labels, again.pooling) == (head.kind, head.labels, "mean")
        torch.testing.assert_close(again(hidden, mask), head(hidden, mask), rtol=0, atol=0)
        assert head(hidden, mask).shape == ((3,) if labels is None else (3, 3))
    (tmp_path / "False" / "head.json").write_text(json.dumps({"labels": ["a", "b", "c"], "pooling": "mean"}))
    assert Head.load(tmp_path / "False").kind == "classification"  # heads saved before kinds existed
    (tmp_path / "True" / "head.json").write_text(json.dumps({"kind": "ranking", "labels": None, "pooling": "last"}))
    with pytest.raises(PlinthError, match="unknown head kind 'ranking'"):
        Head.load(tmp_path / "True")


@pytest.mark.parametrize("lines, fields, message", [
    (['{"text": "fine", "score": 1.5}', '{"text": "meh"}'], {}, r"line 2: missing field 'score'"),
    (['{"text": "fine", "score": "high"}'], {}, r"line 1: field 'score' must be int or float, got str"),
    (['{"text": "fine", "score": NaN}'], {}, r"line 1: field 'score' is nan; a regression target must be a finite"),
    (['{"text": "fine", "score": true}'], {}, r"line 1: field 'score' is True; a regression target must be a finite"),
    (['{"text": "fine", "score": 2}'] * 5, {"task": "chat", "method": "probe"}, "method=probe trains only a head"),
])
def test_bad_regression_input_fails_before_training(tmp_path, base, lines, fields, message):
    data = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(PlinthError, match=message):
        finetune(regress(tmp_path, base, data, val_examples=1, **fields), log=quiet)
    assert not (tmp_path / "run").exists()
