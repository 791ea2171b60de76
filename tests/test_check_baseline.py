"""`evalkit check --baseline`: a rise of mean KLD fails only when beyond tolerance and noise."""
from __future__ import annotations

import pytest

from evalkit.cli import main as cli_main
from test_compare import _run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    base = _run(tmp, "base")
    wrong = _run(tmp, "wrong", variants=(("IQ4_K", "IQ3_K"), ("Q8_0", "Q8_0")))   # "IQ4_K" is IQ3_K
    chance = _run(tmp, "chance", start=40000)        # same recipes, other chunks
    return base, wrong, chance


def test_a_run_against_itself_passes(runs, capsys):
    assert cli_main(["check", str(runs[0]), "--baseline", str(runs[0])]) == 0
    assert "2 of 2 checks hold" in capsys.readouterr().out


def test_a_worse_recipe_under_the_same_name_fails(runs, capsys):
    base, wrong, _ = runs
    assert cli_main(["check", str(wrong), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "1 crossed" in out and "IQ4_K" in out


def test_a_difference_by_chance_passes(runs):
    base, _, chance = runs
    assert cli_main(["check", str(chance), "--baseline", str(base), "--tolerance", "0.05"]) == 0


def test_baseline_with_thresholds_and_bad_input(runs, tmp_path, capsys):
    base = runs[0]
    th = tmp_path / "t.yaml"
    th.write_text("variants:\n  'Q8_0': {kld_mean: {max: 1.0}}\n")
    assert cli_main(["check", str(base), "--baseline", str(base), "--thresholds", str(th)]) == 0
    assert "3 of 3 checks hold" in capsys.readouterr().out
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text(base.read_text())
    assert cli_main(["check", str(base), "--baseline", str(bare / "results.json")]) == 2
    assert "no tokens.parquet" in capsys.readouterr().err
    assert cli_main(["check", str(base)]) == 2
    assert cli_main(["check", str(base), "--baseline", str(base), "--tolerance", "nan"]) == 2
