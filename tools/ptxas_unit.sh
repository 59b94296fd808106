#!/usr/bin/env bash
# Registers and spills of every kernel in one CUDA translation unit, without
# a GPU: compiles the unit for sm_90a (or $ARCH) with the extension's nvcc
# flags and prints one line per kernel, "spill stores / spill loads /
# registers / mangled name", most spilled first. Keeps the object for
# cuobjdump -sass (its path is printed last).
#
#   bash tools/ptxas_unit.sh csrc/cuda/instantiations/flash_bwd_hdim128_bf16_sm90.cu
#   ARCH=sm_80 bash tools/ptxas_unit.sh csrc/cuda/instantiations/flash_fwd_hdim64_fp16_sm80.cu
#   bash tools/ptxas_unit.sh <unit.cu> -DSOME_EXPERIMENT    # extra nvcc flags after the unit
#
# PYTHON (default python3) must import torch (a CPU build has the headers
# too); nvcc comes from PATH. The flags below are setup.py's extensions()'s
# for a full build (every head dim, dtype and direction): keep them in step.
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT=${1:?usage: tools/ptxas_unit.sh <unit.cu> [nvcc flags]}
shift
ARCH=${ARCH:-sm_90a}
PY=${PYTHON:-python3}
INCLUDES=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null)
TARGET=$(sed -n 's/^TORCH_TARGET_VERSION = "\(0x[0-9A-Fa-f]*\)".*/\1/p' setup.py)
OBJ=/tmp/ptxas_$(basename "$UNIT" .cu)_${ARCH}.o
defines=(-DFLASH_ATTN_EXT_BUILD_FWD -DFLASH_ATTN_EXT_BUILD_BWD -DTORCH_TARGET_VERSION="$TARGET")
for d in 32 64 96 128 192 256; do defines+=("-DFLASH_ATTN_EXT_HDIM_$d"); done
for t in FP16 BF16 E4M3; do defines+=("-DFLASH_ATTN_EXT_DTYPE_$t"); done
[[ "$ARCH" == sm_90a ]] && defines+=(-DFLASH_ATTN_EXT_SM90)
# shellcheck disable=SC2086
nvcc -c "$UNIT" -o "$OBJ" -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -lineinfo \
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
  -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  "${defines[@]}" $INCLUDES -Icsrc -gencode "arch=compute_${ARCH#sm_},code=$ARCH" -Xptxas -v "$@" 2>&1 |
  awk '
    /Compiling entry function/ { match($0, /_Z[0-9A-Za-z_]+/); name = substr($0, RSTART, RLENGTH); next }
    /bytes spill stores/ { split($0, f, " "); for (i = 1; i <= NF; i++) { if (f[i] == "spill" && f[i + 1] == "stores,") st = f[i - 2]; if (f[i] == "spill" && f[i + 1] == "loads") ld = f[i - 2] } next }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15); if (name != "") printf "%6d %6d %4d  %s\n", st, ld, regs, name; name = "" }
    /error/ { print > "/dev/stderr" }
  ' | sort -k1,1nr -k2,2nr
echo "object: $OBJ"
