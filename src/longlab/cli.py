"""The ``longlab`` command line."""

from __future__ import annotations

import argparse
import json
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
    from longlab.models.corpus import build_corpus

    manifest = build_corpus(Path(args.out))
    counts = {s: sum(d["split"] == s for d in manifest["documents"]) for s in manifest["totals"]}
    for split, chars in manifest["totals"].items():
        print(f"{split:<11} {counts[split]:>4} documents {chars:>10,} characters")
    print(f"wrote {args.out}/{{train,validation,test}}.jsonl and manifest.json (Python {manifest['python']})")


def _train(args: argparse.Namespace) -> None:
    from longlab.models.bundled import load
    from longlab.models.report import evaluate
    from longlab.models.train import Recipe, train

    recipe = Recipe(steps=args.steps) if args.steps else Recipe()
    out = Path(args.out)
    final = train(out, recipe, threads=args.threads)
    model, tokenizer = load(final)
    results = evaluate(model, tokenizer, out / "corpus", samples=args.samples)
    (final / "eval.json").write_text(json.dumps(results, indent=1))
    print(f"validation loss {results['validation']['loss']:.4f} (perplexity {results['validation']['perplexity']:.2f})")
    for task in ("passkey", "niah_single"):
        print(f"{task}: " + ", ".join(f"{length}: {acc:.0%}" for length, acc in results[task].items()))
    print(f"checkpoint: {final}")


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
    trainer.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LonglabError as error:
        print(f"longlab: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
