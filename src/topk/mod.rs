//! Exact top-k selection and heavy-hitter eviction (H2O, SnapKV) on the GPU (SPEC §2).
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
//! The GPU path is a radix select on the 32-bit order-preserving key (a 12-bit histogram
//! pass over the row, then 8-bit passes over the few candidates left in the threshold bucket,
//! on the composite `key · 2^24 + (2^24 − 1 − index)` so that ties resolve by index), followed by
//! a bitonic sort of the `k` selected elements in shared memory. No row is ever sorted whole.
//! With at least one row per SM, one block per row does the whole selection in one launch;
//! with fewer, longer rows, many blocks share each row's histogram and filter passes and a
//! third launch finishes each row ([`TopkLayout::choose`]). The selected set and the
//! output order are exact: the indices equal the CPU reference's ([`cpu::topk`]) bit for bit.
//!
//! # H2O
//! - [`h2o_accumulate`]: `acc[hkv, j] += reduce_group(Σ_i softmax_j(q_i · k_j / √D))` for a
//!   block of `Tq` new queries `q [Hq, Tq, D]` at global positions `T − Tq .. T` (causal) over
//!   the keys `k [Hkv, T, D]`; `q` and `k` are `f16` or `bf16` (the same), `D ∈ {64, 128, 256}`,
//!   `acc [Hkv, T]` is `f32`. Two passes with tensor-core MMAs; the `Tq × T` probabilities
//!   never reach memory, and each `acc` element has one writer (deterministic).
//! - [`h2o_select`]: the keep list `[Hkv, budget]`, ascending: the top-`(budget − recent)` of
//!   `acc` over the older tokens `0 .. T − recent`, then the last `recent` tokens.
//! - [`h2o_compact`]: gathers `K`, `V` and `acc` rows by the keep list, in place (each head's
//!   kept rows move to its front); [`h2o_gather`] gathers them into packed `[Hkv, budget, D]`
//!   caches instead.
//!
//! # SnapKV
//! [`snapkv_scores`] and [`snapkv_select`]: the observation window's attention votes for the
//! older tokens, average-pooled (kernel 5, zero padding 2, padding counted), then the
//! top-`(capacity − W)` older tokens plus the window, ascending.
//!
//! # Plans
//! [`TopkPlan`], [`H2oPlan`], [`SnapKvPlan`] and [`EvictionPlan`] validate a shape once,
//! choose the kernel layout and own the device scratch, so a decode loop pays for neither
//! again; the free functions build a plan per call.
//!
//! # Errors
//! Every argument is checked before any launch (see the `validate_*` functions); a bad one
//! returns an error naming it and nothing is written.
//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::topk::{self, AttnShape, GqaReduce, H2oPlan};
//! use ntkv::{Device, DeviceTensor};
//!
//! # fn main() -> ntkv::Result<()> {
//! let dev = Device::new(0)?;
//! // Top-16 of each of 4 rows of 1000 scores.
//! let scores = DeviceTensor::from_host(&dev, &vec![0.5f32; 4 * 1000], &[4, 1000])?;
//! let (values, indices) = topk::topk(&dev, &scores, 16, None)?;
//! assert_eq!(indices.to_host()?[..3], [0, 1, 2]); // all tied: the lowest indices win
//! # let _ = values;
//!
//! // One H2O step: 16 new queries of 32 heads over an 8-kv-head cache of 4096 tokens.
//! let shape = AttnShape { hq: 32, hkv: 8, tq: 16, t: 4096, d: 128 };
//! let q = DeviceTensor::<f16>::zeros(&dev, &[32, 16, 128])?;
//! let mut k = DeviceTensor::<f16>::zeros(&dev, &[8, 4096, 128])?;
//! let mut v = DeviceTensor::<f16>::zeros(&dev, &[8, 4096, 128])?;
//! let mut acc = DeviceTensor::<f32>::zeros(&dev, &[8, 4096])?;
//! let mut plan = H2oPlan::new(&dev, shape, GqaReduce::Sum, 1024, 64)?;
//! let mut keep = DeviceTensor::<u32>::zeros(&dev, &[8, 1024])?;
//! plan.accumulate(&dev, &q, &k, &mut acc)?;
//! plan.select(&dev, &acc, &mut keep)?;
//! topk::h2o_compact(&dev, &keep, &mut k, &mut v, Some(&mut acc))?;
//! # Ok(())
//! # }
//! ```

pub mod cpu;
pub(crate) mod gpu;

use crate::device::Device;
use crate::error::{check_shape, Error, Result};
use crate::tensor::{DeviceTensor, Float};

pub use gpu::{AttnScratch, EvictionPlan, TopkPlan};

/// [`h2o_accumulate`] with a caller's [`AttnScratch`] (which also selects the kernel path).
///
/// # Errors
/// [`Error::Shape`] for tensors that do not match the scratch's shape; as [`h2o_accumulate`].
pub fn h2o_accumulate_with<T: Float>(
    device: &Device,
    scratch: &mut AttnScratch,
    q: &DeviceTensor<T>,
    k: &DeviceTensor<T>,
    acc: &mut DeviceTensor<f32>,
    reduce: GqaReduce,
) -> Result<()> {
    let s = scratch.shape();
    check_shape("q", &[s.hq, s.tq, s.d], q.shape())?;
    check_shape("k", &[s.hkv, s.t, s.d], k.shape())?;
    check_shape("acc", &[s.hkv, s.t], acc.shape())?;
    gpu::check_attn_support(s, T::DTYPE)?;
    gpu::accumulate(device, scratch, q.slice(), k.slice(), acc.slice_mut(), reduce, false)
}

/// The largest `k` the top-k accepts.
pub const MAX_K: usize = 16384;
/// The longest row the top-k accepts (indices use 24 bits inside the kernels).
pub const MAX_N: usize = 1 << 24;
/// The most scratch memory a [`TopkPlan`] allocates; larger problems run in row batches.
pub const TOPK_WORKSPACE_BYTES: usize = 256 << 20;

/// How the attention mass of a GQA group's query heads is reduced to their kv head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GqaReduce {
    /// Sum over the group's query heads.
    Sum,
    /// Maximum over the group's query heads.
    Max,
}

/// Which kernels run the H2O / SnapKV accumulation. Both compute the same f32 operations in
/// the same order, so they give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccumulatePath {
    /// One launch (the default): work items are ordered so that pass 2 of a kv head follows
    /// pass 1 closely and re-reads its keys from L2, not DRAM. A kv head's pass-2 blocks wait
    /// (spin) for its statistics, which only earlier-started blocks produce.
    Queued,
    /// Three launches: pass 1 over all heads, the statistics merge, pass 2 over all heads.
    /// Simpler, with no inter-block waiting; reads the keys from DRAM twice for long caches.
    ThreeLaunch,
}

/// The order of the queued accumulation's segments for `hkv` kv heads: entry `h` is pass 1 of
/// head `h`, entry `h | 1 << 31` its pass 2; pass 2 of head `h` comes after pass 1 of head
/// `h + lag` (or of the last head). Every pass 1 precedes its own pass 2.
pub fn queue_order(hkv: usize, lag: usize) -> Vec<u32> {
    let mut order = Vec::with_capacity(2 * hkv);
    for s in 0..hkv + lag {
        if s < hkv {
            order.push(s as u32);
        }
        if s >= lag && s - lag < hkv {
            order.push((s - lag) as u32 | 1 << 31);
        }
    }
    order
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

/// Checks top-k arguments: `rows ≥ 1`, `1 ≤ n ≤ 2^24`, `1 ≤ k ≤ 16384`, and `lengths`, when
/// given, holds `rows` values each `≤ n`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `scores`, `k` or `lengths`; [`Error::Shape`] for
/// `lengths` of the wrong length; [`Error::TooLarge`] for `n > 2^24`.
pub fn validate_topk(rows: usize, n: usize, k: usize, lengths: Option<&[u32]>) -> Result<()> {
    if rows == 0 || n == 0 {
        return Err(Error::invalid("scores", format!("shape [{rows}, {n}] is empty")));
    }
    if n > MAX_N {
        return Err(Error::too_large("scores", format!("rows of {n} elements; at most {MAX_N}")));
    }
    if k == 0 {
        return Err(Error::invalid("k", "k must be at least 1"));
    }
    if k > MAX_K {
        return Err(Error::invalid("k", format!("k = {k} exceeds the maximum {MAX_K}")));
    }
    if let Some(l) = lengths {
        if l.len() != rows {
            return Err(Error::shape("lengths", &[rows], &[l.len()]));
        }
        if let Some((r, &v)) = l.iter().enumerate().find(|&(_, &v)| v as usize > n) {
            return Err(Error::invalid("lengths", format!("lengths[{r}] = {v} exceeds the row length {n}")));
        }
    }
    Ok(())
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
    if k_len != hkv * t * d {
        return Err(Error::shape("k_cache", &[hkv, t, d], &[k_len]));
    }
    if v_len != hkv * t * d {
        return Err(Error::shape("v_cache", &[hkv, t, d], &[v_len]));
    }
    if let Some(a) = acc_len {
        if a != hkv * t {
            return Err(Error::shape("acc", &[hkv, t], &[a]));
        }
    }
    Ok(budget)
}

/// How the GPU top-k splits its work; chosen once per shape by [`TopkLayout::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopkLayout {
    /// Blocks that share one row in the histogram and filter passes. 1 selects the fused
    /// path: one block per row does the whole selection in a single launch.
    pub blocks_per_row: usize,
    /// Elements of a row per block (a multiple of 2048).
    pub chunk: usize,
    /// Rows per launch batch (bounded by [`TOPK_WORKSPACE_BYTES`] and the grid's y limit).
    pub rows_per_batch: usize,
    /// The shared-memory sort size: the power of two `≥ k`.
    pub kpad: usize,
}

impl TopkLayout {
    /// Chooses the split for `rows × n`, top-`k`, on a device with `sm_count` SMs. With at
    /// least one row per SM (or rows of at most 4096), each row gets one block that does
    /// everything in one launch. Otherwise rows are split so that about four blocks per SM
    /// share the histogram and filter passes (never fewer than 4096 elements a block), and a
    /// third launch finishes each row.
    pub fn choose(rows: usize, n: usize, k: usize, sm_count: usize) -> Self {
        let kpad = k.max(1).next_power_of_two();
        let per_row_bytes = (n + k + 4096 + 8) * 4;
        let rows_per_batch = (TOPK_WORKSPACE_BYTES / per_row_bytes).clamp(1, rows.clamp(1, 65535));
        let target_blocks = 4 * sm_count.max(1);
        let max_bpr = n.div_ceil(4096).max(1);
        // With at least one row per SM, one (fused) block per row fills the device.
        let bpr = if rows_per_batch >= sm_count.max(1) {
            1
        } else {
            target_blocks.div_ceil(rows_per_batch).clamp(1, max_bpr)
        };
        let chunk = n.div_ceil(bpr).div_ceil(2048).max(1) * 2048;
        let blocks_per_row = n.div_ceil(chunk).max(1);
        TopkLayout { blocks_per_row, chunk, rows_per_batch, kpad }
    }

    /// Bytes of device scratch the layout needs for rows of `n` and top-`k`.
    pub fn workspace_bytes(&self, n: usize, k: usize) -> usize {
        self.rows_per_batch * (n + k + 4096 + 8) * 4
    }
}

/// Top-`k` of every row of `scores [R, N]` on the GPU; returns `(values [R, k], indices [R, k])`.
///
/// `lengths` (host, `[R]`, each `≤ N`) limits each row; it is validated on the host, which is
/// why it is a host slice. See the module docs for the order, ties and NaN. This allocates a
/// [`TopkPlan`] and the outputs; reuse a plan to avoid that.
///
/// # Errors
/// As [`validate_topk`]; [`Error::Shape`] when `scores` is not 2-D; driver errors.
pub fn topk<T: Float>(
    device: &Device,
    scores: &DeviceTensor<T>,
    k: usize,
    lengths: Option<&[u32]>,
) -> Result<(DeviceTensor<T>, DeviceTensor<u32>)> {
    let &[rows, n] = scores.shape() else { return Err(Error::shape("scores", &[0, 0], scores.shape())) };
    validate_topk(rows, n, k, lengths)?;
    let mut plan = TopkPlan::new(device, rows, n, k)?;
    let mut values = DeviceTensor::<T>::zeros(device, &[rows, k])?;
    let mut indices = DeviceTensor::<u32>::zeros(device, &[rows, k])?;
    plan.run(device, scores, lengths, &mut values, &mut indices)?;
    Ok((values, indices))
}

/// H2O score accumulation on the GPU: `acc[hkv, j] += reduce(Σ_i softmax_j(q_i·k_j/√D))`.
///
/// - `q [Hq, Tq, D]`: the new queries of every query head, at positions `T − Tq .. T`.
/// - `k [Hkv, T, D]`: the key cache; same dtype as `q`, which must be `f16` or `bf16`.
/// - `acc [Hkv, T]` `f32`: the running heavy-hitter scores, updated in place.
/// - `D ∈ {64, 128, 256}`; `Hq % Hkv == 0`; `Tq ≤ T`.
///
/// Scores are computed in `f32` from the 16-bit inputs (tensor cores), the softmax in `f32`.
/// This allocates an [`AttnScratch`]; [`H2oPlan`] reuses one.
///
/// # Errors
/// As [`AttnShape::validate`]; [`Error::InvalidArgument`] for an `f32` dtype or another `D`;
/// [`Error::Shape`] for `acc`.
pub fn h2o_accumulate<T: Float>(
    device: &Device,
    q: &DeviceTensor<T>,
    k: &DeviceTensor<T>,
    acc: &mut DeviceTensor<f32>,
    reduce: GqaReduce,
) -> Result<()> {
    let shape = AttnShape::from_shapes(q.shape(), k.shape())?;
    check_shape("acc", &[shape.hkv, shape.t], acc.shape())?;
    gpu::check_attn_support(shape, T::DTYPE)?;
    let mut scratch = AttnScratch::new(device, shape)?;
    gpu::accumulate(device, &mut scratch, q.slice(), k.slice(), acc.slice_mut(), reduce, false)
}

/// H2O eviction list on the GPU: per kv head, the top-`(budget − recent)` of `acc [Hkv, T]`
/// over the older tokens `0 .. T − recent` (ties by lower index), ascending, followed by the
/// last `recent` tokens. Returns `keep [Hkv, budget]` (`u32`, each row strictly ascending).
///
/// # Errors
/// As [`validate_select`]; [`Error::Shape`] when `acc` is not 2-D.
pub fn h2o_select(device: &Device, acc: &DeviceTensor<f32>, budget: usize, recent: usize) -> Result<DeviceTensor<u32>> {
    let &[hkv, t] = acc.shape() else { return Err(Error::shape("acc", &[0, 0], acc.shape())) };
    let mut plan = EvictionPlan::h2o(device, hkv, t, budget, recent)?;
    let mut keep = DeviceTensor::<u32>::zeros(device, &[hkv, budget])?;
    plan.select(device, acc, &mut keep)?;
    Ok(keep)
}

/// A reusable H2O step for one shape: accumulation scratch plus the eviction selection.
#[derive(Debug)]
pub struct H2oPlan {
    shape: AttnShape,
    reduce: GqaReduce,
    scratch: AttnScratch,
    evict: EvictionPlan,
}

impl H2oPlan {
    /// Validates `shape` (see [`h2o_accumulate`]) and the budget (see [`validate_select`]),
    /// and allocates the scratch of both steps.
    ///
    /// # Errors
    /// As [`AttnShape::validate`] and [`validate_select`]; driver errors.
    pub fn new(device: &Device, shape: AttnShape, reduce: GqaReduce, budget: usize, recent: usize) -> Result<Self> {
        shape.validate()?;
        let evict = EvictionPlan::h2o(device, shape.hkv, shape.t, budget, recent)?;
        Ok(H2oPlan { shape, reduce, scratch: AttnScratch::new(device, shape)?, evict })
    }

    /// [`h2o_accumulate`] with this plan's scratch.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape; as [`h2o_accumulate`].
    pub fn accumulate<T: Float>(
        &mut self,
        device: &Device,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        acc: &mut DeviceTensor<f32>,
    ) -> Result<()> {
        let s = self.shape;
        check_shape("q", &[s.hq, s.tq, s.d], q.shape())?;
        check_shape("k", &[s.hkv, s.t, s.d], k.shape())?;
        check_shape("acc", &[s.hkv, s.t], acc.shape())?;
        gpu::check_attn_support(s, T::DTYPE)?;
        gpu::accumulate(device, &mut self.scratch, q.slice(), k.slice(), acc.slice_mut(), self.reduce, false)
    }

    /// [`h2o_select`] into `keep [Hkv, budget]`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `acc` or `keep`.
    pub fn select(&mut self, device: &Device, acc: &DeviceTensor<f32>, keep: &mut DeviceTensor<u32>) -> Result<()> {
        self.evict.select(device, acc, keep)
    }
}

/// In-place H2O compaction on the GPU: for every kv head `h` and `i < budget`, row `i` of
/// `k_cache`, `v_cache` (`[Hkv, T, D]`, any dtype, `D · size` a multiple of 4 bytes and at
/// most 32 KiB) and of `acc` (`[Hkv, T]`, optional) takes row `keep[h, i]`. The layout and
/// capacity stay `[Hkv, T, D]`: the kept tokens end up contiguous at the front of each head,
/// in order, and rows `budget .. T` keep their old contents.
///
/// `keep [Hkv, budget]` must hold strictly ascending entries below `T` in each row (what
/// [`h2o_select`] returns); this is checked on the device (one 4-byte read back, which
/// synchronizes) before anything is written.
///
/// # Errors
/// As [`validate_compact`]; [`Error::InvalidArgument`] naming `keep` for an unsorted or
/// out-of-range entry, or `k_cache` for an unsupported row size.
pub fn h2o_compact<T: Float>(
    device: &Device,
    keep: &DeviceTensor<u32>,
    k_cache: &mut DeviceTensor<T>,
    v_cache: &mut DeviceTensor<T>,
    acc: Option<&mut DeviceTensor<f32>>,
) -> Result<()> {
    let &[hkv, t, d] = k_cache.shape() else { return Err(Error::shape("k_cache", &[0, 0, 0], k_cache.shape())) };
    check_shape("v_cache", &[hkv, t, d], v_cache.shape())?;
    let budget = validate_compact(keep.len(), hkv, t, d, k_cache.len(), v_cache.len(), acc.as_ref().map(|a| a.len()))?;
    check_shape("keep", &[hkv, budget], keep.shape())?;
    if let Some(a) = acc.as_ref() {
        check_shape("acc", &[hkv, t], a.shape())?;
    }
    gpu::compact(device, keep, k_cache, v_cache, acc, hkv, t, d, budget)
}

/// Out-of-place H2O gather on the GPU into packed caches: `k_out[h, i] = k_cache[h, keep[h, i]]`
/// (likewise `v` and, when given, `acc`), with `k_cache`, `v_cache` `[Hkv, T, D]` (any dtype,
/// `D · size` a multiple of 4 bytes), `keep [Hkv, budget]`, `k_out`, `v_out`
/// `[Hkv, budget, D]`, and `acc` `[Hkv, T]` → `acc_out` `[Hkv, budget]`. The keep list is
/// checked on the device (strictly ascending rows, entries below `T`) before anything is
/// written. Use [`h2o_compact`] to compact in place instead.
///
/// # Errors
/// As [`h2o_compact`]; [`Error::Shape`] for outputs of the wrong shape.
pub fn h2o_gather<T: Float>(
    device: &Device,
    keep: &DeviceTensor<u32>,
    k_cache: &DeviceTensor<T>,
    v_cache: &DeviceTensor<T>,
    acc: Option<(&DeviceTensor<f32>, &mut DeviceTensor<f32>)>,
    k_out: &mut DeviceTensor<T>,
    v_out: &mut DeviceTensor<T>,
) -> Result<()> {
    let &[hkv, t, d] = k_cache.shape() else { return Err(Error::shape("k_cache", &[0, 0, 0], k_cache.shape())) };
    check_shape("v_cache", &[hkv, t, d], v_cache.shape())?;
    let acc_len = acc.as_ref().map(|(a, _)| a.len());
    let budget = validate_compact(keep.len(), hkv, t, d, k_cache.len(), v_cache.len(), acc_len)?;
    check_shape("keep", &[hkv, budget], keep.shape())?;
    check_shape("k_out", &[hkv, budget, d], k_out.shape())?;
    check_shape("v_out", &[hkv, budget, d], v_out.shape())?;
    if let Some((a, o)) = acc.as_ref() {
        check_shape("acc", &[hkv, t], a.shape())?;
        check_shape("acc_out", &[hkv, budget], o.shape())?;
    }
    gpu::gather(device, keep, k_cache, v_cache, acc, k_out, v_out, (hkv, t, d, budget))
}

/// A reusable SnapKV selection for one shape (`q_window [Hq, W, D]` over `k [Hkv, T, D]`,
/// `f16` or `bf16`, `D ∈ {64, 128, 256}`) and capacity.
///
/// The votes `s_j = reduce(Σ_window softmax_j(q·k_j/√D))` (causal within the window) for the
/// older tokens `j < T − W` are average-pooled with kernel 5, stride 1, zero padding 2, padding
/// counted; the keep list is the top-`(capacity − W)` older tokens by pooled score (ties by
/// lower index), ascending, then the window `T − W .. T`.
#[derive(Debug)]
pub struct SnapKvPlan {
    shape: AttnShape,
    reduce: GqaReduce,
    capacity: usize,
    scratch: AttnScratch,
    votes: DeviceTensor<f32>,
    pooled: Option<DeviceTensor<f32>>,
    evict: EvictionPlan,
}

impl SnapKvPlan {
    /// Validates the shape and capacity and allocates the scratch.
    ///
    /// # Errors
    /// As [`AttnShape::validate`] and [`validate_select`] (naming `capacity` or `window`).
    pub fn new(device: &Device, shape: AttnShape, capacity: usize, reduce: GqaReduce) -> Result<Self> {
        shape.validate()?;
        let evict = EvictionPlan::snapkv(device, shape.hkv, shape.t, capacity, shape.tq)?;
        let older = shape.t - shape.tq;
        let pooled = if older > 0 { Some(DeviceTensor::<f32>::zeros(device, &[shape.hkv, older])?) } else { None };
        Ok(SnapKvPlan {
            shape,
            reduce,
            capacity,
            scratch: AttnScratch::new(device, shape)?,
            votes: DeviceTensor::<f32>::zeros(device, &[shape.hkv, shape.t])?,
            pooled,
            evict,
        })
    }

    fn check<T: Float>(&self, q_window: &DeviceTensor<T>, k: &DeviceTensor<T>) -> Result<()> {
        let s = self.shape;
        check_shape("q_window", &[s.hq, s.tq, s.d], q_window.shape())?;
        check_shape("k", &[s.hkv, s.t, s.d], k.shape())?;
        gpu::check_attn_support(s, T::DTYPE)
    }

    /// Computes the pooled votes `[Hkv, T − W]` and returns them.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape; [`Error::InvalidArgument`] naming
    /// `q_window` when `W = T` (no older tokens) or for an unsupported dtype or `D`.
    pub fn scores<T: Float>(
        &mut self,
        device: &Device,
        q_window: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
    ) -> Result<&DeviceTensor<f32>> {
        self.check(q_window, k)?;
        let s = self.shape;
        let Some(pooled) = self.pooled.as_mut() else {
            return Err(Error::invalid("q_window", format!("window {} leaves no older tokens of {}", s.tq, s.t)));
        };
        // The accumulation overwrites the votes (no clearing launch needed).
        gpu::accumulate(
            device,
            &mut self.scratch,
            q_window.slice(),
            k.slice(),
            self.votes.slice_mut(),
            self.reduce,
            true,
        )?;
        gpu::pool5(device, self.votes.slice(), s.hkv, s.t, s.t - s.tq, pooled.slice_mut())?;
        Ok(pooled)
    }

    /// Writes the keep lists into `keep [Hkv, capacity]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for tensors of another shape; as [`Self::scores`].
    pub fn select<T: Float>(
        &mut self,
        device: &Device,
        q_window: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        keep: &mut DeviceTensor<u32>,
    ) -> Result<()> {
        self.check(q_window, k)?;
        check_shape("keep", &[self.shape.hkv, self.capacity], keep.shape())?;
        if self.capacity > self.shape.tq {
            self.scores(device, q_window, k)?;
            let pooled = self.pooled.as_ref().ok_or_else(|| Error::invalid("q_window", "no older tokens"))?;
            self.evict.run(device, pooled.slice(), keep.slice_mut())
        } else {
            // Only the window is kept: no scores needed.
            let empty = DeviceTensor::<f32>::zeros(device, &[1])?;
            self.evict.run(device, empty.slice(), keep.slice_mut())
        }
    }
}

/// SnapKV pooled votes on the GPU: `[Hkv, T − W]` `f32` (see [`SnapKvPlan`]).
///
/// # Errors
/// As [`h2o_accumulate`]; [`Error::InvalidArgument`] naming `q_window` when `W = T`.
pub fn snapkv_scores<T: Float>(
    device: &Device,
    q_window: &DeviceTensor<T>,
    k: &DeviceTensor<T>,
    reduce: GqaReduce,
) -> Result<DeviceTensor<f32>> {
    let shape = AttnShape::from_shapes(q_window.shape(), k.shape())?;
    gpu::check_attn_support(shape, T::DTYPE)?;
    if shape.tq >= shape.t {
        return Err(Error::invalid("q_window", format!("window {} leaves no older tokens of {}", shape.tq, shape.t)));
    }
    let mut plan = SnapKvPlan::new(device, shape, shape.tq, reduce)?;
    plan.scores(device, q_window, k)?;
    plan.pooled.ok_or_else(|| Error::invalid("q_window", "no older tokens"))
}

/// SnapKV selection on the GPU: `keep [Hkv, capacity]`, ascending (see [`SnapKvPlan`]).
///
/// # Errors
/// As [`snapkv_scores`] and [`validate_select`] (naming `capacity` or `window`).
pub fn snapkv_select<T: Float>(
    device: &Device,
    q_window: &DeviceTensor<T>,
    k: &DeviceTensor<T>,
    capacity: usize,
    reduce: GqaReduce,
) -> Result<DeviceTensor<u32>> {
    let shape = AttnShape::from_shapes(q_window.shape(), k.shape())?;
    gpu::check_attn_support(shape, T::DTYPE)?;
    let mut plan = SnapKvPlan::new(device, shape, capacity, reduce)?;
    let mut keep = DeviceTensor::<u32>::zeros(device, &[shape.hkv, capacity])?;
    plan.select(device, q_window, k, &mut keep)?;
    Ok(keep)
}
