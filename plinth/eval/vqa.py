"""Visual question answering: an image+text model's exact-match accuracy on a test split, with its
standard error (`plinth eval runs/vqa-easy/final --tasks easy-vqa`). Answers are generated greedily
through the batching engine, as the server would answer them, and compared with the reference after
trimming spaces and case."""
from __future__ import annotations

from collections import Counter

from plinth.engine import Engine
from plinth.errors import PlinthError
from plinth.eval.stats import mean_stderr
from plinth.generate import SamplingParams
from plinth.vision.image_chat import image_prompt, split_images
from plinth.vision.image_sources import ImageLimits, load_image
from plinth.vision.vqa_data import conversation, vqa_records

MAX_ANSWER_TOKENS = 8


def vqa_accuracy(loaded, source: str = "easy-vqa", limit: int = 0, batch: int = 32) -> dict:
    """Exact match on `source`'s test questions (easy-vqa: its 9,673; a JSONL: all of it); `limit`
    > 0 takes the first that many."""
    if loaded.vision is None:
        raise PlinthError(f"{loaded.name} has no image encoder; this task needs an image+text model, a run of "
                          "`plinth finetune recipes/vqa-easy.yaml`")
    records = vqa_records(source, "test")
    records = records[:limit] if limit else records
    prompts, images, decoded, shared = [], [], {}, {}
    for path, question, _ in records:
        messages, _ = split_images(conversation(question))
        if path not in decoded:  # easy-VQA asks about ten questions per image: decode each once
            decoded[path] = load_image(path, ImageLimits(allow_files=True))
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt, pictures = image_prompt(loaded.tokenizer, loaded.vision, text, [decoded[path]], ImageLimits())
        # questions about one image share its pixels, so the engine encodes each image once
        pictures = shared.setdefault((path, tuple(pictures.positions.tolist())), pictures)
        prompts.append(prompt)
        images.append(pictures)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=batch, max_len=max(map(len, prompts)) + MAX_ANSWER_TOKENS,
                    vision=loaded.vision)
    completions = engine.generate_many(prompts, SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0),
                                       images=images)
    right = [float(c.text.strip().lower() == answer.strip().lower()) for c, (_, _, answer) in zip(completions, records)]
    accuracy, stderr = mean_stderr(right)
    answers = Counter(answer for _, _, answer in records)
    return {"metric": "exact_match", "value": accuracy, "stderr": stderr, "n": len(records), "unit": "questions",
            "chance": answers.most_common(1)[0][1] / len(records),  # always the most common answer
            "per_answer": {a: sum(r for r, (_, _, b) in zip(right, records) if b == a) / n for a, n in answers.items()}}
