//! Launch code of the quantization kernels (`cuda/quant.cu`).
//!
//! Every function checks the extents its kernel will touch against the buffers' lengths
//! before launching, so a kernel never reads or writes out of bounds even when a caller
//! inside the crate got a region wrong.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::f16;

use super::{value_error, Axis, QuantSpec, Region};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::launch::{self, KernelId};
use crate::params::{NtkvMikvRowsParams, NtkvQuantParams, NtkvQuantScanParams};
use crate::tensor::{DType, Float};

const THREADS: u32 = 256;

/// The quantize/dequantize/scan kernels, one per dtype: `quant_{op}` with `op` one of
/// [`VALUE_OPS`].
fn value_kernel(op: &'static str, dtype: DType) -> KernelId {
    KernelId::new(Module::Quant, op).dtype(dtype)
}

/// The ops that exist once per value dtype.
const VALUE_OPS: [&str; 5] = [
    "quant_quantize_token",
    "quant_quantize_channel",
    "quant_dequantize_token",
    "quant_dequantize_channel",
    "quant_scan",
];

/// The MiKV row moves (f16 only): `mikv_{gather,scatter,residual,append}`.
fn rows_kernel(op: &'static str) -> KernelId {
    KernelId::new(Module::Quant, op)
}

const ROW_OPS: [&str; 4] = ["mikv_gather", "mikv_scatter", "mikv_residual", "mikv_append"];

/// A launch over `heads` (grid y, capped at 65535 with the kernels striding over the rest)
/// times `items_per_head` (grid x, grid-stride). The grid is one full wave: as many blocks as
/// the driver says fit on all SMs at once (register-limited occupancy), so no block waits
/// for a second wave and the grid-stride loops balance the work.
fn grid(device: &Device, f: &CudaFunction, heads: usize, items_per_head: usize) -> Result<LaunchConfig> {
    launch::resident_grid_2d(device, f, THREADS, 0, items_per_head, heads)
}

fn quant_params(spec: &QuantSpec, r: &Region) -> Result<NtkvQuantParams> {
    Ok(NtkvQuantParams {
        heads: to_u64("region", r.heads)?,
        tokens: to_u64("region", r.tokens)?,
        x_offset: to_u64("region", r.x_off)?,
        x_head_stride: to_u64("region", r.x_hs)?,
        codes_offset: to_u64("region", r.c_off)?,
        codes_head_stride: to_u64("region", r.c_hs)?,
        sm_offset: to_u64("region", r.s_off)?,
        sm_head_stride: to_u64("region", r.s_hs)?,
        dim: to_u32("dim", r.dim)?,
        group: to_u32("group", spec.group)?,
        bits: spec.bits,
        _pad0: 0,
    })
}

/// Checks the region's shape constraints the kernels rely on: PerToken needs whole groups
/// along `dim`, PerChannel whole groups along `tokens` (so every group and word is complete).
fn check_region(spec: &QuantSpec, r: &Region, x_len: usize, codes_len: usize, sm_len: usize) -> Result<()> {
    spec.validate()?;
    match spec.axis {
        Axis::PerToken if r.dim % spec.group != 0 => {
            return Err(Error::invalid("x", "dim is not a multiple of the group"));
        }
        Axis::PerChannel if r.tokens % spec.group != 0 => {
            return Err(Error::invalid("x", "tokens is not a multiple of the group"));
        }
        _ => {}
    }
    r.check(spec, x_len, codes_len, sm_len)
}

/// A fresh two-slot error flag, zeroed with a stream-ordered memset (no host copy). The
/// kernels keep `!index` of the lowest bad value with `atomicMax`, so 0 means none.
pub(crate) fn new_flags(device: &Device) -> Result<CudaSlice<u64>> {
    Ok(device.stream().alloc_zeros::<u64>(2)?)
}

/// Decodes one flag slot: `None` for 0, else the flat index.
fn flag_index(v: Option<&u64>) -> Option<usize> {
    v.copied().filter(|&f| f != 0).map(|f| usize::try_from(!f).unwrap_or(usize::MAX))
}

/// Reads the flags back (synchronizes) and turns them into the error of the lowest bad index.
/// Slot 0 holds the lowest NaN/Inf, slot 1 the lowest finite value of magnitude ≥ 65520.
/// Flags that are set are zeroed again (a stream-ordered memset, only on error), so the same
/// buffer serves the next launch.
pub(crate) fn take_flags(flags: &mut CudaSlice<u64>) -> Result<()> {
    let stream = flags.stream().clone();
    let v = stream.clone_dtoh(&*flags)?;
    let result = flag_error("x", flag_index(v.first()), flag_index(v.get(1)));
    if result.is_err() {
        stream.memset_zeros(flags)?;
    }
    result
}

fn flag_error(arg: &'static str, nonfinite: Option<usize>, out_of_range: Option<usize>) -> Result<()> {
    match (nonfinite, out_of_range) {
        (None, None) => Ok(()),
        (Some(i), Some(j)) if j < i => Err(value_error(arg, j, false)),
        (Some(i), _) => Err(value_error(arg, i, true)),
        (None, Some(j)) => Err(value_error(arg, j, false)),
    }
}

/// Scans `x` on the device (16-byte loads) and returns the error of its first NaN/Inf or
/// out-of-f16-range value. `flags` (two zeroed slots) are left zeroed. Synchronizes once
/// (reads two `u64` back).
pub(crate) fn scan_range<T: Float>(device: &Device, x: &CudaView<'_, T>, flags: &mut CudaSlice<u64>) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    if flags.len() < 2 {
        return Err(Error::shape("flags", &[2], &[flags.len()]));
    }
    let f = device.kernel(value_kernel("quant_scan", T::DTYPE))?;
    let params = NtkvQuantScanParams { n: to_u64("x", x.len())? };
    let cfg = grid(device, &f, 1, x.len().div_ceil(16 / std::mem::size_of::<T>()))?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(x).arg(&mut *flags);
    // SAFETY: ntkv_quant_scan_<dtype>(NtkvQuantScanParams, const T* x, u64* flags) reads
    // x[0..n) with n = x.len() (16-byte vectors over the first n/V·V values, the rest one by
    // one; cudarc allocations are 256-byte aligned) and atomically updates flags[0..2), which
    // holds at least 2 (checked above).
    unsafe { b.launch(cfg) }?;
    take_flags(flags)
}

/// Quantizes the region of `x` into `codes`, `scales` and `mins`; bad values are flagged in
/// `flags` (lowest flat index of `x`, atomically) while the outputs are still written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_region<T: Float>(
    device: &Device,
    spec: &QuantSpec,
    r: &Region,
    x: &CudaView<'_, T>,
    codes: &mut CudaViewMut<'_, u32>,
    scales: &mut CudaViewMut<'_, f16>,
    mins: &mut CudaViewMut<'_, f16>,
    flags: &mut CudaSlice<u64>,
) -> Result<()> {
    check_region(spec, r, x.len(), codes.len(), scales.len().min(mins.len()))?;
    if flags.len() < 2 {
        return Err(Error::shape("flags", &[2], &[flags.len()]));
    }
    if r.heads == 0 || r.tokens == 0 || r.dim == 0 {
        return Ok(());
    }
    let params = quant_params(spec, r)?;
    let per_head = r.tokens * r.dim;
    let (op, items) = match spec.axis {
        Axis::PerToken => ("quant_quantize_token", per_head / spec.group),
        Axis::PerChannel => ("quant_quantize_channel", per_head / spec.group),
    };
    let f = device.kernel(value_kernel(op, T::DTYPE))?;
    let cfg = grid(device, &f, r.heads, items)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(x).arg(codes).arg(scales).arg(mins).arg(flags);
    // SAFETY: ntkv_quant_quantize_{token,channel}_<dtype>(NtkvQuantParams, const T* x, u32*
    // codes, half* scales, half* mins, u64* flags). For each head h < heads it reads values
    // [x_off + h·x_hs, + tokens·dim), writes words [c_off + h·c_hs, + tokens·dim/E) and
    // scales/mins [s_off + h·s_hs, + tokens·dim/group); check_region proved each range inside
    // its buffer, and that every group is whole. flags holds the 2 u64 it may update. PerToken
    // vector accesses are aligned: offsets and strides are multiples of dim, a multiple of the
    // group, so each group's values start on a group·sizeof(T) ≥ 64-byte boundary and its
    // words on a multiple of group/E words (its 16-, 8- or 4-byte stores); the base
    // allocations are 256-byte aligned.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Dequantizes the region's codes into `out` (indexed like the region's values).
pub(crate) fn dequantize_region<T: Float>(
    device: &Device,
    spec: &QuantSpec,
    r: &Region,
    codes: &CudaView<'_, u32>,
    scales: &CudaView<'_, f16>,
    mins: &CudaView<'_, f16>,
    out: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    check_region(spec, r, out.len(), codes.len(), scales.len().min(mins.len()))?;
    if r.heads == 0 || r.tokens == 0 || r.dim == 0 {
        return Ok(());
    }
    let params = quant_params(spec, r)?;
    let items = r.tokens * r.dim / spec.codes_per_word();
    let op = match spec.axis {
        Axis::PerToken => "quant_dequantize_token",
        Axis::PerChannel => "quant_dequantize_channel",
    };
    let f = device.kernel(value_kernel(op, T::DTYPE))?;
    let cfg = grid(device, &f, r.heads, items)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(codes).arg(scales).arg(mins).arg(out);
    // SAFETY: ntkv_quant_dequantize_{token,channel}_<dtype>(NtkvQuantParams, const u32* codes,
    // const half* scales, const half* mins, T* out): per head it reads words [c_off + h·c_hs,
    // + tokens·dim/E), scales/mins [s_off + h·s_hs, + tokens·dim/group) and writes values
    // [x_off + h·x_hs, + tokens·dim); check_region proved each range inside its buffer.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Parameters of a MiKV row move; see `NtkvMikvRowsParams` in the header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub heads: usize,
    pub dim: usize,
    pub rows: usize,
    pub src_hs: usize,
    pub dst_hs: usize,
    pub src_rows: usize,
    pub dst_rows: usize,
    pub first: usize,
    pub ring: usize,
    /// For [`RowCopy::Residual`]: copy dense rows into the ring instead of ring rows out.
    pub to_ring: bool,
}

impl Rows {
    fn params(&self) -> Result<NtkvMikvRowsParams> {
        Ok(NtkvMikvRowsParams {
            heads: to_u64("rows", self.heads)?,
            src_head_stride: to_u64("rows", self.src_hs)?,
            dst_head_stride: to_u64("rows", self.dst_hs)?,
            dim: to_u32("dim", self.dim)?,
            rows: to_u32("rows", self.rows)?,
            src_rows: to_u32("rows", self.src_rows)?,
            dst_rows: to_u32("rows", self.dst_rows)?,
            first: to_u32("first", self.first)?,
            ring: to_u32("ring", self.ring)?,
            to_ring: u32::from(self.to_ring),
            _pad0: 0,
        })
    }

    /// One past the last index of a buffer of `heads` blocks of `n_rows` rows at stride `hs`.
    /// Saturates on overflow, so an absurd request fails the length check instead of
    /// wrapping around to a small extent.
    fn extent(&self, hs: usize, n_rows: usize) -> usize {
        if self.heads == 0 || n_rows == 0 {
            0
        } else {
            (self.heads - 1).saturating_mul(hs).saturating_add(n_rows.saturating_mul(self.dim))
        }
    }
}

fn need(arg: &'static str, want: usize, have: usize) -> Result<()> {
    if want > have {
        Err(Error::shape(arg, &[want], &[have]))
    } else {
        Ok(())
    }
}

/// Which way an indexed row move goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowMove {
    /// `dst[h, k] = src[h, idx[h, k]]` for `k < rows` (zero rows past `counts[h]`).
    Gather,
    /// `dst[h, idx[h, k]] = src[h, k]` for `k < counts[h]` and `idx < dst_rows`.
    Scatter,
}

/// The gather or scatter of MiKV's important rows.
pub(crate) fn move_rows(
    device: &Device,
    dir: RowMove,
    m: &Rows,
    src: &CudaView<'_, f16>,
    idx: &CudaView<'_, u32>,
    counts: &CudaView<'_, u32>,
    dst: &mut CudaViewMut<'_, f16>,
) -> Result<()> {
    // The dense side holds src_rows / dst_rows rows per head, the packed side `rows`.
    let (src_rows, dst_rows, op) = match dir {
        RowMove::Gather => (m.src_rows, m.rows, "mikv_gather"),
        RowMove::Scatter => (m.rows, m.dst_rows, "mikv_scatter"),
    };
    need("src", m.extent(m.src_hs, src_rows), src.len())?;
    need("dst", m.extent(m.dst_hs, dst_rows), dst.len())?;
    need("idx", m.heads.saturating_mul(m.rows), idx.len())?;
    need("counts", m.heads, counts.len())?;
    if m.heads == 0 || m.rows == 0 || m.dim == 0 {
        return Ok(());
    }
    let params = m.params()?;
    let f = device.kernel(rows_kernel(op))?;
    let cfg = grid(device, &f, m.heads, m.rows * m.dim)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(src).arg(idx).arg(counts).arg(dst);
    // SAFETY: ntkv_mikv_{gather,scatter}(NtkvMikvRowsParams, const half* src, const u32* idx,
    // const u32* counts, half* dst) reads counts[h] and idx[h·rows + k] for h < heads, k < rows
    // (lengths checked above). Gather reads src rows only when idx < src_rows and writes the
    // `rows` packed rows of dst; scatter reads the `rows` packed rows of src and writes dst rows
    // only when idx < dst_rows. Both buffers hold heads blocks of the row counts checked above
    // at their strides.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The row copies with one source and no index list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowCopy {
    /// `dst[h, t] = src[h, t % ring]` for `first ≤ t < first + rows` (or, with `to_ring`,
    /// `dst[h, t % ring] = src[h, t]`); rows outside `src_rows` / `dst_rows` are skipped.
    Residual,
    /// `dst[h, first] = src[h]`: one new token per head into its ring slot.
    Append,
}

/// Launches the [`RowCopy`] `what` over the heads of `m`.
pub(crate) fn copy_rows(
    device: &Device,
    what: RowCopy,
    m: &Rows,
    src: &CudaView<'_, f16>,
    dst: &mut CudaViewMut<'_, f16>,
) -> Result<()> {
    let (op, items) = match what {
        RowCopy::Residual => {
            need("src", m.extent(m.src_hs, m.src_rows), src.len())?;
            need("dst", m.extent(m.dst_hs, m.dst_rows), dst.len())?;
            ("mikv_residual", if m.ring == 0 { 0 } else { m.rows * m.dim })
        }
        RowCopy::Append => {
            need("token", m.extent(m.src_hs, 1), src.len())?;
            need("ring", m.extent(m.dst_hs, m.dst_rows), dst.len())?;
            if m.first >= m.dst_rows {
                return Err(Error::invalid("slot", "ring slot out of range"));
            }
            ("mikv_append", m.dim)
        }
    };
    if m.heads == 0 || items == 0 {
        return Ok(());
    }
    let params = m.params()?;
    let f = device.kernel(rows_kernel(op))?;
    let cfg = grid(device, &f, m.heads, items)?;
    let mut b = device.stream().launch_builder(&f);
    b.arg(&params).arg(src).arg(dst);
    // SAFETY: ntkv_mikv_{residual,append}(NtkvMikvRowsParams, const half* src, half* dst).
    // Residual reads src rows (t or t % ring) only when < src_rows and writes dst rows (t %
    // ring or t) only when < dst_rows; append reads src[h·src_hs + d] and writes dst[h·dst_hs +
    // first·dim + d] for d < dim, h < heads, with first < dst_rows. Both buffers hold heads
    // blocks of those row counts at their strides (checked above).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    let mut ids: Vec<KernelId> =
        VALUE_OPS.iter().flat_map(|&op| [DType::F32, DType::F16, DType::BF16].map(|dt| value_kernel(op, dt))).collect();
    ids.extend(ROW_OPS.iter().map(|&op| rows_kernel(op)));
    ids
}
