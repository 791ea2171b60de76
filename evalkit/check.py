"""`evalkit check`: gate a results.json on per-variant metric thresholds (for CI).

Thresholds file::

    variants:
      "IQ4_K*": {kld_mean: 0.1, kld_p99: 0.6, same_top_p_min: 0.8,
                 kld_min: {min: 0.0}, kld_max: {max: 5.0}, ppl_ratio: {min: 0.99, max: 1.1}}

Patterns are shell globs over variant names; every variant a pattern matches is checked.
A pattern that matches no variant of this run is noted (a thresholds file may cover more
variants than one run evaluates), but if no pattern matches any variant the check is bad
input, since it would gate nothing.

Bounds, per metric of the README's results.json schema (the value of a [value, err]
pair is compared, never its err):

* ``metric: {max: X}``, ``{min: Y}`` or ``{min: Y, max: X}``: upper and/or lower bound.
  Always unambiguous, for every metric.
* ``metric: X``: an upper bound (shorthand); ``metric_min: Y``: a lower bound (shorthand).
  Since ``kld_min`` is itself a metric, ``kld_min: X`` could mean either and is refused:
  write ``kld_min: {max: X}`` or ``kld_min: {min: X}`` (``kld_min_min: Y`` still works).

A bound is a finite number (a numeric string such as YAML 1.1's ``1e-3`` is accepted;
booleans, NaN and Inf are not).

Exit status: 0 every bound holds, 1 any bound is crossed, 2 bad input: an unreadable,
non-regular or malformed file, a structure that is not the documented one, an unknown
metric, a bound that is not a finite number, a checked result that is not a finite number
or not of its documented type, or no pattern matching any variant. Bad input is one line on
stderr naming the file, the pattern or variant, the metric and the problem.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import stat
from dataclasses import dataclass

import yaml
from evalkit.errors import EvalkitError

__all__ = ["CheckError", "CheckRow", "PAIR_METRICS", "SCALAR_METRICS", "check_results",
           "format_table", "main"]

# The README's results.json schema, variants.<name>: [value, err] pairs and scalars.
PAIR_METRICS = ("ppl", "ppl_base", "mean_ln_ppl_ratio", "ppl_ratio", "ppl_diff", "kld_mean",
                "dp_mean", "dp_rms", "same_top_p")
SCALAR_METRICS = ("cor_ln_ppl", "kld_max", "kld_p99_9", "kld_p99", "kld_p95", "kld_p90",
                  "kld_median", "kld_p10", "kld_p5", "kld_p1", "kld_p0_1", "kld_min",
                  "bpw", "size_bytes", "tokens_per_s", "n_tokens")
_MAPPINGS = ("dp_percentiles",)
_NULLABLE = ("tokens_per_s",)  # null when a pass took no measurable time
# Real files are a few hundred KiB at most; the caps keep /dev/zero and the like bounded.
_MAX_RESULTS_BYTES = 16 << 20
_MAX_THRESHOLDS_BYTES = 1 << 20


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


# --------------------------------------------------------------------------
# reading the two files
# --------------------------------------------------------------------------

def _read_bytes(path: str, limit: int) -> bytes:
    """The file's bytes; named errors for unreadable, directory, empty or oversized files."""
    try:
        # O_NONBLOCK: opening a FIFO that has no writer must not hang a CI job; reads
        # block again afterwards, so a pipe with a writer (``<(cat f)``) still works.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise CheckError(f"{path}: is a directory, not a file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise CheckError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if not data:
        raise CheckError(f"{path}: is empty")
    if len(data) > limit:
        raise CheckError(f"{path}: larger than {limit >> 20} MiB: not an evalkit file")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error (str(e) spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"malformed YAML{where}: {problem}"


def _load_yaml(path: str) -> dict:
    """The thresholds file: a mapping whose only key is a 'variants' mapping."""
    raw = _read_bytes(path, _MAX_THRESHOLDS_BYTES)
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise CheckError(f"{path}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise CheckError(f"{path}: malformed YAML: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise CheckError(f"{path}: expected a mapping with a 'variants' mapping of pattern -> thresholds")
    extra = set(map(str, data)) - {"variants"}
    if extra:
        raise CheckError(f"{path}: unknown key(s) {sorted(extra)}; valid keys: variants")
    if not data["variants"]:
        raise CheckError(f"{path}: 'variants' is empty: nothing would be checked")
    return data


def _load_results(path: str) -> dict:
    """The results file: a JSON mapping with a 'variants' mapping of name -> mapping."""
    raw = _read_bytes(path, _MAX_RESULTS_BYTES)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise CheckError(f"{path}: not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise CheckError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise CheckError(f"{path}: not an evalkit results.json (no 'variants' mapping)")
    return data


# --------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bound_number(v, where: str) -> float:
    """A threshold: a finite number or numeric string (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise CheckError(f"{where}: bound must be a number, got {v!r}")
    try:
        x = float(v)
    except (ValueError, OverflowError):
        raise CheckError(f"{where}: bound must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise CheckError(f"{where}: bound must be finite, got {v!r}")
    return x


def _type_problem(metric: str, v) -> str | None:
    """Why ``v`` is not of the documented type of ``metric`` (None when it is)."""
    if metric in PAIR_METRICS:
        ok = isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v)
        return None if ok else f"expected a [value, err] pair of numbers, got {v!r:.80}"
    if metric in SCALAR_METRICS:
        ok = _is_number(v) or (v is None and metric in _NULLABLE)
        return None if ok else f"expected a number, got {v!r:.80}"
    if metric in _MAPPINGS:
        ok = isinstance(v, dict) and all(_is_number(x) for x in v.values())
        return None if ok else f"expected a mapping of percentile -> number, got {v!r:.80}"
    return None


def _check_variant_types(results: dict, results_name: str) -> None:
    """Every variant is a mapping and every documented metric it has is of its documented type."""
    for name, stats in results["variants"].items():
        if not isinstance(stats, dict):
            raise CheckError(f"{results_name}: variant {name!r} is not a mapping of metrics")
        for metric in (*PAIR_METRICS, *SCALAR_METRICS, *_MAPPINGS):
            if metric in stats:
                problem = _type_problem(metric, stats[metric])
                if problem:
                    raise CheckError(f"{results_name}: variant {name!r}: {metric}: {problem}")


def _metric_value(stats: dict, name: str, metric: str, results_name: str) -> float:
    """The compared value of a metric (a pair's value); finite, else bad input."""
    where = f"{results_name}: variant {name!r}: {metric}"
    if metric not in stats:
        raise CheckError(f"{where}: missing (the thresholds bound it)")
    v = stats[metric]
    if isinstance(v, list) and len(v) == 2 and metric not in SCALAR_METRICS:
        v = v[0]
    if v is None:
        raise CheckError(f"{where}: has no value (null)")
    if not _is_number(v):
        raise CheckError(f"{where}: expected a number or a [value, err] pair, got {v!r:.80}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise CheckError(f"{where}: is {v!r:.40}, not a finite number: it cannot be compared with a bound")
    return x


# --------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------

def _known_metrics(results: dict) -> set[str]:
    """Gateable names: the schema's, plus numeric entries a newer results.json may add."""
    known = set(PAIR_METRICS) | set(SCALAR_METRICS)
    for stats in results["variants"].values():
        for k, v in stats.items():
            if k in _MAPPINGS:
                continue
            if _is_number(v) or (isinstance(v, list) and len(v) == 2 and all(map(_is_number, v))):
                known.add(k)
    return known


def _parse_bounds(key, spec, known: set[str], where: str) -> list[tuple[str, str, float]]:
    """One threshold entry -> [(metric, "<=" or ">=", threshold)]."""
    name = key if isinstance(key, str) else None
    if isinstance(spec, dict):
        if name not in known:
            if name is not None and name.endswith("_min") and name[:-4] in known:
                raise CheckError(f"{where}: {_show(key)}: a bound mapping goes under the metric's "
                                 f"own name: {name[:-4]}: {{min: ...}}")
            raise CheckError(_unknown(key, known, where))
        extra = [_show(k) for k in spec if k not in ("min", "max")]
        if not spec or extra:
            raise CheckError(f"{where}: {name}: a bound mapping has the keys 'min' and/or 'max'"
                             + (f"; unknown: {', '.join(extra)}" if extra else ""))
        out = [(name, "<=" if k == "max" else ">=", _bound_number(v, f"{where}: {name}.{k}"))
               for k, v in spec.items()]
        lo, hi = spec.get("min"), spec.get("max")
        if lo is not None and hi is not None and float(lo) > float(hi):
            raise CheckError(f"{where}: {name}: min {lo!r} > max {hi!r}: no value could pass")
        return out
    if name in known and name.endswith("_min"):
        raise CheckError(f"{where}: '{name}: {spec!r:.40}' is ambiguous ({name} is a metric, and a "
                         f"name ending in _min is a lower bound): write {name}: {{max: ...}} "
                         f"or {name}: {{min: ...}}")
    if name in known:
        return [(name, "<=", _bound_number(spec, f"{where}: {name}"))]
    if name is not None and name.endswith("_min") and name[:-4] in known:
        return [(name[:-4], ">=", _bound_number(spec, f"{where}: {name}"))]
    raise CheckError(_unknown(key, known, where))


def _show(x) -> str:
    """A user-supplied name for a one-line message (repr when it is not plain text)."""
    s = str(x)
    return s if s.isprintable() and s.strip() == s and s else repr(s)


def _unknown(key, known: set[str], where: str) -> str:
    if key in _MAPPINGS:
        return f"{where}: {key} is a mapping of percentiles, not a metric with one value"
    base = str(key)[:-4] if str(key).endswith("_min") else str(key)
    return (f"{where}: unknown metric {base!r}; metrics: {', '.join(sorted(known))} "
            f"(a bound is 'metric: {{max: X}}', 'metric: {{min: Y}}', 'metric: X' or 'metric_min: Y')")


def _parse_thresholds(thresholds: dict, known: set[str], thresholds_name: str) -> list[tuple]:
    """Every pattern's bounds, checked up front (a typo fails even where nothing matches)."""
    parsed = []
    for pattern, limits in thresholds["variants"].items():
        where = f"{thresholds_name}: {str(pattern)!r}"
        if not isinstance(limits, dict) or not limits:
            raise CheckError(f"{where}: thresholds must be a non-empty mapping of metric -> bound")
        bounds = [b for key, spec in limits.items() for b in _parse_bounds(key, spec, known, where)]
        parsed.append((str(pattern), bounds))
    return parsed


def check_results(results: dict, thresholds: dict, results_name: str = "results",
                  thresholds_name: str = "thresholds", unmatched: list[str] | None = None) -> list[CheckRow]:
    """Compare every matched variant's metrics with the thresholds; returns one row per check.

    Patterns that match no variant are appended to ``unmatched``; if no pattern matches
    anything, or either input is malformed, :class:`CheckError` is raised.
    """
    if not isinstance(results, dict) or not isinstance(results.get("variants"), dict):
        raise CheckError(f"{results_name}: not an evalkit results.json (no 'variants' mapping)")
    if not isinstance(thresholds, dict) or not isinstance(thresholds.get("variants"), dict):
        raise CheckError(f"{thresholds_name}: expected a mapping with a 'variants' mapping")
    _check_variant_types(results, results_name)
    variants = results["variants"]
    missing = [] if unmatched is None else unmatched
    rows: list[CheckRow] = []
    for pattern, bounds in _parse_thresholds(thresholds, _known_metrics(results), thresholds_name):
        matched = [n for n in variants if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            missing.append(pattern)
        for name in matched:
            for metric, op, thr in bounds:
                value = _metric_value(variants[name], name, metric, results_name)
                ok = value <= thr if op == "<=" else value >= thr
                rows.append(CheckRow(name, metric, op, thr, value, ok))
    if not rows:
        raise CheckError(f"{thresholds_name}: no pattern matches a variant of {results_name} "
                         f"(variants: {', '.join(map(repr, variants)) or 'none'}): nothing would be checked")
    return rows


def format_table(rows: list[CheckRow]) -> str:
    """A markdown table of every check."""
    out = ["| variant | metric | value | bound | result |", "|---|---|---:|---|---|"]
    for r in rows:
        out.append(f"| {r.variant} | {r.metric} | {r.value:.6g} | {r.bound} {r.threshold:.6g} | "
                   f"{'ok' if r.ok else 'FAIL'} |")
    return "\n".join(out)


def baseline_rows(results_path: str, baseline_path: str, tolerance: float) -> list[CheckRow]:
    """One row per variant in both runs: the candidate's mean KLD may exceed the baseline's by
    at most ``tolerance`` (relative) unless the rise is within noise. On the same tokens the
    test is paired (block bootstrap over chunks); on different chunks, unpaired."""
    from evalkit.compare import CompareError, diff_tables, diff_unpaired, load_run_tokens

    try:
        rb, tb = load_run_tokens(baseline_path)
        rc, tc = load_run_tokens(results_path)
    except CompareError as e:
        raise CheckError(str(e)) from None
    same = all(rb.get(k) == rc.get(k) for k in ("corpus_sha256", "n_ctx", "n_chunks"))
    rows = []
    for v in [v for v in rc.get("variants", {}) if v in rb.get("variants", {})]:
        a, b = tb[tb["variant"] == v], tc[tc["variant"] == v]
        try:
            d = (diff_tables(a, b, f"variant {v!r}") if same else diff_unpaired(a, b))["kld_mean"]
        except CompareError:
            d = diff_unpaired(a, b)["kld_mean"]      # same corpus but other tokens: unpaired
        limit = d.a * (1.0 + tolerance)
        real = d.ci_low > 0.0 and d.p_value < 0.05
        rows.append(CheckRow(v, "kld_mean vs baseline", "<=", limit, d.b, not (d.b > limit and real)))
    if not rows:
        raise CheckError(f"{results_path} and {baseline_path} have no variant in common")
    return rows


def main(results_path: str, thresholds_path: str | None = None, baseline_path: str | None = None,
         tolerance: float = 0.05) -> int:
    """Run the checks asked for and print the table; returns the exit code (0 ok, 1 crossed,
    2 bad input). ``baseline_path``: fail where the mean KLD rose beyond ``tolerance`` and beyond noise."""
    import sys
    unmatched: list[str] = []
    rows: list[CheckRow] = []
    try:
        if thresholds_path is None and baseline_path is None:
            raise CheckError("give --thresholds FILE, --baseline RESULTS, or both")
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise CheckError(f"--tolerance must be a finite number >= 0, got {tolerance}")
        if thresholds_path is not None:
            rows += check_results(_load_results(results_path), _load_yaml(thresholds_path),
                                  results_path, thresholds_path, unmatched)
        if baseline_path is not None:
            _load_results(results_path)
            rows += baseline_rows(results_path, baseline_path, tolerance)
    except CheckError as e:
        print(f"evalkit check: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for pattern in unmatched:
        print(f"note: threshold pattern {pattern!r} matches no variant of this run")
    failed = [r for r in rows if not r.ok]
    what = "thresholds" if baseline_path is None else "checks"
    print(f"\n{len(rows) - len(failed)} of {len(rows)} {what} hold" +
          (f"; {len(failed)} crossed" if failed else ""))
    return 1 if failed else 0
