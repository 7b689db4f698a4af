"""The ``longlab`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

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
