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
