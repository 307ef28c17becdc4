"""Torch peers for Quest pages and ShadowKV landmarks (bench/src/pages.rs has the same cases).

- quest_meta: per-page min and max of a [1, 32, 131072, 128] f16 cache, pages of 16, as
  torch amax/amin over a [.., 8192, 16, 128] view. Bar: ntkv at >= 70% of the in-run copy
  bandwidth (no speedup bar: torch is already a bandwidth-bound reduction).
- quest_select: the Quest upper bound sum_d max(q_d max, q_d min) over 8192 pages per head,
  the last page forced, the top 128 pages (torch.topk), expanded to sorted token indices.
  Bar: ntkv at least 5x faster.
- landmark_select: ShadowKV: softmax(q L^T / sqrt(D)) over 16384 chunk landmarks of 8 tokens
  (f32), max over the GQA group of 4, outlier chunks excluded, top 256 chunks, outliers added,
  expanded to sorted tokens (for reference, no bar).
"""

import math

import torch

FAMILY = "pages"


def _expand(blocks, block, length):
    # blocks [rows, k] -> per-row sorted unique token indices (padded -1 entries dropped).
    offs = torch.arange(block, device=blocks.device)
    tok = (blocks[..., None] * block + offs).flatten(1)
    tok = torch.where((blocks[..., None] >= 0).expand(-1, -1, block).flatten(1) & (tok < length), tok,
                      torch.full_like(tok, length))
    return tok.sort(dim=1).values


def run(p):
    dev = "cuda"
    h, t, d, ps = 32, 131072, 128, 16
    npg = t // ps
    if p.wants(FAMILY, "quest_meta"):
        k = torch.randn(1, h, t, d, device=dev, dtype=torch.float16)

        def meta(i):
            v = k.view(1, h, npg, ps, d)
            return v.amax(dim=3), v.amin(dim=3)

        ms = p.time_ms(meta)
        p.record(FAMILY, "quest_meta", "B1 Hkv32 T131072 D128 P16", "f16", "torch amax/amin", ms)
        p.bar_pct_copy("quest_meta", "B1 Hkv32 T131072 D128 P16", "f16", 70)
        del k
    if p.wants(FAMILY, "quest_select"):
        hi = torch.randn(1, h, npg, d, device=dev, dtype=torch.float16)
        lo = torch.minimum(hi, torch.randn_like(hi))
        q = torch.randn(1, h, 1, d, device=dev, dtype=torch.float16)
        budget = 128

        def select(i):
            ub = torch.maximum(q * hi, q * lo).float().sum(dim=-1)  # [1, h, npg]
            ub[..., npg - 1] = float("inf")  # the last page is always kept
            pages = ub.topk(budget, dim=-1).indices.view(h, budget)
            return _expand(pages, ps, t)

        ms = p.time_ms(select)
        p.record(FAMILY, "quest_select", "B1 Hq32 Hkv32 NP8192 D128 top128", "f16", "torch bound + topk", ms,
                 min_speedup=5)
        del hi, lo
    if p.wants(FAMILY, "landmark_select"):
        hq, hkv, nc, budget, n_out = 32, 8, t // 8, 256, 16
        lm = torch.randn(1, hkv, nc, d, device=dev, dtype=torch.float32)
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
        outliers = torch.randint(0, nc, (hkv, n_out), device=dev)
        group = hq // hkv

        def select(i):
            logits = torch.einsum("bhgtd,bhcd->bhgtc", q.float().view(1, hkv, group, 1, d), lm) / math.sqrt(d)
            s = logits.softmax(dim=-1).sum(dim=3).amax(dim=2).view(hkv, nc)
            s = s.scatter(1, outliers, float("-inf"))
            top = s.topk(budget, dim=-1).indices
            return _expand(torch.cat([top, outliers], dim=1), 8, t)

        ms = p.time_ms(select)
        p.record(FAMILY, "landmark_select", "B1 Hq32 Hkv8 NC16384 D128 top256+16", "f16", "torch softmax + topk", ms)
        del lm
