//! Exact top-k selection and heavy-hitter eviction (H2O, SnapKV) on the GPU.
//!
//! # Top-k
//! [`topk`] (or a reusable [`TopkPlan`]) takes the largest `k` of every row of `scores [R, N]`
//! (`f32`, `f16` or `bf16`), optionally limited to `lengths[r] ≤ N` elements per row, and
//! returns `values [R, k]` (the scores' dtype) and `indices [R, k]` (`u32`):
//! - descending by value, ties by ascending index (the lower index wins);
//! - NaN ranks below every number, `-inf` included; `-0.0` and `+0.0` tie;
//! - when `k` exceeds a row's length, the extra slots hold index `u32::MAX` and value `-inf`;
//! - `1 ≤ k ≤ 16384` ([`MAX_K`]), `1 ≤ N ≤ 2^24` ([`MAX_N`]), any number of rows.
//!
//! The selected set and the output order are exact: the indices equal the CPU reference's
//! ([`cpu::topk`]) bit for bit, and so do the values. The top-k is the shared
//! [`crate::select`] primitive (a radix select; see there for the algorithm and for top-k
//! over ragged segments and the expansion of selected blocks into token lists).
//!
//! # H2O
//! - [`H2oPlan::accumulate`] (or [`h2o_accumulate`]): `acc[hkv, j] += reduce_group(Σ_i
//!   softmax_j(q_i · k_j / √D))` for a block of `Tq` new queries `q [Hq, Tq, D]` at global
//!   positions `T − Tq .. T` (causal: query `i` sees keys `j ≤ T − Tq + i`) over the keys
//!   `k [Hkv, T, D]`; `q` and `k` are `f16` or `bf16` (the same), `D ∈ {64, 128, 256}`,
//!   `acc [Hkv, T]` is `f32`. The scores `q · k` come from tensor cores in `f32`, the softmax
//!   is in `f32`; the result is within a relative `1e-4` (plus `1e-6` absolute) of the
//!   `f64` reference [`cpu::h2o_accumulate`], and the same bits on every run. Three launches
//!   (per-tile softmax statistics, a fixed-order merge, the probabilities); the `Tq × T`
//!   probabilities never reach memory, no block waits for another, and each `acc` element
//!   has one writer.
//! - [`H2oPlan::select`] (or [`h2o_select`]): the keep list `[Hkv, budget]`, ascending: the
//!   top-`(budget − recent)` of `acc` over the older tokens `0 .. T − recent` (ties by lower
//!   index, NaN lowest), then the last `recent` tokens. Exact.
//! - [`H2oPlan::compact`] (or [`h2o_compact`]): gathers `K`, `V` and `acc` rows by the keep
//!   list, in place (each head's kept rows move to its front); [`h2o_gather`] gathers them
//!   into packed `[Hkv, budget, D]` caches instead. Both check the keep list on the device
//!   first (strictly ascending rows, entries below `T`; the first bad entry is reported from
//!   a 64-bit flag) and write nothing when it is bad.
//!
//! # SnapKV
//! [`SnapKvPlan`], [`snapkv_scores`] and [`snapkv_select`]: the observation window's
//! attention votes for the older tokens, average-pooled (kernel 5, zero padding 2, padding
//! counted), then the top-`(capacity − W)` older tokens plus the window, ascending.
//!
//! # Plans
//! [`TopkPlan`], [`H2oPlan`] and [`SnapKvPlan`] validate a shape once, choose the kernel
//! layout, load the kernels, own the device scratch and store their device, so a decode loop
//! pays for none of that again; a run takes only tensors (any [`TensorRef`] / [`TensorMut`],
//! owned or borrowed views), checks each one's device, shape and length, and launches. The
//! free functions build a plan per call.
//!
//! # Errors
//! Every argument is checked before any launch (see the `validate_*` functions); a bad one
//! returns an error naming it and nothing is written. [`Error::DeviceMismatch`] for a tensor
//! of another device. No validator, reference or accessor panics on any argument.
//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::topk::{self, AttnShape, GqaReduce, H2oOptions, H2oPlan};
//! use ntkv::{Device, DeviceTensor};
//!
//! # fn main() -> ntkv::Result<()> {
//! let device = Device::new(0)?;
//! // Top-16 of each of 4 rows of 1000 scores.
//! let scores = DeviceTensor::from_host(&device, &vec![0.5f32; 4 * 1000], &[4, 1000])?;
//! let (values, indices) = topk::topk(&device, &scores, 16, None)?;
//! assert_eq!(indices.to_host()?[..3], [0, 1, 2]); // all tied: the lowest indices win
//! # let _ = values;
//!
//! // One H2O step: 16 new queries of 32 heads over an 8-kv-head cache of 4096 tokens.
//! let shape = AttnShape { hq: 32, hkv: 8, tq: 16, t: 4096, d: 128 };
//! let q = DeviceTensor::<f16>::zeros(&device, &[32, 16, 128])?;
//! let mut k = DeviceTensor::<f16>::zeros(&device, &[8, 4096, 128])?;
//! let mut v = DeviceTensor::<f16>::zeros(&device, &[8, 4096, 128])?;
//! let mut acc = DeviceTensor::<f32>::zeros(&device, &[8, 4096])?;
//! let options = H2oOptions { reduce: GqaReduce::Sum, budget: 1024, recent: 64 };
//! let mut plan = H2oPlan::new(&device, &shape, options)?;
//! let mut keep = DeviceTensor::<u32>::zeros(&device, &[8, 1024])?;
//! plan.accumulate(&q, &k, &mut acc)?;
//! plan.select(&acc, &mut keep)?;
//! plan.compact(&keep, &mut k, &mut v, Some(&mut acc))?;
//! # Ok(())
//! # }
//! ```

pub mod cpu;
pub(crate) mod gpu;

use crate::device::Device;
use crate::error::{check_shape, checked_mul, Error, Result};
use crate::tensor::{DeviceTensor, Float, TensorMut, TensorRef};

pub use crate::select::{
    validate_topk, TopkLayout, TopkOptions, TopkOrder, TopkPlan, TopkShape, MAX_K, MAX_N, TOPK_WORKSPACE_BYTES,
};

/// How the attention mass of a GQA group's query heads is reduced to their kv head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GqaReduce {
    /// Sum over the group's query heads.
    Sum,
    /// Maximum over the group's query heads.
    Max,
}

/// The shape of an attention-score accumulation: `q [hq, tq, d]` over `k [hkv, t, d]`.
///
/// The `tq` queries sit at global positions `t − tq .. t`; query `i` sees keys `j ≤ t − tq + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnShape {
    /// Query heads (a multiple of `hkv`).
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Queries per head (the H2O block of new queries, or the SnapKV window `W`).
    pub tq: usize,
    /// Keys per head (the cache length).
    pub t: usize,
    /// Head dimension.
    pub d: usize,
}

impl AttnShape {
    /// Reads the shape from `q [hq, tq, d]` and `k [hkv, t, d]`.
    ///
    /// # Errors
    /// [`Error::Shape`] when either is not 3-D or their `d` differ, then as [`Self::validate`].
    pub fn from_shapes(q: &[usize], k: &[usize]) -> Result<Self> {
        let &[hq, tq, d] = q else { return Err(Error::shape("q", &[0, 0, 0], q)) };
        let &[hkv, t, dk] = k else { return Err(Error::shape("k", &[0, 0, d], k)) };
        if dk != d {
            return Err(Error::shape("k", &[hkv, t, d], k));
        }
        let s = AttnShape { hq, hkv, tq, t, d };
        s.validate()?;
        Ok(s)
    }

    /// Checks the shape: every size positive, `hq % hkv == 0`, `tq ≤ t`, and every size fits
    /// the kernels' 32-bit indices.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `q` or `k`; [`Error::TooLarge`] for huge sizes.
    pub fn validate(&self) -> Result<()> {
        let AttnShape { hq, hkv, tq, t, d } = *self;
        if hq == 0 || tq == 0 || d == 0 {
            return Err(Error::invalid("q", format!("every dimension must be positive, got [{hq}, {tq}, {d}]")));
        }
        if hkv == 0 || t == 0 {
            return Err(Error::invalid("k", format!("every dimension must be positive, got [{hkv}, {t}, {d}]")));
        }
        if hq % hkv != 0 {
            return Err(Error::invalid("q", format!("{hq} query heads are not a multiple of {hkv} kv heads")));
        }
        if tq > t {
            return Err(Error::invalid(
                "q",
                format!("{tq} queries but only {t} keys (queries sit at the last positions)"),
            ));
        }
        if t > MAX_N {
            return Err(Error::too_large("k", format!("{t} keys; at most {MAX_N}")));
        }
        if hkv > 65535 || hq > (1 << 20) || tq > (1 << 20) || d > 4096 {
            return Err(Error::too_large("q", format!("shape {self:?} exceeds the kernels' limits")));
        }
        Ok(())
    }
}

/// Checks an eviction budget: `rows ≥ 1`, `1 ≤ t ≤ 2^24`, `recent ≤ budget ≤ t`, `budget ≥ 1`
/// and `budget − recent ≤ 16384`. `recent_name` is the argument's name (`recent` for H2O,
/// `window` for SnapKV).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `budget` (or `capacity`), `recent_name` or the cache.
pub fn validate_select(rows: usize, t: usize, budget: usize, recent: usize, recent_name: &'static str) -> Result<()> {
    let budget_name = if recent_name == "window" { "capacity" } else { "budget" };
    if rows == 0 || t == 0 {
        return Err(Error::invalid("acc", format!("shape [{rows}, {t}] is empty")));
    }
    if t > MAX_N {
        return Err(Error::too_large("acc", format!("{t} tokens; at most {MAX_N}")));
    }
    if recent > t {
        return Err(Error::invalid(recent_name, format!("{recent} exceeds the cache length {t}")));
    }
    if budget < recent {
        return Err(Error::invalid(budget_name, format!("{budget} is below {recent_name} = {recent}")));
    }
    if budget == 0 {
        return Err(Error::invalid(budget_name, "must keep at least one token"));
    }
    if budget > t {
        return Err(Error::invalid(budget_name, format!("{budget} exceeds the cache length {t}")));
    }
    if budget - recent > MAX_K {
        return Err(Error::invalid(
            budget_name,
            format!("{budget} − {recent_name} = {} selected tokens exceed the top-k maximum {MAX_K}", budget - recent),
        ));
    }
    Ok(())
}

/// Checks the buffers of a compaction and returns `budget` (keep entries per head):
/// `keep [hkv, budget]` with `budget ≤ t`, `k_cache` and `v_cache` `[hkv, t, d]`, `acc [hkv, t]`.
/// The keep entries themselves (below `t`, strictly ascending) are checked by the caller.
///
/// # Errors
/// [`Error::Shape`] or [`Error::InvalidArgument`] naming the buffer.
pub fn validate_compact(
    keep_len: usize,
    hkv: usize,
    t: usize,
    d: usize,
    k_len: usize,
    v_len: usize,
    acc_len: Option<usize>,
) -> Result<usize> {
    if hkv == 0 || t == 0 || d == 0 {
        return Err(Error::invalid("k_cache", format!("shape [{hkv}, {t}, {d}] is empty")));
    }
    if keep_len % hkv != 0 {
        return Err(Error::shape("keep", &[hkv, keep_len / hkv], &[keep_len]));
    }
    let budget = keep_len / hkv;
    if budget > t {
        return Err(Error::invalid("keep", format!("{budget} entries per head exceed the cache length {t}")));
    }
    let cache = checked_mul("k_cache", checked_mul("k_cache", hkv, t)?, d)?;
    if k_len != cache {
        return Err(Error::shape("k_cache", &[hkv, t, d], &[k_len]));
    }
    if v_len != cache {
        return Err(Error::shape("v_cache", &[hkv, t, d], &[v_len]));
    }
    if let Some(a) = acc_len {
        if a != hkv * t {
            return Err(Error::shape("acc", &[hkv, t], &[a]));
        }
    }
    Ok(budget)
}

/// Top-`k` of every row of `scores [R, N]` on the GPU; returns `(values [R, k], indices [R, k])`.
///
/// `lengths` (host, `[R]`, each `≤ N`) limits each row; it is validated on the host, which is
/// why it is a host slice. See the module docs for the order, ties, NaN and padding. This
/// builds a [`TopkPlan`] and the outputs; reuse a plan to avoid that.
///
/// # Errors
/// As [`validate_topk`]; [`Error::Shape`] when `scores` is not 2-D; [`Error::DeviceMismatch`]
/// when `scores` lives on another device; driver errors.
pub fn topk<T: Float>(
    device: &Device,
    scores: &impl TensorRef<T>,
    k: usize,
    lengths: Option<&[u32]>,
) -> Result<(DeviceTensor<T>, DeviceTensor<u32>)> {
    let &[rows, n] = scores.shape() else { return Err(Error::shape("scores", &[0, 0], scores.shape())) };
    validate_topk(rows, n, k, lengths)?;
    device.check_tensor("scores", scores)?;
    let mut plan = TopkPlan::new(device, &TopkShape { rows, n, k }, TopkOptions::default())?;
    let mut values = DeviceTensor::<T>::zeros(device, &[rows, k])?;
    let mut indices = DeviceTensor::<u32>::zeros(device, &[rows, k])?;
    plan.run(scores, lengths, &mut values, &mut indices)?;
    Ok((values, indices))
}

/// The buffers of an attention accumulation, checked against `s` and `device`.
fn check_attn_bufs<T: Float>(
    device: &Device,
    s: AttnShape,
    (q_name, q): (&'static str, &impl TensorRef<T>),
    k: &impl TensorRef<T>,
) -> Result<()> {
    device.check_buffer(q_name, q, &[s.hq, s.tq, s.d])?;
    device.check_buffer("k", k, &[s.hkv, s.t, s.d])?;
    gpu::check_attn_support(s, T::DTYPE)
}

/// H2O score accumulation on the GPU: `acc[hkv, j] += reduce(Σ_i softmax_j(q_i·k_j/√D))`.
///
/// - `q [Hq, Tq, D]`: the new queries of every query head, at positions `T − Tq .. T`.
/// - `k [Hkv, T, D]`: the key cache; same dtype as `q`, which must be `f16` or `bf16`.
/// - `acc [Hkv, T]` `f32`: the running heavy-hitter scores, updated in place.
/// - `D ∈ {64, 128, 256}`; `Hq % Hkv == 0`; `Tq ≤ T`.
///
/// See the module docs for the precision. This allocates the scratch; [`H2oPlan`] reuses it.
///
/// # Errors
/// As [`AttnShape::validate`]; [`Error::InvalidArgument`] naming `q` for an `f32` dtype or
/// another `D`; [`Error::Shape`] for `acc`; [`Error::DeviceMismatch`].
pub fn h2o_accumulate<T: Float>(
    device: &Device,
    q: &impl TensorRef<T>,
    k: &impl TensorRef<T>,
    acc: &mut impl TensorMut<f32>,
    reduce: GqaReduce,
) -> Result<()> {
    let shape = AttnShape::from_shapes(q.shape(), k.shape())?;
    check_attn_bufs(device, shape, ("q", q), k)?;
    device.check_buffer("acc", acc, &[shape.hkv, shape.t])?;
    let mut scratch = gpu::AttnScratch::new(device, shape)?;
    gpu::accumulate(device, &mut scratch, &q.cuda_view(), &k.cuda_view(), &mut acc.cuda_view_mut(), reduce, false)
}

/// H2O eviction list on the GPU: per kv head, the top-`(budget − recent)` of `acc [Hkv, T]`
/// over the older tokens `0 .. T − recent` (ties by lower index), ascending, followed by the
/// last `recent` tokens. Returns `keep [Hkv, budget]` (`u32`, each row strictly ascending).
///
/// # Errors
/// As [`validate_select`]; [`Error::Shape`] when `acc` is not 2-D; [`Error::DeviceMismatch`].
pub fn h2o_select(
    device: &Device,
    acc: &impl TensorRef<f32>,
    budget: usize,
    recent: usize,
) -> Result<DeviceTensor<u32>> {
    let &[hkv, t] = acc.shape() else { return Err(Error::shape("acc", &[0, 0], acc.shape())) };
    let mut plan = gpu::EvictionPlan::h2o(device, hkv, t, budget, recent)?;
    device.check_buffer("acc", acc, &plan.scores_shape())?;
    let mut keep = DeviceTensor::<u32>::zeros(device, &[hkv, budget])?;
    plan.run(Some(&acc.cuda_view()), &mut keep.cuda_view_mut())?;
    Ok(keep)
}

/// The options of an [`H2oPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct H2oOptions {
    /// How the group's query heads are reduced to their kv head.
    pub reduce: GqaReduce,
    /// Tokens kept per kv head (`recent ≤ budget ≤ T`, `budget − recent ≤ 16384`).
    pub budget: usize,
    /// The last tokens always kept.
    pub recent: usize,
}

/// A reusable H2O step for one shape: accumulation scratch plus the eviction selection.
#[derive(Debug)]
pub struct H2oPlan {
    device: Device,
    shape: AttnShape,
    options: H2oOptions,
    scratch: gpu::AttnScratch,
    evict: gpu::EvictionPlan,
}

impl H2oPlan {
    /// Validates `shape` (see [`h2o_accumulate`]) and the budget (see [`validate_select`]),
    /// loads the kernels and allocates the scratch of both steps.
    ///
    /// # Errors
    /// As [`AttnShape::validate`] and [`validate_select`]; driver errors.
    pub fn new(device: &Device, shape: &AttnShape, options: H2oOptions) -> Result<Self> {
        shape.validate()?;
        let evict = gpu::EvictionPlan::h2o(device, shape.hkv, shape.t, options.budget, options.recent)?;
        let scratch = gpu::AttnScratch::new(device, *shape)?;
        Ok(H2oPlan { device: device.clone(), shape: *shape, options, scratch, evict })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// The options this plan was built with.
    pub fn options(&self) -> H2oOptions {
        self.options
    }

    /// [`h2o_accumulate`] with this plan's scratch.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape or length; [`Error::DeviceMismatch`];
    /// as [`h2o_accumulate`].
    pub fn accumulate<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
        acc: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        let s = self.shape;
        check_attn_bufs(&self.device, s, ("q", q), k)?;
        self.device.check_buffer("acc", acc, &[s.hkv, s.t])?;
        let (qv, kv) = (q.cuda_view(), k.cuda_view());
        gpu::accumulate(&self.device, &mut self.scratch, &qv, &kv, &mut acc.cuda_view_mut(), self.options.reduce, false)
    }

    /// [`h2o_select`] of `acc [Hkv, T]` into `keep [Hkv, budget]`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `acc` or `keep`; [`Error::DeviceMismatch`].
    pub fn select(&mut self, acc: &impl TensorRef<f32>, keep: &mut impl TensorMut<u32>) -> Result<()> {
        self.device.check_buffer("acc", acc, &[self.shape.hkv, self.shape.t])?;
        self.device.check_buffer("keep", keep, &[self.shape.hkv, self.options.budget])?;
        self.evict.run(Some(&acc.cuda_view()), &mut keep.cuda_view_mut())
    }

    /// [`h2o_compact`] of this plan's caches (`[Hkv, T, D]`) by `keep [Hkv, budget]`.
    ///
    /// # Errors
    /// As [`h2o_compact`].
    pub fn compact<T: Float>(
        &mut self,
        keep: &impl TensorRef<u32>,
        k_cache: &mut impl TensorMut<T>,
        v_cache: &mut impl TensorMut<T>,
        acc: Option<&mut dyn TensorMut<f32>>,
    ) -> Result<()> {
        let s = self.shape;
        self.device.check_buffer("keep", keep, &[s.hkv, self.options.budget])?;
        self.device.check_buffer("k_cache", k_cache, &[s.hkv, s.t, s.d])?;
        h2o_compact(&self.device, keep, k_cache, v_cache, acc)
    }
}

/// Checks the caches and keep list of a compaction or gather and returns `(hkv, t, d,
/// budget)`.
fn check_compact_bufs<T: Float>(
    device: &Device,
    keep: &impl TensorRef<u32>,
    k_cache: &impl TensorRef<T>,
    v_cache: &impl TensorRef<T>,
    acc: Option<&dyn TensorRef<f32>>,
) -> Result<(usize, usize, usize, usize)> {
    let &[hkv, t, d] = k_cache.shape() else { return Err(Error::shape("k_cache", &[0, 0, 0], k_cache.shape())) };
    check_shape("v_cache", &[hkv, t, d], v_cache.shape())?;
    let budget = validate_compact(keep.len(), hkv, t, d, k_cache.len(), v_cache.len(), acc.map(|a| a.len()))?;
    device.check_buffer("keep", keep, &[hkv, budget])?;
    device.check_buffer("k_cache", k_cache, &[hkv, t, d])?;
    device.check_buffer("v_cache", v_cache, &[hkv, t, d])?;
    if let Some(a) = acc {
        device.check_buffer("acc", a, &[hkv, t])?;
    }
    Ok((hkv, t, d, budget))
}

/// In-place H2O compaction on the GPU: for every kv head `h` and `i < budget`, row `i` of
/// `k_cache`, `v_cache` (`[Hkv, T, D]`, any dtype, `D · size` a multiple of 4 bytes and at
/// most 32 KiB) and of `acc` (`[Hkv, T]`, optional) takes row `keep[h, i]`. The layout and
/// capacity stay `[Hkv, T, D]`: the kept tokens end up contiguous at the front of each head,
/// in order, and rows `budget .. T` keep their old contents.
///
/// `keep [Hkv, budget]` must hold strictly ascending entries below `T` in each row (what
/// [`h2o_select`] returns); this is checked on the device (one 8-byte read back, which
/// synchronizes) before anything is written.
///
/// # Errors
/// As [`validate_compact`]; [`Error::InvalidArgument`] naming `keep` for an unsorted or
/// out-of-range entry (the lowest one), or `k_cache` for an unsupported row size;
/// [`Error::DeviceMismatch`].
pub fn h2o_compact<T: Float>(
    device: &Device,
    keep: &impl TensorRef<u32>,
    k_cache: &mut impl TensorMut<T>,
    v_cache: &mut impl TensorMut<T>,
    acc: Option<&mut dyn TensorMut<f32>>,
) -> Result<()> {
    let dims = check_compact_bufs(device, keep, k_cache, v_cache, acc.as_deref().map(|a| a as &dyn TensorRef<f32>))?;
    let bufs = gpu::CompactBufs {
        keep: keep.cuda_view(),
        k_cache: k_cache.cuda_view_mut(),
        v_cache: v_cache.cuda_view_mut(),
        acc: acc.map(|a| a.cuda_view_mut()),
    };
    gpu::compact(device, bufs, dims)
}

/// Out-of-place H2O gather on the GPU into packed caches: `k_out[h, i] = k_cache[h, keep[h, i]]`
/// (likewise `v` and, when given, `acc`), with `k_cache`, `v_cache` `[Hkv, T, D]` (any dtype,
/// `D · size` a multiple of 4 bytes), `keep [Hkv, budget]`, `k_out`, `v_out`
/// `[Hkv, budget, D]`, and `acc` `[Hkv, T]` → `acc_out` `[Hkv, budget]`. Every output's shape
/// and length is checked. The keep list is checked on the device (strictly ascending rows,
/// entries below `T`) before anything is written. Use [`h2o_compact`] to compact in place.
///
/// # Errors
/// As [`h2o_compact`]; [`Error::Shape`] for outputs of the wrong shape or length.
pub fn h2o_gather<T: Float>(
    device: &Device,
    keep: &impl TensorRef<u32>,
    k_cache: &impl TensorRef<T>,
    v_cache: &impl TensorRef<T>,
    acc: Option<(&dyn TensorRef<f32>, &mut dyn TensorMut<f32>)>,
    k_out: &mut impl TensorMut<T>,
    v_out: &mut impl TensorMut<T>,
) -> Result<()> {
    let dims = check_compact_bufs(device, keep, k_cache, v_cache, acc.as_ref().map(|(a, _)| *a))?;
    let (hkv, _, d, budget) = dims;
    device.check_buffer("k_out", k_out, &[hkv, budget, d])?;
    device.check_buffer("v_out", v_out, &[hkv, budget, d])?;
    if let Some((_, o)) = acc.as_ref() {
        device.check_buffer("acc_out", &**o, &[hkv, budget])?;
    }
    let bufs = gpu::GatherBufs {
        keep: keep.cuda_view(),
        k_cache: k_cache.cuda_view(),
        v_cache: v_cache.cuda_view(),
        acc: acc.map(|(a, o)| (a.cuda_view(), o.cuda_view_mut())),
        k_out: k_out.cuda_view_mut(),
        v_out: v_out.cuda_view_mut(),
    };
    gpu::gather(device, bufs, dims)
}

/// The options of a [`SnapKvPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapKvOptions {
    /// Tokens kept per kv head, window included (`W ≤ capacity ≤ T`,
    /// `capacity − W ≤ 16384`).
    pub capacity: usize,
    /// How the group's query heads are reduced to their kv head.
    pub reduce: GqaReduce,
}

/// A reusable SnapKV selection for one shape (`q_window [Hq, W, D]` over `k [Hkv, T, D]`,
/// `f16` or `bf16`, `D ∈ {64, 128, 256}`; the [`AttnShape`]'s `tq` is the window `W`) and
/// capacity.
///
/// The votes `s_j = reduce(Σ_window softmax_j(q·k_j/√D))` (causal within the window) for the
/// older tokens `j < T − W` are average-pooled with kernel 5, stride 1, zero padding 2, padding
/// counted (always divided by 5); the keep list is the top-`(capacity − W)` older tokens by
/// pooled score (ties by lower index), ascending, then the window `T − W .. T`. The pooled
/// scores are within the accumulation's tolerance of the reference; the selection given the
/// same pooled scores is exact.
#[derive(Debug)]
pub struct SnapKvPlan {
    device: Device,
    shape: AttnShape,
    options: SnapKvOptions,
    scratch: gpu::AttnScratch,
    votes: DeviceTensor<f32>,
    pooled: Option<DeviceTensor<f32>>,
    evict: gpu::EvictionPlan,
}

impl SnapKvPlan {
    /// Validates the shape and capacity, loads the kernels and allocates the scratch.
    ///
    /// # Errors
    /// As [`AttnShape::validate`] and [`validate_select`] (naming `capacity` or `window`).
    pub fn new(device: &Device, shape: &AttnShape, options: SnapKvOptions) -> Result<Self> {
        shape.validate()?;
        let evict = gpu::EvictionPlan::snapkv(device, shape.hkv, shape.t, options.capacity, shape.tq)?;
        let older = shape.t - shape.tq;
        let pooled = if older > 0 { Some(DeviceTensor::<f32>::zeros(device, &[shape.hkv, older])?) } else { None };
        Ok(SnapKvPlan {
            device: device.clone(),
            shape: *shape,
            options,
            scratch: gpu::AttnScratch::new(device, *shape)?,
            votes: DeviceTensor::<f32>::zeros(device, &[shape.hkv, shape.t])?,
            pooled,
            evict,
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// Computes the pooled votes `[Hkv, T − W]` and returns them.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape or length; [`Error::DeviceMismatch`];
    /// [`Error::InvalidArgument`] naming `q_window` when `W = T` (no older tokens) or for an
    /// unsupported dtype or `D`.
    pub fn scores<T: Float>(
        &mut self,
        q_window: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
    ) -> Result<&DeviceTensor<f32>> {
        let s = self.shape;
        check_attn_bufs(&self.device, s, ("q_window", q_window), k)?;
        let Some(pooled) = self.pooled.as_mut() else {
            return Err(Error::invalid("q_window", format!("window {} leaves no older tokens of {}", s.tq, s.t)));
        };
        let (qv, kv) = (q_window.cuda_view(), k.cuda_view());
        // The accumulation overwrites the votes (no clearing launch needed).
        gpu::accumulate(
            &self.device,
            &mut self.scratch,
            &qv,
            &kv,
            &mut self.votes.cuda_view_mut(),
            self.options.reduce,
            true,
        )?;
        gpu::pool5(&self.device, &self.votes.cuda_view(), s.hkv, s.t, s.t - s.tq, &mut pooled.cuda_view_mut())?;
        Ok(pooled)
    }

    /// Writes the keep lists into `keep [Hkv, capacity]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape; as [`Self::scores`].
    pub fn select<T: Float>(
        &mut self,
        q_window: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
        keep: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        check_attn_bufs(&self.device, self.shape, ("q_window", q_window), k)?;
        self.device.check_buffer("keep", keep, &[self.shape.hkv, self.options.capacity])?;
        if self.options.capacity > self.shape.tq {
            self.scores(q_window, k)?;
            let pooled = self.pooled.as_ref().ok_or_else(|| Error::internal("selected tokens without older tokens"))?;
            self.evict.run(Some(&pooled.cuda_view()), &mut keep.cuda_view_mut())
        } else {
            // Only the window is kept: no scores needed.
            self.evict.run(None, &mut keep.cuda_view_mut())
        }
    }
}

/// SnapKV pooled votes on the GPU: `[Hkv, T − W]` `f32` (see [`SnapKvPlan`]).
///
/// # Errors
/// As [`h2o_accumulate`]; [`Error::InvalidArgument`] naming `q_window` when `W = T`.
pub fn snapkv_scores<T: Float>(
    device: &Device,
    q_window: &impl TensorRef<T>,
    k: &impl TensorRef<T>,
    reduce: GqaReduce,
) -> Result<DeviceTensor<f32>> {
    let shape = AttnShape::from_shapes(q_window.shape(), k.shape())?;
    gpu::check_attn_support(shape, T::DTYPE)?;
    if shape.tq >= shape.t {
        return Err(Error::invalid("q_window", format!("window {} leaves no older tokens of {}", shape.tq, shape.t)));
    }
    let mut plan = SnapKvPlan::new(device, &shape, SnapKvOptions { capacity: shape.tq, reduce })?;
    plan.scores(q_window, k)?;
    plan.pooled.ok_or_else(|| Error::internal("older tokens without pooled scores"))
}

/// SnapKV selection on the GPU: `keep [Hkv, capacity]`, ascending (see [`SnapKvPlan`]).
///
/// # Errors
/// As [`snapkv_scores`] and [`validate_select`] (naming `capacity` or `window`).
pub fn snapkv_select<T: Float>(
    device: &Device,
    q_window: &impl TensorRef<T>,
    k: &impl TensorRef<T>,
    capacity: usize,
    reduce: GqaReduce,
) -> Result<DeviceTensor<u32>> {
    let shape = AttnShape::from_shapes(q_window.shape(), k.shape())?;
    gpu::check_attn_support(shape, T::DTYPE)?;
    let mut plan = SnapKvPlan::new(device, &shape, SnapKvOptions { capacity, reduce })?;
    let mut keep = DeviceTensor::<u32>::zeros(device, &[shape.hkv, capacity])?;
    plan.select(q_window, k, &mut keep)?;
    Ok(keep)
}
