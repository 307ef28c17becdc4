"""Torch peers for sparse-index decode (src/bin/ntkv-bench/decode.rs has the same cases).

- decode_sparse: 32 heads, 2048 selected tokens per head of a 128k f16 cache, D=128:
  torch.gather of the selected K and V rows + SDPA. Bar: ntkv at least 3x faster.
- decode_full: the whole 128k cache, SDPA (for reference, no bar).
- decode_sparse_gqa: 4 query tokens, 32 query heads over 8 kv heads, bf16, gather + SDPA
  with enable_gqa (for reference, no bar).

The cache is head-major [B, Hkv, T, D], as in ntkv. The sparse cases rotate through 4 index
selections (more than the 60 MB L2 in all), as the bench runner does.
"""

import torch
import torch.nn.functional as F

FAMILY = "decode"
ROTATE = 4
DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _selection(hkv, cache, n, device):
    # n distinct sorted indices per head.
    idx = torch.rand(hkv, cache, device=device).argsort(dim=1)[:, :n]
    return idx.sort(dim=1).values


def _sparse(p, op, shape, dtype, tq, hq, hkv, cache, n, min_speedup):
    dev = "cuda"
    d = 128
    k = torch.randn(1, hkv, cache, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(1, hq, tq, d, device=dev, dtype=dtype)
    sels = [_selection(hkv, cache, n, dev)[None, :, :, None].expand(1, hkv, n, d) for _ in range(ROTATE)]
    gqa = hq != hkv

    def step(i):
        g = sels[i % ROTATE]
        ks = torch.gather(k, 2, g)
        vs = torch.gather(v, 2, g)
        return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=gqa)

    ms = p.time_ms(step)
    name = "torch gather + SDPA" + (" (gqa)" if gqa else "")
    p.record(FAMILY, op, shape, DTYPES[dtype], name, ms, min_speedup=min_speedup)
    del k, v, sels


def run(p):
    if p.wants(FAMILY, "decode_sparse"):
        _sparse(p, "decode_sparse", "B1 Hq32 Hkv32 T131072 D128 sel2048", torch.float16,
                1, 32, 32, 131072, 2048, 3.0)
    if p.wants(FAMILY, "decode_full"):
        k = torch.randn(1, 32, 131072, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
        ms = p.time_ms(lambda i: F.scaled_dot_product_attention(q, k, v))
        p.record(FAMILY, "decode_full", "B1 Hq32 Hkv32 T131072 D128 all", "f16", "torch SDPA", ms)
        del k, v
    if p.wants(FAMILY, "decode_sparse_gqa"):
        _sparse(p, "decode_sparse_gqa", "B1 Tq4 Hq32 Hkv8 T131072 D128 sel2048", torch.bfloat16,
                4, 32, 8, 131072, 2048, None)
