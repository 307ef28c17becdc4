#!/usr/bin/env bash
# The deterministic race check of the CPU kernel emulations (CI calls this): every family's
# harness built with ThreadSanitizer instead of ASan/UBSan (tools/emu/run.sh --tsan). A
# missing __syncthreads or __syncwarp leaves two accesses of emulated threads to the same
# shared-memory word unordered by any barrier; TSan's happens-before analysis reports that
# whatever order the OS ran the threads in, so a planted barrier removal fails on every run.
# Usage: tools/emu-race.sh [family...]   (no family: all of them; see tools/emu-all.sh --tsan)
exec bash "$(dirname "${BASH_SOURCE[0]}")/emu-all.sh" --tsan "$@"
