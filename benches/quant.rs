//! Criterion benches for the quantization family: int4 group-32 per-token dequantize and
//! quantize of f16. On a GPU: 1M tokens × 128, timed with CUDA events through `iter_custom`.
//! Without one: the CPU reference at 4096 × 128 (printed as such).

use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use ntkv::quant::{cpu, Axis, QuantPlan, QuantShape, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::{timing, DType, Device, DeviceTensor};

fn input(n: usize) -> Vec<f16> {
    Rng::new(7).normal_vec(n).into_iter().map(f16::from_f32).collect()
}

fn gpu_benches(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let shape = [1usize << 20, 128];
    let spec = QuantSpec::new(4, 32, Axis::PerToken)?;
    let plan = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: DType::F16 }, spec)?;
    let x = DeviceTensor::from_host(dev, &input(shape[0] * shape[1]), &shape)?;
    let mut q = QuantizedTensor::zeros(dev, plan.layout())?;
    let mut y = DeviceTensor::<f16>::zeros(dev, &shape)?;
    plan.quantize(&x, &mut q)?;
    let mut group = c.benchmark_group("quant_gpu");
    group.bench_function("dequant int4 g32 1Mx128 f16", |b| {
        b.iter_custom(|iters| {
            let times = timing::time_gpu_ms(dev, 1, iters as usize, |_| plan.dequantize(&q, &mut y));
            Duration::from_secs_f64(times.expect("GPU timing failed").iter().sum::<f64>() * 1e-3)
        })
    });
    group.bench_function("quant int4 g32 1Mx128 f16 (checked)", |b| {
        b.iter_custom(|iters| {
            let times = timing::time_gpu_ms(dev, 1, iters as usize, |_| plan.quantize(&x, &mut q));
            Duration::from_secs_f64(times.expect("GPU timing failed").iter().sum::<f64>() * 1e-3)
        })
    });
    group.finish();
    Ok(())
}

fn cpu_benches(c: &mut Criterion) -> anyhow::Result<()> {
    println!("quant benches: no GPU; timing the CPU reference at 4096 x 128 instead");
    let shape = [4096usize, 128];
    let spec = QuantSpec::new(4, 32, Axis::PerToken)?;
    let x = input(shape[0] * shape[1]);
    let q = cpu::quantize(spec, &shape, &x)?;
    let mut group = c.benchmark_group("quant_cpu");
    group.bench_function("dequant int4 g32 4096x128 f16", |b| b.iter(|| cpu::dequantize::<f16>(spec, &shape, &q)));
    group.bench_function("quant int4 g32 4096x128 f16", |b| b.iter(|| cpu::quantize(spec, &shape, &x)));
    group.finish();
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "quant", gpu_benches, cpu_benches);
}

criterion_group!(quant, benches);
criterion_main!(quant);
