"""The launch table: the block size and dynamic shared memory each kernel is launched with.

This is the one place the report keeps them. Every entry names where the launcher defines
the value, and the report checks it there on every run, so the table cannot drift silently:

- `Const(path, NAME)`: `const NAME: <ty> = <value>;` in that Rust file must equal the value;
- `Text(path, text)`: the Rust file must contain that expression (for values computed from
  the shape, such as attention's `block_rows * 2`);
- `Lit(path, value)`: the Rust file launches some kernel with that block size: a
  `block_dim: (value, 1, 1)`, a `launch::grid_for`/`grid_2d`/`resident_grid_2d` call whose
  block argument is `value` or a constant equal to it, or a `const …: u32 = value;`.

On top of that, a block size must equal the kernel's `__launch_bounds__` maximum when it has
one (read from the cubin), every kernel in cuda/*.cu must match exactly one entry, and where
`ntkv-bench --geometry` reports a block or dynamic shared memory for a launch, it must equal
the table's. Any mismatch makes the report exit 2.

`dyn` is the dynamic shared memory in bytes; `None` with a `dyn_note` means it depends on the
shape (the per-shape rows then carry the planner's value; the per-kernel row assumes 0).
"""

import re
from collections import namedtuple

Const = namedtuple("Const", "path name")
Text = namedtuple("Text", "path text")
Lit = namedtuple("Lit", "path value")


class LitBlock(int):
    """A literal block size to find in a launcher (see the module docs)."""

    def found_in(self, text):
        v = int(self)
        if f"block_dim: ({v}, 1, 1)" in text or re.search(rf"\bconst \w+: u32 = {v};", text):
            return True
        return re.search(rf"\b(?:grid_for|grid_stride|grid_stride_kernel|grid_2d|resident_grid_2d)\([^;]*?,\s*{v}\s*,", text, re.S) is not None

    def __repr__(self):
        return f"a launch with {int(self)} threads"


class Entry:
    def __init__(self, pattern, block, dyn=0, checks=(), source="", dyn_note=None, static_max=None):
        self.pattern = pattern
        # The static shared memory the launcher budgets next to the dynamic part (it must be at
        # least what ptxas reports, or the launcher's staging size is too large to launch).
        self.static_max = static_max
        self._block = block
        self._dyn = dyn
        self.checks = checks
        self.source = source
        self.smem_note = dyn_note

    def block_for(self, g):
        return self._block(g) if callable(self._block) else self._block

    def smem_for(self, g):
        return self._dyn(g) if callable(self._dyn) else self._dyn

    def rust_checks(self, g):
        """(path, const name or None, wanted value or text) for the report to verify."""
        out = []
        for c in self.checks:
            if isinstance(c, Const):
                want = self.block_for(g) if c.name.endswith("THREADS") else None
                out.append((c.path, c.name, want if want is not None else CONST_VALUES[c.name]))
            elif isinstance(c, Text):
                out.append((c.path, None, c.text))
            elif isinstance(c, Lit):
                out.append((c.path, None, LitBlock(c.value)))
        return out


# Values of the non-thread constants the formulas below use (checked in the sources).
CONST_VALUES_TF32_RING = 27648  # cluster.cu TF32_RING_BYTES: 3 stages x 64 rows x 36 words x 4 B
CONST_VALUES = {
    "TF32_ASSIGN_SMEM": CONST_VALUES_TF32_RING,
    "ROWS_PER_CTA": 16,
    "TILE_TOKENS": 64,
    "SMEM_FFMA": 67584,
    "SMEM_TF32": 73728,
    "SMEM_BF16": 40960,
    "SMEM_TF32_ASYNC": 110592,
    "SMEM_BF16_ASYNC": 81920,
    # top-k finalize/fused: the static shared memory TopkPlan::run budgets, and the staging cap
    # (bench/src/geometry.rs mirrors the same values).
    "FINAL_STATIC_SMEM": 2048,
    "FUSED_STATIC_SMEM": 18432,
    "CAND_STAGE_MAX": 8192,
    "SMEM_OPTIN": 232448,
}

TOPK = "src/topk/gpu.rs"
SELECT = "src/select/gpu.rs"
QUANT = "src/quant/gpu.rs"
DECODE = "src/decode/gpu.rs"
DECODE_MOD = "src/decode/mod.rs"
ATTN = "src/attention/plan.rs"
NTK = "src/ntk/gpu.rs"
GEMM = "src/gemm/gpu.rs"
LOWRANK = "src/lowrank/gpu.rs"
GEOMETRY = "bench/src/geometry.rs"
CLUSTER = "src/cluster/gpu.rs"
PAGES = "src/pages/gpu.rs"
QDECODE = "src/qdecode/gpu.rs"
POLICY = "src/policy/gpu.rs"
# The geometry step's copies of the top-k finalize constants must match the launcher's.
TOPK_FINAL_COPIES = [Const(GEOMETRY, n) for n in ("FINAL_STATIC_SMEM", "FUSED_STATIC_SMEM", "CAND_STAGE_MAX",
                                                  "SMEM_OPTIN")]


def _decode_smem(g):
    """attn_smem_bytes(d) of src/decode/gpu.rs (also checked against the geometry's value)."""
    r, tk, d = CONST_VALUES["ROWS_PER_CTA"], CONST_VALUES["TILE_TOKENS"], g["d"]
    return r * d * 4 + r * tk * 4 + 3 * r * 4 + r * 8 + 2 * tk * 4 + 2 * 2 * tk * (d + 8) * 2


def _gemm_smem(g):
    key = {"ffma": "SMEM_FFMA", "tf32": "SMEM_TF32", "bf16": "SMEM_BF16"}[g["prec"]]
    if g.get("async"):
        key += "_ASYNC"
    return CONST_VALUES[key]


def _gemm_checks():
    return [Const(GEMM, n) for n in ("SMEM_FFMA", "SMEM_TF32", "SMEM_BF16", "SMEM_TF32_ASYNC", "SMEM_BF16_ASYNC")] + [
        Text(GEMM, '(id.variant("tf32_async"), SMEM_TF32_ASYNC, 128)'),
        Text(GEMM, '(id.variant("ffma"), SMEM_FFMA, 256)'),
    ]


DT = r"(?P<dt>f16|bf16|f32)"

LAUNCHES = [
    # common
    Entry(r"ntkv_copy_vec16", 256, 0, [Lit("src/timing.rs", 256)], "timing::copy (copy ceiling)"),
    Entry(r"ntkv_find_nonfinite", 256, 0, [Lit("src/checks.rs", 256)], "checks (NaN/Inf scan)"),
    # quant: every launch goes through quant::gpu::grid with THREADS
    Entry(rf"ntkv_quant_(?:quantize|dequantize)_(?:token|channel)_{DT}", 256, 0, [Const(QUANT, "THREADS")],
          "quant::gpu::grid"),
    Entry(rf"ntkv_quant_scan_{DT}", 256, 0, [Const(QUANT, "THREADS")], "quant::gpu::scan_range"),
    Entry(r"ntkv_mikv_(?:gather|scatter|residual|append)", 256, 0, [Const(QUANT, "THREADS")], "quant::gpu (MiKV)"),
    # top-k
    Entry(rf"ntkv_topk_(?:hist|filter)_{DT}", 512, 0, [Const(SELECT, "HIST_THREADS")], "select::TopkPlan::run"),
    Entry(rf"ntkv_topk_finalize_{DT}", 1024, None,
          [Const(SELECT, "FINAL_THREADS"), Const(SELECT, "FINAL_STATIC_SMEM"), Const(SELECT, "CAND_STAGE_MAX"),
           *TOPK_FINAL_COPIES],
          "select::TopkPlan::run", dyn_note="(kpad+stage)·8", static_max=CONST_VALUES["FINAL_STATIC_SMEM"]),
    Entry(rf"ntkv_topk_fused_{DT}", 1024, None,
          [Const(SELECT, "FINAL_THREADS"), Const(SELECT, "FUSED_STATIC_SMEM"), Const(SELECT, "CAND_STAGE_MAX"),
           *TOPK_FINAL_COPIES],
          "select::TopkPlan::run", dyn_note="(kpad+stage)·8", static_max=CONST_VALUES["FUSED_STATIC_SMEM"]),
    Entry(rf"ntkv_select_(?:pad_segments|truncate)_{DT}", 256, 0, [Const(SELECT, "SELECT_THREADS")],
          "select::SegmentTopkPlan::run"),
    Entry(r"ntkv_select_expand_count", 256, None, [Const(SELECT, "SELECT_THREADS")], "select::ExpandPlan::run",
          dyn_note="kbpad·8"),
    Entry(r"ntkv_select_expand_write", 256, 0, [Const(SELECT, "SELECT_THREADS")], "select::ExpandPlan::run"),
    Entry(r"ntkv_select_expand_scan", 1024, 0, [Const(SELECT, "SCAN_THREADS")], "select::ExpandPlan::run (one block)"),
    Entry(r"ntkv_topk_fill_recent", 256, 0, [Lit(TOPK, 256)], "topk::gpu::fill_recent"),
    Entry(r"ntkv_h2o_(?:pass1|pass2)_(?P<dt>f16|bf16)_d(?P<d>\d+)", 128, 0, [Const(TOPK, "H2O_THREADS")],
          "topk::gpu::accumulate"),
    Entry(r"ntkv_h2o_merge", 256, 0, [Lit(TOPK, 256)], "topk::gpu::accumulate (three-launch path)"),
    Entry(r"ntkv_snapkv_pool", 256, 0, [Lit(TOPK, 256)], "topk::gpu::pool5"),
    Entry(r"ntkv_h2o_check_keep", 256, 0, [Lit(TOPK, 256)], "keep-list validator"),
    Entry(r"ntkv_h2o_compact", 256, None, [Lit(TOPK, 256), Text(TOPK, "(2 * chunk_rows * row_words + chunk_rows) * 4")],
          "topk::gpu::compact", dyn_note="≤64 KiB"),
    Entry(r"ntkv_h2o_gather", 256, 0, [Lit(TOPK, 256)], "topk::gpu::gather"),
    # attention: BR·2 threads, double-buffered K and V tiles of BC rows of D + 8 elements
    Entry(r"ntkv_attention_prefill_(?P<dt>f16|bf16)_d(?P<d>\d+)_br(?P<br>\d+)_bc(?P<bc>\d+)(?:_split)?",
          lambda g: 2 * g["br"], lambda g: 4 * g["bc"] * (g["d"] + 8) * 2,
          [Text(ATTN, "self.host.block_rows * 2"), Text(ATTN, "4 * self.block_cols * (self.shape.head_dim + 8) * 2")],
          "PrefillPlan::run"),
    # decode
    Entry(r"ntkv_decode_attn_(?P<dt>f16|bf16)_d(?P<d>\d+)", 128, _decode_smem,
          [Const(DECODE, "ATTN_THREADS"), Const(DECODE_MOD, "ROWS_PER_CTA"), Const(DECODE_MOD, "TILE_TOKENS"),
           Text(DECODE, "let per_d = r * 4 + 2 * 2 * tk * 2;"),
           Text(DECODE, "r * tk * 4 + 3 * r * 4 + r * 8 + 2 * tk * 4 + 2 * 2 * tk * 8 * 2")],
          "DecodePlan::run"),
    Entry(r"ntkv_decode_validate", 256, 0, [Const(DECODE, "VALIDATE_THREADS")], "decode index validator"),
    # ntk
    Entry(r"ntkv_(?:ntk_)?gemm_(?:f32|bf16)_(?P<prec>ffma|tf32|bf16)", 256, _gemm_smem, _gemm_checks(),
          "gemm::GemmPlan::run"),
    Entry(r"ntkv_ntk_gemm_(?:f32|bf16)_(?P<prec>tf32|bf16)_(?P<async>async)", 128, _gemm_smem, _gemm_checks(),
          "gemm::GemmPlan::run (cp.async)"),
    Entry(r"ntkv_gemm_reduce", 256, 0, [Const(GEMM, "THREADS")], "gemm split-K reduction"),
    Entry(r"ntkv_ntk_(?:reduce|presum_f32|presum_bf16|combine|bias_act|cotangent|jvp|stats|stats_finish|means"
          r"|grand_mean)", 256, 0, [Const(GEMM, "THREADS")], "ntk::gpu (gemm::gpu::THREADS)"),
    # cluster: k-means and cluster retrieval
    Entry(rf"ntkv_kmeans_(?:init|norms|update)_{DT}", 128, 0, [Const(CLUSTER, "ROW_THREADS")],
          "cluster::KmeansPlan::run"),
    Entry(rf"ntkv_kmeans_assign_{DT}", 256, 0, [Const(CLUSTER, "ASSIGN_THREADS")],
          "cluster::KmeansPlan::run / assign_appended"),
    Entry(rf"ntkv_kmeans_assign_tf32_d(?:64|128)_{DT}", 256, CONST_VALUES_TF32_RING,
          [Const(CLUSTER, "ASSIGN_THREADS"), Const(CLUSTER, "TF32_ASSIGN_SMEM")],
          "cluster::KmeansPlan (AssignPrecision::Tf32)", dyn_note="3-stage ring"),
    Entry(r"ntkv_kmeans_sort", 256, 0, [Const(CLUSTER, "LIST_THREADS")], "cluster::KmeansPlan (one CTA per head)"),
    Entry(rf"ntkv_cluster_score_{DT}", 128, 0, [Const(CLUSTER, "ROW_THREADS")], "cluster::RetrievePlan::run"),
    Entry(r"ntkv_cluster_mark", 256, None, [Const(CLUSTER, "LIST_THREADS"), Text(CLUSTER, "(clusters + 1) * 4")],
          "cluster::RetrievePlan::run", dyn_note="(C+1)·4"),
    Entry(r"ntkv_cluster_write", 256, 0, [Const(CLUSTER, "LIST_THREADS")], "cluster::RetrievePlan::run"),
    # pages: every kernel 256 threads, grid-stride over a resident grid, no dynamic shared memory
    Entry(rf"ntkv_pages_(?:quest_meta|quest_score|landmark|shadow_logits)_{DT}", 256, 0,
          [Const(PAGES, "PAGES_THREADS")], "pages plans (Typed::load grids)"),
    Entry(r"ntkv_pages_shadow_(?:softmax|score|mark)", 256, 0, [Const(PAGES, "PAGES_THREADS")],
          "pages::LandmarkSelectPlan::run"),
    # lowrank: static shared memory only (the rank chunk, U tile and SV chunk)
    Entry(r"ntkv_lowrank_rope_(?P<dt>f16|bf16|f32)_d(?P<d>\d+)", 256, 0, [Const(LOWRANK, "THREADS")],
          "ReconstructPlan::run", static_max=48 * 1024),
    Entry(r"ntkv_lowrank_(?:gather|widen|narrow)_(?:f16|bf16|f32)", 256, 0, [Const(LOWRANK, "THREADS")],
          "lowrank::gpu (gather_values, FactorPlan casts)"),
    # qdecode: 128 threads, static shared memory only (the warps' partial states)
    Entry(r"ntkv_qdecode_attn_(?P<dt>f16|bf16)_d(?P<d>\d+)_r(?P<r>1|8)", 128, 0, [Const(QDECODE, "ATTN_THREADS")],
          "QdecodePlan::run"),
    # The fast KIVI-layout kernel: 256 threads, static shared memory only
    Entry(r"ntkv_qdecode_fast_(?P<dt>f16|bf16)_d(?P<d>\d+)_b(?P<b>2|4|8)_g(?P<g>32|64|128)", 256, 0,
          [Const(QDECODE, "FAST_THREADS")], "QdecodePlan::run (fast path)"),
    # The merge runs head_dim threads; the table assumes D = 128 (the bench shapes).
    Entry(r"ntkv_qdecode_merge_(?P<dt>f16|bf16)", 128, 0,
          [Text(QDECODE, 'to_u32("head_dim", shape.head_dim)?, 0, heads * rows, false)')], "QdecodePlan::run (D threads)"),
    # policy: 256 threads, grid-stride or one block per row, static shared memory only
    Entry(r"ntkv_policy_(?:window_sums|lazy_update|prefix_cumsum|prefix_probe|prefix_split|prefix_keep)", 256, 0,
          [Const(POLICY, "POLICY_THREADS")], "policy plans (WindowKvPlan, LazyPlan, PrefixPlan)"),
]

# Cold kernels, exempt from the no-spill/no-stack rule. Keep this empty unless a kernel runs
# once per call on a tiny input (and say why here).
COLD_KERNELS = set()

for _e in LAUNCHES:
    re.compile(_e.pattern)
