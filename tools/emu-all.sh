#!/usr/bin/env bash
# Runs every CPU emulation of the CUDA kernels (CI calls this): a thin wrapper over
# tools/emu/run.sh, which builds each family's harness on the shared runtime (tools/emu/include)
# under AddressSanitizer and UBSan and checks the unmodified cuda/<family>.cu against exact or
# f64 references. Prints each family's log only when it fails. This checks kernel logic,
# bounds, races the schedule exposes and fragment layouts on a machine with no GPU; it does not
# replace the differential tests on a real GPU (tools/gpu-run.sh). Needs g++ >= 12.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(decode attention quant ntk topk qdecode)
for f in "${families[@]}"; do
    echo "== $f"
    log=$(mktemp)
    start=$SECONDS
    if ! bash "$root/tools/emu/run.sh" "$f" > "$log" 2>&1; then
        cat "$log"
        echo "FAILED: $f"
        rm -f "$log"
        exit 1
    fi
    grep -E "ALL OK|passed|cases, 0 failed" "$log" | tail -n 2 || true
    echo "   ($((SECONDS - start)) s)"
    rm -f "$log"
done
echo "all kernel emulations passed"
