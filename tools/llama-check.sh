#!/usr/bin/env bash
# The llama.cpp check of the evaluation's forward and tokenizer (outside CI: installing
# llama-cpp-python builds llama.cpp from source, about 8+ minutes on 2 cores).
# Installs llama-cpp-python and gguf into a venv in $NTKV_EVAL_CACHE (reused), writes the
# f32 copy of the weights there, then runs tools/llama-check.py.
#   tools/llama-check.sh [TOKENS]   (default 512 prefill positions compared)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${NTKV_EVAL_CACHE:-$HOME/.cache/ntkv-eval}"
venv="$cache/llama-venv"
tokens="${1:-512}"
"$root/tools/fetch-model.sh"
"$root/tools/fetch-text.sh"
if ! "$venv/bin/python" -c 'import llama_cpp, gguf' 2>/dev/null; then
  python3 -m venv "$venv"
  nice -n 15 "$venv/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.16" "gguf==0.19.0" numpy
fi
cargo build --release -p ntkv-eval --manifest-path "$root/Cargo.toml"
bin="$root/target/release/ntkv-eval"
work="$cache/llama-check"
mkdir -p "$work"
"$bin" logits --tokens "$tokens" --out "$work/logits"
"$bin" logits --tokens "$tokens" --act-q8 --out "$work/logits-q8"
"$bin" tokenize --chars 200000 --out "$work/tokens"
"$venv/bin/python" "$root/tools/llama-check.py" "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  "$work/logits" "$work/tokens" "$work" "$work/logits-q8"
