#!/usr/bin/env bash
# Runs the sparse-decode kernels under compute-sanitizer memcheck and racecheck (issue bar:
# 0 errors each), on the small self-checking example examples/decode_check.rs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --example decode_check
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/decode_check"
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$bin"
done
