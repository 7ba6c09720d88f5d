"""The movie-review sentiment set: parsing, labels from the sign, neutral sentences dropped, a split
fixed by sentence id, and reading through the nested archives of the vaderSentiment source package."""
import io
import tarfile

import pytest

from plinth.data.sentiment import INNER, MEMBER, parse, rating_splits, sentiment_splits
from plinth.errors import PlinthError

ROWS = [(i, score, f"sentence {i}") for i, score in enumerate([2.3, -1.7, 0.2, -0.49, 0.5, -3.9] * 20, 1)]
TSV = "\n".join(f"{i}\t{s}\t{t}" for i, s, t in ROWS) + "\n"


def test_labels_come_from_the_sign_and_neutral_ones_are_dropped():
    rows = parse(TSV)
    assert len(rows) == 4 * 20  # 0.2 and -0.49 are too close to neutral
    assert [r.label for r in rows[:4]] == ["positive", "negative", "positive", "negative"]
    with pytest.raises(PlinthError, match="line 1"):
        parse("oops no tabs\n")


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_split_is_fixed_by_id_and_read_from_the_source_archive(tmp_path):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, MEMBER, TSV.encode("latin-1"))
    archive = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, INNER, inner.getvalue())
    train, test = sentiment_splits(archive)
    assert len(train) + len(test) == 80 and 5 <= len(test) <= 30
    assert not {r.id for r in train} & {r.id for r in test}
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("".join(reversed(TSV.splitlines(keepends=True))), encoding="latin-1")
    assert {r.id for r in sentiment_splits(shuffled)[1]} == {r.id for r in test}  # order does not matter


def test_ratings_keep_every_sentence_in_the_same_split(tmp_path):
    path = tmp_path / "ratings.txt"
    path.write_text(TSV, encoding="latin-1")
    train, test = rating_splits(path)
    assert len(train) + len(test) == len(ROWS)  # the near-neutral sentences too
    assert {(r.id, r.score) for r in train + test} == {(str(i), s) for i, s, _ in ROWS}
    labelled_train, labelled_test = sentiment_splits(path)
    assert {r.id for r in labelled_test} == {r.id for r in test if abs(r.score) >= 0.5}
    assert {r.id for r in labelled_train} == {r.id for r in train if abs(r.score) >= 0.5}
