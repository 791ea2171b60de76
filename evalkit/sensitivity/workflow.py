"""``evalkit recipe`` end to end: load once, sensitivity (reused or measured), search, outputs, GGUF."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evalkit.sensitivity.config import SensitivityConfig

__all__ = ["RecipeRun", "matching_result", "make_recipe"]


@dataclass
class RecipeRun:
    """What ``evalkit recipe`` produced: the search result, its files, the ftype of the GGUF."""

    result: object                # evalkit.sensitivity.recipe.RecipeResult
    files: list[Path]
    ftype: str
    gguf: Path | None = None


def matching_result(folder: Path, session):
    """The finished sensitivity pass in ``folder`` if it was measured with this session's base,
    calibration, imatrix, candidate types and grouping; else None."""
    from evalkit.errors import EvalkitError
    from evalkit.sensitivity.sweep import load_result
    if not (Path(folder) / "sensitivity.json").is_file():
        return None
    try:
        r = load_result(folder)
    except EvalkitError:
        return None
    m, cfg, cc = r.meta, session.cfg, session.measurer.calib.corpus
    want = {"types": list(cfg.types), "grouping": cfg.grouping, "bands": cfg.bands,
            "kinds": list(cfg.kinds) if cfg.kinds is not None else None}
    same = (m["base"]["sha256"] == session.base_sha256 and m["corpus_sha256"] == cc.sha256
            and m["n_ctx"] == cc.n_ctx and m["n_chunks"] == cc.n_chunks
            and m.get("imatrix_sha256") == session.imatrix_sha256
            and all(m["config"].get(k) == v for k, v in want.items()))
    return r if same else None


def make_recipe(cfg: SensitivityConfig, target_bpw: float, out: Path, gguf: Path | None = None,
                iterations: int = 3, loo: int = 8, ftype: str = "auto", progress: bool = True,
                restart: bool = False, session=None) -> RecipeRun:
    """Sensitivity pass (the finished one in ``cfg``'s folder when it matches, else measured or
    resumed there), recipe search for ``target_bpw``, ``out`` (+ .md, .json) and the GGUF."""
    from evalkit.evaluation.forward import configure_threads
    from evalkit.recipes.ftypes import get_ftype
    from evalkit.sensitivity.recipe import RecipeError, auto_ftype, search_recipe, write_recipe_gguf
    from evalkit.sensitivity.recipe_report import write_recipe_outputs
    from evalkit.sensitivity.sweep import open_session, sensitivity
    if not isinstance(iterations, int) or iterations < 1 or not isinstance(loo, int) or loo < 0:
        raise RecipeError(f"iterations must be ≥ 1 and loo ≥ 0, got {iterations} and {loo}")
    if ftype != "auto":
        try:
            ftype = get_ftype(ftype).name        # a bad name fails before any work
        except ValueError as e:
            raise RecipeError(f"--ftype: {e}") from None
    out = Path(out)
    if out.suffix in (".md", ".json"):
        raise RecipeError(f"{out}: the recipe needs a suffix other than .md / .json (e.g. recipe.txt)")
    configure_threads(cfg.threads)
    s = session or open_session(cfg)
    _check_reachable(s, target_bpw)        # before any measurement: the sizes are known already
    found = None if restart else matching_result(cfg.out_dir, s)
    sens = found or sensitivity(cfg, progress=progress, restart=restart, session=s)
    res = search_recipe(s, sens, target_bpw, iterations, loo, progress=progress)
    sizes = {t.name: t.n_elements for t in s.tensors}
    ft = auto_ftype(res.types, sizes) if ftype == "auto" else ftype
    files = write_recipe_outputs(res, out, ft, str(s.base_path), cfg.resolve(cfg.imatrix))
    if gguf is not None:
        write_recipe_gguf(s.base_path, gguf, res.rules, ft, cfg.resolve(cfg.imatrix), cfg.threads,
                          expect_bytes=res.bytes, progress=progress)
    return RecipeRun(res, files, ft, Path(gguf) if gguf is not None else None)


def _check_reachable(session, target_bpw: float) -> None:
    """RecipeError when ``target_bpw`` is below the smallest choice of the session's candidates."""
    from evalkit.sensitivity.recipe import RecipeError, target_budget
    smallest = []
    for g in session.groups:
        avail = [c for c in session.candidates[g.name] if c.available]
        if not avail:
            raise RecipeError(f"group {g.name!r}: none of the candidate types can be used for it "
                              f"({session.candidates[g.name][0].note})")
        c = min(avail, key=lambda c: c.bytes)
        smallest.append((c.type, c.bytes))
    target_budget(target_bpw, session.total_elements, session.fixed_bytes, smallest)
