//! Shared by the criterion benches: the device (when kernels are built and a GPU is present)
//! and the GPU-or-CPU-reference dispatch every bench file uses.
#![allow(dead_code)]

use criterion::Criterion;
use ntkv::Device;

/// The first GPU, or `None` when the kernels were not built or no device is present.
pub fn gpu_device() -> Option<Device> {
    if !ntkv::kernels_built() {
        return None;
    }
    Device::new(0).ok()
}

/// Runs `gpu` on a device when there is one, otherwise `cpu` (the CPU reference at a small
/// size); a failure is printed, not propagated, so one family's error leaves the others timed.
pub fn gpu_or_cpu(
    c: &mut Criterion,
    family: &str,
    gpu: impl FnOnce(&mut Criterion, &Device) -> anyhow::Result<()>,
    cpu: impl FnOnce(&mut Criterion) -> anyhow::Result<()>,
) {
    let result = match gpu_device() {
        Some(dev) => gpu(c, &dev),
        None => cpu(c),
    };
    if let Err(e) = result {
        eprintln!("{family} benches failed: {e}");
    }
}

/// Benches `run` on the device with CUDA events through `iter_custom`: one timed span of
/// `iters` back-to-back calls (a failed call times as NaN).
pub fn bench_gpu(c: &mut Criterion, name: &str, dev: &Device, mut run: impl FnMut() -> ntkv::Result<()>) {
    c.bench_function(name, |bch| {
        bch.iter_custom(|iters| {
            let iters = usize::try_from(iters).unwrap_or(usize::MAX);
            let ms = ntkv::timing::time_gpu_ms(dev, 0, 1, |_| {
                for _ in 0..iters {
                    run()?;
                }
                Ok(())
            })
            .map(|t| t.first().copied().unwrap_or(0.0))
            .unwrap_or(f64::NAN);
            std::time::Duration::from_secs_f64(ms * 1e-3)
        })
    });
}
