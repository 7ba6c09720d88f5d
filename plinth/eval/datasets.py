"""Multiple-choice items for `plinth eval`: the built-in tasks' data, and user task files.

- sentiment: movie-review sentences rated by ~20 people each (plinth/data/sentiment.py); only the
  held-out test split, which fine-tuning leaves alone, is evaluated.
- topic: a WordNet gloss → its lexicographer class (one of 45, assigned by WordNet's authors),
  against 4 other classes drawn at random; from Debian's wordnet-base (/usr/share/wordnet).
- a .jsonl file of {"context": str, "choices": [str, ...], "gold": index} per line.

Items come back in a fixed shuffled order, so `--limit N` takes the same N items every time.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from plinth.data import sentiment
from plinth.data.wordnet import LEXNAMES, WORDNET, synsets
from plinth.errors import PlinthError

SEED = 1234  # item order and distractors: fixed, so runs on different models score the same items


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]  # continuations of the context; the model's likeliest one is its answer
    gold: int                 # index of the right choice


def shuffled(items: list, limit: int) -> list:
    items = list(items)
    random.Random(SEED).shuffle(items)
    return items[:limit] if limit else items


# ---- user task files -------------------------------------------------------------------------------
def choice_file(path: Path, limit: int = 0) -> list[ChoiceItem]:
    """Items of a .jsonl task file, in file order; a line that does not fit the schema is an error
    naming the line and the field."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            items.append(_choice_row(line, f"{path}:{number}"))
    if not items:
        raise PlinthError(f"{path} holds no items; write one JSON object per line: "
                          '{"context": "...", "choices": [" a", " b"], "gold": 0}')
    return items[:limit] if limit else items


def _choice_row(line: str, where: str) -> ChoiceItem:
    schema = 'each line must be {"context": string, "choices": [2 or more strings], "gold": index of the right choice}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PlinthError(f"{where}: not JSON ({e}); {schema}") from e
    if not isinstance(row, dict) or not isinstance(row.get("context"), str) or not row["context"]:
        raise PlinthError(f"{where}: missing, empty or non-string 'context'; {schema}")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise PlinthError(f"{where}: 'choices' must be a list of 2 or more non-empty strings; {schema}")
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise PlinthError(f"{where}: 'gold' must be an index from 0 to {len(choices) - 1}, got {gold!r}; {schema}")
    return ChoiceItem(row["context"], tuple(choices), gold)


# ---- sentiment -------------------------------------------------------------------------------------
def sentiment_items(limit: int = 0, tsv: str | None = None) -> list[ChoiceItem]:
    """Held-out movie-review sentences as a two-way choice of the next word (`tsv`: the ratings
    file's text, instead of the source package's)."""
    test = sentiment.split(sentiment.parse(tsv))[1] if tsv is not None else sentiment.sentiment_splits()[1]
    items = [ChoiceItem(f"Review: {r.text}\nSentiment:", (" negative", " positive"), sentiment.LABELS.index(r.label))
             for r in test]
    return shuffled(items, limit)


# ---- topic (WordNet lexicographer classes) ---------------------------------------------------------
DISTRACTORS = 4


def wordnet_glosses(folder: Path = WORDNET) -> list[tuple[str, int]]:
    """(definition, lex_filenum) of every synset; example sentences dropped."""
    return [(synset.definition, synset.lexname) for synset in synsets(folder)]


def topic_items(limit: int = 0, folder: Path = WORDNET) -> list[ChoiceItem]:
    """Each gloss against its own class and 4 others, all in a seeded random order."""
    items = []
    for index, (gloss, lexname) in enumerate(shuffled(wordnet_glosses(folder), limit)):
        rng = random.Random(SEED + index)
        classes = rng.sample([c for c in range(len(LEXNAMES)) if c != lexname], DISTRACTORS) + [lexname]
        rng.shuffle(classes)
        items.append(ChoiceItem(f"Definition: {gloss}\nTopic:", tuple(f" {LEXNAMES[c]}" for c in classes),
                                classes.index(lexname)))
    return items
