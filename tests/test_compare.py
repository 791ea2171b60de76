"""`evalkit compare`: paired differences on the same tokens, against a direct computation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import GOLDEN, SHARED
from evalkit.cli import main as cli_main
from evalkit.compare import CompareError, compare_runs, compare_variants
from evalkit.pipeline import run
from evalkit.run_config import config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def _run(tmp, name, start=0, variants=(("IQ4_K", "IQ4_K"), ("Q8_0", "Q8_0"))):
    corpus = tmp / f"corpus-{start}.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[start:start + 16000])
    cfg = config_from_dict({"name": name, "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 6,
                            "threads": 2, "output_dir": str(tmp / "out"),
                            "variants": [{"name": n, "ftype": f} for n, f in variants]}, "t", str(tmp))
    return run(cfg, progress=False) / "results.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    a = _run(tmp, "a")
    b = _run(tmp, "b", variants=(("IQ4_K", "IQ3_K"), ("Q8_0", "Q8_0")))   # "IQ4_K" is really IQ3_K here
    other = _run(tmp, "other", start=40000)
    return a, b, other


def test_a_run_against_itself_differs_by_nothing(runs):
    a = runs[0]
    diffs = compare_runs(a, a)
    for ms in diffs.values():
        for d in ms.values():
            assert d.diff == 0.0 and d.p_value == 1.0 and d.ci_low == d.ci_high == 0.0


def test_differences_match_a_direct_computation(runs):
    a, b, _ = runs
    diffs = compare_runs(a, b)
    ta = pd.read_parquet(a.parent / "tokens.parquet")
    tb = pd.read_parquet(b.parent / "tokens.parquet")
    for v in ("IQ4_K", "Q8_0"):
        ka = ta[ta.variant == v]["kld"].to_numpy(np.float64).mean()
        kb = tb[tb.variant == v]["kld"].to_numpy(np.float64).mean()
        assert diffs[v]["kld_mean"].diff == pytest.approx(kb - ka, rel=1e-9, abs=1e-12)
        sa = ta[ta.variant == v]["same_top"].mean()
        sb = tb[tb.variant == v]["same_top"].mean()
        assert diffs[v]["same_top_p"].diff == pytest.approx(sb - sa, abs=1e-12)
    d = diffs["IQ4_K"]["kld_mean"]
    assert d.diff > 0 and d.ci_low > 0 and d.p_value < 0.05          # IQ3_K is really worse
    assert diffs["Q8_0"]["kld_mean"].diff == 0.0                        # the same recipe, same tokens


def test_two_variants_of_one_run(runs, tmp_path, capsys):
    a = runs[0]
    diffs = compare_variants(a, "Q8_0", "IQ4_K")
    assert diffs["IQ4_K vs Q8_0"]["kld_mean"].diff > 0
    assert cli_main(["compare", str(a), "--variants", "Q8_0", "IQ4_K", "-o", str(tmp_path / "c")]) == 0
    out = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert out["IQ4_K vs Q8_0"]["kld_mean"]["diff"] == diffs["IQ4_K vs Q8_0"]["kld_mean"].diff
    assert (tmp_path / "c" / "compare_chunks.png").is_file() and "| kld_mean |" in capsys.readouterr().out


def test_other_corpus_and_missing_tokens_are_named_errors(runs, tmp_path, capsys):
    a, _, other = runs
    with pytest.raises(CompareError, match="corpus_sha256"):
        compare_runs(a, other)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(a, bare / "results.json")
    with pytest.raises(CompareError, match="no tokens.parquet"):
        compare_runs(bare / "results.json", a)
    assert cli_main(["compare", str(a), str(bare / "results.json")]) == 2
    assert "no tokens.parquet" in capsys.readouterr().err
    with pytest.raises(CompareError, match="no variant 'X'"):
        compare_variants(a, "X", "Q8_0")
