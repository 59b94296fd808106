"""Build flash_attn_ext's C++/CUDA extension with torch.utils.cpp_extension.

Environment switches (all optional):
  FLASH_ATTN_EXT_FORCE_CPU=1   build the CPU implementation only, even where nvcc is present.
  FLASH_ATTN_EXT_FORCE_CUDA=1  fail unless the CUDA implementation can be built.
  FLASH_ATTN_EXT_HDIMS=64,128  compile CUDA kernels for these head dims only (default: all).
  FLASH_ATTN_EXT_DTYPES=bf16   compile CUDA kernels for these dtypes only (fp16, bf16, e4m3; default: all).
                               e4m3: the native FP8 forward (Hopper, head dims 128/256); without it FP8
                               inputs run through the dequantizing path (flash_attn_ext/fp8.py).
  FLASH_ATTN_EXT_DIRECTIONS=fwd  compile these CUDA directions only (fwd, bwd; default: both); the
                               other op then has no CUDA kernel registered. For development builds.
  FLASH_ATTN_EXT_DEBUG=1       keep debug info (-g) in the C++ objects (default -g0: the CPU
                               files compile in two thirds of the time, to the same machine code).
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured as torch.utils.cpp_extension documents them;
  the default arch list is "8.0+PTX;9.0a": Ampere machine code plus its PTX, which the driver
  compiles for newer GPUs (Ada runs the sm_80 code; Blackwell JIT-compiles the PTX), and Hopper. Hopper is always built
  as sm_90a ("9.0" is read as "9.0a": the same GPUs, plus the wgmma instructions the Hopper
  kernels need); with it in the list FLASH_ATTN_EXT_SM90 is defined and those kernels compiled.
"""
import glob
import os
import platform
import shutil
import sys
import time

from setuptools import setup


def locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit that has the CUDA headers.

    torch.utils.cpp_extension takes CUDA_HOME from `which nvcc` two levels up.
    Where nvcc is a wrapper script (/usr/local/bin/nvcc on our CI image) that
    gives /usr/local, which has no cuda_runtime_api.h. Must run before
    torch.utils.cpp_extension is imported; a CUDA_HOME set by the user wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


locate_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ALL_HDIMS = (32, 64, 96, 128, 192, 256)
ALL_DTYPES = ("fp16", "bf16", "e4m3")
FP8_HDIMS = (128, 256)  # the head dims of the e4m3 units (tools/generate_kernels.py)
ALL_DIRECTIONS = ("fwd", "bwd")
HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def env_list(name: str, allowed, cast):
    raw = os.environ.get(name)
    if not raw:
        return list(allowed)
    values = [cast(x.strip()) for x in raw.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if bad:
        sys.exit(f"{name}: {bad} not in {list(allowed)}")
    return values


def want_cuda() -> bool:
    if env_flag("FLASH_ATTN_EXT_FORCE_CPU"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if env_flag("FLASH_ATTN_EXT_FORCE_CUDA") and not available:
        sys.exit("FLASH_ATTN_EXT_FORCE_CUDA=1 but no CUDA build of torch or no nvcc (CUDA_HOME) was found")
    return available


def cpu_flags():
    # The C++ standard is chosen by torch.utils.cpp_extension (C++20 for torch >= 2.13).
    # -fopenmp-simd: honours the `#pragma omp simd` row reductions. Threads
    # come from libtorch (torch::stable::parallel_for), so the extension
    # links no OpenMP runtime of its own.
    # -g0: Python's own CFLAGS (sysconfig), which setuptools puts first on every
    # compile line, carry -g. The debug info for the torch templates each file
    # instantiates made the five CPU files take 69-75 s to compile one after
    # the other instead of 46-47 s, and the pip build with ninja 61 s instead
    # of 35 s (idle 2-core machine); the .text of the two builds is
    # byte-identical. FLASH_ATTN_EXT_DEBUG=1 keeps -g.
    flags = ["-O3", "-fopenmp-simd"] + ([] if env_flag("FLASH_ATTN_EXT_DEBUG") else ["-g0"])
    return flags + cpu_isa_flags()


def building_wheel() -> bool:
    """True under `pip wheel` / `python -m build`, which run setup.py's bdist_wheel."""
    return "bdist_wheel" in sys.argv


def cpu_isa_flags():
    """The vector instruction sets the CPU kernels are compiled for.

    Their inner loops are written for the compiler's vectoriser. A source
    build targets the machine that compiles it, as a source build of an
    extension normally does: AVX2 + FMA on most x86, plus AVX-512 where
    present (cpu_tile.h then sets kVectorBytes = 64: on a Zen 5 EPYC the fp32
    tile products ran at ~220 GFLOP/s per core instead of ~113 with 256-bit
    vectors). A wheel, which must run on machines other than the one that
    built it, targets AVX2 + FMA (x86-64-v3: Intel from Haswell, AMD from
    Zen 1). FLASH_ATTN_EXT_CPU_FLAGS overrides both, e.g. "" for a binary
    that runs on any x86-64. Whatever is chosen is recorded in
    flash_attn_ext/_build_config.py, and the package refuses to load the
    library, with a message naming the instruction sets, on a CPU without them.
    """
    override = os.environ.get("FLASH_ATTN_EXT_CPU_FLAGS")
    if override is not None:
        return override.split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    if building_wheel():
        return ["-mavx2", "-mfma"]
    try:
        with open("/proc/cpuinfo") as f:
            present = set(f.read().split())
    except OSError:
        present = set()
    flags = []
    if {"avx2", "fma"} <= present:
        flags += ["-mavx2", "-mfma"]
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= present:
            flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]
    return flags


def write_build_config(isa_flags, fp8_head_dims=(), cuda_restricted=False) -> None:
    """Records, for flash_attn_ext/_ops.py, the CPU features the build needs (as /proc/cpuinfo names them),
    for flash_attn_ext/fp8.py, the head dims with a native FP8 forward, and, for the tests
    (tests/conftest.py), whether FLASH_ATTN_EXT_HDIMS / _DTYPES / _DIRECTIONS left CUDA kernels out."""
    features = tuple(f[2:] for f in isa_flags if f.startswith("-m") and "=" not in f)
    with open(os.path.join(HERE, "flash_attn_ext", "_build_config.py"), "w") as f:
        f.write(
            "# Written by setup.py when the extension was built; not in git.\n"
            "# The x86 instruction sets the CPU kernels were compiled for (/proc/cpuinfo names).\n"
            f"CPU_FEATURES = {features!r}\n"
            "# Head dims of the native FP8 (e4m3) forward on Hopper compiled in (empty: FP8 dequantizes).\n"
            f"FP8_FWD_HEAD_DIMS = {tuple(fp8_head_dims)!r}\n"
            "# Whether FLASH_ATTN_EXT_HDIMS / _DTYPES / _DIRECTIONS restricted the CUDA kernels.\n"
            f"CUDA_KERNELS_RESTRICTED = {bool(cuda_restricted)!r}\n"
        )


def hopper_arch_list() -> bool:
    """Set TORCH_CUDA_ARCH_LIST (default "8.0+PTX;9.0a"), rewriting 9.0 as 9.0a; True if sm_90a is built."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0+PTX;9.0a"
    archs = [a for a in raw.replace(" ", ";").split(";") if a]
    archs = ["9.0a" + a[3:] if a.startswith("9.0") and not a.startswith("9.0a") else a for a in archs]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    return any(a.startswith("9.0a") for a in archs)


# The C++ code sees PyTorch only through its stable ABI (csrc/tensor.h) and
# Python only through the limited API: the libraries built here load under
# every torch from this version on and every CPython the package supports,
# and the wheel is tagged abi3. A newer torch's headers keep the older
# functions we call when told which version to target.
TORCH_TARGET_VERSION = "0x020B000000000000"  # 2.11
PYTHON_ABI = "cp310"  # the limited API of Python 3.10, pyproject's requires-python
STABLE_ABI_DEFINES = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]


def extensions():
    """flash_attn_ext._C (schemas, CPU kernels) and, with CUDA, flash_attn_ext._C_cuda.

    Two libraries so that a CUDA build still loads under a CPU-only torch: only
    _C_cuda links libtorch_cuda and the CUDA runtime, and the package imports it
    only under a CUDA build of torch (flash_attn_ext/_ops.py).
    """
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    shared = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    cpu_sources = shared + rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    flags = cpu_flags()
    write_build_config(cpu_isa_flags())  # rewritten below with the FP8 head dims of a CUDA build
    log(f"CPU kernels compiled with: {' '.join(flags)}")
    cpu = CppExtension(
        "flash_attn_ext._C",
        cpu_sources,
        extra_compile_args={"cxx": flags + STABLE_ABI_DEFINES},
        py_limited_api=True,
    )
    if not want_cuda():
        return [cpu]

    has_sm90a = hopper_arch_list()
    hdims = env_list("FLASH_ATTN_EXT_HDIMS", ALL_HDIMS, int)
    dtypes = env_list("FLASH_ATTN_EXT_DTYPES", ALL_DTYPES, str)
    directions = env_list("FLASH_ATTN_EXT_DIRECTIONS", ALL_DIRECTIONS, str)
    fp8_hdims = [d for d in FP8_HDIMS if d in hdims] if has_sm90a and "e4m3" in dtypes and "fwd" in directions else []
    restricted = (set(hdims), set(dtypes), set(directions)) != (set(ALL_HDIMS), set(ALL_DTYPES), set(ALL_DIRECTIONS))
    write_build_config(cpu_isa_flags(), fp8_hdims, restricted)
    cuda_dir = os.path.join(HERE, "csrc", "cuda")
    # checks.cpp (input validation, params filling) is linked into both libraries.
    sources = [os.path.join("csrc", "checks.cpp")]
    # Files named flash_fwd_* / flash_bwd_* belong to one direction; the rest is shared.
    for path in sorted(glob.glob(os.path.join(cuda_dir, "*.cpp")) + glob.glob(os.path.join(cuda_dir, "*.cu"))):
        name = os.path.basename(path)
        if not any(name.startswith(f"flash_{d}_") for d in ALL_DIRECTIONS if d not in directions):
            sources.append(os.path.relpath(path, HERE))
    for path in sorted(glob.glob(os.path.join(cuda_dir, "instantiations", "flash_*.cu"))):
        name = os.path.basename(path)
        if (
            any(name.startswith(f"flash_{d}_") for d in directions)
            and any(f"_hdim{d}_" in name for d in hdims)
            and any(f"_{t}_" in name for t in dtypes)
            and (has_sm90a or not name.endswith(("_sm90.cu", "_sm90ws.cu")))  # Hopper units only with sm_90a code
        ):
            sources.append(os.path.relpath(path, HERE))
    defines = (
        [f"-DFLASH_ATTN_EXT_HDIM_{d}" for d in hdims]
        + [f"-DFLASH_ATTN_EXT_DTYPE_{t.upper()}" for t in dtypes]
        + [f"-DFLASH_ATTN_EXT_BUILD_{d.upper()}" for d in directions]
        + (["-DFLASH_ATTN_EXT_SM90"] if has_sm90a else [])
        + STABLE_ABI_DEFINES
    )
    nvcc = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + defines
    cuda = CUDAExtension(
        "flash_attn_ext._C_cuda",
        sources,
        # USE_CUDA: the CUDA functions of the stable ABI (the current stream, cuda_context.h).
        extra_compile_args={"cxx": ["-O3", "-g0", "-DUSE_CUDA"] + defines, "nvcc": nvcc},
        py_limited_api=True,
    )
    return [cpu, cuda]


def log(message: str) -> None:
    """A build step; pip shows it with `pip install -v` (and hides all build output without)."""
    print(f"[flash_attn_ext] {message}", flush=True)


class BuildExt(BuildExtension):
    """torch's BuildExtension (ninja when found), reporting what it builds and how long it took."""

    def build_extensions(self):
        sources = [s for ext in self.extensions for s in ext.sources]
        kind = "CPU and CUDA" if any(s.endswith(".cu") for s in sources) else "CPU-only"
        if self.use_ninja:
            jobs = os.environ.get("MAX_JOBS") or "ninja's default (cores + 2)"
            log(f"{kind} build: compiling {len(sources)} files with ninja, parallel jobs: {jobs}")
        else:
            log(f"{kind} build: ninja not found, compiling {len(sources)} files one at a time "
                "(`pip install ninja` compiles them in parallel)")
        start = time.perf_counter()
        super().build_extensions()
        log(f"compiled and linked in {time.perf_counter() - start:.0f} s")


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": PYTHON_ABI}},
)
