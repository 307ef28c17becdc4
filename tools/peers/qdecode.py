"""Torch peers for the fused quantized decode (bench/src/qdecode.rs has the same cases).

1 query x 32 heads (MHA, D=128) over 128k tokens whose K is quantized per channel and V per
token (KIVI's layout), group 32: torch unpacks and dequantizes both to f16 (the same
fma(code, scale, min) arithmetic) and runs SDPA. Bars (issue 11): int4 at least 40x torch and
70% of the in-run copy bandwidth on the compressed bytes; int2 60%; MiKV with 10% important
f16 rows 60%. int8 and ntkv's own f16 decode are for reference (the issue's "int4 at least
3x ntkv's f16 decode" bar is read from the bench runner's two records).
"""

import torch
import torch.nn.functional as F

FAMILY = "qdecode"
H, T, D, G = 32, 131072, 128, 32
SHAPE = f"B1 Hq32 Hkv32 T{T} D{D} g{G}"


def _words(h, rows, cols, device):
    return torch.randint(-(2**31), 2**31 - 1, (h, rows, cols), device=device, dtype=torch.int32)


def dequant_per_channel(words, scale, mn, bits, group):
    """words [H, T/E, D] (E tokens of one channel per word), scale/mn [H, T/group, D] f16."""
    h, r, d = words.shape
    e = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32).view(1, 1, e, 1)
    codes = ((words.unsqueeze(2) >> shifts) & ((1 << bits) - 1)).view(h, r * e, d).float()
    s = scale.float().repeat_interleave(group, dim=1)
    m = mn.float().repeat_interleave(group, dim=1)
    return torch.addcmul(m, codes, s).half()


def dequant_per_token(words, scale, mn, bits, group):
    """words [H, T, D/E] (E channels of one token per word), scale/mn [H, T, D/group] f16."""
    h, t, w = words.shape
    e = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(h, t, -1, group).float()
    out = torch.addcmul(mn.float().unsqueeze(-1), codes, scale.float().unsqueeze(-1))
    return out.view(h, t, w * e).half()


def _kivi(p, op, bits, min_speedup, min_pct):
    dev = "cuda"
    e = 32 // bits
    kw, vw = _words(H, T // e, D, dev), _words(H, T, D // e, dev)
    ks = torch.rand(H, T // G, D, device=dev, dtype=torch.float16) * 0.1
    km = -torch.rand_like(ks)
    vs = torch.rand(H, T, D // G, device=dev, dtype=torch.float16) * 0.1
    vm = -torch.rand_like(vs)
    q = torch.randn(1, H, 1, D, device=dev, dtype=torch.float16)

    def step(i):
        k = dequant_per_channel(kw, ks, km, bits, G)
        v = dequant_per_token(vw, vs, vm, bits, G)
        return F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0))

    ms = p.time_ms(step, reps=min(p.reps, 10))
    p.record(FAMILY, op, SHAPE, "f16", "torch dequant + SDPA", ms, min_speedup=min_speedup)
    if min_pct is not None:
        p.bar_pct_copy(op, SHAPE, "f16", min_pct)
    del kw, vw, ks, km, vs, vm


def run(p):
    if not torch.cuda.is_available():
        return
    if p.wants(FAMILY, "qdecode_kivi_int4"):
        _kivi(p, "qdecode_kivi_int4", 4, 40.0, 70)
    if p.wants(FAMILY, "qdecode_kivi_int2"):
        _kivi(p, "qdecode_kivi_int2", 2, None, 60)
    if p.wants(FAMILY, "qdecode_kivi_int8"):
        _kivi(p, "qdecode_kivi_int8", 8, None, None)
    if p.wants(FAMILY, "qdecode_mikv_int4_imp10"):
        # MiKV's torch path is the same dequant + SDPA over the mixed cache (the important
        # rows are a scatter on top, left out here in the peer's favour).
        _kivi(p, "qdecode_mikv_int4_imp10", 4, None, 60)
    if p.wants(FAMILY, "qdecode_f16_decode"):
        k = torch.randn(1, H, T, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.float16)
        ms = p.time_ms(lambda i: F.scaled_dot_product_attention(q, k, v))
        p.record(FAMILY, "qdecode_f16_decode", SHAPE, "f16", "torch SDPA (f16 cache)", ms)
        del k, v
