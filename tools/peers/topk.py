"""Torch peers for the top-k family: torch.topk, and the H2O and SnapKV pipelines a user
writes in torch (matmul, softmax, sum, topk). Same op/shape/dtype keys as
src/bin/ntkv-bench/topk.rs.
"""

import math

import torch
import torch.nn.functional as F

FAMILY = "topk"

# (rows, n, k, dtype, min_speedup): the bars are 5x on the three f32 shapes.
TOPK_CASES = [
    (32, 131072, 2048, torch.float32, 5),
    (32, 131072, 2048, torch.float16, None),
    (32, 131072, 2048, torch.bfloat16, None),
    (256, 32768, 1024, torch.float32, 5),
    (32, 1048576, 8192, torch.float32, 5),
    (1, 1048576, 4096, torch.float32, None),
]
DTYPE_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# H2O: 32 heads (MHA), 16 new queries over 32k keys, D = 128, keep 2048 with 64 recent.
H2O = dict(hq=32, hkv=32, tq=16, t=32768, d=128, budget=2048, recent=64)
# SnapKV: 32 heads, window 32 over 32k keys, D = 128, pool 5, keep 2048.
SNAPKV = dict(hq=32, hkv=32, w=32, t=32768, d=128, capacity=2048)


def topk_shape(rows, n, k):
    return f"{rows}x{n} k{k}"


def h2o_shape(c):
    return (f"hq{c['hq']} hkv{c['hkv']} tq{c['tq']} t{c['t']} d{c['d']} "
            f"keep{c['budget']} recent{c['recent']}")


def snapkv_shape(c):
    return f"hq{c['hq']} hkv{c['hkv']} w{c['w']} t{c['t']} d{c['d']} keep{c['capacity']} pool5"


def rotation(nbytes):
    """Copies to cycle through more than the 60 MB L2, as the bench runner does."""
    return max(1, min(8, -(-(128 << 20) // max(1, nbytes))))


def causal_mask(tq, t, device):
    # Query i sits at position t - tq + i and sees keys j <= t - tq + i.
    pos = torch.arange(t - tq, t, device=device).unsqueeze(1)
    return torch.arange(t, device=device).unsqueeze(0) <= pos  # [tq, t]


def h2o_step(q, k, acc, mask, c, scale):
    # q [hq, tq, d], k [hkv, t, d] with hq == hkv here (MHA); acc [hkv, t] f32.
    s = torch.matmul(q, k.transpose(1, 2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    acc += p.sum(dim=1)
    older = c["t"] - c["recent"]
    sel = torch.topk(acc[:, :older], c["budget"] - c["recent"], dim=-1, sorted=False).indices
    recent = torch.arange(older, c["t"], device=q.device).expand(acc.shape[0], -1)
    return torch.cat([sel.sort(dim=-1).values, recent], dim=-1)


def snapkv_step(q, k, mask, c, scale):
    s = torch.matmul(q, k.transpose(1, 2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    a = torch.softmax(s, dim=-1)
    older = c["t"] - c["w"]
    votes = a[..., :older].sum(dim=1)  # [hkv, older]
    pooled = F.avg_pool1d(votes.unsqueeze(1), kernel_size=5, stride=1, padding=2).squeeze(1)
    sel = torch.topk(pooled, c["capacity"] - c["w"], dim=-1, sorted=False).indices
    window = torch.arange(older, c["t"], device=q.device).expand(votes.shape[0], -1)
    return torch.cat([sel.sort(dim=-1).values, window], dim=-1)


def run(p):
    dev = "cuda"
    if p.wants(FAMILY, "topk"):
        for rows, n, k, dtype, bar in TOPK_CASES:
            copies = rotation(rows * n * torch.finfo(dtype).bits // 8)
            xs = [torch.randn(rows, n, device=dev, dtype=torch.float32).to(dtype) for _ in range(copies)]
            ms = p.time_ms(lambda i: torch.topk(xs[i % copies], k, dim=-1, sorted=False))
            p.record(FAMILY, "topk", topk_shape(rows, n, k), DTYPE_NAME[dtype],
                     "torch.topk(sorted=False)", ms, min_speedup=bar)
            del xs
    torch.cuda.empty_cache()
    if p.wants(FAMILY, "h2o_accumulate_select"):
        c = H2O
        q = torch.randn(c["hq"], c["tq"], c["d"], device=dev, dtype=torch.float16)
        k = torch.randn(c["hkv"], c["t"], c["d"], device=dev, dtype=torch.float16)
        acc = torch.zeros(c["hkv"], c["t"], device=dev, dtype=torch.float32)
        mask = causal_mask(c["tq"], c["t"], dev)
        scale = 1.0 / math.sqrt(c["d"])
        ms = p.time_ms(lambda i: h2o_step(q, k, acc, mask, c, scale))
        p.record(FAMILY, "h2o_accumulate_select", h2o_shape(c), "f16",
                 "torch matmul+softmax+sum+topk", ms, min_speedup=4)
        del q, k, acc
    torch.cuda.empty_cache()
    if p.wants(FAMILY, "snapkv_select"):
        c = SNAPKV
        q = torch.randn(c["hq"], c["w"], c["d"], device=dev, dtype=torch.float16)
        k = torch.randn(c["hkv"], c["t"], c["d"], device=dev, dtype=torch.float16)
        mask = causal_mask(c["w"], c["t"], dev)
        scale = 1.0 / math.sqrt(c["d"])
        ms = p.time_ms(lambda i: snapkv_step(q, k, mask, c, scale))
        p.record(FAMILY, "snapkv_select", snapkv_shape(c), "f16",
                 "torch matmul+softmax+pool+topk", ms, min_speedup=4)
        del q, k
    torch.cuda.empty_cache()
