#!/usr/bin/env bash
# Runs every CPU emulation of the CUDA kernels (CI calls this): a thin wrapper over
# tools/emu/run.sh, which builds each family's harness on the shared runtime (tools/emu/include)
# under AddressSanitizer and UBSan and checks the unmodified cuda/<family>.cu against exact or
# f64 references. Prints each family's log only when it fails. This checks kernel logic,
# bounds, races the schedule exposes and fragment layouts on a machine with no GPU; it does not
# replace the differential tests on a real GPU (tools/gpu-run.sh). Needs g++ >= 12.
#
# Usage: tools/emu-all.sh [--tsan] [family...]   (no family: all of them; `large`: the
# production-scale index checks, see docs/emulator.md)
#   --tsan: the ThreadSanitizer race check (tools/emu-race.sh): lazy cp.async only, and the
#   tensor-core families (about 10x slower under TSan) on a subset of their cases that still
#   covers every barrier: attention's token-mask cases, ntk's quick set.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tsan=()
if [ "${1:-}" = "--tsan" ]; then
    shift
    tsan=(--tsan)
    export NTKV_EMU_RACE_LAZY_ONLY=1
fi
families=("$@")
if [ ${#families[@]} -eq 0 ]; then
    # Every family with a harness, tools/emu/<family>/<family>_emu.cpp (as tools/emu/run.sh).
    for d in "$root"/tools/emu/*/; do
        f="$(basename "$d")"
        [ -f "$d/${f}_emu.cpp" ] && families+=("$f")
    done
fi
spec_of() {
    if [ ${#tsan[@]} -eq 0 ]; then echo "$1"; return; fi
    case "$1" in
        attention) echo "attention=tmask" ;;
        ntk) echo "ntk=quick" ;;
        cluster) echo "cluster=tf32" ;;
        *) echo "$1" ;;
    esac
}
for f in "${families[@]}"; do
    echo "== $f${tsan:+ (ThreadSanitizer)}"
    log=$(mktemp)
    start=$SECONDS
    if ! bash "$root/tools/emu/run.sh" "${tsan[@]}" "$(spec_of "$f")" > "$log" 2>&1; then
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
