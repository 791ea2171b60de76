"""Before the kernels are built: `evalkit --help` works, and a command that needs the
kernels stops with a message that names the missing library and says how to build it.

The package's sources are copied without the compiled library and run from the copy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evalkit

_LIBS = ("*.so", "*.pyd", "*.dylib")


@pytest.fixture(scope="module")
def unbuilt(tmp_path_factory) -> tuple[Path, dict]:
    """(a working directory outside the copy, environment whose PYTHONPATH is the copy)."""
    root = tmp_path_factory.mktemp("unbuilt")
    shutil.copytree(Path(evalkit.__file__).parent, root / "src" / "evalkit",
                    ignore=shutil.ignore_patterns(*_LIBS, "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("EVALKIT_KERNELS_LIB", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root / "src")
    cwd = root / "elsewhere"
    cwd.mkdir()
    return cwd, env


def _run(unbuilt, *args: str) -> subprocess.CompletedProcess:
    cwd, env = unbuilt
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_copy_is_what_runs(unbuilt):
    proc = _run(unbuilt, "-c", "import evalkit; print(evalkit.__file__)")
    assert proc.returncode == 0, proc.stderr
    copy = Path(unbuilt[1]["PYTHONPATH"])
    assert Path(proc.stdout.strip()).parent == copy / "evalkit"
    assert not [p for pat in _LIBS for p in (copy / "evalkit").glob(pat)]


def test_help_works_without_the_library(unbuilt):
    proc = _run(unbuilt, "-m", "evalkit", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: evalkit" in proc.stdout
    assert "smoke" in proc.stdout


def test_import_does_not_load_the_library(unbuilt):
    proc = _run(unbuilt, "-c", "import evalkit, evalkit.codec, evalkit.formats as f; print(f.get_format('IQ4_K').bpw)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4.5"


def test_a_kernel_command_names_the_missing_library(unbuilt):
    proc = _run(unbuilt, "-m", "evalkit", "smoke", "--rows", "1", "--cols", "256")
    assert proc.returncode != 0
    assert "kernel library is not built" in proc.stderr
    assert "pip install -e ." in proc.stderr
    if proc.returncode == 2:          # the CLI caught the EvalkitError: a message, not a traceback
        assert "Traceback" not in proc.stderr


def test_the_library_error_is_an_evalkit_error(unbuilt):
    code = ("from evalkit import _kernels\n"
            "from evalkit.errors import EvalkitError\n"
            "try:\n"
            "    _kernels.get_lib()\n"
            "except EvalkitError as e:\n"
            "    print(type(e).__name__, e)\n")
    proc = _run(unbuilt, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("KernelLibraryError ")
