#!/usr/bin/env bash
# Runs every CPU emulation of the CUDA kernels: each compiles the unmodified cuda/<family>.cu
# as C++20 with one std::thread per CUDA thread (warp collectives and tensor-core PTX emulated
# from the PTX ISA), under AddressSanitizer and UBSan, against an f64/exact reference. This
# checks kernel logic, bounds and fragment layouts on a machine with no GPU; it does not
# replace the differential tests on a real GPU (tools/gpu-run.sh). Needs g++ >= 12.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runners=(
  "$root/tools/emu/run.sh"
  "$root/tools/emu/run-attention.sh"
  "$root/tools/emu-quant/run.sh"
  "$root/tools/emu-ntk/run.sh"
  "$root/tools/emu-topk/run.sh"
)
for r in "${runners[@]}"; do
  echo "== $(realpath --relative-to="$root" "$r")"
  log=$(mktemp)
  if ! bash "$r" > "$log" 2>&1; then
    cat "$log"
    echo "FAILED: $r"
    exit 1
  fi
  tail -n 1 "$log"
  rm -f "$log"
done
echo "all kernel emulations passed"
