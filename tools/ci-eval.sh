#!/usr/bin/env bash
# CI step of the evaluation: fetch the model and text (or reuse them), run ntkv-eval's tests
# with the model required, then a short configuration (256 prompt tokens, 32 continuation
# tokens, full cache and StreamingLLM at 25%) and check its output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/fetch-model.sh
tools/fetch-text.sh
NTKV_REQUIRE_MODEL=1 cargo test --release -p ntkv-eval
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo run --release -p ntkv-eval -- run --context 256 --continuation 32 --policies full,streaming \
  --budgets 0.25 --passkey none --out "$out"
python3 - "$out" <<'PY'
import json, math, os, sys
out = sys.argv[1]
r = json.load(open(os.path.join(out, "report.json")))
rows = {x["policy"]: x for x in r["rows"]}
for x in rows.values():
    x.update(x["quality"])
assert set(rows) == {"full", "streaming"}, rows.keys()
full, st = rows["full"], rows["streaming"]
# The full cache on Pride and Prejudice: a 135M model is far better than uniform (49152).
assert math.isfinite(full["ppl"]) and 2 < full["ppl"] < 200, full["ppl"]
assert full["top1_agree"] == 1.0 and full["attn_rel_err"] == 0.0
assert math.isfinite(st["ppl"]) and 0 < st["attn_rel_err"] < 1 and 0 < st["top1_agree"] <= 1, st
assert len(st["attn_rel_err_layers"]) == 30
png = open(os.path.join(out, "quality.png"), "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n"
assert "| streaming |" in open(os.path.join(out, "report.md")).read()
print(f"ci-eval: full ppl {full['ppl']:.3f}, streaming 25% ppl {st['ppl']:.3f}, "
      f"top-1 {st['top1_agree'] * 100:.1f}%: ok")
PY
