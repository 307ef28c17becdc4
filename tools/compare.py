#!/usr/bin/env python3
"""Joins ntkv-bench's JSON with the torch peers' JSON into one side-by-side table.

    python3 tools/compare.py ntkv.json peers.json [--markdown table.md]

speedup = peer time / ntkv time on the same (op, shape, dtype). A bar is the issue's
threshold: `min_speedup` from the peer script, or `min_pct_copy` (share of the copy
bandwidth that ntkv-bench measured in its own run). Exits 1 if any bar is missed or any
barred case has no measurement.
"""

import argparse
import json
import sys


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f} ms" if ms >= 1.0 else f"{ms * 1e3:.1f} us"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ntkv")
    ap.add_argument("peers")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    try:
        ntkv = json.load(open(args.ntkv))
    except (OSError, ValueError) as e:
        print(f"cannot read {args.ntkv}: {e}")
        return 1
    try:
        peers = json.load(open(args.peers))
    except (OSError, ValueError) as e:
        print(f"cannot read {args.peers}: {e}")
        peers = {"records": [], "bars": [], "ceilings": {}}

    ours = {r["key"]: r for r in ntkv.get("records", [])}
    pct_bars = {b["key"]: b["min_pct_copy"] for b in peers.get("bars", [])}
    rows = []
    missed = 0
    seen = set()
    for p in peers.get("records", []):
        o = ours.get(p["key"])
        seen.add(p["key"])
        speedup = p["median_ms"] / o["median_ms"] if o and o["median_ms"] > 0 else None
        bar = p.get("min_speedup")
        ok = None
        if bar is not None:
            ok = speedup is not None and speedup >= bar
        pct = o.get("pct_copy") if o else None
        pbar = pct_bars.get(p["key"])
        if pbar is not None:
            ok = (ok is not False) and pct is not None and pct >= pbar
        if ok is False:
            missed += 1
        rows.append(dict(op=p["op"], shape=p["shape"], dtype=p["dtype"],
                         ntkv=o["median_ms"] if o else None, pct=pct, peer=p["peer"],
                         peer_ms=p["median_ms"], speedup=speedup,
                         bar=" & ".join(x for x in [f">={bar}x" if bar is not None else "",
                                                     f">={pbar}% copy" if pbar is not None else ""] if x),
                         ok=ok))
    for k, o in ours.items():
        if k in seen:
            continue
        pbar = pct_bars.get(k)
        ok = None
        if pbar is not None:
            ok = o.get("pct_copy") is not None and o["pct_copy"] >= pbar
            missed += 0 if ok else 1
        rows.append(dict(op=o["op"], shape=o["shape"], dtype=o["dtype"], ntkv=o["median_ms"],
                         pct=o.get("pct_copy"), peer="-", peer_ms=None, speedup=None,
                         bar=f">={pbar}% copy" if pbar is not None else "", ok=ok))

    dev = (ntkv.get("device") or {}).get("name", "no GPU")
    head = (f"device: {dev}; ntkv copy ceiling {ntkv.get('copy_gbps') or 0:.0f} GB/s; "
            f"torch {peers.get('torch', '?')} copy {peers.get('ceilings', {}).get('copy_gbps', 0):.0f} GB/s")
    cols = ["op", "shape", "dtype", "ntkv", "%copy", "peer", "peer time", "speedup", "bar", "ok"]
    lines = []
    for r in rows:
        lines.append([r["op"], r["shape"], r["dtype"], fmt_ms(r["ntkv"]),
                      f"{r['pct']:.0f}%" if r["pct"] is not None else "-", r["peer"],
                      fmt_ms(r["peer_ms"]), f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      r["bar"] or "-", {True: "PASS", False: "FAIL", None: "-"}[r["ok"]]])
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    print(head)
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for l in lines:
        print("  ".join(x.ljust(w) for x, w in zip(l, widths)))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(head + "\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for l in lines:
                f.write("| " + " | ".join(l) + " |\n")
    print(f"bars missed: {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
