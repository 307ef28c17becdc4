"""Torch peers for the policy family: the WindowKV selection, the LazyEviction decode step and
the PrefixKV budget computation a user writes in torch, at the shapes and with the contracts of
src/policy (same op/shape/dtype keys as bench/src/policy.rs). The issue's bar: each of ours at
most 1/4 of the torch pipeline's time (min_speedup 4).
"""

import math

import torch

from topk import causal_mask

FAMILY = "policy"

# WindowKV: 32 heads, observation window 32 over 32k keys, D = 128, windows of 8, keep 2048.
WINDOWKV = dict(hq=32, hkv=32, w=32, t=32768, d=128, win=8, budget=2048)
# LazyEviction: H2O's cache, one decode query, keep 2048 with 64 recent, evicting (lag 1).
LAZY = dict(hq=32, hkv=32, tq=1, t=32768, d=128, budget=2048, recent=64, threshold=1e-4)
# PrefixKV: 32 layers of 16384 tokens, 2048 per layer on average.
PREFIX = dict(rows=32, n=16384, budget=32 * 2048)


# The bench runner's shape keys (bench/src/policy.rs).
SHAPE = {
    "windowkv_select": "hq{hq} hkv{hkv} w{w} t{t} d{d} win{win} keep{budget}".format(**WINDOWKV),
    "lazy_step": "hq{hq} hkv{hkv} tq{tq} t{t} d{d} keep{budget} recent{recent} lag1".format(**LAZY),
    "prefixkv_budgets": "{rows}x{n} keep{budget}".format(**PREFIX),
}


def windowkv_step(q, k, mask, c, scale):
    older, w = c["t"] - c["w"], c["win"]
    logits = (torch.matmul(q, k.transpose(1, 2)).float() * scale).masked_fill(~mask, float("-inf"))
    votes = torch.softmax(logits, dim=-1)[..., :older].sum(dim=1)  # [hkv, older]
    nw = -(-older // w)
    padded = torch.nn.functional.pad(votes, (0, nw * w - older))
    sums = padded.view(votes.shape[0], nw, w).sum(dim=-1)
    m = (c["budget"] - c["w"]) // w
    sel = torch.topk(sums, m, dim=-1, sorted=False).indices  # [hkv, m]
    tok = (sel.unsqueeze(-1) * w + torch.arange(w, device=q.device)).flatten(1)
    tok = torch.where(tok < older, tok, older + c["w"])  # a short last window's tail sorts last
    recent = torch.arange(older, c["t"], device=q.device).expand(votes.shape[0], -1)
    return torch.cat([tok.sort(dim=-1).values, recent], dim=-1)


def lazy_step(q, k, v, acc, lh, mri, c, scale, step):
    s = torch.matmul(q, k.transpose(1, 2)).float() * scale  # [hkv, 1, t]
    p = torch.softmax(s, dim=-1).sum(dim=1)  # [hkv, t]
    acc += p
    hit = p >= c["threshold"]
    mri.copy_(torch.where(hit, torch.maximum(mri, step - lh), mri))
    lh.copy_(torch.where(hit, torch.full_like(lh, step), lh))
    older = c["t"] - c["recent"]
    score = mri[:, :older] - (step - lh[:, :older])
    sel = torch.topk(score, c["budget"] - c["recent"], dim=-1, sorted=False).indices.sort(dim=-1).values
    recent = torch.arange(older, c["t"], device=q.device).expand(score.shape[0], -1)
    keep = torch.cat([sel, recent], dim=-1)  # [hkv, budget]
    rows = keep.unsqueeze(-1).expand(-1, -1, k.shape[-1])
    k[:, : c["budget"]] = torch.gather(k, 1, rows)
    v[:, : c["budget"]] = torch.gather(v, 1, rows)
    for x in (acc, lh, mri):
        x[:, : c["budget"]] = torch.gather(x, 1, keep)
    return keep


def prefix_step(imp, c):
    vals, order = torch.sort(imp, dim=-1, descending=True, stable=True)
    mass = torch.where(torch.isfinite(vals) & (vals > 0), vals, torch.zeros_like(vals)).double()
    cum = mass.cumsum(dim=-1)
    total = cum[:, -1:]
    e = torch.cat([torch.zeros_like(total), cum[:, :-1] / total.clamp_min(1e-300)], dim=-1)
    ratio = torch.kthvalue(e.flatten(), c["budget"]).values
    below = (e < ratio).sum(dim=-1)
    equal = (e == ratio).sum(dim=-1)
    rem = c["budget"] - below.sum()
    before = torch.cumsum(equal, 0) - equal
    budgets = below + torch.clamp(rem - before, min=0).minimum(equal)
    kept = torch.arange(imp.shape[1], device=imp.device).unsqueeze(0) < budgets.unsqueeze(1)
    flags = torch.zeros_like(kept).scatter_(1, order, kept)
    return budgets, flags.nonzero()


def run(p):
    dev = "cuda"
    if p.wants(FAMILY, "windowkv_select"):
        c = WINDOWKV
        qk = [torch.randn(h, n, c["d"], device=dev, dtype=torch.float16) for h, n in ((c["hq"], c["w"]), (c["hkv"], c["t"]))]
        args = (*qk, causal_mask(c["w"], c["t"], dev), c, 1.0 / math.sqrt(c["d"]))
        p.record(FAMILY, "windowkv_select", SHAPE["windowkv_select"], "f16", "torch matmul+softmax+window sum+topk+expand",
                 p.time_ms(lambda i: windowkv_step(*args)), min_speedup=4)
        del qk, args
    torch.cuda.empty_cache()
    if p.wants(FAMILY, "lazy_step"):
        c = LAZY
        q = torch.randn(c["hq"], 1, c["d"], device=dev, dtype=torch.float16)
        k = torch.randn(c["hkv"], c["t"], c["d"], device=dev, dtype=torch.float16)
        v = torch.randn(c["hkv"], c["t"], c["d"], device=dev, dtype=torch.float16)
        acc, lh, mri = (torch.zeros(c["hkv"], c["t"], device=dev) for _ in range(3))
        scale = 1.0 / math.sqrt(c["d"])
        ms = p.time_ms(lambda i: lazy_step(q, k, v, acc, lh, mri, c, scale, 0.0))
        p.record(FAMILY, "lazy_step", SHAPE["lazy_step"], "f16",
                 "torch matmul+softmax+state update+topk+gather", ms, min_speedup=4)
        del q, k, v, acc, lh, mri
    torch.cuda.empty_cache()
    if p.wants(FAMILY, "prefixkv_budgets"):
        c = PREFIX
        imp = torch.rand(c["rows"], c["n"], device=dev)
        ms = p.time_ms(lambda i: prefix_step(imp, c))
        p.record(FAMILY, "prefixkv_budgets", SHAPE["prefixkv_budgets"], "f32",
                 "torch sort+cumsum+kthvalue+scatter", ms, min_speedup=4)
        del imp
    torch.cuda.empty_cache()
