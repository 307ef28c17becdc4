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

# Every tools/peers/<family>.py except the harness itself, in a fixed order.
FAMILIES = sorted(
    os.path.splitext(f)[0]
    for f in os.listdir(os.path.dirname(os.path.abspath(__file__)))
    if f.endswith(".py") and f not in ("common.py", "run.py")
)
