//! Launch code for the selection kernels: the radix top-k of `cuda/topk.cu` (`ntkv_topk_*`)
//! and the `ntkv_select_*` kernels of `cuda/select.cu`. Every plan validates its shape in `new`;
//! every run checks the device, shape and length of each buffer before anything is enqueued.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use super::{BlockMap, ExpandShape, SegmentShape, TopkLayout, TopkOptions, TopkOrder, TopkShape};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::launch::{blocks_per_sm, grid_2d, grid_for, grid_stride, KernelId};
use crate::params::{NtkvSelectExpandParams, NtkvSelectPadParams, NtkvSelectTruncateParams, NtkvTopkParams};
use crate::tensor::{DType, Float, TensorMut, TensorRef};

const HIST_BINS: usize = 4096;
const STATE_WORDS: usize = 8;
const HIST_THREADS: u32 = 512;
const FINAL_THREADS: u32 = 1024;
const SELECT_THREADS: u32 = 256;
const SCAN_THREADS: u32 = 1024;
/// Most candidates the finalize kernel stages in shared memory.
const CAND_STAGE_MAX: usize = 8192;
/// Static shared memory of the finalize kernel, rounded up (ptxas reports 1184 bytes).
const FINAL_STATIC_SMEM: usize = 2048;
/// Static shared memory of the fused kernel, rounded up (ptxas reports 17728 bytes).
const FUSED_STATIC_SMEM: usize = 18432;
/// Every storage dtype the top-k kernels are compiled for.
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The radix top-k kernels of one dtype: `topk_hist`, `topk_filter`, `topk_finalize`,
/// `topk_fused`.
fn topk_id(op: &'static str, dtype: DType) -> KernelId {
    KernelId::new(Module::Topk, op).dtype(dtype)
}
const TOPK_OPS: [&str; 4] = ["topk_hist", "topk_filter", "topk_finalize", "topk_fused"];
/// The typed kernels of `cuda/select.cu`.
const SELECT_TYPED_OPS: [&str; 2] = ["select_pad_segments", "select_truncate"];
/// The untyped kernels of `cuda/select.cu`.
const SELECT_OPS: [&str; 3] = ["select_expand_count", "select_expand_scan", "select_expand_write"];

fn select_id(op: &'static str) -> KernelId {
    KernelId::new(Module::Select, op)
}

fn dtype_slot(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Checks that a borrowed view starts at a multiple of `align` bytes, for kernels that load
/// it in wider words than its element (a view may start anywhere inside a larger buffer).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `arg`.
pub(crate) fn check_aligned<T>(device: &Device, arg: &'static str, view: &CudaView<'_, T>, align: u64) -> Result<()> {
    let (ptr, _record) = view.device_ptr(device.stream());
    if ptr % align != 0 {
        return Err(Error::invalid(arg, format!("the view starts at {ptr:#x}, not at a multiple of {align} bytes")));
    }
    Ok(())
}

/// What one top-k launch writes, beyond the plain `[rows, k]` output of a [`TopkPlan::run`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct TopkOutput {
    /// Row length used when there are no per-row lengths (`≤ n`).
    pub uniform_len: usize,
    /// Whether the plan's lengths buffer holds valid per-row lengths.
    pub has_lengths: bool,
    /// Elements between output rows (`≥ k + tail_count`).
    pub out_stride: usize,
    /// Also write `tail_first ..` into the `tail_count` columns after the `k` selected.
    pub tail_count: usize,
    /// The first index of that tail.
    pub tail_first: usize,
}

/// The kernels of one dtype, with the dynamic shared memory of the last one prepared.
#[derive(Clone, Debug)]
struct TopkKernels {
    hist: CudaFunction,
    filter: CudaFunction,
    /// The fused kernel (one block per row) or the finalize kernel (split rows).
    last: CudaFunction,
}

/// A validated row top-k with its device scratch, reusable across calls of the same shape:
/// the layout is chosen once (from the device's SM count and the kernels' real occupancy)
/// and the scratch is allocated once, so a run only enqueues launches (plus a host-to-device
/// copy of `lengths` when given).
///
/// The contract (order, ties, NaN, padding) is the module's; see [`crate::select`].
#[derive(Debug)]
pub struct TopkPlan {
    device: Device,
    shape: TopkShape,
    options: TopkOptions,
    layout: TopkLayout,
    kernels: [TopkKernels; 3],
    smem: u32,
    cand_stage: usize,
    hist: CudaSlice<u32>,
    state: CudaSlice<u32>,
    sel: CudaSlice<u32>,
    cand: CudaSlice<u32>,
    lengths: CudaSlice<u32>,
    /// Passed as the values buffer when values are not written (never dereferenced).
    dummy_values: CudaSlice<f32>,
    /// Set while launches are being enqueued; a run that finds it set re-zeroes the scratch.
    dirty: bool,
}

impl TopkPlan {
    /// Validates `shape`, loads the kernels of every dtype, chooses the layout from the
    /// device's SM count and the histogram and filter kernels' occupancy (the lowest over
    /// the dtypes), and allocates the scratch (at most [`super::TOPK_WORKSPACE_BYTES`] plus
    /// `4 · rows` bytes).
    ///
    /// # Errors
    /// As [`TopkShape::validate`]; [`Error::KernelsNotBuilt`] without compiled kernels;
    /// driver errors from loading or allocating.
    pub fn new(device: &Device, shape: &TopkShape, options: TopkOptions) -> Result<Self> {
        shape.validate()?;
        let sm_count = device.props().sm_count.max(1) as usize;
        let mut per_sm = u32::MAX;
        for dt in DTYPES {
            for op in &TOPK_OPS[..2] {
                per_sm = per_sm.min(blocks_per_sm(&device.kernel(topk_id(op, dt))?, HIST_THREADS, 0)?);
            }
        }
        let layout = TopkLayout::choose(shape.rows, shape.n, shape.k, sm_count, per_sm as usize)?;
        let fused = layout.blocks_per_row == 1;
        // Shared memory of the finalize (or fused) kernel: the kpad sort words, then as many
        // staged candidates (8 bytes each, at most CAND_STAGE_MAX) as the device's opt-in limit
        // allows next to the kernel's static shared memory.
        let limit = device.props().max_shared_mem_per_block_optin as usize;
        let static_smem = if fused { FUSED_STATIC_SMEM } else { FINAL_STATIC_SMEM };
        let cand_stage = (limit.saturating_sub(static_smem + layout.kpad * 8) / 8).min(CAND_STAGE_MAX);
        let last_op = if fused { TOPK_OPS[3] } else { TOPK_OPS[2] };
        let load = |dt: DType| -> Result<TopkKernels> {
            let last = device.kernel(topk_id(last_op, dt))?;
            Ok(TopkKernels {
                hist: device.kernel(topk_id(TOPK_OPS[0], dt))?,
                filter: device.kernel(topk_id(TOPK_OPS[1], dt))?,
                last,
            })
        };
        let kernels = [load(DTYPES[0])?, load(DTYPES[1])?, load(DTYPES[2])?];
        let mut smem = 0;
        for k in &kernels {
            smem = device.prepare_shared_mem(&k.last, (layout.kpad + cand_stage) * 8)?;
        }
        let b = layout.rows_per_batch;
        let stream = device.stream();
        Ok(TopkPlan {
            device: device.clone(),
            shape: *shape,
            options,
            layout,
            kernels,
            smem,
            cand_stage,
            hist: stream.alloc_zeros::<u32>(b * HIST_BINS)?,
            state: stream.alloc_zeros::<u32>(b * STATE_WORDS)?,
            sel: stream.alloc_zeros::<u32>(b * shape.k)?,
            cand: stream.alloc_zeros::<u32>(b * shape.n)?,
            lengths: stream.alloc_zeros::<u32>(shape.rows)?,
            dummy_values: stream.alloc_zeros::<f32>(1)?,
            dirty: false,
        })
    }

    /// The layout chosen for this shape.
    pub fn layout(&self) -> TopkLayout {
        self.layout
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> TopkShape {
        self.shape
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the top-k of `scores [rows, n]` into `values [rows, k]` and `indices [rows, k]`
    /// (`u32`), optionally limiting row `r` to its first `lengths[r] ≤ n` elements (a host
    /// slice: it is validated on the host and copied into the plan's buffer).
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`] for a tensor of another device; [`Error::Shape`] for a
    /// buffer of another shape or length; as [`TopkShape::validate_lengths`]; driver errors.
    /// Nothing is written on an error.
    pub fn run<T: Float>(
        &mut self,
        scores: &impl TensorRef<T>,
        lengths: Option<&[u32]>,
        values: &mut impl TensorMut<T>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let TopkShape { rows, n, k } = self.shape;
        self.device.check_buffer("scores", scores, &[rows, n])?;
        self.device.check_buffer("values", values, &[rows, k])?;
        self.device.check_buffer("indices", indices, &[rows, k])?;
        if let Some(l) = lengths {
            self.shape.validate_lengths(l)?;
            self.device.stream().memcpy_htod(l, &mut self.lengths)?;
        }
        let out =
            TopkOutput { uniform_len: n, has_lengths: lengths.is_some(), out_stride: k, tail_count: 0, tail_first: 0 };
        let mut vv = values.cuda_view_mut();
        let mut iv = indices.cuda_view_mut();
        self.launch(&scores.cuda_view(), out, Some(&mut vv), &mut iv)
    }

    /// The per-row lengths buffer (`rows` entries), for launchers in the crate that fill it
    /// on the device before a launch with `has_lengths`.
    pub(crate) fn lengths_mut(&mut self) -> &mut CudaSlice<u32> {
        &mut self.lengths
    }

    /// Enqueues the kernels for every row batch. `values` of `None` writes indices only.
    pub(crate) fn launch<T: Float>(
        &mut self,
        scores: &CudaView<'_, T>,
        out: TopkOutput,
        mut values: Option<&mut CudaViewMut<'_, T>>,
        indices: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        let TopkShape { rows, n, k } = self.shape;
        // What the kernels index: scores rows*n, outputs rows*out_stride, row lengths <= n.
        let out_len = (rows - 1)
            .checked_mul(out.out_stride)
            .and_then(|x| x.checked_add(k + out.tail_count))
            .ok_or_else(|| Error::internal("top-k output extent overflows"))?;
        if scores.len() != rows * n
            || indices.len() < out_len
            || out.out_stride < k + out.tail_count
            || out.tail_first + out.tail_count > u32::MAX as usize
            || out.uniform_len > n
            || values.as_ref().is_some_and(|v| v.len() < out_len)
        {
            return Err(Error::internal("top-k buffers do not match the plan"));
        }
        let stream = self.device.stream().clone();
        if self.dirty {
            stream.memset_zeros(&mut self.hist)?;
            stream.memset_zeros(&mut self.state)?;
        }
        self.dirty = true;
        let fns = self.kernels[dtype_slot(T::DTYPE)].clone();
        let fused = self.layout.blocks_per_row == 1;
        let write_values = values.is_some();
        let lay = self.layout;
        let mut row_base = 0usize;
        while row_base < rows {
            let batch = lay.rows_per_batch.min(rows - row_base);
            let params = NtkvTopkParams {
                row_stride: to_u64("n", n)?,
                cand_stride: to_u64("n", n)?,
                out_stride: to_u64("out_stride", out.out_stride)?,
                row_base: to_u32("rows", row_base)?,
                rows: to_u32("rows", batch)?,
                n: to_u32("n", n)?,
                k: to_u32("k", k)?,
                uniform_len: to_u32("lengths", out.uniform_len)?,
                has_lengths: u32::from(out.has_lengths),
                blocks_per_row: to_u32("blocks_per_row", lay.blocks_per_row)?,
                chunk: to_u32("chunk", lay.chunk)?,
                kpad: to_u32("k", lay.kpad)?,
                order_by_index: u32::from(self.options.order == TopkOrder::Index),
                write_values: u32::from(write_values),
                reverse_filter: 1,
                cand_stage: to_u32("cand_stage", self.cand_stage)?,
                tail_count: to_u32("recent", out.tail_count)?,
                tail_first: to_u32("recent", out.tail_first)?,
                fin_blocks: to_u32("k", lay.finalize_blocks)?,
            };
            let fin = if fused {
                grid_for(&self.device, &fns.last, FINAL_THREADS, self.smem, batch, false)?
            } else {
                grid_2d(lay.finalize_blocks, batch, FINAL_THREADS, self.smem)?
            };
            if !fused {
                let split = grid_2d(lay.blocks_per_row, batch, HIST_THREADS, 0)?;
                let mut b = stream.launch_builder(&fns.hist);
                b.arg(&params).arg(scores).arg(&self.lengths).arg(&mut self.hist).arg(&mut self.state);
                // SAFETY: ntkv_topk_hist_<T>(NtkvTopkParams, const T* x, const u32* lengths, u32* hist,
                // u32* state). Block (x, y) reads x[(row_base + y) * n + i] for i < min(len, n) with
                // len = lengths[row_base + y] (lengths holds `rows` entries) or uniform_len <= n;
                // scores holds rows * n elements. It writes hist[y * 4096 .. +4096] and
                // state[y * 8 .. +8] for y < batch <= rows_per_batch, the sizes of both buffers.
                unsafe { b.launch(split) }?;

                let mut b = stream.launch_builder(&fns.filter);
                b.arg(&params)
                    .arg(scores)
                    .arg(&self.lengths)
                    .arg(&mut self.state)
                    .arg(&mut self.sel)
                    .arg(&mut self.cand);
                // SAFETY: ntkv_topk_filter_<T>(NtkvTopkParams, const T* x, const u32* lengths,
                // u32* state, u32* sel, u32* cand). Reads x as the histogram kernel does; appends to
                // sel[y * k + pos] only for pos < k and to cand[y * n + pos] only for pos < n
                // (cand_stride = n), inside buffers of rows_per_batch * k and rows_per_batch * n.
                unsafe { b.launch(split) }?;
            }
            let mut b = stream.launch_builder(&fns.last);
            b.arg(&params).arg(scores);
            if fused {
                b.arg(&self.lengths).arg(&mut self.sel).arg(&mut self.cand);
            } else {
                b.arg(&mut self.hist).arg(&mut self.state).arg(&self.sel).arg(&self.cand);
            }
            match values.as_deref_mut() {
                Some(v) => b.arg(v),
                None => b.arg(&mut self.dummy_values),
            };
            b.arg(&mut *indices);
            // SAFETY: fused: ntkv_topk_fused_<T>(NtkvTopkParams, const T* x, const u32* lengths,
            // u32* sel, u32* cand, T* out_val, u32* out_idx); split: ntkv_topk_finalize_<T>(
            // NtkvTopkParams, const T* x, u32* hist, u32* state, const u32* sel, const u32* cand,
            // T* out_val, u32* out_idx), grid (finalize_blocks, batch) with finalize_blocks a power
            // of two <= kpad writing slots slice * kpad / finalize_blocks + s < k. Row y < batch
            // reads x[(row_base + y) * n + i] only for
            // i < min(len, n) (lengths holds `rows` entries, uniform_len <= n, scores holds
            // rows * n), appends to or reads sel[y * k + pos] for pos < k and cand[y * n + pos]
            // for pos < n (buffers of rows_per_batch * k and rows_per_batch * n), gathers x only at
            // indices clamped to < n, and writes out_idx (and out_val when write_values; the
            // dummy is never dereferenced otherwise) at (row_base + y) * out_stride + s for
            // s < k + tail_count, inside out_len (checked above). The last finalize block of a
            // row (ticket) re-zeroes hist[y * 4096 ..] and state[y * 8 ..]. Both use (kpad + cand_stage) * 8 bytes of
            // dynamic shared memory, the size prepared in `new` and passed in `fin`.
            unsafe { b.launch(fin) }?;
            row_base += batch;
        }
        self.dirty = false;
        Ok(())
    }
}

/// A validated top-k over the segments of a ragged array (see [`SegmentShape`]): each
/// segment is copied into a row of a padded `[segments, max_len]` scratch matrix (one
/// launch), the row top-k runs over it with the segment lengths, and a per-segment `ks`
/// pads the slots past `ks[s]` (one more launch).
///
/// The output is `values [segments, k]` (the scores' dtype) and `indices [segments, k]`
/// (`u32`, local to the segment), with the module's contract (descending, ties by lower
/// index, NaN below everything, padding `u32::MAX` / `-inf`).
pub struct SegmentTopkPlan<T> {
    device: Device,
    shape: SegmentShape,
    topk: TopkPlan,
    padded: CudaSlice<T>,
    indptr: CudaSlice<u32>,
    ks: CudaSlice<u32>,
    pad: CudaFunction,
    truncate: CudaFunction,
}

impl<T> std::fmt::Debug for SegmentTopkPlan<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentTopkPlan").field("shape", &self.shape).field("topk", &self.topk).finish()
    }
}

impl<T: Float> SegmentTopkPlan<T> {
    /// Validates `shape`, builds the row top-k plan of `[segments, max_len]` top-`k` and
    /// allocates the padded scratch (`segments · max_len` elements of `T`).
    ///
    /// # Errors
    /// As [`SegmentShape::validate`] and [`TopkPlan::new`].
    pub fn new(device: &Device, shape: &SegmentShape) -> Result<Self> {
        shape.validate()?;
        let rows = TopkShape { rows: shape.segments, n: shape.max_len, k: shape.k };
        let topk = TopkPlan::new(device, &rows, TopkOptions::default())?;
        let stream = device.stream();
        Ok(SegmentTopkPlan {
            device: device.clone(),
            shape: *shape,
            topk,
            padded: stream
                .alloc_zeros::<T>(crate::tensor::checked_numel::<T>("scores", &[shape.segments, shape.max_len])?)?,
            indptr: stream.alloc_zeros::<u32>(shape.segments + 1)?,
            ks: stream.alloc_zeros::<u32>(shape.segments)?,
            pad: device.kernel(select_id(SELECT_TYPED_OPS[0]).dtype(T::DTYPE))?,
            truncate: device.kernel(select_id(SELECT_TYPED_OPS[1]).dtype(T::DTYPE))?,
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> SegmentShape {
        self.shape
    }

    /// Runs the segmented top-k of `scores [total]` with host `indptr [segments + 1]` (and
    /// optional host `ks [segments]`, each `≤ k`) into `values` and `indices` `[segments, k]`.
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] for a buffer of another device, shape or
    /// length; as [`SegmentShape::validate_indptr`] and [`SegmentShape::validate_ks`];
    /// driver errors. Nothing is written on an error.
    pub fn run(
        &mut self,
        scores: &impl TensorRef<T>,
        indptr: &[u32],
        ks: Option<&[u32]>,
        values: &mut impl TensorMut<T>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let SegmentShape { segments, total, max_len, k } = self.shape;
        self.device.check_buffer("scores", scores, &[total])?;
        self.device.check_buffer("values", values, &[segments, k])?;
        self.device.check_buffer("indices", indices, &[segments, k])?;
        self.shape.validate_indptr(indptr)?;
        if let Some(ks) = ks {
            self.shape.validate_ks(ks)?;
        }
        let stream = self.device.stream().clone();
        stream.memcpy_htod(indptr, &mut self.indptr)?;
        let cfg = grid_for(&self.device, &self.pad, SELECT_THREADS, 0, segments, true)?;
        let pad = NtkvSelectPadParams {
            total: to_u64("scores", total)?,
            segments: to_u32("indptr", segments)?,
            max_len: to_u32("max_len", max_len)?,
        };
        let sv = scores.cuda_view();
        let mut b = stream.launch_builder(&self.pad);
        b.arg(&pad).arg(&self.indptr).arg(&sv).arg(&mut self.padded).arg(self.topk.lengths_mut());
        // SAFETY: ntkv_select_pad_segments_<T>(NtkvSelectPadParams {total, segments, max_len},
        // const u32* indptr, const T* x, T* out, u32* lengths). For s < segments it reads indptr[s] and
        // indptr[s + 1] (segments + 1 entries), clamps both to total (scores holds total
        // elements) and the length to max_len, reads x[start + i] for i < len (start + len <=
        // total), writes out[s * max_len + i] (padded holds segments * max_len) and lengths[s]
        // (the top-k plan's buffer of `rows = segments` entries).
        unsafe { b.launch(cfg) }?;
        let out = TopkOutput { uniform_len: max_len, has_lengths: true, out_stride: k, tail_count: 0, tail_first: 0 };
        let mut vv = values.cuda_view_mut();
        let mut iv = indices.cuda_view_mut();
        self.topk.launch(&self.padded.as_view(), out, Some(&mut vv), &mut iv)?;
        if let Some(ks) = ks {
            stream.memcpy_htod(ks, &mut self.ks)?;
            let cfg = grid_stride(&self.device, &self.truncate, SELECT_THREADS, segments * k)?;
            let trunc = NtkvSelectTruncateParams { rows: pad.segments, k: to_u32("k", k)?, write_values: 1, _pad0: 0 };
            let mut b = stream.launch_builder(&self.truncate);
            b.arg(&trunc).arg(&self.ks).arg(&mut vv).arg(&mut iv);
            // SAFETY: ntkv_select_truncate_<T>(NtkvSelectTruncateParams {rows, k, write_values},
            // const u32* ks, T* values, u32* indices) reads ks[r] for r < rows (segments entries) and writes
            // values[e], indices[e] for e < rows * k, the length of both outputs (checked above).
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }
}

/// A validated block expansion (see [`ExpandShape`] for the contract): selected block ids to
/// sorted, unique CSR token lists, in three launches (per-row sort and merge of the blocks'
/// intervals; a scan of the row counts into `indptr`; the token writes).
pub struct ExpandPlan {
    device: Device,
    shape: ExpandShape,
    /// The kernels' parameters, fixed by the shape (converted and checked once, here).
    params: NtkvSelectExpandParams,
    smem: u32,
    iv: CudaSlice<u64>,
    off: CudaSlice<u32>,
    n_iv: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    /// Passed as the ranges map for fixed blocks (never dereferenced).
    dummy_ranges: CudaSlice<u32>,
    count: CudaFunction,
    scan: CudaFunction,
    write: CudaFunction,
}

crate::launch::plan_debug!(ExpandPlan, "ExpandPlan", shape);

impl ExpandPlan {
    /// Validates `shape`, loads the kernels, prepares `8 · kb.next_power_of_two()` bytes of
    /// shared memory for the sort, and allocates `16 · rows · kb` bytes of scratch.
    ///
    /// # Errors
    /// As [`ExpandShape::validate`]; [`Error::TooLarge`] when the sort does not fit the
    /// device's shared memory; driver errors.
    pub fn new(device: &Device, shape: &ExpandShape) -> Result<Self> {
        shape.validate()?;
        let kbpad = shape.kb.next_power_of_two();
        let count = device.kernel(select_id(SELECT_OPS[0]))?;
        let smem = device.prepare_shared_mem(&count, kbpad * 8)?;
        let stream = device.stream();
        let n = shape.rows * shape.kb;
        let (block_size, shared) = match shape.map {
            BlockMap::Fixed { block_size } => (block_size, false),
            BlockMap::Ranges { shared } => (0, shared),
        };
        let params = NtkvSelectExpandParams {
            rows: to_u32("blocks", shape.rows)?,
            kb: to_u32("blocks", shape.kb)?,
            nb: to_u32("blocks", shape.nb)?,
            t: to_u32("lengths", shape.t)?,
            block_size: to_u32("block_size", block_size)?,
            map_shared: u32::from(shared),
            kbpad: to_u32("blocks", kbpad)?,
            _pad0: 0,
        };
        Ok(ExpandPlan {
            device: device.clone(),
            shape: *shape,
            params,
            smem,
            iv: stream.alloc_zeros::<u64>(n)?,
            off: stream.alloc_zeros::<u32>(n)?,
            n_iv: stream.alloc_zeros::<u32>(shape.rows)?,
            counts: stream.alloc_zeros::<u32>(shape.rows)?,
            dummy_ranges: stream.alloc_zeros::<u32>(2)?,
            count,
            scan: device.kernel(select_id(SELECT_OPS[1]))?,
            write: device.kernel(select_id(SELECT_OPS[2]))?,
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> ExpandShape {
        self.shape
    }

    /// Expands fixed-size blocks ([`BlockMap::Fixed`]): `blocks [rows, kb]` and `lengths
    /// [rows]` (`u32`) into `indptr [rows + 1]` and `indices [m]` with `m ≥`
    /// [`ExpandShape::capacity`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ranges` when the plan's map is
    /// [`BlockMap::Ranges`]; as [`Self::run_ranges`].
    pub fn run(
        &mut self,
        blocks: &impl TensorRef<u32>,
        lengths: &impl TensorRef<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        if !matches!(self.shape.map, BlockMap::Fixed { .. }) {
            return Err(Error::invalid("ranges", "this plan expands ranges: call run_ranges with the map"));
        }
        self.enqueue(blocks, None, lengths, indptr, indices)
    }

    /// Expands blocks through a ranges map ([`BlockMap::Ranges`]): `ranges` is `[nb, 2]`
    /// (shared) or `[rows, nb, 2]` (`u32` start, end pairs).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `ranges` when the plan's map is fixed;
    /// [`Error::DeviceMismatch`] or [`Error::Shape`] for a buffer of another device, shape or
    /// length (`indices` must be 1-D and hold at least [`ExpandShape::capacity`] entries);
    /// driver errors. Nothing is written on an error.
    pub fn run_ranges(
        &mut self,
        blocks: &impl TensorRef<u32>,
        ranges: &impl TensorRef<u32>,
        lengths: &impl TensorRef<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let Some(want) = self.shape.ranges_shape() else {
            return Err(Error::invalid("ranges", "this plan expands fixed-size blocks: call run"));
        };
        self.device.check_buffer("ranges", ranges, &want)?;
        self.enqueue(blocks, Some(&ranges.cuda_view()), lengths, indptr, indices)
    }

    fn enqueue(
        &mut self,
        blocks: &impl TensorRef<u32>,
        ranges: Option<&CudaView<'_, u32>>,
        lengths: &impl TensorRef<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let ExpandShape { rows, kb, .. } = self.shape;
        self.device.check_buffer("blocks", blocks, &[rows, kb])?;
        self.device.check_buffer("lengths", lengths, &[rows])?;
        self.device.check_buffer("indptr", indptr, &[rows + 1])?;
        let cap = self.shape.capacity()?;
        self.device.check_tensor("indices", indices)?;
        if indices.shape().len() != 1 || indices.shape()[0] != indices.len() || indices.len() < cap {
            return Err(Error::shape("indices", &[cap], indices.shape()));
        }
        let params = self.params;
        let stream = self.device.stream().clone();
        let (bv, lv) = (blocks.cuda_view(), lengths.cuda_view());
        let cfg = grid_for(&self.device, &self.count, SELECT_THREADS, self.smem, rows, true)?;
        let mut b = stream.launch_builder(&self.count);
        b.arg(&params).arg(&bv).arg(&lv);
        match ranges {
            Some(r) => b.arg(r),
            None => b.arg(&self.dummy_ranges),
        };
        b.arg(&mut self.iv).arg(&mut self.off).arg(&mut self.n_iv).arg(&mut self.counts);
        // SAFETY: ntkv_select_expand_count(NtkvSelectExpandParams {rows, kb, nb, t, block_size,
        // map_shared, kbpad}, const u32* blocks, const u32* lengths, const u32* ranges,
        // u64* iv, u32* off, u32* n_iv, u32* counts). For r < rows it reads blocks[r * kb + i]
        // (i < kb; blocks is [rows, kb]) and lengths[r] ([rows]); for an id b < nb in ranges mode
        // (block_size = 0) it reads ranges[(m * nb + b) * 2 + {0, 1}] with m = 0 (shared, [nb, 2])
        // or m = r ([rows, nb, 2]), both checked; with fixed blocks the dummy is never read. It
        // writes iv, off [rows * kb] at r * kb + j for j < kb (at most kb merged intervals), and
        // n_iv, counts [rows] at r. Dynamic shared memory: kbpad words of 8 bytes, prepared.
        unsafe { b.launch(cfg) }?;

        let mut ipv = indptr.cuda_view_mut();
        let scan = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SCAN_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = stream.launch_builder(&self.scan);
        b.arg(&params).arg(&self.counts).arg(&mut ipv);
        // SAFETY: ntkv_select_expand_scan(NtkvSelectExpandParams, const u32* counts, u32* indptr), one block:
        // reads counts[r] for r < rows and writes indptr[0 ..= rows] ([rows + 1], checked). Each
        // count is at most max_tokens_per_row and rows * that fits u32 (ExpandShape::capacity),
        // so no sum wraps.
        unsafe { b.launch(scan) }?;

        let cfg = grid_for(&self.device, &self.write, SELECT_THREADS, 0, rows, true)?;
        let mut iov = indices.cuda_view_mut();
        let ipr = ipv.as_view();
        let mut b = stream.launch_builder(&self.write);
        b.arg(&params).arg(&self.iv).arg(&self.off).arg(&self.n_iv).arg(&ipr).arg(&mut iov);
        // SAFETY: ntkv_select_expand_write(NtkvSelectExpandParams, const u64* iv, const u32* off,
        // const u32* n_iv, const u32* indptr, u32* indices). For r < rows it reads n_iv[r]
        // (clamped to kb), iv and off at r * kb + i, indptr[r]; it writes indices[indptr[r] +
        // off + j] for the j below each merged interval's length. Those positions are below
        // indptr[r] + counts[r] <= indptr[rows] <= rows * max_tokens_per_row = capacity <=
        // indices.len() (checked above), since an interval never leaves [0, min(len, t)) and,
        // for fixed blocks, the merged union of at most kb blocks holds at most kb * block_size.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = Vec::new();
    for dt in DTYPES {
        ids.extend(TOPK_OPS.iter().map(|op| topk_id(op, dt)));
        ids.extend(SELECT_TYPED_OPS.iter().map(|op| select_id(op).dtype(dt)));
    }
    ids.extend(SELECT_OPS.iter().map(|op| select_id(op)));
    ids
}
