//! Low-rank key reconstruction (ShadowKV): a deterministic randomized SVD of the pre-RoPE
//! keys, and a fused gather + small GEMM + RoPE that rebuilds only the selected keys.
//!
//! # Layouts (row-major, outermost first)
//! - Keys `k`: `[B, Tcap, N]` with `N = Hkv·D`, f16, bf16 or f32: sequence `b` holds
//!   `seq_lens[b] ≤ Tcap` valid tokens (rows past it are never read).
//! - Factors: `u [B, Tcap, r]` and `sv [B, r, N]`, the keys' storage dtype. `U` is shared by
//!   the `Hkv` heads; head `h` uses columns `h·D .. (h+1)·D` of `SV`. Rows of `u` past
//!   `seq_lens[b]` are written as zero.
//! - Positions: CSR lists over the `B·Hkv` lists, list `l = b·Hkv + h`: `indptr [B·Hkv + 1]`
//!   u32 with `indptr[0] = 0`, non-decreasing, `indptr[B·Hkv] ≤ indices.len()`;
//!   `indices[indptr[l]..indptr[l+1]]` strictly ascending (sorted, unique) and every entry
//!   `< seq_lens[b]`. This is the form every selection family produces.
//! - Reconstructed keys, two layouts ([`KeyLayout`]):
//!   - `Compact`: `[n, D]`, `n = indptr[B·Hkv]`; entry `j` of list `l` is row `indptr[l] + j`.
//!   - `Gathered { budget }`: the decode-ready cache `[B, Hkv, budget, D]`; entry `j` of list
//!     `l` is row `j` of head `h` of sequence `b`. Rows `j ≥` the list's length are not
//!     written. [`ReconstructPlan::gather_values`] gathers the value cache into the same
//!     layout, and [`ReconstructPlan::decode_indices`] gives the lists `0..len` that
//!     [`crate::decode`] reads both caches with.
//!
//! # Factorization (randomized subspace iteration, fixed seed)
//! For each sequence, `A = k[b, 0..seq_lens[b], :]` (`m × N`) is factored as
//! `A ≈ U·SV`, `SV = diag(s)·Vᵀ`, the rank-`r` truncated SVD:
//! 1. `Ω [N, ℓ]` is standard normal from [`crate::rng::Rng`] with [`FactorOptions::seed`],
//!    `ℓ = min(r + p, min_b seq_lens[b], N)` with `p` = [`FactorOptions::oversample`]
//!    (default 16); the same `Ω` serves every sequence.
//! 2. `Q = orth(A·Ω)`; then `q` = [`FactorOptions::power_iters`] times (default 3):
//!    `Q = orth(A·orth(Aᵀ·Q))`.
//! 3. `Bc = Qᵀ·A` (`ℓ × N`); the core SVD `Bc = W·Σ·Vᵀ` runs in f64 on the host from the
//!    eigen-decomposition of `Bc·Bcᵀ` (`ℓ × ℓ`: Householder tridiagonalization and implicit QL,
//!    cyclic Jacobi as the fallback); the columns of `W` are sorted
//!    by descending singular value (ties by index) and each is signed so that its entry of
//!    largest magnitude (the first, on ties) is positive.
//! 4. `U = Q·W[:, :r]`, `SV = W[:, :r]ᵀ·Bc`.
//!
//! `orth` is CholeskyQR2: `G = YᵀY`, `R = chol(G)`, `Y ← Y·R⁻¹`, twice. When the Gram is
//! ill-conditioned (not positive definite in f64, or `(max Rᵢᵢ / min Rᵢᵢ)² > `
//! [`MAX_GRAM_COND`]) that sequence falls back to a Householder QR in f64 on the host.
//! On the GPU every product is the shared split-K [`crate::gemm`] at
//! [`FactorOptions::precision`] (default `F32`), so the same input and seed give the same
//! bits run after run; the CPU reference ([`cpu::factorize`]) runs the same steps in f64 with
//! Householder QR.
//!
//! **Quality**: `‖A − U·SV‖_F` is within 1% of the optimal rank-`r` error
//! `(Σ_{i>r} σᵢ²)^{1/2}` of an exact SVD for the spectra the tests use (fast decay, slow
//! decay, key-like); `tests/lowrank_cpu.rs` checks it against [`cpu::optimal_error`].
//!
//! # Reconstruction (one fused kernel)
//! `K_sel[h, n, :] = RoPE(U[b, pos, :] · SV[b, :, h·D:(h+1)·D], pos)`, `pos` the `n`-th
//! position of list `(b, h)`. RoPE is rotate-half (NeoX / HF Llama): for `i < D/2`,
//! `x'ᵢ = xᵢ·cos(pos·θᵢ) − x_{i+D/2}·sin(pos·θᵢ)`, `x'_{i+D/2} = x_{i+D/2}·cos(pos·θᵢ) +
//! xᵢ·sin(pos·θᵢ)`, with `θᵢ = base^(−2i/D)` computed in f64 and rounded to f32
//! ([`cpu::rope_inv_freq`]) and the angle the f32 product `(f32)pos · θᵢ` (exact for any
//! position below 2^24). The gather, the dot products (f32 accumulation) and the rotation
//! happen in registers; the only store is the result in the cache dtype. `D ∈ {64, 128,
//! 256}`, `1 ≤ r ≤` [`MAX_RANK`].
//!
//! # Precision
//! Against the f64 reference ([`cpu::reconstruct`]) the output meets a relative L2 error
//! ≤ 4e-3 for bf16, ≤ 5e-4 for f16 and ≤ 1e-5 for f32 (sin and cos are within a few f32
//! ulps of the exact values of the f32 angle).
//!
//! # The ShadowKV step (no host synchronization between the launches)
//! At prefill: [`FactorPlan::run`] factors the pre-RoPE keys once. At each decode step, with
//! the positions already on the device (landmark chunks and outliers from a selection
//! family, expanded to sorted token lists):
//! 1. [`ReconstructPlan::new`] validates the lists (it reads them back once);
//! 2. [`ReconstructPlan::run`] with [`KeyLayout::Gathered`] writes the selected keys, post
//!    RoPE, into `k_sel [B, Hkv, budget, D]`;
//! 3. [`ReconstructPlan::gather_values`] writes `v_sel` in the same layout;
//! 4. [`crate::decode::DecodePlan`] over `k_sel`, `v_sel` with the plan's `indptr` and
//!    [`ReconstructPlan::decode_indices`] (capacity `budget`, `cache_lens = budget`).
//!
//! Steps 2–4 only enqueue launches. [`cpu::shadowkv_step`] is the reference of the whole
//! step; `examples/shadowkv.rs` runs it.
//!
//! # Errors
//! Every shape, length, rank, budget and list entry is checked before a launch; a bad one is
//! an [`Error`] naming the argument, and nothing is written.

pub mod cpu;
pub(crate) mod gpu;

pub use gpu::{FactorPlan, ReconstructPlan};

use crate::error::{Error, Result};
use crate::gemm::Precision;
use crate::tensor::checked_numel;

/// The head dimensions the reconstruction kernel is built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// The largest rank.
pub const MAX_RANK: usize = 1024;
/// The largest Gram condition estimate `(max Rᵢᵢ / min Rᵢᵢ)²` CholeskyQR2 accepts in f32;
/// beyond it the orthonormalization falls back to Householder QR.
pub const MAX_GRAM_COND: f64 = 1e5;
/// Positions must stay below this, so that `(f32)pos` is exact.
pub const MAX_POSITION: usize = 1 << 24;

/// The sizes of a factorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FactorShape {
    /// `B`, sequences (at least 1).
    pub batch: usize,
    /// `Tcap`, rows of `k` and `u` per sequence (at least 1).
    pub capacity: usize,
    /// `Hkv`, kv heads (at least 1).
    pub kv_heads: usize,
    /// `D`, head dimension (at least 1).
    pub head_dim: usize,
    /// `r`, the rank: `1 ≤ r ≤ min(seq_lens[b], Hkv·D)` for every sequence, `≤ MAX_RANK`.
    pub rank: usize,
}

impl FactorShape {
    /// `N = Hkv·D` (saturating).
    pub fn cols(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim)
    }
    /// `[B, Tcap, N]`.
    pub fn k_shape(&self) -> [usize; 3] {
        [self.batch, self.capacity, self.cols()]
    }
    /// `[B, Tcap, r]`.
    pub fn u_shape(&self) -> [usize; 3] {
        [self.batch, self.capacity, self.rank]
    }
    /// `[B, r, N]`.
    pub fn sv_shape(&self) -> [usize; 3] {
        [self.batch, self.rank, self.cols()]
    }

    /// Checks the shape on its own: positive counts, `r ≤ min(Tcap, N)`, `r ≤ MAX_RANK`,
    /// sizes that fit (the f32 working copy of `k` included), and `Tcap, N < 2^31`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `batch`, `capacity`, `kv_heads`, `head_dim` or
    /// `rank`; [`Error::TooLarge`] naming `capacity` or `k`.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [
            ("batch", self.batch),
            ("capacity", self.capacity),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("rank", self.rank),
        ] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if self.capacity >= 1 << 31 || self.cols() >= 1 << 31 {
            return Err(Error::too_large("capacity", "rows and columns must stay below 2^31"));
        }
        checked_numel::<f32>("k", &self.k_shape())?;
        let limit = self.capacity.min(self.cols());
        if self.rank > limit || self.rank > MAX_RANK {
            return Err(Error::invalid(
                "rank",
                format!(
                    "rank {} exceeds min(capacity {}, Hkv·D {}) or {MAX_RANK}",
                    self.rank,
                    self.capacity,
                    self.cols()
                ),
            ));
        }
        Ok(())
    }

    /// Checks `seq_lens` (`[B]`, each in `1..=Tcap` and at least the rank) after the shape.
    ///
    /// # Errors
    /// As [`FactorShape::validate`]; [`Error::Shape`] naming `seq_lens`;
    /// [`Error::InvalidArgument`] naming `seq_lens` (zero or above `Tcap`) or `rank`
    /// (`r > seq_lens[b]`: the rank exceeds `min(T, Hkv·D)` of that sequence).
    pub fn validate_seq_lens(&self, seq_lens: &[u32]) -> Result<()> {
        self.validate()?;
        check_seq_lens(seq_lens, self.batch, 1, self.capacity, |b, len| {
            if self.rank > len {
                return Err(Error::invalid(
                    "rank",
                    format!("rank {} exceeds min(T = {len}, Hkv·D = {}) of sequence {b}", self.rank, self.cols()),
                ));
            }
            Ok(())
        })
    }
}

/// The knobs of the randomized SVD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FactorOptions {
    /// `p`, extra sketch columns beyond the rank (default 16).
    pub oversample: usize,
    /// `q`, power iterations (default 3), at most 16. `torch.svd_lowrank(niter=2)`'s `q = 2`
    /// with `p = 10` is about 1.7x cheaper, and is within 1% of optimal on fast-decaying
    /// spectra, but not on a key-like spectrum at `r = 160` of `N = 512` (2% above optimal,
    /// against 0.8% with the defaults).
    pub power_iters: usize,
    /// Seed of the Gaussian sketch (default `0x5EED`).
    pub seed: u64,
    /// Precision of every GPU product (default [`Precision::F32`]; `Tf32` is faster and
    /// meets the quality bar unless the rank-`r` tail is below about 1e-3 of `‖A‖_F`).
    pub precision: Precision,
}

impl Default for FactorOptions {
    fn default() -> Self {
        FactorOptions { oversample: 16, power_iters: 3, seed: 0x5EED, precision: Precision::F32 }
    }
}

impl FactorOptions {
    /// `ℓ = min(r + p, min seq_lens, N)`, the sketch width.
    pub fn sketch_cols(&self, shape: &FactorShape, seq_lens: &[u32]) -> usize {
        let min_len = seq_lens.iter().map(|&l| l as usize).min().unwrap_or(shape.capacity);
        shape.rank.saturating_add(self.oversample).min(min_len).min(shape.cols())
    }

    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `oversample` (above 1024) or `power_iters` (above 16).
    pub fn validate(&self) -> Result<()> {
        if self.oversample > 1024 {
            return Err(Error::invalid("oversample", format!("{} exceeds 1024", self.oversample)));
        }
        if self.power_iters > 16 {
            return Err(Error::invalid("power_iters", format!("{} exceeds 16", self.power_iters)));
        }
        Ok(())
    }
}

/// Where reconstructed keys go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLayout {
    /// `[n, D]` rows in CSR order, `n = indptr[B·Hkv]`.
    Compact,
    /// The decode-ready cache `[B, Hkv, budget, D]`; `budget` must cover the longest list.
    Gathered {
        /// Rows per kv head, at least the longest list and at least 1.
        budget: usize,
    },
}

/// The sizes of a reconstruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconstructShape {
    /// `B`, sequences.
    pub batch: usize,
    /// `Tcap`, rows of `u` per sequence.
    pub capacity: usize,
    /// `Hkv`, kv heads.
    pub kv_heads: usize,
    /// `D ∈ {64, 128, 256}`.
    pub head_dim: usize,
    /// `r`, `1..=MAX_RANK`.
    pub rank: usize,
}

impl ReconstructShape {
    /// `[B, Tcap, r]`.
    pub fn u_shape(&self) -> [usize; 3] {
        [self.batch, self.capacity, self.rank]
    }
    /// `[B, r, Hkv·D]`.
    pub fn sv_shape(&self) -> [usize; 3] {
        [self.batch, self.rank, self.kv_heads.saturating_mul(self.head_dim)]
    }
    /// `[B, Hkv, Tcap, D]`: the value cache [`ReconstructPlan::gather_values`] reads.
    pub fn v_shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.capacity, self.head_dim]
    }
    /// `[B, Hkv, budget, D]`.
    pub fn gathered_shape(&self, budget: usize) -> [usize; 4] {
        [self.batch, self.kv_heads, budget, self.head_dim]
    }
    /// `B·Hkv` (saturating).
    pub fn n_lists(&self) -> usize {
        self.batch.saturating_mul(self.kv_heads)
    }

    /// Checks the shape: positive counts, `D ∈ {64, 128, 256}`, `r ≤ MAX_RANK`,
    /// `Tcap ≤ 2^24` (positions stay exact in f32), `B·Hkv ≤ 2^31`, buffer sizes that fit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `batch`, `capacity`, `kv_heads`, `head_dim` or
    /// `rank`; [`Error::TooLarge`] naming `capacity`, `kv_heads`, `u` or `v`.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in
            [("batch", self.batch), ("capacity", self.capacity), ("kv_heads", self.kv_heads), ("rank", self.rank)]
        {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::invalid("head_dim", format!("{}; 64, 128 and 256 are supported", self.head_dim)));
        }
        if self.rank > MAX_RANK {
            return Err(Error::invalid("rank", format!("rank {} exceeds {MAX_RANK}", self.rank)));
        }
        if self.capacity > MAX_POSITION {
            return Err(Error::too_large("capacity", "positions must stay below 2^24 (exact in f32)"));
        }
        crate::error::to_i32("kv_heads", self.n_lists())?;
        checked_numel::<f32>("u", &self.u_shape())?;
        checked_numel::<f32>("sv", &self.sv_shape())?;
        checked_numel::<f32>("v", &self.v_shape())?;
        Ok(())
    }

    /// The decode shape the lists are checked with: one list per `(b, h)` and
    /// `cache_lens = seq_lens`.
    fn list_shape(&self) -> crate::decode::DecodeShape {
        crate::decode::DecodeShape {
            batch: self.batch,
            q_tokens: 1,
            hq: self.kv_heads,
            hkv: self.kv_heads,
            head_dim: crate::decode::HEAD_DIMS[0],
            capacity: self.capacity,
        }
    }

    /// Checks `seq_lens` (`[B]`, each `≤ Tcap`) and host-resident lists completely: `indptr`
    /// as described in the module docs, every entry strictly ascending within its list and
    /// below `seq_lens[b]`. The first bad entry in flat order is reported.
    ///
    /// # Errors
    /// As [`ReconstructShape::validate`]; [`Error::Shape`] naming `seq_lens` or `indptr`;
    /// [`Error::InvalidArgument`] naming `indptr` or `indices` (with the list, entry, value
    /// and fault: out of range (worded against `cache_lens[b]`, the decode family's name for
    /// `seq_lens[b]`), duplicate, or below the previous entry).
    pub fn validate_lists(&self, seq_lens: &[u32], indptr: &[u32], indices: &[u32]) -> Result<()> {
        self.validate()?;
        check_seq_lens(seq_lens, self.batch, 0, self.capacity, |_, _| Ok(()))?;
        crate::decode::validate_lists(&self.list_shape(), seq_lens, indptr, indices)
    }
}

/// Checks that `seq_lens` has `batch` entries, each in `min..=capacity`, and runs `also` on
/// each `(b, seq_lens[b])` in order once its range is checked (so the first fault in batch
/// order is the one reported).
fn check_seq_lens(
    seq_lens: &[u32],
    batch: usize,
    min: usize,
    capacity: usize,
    mut also: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    if seq_lens.len() != batch {
        return Err(Error::shape("seq_lens", &[batch], &[seq_lens.len()]));
    }
    for (b, &len) in seq_lens.iter().enumerate() {
        let len = len as usize;
        if !(min..=capacity).contains(&len) {
            return Err(Error::invalid("seq_lens", format!("seq_lens[{b}] = {len} is not in {min}..={capacity}")));
        }
        also(b, len)?;
    }
    Ok(())
}

/// The options of a reconstruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeOptions {
    /// RoPE base (default 10000); finite and above 1.
    pub base: f32,
}

impl Default for RopeOptions {
    fn default() -> Self {
        RopeOptions { base: 10000.0 }
    }
}

impl RopeOptions {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `base` when it is not finite or not above 1.
    pub fn validate(&self) -> Result<()> {
        if !(self.base.is_finite() && self.base > 1.0) {
            return Err(Error::invalid("base", format!("{} is not a finite base above 1", self.base)));
        }
        Ok(())
    }
}

/// Validates the shape and then the options of a reconstruction, and returns the RoPE
/// frequency table `θᵢ` of [`cpu::rope_inv_freq`] (`D/2` entries) both paths use.
///
/// # Errors
/// As [`ReconstructShape::validate`], then as [`RopeOptions::validate`].
pub(crate) fn rope_table(shape: &ReconstructShape, options: &RopeOptions) -> Result<Vec<f32>> {
    shape.validate()?;
    options.validate()?;
    Ok(cpu::rope_inv_freq(shape.head_dim, options.base))
}

/// Checks a layout against the lists: a gathered `budget` must be at least 1 and cover the
/// longest list, and `B·Hkv·budget·D` must fit.
///
/// # Errors
/// [`Error::InvalidArgument`] or [`Error::TooLarge`] naming `budget`.
pub fn validate_layout(shape: &ReconstructShape, layout: KeyLayout, indptr: &[u32]) -> Result<()> {
    if let KeyLayout::Gathered { budget } = layout {
        let longest = indptr.windows(2).map(|w| w[1].saturating_sub(w[0]) as usize).max().unwrap_or(0);
        if budget == 0 || budget < longest {
            return Err(Error::invalid(
                "budget",
                format!("budget {budget} is below the longest list ({longest}) or zero"),
            ));
        }
        if budget > u32::MAX as usize {
            return Err(Error::too_large("budget", "budget must fit u32"));
        }
        checked_numel::<f32>("budget", &shape.gathered_shape(budget))?;
    }
    Ok(())
}
