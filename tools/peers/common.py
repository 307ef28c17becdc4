"""Shared by the torch peer scripts: CUDA-event timing and the record format.

Each family module (tools/peers/<family>.py) defines `run(p: Peers)` and, for every case the
bench runner times, calls `p.record(...)` with the *same* op, shape and dtype strings as the
ntkv record (see src/bin/ntkv-bench/<family>.rs), so tools/compare.py can join them.
"""

import json
import math
import statistics

import torch


class Peers:
    def __init__(self, reps=20, warmup=3, filters=()):
        self.reps = reps
        self.warmup = warmup
        self.filters = list(filters)
        self.records = []
        self.ceilings = {}
        self.bars = []

    def wants(self, family, op):
        return not self.filters or any(f in op or f == family for f in self.filters)

    # The same sampling as ntkv's bench runner (src/timing.rs): a sample is a run of
    # back-to-back calls spanning at least MIN_SAMPLE_MS (at most MAX_CALLS_PER_SAMPLE), timed
    # by one event pair, so the host's enqueue gap before the first kernel is amortized.
    MIN_SAMPLE_MS = 0.5
    MAX_CALLS_PER_SAMPLE = 64

    def time_ms(self, fn, reps=None, warmup=None):
        """Median per-call time of `reps` CUDA-event-timed samples after `warmup` untimed
        calls. `fn` takes a running call index (to rotate inputs larger than L2)."""
        reps = reps or self.reps
        warmup = self.warmup if warmup is None else warmup
        for i in range(warmup):
            fn(i)
        torch.cuda.synchronize()

        def sample(first, calls):
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            for j in range(calls):
                fn(first + j)
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / calls

        probe = sample(0, 1)
        calls = self.MAX_CALLS_PER_SAMPLE
        if probe > 0:
            calls = max(1, min(self.MAX_CALLS_PER_SAMPLE, math.ceil(self.MIN_SAMPLE_MS / probe)))
        return statistics.median(sample(1 + i * calls, calls) for i in range(reps))

    def record(self, family, op, shape, dtype, peer, ms, min_speedup=None, note=""):
        """One peer timing for the ntkv case (op, shape, dtype). `min_speedup` is the
        issue's bar as peer_ms / ntkv_ms (e.g. 10 for '10x faster', 0.9 for '0.9x the
        throughput')."""
        self.records.append(dict(key=f"{op}|{shape}|{dtype}", family=family, op=op, shape=shape,
                                 dtype=dtype, peer=peer, median_ms=ms, min_speedup=min_speedup,
                                 note=note))
        print(f"  {op:<28} {shape:<34} {dtype:<6} {peer:<32} {ms:9.3f} ms", flush=True)

    def bar_pct_copy(self, op, shape, dtype, min_pct):
        """A bar on ntkv's own record: at least `min_pct`% of the in-run copy bandwidth."""
        self.bars.append(dict(key=f"{op}|{shape}|{dtype}", min_pct_copy=min_pct))

    def dump(self, path):
        with open(path, "w") as f:
            json.dump(dict(tool="ntkv-peers", torch=torch.__version__,
                           device=torch.cuda.get_device_name(), ceilings=self.ceilings,
                           records=self.records, bars=self.bars), f, indent=1)
