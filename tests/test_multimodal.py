"""The image+text model: content parts to token ids with image slots, the splice of image tokens,
the engine's image requests (solo = batched = the one-request path), training through
`plinth finetune` (task vqa) on a toy set it must learn, loading the run, and its eval task."""
import json

import pytest
import torch

from plinth.engine import Engine, ImageInput
from plinth.errors import PlinthError
from plinth.generate import SamplingParams, generate_stream
from plinth.vision.image_chat import IMAGE_MARK, encode_with_images, engine_prompt, split_images
from plinth.vision.multimodal import IMAGE_SLOT, ImageTextModel
from tests.conftest import BAR_QUESTION as ASK, bar, byte_tokenizer, tiny_model, tiny_vision

def parts(picture, text=ASK):
    return [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": text}]}]


# ---- content parts → ids ---------------------------------------------------------------------------
def test_split_images_marks_each_image_and_keeps_text_parts_joined():
    messages, images = split_images([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": "a"}},
                                     {"type": "text", "text": "and"}, {"type": "image", "image": "b.png"}]}])
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == f"Compare {IMAGE_MARK}\nand{IMAGE_MARK}\n"
    assert images == [{"url": "a"}, "b.png"]


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unknown content part type 'audio'"),
    ([{"role": "user", "content": f"look: {IMAGE_MARK}"}], "marks where images go"),
    ([{"role": "user", "content": [{"type": "text", "text": IMAGE_MARK}]}], "marks where images go"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "needs its 'image_url' field"),
])
def test_split_images_refuses_what_it_cannot_place(messages, fragment):
    with pytest.raises(PlinthError, match=fragment):
        split_images(messages)


def test_encode_with_images_puts_slots_where_the_marks_were():
    tok = byte_tokenizer()
    text = f"ab{IMAGE_MARK}cd{IMAGE_MARK}"
    ids, trained = encode_with_images(tok, text, 3, spans=[(len(text) - len(IMAGE_MARK) - 2, len(text))])
    assert ids == tok.encode("ab", add_bos=False) + [IMAGE_SLOT] * 3 + tok.encode("cd", add_bos=False) + [IMAGE_SLOT] * 3
    assert trained == [False] * 5 + [True, True] + [False] * 3  # slots never train, even inside a span
    prompt, positions = engine_prompt(ids)
    assert positions == [2, 3, 4, 7, 8, 9] and all(t >= 0 for t in prompt)


# ---- the model ---------------------------------------------------------------------------------------
def test_image_tokens_are_the_projected_merged_patches_spliced_in_place():
    language, vision = tiny_model(), tiny_vision()
    model = ImageTextModel(vision, language)
    pixels = torch.randn(2, 1, 8, 8)
    tokens = torch.tensor([[5, IMAGE_SLOT, IMAGE_SLOT, IMAGE_SLOT, IMAGE_SLOT, 6, -1],
                           [7, 8, IMAGE_SLOT, IMAGE_SLOT, IMAGE_SLOT, IMAGE_SLOT, 9]])
    with torch.no_grad():
        embeds = model.embed(tokens, pixels)
        # by hand: the encoder's 16 patch features (no class token), each 2×2 block concatenated
        patches = vision.encoder.features(images=pixels)[:, 1:].reshape(2, 2, 2, 2, 2, -1)
        merged = patches.permute(0, 1, 3, 2, 4, 5).reshape(2, 4, -1)
        expected = vision.projector(merged)
    torch.testing.assert_close(embeds[0, 1:5], expected[0])
    torch.testing.assert_close(embeds[1, 2:6], expected[1])
    torch.testing.assert_close(embeds[0, 0], language.tok_embeddings.weight[5])
    with pytest.raises(ValueError, match="image slots"):
        model.embed(tokens, pixels[:1])


# ---- the engine --------------------------------------------------------------------------------------
def image_request(tok, vision, shade):
    text = tok.apply_chat_template(split_images(parts("_"))[0], add_generation_prompt=True)
    prompt, positions = engine_prompt(encode_with_images(tok, text, vision.tokens_per_image)[0])
    pixels = (torch.full((1, 1, 8, 8), shade / 255.0) - 0.5) / 0.25
    return prompt, ImageInput(pixels, torch.tensor(positions))


def alone(language, tok, prompt, pictures, vision, params):
    """The one-request path (plinth.load's): the prompt's embeddings with the image tokens in place."""
    embeds = language.tok_embeddings(torch.tensor([prompt]))
    embeds[0, pictures.positions] = vision(pictures.pixels).flatten(0, 1)
    steps = generate_stream(language, tok, prompt, params, embeds=embeds)
    return [s.choice.token for s in steps], language(embeds=embeds)[0, -1]


def test_engine_answers_an_image_request_as_one_request_alone_would(no_grad):
    tok, language, vision = byte_tokenizer(), tiny_model(), tiny_vision()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt, dark = image_request(tok, vision, 30)
    _, light = image_request(tok, vision, 220)
    dark_alone, dark_logits = alone(language, tok, prompt, dark, vision, params)
    light_alone, light_logits = alone(language, tok, prompt, light, vision, params)
    assert not torch.allclose(dark_logits, light_logits)  # the image matters
    engine = Engine(language, tok, max_batch=4, vision=vision, chunk=5)  # image tokens split across chunks
    assert engine.generate_many([prompt], params, images=[dark])[0].tokens == dark_alone
    text = tok.encode("a text-only request beside it", add_bos=False)
    fresh = ImageInput(dark.pixels, dark.positions)  # not yet encoded
    batched = engine.generate_many([text, prompt, prompt], params, images=[None, fresh, light])
    assert batched[1].tokens == dark_alone and batched[2].tokens == light_alone


def test_engine_refuses_images_it_cannot_place():
    tok, language, vision = byte_tokenizer(), tiny_model(), tiny_vision()
    prompt, pictures = image_request(tok, vision, 30)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(PlinthError, match="reads text only"):
        Engine(language, tok).submit(prompt, params, print, images=pictures)
    with pytest.raises(PlinthError, match="need 4 image positions inside the prompt, got 3"):
        Engine(language, tok, vision=vision).submit(prompt, params, print,
                                                    images=ImageInput(pictures.pixels, pictures.positions[:3]))


# ---- training, loading, eval ---------------------------------------------------------------------------
def test_finetune_vqa_learns_the_toy_task_and_plinth_load_answers_from_pixels(toy_vlm):
    import plinth
    root, final = toy_vlm
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 4
    assert metrics[-1]["val_acc"] == 1.0
    m = plinth.load(str(final))
    assert m.vision is not None and m.vision.tokens_per_image == 4
    assert m.chat(parts(bar(1000)), max_tokens=8, temperature=0) == "up"  # an image it has not seen
    assert m.chat(parts(str(root / "1.png")), max_tokens=8, temperature=0) == "down"


def test_vqa_eval_task_reads_answers_generated_by_the_engine(toy_vlm):
    import plinth
    from plinth.eval.vqa import vqa_accuracy
    root, final = toy_vlm
    result = vqa_accuracy(plinth.load(str(final)), str(root / "toy.jsonl"))
    assert result["n"] == 48 and result["value"] == 1.0 and result["chance"] == 0.5
    with pytest.raises(PlinthError, match="no image encoder"):
        vqa_accuracy(plinth.load(str(root / "lm")), str(root / "toy.jsonl"))


def test_a_vqa_run_resumed_from_its_checkpoint_is_bit_exact(toy_vlm, tmp_path):
    """A run stopped after its step-4 checkpoint (later ones gone, as after a kill) and resumed ends
    with the same losses and the same adapter, encoder and projector as the run that never stopped."""
    import shutil

    from safetensors.torch import load_file

    from plinth.adapt.finetune import FinetuneRecipe, finetune
    from plinth.files import point_link
    root, _ = toy_vlm

    def run(out, resume=False):
        r = FinetuneRecipe(base=str(root / "lm"), task="vqa", method="lora", data=str(root / "toy.jsonl"),
                           image_encoder=str(root / "vit"), val_examples=4, batch_size=4, max_steps=8, lr=1e-3,
                           warmup_steps=1, eval_every=4, save_every=4, seq_len=64, out_dir=str(out))
        return finetune(r, resume=resume, log=lambda *_: None)

    whole = run(tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut, symlinks=True)
    shutil.rmtree(cut / "step-000008")
    (cut / "final").unlink()
    point_link(cut / "latest", "step-000004")
    resumed = run(cut, resume=True)
    losses = [[json.loads(line)["loss"] for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
              for folder in (whole, resumed)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    for name in ("adapter.safetensors", "vision.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_encoder_learning_rate_scales_the_encoder_alone():
    """encoder_lr: the optimizer puts the encoder's weights in groups of their own, whose rate the
    loop multiplies by encoder_lr / lr; every other weight keeps the recipe's lr."""
    from types import SimpleNamespace

    from plinth.train.loop import build_optimizer
    model = ImageTextModel(tiny_vision(), tiny_model(dim=64, n_heads=4, n_kv_heads=2))
    model.lr_scales = {"vision.encoder.": 3.0}
    groups = build_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))).param_groups
    encoder = {id(p) for p in model.vision.encoder.parameters()}
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.1), (1.0, 0.0), (3.0, 0.1), (3.0, 0.0)]
    for g in groups:
        assert all((id(p) in encoder) == (g["lr_scale"] == 3.0) for p in g["params"]) and g["params"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_vqa_flip_mirrors_training_images_at_random_and_repeatably(toy_vlm):
    """flip: each training image is the unflipped batch's image or its mirror, half of them on
    average, the same on every call for a step (a resumed run sees the same batches); the
    questions and answers do not change."""
    from plinth.vision.images import ImagePrep
    from plinth.vision.vqa_data import VqaData, vqa_records
    root, _ = toy_vlm
    vision = tiny_vision()
    records = vqa_records(str(root / "toy.jsonl"), "train")
    prep, tokenizer = ImagePrep.from_config(vision.encoder.config), byte_tokenizer()

    def data(flip: bool) -> VqaData:
        return VqaData.build(records, tokenizer, prep, vision.tokens_per_image, 8, 0, 4, flip=flip)

    plain, flipped, mirrored = data(False), data(True), 0
    for step in range(6):
        (tokens, images), targets = plain.batch(step, 0)
        (tokens_f, images_f), targets_f = flipped.batch(step, 0)
        assert torch.equal(tokens, tokens_f) and torch.equal(targets, targets_f)
        assert torch.equal(images_f, flipped.batch(step, 0)[0][1])
        for row, row_f in zip(images, images_f):
            assert torch.equal(row, row_f) or torch.equal(row.flip(-1), row_f)
            mirrored += not torch.equal(row, row_f)
    assert 12 <= mirrored <= 36  # of 48 images
    assert torch.equal(plain.val_batches(0).__next__()[0][1], flipped.val_batches(0).__next__()[0][1])


def test_balance_answers_draws_rare_answers_as_often_as_common_ones(toy_vlm):
    """balance_answers=1: a question whose answer is rare is drawn as often as the rest together
    would be per answer (here 1 in 6 training questions answers "down": half the draws);
    0: as they come. Validation is never reweighted."""
    from plinth.vision.images import ImagePrep
    from plinth.vision.vqa_data import VqaData, vqa_records
    root, _ = toy_vlm
    vision = tiny_vision()
    records = [(path, question, "down" if i % 6 == 0 else "up")
               for i, (path, question, _) in enumerate(vqa_records(str(root / "toy.jsonl"), "train"))]
    prep, tokenizer = ImagePrep.from_config(vision.encoder.config), byte_tokenizer()
    down = tokenizer.encode("d")[0]

    def share_of_down(balance: float) -> float:
        data = VqaData.build(records, tokenizer, prep, vision.tokens_per_image, 8, 0, 4, balance_answers=balance)
        first = [row[row != -100][0] for step in range(100) for row in data.batch(step, 0)[1]]
        assert torch.equal(data.batch(7, 0)[1], data.batch(7, 0)[1])  # drawn from the step: resumable
        return float((torch.stack(first) == down).float().mean())

    assert 0.1 < share_of_down(0.0) < 0.25
    assert 0.4 < share_of_down(1.0) < 0.6


def test_a_second_stage_starts_from_an_image_text_runs_encoder_and_projector(toy_vlm):
    """image_encoder may name an image+text run: its encoder and projector train on from their
    trained weights (not a fresh projector); settings that cannot fit them are clear errors."""
    from safetensors.torch import load_file
    from plinth.adapt import image_text
    from plinth.adapt.finetune import FinetuneRecipe
    root, final = toy_vlm
    r = dict(base=str(final), task="vqa", method="full", data=str(root / "toy.jsonl"), image_encoder=str(final),
             val_examples=4, batch_size=8, seq_len=64)
    model = image_text.prepare(FinetuneRecipe(**r), log=lambda *_: None)[0]
    trained = load_file(str(final / "vision.safetensors"))
    for name, tensor in model.vision.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert all(p.requires_grad for p in model.vision.parameters())
    for wrong in (dict(merge=1), dict(encoder_init="random")):
        with pytest.raises(PlinthError, match="image\\+text run"):
            image_text.prepare(FinetuneRecipe(**{**r, **wrong}), log=lambda *_: None)


def test_answers_keeps_only_the_questions_with_those_answers_for_training_and_validation(toy_vlm):
    """answers: a first stage trains on one kind of question; an answer the data never gives, or
    the field on another task, is a clear error."""
    from plinth.adapt import image_text
    from plinth.adapt.finetune import FinetuneRecipe
    root, final = toy_vlm
    r = dict(base=str(final), task="vqa", method="full", data=str(root / "toy.jsonl"), image_encoder=str(final),
             val_examples=4, batch_size=8, seq_len=64)
    tokenizer = byte_tokenizer()
    down = tokenizer.encode("d")[0]

    def first_answer_tokens(data) -> set[int]:
        rows = [targets for _, targets, _ in data.train + data.val]
        return {next(t for t in targets if t != -100) for targets in rows}

    every = image_text.prepare(FinetuneRecipe(**r), log=lambda *_: None)[2]
    only_down = image_text.prepare(FinetuneRecipe(**r, answers=["down"]), log=lambda *_: None)[2]
    assert first_answer_tokens(every) == {down, tokenizer.encode("u")[0]}
    assert first_answer_tokens(only_down) == {down}
    assert len(only_down.train) + len(only_down.val) == 24  # the 24 odd bars of 48
    with pytest.raises(PlinthError, match="answers \\['left'\\] never answer a question of .*its answers are down, up"):
        image_text.prepare(FinetuneRecipe(**r, answers=["down", "left"]), log=lambda *_: None)
    with pytest.raises(PlinthError, match="answers is for task=vqa"):
        FinetuneRecipe(task="chat", answers=["down"])
