"""WordNet 3.0 synsets from Debian's wordnet-base (/usr/share/wordnet/data.{noun,verb,adj,adv}): each
with its words, its lexicographer class (one of 45 topics assigned by WordNet's authors) and its gloss
(a definition, then example sentences in quotes). Pretraining reads them as prose (source `wordnet`);
`plinth eval`'s topic task asks for the class of a definition.

    for synset in synsets(): print(synset.words, LEXNAMES[synset.lexname], synset.definition)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plinth.errors import PlinthError

WORDNET = Path("/usr/share/wordnet")
# lex_filenum → what the class holds, from WordNet 3.0's lexnames(5WN); the choices the model reads.
LEXNAMES = (
    "all adjective clusters", "relational adjectives", "all adverbs", "unique beginners for nouns",
    "acts or actions", "animals", "man-made objects", "attributes of people and objects", "body parts",
    "cognitive processes and contents", "communicative processes and contents", "natural events",
    "feelings and emotions", "foods and drinks", "groupings of people or objects", "spatial position",
    "goals", "natural objects (not man-made)", "people", "natural phenomena", "plants",
    "possession and transfer of possession", "natural processes", "quantities and units of measure",
    "relations between people or things or ideas", "two and three dimensional shapes",
    "stable states of affairs", "substances", "time and temporal relations",
    "grooming, dressing and bodily care", "size, temperature change, intensifying",
    "thinking, judging, analyzing, doubting", "telling, asking, ordering, singing",
    "fighting, athletic activities", "eating and drinking", "touching, hitting, tying, digging",
    "sewing, baking, painting, performing", "feeling", "walking, flying, swimming",
    "seeing, hearing, feeling", "buying, selling, owning", "political and social activities and events",
    "being, having, spatial relations", "raining, snowing, thawing, thundering", "participial adjectives",
)


@dataclass
class Synset:
    id: str            # part of speech and byte offset: unique, stable across reads
    words: list[str]
    lexname: int       # index into LEXNAMES
    gloss: str

    @property
    def definition(self) -> str:
        return self.gloss.split('; "')[0].strip().rstrip(";").strip()


def synsets(folder: Path = WORDNET) -> Iterator[Synset]:
    """Every synset; a data line is `offset lex_filenum ss_type w_cnt (word lex_id)×w_cnt ... | gloss`."""
    files = [folder / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise PlinthError(f"WordNet's data files are not in {folder}; install them with `apt-get install wordnet-base`")
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header is indented
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            lexname = int(fields[1])
            if not 0 <= lexname < len(LEXNAMES):
                raise PlinthError(f"{path}: lexicographer file number {lexname} is not one of WordNet 3.0's "
                                  f"{len(LEXNAMES)}; is this a WordNet 3.0 data file?")
            words = [w.replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
            yield Synset(f"{path.suffix[1:]}:{fields[0]}", words, lexname, gloss.strip())
