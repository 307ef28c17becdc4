#!/usr/bin/env bash
# The one entry point of the CPU kernel emulations. Each family's harness,
# tools/emu/<family>/<family>_emu.cpp, includes the unmodified cuda/<family>.cu and compiles it
# as C++20 on the shared runtime (tools/emu/include: CUDA types and intrinsics, one std::thread
# per CUDA thread, warp collectives, mma/ldmatrix/cp.async from the PTX ISA; see emu_runtime.h)
# under AddressSanitizer and UBSan, then checks the kernels against exact or f64 references.
# Needs g++ >= 12; no GPU, no CUDA toolkit.
#
# Usage: tools/emu/run.sh [--tsan] [family[=arg,arg...]]...   (no family: all of them)
#   families: every directory here with a harness (decode attention quant ntk select topk …); the args go to the harness, e.g. attention=causal
#   (cases whose name contains it), quant=100 (random cases per dtype), ntk=quick, topk=h2o.
#   <family>-large (decode-large attention-large quant-large topk-large; `large` runs all of
#   them): the production-scale index checks, tools/emu/<family>/<family>_large.cpp, not part
#   of the default run.
#   --tsan (or NTKV_EMU_TSAN=1): a ThreadSanitizer build instead of ASan/UBSan, the
#   deterministic race check (tools/emu-race.sh runs it over every family).
# Families that use cp.async (decode, attention, ntk) run twice: NTKV_EMU_CP_ASYNC=lazy (copies
# land only when a covering wait_group returns) and eager (at issue).
# Environment: NTKV_EMU_CUDA_DIR=dir runs the kernel sources and headers of dir (a mutated copy
# of cuda/) instead of cuda/; NTKV_EMU_CXXFLAGS adds compiler flags; NTKV_EMU_MEMORY=sc turns
# off the weak global-memory model of concurrent launches (emu_memory.h); NTKV_EMU_STOP=1
# stops topk at its first failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda="${NTKV_EMU_CUDA_DIR:-$here/../../cuda}"
work="${TMPDIR:-/tmp}/ntkv-emu-$(id -u)"
mkdir -p "$work"
# Every family with a harness, tools/emu/<family>/<family>_emu.cpp.
all=()
for d in "$here"/*/; do f="$(basename "$d")"; [ -f "$d/${f}_emu.cpp" ] && all+=("$f"); done
large=()
for d in "$here"/*/; do f="$(basename "$d")"; [ -f "$d/${f}_large.cpp" ] && large+=("$f-large"); done
sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
tag=""
if [ "${1:-}" = "--tsan" ]; then shift; NTKV_EMU_TSAN=1; fi
if [ "${NTKV_EMU_TSAN:-0}" = 1 ]; then
    # TSan reports races between the emulated threads of a CTA (a missing __syncthreads).
    sanitize=(-fsanitize=thread)
    tag="-tsan"
    export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1 exitcode=66 report_signal_unsafe=0 suppressions=$here/tsan.supp}"
fi
[ $# -gt 0 ] || set -- "${all[@]}"
specs=()
for spec in "$@"; do if [ "$spec" = large ]; then specs+=("${large[@]}"); else specs+=("$spec"); fi; done
set -- "${specs[@]}"
# shellcheck disable=SC2206
extra=(${NTKV_EMU_CXXFLAGS:-})
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
status=0
for spec in "$@"; do
    family="${spec%%=*}"
    args=()
    if [ "$spec" != "$family" ]; then IFS=, read -r -a args <<< "${spec#*=}"; fi
    src="$here/$family/${family}_emu.cpp"
    base="$family"
    if [ "${family%-large}" != "$family" ]; then base="${family%-large}"; src="$here/$base/${base}_large.cpp"; fi
    if [ ! -f "$src" ]; then echo "unknown family '$family' (have: ${all[*]} ${large[*]})" >&2; exit 2; fi
    bin="$work/$family-emu$tag"
    echo "== $family: build"
    g++ -std=c++20 -O1 -g -ffp-contract=off -fno-strict-aliasing -fno-omit-frame-pointer -pthread \
        -Wno-unknown-pragmas "${sanitize[@]}" "${extra[@]}" \
        -I"$here/include" -I"$cuda/include" -I"$cuda" -o "$bin" "$src"
    # (The -large checks run lazy only: they test indexing, not copy timing.)
    case "$family" in
        decode|attention|ntk) modes=(lazy eager) ;;
        *) modes=(lazy) ;;
    esac
    [ "${NTKV_EMU_RACE_LAZY_ONLY:-0}" = 1 ] && modes=(lazy)
    # A mutant that plants a cp.async bug may name the modes that expose it (NTKV_EMU_MODES).
    # shellcheck disable=SC2206
    [ -n "${NTKV_EMU_MODES:-}" ] && modes=(${NTKV_EMU_MODES//,/ })
    for mode in "${modes[@]}"; do
        [ ${#modes[@]} -eq 1 ] || echo "== $family: cp.async $mode"
        if ! NTKV_EMU_CP_ASYNC=$mode "$bin" "${args[@]}"; then
            echo "FAILED: $family (cp.async $mode)"
            status=1
        fi
    done
done
exit $status
