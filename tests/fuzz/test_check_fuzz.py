"""Hostile results.json / thresholds files for `evalkit check`: each is bad input, exit 2 with one
named line on stderr and no traceback; valid pairs exit 0 (all hold) or 1 (some crossed)."""
from __future__ import annotations

import copy
import json
import os
import time

import pytest
import yaml

from evalkit.cli import main as cli_main

# A results.json built by hand from the README's schema (variants.<name>), no run needed.
_PAIRS = {"ppl": [12.5, 0.4], "ppl_base": [12.1, 0.4], "mean_ln_ppl_ratio": [0.03, 0.002],
          "ppl_ratio": [1.03, 0.002], "ppl_diff": [0.4, 0.03], "kld_mean": [0.05, 0.001],
          "dp_mean": [-0.002, 0.0005], "dp_rms": [0.03, 0.001], "same_top_p": [0.9, 0.01]}
_SCALARS = {"cor_ln_ppl": 0.99, "kld_max": 3.5, "kld_p99_9": 1.5, "kld_p99": 0.4, "kld_p95": 0.2,
            "kld_p90": 0.12, "kld_median": 0.02, "kld_p10": 0.003, "kld_p5": 0.002, "kld_p1": 0.0015,
            "kld_p0_1": 0.0012, "kld_min": 0.001}
_DP = {"max": 0.4, "99.9": 0.2, "99": 0.1, "95": 0.05, "90": 0.03, "75": 0.01, "50": 0.0,
       "25": -0.01, "10": -0.03, "5": -0.05, "1": -0.1, "0.1": -0.2, "min": -0.5}


def _variant(scale: float) -> dict:
    v = {k: [a * scale, e] for k, (a, e) in _PAIRS.items()}
    v.update({k: x * scale for k, x in _SCALARS.items()})
    v.update({"dp_percentiles": dict(_DP), "model": "m.gguf", "sha256": "0" * 64, "size_bytes": 10**8,
              "bpw": 4.5, "tokens_per_s": 300.0, "n_tokens": 10230})
    return v


RESULTS = {"evalkit_version": "0", "n_ctx": 512, "n_chunks": 40,
           "base": {"ppl": [12.1, 0.4], "n_tokens": 10230},
           "variants": {"IQ4_K": _variant(1.0), "IQ2_K": _variant(8.0)}, "wall_time_s": 1.0}
THRESHOLDS = {"variants": {"IQ4_K*": {"kld_mean": 0.1, "kld_p99": 0.6, "same_top_p_min": 0.8,
                                      "kld_min": {"min": 0.0}, "kld_max": {"max": 5.0}},
                           "IQ2_K*": {"kld_mean": 0.8, "ppl_ratio": {"min": 1.0, "max": 9.0}}}}


def _results_with(edit):
    def make(tmp):
        r = copy.deepcopy(RESULTS)
        edit(r)
        return json.dumps(r)
    return make


def _set_metric(metric, value, variant="IQ4_K"):
    def edit(r):
        r["variants"][variant][metric] = value
    return _results_with(edit)


def _thresholds_with(limits: dict, pattern: str = "IQ4_K*"):
    return lambda tmp: yaml.safe_dump({"variants": {pattern: limits}})


def _raw(text):
    return lambda tmp: text


def _fifo(tmp):
    p = tmp / "fifo"
    os.mkfifo(p)
    return p


def _directory(tmp):
    p = tmp / "dir.json"
    p.mkdir()
    return p


# (case id, results maker, thresholds maker, fragment of the message). A maker returns the
# file's text (written to a file), a Path (used as is), or None (the good file).
BAD_RESULTS = [
    ("missing", lambda tmp: tmp / "none.json", None, "cannot read"),
    ("directory", _directory, None, "is a directory"),
    ("fifo", _fifo, None, "is empty"),
    ("empty", _raw(""), None, "is empty"),
    ("truncated", lambda tmp: json.dumps(RESULTS)[:200], None, "not valid JSON"),
    ("not-utf8", lambda tmp: b"\xff\xfe\x00{" + bytes(range(128, 256)), None, "not valid JSON"),
    ("deep-nesting", _raw("[" * 200000 + "]" * 200000), None, "not valid JSON"),
    ("top-list", _raw("[1, 2]"), None, "no 'variants' mapping"),
    ("top-string", _raw('"variants"'), None, "no 'variants' mapping"),
    ("no-variants", _raw('{"base": {}}'), None, "no 'variants' mapping"),
    ("variants-list", _raw('{"variants": [1]}'), None, "no 'variants' mapping"),
    ("variant-list", _results_with(lambda r: r["variants"].update(IQ4_K=[0.05])), None, "not a mapping"),
    ("variant-null", _results_with(lambda r: r["variants"].update(IQ4_K=None)), None, "not a mapping"),
    ("value-nan", _set_metric("kld_mean", [float("nan"), 0.001]), None, "kld_mean: is nan"),
    ("value-inf", _set_metric("kld_mean", [float("inf"), 0.001]), None, "kld_mean: is inf"),
    ("value-neg-inf", _set_metric("same_top_p", [float("-inf"), 0.1]), None, "same_top_p: is -inf"),
    ("scalar-nan", _set_metric("kld_p99", float("nan")), None, "kld_p99: is nan"),
    ("huge-int", lambda tmp: json.dumps(RESULTS).replace('"kld_p99": 0.4', '"kld_p99": 1' + "0" * 400),
     None, "kld_p99: is 1000"),
    ("value-string", _set_metric("kld_mean", ["0.05", 0.001]), None, "kld_mean: expected a [value, err] pair"),
    ("pair-as-scalar", _set_metric("kld_mean", 0.05), None, "kld_mean: expected a [value, err] pair"),
    ("pair-of-three", _set_metric("kld_mean", [0.05, 0.0, 1.0]), None, "kld_mean: expected a [value, err]"),
    ("pair-bool", _set_metric("kld_mean", [True, 0.001]), None, "kld_mean: expected a [value, err]"),
    ("err-string", _set_metric("ppl", [12.5, "x"]), None, "ppl: expected a [value, err]"),
    ("scalar-as-pair", _set_metric("kld_max", [3.5, 0.1]), None, "kld_max: expected a number"),
    ("scalar-null", _set_metric("kld_max", None), None, "kld_max: expected a number"),
    ("scalar-bool", _set_metric("kld_p99", False), None, "kld_p99: expected a number"),
    ("scalar-dict", _set_metric("kld_p99", {"v": 1}), None, "kld_p99: expected a number"),
    ("dp-list", _set_metric("dp_percentiles", [0.1, 0.2]), None, "dp_percentiles: expected a mapping"),
    ("dp-string", _set_metric("dp_percentiles", {"99": "0.1"}), None, "dp_percentiles: expected a mapping"),
    ("gated-missing", _results_with(lambda r: r["variants"]["IQ4_K"].pop("kld_p99")), None,
     "variant 'IQ4_K': kld_p99: missing"),
    ("gated-null", _set_metric("tokens_per_s", None), _thresholds_with({"tokens_per_s_min": 10}),
     "tokens_per_s: has no value"),
    ("other-variant-bad", _set_metric("kld_p99", "high", variant="IQ2_K"), None,
     "variant 'IQ2_K': kld_p99: expected a number"),
]

BAD_THRESHOLDS = [
    ("t-missing", None, lambda tmp: tmp / "none.yaml", "cannot read"),
    ("t-directory", None, _directory, "is a directory"),
    ("t-empty", None, _raw(""), "is empty"),
    ("t-malformed", None, _raw("variants: [\n"), "malformed YAML at line"),
    ("t-tabs", None, _raw("variants:\n\t'IQ4_K': {kld_mean: 0.1}\n"), "malformed YAML"),
    ("t-not-utf8", None, _raw(b"variants:\n  \xff\xfe: 1\n"), "malformed YAML"),
    ("t-python-tag", None, _raw("variants: !!python/object:os.system {}\n"), "malformed YAML"),
    ("t-huge", None, _raw("# " + "x" * (2 << 20) + "\n"), "larger than"),
    ("t-list", None, _raw("- variants\n"), "expected a mapping with a 'variants' mapping"),
    ("t-variants-list", None, _raw("variants: [a, b]\n"), "expected a mapping with a 'variants'"),
    ("t-extra-key", None, _raw("variants: {'*': {kld_mean: 1}}\nvarients: {}\n"), "unknown key(s)"),
    ("t-variants-empty", None, _raw("variants: {}\n"), "'variants' is empty"),
    ("t-pattern-number", None, _raw("variants: {'IQ4_K*': 0.1}\n"), "'IQ4_K*': thresholds must be"),
    ("t-pattern-empty", None, _raw("variants: {'IQ4_K*': {}}\n"), "'IQ4_K*': thresholds must be"),
    ("t-bound-string", None, _thresholds_with({"kld_mean": "low"}), "kld_mean: bound must be a number"),
    ("t-bound-nan", None, _raw("variants: {'IQ4_K*': {kld_mean: .nan}}\n"), "kld_mean: bound must be finite"),
    ("t-bound-inf", None, _raw("variants: {'IQ4_K*': {kld_mean: .inf}}\n"), "kld_mean: bound must be finite"),
    ("t-bound-nan-string", None, _thresholds_with({"kld_mean": "nan"}), "kld_mean: bound must be finite"),
    ("t-bound-bool", None, _raw("variants: {'IQ4_K*': {kld_mean: true}}\n"), "kld_mean: bound must be a number"),
    ("t-bound-list", None, _thresholds_with({"kld_mean": [0.1]}), "kld_mean: bound must be a number"),
    ("t-bound-null", None, _raw("variants: {'IQ4_K*': {kld_mean: }}\n"), "kld_mean: bound must be a number"),
    ("t-unknown-metric", None, _thresholds_with({"kld_meen": 0.1}), "unknown metric 'kld_meen'"),
    ("t-unknown-lower", None, _thresholds_with({"kld_meen_min": 0.1}), "unknown metric 'kld_meen'"),
    ("t-unknown-unmatched", None, lambda tmp: yaml.safe_dump({"variants": {
        "IQ4_K*": {"kld_mean": 0.1}, "Q9*": {"kdl_p99": 0.1}}}), "unknown metric 'kdl_p99'"),
    ("t-non-string-metric", None, _raw("variants: {'IQ4_K*': {1: 0.1}}\n"), "unknown metric '1'"),
    ("t-ambiguous-kld-min", None, _thresholds_with({"kld_min": 0.5}), "'kld_min: 0.5' is ambiguous"),
    ("t-mapping-nan", None, _raw("variants: {'IQ4_K*': {kld_min: {min: .nan}}}\n"),
     "kld_min.min: bound must be finite"),
    ("t-mapping-bool", None, _raw("variants: {'IQ4_K*': {kld_max: {max: yes}}}\n"),
     "kld_max.max: bound must be a number"),
    ("t-mapping-unknown-key", None, _thresholds_with({"kld_min": {"mix": 0.0}}), "unknown: mix"),
    ("t-mapping-empty", None, _thresholds_with({"kld_min": {}}), "keys 'min' and/or 'max'"),
    ("t-mapping-min-gt-max", None, _thresholds_with({"ppl_ratio": {"min": 2.0, "max": 1.0}}), "no value could pass"),
    ("t-mapping-suffixed", None, _thresholds_with({"same_top_p_min": {"min": 0.8}}), "own name: same_top_p"),
    ("t-mapping-unknown-metric", None, _thresholds_with({"kld_meen": {"max": 1}}), "unknown metric 'kld_meen'"),
    ("t-percentiles", None, _thresholds_with({"dp_percentiles": 0.1}), "dp_percentiles is a mapping"),
    ("t-no-match", None, _thresholds_with({"kld_mean": 0.1}, pattern="Q9_*"), "no pattern matches"),
]


def _materialize(tmp, maker, name, default):
    if maker is None:
        maker = default
    value = maker(tmp)
    if isinstance(value, os.PathLike):
        return str(value)
    p = tmp / name
    p.write_bytes(value if isinstance(value, bytes) else value.encode())
    return str(p)


def _run(tmp, results_maker, thresholds_maker, capsys):
    r = _materialize(tmp, results_maker, "results.json", lambda t: json.dumps(RESULTS))
    t = _materialize(tmp, thresholds_maker, "thresholds.yaml", lambda t: yaml.safe_dump(THRESHOLDS))
    t0 = time.perf_counter()
    code = cli_main(["check", r, "--thresholds", t])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return code, out, err, elapsed, r, t


@pytest.mark.parametrize("case, results_maker, thresholds_maker, fragment",
                         BAD_RESULTS + BAD_THRESHOLDS, ids=[c[0] for c in BAD_RESULTS + BAD_THRESHOLDS])
def test_bad_input_exits_2_with_one_named_line(tmp_path, capsys, case, results_maker, thresholds_maker,
                                               fragment):
    code, out, err, elapsed, r, t = _run(tmp_path, results_maker, thresholds_maker, capsys)
    assert code == 2, (case, out, err)
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evalkit check: error: "), err
    bad_file = t if case.startswith("t-") else r
    assert bad_file in lines[0], (bad_file, err)  # names the file at fault
    assert fragment in lines[0], (fragment, err)
    assert elapsed < 2.0


def test_case_counts():
    assert len(BAD_RESULTS) >= 30 and len(BAD_THRESHOLDS) >= 30


def _check(tmp_path, capsys, thresholds: dict, results: dict | None = None):
    r = tmp_path / "results.json"
    r.write_text(json.dumps(RESULTS if results is None else results))
    t = tmp_path / "thresholds.yaml"
    t.write_text(yaml.safe_dump(thresholds))
    code = cli_main(["check", str(r), "--thresholds", str(t)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_good_pair_holds_and_crosses(tmp_path, capsys):
    code, out, err = _check(tmp_path, capsys, THRESHOLDS)
    assert code == 0 and err == "" and "FAIL" not in out and "8 of 8 thresholds hold" in out
    strict = copy.deepcopy(THRESHOLDS)
    strict["variants"]["IQ2_K*"]["kld_mean"] = 0.1
    code, out, err = _check(tmp_path, capsys, strict)
    assert code == 1 and err == "" and "| IQ2_K | kld_mean | 0.4 | <= 0.1 | FAIL |" in out
    assert "7 of 8 thresholds hold; 1 crossed" in out


@pytest.mark.parametrize("bound, expected", [
    ({"kld_min": {"min": 0.0}}, 0), ({"kld_min": {"min": 0.002}}, 1),
    ({"kld_min": {"max": 0.01}}, 0), ({"kld_min": {"max": 0.0005}}, 1),
    ({"kld_min": {"min": 0.0005, "max": 0.002}}, 0), ({"kld_min": {"min": 0.0015, "max": 0.002}}, 1),
    ({"kld_min_min": 0.0}, 0), ({"kld_min_min": 0.002}, 1),          # old lower-bound shorthand
    ({"kld_max": 5.0}, 0), ({"kld_max": 3.0}, 1),                    # old upper-bound shorthand
    ({"kld_max": {"min": 3.0}}, 0), ({"kld_max": {"min": 4.0}}, 1),
])
def test_kld_min_and_kld_max_gate_both_ways(tmp_path, capsys, bound, expected):
    code, out, err = _check(tmp_path, capsys, {"variants": {"IQ4_K": bound}})
    assert (code, err) == (expected, "")
    assert ("FAIL" in out) == (expected == 1)
    key = next(iter(bound))
    metric = "kld_min" if key == "kld_min_min" else key
    assert f"| IQ4_K | {metric} |" in out


def test_nan_errors_and_null_speed_are_valid_when_not_gated(tmp_path, capsys):
    # The reference prints nan for some uncertainties (e.g. dp_rms's when it is 0), and
    # tokens_per_s is null when a pass took no measurable time: valid results.json content.
    r = copy.deepcopy(RESULTS)
    r["variants"]["IQ4_K"].update(dp_rms=[0.0, float("nan")], cor_ln_ppl=float("nan"), tokens_per_s=None)
    code, out, err = _check(tmp_path, capsys, {"variants": {"IQ4_K": {"dp_rms": 0.1, "kld_mean": "1e-1"}}}, r)
    assert (code, err) == (0, "")
