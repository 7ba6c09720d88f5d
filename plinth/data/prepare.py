"""`plinth data prepare RECIPE`: collect the recipe's sources, clean them, train the tokenizer on
the training split (or use the one `plinth tokenizer train` made), and write token shards +
tokenizer into <out_dir>/data.

    plinth tokenizer train recipes/pretrain-tiny.yaml   # optional: <out_dir>/tokenizer/tokenizer.json
    plinth data prepare recipes/pretrain-tiny.yaml
"""
from __future__ import annotations

import json
from collections import Counter

from plinth import hub
from plinth.data.clean import clean
from plinth.data.shards import ShardWriter, split_of
from plinth.data.sources import read_source
from plinth.errors import PlinthError
from plinth.files import atomic_folder
from plinth.tokenizer import Tokenizer
from plinth.weights.gguf import metadata, open_gguf


def compression(docs, tokenizer, log, sample_chars: int = 200_000) -> dict:
    """Bytes per token of each source (first `sample_chars` characters) with the trained tokenizer,
    and with SmolLM2's 49k tokenizer when its package is installed, for comparison."""
    reference = None
    path = hub.known_path(hub.DEFAULT_MODEL)
    if path is not None:
        reference = Tokenizer.from_gguf(metadata(open_gguf(path)))
    samples: dict[str, str] = {}
    for doc in docs:
        if len(samples.get(doc.source, "")) < sample_chars:
            samples[doc.source] = samples.get(doc.source, "") + doc.text + "\n"
    result = {}
    for source, text in samples.items():
        size = len(text.encode("utf-8", errors="replace"))
        result[source] = {"plinth": size / len(tokenizer.encode(text))}
        line = f"{source}: {result[source]['plinth']:.2f} bytes/token"
        if reference is not None:
            result[source]["smollm2"] = size / len(reference.encode(text))
            line += f" (SmolLM2's tokenizer: {result[source]['smollm2']:.2f})"
        log(line)
    return result


def collect(recipe, log=print) -> tuple[list, dict]:
    """The recipe's sources, read and cleaned, and what each filter removed (also logged)."""
    report: Counter = Counter()
    docs = []
    for name in recipe.sources:
        before = len(docs)
        docs.extend(clean(read_source(name, recipe.max_docs_per_source), recipe.min_chars, report))
        log(f"{name}: {len(docs) - before} documents kept")
    for key in sorted(report):
        log(f"  {key}: {report[key]}")
    return docs, dict(report)


def train_tokenizer(recipe, docs, log=print) -> Tokenizer:
    """A byte-level BPE of the recipe's vocab_size on the training split, saved (atomically) in
    <out_dir>/tokenizer, with its compression per source reported."""
    train_texts = [d.text for d in docs if split_of(d.id, recipe.val_fraction) == "train"]
    if not train_texts or len(train_texts) == len(docs):
        raise PlinthError(f"{len(docs)} documents split into {len(train_texts)} for training and "
                          f"{len(docs) - len(train_texts)} for validation; both need some: add data or change "
                          f"val_fraction (now {recipe.val_fraction})")
    log(f"training a {recipe.vocab_size}-token BPE on {len(train_texts)} documents")
    tokenizer = Tokenizer.train(train_texts, recipe.vocab_size)
    folder = recipe.tokenizer_dir
    with atomic_folder(folder) as tmp:
        tokenizer.save(tmp)
        (tmp / "compression.json").write_text(json.dumps(compression(docs, tokenizer, log), indent=2))
    log(f"wrote {folder / 'tokenizer.json'}")
    return tokenizer


def prepare(recipe, log=print) -> dict:
    """Collect and clean the sources, tokenize them with the run's tokenizer (trained first unless
    `plinth tokenizer train` made one for this vocab_size), and write the shards."""
    docs, report = collect(recipe, log)
    tokenizer = None
    if (recipe.tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(recipe.tokenizer_dir)
        if tokenizer.vocab_size != recipe.vocab_size:
            log(f"{recipe.tokenizer_dir} holds a {tokenizer.vocab_size}-token vocabulary, not {recipe.vocab_size}: "
                "training a new one")
            tokenizer = None
        else:
            log(f"using the tokenizer in {recipe.tokenizer_dir}")
    if tokenizer is None:
        tokenizer = train_tokenizer(recipe, docs, log)
    folder = recipe.data_dir
    with atomic_folder(folder) as tmp:
        writer = ShardWriter(tmp, tokenizer.vocab_size, tokenizer.eos_id)
        for doc in docs:
            writer.add(split_of(doc.id, recipe.val_fraction), doc.source, tokenizer.encode(doc.text),
                       len(doc.text.encode("utf-8", errors="replace")))
        ratios = json.loads((recipe.tokenizer_dir / "compression.json").read_text())
        writer.close({"cleaning": report, "compression": ratios})
        tokenizer.save(tmp)
    for source, stats in writer.per_source.items():
        log(f"{source}: {stats['documents']} documents, {stats['tokens']} tokens")
    log(f"wrote {writer.tokens['train']} train and {writer.tokens['val']} validation tokens to {folder}")
    return writer.per_source
