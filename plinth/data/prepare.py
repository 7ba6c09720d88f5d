"""`plinth data prepare RECIPE`: collect the recipe's sources, clean them, train the tokenizer on
the training split, and write token shards + tokenizer into <out_dir>/data.

    plinth data prepare recipes/pretrain-tiny.yaml
"""
from __future__ import annotations

import shutil
from collections import Counter

from plinth import hub
from plinth.data.clean import clean
from plinth.data.shards import ShardWriter, split_of
from plinth.data.sources import read_source
from plinth.errors import PlinthError
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


def prepare(recipe, log=print) -> dict:
    report: Counter = Counter()
    docs = []
    for name in recipe.sources:
        before = len(docs)
        docs.extend(clean(read_source(name, recipe.max_docs_per_source), recipe.min_chars, report))
        log(f"{name}: {len(docs) - before} documents kept")
    for key in sorted(report):
        log(f"  {key}: {report[key]}")
    train_texts = [d.text for d in docs if split_of(d.id, recipe.val_fraction) == "train"]
    if not train_texts or len(train_texts) == len(docs):
        raise PlinthError(f"{len(docs)} documents split into {len(train_texts)} for training and "
                          f"{len(docs) - len(train_texts)} for validation; both need some: add data or change "
                          f"val_fraction (now {recipe.val_fraction})")
    log(f"training a {recipe.vocab_size}-token BPE on {len(train_texts)} documents")
    tokenizer = Tokenizer.train(train_texts, recipe.vocab_size)
    folder = recipe.data_dir
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, tokenizer.vocab_size, tokenizer.eos_id)
    for doc in docs:
        writer.add(split_of(doc.id, recipe.val_fraction), doc.source, tokenizer.encode(doc.text),
                   len(doc.text.encode("utf-8", errors="replace")))
    writer.close({"cleaning": dict(report), "compression": compression(docs, tokenizer, log)})
    tokenizer.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    for source, stats in writer.per_source.items():
        log(f"{source}: {stats['documents']} documents, {stats['tokens']} tokens")
    log(f"wrote {writer.tokens['train']} train and {writer.tokens['val']} validation tokens to {folder}")
    return writer.per_source
