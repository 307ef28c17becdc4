//! Launch code for the H2O / SnapKV kernels of `cuda/topk.cu` (the top-k itself is
//! [`crate::select`]'s). Every public entry point validated its arguments before calling in
//! here; the functions below still check what their launches rely on.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::{AttnShape, GqaReduce};
use crate::device::{Device, Module};
use crate::error::{to_u32, Error, Result};
use crate::launch::{grid_2d, grid_for, grid_stride_kernel, KernelId};
use crate::params::{NtkvCompactParams, NtkvFillRecentParams, NtkvH2oParams, NtkvKeepCheckParams, NtkvPoolParams};
use crate::select::gpu::{check_aligned, TopkOutput};
use crate::select::{TopkOptions, TopkOrder, TopkPlan, TopkShape};
use crate::tensor::{DType, Float};

const KEY_TILE: usize = 64;
const H2O_THREADS: u32 = 128;
const GRID_STRIDE_THREADS: u32 = 256;
/// u32 words of one staged chunk per tensor in the compaction kernel.
const COMPACT_STAGE_WORDS: usize = 8192;
/// The head dims the accumulation kernels are compiled for.
const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// The dtypes the accumulation kernels are compiled for (tensor cores: 16-bit only).
const ATTN_DTYPES: [DType; 2] = [DType::F16, DType::BF16];
/// The untyped kernels of the H2O / SnapKV section.
const PLAIN_OPS: [&str; 6] =
    ["topk_fill_recent", "h2o_merge", "snapkv_pool", "h2o_check_keep", "h2o_compact", "h2o_gather"];

fn plain_id(op: &'static str) -> KernelId {
    debug_assert!(PLAIN_OPS.contains(&op));
    KernelId::new(Module::Topk, op)
}

/// The pass-1 and pass-2 accumulation kernels of a dtype and head dim.
fn pass_ids(dtype: DType, d: usize) -> Result<[KernelId; 2]> {
    let d = to_u32("q", d)?;
    Ok(["h2o_pass1", "h2o_pass2"].map(|op| KernelId::new(Module::Topk, op).dtype(dtype).head_dim(d)))
}

/// Writes the tail of `tail` alone, for a selection of no token: the indices `tail_first ..`
/// into the last `tail_count` of the `out_stride` columns of each of the `rows` rows of `keep`
/// (what the top-k's last kernel writes after the selected indices when there are some).
pub(super) fn fill_recent(
    device: &Device,
    rows: usize,
    tail: &TopkOutput,
    keep: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    let (count, first) = (tail.tail_count, tail.tail_first);
    let fits = count <= tail.out_stride && keep.len() >= rows * tail.out_stride && first + count <= u32::MAX as usize;
    if !fits {
        return Err(Error::internal("the recent window does not fit the keep list"));
    }
    if count == 0 {
        return Ok(());
    }
    let params = NtkvFillRecentParams {
        rows: to_u32("rows", rows)?,
        out_stride: to_u32("budget", tail.out_stride)?,
        col_start: to_u32("budget", tail.out_stride - count)?,
        count: to_u32("recent", count)?,
        first_index: to_u32("recent", first)?,
        _pad0: 0,
    };
    let (f, cfg) = grid_stride_kernel(device, plain_id("topk_fill_recent"), GRID_STRIDE_THREADS, rows * count)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(keep);
    // SAFETY: ntkv_topk_fill_recent(NtkvFillRecentParams, u32* out) writes
    // out[r * out_stride + col_start + i] for r < rows, i < count (grid-stride); col_start +
    // count <= out_stride and out holds rows * out_stride entries (checked above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// A validated eviction selection: keep lists `[rows, budget]` from scores `[rows, stride]`,
/// the top-`(budget − recent)` of the first `older` columns of each row (ties by lower index),
/// ascending, then `older .. older + recent`. Holds the top-k plan it runs.
#[derive(Debug)]
pub(crate) struct EvictionPlan {
    device: Device,
    rows: usize,
    stride: usize,
    older: usize,
    budget: usize,
    recent: usize,
    topk: Option<TopkPlan>,
}

impl EvictionPlan {
    /// The H2O selection over `acc [hkv, t]`: older tokens `0 .. t − recent`.
    pub(crate) fn h2o(device: &Device, hkv: usize, t: usize, budget: usize, recent: usize) -> Result<Self> {
        super::validate_select(hkv, t, budget, recent, "recent")?;
        Self::new(device, hkv, t, t - recent, budget, recent)
    }

    /// The SnapKV selection over pooled scores `[hkv, t − window]` (every column is older).
    pub(crate) fn snapkv(device: &Device, hkv: usize, t: usize, capacity: usize, window: usize) -> Result<Self> {
        super::validate_select(hkv, t, capacity, window, "window")?;
        Self::new(device, hkv, (t - window).max(1), t - window, capacity, window)
    }

    fn new(device: &Device, rows: usize, stride: usize, older: usize, budget: usize, recent: usize) -> Result<Self> {
        let k_sel = budget - recent;
        let topk = if k_sel > 0 {
            let shape = TopkShape { rows, n: stride, k: k_sel };
            Some(TopkPlan::new(device, &shape, TopkOptions { order: TopkOrder::Index })?)
        } else {
            None
        };
        Ok(EvictionPlan { device: device.clone(), rows, stride, older, budget, recent, topk })
    }

    /// The scores shape this plan reads: `[rows, stride]`.
    pub(crate) fn scores_shape(&self) -> [usize; 2] {
        [self.rows, self.stride]
    }

    /// Writes the keep lists of `scores` (`[rows, stride]`; unread when nothing is selected)
    /// into `keep` (`[rows, budget]`).
    pub(crate) fn run(&mut self, scores: Option<&CudaView<'_, f32>>, keep: &mut CudaViewMut<'_, u32>) -> Result<()> {
        if keep.len() != self.rows * self.budget {
            return Err(Error::internal("the keep buffer does not match the eviction plan"));
        }
        // The selected indices, then the recent window `older .. older + recent`.
        let out = TopkOutput {
            uniform_len: self.older,
            has_lengths: false,
            out_stride: self.budget,
            tail_count: self.recent,
            tail_first: self.older,
        };
        match (self.topk.as_mut(), scores) {
            (Some(plan), Some(scores)) => plan.launch::<f32>(scores, out, None, keep),
            (None, _) => fill_recent(&self.device, self.rows, &out, keep),
            (Some(_), None) => Err(Error::internal("an eviction with selected tokens needs scores")),
        }
    }
}

/// Whether the accumulation kernels support this shape and dtype.
pub(crate) fn check_attn_support(shape: AttnShape, dtype: DType) -> Result<()> {
    if !ATTN_DTYPES.contains(&dtype) {
        return Err(Error::invalid("q", "f32 queries and keys are not supported; use f16 or bf16 (tensor cores)"));
    }
    if !HEAD_DIMS.contains(&shape.d) {
        return Err(Error::invalid("q", format!("head dimension {} is not supported; use 64, 128 or 256", shape.d)));
    }
    Ok(())
}

/// Device scratch of the accumulation for one [`AttnShape`]: the per-tile softmax partials
/// and the merged row statistics, both rewritten by every call (nothing is cleared).
pub(crate) struct AttnScratch {
    shape: AttnShape,
    partial: CudaSlice<f32>,
    stats: CudaSlice<f32>,
    merge: CudaFunction,
}

impl std::fmt::Debug for AttnScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnScratch").field("shape", &self.shape).finish()
    }
}

impl AttnScratch {
    /// Allocates the scratch for `shape` (about `8 · hq · tq · (⌈t/64⌉ + 1)` bytes).
    pub(crate) fn new(device: &Device, shape: AttnShape) -> Result<Self> {
        shape.validate()?;
        let n_tiles = shape.t.div_ceil(KEY_TILE);
        let rows = shape.hq * shape.tq;
        let stream = device.stream();
        Ok(AttnScratch {
            shape,
            partial: stream.alloc_zeros::<f32>(crate::tensor::checked_numel::<f32>("q", &[rows, n_tiles, 2])?)?,
            stats: stream.alloc_zeros::<f32>(rows * 2)?,
            merge: device.kernel(plain_id("h2o_merge"))?,
        })
    }
}

/// Enqueues the accumulation into `acc [hkv, t]`: pass 1 over all heads, the fixed-order
/// statistics merge, pass 2 over all heads. Three launches, and no block ever waits for
/// another.
pub(crate) fn accumulate<T: Float>(
    device: &Device,
    scratch: &mut AttnScratch,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    acc: &mut CudaViewMut<'_, f32>,
    reduce: GqaReduce,
    overwrite: bool,
) -> Result<()> {
    let shape = scratch.shape;
    check_attn_support(shape, T::DTYPE)?;
    let AttnShape { hq, hkv, tq, t, d } = shape;
    if q.len() != hq * tq * d || k.len() != hkv * t * d || acc.len() != hkv * t {
        return Err(Error::internal("accumulation buffers do not match the attention shape"));
    }
    // The kernels load pairs of 16-bit elements as 4-byte words.
    check_aligned(device, "q", q, 4)?;
    check_aligned(device, "k", k, 4)?;
    let [pass1, pass2] = pass_ids(T::DTYPE, d)?;
    let n_tiles = t.div_ceil(KEY_TILE);
    let params = NtkvH2oParams {
        hq: to_u32("q", hq)?,
        hkv: to_u32("k", hkv)?,
        tq: to_u32("q", tq)?,
        t: to_u32("k", t)?,
        d: to_u32("q", d)?,
        n_tiles: to_u32("k", n_tiles)?,
        reduce_max: u32::from(reduce == GqaReduce::Max),
        scale: (d as f32).sqrt().recip(),
        overwrite: u32::from(overwrite),
        _pad0: 0,
    };
    let stream = device.stream();
    let (partial, stats) = (&mut scratch.partial, &mut scratch.stats);
    let tiles = grid_2d(n_tiles, hkv, H2O_THREADS, 0)?;

    let f1 = device.kernel(pass1)?;
    let mut b = stream.launch_builder(&f1);
    b.arg(&params).arg(q).arg(k).arg(&mut *partial);
    // SAFETY: ntkv_h2o_pass1_<T>_d<D>(NtkvH2oParams, const T* q, const T* k, float* partial).
    // Block (tile, hk) reads q rows (h, r) for h < hq, r < tq and k rows (hk, j) for j < t (all
    // other rows are masked to zero without a load), D elements each: within hq*tq*d and
    // hkv*t*d. It writes partial[((h * tq + r) * n_tiles + tile) * 2 + {0,1}] for r < tq,
    // inside the scratch's hq*tq*n_tiles*2.
    unsafe { b.launch(tiles) }?;

    let merge = grid_for(device, &scratch.merge, 256, 0, (hq * tq).div_ceil(8), false)?;
    let mut b = stream.launch_builder(&scratch.merge);
    b.arg(&params).arg(&*partial).arg(&mut *stats);
    // SAFETY: ntkv_h2o_merge(NtkvH2oParams, const float* partial, float* stats): warp `row`
    // (< hq*tq, checked in the kernel) reads partial[(row * n_tiles + t) * 2 + {0,1}] for
    // t < n_tiles and writes stats[row * 2 + {0,1}], inside both scratch buffers.
    unsafe { b.launch(merge) }?;

    let f2 = device.kernel(pass2)?;
    let mut b = stream.launch_builder(&f2);
    b.arg(&params).arg(q).arg(k).arg(&*stats).arg(acc);
    // SAFETY: ntkv_h2o_pass2_<T>_d<D>(NtkvH2oParams, const T* q, const T* k, const float*
    // stats, float* acc). Reads q and k as pass 1 and stats[(h * tq + r) * 2 + {0,1}] for
    // r < tq; writes acc[hk * t + j] for j < t only, each element from exactly one thread.
    unsafe { b.launch(tiles) }?;
    Ok(())
}

/// Pools SnapKV votes `[rows, stride]` (first `n_out` columns) into `pooled [rows, n_out]`.
pub(super) fn pool5(
    device: &Device,
    votes: &CudaView<'_, f32>,
    rows: usize,
    stride: usize,
    n_out: usize,
    pooled: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if n_out == 0 || n_out > stride || votes.len() < rows * stride || pooled.len() < rows * n_out {
        return Err(Error::internal("pooling buffers do not match"));
    }
    let params = NtkvPoolParams {
        rows: to_u32("k", rows)?,
        in_stride: to_u32("k", stride)?,
        n_out: to_u32("k", n_out)?,
        _pad0: 0,
    };
    let (f, cfg) = grid_stride_kernel(device, plain_id("snapkv_pool"), GRID_STRIDE_THREADS, rows * n_out)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(votes).arg(pooled);
    // SAFETY: ntkv_snapkv_pool(NtkvPoolParams, const float* in, float* out): for e < rows *
    // n_out it reads in[r * stride + i] with 0 <= i < n_out <= stride (votes holds rows *
    // stride) and writes out[e] (pooled holds at least rows * n_out); checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Decodes the keep check's flag: the lowest bad flat index as `(head, entry)`, or `None`
/// for the sentinel `u64::MAX`, which no flat index can equal (`rows · budget < 2^40`).
fn first_bad_entry(flag: u64, budget: usize) -> Option<(u64, u64)> {
    let budget = budget.max(1) as u64;
    (flag != u64::MAX).then(|| (flag / budget, flag % budget))
}

/// Checks on the device that every row of `keep [hkv, budget]` is strictly ascending and
/// below `t` (one 8-byte read back, which synchronizes).
fn check_keep(device: &Device, keep: &CudaView<'_, u32>, hkv: usize, t: usize, budget: usize) -> Result<()> {
    let stream = device.stream();
    let check = NtkvKeepCheckParams {
        rows: to_u32("keep", hkv)?,
        budget: to_u32("keep", budget)?,
        t: to_u32("k_cache", t)?,
        _pad0: 0,
    };
    let mut flag = stream.clone_htod(&[u64::MAX])?;
    let (fc, cfg) = grid_stride_kernel(device, plain_id("h2o_check_keep"), GRID_STRIDE_THREADS, hkv * budget)?;
    let mut b = stream.launch_builder(&fc);
    b.arg(&check).arg(keep).arg(&mut flag);
    // SAFETY: ntkv_h2o_check_keep(NtkvKeepCheckParams, const u32* keep, u64* first_bad) reads
    // keep[e] and keep[e - 1] (same row) for e < rows * budget = keep.len(), and atomically
    // lowers the single u64 in flag.
    unsafe { b.launch(cfg) }?;
    let bad = stream.clone_dtoh(&flag)?.first().copied().unwrap_or(u64::MAX);
    if let Some((h, i)) = first_bad_entry(bad, budget) {
        return Err(Error::invalid(
            "keep",
            format!("entry {i} of head {h} is out of range (>= {t}) or not strictly ascending"),
        ));
    }
    Ok(())
}

/// The row size of a compaction in u32 words, or an error naming `k_cache`.
fn row_words<T: Float>(d: usize, max_words: usize) -> Result<usize> {
    let row_bytes = d * T::DTYPE.size();
    if row_bytes % 4 != 0 || row_bytes / 4 > max_words {
        return Err(Error::invalid(
            "k_cache",
            format!(
                "rows of {row_bytes} bytes are not supported (need a multiple of 4, at most {} bytes)",
                max_words * 4
            ),
        ));
    }
    Ok(row_bytes / 4)
}

/// The compaction parameters of `[hkv, t, d]` caches and a `[hkv, budget]` keep list.
fn compact_params(hkv: usize, t: usize, budget: usize, row_words: usize, has_acc: bool) -> Result<NtkvCompactParams> {
    Ok(NtkvCompactParams {
        hkv: to_u32("k_cache", hkv)?,
        t: to_u32("k_cache", t)?,
        budget: to_u32("keep", budget)?,
        row_words: to_u32("k_cache", row_words)?,
        has_acc: u32::from(has_acc),
        _pad0: 0,
    })
}

/// The buffers of an in-place compaction, already checked against `(hkv, t, d, budget)`.
pub(crate) struct CompactBufs<'a, T> {
    pub keep: CudaView<'a, u32>,
    pub k_cache: CudaViewMut<'a, T>,
    pub v_cache: CudaViewMut<'a, T>,
    pub acc: Option<CudaViewMut<'a, f32>>,
}

/// Checks the keep list on the device, then compacts in place.
pub(crate) fn compact<T: Float>(
    device: &Device,
    bufs: CompactBufs<'_, T>,
    (hkv, t, d, budget): (usize, usize, usize, usize),
) -> Result<()> {
    let row_words = row_words::<T>(d, COMPACT_STAGE_WORDS)?;
    if budget == 0 {
        return Ok(());
    }
    let CompactBufs { keep, mut k_cache, mut v_cache, acc } = bufs;
    // The kernel moves rows as 4-byte words.
    check_aligned(device, "k_cache", &k_cache.as_view(), 4)?;
    check_aligned(device, "v_cache", &v_cache.as_view(), 4)?;
    // 1. Validate the keep list before anything is written.
    check_keep(device, &keep, hkv, t, budget)?;

    // 2. Compact, one block per kv head.
    let chunk_rows = (COMPACT_STAGE_WORDS / row_words).max(1);
    let smem_bytes = (2 * chunk_rows * row_words + chunk_rows) * 4;
    let f = device.kernel(plain_id("h2o_compact"))?;
    let smem = device.prepare_shared_mem(&f, smem_bytes)?;
    let params = compact_params(hkv, t, budget, row_words, acc.is_some())?;
    let stream = device.stream();
    let mut dummy = stream.alloc_zeros::<f32>(1)?;
    let mut acc = acc;
    let cfg = grid_for(device, &f, 256, smem, hkv, false)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(&keep).arg(&mut k_cache).arg(&mut v_cache);
    match acc.as_mut() {
        Some(a) => b.arg(a),
        None => b.arg(&mut dummy),
    };
    // SAFETY: ntkv_h2o_compact(NtkvCompactParams, const u32* keep, u32* kc, u32* vc, float* acc).
    // The caches are [hkv, t, d] of T, read and written as u32 words (row_words = d * size / 4,
    // exact). Block h reads keep[h * budget + i] (i < budget) and, since every entry was just
    // checked to be < t, cache words (h * t + keep) * row_words + w < hkv * t * row_words; it
    // writes rows h * t + i, i < budget <= t. acc is touched only when has_acc (then [hkv, t]).
    // Dynamic shared memory is the (2 * chunk_rows * row_words + chunk_rows) words prepared.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The buffers of an out-of-place gather, already checked against `(hkv, t, d, budget)`.
pub(super) struct GatherBufs<'a, T> {
    pub keep: CudaView<'a, u32>,
    pub k_cache: CudaView<'a, T>,
    pub v_cache: CudaView<'a, T>,
    pub acc: Option<(CudaView<'a, f32>, CudaViewMut<'a, f32>)>,
    pub k_out: CudaViewMut<'a, T>,
    pub v_out: CudaViewMut<'a, T>,
}

/// Checks the keep list on the device, then gathers into packed outputs.
pub(super) fn gather<T: Float>(
    device: &Device,
    bufs: GatherBufs<'_, T>,
    (hkv, t, d, budget): (usize, usize, usize, usize),
) -> Result<()> {
    let row_words = row_words::<T>(d, usize::MAX)?;
    if budget == 0 {
        return Ok(());
    }
    let GatherBufs { keep, k_cache, v_cache, acc, mut k_out, mut v_out } = bufs;
    // The kernel moves rows as 4-byte words.
    check_aligned(device, "k_cache", &k_cache, 4)?;
    check_aligned(device, "v_cache", &v_cache, 4)?;
    check_aligned(device, "k_out", &k_out.as_view(), 4)?;
    check_aligned(device, "v_out", &v_out.as_view(), 4)?;
    check_keep(device, &keep, hkv, t, budget)?;
    let params = compact_params(hkv, t, budget, row_words, acc.is_some())?;
    let stream = device.stream();
    let (f, cfg) = grid_stride_kernel(device, plain_id("h2o_gather"), GRID_STRIDE_THREADS, hkv * budget * row_words)?;
    let dummy_in = stream.alloc_zeros::<f32>(1)?;
    let mut dummy_out = stream.alloc_zeros::<f32>(1)?;
    let (acc_in, mut acc_out) = match acc {
        Some((a, o)) => (Some(a), Some(o)),
        None => (None, None),
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(&keep).arg(&k_cache).arg(&v_cache);
    match acc_in.as_ref() {
        Some(a) => b.arg(a),
        None => b.arg(&dummy_in),
    };
    b.arg(&mut k_out).arg(&mut v_out);
    match acc_out.as_mut() {
        Some(o) => b.arg(o),
        None => b.arg(&mut dummy_out),
    };
    // SAFETY: ntkv_h2o_gather(NtkvCompactParams, const u32* keep, const u32* kc, const u32* vc,
    // const float* acc, u32* k_out, u32* v_out, float* acc_out). For e < hkv * budget *
    // row_words (grid-stride) it reads keep[e / row_words] (keep is [hkv, budget]; every entry
    // was just checked to be < t), cache words (h * t + keep) * row_words + w < hkv * t *
    // row_words (the caches are [hkv, t, d] of T, d * size = 4 * row_words bytes), and writes
    // word e of the [hkv, budget, d] outputs (their lengths were checked by the caller); acc
    // ([hkv, t]) and acc_out ([hkv, budget]) only when has_acc.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`). The row top-k's ids are [`crate::select`]'s.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids: Vec<KernelId> = PLAIN_OPS.iter().map(|op| plain_id(op)).collect();
    for dt in ATTN_DTYPES {
        for d in HEAD_DIMS {
            ids.extend(pass_ids(dt, d).into_iter().flatten());
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_check_flag_is_64_bit_with_an_unreachable_sentinel() {
        // The old u32 flag's sentinel, u32::MAX, is a real flat index of a keep list of
        // 2^32 + 1 entries (65536 heads x 65537): it must decode as a bad entry, not "none".
        let budget = 65537usize;
        let at = u64::from(u32::MAX);
        assert_eq!(first_bad_entry(at, budget), Some((at / budget as u64, at % budget as u64)));
        assert_eq!(first_bad_entry(at - 1, budget), Some(((at - 1) / 65537, (at - 1) % 65537)));
        assert_eq!(first_bad_entry(at + 1, budget), Some(((at + 1) / 65537, (at + 1) % 65537)));
        assert_eq!(first_bad_entry(0, budget), Some((0, 0)));
        assert_eq!(first_bad_entry(u64::MAX, budget), None);
        // The largest flat index any keep list can have stays far below the sentinel.
        let largest = 65535u64 * (1u64 << 24) - 1;
        assert!(first_bad_entry(largest, 1 << 24).is_some());
        assert_eq!(first_bad_entry(5, 0), Some((5, 0)), "a zero budget cannot divide by zero");
    }
}
