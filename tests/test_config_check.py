"""Run configuration loading and the `evalkit check` gate."""
from __future__ import annotations

import json

import pytest
import yaml

from evalkit.check import CheckError, check_results, main as check_main
from evalkit.run_config import ConfigError, config_from_dict, load_config


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_quickstart_config_loads():
    from conftest import REPO
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.base == "smollm2" and cfg.ctx == 512
    assert [v.ftype for v in cfg.variants] == ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K"]


def test_unknown_top_level_key_names_key_and_valid_ones(tmp_path):
    p = _write(tmp_path, "c.yaml", "name: x\nctxx: 512\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ctxx'; valid keys: name, base, corpus, ctx"):
        load_config(p)


def test_unknown_variant_key(tmp_path):
    p = _write(tmp_path, "c.yaml", "name: x\nvariants:\n  - {name: a, ftype: IQ4_K, imatirx: f}\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]: unknown key 'imatirx'"):
        load_config(p)


def test_malformed_yaml(tmp_path):
    p = _write(tmp_path, "c.yaml", "name: x\nvariants: [\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("variant, message", [
    ({"name": "a", "ftype": "IQ9_K"}, "unknown ftype 'IQ9_K'"),
    ({"name": "a", "ftype": "IQ4_K", "ffn_down_type": "Q9_K"}, "unknown quantization type 'Q9_K'"),
    ({"name": "a", "ftype": "IQ4_K", "overrides": ["ffn_down=IQ7_K"]}, "unknown quantization type 'IQ7_K'"),
    ({"name": "a"}, "exactly one of 'gguf'"),
    ({"name": "a", "gguf": "x.gguf", "ftype": "IQ4_K"}, "exactly one of 'gguf'"),
    ({"name": "a", "gguf": "x.gguf", "imatrix": "m"}, "apply to an 'ftype' recipe"),
    ({"name": "a", "ftype": "IQ4_K", "overrides": "bad"}, "'overrides' must be"),
])
def test_bad_variants(variant, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"name": "x", "variants": [variant]})


def test_overrides_mapping_and_duplicates():
    cfg = config_from_dict({"name": "x", "variants": [
        {"name": "a", "ftype": "IQ4_K", "overrides": {"ffn_down": "IQ6_K"}}]})
    assert cfg.variants[0].type_options().overrides == (("ffn_down", "IQ6_K"),)
    with pytest.raises(ConfigError, match="duplicate variant names"):
        config_from_dict({"name": "x", "variants": [{"ftype": "IQ4_K"}, {"ftype": "IQ4_K"}]})


def test_type_errors():
    with pytest.raises(ConfigError, match="'ctx' must be int"):
        config_from_dict({"name": "x", "ctx": "512"})
    with pytest.raises(ConfigError, match="'name'"):
        config_from_dict({"ctx": 512})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config_from_dict(["a"])


RESULTS = {"variants": {
    "IQ4_K": {"kld_mean": [0.05, 0.001], "kld_p99": 0.4, "mean_ln_ppl_ratio": [0.03, 0.002],
              "same_top_p": [0.9, 0.01]},
    "IQ2_K": {"kld_mean": [0.5, 0.01], "kld_p99": 3.0, "mean_ln_ppl_ratio": [0.4, 0.01],
              "same_top_p": [0.6, 0.01]}}}


def test_check_rows_bounds():
    rows = check_results(RESULTS, {"variants": {"IQ4_K*": {"kld_mean": 0.1, "same_top_p_min": 0.95}}})
    assert [(r.metric, r.bound, r.ok) for r in rows] == [("kld_mean", "<=", True), ("same_top_p", ">=", False)]


def test_check_exit_codes(tmp_path, capsys):
    from conftest import REPO
    res = _write(tmp_path, "results.json", json.dumps(RESULTS))
    # the committed thresholds pass on results that respect them (unmatched patterns are noted)
    assert check_main(str(res), str(REPO / "configs" / "thresholds.yaml")) == 0
    assert "matches no variant" in capsys.readouterr().out
    nothing = _write(tmp_path, "nothing.yaml", yaml.safe_dump({"variants": {"Q9*": {"kld_mean": 0.1}}}))
    assert check_main(str(res), str(nothing)) == 2
    good = _write(tmp_path, "good.yaml", yaml.safe_dump({"variants": {"IQ4_K*": {"kld_mean": 0.1}}}))
    assert check_main(str(res), str(good)) == 0
    strict = _write(tmp_path, "strict.yaml", yaml.safe_dump({"variants": {"IQ4_K*": {"kld_mean": 0.01}}}))
    assert check_main(str(res), str(strict)) == 1
    assert "FAIL" in capsys.readouterr().out
    bad = _write(tmp_path, "bad.yaml", yaml.safe_dump({"variants": {"IQ4_K": {"kld_meen": 0.1}}}))
    assert check_main(str(res), str(bad)) == 2
    assert "unknown metric 'kld_meen'" in capsys.readouterr().err
    assert check_main(str(tmp_path / "none.json"), str(good)) == 2
    assert check_main(str(_write(tmp_path, "x.json", "{")), str(good)) == 2


RESULTS_KLD = {"variants": {"IQ4_K": {"kld_mean": [0.05, 0.001], "kld_min": 0.001, "kld_max": 3.5,
                                      "same_top_p": [0.9, float("nan")]}}}


@pytest.mark.parametrize("bounds, rows", [
    ({"kld_min": {"min": 0.0}}, [("kld_min", ">=", True)]),
    ({"kld_min": {"min": 0.01}}, [("kld_min", ">=", False)]),
    ({"kld_min": {"max": 0.01}}, [("kld_min", "<=", True)]),
    ({"kld_min": {"min": 0.0, "max": 0.0005}}, [("kld_min", ">=", True), ("kld_min", "<=", False)]),
    ({"kld_min_min": 0.0}, [("kld_min", ">=", True)]),           # the old lower-bound shorthand
    ({"kld_max": 5.0, "kld_max_min": 4.0}, [("kld_max", "<=", True), ("kld_max", ">=", False)]),
    ({"kld_mean": {"max": 0.1}, "same_top_p": {"min": 0.8}}, [("kld_mean", "<=", True), ("same_top_p", ">=", True)]),
    ({"kld_mean": "1e-1"}, [("kld_mean", "<=", True)]),           # YAML 1.1 reads 1e-1 as a string
    ({"same_top_p": 0.1}, [("same_top_p", "<=", False)]),         # a nan err is valid: only the value is compared
])
def test_check_bound_syntax(bounds, rows):
    got = check_results(RESULTS_KLD, {"variants": {"IQ4_K": bounds}})
    assert [(r.metric, r.bound, r.ok) for r in got] == rows


@pytest.mark.parametrize("bounds, message", [
    ({"kld_min": 0.5}, r"thresholds: 'IQ4_K': 'kld_min: 0\.5' is ambiguous "
                       r".* kld_min: \{max: \.\.\.\} or kld_min: \{min: \.\.\.\}"),
    ({"kld_mean": True}, r"'IQ4_K': kld_mean: bound must be a number, got True"),
    ({"kld_mean": float("nan")}, r"'IQ4_K': kld_mean: bound must be finite"),
    ({"kld_min": {"min": 1, "max": 0}}, r"kld_min: min 1 > max 0"),
    ({"kld_min": {"above": 1}}, r"kld_min: a bound mapping has the keys 'min' and/or 'max'; unknown: above"),
])
def test_check_bad_bounds(bounds, message):
    with pytest.raises(CheckError, match=message):
        check_results(RESULTS_KLD, {"variants": {"IQ4_K": bounds}})


def test_check_bad_results_values():
    bad = json.loads(json.dumps(RESULTS_KLD))
    bad["variants"]["IQ4_K"]["kld_mean"] = [float("nan"), 0.0]
    with pytest.raises(CheckError, match=r"results: variant 'IQ4_K': kld_mean: is nan, not a finite number"):
        check_results(bad, {"variants": {"IQ4_K": {"kld_mean": 0.1}}})
    bad["variants"]["IQ4_K"]["kld_max"] = [3.5, 0.1]  # a scalar metric given as a pair
    with pytest.raises(CheckError, match=r"variant 'IQ4_K': kld_max: expected a number"):
        check_results(bad, {"variants": {"IQ4_K": {"kld_min": {"min": 0}}}})
    with pytest.raises(CheckError, match=r"unknown metric 'kdl_p99'"):  # even where nothing matches
        check_results(RESULTS_KLD, {"variants": {"IQ4_K": {"kld_mean": 0.1}, "Q9*": {"kdl_p99": 1}}})


def test_check_main_bad_input_is_one_line(tmp_path, capsys):
    res = _write(tmp_path, "results.json", '{"variants": {"IQ4_K": {"kld_mean": [NaN, 0.1]}}}')
    thr = _write(tmp_path, "t.yaml", "variants: {IQ4_K: {kld_mean: 0.1}}\n")
    assert check_main(str(res), str(thr)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{res}: variant 'IQ4_K': kld_mean: is nan" in err
    assert check_main(str(res), str(_write(tmp_path, "m.yaml", "variants: [\n"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m.yaml: malformed YAML at line 2, column 1" in err
