"""`evalkit check`: gate a results.json on per-variant metric thresholds (for CI).

Thresholds file::

    variants:
      "IQ4_K*": {kld_mean: 0.1, kld_p99: 0.6, mean_ln_ppl_ratio: 0.09, same_top_p_min: 0.8}

A plain metric name is an upper bound, a name ending in ``_min`` a lower bound. Patterns
are shell globs over variant names; every variant a pattern matches is checked. Exit 0
when every bound holds, 1 when any is crossed, 2 on bad input.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from evalkit.errors import EvalkitError

__all__ = ["CheckError", "CheckRow", "check_results", "format_table", "main"]


class CheckError(EvalkitError, ValueError):
    """The results or thresholds file is unusable."""


@dataclass
class CheckRow:
    variant: str
    metric: str
    bound: str        # "<=" or ">="
    threshold: float
    value: float
    ok: bool


def _read_mapping(path: str, parse, parse_error, what: str) -> dict:
    """Read and parse a file that must hold a mapping with a 'variants' mapping."""
    try:
        data = parse(Path(path).read_text())
    except OSError as e:
        raise CheckError(f"{path}: cannot read: {e.strerror}") from None
    except parse_error as e:
        raise CheckError(f"{path}: {what}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        return {}
    return data


def _load_yaml(path: str) -> dict:
    data = _read_mapping(path, yaml.safe_load, yaml.YAMLError, "malformed YAML")
    if not data:
        raise CheckError(f"{path}: expected a mapping with a 'variants' mapping of pattern -> thresholds")
    extra = set(data) - {"variants"}
    if extra:
        raise CheckError(f"{path}: unknown key(s) {sorted(extra)}; valid keys: variants")
    return data


def _load_results(path: str) -> dict:
    data = _read_mapping(path, json.loads, json.JSONDecodeError, "not valid JSON")
    if not data:
        raise CheckError(f"{path}: not an evalkit results.json (no 'variants' mapping)")
    return data


def _scalar(v) -> float:
    return float(v[0]) if isinstance(v, (list, tuple)) else float(v)


def check_results(results: dict, thresholds: dict, results_name: str = "results",
                  thresholds_name: str = "thresholds", unmatched: list[str] | None = None) -> list[CheckRow]:
    """Compare every matched variant's metrics with the thresholds; returns one row per check.

    Patterns that match no variant are appended to ``unmatched`` (a thresholds file may
    cover more variants than one run evaluates); if no pattern matches anything the check
    is an error, since it would gate nothing.
    """
    rows: list[CheckRow] = []
    missing = [] if unmatched is None else unmatched
    variants = results["variants"]
    for pattern, limits in thresholds["variants"].items():
        if not isinstance(limits, dict) or not limits:
            raise CheckError(f"{thresholds_name}: thresholds for {pattern!r} must be a non-empty mapping")
        matched = [n for n in variants if fnmatch.fnmatchcase(n, str(pattern))]
        if not matched:
            missing.append(str(pattern))
            continue
        for name in matched:
            stats = variants[name]
            for key, limit in limits.items():
                lower = key.endswith("_min")
                metric = key[:-4] if lower else key
                if metric not in stats:
                    known = sorted(k for k, v in stats.items() if isinstance(v, (int, float, list)))
                    raise CheckError(f"{thresholds_name}: unknown metric {metric!r} for {pattern!r}; "
                                     f"metrics in {results_name}: {', '.join(known)}")
                try:
                    thr = float(limit)
                    value = _scalar(stats[metric])
                except (TypeError, ValueError):
                    raise CheckError(f"{thresholds_name}: {pattern!r}.{key} is not a number: {limit!r}") from None
                ok = value >= thr if lower else value <= thr
                rows.append(CheckRow(name, metric, ">=" if lower else "<=", thr, value, ok))
    if not rows:
        raise CheckError(f"{thresholds_name}: no pattern matches a variant of {results_name} "
                         f"(variants: {', '.join(variants)}): nothing would be checked")
    return rows


def format_table(rows: list[CheckRow]) -> str:
    """A markdown table of every check."""
    out = ["| variant | metric | value | bound | result |", "|---|---|---:|---|---|"]
    for r in rows:
        out.append(f"| {r.variant} | {r.metric} | {r.value:.6g} | {r.bound} {r.threshold:.6g} | "
                   f"{'ok' if r.ok else 'FAIL'} |")
    return "\n".join(out)


def main(results_path: str, thresholds_path: str) -> int:
    """Run the check and print the table; returns the exit code (0 ok, 1 crossed, 2 bad input)."""
    import sys
    unmatched: list[str] = []
    try:
        rows = check_results(_load_results(results_path), _load_yaml(thresholds_path),
                             results_path, thresholds_path, unmatched)
    except CheckError as e:
        print(f"evalkit check: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for pattern in unmatched:
        print(f"note: threshold pattern {pattern!r} matches no variant of this run")
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} thresholds hold" +
          (f"; {len(failed)} crossed" if failed else ""))
    return 1 if failed else 0
