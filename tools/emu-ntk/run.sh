#!/usr/bin/env bash
# Builds and runs tools/emu-ntk/ntk_emu.cpp: cuda/ntk.cu executed on the CPU with one thread
# per CUDA thread, under AddressSanitizer and UBSan, against f64 references. Needs g++ >= 12
# (C++20 <barrier>, _Float16). No GPU, no CUDA toolkit. Runs twice: cp.async copies landing
# at wait_group (lazy) and at issue (eager). Pass "quick" for a shorter case list.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${TMPDIR:-/tmp}/ntkv-ntk-emu"
g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
  -ffp-contract=off -pthread -I"$root/tools/emu/include" -I"$root/cuda/include" \
  -o "$out" "$root/tools/emu-ntk/ntk_emu.cpp"
echo "== cp.async lazy (copies land at wait_group)"
NTKV_EMU_CP_ASYNC=lazy "$out" "$@"
echo "== cp.async eager (copies land at issue)"
NTKV_EMU_CP_ASYNC=eager "$out" "$@"
