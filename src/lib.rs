//! # ntkv
//!
//! Hand-written CUDA kernels with safe, typed Rust APIs for two jobs that long-context LLM
//! serving and neural-network analysis keep re-implementing in Python:
//!
//! - **KV-cache compression**: mixed-precision quantization ([`quant`]), …
//! - **NTK Jacobian contractions**.
//!
//! Every GPU operation has a CPU reference beside it (the `cpu` submodule of each family),
//! which the differential test suite compares against. The contract for each operation
//! (math, shapes, ties, NaN handling, tolerances) is in each function's rustdoc.
//!
//! ## Runtime model
//! - [`Device::new`] opens a GPU. On a machine with no driver it returns
//!   [`Error::NoDriver`]; it never panics.
//! - Kernels are compiled by `build.rs` into fatbins embedded in the library. A build
//!   without `nvcc` still works: the CPU references run, and GPU calls return
//!   [`Error::KernelsNotBuilt`].
//! - Every argument is validated before a launch; a bad one returns an error naming it, and
//!   nothing is written.

#![warn(missing_docs)]

pub mod attention;
pub mod checks;
pub mod decode;
pub mod device;
pub mod error;
pub mod launch;
pub mod ntk;
#[allow(missing_docs)]
pub mod params;
mod params_repr;
pub mod quant;
pub mod rng;
pub mod tensor;
pub mod timing;
pub mod topk;

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use device::{built_archs, driver_present, kernels_built, Device, DeviceProps, Module};
pub use error::{Error, Result};
pub use launch::KernelId;
pub use tensor::{DType, DeviceKey, DeviceTensor, Float, TensorMut, TensorRef, TensorView, TensorViewMut};

/// The cudarc version ntkv is built on, re-exported so that interop code (wrapping a stream,
/// allocating buffers, making views) uses exactly the same types.
pub use cudarc;

/// The README's examples compile as doc-tests, so the quick start stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
