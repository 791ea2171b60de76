"""`evalkit sensitivity [CONFIG.yaml] [flags]`: ΔKLD of every (tensor group, type) in one loaded model."""
from __future__ import annotations

import argparse

# flag attribute -> config key, for the options `evalkit recipe` shares
_SHARED = ("corpus", "ctx", "chunks", "types", "imatrix", "grouping", "bands", "kinds", "threads", "batch")


def add_sensitivity_options(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """The calibration, candidate and grouping flags (shared with `evalkit recipe`). Without
    ``defaults`` every flag defaults to None, so that only given flags override a config file."""
    from evalkit.cli import positive_int
    from evalkit.sensitivity.config import DEFAULT_TYPES, GROUPINGS

    def d(value):
        return value if defaults else None
    p.add_argument("--corpus", default=d("wikitext-2-raw-test"),
                   help="calibration text file, or 'wikitext-2-raw-test' (bundled; the default)")
    p.add_argument("--ctx", type=positive_int, default=d(512), help="tokens per chunk (512)")
    p.add_argument("--chunks", type=positive_int, default=d(8), help="calibration chunks from the start (8)")
    p.add_argument("--types", nargs="+", default=d(list(DEFAULT_TYPES)), metavar="T",
                   help=f"candidate types (default {' '.join(DEFAULT_TYPES)}); rows that are not a multiple "
                        "of 256 fall back as llama-quantize does")
    p.add_argument("--imatrix", default=None, metavar="FILE", help="importance matrix used to quantize")
    p.add_argument("--grouping", choices=GROUPINGS, default=d("bands"),
                   help="bands: tensor kind × bands of layers (default); tensor: one group per tensor")
    p.add_argument("--bands", type=positive_int, default=d(3), help="bands of layers (3)")
    p.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                   help="only these tensor kinds (attn_q, ffn_down, token_embd, ...); the others keep their base type")
    p.add_argument("--threads", type=positive_int, default=None, help="threads (default: torch's)")
    p.add_argument("--batch", type=positive_int, default=d(2048), help="tokens per forward call (2048)")
    p.add_argument("--restart", action="store_true", help="ignore partial results of an earlier pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace):
    from evalkit.sensitivity.config import SensitivityConfig, load_sensitivity_config
    cfg = load_sensitivity_config(args.config) if args.config else SensitivityConfig()
    changes = {k: getattr(args, k) for k in _SHARED + ("base", "name", "output_dir") if getattr(args, k) is not None}
    d = {**cfg.to_dict(), **changes, "config_dir": cfg.config_dir}
    return SensitivityConfig(**d)


def _cmd(args: argparse.Namespace) -> int:
    from evalkit.sensitivity.sweep import sensitivity
    cfg = _config(args)
    res = sensitivity(cfg, progress=not args.no_progress, restart=args.restart)
    m = res.meta
    print(f"\n{len(res.groups)} groups, {m['n_measurements']} measurements on {m['n_chunks']} chunks of "
          f"{m['n_ctx']} in {m['wall_time_s']:.0f} s; results written to {res.path}")
    return 0


def register(sub) -> None:
    """Add the `sensitivity` subcommand."""
    p = sub.add_parser("sensitivity", help="ΔKLD of every (tensor group, type), swapped in one loaded model",
                       description="Measure, for every tensor group and candidate type, the KLD against the base "
                                   "of the model with only that group in that type: the group's weights are "
                                   "swapped in the loaded model (no GGUF written, no reload). Flags override "
                                   "the YAML config's keys.")
    p.add_argument("config", nargs="?", default=None, help="sensitivity configuration (YAML; optional)")
    p.add_argument("--base", default=None, help="GGUF file, HF checkpoint folder or 'smollm2' (default)")
    p.add_argument("--name", default=None, help="results go to OUTPUT_DIR/NAME/ (default 'sensitivity')")
    p.add_argument("--output-dir", default=None, help="default 'results'")
    add_sensitivity_options(p)
    p.set_defaults(func=_cmd)
