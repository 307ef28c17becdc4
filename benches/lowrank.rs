//! Criterion benches for the lowrank reconstruction: 2048 selected tokens × 8 kv heads from
//! `U [128k, 160]`, `SV [160, 8·128]` bf16 with RoPE, timed with CUDA events through
//! `iter_custom`. Without a GPU, the CPU reference at a small size (256 tokens × 2 heads).

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use ntkv::lowrank::{cpu, KeyLayout, ReconstructPlan, ReconstructShape, RopeOptions};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

mod common;

/// The lowrank tests' list generators (one copy for tests, benches and the runner).
#[path = "../tests/lowrank_support/mod.rs"]
mod lowrank_support;

fn bf(v: Vec<f32>) -> Vec<bf16> {
    v.into_iter().map(bf16::from_f32).collect()
}

fn gpu_bench(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let shape = ReconstructShape { batch: 1, capacity: 131072, kv_heads: 8, head_dim: 128, rank: 160 };
    let mut rng = Rng::new(1);
    let u = DeviceTensor::from_host(dev, &bf(rng.normal_vec(131072 * 160)), &shape.u_shape())?;
    let sv = DeviceTensor::from_host(dev, &bf(rng.normal_vec(160 * 1024)), &shape.sv_shape())?;
    let (p, i) = lowrank_support::fixed_lists(&mut rng, 131072, 8, 2048);
    let ip = DeviceTensor::from_host(dev, &p, &[p.len()])?;
    let ix = DeviceTensor::from_host(dev, &i, &[i.len()])?;
    let layout = KeyLayout::Gathered { budget: 2048 };
    let plan = ReconstructPlan::new(dev, &shape, RopeOptions::default(), layout, &[131072], &ip, &ix)?;
    let mut out = DeviceTensor::<bf16>::zeros(dev, &shape.gathered_shape(2048))?;
    plan.run(&u, &sv, &mut out)?;
    dev.synchronize()?;
    common::bench_gpu(c, "lowrank_rope T131072 Hkv8 D128 r160 sel2048 bf16 (gpu)", dev, || plan.run(&u, &sv, &mut out));
    Ok(())
}

fn cpu_bench(c: &mut Criterion) -> anyhow::Result<()> {
    println!("lowrank bench: no GPU; timing the CPU reference at a small size");
    let shape = ReconstructShape { batch: 1, capacity: 4096, kv_heads: 2, head_dim: 128, rank: 160 };
    let mut rng = Rng::new(2);
    let u = bf(rng.normal_vec(4096 * 160));
    let sv = bf(rng.normal_vec(160 * 256));
    let (p, i) = lowrank_support::fixed_lists(&mut rng, 4096, 2, 256);
    c.bench_function("lowrank_rope T4096 Hkv2 D128 r160 sel256 bf16 (cpu reference)", |b| {
        b.iter(|| {
            cpu::reconstruct(&shape, &RopeOptions::default(), &[4096], &u, &sv, &p, &i).map(|r| r.len()).unwrap_or(0)
        })
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "lowrank", gpu_bench, cpu_bench);
}

criterion_group!(lowrank, benches);
criterion_main!(lowrank);
