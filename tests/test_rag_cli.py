"""`plinth index build|query` and `plinth rag` through the CLI's main(), as a user types them."""
import json

import pytest

from plinth.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    (docs / "files.md").write_text("# Files\n\nTo read a file line by line, open it and loop: "
                                   "`for line in open(path): print(line)`.\n")
    (docs / "music.txt").write_text("A sonata usually has three or four movements.\n")
    out = tmp_path_factory.mktemp("out") / "idx"
    assert main(["index", "build", str(docs), "--out", str(out), "--quiet"]) == 0
    return docs, out


@pytest.fixture(scope="module")
def empty_index(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    assert main(["index", "build", str(empty), "--out", str(empty / "idx"), "--quiet"]) == 0  # a warning, no error
    return empty / "idx"


def test_build_then_query_prints_ranked_sources(built, capsys):
    _, idx = built
    info = json.loads((idx / "index.json").read_text())
    assert (info["documents"], info["chunks"], info["embedder"]) == (2, 2, "all-minilm-l6-v2")
    assert main(["index", "query", str(idx), "how do I read a file line by line?", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1. ") and lines[0].endswith("files.md:1 (Files)") and "open it and loop" in lines[1]
    assert lines[2].startswith("2. ") and "music.txt:1" in lines[2]
    assert main(["index", "query", str(idx), "movements", "--json", "--where", "kind=text"]) == 0
    (hit,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hit["rank"] == 1 and hit["source"] == "music.txt" and hit["text"].startswith("A sonata")


@pytest.mark.parametrize("args, message", [
    (["index", "query", "{idx}", "q", "--where", "colour"], "--where takes FIELD=VALUE"),
    (["index", "query", "{idx}", "q", "--embedder", "{docs}"], "has no tokenizer.json"),
    (["index", "query", "{docs}", "q"], "is not a plinth index"),
    (["index", "query", "{empty_idx}", "q"], "holds no chunks"),
    (["index", "build", "{docs}/missing", "--out", "{docs}/x"], "is not a file or folder"),
    (["serve", "--index", "docs={docs}"], "is not a plinth index"),  # refused before the model loads
    (["serve", "--index", "{idx}"], "--index takes NAME=FOLDER"),
])
def test_bad_input_exits_2_with_one_clear_line(built, empty_index, capsys, args, message):
    docs, idx = built
    paths = dict(idx=idx, docs=docs, empty_idx=empty_index)
    assert main([a.format(**paths) for a in args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_rag_answers_with_cited_sources(built, capsys):
    _, idx = built
    assert main(["rag", "smollm2-135m-instruct", str(idx), "How do I read a file line by line in Python?",
                 "--k", "1", "--max-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    answer, sources = out.split("\n\nSources:\n")
    assert answer.strip() and sources.startswith("[1] files.md:1 (Files)  (score 0.")
