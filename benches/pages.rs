//! Criterion benches for Quest selection: page bounds plus the top 128 of 8192 pages per head
//! (32 heads, D = 128, f16 metadata), timed with CUDA events through `iter_custom`. Without a
//! GPU, the CPU reference at a small size (4 heads, 512 pages).

use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use ntkv::pages::{cpu, QuestSelectPlan, QuestSelectShape};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

mod common;

/// The bench runner's Quest shape (D = 128, pages of 16, the top 128 pages, one query).
fn shape(heads: usize, capacity: usize) -> QuestSelectShape {
    let (page_size, budget) = (16, 128);
    QuestSelectShape { batch: 1, hq: heads, hkv: heads, q_tokens: 1, head_dim: 128, capacity, page_size, budget }
}

/// Random page bounds (max ≥ min per channel) and queries.
fn inputs(rng: &mut Rng, s: &QuestSelectShape) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
    let n: usize = s.meta().meta_shape().iter().product();
    let (mut hi, mut lo) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (a, b) = (rng.normal(), rng.normal());
        hi.push(f16::from_f32(a.max(b)));
        lo.push(f16::from_f32(a.min(b)));
    }
    let q = (0..s.q_shape().iter().product::<usize>()).map(|_| f16::from_f32(rng.normal())).collect();
    (hi, lo, q)
}

fn gpu_bench(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let s = shape(32, 131072);
    let (hi, lo, qh) = inputs(&mut Rng::new(1), &s);
    let mx = DeviceTensor::from_host(dev, &hi, &s.meta().meta_shape())?;
    let mn = DeviceTensor::from_host(dev, &lo, &s.meta().meta_shape())?;
    let q = DeviceTensor::from_host(dev, &qh, &s.q_shape())?;
    let mut pages = DeviceTensor::<u32>::zeros(dev, &s.pages_shape())?;
    let mut ip = DeviceTensor::<u32>::zeros(dev, &[s.rows() + 1])?;
    let mut ix = DeviceTensor::<u32>::zeros(dev, &[s.capacity_tokens()?])?;
    let mut plan = QuestSelectPlan::new(dev, &s)?;
    let lens = [131072u32];
    plan.run(&q, &mx, &mn, &lens, &mut pages, &mut ip, &mut ix)?;
    dev.synchronize()?;
    common::bench_gpu(c, "quest_select B1 Hq32 Hkv32 NP8192 D128 top128 f16 (gpu)", dev, || {
        plan.run(&q, &mx, &mn, &lens, &mut pages, &mut ip, &mut ix)
    });
    Ok(())
}

fn cpu_bench(c: &mut Criterion) -> anyhow::Result<()> {
    println!("pages bench: no GPU; timing the CPU reference at a small size");
    let s = shape(4, 8192);
    let (hi, lo, q) = inputs(&mut Rng::new(2), &s);
    c.bench_function("quest_select B1 Hq4 Hkv4 NP512 D128 top128 f16 (cpu reference)", |b| {
        b.iter(|| cpu::quest_select(&s, &q, &hi, &lo, &[8192]).map(|r| r.indices.len()).unwrap_or(0))
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "pages", gpu_bench, cpu_bench);
}

criterion_group!(pages, benches);
criterion_main!(pages);
