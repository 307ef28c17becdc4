//! Criterion benches for the fused quantized decode: 1 query × 32 heads over a 128k-token
//! KIVI cache (int4, group 32, K per channel, V per token, D = 128), timed with CUDA events
//! through `iter_custom`. Without a GPU, the CPU reference at a small size (8 heads, 4096
//! tokens).
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use ntkv::qdecode::{cpu, KiviCache, QdecodeCache, QdecodeOptions, QdecodePlan, QdecodeShape};
use ntkv::quant::{Axis, QuantLayout, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn gpu_bench(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let (h, t, d) = (32, 131072, 128);
    let s = QdecodeShape { batch: 1, q_tokens: 1, hq: h, hkv: h, head_dim: d, capacity: t };
    let dims = [1, h, t, d];
    // Zero caches: the contents do not change the work.
    let k = QuantizedTensor::zeros(dev, &QuantLayout::new(QuantSpec::new(4, 32, Axis::PerChannel)?, &dims)?)?;
    let v = QuantizedTensor::zeros(dev, &QuantLayout::new(QuantSpec::new(4, 32, Axis::PerToken)?, &dims)?)?;
    let res = DeviceTensor::<f16>::zeros(dev, &[1, h, 1, d])?;
    let qh: Vec<f16> = Rng::new(1).normal_vec(h * d).into_iter().map(f16::from_f32).collect();
    let q = DeviceTensor::from_host(dev, &qh, &s.q_shape())?;
    let mut o = DeviceTensor::<f16>::zeros(dev, &s.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &s.lse_shape())?;
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions::default())?;
    let cache = QdecodeCache::Kivi(KiviCache { k: &k, v: &v, k_residual: &res, v_residual: &res, residual_len: 0 });
    plan.run(&q, &cache, None, &mut o, &mut lse)?;
    dev.synchronize()?;
    c.bench_function("qdecode_kivi_int4 B1 Hq32 Hkv32 T131072 D128 g32 f16 (gpu)", |bch| {
        bch.iter_custom(|iters| {
            let iters = usize::try_from(iters).unwrap_or(usize::MAX);
            let ms = ntkv::timing::time_gpu_ms(dev, 0, 1, |_| {
                for _ in 0..iters {
                    plan.run(&q, &cache, None, &mut o, &mut lse)?;
                }
                Ok(())
            })
            .map(|t| t.first().copied().unwrap_or(0.0))
            .unwrap_or(f64::NAN);
            Duration::from_secs_f64(ms * 1e-3)
        })
    });
    Ok(())
}

fn cpu_bench(c: &mut Criterion) -> anyhow::Result<()> {
    println!("qdecode bench: no GPU; timing the CPU reference at a small size");
    let (h, t, d) = (8, 4096, 128);
    let s = QdecodeShape { batch: 1, q_tokens: 1, hq: h, hkv: h, head_dim: d, capacity: t };
    let mut rng = Rng::new(2);
    let x: Vec<f16> = rng.normal_vec(h * t * d).into_iter().map(f16::from_f32).collect();
    let (ks, vs) = (QuantSpec::new(4, 32, Axis::PerChannel)?, QuantSpec::new(4, 32, Axis::PerToken)?);
    // The CPU reference reads dense caches: quantize, then dequantize as the kernel would.
    let dense = |spec: QuantSpec| -> ntkv::Result<Vec<f16>> {
        let codes = ntkv::quant::cpu::quantize(spec, &[h, t, d], &x)?;
        cpu::kivi_dense(spec, [h, t, d], &codes, &vec![f16::ZERO; h * d], 1, 0)
    };
    let (k, v) = (dense(ks)?, dense(vs)?);
    let q: Vec<f16> = rng.normal_vec(h * d).into_iter().map(f16::from_f32).collect();
    let opts = QdecodeOptions::default();
    c.bench_function("qdecode_kivi_int4 B1 Hq8 Hkv8 T4096 D128 g32 f16 (cpu reference)", |b| {
        b.iter(|| cpu::reference(&s, &opts, &q, &k, &v, t, None).map(|r| r.lse.len()).unwrap_or(0))
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    let dev = if ntkv::kernels_built() { Device::new(0).ok() } else { None };
    let r = match dev {
        Some(dev) => gpu_bench(c, &dev),
        None => cpu_bench(c),
    };
    if let Err(e) = r {
        eprintln!("qdecode bench failed: {e}");
    }
}

criterion_group!(qdecode, benches);
criterion_main!(qdecode);
