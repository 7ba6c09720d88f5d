"""`plinth plot`, `eval` and `report`: how a training run went and how well a model does.

    plinth plot runs/pretrain-tiny
    plinth plot runs/mae-fashion          # also reconstructions.png
    plinth plot runs/dit-fashion          # also samples.png (the sample grids over time)
    plinth eval smollm2-135m-instruct --tasks perplexity,sentiment,topic,humaneval --limit 200
    plinth report runs/eval-*/ --out report.html
"""
from __future__ import annotations

from plinth.cli.common import add_model_args
from plinth.errors import PlinthError
from plinth.loglik import BATCH_TOKENS


def cmd_plot(args):
    from plinth.train.plot import plot_run, plot_samples, sample_grids
    from plinth.vision.reconstructions import is_mae_run, plot_reconstructions
    print(plot_run(args.run, args.out))
    if is_mae_run(args.run):
        print(plot_reconstructions(args.run))
    if sample_grids(args.run):
        print(plot_samples(args.run))


def cmd_eval(args):
    from plinth.eval.run import run_eval
    from plinth.eval.tasks import EvalOptions
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise PlinthError(f"--k {args.k}: give whole numbers separated by commas, e.g. --k 1,10") from None
    options = EvalOptions(limit=args.limit, batch_tokens=args.batch_tokens, sources=tuple(args.sources.split(",")),
                          window=args.window, stride=args.stride, samples=args.samples, ks=ks, timeout=args.timeout)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    print(f"results: {run_eval(args.model, args.tasks.split(','), options, dtype=args.dtype, out=args.out, adapter=args.adapter)}")


def cmd_report(args):
    from plinth.eval.report import write_report
    print(write_report(args.runs, args.out))


def register(sub):
    p = sub.add_parser("plot", help="training curves to PNG", description="Plot loss, validation loss, "
                       "learning rate and tokens/s of a run. Example: plinth plot runs/pretrain-tiny")
    p.add_argument("run", help="a training run folder (with metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("eval", help="perplexity and downstream tasks", description="Evaluate a model; writes "
                       "runs/eval-*/results.json. Example: plinth eval smollm2-135m-instruct --tasks "
                       "perplexity,sentiment,topic,humaneval --limit 200")
    add_model_args(p, dtype_default="float32, the exact weights; bfloat16 is faster where the CPU has bf16")
    p.add_argument("--tasks", required=True, help="comma-separated: perplexity, sentiment, topic, humaneval, "
                   "or paths of .jsonl multiple-choice files")
    p.add_argument("--adapter", help="a LoRA adapter folder (a fine-tuning run's final/), merged in at load")
    p.add_argument("--limit", type=int, help="items per task (documents for perplexity); default all")
    p.add_argument("--out", default="runs", help="folder for the eval-* results folder (default: runs)")
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="padded tokens per scoring forward pass")
    p.add_argument("--sources", default="python-docs", help="perplexity: comma-separated source names or paths")
    p.add_argument("--window", type=int, help="perplexity: tokens per window (default min(1024, context))")
    p.add_argument("--stride", type=int, help="perplexity: tokens between windows (default window/2)")
    p.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem (1 = greedy)")
    p.add_argument("--k", default="1", help="humaneval: comma-separated k of pass@k (each ≤ --samples)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds each program may run")
    p.add_argument("--threads", type=int, help="model compute threads (default: all cores; on a busy machine "
                   "fewer threads wait less for each other)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="HTML report card comparing eval runs", description="One HTML page "
                       "comparing eval runs, with plots. Example: plinth report runs/eval-*/ --out report.html")
    p.add_argument("runs", nargs="+", help="eval run folders (or their results.json files)")
    p.add_argument("--out", default="report.html")
    p.set_defaults(func=cmd_report)
