//! Device-side input checks shared by the families.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::{to_u32, Error, Result};
use crate::params::NtkvFiniteCheckParams;
use crate::tensor::Float;

/// Scans `x` on the device and returns the lowest flat index holding a NaN or infinity.
///
/// This synchronizes with the stream (one 8-byte read back). Callers that must not write on
/// non-finite input call this before launching the kernel that writes.
pub fn first_nonfinite<T: Float>(device: &Device, x: &CudaSlice<T>) -> Result<Option<usize>> {
    let n = x.len();
    if n == 0 {
        return Ok(None);
    }
    let stream = device.stream();
    let mut flag = stream.clone_htod(&[u64::MAX])?;
    let params = NtkvFiniteCheckParams { n: n as u64, dtype: T::DTYPE.code(), _pad0: 0 };
    let f = device.function(Module::Common, "ntkv_find_nonfinite")?;
    let threads = 256usize;
    let blocks = n.div_ceil(threads * 8).clamp(1, device.props().sm_count as usize * 16);
    let cfg = LaunchConfig { grid_dim: (to_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(x).arg(&mut flag);
    // SAFETY: ntkv_find_nonfinite(NtkvFiniteCheckParams, const void* x, u64* first_bad) reads
    // p.n elements of the dtype named by p.dtype, which is T's, and x holds exactly n of them;
    // it writes one u64 to first_bad, which holds one.
    unsafe { b.launch(cfg) }?;
    let v = stream.clone_dtoh(&flag)?;
    Ok(v.first().copied().filter(|&i| i != u64::MAX).map(|i| i as usize))
}

/// Returns [`Error::NonFinite`] naming `arg` when `x` holds a NaN or infinity.
pub fn ensure_finite<T: Float>(device: &Device, arg: &'static str, x: &CudaSlice<T>) -> Result<()> {
    match first_nonfinite(device, x)? {
        Some(index) => Err(Error::NonFinite { arg, index }),
        None => Ok(()),
    }
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    // TODO(platform): list every id; filled in as the launchers move to `KernelId`.
    Vec::new()
}
