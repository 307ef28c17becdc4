//! Criterion benches for sparse-index decode: 32 heads, 2048 selected tokens of a 128k f16
//! cache (D = 128), timed with CUDA events through `iter_custom`. Without a GPU, the CPU
//! reference at a small size (8 heads, 256 of 4096 tokens).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use half::f16;
use ntkv::decode::{cpu, DecodeOptions, DecodePlan, DecodeShape};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

#[path = "../tests/decode_support/mod.rs"]
mod decode_support;

use decode_support::{normal, random_lists, Lens};

/// `n` sorted tokens of each list of a full cache.
fn selection(rng: &mut Rng, shape: &DecodeShape, n: usize) -> (Vec<u32>, Vec<u32>) {
    random_lists(rng, shape, &vec![shape.capacity as u32; shape.batch], Lens::Fixed(n))
}

fn gpu_bench(c: &mut Criterion, dev: &Device) -> anyhow::Result<()> {
    let cfg = DecodeShape { batch: 1, q_tokens: 1, hq: 32, hkv: 32, head_dim: 128, capacity: 131072 };
    let mut rng = Rng::new(1);
    let qh: Vec<f16> = normal(&mut rng, cfg.q_shape().iter().product());
    let q = DeviceTensor::from_host(dev, &qh, &cfg.q_shape())?;
    // Zero caches: the contents do not change the work.
    let k = DeviceTensor::<f16>::zeros(dev, &cfg.kv_shape())?;
    let v = DeviceTensor::<f16>::zeros(dev, &cfg.kv_shape())?;
    let mut o = DeviceTensor::<f16>::zeros(dev, &cfg.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape())?;
    let (ptr, idx) = selection(&mut rng, &cfg, 2048);
    let indptr = DeviceTensor::from_host(dev, &ptr, &[ptr.len()])?;
    let indices = DeviceTensor::from_host(dev, &idx, &[idx.len()])?;
    let mut plan = DecodePlan::new(dev, &cfg, DecodeOptions::default(), &[131072], &indptr, &indices)?;
    plan.run(&q, &k, &v, &mut o, &mut lse)?;
    dev.synchronize()?;
    common::bench_gpu(c, "decode_sparse B1 Hq32 Hkv32 T131072 D128 sel2048 f16 (gpu)", dev, || {
        plan.run(&q, &k, &v, &mut o, &mut lse)
    });
    Ok(())
}

fn cpu_bench(c: &mut Criterion) -> anyhow::Result<()> {
    println!("decode bench: no GPU; timing the CPU reference at a small size");
    let cfg = DecodeShape { batch: 1, q_tokens: 1, hq: 8, hkv: 8, head_dim: 128, capacity: 4096 };
    let mut rng = Rng::new(2);
    let q: Vec<f16> = normal(&mut rng, cfg.q_shape().iter().product());
    let k: Vec<f16> = normal(&mut rng, cfg.kv_shape().iter().product());
    let v: Vec<f16> = normal(&mut rng, cfg.kv_shape().iter().product());
    let (ptr, idx) = selection(&mut rng, &cfg, 256);
    let opts = DecodeOptions::default();
    c.bench_function("decode_sparse B1 Hq8 Hkv8 T4096 D128 sel256 f16 (cpu reference)", |b| {
        b.iter(|| cpu::sparse_decode(&cfg, &opts, &q, &k, &v, &[4096], &ptr, &idx).map(|r| r.lse.len()).unwrap_or(0))
    });
    Ok(())
}

fn benches(c: &mut Criterion) {
    common::gpu_or_cpu(c, "decode", gpu_bench, cpu_bench);
}

criterion_group!(decode, benches);
criterion_main!(decode);
