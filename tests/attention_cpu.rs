//! CPU-side tests of the attention family: shape and mask validation, the plan's work list,
//! the f64 reference, the Graph-KV builder, and a host emulation of the kernel's algorithm
//! against the reference at the crate's tolerances (rel L2 ≤ 5e-4 f16; ≤ 4e-3 bf16 with the default
//! `PvPrecision::Storage`, ≤ 2e-3 with `PvPrecision::Split`).

mod attention_common;
mod common;

use attention_common::*;
use common::arg_of;
use half::{bf16, f16};
use ntkv::attention::graph::{graph_cu_seqlens, graph_kv_mask, GraphKv};
use ntkv::attention::{cpu, BlockMask, HostPlan, MaskHeads, PrefillOptions, PrefillShape, PvPrecision, NO_TOKEN_MASK};
use ntkv::rng::Rng;
use ntkv::Float;
use proptest::prelude::*;

fn shape1(tq: u32, tk: u32, hq: usize, hkv: usize, d: usize) -> PrefillShape {
    PrefillShape::new(hq, hkv, d, vec![0, tq], vec![0, tk]).unwrap()
}

#[test]
fn shape_validation_names_the_argument() {
    let cases: Vec<(PrefillShape, &str)> = vec![
        (PrefillShape { hq: 0, hkv: 1, head_dim: 64, cu_seqlens_q: vec![0], cu_seqlens_k: vec![0] }, "hq"),
        (PrefillShape { hq: 6, hkv: 4, head_dim: 64, cu_seqlens_q: vec![0], cu_seqlens_k: vec![0] }, "hkv"),
        (PrefillShape { hq: 4, hkv: 0, head_dim: 64, cu_seqlens_q: vec![0], cu_seqlens_k: vec![0] }, "hkv"),
        (PrefillShape { hq: 4, hkv: 2, head_dim: 96, cu_seqlens_q: vec![0], cu_seqlens_k: vec![0] }, "head_dim"),
        (PrefillShape { hq: 4, hkv: 2, head_dim: 64, cu_seqlens_q: vec![], cu_seqlens_k: vec![] }, "cu_seqlens_q"),
        (
            PrefillShape { hq: 4, hkv: 2, head_dim: 64, cu_seqlens_q: vec![1, 4], cu_seqlens_k: vec![0, 4] },
            "cu_seqlens_q",
        ),
        (
            PrefillShape { hq: 4, hkv: 2, head_dim: 64, cu_seqlens_q: vec![0, 5, 4], cu_seqlens_k: vec![0, 4, 8] },
            "cu_seqlens_q",
        ),
        (
            PrefillShape { hq: 4, hkv: 2, head_dim: 64, cu_seqlens_q: vec![0, 4], cu_seqlens_k: vec![0, 4, 8] },
            "cu_seqlens_k",
        ),
    ];
    for (s, arg) in cases {
        let e = s.validate().unwrap_err();
        assert_eq!(arg_of(&e), arg, "{s:?}: {e}");
    }
    assert!(shape1(10, 20, 8, 2, 128).validate().is_ok());
}

#[test]
fn malformed_masks_are_errors_naming_the_argument() {
    // Two entries: Tq = 100, 64 (row blocks 2, 1 at BR = 64); Tk = 130, 10 (col blocks 3, 1).
    let shape = PrefillShape::new(4, 2, 64, vec![0, 100, 164], vec![0, 130, 140]).unwrap();
    let good = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0, 2], vec![1]], vec![vec![0]]]).unwrap();
    assert!(good.validate(&shape).is_ok());
    let opts = PrefillOptions::default();
    let mut cases: Vec<(BlockMask, &str)> = Vec::new();
    let mut m = good.clone();
    m.indices = vec![2, 0, 1, 0]; // unsorted
    cases.push((m, "indices"));
    let m = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0, 0], vec![1]], vec![vec![0]]]).unwrap();
    cases.push((m, "indices")); // duplicate
    let m = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0, 3], vec![1]], vec![vec![0]]]).unwrap();
    cases.push((m, "indices")); // column block 3 of 3
    let m = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0], vec![1]], vec![vec![1]]]).unwrap();
    cases.push((m, "indices")); // entry 1 has one column block
    let m =
        BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0], vec![1], vec![2]], vec![vec![0]]]).unwrap();
    cases.push((m, "indptr")); // three row blocks for entry 0
    let m = BlockMask::from_lists(64, 64, MaskHeads::PerKvHead, &[vec![vec![0], vec![1]], vec![vec![0]]]).unwrap();
    cases.push((m, "indptr")); // per-kv-head needs 2 BSRs per entry
    let mut m = good.clone();
    m.indptr = vec![0, 2, 3, 4, 4]; // second BSR does not start where the first ended
    cases.push((m, "indptr"));
    let mut m = good.clone();
    m.indptr = vec![0, 2, 1, 1, 4];
    cases.push((m, "indptr")); // decreasing
    let mut m = good.clone();
    m.indptr = vec![0, 2, 3, 3, 9];
    cases.push((m, "indptr")); // past the end
    let mut m = good.clone();
    m.indices.push(0);
    cases.push((m, "indptr")); // indices longer than indptr says
    let mut m = good.clone();
    m.block_rows = 32;
    cases.push((m, "block_rows"));
    let mut m = good.clone();
    m.block_cols = 256;
    cases.push((m, "block_cols"));
    let mut m = good.clone();
    m.token_mask_ids = vec![NO_TOKEN_MASK; 3];
    cases.push((m, "token_mask_ids")); // wrong length
    let mut m = good.clone();
    m.token_mask_ids = vec![NO_TOKEN_MASK, 0, NO_TOKEN_MASK, NO_TOKEN_MASK];
    cases.push((m, "token_mask_ids")); // id 0 with an empty pool
    let mut m = good.clone();
    m.token_masks = vec![0; 7];
    cases.push((m, "token_masks"));
    for (m, arg) in cases {
        let e = HostPlan::new(&shape, opts, &m).unwrap_err();
        assert_eq!(arg_of(&e), arg, "{m:?}: {e}");
        // The reference rejects the same masks.
        let q = vec![f16::ZERO; 164 * 4 * 64];
        let kv = vec![f16::ZERO; 140 * 2 * 64];
        assert!(cpu::prefill(&shape, opts, &m, &q, &kv, &kv).is_err());
    }
    let e = HostPlan::new(&shape, PrefillOptions { scale: Some(f32::NAN), ..Default::default() }, &good).unwrap_err();
    assert_eq!(arg_of(&e), "scale");
}

#[test]
fn causal_is_bottom_right_aligned() {
    let shape = shape1(3, 5, 1, 1, 64);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
    let opts = PrefillOptions { causal: true, ..Default::default() };
    for i in 0..3 {
        for j in 0..5 {
            assert_eq!(cpu::visible(&shape, &opts, &mask, 0, 0, i, j).unwrap(), j <= i + 2, "i={i} j={j}");
        }
    }
    // Tq > Tk: the first Tq - Tk rows see nothing.
    let shape = shape1(5, 3, 1, 1, 64);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
    let mut rng = Rng::new(1);
    let q: Vec<f16> = random_vec(&mut rng, 5 * 64, 1.0);
    let kv: Vec<f16> = random_vec(&mut rng, 3 * 64, 1.0);
    let out = cpu::prefill(&shape, opts, &mask, &q, &kv, &kv).unwrap();
    for i in 0..2 {
        assert_eq!(out.lse[i], f64::NEG_INFINITY);
        assert!(out.o[i * 64..(i + 1) * 64].iter().all(|&x| x == 0.0));
    }
    for i in 2..5 {
        assert!(out.lse[i].is_finite());
    }
}

#[test]
fn reference_matches_a_direct_softmax_and_its_lse() {
    let mut rng = Rng::new(7);
    let (tq, tk, hq, hkv, d) = (37usize, 53usize, 4usize, 2usize, 64usize);
    let shape = shape1(tq as u32, tk as u32, hq, hkv, d);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
    let q: Vec<bf16> = random_vec(&mut rng, tq * hq * d, 2.0);
    let k: Vec<bf16> = random_vec(&mut rng, tk * hkv * d, 2.0);
    let v: Vec<bf16> = random_vec(&mut rng, tk * hkv * d, 1.0);
    let opts = PrefillOptions { scale: Some(0.3), ..Default::default() };
    let out = cpu::prefill(&shape, opts, &mask, &q, &k, &v).unwrap();
    let (qf, kf, vf) = (to_f64(&q), to_f64(&k), to_f64(&v));
    for h in 0..hq {
        let kvh = h / 2;
        for i in 0..tq {
            let s: Vec<f64> = (0..tk)
                .map(|j| {
                    f64::from(0.3f32)
                        * (0..d).map(|x| qf[(i * hq + h) * d + x] * kf[(j * hkv + kvh) * d + x]).sum::<f64>()
                })
                .collect();
            let lse = s.iter().map(|x| x.exp()).sum::<f64>().ln();
            assert!((lse - out.lse[h * tq + i]).abs() < 1e-9, "lse {lse} vs {}", out.lse[h * tq + i]);
            for x in 0..d {
                let want: f64 = (0..tk).map(|j| (s[j] - lse).exp() * vf[(j * hkv + kvh) * d + x]).sum();
                assert!((want - out.o[(i * hq + h) * d + x]).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn per_kv_head_masks_apply_to_their_query_group() {
    // Hq = 4, Hkv = 2: kv head 0 sees column block 0 only, kv head 1 column block 1 only.
    let shape = shape1(64, 128, 4, 2, 64);
    let mask = BlockMask::from_lists(64, 64, MaskHeads::PerKvHead, &[vec![vec![0]], vec![vec![1]]]).unwrap();
    let opts = PrefillOptions::default();
    for h in 0..4 {
        for j in [0usize, 63, 64, 127] {
            let want = if h < 2 { j < 64 } else { j >= 64 };
            assert_eq!(cpu::visible(&shape, &opts, &mask, 0, h, 5, j).unwrap(), want, "h={h} j={j}");
        }
    }
    let plan = HostPlan::new(&shape, opts, &mask).unwrap();
    for it in plan.items().chunks_exact(8) {
        let h = it[7] as usize;
        let cols: Vec<u32> = (it[5]..it[6]).map(|e| plan.blocks()[e as usize * 4]).collect();
        assert_eq!(cols, if h < 2 { vec![0] } else { vec![1] });
    }
}

#[test]
fn plan_drops_causally_hidden_blocks_and_flags_the_diagonal() {
    // Tq = Tk = 300, BR = BC = 64: 5 x 5 blocks, causal: the lower triangle remains.
    let shape = shape1(300, 300, 2, 1, 64);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
    let plan = HostPlan::new(&shape, PrefillOptions { causal: true, ..Default::default() }, &mask).unwrap();
    assert_eq!(plan.n_items(), 5 * 2);
    for it in plan.items().chunks_exact(8) {
        let rb = it[0] as usize / 64;
        let list: Vec<(u32, u32)> =
            (it[5]..it[6]).map(|e| (plan.blocks()[e as usize * 4], plan.blocks()[e as usize * 4 + 1])).collect();
        let want: Vec<(u32, u32)> = (0..=rb as u32).map(|c| (c, u32::from(c as usize == rb || c == 4))).collect();
        assert_eq!(list, want, "row block {rb}");
        assert_eq!(it[1] as usize, (300 - rb * 64).min(64));
        assert_eq!(it[4] as i32, (rb * 64) as i32);
    }
    // Longest lists first.
    let lens: Vec<u32> = plan.items().chunks_exact(8).map(|it| it[6] - it[5]).collect();
    assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
    // Non-causal dense: everything listed, only the partial last column flagged.
    let plan = HostPlan::new(&shape, PrefillOptions::default(), &mask).unwrap();
    for it in plan.items().chunks_exact(8) {
        let flags: Vec<u32> = (it[5]..it[6]).map(|e| plan.blocks()[e as usize * 4 + 1]).collect();
        assert_eq!(flags, vec![0, 0, 0, 0, 1]);
    }
}

/// The pairs the kernel treats as visible, from the plan alone (its masking rule), must be
/// exactly the reference's visible pairs; and every (entry, head, row) belongs to one item.
fn check_plan_is_exact(shape: &PrefillShape, opts: PrefillOptions, mask: &BlockMask) {
    let plan = HostPlan::new(shape, opts, mask).unwrap();
    let (br, bc) = (mask.block_rows, mask.block_cols);
    let mut seen = vec![0u8; shape.tq_total() * shape.hq];
    for it in plan.items().chunks_exact(8) {
        let (q_row0, n_rows, k_tok0, tk) = (it[0] as usize, it[1] as usize, it[2] as usize, it[3] as usize);
        let h = it[7] as usize;
        let cu = &shape.cu_seqlens_q;
        let b = (0..shape.batch()).find(|&b| cu[b] as usize <= q_row0 && q_row0 < cu[b + 1] as usize).unwrap();
        assert_eq!(shape.cu_seqlens_k[b] as usize, k_tok0);
        assert_eq!(shape.seq_k(b).unwrap(), tk);
        let i0 = q_row0 - shape.cu_seqlens_q[b] as usize;
        for r in 0..n_rows {
            seen[h * shape.tq_total() + q_row0 + r] += 1;
            let mut kernel_vis = vec![false; tk];
            for e in it[5]..it[6] {
                let blk = &plan.blocks()[e as usize * 4..e as usize * 4 + 4];
                for c in 0..bc {
                    let key = blk[0] as usize * bc + c;
                    let mut vis = true;
                    if blk[1] != 0 || blk[2] != NO_TOKEN_MASK {
                        vis = key < tk;
                        if opts.causal {
                            vis &= key as i64 <= r as i64 + it[4] as i32 as i64;
                        }
                        if blk[2] != NO_TOKEN_MASK {
                            let w = plan.token_masks()[(blk[2] as usize * br + r) * (bc / 32) + c / 32];
                            vis &= (w >> (c % 32)) & 1 == 1;
                        }
                    }
                    if vis {
                        assert!(key < tk, "unflagged block reaches past the keys");
                        kernel_vis[key] = true;
                    }
                }
            }
            for (j, &kv) in kernel_vis.iter().enumerate() {
                assert_eq!(
                    kv,
                    cpu::visible(shape, &opts, mask, b, h, i0 + r, j).unwrap(),
                    "b={b} h={h} i={} j={j}",
                    i0 + r
                );
            }
        }
    }
    assert!(seen.iter().all(|&x| x == 1), "every row in exactly one item");
}

#[test]
fn plan_visits_exactly_the_visible_pairs() {
    let mut rng = Rng::new(11);
    for case in 0..24 {
        let hkv = [1, 2, 1, 4][case % 4];
        let group = [1, 2, 4, 8][(case / 4) % 4];
        let cu_q = random_cu(&mut rng, 1 + case % 3, 300, true);
        let causal = case % 2 == 0;
        let cu_k: Vec<u32> = if case % 3 == 0 { cu_q.clone() } else { random_cu(&mut rng, cu_q.len() - 1, 300, true) };
        let shape = PrefillShape::new(hkv * group, hkv, 64, cu_q, cu_k).unwrap();
        let (br, bc) = ([64, 128][case % 2], [64, 128][(case / 2) % 2]);
        let heads = if case % 5 == 0 { MaskHeads::PerKvHead } else { MaskHeads::Shared };
        let density = [0.25, 0.5, 1.0][case % 3];
        let mask = random_mask(&mut rng, &shape, br, bc, heads, density, if case % 4 == 1 { 0.4 } else { 0.0 });
        check_plan_is_exact(&shape, PrefillOptions { causal, ..Default::default() }, &mask);
    }
}

fn emulation_case<T: Float>(seed: u64, pv_precision: PvPrecision, tol: f64) {
    let mut rng = Rng::new(seed);
    for case in 0..10 {
        let hkv = [1, 2][case % 2];
        let group = [1, 2, 4, 8][case % 4];
        let d = [64, 128][(case / 2) % 2];
        let cu_q = random_cu(&mut rng, 1 + case % 3, 200, case > 5);
        let cu_k = if case % 2 == 0 { cu_q.clone() } else { random_cu(&mut rng, cu_q.len() - 1, 200, case > 5) };
        let shape = PrefillShape::new(hkv * group, hkv, d, cu_q, cu_k).unwrap();
        let (br, bc) = ([64, 128][(case / 3) % 2], [64, 128][case % 2]);
        let heads = if case % 3 == 0 { MaskHeads::PerKvHead } else { MaskHeads::Shared };
        let mask = random_mask(&mut rng, &shape, br, bc, heads, [0.3, 0.6, 1.0][case % 3], [0.0, 0.5][case % 2]);
        let opts = PrefillOptions { causal: case % 2 == 1, pv_precision, ..Default::default() };
        let q: Vec<T> = random_vec(&mut rng, shape.tq_total() * shape.hq * d, 2.0);
        let k: Vec<T> = random_vec(&mut rng, shape.tk_total() * hkv * d, 2.0);
        let v: Vec<T> = random_vec(&mut rng, shape.tk_total() * hkv * d, 1.0);
        let want = cpu::prefill(&shape, opts, &mask, &q, &k, &v).unwrap();
        let plan = HostPlan::new(&shape, opts, &mask).unwrap();
        let (o, lse) = emulate_kernel(&plan, &q, &k, &v);
        common::assert_rel_l2(&format!("o case {case}"), &o, &want.o, tol);
        common::assert_close(&format!("lse case {case}"), &lse, &want.lse, 1e-4, 1e-4);
    }
}

#[test]
fn kernel_algorithm_emulation_meets_f16_tolerance() {
    emulation_case::<f16>(21, PvPrecision::Storage, 5e-4);
}

#[test]
fn kernel_algorithm_emulation_meets_bf16_tolerance() {
    emulation_case::<bf16>(22, PvPrecision::Storage, 4e-3);
}

#[test]
fn kernel_algorithm_emulation_split_meets_the_tighter_bf16_bound() {
    emulation_case::<bf16>(22, PvPrecision::Split, 2e-3);
}

#[test]
fn empty_rows_give_zero_and_neg_inf() {
    // Row block 1 lists nothing; every other row sees column block 0.
    let shape = shape1(150, 100, 2, 1, 64);
    let mask = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0], vec![], vec![0, 1]]]).unwrap();
    let mut rng = Rng::new(3);
    let q: Vec<f16> = random_vec(&mut rng, 150 * 2 * 64, 1.0);
    let kv: Vec<f16> = random_vec(&mut rng, 100 * 64, 1.0);
    let out = cpu::prefill(&shape, PrefillOptions::default(), &mask, &q, &kv, &kv).unwrap();
    for h in 0..2 {
        for i in 0..150 {
            let empty = (64..128).contains(&i);
            assert_eq!(out.lse[h * 150 + i] == f64::NEG_INFINITY, empty, "h={h} i={i}");
            if empty {
                assert!(out.o[(i * 2 + h) * 64..][..64].iter().all(|&x| x == 0.0));
            }
        }
    }
    let plan = HostPlan::new(&shape, PrefillOptions::default(), &mask).unwrap();
    let (o, lse) = emulate_kernel(&plan, &q, &kv, &kv);
    common::assert_rel_l2("o", &o, &out.o, 5e-4);
    assert!(lse.iter().zip(&out.lse).all(|(a, b)| (a.is_infinite() && a == b) || (a - b).abs() < 1e-4));
}

fn graph_visible_via_mask(g: &GraphKv, mask: &BlockMask, shape: &PrefillShape, b: usize) -> Vec<bool> {
    let n = g.seq_len;
    let mut out = vec![false; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = mask.visible(shape, b, 0, i, j).unwrap();
        }
    }
    out
}

fn random_graph(rng: &mut Rng, seq_len: usize) -> GraphKv {
    // Cut 0..seq_len into pieces, keep most as segments (some gaps), random backward edges.
    let mut cuts: Vec<usize> = (0..rng.below(8)).map(|_| rng.below(seq_len + 1)).collect();
    cuts.extend([0, seq_len]);
    cuts.sort_unstable();
    cuts.dedup();
    let mut segments: Vec<std::ops::Range<usize>> =
        cuts.windows(2).map(|w| w[0]..w[1]).filter(|r| !r.is_empty()).collect();
    segments.retain(|_| rng.uniform() < 0.85);
    // Shuffle segment order (the builder accepts any order).
    for x in (1..segments.len()).rev() {
        segments.swap(x, rng.below(x + 1));
    }
    let mut edges = Vec::new();
    for t in 0..segments.len() {
        for s in 0..segments.len() {
            if t != s && rng.uniform() < 0.4 {
                edges.push((t, s));
            }
        }
    }
    if let Some(&e) = edges.first() {
        edges.push(e); // a duplicate is merged
    }
    GraphKv { seq_len, segments, edges }
}

#[test]
fn graph_mask_is_token_exact() {
    let mut rng = Rng::new(5);
    for case in 0..16 {
        let graphs: Vec<GraphKv> = (0..1 + case % 3)
            .map(|_| {
                let n = 1 + rng.below(400);
                random_graph(&mut rng, n)
            })
            .collect();
        let (br, bc) = ([64, 128][case % 2], [64, 128][(case / 2) % 2]);
        let mask = graph_kv_mask(&graphs, br, bc).unwrap();
        let cu = graph_cu_seqlens(&graphs).unwrap();
        let shape = PrefillShape::new(2, 1, 64, cu.clone(), cu).unwrap();
        mask.validate(&shape).unwrap();
        for (b, g) in graphs.iter().enumerate() {
            assert_eq!(
                graph_visible_via_mask(g, &mask, &shape, b),
                g.visible_pairs().unwrap(),
                "case {case} entry {b}"
            );
        }
        // Blocks with a token mask are really partial, and listed blocks are really used.
        check_plan_is_exact(&shape, PrefillOptions::default(), &mask);
    }
}

#[test]
fn graph_mask_of_a_chain_is_sparse_and_causal_inside() {
    // Four 128-token segments, each the source of the next: block-diagonal plus sub-diagonal.
    let g = GraphKv {
        seq_len: 512,
        segments: (0..4).map(|s| s * 128..(s + 1) * 128).collect(),
        edges: vec![(1, 0), (2, 1), (3, 2)],
    };
    let mask = graph_kv_mask(std::slice::from_ref(&g), 128, 128).unwrap();
    assert_eq!(mask.indptr, vec![0, 1, 3, 5, 7]);
    assert_eq!(mask.indices, vec![0, 0, 1, 1, 2, 2, 3]);
    // Only the diagonal blocks are partial (causal inside the segment).
    let partial: Vec<bool> = mask.token_mask_ids.iter().map(|&x| x != NO_TOKEN_MASK).collect();
    assert_eq!(partial, vec![true, false, true, false, true, false, true]);
    // Same result with the kernel's causal flag on, since every edge points backwards.
    let shape = PrefillShape::new(1, 1, 64, vec![0, 512], vec![0, 512]).unwrap();
    check_plan_is_exact(&shape, PrefillOptions { causal: true, ..Default::default() }, &mask);
}

#[test]
fn graph_builder_rejects_bad_graphs() {
    let ok = GraphKv { seq_len: 100, segments: vec![0..50, 50..100], edges: vec![(1, 0)] };
    assert!(graph_kv_mask(std::slice::from_ref(&ok), 64, 64).is_ok());
    let bad = [
        (GraphKv { segments: vec![0..60, 50..100], ..ok.clone() }, "segments"),
        (GraphKv { segments: vec![0..50, 50..101], ..ok.clone() }, "segments"),
        (GraphKv { segments: vec![0..50, 70..70], ..ok.clone() }, "segments"),
        (GraphKv { edges: vec![(1, 2)], ..ok.clone() }, "edges"),
        (GraphKv { edges: vec![(1, 1)], ..ok.clone() }, "edges"),
    ];
    for (g, arg) in bad {
        let e = graph_kv_mask(std::slice::from_ref(&g), 64, 64).unwrap_err();
        assert_eq!(arg_of(&e), arg, "{g:?}");
    }
    assert_eq!(arg_of(&graph_kv_mask(&[ok], 96, 64).unwrap_err()), "block_rows");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Any valid random mask plans without error and the plan's lists cover exactly the
    /// visible pairs.
    #[test]
    fn random_masks_plan_exactly(seed in 0u64..1_000_000, causal: bool, per_head: bool, big_r: bool, big_c: bool) {
        let mut rng = Rng::new(seed);
        let batch = 1 + rng.below(3);
        let cu_q = random_cu(&mut rng, batch, 200, true);
        let cu_k = random_cu(&mut rng, cu_q.len() - 1, 200, true);
        let shape = PrefillShape::new(4, 2, 64, cu_q, cu_k).unwrap();
        let heads = if per_head { MaskHeads::PerKvHead } else { MaskHeads::Shared };
        let density = rng.uniform();
        let mask = random_mask(&mut rng, &shape, if big_r { 128 } else { 64 }, if big_c { 128 } else { 64 }, heads, density, 0.3);
        check_plan_is_exact(&shape, PrefillOptions { causal, ..Default::default() }, &mask);
    }
}

/// The GPU suite's cases and inputs, run through the host emulation of the kernel: the
/// tolerances the GPU tests assert are reachable by the kernel's arithmetic.
fn gpu_cases_in_emulation<T: Float>(case_seed: u64, data_seed: u64, n: usize, tol: f64, split: bool) {
    let mut rng = Rng::new(data_seed);
    for (i, c) in random_cases(case_seed, n).iter().enumerate() {
        let (q, k, v) = normal_inputs::<T>(&mut rng, &c.shape);
        let opts = if split { PrefillOptions { pv_precision: PvPrecision::Split, ..c.opts } } else { c.opts };
        let want = cpu::prefill(&c.shape, opts, &c.mask, &q, &k, &v).unwrap();
        let plan = HostPlan::new(&c.shape, opts, &c.mask).unwrap();
        let (o, lse) = emulate_kernel(&plan, &q, &k, &v);
        common::assert_rel_l2(&format!("case {i}: o"), &o, &want.o, tol);
        common::assert_close(&format!("case {i}: lse"), &lse, &want.lse, 1e-4, 1e-4);
    }
}

#[test]
fn gpu_suite_f16_cases_pass_in_emulation() {
    gpu_cases_in_emulation::<f16>(1, 101, 16, 5e-4, false);
}

#[test]
fn gpu_suite_bf16_cases_pass_in_emulation() {
    gpu_cases_in_emulation::<bf16>(2, 102, 16, 4e-3, false);
}

#[test]
fn gpu_suite_bf16_split_cases_pass_in_emulation() {
    gpu_cases_in_emulation::<bf16>(3, 103, 6, 2e-3, true);
}

/// A NaN in q, or in k of a visible key, makes exactly the rows that read it NaN (o and lse),
/// in the reference and in the kernel's algorithm; it never passes for an empty row (-inf).
#[test]
fn nan_inputs_make_their_rows_nan_not_empty() {
    let shape = shape1(100, 80, 2, 1, 64);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
    let opts = PrefillOptions { causal: true, ..Default::default() };
    let mut rng = Rng::new(7);
    let mut q: Vec<f16> = random_vec(&mut rng, 100 * 2 * 64, 1.0);
    let mut k: Vec<f16> = random_vec(&mut rng, 80 * 64, 1.0);
    let v: Vec<f16> = random_vec(&mut rng, 80 * 64, 1.0);
    q[(50 * 2) * 64 + 3] = f16::NAN; // query token 50 (sees keys 0..=30), head 0
    k[70 * 64 + 9] = f16::NAN; // key 70: visible (causally) from query 90 on
    let want = cpu::prefill(&shape, opts, &mask, &q, &k, &v).unwrap();
    let plan = HostPlan::new(&shape, opts, &mask).unwrap();
    let (o, lse) = emulate_kernel(&plan, &q, &k, &v);
    for h in 0..2 {
        for i in 0..100 {
            let nan = (h == 0 && i == 50) || i >= 90;
            for (what, out_lse, out_o) in [("reference", &want.lse, &want.o), ("emulation", &lse, &o)] {
                assert_eq!(out_lse[h * 100 + i].is_nan(), nan, "{what} lse h={h} i={i}");
                assert!(out_o[(i * 2 + h) * 64..][..64].iter().all(|x| x.is_nan() == nan), "{what} o h={h} i={i}");
            }
        }
    }
}
