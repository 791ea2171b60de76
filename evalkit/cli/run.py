"""`evalkit run CONFIG` and `evalkit check RESULTS --thresholds FILE`."""
from __future__ import annotations

import argparse


def _cmd_run(args: argparse.Namespace) -> int:
    from evalkit.devices import check_device_name
    from evalkit.pipeline import run
    from evalkit.run_config import load_config

    cfg = load_config(args.config)
    if args.device is not None:
        cfg.device = check_device_name(args.device)
    if args.chunks is not None:
        cfg.chunks = args.chunks
    if args.threads is not None:
        cfg.threads = args.threads
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    out = run(cfg, progress=not args.no_progress, restart=args.restart)     # run() honours cfg.device
    print(f"\nresults written to {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from evalkit.check import main as check_main
    return check_main(args.results, args.thresholds, args.baseline, args.tolerance)


def register(sub) -> None:
    """Add the `run` and `check` subcommands."""
    from evalkit.cli import positive_int
    from evalkit.devices import DEVICE_HELP

    p = sub.add_parser("run", help="evaluate variants of a model against its base (YAML config)")
    p.add_argument("config", help="run configuration (YAML)")
    p.add_argument("--chunks", type=positive_int, default=None, help="override the config's chunk limit")
    p.add_argument("--threads", type=positive_int, default=None, help="override the config's thread count")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--restart", action="store_true", help="ignore partial results of an earlier run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help=f"override the config's device: {DEVICE_HELP}")
    p.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="gate a results.json on thresholds and/or a baseline run "
                                     "(exit 0 ok, 1 crossed, 2 bad input)")
    c.add_argument("results", help="results/<run>/results.json")
    c.add_argument("--thresholds", default=None, help="thresholds YAML")
    c.add_argument("--baseline", default=None,
                   help="results.json of a baseline run: fail where a variant's mean KLD rose beyond "
                        "--tolerance and beyond noise (paired test on the same tokens)")
    c.add_argument("--tolerance", type=float, default=0.05, help="allowed relative rise of mean KLD (0.05)")
    c.set_defaults(func=_cmd_check)
