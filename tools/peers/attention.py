"""Torch peers for the block-sparse prefill family (src/bin/ntkv-bench/attention.rs).

Dense cases: SDPA with the flash backend (FA2). Block-sparse cases: FlexAttention under
torch.compile with the *same* 128x128 block mask as ntkv (the hash pattern `listed` below,
pinned against the Rust side), with every listed block marked full except the diagonal of
the causal case (causal mask_mod there), so FlexAttention skips mask evaluation where ntkv
does. Op/shape/dtype strings are identical to the bench runner's.
"""

import torch
import torch.nn.functional as F

FAMILY = "attention"
BLOCK = 128


def listed(r, c, permille):
    """Block (r, c) is listed: the same u32 hash as `listed` in the Rust bench runner."""
    h = ((r * 73856093) & 0xFFFFFFFF) ^ ((c * 19349663) & 0xFFFFFFFF)
    return (h % 1000) < permille


assert [int(listed(3, c, 250)) for c in range(8)] == [0, 1, 1, 1, 0, 0, 1, 0]


def block_lists(n_blocks, pattern, permille):
    """Full blocks per row block and (causal only) the partial diagonal block."""
    r = torch.arange(n_blocks, dtype=torch.int64).view(-1, 1)
    c = torch.arange(n_blocks, dtype=torch.int64).view(1, -1)
    if pattern == "dense":
        full = torch.ones(n_blocks, n_blocks, dtype=torch.bool)
        partial = torch.zeros_like(full)
    elif pattern == "random":
        full = listed(r, c, permille)
        partial = torch.zeros_like(full)
    else:  # causal: lower-triangle sample full, diagonal partial (causal inside)
        full = (c < r) & listed(r, c, permille)
        partial = c == r
    return full, partial


def to_kv_blocks(sel):
    """[n, n] bool -> (num [1,1,n] int32, indices [1,1,n,n] int32), listed blocks first, sorted."""
    n = sel.shape[0]
    num = sel.sum(dim=1).to(torch.int32)
    # Sort key: listed blocks first, in ascending column order.
    key = torch.where(sel, torch.arange(n).view(1, -1), torch.full_like(sel, n, dtype=torch.int64))
    idx = torch.sort(key, dim=1).values.clamp(max=n - 1).to(torch.int32)
    return num.view(1, 1, n).cuda(), idx.view(1, 1, n, n).cuda()


def flex_block_mask(tokens, pattern, permille):
    from torch.nn.attention.flex_attention import BlockMask

    n = tokens // BLOCK
    full, partial = block_lists(n, pattern, permille)
    p_num, p_idx = to_kv_blocks(partial)
    f_num, f_idx = to_kv_blocks(full)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=BLOCK, mask_mod=causal)


def inputs(tokens, heads, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, heads, tokens, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def run(p):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense_case(tokens, dtype, bar):
        op = "prefill_dense"
        shape = f"1x32x{tokens}x128"
        dname = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        if not (p.wants(FAMILY, op) or p.wants(FAMILY, op + "_split")):
            return
        q, k, v = inputs(tokens, 32, 128, dtype)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ms = p.time_ms(lambda i: F.scaled_dot_product_attention(q, k, v))
        p.record(FAMILY, op, shape, dname, "torch SDPA flash", ms, min_speedup=bar)
        if dtype == torch.bfloat16:
            p.record(FAMILY, op + "_split", shape, dname, "torch SDPA flash", ms)
            if tokens == 8192:
                for variant in ("prefill_dense_bc64", "prefill_dense_bc64_split"):
                    p.record(FAMILY, variant, shape, dname, "torch SDPA flash", ms)
        del q, k, v

    dense_case(8192, torch.bfloat16, 0.9)
    dense_case(8192, torch.float16, None)
    dense_case(32768, torch.bfloat16, None)

    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)

    def sparse_case(op, d, pattern, permille, label, dtype, bar):
        shape = f"1x32x32768x{d} b128 {label}"
        dname = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        if not (p.wants(FAMILY, op) or p.wants(FAMILY, op + "_split")):
            return
        bm = flex_block_mask(32768, pattern, permille)
        q, k, v = inputs(32768, 32, d, dtype)
        ms = p.time_ms(lambda i: flex(q, k, v, block_mask=bm))
        p.record(FAMILY, op, shape, dname, "FlexAttention (torch.compile)", ms, min_speedup=bar)
        if dtype == torch.bfloat16:
            p.record(FAMILY, op + "_split", shape, dname, "FlexAttention (torch.compile)", ms)
        del q, k, v

    for d in (128, 64):
        for permille, label in ((125, "12.5%"), (250, "25%"), (500, "50%")):
            bar = 0.8 if (d == 128 and permille == 250) else None
            sparse_case("prefill_bsr", d, "random", permille, label, torch.bfloat16, bar)
        sparse_case("prefill_bsr_causal", d, "causal", 250, "25%tri+diag", torch.bfloat16, None)
    sparse_case("prefill_bsr", 128, "random", 250, "25%", torch.float16, None)
