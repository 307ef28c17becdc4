//! Criterion benches for the k-means: 32 heads × 32768 keys × 128 into 256 clusters, 10
//! iterations, f32, L2, timed with CUDA events through `iter_custom`. Without a GPU, the CPU
//! reference at a small size (2 heads × 1024 keys × 64 into 16 clusters, 2 iterations).
mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use ntkv::cluster::{cpu, ClusterState, KmeansOptions, KmeansPlan, KmeansShape, Metric};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn keys(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal()).collect()
}

fn gpu_bench(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let s = KmeansShape { heads: 32, tokens: 32768, capacity: 32768, clusters: 256, head_dim: 128 };
    let k = DeviceTensor::from_host(dev, &keys(32 * 32768 * 128, 1), &s.keys_shape())?;
    let mut state = ClusterState::zeros(dev, &s)?;
    let opts = KmeansOptions { metric: Metric::L2, iterations: 10, ..Default::default() };
    let mut plan = KmeansPlan::new(dev, &s, opts)?;
    plan.run(&k, &mut state)?;
    dev.synchronize()?;
    common::bench_gpu(c, "kmeans H32 T32768 D128 C256 it10 f32 (gpu)", dev, || plan.run(&k, &mut state));
    Ok(())
}

fn cpu_bench(c: &mut Criterion) -> anyhow::Result<()> {
    println!("cluster bench: no GPU; timing the CPU reference at a small size");
    let s = KmeansShape { heads: 2, tokens: 1024, capacity: 1024, clusters: 16, head_dim: 64 };
    let k = keys(2 * 1024 * 64, 2);
    let o = KmeansOptions { metric: Metric::L2, iterations: 2, ..Default::default() };
    c.bench_function("kmeans H2 T1024 D64 C16 it2 f32 (cpu reference)", |b| {
        b.iter(|| cpu::kmeans(&s, &o, &k).map(|r| r.labels.len()).unwrap_or(0))
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "cluster", gpu_bench, cpu_bench);
}

criterion_group!(cluster, benches);
criterion_main!(cluster);
