//! The one error type of the library.

use cudarc::driver::DriverError;

/// Everything an ntkv call can fail with.
///
/// Argument errors are raised before any launch, and nothing is written to any output when
/// one is returned. Driver errors carry cudarc's [`DriverError`] as their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CUDA driver library (`libcuda`) could not be loaded on this machine.
    #[error("no CUDA driver: libcuda could not be loaded on this machine")]
    NoDriver,

    /// The driver loaded, but there is no device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal} ({count} visible)")]
    NoDevice {
        /// The ordinal that was asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },

    /// The crate was compiled without `nvcc`, so the kernel image of this module is missing.
    #[error(
        "kernels not built: module `{module}` has no compiled image because nvcc was not found \
         when ntkv was built; run tools/install-cuda.sh and rebuild"
    )]
    KernelsNotBuilt {
        /// The kernel module (one per `cuda/<family>.cu`).
        module: &'static str,
    },

    /// The driver refused the embedded image or a function in it.
    #[error("failed to load `{what}` from kernel module `{module}`")]
    ModuleLoad {
        /// The kernel module.
        module: &'static str,
        /// The function (or the module itself) that failed to load.
        what: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },

    /// An argument has the wrong shape.
    #[error("shape mismatch for `{arg}`: expected {expected:?}, got {actual:?}")]
    Shape {
        /// The argument's name as in the function's signature.
        arg: &'static str,
        /// The expected shape, outermost first.
        expected: Vec<usize>,
        /// The shape that was given.
        actual: Vec<usize>,
    },

    /// An argument has a value the operation does not accept.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name as in the function's signature.
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A NaN or infinity in an input that must be finite (for example, a tensor to quantize).
    #[error("non-finite value in `{arg}` at flat index {index}")]
    NonFinite {
        /// The argument's name.
        arg: &'static str,
        /// The lowest flat index of a NaN or infinity.
        index: usize,
    },

    /// A size does not fit the kernel's index type or the device's limits.
    #[error("`{arg}` is too large: {reason}")]
    TooLarge {
        /// The argument's name.
        arg: &'static str,
        /// Which limit it exceeds.
        reason: String,
    },

    /// A tensor or plan made on one device was passed to an operation on another.
    #[error("`{arg}` belongs to device {actual}, but the operation runs on device {expected}")]
    DeviceMismatch {
        /// The argument's name.
        arg: &'static str,
        /// The ordinal of the device the operation runs on.
        expected: usize,
        /// The ordinal of the device the argument was made on.
        actual: usize,
    },

    /// A kernel protocol gave up (for example a cross-block wait that timed out), so the
    /// output of the call that launched it is not valid and must not be used.
    #[error("kernel `{kernel}` did not complete its protocol: {reason}; its output is invalid")]
    KernelFault {
        /// The kernel that reported the fault.
        kernel: &'static str,
        /// What went wrong.
        reason: String,
    },

    /// A broken internal invariant: a bug in ntkv, never a consequence of an argument.
    /// Please report it with the message.
    #[error("internal error (a bug in ntkv): {0}")]
    Internal(String),

    /// A CUDA driver call failed.
    #[error("CUDA driver error")]
    Driver(#[from] DriverError),
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, reason: reason.into() }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(arg: &'static str, expected: &[usize], actual: &[usize]) -> Self {
        Error::Shape { arg, expected: expected.to_vec(), actual: actual.to_vec() }
    }

    /// Shorthand for [`Error::Internal`].
    pub fn internal(reason: impl Into<String>) -> Self {
        Error::Internal(reason.into())
    }

    /// Shorthand for [`Error::TooLarge`].
    pub fn too_large(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::TooLarge { arg, reason: reason.into() }
    }

    /// The argument this error names: the field, buffer or parameter of the call that was
    /// rejected ([`Error::Shape`], [`Error::InvalidArgument`], [`Error::NonFinite`],
    /// [`Error::TooLarge`], [`Error::DeviceMismatch`]); `None` for the device, driver and
    /// internal errors, which are not about one argument.
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::Shape { arg, .. }
            | Error::InvalidArgument { arg, .. }
            | Error::NonFinite { arg, .. }
            | Error::TooLarge { arg, .. }
            | Error::DeviceMismatch { arg, .. } => Some(arg),
            _ => None,
        }
    }
}

/// Converts a size to `u32` for a kernel argument, naming the argument on overflow
/// (never a silent `as u32` truncation).
pub fn to_u32(arg: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::too_large(arg, format!("{v} does not fit in u32")))
}

/// Converts a size to `i32` for a kernel argument, naming the argument on overflow.
pub fn to_i32(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::too_large(arg, format!("{v} does not fit in i32")))
}

/// Converts a size to `u64` for a kernel argument (infallible on every supported target,
/// but checked so that no `as` cast can truncate).
pub fn to_u64(arg: &'static str, v: usize) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::too_large(arg, format!("{v} does not fit in u64")))
}

/// `a · b`, or [`Error::TooLarge`] naming `arg` on overflow.
pub fn checked_mul(arg: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::too_large(arg, format!("{a} x {b} overflows usize")))
}

/// Checks that `actual` equals `expected`, naming the argument otherwise.
pub fn check_shape(arg: &'static str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::shape(arg, expected, actual))
    }
}

/// Checks a per-row list of counts: exactly `rows` entries, each at most `max` (`what` names
/// the limit in the message).
///
/// # Errors
/// [`Error::Shape`] for another length; [`Error::InvalidArgument`] naming `arg` and the first
/// entry above `max`.
pub fn check_counts(arg: &'static str, counts: &[u32], rows: usize, max: usize, what: &str) -> Result<()> {
    if counts.len() != rows {
        return Err(Error::shape(arg, &[rows], &[counts.len()]));
    }
    match counts.iter().enumerate().find(|&(_, &v)| v as usize > max) {
        Some((i, &v)) => Err(Error::invalid(arg, format!("{arg}[{i}] = {v} exceeds {what} {max}"))),
        None => Ok(()),
    }
}
