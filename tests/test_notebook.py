"""notebooks/analysis.ipynb executes headless against a small run, so it cannot rot."""
from __future__ import annotations


import nbformat
import pytest
from nbclient import NotebookClient

from conftest import GOLDEN, REPO, SHARED
from evalkit.run_config import config_from_dict
from evalkit.pipeline import run


@pytest.mark.slow
def test_analysis_notebook_runs(tmp_path, monkeypatch):
    corpus = tmp_path / "small.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:9000])
    cfg = config_from_dict({"name": "nb", "base": str(GOLDEN / "gguf" / "tiny-base.gguf"), "corpus": str(corpus),
                            "ctx": 64, "chunks": 2, "threads": 2, "output_dir": str(tmp_path / "results"),
                            "variants": [{"name": "IQ4_K", "ftype": "IQ4_K"}, {"name": "IQ2_K", "ftype": "IQ2_K"}]},
                           "test", str(tmp_path))
    out = run(cfg, progress=False)
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    monkeypatch.setenv("EVALKIT_RESULTS", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in outputs)
    assert "2 variants, 2 chunks of 64 tokens" in text
    assert "context" in text and "p_base" in text  # the worst-tokens table was built
