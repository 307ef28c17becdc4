//! Kernel timing with CUDA events, and the in-run bandwidth ceiling.
//!
//! Every figure the bench runner prints is a median over repetitions timed with CUDA events
//! (created with timing enabled: cudarc's default disables it) after warm-up, and each
//! memory-bound figure is reported as a share of the copy bandwidth measured in the same run.

use cudarc::driver::{sys, CudaSlice, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::Result;
use crate::params::NtkvCopyParams;

/// Median of a non-empty sample (the mean of the middle two for even lengths); 0 when empty.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        0.5 * (samples[n / 2 - 1] + samples[n / 2])
    }
}

/// The shortest span one timed sample should cover, in milliseconds. After the start event is
/// recorded the GPU idles until the host has enqueued the first kernel (argument checks,
/// small uploads, the launch itself: microseconds), so a sample of one microsecond-scale call
/// would time the host. A sample therefore runs enough back-to-back calls to cover this span,
/// and the per-call time is the sample over the calls, which amortizes that gap.
pub const MIN_SAMPLE_MS: f64 = 0.5;

/// The most back-to-back calls in one sample.
pub const MAX_CALLS_PER_SAMPLE: usize = 64;

/// Times `f` on the device's stream: `warmup` untimed calls, one calibration call bracketed by
/// timing events, then `reps` samples, each a run of back-to-back calls (enough to span
/// [`MIN_SAMPLE_MS`], at most [`MAX_CALLS_PER_SAMPLE`]; one for calls that long already)
/// bracketed by one pair of timing events. Returns the per-call time of each sample in
/// milliseconds (unsorted).
///
/// `f` receives a running call index (distinct within the timed calls) so callers can rotate
/// inputs larger than L2 between calls.
pub fn time_gpu_ms<F>(device: &Device, warmup: usize, reps: usize, mut f: F) -> Result<Vec<f64>>
where
    F: FnMut(usize) -> Result<()>,
{
    for i in 0..warmup {
        f(i)?;
    }
    device.synchronize()?;
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let stream = device.stream();
    let mut sample = |first: usize, calls: usize| -> Result<f64> {
        let start = stream.record_event(flags)?;
        for j in 0..calls {
            f(first + j)?;
        }
        let stop = stream.record_event(flags)?;
        Ok(f64::from(start.elapsed_ms(&stop)?) / calls as f64)
    };
    let probe = sample(0, 1)?;
    let calls = calls_per_sample(probe);
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        times.push(sample(1 + i * calls, calls)?);
    }
    Ok(times)
}

/// Back-to-back calls per sample for a call that took `probe_ms` alone.
pub fn calls_per_sample(probe_ms: f64) -> usize {
    if probe_ms.is_nan() || probe_ms <= 0.0 {
        return MAX_CALLS_PER_SAMPLE;
    }
    ((MIN_SAMPLE_MS / probe_ms).ceil() as usize).clamp(1, MAX_CALLS_PER_SAMPLE)
}

/// Times `f` on the device's stream and returns the median in milliseconds.
pub fn median_gpu_ms<F>(device: &Device, warmup: usize, reps: usize, f: F) -> Result<f64>
where
    F: FnMut(usize) -> Result<()>,
{
    let mut t = time_gpu_ms(device, warmup, reps, f)?;
    Ok(median(&mut t))
}

/// Times a host function with the wall clock; median in milliseconds.
pub fn median_cpu_ms<F, E>(warmup: usize, reps: usize, mut f: F) -> std::result::Result<f64, E>
where
    F: FnMut(usize) -> std::result::Result<(), E>,
{
    for i in 0..warmup {
        f(i)?;
    }
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let t0 = std::time::Instant::now();
        f(i)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut times))
}

const COPY_VEC16: crate::launch::KernelId = crate::launch::KernelId::new(Module::Common, "copy_vec16");

/// Copies `min(src.len(), dst.len())` rounded down to 16 bytes from `src` to `dst` with
/// 16-byte vector loads and stores: the kernel whose bandwidth is the ceiling every
/// memory-bound figure is a share of.
pub fn copy_vec16(device: &Device, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<()> {
    let n = src.len().min(dst.len()) / 16;
    let params = NtkvCopyParams { n_vec16: crate::error::to_u64("src", n)? };
    // Grid-stride: one resident wave of 256-thread blocks.
    let (f, cfg) = crate::launch::grid_stride_kernel(device, COPY_VEC16, 256, n)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(src).arg(dst);
    // SAFETY: ntkv_copy_vec16(NtkvCopyParams, const uint4*, uint4*) reads and writes
    // n_vec16 16-byte vectors, and both slices hold at least n_vec16 * 16 bytes.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The in-run copy-bandwidth ceiling: copies `bytes` (default 2 GiB) device to device and
/// returns read + write bytes per second, in GB/s (1e9), as a median of `reps` runs.
pub fn copy_bandwidth_gbps(device: &Device, bytes: usize, reps: usize) -> Result<f64> {
    let bytes = bytes / 16 * 16;
    let src = device.stream().alloc_zeros::<u8>(bytes)?;
    let mut dst = device.stream().alloc_zeros::<u8>(bytes)?;
    let ms = median_gpu_ms(device, 3, reps, |_| copy_vec16(device, &src, &mut dst))?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    vec![COPY_VEC16]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_calls_are_timed_back_to_back() {
        assert_eq!(calls_per_sample(2.0), 1);
        assert_eq!(calls_per_sample(MIN_SAMPLE_MS), 1);
        assert_eq!(calls_per_sample(0.1), 5);
        assert_eq!(calls_per_sample(0.001), MAX_CALLS_PER_SAMPLE);
        assert_eq!(calls_per_sample(0.0), MAX_CALLS_PER_SAMPLE);
        assert_eq!(calls_per_sample(f64::NAN), MAX_CALLS_PER_SAMPLE);
    }
}
