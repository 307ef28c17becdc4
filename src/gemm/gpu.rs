//! Launchers of the split-K GEMM (crate-private): the kernel choice, the split choice, the
//! GEMM launch into f32 partials and the reduction into a strided `C`. [`super::GemmPlan`]
//! validates every shape first; each launcher re-checks the extents its kernel touches.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::gemm::{GemmShape, Precision};
use crate::launch::{self, KernelId};
use crate::params::{NtkvNtkGemmParams, NtkvNtkReduceParams};
use crate::tensor::{DType, Float};

/// Rows and columns of C per GEMM block (`kTile` in ntk.cu).
pub(crate) const TILE: usize = 128;
/// k per shared-memory stage (`kDepth`).
pub(crate) const DEPTH: usize = 32;
/// Dynamic shared memory of each GEMM flavour; ntk.cu static_asserts the same numbers.
const SMEM_FFMA: usize = 67584;
const SMEM_TF32: usize = 73728;
const SMEM_BF16: usize = 40960;
const SMEM_TF32_ASYNC: usize = 110592;
const SMEM_BF16_ASYNC: usize = 81920;
/// Split-K never grows the partials beyond this many f32 (1 GiB) unless one split already does.
pub(crate) const MAX_PARTIAL_ELEMS: usize = 1 << 28;
pub(crate) const MAX_SPLITS: usize = 32;
/// Threads of the reduction and of every grid-stride elementwise kernel.
pub(crate) const THREADS: u32 = 256;

/// One operand as the kernels see it: `P[r, c] = Σ_q X[r, q]·Y[c, q]`, element `(r, q)` of a
/// side at `z·batch_stride + r·row_stride + q`, or `z·batch_stride + q·row_stride + r` when
/// `kmajor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Side {
    pub row_stride: usize,
    pub batch_stride: usize,
    pub kmajor: bool,
}

/// A [`GemmShape`] mapped onto the kernels' `P = X·Yᵀ` (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub m1: usize,
    pub m2: usize,
    pub k: usize,
    pub batch: usize,
    pub x: Side,
    pub y: Side,
    /// X is B and Y is A (a transposed C is computed as `Cᵀ = Bᵀ·Aᵀ`).
    pub swap: bool,
    pub symmetric: bool,
    /// `P[z, r, c]` goes to `c[z·c_batch_stride + r·c_ld + c]`.
    pub c_ld: usize,
    pub c_batch_stride: usize,
}

impl Geometry {
    pub(crate) fn of(s: &GemmShape) -> Self {
        // X[r, q] = A[r, q]: contiguous in q unless A is stored transposed. Y[c, q] = B[q, c]:
        // contiguous in q only when B is stored transposed ([n, k]).
        let a = Side { row_stride: s.a.ld, batch_stride: s.a.batch_stride, kmajor: s.a.transposed };
        let b = Side { row_stride: s.b.ld, batch_stride: s.b.batch_stride, kmajor: !s.b.transposed };
        let swap = s.c.transposed && !s.symmetric;
        let (x, y, m1, m2) = if swap { (b, a, s.n, s.m) } else { (a, b, s.m, s.n) };
        Geometry {
            m1,
            m2,
            k: s.k,
            batch: s.batch,
            x,
            y,
            swap,
            symmetric: s.symmetric,
            c_ld: s.c.ld,
            c_batch_stride: s.c.batch_stride,
        }
    }

    /// Both sides are contiguous along the contraction (the `ntkv_ntk_gemm_*` kernels).
    pub(crate) fn contiguous(&self) -> bool {
        !self.x.kmajor && !self.y.kmajor
    }

    /// `NtkvNtkGemmParams::layout`.
    fn layout(&self) -> u32 {
        u32::from(self.x.kmajor) | (u32::from(self.y.kmajor) << 1)
    }
}

/// The split-K choice and tile grid of one GEMM geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub m1: usize,
    pub m2: usize,
    pub k: usize,
    pub batch: usize,
    pub symmetric: bool,
    pub splits: usize,
    pub k_chunk: usize,
    pub tiles: usize,
    pub col_tiles: usize,
}

impl Split {
    /// `(tiles, col_tiles)` of the grid: all tiles, or the upper triangle when symmetric.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the tile count exceeds the grid.
    pub(crate) fn tiles(m1: usize, m2: usize, symmetric: bool) -> Result<(usize, usize)> {
        let (row_tiles, col_tiles) = (m1.div_ceil(TILE), m2.div_ceil(TILE));
        let tiles = if symmetric {
            col_tiles.checked_mul(col_tiles + 1).map(|v| v / 2)
        } else {
            row_tiles.checked_mul(col_tiles)
        };
        match tiles {
            Some(t) if t <= i32::MAX as usize => Ok((t, col_tiles)),
            _ => Err(Error::too_large("m", format!("{m1} x {m2} rows need more tiles than a grid holds"))),
        }
    }

    /// Chooses the split count: enough blocks to fill whole waves of `slots` concurrent blocks
    /// (the device's SMs times the kernel's resident blocks per SM), at most [`MAX_SPLITS`],
    /// within the partials budget.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty side or a symmetric `m1 ≠ m2`;
    /// [`Error::TooLarge`] beyond the kernels' limits.
    pub(crate) fn new(slots: usize, m1: usize, m2: usize, k: usize, batch: usize, symmetric: bool) -> Result<Self> {
        if m1 == 0 || m2 == 0 || batch == 0 {
            return Err(Error::invalid("m", "GEMM with an empty side"));
        }
        if symmetric && m1 != m2 {
            return Err(Error::invalid("n", "a symmetric GEMM needs m == n"));
        }
        if m1 > super::MAX_ROWS || m2 > super::MAX_ROWS {
            return Err(Error::too_large("m", format!("{m1} x {m2} rows exceed 2^31")));
        }
        if batch > super::MAX_BATCH {
            return Err(Error::too_large("batch", format!("{batch} batches exceed the grid's 65535")));
        }
        let (tiles, col_tiles) = Self::tiles(m1, m2, symmetric)?;
        let plane = m1
            .checked_mul(m2)
            .and_then(|v| v.checked_mul(batch))
            .ok_or_else(|| Error::too_large("c", "output overflows"))?;
        let ktiles = k.div_ceil(DEPTH).max(1);
        let sms = slots.max(1);
        let blocks = tiles.saturating_mul(batch);
        let mut best = (f64::INFINITY, 1usize);
        for s in 1..=MAX_SPLITS.min(ktiles) {
            if s > 1 && plane.saturating_mul(s) > MAX_PARTIAL_ELEMS {
                break;
            }
            let waves = blocks.saturating_mul(s).div_ceil(sms) as f64;
            // Time ∝ waves / s; each split also costs a pass over the partials.
            let cost = waves / s as f64 * (1.0 + 0.02 * s as f64);
            if cost < best.0 {
                best = (cost, s);
            }
        }
        let k_chunk = ktiles.div_ceil(best.1) * DEPTH;
        let splits = k.div_ceil(k_chunk).max(1);
        Ok(Split { m1, m2, k, batch, symmetric, splits, k_chunk, tiles, col_tiles })
    }

    /// f32 elements of the partials buffer.
    pub(crate) fn partial_elems(&self) -> usize {
        self.batch * self.splits * self.m1 * self.m2
    }
}

/// The GEMM kernel for an input dtype and precision: (id, dynamic shared memory, threads).
/// `strided`: a k-major side (the `gemm` kernels); otherwise the `ntk_gemm` kernels, whose
/// cp.async flavour (4 warps of 64 × 64) needs `async_ok`: 16-byte aligned rows, batches and
/// depth in the mma's own storage type.
pub(crate) fn gemm_kernel(
    dtype: DType,
    precision: Precision,
    async_ok: bool,
    strided: bool,
) -> Result<(KernelId, usize, u32)> {
    if dtype == DType::F16 {
        return Err(Error::invalid("a", "f16 storage is not supported; use f32 or bf16"));
    }
    let op = if strided { "gemm" } else { "ntk_gemm" };
    let id = KernelId::new(Module::Ntk, op).dtype(dtype);
    let native = matches!((dtype, precision), (DType::F32, Precision::Tf32) | (DType::BF16, Precision::Bf16));
    Ok(match precision {
        Precision::Tf32 if native && async_ok && !strided => (id.variant("tf32_async"), SMEM_TF32_ASYNC, 128),
        Precision::Bf16 if native && async_ok && !strided => (id.variant("bf16_async"), SMEM_BF16_ASYNC, 128),
        Precision::F32 => (id.variant("ffma"), SMEM_FFMA, 256),
        Precision::Tf32 => (id.variant("tf32"), SMEM_TF32, 256),
        Precision::Bf16 => (id.variant("bf16"), SMEM_BF16, 256),
    })
}

/// Concurrent GEMM blocks on the device for `precision`: the SMs times the driver's occupancy
/// of the kernel the precision prefers (its own storage type, aligned).
pub(crate) fn slots(device: &Device, precision: Precision, contiguous: bool) -> Result<usize> {
    let dtype = if precision == Precision::Bf16 { DType::BF16 } else { DType::F32 };
    let (id, smem, threads) = gemm_kernel(dtype, precision, true, !contiguous)?;
    let f = device.kernel(id)?;
    let smem = device.prepare_shared_mem(&f, smem)?;
    let per_sm = launch::blocks_per_sm(&f, threads, smem)? as usize;
    Ok(per_sm * device.props().sm_count.max(1) as usize)
}

/// One past the last element a side reads (0 when it reads none).
fn side_extent(side: &Side, rows: usize, k: usize, batch: usize) -> Option<usize> {
    if rows == 0 || k == 0 {
        return Some(0);
    }
    let last = if side.kmajor {
        (k - 1).checked_mul(side.row_stride)?.checked_add(rows - 1)?
    } else {
        (rows - 1).checked_mul(side.row_stride)?.checked_add(k - 1)?
    };
    (batch - 1).checked_mul(side.batch_stride)?.checked_add(last)?.checked_add(1)
}

fn check_side<T>(arg: &'static str, side: &Side, data: &CudaView<'_, T>, rows: usize, s: &Split) -> Result<()> {
    let need = side_extent(side, rows, s.k, s.batch).ok_or_else(|| Error::too_large(arg, "extent overflows"))?;
    if need > data.len() {
        return Err(Error::shape(arg, &[need], &[data.len()]));
    }
    Ok(())
}

/// Enqueues the split-K GEMM `P = X·Yᵀ` into `partials` (`split.partial_elems()` f32 or more).
/// `y = None` multiplies `x` by itself (required when `split.symmetric`).
pub(crate) fn launch_gemm<T: Float>(
    device: &Device,
    split: &Split,
    g: &Geometry,
    precision: Precision,
    x: &CudaView<'_, T>,
    y: Option<&CudaView<'_, T>>,
    partials: &mut CudaSlice<f32>,
) -> Result<()> {
    if split.symmetric != y.is_none() {
        return Err(Error::internal("a symmetric GEMM reads one operand, a cross GEMM two"));
    }
    if split.m1 != g.m1 || split.m2 != g.m2 || split.k != g.k || split.batch != g.batch {
        return Err(Error::internal("the split does not belong to this geometry"));
    }
    let yv = y.unwrap_or(x);
    check_side("a", &g.x, x, g.m1, split)?;
    check_side("b", &g.y, yv, g.m2, split)?;
    if partials.len() < split.partial_elems() {
        return Err(Error::internal(format!(
            "partials hold {} f32, the split needs {}",
            partials.len(),
            split.partial_elems()
        )));
    }
    let stream = device.stream();
    let base_aligned = {
        let (px, _gx) = x.device_ptr(stream);
        let (py, _gy) = yv.device_ptr(stream);
        px % 16 == 0 && py % 16 == 0
    };
    // 4-element vectors (16 B of f32, 8 B of bf16) for the register-staged loads of contiguous
    // sides; whole 16-byte chunks for cp.async.
    let strides: Vec<usize> =
        [g.x, g.y].iter().filter(|s| !s.kmajor).flat_map(|s| [s.row_stride, s.batch_stride]).collect();
    let vec_ok = base_aligned && strides.iter().all(|s| s % 4 == 0);
    let chunk = 16 / T::DTYPE.size();
    let async_ok = base_aligned && g.contiguous() && g.k % chunk == 0 && strides.iter().all(|s| s % chunk == 0);
    let (id, smem, threads) = gemm_kernel(T::DTYPE, precision, async_ok, !g.contiguous())?;
    let f = device.kernel(id)?;
    let shared = device.prepare_shared_mem(&f, smem)?;
    let params = NtkvNtkGemmParams {
        a_batch_stride: to_u64("a", g.x.batch_stride)?,
        b_batch_stride: to_u64("b", g.y.batch_stride)?,
        a_row_stride: to_u64("a", g.x.row_stride)?,
        b_row_stride: to_u64("b", g.y.row_stride)?,
        k: to_u64("k", split.k)?,
        k_chunk: to_u64("k", split.k_chunk)?,
        m1: to_u32("m", split.m1)?,
        m2: to_u32("n", split.m2)?,
        batch: to_u32("batch", split.batch)?,
        splits: to_u32("splits", split.splits)?,
        col_tiles: to_u32("n", split.col_tiles)?,
        symmetric: u32::from(split.symmetric),
        vec_ok: u32::from(vec_ok),
        layout: if g.contiguous() { 0 } else { g.layout() },
    };
    // A 3-D grid (tiles × splits × batch): one block per work item, so no occupancy cap.
    let cfg = LaunchConfig {
        grid_dim: (to_u32("m", split.tiles)?, to_u32("splits", split.splits)?, to_u32("batch", split.batch)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut builder = stream.launch_builder(&f);
    builder.arg(&params).arg(x).arg(yv).arg(partials);
    // SAFETY: ntkv_{ntk_,}gemm_*(NtkvNtkGemmParams, const T* a, const T* b, float* partials).
    // Every load is of row < m1 (m2) of batch z < batch at depth q < k, at
    // z·batch_stride + r·row_stride + q (or + q·row_stride + r for a k-major side, layout bit
    // set only for the strided kernels), checked above to lie inside x and y (check_side);
    // vector loads and cp.async chunks are only used for contiguous sides whose base pointers
    // and strides (and for cp.async k) keep them aligned and inside a row; every store is to
    // (z, split, r < m1, c < m2) of a partials buffer holding batch·splits·m1·m2 floats;
    // shared memory is exactly the kernel's static_assert'ed size, checked against the device.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// The reduction's parameters for `split` (`kind` as in `NtkvNtkReduceParams`).
pub(crate) fn reduce_params(
    split: &Split,
    kind: u32,
    n2: usize,
    o: usize,
    scale: f32,
    c_ld: usize,
    c_batch_stride: usize,
) -> Result<NtkvNtkReduceParams> {
    let plane = split.m1 * split.m2;
    Ok(NtkvNtkReduceParams {
        n_out: to_u64("c", split.batch * plane)?,
        plane: to_u64("c", plane)?,
        m1: to_u32("m", split.m1)?,
        m2: to_u32("n", split.m2)?,
        splits: to_u32("splits", split.splits)?,
        batch: to_u32("batch", split.batch)?,
        kind,
        n2: to_u32("n2", n2)?,
        o: to_u32("o", o)?,
        symmetric: u32::from(split.symmetric),
        scale,
        _pad0: 0,
        ldc: to_u64("c", c_ld)?,
        c_batch_stride: to_u64("c", c_batch_stride)?,
    })
}

/// Launches a split reduction kernel `id` (`ntkv_ntk_reduce` or `ntkv_gemm_reduce`) after the
/// caller has checked that every `out` index the params decode lies inside `out`.
pub(crate) fn launch_reduce(
    device: &Device,
    id: KernelId,
    params: &NtkvNtkReduceParams,
    split: &Split,
    partials: &CudaSlice<f32>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if partials.len() < split.partial_elems() {
        return Err(Error::internal("the partials are shorter than the split"));
    }
    let n_out = split.batch * split.m1 * split.m2;
    let (f, cfg) = launch::grid_stride_kernel(device, id, THREADS, n_out)?;
    let mut builder = device.stream().launch_builder(&f);
    builder.arg(params).arg(partials).arg(out);
    // SAFETY: ntkv_{ntk,gemm}_reduce(NtkvNtkReduceParams, const float* partials, float* out)
    // reads partials[(z·splits + s)·m1·m2 + r·m2 + c] with z < batch, s < splits, r < m1,
    // c < m2 (every layout decodes idx < n_out into those ranges), inside partial_elems() ≤
    // partials.len(); it writes out at the decoded index, which the caller checked against
    // out.len() for every idx < n_out.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// Sums the partials in split order into `c[z·c_batch_stride + r·c_ld + col]`.
pub(crate) fn reduce_into(
    device: &Device,
    split: &Split,
    g: &Geometry,
    partials: &CudaSlice<f32>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let last = (split.batch - 1)
        .checked_mul(g.c_batch_stride)
        .and_then(|v| v.checked_add((split.m1 - 1).checked_mul(g.c_ld)?))
        .and_then(|v| v.checked_add(split.m2))
        .ok_or_else(|| Error::too_large("c", "extent overflows"))?;
    if last > c.len() {
        return Err(Error::shape("c", &[last], &[c.len()]));
    }
    let params = reduce_params(split, 3, 1, 1, 1.0, g.c_ld, g.c_batch_stride)?;
    launch_reduce(device, KernelId::new(Module::Ntk, "gemm_reduce"), &params, split, partials, c)
}

/// Every kernel id the gemm launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub fn kernels() -> Vec<KernelId> {
    let mut ids = vec![KernelId::new(Module::Ntk, "gemm_reduce")];
    for dtype in [DType::F32, DType::BF16] {
        for precision in Precision::ALL {
            for async_ok in [false, true] {
                for strided in [false, true] {
                    if let Ok((id, _, _)) = gemm_kernel(dtype, precision, async_ok, strided) {
                        ids.push(id);
                    }
                }
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// The kernels' index arithmetic transliterated to the host, so the tests can run the whole
/// launch geometry (tile enumeration, split ranges, partial layout, strided sides, the
/// reduction's mirroring and strided writes) on the CPU. The arithmetic inside a tile is a
/// plain FMA chain here; the GPU tests cover the kernels themselves.
#[cfg(test)]
pub(crate) mod emulate {
    use super::*;

    /// `tile_coords` for the symmetric grid: block `x` of `T(T+1)/2` to (row tile, column tile).
    pub(crate) fn sym_tile(mut x: usize, t: usize) -> (usize, usize) {
        let mut r = 0;
        while r + 1 < t && x >= t - r {
            x -= t - r;
            r += 1;
        }
        (r, r + x)
    }

    fn at(data: &[f32], s: &Side, z: usize, r: usize, q: usize) -> f32 {
        let off = if s.kmajor { q * s.row_stride + r } else { r * s.row_stride + q };
        data[z * s.batch_stride + off]
    }

    /// One launch of the split-K GEMM: every block (tile, split, batch) writes its rows < m1 and
    /// columns < m2 of its partial plane; anything no block writes stays NaN.
    pub(crate) fn gemm(split: &Split, g: &Geometry, x: &[f32], y: Option<&[f32]>) -> Vec<f32> {
        let y = y.unwrap_or(x);
        let mut part = vec![f32::NAN; split.partial_elems()];
        let plane = split.m1 * split.m2;
        for b in 0..split.tiles {
            let (tr, tc) =
                if split.symmetric { sym_tile(b, split.col_tiles) } else { (b / split.col_tiles, b % split.col_tiles) };
            for s in 0..split.splits {
                let kbeg = s * split.k_chunk;
                let kend = (kbeg + split.k_chunk).min(split.k);
                for z in 0..split.batch {
                    for r in tr * TILE..(tr * TILE + TILE).min(split.m1) {
                        for c in tc * TILE..(tc * TILE + TILE).min(split.m2) {
                            let mut acc = 0.0f32;
                            for q in kbeg..kend.max(kbeg) {
                                acc = at(x, &g.x, z, r, q).mul_add(at(y, &g.y, z, c, q), acc);
                            }
                            part[(z * split.splits + s) * plane + r * split.m2 + c] = acc;
                        }
                    }
                }
            }
        }
        part
    }

    /// `split_reduce` for one decoded element: the mirrored read and the split-order sum;
    /// panics if it reads a partial no block wrote.
    pub(crate) fn sum_splits(split: &Split, part: &[f32], z: usize, mut r: usize, mut c: usize) -> f32 {
        if split.symmetric && r / TILE > c / TILE {
            std::mem::swap(&mut r, &mut c);
        }
        let plane = split.m1 * split.m2;
        let mut s = 0.0f32;
        for k in 0..split.splits {
            let v = part[(z * split.splits + k) * plane + r * split.m2 + c];
            assert!(!v.is_nan(), "reduce read an unwritten partial at z={z} split={k} ({r}, {c})");
            s += v;
        }
        s
    }

    /// `ntkv_gemm_reduce` into a strided C of `c_len` elements (NaN where nothing is written).
    pub(crate) fn reduce_into(split: &Split, g: &Geometry, part: &[f32], c: &mut [f32]) {
        for z in 0..split.batch {
            for r in 0..split.m1 {
                for col in 0..split.m2 {
                    c[z * g.c_batch_stride + r * g.c_ld + col] = sum_splits(split, part, z, r, col);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::emulate::sym_tile;
    use super::*;
    use crate::gemm::{cpu, Operand};

    #[test]
    fn symmetric_grid_enumerates_the_upper_triangle_once() {
        for t in 1..40 {
            let mut seen = std::collections::HashSet::new();
            for x in 0..t * (t + 1) / 2 {
                let (r, c) = sym_tile(x, t);
                assert!(r <= c && c < t, "t={t} x={x} -> ({r},{c})");
                assert!(seen.insert((r, c)));
            }
            assert_eq!(seen.len(), t * (t + 1) / 2);
        }
    }

    #[test]
    fn split_plan_covers_k_exactly() {
        for &(slots, m1, m2, k, batch, sym) in &[
            (132usize, 1024usize, 1024usize, 1usize << 20, 1usize, true),
            (264, 4096, 4096, 1 << 18, 1, true),
            (132, 21, 21, 200_003, 1, true),
            (132, 37, 53, 301, 1, false),
            (8, 5, 7, 0, 1, false),
            (132, 100, 100, 45, 3, true),
            (1, 1, 1, 31, 1, false),
        ] {
            let p = Split::new(slots, m1, m2, k, batch, sym).unwrap();
            assert_eq!(p.k_chunk % DEPTH, 0);
            assert!(p.splits >= 1 && p.splits <= MAX_SPLITS);
            assert!(p.splits * p.k_chunk >= k, "{p:?}");
            assert!(k == 0 || (p.splits - 1) * p.k_chunk < k, "an empty split: {p:?}");
            assert!(p.splits == 1 || p.partial_elems() <= MAX_PARTIAL_ELEMS);
            let t = m2.div_ceil(TILE);
            let want_tiles = if sym { t * (t + 1) / 2 } else { m1.div_ceil(TILE) * t };
            assert_eq!(p.tiles, want_tiles);
            assert_eq!(p.col_tiles, t);
        }
        // A deep, narrow Gram splits; a wide one that fills the device does not.
        assert!(Split::new(132, 21, 21, 200_003, 1, true).unwrap().splits > 1);
        assert_eq!(Split::new(132, 4096, 4096, 1 << 18, 1, true).unwrap().splits, 1);
    }

    #[test]
    fn split_rejects_bad_geometry() {
        assert!(Split::new(132, 0, 4, 8, 1, false).is_err());
        assert!(Split::new(132, 4, 0, 8, 1, false).is_err());
        assert!(Split::new(132, 4, 4, 8, 0, false).is_err());
        assert!(Split::new(132, 4, 5, 8, 1, true).is_err());
        assert!(Split::new(132, 4, 4, 8, 70_000, false).is_err());
        assert!(Split::new(132, 1 << 33, 4, 8, 1, false).is_err());
    }

    /// ntk.cu's `to_tf32`, transcribed.
    fn to_tf32(u: u32) -> u32 {
        if u & 0x7f80_0000 == 0x7f80_0000 {
            u
        } else {
            u.wrapping_add(0x1000) & 0xffff_e000
        }
    }

    #[test]
    fn tf32_rounding_is_nearest_ties_away() {
        let mut rng = crate::rng::Rng::new(3);
        let mut cases: Vec<u32> = (0..20_000).map(|_| rng.next_u64() as u32).collect();
        // Exact ties, the largest finite value, subnormals, zeros, infinities.
        cases.extend([0x3f80_1000, 0xbf80_1000, 0x3f80_3000, 0x7f7f_ffff, 0x0000_1000, 0x8000_0000, 0, 0x7f80_0000]);
        for u in cases {
            let x = f32::from_bits(u);
            if !x.is_finite() {
                assert_eq!(to_tf32(u), u);
                continue;
            }
            // Reference: the two tf32 neighbours around x, in f64; nearest, ties away from 0.
            let lo = f32::from_bits(u & 0xffff_e000);
            let hi_bits = (u & 0xffff_e000).wrapping_add(0x2000);
            // Past the largest finite tf32 the upper neighbour is 2^128 (rounding overflows to ∞).
            let hi = f32::from_bits(hi_bits);
            let hi = if hi.is_infinite() { 2f64.powi(128).copysign(f64::from(x)) } else { f64::from(hi) };
            let (dl, dh) = ((f64::from(x) - f64::from(lo)).abs(), (hi - f64::from(x)).abs());
            let want = if u & 0x1fff == 0 || dl < dh { u & 0xffff_e000 } else { hi_bits };
            assert_eq!(to_tf32(u), want, "x = {x:e} ({u:#010x})");
        }
    }

    #[test]
    fn kernel_choice_follows_dtype_precision_alignment_and_layout() {
        let sym = |d, p, a, s| gemm_kernel(d, p, a, s).unwrap().0.symbol();
        assert_eq!(sym(DType::F32, Precision::F32, true, false), "ntkv_ntk_gemm_f32_ffma");
        assert_eq!(sym(DType::F32, Precision::Tf32, true, false), "ntkv_ntk_gemm_f32_tf32_async");
        assert_eq!(sym(DType::F32, Precision::Tf32, false, false), "ntkv_ntk_gemm_f32_tf32");
        assert_eq!(sym(DType::F32, Precision::Bf16, true, false), "ntkv_ntk_gemm_f32_bf16");
        assert_eq!(sym(DType::BF16, Precision::Bf16, true, false), "ntkv_ntk_gemm_bf16_bf16_async");
        assert_eq!(sym(DType::BF16, Precision::Bf16, false, false), "ntkv_ntk_gemm_bf16_bf16");
        assert_eq!(sym(DType::BF16, Precision::Bf16, true, true), "ntkv_gemm_bf16_bf16");
        assert_eq!(sym(DType::F32, Precision::Tf32, true, true), "ntkv_gemm_f32_tf32");
        assert!(gemm_kernel(DType::F16, Precision::F32, true, false).is_err());
        // Shared memory of every flavour fits the H200's 227 KiB opt-in limit.
        for smem in [SMEM_FFMA, SMEM_TF32, SMEM_BF16, SMEM_TF32_ASYNC, SMEM_BF16_ASYNC] {
            assert!(smem <= 227 * 1024);
        }
        assert_eq!(gemm_kernel(DType::BF16, Precision::Bf16, true, false).unwrap().2, 128);
        assert_eq!(gemm_kernel(DType::F32, Precision::F32, true, false).unwrap().2, 256);
        assert_eq!(kernels().len(), 1 + 2 * 3 * 2 + 2);
    }

    /// Every combination of transposed operands, a transposed C, batches with padded strides,
    /// and the symmetric case, through the emulated launches, against the bit-exact CPU order.
    #[test]
    fn strided_and_transposed_shapes_through_the_emulated_launches() {
        let mut rng = crate::rng::Rng::new(31);
        for &(batch, m, n, k, slots) in
            &[(1usize, 37usize, 53usize, 301usize, 132usize), (3, 130, 9, 77, 4), (2, 5, 140, 64, 2)]
        {
            for bits in 0..8u32 {
                let (ta, tb, tc) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
                let pad = 3;
                let op = |t: bool, rows: usize, cols: usize| {
                    let (r, c) = if t { (cols, rows) } else { (rows, cols) };
                    Operand { transposed: t, ld: c + pad, batch_stride: r * (c + pad) + 5 }
                };
                let shape =
                    GemmShape { batch, m, n, k, a: op(ta, m, k), b: op(tb, k, n), c: op(tc, m, n), symmetric: false };
                check_against_cpu(&shape, slots, &mut rng);
            }
            // Symmetric: the Gram of a tall matrix (Aᵀ·A) and A·Aᵀ.
            for ta in [false, true] {
                let a = if ta {
                    Operand { transposed: true, ld: m + 1, batch_stride: k * (m + 1) }
                } else {
                    Operand { transposed: false, ld: k + 2, batch_stride: m * (k + 2) }
                };
                let shape = GemmShape {
                    batch,
                    m,
                    n: m,
                    k,
                    a,
                    b: a.flipped(),
                    c: Operand::row_major(m).batch_stride(m * m),
                    symmetric: true,
                };
                check_against_cpu(&shape, slots, &mut rng);
            }
        }
    }

    fn check_against_cpu(shape: &GemmShape, slots: usize, rng: &mut crate::rng::Rng) {
        let e = shape.extents().unwrap();
        let a = rng.normal_vec(e.a);
        let b = rng.normal_vec(e.b);
        let g = Geometry::of(shape);
        let split = Split::new(slots, g.m1, g.m2, shape.k, shape.batch, shape.symmetric).unwrap();
        let (x, y) = if shape.symmetric {
            (&a, None)
        } else if g.swap {
            (&b, Some(a.as_slice()))
        } else {
            (&a, Some(b.as_slice()))
        };
        let part = emulate::gemm(&split, &g, x, y);
        let mut got = vec![f32::NAN; e.c];
        emulate::reduce_into(&split, &g, &part, &mut got);
        let mut want = vec![f32::NAN; e.c];
        cpu::gemm_f32_ordered(shape, split.k_chunk, &a, &b, &mut want).unwrap();
        for (i, (x, w)) in got.iter().zip(&want).enumerate() {
            assert!(x.to_bits() == w.to_bits(), "{shape:?} splits {}: c[{i}] = {x} want {w}", split.splits);
        }
        let mut want64 = vec![f64::NAN; e.c];
        cpu::gemm(shape, &a, &b, &mut want64).unwrap();
        for (x, w) in got.iter().zip(&want64) {
            assert!(x.is_nan() == w.is_nan());
            if !w.is_nan() {
                assert!((f64::from(*x) - w).abs() <= 1e-4 * (1.0 + w.abs()), "{x} vs {w}");
            }
        }
    }
}

/// A lane-level transliteration of one 128 × 128 × 32 tile of the tensor-core kernels:
/// the shared-memory fill of each loader (register-staged 256 threads, cp.async 128 threads),
/// `mma_stage`'s ldmatrix fragment loads, the mma instruction's register layout from the PTX ISA
/// (m16n8k8 tf32, m16n8k16 bf16), and `store_mma_acc`'s epilogue. It checks that the indices
/// fit together: every C entry written once and equal to the tile's product.
#[cfg(test)]
// Index loops on purpose: they mirror the CUDA code line by line.
#[allow(clippy::needless_range_loop)]
mod fragment_tests {
    use half::bf16;

    const TILE: usize = 128;
    const DEPTH: usize = 32;

    fn tf32_bits(x: f32) -> u32 {
        let u = x.to_bits();
        if u & 0x7f80_0000 == 0x7f80_0000 {
            u
        } else {
            u.wrapping_add(0x1000) & 0xffff_e000
        }
    }

    fn bf16_bits(x: f32) -> u32 {
        u32::from(bf16::from_f32(x).to_bits())
    }

    /// Fills shared memory (u32 words) for a [128, 32] operand tile as each loader does.
    fn fill(vals: &[f32], is_bf16: bool, cp_async: bool) -> (Vec<u32>, usize) {
        let ld_words = if is_bf16 { 20 } else { 36 };
        let mut s = vec![0u32; TILE * ld_words];
        // Element `kk` of row `r` in element units of the shared layout.
        let mut put = |r: usize, kk: usize, v: f32| {
            if is_bf16 {
                let w = &mut s[r * ld_words + kk / 2];
                let h = bf16_bits(v);
                *w = if kk % 2 == 0 { (*w & 0xffff_0000) | h } else { (*w & 0xffff) | (h << 16) };
            } else {
                // The register path stores tf32 bits, the cp.async path raw f32 (rounded at
                // fragment load): both give the same operand to the mma.
                s[r * ld_words + kk] = if cp_async { v.to_bits() } else { tf32_bits(v) };
            }
        };
        if cp_async {
            let elems = if is_bf16 { 8 } else { 4 };
            let per_row = DEPTH / elems;
            let threads = 128;
            let per_thread = TILE * per_row / threads;
            for tid in 0..threads {
                for it in 0..per_thread {
                    let chunk = tid + it * threads;
                    let (r, kc) = (chunk / per_row, (chunk % per_row) * elems);
                    for e in 0..elems {
                        put(r, kc + e, vals[r * DEPTH + kc + e]);
                    }
                }
            }
        } else {
            for tid in 0..256 {
                let (lrow, lk) = (tid >> 3, (tid & 7) * 4);
                for it in 0..4 {
                    let r = lrow + 32 * it;
                    for e in 0..4 {
                        put(r, lk + e, vals[r * DEPTH + lk + e]);
                    }
                }
            }
        }
        (s, ld_words)
    }

    /// ldmatrix.sync.aligned.m8n8.x4.shared.b16 from the PTX ISA: lanes 8i..8i+7 give the row
    /// addresses (here word indices, 16-byte aligned) of matrix i; register i of lane l is the
    /// word l % 4 of row l / 4 of matrix i.
    fn ldmatrix_x4(s: &[u32], row_word: impl Fn(usize) -> usize) -> [[u32; 4]; 32] {
        let mut out = [[0u32; 4]; 32];
        for (lane, regs) in out.iter_mut().enumerate() {
            for (i, r) in regs.iter_mut().enumerate() {
                let row = row_word(8 * i + lane / 4);
                assert_eq!(row % 4, 0, "ldmatrix row address not 16-byte aligned");
                *r = s[row + lane % 4];
            }
        }
        out
    }

    fn operand_value(word: u32, half: usize, is_bf16: bool) -> f64 {
        if is_bf16 {
            f64::from(bf16::from_bits((word >> (16 * half)) as u16).to_f32())
        } else {
            f64::from(f32::from_bits(word))
        }
    }

    /// Runs the tile through the warps as the kernels do and returns C [128, 128] (NaN where no
    /// lane wrote).
    fn run_tile(a: &[f32], b: &[f32], is_bf16: bool, cp_async: bool) -> Vec<f64> {
        let (sa, ld) = fill(a, is_bf16, cp_async);
        let (sb, _) = fill(b, is_bf16, cp_async);
        let cvt = cp_async && !is_bf16;
        let word = |w: u32| if cvt { tf32_bits(f32::from_bits(w)) } else { w };
        let (warps, ni_count) = if cp_async { (4, 8) } else { (8, 4) };
        let mut c = vec![f64::NAN; TILE * TILE];
        for warp in 0..warps {
            let (wr, wc) =
                if cp_async { ((warp >> 1) * 64, (warp & 1) * 64) } else { ((warp >> 2) * 64, (warp & 3) * 32) };
            // acc[lane][mi][ni][e]
            let mut acc = vec![[[[0.0f64; 4]; 8]; 4]; 32];
            for ks in 0..(if is_bf16 { 2 } else { 4 }) {
                let w0 = ks * 8;
                let mut af = [[[0u32; 4]; 4]; 32];
                let mut bfr = [[[0u32; 2]; 8]; 32];
                // `mma_stage`'s ldmatrix.x4 row addresses (in words) per lane.
                for mi in 0..4 {
                    let regs = ldmatrix_x4(&sa, |l| (wr + mi * 16 + (l & 15)) * ld + w0 + (l >> 4) * 4);
                    for lane in 0..32 {
                        af[lane][mi] = regs[lane].map(word);
                    }
                }
                for ni in (0..ni_count).step_by(2) {
                    let regs =
                        ldmatrix_x4(&sb, |l| (wc + ni * 8 + (l & 7) + ((l >> 4) << 3)) * ld + w0 + ((l >> 3) & 1) * 4);
                    for lane in 0..32 {
                        bfr[lane][ni] = [word(regs[lane][0]), word(regs[lane][1])];
                        bfr[lane][ni + 1] = [word(regs[lane][2]), word(regs[lane][3])];
                    }
                }
                // The mma, from the PTX ISA's fragment layouts.
                let kdim = if is_bf16 { 16 } else { 8 };
                for mi in 0..4 {
                    for ni in 0..ni_count {
                        let mut am = vec![vec![0.0f64; kdim]; 16];
                        let mut bm = vec![vec![0.0f64; 8]; kdim];
                        for lane in 0..32 {
                            let (g, t) = (lane >> 2, lane & 3);
                            for (r, &reg) in af[lane][mi].iter().enumerate() {
                                let row = g + 8 * (r % 2);
                                if is_bf16 {
                                    for h in 0..2 {
                                        am[row][2 * t + h + 8 * (r / 2)] = operand_value(reg, h, true);
                                    }
                                } else {
                                    am[row][t + 4 * (r / 2)] = operand_value(reg, 0, false);
                                }
                            }
                            for (r, &reg) in bfr[lane][ni].iter().enumerate() {
                                if is_bf16 {
                                    for h in 0..2 {
                                        bm[2 * t + h + 8 * r][g] = operand_value(reg, h, true);
                                    }
                                } else {
                                    bm[t + 4 * r][g] = operand_value(reg, 0, false);
                                }
                            }
                        }
                        for lane in 0..32 {
                            let (g, t) = (lane >> 2, lane & 3);
                            for e in 0..4 {
                                let (row, col) = (g + 8 * (e / 2), 2 * t + (e % 2));
                                acc[lane][mi][ni][e] += (0..kdim).map(|q| am[row][q] * bm[q][col]).sum::<f64>();
                            }
                        }
                    }
                }
            }
            // store_mma_acc
            for (lane, acc_lane) in acc.iter().enumerate() {
                let (g, t) = (lane >> 2, lane & 3);
                for (mi, acc_mi) in acc_lane.iter().enumerate() {
                    for (ni, acc_ni) in acc_mi.iter().enumerate().take(ni_count) {
                        for (e, &v) in acc_ni.iter().enumerate() {
                            let r = wr + mi * 16 + g + if e >= 2 { 8 } else { 0 };
                            let col = wc + ni * 8 + 2 * t + (e & 1);
                            assert!(c[r * TILE + col].is_nan(), "C({r}, {col}) written twice");
                            c[r * TILE + col] = v;
                        }
                    }
                }
            }
        }
        c
    }

    #[test]
    fn tensor_core_tiles_compute_the_product() {
        let mut rng = crate::rng::Rng::new(23);
        let a = rng.normal_vec(TILE * DEPTH);
        let b = rng.normal_vec(TILE * DEPTH);
        for is_bf16 in [false, true] {
            let round = |x: f32| -> f64 {
                if is_bf16 {
                    f64::from(bf16::from_f32(x).to_f32())
                } else {
                    f64::from(f32::from_bits(tf32_bits(x)))
                }
            };
            for cp_async in [false, true] {
                let c = run_tile(&a, &b, is_bf16, cp_async);
                for r in 0..TILE {
                    for col in 0..TILE {
                        let want: f64 = (0..DEPTH).map(|q| round(a[r * DEPTH + q]) * round(b[col * DEPTH + q])).sum();
                        let got = c[r * TILE + col];
                        assert!(
                            (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                            "bf16={is_bf16} cp_async={cp_async} C({r}, {col}) = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    /// `gemm_ffma`'s loader (lane = row, warp = k group, transposed store into [k][row]) and its
    /// 16 × 16 threads of 8 × 8 outputs.
    #[test]
    fn ffma_tile_covers_the_product() {
        let mut rng = crate::rng::Rng::new(29);
        let a = rng.normal_vec(TILE * DEPTH);
        let b = rng.normal_vec(TILE * DEPTH);
        let ld = TILE + 4;
        let mut sa = vec![f32::NAN; DEPTH * ld];
        let mut sb = vec![f32::NAN; DEPTH * ld];
        for tid in 0..256 {
            let (lrow, lk) = (tid & 31, (tid >> 5) * 4);
            for it in 0..4 {
                for e in 0..4 {
                    let r = lrow + 32 * it;
                    sa[(lk + e) * ld + r] = a[r * DEPTH + lk + e];
                    sb[(lk + e) * ld + r] = b[r * DEPTH + lk + e];
                }
            }
        }
        let mut c = vec![f64::NAN; TILE * TILE];
        for tid in 0..256 {
            let (tx, ty) = (tid & 15, tid >> 4);
            for i in 0..8 {
                let r = if i < 4 { ty * 4 + i } else { 64 + ty * 4 + (i - 4) };
                for j in 0..8 {
                    let col = if j < 4 { tx * 4 + j } else { 64 + tx * 4 + (j - 4) };
                    let v: f64 = (0..DEPTH).map(|kk| f64::from(sa[kk * ld + r]) * f64::from(sb[kk * ld + col])).sum();
                    assert!(c[r * TILE + col].is_nan(), "C({r}, {col}) written twice");
                    c[r * TILE + col] = v;
                }
            }
        }
        for r in 0..TILE {
            for col in 0..TILE {
                let want: f64 = (0..DEPTH).map(|q| f64::from(a[r * DEPTH + q]) * f64::from(b[col * DEPTH + q])).sum();
                assert!((c[r * TILE + col] - want).abs() <= 1e-9 * (1.0 + want.abs()), "C({r}, {col})");
            }
        }
    }
}
