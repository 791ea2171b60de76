"""Shared fixtures: where the golden data live (../shared beside the repository)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EVALKIT_SHARED", REPO.parent / "shared")).resolve()
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN} (set EVALKIT_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def moe_model():
    """``moe_model("tiny-qwen3moe")`` -> the path of that reference MoE model (tests/moe_models.py:
    generated once per machine into a cache folder, sha256 checked against moe-reference.json)."""
    from moe_models import model_path
    return model_path
