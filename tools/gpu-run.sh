#!/usr/bin/env bash
# Runs on the GPU machine (it has nvcc, torch and compute-sanitizer, but no Rust), from the
# repository root, with gpu-bundle/ built here by tools/bundle-gpu.sh. In order:
#   1. every test binary with NTKV_REQUIRE_GPU=1 (a skip is a failure),
#   2. compute-sanitizer memcheck on the differential (GPU) tests, racecheck on attention,
#   3. the bench runner (JSON),
#   4. the torch peers on the same shapes (JSON),
#   5. one side-by-side table (tools/compare.py).
# Results go to $OUT (or gpu-results/). The whole run fits in NTKV_GPU_RUN_BUDGET seconds
# (default 540, under the device tool's 10-minute command limit): each step gets a time
# limit that leaves room for the steps after it, and a step cut short fails the run.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"
if [[ -f "$bundle/ntkv-gpu-bundle.tar.xz" ]]; then
  unpacked="${TMPDIR:-/tmp}/ntkv-gpu-bundle"
  rm -rf "$unpacked" && mkdir -p "$unpacked"
  tar -C "$unpacked" -xJf "$bundle/ntkv-gpu-bundle.tar.xz" || { echo "cannot unpack the bundle"; exit 1; }
  bundle="$unpacked"
fi
out="${OUT:-$root/gpu-results}"
mkdir -p "$out"
export NTKV_REQUIRE_GPU=1
export PYTHONUNBUFFERED=1
status=0
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
deadline=$(( $(date +%s) + ${NTKV_GPU_RUN_BUDGET:-540} ))
# limit CAP RESERVE: seconds for a step, at most CAP, leaving RESERVE for what follows.
limit() {
  local left=$(( deadline - $(date +%s) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 5 )) && left=5
  echo "$left"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee -a "$summary"
note "bundle commit: $(cat "$bundle/COMMIT" 2>/dev/null)"

# 1. Tests.
for t in "$bundle"/tests/*; do
  name=$(basename "$t")
  log="$out/test-$name.log"
  timeout "$(limit 120 420)" "$t" --test-threads=1 > "$log" 2>&1
  rc=$?
  res=$(grep -E '^test result:' "$log" | tail -n 1)
  note "test $name: rc=$rc ${res:-no result line}"
  [[ $rc -eq 0 ]] || { status=1; grep -E 'panicked|FAILED|failed' "$log" | head -n 20 | tee -a "$summary"; }
done

# 2. compute-sanitizer on the differential tests.
if command -v compute-sanitizer > /dev/null; then
  for t in "$bundle"/tests/*_gpu; do
    [[ -e "$t" ]] || continue
    name=$(basename "$t")
    tools=(memcheck)
    case "$name" in attention_gpu|decode_gpu|qdecode_gpu) tools+=(racecheck) ;; esac
    for tool in "${tools[@]}"; do
      log="$out/sanitizer-$tool-$name.log"
      timeout "$(limit 150 330)" compute-sanitizer --tool "$tool" --error-exitcode 99 \
        --print-limit 20 "$t" --test-threads=1 > "$log" 2>&1
      rc=$?
      errs=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1)
      note "sanitizer $tool $name: rc=$rc ${errs:-no summary}"
      [[ $rc -eq 0 ]] || status=1
    done
  done
else
  note "compute-sanitizer not found"
  status=1
fi

# 3. Bench runner.
timeout "$(limit 180 150)" "$bundle/ntkv-bench" --json "$out/ntkv.json" > "$out/bench.log" 2>&1
rc=$?
note "ntkv-bench: rc=$rc"
[[ $rc -eq 0 ]] || { status=1; tail -n 20 "$out/bench.log" | tee -a "$summary"; }

# 4. Torch peers.
timeout "$(limit 240 5)" python3 tools/peers/run.py --json "$out/peers.json" > "$out/peers.log" 2>&1
rc=$?
note "torch peers: rc=$rc"
[[ $rc -eq 0 ]] || { status=1; tail -n 20 "$out/peers.log" | tee -a "$summary"; }

# 5. Side-by-side table.
python3 tools/compare.py "$out/ntkv.json" "$out/peers.json" --markdown "$out/table.md" | tee -a "$summary"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
note "overall: $([[ $status -eq 0 ]] && echo PASS || echo FAIL)"
exit $status
