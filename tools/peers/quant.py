"""Torch peers for the quantization family: what a user would write with torch ops.

Same layout as ntkv (src/quant/mod.rs): PerToken int4 group 32 over x[N, 128] f16 gives
codes int32 [N, 16] (code j of a word at bits [4j, 4j+4)), scales and mins f16 [N, 4].
Keys (op | shape | dtype) are identical to src/bin/ntkv-bench/quant.rs.
"""

import torch

FAMILY = "quant"
TOKENS = 4194304
DIM = 128


def shape_key(tokens, bits, group, axis):
    return f"{tokens}x{DIM} g{group} int{bits} {axis}"


def torch_quant_per_token(x, bits, group):
    """Group-wise asymmetric quantization along the last dim, packed into int32 words."""
    n, d = x.shape
    e = 32 // bits
    qmax = (1 << bits) - 1
    xg = x.view(n, d // group, group).float()
    mn = xg.amin(dim=-1, keepdim=True)
    mx = xg.amax(dim=-1, keepdim=True)
    scale = ((mx - mn) / qmax).half()
    mn16 = mn.half()
    s = scale.float()
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    codes = torch.round((xg - mn16.float()) * inv).clamp_(0, qmax).to(torch.int32)
    shifts = torch.arange(0, 32, bits, device=x.device, dtype=torch.int32)
    words = (codes.view(n, d // e, e) << shifts).sum(dim=-1, dtype=torch.int32)
    return words, scale.view(n, -1), mn16.view(n, -1)


def torch_dequant_per_token(words, scale, mn, bits, group):
    n = words.shape[0]
    qmax = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    codes = (words.unsqueeze(-1) >> shifts) & qmax
    codes = codes.view(n, -1, group).to(torch.float16)
    return (codes * scale.unsqueeze(-1) + mn.unsqueeze(-1)).view(n, -1)


def run(p):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.float16)
    bits, group = 4, 32
    key = shape_key(TOKENS, bits, group, "per_token")
    words, scale, mn = torch_quant_per_token(x, bits, group)
    if p.wants(FAMILY, "dequant"):
        ms = p.time_ms(lambda i: torch_dequant_per_token(words, scale, mn, bits, group))
        p.record(FAMILY, "dequant", key, "f16", "torch elementwise", ms, min_speedup=10)
        p.bar_pct_copy("dequant", key, "f16", 70)
    if p.wants(FAMILY, "quant"):
        ms = p.time_ms(lambda i: torch_quant_per_token(x, bits, group), reps=min(p.reps, 10))
        # The default (checked) quantize reads the input twice by design; the bandwidth bar
        # is on the single-pass kernel, which is the same work minus the scan.
        p.record(FAMILY, "quant", key, "f16", "torch ops", ms)
        p.record(FAMILY, "quant_single_pass", key, "f16", "torch ops", ms)
        p.bar_pct_copy("quant_single_pass", key, "f16", 60)
    del x, words, scale, mn
