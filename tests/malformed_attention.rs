//! Malformed inputs thrown at every public validator, accessor, CPU reference and builder of
//! the attention family: each gives a typed error (never a panic or an abort), and every
//! validator limit is checked at, one below and one above its boundary.

#![allow(clippy::single_range_in_vec_init, clippy::reversed_empty_ranges)]

mod attention_common;
mod common;

use attention_common::{errs, no_panic};
use common::arg_of;
use half::f16;
use ntkv::attention::graph::{graph_cu_seqlens, graph_kv_mask, GraphKv, MAX_SEQ_LEN};
use ntkv::attention::{cpu, BlockMask, HostPlan, MaskHeads, PrefillOptions, PrefillShape, MAX_HEADS};

fn shape(hq: usize, hkv: usize, cu_q: Vec<u32>, cu_k: Vec<u32>) -> PrefillShape {
    PrefillShape { hq, hkv, head_dim: 64, cu_seqlens_q: cu_q, cu_seqlens_k: cu_k }
}

#[test]
fn graph_kv_mask_refuses_absurd_lengths() {
    for n in [usize::MAX, MAX_SEQ_LEN + 1] {
        let g = GraphKv { seq_len: n, segments: vec![0..1], edges: vec![] };
        let e = errs("graph_kv_mask", || graph_kv_mask(std::slice::from_ref(&g), 64, 64));
        assert_eq!(arg_of(&e), "seq_len");
        let e = errs("visible_pairs", || g.visible_pairs());
        assert_eq!(arg_of(&e), "seq_len");
    }
    // At the limit the graph is valid, but the seq_len² table of the definition is refused.
    let g = GraphKv { seq_len: MAX_SEQ_LEN, segments: vec![0..1], edges: vec![] };
    assert_eq!(arg_of(&errs("visible_pairs at the limit", || g.visible_pairs())), "seq_len");
    // A batch whose total overflows u32 tokens.
    let g = GraphKv { seq_len: MAX_SEQ_LEN, ..Default::default() };
    assert_eq!(arg_of(&errs("cu_seqlens", || graph_cu_seqlens(&[g.clone(), g.clone(), g]))), "graphs");
    let huge = GraphKv { seq_len: usize::MAX, ..Default::default() };
    assert!(no_panic("cu_seqlens usize::MAX", || graph_cu_seqlens(&[huge.clone(), huge])).is_err());
    // Segments and edges out of range.
    let bad = [
        GraphKv { seq_len: 10, segments: vec![0..usize::MAX], edges: vec![] },
        GraphKv { seq_len: 10, segments: vec![5..3], edges: vec![] },
        GraphKv { seq_len: 10, segments: vec![0..5], edges: vec![(0, usize::MAX)] },
        GraphKv { seq_len: 10, segments: vec![0..5], edges: vec![(usize::MAX, 0)] },
    ];
    for g in bad {
        errs("graph_kv_mask", || graph_kv_mask(std::slice::from_ref(&g), 64, 64));
    }
    for (br, bc) in [(0, 64), (64, 0), (usize::MAX, 64), (64, usize::MAX), (32, 64), (65, 64)] {
        let g = GraphKv { seq_len: 10, segments: vec![0..5], edges: vec![] };
        errs("block sizes", || graph_kv_mask(std::slice::from_ref(&g), br, bc));
    }
}

#[test]
fn shape_accessors_refuse_out_of_range_entries() {
    let s = shape(2, 1, vec![0, 10, 30], vec![0, 5, 9]);
    assert_eq!(s.seq_q(1).unwrap(), 20);
    assert_eq!(s.seq_k(1).unwrap(), 4);
    for b in [2, 3, usize::MAX] {
        assert_eq!(arg_of(&errs("seq_q", || s.seq_q(b))), "b");
        assert_eq!(arg_of(&errs("seq_k", || s.seq_k(b))), "b");
    }
    // Offsets that decrease (public fields, not validated): an error, not an underflow.
    let s = shape(2, 1, vec![0, 10, 4], vec![0, 9, 3]);
    assert_eq!(arg_of(&errs("seq_q", || s.seq_q(1))), "cu_seqlens_q");
    assert_eq!(arg_of(&errs("seq_k", || s.seq_k(1))), "cu_seqlens_k");
    assert_eq!(arg_of(&errs("validate", || s.validate())), "cu_seqlens_q");
    // Empty offsets.
    let s = shape(2, 1, vec![], vec![]);
    assert_eq!(arg_of(&errs("seq_q", || s.seq_q(0))), "b");
    assert_eq!(s.batch(), 0);
    // Zero heads: group() does not divide by zero.
    assert_eq!(shape(2, 0, vec![0], vec![0]).group(), 0);
}

#[test]
fn shape_limits_at_their_boundaries() {
    // Heads: MAX_HEADS - 1, MAX_HEADS pass; MAX_HEADS + 1 and usize::MAX fail.
    for (hq, ok) in [(MAX_HEADS - 1, true), (MAX_HEADS, true), (MAX_HEADS + 1, false), (usize::MAX, false)] {
        let r = no_panic("heads", || shape(hq, 1, vec![0, 1], vec![0, 1]).validate());
        assert_eq!(r.is_ok(), ok, "hq = {hq}: {r:?}");
    }
    // Tokens: i32::MAX - 1 and i32::MAX pass, i32::MAX + 1 fails (one head).
    let m = i32::MAX as u32;
    for (t, ok) in [(m - 1, true), (m, true), (m + 1, false), (u32::MAX, false)] {
        let r = no_panic("tokens", || shape(1, 1, vec![0, t], vec![0, t]).validate());
        assert_eq!(r.is_ok(), ok, "tokens {t}: {r:?}");
    }
    // Tq_total x Hq: at most i32::MAX.
    let half = m / 2; // 2 * half = i32::MAX - 1
    for (t, ok) in [(half, true), (half + 1, false)] {
        let r = no_panic("rows", || shape(2, 1, vec![0, t], vec![0, 1]).validate());
        assert_eq!(r.is_ok(), ok, "2 x {t}: {r:?}");
    }
    let r = no_panic("rows", || shape(1, 1, vec![0, m], vec![0, 1]).validate());
    assert!(r.is_ok());
    // Head dims.
    for d in [0, 63, 65, 127, 129, usize::MAX] {
        let s = PrefillShape { head_dim: d, ..shape(1, 1, vec![0, 1], vec![0, 1]) };
        assert_eq!(arg_of(&errs("head_dim", || s.validate())), "head_dim");
    }
}

#[test]
fn mask_accessors_refuse_out_of_range_arguments() {
    let s = shape(4, 2, vec![0, 100, 164], vec![0, 130, 140]);
    let mask = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0, 2], vec![1]], vec![vec![0]]]).unwrap();
    assert!(mask.visible(&s, 0, 0, 0, 0).unwrap());
    assert_eq!(mask.bsr_base(&s, 1, 0).unwrap(), 3);
    for (b, m, i, j, arg) in [
        (2, 0, 0, 0, "b"),
        (usize::MAX, 0, 0, 0, "b"),
        (0, 1, 0, 0, "m"),
        (0, usize::MAX, 0, 0, "m"),
        (0, 0, 100, 0, "i"),
        (0, 0, usize::MAX, 0, "i"),
        (0, 0, 0, 130, "j"),
        (1, 0, 0, 10, "j"),
        (0, 0, 0, usize::MAX, "j"),
    ] {
        assert_eq!(arg_of(&errs("visible", || mask.visible(&s, b, m, i, j))), arg, "({b}, {m}, {i}, {j})");
    }
    assert_eq!(arg_of(&errs("bsr_base", || mask.bsr_base(&s, usize::MAX, 0))), "b");
    assert_eq!(arg_of(&errs("bsr_base", || mask.bsr_base(&s, 0, 5))), "m");
    // token_mask_id: the last index is fine, one past it is an error.
    assert_eq!(mask.token_mask_id(3).unwrap(), ntkv::attention::NO_TOKEN_MASK);
    assert_eq!(arg_of(&errs("token_mask_id", || mask.token_mask_id(4))), "pos");
    assert_eq!(arg_of(&errs("token_mask_id", || mask.token_mask_id(usize::MAX))), "pos");
    // A mask that does not fit the shape: visible says so instead of indexing out of range.
    let short = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[vec![vec![0]]]).unwrap();
    assert_eq!(arg_of(&errs("visible", || short.visible(&s, 1, 0, 0, 0))), "indptr");
    // Absurd block sizes in a hand-built mask.
    let mut m = mask.clone();
    m.block_rows = usize::MAX;
    assert_eq!(arg_of(&errs("validate", || m.validate(&s))), "block_rows");
    assert_eq!(m.token_mask_words(), usize::MAX / 32); // saturates, no overflow
    assert_eq!(arg_of(&errs("bsr_base", || m.bsr_base(&s, 0, 0))), "block_rows");
    // The reference's visible(): head out of range.
    let o = PrefillOptions::default();
    assert_eq!(arg_of(&errs("cpu::visible", || cpu::visible(&s, &o, &mask, 0, 4, 0, 0))), "h");
    assert_eq!(arg_of(&errs("cpu::visible", || cpu::visible(&s, &o, &mask, 0, usize::MAX, 0, 0))), "h");
}

#[test]
fn reference_and_plan_refuse_absurd_inputs() {
    let o = PrefillOptions::default();
    // A shape of i32::MAX tokens with an empty mask and no data: the mask is refused first.
    let m = i32::MAX as u32;
    let s = shape(1, 1, vec![0, m], vec![0, m]);
    let empty = BlockMask::from_lists(64, 64, MaskHeads::Shared, &[]).unwrap();
    let none: [f16; 0] = [];
    assert_eq!(arg_of(&errs("prefill", || cpu::prefill(&s, o, &empty, &none, &none, &none))), "indptr");
    assert_eq!(arg_of(&errs("HostPlan", || HostPlan::new(&s, o, &empty))), "indptr");
    // Malformed shapes reach the reference and the plan as errors too.
    let bad = shape(3, 2, vec![0, 4], vec![0, 4]);
    errs("prefill", || cpu::prefill(&bad, o, &empty, &none, &none, &none));
    let bad = shape(1, 1, vec![0, 8, 4], vec![0, 4, 8]);
    errs("dense", || BlockMask::dense(64, 64, MaskHeads::Shared, &bad));
    // Slices shorter than the shape.
    let s = shape(1, 1, vec![0, 10], vec![0, 10]);
    let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &s).unwrap();
    let q = vec![f16::ZERO; 640];
    assert_eq!(arg_of(&errs("prefill", || cpu::prefill(&s, o, &mask, &q[1..], &q, &q))), "q");
    assert_eq!(arg_of(&errs("prefill", || cpu::prefill(&s, o, &mask, &q, &q, &q[..10]))), "v");
    // Non-finite scale.
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let o = PrefillOptions { scale: Some(scale), ..Default::default() };
        assert_eq!(arg_of(&errs("scale", || HostPlan::new(&s, o, &mask))), "scale");
    }
    // A hand-built mask with indptr values past indices.
    let mut m = mask.clone();
    m.indptr = vec![0, u32::MAX];
    assert_eq!(arg_of(&errs("validate", || m.validate(&s))), "indptr");
    let mut m = mask;
    m.token_mask_ids = vec![u32::MAX - 1];
    assert_eq!(arg_of(&errs("validate", || m.validate(&s))), "token_mask_ids");
}
