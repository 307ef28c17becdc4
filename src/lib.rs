//! # ntkv
//!
//! Hand-written CUDA kernels with safe, typed Rust APIs for two jobs that long-context LLM
//! serving and neural-network analysis keep re-implementing in Python.
//!
//! | module | what it computes |
//! |---|---|
//! | [`quant`] | group-wise asymmetric 2/4/8-bit quantization (KIVI per-token and per-channel) and the MiKV mixed-precision cache |
//! | [`topk`] | exact top-k over rows, H2O heavy-hitter accumulation and eviction, SnapKV selection |
//! | [`attention`] | block-sparse FA2-style prefill attention with BSR masks (FlexAttention `BlockMask`, Graph-KV) |
//! | [`decode`] | sparse-index decode attention over per-head token lists: the consumer of every selection method |
//! | [`qdecode`] | fused decode attention over quantized KV caches (KIVI layout, the MiKV mixed-precision cache), optionally over token lists |
//! | [`ntk`] | the empirical NTK from Jacobians, the factored MLP NTK, and kernel metrics (LGA, alignment, condition number, regression) |
//! | [`pages`] | Quest page min/max bounds and ShadowKV chunk landmarks: build, score, select pages or chunks and expand them to decode token lists |
//! | [`select`] | shared primitive: radix top-k over rows and ragged segments, and selected-block → CSR token-list expansion |
//! | [`cluster`] | k-means of keys per head (cosine or L2, deterministic, bit-exact labels) and cluster retrieval into decode-ready token lists |
//! | [`lowrank`] | ShadowKV low-rank keys: deterministic randomized SVD of the pre-RoPE keys and fused gather + GEMM + RoPE reconstruction of the selected ones |
//! | [`policy`] | WindowKV window selection with layer-group index sharing, LazyEviction's lagged recurrence-aware eviction, PrefixKV's per-layer budgets |
//! | [`gemm`] | shared primitive: deterministic split-K GEMM at F32, TF32 and BF16 with strided, batched, transposed operands |
//!
//! Every GPU operation has a CPU reference beside it (the `cpu` submodule of each family),
//! which the differential test suite compares against.
//!
//! ## Conventions shared by every family
//! - **Layouts**: row-major and contiguous, shapes written outermost first (`[H, T, D]`).
//!   `hq` query heads and `hkv` key/value heads with `hq % hkv == 0`; query head `h` reads
//!   kv head `h / (hq / hkv)`.
//! - **Dtypes**: storage `f16`, `bf16` or `f32` (the [`half`] types); arithmetic in `f32` on
//!   the GPU, `f64` in the CPU references, except where an operation is bit-exact
//!   (quantization codes, top-k indices), where both sides run the same `f32` operations in
//!   the same order.
//! - **Indices** are `u32`; every index list ntkv returns is sorted ascending unless the
//!   function says otherwise. **Ties** go to the lower index everywhere. **NaN** ranks below
//!   every number, `-inf` included; a NaN in a tensor to be quantized is an error.
//! - **Determinism**: the same inputs give the same output bits on the same GPU. No float
//!   atomics touch anything a user sees; every reduction has a fixed order.
//! - **Validation**: every shape, length, budget, index and device is checked before a
//!   launch. A bad one returns an [`Error`] naming the argument, and nothing is written.
//!   No argument makes a kernel read or write out of bounds, and no public function panics.
//!
//! The full statement, with the differential-test tolerances, is in `docs/conventions.md`
//! in the repository; each operation's own contract is in its rustdoc.
//!
//! ## The shape of a family
//! Every family is used the same way round (FlashInfer's plan/run split):
//! 1. describe the problem with a shape struct of named fields (`PrefillShape`,
//!    `DecodeShape`, `TopkShape`, `GramShape`, ...);
//! 2. `XPlan::new(&device, &shape, options)` validates it, chooses tiles and grids from the
//!    device's occupancy, loads the kernels and allocates the workspace, once;
//! 3. `plan.run(...)` only launches: no allocation, no host synchronization. A plan is reused
//!    across layers and decode steps.
//!
//! Inputs are any [`TensorRef`] and outputs any [`TensorMut`]: an owned [`DeviceTensor`], or a
//! [`TensorView`] / [`TensorViewMut`] over memory ntkv does not own (one layer of a larger KV
//! cache, a candle buffer), with no copy.
//!
//! ## Runtime model
//! - [`Device::new`] opens a GPU on a stream of its own. On a machine with no driver it
//!   returns [`Error::NoDriver`]; it never panics. [`Device::from_stream`] runs ntkv on a
//!   stream the caller already has (candle, burn, or plain cudarc); see [`device`] for the
//!   ordering contract.
//! - Kernels are compiled by `build.rs` into fatbins embedded in the library. A build
//!   without `nvcc` still works: the CPU references run, and GPU calls return
//!   [`Error::KernelsNotBuilt`]. Kernels are named by [`KernelId`] and loaded lazily, so a
//!   user of one family pays for no other.
//! - Results are ready when a host copy (for example [`DeviceTensor::to_host`]) or
//!   [`Device::synchronize`] returns.

#![warn(missing_docs)]

pub mod attention;
pub mod checks;
pub mod cluster;
pub mod decode;
pub mod device;
pub mod error;
pub mod gemm;
pub mod launch;
mod linalg;
pub mod lowrank;
pub mod ntk;
pub mod pages;
#[allow(missing_docs)]
pub mod params;
mod params_repr;
pub mod policy;
pub mod qdecode;
pub mod quant;
pub mod rng;
pub mod select;
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
