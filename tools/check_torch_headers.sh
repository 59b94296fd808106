#!/usr/bin/env bash
# Compiles every host C++ file (syntax only) against the stable headers of the
# oldest torch the package supports, 2.11, so that a source build there keeps
# working: the stable API of later releases has functions and macros 2.11's
# headers lack (STABLE_TORCH_ERROR_CODE_CHECK, operator== on shapes), and the
# CI machine builds with a newer torch. Only the headers are needed: they are
# taken from the torch 2.11.0 wheel, which pip downloads (no install).
#
# Usage: bash tools/check_torch_headers.sh [torch version, default 2.11.0]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work" "torch==$version" 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/torch-*.whl)
python3 - "$wheel" "$work/include" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("torch/include/")])
PY
inc="$work/include/torch/include"
pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_inc=""
for d in "${CUDA_HOME:-}" /usr/local/cuda; do [ -n "$d" ] && [ -f "$d/include/cuda_runtime_api.h" ] && cuda_inc="-I$d/include" && break; done
status=0
for f in csrc/*.cpp csrc/cpu/*.cpp $( [ -n "$cuda_inc" ] && echo csrc/cuda/*.cpp ); do
  if ! g++ -std=c++20 -fsyntax-only -I"$inc" -I"$pyinc" $cuda_inc -DUSE_CUDA -DTORCH_TARGET_VERSION=0x020B000000000000 \
      -DFLASH_ATTN_EXT_HDIM_64 -DFLASH_ATTN_EXT_DTYPE_BF16 -DFLASH_ATTN_EXT_BUILD_FWD -DFLASH_ATTN_EXT_BUILD_BWD \
      -mavx2 -mfma "$f" 2>"$work/err.txt"; then
    echo "FAILED against torch $version headers: $f"; grep -m5 "error" "$work/err.txt"; status=1
  fi
done
[ $status = 0 ] && echo "every host C++ file compiles against torch $version's headers"
exit $status
