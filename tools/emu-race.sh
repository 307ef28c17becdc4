#!/usr/bin/env bash
# The deterministic race check of the CPU kernel emulations (CI calls this): every family's
# harness built with ThreadSanitizer instead of ASan/UBSan (tools/emu/run.sh --tsan). A
# missing __syncthreads or __syncwarp leaves two accesses of emulated threads to the same
# shared-memory word unordered by any barrier; TSan's happens-before analysis reports that
# whatever order the OS ran the threads in, so a planted barrier removal fails on every run.
# Only the lazy cp.async mode runs here (tools/emu-all.sh runs both). Prints a family's log
# only when it fails. Usage: tools/emu-race.sh [family...]   (no family: all of them)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
families=("$@")
if [ ${#families[@]} -eq 0 ]; then
    for d in "$root"/tools/emu/*/; do
        f="$(basename "$d")"
        [ -f "$d/${f}_emu.cpp" ] && families+=("$f")
    done
fi
# Under TSan the tensor-core emulation is ~10x slower: the heavy families run a subset of
# their cases that still covers every barrier of the kernels (cases whose name contains the
# argument; ntk's quick set).
args_of() {
    case "$1" in
        attention) echo "attention=tmask" ;;
        ntk) echo "ntk=quick" ;;
        *) echo "$1" ;;
    esac
}
for f in "${families[@]}"; do
    echo "== $f (ThreadSanitizer)"
    log=$(mktemp)
    start=$SECONDS
    if ! NTKV_EMU_RACE_LAZY_ONLY=1 bash "$root/tools/emu/run.sh" --tsan "$(args_of "$f")" > "$log" 2>&1; then
        cat "$log"
        echo "FAILED: $f (ThreadSanitizer)"
        rm -f "$log"
        exit 1
    fi
    echo "   ($((SECONDS - start)) s)"
    rm -f "$log"
done
echo "no races in any kernel emulation"
