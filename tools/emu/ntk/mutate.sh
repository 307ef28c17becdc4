#!/usr/bin/env bash
# Checks that the emulator is sensitive: applies one deliberate bug at a time to a copy of
# cuda/ntk.cu and expects tools/emu/ntk/ntk_emu.cpp (quick case list) to report failures.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/cuda" "$work/cuda"
status=0
mutate() {  # name, cp.async mode, old text, new text
    cp "$root/cuda/ntk.cu" "$work/cuda/ntk.cu"
    python3 - "$work/cuda/ntk.cu" "$3" "$4" <<'PY'
import sys
p, old, new = sys.argv[1:4]
s = open(p).read()
assert old in s, old
open(p, "w").write(s.replace(old, new, 1))
PY
    g++ -std=c++20 -O1 -pthread -ffp-contract=off -Wno-unknown-pragmas -I"$root/tools/emu/include" \
        -I"$work/cuda/include" -I"$work/cuda" -o "$work/emu" "$root/tools/emu/ntk/ntk_emu.cpp"
    local fails
    fails=$(NTKV_EMU_CP_ASYNC=$2 "$work/emu" quick 2>&1 | grep -c FAIL || true)
    if [ "$fails" -gt 0 ]; then echo "caught   $1 ($fails failing cases)"; else echo "MISSED   $1"; status=1; fi
}
mutate "A fragment rows (ldmatrix row g+8 -> g)" lazy \
    'ca + (wr + (lane & 15)) * ld' 'ca + (wr + (lane & 7)) * ld'
mutate "B fragment registers b1 <-> next tile's b0" lazy 'bfr[ni][1] = r[1];' 'bfr[ni][1] = r[2];'
mutate "cp.async wait_group one group too loose" lazy \
    'cp_async_wait<kStages - 2>();' 'cp_async_wait<kStages - 1>();'
mutate "no barrier between the wait and refilling a stage" eager \
    '__syncthreads();               // ... for every thread' '// (barrier removed)'
mutate "symmetric mirror off" lazy 'if (p.symmetric && r / kTile > c / kTile) {' 'if (false) {'
mutate "epilogue row offset" lazy 'mi * 16 + g + (e >= 2 ? 8 : 0)' 'mi * 16 + g + (e >= 2 ? 0 : 8)'
exit $status
