#!/usr/bin/env bash
# An A/B of two builds on the GPU machine (the device tool): a baseline
# revision A against the working tree B, built side by side with the same
# restricted instantiations, timed in alternating processes
# (benchmarks/bench_ab.py: A, B, A, B, ...), then B's CUDA tests.
#
# The device machine's copy of the tree has no git history, so A travels
# as a tarball. On your machine, from the repository root:
#   mkdir -p .carry && git archive --format=tar <rev> > .carry/ab_base.tar
# then, through the device tool with carry [".carry"]:
#   bash tools/gpu_ab.sh
#   AB_DIRS=fwd,bwd AB_ROUNDS=3 AB_TESTS=0 bash tools/gpu_ab.sh
#
# Environment (all optional):
#   AB_BASE      the tarball of A (default .carry/ab_base.tar)
#   AB_ROUNDS    rounds (default 4); AB_DIRS, AB_HDIMS, AB_SEQLENS, AB_CAUSAL: bench_ab.py's
#                --dirs (default bwd), --hdims (64,128), --seqlens (1k,4k,16k), --causal (both)
#   FLASH_ATTN_EXT_HDIMS / _DTYPES / _DIRECTIONS, TORCH_CUDA_ARCH_LIST: the builds' restriction
#                (default: AB_HDIMS, bf16, every direction, 9.0a)
#   AB_TESTS     1 (default): B's CUDA tests afterwards (gpu_check.sh's selection, 4 workers), time allowing;
#                tests of head dims or dtypes outside the restricted build skip or fail as such
#   AB_DEADLINE  seconds from the start by which everything ends (default 560)
#   OUT          output folder (the device tool sets it; default /tmp/gpu_ab_out)
# Writes under $OUT: ab.jsonl (every row), ab_report.txt (the table), buildA.log, buildB.log,
# pytest.log. Prints the report last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_ab_out}
mkdir -p "$OUT"
BASE=${AB_BASE:-.carry/ab_base.tar}
DEADLINE=${AB_DEADLINE:-560}
HDIMS=${AB_HDIMS:-64,128}
export FLASH_ATTN_EXT_HDIMS=${FLASH_ATTN_EXT_HDIMS:-$HDIMS}
export FLASH_ATTN_EXT_DTYPES=${FLASH_ATTN_EXT_DTYPES:-bf16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -f "$BASE" ] || { echo "gpu_ab.sh: no baseline tarball at $BASE (see the usage at the top)"; exit 2; }
A=$(mktemp -d /tmp/ab_base.XXXX)
tar -xf "$BASE" -C "$A"
jobs=$(( $(nproc) / 2 ))
(cd "$A" && MAX_JOBS=$jobs python3 setup.py build_ext --inplace >"$OUT/buildA.log" 2>&1) &
pid_a=$!
MAX_JOBS=$jobs python3 setup.py build_ext --inplace >"$OUT/buildB.log" 2>&1
rc_b=$?
wait $pid_a
rc_a=$?
echo "builds: A status $rc_a, B status $rc_b ($SECONDS s)"
if ((rc_a != 0 || rc_b != 0)); then
  tail -20 "$OUT/buildA.log" "$OUT/buildB.log"
  exit 1
fi
args=(--dirs "${AB_DIRS:-bwd}" --hdims "$HDIMS" --seqlens "${AB_SEQLENS:-1k,4k,16k}" --causal "${AB_CAUSAL:-both}")
B_ROOT=$PWD
: >"$OUT/ab.jsonl"
for r in $(seq 1 "${AB_ROUNDS:-4}"); do
  (cd "$A" && PYTHONPATH="$A" python3 "$B_ROOT/benchmarks/bench_ab.py" time A "${args[@]}") >>"$OUT/ab.jsonl" \
    2>>"$OUT/ab.err" || { echo "round $r: A failed"; tail -5 "$OUT/ab.err"; exit 1; }
  PYTHONPATH="$B_ROOT" python3 benchmarks/bench_ab.py time B "${args[@]}" >>"$OUT/ab.jsonl" \
    2>>"$OUT/ab.err" || { echo "round $r: B failed"; tail -5 "$OUT/ab.err"; exit 1; }
  echo "round $r done ($SECONDS s)"
  ((SECONDS > DEADLINE - 60)) && { echo "stopping after round $r: deadline"; break; }
done
python3 benchmarks/bench_ab.py report "$OUT/ab.jsonl" --a A --b B >"$OUT/ab_report.txt"
rm -f "$OUT/ab.err"
if [ "${AB_TESTS:-1}" = 1 ] && ((DEADLINE - SECONDS > 60)); then
  timeout $((DEADLINE - SECONDS - 10)) python3 -m pytest -q -p no:cacheprovider --maxfail=30 -n 4 tests -k "cuda or test_sm90_ws or test_torch_flash" \
    >"$OUT/pytest.log" 2>&1
  echo "tests (B, restricted build): status $? ($SECONDS s)"
  grep -E "^FAILED" "$OUT/pytest.log" | head -20
  tail -1 "$OUT/pytest.log"
fi
cat "$OUT/ab_report.txt"
