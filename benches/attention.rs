//! Criterion benches for the block-sparse prefill: on a GPU, 1x32x4096x128 bf16 with a dense
//! and a 25%-dense 128x128 block mask (CUDA-event timing through `iter_custom`); without one,
//! the CPU reference at 1x4x256x64 (printed as such).
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use ntkv::attention::{cpu, BlockMask, MaskHeads, PrefillOptions, PrefillPlan, PrefillShape};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn sparse_mask(shape: &PrefillShape, block: usize, keep_one_in: u32) -> anyhow::Result<BlockMask> {
    let n_rb = ntkv::error::to_u32("tokens", shape.seq_q(0)?.div_ceil(block))?;
    let n_cb = ntkv::error::to_u32("tokens", shape.seq_k(0)?.div_ceil(block))?;
    let rows: Vec<Vec<u32>> =
        (0..n_rb).map(|r| (0..n_cb).filter(|c| (r * 7 + c * 3) % keep_one_in == 0).collect()).collect();
    Ok(BlockMask::from_lists(block, block, MaskHeads::Shared, &[rows])?)
}

fn gpu_benches(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let (t, h, d) = (4096usize, 32usize, 128usize);
    let shape = PrefillShape::new(h, h, d, vec![0, t as u32], vec![0, t as u32])?;
    let mut rng = Rng::new(3);
    let data: Vec<bf16> = (0..t * h * d).map(|_| bf16::from_f32(rng.normal())).collect();
    let q = DeviceTensor::from_host(dev, &data, &[t, h, d])?;
    let k = DeviceTensor::from_host(dev, &data, &[t, h, d])?;
    let v = DeviceTensor::from_host(dev, &data, &[t, h, d])?;
    let mut o = DeviceTensor::<bf16>::zeros(dev, &[t, h, d])?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &[h, t])?;
    for (name, mask) in [
        ("prefill_dense 1x32x4096x128 bf16", BlockMask::dense(128, 128, MaskHeads::Shared, &shape)?),
        ("prefill_bsr25 1x32x4096x128 bf16", sparse_mask(&shape, 128, 4)?),
    ] {
        let plan = PrefillPlan::new(dev, &shape, PrefillOptions::default(), &mask)?;
        plan.run(&q, &k, &v, &mut o, &mut lse)?;
        dev.synchronize()?;
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let times =
                    ntkv::timing::time_gpu_ms(dev, 0, iters as usize, |_| plan.run(&q, &k, &v, &mut o, &mut lse))
                        .unwrap_or_default();
                Duration::from_secs_f64(times.iter().sum::<f64>() * 1e-3)
            })
        });
    }
    Ok(())
}

fn cpu_benches(c: &mut Criterion) -> anyhow::Result<()> {
    println!("attention benches: no GPU; timing the CPU reference at 1x4x256x64 instead");
    let (t, h, d) = (256usize, 4usize, 64usize);
    let shape = PrefillShape::new(h, h, d, vec![0, t as u32], vec![0, t as u32])?;
    let mask = sparse_mask(&shape, 64, 2)?;
    let mut rng = Rng::new(3);
    let data: Vec<bf16> = (0..t * h * d).map(|_| bf16::from_f32(rng.normal())).collect();
    c.bench_function("prefill_bsr50 cpu reference 1x4x256x64 bf16", |b| {
        b.iter(|| cpu::prefill(&shape, PrefillOptions::default(), &mask, &data, &data, &data).map(|o| o.lse.len()))
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "attention", gpu_benches, cpu_benches);
}

criterion_group! {
    name = attention;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(attention);
