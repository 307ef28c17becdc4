#!/usr/bin/env bash
# Regenerates src/params.rs (the Rust mirror of cuda/include/ntkv_params.h) with bindgen.
# Needs libclang: `apt-get install libclang-dev`. Commit the result; cargo test runs its
# layout tests. The DeviceRepr impls live in src/params_repr.rs, by hand.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo run --quiet --release --manifest-path "$root/tools/gen-bindings/Cargo.toml" \
  --target-dir "$root/target/gen-bindings"
rustfmt --edition 2021 "$root/src/params.rs"
