//! Malformed inputs for the top-k family and the shared `select` primitives: every
//! validator, CPU reference, layout chooser and accessor returns a typed error (never a
//! panic or an abort) on absurd sizes, overflowing products, zero sizes and out-of-range
//! values, and each validator's exact boundary (at the limit, one below, one above) is pinned.
//! Runs anywhere (no GPU).

mod common;

use common::arg_of;

use std::panic::{catch_unwind, AssertUnwindSafe};

use ntkv::select::{self, BlockMap, ExpandShape, SegmentShape, TopkShape};
use ntkv::topk::{
    cpu, validate_compact, validate_select, validate_topk, AttnShape, GqaReduce, TopkLayout, MAX_K, MAX_N,
};
use ntkv::Error;

const BIG: usize = usize::MAX;

/// Runs `f`, failing the test (with `what`) if it panics.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

/// `f` returns an error (any typed error) without panicking.
fn rejects<R: std::fmt::Debug>(what: &str, f: impl FnOnce() -> ntkv::Result<R>) -> Error {
    match no_panic(what, f) {
        Err(e) => e,
        Ok(r) => panic!("{what}: accepted ({r:?})"),
    }
}

#[test]
fn cpu_topk_absurd_sizes() {
    let x = [1.0f32; 4];
    for (rows, n, k) in
        [(BIG, 1, 1), (1, BIG, 1), (1, 4, BIG), (BIG, BIG, BIG), (BIG / 2 + 1, 2, 1), (0, 4, 1), (1, 0, 1)]
    {
        rejects(&format!("cpu::topk({rows}, {n}, {k})"), || cpu::topk(&x, rows, n, k, None));
    }
    // rows × n overflows usize: a typed TooLarge, not a wrapped product that happens to match.
    let e = rejects("rows x n overflow", || cpu::topk(&x, (1 << 40) + 1, 1 << 24, 1, None));
    assert!(matches!(e, Error::TooLarge { arg: "scores", .. }), "{e:?}");
    let e = rejects("lengths of the wrong count", || cpu::topk(&x, 2, 2, 1, Some(&[1])));
    assert!(matches!(e, Error::Shape { arg: "lengths", .. }));
    let e = rejects("scores of the wrong length", || cpu::topk(&x, 2, 3, 1, None));
    assert!(matches!(e, Error::Shape { arg: "scores", .. }));
}

#[test]
fn topk_validator_boundaries() {
    // k: 0 rejected, 1 and MAX_K accepted, MAX_K + 1 rejected.
    assert_eq!(arg_of(&validate_topk(1, 10, 0, None).unwrap_err()), "k");
    assert!(validate_topk(1, 10, 1, None).is_ok());
    assert!(validate_topk(1, 10, MAX_K - 1, None).is_ok());
    assert!(validate_topk(1, 10, MAX_K, None).is_ok());
    assert_eq!(arg_of(&validate_topk(1, 10, MAX_K + 1, None).unwrap_err()), "k");
    // n: MAX_N − 1 and MAX_N accepted, MAX_N + 1 too large.
    assert!(validate_topk(1, MAX_N - 1, 1, None).is_ok());
    assert!(validate_topk(1, MAX_N, 1, None).is_ok());
    assert!(matches!(validate_topk(1, MAX_N + 1, 1, None), Err(Error::TooLarge { arg: "scores", .. })));
    // lengths: n − 1 and n accepted, n + 1 rejected; u32::MAX rejected without overflow.
    assert!(validate_topk(2, 10, 3, Some(&[9, 10])).is_ok());
    assert_eq!(arg_of(&validate_topk(2, 10, 3, Some(&[10, 11])).unwrap_err()), "lengths");
    assert_eq!(arg_of(&validate_topk(1, 10, 3, Some(&[u32::MAX])).unwrap_err()), "lengths");
    // A shape whose outputs overflow the address space.
    let rows = isize::MAX as usize / 8;
    assert!(matches!(TopkShape { rows, n: 1, k: 8 }.validate(), Err(Error::TooLarge { arg: "values", .. })));
    assert!(matches!(TopkShape { rows: BIG, n: 2, k: 1 }.validate(), Err(Error::TooLarge { arg: "scores", .. })));
}

#[test]
fn layout_choose_absurd_values() {
    let cases = [
        (BIG, BIG, BIG, BIG, BIG),
        (BIG, 1, 1, 1, 1),
        (1, BIG, 1, 1, 1),
        (1, 1, BIG, 1, 1),
        (1, 1 << 20, 1, 0, 3),
        (1, 1 << 20, 1, 132, 0),
        (0, 0, 0, 0, 0),
    ];
    for (rows, n, k, sms, per_sm) in cases {
        rejects(&format!("choose({rows}, {n}, {k}, {sms}, {per_sm})"), || TopkLayout::choose(rows, n, k, sms, per_sm));
    }
    // Huge device figures with a valid shape are fine (saturating arithmetic).
    for (sms, per_sm) in [(BIG, BIG), (BIG, 1), (1, BIG)] {
        let l = no_panic("huge device", || TopkLayout::choose(3, 1 << 20, 100, sms, per_sm)).unwrap();
        assert!(l.blocks_per_row >= 1);
        assert!(l.waves(sms, per_sm).is_finite());
    }
    let l = TopkLayout::choose(BIG / 8, MAX_N, MAX_K, 132, 3);
    assert!(l.is_err(), "rows × n overflow: {l:?}");
    let l = TopkLayout::choose(65535 * 4, 4, 1, 132, 3).unwrap();
    assert!(l.rows_per_batch >= 1 && l.rows_per_batch <= 65535, "the grid's y limit caps a batch: {l:?}");
    assert_eq!(l.workspace_bytes(BIG, 1), None);
}

#[test]
fn eviction_validator_boundaries() {
    let e = |r: ntkv::Result<()>| arg_of(&r.unwrap_err());
    // budget − recent: MAX_K accepted, MAX_K + 1 rejected.
    assert!(validate_select(1, 1 << 20, MAX_K + 64, 64, "recent").is_ok());
    assert!(validate_select(1, 1 << 20, MAX_K + 63, 64, "recent").is_ok());
    assert_eq!(e(validate_select(1, 1 << 20, MAX_K + 65, 64, "recent")), "budget");
    // budget ≤ t; recent ≤ budget; recent ≤ t.
    assert!(validate_select(1, 100, 100, 0, "recent").is_ok());
    assert_eq!(e(validate_select(1, 100, 101, 0, "recent")), "budget");
    assert!(validate_select(1, 100, 100, 100, "recent").is_ok());
    assert_eq!(e(validate_select(1, 100, 99, 100, "recent")), "budget");
    assert_eq!(e(validate_select(1, 100, 100, 101, "recent")), "recent");
    assert_eq!(e(validate_select(1, 100, 101, 101, "window")), "window");
    // t: MAX_N accepted, MAX_N + 1 too large; absurd values typed.
    assert!(validate_select(1, MAX_N, 10, 0, "recent").is_ok());
    assert_eq!(e(validate_select(1, MAX_N + 1, 10, 0, "recent")), "acc");
    for (rows, t, budget, recent) in [(BIG, BIG, BIG, BIG), (0, 1, 1, 0), (1, 0, 1, 0), (1, 10, 0, 0), (1, 10, BIG, 0)]
    {
        rejects("validate_select", || validate_select(rows, t, budget, recent, "recent"));
    }
    rejects("cpu::h2o_select", || cpu::h2o_select(&[0.0; 4], BIG, BIG, 1, 0));
    rejects("cpu::h2o_select", || cpu::h2o_select(&[0.0; 4], 2, 3, 1, 0));
    rejects("cpu::snapkv_select_from_scores", || cpu::snapkv_select_from_scores(&[0.0; 4], BIG, BIG, BIG, BIG));
    rejects("cpu::snapkv_select_from_scores", || cpu::snapkv_select_from_scores(&[0.0; 4], 1, 10, 2, 5));
}

#[test]
fn compaction_absurd_sizes() {
    let (mut k, mut v, mut a) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 4]);
    for (keep_len, hkv, t, d) in
        [(4, BIG, BIG, BIG), (4, 2, BIG, BIG), (BIG, 1, 1, 1), (4, 0, 4, 2), (4, 2, 0, 2), (4, 2, 2, 0)]
    {
        rejects("validate_compact", || validate_compact(keep_len, hkv, t, d, 8, 8, None));
    }
    // hkv · t · d overflow is TooLarge naming the cache.
    assert!(matches!(validate_compact(4, 2, BIG / 2, 4, 8, 8, None), Err(Error::TooLarge { arg: "k_cache", .. })));
    let keep = [0u32, 1, 0, 1];
    for (hkv, t, d) in [(BIG, BIG, BIG), (2, BIG, 2), (BIG, 1, 1), (2, 2, BIG), (3, 2, 2)] {
        rejects(&format!("cpu::h2o_compact({hkv}, {t}, {d})"), || {
            cpu::h2o_compact(&keep, hkv, t, d, &mut k, &mut v, Some(&mut a))
        });
    }
    // Out-of-range and unsorted keep entries, at the boundary: t − 1 fine, t rejected.
    assert!(cpu::h2o_compact(&[0, 1, 0, 1], 2, 2, 2, &mut k, &mut v, Some(&mut a)).is_ok());
    let e = rejects("keep = t", || cpu::h2o_compact(&[0, 2, 0, 1], 2, 2, 2, &mut k, &mut v, None));
    assert_eq!(arg_of(&e), "keep");
    let e = rejects("keep = u32::MAX", || cpu::h2o_compact(&[0, u32::MAX, 0, 1], 2, 2, 2, &mut k, &mut v, None));
    assert_eq!(arg_of(&e), "keep");
    // budget: t entries per head accepted, t + 1 rejected.
    assert_eq!(validate_compact(4, 2, 2, 2, 8, 8, Some(4)).unwrap(), 2);
    assert_eq!(arg_of(&validate_compact(6, 2, 2, 2, 8, 8, Some(4)).unwrap_err()), "keep");
}

#[test]
fn attention_references_absurd_shapes() {
    let q = [half::f16::ZERO; 8];
    let shapes = [
        AttnShape { hq: BIG, hkv: BIG, tq: BIG, t: BIG, d: BIG },
        AttnShape { hq: BIG, hkv: 1, tq: 1, t: 1, d: 64 },
        AttnShape { hq: 1, hkv: 1, tq: 1, t: BIG, d: 64 },
        AttnShape { hq: 1, hkv: 1, tq: 2, t: 1, d: 64 },
        AttnShape { hq: 3, hkv: 2, tq: 1, t: 1, d: 64 },
        AttnShape { hq: 0, hkv: 0, tq: 0, t: 0, d: 0 },
        AttnShape { hq: 1, hkv: 1, tq: 1, t: 1, d: BIG },
        AttnShape { hq: 1, hkv: 1, tq: 1, t: 1, d: 8 }, // valid, but the buffers are too short
    ];
    for s in shapes {
        rejects(&format!("attention_mass {s:?}"), || cpu::attention_mass(&q, &q[..1], s, GqaReduce::Sum));
        let mut acc = [0.0f32; 1];
        rejects(&format!("h2o_accumulate {s:?}"), || cpu::h2o_accumulate(&q, &q[..1], &mut acc, s, GqaReduce::Max));
        rejects(&format!("snapkv_scores {s:?}"), || cpu::snapkv_scores(&q, &q[..1], s, GqaReduce::Sum));
    }
    rejects("from_shapes 2-D", || AttnShape::from_shapes(&[1, 2], &[1, 2, 3]));
    rejects("from_shapes d mismatch", || AttnShape::from_shapes(&[1, 1, 64], &[1, 1, 32]));
    rejects("from_shapes absurd", || AttnShape::from_shapes(&[BIG, BIG, BIG], &[BIG, BIG, BIG]));
    // tq ≤ t boundary.
    assert!(AttnShape { hq: 1, hkv: 1, tq: 5, t: 5, d: 64 }.validate().is_ok());
    assert!(AttnShape { hq: 1, hkv: 1, tq: 6, t: 5, d: 64 }.validate().is_err());
    rejects("pool5 absurd", || cpu::pool5(&[1.0; 4], BIG, BIG));
    rejects("pool5 short", || cpu::pool5(&[1.0; 4], 1, 5));
}

#[test]
fn select_references_absurd_sizes() {
    let x = [1.0f32; 4];
    for shape in [
        SegmentShape { segments: BIG, total: BIG, max_len: BIG, k: BIG },
        SegmentShape { segments: BIG, total: 4, max_len: 4, k: 1 },
        SegmentShape { segments: 1, total: 4, max_len: 0, k: 1 },
        SegmentShape { segments: 0, total: 4, max_len: 4, k: 1 },
        SegmentShape { segments: 1, total: 4, max_len: 4, k: 0 },
        SegmentShape { segments: 1, total: 5, max_len: 5, k: 1 }, // indptr says 4
    ] {
        rejects(&format!("topk_segments {shape:?}"), || select::cpu::topk_segments(&x, &shape, &[0, 4], None));
    }
    let ok = SegmentShape { segments: 1, total: 4, max_len: 4, k: 2 };
    assert!(select::cpu::topk_segments(&x, &ok, &[0, 4], Some(&[2])).is_ok());
    rejects("ks above k", || select::cpu::topk_segments(&x, &ok, &[0, 4], Some(&[3])));
    rejects("indptr past total", || select::cpu::topk_segments(&x, &ok, &[0, u32::MAX], None));
    rejects("empty indptr", || select::cpu::topk_segments(&x, &ok, &[], None));
    for shape in [
        ExpandShape { rows: BIG, kb: BIG, nb: BIG, t: BIG, map: BlockMap::Fixed { block_size: BIG } },
        ExpandShape { rows: BIG, kb: 1, nb: 1, t: 1, map: BlockMap::Fixed { block_size: 1 } },
        ExpandShape { rows: 1, kb: 1, nb: BIG, t: 1, map: BlockMap::Ranges { shared: true } },
        ExpandShape { rows: 1 << 33, kb: 1, nb: 1, t: 1, map: BlockMap::Ranges { shared: false } },
        ExpandShape { rows: 0, kb: 1, nb: 1, t: 1, map: BlockMap::Fixed { block_size: 1 } },
    ] {
        rejects(&format!("expand {shape:?}"), || select::cpu::expand_blocks(&shape, &[0], &[1], None));
        rejects(&format!("capacity {shape:?}"), || shape.validate());
        no_panic("max_tokens_per_row", || shape.max_tokens_per_row());
        no_panic("ranges_shape", || shape.ranges_shape());
    }
    // Ids past nb, u32::MAX padding and huge lengths select nothing or are clipped: no panic.
    let s = ExpandShape { rows: 1, kb: 4, nb: 2, t: 8, map: BlockMap::Fixed { block_size: 4 } };
    let (p, i) = select::cpu::expand_blocks(&s, &[u32::MAX, 7, 1, 1], &[u32::MAX], None).unwrap();
    assert_eq!((p, i), (vec![0, 4], vec![4, 5, 6, 7]));
    let r = ExpandShape { rows: 1, kb: 2, nb: 1, t: 8, map: BlockMap::Ranges { shared: true } };
    let (p, _) = select::cpu::expand_blocks(&r, &[0, 0], &[8], Some(&[u32::MAX, 0])).unwrap();
    assert_eq!(p, vec![0, 0], "a reversed range is empty");
    assert!(select::validate_topk(1, 1, 1, None).is_ok());
}
