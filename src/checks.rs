//! Device-side input checks shared by the families.

use cudarc::driver::{CudaView, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::{to_u64, Error, Result};
use crate::launch::{self, KernelId};
use crate::params::NtkvFiniteCheckParams;
use crate::tensor::Float;

const FIND_NONFINITE: KernelId = KernelId::new(Module::Common, "find_nonfinite");
const THREADS: u32 = 256;

/// Scans `x` on the device and returns the lowest flat index holding a NaN or infinity.
///
/// This synchronizes with the stream (one 8-byte read back). Callers that must not write on
/// non-finite input call this before launching the kernel that writes.
pub fn first_nonfinite<T: Float>(device: &Device, x: &CudaView<'_, T>) -> Result<Option<usize>> {
    let n = x.len();
    if n == 0 {
        return Ok(None);
    }
    let stream = device.stream();
    let mut flag = stream.clone_htod(&[u64::MAX])?;
    let params = NtkvFiniteCheckParams { n: to_u64("x", n)?, dtype: T::DTYPE.code(), _pad0: 0 };
    let f = device.kernel(FIND_NONFINITE)?;
    let cfg = launch::grid_for(device, &f, THREADS, 0, n.div_ceil(THREADS as usize * 8), true)?;
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
pub fn ensure_finite<T: Float>(device: &Device, arg: &'static str, x: &CudaView<'_, T>) -> Result<()> {
    match first_nonfinite(device, x)? {
        Some(index) => Err(Error::NonFinite { arg, index }),
        None => Ok(()),
    }
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    vec![FIND_NONFINITE]
}
