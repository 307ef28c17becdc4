"""Torch peers for the low-rank (ShadowKV) family (bench/src/lowrank.rs has the same cases).

- lowrank_factor: rank-160 factorization of a 32768 x 1024 f32 matrix with
  torch.svd_lowrank(q=160, niter=2). Bar: ntkv at least 4x faster (and its error within 1%
  of optimal, checked by tests/lowrank_gpu.rs).
- lowrank_rope: rebuild 2048 selected tokens x 8 kv heads from U [128k, 160] and
  SV [8, 160, 128] bf16 with index_select + einsum, then rotate-half RoPE from integer
  positions (f32 angles). Bar: ntkv at least 10x faster. Rotates through 4 selections.
"""

import torch

FAMILY = "lowrank"
ROTATE = 4


def _rope(x, pos, base=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[..., None] * inv  # [H, n, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def run(p):
    dev = "cuda"
    if p.wants(FAMILY, "lowrank_factor"):
        a = torch.randn(32768, 1024, device=dev, dtype=torch.float32)
        ms = p.time_ms(lambda i: torch.svd_lowrank(a, q=160, niter=2))
        p.record(FAMILY, "lowrank_factor", "T32768 N1024 r160", "f32", "torch.svd_lowrank(niter=2)", ms,
                 min_speedup=4.0)
        del a
    if p.wants(FAMILY, "lowrank_rope"):
        t, hkv, d, r, n = 131072, 8, 128, 160, 2048
        u = torch.randn(t, r, device=dev, dtype=torch.bfloat16)
        sv = torch.randn(hkv, r, d, device=dev, dtype=torch.bfloat16)
        sels = [torch.rand(hkv, t, device=dev).argsort(dim=1)[:, :n].sort(dim=1).values for _ in range(ROTATE)]

        def step(i):
            pos = sels[i % ROTATE]
            rows = torch.index_select(u, 0, pos.reshape(-1)).view(hkv, n, r)
            k = torch.einsum("hnr,hrd->hnd", rows, sv)
            return _rope(k, pos)

        ms = p.time_ms(step)
        p.record(FAMILY, "lowrank_rope", "T131072 Hkv8 D128 r160 sel2048", "bf16",
                 "torch index_select + einsum + rope", ms, min_speedup=10.0)
        del u, sv, sels
