//! CPU reference of the quantization family: layouts, packing, the error bound, exact round
//! trips, validation, and the MiKV cache (appends equal prefill, nothing dropped).
#![allow(clippy::needless_range_loop)]

mod common;

use common::arg_of;

use half::{bf16, f16};
use ntkv::quant::cpu::{self, MikvCacheCpu, QuantizedHost};
use ntkv::quant::{Axis, HiPrecision, MikvConfig, QuantLayout, QuantSpec};
use ntkv::rng::Rng;
use ntkv::{Error, Float};
use proptest::prelude::*;

const BITS: [u32; 3] = [2, 4, 8];
const GROUPS: [usize; 3] = [32, 64, 128];

fn axis_of(i: usize) -> Axis {
    if i % 2 == 0 {
        Axis::PerToken
    } else {
        Axis::PerChannel
    }
}

use common::ranged_rows as data;

/// (group index, code) of each element, found from the layout independently of the library.
fn group_of(spec: &QuantSpec, h: usize, t: usize, c: usize, tokens: usize, dim: usize) -> usize {
    match spec.axis {
        Axis::PerToken => (h * tokens + t) * (dim / spec.group) + c / spec.group,
        Axis::PerChannel => (h * (tokens / spec.group) + t / spec.group) * dim + c,
    }
}

fn ulp_f16(x: f32) -> f32 {
    let a = x.abs().max(6.1e-5);
    2f32.powi(a.log2().floor() as i32 - 10)
}

fn check_bound<T: Float>(spec: QuantSpec, shape: &[usize], x: &[T]) {
    let q = cpu::quantize(spec, shape, x).expect("quantize");
    let y: Vec<f32> = cpu::dequantize(spec, shape, &q).expect("dequantize");
    let n = shape.len();
    let (tokens, dim) = (shape[n - 2], shape[n - 1]);
    let heads = x.len() / (tokens * dim);
    for h in 0..heads {
        for t in 0..tokens {
            for c in 0..dim {
                let i = (h * tokens + t) * dim + c;
                let g = group_of(&spec, h, t, c, tokens, dim);
                let scale = q.scales[g].to_f32();
                let mn = q.mins[g].to_f32();
                let xv = x[i].to_f32();
                // The bound the module docs state: ½ ulp of the stored min, qmax · 2^-25 for a
                // subnormal stored scale, and f32 rounding.
                let eps = 0.5 * ulp_f16(mn) + spec.qmax() as f32 * 2f32.powi(-25) + 1e-6 * xv.abs().max(mn.abs());
                let bound = 0.5 * scale * (1.0 + 1e-3) + eps;
                assert!(
                    (xv - y[i]).abs() <= bound,
                    "{spec:?} {shape:?}: element {i} x={xv} x̂={} |err|={} > bound {bound} (scale {scale}, mn {mn})",
                    y[i],
                    (xv - y[i]).abs()
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn pack_unpack_round_trip(bits_i in 0usize..3, codes in proptest::collection::vec(0u32..256, 0..200)) {
        let bits = BITS[bits_i];
        let codes: Vec<u32> = codes.into_iter().map(|c| c & ((1 << bits) - 1)).collect();
        let words = cpu::pack_codes(bits, &codes).unwrap();
        prop_assert_eq!(words.len(), codes.len().div_ceil(32 / bits as usize));
        prop_assert_eq!(cpu::unpack_codes(bits, &words, codes.len()).unwrap(), codes);
    }

    #[test]
    fn error_bound_holds(seed in any::<u64>(), bits_i in 0usize..3, group_i in 0usize..3, axis_i in 0usize..2,
                         heads in 1usize..3, mult in 1usize..3, other in 1usize..7, dtype in 0usize..3) {
        let spec = QuantSpec::new(BITS[bits_i], GROUPS[group_i], axis_of(axis_i)).unwrap();
        let (tokens, dim) = match spec.axis {
            Axis::PerToken => (other, spec.group * mult),
            Axis::PerChannel => (spec.group * mult, other),
        };
        let shape = [heads, tokens, dim];
        let n = heads * tokens * dim;
        let mut rng = Rng::new(seed);
        match dtype {
            0 => check_bound::<f32>(spec, &shape, &data(&mut rng, n, dim)),
            1 => check_bound::<f16>(spec, &shape, &data(&mut rng, n, dim)),
            _ => check_bound::<bf16>(spec, &shape, &data(&mut rng, n, dim)),
        }
    }

    /// Values on the quantization grid (power-of-two scale, codes 0 and qmax present) come
    /// back exactly, with exactly the codes they were built from.
    #[test]
    fn grid_values_round_trip_exactly(seed in any::<u64>(), bits_i in 0usize..3, group_i in 0usize..3,
                                      axis_i in 0usize..2) {
        let spec = QuantSpec::new(BITS[bits_i], GROUPS[group_i], axis_of(axis_i)).unwrap();
        let mut rng = Rng::new(seed);
        let (tokens, dim) = match spec.axis {
            Axis::PerToken => (3, spec.group * 2),
            Axis::PerChannel => (spec.group * 2, 3),
        };
        let shape = [tokens, dim];
        let layout = QuantLayout::new(spec, &shape).unwrap();
        let qmax = spec.qmax();
        let mut codes = vec![0u32; tokens * dim];
        for c in codes.iter_mut() {
            *c = rng.below(qmax as usize + 1) as u32;
        }
        // Force codes 0 and qmax into every group so min/max are on the grid ends.
        let mut group_params = vec![(0f32, 0f32); layout.n_groups()];
        for (g, p) in group_params.iter_mut().enumerate() {
            let scale = 2f32.powi(rng.below(8) as i32 - 6);
            let mn = f16::from_f32(rng.uniform_in(-4.0, 4.0)).to_f32();
            *p = (scale, mn);
            let _ = g;
        }
        let mut firsts = vec![usize::MAX; layout.n_groups()];
        let mut x = vec![0f32; tokens * dim];
        for t in 0..tokens {
            for c in 0..dim {
                let i = t * dim + c;
                let g = group_of(&spec, 0, t, c, tokens, dim);
                if firsts[g] == usize::MAX {
                    firsts[g] = i;
                    codes[i] = 0;
                } else if firsts[g] + 1 == i || (spec.axis == Axis::PerChannel && i == firsts[g] + dim) {
                    codes[i] = qmax;
                }
                let (s, m) = group_params[g];
                x[i] = codes[i] as f32 * s + m;
            }
        }
        let q = cpu::quantize(spec, &shape, &x).unwrap();
        let y: Vec<f32> = cpu::dequantize(spec, &shape, &q).unwrap();
        prop_assert_eq!(&y, &x);
        let words_codes = match spec.axis {
            Axis::PerToken => cpu::unpack_codes(spec.bits, &q.codes, tokens * dim).unwrap(),
            Axis::PerChannel => {
                // Word (r, c) holds tokens r*E .. r*E+E-1 of channel c.
                let e = spec.codes_per_word();
                let mut out = vec![0u32; tokens * dim];
                for t in 0..tokens {
                    for c in 0..dim {
                        out[t * dim + c] = (q.codes[(t / e) * dim + c] >> ((t % e) as u32 * spec.bits)) & qmax;
                    }
                }
                out
            }
        };
        prop_assert_eq!(words_codes, codes);
    }
}

#[test]
fn per_token_packing_known_answer() {
    // One token, D = 32, values 0..15 then 15..0: min 0, max 15, scale 1 at 4 bits.
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let x: Vec<f32> = (0..16).chain((0..16).rev()).map(|v| v as f32).collect();
    let q = cpu::quantize(spec, &[1, 32], &x).unwrap();
    assert_eq!(q.scales, vec![f16::from_f32(1.0)]);
    assert_eq!(q.mins, vec![f16::from_f32(0.0)]);
    assert_eq!(q.codes, vec![0x7654_3210, 0xFEDC_BA98, 0x89AB_CDEF, 0x0123_4567]);
}

#[test]
fn per_channel_packing_known_answer() {
    // T = 32 tokens, D = 2 channels, 2 bits: channel 0 is t % 4 (scale 1), channel 1 is
    // 2 (t % 4) (scale 2). Word (r, d) holds tokens 16 r .. 16 r + 15 of channel d.
    let spec = QuantSpec::new(2, 32, Axis::PerChannel).unwrap();
    let mut x = vec![0f32; 64];
    for t in 0..32 {
        x[t * 2] = (t % 4) as f32;
        x[t * 2 + 1] = 2.0 * (t % 4) as f32;
    }
    let layout = QuantLayout::new(spec, &[32, 2]).unwrap();
    assert_eq!(layout.codes_shape, vec![2, 2]);
    assert_eq!(layout.scales_shape, vec![1, 2]);
    let q = cpu::quantize(spec, &[32, 2], &x).unwrap();
    assert_eq!(q.codes, vec![0xE4E4_E4E4; 4]);
    assert_eq!(q.scales, vec![f16::from_f32(1.0), f16::from_f32(2.0)]);
}

#[test]
fn layouts_per_axis() {
    let l = QuantLayout::new(QuantSpec::new(4, 32, Axis::PerToken).unwrap(), &[2, 3, 5, 128]).unwrap();
    assert_eq!((l.heads, l.tokens, l.dim), (6, 5, 128));
    assert_eq!(l.codes_shape, vec![2, 3, 5, 16]);
    assert_eq!(l.scales_shape, vec![2, 3, 5, 4]);
    let l = QuantLayout::new(QuantSpec::new(2, 64, Axis::PerChannel).unwrap(), &[4, 128, 7]).unwrap();
    assert_eq!(l.codes_shape, vec![4, 8, 7]);
    assert_eq!(l.scales_shape, vec![4, 2, 7]);
    assert_eq!(l.n_words(), 4 * 8 * 7);
    assert_eq!(l.n_groups(), 4 * 2 * 7);
}

#[test]
fn bad_specs_and_shapes_are_errors() {
    assert_eq!(arg_of(&QuantSpec::new(3, 32, Axis::PerToken).unwrap_err()), "bits");
    assert_eq!(arg_of(&QuantSpec::new(16, 32, Axis::PerToken).unwrap_err()), "bits");
    assert_eq!(arg_of(&QuantSpec::new(4, 16, Axis::PerToken).unwrap_err()), "group");
    assert_eq!(arg_of(&QuantSpec::new(4, 256, Axis::PerChannel).unwrap_err()), "group");
    let tok = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let ch = QuantSpec::new(4, 32, Axis::PerChannel).unwrap();
    assert_eq!(arg_of(&QuantLayout::new(tok, &[4, 48]).unwrap_err()), "x");
    assert_eq!(arg_of(&QuantLayout::new(ch, &[33, 8]).unwrap_err()), "x");
    assert_eq!(arg_of(&QuantLayout::new(tok, &[128]).unwrap_err()), "x");
    assert_eq!(arg_of(&QuantLayout::new(tok, &[0, 128]).unwrap_err()), "x");
    // A struct-literal spec is validated by every call.
    let bad = QuantSpec { bits: 5, group: 32, axis: Axis::PerToken };
    assert_eq!(arg_of(&cpu::quantize::<f32>(bad, &[1, 32], &[0.0; 32]).unwrap_err()), "bits");
    // Wrong data length.
    assert_eq!(arg_of(&cpu::quantize::<f32>(tok, &[2, 32], &[0.0; 32]).unwrap_err()), "x");
    let q = QuantizedHost { codes: vec![0; 3], scales: vec![f16::ZERO; 1], mins: vec![f16::ZERO; 1] };
    assert_eq!(arg_of(&cpu::dequantize::<f32>(tok, &[1, 32], &q).unwrap_err()), "codes");
}

#[test]
fn non_finite_and_out_of_range_are_errors() {
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let mut x = vec![1.0f32; 64];
    x[40] = f32::NAN;
    x[50] = f32::INFINITY;
    match cpu::quantize(spec, &[2, 32], &x) {
        Err(Error::NonFinite { arg: "x", index: 40 }) => {}
        other => panic!("expected NonFinite at 40, got {other:?}"),
    }
    let mut x = vec![1.0f32; 64];
    x[7] = 70000.0;
    x[9] = f32::NEG_INFINITY;
    assert!(matches!(cpu::quantize(spec, &[2, 32], &x), Err(Error::InvalidArgument { arg: "x", .. })));
    let x = vec![bf16::from_f32(-1e30); 64];
    assert!(matches!(cpu::quantize(spec, &[2, 32], &x), Err(Error::InvalidArgument { arg: "x", .. })));
    // f16 extremes are fine.
    let x: Vec<f16> = (0..64).map(|i| if i % 2 == 0 { f16::MAX } else { f16::MIN }).collect();
    let q = cpu::quantize(spec, &[2, 32], &x).unwrap();
    assert!(q.scales.iter().all(|s| s.is_finite()));
}

#[test]
fn zero_range_group_has_zero_codes_and_exact_values() {
    let spec = QuantSpec::new(2, 32, Axis::PerToken).unwrap();
    let x = vec![f16::from_f32(0.3); 32];
    let q = cpu::quantize(spec, &[1, 32], &x).unwrap();
    assert_eq!(q.scales[0], f16::ZERO);
    assert!(q.codes.iter().all(|&w| w == 0));
    let y: Vec<f16> = cpu::dequantize(spec, &[1, 32], &q).unwrap();
    assert_eq!(y, x);
}

#[test]
fn negative_zero_min_is_stored_as_positive_zero() {
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let mut x = vec![1.0f32; 32];
    x[0] = -0.0;
    x[1] = 0.0;
    let q = cpu::quantize(spec, &[1, 32], &x).unwrap();
    assert_eq!(q.mins[0].to_bits(), 0);
}

#[test]
fn encode_rounds_half_to_even() {
    // scale 1, mn 0: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, clamp above qmax and below 0.
    let (one, zero) = (f16::from_f32(1.0), f16::ZERO);
    let inv = cpu::inverse_scale(one);
    assert_eq!(cpu::encode(0.5, zero, inv, 4).unwrap(), 0);
    assert_eq!(cpu::encode(1.5, zero, inv, 4).unwrap(), 2);
    assert_eq!(cpu::encode(2.5, zero, inv, 4).unwrap(), 2);
    assert_eq!(cpu::encode(40.0, zero, inv, 4).unwrap(), 15);
    assert_eq!(cpu::encode(-3.0, zero, inv, 4).unwrap(), 0);
    assert_eq!(cpu::encode(7.0, zero, cpu::inverse_scale(f16::ZERO), 4).unwrap(), 0);
    assert_eq!(cpu::decode(3, f16::from_f32(0.5), f16::from_f32(-1.0)), 0.5);
}

// ---- MiKV -------------------------------------------------------------------------------------

fn random_important(rng: &mut Rng, heads: usize, tokens: usize) -> Vec<Vec<u32>> {
    (0..heads).map(|_| (0..tokens as u32).filter(|_| rng.below(5) == 0).collect()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Prefill of T0 tokens then T − T0 one-token appends gives exactly the buffers (and the
    /// dense reconstruction) of a prefill of all T tokens; every residual token is exact.
    #[test]
    fn appends_equal_prefill(seed in any::<u64>(), lo_i in 0usize..2, hi_i in 0usize..2, group_i in 0usize..2,
                             axis_i in 0usize..2, res_mult in 0usize..3, t0 in 0usize..90, extra in 0usize..90) {
        let mut rng = Rng::new(seed);
        let group = GROUPS[group_i];
        let axis = axis_of(axis_i);
        let residual = match axis { Axis::PerChannel => group * res_mult, Axis::PerToken => res_mult * 7 };
        let hi = if hi_i == 0 { HiPrecision::F16 } else { HiPrecision::Int8 };
        let (heads, dim) = (2usize, group);
        let total = t0 + extra;
        let cfg = MikvConfig { lo_bits: [4, 2][lo_i], hi, group, axis, residual, capacity: total.max(1) + 3 };
        let kv: Vec<f16> = data(&mut rng, heads * total * dim, dim);
        let important = random_important(&mut rng, heads, t0);
        let prefix: Vec<f16> = (0..heads)
            .flat_map(|h| kv[h * total * dim..(h * total + t0) * dim].iter().copied())
            .collect();
        let mut inc = MikvCacheCpu::from_prefill(cfg, &prefix, &[heads, t0, dim], &important).unwrap();
        for t in t0..total {
            let tok: Vec<f16> = (0..heads).flat_map(|h| kv[(h * total + t) * dim..(h * total + t + 1) * dim].iter().copied()).collect();
            inc.append(&tok).unwrap();
            let tq = inc.quantized_len();
            prop_assert_eq!(tq, cfg.quantized_len(t + 1));
            prop_assert!(t + 1 - tq < cfg.ring_rows());
        }
        let whole = MikvCacheCpu::from_prefill(cfg, &kv, &[heads, total, dim], &important).unwrap();
        prop_assert!(inc.same_bits(&whole), "incremental and whole caches differ");
        let dense = inc.dequantize_dense().unwrap();
        prop_assert_eq!(dense.len(), kv.len());
        let dense_whole = whole.dequantize_dense().unwrap();
        prop_assert!(cpu::same_f16_bits(&dense, &dense_whole));
        // Residual tokens are exact; nothing is dropped (every token is finite and near x).
        let tq = inc.quantized_len();
        let lo_spec = cfg.lo_spec();
        for h in 0..heads {
            for t in 0..total {
                for c in 0..dim {
                    let i = (h * total + t) * dim + c;
                    if t >= tq {
                        prop_assert_eq!(dense[i].to_bits(), kv[i].to_bits());
                    } else {
                        prop_assert!(dense[i].is_finite());
                    }
                }
            }
        }
        // Important rows: exact for f16; within the int8 bound otherwise.
        for h in 0..heads {
            for &t in &important[h] {
                let t = t as usize;
                let row = (h * total + t) * dim;
                let x: Vec<f32> = kv[row..row + dim].iter().map(|v| v.to_f32()).collect();
                let y: Vec<f32> = dense[row..row + dim].iter().map(|v| v.to_f32()).collect();
                if hi == HiPrecision::F16 || t >= tq {
                    prop_assert_eq!(&x, &y);
                } else {
                    let q = cpu::quantize(cfg.hi_spec(), &[1, dim], &kv[row..row + dim]).unwrap();
                    for c in 0..dim {
                        let s = q.scales[c / group].to_f32();
                        // The f16 output rounds in the binade of the result, which may be the
                        // next one up from x's.
                        let bound = 0.5 * s * 1.001 + 0.5 * ulp_f16(x[c].abs().max(y[c].abs())) + 1e-6;
                        prop_assert!((x[c] - y[c]).abs() <= bound, "h {} t {} c {}: x {} y {} scale {} min {} bound {}", h, t, c, x[c], y[c], s, q.mins[c / group].to_f32(), bound);
                    }
                }
            }
        }
        // The low-precision part of a non-important quantized token equals plain quantization.
        if tq > 0 {
            let region: Vec<f16> = (0..heads).flat_map(|h| kv[h * total * dim..(h * total + tq) * dim].iter().copied()).collect();
            let q = cpu::quantize(lo_spec, &[heads, tq, dim], &region).unwrap();
            let y: Vec<f16> = cpu::dequantize(lo_spec, &[heads, tq, dim], &q).unwrap();
            for h in 0..heads {
                for t in 0..tq {
                    if important[h].binary_search(&(t as u32)).is_ok() {
                        continue;
                    }
                    for c in 0..dim {
                        prop_assert_eq!(dense[(h * total + t) * dim + c].to_bits(), y[(h * tq + t) * dim + c].to_bits());
                    }
                }
            }
        }
    }
}

#[test]
fn mikv_validation_errors() {
    let kv = vec![f16::ONE; 2 * 8 * 32];
    let shape = [2, 8, 32];
    let ok =
        MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerChannel, residual: 32, capacity: 64 };
    let imp = vec![vec![1u32, 3], vec![]];
    assert!(MikvCacheCpu::from_prefill(ok, &kv, &shape, &imp).is_ok());
    let err =
        |cfg: MikvConfig, imp: &[Vec<u32>]| arg_of(&MikvCacheCpu::from_prefill(cfg, &kv, &shape, imp).unwrap_err());
    assert_eq!(err(MikvConfig { lo_bits: 8, ..ok }, &imp), "lo_bits");
    assert_eq!(err(MikvConfig { group: 48, ..ok }, &imp), "group");
    assert_eq!(err(MikvConfig { residual: 20, ..ok }, &imp), "residual");
    assert_eq!(err(MikvConfig { capacity: 4, ..ok }, &imp), "kv");
    assert_eq!(err(MikvConfig { capacity: 0, ..ok }, &imp), "capacity");
    assert_eq!(err(MikvConfig { group: 64, axis: Axis::PerToken, residual: 0, ..ok }, &imp), "dim");
    assert_eq!(err(ok, &[vec![3, 1], vec![]]), "important");
    assert_eq!(err(ok, &[vec![1, 1], vec![]]), "important");
    assert_eq!(err(ok, &[vec![8], vec![]]), "important");
    assert_eq!(err(ok, &[vec![1]]), "important");
    assert_eq!(arg_of(&MikvCacheCpu::from_prefill(ok, &kv[1..], &shape, &imp).unwrap_err()), "kv");
    assert_eq!(arg_of(&MikvCacheCpu::from_prefill(ok, &kv, &[16, 32], &imp).unwrap_err()), "kv");
    let mut bad = kv.clone();
    bad[100] = f16::NAN;
    assert!(matches!(
        MikvCacheCpu::from_prefill(ok, &bad, &shape, &imp),
        Err(Error::NonFinite { arg: "kv", index: 100 })
    ));
}

#[test]
fn mikv_append_errors_leave_cache_unchanged() {
    let cfg =
        MikvConfig { lo_bits: 2, hi: HiPrecision::Int8, group: 32, axis: Axis::PerToken, residual: 3, capacity: 10 };
    let kv: Vec<f16> = data(&mut Rng::new(5), 2 * 9 * 32, 32);
    let mut cache = MikvCacheCpu::from_prefill(cfg, &kv, &[2, 9, 32], &[vec![0, 4], vec![8]]).unwrap();
    let before = cache.clone();
    let mut tok = vec![f16::ONE; 64];
    tok[5] = f16::INFINITY;
    assert!(matches!(cache.append(&tok), Err(Error::NonFinite { arg: "token", index: 5 })));
    assert_eq!(arg_of(&cache.append(&tok[..32]).unwrap_err()), "token");
    assert!(cache.same_bits(&before));
    cache.append(&[f16::ONE; 64]).unwrap();
    assert_eq!(cache.len(), 10);
    assert!(matches!(cache.append(&[f16::ONE; 64]), Err(Error::TooLarge { arg: "token", .. })));
    assert_eq!(cache.len(), 10);
    assert_eq!(cache.quantized_len(), 7);
}

#[test]
fn mikv_empty_prefill_then_appends() {
    let cfg =
        MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerChannel, residual: 0, capacity: 100 };
    let mut cache = MikvCacheCpu::from_prefill(cfg, &[], &[1, 0, 8], &[vec![]]).unwrap();
    assert!(cache.is_empty());
    let mut rng = Rng::new(9);
    let kv: Vec<f16> = data(&mut rng, 40 * 8, 8);
    for t in 0..40 {
        cache.append(&kv[t * 8..(t + 1) * 8]).unwrap();
    }
    assert_eq!(cache.quantized_len(), 32);
    let dense = cache.dequantize_dense().unwrap();
    assert!(cpu::same_f16_bits(&dense[32 * 8..], &kv[32 * 8..]));
}

/// A group whose scale `(mx − mn)/qmax` is below the smallest f16 subnormal rounds its stored
/// scale to zero: every code is 0 and the error is the whole range, which the documented
/// subnormal term `qmax · 2^-25` covers. Just above, the scale is a subnormal with 2^-24
/// spacing.
#[test]
fn subnormal_scales_stay_within_the_stated_bound() {
    for (bits, top) in [(8u32, 1e-6f32), (8, 1.02e-5), (4, 2.0e-7), (2, 5.0e-8), (8, 3.0e-3)] {
        let spec = QuantSpec::new(bits, 32, Axis::PerToken).unwrap();
        let x: Vec<f32> = (0..32).map(|i| top * i as f32 / 31.0).collect();
        check_bound::<f32>(spec, &[1, 32], &x);
        let q = cpu::quantize(spec, &[1, 32], &x).unwrap();
        if top * (1u32 << 25) as f32 / spec.qmax() as f32 <= 0.5 {
            assert_eq!(q.scales[0].to_f32(), 0.0, "bits {bits} top {top}: scale should round to 0");
        }
    }
}
