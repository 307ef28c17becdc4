#!/usr/bin/env bash
# Builds the release test binaries and the bench runner with every kernel compiled, and
# copies them into gpu-bundle/ (git-ignored) for the GPU machine, which has no Rust.
# Then: run `tools/gpu-run.sh` there with gpu-bundle carried along.
#
# Each binary embeds every kernel image (about 20 MB), so the binaries travel as one xz
# archive, gpu-bundle/ntkv-gpu-bundle.tar.xz, where the shared images compress away; the
# device tool carries at most 64 MiB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -z "${NVCC:-}" ]]; then
  eval "$(tools/install-cuda.sh | grep '^export NVCC=')"
  export NVCC
fi
export NTKV_REQUIRE_KERNELS=1
out="$root/gpu-bundle"
bundle="${CARGO_TARGET_DIR:-$root/target}/gpu-bundle-staging"
rm -rf "$bundle" "$out"
mkdir -p "$bundle/tests" "$out"

cargo build --release --bin ntkv-bench
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  # Only the tests that need the GPU travel (the CPU suites run in CI); the carry limit is 64 MiB.
  case "$name" in *_gpu|device_runtime|platform) cp "$exe" "$bundle/tests/$name" ;; esac
done
cp "${CARGO_TARGET_DIR:-target}/release/ntkv-bench" "$bundle/ntkv-bench"
strip "$bundle/ntkv-bench" "$bundle"/tests/* 2>/dev/null || true
git rev-parse --short HEAD > "$bundle/COMMIT" 2>/dev/null || echo unknown > "$bundle/COMMIT"
ls -la "$bundle" "$bundle/tests"
# One xz stream with a 64 MiB dictionary, so the images repeated in every binary are stored once.
tar -C "$bundle" -cf - . | xz -9 -T1 > "$out/ntkv-gpu-bundle.tar.xz"
ls -la "$out"
size_kb=$(du -sk "$out" | cut -f1)
if (( size_kb > 48 * 1024 )); then
  echo "error: gpu-bundle is ${size_kb} KiB; the device tool carries at most 64 MiB with the tree" >&2
  exit 1
fi
echo "bundle ready: carry 'gpu-bundle' and run: bash tools/gpu-run.sh"
