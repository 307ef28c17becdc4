#!/usr/bin/env bash
# Installs NVIDIA's nvcc 13.0.x toolchain from the Python package index into
# .cuda-toolchain/ at the project root (git-ignored), so build.rs can compile the
# kernels without a system CUDA install. Idempotent: a second run only checks.
#
# Usage: tools/install-cuda.sh            then   export NVCC=<printed path>
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${NTKV_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}"
version="13.0.*"
packages=(nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl)
stamp="$dest/.installed-13.0"

find_nvcc() { find "$dest" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1; }

if [[ -f "$stamp" && -n "$(find_nvcc)" ]]; then
  nvcc="$(find_nvcc)"
  echo "ntkv: CUDA toolchain already installed at $dest"
else
  python=${PYTHON:-python3}
  specs=()
  for p in "${packages[@]}"; do specs+=("$p==$version"); done
  echo "ntkv: installing ${packages[*]} ($version) into $dest"
  "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$dest" --upgrade "${specs[@]}"
  nvcc="$(find_nvcc)"
  if [[ -z "$nvcc" ]]; then
    echo "ntkv: nvcc not found after install under $dest" >&2
    exit 1
  fi
  chmod +x "$nvcc" "$(dirname "$nvcc")"/* 2>/dev/null || true
  touch "$stamp"
fi

# The wheels split CUDA into several trees (cu13/bin, cu13/include, nvvm/...).
# nvcc finds cicc/ptxas via its own bin dir; make sure the headers from the
# separate packages are found too.
"$nvcc" --version | tail -n 2
echo "export NVCC=$nvcc"
