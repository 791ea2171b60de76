"""`evalkit compare A/results.json B/results.json`: paired differences with block-bootstrap intervals."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd(args: argparse.Namespace) -> int:
    from evalkit.compare import compare_runs, compare_variants, to_json, to_markdown
    from evalkit.errors import InputError
    from evalkit.files import atomic_write_text, json_default

    if args.variants:
        if args.b is not None:
            raise InputError("--variants compares two variants of ONE run: give one results.json")
        diffs = compare_variants(args.a, *args.variants, seed=args.seed)
        label_a, label_b = args.variants
    else:
        if args.b is None:
            raise InputError("give two results.json files, or one with --variants X Y")
        diffs = compare_runs(args.a, args.b, seed=args.seed)
        label_a, label_b = args.a, args.b
    md = to_markdown(diffs, label_a, label_b)
    print(md, end="")
    if args.out:
        from evalkit.report.compare_plot import plot_chunk_diffs
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", json.dumps(to_json(diffs), indent=1, default=json_default))
        atomic_write_text(out / "compare.md", md)
        plot_chunk_diffs(diffs, out / "compare_chunks")
    return 0


def register(sub) -> None:
    """Add the `compare` subcommand."""
    p = sub.add_parser("compare", help="paired comparison of two runs (or two variants) on the same tokens")
    p.add_argument("a", help="results.json of run A (the baseline)")
    p.add_argument("b", nargs="?", default=None, help="results.json of run B")
    p.add_argument("--variants", nargs=2, metavar=("X", "Y"), help="compare variant Y against X of run A")
    p.add_argument("-o", "--out", default=None, help="folder for compare.json, compare.md and the plot")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=_cmd)
