"""How the package is built and loaded: the libraries reach PyTorch only
through its stable ABI and Python only through the limited API (so one wheel
loads under every torch >= 2.11 and every CPython >= 3.10), the CUDA library
is separate from the CPU one, the CPU-feature guard, and the version."""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import subprocess

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import _ops

PACKAGE_DIR = os.path.dirname(flash_attn_ext.__file__)
LIBRARIES = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")))


def needed_libraries(path):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", path], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", dynamic)


def undefined_symbols(path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run([nm, "-D", "--undefined-only", path], check=True, capture_output=True, text=True)
    return [line.split()[-1] for line in listing.stdout.splitlines() if line.strip()]


def test_libraries_are_abi3():
    names = [os.path.basename(p) for p in LIBRARIES]
    assert "_C.abi3.so" in names, names
    assert all(n.endswith(".abi3.so") for n in names), names


@pytest.mark.parametrize("path", LIBRARIES, ids=os.path.basename)
def test_libraries_use_only_stable_abis(path):
    symbols = undefined_symbols(path)
    # C++ symbols of libtorch / c10 (at::, c10::, torch:: mangled as 2at, 3c10,
    # 5torch) change between torch releases; the stable ABI is C functions.
    cxx_torch = [s for s in symbols if re.match(r"_ZN?K?(St)?\d*(2at|3c10|5torch)", s) or "N2at" in s or "N3c10" in s]
    assert not cxx_torch, f"{os.path.basename(path)} uses torch's C++ ABI: {cxx_torch[:10]}"
    assert any(s.startswith("aoti_torch_") for s in symbols), "expected calls into torch's stable C shim"
    # Python: the limited API only (no private _Py symbols; libtorch_python not linked).
    assert not [s for s in symbols if s.startswith("_Py")], [s for s in symbols if s.startswith("_Py")]
    assert not [lib for lib in needed_libraries(path) if "torch_python" in lib]


def test_cpu_library_does_not_need_cuda():
    """A CUDA build's CPU library must load under a CPU-only torch: only _C_cuda links CUDA."""
    needed = needed_libraries(os.path.join(PACKAGE_DIR, "_C.abi3.so"))
    assert "libtorch_cpu.so" in needed, needed
    assert not [lib for lib in needed if "cuda" in lib], needed


def test_cuda_kernels_load_with_a_cuda_torch_only():
    has_cuda_library = any(os.path.basename(p).startswith("_C_cuda") for p in LIBRARIES)
    assert _ops.HAS_CUDA_KERNELS == (has_cuda_library and torch.version.cuda is not None)


def test_cpu_feature_guard():
    cpuinfo = "flags\t\t: fpu sse2 avx fma\n"
    assert _ops.missing_cpu_features(("avx2", "fma"), cpuinfo) == ["avx2"]
    assert _ops.missing_cpu_features(("fma",), cpuinfo) == []
    with pytest.raises(ImportError, match=r"lacks avx2.*FLASH_ATTN_EXT_CPU_FLAGS"):
        _ops.check_cpu_features(("avx2", "fma"), cpuinfo)
    _ops.check_cpu_features(("fma",), cpuinfo)  # nothing missing: no error


def test_this_build_runs_on_this_cpu():
    """The recorded features of this build are present here (else the import above would have failed)."""
    from flash_attn_ext import _build_config

    assert _ops.missing_cpu_features(_build_config.CPU_FEATURES) == []


def test_version_matches_the_distribution():
    assert flash_attn_ext.__version__ == importlib.metadata.version("flash_attn_ext")
