"""`plinth data prepare`, `tokenizer train` and `pretrain`: from a recipe's sources to a model trained
from scratch. Any recipe field can be overridden with --key=value.

    plinth data prepare recipes/pretrain-tiny.yaml --max_docs_per_source=500
    plinth pretrain recipes/pretrain-tiny.yaml --max_steps=100    # then --resume after a stop
    plinth pretrain recipes/mae-fashion.yaml                      # images: objective: mae
    plinth pretrain recipes/dit-fashion.yaml                      # image generation: objective: flow
    torchrun --nproc-per-node 2 -m plinth pretrain recipes/pretrain-tiny.yaml --dist ddp
"""
from __future__ import annotations

import os

from plinth.cli.common import add_recipe_arg, add_subcommands


def recipe_of(args):
    from plinth.train.recipe import PretrainRecipe, load_recipe
    return load_recipe(PretrainRecipe, args.recipe, args.overrides)


def cmd_data_prepare(args):
    from plinth.data.prepare import prepare
    prepare(recipe_of(args))


def cmd_tokenizer_train(args):
    from plinth.data.prepare import collect, train_tokenizer
    recipe = recipe_of(args)
    train_tokenizer(recipe, collect(recipe)[0])


def cmd_pretrain(args):
    from plinth.train.recipe import load_recipe, recipe_values
    objective = recipe_values(args.recipe, args.overrides).get("objective")
    if objective == "mae":  # images: a masked autoencoder
        from plinth.vision.pretrain import MaeRecipe, pretrain_mae
        latest = pretrain_mae(load_recipe(MaeRecipe, args.recipe, args.overrides), resume=args.resume,
                              dist_mode=args.dist)
    elif objective == "flow":  # images: a generator trained by flow matching
        from plinth.vision.diffusion_pretrain import DiffusionRecipe, pretrain_diffusion
        latest = pretrain_diffusion(load_recipe(DiffusionRecipe, args.recipe, args.overrides), resume=args.resume,
                                    dist_mode=args.dist)
    else:
        from plinth.train.loop import pretrain
        latest = pretrain(recipe_of(args), resume=args.resume, dist_mode=args.dist)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {latest}")


def register(sub):
    data_sub = add_subcommands(sub, "data", help="prepare pretraining data", description="Data commands.")
    p = data_sub.add_parser("prepare", help="collect, clean, train the tokenizer, tokenize to shards",
                            description="Collect the recipe's sources, clean and deduplicate them, train a BPE "
                            "tokenizer and write token shards. Example: plinth data prepare recipes/pretrain-tiny.yaml "
                            "--max_docs_per_source=500")
    add_recipe_arg(p)
    p.set_defaults(func=cmd_data_prepare)

    tokenizer_sub = add_subcommands(sub, "tokenizer", help="train a BPE tokenizer", description="Tokenizer commands.")
    p = tokenizer_sub.add_parser("train", help="train a byte-level BPE on a recipe's sources",
                                 description="Collect and clean the recipe's sources and train a byte-level BPE "
                                 "of its vocab_size (special and chat tokens included) into <out_dir>/tokenizer, "
                                 "reporting bytes per token per source against SmolLM2's tokenizer; `plinth data "
                                 "prepare` then uses it. Example: plinth tokenizer train recipes/pretrain-tiny.yaml "
                                 "--vocab_size=8192")
    add_recipe_arg(p)
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="train a model from scratch", description="Pretrain from a recipe; "
                       "any recipe field can be overridden with --key=value. Example: plinth pretrain "
                       "recipes/pretrain-tiny.yaml --max_steps=100 (then --resume after a stop)")
    add_recipe_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dist", choices=["none", "ddp", "fsdp2"], default="none",
                   help="under torchrun: replicate (ddp) or shard (fsdp2) the model over the processes, e.g. "
                        "torchrun --nproc-per-node 2 -m plinth pretrain RECIPE --dist ddp")
    p.set_defaults(func=cmd_pretrain)
