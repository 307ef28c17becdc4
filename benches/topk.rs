//! Criterion benches for the top-k family: GPU top-k at the shapes, timed with CUDA
//! events through `iter_custom`; without a GPU, the CPU reference at a small size.
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use ntkv::rng::Rng;
use ntkv::topk::{cpu, TopkOptions, TopkPlan, TopkShape};
use ntkv::{timing, DeviceTensor};

use common::gpu_device;

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let Some(dev) = gpu_device() else {
        println!("topk benches: no GPU (or kernels not built); timing the CPU reference at [8, 16384] k=256");
        let host = rng.normal_vec(8 * 16384);
        c.bench_function("topk cpu 8x16384 k256 f32", |b| b.iter(|| cpu::topk(&host, 8, 16384, 256, None)));
        return;
    };
    for (rows, n, k) in [(32usize, 131072usize, 2048usize), (256, 32768, 1024), (32, 1 << 20, 8192)] {
        let host = rng.normal_vec(rows * n);
        let setup = || -> ntkv::Result<_> {
            let scores = DeviceTensor::from_host(&dev, &host, &[rows, n])?;
            let plan = TopkPlan::new(&dev, &TopkShape { rows, n, k }, TopkOptions::default())?;
            let values = DeviceTensor::<f32>::zeros(&dev, &[rows, k])?;
            let indices = DeviceTensor::<u32>::zeros(&dev, &[rows, k])?;
            Ok((scores, plan, values, indices))
        };
        let Ok((scores, mut plan, mut values, mut indices)) = setup() else {
            println!("topk benches: setup failed for [{rows}, {n}] k={k}");
            continue;
        };
        c.bench_function(&format!("topk gpu {rows}x{n} k{k} f32"), |b| {
            b.iter_custom(|iters| {
                let reps = usize::try_from(iters).unwrap_or(usize::MAX);
                let ms = timing::time_gpu_ms(&dev, 1, reps, |_| plan.run(&scores, None, &mut values, &mut indices))
                    .map(|t| t.iter().sum::<f64>())
                    .unwrap_or(f64::NAN);
                Duration::from_secs_f64(ms.max(0.0) * 1e-3)
            })
        });
    }
}

criterion_group!(topk, benches);
criterion_main!(topk);
