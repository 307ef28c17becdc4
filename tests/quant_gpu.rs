//! Differential GPU tests of the quantization family against the CPU reference: codes,
//! scales and mins bit-exact, dequantized values bit-exact (same f32 FMA and cast), the MiKV
//! cache's buffers and dense reconstruction equal; NaN input gives NonFinite with the outputs
//! untouched. Every test prints SKIP without a GPU.

mod common;

use half::{bf16, f16};
use ntkv::quant::cpu::{self, MikvCacheCpu};
use ntkv::quant::{
    Axis, FiniteCheck, HiPrecision, MikvCache, MikvConfig, QuantPlan, QuantShape, QuantSpec, QuantizedTensor,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Error, Float};

const BITS: [u32; 3] = [2, 4, 8];
const GROUPS: [usize; 3] = [32, 64, 128];

use common::ranged_rows as data;

fn bits_of<T: Float>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// Quantizes on both sides and compares codes, scales and mins bit for bit, then dequantizes
/// the GPU's codes on both sides and compares the values bit for bit.
fn differential<T: Float>(dev: &Device, spec: QuantSpec, shape: &[usize], seed: u64, check: FiniteCheck) {
    let n: usize = shape.iter().product();
    let x: Vec<T> = data(&mut Rng::new(seed), n, shape[shape.len() - 1]);
    let plan = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: T::DTYPE }, spec).unwrap();
    let xd = DeviceTensor::from_host(dev, &x, shape).unwrap();
    let mut q = QuantizedTensor::zeros(dev, plan.layout()).unwrap();
    if seed % 7 == 3 {
        plan.quantize_deferred(&xd, &mut q).unwrap().wait().unwrap();
    } else {
        plan.quantize_with(&xd, &mut q, check).unwrap();
    }
    let got = q.to_host().unwrap();
    let want = cpu::quantize(spec, shape, &x).unwrap();
    if let Some(i) = got.codes.iter().zip(&want.codes).position(|(a, b)| a != b) {
        panic!("{spec:?} {shape:?} {}: code word {i}: gpu {:#x} cpu {:#x}", T::DTYPE, got.codes[i], want.codes[i]);
    }
    assert!(cpu::same_f16_bits(&got.scales, &want.scales), "{spec:?} {shape:?}: scales differ");
    assert!(cpu::same_f16_bits(&got.mins, &want.mins), "{spec:?} {shape:?}: mins differ");
    let mut y = DeviceTensor::<T>::zeros(dev, shape).unwrap();
    plan.dequantize(&q, &mut y).unwrap();
    let y = y.to_host().unwrap();
    let y_cpu: Vec<T> = cpu::dequantize(spec, shape, &want).unwrap();
    let (a, b) = (bits_of(&y), bits_of(&y_cpu));
    if let Some(i) = a.iter().zip(&b).position(|(p, q)| p != q) {
        panic!("{spec:?} {shape:?}: dequant element {i}: gpu {:?} cpu {:?}", y[i], y_cpu[i]);
    }
}

/// Shapes that are not multiples of any tile: odd heads, odd token counts, odd channels.
fn shape_for(spec: &QuantSpec, rng: &mut Rng) -> Vec<usize> {
    let heads = 1 + rng.below(3);
    match spec.axis {
        Axis::PerToken => vec![heads, 1 + rng.below(300), spec.group * (1 + rng.below(3))],
        Axis::PerChannel => vec![heads, spec.group * (1 + rng.below(3)), 1 + rng.below(200)],
    }
}

#[test]
fn quantize_matches_cpu_bit_exact() {
    let dev = gpu_or_skip!("quantize_matches_cpu_bit_exact");
    let mut rng = Rng::new(11);
    for case in 0..36u64 {
        let axis = if case % 2 == 0 { Axis::PerToken } else { Axis::PerChannel };
        let spec = QuantSpec::new(BITS[(case / 2 % 3) as usize], GROUPS[(case / 6 % 3) as usize], axis).unwrap();
        let shape = shape_for(&spec, &mut rng);
        let check = if case % 5 == 0 { FiniteCheck::SinglePass } else { FiniteCheck::Checked };
        match case % 3 {
            0 => differential::<f32>(dev, spec, &shape, case, check),
            1 => differential::<f16>(dev, spec, &shape, case, check),
            _ => differential::<bf16>(dev, spec, &shape, case, check),
        }
    }
}

#[test]
fn large_rank2_and_rank4_shapes() {
    let dev = gpu_or_skip!("large_rank2_and_rank4_shapes");
    // Many grid-stride iterations and a tail that is not a multiple of the warp's span.
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    differential::<f16>(dev, spec, &[70_001, 128], 1, FiniteCheck::Checked);
    let spec = QuantSpec::new(2, 128, Axis::PerChannel).unwrap();
    differential::<bf16>(dev, spec, &[2, 3, 256, 67], 2, FiniteCheck::Checked);
    let spec = QuantSpec::new(8, 64, Axis::PerToken).unwrap();
    differential::<f32>(dev, spec, &[3, 5, 7, 192], 3, FiniteCheck::SinglePass);
}

#[test]
fn non_finite_input_is_error_and_outputs_untouched() {
    let dev = gpu_or_skip!("non_finite_input_is_error_and_outputs_untouched");
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let shape = [37, 64];
    let plan = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: ntkv::DType::F16 }, spec).unwrap();
    let mut x: Vec<f16> = data(&mut Rng::new(3), 37 * 64, 64);
    x[1000] = f16::NAN;
    x[2000] = f16::INFINITY;
    let xd = DeviceTensor::from_host(dev, &x, &shape).unwrap();
    let layout = plan.layout().clone();
    let sentinel = cpu::QuantizedHost {
        codes: vec![0xDEAD_BEEF; layout.n_words()],
        scales: vec![f16::from_f32(7.0); layout.n_groups()],
        mins: vec![f16::from_f32(-7.0); layout.n_groups()],
    };
    let mut q = QuantizedTensor::from_host(dev, &layout, &sentinel).unwrap();
    match plan.quantize(&xd, &mut q) {
        Err(Error::NonFinite { arg: "x", index: 1000 }) => {}
        other => panic!("expected NonFinite at 1000, got {other:?}"),
    }
    assert!(q.to_host().unwrap().same_bits(&sentinel), "checked quantize wrote on NaN input");
    // The single-pass mode reports the same error (its outputs are unspecified).
    match plan.quantize_with(&xd, &mut q, FiniteCheck::SinglePass) {
        Err(Error::NonFinite { arg: "x", index: 1000 }) => {}
        other => panic!("expected NonFinite at 1000 (single pass), got {other:?}"),
    }
    // The deferred single-pass check reports it when resolved.
    let pending = plan.quantize_deferred(&xd, &mut q).unwrap();
    assert!(matches!(pending.wait(), Err(Error::NonFinite { arg: "x", index: 1000 })));
    // Out of the f16 range in f32/bf16: InvalidArgument, nothing written.
    let plan32 = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: ntkv::DType::F32 }, spec).unwrap();
    let mut x32 = vec![0.5f32; 37 * 64];
    x32[77] = -1e6;
    let xd32 = DeviceTensor::from_host(dev, &x32, &shape).unwrap();
    let mut q = QuantizedTensor::from_host(dev, &layout, &sentinel).unwrap();
    assert!(matches!(plan32.quantize(&xd32, &mut q), Err(Error::InvalidArgument { arg: "x", .. })));
    assert!(q.to_host().unwrap().same_bits(&sentinel));
    assert!(matches!(
        plan32.quantize_with(&xd32, &mut q, FiniteCheck::SinglePass),
        Err(Error::InvalidArgument { arg: "x", .. })
    ));
}

/// The plan's one kernel error flag: deferred calls add to it, the first wait reports the
/// lowest bad index among them and clears it, clones share it, and a failed checked scan
/// leaves nothing behind.
#[test]
fn plan_flag_collects_deferred_calls_and_clears_on_read() {
    let dev = gpu_or_skip!("plan_flag_collects_deferred_calls_and_clears_on_read");
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let shape = [16, 64];
    let plan = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: ntkv::DType::F16 }, spec).unwrap();
    let clean: Vec<f16> = data(&mut Rng::new(5), 16 * 64, 64);
    let mut bad = clean.clone();
    bad[300] = f16::NAN;
    let xc = DeviceTensor::from_host(dev, &clean, &shape).unwrap();
    let xb = DeviceTensor::from_host(dev, &bad, &shape).unwrap();
    let mut q = plan.alloc_output().unwrap();
    let first = plan.quantize_deferred(&xc, &mut q).unwrap();
    let second = plan.quantize_deferred(&xb, &mut q).unwrap();
    let third = plan.quantize_deferred(&xc, &mut q).unwrap();
    assert!(matches!(first.wait(), Err(Error::NonFinite { arg: "x", index: 300 })));
    second.wait().unwrap();
    third.wait().unwrap();
    plan.quantize_with(&xc, &mut q, FiniteCheck::SinglePass).unwrap();
    let clone = plan.clone();
    let unread = clone.quantize_deferred(&xb, &mut q).unwrap();
    drop(unread);
    assert!(matches!(
        plan.quantize_with(&xc, &mut q, FiniteCheck::SinglePass),
        Err(Error::NonFinite { arg: "x", index: 300 })
    ));
    assert!(matches!(plan.quantize(&xb, &mut q), Err(Error::NonFinite { arg: "x", index: 300 })));
    plan.quantize_with(&xc, &mut q, FiniteCheck::SinglePass).unwrap();
    plan.quantize(&xc, &mut q).unwrap();
    assert!(q.to_host().unwrap().same_bits(&cpu::quantize(spec, &shape, &clean).unwrap()));
}

#[test]
fn shape_and_dtype_mismatches_write_nothing() {
    let dev = gpu_or_skip!("shape_and_dtype_mismatches_write_nothing");
    let spec = QuantSpec::new(4, 32, Axis::PerChannel).unwrap();
    let plan = QuantPlan::new(dev, &QuantShape { dims: [64, 16].to_vec(), dtype: ntkv::DType::F16 }, spec).unwrap();
    let x = DeviceTensor::<f16>::zeros(dev, &[64, 17]).unwrap();
    let mut q = QuantizedTensor::zeros(dev, plan.layout()).unwrap();
    assert!(matches!(plan.quantize(&x, &mut q), Err(Error::Shape { arg: "x", .. })));
    let x = DeviceTensor::<f32>::zeros(dev, &[64, 16]).unwrap();
    assert!(matches!(plan.quantize(&x, &mut q), Err(Error::InvalidArgument { arg: "x", .. })));
    let other = QuantPlan::new(
        dev,
        &QuantShape { dims: [64, 16].to_vec(), dtype: ntkv::DType::F16 },
        QuantSpec::new(2, 32, Axis::PerChannel).unwrap(),
    )
    .unwrap();
    let mut wrong = QuantizedTensor::zeros(dev, other.layout()).unwrap();
    let x = DeviceTensor::<f16>::zeros(dev, &[64, 16]).unwrap();
    assert!(matches!(plan.quantize(&x, &mut wrong), Err(Error::Shape { arg: "codes", .. })));
    let mut y = DeviceTensor::<f16>::from_host(dev, &vec![f16::ONE; 64 * 15], &[64, 15]).unwrap();
    assert!(matches!(plan.dequantize(&q, &mut y), Err(Error::Shape { arg: "out", .. })));
    assert!(y.to_host().unwrap().iter().all(|v| *v == f16::ONE));
}

fn mikv_case(dev: &Device, cfg: MikvConfig, heads: usize, dim: usize, t0: usize, total: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let kv: Vec<f16> = data(&mut rng, heads * total * dim, dim);
    let important: Vec<Vec<u32>> = (0..heads).map(|_| (0..t0 as u32).filter(|_| rng.below(6) == 0).collect()).collect();
    let prefix: Vec<f16> =
        (0..heads).flat_map(|h| kv[h * total * dim..(h * total + t0) * dim].iter().copied()).collect();
    let mut cpu_cache = MikvCacheCpu::from_prefill(cfg, &prefix, &[heads, t0, dim], &important).unwrap();
    let prefix_d = DeviceTensor::from_host(dev, &prefix, &[heads, t0, dim]).unwrap();
    let mut gpu_cache = MikvCache::from_prefill(dev, cfg, &prefix_d, &important).unwrap();
    assert!(gpu_cache.to_cpu().unwrap().same_bits(&cpu_cache), "{cfg:?}: prefill buffers differ");
    for t in t0..total {
        let tok: Vec<f16> =
            (0..heads).flat_map(|h| kv[(h * total + t) * dim..(h * total + t + 1) * dim].iter().copied()).collect();
        cpu_cache.append(&tok).unwrap();
        let tok_d = DeviceTensor::from_host(dev, &tok, &[heads, dim]).unwrap();
        gpu_cache.append(&tok_d).unwrap();
    }
    assert_eq!(gpu_cache.len(), total);
    assert_eq!(gpu_cache.quantized_len(), cpu_cache.quantized_len());
    assert!(gpu_cache.to_cpu().unwrap().same_bits(&cpu_cache), "{cfg:?}: buffers differ after appends");
    let mut dense = DeviceTensor::<f16>::zeros(dev, &[heads, total, dim]).unwrap();
    gpu_cache.dequantize_dense(&mut dense).unwrap();
    let dense = dense.to_host().unwrap();
    let want = cpu_cache.dequantize_dense().unwrap();
    if let Some(i) = dense.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("{cfg:?}: dense element {i}: gpu {} cpu {}", dense[i], want[i]);
    }
}

#[test]
fn mikv_cache_matches_cpu() {
    let dev = gpu_or_skip!("mikv_cache_matches_cpu");
    let cases = [
        (
            MikvConfig {
                lo_bits: 4,
                hi: HiPrecision::F16,
                group: 32,
                axis: Axis::PerChannel,
                residual: 32,
                capacity: 300,
            },
            3,
            40,
            100,
            250,
        ),
        (
            MikvConfig {
                lo_bits: 2,
                hi: HiPrecision::Int8,
                group: 64,
                axis: Axis::PerChannel,
                residual: 0,
                capacity: 200,
            },
            2,
            64,
            70,
            160,
        ),
        (
            MikvConfig {
                lo_bits: 4,
                hi: HiPrecision::Int8,
                group: 32,
                axis: Axis::PerToken,
                residual: 5,
                capacity: 90,
            },
            4,
            96,
            33,
            90,
        ),
        (
            MikvConfig {
                lo_bits: 2,
                hi: HiPrecision::F16,
                group: 128,
                axis: Axis::PerToken,
                residual: 0,
                capacity: 64,
            },
            1,
            128,
            0,
            40,
        ),
    ];
    for (i, (cfg, heads, dim, t0, total)) in cases.into_iter().enumerate() {
        mikv_case(dev, cfg, heads, dim, t0, total, 100 + i as u64);
    }
}

#[test]
fn mikv_non_finite_append_is_error_and_cache_unchanged() {
    let dev = gpu_or_skip!("mikv_non_finite_append_is_error_and_cache_unchanged");
    let cfg =
        MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerToken, residual: 2, capacity: 16 };
    let kv: Vec<f16> = data(&mut Rng::new(4), 2 * 8 * 32, 32);
    let kv_d = DeviceTensor::from_host(dev, &kv, &[2, 8, 32]).unwrap();
    let mut cache = MikvCache::from_prefill(dev, cfg, &kv_d, &[vec![1], vec![2, 5]]).unwrap();
    let before = cache.to_cpu().unwrap();
    let mut tok = vec![f16::ONE; 64];
    tok[33] = f16::NAN;
    let tok_d = DeviceTensor::from_host(dev, &tok, &[2, 32]).unwrap();
    assert!(matches!(cache.append(&tok_d), Err(Error::NonFinite { arg: "token", index: 33 })));
    assert!(cache.to_cpu().unwrap().same_bits(&before));
    let mut bad = kv.clone();
    bad[5] = f16::NEG_INFINITY;
    let bad_d = DeviceTensor::from_host(dev, &bad, &[2, 8, 32]).unwrap();
    assert!(matches!(
        MikvCache::from_prefill(dev, cfg, &bad_d, &[vec![], vec![]]),
        Err(Error::NonFinite { arg: "kv", index: 5 })
    ));
    let wrong = DeviceTensor::<f16>::zeros(dev, &[2, 31]).unwrap();
    assert!(matches!(cache.append(&wrong), Err(Error::Shape { arg: "token", .. })));
    let mut out = DeviceTensor::<f16>::zeros(dev, &[2, 9, 32]).unwrap();
    assert!(matches!(cache.dequantize_dense(&mut out), Err(Error::Shape { arg: "out", .. })));
}
