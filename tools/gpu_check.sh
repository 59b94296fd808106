#!/usr/bin/env bash
# One command for a GPU machine (the device tool): build, test, (sanitize), main job, benchmark.
#
# Usage, from the repository root:
#   bash tools/gpu_check.sh
#   FLASH_ATTN_EXT_HDIMS=64,128 FLASH_ATTN_EXT_DTYPES=bf16 bash tools/gpu_check.sh
#   GPU_CHECK_STEPS=build,test GPU_CHECK_K="test_cuda" bash tools/gpu_check.sh
#   GPU_CHECK_STEPS=build,sanitize,bench GPU_CHECK_BENCH="--dtypes bf16 --hdims 128 --seqlens 4k,16k" bash tools/gpu_check.sh
#
# Environment (all optional):
#   FLASH_ATTN_EXT_HDIMS, FLASH_ATTN_EXT_DTYPES, FLASH_ATTN_EXT_DIRECTIONS, TORCH_CUDA_ARCH_LIST
#                       passed to setup.py (restrict the build: all 54 kernel units take
#                       minutes even with 16 jobs). MAX_JOBS defaults to the core count.
#   GPU_CHECK_STEPS     comma list of build,test,sanitize,main,bench (default build,test,main,bench)
#   GPU_CHECK_WHEEL     path of a built wheel (e.g. .carry/flash_attn_ext-*-cp310-abi3-*.whl): the build
#                       step installs it (pip --no-deps) instead of compiling, and moves the checkout's
#                       flash_attn_ext/ aside, so that every later step imports the installed wheel
#   GPU_CHECK_SMEM_BUDGETS  comma list of KiB (e.g. 99,163): after the test run, run the tests again
#                       with FLASH_ATTN_EXT_SMEM_BUDGET_KB set to each (the tiles of a GPU with that
#                       much shared memory per block: 99 sm86/sm89/sm120, 163 A100)
#   GPU_CHECK_K         pytest -k expression (default "cuda or test_sm90_ws or test_torch_flash":
#                       every CUDA-parametrized test plus the modules that run on CUDA only,
#                       test_cuda.py, test_sm90_ws.py, test_sm90_ws_bwd.py, test_torch_flash.py,
#                       whose test names do not all say "cuda"; "-k cuda" alone, the default until
#                       the fourteenth session, left most of the two Hopper modules out);
#                       GPU_CHECK_PYTEST_ARGS adds pytest arguments
#   GPU_CHECK_MAXFAIL   pytest --maxfail (default 10)
#   GPU_CHECK_XDIST     1 (default): run pytest in one pytest-xdist worker when xdist is installed,
#                       so a crashing test (segfault) is reported and the others still run
#   GPU_CHECK_BENCH     arguments of benchmarks/bench_attention.py (default "--quick --impls
#                       ours,flash,cudnn,flex": the quick sweep with compiled FlexAttention)
#   GPU_CHECK_DEADLINE  seconds from the start by which every step must end (default 560, under
#                       the device tool's 600 s per command); each step gets what is left, minus
#                       a reserve for the summary, and is cut off (timeout) past it
#   OUT                 output folder (the device tool sets it; default /tmp/gpu_check_out)
#
# Writes under $OUT: build.log pytest.log (pytest_smem<KB>.log) sanitize.log main.log bench.log
# bench.json bench.png summary.txt (the device tool brings back 8 files). Prints the summary last: build, test summary line
# (and failing tests), sanitizer verdicts, main-job parity, then the benchmark tables.
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DEFAULT_K="cuda or test_sm90_ws or test_torch_flash"
# Issue 13 measures against compiled FlexAttention too: its compiles add about a minute.
DEFAULT_BENCH="--quick --impls ours,flash,cudnn,flex"
STEPS=",${GPU_CHECK_STEPS:-build,test,main,bench},"
DEADLINE=${GPU_CHECK_DEADLINE:-560}
RESERVE=15
STATUS=0
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "$*" >>"$SUMMARY"; }
has_step() { [[ "$STEPS" == *",$1,"* ]]; }
# Seconds left for a step: min(its own cap, time to the deadline minus the reserve).
budget() {
  local left=$((DEADLINE - SECONDS - RESERVE))
  ((left > $1)) && left=$1
  echo "$left"
}
# run_step CAP LOG CMD...: runs CMD with a timeout, output to LOG; returns its status (124: timed out).
run_step() {
  local cap=$1 log=$2
  shift 2
  local t
  t=$(budget "$cap")
  if ((t < 20)); then
    echo "skipped: only ${t}s left before GPU_CHECK_DEADLINE" >"$log"
    return 125
  fi
  timeout --signal=TERM --kill-after=10 "$t" "$@" >"$log" 2>&1
}

echo "== gpu_check: $(date -Is) steps=${STEPS:1:-1} deadline=${DEADLINE}s out=$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | head -4
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
note "device: $($PY -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>/dev/null)"
note "build env: HDIMS=${FLASH_ATTN_EXT_HDIMS:-all} DTYPES=${FLASH_ATTN_EXT_DTYPES:-all} DIRECTIONS=${FLASH_ATTN_EXT_DIRECTIONS:-all}"

# 1. Build the extension in place (the tests and benchmarks import it from the checkout), or
# install a wheel built elsewhere and hide the checkout's package so that only the wheel is imported.
if has_step build && [ -n "${GPU_CHECK_WHEEL:-}" ]; then
  t0=$SECONDS
  echo "== install $GPU_CHECK_WHEEL (no build)"
  if $PY -m pip install --no-deps --no-index --force-reinstall "$GPU_CHECK_WHEEL" >"$OUT/build.log" 2>&1 \
    && mv flash_attn_ext .flash_attn_ext_checkout \
    && $PY -c "import flash_attn_ext, torch; from flash_attn_ext import _ops; \
assert 'site-packages' in flash_attn_ext.__file__ or 'dist-packages' in flash_attn_ext.__file__, flash_attn_ext.__file__; \
assert _ops.HAS_CUDA_KERNELS; print('wheel', flash_attn_ext.__version__, 'from', flash_attn_ext.__file__, 'torch', torch.__version__)" \
      >>"$OUT/build.log" 2>&1; then
    note "build: none; installed $(basename "$GPU_CHECK_WHEEL"): $(tail -1 "$OUT/build.log")"
  else
    note "build: installing the wheel FAILED, see build.log"
    tail -20 "$OUT/build.log"
    cat "$SUMMARY"
    exit 1
  fi
elif has_step build; then
  t0=$SECONDS
  echo "== build (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} run_step 420 "$OUT/build.log" $PY setup.py build_ext --inplace
  rc=$?
  if ((rc != 0)); then
    note "build: FAILED (status $rc, $((SECONDS - t0)) s), see build.log"
    echo "== build failed (status $rc); errors:"
    grep -E "error|Error|FAILED" "$OUT/build.log" | grep -v "^\s*$" | head -40
    tail -15 "$OUT/build.log"
    echo "== summary"
    cat "$SUMMARY"
    exit 1
  fi
  note "build: ok ($((SECONDS - t0)) s)"
fi

# 2. Tests on CUDA: once as the GPU is, then once per GPU_CHECK_SMEM_BUDGETS entry with the
# shared-memory budget lowered to it (FLASH_ATTN_EXT_SMEM_BUDGET_KB: the tiles and kernels
# a GPU with that much shared memory per block gets), logged to pytest_smem<KB>.log.
run_tests() {  # run_tests LABEL LOG [VAR=VALUE...]
  local label=$1 log=$2
  shift 2
  local t0=$SECONDS
  echo "== pytest -k '${GPU_CHECK_K:-$DEFAULT_K}' $label"
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=240)
  # One xdist worker: still one test at a time on the GPU, but a test that crashes the process
  # (segfault, abort) is reported as failed and the rest still run in a fresh worker.
  if [ "${GPU_CHECK_XDIST:-1}" = 1 ] && $PY -c "import xdist" 2>/dev/null; then
    extra+=(-n 1 --max-worker-restart=20)
  fi
  # shellcheck disable=SC2086
  run_step 400 "$log" env "$@" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=15 \
    --maxfail="${GPU_CHECK_MAXFAIL:-10}" "${extra[@]}" tests -k "${GPU_CHECK_K:-$DEFAULT_K}" ${GPU_CHECK_PYTEST_ARGS:-}
  local rc=$?
  local line
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran" "$log" | tail -1)
  if ((rc == 124 || rc == 137)); then
    note "tests$label: TIMED OUT after $((SECONDS - t0)) s; last: $(tail -1 "$log")"
    STATUS=1
  elif ((rc != 0 && rc != 5)); then
    note "tests$label: FAILED ($((SECONDS - t0)) s): ${line:-status $rc}"
    if [ -z "$line" ]; then  # the pytest process itself died: show where
      note "$(grep -E "Fatal Python error|tests/.*line [0-9]+ in test_" "$log" | head -4)"
    fi
    STATUS=1
  else
    note "tests$label: ok ($((SECONDS - t0)) s): ${line:-status $rc}"
  fi
}
if has_step test; then
  run_tests "" "$OUT/pytest.log"
  budgets=${GPU_CHECK_SMEM_BUDGETS:-}
  for kb in ${budgets//,/ }; do
    run_tests " (smem budget ${kb} KB)" "$OUT/pytest_smem${kb}.log" FLASH_ATTN_EXT_SMEM_BUDGET_KB="$kb"
  done
fi

# 3. compute-sanitizer memcheck + racecheck on a tiny workload, our kernels only.
if has_step sanitize; then
  t0=$SECONDS
  echo "== compute-sanitizer"
  if ! command -v compute-sanitizer >/dev/null; then
    note "sanitize: compute-sanitizer not found"
  else
    if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name "; then
      filt=(--kernel-name kns=flash)
    else
      filt=(--filter kns=flash)
    fi
    : >"$OUT/sanitize.log"
    for tool in memcheck racecheck; do
      tmp=$(mktemp)  # not under $OUT: at most 8 files come back
      run_step 200 "$tmp" compute-sanitizer --tool "$tool" --error-exitcode 3 "${filt[@]}" \
        $PY tools/sanitize_check.py --one-dtype
      rc=$?
      { echo "### $tool (status $rc)"; cat "$tmp"; } >>"$OUT/sanitize.log"
      verdict=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_check:" "$tmp" | tail -2 | tr -s '=' | tr '\n' ' ')
      rm -f "$tmp"
      if ((rc != 0)); then
        note "sanitize $tool: FAILED (status $rc) $verdict"
        STATUS=1
      else
        note "sanitize $tool: ok $verdict"
      fi
    done
    note "sanitize: $((SECONDS - t0)) s, see sanitize.log"
  fi
fi

# 4. The main job (parity vs SDPA + a small speed table).
if has_step main; then
  t0=$SECONDS
  echo "== python -m flash_attn_ext --quick"
  run_step 150 "$OUT/main.log" $PY -m flash_attn_ext --quick
  rc=$?
  parity=$(grep -E "^parity:" "$OUT/main.log" | tail -1)
  if ((rc != 0)); then
    note "main job: FAILED (status $rc, $((SECONDS - t0)) s) ${parity:-$(tail -1 "$OUT/main.log")}"
    STATUS=1
  else
    note "main job: ok ($((SECONDS - t0)) s) $parity"
  fi
fi

# 5. Benchmark (JSON + PNG + tables).
if has_step bench; then
  t0=$SECONDS
  echo "== benchmarks/bench_attention.py ${GPU_CHECK_BENCH:-$DEFAULT_BENCH}"
  # shellcheck disable=SC2086
  run_step 400 "$OUT/bench.log" $PY benchmarks/bench_attention.py ${GPU_CHECK_BENCH:-$DEFAULT_BENCH} \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"
  rc=$?
  if ((rc != 0)); then
    note "bench: status $rc ($((SECONDS - t0)) s)$( ((rc == 124)) && echo ', timed out: tables from the partial JSON')"
    ((rc == 124)) || STATUS=1
  else
    note "bench: ok ($((SECONDS - t0)) s)"
  fi
fi

# Summary, last: the device tool shows the end of the output.
echo
echo "================ summary ($((SECONDS)) s) ================"
if has_step test && [ -f "$OUT/pytest.log" ]; then
  grep -hE "^(FAILED|ERROR) " "$OUT"/pytest*.log | head -25
fi
if has_step main && [ -f "$OUT/main.log" ]; then
  grep -E "FAIL" "$OUT/main.log" | head -10
fi
cat "$SUMMARY"
if has_step bench && [ -f "$OUT/bench.json" ]; then
  echo
  $PY benchmarks/bench_attention.py --report "$OUT/bench.json" 2>&1 | tail -60
fi
exit $STATUS
