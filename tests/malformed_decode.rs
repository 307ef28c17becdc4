//! Malformed inputs thrown at every public validator, helper and the CPU reference of the
//! decode family: each gives a typed error (never a panic or an abort), every validator
//! limit is checked at, one below and one above its boundary, and the device validator's
//! 64-bit verdict is checked at the edge of its range.

mod attention_common;
mod common;

use attention_common::{errs, no_panic};
use common::arg_of;
use half::f16;
use ntkv::decode::{
    attn_smem_bytes, chunks_of, cpu, decode_verdict, encode_verdict, plan_chunks, validate_cache_lens, validate_indptr,
    validate_lists, DecodeOptions, DecodeShape, IndexFault, MAX_VERDICT_POS, TILE_TOKENS, VERDICT_NONE,
};
use ntkv::Error;

const OK: DecodeShape = DecodeShape { batch: 2, q_tokens: 1, hq: 4, hkv: 2, head_dim: 64, capacity: 16 };

#[test]
fn absurd_shapes_are_errors() {
    let m = usize::MAX;
    for (s, arg) in [
        (DecodeShape { batch: m, ..OK }, "q"),
        (DecodeShape { hq: m, hkv: 1, ..OK }, "q"),
        (DecodeShape { hkv: m, hq: m, ..OK }, "q"),
        (DecodeShape { capacity: m, ..OK }, "capacity"),
        (DecodeShape { head_dim: m, ..OK }, "head_dim"),
        (DecodeShape { q_tokens: m, ..OK }, "q_tokens"),
        (DecodeShape { batch: 1 << 40, hq: 1 << 20, hkv: 1 << 20, ..OK }, "q"),
    ] {
        assert_eq!(arg_of(&errs("validate", || s.validate())), arg, "{s:?}");
        // Every helper that takes a shape validates it first.
        errs("cache_lens", || validate_cache_lens(&s, &[]));
        errs("indptr", || validate_indptr(&s, &[], &[], 0));
        errs("lists", || validate_lists(&s, &[], &[], &[]));
        errs("token_mask", || cpu::token_mask(&s, &[], &[], &[]));
        let none: [f16; 0] = [];
        errs("sparse_decode", || cpu::sparse_decode(&s, &DecodeOptions::default(), &none, &none, &none, &[], &[], &[]));
        // The accessors saturate rather than overflow.
        no_panic("accessors", || (s.n_lists(), s.rows(), s.group(), s.q_shape(), s.kv_shape()));
    }
    assert_eq!(DecodeShape { hkv: 0, ..OK }.group(), 0);
}

#[test]
fn shape_limits_at_their_boundaries() {
    for (tq, ok) in [(0, false), (1, true), (15, true), (16, true), (17, false)] {
        assert_eq!(DecodeShape { q_tokens: tq, ..OK }.validate().is_ok(), ok, "q_tokens {tq}");
    }
    let cap = u32::MAX as usize;
    for (c, ok) in [(0, false), (1, true), (cap - 1, true), (cap, true), (cap + 1, false)] {
        let s = DecodeShape { batch: 1, hq: 1, hkv: 1, capacity: c, ..OK };
        assert_eq!(s.validate().is_ok(), ok, "capacity {c}");
    }
    for (d, ok) in [(63, false), (64, true), (65, false), (127, false), (128, true), (129, false)] {
        assert_eq!(DecodeShape { head_dim: d, ..OK }.validate().is_ok(), ok, "head_dim {d}");
    }
    let top = (u32::MAX as usize / TILE_TOKENS) * TILE_TOKENS;
    for (c, ok) in [
        (0, false),
        (TILE_TOKENS - 1, false),
        (TILE_TOKENS, true),
        (TILE_TOKENS + 1, false),
        (top, true),
        (top + TILE_TOKENS, false),
        (usize::MAX, false),
    ] {
        let o = DecodeOptions { chunk_tokens: Some(c), ..Default::default() };
        assert_eq!(o.validate().is_ok(), ok, "chunk_tokens {c}");
    }
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let o = DecodeOptions { scale: Some(s), ..Default::default() };
        assert_eq!(arg_of(&o.validate().unwrap_err()), "scale");
    }
    assert!(DecodeOptions { scale: Some(f32::MAX), ..Default::default() }.validate().is_ok());
}

#[test]
fn list_limits_at_their_boundaries() {
    // cache_lens[b] <= capacity.
    for (len, ok) in [(15u32, true), (16, true), (17, false), (u32::MAX, false)] {
        assert_eq!(validate_cache_lens(&OK, &[len, 0]).is_ok(), ok, "cache_len {len}");
    }
    assert_eq!(arg_of(&errs("cache_lens", || validate_cache_lens(&OK, &[1]))), "cache_lens");
    // A list may hold up to cache_lens[b] entries.
    let lens = [4u32, 4];
    let full: Vec<u32> = (0..4).collect();
    for (n, ok) in [(3u32, true), (4, true), (5, false)] {
        let r = validate_indptr(&OK, &lens, &[0, n, n, n, n], 5);
        assert_eq!(r.is_ok(), ok, "list of {n}");
    }
    // indptr[last] <= indices.len().
    for (n, ok) in [(3usize, false), (4, true), (5, true)] {
        assert_eq!(validate_indptr(&OK, &lens, &[0, 4, 4, 4, 4], n).is_ok(), ok, "indices.len() {n}");
    }
    // Indices below cache_lens[b]: 3 passes, 4 fails.
    validate_lists(&OK, &lens, &[0, 4, 4, 4, 4], &full).unwrap();
    let e = errs("lists", || validate_lists(&OK, &lens, &[0, 1, 1, 1, 1], &[4]));
    assert!(e.to_string().contains("index 4 is not below cache_lens[0] = 4"), "{e}");
    assert_eq!(arg_of(&errs("lists", || validate_lists(&OK, &lens, &[0, 1, 1, 1, 1], &[u32::MAX]))), "indices");
    // The fault rule at its boundaries.
    assert_eq!(IndexFault::of(3, None, 4), None);
    assert_eq!(IndexFault::of(4, None, 4), Some(IndexFault::OutOfRange));
    assert_eq!(IndexFault::of(2, Some(1), 4), None);
    assert_eq!(IndexFault::of(2, Some(2), 4), Some(IndexFault::Duplicate));
    assert_eq!(IndexFault::of(2, Some(3), 4), Some(IndexFault::Unsorted));
    // Malformed indptr of every kind.
    for ptr in
        [vec![], vec![0], vec![1, 1, 1, 1, 1], vec![0, 2, 1, 1, 1], vec![0, u32::MAX, u32::MAX, u32::MAX, u32::MAX]]
    {
        assert_eq!(arg_of(&errs("indptr", || validate_lists(&OK, &lens, &ptr, &full))), "indptr", "{ptr:?}");
        errs("token_mask", || cpu::token_mask(&OK, &lens, &ptr, &full));
    }
}

#[test]
fn reference_refuses_bad_inputs_without_panicking() {
    let o = DecodeOptions::default();
    let q = vec![f16::ZERO; 2 * 4 * 64];
    let kv = vec![f16::ZERO; 2 * 2 * 16 * 64];
    let lens = [16u32, 16];
    let ptr = [0u32, 1, 1, 1, 1];
    cpu::sparse_decode(&OK, &o, &q, &kv, &kv, &lens, &ptr, &[3]).unwrap();
    assert_eq!(arg_of(&errs("q", || cpu::sparse_decode(&OK, &o, &q[1..], &kv, &kv, &lens, &ptr, &[3]))), "q");
    assert_eq!(arg_of(&errs("k", || cpu::sparse_decode(&OK, &o, &q, &kv[..1], &kv, &lens, &ptr, &[3]))), "k");
    assert_eq!(arg_of(&errs("v", || cpu::sparse_decode(&OK, &o, &q, &kv, &[], &lens, &ptr, &[3]))), "v");
    let bad = DecodeOptions { chunk_tokens: Some(1), ..Default::default() };
    assert_eq!(
        arg_of(&errs("opts", || cpu::sparse_decode(&OK, &bad, &q, &kv, &kv, &lens, &ptr, &[3]))),
        "chunk_tokens"
    );
    // A huge capacity with tiny slices: the length check comes before any allocation.
    let s = DecodeShape { capacity: u32::MAX as usize, ..OK };
    let e = errs("huge", || cpu::sparse_decode(&s, &o, &q, &kv, &kv, &[0, 0], &[0, 0, 0, 0, 0], &[]));
    assert_eq!(arg_of(&e), "k");
}

#[test]
fn planning_helpers_saturate() {
    let m = usize::MAX;
    no_panic("plan_chunks", || plan_chunks(&[m, m, m], m, m, None));
    no_panic("plan_chunks", || plan_chunks(&[m], 1, 0, Some(0)));
    no_panic("plan_chunks", || plan_chunks(&[], 0, 0, None));
    assert_eq!(no_panic("chunks_of", || chunks_of(m, 0)), m);
    assert_eq!(chunks_of(0, 64), 1);
    no_panic("attn_smem_bytes", || attn_smem_bytes(m));
}

/// The device validator's verdict is 64 bits: `pos << 2 | code`, with `u64::MAX` as "none".
/// Every real position (below 2^32) and the largest representable one round-trip without
/// meeting the sentinel; one past it is refused.
#[test]
fn verdicts_are_64_bit_and_never_meet_the_sentinel() {
    assert_eq!(VERDICT_NONE, u64::MAX);
    assert_eq!(decode_verdict(VERDICT_NONE).unwrap(), None);
    for pos in [
        0u64,
        1,
        u64::from(u32::MAX) - 1,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        MAX_VERDICT_POS - 1,
        MAX_VERDICT_POS,
    ] {
        for fault in [IndexFault::OutOfRange, IndexFault::Duplicate, IndexFault::Unsorted] {
            let v = encode_verdict(pos, fault).unwrap();
            assert_ne!(v, VERDICT_NONE, "pos {pos}");
            assert_eq!(decode_verdict(v).unwrap(), Some((pos, fault)), "pos {pos}");
        }
    }
    // A u32 "none" sentinel would have collided with position u32::MAX >> 2 etc.; here the
    // largest real verdict is far below the sentinel.
    assert!(encode_verdict(u64::from(u32::MAX), IndexFault::Unsorted).unwrap() < 1 << 34);
    for pos in [MAX_VERDICT_POS + 1, u64::MAX >> 2, u64::MAX] {
        assert_eq!(arg_of(&errs("encode", || encode_verdict(pos, IndexFault::Unsorted))), "indices");
    }
    // Code 0 is never written by the kernel: an internal error, not a wrong report.
    assert!(matches!(decode_verdict(8), Err(Error::Internal(_))));
    assert!(matches!(decode_verdict(0), Err(Error::Internal(_))));
}
