"""Pretraining end to end on a tiny model: data prepare, training, kill -9 and bit-for-bit resume."""
import json
import signal
import subprocess
import sys
import time

import pytest

from plinth.errors import PlinthError
from plinth.tokenizer import Tokenizer
from plinth.train.loop import pretrain
from plinth.train.recipe import PretrainRecipe, load_recipe
from tests.conftest import TINY, losses, recipe



def test_prepare_reports_compression_against_smollm2(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    ratios = meta["compression"]["python-stdlib"]
    assert 1.5 < ratios["plinth"] < ratios["smollm2"]  # a 320-token vocabulary compresses less than 49k
    assert meta["val_sources"]["python-stdlib"]["end"] > meta["val_sources"]["python-stdlib"]["start"]


def test_pretraining_learns_and_makes_a_normal_model(tmp_path, data_dir):
    import plinth
    r = recipe(tmp_path, data_dir, "a", max_steps=60)
    latest = pretrain(r, log=lambda *_: None)
    curve = losses(tmp_path / "a")
    assert len(curve) == 60 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_bpb"] > 0 and record["sample"].startswith("def fibonacci(")
    assert record["val_bpb/python-stdlib"] > 0  # per source, too
    model = plinth.load(str(latest))
    assert isinstance(model.generate("import ", max_tokens=5, temperature=0), str)


def test_kill_9_then_resume_continues_bit_for_bit(tmp_path, data_dir):
    full = recipe(tmp_path, data_dir, "full")
    pretrain(full, log=lambda *_: None)
    killed = recipe(tmp_path, data_dir, "killed")
    overrides = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in killed.__dict__.items()
                 if k in TINY or k == "out_dir"]
    (tmp_path / "empty.yaml").write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "plinth", "pretrain", str(tmp_path / "empty.yaml"), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 25:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(tmp_path / "killed")) < 300
    pretrain(killed, resume=True, log=lambda *_: None)
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # exactly, step for step


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path, data_dir):
    r = recipe(tmp_path, data_dir, "b", max_steps=10)
    with pytest.raises(PlinthError, match="nothing to resume"):
        pretrain(r, resume=True, log=lambda *_: None)
    pretrain(r, log=lambda *_: None)
    with pytest.raises(PlinthError, match="already holds a run"):
        pretrain(r, log=lambda *_: None)


@pytest.mark.parametrize("overrides, message", [(["--colour=red"], "unknown recipe key"),
                                                 (["--max_steps=many"], "must be int"),
                                                 (["--vocab_size=100"], "too small"),
                                                 (["--schedule=linear"], "cosine or wsd"),
                                                 (["max_steps"], "--key=value")])
def test_bad_recipes_fail_before_any_work(overrides, message):
    with pytest.raises(PlinthError, match=message):
        load_recipe(PretrainRecipe, None, overrides)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(PlinthError, match="plinth data prepare"):
        pretrain(PretrainRecipe(**TINY, out_dir=str(tmp_path / "none")), log=lambda *_: None)


def test_cleaning_removes_exact_and_near_duplicates_and_reports_them():
    from collections import Counter

    from plinth.data.clean import clean
    from plinth.data.sources import CorpusText
    base = " ".join(f"word{i} is followed by word{i + 1} in this sentence" for i in range(60))
    edited = base.replace("word30 is", "word30 was")  # one word changed: a near copy
    docs = [CorpusText("s", "a", base), CorpusText("s", "b", "  " + base.replace(" ", "\t")), CorpusText("s", "c", edited),
            CorpusText("s", "d", "short"), CorpusText("s", "e", "x\n" * 40),
            CorpusText("s", "f", "an entirely different text about gardens and rivers " * 20)]
    report = Counter()
    kept = [d.id for d in clean(docs, min_chars=20, report=report)]
    assert kept == ["a", "f"]
    assert report["exact duplicate: documents"] == 1 and report["near duplicate: documents"] == 1
    assert report["too short: documents"] == 1 and report["repetitive: documents"] == 1
    assert report["kept: bytes"] == len(base) + len(docs[5].text)


def test_plot_writes_a_png(tmp_path, data_dir):
    from plinth.train.plot import plot_run
    r = recipe(tmp_path, data_dir, "p", max_steps=12, eval_every=6)
    pretrain(r, log=lambda *_: None)
    png = plot_run(tmp_path / "p")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PlinthError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_mixture_weights_choose_the_source_of_each_row(tmp_path):
    import numpy as np

    from plinth.data.shards import ShardWriter, TokenData
    writer = ShardWriter(tmp_path, vocab_size=300, eos_id=299)
    for source, count in (("code", 30), ("prose", 10)):
        for _ in range(count):
            writer.add("train", source, list(range(100)), 100)
            writer.add("val", source, list(range(100)), 100)
    writer.close({})
    code, prose = writer.ranges["train"]["code"], writer.ranges["train"]["prose"]
    only_prose = TokenData(tmp_path, 16, 8, seed=0, mixture={"prose": 1.0, "code": 0})
    starts = np.concatenate([only_prose.starts(step, 0) for step in range(50)])
    assert (starts >= prose["start"]).all() and (starts < prose["end"] - 16).all()
    # prose is a quarter of the tokens but drawn as often as code
    even = TokenData(tmp_path, 16, 8, seed=0, mixture={"prose": 1, "code": 1})
    starts = np.concatenate([even.starts(step, 0) for step in range(200)])
    assert 0.42 < (starts >= prose["start"]).mean() < 0.58
    by_size = TokenData(tmp_path, 16, 8, seed=0)
    starts = np.concatenate([by_size.starts(step, 0) for step in range(200)])
    assert 0.18 < (starts >= code["end"]).mean() < 0.32
    with pytest.raises(PlinthError, match="its sources are code, prose"):
        TokenData(tmp_path, 16, 8, seed=0, mixture={"poetry": 1})


def test_a_batch_too_big_for_memory_fails_before_training(tmp_path, data_dir):
    r = recipe(tmp_path, data_dir, "huge", batch_size=2**20)
    with pytest.raises(PlinthError, match="lower batch_size .now 1048576"):
        pretrain(r, log=lambda *_: None)
    assert not (tmp_path / "huge" / "metrics.jsonl").exists()


def test_activation_checkpointing_gives_the_same_gradients():
    import torch

    from tests.conftest import tiny_model
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.activation_checkpointing = checkpointing
        tokens = torch.arange(24).reshape(2, 12) % model.config.vocab_size
        model(tokens).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tokenizer_train_command_then_prepare_uses_it(tmp_path, capsys):
    from plinth.cli import main
    (tmp_path / "r.yaml").write_text("sources: [python-stdlib]\nmax_docs_per_source: 12\nval_fraction: 0.2\n"
                                     f"vocab_size: 300\nout_dir: {tmp_path / 'run'}\n")
    main(["tokenizer", "train", str(tmp_path / "r.yaml")])
    assert "bytes/token" in capsys.readouterr().out
    trained = (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text()
    main(["data", "prepare", str(tmp_path / "r.yaml")])
    assert "using the tokenizer in" in capsys.readouterr().out
    assert (tmp_path / "run" / "data" / "tokenizer.json").read_text() == trained


def test_parquet_files_are_a_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from plinth.data.sources import read_source
    pq.write_table(pa.table({"text": ["first document", None, "third"], "id": [1, 2, 3]}), tmp_path / "a.parquet",
                   row_group_size=2)
    assert [(d.id, d.text) for d in read_source(str(tmp_path))] == [("a.parquet:0", "first document"),
                                                                   ("a.parquet:2", "third")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(PlinthError, match="needs a 'text' column; it has body"):
        list(read_source(str(tmp_path)))


@pytest.mark.parametrize("name, path", [("gcide", "/usr/share/dictd/gcide.index"),
                                        ("fortunes", "/usr/share/games/fortunes"),
                                        ("python-html-docs", "/usr/share/doc/python3.11/html"),
                                        ("wordnet", "/usr/share/wordnet/data.noun")])
def test_debian_corpora_read_as_documents(name, path):
    import itertools
    from pathlib import Path

    from plinth.data.sources import read_source
    if not Path(path).exists():
        pytest.skip(f"{path} not installed (Debian package); the reader names the package to install")
    docs = list(itertools.islice(read_source(name), 200))
    assert len(docs) == 200 and len({d.id for d in docs}) == 200
    assert all(d.text.strip() and "<div" not in d.text for d in docs)
    if name == "wordnet":  # words, then the gloss: "entity: that which is perceived or known ..."
        assert docs[0].text.startswith("entity: that which is perceived")
    if name == "gcide":  # dictd markup: cross-reference braces and source tags are removed
        assert not any("{" in d.text or "[1913 Webster]" in d.text for d in docs)


def test_chitchat_source_is_dialogue_text():
    import itertools

    from plinth.data.sources import read_source
    pytest.importorskip("chitchat_dataset")
    docs = list(itertools.islice(read_source("chitchat"), 20))
    assert len(docs) == 20 and all(d.text.startswith("A: ") and "\nB: " in d.text for d in docs)


def test_a_tokenizer_saves_into_a_folder_it_makes_and_reads_back_the_same(tmp_path):
    from tests.conftest import byte_tokenizer
    tokenizer = byte_tokenizer()
    folder = tmp_path / "not" / "yet"
    tokenizer.save(folder)
    again = Tokenizer.from_folder(folder)
    text = "héllo, wörld 👋"
    assert again.encode(text) == tokenizer.encode(text) and again.decode(again.encode(text)) == text
