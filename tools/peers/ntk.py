"""Torch peers for the NTK family (issue 4), on the shapes of src/bin/ntkv-bench/ntk.rs.

- gram: J @ J.T with cuBLAS at the same precision (f32 with TF32 off, tf32 with
  allow_tf32, bf16 on bf16 storage). Bars: ntkv F32 >= 0.8x torch, TF32/BF16 >= 0.6x.
- mlp_entk_full / mlp_entk_trace: torch.func vmap(jacrev) + einsum (the PyTorch NTK tutorial)
  on a ReLU MLP 784-1024-1024-10 at N = 256, Jacobian computed once (x1 = x2). Bars: ntkv
  >= 50x (full) and >= 20x (trace) faster.
"""

import torch

FAMILY = "ntk"
MLP_WIDTHS = [784, 1024, 1024, 10]


def _gram(p):
    if not p.wants(FAMILY, "gram"):
        return
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    for n, P in [(1024, 1 << 20), (4096, 1 << 18)]:
        shape = f"{n}x{P}"
        j = torch.randn(n, P, device="cuda", dtype=torch.float32)
        jb = j.to(torch.bfloat16)
        for dtype, x, tf32, bar in [("f32", j, False, 0.8), ("tf32", j, True, 0.6), ("bf16", jb, False, 0.6)]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = p.time_ms(lambda i: x @ x.T)
            p.record(FAMILY, "gram", shape, dtype, f"torch matmul J@J.T ({dtype})", ms, min_speedup=bar)
        del j, jb, x
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def _mlp(p):
    ops = [op for op in ("mlp_entk_full", "mlp_entk_trace") if p.wants(FAMILY, op)]
    if not ops:
        return
    from torch.func import functional_call, jacrev, vmap

    torch.backends.cuda.matmul.allow_tf32 = False
    n = 256
    layers = []
    for din, dout in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
        layers += [torch.nn.Linear(din, dout), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1]).cuda()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(n, MLP_WIDTHS[0], device="cuda")

    def fnet_single(params, xi):
        return functional_call(net, params, (xi.unsqueeze(0),)).squeeze(0)

    def entk(expr):
        jac = vmap(jacrev(fnet_single), (None, 0))(params, x)
        jac = [j.flatten(2) for j in jac.values()]
        return torch.stack([torch.einsum(expr, j1, j1) for j1 in jac]).sum(0)

    shape = f"{n} " + "-".join(str(w) for w in MLP_WIDTHS)
    for op in ops:
        expr, bar = ("Naf,Mbf->NMab", 50.0) if op == "mlp_entk_full" else ("Naf,Maf->NM", 20.0)
        ms = p.time_ms(lambda i: entk(expr), reps=5, warmup=1)
        p.record(FAMILY, op, shape, "f32", "torch.func vmap(jacrev)+einsum", ms, min_speedup=bar)
        torch.cuda.empty_cache()


def run(p):
    _gram(p)
    _mlp(p)
