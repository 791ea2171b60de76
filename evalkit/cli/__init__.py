"""`evalkit` command line: one module per subcommand, named errors caught once here.

Every module of this package is a subcommand: it has ``register(subparsers)``, which adds its parser and sets
``func``. Heavy imports (torch, the kernel library) stay inside the command functions, so
`evalkit --help` starts fast and works before the kernels are built. Any
:class:`~evalkit.errors.EvalkitError` (or an OS error such as an unwritable output path)
ends the command with its message on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from evalkit.errors import EvalkitError

__all__ = ["build_parser", "main", "positive_int", "subcommand_modules"]

def subcommand_modules() -> list[str]:
    """Every module of this package: each one is a subcommand (adding one is adding a module)."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def positive_int(text: str) -> int:
    """argparse type for counts (chunks, threads, ctx, batch): an integer ≥ 1, so that a
    typo like ``--chunks -1`` is refused instead of silently meaning "all"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="evalkit", description="Exact quality evaluation of quantized LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for mod_name in subcommand_modules():
        importlib.import_module(mod_name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `evalkit` command: exit 0 done, 2 bad input (message), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EvalkitError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"evalkit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evalkit {args.command}: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
