"""`plinth finetune RECIPE`: adapt a pretrained model through the one training loop.

A recipe picks a task and a method; they differ only in data, loss mask and trainable parameters:
  task   label    — answer a label word after a chat prompt (loss on the answer only)
         classify — a classification head on pooled hidden states
         regress  — a regression head on pooled hidden states: one number per text (squared error)
         chat     — supervised fine-tuning on conversations (loss on assistant turns only)
         vqa      — an image+text model: a ViT, a projector and the base language model, answering
                    questions about images (plinth/adapt/image_text.py)
  method full (every weight) · lora (adapters, base frozen) · qlora (adapters, base frozen in 4-bit)
         · probe (classify and regress only: the head alone, a linear probe)

    plinth finetune recipes/lora-sentiment.yaml               # Ctrl-C or kill at any time, then
    plinth finetune recipes/lora-sentiment.yaml --resume      # continues where it stopped

A run folder is like pretraining's (metrics.jsonl, step-NNNNNN/ checkpoints, `latest`) plus a
`final` link when done. A checkpoint holds only what was trained (adapter, head, or all weights) and
`finetune.json` naming the base, so `plinth.load(folder)` rebuilds the adapted model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plinth import hub
from plinth.adapt import image_text, lora, sft
from plinth.adapt.trained import FinetuneWeights, make_trainable
from plinth.adapt.classify import POOLING, Finetuned, Head
from plinth.adapt.examples import Example, ExampleData, pack, read_jsonl
from plinth.adapt.prompting import PromptTask, answer_tokens, check_label
from plinth.errors import PlinthError
from plinth.files import atomic_folder, point_link
from plinth.loss import IGNORE, summed_loss
from plinth.train.loop import autocast, train
from plinth.train.recipe import LoopRecipe
from plinth.weights.load import read_model
from plinth.model import Transformer
from plinth.vision.data import ImageData
from plinth.vision.mae import hidden_count
from plinth.vision.images import ImagePrep, balanced_subset, labelled_images
from plinth.weights.native import is_native, write_model

TASKS, METHODS = ("label", "classify", "regress", "chat", "vqa"), ("full", "lora", "qlora", "probe")
HEAD_TASKS = ("classify", "regress")  # the tasks trained through a head on pooled hidden states


@dataclass
class FinetuneRecipe(LoopRecipe):
    name: str = "finetune"
    base: str = hub.DEFAULT_MODEL        # model name, .gguf file, or plinth checkpoint folder
    task: str = "label"                  # label, classify, regress or chat (see the module docstring)
    method: str = "lora"                 # full, lora, qlora, or probe (classify and regress only)
    # sentiment, chitchat, or a JSONL file: {"text","label"}, {"text","score"} (regress) or {"messages"};
    # for an image model (task classify): fashion-mnist, a folder of class folders, or a JSONL {"image","label"};
    # task vqa: easy-vqa, or a JSONL {"image","question","answer"}
    data: str = "sentiment"
    init: str = "pretrained"             # "random": the base's architecture from fresh weights (the control run)
    labels_fraction: float = 1.0         # label, classify: train on a fixed, class-balanced share of the labels
    flip: bool = False                   # images: mirror training images left-right at random
    keep_patches: float = 1.0            # images: the share of each training image's patches that runs
    shift: int = 0                       # images: move training images up to this many pixels each way at random
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    instruction: str = "Is the sentiment of this movie review positive or negative?"
    max_examples: int = 0                # training examples used (0 = all)
    val_examples: int = 200              # examples held out of the training data for evaluation
    # classify, regress: "last" token, "mean" of the hidden states, or "first" (an image model's class
    # token); "auto": last for text, first or mean for images (with or without a class token)
    pooling: str = "auto"
    # task vqa: the image encoder (an MAE run or image-model checkpoint), from its weights or "random"
    # init (the control), trained with the projector or frozen; its patches merged merge×merge per token
    image_encoder: str = ""
    encoder_init: str = "pretrained"
    tune_encoder: bool = True
    encoder_lr: float = 0.0              # task vqa: the image encoder's peak learning rate (0 = lr)
    merge: int = 2
    balance_answers: float = 0.0         # task vqa: draw questions ∝ (their answer's count)^-this (1: answers alike)
    answers: list[str] = field(default_factory=list)  # task vqa: train (and validate) only on questions with these answers
    pack: bool = False                   # chat, label: concatenate short examples up to seq_len (attention stays within each)
    # Activations, not weights, are most of the memory of fine-tuning a small model (30 layers × every
    # token's attention and MLP tensors): without recomputing them LoRA would save little over full.
    activation_checkpointing: bool = True
    # full, lora: each block's learning rate is layer_decay^(blocks above it) of the head's, the
    # input layers' one step lower (layer-wise decay, as MAE and BEiT fine-tune): lower layers hold
    # the pretrained features to keep; 1 = one learning rate for all
    layer_decay: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(lora.PROJECTIONS))
    seq_len: int = 256                   # longest example, in tokens (longer ones are cut)
    batch_size: int = 8
    max_steps: int = 200
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 0                # 0 = the whole validation set
    save_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("task", TASKS), ("method", METHODS), ("pooling", ("auto", *POOLING)),
                              ("init", ("pretrained", "random")), ("encoder_init", ("pretrained", "random"))):
            if getattr(self, name) not in allowed:
                raise PlinthError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.sample_prompt:
            raise PlinthError("sample_prompt is for pretraining runs; try a fine-tuned model with "
                              "`plinth generate BASE --adapter RUN/final PROMPT` (or `plinth generate RUN/final`)")
        if self.method == "probe" and self.task not in HEAD_TASKS:
            raise PlinthError("method=probe trains only a head; use it with task=classify or task=regress")
        if self.pack and self.task in HEAD_TASKS:
            raise PlinthError(f"pack=true joins language-model examples into one row; task={self.task} reads one "
                              "text per row with its head. Set pack: false")
        lora.check_targets(self.lora_targets)
        if self.task == "vqa" and not self.image_encoder:
            raise PlinthError("task=vqa needs image_encoder: an MAE run (plinth pretrain recipes/mae-shapes.yaml) "
                              "or an image-model checkpoint")
        if self.image_encoder and self.task != "vqa":
            raise PlinthError(f"image_encoder is for task=vqa, not task={self.task}; remove it")
        if self.task == "vqa" and (self.pack or self.method == "probe"):
            raise PlinthError("task=vqa trains the language model (method lora, qlora or full) on unpacked rows; "
                              "set pack: false and another method")
        if not 0 < self.layer_decay <= 1:
            raise PlinthError(f"layer_decay={self.layer_decay}; give a factor in (0, 1], e.g. 0.75 (1 = no decay)")
        if not 0 <= self.balance_answers <= 1 or (self.balance_answers and self.task != "vqa"):
            raise PlinthError(f"balance_answers={self.balance_answers}; it is for task=vqa, a power in [0, 1] "
                              "(0: questions as they come, 1: every answer equally often)")
        if self.answers and self.task != "vqa":
            raise PlinthError(f"answers is for task=vqa (which questions to train on), not task={self.task}; "
                              "remove it (labelled tasks name theirs in `labels`)")
        if not 0 < self.keep_patches <= 1:
            raise PlinthError(f"keep_patches={self.keep_patches}; give a share in (0, 1], e.g. 0.5 to train on half "
                              "of each image's patches (1 = all)")
        if self.shift < 0:
            raise PlinthError(f"shift={self.shift}; give the most pixels a training image may move, e.g. 2 (0 = none)")
        if not 0 < self.labels_fraction <= 1:
            raise PlinthError(f"labels_fraction={self.labels_fraction}; give a share in (0, 1], e.g. 0.01 for 1%")
        if self.labels_fraction < 1 and self.task not in ("label", "classify"):
            raise PlinthError(f"labels_fraction is for labelled tasks (label, classify), not task={self.task}")
        if self.task in ("label", "classify"):
            PromptTask(self.instruction, self.labels)  # checks the label set


# ---- data ------------------------------------------------------------------------------------------
def labelled_texts(r: FinetuneRecipe) -> list:
    """(text, label) records: the built-in sentiment training split, or a JSONL file."""
    if r.data == "sentiment":
        from plinth.data.sentiment import sentiment_splits
        return [(x.text, x.label) for x in sentiment_splits()[0]]
    rows = []
    for line, record in read_jsonl(r.data, {"text": str, "label": str}):
        if record["label"] not in r.labels:
            raise PlinthError(f"{r.data}, line {line}: field 'label' is {record['label']!r}, not in the label "
                              f"set {r.labels}; fix the data or the recipe's `labels`")
        rows.append((record["text"], record["label"]))
    return rows


def rated_texts(r: FinetuneRecipe) -> list:
    """(text, score) records: the built-in sentiment training split's ratings, or a JSONL file."""
    if r.data == "sentiment":
        from plinth.data.sentiment import rating_splits
        return [(x.text, x.score) for x in rating_splits()[0]]
    rows = []
    for line, record in read_jsonl(r.data, {"text": str, "score": (int, float)}):
        if isinstance(record["score"], bool) or not math.isfinite(record["score"]):
            raise PlinthError(f"{r.data}, line {line}: field 'score' is {record['score']!r}; "
                              "a regression target must be a finite number")
        rows.append((record["text"], float(record["score"])))
    return rows


def records(r: FinetuneRecipe) -> list:
    """The recipe's raw data, every record checked: conversations for chat, (text, score) pairs for
    regression, else (text, label) pairs."""
    if r.task == "chat":
        return sft.load_conversations(r.data)
    return rated_texts(r) if r.task == "regress" else labelled_texts(r)


def build_examples(r: FinetuneRecipe, tokenizer, rows: list) -> tuple[list[Example], list | int | None]:
    """Tokenized examples of the recipe's task from raw records, and what accuracy is measured
    against (label first tokens, the label count, or None for chat and regression)."""
    if r.task == "chat":
        examples = [sft.render(tokenizer, m, r.seq_len) for m in rows]
        return [e for e in examples if any(t != IGNORE for t in e.targets)], None
    if r.task == "classify":
        examples = [Example(tokenizer.encode(t)[:r.seq_len] or [0], [r.labels.index(check_label(lab, r.labels))])
                    for t, lab in rows]
        return examples, len(r.labels)
    if r.task == "regress":
        return [Example(tokenizer.encode(t)[:r.seq_len] or [0], [score]) for t, score in rows], None
    task = PromptTask(r.instruction, r.labels)
    return [sft.render(tokenizer, task.messages(t, lab), r.seq_len) for t, lab in rows], answer_tokens(tokenizer, task)


def build_data(r: FinetuneRecipe, tokenizer) -> ExampleData:
    """A fixed held-out set per seed, then up to max_examples training records; only the records
    used are rendered and tokenized. Packing joins training examples only: it changes no example's
    loss (attention stays within each), and accuracy reads one answer per validation row."""
    rows = records(r)
    order = np.random.default_rng(r.seed).permutation(len(rows))
    kept = order[r.val_examples:]
    if r.labels_fraction < 1:
        kept = kept[balanced_subset(torch.tensor([r.labels.index(rows[i][1]) for i in kept]), r.labels_fraction,
                                    r.seed).numpy()]
    kept = kept[:r.max_examples] if r.max_examples else kept
    val, choices = build_examples(r, tokenizer, [rows[i] for i in order[:r.val_examples]])
    train_rows = build_examples(r, tokenizer, [rows[i] for i in kept])[0]
    if r.pack:
        train_rows = pack(train_rows, r.seq_len)
    return ExampleData(train_rows, val, r.batch_size, r.seed, choices)


def build_image_data(r: FinetuneRecipe, config) -> ImageData:
    """Labelled images: a fixed held-out set per seed, then the training images (a class-balanced
    `labels_fraction` of them, then at most max_examples)."""
    if r.task != "classify":
        raise PlinthError(f"an image model is fine-tuned with task: classify, not task={r.task}")
    prep = ImagePrep.from_config(config)
    found = labelled_images(r.data, prep, r.labels)
    order = torch.from_numpy(np.random.default_rng(r.seed).permutation(len(found.labels)))
    val, kept = order[:r.val_examples], order[r.val_examples:]
    if r.labels_fraction < 1:
        kept = kept[balanced_subset(found.labels[kept], r.labels_fraction, r.seed)]
    kept = kept[:r.max_examples] if r.max_examples else kept
    if not len(kept):
        raise PlinthError(f"{r.data} has {len(found.labels)} images and val_examples={r.val_examples} holds them all "
                          "out: lower val_examples or add images")
    return ImageData(found.pixels[kept], prep, r.batch_size, r.seed, r.grad_accum, labels=found.labels[kept],
                     val=(found.pixels[val], found.labels[val]), classes=len(r.labels), flip=r.flip,
                     shift=r.shift, patches=config.n_patches, keep_patches=r.keep_patches,
                     tokens_per_image=config.n_patches - hidden_count(config.n_patches, 1 - r.keep_patches)
                     + config.class_token)


# ---- model -----------------------------------------------------------------------------------------
def build_model(r: FinetuneRecipe, net) -> Finetuned:
    """Make the recipe's parameters trainable: all, LoRA adapters (on a 4-bit base for QLoRA), or none
    of the backbone (linear probe); a head always trains."""
    make_trainable(r, net)
    head = None
    if r.task in HEAD_TASKS:
        head = Head(net.config.dim, r.labels if r.task == "classify" else None, pooling_of(r, net.config))
    model = Finetuned(net, head)
    if r.layer_decay < 1:
        model.lr_scales = layer_decay_scales(net.config.n_layers, r.layer_decay)
    return model


def layer_decay_scales(n_layers: int, decay: float) -> dict[str, float]:
    """{parameter name prefix: learning-rate factor} for the loop's optimizer (first match wins):
    block i gets decay^(n_layers - i), the final norm and the head 1, every other backbone
    parameter (the input layer, positions, class token) decay^(n_layers + 1)."""
    scales = {f"backbone.layers.{i}.": decay ** (n_layers - i) for i in range(n_layers)}
    return {**scales, "backbone.norm.": 1.0, "backbone.": decay ** (n_layers + 1)}


def pooling_of(r: FinetuneRecipe, config) -> str:
    if r.pooling != "auto":
        return r.pooling
    if config.is_image:
        return "first" if config.class_token else "mean"
    return "last"  # a causal model's last token has seen the whole text


# ---- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data: ExampleData, r) -> dict:
    """Validation loss per target (for regression: the mean squared error); accuracy where the task
    has labels: at each row's first target position, is the highest-scoring label the right one;
    for regression, the correlation of predictions with targets. Like training, scores only the
    positions that have a target (the full vocabulary at every position would dominate memory)."""
    model.eval()
    loss_sum, targets, correct, rows = 0.0, 0, 0, 0
    predicted_numbers, true_numbers = [], []
    for x, y in data.val_batches(r.eval_batches):
        with autocast(r):
            logits, kept = model.logits_at_targets(x, y)  # (N, V) and (N,), row after row
        logits = logits.float()
        loss_sum += float(summed_loss(logits, kept))
        targets += len(kept)
        if kept.is_floating_point():  # regression: (B,) predictions and targets
            predicted_numbers.append(logits)
            true_numbers.append(kept)
        elif data.choices is not None:
            counts = (y != IGNORE).sum(1)
            first = (counts.cumsum(0) - counts)[counts > 0]  # where each row's targets start in N
            scores, truth = logits[first], kept[first]
            if isinstance(data.choices, list):  # label words: compare only their first tokens
                choices = torch.tensor(data.choices)
                predicted = choices[scores[:, choices].argmax(-1)]
            else:
                predicted = scores.argmax(-1)
            correct += int((predicted == truth).sum())
            rows += len(first)
    model.train()
    result = {"val_loss": loss_sum / max(1, targets)}
    if rows:
        result["val_acc"] = correct / rows
    if predicted_numbers:
        result.update(correlations(torch.cat(predicted_numbers), torch.cat(true_numbers)))
    return result


def correlations(predicted: torch.Tensor, truth: torch.Tensor) -> dict:
    """Pearson (linear) and Spearman (rank) correlation of predictions with targets; none for fewer
    than two rows, and NaN while every prediction is the same."""
    if len(truth) < 2:
        return {}
    from scipy import stats  # deferred: ~1 s to import, and only regression runs need it
    p, t = predicted.numpy(), truth.numpy()
    with warnings.catch_warnings():  # constant predictions: NaN is the answer, the warning says no more
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return {"val_pearson": float(stats.pearsonr(p, t).statistic),
                "val_spearman": float(stats.spearmanr(p, t).statistic)}


# ---- the command -----------------------------------------------------------------------------------
def prepare(r: FinetuneRecipe, log=print) -> tuple[Finetuned, object, ExampleData | ImageData]:
    """Everything before the first step, so that every input error surfaces before any training."""
    net, tokenizer, _ = read_model(hub.resolve(r.base))
    if r.init == "random":
        net = random_base(r, net, tokenizer)
    for name, default in (("keep_patches", 1.0), ("shift", 0)):
        if getattr(r, name) != default and not net.config.is_image:
            raise PlinthError(f"{name} is for image models; {r.base} reads text. Remove it")
    if net.config.is_image and not r.shift < net.config.image_size // 2:
        raise PlinthError(f"shift={r.shift} would move {net.config.image_size}-pixel images by half or more; give "
                          f"at most {net.config.image_size // 2 - 1}")
    data = build_image_data(r, net.config) if net.config.is_image else build_data(r, tokenizer)
    torch.manual_seed(r.seed)  # adapter and head initialisation, and dropout, repeat run for run
    model = build_model(r, net)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{r.task}/{r.method} on {r.base}{' (random init)' if r.init == 'random' else ''}: {len(data.train)} train / "
        f"{len(data.val)} validation examples, {trainable:,} trainable parameters")
    return model, tokenizer, data


def random_base(r: FinetuneRecipe, net: Transformer, tokenizer) -> Transformer:
    """`init: random`: the base's architecture with fresh weights (seeded), kept in the run folder
    as `init/` and named as the run's base, so the run can resume and its checkpoints (adapter or
    head only, for lora and probe) load like any other."""
    folder = Path(r.out_dir) / "init"
    if not is_native(folder):
        torch.manual_seed(r.seed)
        fresh = Transformer(net.config)
        fresh.to_empty(device="cpu")
        fresh.init_weights()
        Path(r.out_dir).mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:
            write_model(fresh, tmp)
            if tokenizer is not None:
                tokenizer.save(tmp)
    r.base = str(folder)
    return read_model(folder)[0]


def finetune(r: FinetuneRecipe, resume: bool = False, log=print) -> Path:
    if r.task == "vqa":
        model, tokenizer, data = image_text.prepare(r, log)
        latest = train(model, tokenizer, data, r, resume, log, evaluate=image_text.evaluate,
                       store=image_text.ImageTextWeights(r))
    else:
        model, tokenizer, data = prepare(r, log)
        latest = train(model, tokenizer, data, r, resume, log, evaluate=evaluate, store=FinetuneWeights(r))
    final = Path(r.out_dir) / "final"
    point_link(final, latest.resolve().name)
    return final
