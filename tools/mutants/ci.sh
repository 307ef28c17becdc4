#!/usr/bin/env bash
# CI step of the mutation suite (tools/mutants/README.md): checks that every mutant still
# applies to the current kernels (no emulator run), then runs today's rotating sample, which
# takes about 5 minutes on the 2-core CI machine. NTKV_MUTANTS_SAMPLE overrides the sample
# size, NTKV_MUTANTS_SEED the seed (default: days since 1970, so the sample rotates daily).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python3 "$here/run.py" --check
seed="${NTKV_MUTANTS_SEED:-$(( $(date -u +%s) / 86400 ))}"
echo "== mutants: sample of ${NTKV_MUTANTS_SAMPLE:-4}, seed $seed"
# The production-scale (-large) mutants take minutes each; the full run covers them.
python3 "$here/run.py" --skip-large --sample "${NTKV_MUTANTS_SAMPLE:-4}" --seed "$seed"
