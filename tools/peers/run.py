#!/usr/bin/env python3
"""Runs the torch peers for every family on the same shapes as ntkv-bench.

    python3 tools/peers/run.py --json peers.json [--filter OP ...]

Needs torch with CUDA. Measures the ceilings too (copy bandwidth, GEMM rates) so every
ratio in tools/compare.py comes from one run on one machine.
"""

import argparse
import importlib
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import Peers  # noqa: E402

FAMILIES = ["quant", "topk"]


def ceilings(p):
    n = 1 << 30  # 1 GiB of f32 per side
    a = torch.empty(n // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = p.time_ms(lambda i: b.copy_(a))
    p.ceilings["copy_gbps"] = 2 * n / (ms * 1e-3) / 1e9
    print(f"torch copy ceiling: {p.ceilings['copy_gbps']:.1f} GB/s", flush=True)
    del a, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--filter", action="append", default=[])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    p = Peers(reps=args.reps, filters=args.filter)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    ceilings(p)
    failed = False
    for fam in FAMILIES:
        try:
            importlib.import_module(fam).run(p)
        except Exception:
            traceback.print_exc()
            failed = True
        torch.cuda.empty_cache()
    p.dump(args.json)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
