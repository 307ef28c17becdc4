//! `ntkv-bench --geometry [--json PATH]`: the launch geometry the planners pick for every GPU
//! bench shape, on an H200 (132 SMs), computed with no GPU.
//!
//! Each family's planning calls sit in one small function (`topk`, `decode`, `attention`,
//! `quant`, `ntk`), so an API change touches one place. Only the crate's public, pure planning
//! functions are called (`TopkLayout::choose`, `decode::plan_chunks`,
//! `attention::HostPlan::new`, ...). Where a family has no such function, the shape is listed
//! as [`Unplanned`] with the reason, and no grid is invented.
//!
//! `tools/kernel-report` joins this with the ptxas resources and the static occupancy to
//! print the waves per shape (docs/kernel-report.md).

use std::path::Path;

use ntkv::attention::{BlockMask, HostPlan, MaskHeads, PrefillOptions, PrefillShape, PvPrecision};
use ntkv::decode::{self, DecodeOptions, DecodeShape};
use ntkv::quant::{Axis, QuantSpec};
use ntkv::topk::TopkLayout;
use ntkv::DType;
use serde_json::{json, Value};

use crate::topk::TOPK_CASES;

/// SMs of the H200 the predictions are for.
pub const SM_COUNT: usize = 132;
/// Opt-in shared memory per block on sm_90 (227 KiB), as `max_shared_mem_per_block_optin`.
const SMEM_OPTIN: usize = 232_448;
/// Copies of `TopkPlan::run`'s private constants (src/topk/gpu.rs): the static shared memory
/// budgeted next to the finalize's (fused kernel's) dynamic part, and the cap on staged
/// candidates. `tools/kernel-report` checks that both files hold the same values.
const FINAL_STATIC_SMEM: usize = 2048;
const FUSED_STATIC_SMEM: usize = 18432;
const CAND_STAGE_MAX: usize = 8192;

/// One launch of one bench shape.
#[derive(Clone, Debug)]
pub struct Launch {
    pub family: &'static str,
    pub op: String,
    pub shape: String,
    pub dtype: &'static str,
    pub kernel: String,
    /// Threads per block, where the family exposes it (the report's table supplies it otherwise).
    pub block: Option<u32>,
    /// Dynamic shared memory in bytes, where the family exposes it.
    pub dyn_smem: Option<usize>,
    /// Blocks of the launch (x·y·z).
    pub grid: Option<usize>,
    /// For grid-stride launches sized by occupancy: the blocks the work could use; the grid is
    /// `min(work_blocks, blocks_per_sm × SMs)`, resolved by the report (as `launch::grid_for`).
    pub work_blocks: Option<usize>,
    /// How many times the launch runs per call (row batches).
    pub count: usize,
    pub note: String,
}

/// A bench shape whose planner is not reachable without a device.
#[derive(Clone, Debug)]
pub struct Unplanned {
    pub family: &'static str,
    pub op: String,
    pub shape: String,
    pub reason: String,
}

#[derive(Default)]
struct Geometry {
    launches: Vec<Launch>,
    unplanned: Vec<Unplanned>,
}

impl Geometry {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        family: &'static str,
        op: &str,
        shape: &str,
        dtype: &'static str,
        kernel: String,
        grid: usize,
        count: usize,
        note: &str,
    ) -> &mut Launch {
        self.launches.push(Launch {
            family,
            op: op.to_owned(),
            shape: shape.to_owned(),
            dtype,
            kernel,
            block: None,
            dyn_smem: None,
            grid: Some(grid),
            work_blocks: None,
            count,
            note: note.to_owned(),
        });
        self.launches.last_mut().expect("just pushed")
    }

    fn unplanned(&mut self, family: &'static str, op: &str, shape: &str, reason: &str) {
        self.unplanned.push(Unplanned {
            family,
            op: op.to_owned(),
            shape: shape.to_owned(),
            reason: reason.to_owned(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// top-k, H2O, SnapKV

/// Blocks per SM of the split path's histogram and filter kernels on sm_90 (36 and 40
/// registers at 512 threads: the register file holds 3), as `tools/kernel-report` computes
/// it; on a device `TopkPlan::new` asks the driver instead.
const TOPK_SPLIT_BLOCKS_PER_SM: usize = 3;

/// The launches of one `TopkPlan::run` of `rows × n`, top-`k`: the layout is
/// `TopkLayout::choose`; the finalize's dynamic shared memory mirrors `TopkPlan::run`
/// (kpad sort words plus up to `CAND_STAGE_MAX` staged candidates within the opt-in limit,
/// next to the static shared memory the launcher budgets).
fn topk_launches(g: &mut Geometry, op: &str, shape: &str, rows: usize, n: usize, k: usize, dt: &'static str) {
    let lay = match TopkLayout::choose(rows, n, k, SM_COUNT, TOPK_SPLIT_BLOCKS_PER_SM) {
        Ok(lay) => lay,
        Err(e) => {
            g.unplanned("topk", op, shape, &format!("TopkLayout::choose refused the shape: {e}"));
            return;
        }
    };
    let batches = rows.div_ceil(lay.rows_per_batch.max(1));
    let last = rows - (batches - 1) * lay.rows_per_batch;
    let batch = lay.rows_per_batch.min(rows);
    let note = if batches > 1 { format!("{batches} row batches (last {last} rows)") } else { String::new() };
    let fused = lay.blocks_per_row == 1;
    let static_smem = if fused { FUSED_STATIC_SMEM } else { FINAL_STATIC_SMEM };
    let cand_stage = (SMEM_OPTIN.saturating_sub(static_smem + lay.kpad * 8) / 8).min(CAND_STAGE_MAX);
    let fin_smem = (lay.kpad + cand_stage) * 8;
    if fused {
        g.push("topk", op, shape, dt, format!("ntkv_topk_fused_{dt}"), batch, batches, &note).dyn_smem = Some(fin_smem);
        return;
    }
    let split = lay.blocks_per_row * batch;
    let note = format!("{} blocks/row × {batch} rows; chunk {}; {note}", lay.blocks_per_row, lay.chunk);
    let note = note.trim_end_matches("; ");
    g.push("topk", op, shape, dt, format!("ntkv_topk_hist_{dt}"), split, batches, note).dyn_smem = Some(0);
    g.push("topk", op, shape, dt, format!("ntkv_topk_filter_{dt}"), split, batches, note).dyn_smem = Some(0);
    let fin_note =
        format!("{} blocks/row × {batch} rows (slices of {})", lay.finalize_blocks, lay.kpad / lay.finalize_blocks);
    g.push(
        "topk",
        op,
        shape,
        dt,
        format!("ntkv_topk_finalize_{dt}"),
        lay.finalize_blocks * batch,
        batches,
        &fin_note,
    )
    .dyn_smem = Some(fin_smem);
}

fn topk(g: &mut Geometry) {
    for &(rows, n, k, dtype) in TOPK_CASES {
        let shape = crate::topk::topk_shape(rows, n, k);
        topk_launches(g, "topk", &shape, rows, n, k, dtype.name());
    }
    for &(rows, n, k, fill, _) in crate::topk::TIE_CASES {
        topk_launches(g, "topk_ties", &crate::topk::tie_shape(rows, n, k, fill), rows, n, k, "f32");
    }
    // H2O: bench/src/topk.rs `H2O` (hq = hkv = 32, tq 16, t 32768, d 128, keep 2048, recent 64).
    let (hkv, t, budget, recent) = (32, 32768, 2048, 64);
    let shape = format!("hq32 hkv32 tq16 t{t} d128 keep{budget} recent{recent}");
    g.unplanned(
        "topk",
        "h2o_accumulate_select",
        &shape,
        "accumulate (ntkv_h2o_pass1/merge/pass2_f16_d128): planner needs a device (the grids are \
         formed inside the launcher; no public pure function gives them)",
    );
    topk_launches(g, "h2o_accumulate_select", &shape, hkv, t, budget - recent, "f32");
    // SnapKV: `SNAPKV` (hq = hkv = 32, window 32, t 32768, d 128, keep 2048).
    let (window, capacity) = (32, 2048);
    let shape = format!("hq32 hkv32 w{window} t{t} d128 keep{capacity} pool5");
    g.unplanned(
        "topk",
        "snapkv_select",
        &shape,
        "votes (ntkv_h2o_pass1/merge/pass2_f16_d128) and pooling (ntkv_snapkv_pool): planner needs \
         a device (grids formed inside the launcher)",
    );
    topk_launches(g, "snapkv_select", &shape, hkv, t - window, capacity - window, "f32");
}

// ---------------------------------------------------------------------------------------------
// decode

/// The cases of bench/src/decode.rs (`CASES`): (op, shape, q_tokens, hq, hkv, selected per
/// list); batch 1, a 128k-token cache, D = 128.
type DecodeCase = (&'static str, &'static str, usize, usize, usize, Option<usize>);
const DECODE_CASES: &[DecodeCase] = &[
    ("decode_sparse", "B1 Hq32 Hkv32 T131072 D128 sel2048", 1, 32, 32, Some(2048)),
    ("decode_full", "B1 Hq32 Hkv32 T131072 D128 all", 1, 32, 32, None),
    ("decode_sparse_gqa", "B1 Tq4 Hq32 Hkv8 T131072 D128 sel2048", 4, 32, 8, Some(2048)),
];

fn decode(g: &mut Geometry) {
    let (batch, cache) = (1, 131072);
    for &(op, shape, q_tokens, hq, hkv, selected) in DECODE_CASES {
        let cfg = DecodeShape { batch, q_tokens, hq, hkv, head_dim: 128, capacity: cache };
        let lists = cfg.n_lists();
        let lens = vec![selected.unwrap_or(cache); lists];
        let split = decode::plan_chunks(&lens, cfg.rows(), SM_COUNT, DecodeOptions::default().chunk_tokens);
        let row_tiles = cfg.rows().div_ceil(decode::ROWS_PER_CTA);
        let attn = lists * split.max_chunks * row_tiles;
        // The runner times the GQA case in bf16 and the others in f16.
        let dt = if op == "decode_sparse_gqa" { "bf16" } else { "f16" };
        let note = format!("chunk {} tokens, {} chunks, {row_tiles} row tiles", split.chunk_tokens, split.max_chunks);
        // One launch: split lists are merged by the last CTA of each (list, row tile).
        g.push("decode", op, shape, dt, format!("ntkv_decode_attn_{dt}_d128"), attn, 1, &note).dyn_smem =
            Some(decode::attn_smem_bytes(128));
    }
}

// ---------------------------------------------------------------------------------------------
// attention

/// The bench runner's block mask: every block (`pattern` 1000) or the blocks that
/// [`crate::attention::listed`] picks (causal: plus the diagonal, below it only).
fn mask(pattern: u32, causal: bool, n_blocks: u32, bc: usize) -> Result<BlockMask, ntkv::Error> {
    let rows: Vec<Vec<u32>> = (0..n_blocks)
        .map(|r| {
            (0..(n_blocks * 128).div_ceil(bc as u32))
                .filter(|&c| match (pattern, causal) {
                    (1000, _) => true,
                    (pm, false) => crate::attention::listed(r, c, pm),
                    (pm, true) => c == r || (c < r && crate::attention::listed(r, c, pm)),
                })
                .collect()
        })
        .collect();
    BlockMask::from_lists(128, bc, MaskHeads::Shared, &[rows])
}

fn attention(g: &mut Geometry) {
    // The cases of bench/src/attention.rs (`gpu_cases`): (op, shape, tokens, d, permille, causal, bc).
    let mut cases: Vec<(&str, String, u32, usize, u32, bool, usize)> = vec![
        ("prefill_dense", "1x32x8192x128".into(), 8192, 128, 1000, false, 128),
        ("prefill_dense", "1x32x32768x128".into(), 32768, 128, 1000, false, 128),
    ];
    for d in [128usize, 64] {
        for (pm, pct) in [(125u32, "12.5%"), (250, "25%"), (500, "50%")] {
            cases.push(("prefill_bsr", format!("1x32x32768x{d} b128 {pct}"), 32768, d, pm, false, 128));
        }
        cases.push(("prefill_bsr_causal", format!("1x32x32768x{d} b128 25%tri+diag"), 32768, d, 250, true, 128));
    }
    cases.push(("prefill_dense_bc64", "1x32x8192x128".into(), 8192, 128, 1000, false, 64));
    for (op, shape_key, tokens, d, pm, causal, bc) in cases {
        let planned = (|| {
            let shape = PrefillShape::new(32, 32, d, vec![0, tokens], vec![0, tokens])?;
            let m = mask(pm, causal, tokens.div_ceil(128), bc)?;
            let mut out = Vec::new();
            // bf16 with both P precisions; f16 on the two bar shapes only.
            let f16_too = (op == "prefill_dense" && tokens == 8192) || shape_key.ends_with("x128 b128 25%");
            let runs = [
                (PvPrecision::Storage, "", DType::BF16),
                (PvPrecision::Split, "_split", DType::BF16),
                (PvPrecision::Storage, "", DType::F16),
            ];
            for (precision, suffix, dt) in runs.into_iter().take(if f16_too { 3 } else { 2 }) {
                let opts = PrefillOptions { causal, pv_precision: precision, ..Default::default() };
                let plan = HostPlan::new(&shape, opts, &m)?;
                let (block, smem, items) = (plan.block_rows() * 2, plan.shared_mem_bytes(), plan.n_items());
                out.push((suffix, dt.name(), plan.kernel_id(dt)?.symbol(), block, smem, items));
            }
            Ok::<_, ntkv::Error>(out)
        })();
        match planned {
            Ok(list) => {
                for (suffix, dt, kernel, block, smem, items) in list {
                    let l = g.push("attention", &format!("{op}{suffix}"), &shape_key, dt, kernel, items, 1, "");
                    l.block = u32::try_from(block).ok();
                    l.dyn_smem = Some(smem);
                }
            }
            Err(e) => g.unplanned("attention", op, &shape_key, &format!("HostPlan::new failed: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// quant

fn quant(g: &mut Geometry) {
    // bench/src/quant.rs: 4M tokens × 128 channels, f16, one head, these specs.
    let (tokens, dim) = (4_194_304usize, 128usize);
    let specs = [(4, 32, Axis::PerToken), (2, 64, Axis::PerToken), (8, 128, Axis::PerToken), (4, 32, Axis::PerChannel)];
    for (i, (bits, group, axis)) in specs.into_iter().enumerate() {
        let Ok(spec) = QuantSpec::new(bits, group, axis) else { continue };
        let shape = format!("{tokens}x{dim} g{group} int{bits} {}", axis.name());
        let n = tokens * dim;
        let (quant_items, kind) = match axis {
            Axis::PerToken => (n / spec.codes_per_word(), "token"),
            Axis::PerChannel => (n / spec.group, "channel"),
        };
        let note = "grid = min(work, blocks/SM × SMs): the launcher asks the driver (planner needs a device)";
        let mut ops = vec![("dequant", format!("ntkv_quant_dequantize_{kind}_f16"), n / spec.codes_per_word())];
        // The runner times the quantize (checked and single pass) at the first spec and per channel.
        if i == 0 || axis == Axis::PerChannel {
            ops.push(("quant, quant_single_pass", format!("ntkv_quant_quantize_{kind}_f16"), quant_items));
        }
        for (op, kernel, items) in ops {
            let l = g.push("quant", op, &shape, "f16", kernel, 0, 1, note);
            l.grid = None;
            l.work_blocks = Some(items.div_ceil(256));
            l.dyn_smem = Some(0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ntk

fn ntk(g: &mut Geometry) {
    let reason = "planner needs a device: the split-K choice (ntk::gpu::GemmPlan::new with \
                  gemm_slots) is crate-private and takes the device's SM count";
    for shape in ["1024x1048576", "4096x262144"] {
        g.unplanned("ntk", "gram", shape, reason);
    }
    g.unplanned("ntk", "mlp_entk_full / mlp_entk_trace", "256 784-1024-1024-10", reason);
    g.unplanned("ntk", "ntk_metrics_*", "4096x4096", "planner needs a device: grids formed inside the launchers");
}

// ---------------------------------------------------------------------------------------------
// cluster: k-means and cluster retrieval (bench/src/cluster.rs cases)

fn cluster(g: &mut Geometry) {
    use ntkv::cluster::{self as gpu, RetrieveOptions, RetrieveShape};
    for kc in crate::cluster::KMEANS_CASES {
        let (op, shape, h, t, c, it) = (kc.op, kc.shape, kc.heads, kc.tokens, kc.clusters, kc.iterations);
        let tiles = t.div_ceil(gpu::ASSIGN_KEYS);
        let dt = kc.dtype();
        g.push("cluster", op, shape, dt, "ntkv_kmeans_init_f32".into(), h * c, 1, "").block = Some(gpu::ROW_THREADS);
        let assign = match kc.assign {
            gpu::AssignPrecision::F32 => "ntkv_kmeans_assign_f32".to_string(),
            gpu::AssignPrecision::Tf32 => format!("ntkv_kmeans_assign_tf32_d{}_f32", kc.head_dim),
        };
        let a = g.push("cluster", op, shape, dt, assign, h * tiles, it, "per iteration");
        a.block = Some(gpu::ASSIGN_THREADS);
        a.dyn_smem = Some(if kc.assign == gpu::AssignPrecision::Tf32 { gpu::TF32_ASSIGN_SMEM as usize } else { 0 });
        g.push("cluster", op, shape, dt, "ntkv_kmeans_sort".into(), h, it, "one CTA per head").block =
            Some(gpu::LIST_THREADS);
        g.push("cluster", op, shape, dt, "ntkv_kmeans_update_f32".into(), h * c, it, "one CTA per cluster").block =
            Some(gpu::ROW_THREADS);
    }
    for rc in crate::cluster::RETRIEVE_CASES {
        let (op, shape, batch, hq, hkv) = (rc.op, rc.shape, rc.batch, rc.hq, rc.hkv);
        let (c, cap, budget, sinks, window) = (rc.clusters, rc.capacity, rc.budget, rc.sinks, rc.window);
        let rs = RetrieveShape { batch, q_tokens: 1, hq, hkv, head_dim: 128, clusters: c, capacity: cap };
        let l = rs.n_lists();
        let score = g.push("cluster", op, shape, "f16", "ntkv_cluster_score_f16".into(), l * c.div_ceil(128), 1, "");
        score.block = Some(gpu::ROW_THREADS);
        let note = format!("ranking: select top-k of [{l}, {c}], k = {c} (topk rows)");
        let m = g.push("cluster", op, shape, "f16", "ntkv_cluster_mark".into(), l, 1, &note);
        m.block = Some(gpu::LIST_THREADS);
        m.dyn_smem = Some(gpu::mark_smem_bytes(c));
        let o = RetrieveOptions { budget, sinks, window, ..Default::default() };
        let cap_note = format!("indices capacity {}", rs.indices_capacity(&o).unwrap_or(0));
        g.push("cluster", op, shape, "f16", "ntkv_cluster_write".into(), l, 1, &cap_note).block =
            Some(gpu::LIST_THREADS);
    }
}

// ---------------------------------------------------------------------------------------------
// qdecode

/// The cases of bench/src/qdecode.rs: the KIVI caches and the MiKV pair share one shape (1
/// query, 32 heads, 128k tokens, D = 128) and take the fast kernel (keys per channel, values
/// per token, one bit width and group); the `_general` case takes the general kernel; the f16
/// decode's geometry is decode's.
fn qdecode(g: &mut Geometry) {
    use crate::qdecode::{shape, GENERAL_OP, GROUP, KIVI_CASES, MIKV_OP, SHAPE, TOKENS};
    let s = shape(TOKENS);
    let split = ntkv::qdecode::plan_split(&s, SM_COUNT, None);
    let heads = s.n_lists();
    let note = format!("chunk {} tokens, {} chunks", split.chunk_tokens, split.max_chunks);
    let cases = KIVI_CASES.iter().map(|c| (c.0, Some(c.1))).chain([(MIKV_OP, Some(4)), (GENERAL_OP, None)]);
    for (op, fast_bits) in cases {
        let (kernel, block) = match fast_bits {
            Some(bits) => (format!("ntkv_qdecode_fast_f16_d128_b{bits}_g{GROUP}"), 256),
            None => ("ntkv_qdecode_attn_f16_d128_r1".to_owned(), 128),
        };
        let e = g.push("qdecode", op, SHAPE, "f16", kernel, heads * split.max_chunks, 1, &note);
        e.block = Some(block);
        e.dyn_smem = Some(0);
        if !split.direct() {
            let m = g.push("qdecode", op, SHAPE, "f16", "ntkv_qdecode_merge_f16".into(), heads * s.rows(), 1, "");
            m.block = Some(128);
            m.dyn_smem = Some(0);
        }
    }
}

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// pages (Quest, ShadowKV)

/// The launches of bench/src/pages.rs at its GPU shapes (`pages::quest_shape(131072, 32)`,
/// `pages::landmark_shape(131072, 32)`): the pages kernels' work in blocks (the launcher caps the
/// grid at one resident wave from the driver's occupancy), then the select primitives they call.
fn pages(g: &mut Geometry) {
    use ntkv::pages::lanes;
    let note = "grid = min(work, blocks/SM × SMs): Typed::load asks the driver";
    let push = |g: &mut Geometry, op: &str, shape: &str, kernel: String, work: usize| {
        let l = g.push("pages", op, shape, "f16", kernel, 0, 1, note);
        l.grid = None;
        l.work_blocks = Some(work);
        l.dyn_smem = Some(0);
        l.block = Some(256);
    };
    let q = crate::pages::quest_shape(131072, 32);
    let (rows, np) = (q.rows(), q.meta().n_pages());
    let gpb = 256 / lanes(q.head_dim).1;
    let meta_shape = "B1 Hkv32 T131072 D128 P16";
    push(g, "quest_meta", meta_shape, "ntkv_pages_quest_meta_f16".into(), (rows * np * q.head_dim / 8).div_ceil(256));
    let sel_shape = "B1 Hq32 Hkv32 NP8192 D128 top128";
    push(g, "quest_select", sel_shape, "ntkv_pages_quest_score_f16".into(), (rows * np).div_ceil(gpb));
    topk_launches(g, "quest_select", sel_shape, rows, np, q.budget - 1, "f32");
    let l = crate::pages::landmark_shape(131072, 32);
    let (rows, nc) = (l.rows(), l.landmarks().n_chunks());
    let qrows = l.batch * l.hq * l.q_tokens;
    let build_shape = "B1 Hkv8 T131072 D128 out16";
    push(g, "landmark_build", build_shape, "ntkv_pages_landmark_f16".into(), (rows * nc).div_ceil(gpb));
    topk_launches(g, "landmark_build", build_shape, rows, nc, l.outliers, "f32");
    let ls = "B1 Hq32 Hkv8 NC16384 D128 top256+16";
    push(g, "landmark_select", ls, "ntkv_pages_shadow_logits_f16".into(), (rows * nc).div_ceil(gpb));
    push(g, "landmark_select", ls, "ntkv_pages_shadow_softmax".into(), qrows);
    push(g, "landmark_select", ls, "ntkv_pages_shadow_score".into(), (rows * nc).div_ceil(256));
    push(g, "landmark_select", ls, "ntkv_pages_shadow_mark".into(), (rows * l.outliers).div_ceil(256));
    topk_launches(g, "landmark_select", ls, rows, nc, l.budget, "f32");
}

// ---------------------------------------------------------------------------------------------
// lowrank

/// The reconstruction case of bench/src/lowrank.rs: one block per (kv head, tile of
/// `tile_tokens(D)` selected positions), 256 threads, static shared memory only; the
/// factorization's launches are the shared GEMM's (device-planned) and grid-stride casts.
fn lowrank(g: &mut Geometry) {
    let (op, shape, _t, hkv, d, _r, sel) = crate::lowrank::ROPE_CASE;
    let tile = 8192 / d;
    let l =
        g.push("lowrank", op, shape, "bf16", format!("ntkv_lowrank_rope_bf16_d{d}"), hkv * sel.div_ceil(tile), 1, "");
    l.block = Some(256);
    l.dyn_smem = Some(0);
    let (fop, fshape, ..) = crate::lowrank::FACTOR_CASE;
    g.unplanned(
        "lowrank",
        fop,
        fshape,
        "planner needs a device: the factorization's products are gemm::GemmPlan (split-K from the SM occupancy)",
    );
}

// ---------------------------------------------------------------------------------------------
// policy (WindowKV, LazyEviction, PrefixKV)

/// The launches of bench/src/policy.rs at its GPU shapes: the policy kernels (256 threads,
/// grid-stride or one block per row; the work in blocks, the launcher caps grid-stride grids at
/// one resident wave) and the shared top-k each op runs. The H2O accumulation (WindowKV's
/// votes, LazyEviction's step mass) and the expansion and compaction are planned inside their
/// launchers (device occupancy) and listed as unplanned.
fn policy(g: &mut Geometry) {
    use crate::policy::{LAZY, PREFIX, WINDOWKV};
    let push = |g: &mut Geometry, op: &str, shape: &str, kernel: &str, grid: usize, count: usize| {
        let l = g.push("policy", op, shape, "f32", format!("ntkv_policy_{kernel}"), grid, count, "");
        l.block = Some(256);
        l.dyn_smem = Some(0);
    };
    let topk_as_policy = |g: &mut Geometry, op: &str, shape: &str, rows: usize, n: usize, k: usize| {
        let from = g.launches.len();
        topk_launches(g, op, shape, rows, n, k, "f32");
        g.launches[from..].iter_mut().for_each(|l| l.family = "policy");
    };
    let (s, w, budget) = WINDOWKV;
    let shape = crate::policy::windowkv_shape(s, w, budget);
    let older = s.t - s.tq;
    let nw = older.div_ceil(w);
    push(g, "windowkv_select", &shape, "window_sums", (s.hkv * nw).div_ceil(256), 1);
    topk_as_policy(g, "windowkv_select", &shape, s.hkv, nw, (budget - s.tq) / w);
    g.unplanned("policy", "windowkv_select", &shape, "votes (ntkv_h2o_pass1/merge/pass2_f16_d128) and the expansion (ntkv_select_expand_*): planned inside their launchers");
    let (s, budget, recent) = LAZY;
    let shape = crate::policy::lazy_shape(s, budget, recent);
    push(g, "lazy_step", &shape, "lazy_update", (s.hkv * s.t).div_ceil(256), 1);
    topk_as_policy(g, "lazy_step", &shape, s.hkv, s.t, budget - recent);
    g.unplanned("policy", "lazy_step", &shape, "step mass (ntkv_h2o_pass1/merge/pass2_f16_d128) and the two compactions (ntkv_h2o_check_keep, ntkv_h2o_compact): planned inside their launchers");
    let p = PREFIX;
    let shape = crate::policy::prefix_shape(p);
    topk_as_policy(g, "prefixkv_budgets", &shape, p.rows, p.n, p.n);
    push(g, "prefixkv_budgets", &shape, "prefix_cumsum", p.rows, 1);
    push(g, "prefixkv_budgets", &shape, "prefix_probe", p.rows, 8);
    push(g, "prefixkv_budgets", &shape, "prefix_split", p.rows.div_ceil(256), 1);
    push(g, "prefixkv_budgets", &shape, "prefix_keep", p.rows, 1);
}

fn collect() -> Geometry {
    let mut g = Geometry::default();
    topk(&mut g);
    decode(&mut g);
    attention(&mut g);
    quant(&mut g);
    ntk(&mut g);
    cluster(&mut g);
    pages(&mut g);
    lowrank(&mut g);
    qdecode(&mut g);
    policy(&mut g);
    g
}

fn to_json(g: &Geometry) -> Value {
    let launches: Vec<Value> = g
        .launches
        .iter()
        .map(|l| {
            json!({
                "family": l.family, "op": l.op, "shape": l.shape, "dtype": l.dtype, "kernel": l.kernel,
                "block": l.block, "dyn_smem": l.dyn_smem, "grid": l.grid, "work_blocks": l.work_blocks,
                "count": l.count, "note": l.note,
            })
        })
        .collect();
    let unplanned: Vec<Value> = g
        .unplanned
        .iter()
        .map(|u| json!({"family": u.family, "op": u.op, "shape": u.shape, "reason": u.reason}))
        .collect();
    json!({"sm_count": SM_COUNT, "launches": launches, "unplanned": unplanned})
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Prints the geometry table (and writes it as JSON to `json`).
///
/// # Errors
/// The message of a failed write.
pub fn run(json: Option<&Path>) -> Result<(), String> {
    let g = collect();
    println!("Launch geometry on {SM_COUNT} SMs (static: no GPU; block '-' = from the kernel report's table)");
    println!(
        "{:<10} {:<26} {:<40} {:<6} {:<46} {:>6} {:>8} {:>9}",
        "family", "op", "shape", "dtype", "kernel", "block", "dyn", "grid"
    );
    for l in &g.launches {
        let grid = match (l.grid, l.work_blocks) {
            (Some(g), _) => g.to_string(),
            (None, Some(w)) => format!("≤{w}"),
            _ => "-".into(),
        };
        println!(
            "{:<10} {:<26} {:<40} {:<6} {:<46} {:>6} {:>8} {:>9}  {}",
            l.family,
            l.op,
            l.shape,
            l.dtype,
            l.kernel,
            opt(l.block),
            opt(l.dyn_smem),
            grid,
            l.note
        );
    }
    for u in &g.unplanned {
        println!("{:<10} {:<26} {:<40} {}", u.family, u.op, u.shape, u.reason);
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&to_json(&g)).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bench_family_has_geometry_or_a_reason() {
        let g = collect();
        for fam in ["topk", "decode", "attention", "quant", "ntk", "cluster", "pages", "lowrank", "qdecode", "policy"] {
            assert!(g.launches.iter().any(|l| l.family == fam) || g.unplanned.iter().any(|u| u.family == fam), "{fam}");
        }
        assert!(g.launches.iter().all(|l| l.grid.is_some() || l.work_blocks.is_some()));
    }

    /// The shapes above are copies of the runner's private case lists: fail when a runner file
    /// no longer lists one of them (update the copy here, or make the runner's list
    /// `pub(crate)` and use it).
    #[test]
    fn shapes_match_the_bench_runner() {
        let mut needles: Vec<(&str, &str, String)> = TOPK_CASES
            .iter()
            .map(|&(r, n, k, d)| ("topk.rs", include_str!("topk.rs"), format!("({r}, {n}, {k}, DType::{d:?})")))
            .collect();
        needles.push((
            "topk.rs",
            include_str!("topk.rs"),
            "hq: 32, hkv: 32, tq: 16, t: 32768, d: 128 }, 2048, 64)".into(),
        ));
        needles.push(("topk.rs", include_str!("topk.rs"), "hq: 32, hkv: 32, tq: 32, t: 32768, d: 128 }, 2048)".into()));
        for &(_, shape, ..) in DECODE_CASES {
            needles.push(("decode.rs", include_str!("decode.rs"), format!("shape: {shape:?}")));
        }
        let attention = include_str!("attention.rs");
        for needle in ["\"1x32x8192x128\"", "\"1x32x32768x128\"", "[128usize, 64]", "b128 {pct}", "b128 25%tri+diag"] {
            needles.push(("attention.rs", attention, needle.into()));
        }
        needles.push(("attention.rs", attention, "(125u32, \"12.5%\"), (250, \"25%\"), (500, \"50%\")".into()));
        let quant = include_str!("quant.rs");
        needles.push(("quant.rs", quant, "TOKENS: usize = 4_194_304".into()));
        for s in [
            "(4, 32, Axis::PerToken)",
            "(2, 64, Axis::PerToken)",
            "(8, 128, Axis::PerToken)",
            "(4, 32, Axis::PerChannel)",
        ] {
            needles.push(("quant.rs", quant, format!("QuantSpec::new{s}")));
        }
        let missing: Vec<String> = needles
            .iter()
            .filter(|(_, text, needle)| !text.contains(needle.as_str()))
            .map(|(file, _, needle)| format!("bench/src/{file}: {needle}"))
            .collect();
        assert!(missing.is_empty(), "bench shapes changed; update geometry.rs: {missing:#?}");
    }
}
