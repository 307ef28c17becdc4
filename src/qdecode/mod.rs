//! Fused decode attention over quantized KV caches: the KIVI layout (keys quantized per
//! channel, values per token, plus an f16 residual window) and the MiKV mixed-precision
//! cache ([`crate::quant::MikvCache`]: important rows in f16 or int8, the rest in int4 or
//! int2, and an f16 residual ring), read in one pass, with no dequantized copy in memory.
//!
//! # Layouts (row-major, outermost first)
//! - `q`, `o`: `[B, Tq, Hq, D]`, f16 or bf16 (`o` has `q`'s dtype); `lse`: `[B, Tq, Hq]` f32,
//!   the natural-log log-sum-exp of the scaled scores.
//! - The cache has `B·Hkv` heads (sequence `b`, kv head `h` is cache head `b·Hkv + h`), all
//!   holding the same number of tokens `T ≤ capacity`. Query head `h` reads kv head
//!   `h / (Hq/Hkv)` (GQA; any group).
//! - [`KiviCache`]: `k` and `v` are [`QuantizedTensor`]s of shape `[B, Hkv, Tq, D]` (or any
//!   shape whose leading dimensions flatten to `B·Hkv` heads) holding tokens `[0, Tq)`, any
//!   [`QuantSpec`] (2, 4 or 8 bits, groups of 32, 64 or 128; KIVI uses
//!   [`Axis::PerChannel`] keys and [`Axis::PerToken`] values); `k_residual` and
//!   `v_residual` are f16 `[B, Hkv, Rcap, D]` whose first `residual_len ≤ Rcap` rows hold
//!   tokens `[Tq, Tq + residual_len)`. `T = Tq + residual_len`.
//! - MiKV: one [`MikvCache`] for the keys and one for the values, with `B·Hkv` heads of
//!   dimension `D` and the same length `T`. Every token is read from where the cache's own
//!   `dequantize_dense` takes it: the residual ring for `t ≥ Tq`, else the important row
//!   (f16 or int8) if `t` is in the head's important list, else the low-precision codes.
//! - Optionally a sorted CSR index list per cache head ([`QdecodeLists`]), exactly the
//!   lists of [`crate::decode`]: attention then runs over the listed tokens only, so a
//!   selection (H2O, SnapKV, Quest, …) composes with quantization.
//!
//! # Math
//! Each stored value is dequantized as `x̂ = fma(code, scale, min)` in f32, the very
//! operation of [`crate::quant`]'s `dequantize` (f16 and int8 rows and the residual are
//! widened exactly). For query token `t`, head `h` of sequence `b` and the visible set
//! `S = {i ∈ list : !causal || i ≤ T − Tq + t}` (the list is every token `[0, T)` without
//! [`QdecodeLists`]): `o = Σ_{i∈S} softmax_i(scale · q·k̂_i) v̂_i`,
//! `lse = ln Σ_{i∈S} exp(scale · q·k̂_i)`, `scale = 1/√D` unless overridden. An empty
//! visible set gives `o = 0`, `lse = −inf`. Non-finite values follow [`crate::decode`]: a
//! NaN in `q` makes its row NaN (caches never hold non-finite values).
//!
//! # Precision
//! Scores, softmax and accumulation are f32. The reference ([`cpu::reference`]) is f64
//! attention over `dequantize_dense`'s f16 output; the kernel uses the f32 dequantized value
//! before that rounding, which costs far less than the output's own rounding. Against it the
//! GPU meets the crate's attention bounds: relative L2 error ≤ 5e-4 (f16 `o`), ≤ 4e-3
//! (bf16 `o`), `lse` within about 1e-4 relative.
//!
//! # Kernels, split and merge
//! Two attention kernels share the split and the merge; [`QdecodePlan::run`] picks one per
//! run ([`QdecodePlan::fast_path_applies`] says which).
//!
//! - **The fast kernel** takes every run without lists whose keys are [`Axis::PerChannel`]
//!   and values [`Axis::PerToken`] with the same bits and the same group (KIVI's layout, and
//!   a [`MikvCache`] pair configured alike, important rows and residual included). Bits and
//!   group are compile-time (one kernel per pair), so every index is a shift. One CTA of 256
//!   threads (8 warps) per (cache head, chunk, tile of up to 8 query rows); the warps of a
//!   row take turns over tiles of `8·32/bits` positions (8 key word rows). Per tile a warp
//!   scales its query by the tile's per-channel K scales (`a = q·s·2^bits`, and a per-group
//!   offset `Σ q·min − Σ a`), then reads K code words with 16-byte loads and forms
//!   `Σ_d a_d·f_d` per token, where `f = 1 + code·2^-bits` is built by placing the code in the
//!   mantissa of 1.0 (a shift and a mask: no integer-to-float conversion). Tokens read from
//!   rows (the residual and important tokens) get their score from a warp dot product over
//!   the f32 row values. An online softmax per tile follows; values are accumulated the same
//!   way (`Σ w·f` with `w = p·2^bits·scale`, minus `Σ w`, plus `Σ p·min`), important tokens'
//!   code weights set to zero and their rows added instead.
//! - **The general kernel** takes every other case (lists, mixed axes, bits or groups). One
//!   CTA of 128 threads per (cache head, chunk, tile of up to 8 query rows; a 1-row variant
//!   serves `Hq/Hkv · Tq = 1`). Each lane owns `D/32` channels; each warp walks its own runs
//!   of 8 consecutive positions and keeps its own online-softmax state. Per token a lane loads
//!   the one code word that holds its channels (a per-channel word of `32/bits` tokens is
//!   loaded once per word row, scales and mins once per group) and dequantizes it in
//!   registers with `fma(code, scale, min)`.
//!
//! In both, all the query rows of a kv head (up to 8 per CTA) share every loaded byte, and
//! nothing dequantized reaches memory. The fast kernel's sums over scaled unit codes are a
//! reassociation of the same products: each term carries the f32 rounding of a value at
//! most about 3 times the direct term (`f ∈ [1, 2)`). To share one shift between 2 (int4)
//! or 4 (int2) codes, a code may sit up to 4 or 6 bits below the top of the mantissa, and
//! the sum is rescaled by that power of two, so those sums keep 2^-18 to 2^-20 relative
//! precision instead of 2^-24. The CPU emulation of the kernel measured `lse` within 1e-5
//! of f64 attention over the same stored values (the general kernel: 5e-7), and the same
//! output error as the general kernel, which the output's own f16/bf16 rounding dominates;
//! both stay far inside the tolerances above. [`QdecodePlan::set_fast_path`]`(false)`
//! forces the general kernel.
//!
//! The CTA combines its warps in warp order; a cache longer than one chunk leaves one partial
//! state per chunk, and a merge kernel combines them in chunk order with the same exact
//! log-sum-exp merge as [`crate::decode`] (one device function, `ntkv_flashdecode.cuh`):
//! fixed order, no atomics, so the same inputs give the same bits (for a given kernel
//! choice). The split depends only on the plan (capacity, shape, SM count), never on `T`.
//!
//! # Plan, then run
//! [`QdecodePlan::new`] validates the shape and options, loads the kernels (both kernels,
//! every bit width and group), sizes the grid for `capacity` tokens and allocates the merge
//! workspace, once per cache shape. Each
//! [`QdecodePlan::run`] checks the cache against the plan (shape, specs, lengths, devices)
//! and only launches: no host synchronization, no allocation. The same plan serves every
//! step as a [`MikvCache`] grows by [`MikvCache::append`]; since appends produce exactly the
//! buffers a prefill of the same tokens produces, append → decode gives the same bits as
//! prefill → decode.
//!
//! # Example
//! ```no_run
//! # fn main() -> ntkv::Result<()> {
//! use half::f16;
//! use ntkv::qdecode::{QdecodeCache, QdecodeOptions, QdecodePlan, QdecodeShape};
//! use ntkv::quant::{Axis, HiPrecision, MikvCache, MikvConfig};
//! use ntkv::{Device, DeviceTensor};
//! let dev = Device::new(0)?;
//! let shape = QdecodeShape { batch: 1, q_tokens: 1, hq: 32, hkv: 8, head_dim: 128, capacity: 8192 };
//! let cfg = |axis| MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis, residual: 128, capacity: 8192 };
//! let kv = DeviceTensor::<f16>::zeros(&dev, &[8, 1000, 128])?;
//! let important: Vec<Vec<u32>> = (0..8).map(|_| vec![0, 5, 17]).collect();
//! let mut k = MikvCache::from_prefill(&dev, cfg(Axis::PerChannel), &kv, &important)?;
//! let mut v = MikvCache::from_prefill(&dev, cfg(Axis::PerToken), &kv, &important)?;
//! let mut plan = QdecodePlan::new(&dev, &shape, QdecodeOptions::default())?;
//! let q = DeviceTensor::<f16>::zeros(&dev, &shape.q_shape())?;
//! let mut o = DeviceTensor::<f16>::zeros(&dev, &shape.q_shape())?;
//! let mut lse = DeviceTensor::<f32>::zeros(&dev, &shape.lse_shape())?;
//! for _step in 0..4 {
//!     plan.run(&q, &QdecodeCache::Mikv { k: &k, v: &v }, None, &mut o, &mut lse)?;
//!     let token = DeviceTensor::<f16>::zeros(&dev, &[8, 128])?;
//!     k.append(&token)?;
//!     v.append(&token)?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Verification
//! `tests/qdecode_cpu.rs` checks the reference, `tests/qdecode_gpu.rs` the GPU against it
//! (KIVI and MiKV, every bit width, groups, GQA 1/3/8, lengths off the group, empty and full
//! residuals, all and no important tokens, lists, append against prefill bit for bit),
//! `tests/malformed_qdecode.rs` every validator. `tools/emu/run.sh qdecode` runs the kernel
//! source on the CPU against an f64 reference.

pub mod cpu;
pub(crate) mod gpu;

pub use gpu::{KiviCache, QdecodeCache, QdecodeLists, QdecodePlan};

use crate::decode::TILE_TOKENS;
pub use crate::decode::{DecodeOptions, DecodeShape};
#[allow(unused_imports)] // rustdoc links
use crate::quant::{Axis, MikvCache, QuantSpec, QuantizedTensor};

/// The sizes of a quantized decode: the sparse-index decode's shape, with the same fields,
/// limits and errors ([`DecodeShape::validate`]): `batch` sequences, `q_tokens` query tokens
/// per sequence (1 to 16), `hq` query heads over `hkv` kv heads (`hkv | hq`), `head_dim`
/// 64 or 128, and `capacity`, the most tokens `T` a cache may hold when run (it sizes the
/// split). The cache has [`DecodeShape::n_lists`] = `B·Hkv` heads.
pub type QdecodeShape = DecodeShape;

/// The options of a quantized decode: the sparse-index decode's ([`DecodeOptions`]):
/// `causal` (query `t` sees token `i` iff `i ≤ T − Tq + t`), `scale` (default `1/√D`, must be
/// finite) and `chunk_tokens` (positions per CTA, a positive multiple of
/// [`TILE_TOKENS`]; `None` lets the plan choose, [`plan_split`]).
pub type QdecodeOptions = DecodeOptions;

/// Query rows per CTA of the multi-row kernel (a kv head with more rows is split in tiles,
/// each of which reads the head's bytes).
pub const ROWS_PER_CTA: usize = 8;
/// Smallest automatic chunk.
pub const MIN_CHUNK_TOKENS: usize = 256;
/// Most chunks per cache head of an automatic split.
pub const MAX_CHUNKS: usize = 1024;

/// The split of a plan: positions per chunk and chunks per cache head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Positions per CTA.
    pub chunk_tokens: usize,
    /// Chunks of a full (`capacity`) head: the workspace stride.
    pub max_chunks: usize,
}

impl Split {
    /// One chunk: the attention kernel writes `o` and `lse` itself.
    pub fn direct(&self) -> bool {
        self.max_chunks == 1
    }
}

/// The split for `shape` on a GPU of `sm_count` SMs: chunks (a multiple of
/// [`TILE_TOKENS`]) sized so that the heads' chunks give about
/// eight CTAs per SM at `capacity` tokens, at least [`MIN_CHUNK_TOKENS`] long and at most
/// [`MAX_CHUNKS`] per head; `forced` is taken as is. Deterministic.
pub fn plan_split(shape: &QdecodeShape, sm_count: usize, forced: Option<usize>) -> Split {
    let cap = shape.capacity.max(1);
    let chunk_tokens = match forced {
        Some(c) => c.max(1),
        None => {
            let tiles = shape.n_lists().saturating_mul(shape.rows().div_ceil(ROWS_PER_CTA).max(1)).max(1);
            let want_chunks = sm_count.max(1).saturating_mul(8).div_ceil(tiles).max(1);
            let aim = cap.div_ceil(want_chunks).div_ceil(TILE_TOKENS).saturating_mul(TILE_TOKENS);
            let floor = cap.div_ceil(MAX_CHUNKS).div_ceil(TILE_TOKENS).saturating_mul(TILE_TOKENS);
            aim.max(MIN_CHUNK_TOKENS).max(floor)
        }
    };
    Split { chunk_tokens, max_chunks: cap.div_ceil(chunk_tokens).max(1) }
}
