"""Torch peers for k-means and cluster retrieval (bench/src/cluster.rs has the same cases).

- kmeans: 32 heads x 32768 keys x 128 into 256 clusters, 10 iterations, f32: the loop a
  ClusterKV-style user writes (torch.cdist, argmin, scatter_add_ of the members' sums and
  counts, empty clusters keep their centroid). Bar: ntkv at least 10x faster.
- cluster_retrieve: one f16 query per head, 32 heads, 1024 centroids per head over a 128k
  cache: scores q.c, a stable descending sort, the cumulative sizes in rank order, and the
  budget prefix (the clusters taken whole and the cut one). Bar: ntkv at least 5x faster.
  ntkv's case does more than the peer: it also expands the taken clusters (and 4 sinks and
  a 64-token window) into the sorted CSR token lists the sparse decode reads.
"""

import torch

FAMILY = "cluster"


def _kmeans(p):
    h, t, d, c, iters = 32, 32768, 128, 256, 10
    x = torch.randn(h, t, d, device="cuda", dtype=torch.float32)
    start = torch.arange(c, device="cuda") * t // c

    def step(_i):
        cent = x[:, start].clone()
        for _ in range(iters):
            lab = torch.cdist(x, cent).argmin(dim=-1)
            sums = torch.zeros_like(cent).scatter_add_(1, lab[..., None].expand(-1, -1, d), x)
            counts = torch.zeros(h, c, device="cuda", dtype=torch.float32).scatter_add_(
                1, lab, torch.ones_like(lab, dtype=torch.float32))
            cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
        return cent, lab

    ms = p.time_ms(step, reps=min(p.reps, 10))
    p.record(FAMILY, "kmeans", "H32 T32768 D128 C256 it10", "f32", "torch cdist/argmin/scatter_add", ms,
             min_speedup=10.0)
    # ntkv's TF32 assignment mode (dtype "f32-tf32") against the same f32 torch loop and bar.
    p.record(FAMILY, "kmeans", "H32 T32768 D128 C256 it10", "f32-tf32", "torch cdist/argmin/scatter_add", ms,
             min_speedup=10.0)
    del x


def _retrieve(p):
    h, c, d, t, budget, sinks, window = 32, 1024, 128, 131072, 2048, 4, 64
    q = torch.randn(h, d, device="cuda", dtype=torch.float16)
    cent = torch.randn(h, c, d, device="cuda", dtype=torch.float32)
    labels = torch.randint(0, c, (h, t), device="cuda")
    sizes = torch.zeros(h, c, device="cuda", dtype=torch.int64).scatter_add_(1, labels, torch.ones_like(labels))
    left = budget - sinks - window

    def step(_i):
        scores = torch.einsum("hd,hcd->hc", q.float(), cent)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        cum = sizes.gather(1, order).cumsum(dim=1)
        whole = cum <= left
        before = cum - sizes.gather(1, order)
        cut = (~whole) & (before < left)
        take = torch.where(whole, sizes.gather(1, order), torch.where(cut, left - before, 0))
        return order, take

    ms = p.time_ms(step)
    p.record(FAMILY, "cluster_retrieve", "B1 Hq32 Hkv32 C1024 T131072 D128 budget2048", "f16",
             "torch einsum + sort + cumsum prefix", ms, min_speedup=5.0)


def run(p):
    if p.wants(FAMILY, "kmeans"):
        _kmeans(p)
    if p.wants(FAMILY, "cluster_retrieve"):
        _retrieve(p)
