//! Malformed inputs thrown at the quantization family's validators, CPU references and
//! helpers: each gives a typed error naming the argument, and none panics or aborts.
//! Every limit is tested at its boundary: at it, one below and one above.

mod common;

use common::arg_of;

use std::panic::{catch_unwind, AssertUnwindSafe};

use half::f16;
use ntkv::quant::cpu::{self, MikvCacheCpu};
use ntkv::quant::{Axis, HiPrecision, MikvConfig, QuantLayout, QuantSpec};
use ntkv::Error;

/// Runs `f`, fails the test if it panics, and returns its result.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("{what} panicked instead of returning an error"),
    }
}

fn expect_err<T: std::fmt::Debug>(what: &str, arg: &str, f: impl FnOnce() -> ntkv::Result<T>) {
    match no_panic(what, f) {
        Ok(v) => panic!("{what}: expected an error naming `{arg}`, got Ok({v:?})"),
        Err(e) => assert_eq!(arg_of(&e), arg, "{what}: {e}"),
    }
}

#[test]
fn unsupported_bits_and_groups_are_errors() {
    for bits in [0u32, 1, 3, 5, 7, 16, 32, 40, u32::MAX] {
        expect_err("QuantSpec::new", "bits", || QuantSpec::new(bits, 32, Axis::PerToken));
        expect_err("pack_codes", "bits", || cpu::pack_codes(bits, &[1, 2, 3]));
        expect_err("unpack_codes", "bits", || cpu::unpack_codes(bits, &[7], 3));
        expect_err("group_params", "bits", || cpu::group_params(bits, 0.0, 1.0));
        expect_err("encode", "bits", || cpu::encode(0.5, f16::ZERO, 1.0, bits));
    }
    for group in [0usize, 1, 7, 16, 31, 33, 127, 129, 256, usize::MAX] {
        expect_err("QuantSpec::new", "group", || QuantSpec::new(4, group, Axis::PerChannel));
    }
    // A struct literal skips `new`; every entry point validates it again.
    let bad = QuantSpec { bits: 40, group: 32, axis: Axis::PerToken };
    expect_err("QuantLayout::new", "bits", || QuantLayout::new(bad, &[32, 32]));
    expect_err("cpu::quantize", "bits", || cpu::quantize::<f32>(bad, &[32, 32], &[0.0; 1024]));
    for bits in [2u32, 4, 8] {
        assert!(cpu::pack_codes(bits, &[1, 2, 3]).is_ok());
    }
}

#[test]
fn unpacking_more_codes_than_the_words_hold_is_an_error() {
    // 4-bit codes: 8 per word. One partial word past the end is allowed (zero-filled codes);
    // a count that needs more is refused instead of allocating for it.
    assert_eq!(cpu::unpack_codes(4, &[0x21], 16).unwrap().len(), 16);
    expect_err("unpack_codes", "n", || cpu::unpack_codes(4, &[0x21], 17));
    expect_err("unpack_codes", "n", || cpu::unpack_codes(4, &[0x21], usize::MAX));
}

#[test]
fn bad_shapes_are_errors() {
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    for shape in [vec![], vec![64], vec![0, 64], vec![64, 0], vec![2, 0, 64]] {
        expect_err("QuantLayout::new", "x", || QuantLayout::new(spec, &shape));
    }
    // Products that overflow usize, and extents beyond the kernels' u32.
    expect_err("QuantLayout::new overflow", "x", || QuantLayout::new(spec, &[usize::MAX, 2, 64]));
    expect_err("QuantLayout::new overflow", "x", || QuantLayout::new(spec, &[usize::MAX / 2, usize::MAX / 2, 64]));
    assert!(matches!(no_panic("T > u32", || QuantLayout::new(spec, &[1usize << 32, 32])), Err(Error::TooLarge { .. })));
    // Whole groups only: D for PerToken, T for PerChannel.
    expect_err("D % group", "x", || QuantLayout::new(spec, &[4, 48]));
    let ch = QuantSpec::new(2, 64, Axis::PerChannel).unwrap();
    expect_err("T % group", "x", || QuantLayout::new(ch, &[65, 8]));
    assert!(QuantLayout::new(ch, &[64, 8]).is_ok());
    // Data whose length is not the shape's.
    expect_err("cpu::quantize len", "x", || cpu::quantize::<f32>(spec, &[2, 32], &[0.0; 63]));
    let q = cpu::quantize::<f32>(spec, &[2, 32], &[0.0; 64]).unwrap();
    let mut short = q.clone();
    short.codes.pop();
    assert!(no_panic("dequantize short codes", || cpu::dequantize::<f32>(spec, &[2, 32], &short)).is_err());
    let mut short = q.clone();
    short.scales.clear();
    assert!(no_panic("dequantize short scales", || cpu::dequantize::<f32>(spec, &[2, 32], &short)).is_err());
    assert!(no_panic("dequantize wrong shape", || cpu::dequantize::<f32>(spec, &[4, 32], &q)).is_err());
}

#[test]
fn the_f16_range_limit_is_exact() {
    // |x| < 65520 quantizes; 65520 rounds to infinity in f16 and is refused, naming x.
    let spec = QuantSpec::new(8, 32, Axis::PerToken).unwrap();
    let limit = 65520.0f32;
    let below = f32::from_bits(limit.to_bits() - 1);
    let above = f32::from_bits(limit.to_bits() + 1);
    for (v, ok) in [(below, true), (limit, false), (above, false), (-below, true), (-limit, false)] {
        let mut x = vec![0.0f32; 32];
        x[5] = v;
        let r = no_panic("quantize at the range limit", || cpu::quantize::<f32>(spec, &[1, 32], &x));
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(Error::InvalidArgument { arg: "x", reason }), false) => {
                assert!(reason.contains("index 5"), "{reason}")
            }
            (r, _) => panic!("value {v}: expected ok={ok}, got {r:?}"),
        }
    }
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.0f32; 32];
        x[7] = v;
        assert!(matches!(cpu::quantize::<f32>(spec, &[1, 32], &x), Err(Error::NonFinite { arg: "x", index: 7 })));
    }
}

fn cfg(residual: usize, capacity: usize) -> MikvConfig {
    MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerChannel, residual, capacity }
}

#[test]
fn mikv_configs_at_and_past_their_limits() {
    // residual = usize::MAX used to overflow `R + block` and divide by zero.
    for residual in [usize::MAX, usize::MAX - 31, usize::MAX / 32 * 32] {
        let r = no_panic("MikvConfig::validate", || cfg(residual, 1024).validate(2, 64));
        assert!(
            matches!(r, Err(Error::TooLarge { arg: "residual", .. }) | Err(Error::InvalidArgument { .. })),
            "{r:?}"
        );
    }
    // The ring holds R + block rows, a u32: at the limit, and one block past it.
    let top = (u32::MAX as usize - 32) / 32 * 32;
    assert!(cfg(top, 1024).validate(1, 32).is_ok());
    assert!(cfg(top + 32, 1024).validate(1, 32).is_err());
    for capacity in [0usize, usize::MAX, usize::MAX - 5, (u32::MAX as usize) + 1] {
        assert!(no_panic("capacity", || cfg(64, capacity).validate(2, 64)).is_err(), "capacity {capacity}");
    }
    assert!(cfg(64, u32::MAX as usize / 32 * 32).validate(1, 32).is_ok());
    // Bad widths and dims.
    let mut c = cfg(64, 1024);
    c.lo_bits = 8;
    expect_err("lo_bits 8", "lo_bits", || c.validate(2, 64));
    c.lo_bits = 0;
    expect_err("lo_bits 0", "lo_bits", || c.validate(2, 64));
    let mut c = cfg(48, 1024);
    expect_err("residual % group", "residual", || c.validate(2, 64));
    c.residual = 64;
    c.group = 7;
    expect_err("group 7", "group", || c.validate(2, 64));
    assert!(no_panic("zero heads", || cfg(64, 1024).validate(0, 64)).is_err());
    assert!(no_panic("huge heads", || cfg(64, 1 << 20).validate(usize::MAX, 64)).is_err());
}

#[test]
fn mikv_prefill_and_append_reject_bad_lists_and_tokens() {
    let (h, t, d) = (2usize, 40usize, 32usize);
    let kv: Vec<f16> = (0..h * t * d).map(|i| f16::from_f32((i % 13) as f32 * 0.1)).collect();
    let c = cfg(32, 128);
    let build = |imp: Vec<Vec<u32>>| no_panic("from_prefill", || MikvCacheCpu::from_prefill(c, &kv, &[h, t, d], &imp));
    for bad in [
        vec![vec![3, 1], vec![]],     // unsorted
        vec![vec![2, 2], vec![]],     // repeated
        vec![vec![t as u32], vec![]], // out of range: exactly T
        vec![vec![u32::MAX], vec![]], // far out of range
        vec![vec![]],                 // one list for two heads
        vec![vec![], vec![], vec![]], // three lists
    ] {
        assert!(build(bad.clone()).is_err(), "important {bad:?} accepted");
    }
    assert!(build(vec![vec![(t - 1) as u32], vec![0]]).is_ok(), "index T - 1 is in range");
    // Shapes that are not [Hkv, T, D], or do not match the data.
    assert!(no_panic("rank", || MikvCacheCpu::from_prefill(c, &kv, &[h * t, d], &[vec![]])).is_err());
    assert!(no_panic("len", || MikvCacheCpu::from_prefill(c, &kv[1..], &[h, t, d], &[vec![], vec![]])).is_err());
    assert!(no_panic("overflow", || MikvCacheCpu::from_prefill(c, &kv, &[usize::MAX, 2, d], &[])).is_err());
    // Appends: a token of the wrong length, NaN, and past the capacity.
    let mut cache = build(vec![vec![], vec![]]).unwrap();
    expect_err("append short", "token", || cache.append(&vec![f16::ONE; h * d - 1]));
    expect_err("append empty", "token", || cache.append(&[]));
    let mut nan = vec![f16::ONE; h * d];
    nan[3] = f16::NAN;
    assert!(matches!(cache.append(&nan), Err(Error::NonFinite { arg: "token", index: 3 })));
    for _ in t..128 {
        cache.append(&vec![f16::ONE; h * d]).unwrap();
    }
    assert!(matches!(cache.append(&vec![f16::ONE; h * d]), Err(Error::TooLarge { arg: "token", .. })));
    assert_eq!(cache.len(), 128);
}
