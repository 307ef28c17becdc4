#!/usr/bin/env bash
# Fetches the evaluation text: Jane Austen's "Pride and Prejudice" (public domain) as shipped
# in Debian's r-cran-janeaustenr (the CRAN package janeaustenr, MIT, by Julia Silge), and
# writes it as plain UTF-8 lines to models/pride-and-prejudice.txt (git-ignored).
# Idempotent: a present text is reused. The .deb is cached in $NTKV_EVAL_CACHE.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${NTKV_EVAL_CACHE:-$HOME/.cache/ntkv-eval}"
out="$root/models/pride-and-prejudice.txt"
if [[ -s "$out" ]]; then
  echo "text: $out (present)"
  exit 0
fi
mkdir -p "$cache" "$root/models"
deb="$(ls "$cache"/r-cran-janeaustenr_*_all.deb 2>/dev/null | head -1 || true)"
if [[ -z "$deb" ]]; then
  # apt-get download needs a package index: update once when the first try finds none.
  (cd "$cache" && apt-get download r-cran-janeaustenr 2>/dev/null) \
    || { apt-get update -qq && (cd "$cache" && apt-get download r-cran-janeaustenr); }
  deb="$(ls "$cache"/r-cran-janeaustenr_*_all.deb | head -1)"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
python3 "$root/tools/fetch-text-rdb.py" "$tmp/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" \
  "PRIDE AND PREJUDICE" "$out.part"
mv "$out.part" "$out"
echo "text: $out (from $(basename "$deb"))"
