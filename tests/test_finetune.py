"""plinth finetune end to end on a tiny model: label LoRA, classification probe, chat SFT masks,
resume after a kill, loading the result, export to Hugging Face, and bad input caught up front."""
import json
import random
from pathlib import Path

import pytest
import torch

import plinth
from plinth.weights.load import read_model
from plinth.adapt import sft
from plinth.adapt.lora import load_adapter
from plinth.adapt.finetune import FinetuneRecipe, finetune, prepare
from plinth.cli import main
from plinth.errors import PlinthError
from plinth.weights.native import write_model
from plinth.loss import IGNORE
from plinth.train.recipe import load_recipe
from tests.conftest import byte_tokenizer, tiny_model

GOOD, BAD = ["great", "fun", "lovely", "superb"], ["awful", "dull", "boring", "bad"]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random base model saved as a plinth checkpoint folder, with a byte tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    model = tiny_model()
    with torch.no_grad():  # tied embeddings of std 0.02 cap logits near ±1.3: a frozen base could fit nothing
        model.tok_embeddings.weight.mul_(10)
    write_model(model, folder)
    byte_tokenizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """Generated labelled texts: the label is carried by the words used."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    rows = []
    for i in range(240):
        label = ("negative", "positive")[i % 2]
        words = rng.choices(GOOD if label == "positive" else BAD, k=3)
        rows.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(rows) + "\n")
    return path


def recipe(tmp_path, base, data, **fields) -> FinetuneRecipe:
    values = dict(name="t", out_dir=str(tmp_path / "run"), base=str(base), data=str(data), instruction="Mood?",
                  seq_len=96, batch_size=8, max_steps=24, lr=0.01, warmup_steps=2, val_examples=40,
                  eval_every=12, save_every=12, log_every=4, lora_rank=4, autocast="none")
    return FinetuneRecipe(**{**values, **fields})


def test_lora_label_task_learns_and_saves_only_the_adapter(tmp_path, base, reviews):
    final = finetune(recipe(tmp_path, base, reviews), log=quiet)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_loss"] < 0.75 * metrics[0]["loss"] and 0 <= metrics[-1]["val_acc"] <= 1
    files = {p.name for p in final.iterdir()}
    assert {"adapter.safetensors", "adapter.json", "finetune.json"} <= files and "model.safetensors" not in files
    assert (final / "adapter.safetensors").stat().st_size < 200_000
    # plinth.load merges the adapter into its base: the same logits as base + unmerged adapter
    unmerged = read_model(base)[0]
    load_adapter(unmerged, final)
    merged = plinth.load(str(final), dtype="float32").model
    ids = torch.tensor([list(b"great fun")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), unmerged(ids), atol=1e-4, rtol=0)
        assert (merged(ids) - plinth.load(str(base), dtype="float32").model(ids)).abs().max() > 0.1  # it changed


def test_kill_then_resume_continues_step_for_step(tmp_path, base, reviews):
    whole = recipe(tmp_path / "a", base, reviews, max_steps=8, save_every=4, log_every=1, eval_every=4)
    finetune(whole, log=quiet)

    class Killed(Exception):
        pass

    def kill_at_step_6(message):
        if message.startswith("step 6/"):
            raise Killed

    killed = recipe(tmp_path / "b", base, reviews, max_steps=8, save_every=4, log_every=1, eval_every=4)
    with pytest.raises(Killed):
        finetune(killed, log=kill_at_step_6)
    finetune(killed, resume=True, log=quiet)

    def losses(r):
        return [json.loads(line)["loss"] for line in (Path(r.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert losses(killed) == losses(whole)


def test_classification_probe_trains_the_head_alone(tmp_path, base, reviews):
    r = recipe(tmp_path, base, reviews, task="classify", method="probe", lr=0.05, max_steps=30, eval_every=30,
               save_every=30, pooling="mean")
    model, _, _ = prepare(r, log=quiet)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.linear.weight", "head.linear.bias"}
    final = finetune(r, log=quiet)
    assert {p.name for p in final.iterdir()} >= {"head.safetensors", "head.json"}
    loaded = plinth.load(str(final), dtype="float32")
    assert loaded.classify(["superb lovely fun", "boring awful dull"]) == ["positive", "negative"]
    assert loaded.predict(["superb lovely fun"]) == ["positive"]  # predict answers with the head's kind


def test_sft_targets_are_the_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]
    example = sft.render(tokenizer, messages)
    assert len(example.tokens) == len(example.targets)
    trained = tokenizer.decode([t for t in example.targets if t != IGNORE])
    assert trained == "Hello!\nSee you.\n"  # the <|im_end|> markers are trained too but decode to nothing
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    assert example.targets.count(im_end) == 2  # one end-of-turn per assistant turn, none for the user's


def test_chat_sft_with_packing_runs(tmp_path, base):
    path = tmp_path / "chats.jsonl"
    chats = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} it is"}]}
             for i in range(30)]
    path.write_text("\n".join(json.dumps(c) for c in chats))
    r = recipe(tmp_path, base, path, task="chat", pack=True, seq_len=128, val_examples=4, max_steps=4,
               eval_every=4, save_every=4)
    _, _, data = prepare(r, log=quiet)
    assert len(data.train) < 26 and max(len(e.tokens) for e in data.train) <= 128  # packed rows
    assert all(e.documents is not None for e in data.train) and all(e.documents is None for e in data.val)
    finetune(r, log=quiet)
    assert "val_loss" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])


def test_export_merged_lora_to_hf_matches_transformers(tmp_path, base, reviews):
    transformers = pytest.importorskip("transformers")
    final = finetune(recipe(tmp_path, base, reviews, max_steps=4, save_every=4, eval_every=4), log=quiet)
    assert main(["export", str(final), "--to", "hf", str(tmp_path / "hf")]) == 2  # --merge is required
    assert main(["export", str(final), "--merge", "--to", "hf", str(tmp_path / "hf")]) == 0
    ours = plinth.load(str(final), dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.tensor([[104, 105, 32, 116, 104, 101, 114, 101]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.model(ids), atol=1e-4, rtol=1e-4)
    assert main(["export", str(final), "--merge", "--to", "hf", str(tmp_path / "hf")]) == 2  # never overwrites


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, fields, message", [
    (['{"text": "fine", "label": "positive"}', '{"text": "meh"}'], {}, r"line 2: missing field 'label'"),
    (['{"text": 3, "label": "positive"}'], {}, r"line 1: field 'text' must be str"),
    (['{"text": "ok", "label": "neutral"}'], {}, r"line 1: field 'label' is 'neutral', not in the label set"),
    (['{"text": "ok", "label": "positive"}'] * 10, {"val_examples": 10}, "the train split is empty"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], {"task": "chat"}, "line 1: the conversation has no assistant"),
    (['{"text": "ok", "label": "positive"}'] * 50, {"lora_rank": 100}, "rank 100 does not fit"),
])
def test_bad_input_fails_before_training_and_overwrites_nothing(tmp_path, base, lines, fields, message):
    data = write_lines(tmp_path / "data.jsonl", lines)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(PlinthError, match=message):
        finetune(recipe(tmp_path, base, data, **fields), log=quiet)
    assert (run / "metrics.jsonl").read_text() == "precious\n" and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_recipes_parse_and_unknown_keys_are_errors():
    from plinth.train.recipe import PretrainRecipe, recipe_values
    from plinth.vision.diffusion_pretrain import DiffusionRecipe
    from plinth.vision.pretrain import MaeRecipe
    for path in Path("recipes").glob("*-*.yaml"):  # each with the class its command reads it as
        kind = {"mae": MaeRecipe, "flow": DiffusionRecipe}.get(recipe_values(path).get("objective"),
                                      PretrainRecipe if path.name.startswith("pretrain-") else FinetuneRecipe)
        load_recipe(kind, path)
    with pytest.raises(PlinthError, match="unknown recipe key"):
        load_recipe(FinetuneRecipe, "recipes/lora-sentiment.yaml", ["--lora_rnak=4"])
    with pytest.raises(PlinthError, match="method=probe"):
        load_recipe(FinetuneRecipe, "recipes/lora-sentiment.yaml", ["--method=probe"])


def test_recompute_and_target_only_logits_leave_the_gradients_unchanged(tmp_path, base, reviews):
    """Activation checkpointing and projecting only target positions are pure savings: the same
    loss and the same gradients as the plain forward over every position."""
    grads = {}
    for recompute in (False, True):
        model, _, data = prepare(recipe(tmp_path, base, reviews, activation_checkpointing=recompute, lora_dropout=0.0), log=quiet)
        x, y = data.batch(0, 0)
        logits, kept = model.logits_at_targets(x, y)
        full = model(x)
        torch.testing.assert_close(logits, full[y != IGNORE])  # only the counted positions, same values
        model(x, targets=y).backward()  # the training loss, fused with the output layer
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad)


def test_cli_generates_with_an_adapter_and_reports_bad_recipes(tmp_path, base, reviews, capsys):
    from plinth.adapt.prompting import PromptTask
    final = finetune(recipe(tmp_path, base, reviews), log=quiet)
    prompt = byte_tokenizer().apply_chat_template(PromptTask("Mood?", ("negative", "positive")).messages("fun"))
    args = ["--max-tokens", "10", "--temperature", "0", "--dtype", "float32"]
    assert main(["generate", str(base), "--adapter", str(final), prompt, *args]) == 0  # as the README writes it
    with_adapter = capsys.readouterr().out
    assert with_adapter == plinth.load(str(final), dtype="float32").generate(prompt, max_tokens=10, temperature=0) + "\n"
    assert main(["generate", str(base), prompt, *args]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changes the completion
    # plinth eval --adapter scores the adapted model (plinth.load merges it, as checked above) and says so
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": prompt, "choices": [" negative", " positive"], "gold": g}) + "\n"
                             for g in (0, 1)))
    runs = []
    for model_args in ([str(base), "--adapter", str(final)], [str(final)]):
        assert main(["eval", *model_args, "--tasks", str(items), "--out", str(tmp_path / "evals")]) == 0
        runs.append(json.loads(Path(capsys.readouterr().out.split("results: ")[1].strip()).read_text()))
    assert runs[0]["adapter"] == str(final) and runs[1]["adapter"] is None
    assert [{k: v for k, v in run["tasks"][str(items)].items() if k not in ("seconds", "items_per_second")}
            for run in runs] == [{k: v for k, v in runs[1]["tasks"][str(items)].items()
                                  if k not in ("seconds", "items_per_second")}] * 2
    assert main(["finetune", "recipes/lora-sentiment.yaml", "--lora_rnak=3"]) == 2
    assert "unknown recipe key(s) lora_rnak" in capsys.readouterr().err


def test_chitchat_conversations_alternate_user_and_assistant(tokenizer):
    pytest.importorskip("chitchat_dataset")
    conversations = sft.load_conversations("chitchat")
    assert len(conversations) > 4000  # of 7,168: the rest have one speaker only, nothing to answer
    first = conversations[0]
    assert [m["role"] for m in first[:4]] == ["user", "assistant", "user", "assistant"]
    example = sft.render(tokenizer, first, max_len=200)
    assert len(example.tokens) <= 200 and any(t != IGNORE for t in example.targets)


def test_qlora_adapter_merges_onto_the_4bit_base_it_was_trained_with(tmp_path, base, reviews):
    from plinth.adapt.lora import NF4Linear, quantize_base
    final = finetune(recipe(tmp_path, base, reviews, method="qlora", max_steps=4, save_every=4, eval_every=4), log=quiet)
    assert json.loads((final / "adapter.json").read_text())["nf4_base"] is True
    trained = quantize_base(read_model(base)[0])
    load_adapter(trained, final)  # the training-time model: NF4 base + LoRA, unmerged
    assert any(isinstance(m, NF4Linear) for m in trained.modules())
    ids = torch.tensor([list(b"lovely")])
    with torch.no_grad():
        torch.testing.assert_close(plinth.load(str(final), dtype="float32").model(ids), trained(ids), atol=1e-4, rtol=0)


def test_validation_accuracy_is_the_label_choice_at_the_answer(tmp_path, base, reviews):
    """evaluate() against a direct computation: one full forward per example, the label whose first
    token scores highest where the answer starts."""
    from plinth.adapt.finetune import evaluate
    r = recipe(tmp_path, base, reviews, val_examples=24)
    model, _, data = prepare(r, log=quiet)
    model.eval()
    correct, losses = 0, []
    with torch.no_grad():
        for e in data.val:
            logits = model(torch.tensor([e.tokens]))[0]
            at = next(i for i, t in enumerate(e.targets) if t != IGNORE)
            best = max(data.choices, key=lambda c: float(logits[at, c]))
            correct += best == e.targets[at]
            losses += torch.nn.functional.cross_entropy(logits, torch.tensor(e.targets), reduction="none")[
                torch.tensor(e.targets) != IGNORE].tolist()
    result = evaluate(model, data, r)
    assert result["val_acc"] == correct / len(data.val)
    assert result["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
