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
