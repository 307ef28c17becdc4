//! Launch code for `cuda/topk.cu`. Every public entry point validated its arguments before
//! calling in here; the functions below still check what their launches rely on.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{validate_topk, AccumulatePath, AttnShape, GqaReduce, TopkLayout};
use crate::device::{Device, Module};
use crate::error::{check_shape, to_u32, Error, Result};
use crate::params::{
    NtkvCompactParams, NtkvFillRecentParams, NtkvH2oParams, NtkvKeepCheckParams, NtkvPoolParams, NtkvTopkParams,
};
use crate::tensor::{DType, DeviceTensor, Float};

const HIST_BINS: usize = 4096;
const STATE_WORDS: usize = 8;
const HIST_THREADS: u32 = 512;
const FINAL_THREADS: u32 = 1024;
/// Most candidates the finalize kernel stages in shared memory.
const CAND_STAGE_MAX: usize = 8192;
/// Static shared memory of the finalize kernel, rounded up (ptxas reports 1184 bytes).
const FINAL_STATIC_SMEM: usize = 2048;
/// Static shared memory of the fused kernel, rounded up (ptxas reports 17728 bytes).
const FUSED_STATIC_SMEM: usize = 18432;
const KEY_TILE: usize = 64;
const H2O_THREADS: u32 = 128;
/// u32 words of one staged chunk per tensor in the compaction kernel.
const COMPACT_STAGE_WORDS: usize = 8192;

/// (histogram, filter, finalize, fused) kernels of a dtype.
fn topk_kernel_names(dtype: DType) -> [&'static str; 4] {
    match dtype {
        DType::F32 => ["ntkv_topk_hist_f32", "ntkv_topk_filter_f32", "ntkv_topk_finalize_f32", "ntkv_topk_fused_f32"],
        DType::F16 => ["ntkv_topk_hist_f16", "ntkv_topk_filter_f16", "ntkv_topk_finalize_f16", "ntkv_topk_fused_f16"],
        DType::BF16 => {
            ["ntkv_topk_hist_bf16", "ntkv_topk_filter_bf16", "ntkv_topk_finalize_bf16", "ntkv_topk_fused_bf16"]
        }
    }
}

/// What one top-k launch writes, beyond the plain `[rows, k]` by-value output.
#[derive(Clone, Copy, Debug)]
pub(super) struct TopkOutput {
    /// Row length used when there are no per-row lengths (`≤ n`).
    pub uniform_len: usize,
    /// Whether per-row lengths were uploaded.
    pub has_lengths: bool,
    /// Write the selected indices ascending instead of by value.
    pub order_by_index: bool,
    /// Elements between output rows (`≥ k + tail_count`).
    pub out_stride: usize,
    /// Also write `tail_first ..` into the `tail_count` columns after the `k` selected.
    pub tail_count: usize,
    /// The first index of that tail.
    pub tail_first: usize,
}

/// A validated top-k shape with its device scratch, reusable across calls of the same shape
/// (the FlashInfer-style plan: validate and choose the layout once, then run many times).
///
/// The scratch (histograms, row states, selected and candidate lists) is left zeroed by
/// every completed run, so a run needs no memset.
pub struct TopkPlan {
    rows: usize,
    n: usize,
    k: usize,
    layout: TopkLayout,
    hist: CudaSlice<u32>,
    state: CudaSlice<u32>,
    sel: CudaSlice<u32>,
    cand: CudaSlice<u32>,
    lengths: CudaSlice<u32>,
    /// Passed as the values buffer when values are not written.
    dummy_values: CudaSlice<f32>,
    /// Set while launches are being enqueued; a run that finds it set re-zeroes the scratch.
    dirty: bool,
}

impl std::fmt::Debug for TopkPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopkPlan")
            .field("rows", &self.rows)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("layout", &self.layout)
            .finish()
    }
}

impl TopkPlan {
    /// Validates the shape `[rows, n]`, top-`k`, chooses the layout for this device and
    /// allocates its scratch (at most [`super::TOPK_WORKSPACE_BYTES`] plus `4·rows` bytes).
    ///
    /// # Errors
    /// As [`validate_topk`]; driver errors from the allocation.
    pub fn new(device: &Device, rows: usize, n: usize, k: usize) -> Result<Self> {
        validate_topk(rows, n, k, None)?;
        let layout = TopkLayout::choose(rows, n, k, device.props().sm_count as usize);
        let b = layout.rows_per_batch;
        let stream = device.stream();
        Ok(TopkPlan {
            rows,
            n,
            k,
            layout,
            hist: stream.alloc_zeros::<u32>(b * HIST_BINS)?,
            state: stream.alloc_zeros::<u32>(b * STATE_WORDS)?,
            sel: stream.alloc_zeros::<u32>(b * k)?,
            cand: stream.alloc_zeros::<u32>(b * n)?,
            lengths: stream.alloc_zeros::<u32>(rows)?,
            dummy_values: stream.alloc_zeros::<f32>(1)?,
            dirty: false,
        })
    }

    /// The layout chosen for this shape.
    pub fn layout(&self) -> TopkLayout {
        self.layout
    }

    /// Runs the top-k of `scores [rows, n]` into `values [rows, k]` and `indices [rows, k]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a buffer of another shape; as [`validate_topk`] for `lengths`.
    pub fn run<T: Float>(
        &mut self,
        device: &Device,
        scores: &DeviceTensor<T>,
        lengths: Option<&[u32]>,
        values: &mut DeviceTensor<T>,
        indices: &mut DeviceTensor<u32>,
    ) -> Result<()> {
        check_shape("scores", &[self.rows, self.n], scores.shape())?;
        check_shape("values", &[self.rows, self.k], values.shape())?;
        check_shape("indices", &[self.rows, self.k], indices.shape())?;
        validate_topk(self.rows, self.n, self.k, lengths)?;
        if let Some(l) = lengths {
            device.stream().memcpy_htod(l, &mut self.lengths)?;
        }
        let out = TopkOutput {
            uniform_len: self.n,
            has_lengths: lengths.is_some(),
            order_by_index: false,
            out_stride: self.k,
            tail_count: 0,
            tail_first: 0,
        };
        self.launch(device, scores.slice(), out, Some(values.slice_mut()), indices.slice_mut())
    }

    /// Enqueues the three kernels for every row batch. `values` of `None` writes indices only.
    pub(super) fn launch<T: Float>(
        &mut self,
        device: &Device,
        scores: &CudaSlice<T>,
        out: TopkOutput,
        mut values: Option<&mut CudaSlice<T>>,
        indices: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let (rows, n, k) = (self.rows, self.n, self.k);
        // What the kernels index: scores rows*n, outputs rows*out_stride, row lengths <= n.
        let out_len = (rows - 1) * out.out_stride + k + out.tail_count;
        if scores.len() < rows * n
            || indices.len() < out_len
            || out.out_stride < k + out.tail_count
            || out.tail_first + out.tail_count > u32::MAX as usize
            || out.uniform_len > n
            || values.as_ref().is_some_and(|v| v.len() < out_len)
        {
            return Err(Error::invalid("scores", "internal: buffers do not match the top-k plan"));
        }
        let stream = device.stream().clone();
        if self.dirty {
            stream.memset_zeros(&mut self.hist)?;
            stream.memset_zeros(&mut self.state)?;
        }
        self.dirty = true;
        let [hist_name, filter_name, final_name, fused_name] = topk_kernel_names(T::DTYPE);
        let fused = self.layout.blocks_per_row == 1;
        let f_final = device.function(Module::Topk, if fused { fused_name } else { final_name })?;
        // Shared memory of the finalize (or fused) kernel: the kpad sort words, then as many
        // staged candidates (8 bytes each, at most CAND_STAGE_MAX) as the device's opt-in limit
        // allows next to the kernel's static shared memory.
        let limit = device.props().max_shared_mem_per_block_optin as usize;
        let static_smem = if fused { FUSED_STATIC_SMEM } else { FINAL_STATIC_SMEM };
        let cand_stage = (limit.saturating_sub(static_smem + self.layout.kpad * 8) / 8).min(CAND_STAGE_MAX);
        let smem = device.prepare_shared_mem(&f_final, (self.layout.kpad + cand_stage) * 8)?;
        let write_values = values.is_some();
        let lay = self.layout;
        let mut row_base = 0usize;
        while row_base < rows {
            let batch = lay.rows_per_batch.min(rows - row_base);
            let params = NtkvTopkParams {
                row_stride: n as u64,
                cand_stride: n as u64,
                out_stride: out.out_stride as u64,
                row_base: to_u32("rows", row_base)?,
                rows: to_u32("rows", batch)?,
                n: to_u32("n", n)?,
                k: to_u32("k", k)?,
                uniform_len: to_u32("lengths", out.uniform_len)?,
                has_lengths: u32::from(out.has_lengths),
                blocks_per_row: to_u32("blocks_per_row", lay.blocks_per_row)?,
                chunk: to_u32("chunk", lay.chunk)?,
                kpad: to_u32("k", lay.kpad)?,
                order_by_index: u32::from(out.order_by_index),
                write_values: u32::from(write_values),
                reverse_filter: 1,
                cand_stage: to_u32("cand_stage", cand_stage)?,
                tail_count: to_u32("recent", out.tail_count)?,
                tail_first: to_u32("recent", out.tail_first)?,
                _pad0: 0,
            };
            let grid_rows = to_u32("rows", batch)?;
            let fin =
                LaunchConfig { grid_dim: (grid_rows, 1, 1), block_dim: (FINAL_THREADS, 1, 1), shared_mem_bytes: smem };
            if fused {
                let mut b = stream.launch_builder(&f_final);
                b.arg(&params).arg(scores).arg(&self.lengths).arg(&mut self.sel).arg(&mut self.cand);
                match values.as_deref_mut() {
                    Some(v) => b.arg(v),
                    None => b.arg(&mut self.dummy_values),
                };
                b.arg(&mut *indices);
                // SAFETY: ntkv_topk_fused_<T>(NtkvTopkParams, const T* x, const u32* lengths,
                // u32* sel, u32* cand, T* out_val, u32* out_idx). Block y reads x[(row_base + y)
                // * n + i] for i < min(len, n) (lengths holds `rows` entries; uniform_len <= n;
                // scores holds rows * n); appends to sel[y * k + pos] only for pos < k and to
                // cand[y * n + pos] only for pos < n (buffers of rows_per_batch * k and
                // rows_per_batch * n); gathers x only at indices clamped to < n; writes out_idx
                // (and out_val when write_values, else the dummy is never dereferenced) at
                // (row_base + y) * out_stride + s for s < k + tail_count, inside out_len. It uses (kpad +
                // cand_stage) * 8 bytes of dynamic shared memory, the size prepared above.
                unsafe { b.launch(fin) }?;
                row_base += batch;
                continue;
            }
            let f_hist = device.function(Module::Topk, hist_name)?;
            let f_filter = device.function(Module::Topk, filter_name)?;
            let split = LaunchConfig {
                grid_dim: (to_u32("blocks_per_row", lay.blocks_per_row)?, grid_rows, 1),
                block_dim: (HIST_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&f_hist);
            b.arg(&params).arg(scores).arg(&self.lengths).arg(&mut self.hist).arg(&mut self.state);
            // SAFETY: ntkv_topk_hist_<T>(NtkvTopkParams, const T* x, const u32* lengths, u32* hist,
            // u32* state). Block (x, y) reads x[(row_base + y) * n + i] for i < min(len, n) with
            // len = lengths[row_base + y] (lengths holds `rows` entries) or uniform_len <= n;
            // scores holds rows * n elements. It writes hist[y * 4096 .. +4096] and
            // state[y * 8 .. +8] for y < batch <= rows_per_batch, the sizes of both buffers.
            unsafe { b.launch(split) }?;

            let mut b = stream.launch_builder(&f_filter);
            b.arg(&params).arg(scores).arg(&self.lengths).arg(&mut self.state).arg(&mut self.sel).arg(&mut self.cand);
            // SAFETY: ntkv_topk_filter_<T>(NtkvTopkParams, const T* x, const u32* lengths,
            // u32* state, u32* sel, u32* cand). Reads x as the histogram kernel does; appends to
            // sel[y * k + pos] only for pos < k and to cand[y * n + pos] only for pos < n
            // (cand_stride = n), inside buffers of rows_per_batch * k and rows_per_batch * n.
            unsafe { b.launch(split) }?;

            let mut b = stream.launch_builder(&f_final);
            b.arg(&params).arg(scores).arg(&mut self.hist).arg(&mut self.state).arg(&self.sel).arg(&self.cand);
            match values.as_deref_mut() {
                Some(v) => b.arg(v),
                None => b.arg(&mut self.dummy_values),
            };
            b.arg(&mut *indices);
            // SAFETY: ntkv_topk_finalize_<T>(NtkvTopkParams, const T* x, u32* hist, u32* state,
            // const u32* sel, const u32* cand, T* out_val, u32* out_idx). Block y reads
            // sel[y * k ..] below min(count, k), cand[y * n ..] below min(count, n), and x at
            // indices taken from them (clamped to < n before every gather); it writes out_idx
            // (and out_val when write_values, else never touched: the dummy is never
            // dereferenced) at (row_base + y) * out_stride + s for s < k + tail_count, inside
            // out_len. It
            // uses (kpad + cand_stage) * 8 bytes of dynamic shared memory, the size prepared
            // above, staging candidates there only when the row has at most cand_stage.
            unsafe { b.launch(fin) }?;
            row_base += batch;
        }
        self.dirty = false;
        Ok(())
    }
}

/// Writes `count` consecutive indices `first_index ..` into columns `col_start ..` of each of
/// the `rows` rows (stride `out_stride`) of `out`.
pub(super) fn fill_recent(
    device: &Device,
    out: &mut CudaSlice<u32>,
    rows: usize,
    out_stride: usize,
    col_start: usize,
    count: usize,
    first_index: usize,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    if col_start + count > out_stride || out.len() < rows * out_stride || first_index + count > u32::MAX as usize {
        return Err(Error::invalid("recent", "internal: recent window does not fit the keep list"));
    }
    let params = NtkvFillRecentParams {
        rows: to_u32("rows", rows)?,
        out_stride: to_u32("budget", out_stride)?,
        col_start: to_u32("budget", col_start)?,
        count: to_u32("recent", count)?,
        first_index: to_u32("recent", first_index)?,
        _pad0: 0,
    };
    let f = device.function(Module::Topk, "ntkv_topk_fill_recent")?;
    let blocks = (rows * count).div_ceil(256).clamp(1, 4096);
    let cfg = LaunchConfig { grid_dim: (to_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(out);
    // SAFETY: ntkv_topk_fill_recent(NtkvFillRecentParams, u32* out) writes
    // out[r * out_stride + col_start + i] for r < rows, i < count; col_start + count <=
    // out_stride and out holds rows * out_stride entries (checked above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// A validated eviction selection: keep lists `[rows, budget]` from scores `[rows, stride]`,
/// the top-`(budget − recent)` of the first `older` columns of each row (ties by lower index),
/// ascending, then `older .. older + recent`. Holds the top-k plan it runs.
pub struct EvictionPlan {
    rows: usize,
    stride: usize,
    older: usize,
    budget: usize,
    recent: usize,
    topk: Option<TopkPlan>,
}

impl std::fmt::Debug for EvictionPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvictionPlan")
            .field("rows", &self.rows)
            .field("stride", &self.stride)
            .field("older", &self.older)
            .field("budget", &self.budget)
            .field("recent", &self.recent)
            .finish()
    }
}

impl EvictionPlan {
    /// The H2O selection over `acc [hkv, t]`: older tokens `0 .. t − recent`.
    ///
    /// # Errors
    /// As [`super::validate_select`]; driver errors.
    pub fn h2o(device: &Device, hkv: usize, t: usize, budget: usize, recent: usize) -> Result<Self> {
        super::validate_select(hkv, t, budget, recent, "recent")?;
        Self::new(device, hkv, t, t - recent, budget, recent)
    }

    /// The SnapKV selection over pooled scores `[hkv, t − window]` (every column is older).
    ///
    /// # Errors
    /// As [`super::validate_select`] (naming `capacity` or `window`); driver errors.
    pub fn snapkv(device: &Device, hkv: usize, t: usize, capacity: usize, window: usize) -> Result<Self> {
        super::validate_select(hkv, t, capacity, window, "window")?;
        Self::new(device, hkv, (t - window).max(1), t - window, capacity, window)
    }

    fn new(device: &Device, rows: usize, stride: usize, older: usize, budget: usize, recent: usize) -> Result<Self> {
        let k_sel = budget - recent;
        let topk = if k_sel > 0 { Some(TopkPlan::new(device, rows, stride, k_sel)?) } else { None };
        Ok(EvictionPlan { rows, stride, older, budget, recent, topk })
    }

    /// Keep entries per row.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Writes the keep lists of `scores` (`[rows, stride]`) into `keep` (`[rows, budget]`).
    pub(super) fn run(&mut self, device: &Device, scores: &CudaSlice<f32>, keep: &mut CudaSlice<u32>) -> Result<()> {
        if keep.len() < self.rows * self.budget {
            return Err(Error::invalid("keep", "internal: keep buffer too small"));
        }
        match self.topk.as_mut() {
            Some(plan) => {
                // The top-k's last kernel writes the recent window after the selected indices.
                let out = TopkOutput {
                    uniform_len: self.older,
                    has_lengths: false,
                    order_by_index: true,
                    out_stride: self.budget,
                    tail_count: self.recent,
                    tail_first: self.older,
                };
                plan.launch::<f32>(device, scores, out, None, keep)
            }
            None => fill_recent(device, keep, self.rows, self.budget, 0, self.recent, self.older),
        }
    }

    /// Runs the selection over `acc [rows, stride]` into `keep [rows, budget]`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `acc` or `keep`.
    pub fn select(&mut self, device: &Device, acc: &DeviceTensor<f32>, keep: &mut DeviceTensor<u32>) -> Result<()> {
        check_shape("acc", &[self.rows, self.stride], acc.shape())?;
        check_shape("keep", &[self.rows, self.budget], keep.shape())?;
        self.run(device, acc.slice(), keep.slice_mut())
    }
}

/// Whether the accumulation kernels support this shape and dtype.
pub(super) fn check_attn_support(shape: AttnShape, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        return Err(Error::invalid("q", "f32 queries and keys are not supported; use f16 or bf16 (tensor cores)"));
    }
    if !matches!(shape.d, 64 | 128 | 256) {
        return Err(Error::invalid("q", format!("head dimension {} is not supported; use 64, 128 or 256", shape.d)));
    }
    Ok(())
}

fn h2o_kernel_names(dtype: DType, d: usize) -> Result<[&'static str; 3]> {
    Ok(match (dtype, d) {
        (DType::F16, 64) => ["ntkv_h2o_pass1_f16_d64", "ntkv_h2o_pass2_f16_d64", "ntkv_h2o_queue_f16_d64"],
        (DType::F16, 128) => ["ntkv_h2o_pass1_f16_d128", "ntkv_h2o_pass2_f16_d128", "ntkv_h2o_queue_f16_d128"],
        (DType::F16, 256) => ["ntkv_h2o_pass1_f16_d256", "ntkv_h2o_pass2_f16_d256", "ntkv_h2o_queue_f16_d256"],
        (DType::BF16, 64) => ["ntkv_h2o_pass1_bf16_d64", "ntkv_h2o_pass2_bf16_d64", "ntkv_h2o_queue_bf16_d64"],
        (DType::BF16, 128) => ["ntkv_h2o_pass1_bf16_d128", "ntkv_h2o_pass2_bf16_d128", "ntkv_h2o_queue_bf16_d128"],
        (DType::BF16, 256) => ["ntkv_h2o_pass1_bf16_d256", "ntkv_h2o_pass2_bf16_d256", "ntkv_h2o_queue_bf16_d256"],
        _ => return Err(Error::invalid("q", format!("no accumulation kernel for {dtype} with head dimension {d}"))),
    })
}

/// Device scratch of the accumulation kernels for one [`AttnShape`]: the per-tile softmax
/// partials, the merged row statistics and, for the queued path, the work queue and the
/// per-head completion flags. The partials and statistics are rewritten by every call, and
/// the queue state is left consistent by every completed call, so nothing is cleared per call.
pub struct AttnScratch {
    shape: AttnShape,
    path: AccumulatePath,
    partial: CudaSlice<f32>,
    stats: CudaSlice<f32>,
    order: CudaSlice<u32>,
    queue: CudaSlice<u64>,
    done: CudaSlice<u32>,
    ready: CudaSlice<u32>,
    error: CudaSlice<u32>,
    epoch: u32,
    tickets_used: u64,
    dirty: bool,
}

impl std::fmt::Debug for AttnScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnScratch").field("shape", &self.shape).field("path", &self.path).finish()
    }
}

impl AttnScratch {
    /// Allocates the scratch for `shape` on the default ([`AccumulatePath::Queued`]) path
    /// (about `8 · hq · tq · (⌈t/64⌉ + 1)` bytes).
    ///
    /// # Errors
    /// As [`AttnShape::validate`]; driver errors.
    pub fn new(device: &Device, shape: AttnShape) -> Result<Self> {
        Self::with_path(device, shape, AccumulatePath::Queued)
    }

    /// Allocates the scratch for `shape` on the given path.
    ///
    /// # Errors
    /// As [`AttnShape::validate`]; [`Error::TooLarge`] when the work items overflow a grid;
    /// driver errors.
    pub fn with_path(device: &Device, shape: AttnShape, path: AccumulatePath) -> Result<Self> {
        shape.validate()?;
        let n_tiles = shape.t.div_ceil(KEY_TILE);
        if 2 * shape.hkv * n_tiles > i32::MAX as usize {
            return Err(Error::too_large("k", format!("{} key tiles overflow a launch grid", shape.hkv * n_tiles)));
        }
        let lag = queue_lag(shape);
        let stream = device.stream();
        Ok(AttnScratch {
            shape,
            path,
            partial: stream.alloc_zeros::<f32>(shape.hq * shape.tq * n_tiles * 2)?,
            stats: stream.alloc_zeros::<f32>(shape.hq * shape.tq * 2)?,
            order: stream.clone_htod(&super::queue_order(shape.hkv, lag))?,
            queue: stream.alloc_zeros::<u64>(1)?,
            done: stream.alloc_zeros::<u32>(shape.hkv)?,
            ready: stream.alloc_zeros::<u32>(shape.hkv)?,
            error: stream.alloc_zeros::<u32>(1)?,
            epoch: 0,
            tickets_used: 0,
            dirty: false,
        })
    }

    /// The shape this scratch serves.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// The accumulation path this scratch runs.
    pub fn path(&self) -> AccumulatePath {
        self.path
    }

    /// Whether a queued launch ever gave up waiting for a head's statistics (a safeguard that
    /// should never trigger; its results would be wrong). Synchronizes with the stream.
    pub fn timed_out(&self, device: &Device) -> Result<bool> {
        Ok(device.stream().clone_dtoh(&self.error)?.first().is_some_and(|&e| e != 0))
    }
}

/// Kv heads between pass 1 and pass 2 of a head in the queued order: two when three heads'
/// keys fit in about 40 MB of L2, else one.
fn queue_lag(shape: AttnShape) -> usize {
    let per_head = shape.t * shape.d * 2;
    let lag = if 3 * per_head <= 40 << 20 { 2 } else { 1 };
    lag.min(shape.hkv)
}

/// Enqueues the accumulation into `acc [hkv, t]` on the scratch's path.
pub(super) fn accumulate<T: Float>(
    device: &Device,
    scratch: &mut AttnScratch,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    acc: &mut CudaSlice<f32>,
    reduce: GqaReduce,
    overwrite: bool,
) -> Result<()> {
    let shape = scratch.shape;
    check_attn_support(shape, T::DTYPE)?;
    let AttnShape { hq, hkv, tq, t, d } = shape;
    if q.len() != hq * tq * d || k.len() != hkv * t * d || acc.len() != hkv * t {
        return Err(Error::invalid("q", "internal: buffers do not match the attention shape"));
    }
    let [pass1, pass2, queued] = h2o_kernel_names(T::DTYPE, d)?;
    let n_tiles = t.div_ceil(KEY_TILE);
    let mut params = NtkvH2oParams {
        ticket_base: 0,
        hq: to_u32("q", hq)?,
        hkv: to_u32("k", hkv)?,
        tq: to_u32("q", tq)?,
        t: to_u32("k", t)?,
        d: to_u32("q", d)?,
        n_tiles: to_u32("k", n_tiles)?,
        reduce_max: u32::from(reduce == GqaReduce::Max),
        scale: (d as f32).sqrt().recip(),
        epoch: 0,
        overwrite: u32::from(overwrite),
    };
    if scratch.path == AccumulatePath::Queued {
        return accumulate_queued(device, scratch, queued, &mut params, q, k, acc);
    }
    let stream = device.stream();
    let (partial, stats) = (&mut scratch.partial, &mut scratch.stats);
    let tiles = LaunchConfig {
        grid_dim: (to_u32("k", n_tiles)?, to_u32("k", hkv)?, 1),
        block_dim: (H2O_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };

    let f1 = device.function(Module::Topk, pass1)?;
    let mut b = stream.launch_builder(&f1);
    b.arg(&params).arg(q).arg(k).arg(&mut *partial);
    // SAFETY: ntkv_h2o_pass1_<T>_d<D>(NtkvH2oParams, const T* q, const T* k, float* partial).
    // Block (tile, hk) reads q rows (h, r) for h < hq, r < tq and k rows (hk, j) for j < t (all
    // other rows are masked to zero without a load), D elements each: within hq*tq*d and
    // hkv*t*d. It writes partial[((h * tq + r) * n_tiles + tile) * 2 + {0,1}] for r < tq,
    // inside the scratch's hq*tq*n_tiles*2.
    unsafe { b.launch(tiles) }?;

    let merge_rows = hq * tq;
    let merge = LaunchConfig {
        grid_dim: (to_u32("q", merge_rows.div_ceil(8))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let fm = device.function(Module::Topk, "ntkv_h2o_merge")?;
    let mut b = stream.launch_builder(&fm);
    b.arg(&params).arg(&*partial).arg(&mut *stats);
    // SAFETY: ntkv_h2o_merge(NtkvH2oParams, const float* partial, float* stats): warp `row`
    // (< hq*tq, checked) reads partial[(row * n_tiles + t) * 2 + {0,1}] for t < n_tiles and
    // writes stats[row * 2 + {0,1}], inside both scratch buffers.
    unsafe { b.launch(merge) }?;

    let f2 = device.function(Module::Topk, pass2)?;
    let mut b = stream.launch_builder(&f2);
    b.arg(&params).arg(q).arg(k).arg(&*stats).arg(acc);
    // SAFETY: ntkv_h2o_pass2_<T>_d<D>(NtkvH2oParams, const T* q, const T* k, const float*
    // stats, float* acc). Reads q and k as pass 1 and stats[(h * tq + r) * 2 + {0,1}] for
    // r < tq; writes acc[hk * t + j] for j < t only, each element from exactly one thread.
    unsafe { b.launch(tiles) }?;
    Ok(())
}

/// The single-launch queued accumulation (see `h2o_queue` in cuda/topk.cu).
fn accumulate_queued<T: Float>(
    device: &Device,
    scratch: &mut AttnScratch,
    kernel: &'static str,
    params: &mut NtkvH2oParams,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    acc: &mut CudaSlice<f32>,
) -> Result<()> {
    let stream = device.stream();
    let f = device.function(Module::Topk, kernel)?;
    // A call that failed half way (or an epoch about to wrap) leaves the queue state unknown:
    // start it afresh.
    if scratch.dirty || scratch.epoch == u32::MAX {
        stream.memset_zeros(&mut scratch.queue)?;
        stream.memset_zeros(&mut scratch.done)?;
        stream.memset_zeros(&mut scratch.ready)?;
        scratch.epoch = 0;
        scratch.tickets_used = 0;
    }
    scratch.dirty = true;
    let items = 2 * scratch.shape.hkv * scratch.shape.t.div_ceil(KEY_TILE);
    params.epoch = scratch.epoch + 1;
    params.ticket_base = scratch.tickets_used;
    let cfg =
        LaunchConfig { grid_dim: (to_u32("k", items)?, 1, 1), block_dim: (H2O_THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&*params)
        .arg(q)
        .arg(k)
        .arg(&scratch.order)
        .arg(&mut scratch.partial)
        .arg(&mut scratch.stats)
        .arg(acc)
        .arg(&mut scratch.queue)
        .arg(&mut scratch.done)
        .arg(&mut scratch.ready)
        .arg(&mut scratch.error);
    // SAFETY: ntkv_h2o_queue_<T>_d<D>(NtkvH2oParams, const T* q, const T* k, const u32* order,
    // float* partial, float* stats, float* acc, u64* queue, u32* done, u32* ready, u32* error).
    // One block per work item: the ticket minus ticket_base is < items = 2 * hkv * n_tiles
    // (the queue counter equals ticket_base at launch: every earlier call took exactly its
    // items, or the counter was reset), and items past it return. order holds 2 * hkv entries,
    // each naming a head < hkv; q, k, partial, stats and acc are read and written as by the
    // pass-1, merge and pass-2 kernels; done and ready hold hkv words, queue and error one.
    unsafe { b.launch(cfg) }?;
    scratch.epoch += 1;
    scratch.tickets_used += items as u64;
    scratch.dirty = false;
    Ok(())
}

/// Pools SnapKV votes `[rows, stride]` (first `n_out` columns) into `pooled [rows, n_out]`.
pub(super) fn pool5(
    device: &Device,
    votes: &CudaSlice<f32>,
    rows: usize,
    stride: usize,
    n_out: usize,
    pooled: &mut CudaSlice<f32>,
) -> Result<()> {
    if n_out == 0 || n_out > stride || votes.len() < rows * stride || pooled.len() < rows * n_out {
        return Err(Error::invalid("q_window", "internal: pooling buffers do not match"));
    }
    let params = NtkvPoolParams {
        rows: to_u32("k", rows)?,
        in_stride: to_u32("k", stride)?,
        n_out: to_u32("k", n_out)?,
        _pad0: 0,
    };
    let f = device.function(Module::Topk, "ntkv_snapkv_pool")?;
    let blocks = (rows * n_out).div_ceil(256).clamp(1, 8192);
    let cfg = LaunchConfig { grid_dim: (to_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(votes).arg(pooled);
    // SAFETY: ntkv_snapkv_pool(NtkvPoolParams, const float* in, float* out): for e < rows *
    // n_out it reads in[r * stride + i] with 0 <= i < n_out <= stride (votes holds rows *
    // stride) and writes out[e] (pooled holds at least rows * n_out); checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Checks on the device that every row of `keep [hkv, budget]` is strictly ascending and
/// below `t` (one 4-byte read back, which synchronizes).
fn check_keep(device: &Device, keep: &DeviceTensor<u32>, hkv: usize, t: usize, budget: usize) -> Result<()> {
    let stream = device.stream();
    let check = NtkvKeepCheckParams {
        rows: to_u32("keep", hkv)?,
        budget: to_u32("keep", budget)?,
        t: to_u32("k_cache", t)?,
        _pad0: 0,
    };
    let mut flag = stream.clone_htod(&[u32::MAX])?;
    let fc = device.function(Module::Topk, "ntkv_h2o_check_keep")?;
    let blocks = (hkv * budget).div_ceil(256).clamp(1, 4096);
    let cfg = LaunchConfig { grid_dim: (to_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&fc);
    b.arg(&check).arg(keep.slice()).arg(&mut flag);
    // SAFETY: ntkv_h2o_check_keep(NtkvKeepCheckParams, const u32* keep, u32* first_bad) reads
    // keep[e] and keep[e - 1] (same row) for e < rows * budget = keep.len(), and atomically
    // lowers the single u32 in flag.
    unsafe { b.launch(cfg) }?;
    let bad = stream.clone_dtoh(&flag)?.first().copied().unwrap_or(u32::MAX);
    if bad != u32::MAX {
        let (h, i) = (bad as usize / budget, bad as usize % budget);
        return Err(Error::invalid(
            "keep",
            format!("entry {i} of head {h} is out of range (>= {t}) or not strictly ascending"),
        ));
    }
    Ok(())
}

/// Checks the keep list on the device, then compacts in place.
#[allow(clippy::too_many_arguments)]
pub(super) fn compact<T: Float>(
    device: &Device,
    keep: &DeviceTensor<u32>,
    k_cache: &mut DeviceTensor<T>,
    v_cache: &mut DeviceTensor<T>,
    acc: Option<&mut DeviceTensor<f32>>,
    hkv: usize,
    t: usize,
    d: usize,
    budget: usize,
) -> Result<()> {
    let row_bytes = d * T::DTYPE.size();
    if row_bytes % 4 != 0 || row_bytes / 4 > COMPACT_STAGE_WORDS {
        return Err(Error::invalid(
            "k_cache",
            format!("rows of {row_bytes} bytes are not supported (need a multiple of 4, at most 32 KiB)"),
        ));
    }
    if budget == 0 {
        return Ok(());
    }
    let row_words = row_bytes / 4;
    let stream = device.stream();

    // 1. Validate the keep list before anything is written.
    check_keep(device, keep, hkv, t, budget)?;

    // 2. Compact, one block per kv head.
    let chunk_rows = (COMPACT_STAGE_WORDS / row_words).max(1);
    let smem_bytes = (2 * chunk_rows * row_words + chunk_rows) * 4;
    let f = device.function(Module::Topk, "ntkv_h2o_compact")?;
    let smem = device.prepare_shared_mem(&f, smem_bytes)?;
    let params = NtkvCompactParams {
        hkv: to_u32("k_cache", hkv)?,
        t: to_u32("k_cache", t)?,
        budget: to_u32("keep", budget)?,
        row_words: to_u32("k_cache", row_words)?,
        has_acc: u32::from(acc.is_some()),
        _pad0: 0,
    };
    let mut dummy_acc;
    let acc_slice = match acc {
        Some(a) => a.slice_mut(),
        None => {
            dummy_acc = stream.alloc_zeros::<f32>(1)?;
            &mut dummy_acc
        }
    };
    let cfg =
        LaunchConfig { grid_dim: (to_u32("k_cache", hkv)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem };
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(keep.slice()).arg(k_cache.slice_mut()).arg(v_cache.slice_mut()).arg(acc_slice);
    // SAFETY: ntkv_h2o_compact(NtkvCompactParams, const u32* keep, u32* kc, u32* vc, float* acc).
    // The caches are [hkv, t, d] of T, read and written as u32 words (row_words = d * size / 4,
    // exact). Block h reads keep[h * budget + i] (i < budget) and, since every entry was just
    // checked to be < t, cache words (h * t + keep) * row_words + w < hkv * t * row_words; it
    // writes rows h * t + i, i < budget <= t. acc is touched only when has_acc (then [hkv, t]).
    // Dynamic shared memory is the (2 * chunk_rows * row_words + chunk_rows) words prepared.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Checks the keep list on the device, then gathers into packed outputs.
#[allow(clippy::too_many_arguments)]
pub(super) fn gather<T: Float>(
    device: &Device,
    keep: &DeviceTensor<u32>,
    k_cache: &DeviceTensor<T>,
    v_cache: &DeviceTensor<T>,
    acc: Option<(&DeviceTensor<f32>, &mut DeviceTensor<f32>)>,
    k_out: &mut DeviceTensor<T>,
    v_out: &mut DeviceTensor<T>,
    (hkv, t, d, budget): (usize, usize, usize, usize),
) -> Result<()> {
    let row_bytes = d * T::DTYPE.size();
    if row_bytes % 4 != 0 {
        return Err(Error::invalid("k_cache", format!("rows of {row_bytes} bytes are not a multiple of 4")));
    }
    if budget == 0 {
        return Ok(());
    }
    check_keep(device, keep, hkv, t, budget)?;
    let row_words = row_bytes / 4;
    let params = NtkvCompactParams {
        hkv: to_u32("k_cache", hkv)?,
        t: to_u32("k_cache", t)?,
        budget: to_u32("keep", budget)?,
        row_words: to_u32("k_cache", row_words)?,
        has_acc: u32::from(acc.is_some()),
        _pad0: 0,
    };
    let stream = device.stream();
    let f = device.function(Module::Topk, "ntkv_h2o_gather")?;
    let blocks = (hkv * budget * row_words).div_ceil(256).clamp(1, 65535);
    let cfg = LaunchConfig { grid_dim: (to_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let dummy_in;
    let mut dummy_out;
    let (acc_in, acc_out) = match acc {
        Some((a, o)) => (a.slice(), o.slice_mut()),
        None => {
            dummy_in = stream.alloc_zeros::<f32>(1)?;
            dummy_out = stream.alloc_zeros::<f32>(1)?;
            (&dummy_in, &mut dummy_out)
        }
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&params)
        .arg(keep.slice())
        .arg(k_cache.slice())
        .arg(v_cache.slice())
        .arg(acc_in)
        .arg(k_out.slice_mut())
        .arg(v_out.slice_mut())
        .arg(acc_out);
    // SAFETY: ntkv_h2o_gather(NtkvCompactParams, const u32* keep, const u32* kc, const u32* vc,
    // const float* acc, u32* k_out, u32* v_out, float* acc_out). For e < hkv * budget *
    // row_words it reads keep[e / row_words] (keep is [hkv, budget]; every entry was just
    // checked to be < t), cache words (h * t + keep) * row_words + w < hkv * t * row_words
    // (the caches are [hkv, t, d] of T, d * size = 4 * row_words bytes), and writes word e of
    // the [hkv, budget, d] outputs; acc ([hkv, t]) and acc_out ([hkv, budget]) only when has_acc.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    // TODO(platform): list every id; filled in as the launchers move to `KernelId`.
    Vec::new()
}
