"""The ``longlab`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from longlab.errors import LonglabError
from longlab.spec import format_spec, methods, parse


def _methods(args: argparse.Namespace) -> None:
    table = methods()
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return
    for kind in dict.fromkeys(m["kind"] for m in table):
        print(f"{kind} methods:")
        for m in (m for m in table if m["kind"] == kind):
            params = ", ".join(f"{name}={p['default']}" for name, p in m["parameters"].items()) or "no parameters"
            print(f"  {m['name']:<13} {params}")
            print(textwrap.fill(m["summary"], 110, initial_indent=" " * 16, subsequent_indent=" " * 16))
        print()


def _check(args: argparse.Namespace) -> None:
    print(format_spec(parse(args.spec)))


def _corpus(args: argparse.Namespace) -> None:
    from longlab.data.corpus import build_corpus

    manifest = build_corpus(Path(args.out))
    counts = {s: sum(d["split"] == s for d in manifest["documents"]) for s in manifest["totals"]}
    for split, chars in manifest["totals"].items():
        print(f"{split:<11} {counts[split]:>4} documents {chars:>10,} characters")
    print(f"wrote {args.out}/{{train,validation,test}}.jsonl and manifest.json (Python {manifest['python']})")


def _train(args: argparse.Namespace) -> None:
    from longlab.bundled.card import finish
    from longlab.bundled.train import Recipe, train

    recipe = Recipe(steps=args.steps) if args.steps else Recipe()
    out = Path(args.out)
    from longlab.loading import resolve_device

    final = train(out, recipe, threads=args.threads, device=resolve_device(args.device))
    results = finish(out, recipe, samples=args.samples)
    print(f"validation loss {results['validation']['loss']:.4f} (perplexity {results['validation']['perplexity']:.2f})")
    for task in ("passkey", "niah_single"):
        print(f"{task}: " + ", ".join(f"{length}: {acc:.0%}" for length, acc in results[task].items()))
    print(f"checkpoint and model card: {final}")


def _finetune(args: argparse.Namespace) -> None:
    from longlab.training.finetune import finetune
    from longlab.training.recipe import FinetuneRecipe

    options = {"batch_size": args.batch_size, "learning_rate": args.lr, "train_length": args.train_length,
               "seed": args.seed, "warmup_steps": args.warmup_steps}  # fmt: skip
    recipe = FinetuneRecipe(method=args.method, length=args.length, recipe=args.recipe, steps=args.steps,
                            **{k: v for k, v in options.items() if v is not None})  # fmt: skip
    final = finetune(Path(args.out), recipe, model=args.model, threads=args.threads, device=args.device, ring=args.ring)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun only rank 0 wrote it
        print(f"checkpoint: {final} (evaluate: longlab eval --model {final})")


def _lab(args: argparse.Namespace) -> None:
    from longlab.lab.run import LabConfig, run
    from longlab.loading import resolve_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    given = {k: v for k, v in (("steps", args.steps), ("length", args.length), ("size", args.size)) if v is not None}
    components = tuple(args.component or ())
    config = LabConfig(preset=args.preset, components=components, **given)
    print(f"report: {run(Path(args.out), config, device=resolve_device(args.device))}")


def _eval(args: argparse.Namespace) -> None:
    from longlab.eval.runner import DEFAULT_METHODS, DEFAULT_TASKS, EvalConfig, parse_lengths, run
    from longlab.loading import carried_method, checkpoint

    carried = carried_method(checkpoint(args.model))  # a fine-tuned checkpoint's own method is the default
    config = EvalConfig(
        model=args.model,
        methods=args.method or ([carried] if carried else list(DEFAULT_METHODS)),
        tasks=args.task or list(DEFAULT_TASKS),
        lengths=parse_lengths(args.lengths) if args.lengths is not None else None,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        chat=args.chat,
        batch_size=args.batch_size,
        allow_beyond_reach=args.allow_beyond_reach,
        device=args.device,
        dtype=args.dtype,
    )
    out = run(config)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun only rank 0 writes the report
        print(f"report: {out / 'report.md'}")


def _report(args: argparse.Namespace) -> None:
    from longlab.eval.report import write_report

    print(f"report: {write_report(Path(args.folder))}")


def _tasks(args: argparse.Namespace) -> None:
    from longlab.eval.ruler import TASKS as RULER_TASKS
    from longlab.eval.tasks import describe_tasks

    for task in describe_tasks():
        params = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in task["parameters"].items())
        print(f"{task['name']:<8} {params or 'no parameters'}")
        print(textwrap.fill(task["summary"], 110, initial_indent=" " * 9, subsequent_indent=" " * 9))
    print(f"\nruler subtasks: {', '.join(RULER_TASKS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlab", description="The long-context workbench for transformer LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("methods", help="list every method with its kind, parameters and paper")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_methods)
    check = commands.add_parser(
        "check", help="validate a method spec and print it normalised (model-derived defaults are filled by apply)"
    )
    check.add_argument("spec", help="e.g. 'yarn:factor=4+logn'")
    check.set_defaults(run=_check)
    corpus = commands.add_parser("corpus", help="build the bundled model's train/validation/test text")
    corpus.add_argument("--out", default="runs/corpus", help="output folder (default: runs/corpus)")
    corpus.set_defaults(run=_corpus)
    trainer = commands.add_parser(
        "train", help="train the bundled model from scratch (resumes an interrupted run in the same --out)"
    )
    trainer.add_argument("--out", default="runs/tiny", help="run folder (default: runs/tiny)")
    trainer.add_argument("--steps", type=int, help="optimizer steps (default: the bundled recipe's 2400)")
    trainer.add_argument("--samples", type=int, default=50, help="samples per length in the final evaluation")
    trainer.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    trainer.add_argument("--device", default="auto", help="auto (cuda when a GPU is there), cpu, cuda or cuda:N")
    trainer.set_defaults(run=_train)

    tuner = commands.add_parser(
        "finetune", help="fine-tune a checkpoint at a longer length under a position method (resumes in --out)"
    )
    tuner.add_argument("--method", required=True, help="the position method, e.g. linear:factor=4, yarn:factor=4")
    tuner.add_argument("--length", type=int, required=True, help="the target context in tokens")
    tuner.add_argument("--recipe", default="full", help="full (train at --length), pose or longlora (default: full)")
    tuner.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    tuner.add_argument("--out", required=True, help="run folder; the checkpoint goes to OUT/final")
    tuner.add_argument("--model", default="tiny", help="a bundled model name or a local checkpoint folder")
    tuner.add_argument("--batch-size", type=int, help="rows per step (default: 2)")
    tuner.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4)")
    tuner.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 20)")
    tuner.add_argument("--train-length", type=int, help="pose: the short training window (default: the model's)")
    tuner.add_argument("--seed", type=int, help="data and initialisation seed (default: 1234)")
    tuner.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    tuner.add_argument("--device", default="auto", help="auto (cuda when a GPU is there), cpu, cuda or cuda:N")
    tuner.add_argument(
        "--ring", type=int, help="split every row over N processes with ring attention (torchrun --nproc-per-node N)"
    )
    tuner.set_defaults(run=_finetune)

    evaluate = commands.add_parser(
        "eval", help="run methods x tasks x lengths on a model and write a report (default: the bundled model)"
    )
    evaluate.add_argument("--model", default="tiny", help="a bundled model name or a local checkpoint folder")
    evaluate.add_argument("--method", action="append", help="a method spec; repeat for several (default: six)")
    evaluate.add_argument("--task", action="append", help="a task spec; repeat (default: passkey, niah, ppl)")
    evaluate.add_argument("--lengths", help="comma-separated token counts, e.g. 512,1k,2k (default: L, 2L, 4L)")
    evaluate.add_argument("--samples", type=int, help="samples per cell (default: each task's own)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="runs/eval", help="output folder; rerunning resumes (default: runs/eval)")
    evaluate.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    evaluate.add_argument("--batch-size", type=int, default=1, help="samples per generate() call, left-padded")
    evaluate.add_argument(
        "--allow-beyond-reach", action="store_true", help="measure lengths past a method's designed reach"
    )
    evaluate.add_argument("--device", default="auto", help="auto (cuda when a GPU is there), cpu, cuda or cuda:N")
    evaluate.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on cpu, bfloat16 on cuda"
    )
    evaluate.set_defaults(run=_eval)
    lab = commands.add_parser(
        "lab", help="train small models differing in one component and report them by length (resumable)"
    )
    lab.add_argument("--preset", default="positions", help="which components to compare (default: positions)")
    lab.add_argument("--component", action="append", help="a component spec instead of the preset's; repeat")
    lab.add_argument("--out", default="runs/lab", help="output folder; rerunning resumes (default: runs/lab)")
    lab.add_argument("--steps", type=int, help="training steps per model (default: 600)")
    lab.add_argument("--length", type=int, help="training length in tokens (default: 128)")
    lab.add_argument("--size", choices=("tiny", "small"), help="model size (default: tiny)")
    lab.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    lab.add_argument("--device", default="auto", help="auto (cuda when a GPU is there), cpu, cuda or cuda:N")
    lab.set_defaults(run=_lab)
    report = commands.add_parser("report", help="rebuild a report from an eval folder's results.jsonl")
    report.add_argument("folder")
    report.set_defaults(run=_report)
    tasks = commands.add_parser("tasks", help="list evaluation tasks and their parameters")
    tasks.set_defaults(run=_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LonglabError as error:
        print(f"longlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " rerun the same command to resume" if args.command in ("eval", "train", "finetune", "lab") else ""
        print(f"\nlonglab: interrupted;{resume}" if resume else "\nlonglab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
