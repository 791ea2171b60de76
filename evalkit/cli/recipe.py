"""`evalkit recipe BASE --target-bpw X -o recipe.txt [--gguf OUT.gguf]`: types per tensor group under a size budget."""
from __future__ import annotations

import argparse
import math


def _bpw(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits per weight, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bits per weight, got {text!r}")
    return v


def _cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evalkit.sensitivity.config import SensitivityConfig
    from evalkit.sensitivity.workflow import make_recipe
    out = Path(args.output)
    work = Path(args.sensitivity) if args.sensitivity else out.parent / f"{out.stem}.sensitivity"
    cfg = SensitivityConfig(name=work.name, base=args.base, corpus=args.corpus, ctx=args.ctx, chunks=args.chunks,
                            threads=args.threads, batch=args.batch, types=tuple(args.types), imatrix=args.imatrix,
                            grouping=args.grouping, bands=args.bands,
                            kinds=tuple(args.kinds) if args.kinds else None, output_dir=str(work.parent))
    run = make_recipe(cfg, args.target_bpw, out, Path(args.gguf) if args.gguf else None, args.iterations,
                      args.loo, args.ftype, progress=not args.no_progress, restart=args.restart)
    r = run.result
    best = r.chosen
    print(f"\nwrote {', '.join(str(f) for f in run.files)}" + (f", {run.gguf}" if run.gguf else ""))
    print(f"recipe: {len(r.rules)} rules, {r.bpw:.4f} bpw (target ≤ {r.target_bpw:g}); calibration KLD "
          f"predicted {best.predicted:.6f}, measured {best.measured:.6f} ± {best.measured_err:.6f} "
          f"(best of {len(r.trials)} trials); --type {run.ftype}")
    return 0


def register(sub) -> None:
    """Add the `recipe` subcommand."""
    from evalkit.cli import positive_int
    from evalkit.cli.sensitivity import add_sensitivity_options
    p = sub.add_parser("recipe", help="choose a type per tensor group for a target size (bits per weight)",
                       description="Pick a type for every tensor group that minimises the predicted KLD at no more "
                                   "than the target whole-file bits per weight (a sensitivity pass first, reused "
                                   "when it matches), verify by measuring, correct, iterate; write one "
                                   "REGEX=TYPE rule per line (evalkit quantize --override / llama-quantize "
                                   "--custom-q), a summary (.md) and a record (.json) beside it.")
    p.add_argument("base", help="GGUF file, HF checkpoint folder or 'smollm2'")
    p.add_argument("--target-bpw", type=_bpw, required=True, help="bits per weight of the whole file (≤)")
    p.add_argument("-o", "--output", required=True, help="recipe file (e.g. recipe.txt)")
    p.add_argument("--gguf", default=None, help="also write the model here")
    p.add_argument("--sensitivity", default=None, metavar="DIR",
                   help="sensitivity pass folder (reused when it matches; default <output stem>.sensitivity/)")
    p.add_argument("--iterations", type=positive_int, default=3, help="verified trials at most (3)")
    p.add_argument("--loo", type=int, default=8,
                   help="groups measured in context after each trial (8; 0: verify only)")
    p.add_argument("--ftype", default="auto",
                   help="--type of the GGUF (its general.file_type; every tensor has a rule of its own): "
                        "auto (named after the type holding most weights) or an ftype name")
    add_sensitivity_options(p, defaults=True)
    p.set_defaults(func=_cmd)
