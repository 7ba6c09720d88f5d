"""`plinth finetune`, `prompt` and `export`: adapt a model to a task by training or by prompting, and
write the result for other tools.

    plinth finetune recipes/lora-sentiment.yaml --max_steps=50    # then --resume after a stop
    plinth prompt smollm2-135m-instruct --labels negative,positive "A joyless, plodding mess."
    plinth classify runs/vit-fashion/final shoe.png shirt.jpg        # top-k labels with probabilities
    plinth prompt smollm2-135m-instruct --file texts.txt --labels negative,positive --shots 8 --examples train.jsonl
    plinth export runs/lora-sentiment/final --merge --to hf out/sentiment-hf
    plinth export runs/lora-sentiment/final --merge --to gguf out/sentiment.gguf --gguf-type q8_0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from plinth.cli.common import add_model_args, add_recipe_arg, load_model
from plinth.errors import PlinthError
from plinth.files import atomic_folder
from plinth.weights.gguf_writer import GGUF_TYPES


def cmd_finetune(args):
    from plinth.adapt.finetune import FinetuneRecipe, finetune
    from plinth.train.recipe import load_recipe
    print(f"fine-tuned: {finetune(load_recipe(FinetuneRecipe, args.recipe, args.overrides), resume=args.resume)}")


def cmd_prompt(args):
    from plinth.adapt.examples import read_jsonl
    from plinth.adapt.prompting import PromptTask, pick_shots, predict
    from plinth.data.sentiment import LabelledText

    loaded = load_model(args)
    task = PromptTask(args.instruction, tuple(label.strip() for label in args.labels.split(",")))
    if args.shots:
        if not args.examples:
            raise PlinthError("--shots needs --examples FILE.jsonl to draw labelled examples from")
        pool = [LabelledText(str(line), r["text"], r["label"]) for line, r in read_jsonl(args.examples, {"text": str, "label": str})]
        task = task.with_shots(pick_shots(pool, args.shots, task.labels))
    texts = list(args.texts) + (Path(args.file).read_text().splitlines() if args.file else [])
    if not texts:
        raise PlinthError("no texts to label: give them as arguments or with --file")
    for text, label in zip(texts, predict(loaded, task, texts, args.mode)):
        print(f"{label or '?'}\t{text}")


def cmd_classify(args):
    if args.top_k < 1:
        raise PlinthError(f"--top-k {args.top_k}: show at least 1 label per input")
    loaded = load_model(args)
    image = loaded.model.config.is_image
    inputs = list(args.inputs) + (Path(args.file).read_text().splitlines() if args.file else [])
    if not inputs:
        raise PlinthError(f"nothing to classify: give {'image files' if image else 'texts'} after MODEL (or --file)")
    head = loaded._fine_tuned_head()
    for given, ranked in zip(inputs, head.top_labels(loaded, inputs, args.top_k)):
        print(f"{given}\t" + "  ".join(f"{label} {p:.3f}" for label, p in ranked))


def cmd_export(args):
    print(export(args))


def export(args: argparse.Namespace) -> Path:
    """Write MODEL (its adapter merged in) as --to's format at OUT; returns OUT."""
    from plinth import hub
    from plinth.adapt.adapted import read_adapted
    from plinth.adapt.lora import ADAPTER_CONFIG
    from plinth.weights.gguf_writer import write_gguf
    from plinth.weights.hf import write_hf_folder

    path, out = hub.resolve(args.model), Path(args.out)
    has_adapter = args.adapter or (path.is_dir() and (path / ADAPTER_CONFIG).is_file())
    if has_adapter and not args.merge:
        raise PlinthError(f"{args.adapter or path} is a LoRA adapter; export it merged into its base with --merge")
    if out.exists():
        raise PlinthError(f"{out} already exists; choose a new name (nothing was overwritten)")
    net, tokenizer, _, head, vision = read_adapted(path, args.adapter)
    if vision is not None:
        raise PlinthError(f"{path} is an image+text model; its image encoder has no place in a {args.to} language-model "
                          "export. Serve or load it with plinth itself (plinth serve, plinth.load)")
    if args.to == "gguf":
        if head is not None:
            raise PlinthError(f"{path} has a {head.kind} head, which a GGUF causal-LM file cannot hold; "
                              "export it with --to hf (the head is saved beside the weights) or use plinth itself")
        return write_gguf(net, tokenizer, out, args.gguf_type)
    with atomic_folder(out) as tmp:
        write_hf_folder(net, tmp)
        tokenizer.save(tmp)
        if head is not None:  # not part of the HF causal-LM layout; kept beside it for plinth
            head.save(tmp)
    return out


def register(sub):
    p = sub.add_parser("finetune", help="adapt a model: full, LoRA, QLoRA, chat SFT, classification/regression head",
                       description="Fine-tune from a recipe; any recipe field can be overridden with --key=value. "
                       "Example: plinth finetune recipes/lora-sentiment.yaml --max_steps=50 (then --resume after a stop)")
    add_recipe_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("prompt", help="label texts by zero-/k-shot prompting (no training)",
                       description="Label texts with a chat prompt, no training. Example: plinth prompt "
                       "smollm2-135m-instruct --labels negative,positive \"A joyless, plodding mess.\"")
    add_model_args(p)
    p.add_argument("texts", nargs="*", help="texts to label, right after MODEL (or --file)")
    p.add_argument("--file", help="a text file, one text per line")
    p.add_argument("--labels", required=True, help="comma-separated label set, e.g. negative,positive")
    p.add_argument("--instruction", default="Classify the sentiment of this text.", help="the question asked")
    p.add_argument("--examples", help="JSONL of {\"text\", \"label\"} to draw k-shot examples from")
    p.add_argument("--shots", type=int, default=0, help="labelled examples shown first (default 0: zero-shot)")
    p.add_argument("--mode", choices=["score", "generate"], default="score",
                   help="score: most likely label's first token; generate: read a short greedy reply")
    p.add_argument("--adapter", help="a LoRA adapter folder, merged in at load")
    p.set_defaults(func=cmd_prompt, intermixed=True)

    p = sub.add_parser("classify", help="top labels with probabilities from a fine-tuned classifier",
                       description="Label images (an image model) or texts with the classification head of a "
                       "`plinth finetune` run (task: classify), the likeliest labels first. Example: plinth classify "
                       "runs/vit-fashion/final shoe.png shirt.jpg")
    add_model_args(p, dtype_default="float32 for image models")
    p.add_argument("inputs", nargs="*", help="image files (or texts, for a text classifier), right after MODEL")
    p.add_argument("--file", help="a text file, one image path (or text) per line")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per input (default 3)")
    p.set_defaults(func=cmd_classify, intermixed=True)

    p = sub.add_parser("export", help="write a model (adapters merged) for other tools",
                       description="Write a model as a Hugging Face folder (safetensors + config.json + "
                       "tokenizer) or a llama.cpp/Ollama GGUF file. Example: plinth export "
                       "runs/lora-sentiment/final --merge --to gguf out/sentiment.gguf")
    p.add_argument("model", help="a fine-tuning run folder, checkpoint, .gguf file or known name")
    p.add_argument("--to", choices=["hf", "gguf"], required=True, help="output format")
    p.add_argument("out", help="output folder (hf) or .gguf file (gguf); must not exist yet")
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default="f16",
                   help="tensor type of a GGUF's matrices (norms stay f32; under 8 bits the output matrix is "
                   "q8_0); default f16. q4_0 is about the size of a Q4 file from llama.cpp")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the weights (required for "
                   "adapter folders: other tools read plain weights)")
    p.add_argument("--adapter", help="a LoRA adapter folder to merge into MODEL")
    p.set_defaults(func=cmd_export)
