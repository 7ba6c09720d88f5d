"""`plinth finetune` with task: vqa — an image+text model (plinth/vision/multimodal.py) trained
through the one loop: LoRA (or full) on the language model, the projector always, the image
encoder as the recipe says. `r` below is a FinetuneRecipe (plinth/adapt/finetune.py).

    plinth finetune recipes/vqa-easy-shapes.yaml                   # stage 1: shape questions, encoder from the MAE run
    plinth finetune recipes/vqa-easy.yaml                          # stage 2: every question, from stage 1, encoder frozen
    plinth finetune recipes/vqa-easy-shapes.yaml --encoder_init=random --out_dir=runs/vqa-shapes-random   # the control

A checkpoint holds the language model's adapter (or full weights) and finetune.json naming the base,
as for text, plus the image encoder and projector (vision.json + vision.safetensors), so
`plinth.load(folder)` rebuilds the whole model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from plinth import hub
from plinth.adapt.trained import FinetuneWeights, make_trainable
from plinth.errors import PlinthError
from plinth.loss import IGNORE, summed_loss
from plinth.model import Transformer
from plinth.train.loop import autocast
from plinth.vision.images import ImagePrep
from plinth.vision.multimodal import VISION_WEIGHTS, ImageEncoder, ImageTextModel, has_image_encoder
from plinth.vision.vqa_data import VqaData, vqa_records, with_answers
from plinth.weights.load import read_model


def image_encoder(r, language_dim: int) -> ImageEncoder:
    """The recipe's image encoder and projector. From an image+text run: both as trained there (a
    second stage of training). From an image model: its ViT with its pretrained weights, or
    (encoder_init: random) the same config from fresh weights, seeded, and a fresh projector."""
    folder = hub.resolve(r.image_encoder)
    if has_image_encoder(folder):
        vision = ImageEncoder.load(folder)
        if r.encoder_init == "random" or vision.merge != r.merge or vision.projector.fc2.out_features != language_dim:
            raise PlinthError(f"image_encoder={r.image_encoder!r} is an image+text run, whose encoder and projector "
                              f"(merge {vision.merge}, width {vision.projector.fc2.out_features}) train on as they are: "
                              f"it needs encoder_init: pretrained, merge: {vision.merge} and a language model of that "
                              f"width (this one's is {language_dim}); or give an image model (an MAE run)")
        return vision.requires_grad_(True)
    vision = ImageEncoder(vit(r, folder), language_dim, r.merge)
    vision.init_projector(r.seed)
    return vision


def vit(r, folder) -> Transformer:
    """The image model in `folder`, or its config with fresh weights (encoder_init: random)."""
    encoder = read_model(folder)[0]
    if not encoder.config.is_image:
        raise PlinthError(f"image_encoder={r.image_encoder!r} is a text model; give an image model, such as an MAE "
                          "run (plinth pretrain recipes/mae-shapes.yaml)")
    if r.encoder_init == "random":
        with torch.random.fork_rng():
            torch.manual_seed(r.seed)
            encoder = Transformer(encoder.config)
            encoder.to_empty(device="cpu")
            encoder.init_weights()
    return encoder


def prepare(r, log=print) -> tuple[ImageTextModel, object, VqaData]:
    """Everything before the first step, so that every input error surfaces before any training."""
    language, tokenizer, _ = read_model(hub.resolve(r.base))
    if tokenizer is None or language.config.is_image:
        raise PlinthError(f"base={r.base!r} is an image model; task=vqa needs a language model as its base")
    vision = image_encoder(r, language.config.dim)
    vision.encoder.requires_grad_(r.tune_encoder)
    torch.manual_seed(r.seed)  # adapters, and dropout, repeat run for run
    make_trainable(r, language)
    records = with_answers(vqa_records(r.data, "train"), r.answers, r.data)
    data = VqaData.build(records, tokenizer, ImagePrep.from_config(vision.encoder.config), vision.tokens_per_image,
                         r.batch_size, r.seed, r.val_examples, r.max_examples, r.flip, r.balance_answers)
    model = ImageTextModel(vision, language)
    if r.encoder_lr:
        model.lr_scales = {"vision.encoder.": r.encoder_lr / r.lr}  # read by the loop's optimizer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"vqa/{r.method} on {r.base} with image encoder {r.image_encoder}"
        f"{' (random init)' if r.encoder_init == 'random' else ''}{'' if r.tune_encoder else ' (frozen)'}: "
        f"{len(data.train)} train / {len(data.val)} validation questions, {trainable:,} trainable parameters")
    return model, tokenizer, data


class ImageTextWeights(FinetuneWeights):
    """The language model's trained part and finetune.json (as for text), and the image encoder
    with its projector."""

    def write(self, model: ImageTextModel, folder: Path):
        self.write_backbone(model.language, folder)
        model.vision.save(folder)

    def read(self, model: ImageTextModel, folder: Path):
        self.read_backbone(model.language, folder)
        model.vision.load_state_dict(load_file(str(folder / VISION_WEIGHTS)))


@torch.no_grad()
def evaluate(model: ImageTextModel, data: VqaData, r) -> dict:
    """Validation loss per target, and exact match: the share of questions whose every answer token
    (and the end of the turn) is the most likely one given the right ones before it — exactly when
    greedy decoding gives the answer."""
    model.eval()
    loss_sum, targets, exact, questions = 0.0, 0, 0, 0
    for x, y in data.val_batches(r.eval_batches):
        with autocast(r):
            hidden, truth = model.features_at_targets(x, y)
            logits = model.language.project(hidden).float()
        loss_sum += float(summed_loss(logits, truth))
        targets += len(truth)
        keep = y != IGNORE
        rows = keep.nonzero()[:, 0]
        wrong = torch.zeros(len(y), dtype=torch.long).index_add_(0, rows, (logits.argmax(-1) != truth).long())
        answered = keep.any(1)
        exact += int((answered & (wrong == 0)).sum())
        questions += int(answered.sum())
    model.train()
    return {"val_loss": loss_sum / max(1, targets), "val_acc": exact / max(1, questions)}
