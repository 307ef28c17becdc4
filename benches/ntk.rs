//! Criterion benches for the NTK family: the Gram contraction in each precision and the MLP
//! empirical NTK. On a GPU they time with CUDA events (`iter_custom`); without one they time
//! the CPU reference at small sizes (and say so).
use std::time::Duration;

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use ntkv::ntk::{self, cpu, Activation, GramPlan, GramShape, NtkMode, Precision};
use ntkv::rng::Rng;
use ntkv::{timing, Device, DeviceTensor};

use common::gpu_device as device;

fn gpu_time(dev: &Device, iters: u64, mut f: impl FnMut() -> ntkv::Result<()>) -> Duration {
    let ms = timing::time_gpu_ms(dev, 1, iters as usize, |_| f()).map(|t| t.iter().sum::<f64>()).unwrap_or(f64::NAN);
    Duration::from_secs_f64(ms.max(0.0) * 1e-3)
}

fn host_mlp(rng: &mut Rng, widths: &[usize]) -> cpu::Mlp {
    let layers = widths.len() - 1;
    cpu::Mlp {
        widths: widths.to_vec(),
        weights: (0..layers).map(|l| rng.normal_vec(widths[l + 1] * widths[l])).collect(),
        biases: (0..layers).map(|l| Some(rng.normal_vec(widths[l + 1]))).collect(),
        activation: Activation::Relu,
    }
}

fn benches(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut group = c.benchmark_group("ntk");
    group.sample_size(10);
    match device() {
        Some(dev) => {
            let (n, p) = (512usize, 1usize << 16);
            let j = DeviceTensor::from_host(&dev, &rng.normal_vec(n * p), &[n, 1, p]).expect("upload J");
            for prec in [Precision::F32, Precision::Tf32, Precision::Bf16] {
                let mut plan = GramPlan::new(&dev, &GramShape::symmetric(n, 1, p, NtkMode::Full), prec).expect("plan");
                let mut out = DeviceTensor::<f32>::zeros(&dev, &plan.output_shape()).expect("alloc");
                group.bench_function(format!("gram {n}x{p} {}", prec.name()), |b| {
                    b.iter_custom(|iters| gpu_time(&dev, iters, || plan.run(&j, &mut out)))
                });
            }
            let widths = [784usize, 1024, 1024, 10];
            let mlp = ntk::Mlp::from_host(&dev, &host_mlp(&mut rng, &widths)).expect("mlp");
            let x = DeviceTensor::from_host(&dev, &rng.normal_vec(128 * 784), &[128, 784]).expect("x");
            group.bench_function("mlp eNTK trace 128 784-1024-1024-10", |b| {
                b.iter_custom(|iters| {
                    gpu_time(&dev, iters, || {
                        mlp.empirical_ntk(&x, None, NtkMode::Trace { divide_by_outputs: false }, Precision::F32)
                            .map(|_| ())
                    })
                })
            });
        }
        None => {
            println!("ntk benches: no GPU (or kernels not built); timing the CPU reference at small sizes");
            let (n, o, p) = (32usize, 2usize, 1024usize);
            let j = rng.normal_vec(n * o * p);
            group.bench_function(format!("cpu gram full {n}x{o}x{p}"), |b| {
                b.iter(|| cpu::gram(&j, None, n, n, o, p, NtkMode::Full).expect("gram"))
            });
            let k = cpu::gram(&j, None, n, n, o, p, NtkMode::Trace { divide_by_outputs: true }).expect("gram");
            group.bench_function(format!("cpu eigenvalues {n}x{n}"), |b| {
                b.iter(|| cpu::eigenvalues_symmetric(&k, n).expect("eig"))
            });
        }
    }
    group.finish();
}

criterion_group!(ntk_benches, benches);
criterion_main!(ntk_benches);
