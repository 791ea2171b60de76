"""`evalkit recipe`: the optimiser against brute force, the rules' syntax, and the whole command on the
tiny golden model (the GGUF from --gguf equals `evalkit quantize --override` of recipe.txt byte for
byte, its size is the predicted one, its measured KLD is `evalkit run`'s), bad input."""
from __future__ import annotations

import hashlib
import itertools
import json
import re

import numpy as np
import pytest

from conftest import GOLDEN, SHARED
from evalkit.sensitivity.optimise import InfeasibleBudget, Option, choose_types, lagrangian_bound

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def _brute(options, budget):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in options]):
        b = sum(options[g][k].bytes for g, k in enumerate(pick))
        c = sum(options[g][k].cost for g, k in enumerate(pick))
        if b <= budget and (best is None or c < best):
            best = c
    return best


@pytest.mark.parametrize("seed", range(12))
def test_optimiser_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = []
    for _ in range(int(rng.integers(3, 7))):
        sizes = np.sort(rng.choice(np.arange(10, 400), size=int(rng.integers(1, 5)), replace=False))
        costs = np.sort(rng.random(len(sizes)))[::-1] * rng.random() * 10     # more bytes, less cost
        options.append([Option(f"t{k}", int(b), float(c)) for k, (b, c) in enumerate(zip(sizes, costs))])
    lo = sum(min(o.bytes for o in g) for g in options)
    hi = sum(max(o.bytes for o in g) for g in options)
    for budget in (lo, lo + (hi - lo) // 3, (lo + hi) // 2, hi):
        # a grid finer than a byte: the dynamic programme is exact
        pick = choose_types(options, budget, grid=budget + 1)
        used = sum(options[g][k].bytes for g, k in enumerate(pick))
        cost = sum(options[g][k].cost for g, k in enumerate(pick))
        want = _brute(options, budget)
        assert used <= budget and cost == pytest.approx(want, abs=1e-12)
        assert lagrangian_bound(options, budget) <= want + 1e-9
        # the default coarse grid never breaks the budget and stays close to the optimum
        coarse = choose_types(options, budget, grid=20)
        assert sum(options[g][k].bytes for g, k in enumerate(coarse)) <= budget
    with pytest.raises(InfeasibleBudget):
        choose_types(options, lo - 1)


def test_rules_select_exactly_their_tensors():
    from evalkit.sensitivity.groups import TensorFacts
    from evalkit.sensitivity.rules_text import recipe_rules, rules_assignment
    ts = [TensorFacts(f"blk.{i}.{k}.weight", (576, 576), "Q4_1", 0, 0, i, k)
          for i in range(12) for k in ("attn_k", "attn_k_b", "ffn_down")]
    ts.append(TensorFacts("token_embd.weight", (576, 49152), "Q8_0", 0, 0, None, "token_embd"))
    want = {t.name: ("IQ4_K" if t.layer in (1, 11) else "Q6_0") for t in ts if t.kind == "ffn_down"}
    want["blk.1.attn_k.weight"] = "IQ4_NL"
    rules = recipe_rules(want, ts)
    for line in rules:
        assert "," not in line and line.count("=") == 1 and line.startswith("^")
    got = rules_assignment(rules, [t.name for t in ts])
    assert got == {t.name: want.get(t.name, t.src_type) for t in ts}
    # blk.1 must not select blk.11 (nor blk.10..19), attn_k must not select attn_k_b
    one = next(r.split("=")[0] for r in rules if r.endswith("=iq4_nl"))
    assert re.search(one, "blk.1.attn_k.weight")
    assert not any(re.search(one, n) for n in ("blk.11.attn_k.weight", "blk.1.attn_k_b.weight", "xblk.1.attn_k.weight"))


# ggml's type names (type_traits[GGML_TYPE_X].type_name in ggml/src/ggml.c of ik_llama.cpp
# 8337e4cd3) for every type evalkit registers: the strings --custom-q compares against.
GGML_NAMES = {
    "F32": "f32", "F16": "f16", "BF16": "bf16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1",
    "Q6_0": "q6_0", "Q8_0": "q8_0", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "Q2_K": "q2_K", "Q3_K": "q3_K",
    "Q4_K": "q4_K", "Q5_K": "q5_K", "Q6_K": "q6_K", "IQ2_K": "iq2_k", "IQ3_K": "iq3_k", "IQ4_K": "iq4_k",
    "IQ5_K": "iq5_k", "IQ6_K": "iq6_k", "IQ4_KS": "iq4_ks", "IQ2_KS": "iq2_ks", "IQ4_KSS": "iq4_kss",
    "IQ5_KS": "iq5_ks", "IQ3_KS": "iq3_ks", "IQ2_KL": "iq2_kl", "IQ1_KT": "iq1_kt", "IQ2_KT": "iq2_kt",
    "IQ3_KT": "iq3_kt", "IQ4_KT": "iq4_kt", "Q8_KV": "q8_KV"}


def _parse_custom_q(arg: str) -> list[tuple[str, str]]:
    """ik_llama.cpp's parse_custom_quants (examples/quantize/quantize.cpp, 8337e4cd3), re-implemented:
    the list is split at every ',', each item at its first '='; the type must equal a ggml type
    name exactly (parse_ggml_type: strcmp with ggml_type_name)."""
    out = []
    for item in arg.split(","):
        pos = item.find("=")
        assert pos >= 0, f"Invalid custom quantization input {arg}"
        pattern, tname = item[:pos], item[pos + 1:]
        assert tname in GGML_NAMES.values(), f"Invalid quantization type '{tname}' in custom quantization input {item}"
        out.append((pattern, tname))
    return out


def _custom_q_types(rules: list[tuple[str, str]], names) -> dict[str, str]:
    """llama_tensor_get_type's custom rule: the first pattern std::regex_search finds in the name."""
    out = {}
    for n in names:
        for pattern, tname in rules:
            # the patterns keep to ^ $ \. ( | ) and word characters, which ECMAScript (std::regex's
            # default grammar) and Python's re read alike
            assert re.fullmatch(r"\^[\w\\.()|]+\$", pattern), pattern
            if re.search(pattern, n):
                out[n] = tname
                break
    return out


def test_ggml_type_names():
    from evalkit.formats import FORMATS
    from evalkit.sensitivity.outputs import qtype_name
    from evalkit.sensitivity.rules_text import ggml_type_name
    assert set(GGML_NAMES) == {f.name for f in FORMATS.values()}
    for name, ggml in GGML_NAMES.items():
        assert ggml_type_name(name) == ggml and qtype_name(name) == ggml


def test_rules_parse_as_custom_q():
    """The rules, joined by ',' as the summary's `paste -sd,` does, pass --custom-q's parser and give
    each tensor its type; the same lines pass `evalkit quantize --override` with the same meaning."""
    from evalkit.sensitivity.groups import TensorFacts
    from evalkit.sensitivity.rules_text import recipe_rules, rules_assignment
    ts = [TensorFacts(f"blk.{i}.{k}.weight", (512, 512), "Q8_0", 0, 0, i, k)
          for i in range(12) for k in ("attn_q", "ffn_down")]
    ts.append(TensorFacts("output.weight", (512, 1000), "Q8_0", 0, 0, None, "output"))
    want = {t.name: ("Q6_K" if t.layer == 1 else "IQ4_K" if t.layer == 11 else "Q8_KV")
            for t in ts if t.kind == "ffn_down"}
    want.update({"blk.0.attn_q.weight": "IQ2_KL", "output.weight": "Q6_0"})
    rules = recipe_rules(want, ts)
    got = _custom_q_types(_parse_custom_q(",".join(rules)), [t.name for t in ts])
    assert got == {t.name: GGML_NAMES[want.get(t.name, t.src_type)] for t in ts}
    assert rules_assignment(rules, [t.name for t in ts]) == {t.name: want.get(t.name, t.src_type) for t in ts}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    return p


def _recipe_args(corpus, out, *extra):
    return ["recipe", str(TINY), "--corpus", str(corpus), "--ctx", "64", "--chunks", "3", "--batch", "128",
            "--threads", "2", "--types", "IQ2_K", "IQ4_K", "Q8_0", "--kinds", "attn_v", "ffn_down", "ffn_up",
            "--grouping", "tensor", "--no-progress", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, corpus):
    from evalkit.cli import main
    tmp = tmp_path_factory.mktemp("recipe")
    out, gguf = tmp / "recipe.txt", tmp / "recipe.gguf"
    assert main(_recipe_args(corpus, out, "--target-bpw", "8.65", "--gguf", str(gguf), "--iterations", "3")) == 0
    return tmp, out, gguf, json.loads(out.with_suffix(".json").read_text())


def test_recipe_outputs_and_size(tiny_recipe):
    from evalkit.files import model_size
    from evalkit.recipes.options import parse_override
    tmp, out, gguf, rec = tiny_recipe
    rules = out.read_text().splitlines()
    assert rules == rec["rules"] and all(parse_override(r) for r in rules)
    nbytes, bpw = model_size(gguf)
    assert nbytes == rec["bytes"] and bpw == pytest.approx(rec["bpw"]) and bpw <= 8.65
    # 8.65 lies between all-IQ4_K (8.58) and all-Q8_0 (8.70): the budget is used, types are mixed
    assert rec["bpw"] > 8.62 and {"IQ4_K", "Q8_0"} <= set(rec["types"].values())
    best = rec["trials"][rec["best_trial"]]
    assert best["measured"] == min(t["measured"] for t in rec["trials"])
    md = out.with_suffix(".md").read_text()
    assert "(kept)" in md and "--custom-q" in md and "predicted KLD" in md
    assert (tmp / "recipe.sensitivity" / "sensitivity.json").is_file()


def test_search_iterates_and_keeps_the_best_measured(tiny_recipe, corpus):
    """At 8.62 bpw the corrected model chooses a second recipe after the first trial; the search
    keeps the trial with the lowest measured KLD, and reuses the finished sensitivity pass."""
    from evalkit.cli import main
    tmp = tiny_recipe[0]
    sens = tmp / "recipe.sensitivity" / "sensitivity.json"
    stamp = sens.stat().st_mtime_ns
    out = tmp / "iterated.txt"
    assert main(_recipe_args(corpus, out, "--target-bpw", "8.62", "--iterations", "3",
                             "--sensitivity", str(sens.parent))) == 0
    assert sens.stat().st_mtime_ns == stamp
    rec = json.loads(out.with_suffix(".json").read_text())
    trials = rec["trials"]
    assert len(trials) >= 2 and all(t["bpw"] <= 8.62 for t in trials)
    assert all(t["in_context"] for t in trials[:-1])          # every trial but the last corrected the model
    assert any(abs(f - 1.0) > 1e-3 for f in rec["factors"].values())
    assert rec["best_trial"] == min(range(len(trials)), key=lambda i: trials[i]["measured"])
    assert rec["rules"] == out.read_text().splitlines()


def test_recipe_file_is_custom_q_syntax(tiny_recipe):
    """The written recipe.txt passes --custom-q's parser and selects exactly the recipe's types."""
    _, out, _, rec = tiny_recipe
    rules = _parse_custom_q(",".join(out.read_text().splitlines()))
    got = _custom_q_types(rules, rec["types"])
    assert got == {n: GGML_NAMES[t] for n, t in rec["types"].items()}


def test_help_pages(capsys):
    from evalkit.cli import main
    for cmd, flags in (("sensitivity", ("--types", "--grouping", "--imatrix", "--restart")),
                       ("recipe", ("--target-bpw", "--gguf", "--iterations", "--types"))):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(f in text for f in flags), cmd


def test_recipe_file_through_quantize_is_byte_identical(tiny_recipe, tmp_path):
    """recipe.txt fed to `evalkit quantize --override` (the rules as given, the same --type) gives the --gguf file."""
    from evalkit.cli import main
    _, out, gguf, rec = tiny_recipe
    again = tmp_path / "again.gguf"
    args = ["quantize", str(TINY), str(again), "--type", rec["ftype"], "--no-progress"]
    for line in out.read_text().splitlines():
        args += ["--override", line]
    assert main(args) == 0
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.mark.slow
def test_verified_kld_is_the_written_models(tiny_recipe, corpus, tmp_path):
    """The KLD the search measured (recipe swapped into the loaded model) is `evalkit run`'s KLD of the GGUF."""
    from evalkit.pipeline import run
    from evalkit.run_config import config_from_dict
    _, _, gguf, rec = tiny_recipe
    cfg = config_from_dict({"name": "check", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3,
                            "threads": 2, "batch": 128, "output_dir": str(tmp_path),
                            "variants": [{"name": "recipe", "gguf": str(gguf)}]})
    res = json.loads((run(cfg, progress=False) / "results.json").read_text())
    best = rec["trials"][rec["best_trial"]]
    assert best["measured"] == pytest.approx(res["variants"]["recipe"]["kld_mean"][0], rel=1e-6)
    assert res["variants"]["recipe"]["bpw"] == pytest.approx(rec["bpw"])


def test_unreachable_target_and_bad_types(corpus, tmp_path, capsys):
    from evalkit.cli import main
    out = tmp_path / "r.txt"
    assert main(_recipe_args(corpus, out, "--target-bpw", "7.0")) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "smallest candidate types give 8.5" in err
    assert not out.exists() and not (tmp_path / "r.sensitivity").exists()    # refused before measuring
    assert main(_recipe_args(corpus, out, "--target-bpw", "9", "--types", "IQ4_K", "IQ7_K")) == 2
    assert "IQ7_K" in capsys.readouterr().err
    assert main(_recipe_args(corpus, out, "--target-bpw", "9", "--ftype", "IQ9")) == 2
    assert "IQ9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_recipe_args(corpus, out, "--target-bpw", "-1"))


def test_target_budget_counts_the_whole_file():
    from evalkit.sensitivity.recipe import RecipeError, target_budget
    # 1000 weights at 4 bpw: 500 bytes, 100 of them outside the groups
    assert target_budget(4.0, 1000, 100, [("Q4_0", 300)]) == 400
    with pytest.raises(RecipeError, match=r"unreachable.*4\.8000 bpw"):
        target_budget(4.0, 1000, 100, [("Q4_0", 300), ("Q4_0", 200)])
    with pytest.raises(RecipeError, match="positive"):
        target_budget(float("nan"), 1000, 0, [])
