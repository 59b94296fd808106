"""csrc/mask.h's MaskGeometry, brute-forced on the host: tests/mask_geometry_check.cpp checks
rows_seeing(), the key- and query-block ranges, tile_fully_visible() and keys() against the
definition of a visible score on every (row, key) of every small geometry (lengths 0-20, windows
from none to wider than the sequences, blocks of 1-8, query blocks aligned to the start or the
end). The CUDA kernels trust these to skip work, so a wrong answer drops or keeps scores silently;
this runs without torch's build or a GPU, with the host C++ compiler, in about two seconds."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_mask_geometry_brute_force(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "mask_geometry_check"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "mask_geometry_check.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout
    checked, mismatches = int(summary.split()[1]), int(summary.split()[3])
    assert mismatches == 0 and checked > 100_000_000, summary
