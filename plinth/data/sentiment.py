"""Movie-review sentences with human sentiment ratings (Hutto & Gilbert, ICWSM 2014), for sentiment
fine-tuning and the adaptation benchmark.

The file ships inside the vaderSentiment 3.3.2 *source* package (no hub needed):
vaderSentiment-3.3.2.tar.gz → additional_resources/hutto_ICWSM_2014.tar.gz →
movieReviewSnippets_GroundTruth.txt, a latin-1 TSV of `id  mean_rating  sentence` (ratings −4…+4,
the mean of ~20 people). Binary labels come from the sign; near-neutral sentences (|rating| < 0.5)
are dropped; the train/test split is fixed by a hash of the sentence id. For regression the ratings
themselves are the targets, and every sentence is kept.

    train, test = sentiment_splits()          # lists of LabelledText
    train, test = rating_splits()             # lists of RatedText (every sentence, its mean rating)
"""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from plinth.data.shards import split_of
from plinth.errors import PlinthError

PACKAGE = "vaderSentiment==3.3.2"
ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
CACHE = Path.home() / ".cache" / "plinth" / "data"
LABELS = ("negative", "positive")
NEUTRAL_BELOW = 0.5   # |mean rating| under this is too close to neutral to call
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class LabelledText:
    id: str
    text: str
    label: str


@dataclass(frozen=True)
class RatedText:
    id: str
    text: str
    score: float  # the mean human rating, −4 (very negative) … +4 (very positive)


def source_archive(cache: Path = CACHE) -> Path:
    """The vaderSentiment source archive, downloaded once with pip into the cache."""
    path = cache / ARCHIVE
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)]
        if subprocess.run(cmd).returncode != 0 or not path.is_file():
            raise PlinthError(f"could not download the {PACKAGE} source package; run `{' '.join(cmd[2:])}` "
                              f"by hand, or pass the path of {ARCHIVE} or movieReviewSnippets_GroundTruth.txt")
    return path


def read_ground_truth(path: Path) -> str:
    """The TSV text, from the .txt itself, the inner hutto_ICWSM_2014.tar.gz, or the source archive."""
    if path.suffix == ".txt":
        return path.read_bytes().decode("latin-1")
    with tarfile.open(path) as outer:
        names = outer.getnames()
        if MEMBER in names:
            return outer.extractfile(MEMBER).read().decode("latin-1")
        if INNER not in names:
            raise PlinthError(f"{path} holds neither {MEMBER} nor {INNER}; give the vaderSentiment 3.3.2 source archive")
        inner = io.BytesIO(outer.extractfile(INNER).read())
    with tarfile.open(fileobj=inner) as tar:
        return tar.extractfile(MEMBER).read().decode("latin-1")


def parse_ratings(text: str) -> list[RatedText]:
    """Rows `id  score  sentence` → every sentence with its rating."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rows.append(RatedText(parts[0], parts[2].strip(), float(parts[1])))
        except (IndexError, ValueError):
            raise PlinthError(f"line {number} of the sentiment file is not `id<TAB>score<TAB>sentence`: {line[:60]!r}")
    return rows


def parse(text: str) -> list[LabelledText]:
    """Rows `id  score  sentence` → labelled sentences, near-neutral ones dropped."""
    return [LabelledText(r.id, r.text, LABELS[r.score > 0]) for r in parse_ratings(text) if abs(r.score) >= NEUTRAL_BELOW]


def split(rows: list) -> tuple[list, list]:
    """(train, test), fixed by sentence id whatever the order of the file: fine-tuning trains on the
    first, `plinth eval`'s sentiment task scores the second."""
    test = [r for r in rows if split_of(f"movie-{r.id}", TEST_FRACTION) == "val"]
    train = [r for r in rows if split_of(f"movie-{r.id}", TEST_FRACTION) == "train"]
    return train, test


def sentiment_splits(path: str | Path | None = None) -> tuple[list[LabelledText], list[LabelledText]]:
    return split(parse(read_ground_truth(Path(path) if path else source_archive())))


def rating_splits(path: str | Path | None = None) -> tuple[list[RatedText], list[RatedText]]:
    """(train, test) with every sentence's rating; a sentence's split is the same as in sentiment_splits."""
    return split(parse_ratings(read_ground_truth(Path(path) if path else source_archive())))
