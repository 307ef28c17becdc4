//! Launchers for `cuda/ntk.cu` (crate-private): the split-K GEMM, its reduction, and the small
//! elementwise and reduction kernels. The public API in `mod.rs` validates every argument
//! before calling in here; each launcher re-checks the extents its kernel touches.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::{to_u32, Error, Result};
use crate::ntk::Precision;
use crate::params::{
    NtkvNtkBiasActParams, NtkvNtkCombineParams, NtkvNtkCotangentParams, NtkvNtkGemmParams, NtkvNtkJvpParams,
    NtkvNtkMeansParams, NtkvNtkPresumParams, NtkvNtkReduceParams, NtkvNtkStatsParams,
};
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
const MAX_PARTIAL_ELEMS: usize = 1 << 28;
const MAX_SPLITS: usize = 32;

/// One operand of `C_z = A_z · B_zᵀ`: row `r` of batch `z` starts at
/// `z·batch_stride + r·row_stride` and holds `k` contiguous elements.
pub(crate) struct Operand<'a, T> {
    pub data: &'a CudaSlice<T>,
    pub rows: usize,
    pub row_stride: usize,
    pub batch_stride: usize,
}

/// A validated GEMM geometry with its split-K choice.
#[derive(Clone, Debug)]
pub(crate) struct GemmPlan {
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

impl GemmPlan {
    /// Chooses the split count: enough blocks to fill whole waves of the device, at most
    /// `MAX_SPLITS`, within the partials budget.
    ///
    /// `slots` is how many GEMM blocks the device runs at once (SMs × resident blocks per SM).
    pub fn new(slots: usize, m1: usize, m2: usize, k: usize, batch: usize, symmetric: bool) -> Result<Self> {
        if m1 == 0 || m2 == 0 || batch == 0 {
            return Err(Error::invalid("shape", "GEMM with an empty side"));
        }
        if symmetric && m1 != m2 {
            return Err(Error::invalid("shape", "a symmetric GEMM needs m1 == m2"));
        }
        // Tile row indices (row0 + 127) stay inside the kernels' u32 arithmetic.
        if m1 > 1 << 31 || m2 > 1 << 31 {
            return Err(Error::too_large("rows", format!("{m1} x {m2} rows exceed 2^31")));
        }
        if batch > 65535 {
            return Err(Error::too_large("outputs", format!("{batch} batches exceed the grid's 65535")));
        }
        let row_tiles = m1.div_ceil(TILE);
        let col_tiles = m2.div_ceil(TILE);
        let tiles = if symmetric { col_tiles * (col_tiles + 1) / 2 } else { row_tiles * col_tiles };
        if tiles > i32::MAX as usize {
            return Err(Error::too_large("rows", format!("{tiles} tiles exceed the grid")));
        }
        let plane = m1
            .checked_mul(m2)
            .and_then(|v| v.checked_mul(batch))
            .ok_or_else(|| Error::too_large("rows", "output overflows"))?;
        let ktiles = k.div_ceil(DEPTH).max(1);
        let sms = slots.max(1);
        let blocks = tiles * batch;
        let mut best = (f64::INFINITY, 1usize);
        for s in 1..=MAX_SPLITS.min(ktiles) {
            if s > 1 && plane.saturating_mul(s) > MAX_PARTIAL_ELEMS {
                break;
            }
            let waves = (blocks * s).div_ceil(sms) as f64;
            // Time ∝ waves / s; each split also costs a pass over the partials.
            let cost = waves / s as f64 * (1.0 + 0.02 * s as f64);
            if cost < best.0 {
                best = (cost, s);
            }
        }
        let k_chunk = ktiles.div_ceil(best.1) * DEPTH;
        let splits = k.div_ceil(k_chunk).max(1);
        Ok(GemmPlan { m1, m2, k, batch, symmetric, splits, k_chunk, tiles, col_tiles })
    }

    /// f32 elements of the partials buffer.
    pub fn partial_elems(&self) -> usize {
        self.batch * self.splits * self.m1 * self.m2
    }
}

fn check_operand<T>(arg: &'static str, op: &Operand<'_, T>, rows: usize, k: usize, batch: usize) -> Result<()> {
    if op.rows != rows {
        return Err(Error::shape(arg, &[rows], &[op.rows]));
    }
    let last = (batch - 1)
        .checked_mul(op.batch_stride)
        .and_then(|v| v.checked_add((rows - 1).checked_mul(op.row_stride)?))
        .and_then(|v| v.checked_add(k))
        .ok_or_else(|| Error::too_large(arg, "operand extent overflows"))?;
    if last > op.data.len() {
        return Err(Error::shape(arg, &[last], &[op.data.len()]));
    }
    Ok(())
}

/// Concurrent GEMM blocks for a precision: the tensor-core kernels (cp.async flavour) fit two
/// blocks per SM, the FFMA kernel one.
pub(crate) fn gemm_slots(dev: &Device, precision: Precision) -> usize {
    let sms = dev.props().sm_count.max(1) as usize;
    match precision {
        Precision::F32 => sms,
        Precision::Tf32 | Precision::Bf16 => 2 * sms,
    }
}

/// The GEMM kernel for an input dtype and precision: (name, dynamic shared memory, threads).
/// The cp.async kernels (4 warps of 64 × 64) need `async_ok`: 16-byte aligned rows, batches
/// and depth.
fn gemm_kernel(dtype: DType, precision: Precision, async_ok: bool) -> Result<(&'static str, usize, u32)> {
    Ok(match (dtype, precision) {
        (DType::F32, Precision::Tf32) if async_ok => ("ntkv_ntk_gemm_f32_tf32_async", SMEM_TF32_ASYNC, 128),
        (DType::BF16, Precision::Bf16) if async_ok => ("ntkv_ntk_gemm_bf16_bf16_async", SMEM_BF16_ASYNC, 128),
        (DType::F32, Precision::F32) => ("ntkv_ntk_gemm_f32_ffma", SMEM_FFMA, 256),
        (DType::F32, Precision::Tf32) => ("ntkv_ntk_gemm_f32_tf32", SMEM_TF32, 256),
        (DType::F32, Precision::Bf16) => ("ntkv_ntk_gemm_f32_bf16", SMEM_BF16, 256),
        (DType::BF16, Precision::F32) => ("ntkv_ntk_gemm_bf16_ffma", SMEM_FFMA, 256),
        (DType::BF16, Precision::Tf32) => ("ntkv_ntk_gemm_bf16_tf32", SMEM_TF32, 256),
        (DType::BF16, Precision::Bf16) => ("ntkv_ntk_gemm_bf16_bf16", SMEM_BF16, 256),
        (DType::F16, _) => return Err(Error::invalid("j1", "f16 storage is not supported; use f32 or bf16")),
    })
}

/// Enqueues the split-K GEMM into `partials` (`plan.partial_elems()` or more f32).
/// `b = None` multiplies `a` by itself (required when `plan.symmetric`).
pub(crate) fn gemm<T: Float>(
    dev: &Device,
    plan: &GemmPlan,
    a: &Operand<'_, T>,
    b: Option<&Operand<'_, T>>,
    precision: Precision,
    partials: &mut CudaSlice<f32>,
) -> Result<()> {
    check_operand("a", a, plan.m1, plan.k, plan.batch)?;
    if let Some(b) = b {
        check_operand("b", b, plan.m2, plan.k, plan.batch)?;
    } else {
        check_operand("a", a, plan.m2, plan.k, plan.batch)?;
    }
    if plan.symmetric && b.is_some() {
        return Err(Error::invalid("b", "a symmetric GEMM multiplies one operand by itself"));
    }
    if partials.len() < plan.partial_elems() {
        return Err(Error::shape("partials", &[plan.partial_elems()], &[partials.len()]));
    }
    let b_op = b.unwrap_or(a);
    let stream = dev.stream();
    let base_aligned = {
        let (pa, _ga) = a.data.device_ptr(stream);
        let (pb, _gb) = b_op.data.device_ptr(stream);
        pa % 16 == 0 && pb % 16 == 0
    };
    // 4-element vectors (16 B of f32, 8 B of bf16) for the register-staged loads; whole
    // 16-byte chunks for cp.async.
    let strides = [a.row_stride, a.batch_stride, b_op.row_stride, b_op.batch_stride];
    let vec_ok = base_aligned && strides.iter().all(|s| s % 4 == 0);
    let chunk = 16 / T::DTYPE.size();
    let async_ok = base_aligned && plan.k % chunk == 0 && strides.iter().all(|s| s % chunk == 0);
    let (name, smem, threads) = gemm_kernel(T::DTYPE, precision, async_ok)?;
    let f = dev.function(Module::Ntk, name)?;
    let shared = dev.prepare_shared_mem(&f, smem)?;
    let params = NtkvNtkGemmParams {
        a_batch_stride: a.batch_stride as u64,
        b_batch_stride: b_op.batch_stride as u64,
        a_row_stride: a.row_stride as u64,
        b_row_stride: b_op.row_stride as u64,
        k: plan.k as u64,
        k_chunk: plan.k_chunk as u64,
        m1: to_u32("rows", plan.m1)?,
        m2: to_u32("rows", plan.m2)?,
        batch: to_u32("batch", plan.batch)?,
        splits: to_u32("splits", plan.splits)?,
        col_tiles: to_u32("tiles", plan.col_tiles)?,
        symmetric: u32::from(plan.symmetric),
        vec_ok: u32::from(vec_ok),
        _pad0: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (to_u32("tiles", plan.tiles)?, to_u32("splits", plan.splits)?, to_u32("batch", plan.batch)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut builder = stream.launch_builder(&f);
    builder.arg(&params).arg(a.data).arg(b_op.data).arg(partials);
    // SAFETY: ntkv_ntk_gemm_*(NtkvNtkGemmParams, const T* a, const T* b, float* partials).
    // Every load is of row < m1 (m2) of batch z < batch at column < k, checked above to lie
    // inside a and b (check_operand); vector loads and cp.async chunks are only used when the
    // base pointers, strides (and for cp.async k) keep them aligned and inside a row; every
    // store is to (z, split, r < m1, c < m2) of a partials buffer holding
    // batch·splits·m1·m2 floats; shared memory is exactly the kernel's static_assert'ed size,
    // checked against the device limit.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// How [`reduce`] lays out its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReduceLayout {
    /// `[batch, m1, m2]`.
    Plain,
    /// `[n1, n2, o, o]` from C `[(n1·o), (n2·o)]`.
    Full { n2: usize, o: usize },
    /// `[n1, n2, o]` from `o` batches of C `[n1, n2]`.
    Diagonal { n2: usize, o: usize },
}

fn grid_for(dev: &Device, n: usize) -> Result<u32> {
    to_u32("blocks", n.div_ceil(256).clamp(1, dev.props().sm_count.max(1) as usize * 32))
}

/// Sums the split-K partials (split order) into `out` with `layout`, times `scale`.
pub(crate) fn reduce(
    dev: &Device,
    plan: &GemmPlan,
    partials: &CudaSlice<f32>,
    layout: ReduceLayout,
    scale: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n_out = plan.batch * plan.m1 * plan.m2;
    if out.len() < n_out {
        return Err(Error::shape("out", &[n_out], &[out.len()]));
    }
    if partials.len() < plan.partial_elems() {
        return Err(Error::shape("partials", &[plan.partial_elems()], &[partials.len()]));
    }
    let (kind, n2, o) = match layout {
        ReduceLayout::Plain => (0, 1, 1),
        ReduceLayout::Full { n2, o } => {
            if plan.batch != 1 || plan.m2 != n2 * o || plan.m1 % o != 0 {
                return Err(Error::invalid("layout", "Full layout needs one batch of [(n1·o), (n2·o)]"));
            }
            (1, n2, o)
        }
        ReduceLayout::Diagonal { n2, o } => {
            if plan.batch != o || plan.m2 != n2 {
                return Err(Error::invalid("layout", "Diagonal layout needs o batches of [n1, n2]"));
            }
            (2, n2, o)
        }
    };
    let params = NtkvNtkReduceParams {
        n_out: n_out as u64,
        plane: (plan.m1 * plan.m2) as u64,
        m1: to_u32("rows", plan.m1)?,
        m2: to_u32("rows", plan.m2)?,
        splits: to_u32("splits", plan.splits)?,
        batch: to_u32("batch", plan.batch)?,
        kind,
        n2: to_u32("n2", n2)?,
        o: to_u32("o", o)?,
        symmetric: u32::from(plan.symmetric),
        scale,
        _pad0: 0,
    };
    let f = dev.function(Module::Ntk, "ntkv_ntk_reduce")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, n_out)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(partials).arg(out);
    // SAFETY: ntkv_ntk_reduce(NtkvNtkReduceParams, const float* partials, float* out) writes
    // out[idx] for idx < n_out ≤ out.len() and reads partials[(z·splits + s)·m1·m2 + r·m2 + c]
    // with z < batch, s < splits, r < m1, c < m2 (the layouts decode idx into those ranges,
    // checked above), all inside partial_elems() ≤ partials.len().
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// `out[i, q] = Σ_a j[i, a, q]` for `j [n, o, p]`.
pub(crate) fn presum<T: Float>(
    dev: &Device,
    j: &CudaSlice<T>,
    n: usize,
    o: usize,
    p: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if j.len() != n * o * p || out.len() < n * p {
        return Err(Error::shape("j", &[n * o * p], &[j.len()]));
    }
    let name = match T::DTYPE {
        DType::F32 => "ntkv_ntk_presum_f32",
        DType::BF16 => "ntkv_ntk_presum_bf16",
        DType::F16 => return Err(Error::invalid("j1", "f16 storage is not supported; use f32 or bf16")),
    };
    let params = NtkvNtkPresumParams { p: p as u64, n_out: (n * p) as u64, n: to_u32("n", n)?, o: to_u32("o", o)? };
    let f = dev.function(Module::Ntk, name)?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, n * p)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(j).arg(out);
    // SAFETY: ntkv_ntk_presum_*(NtkvNtkPresumParams, const T* j, float* out) writes out[idx]
    // for idx < n·p ≤ out.len() and reads j[(i·o + a)·p + q] with i < n, a < o, q < p, inside
    // j's n·o·p elements.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// One layer of the factored NTK: `out (+)= scale·Σ_{t,s}(aa + β)·gg` (see ntkv_params.h).
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine(
    dev: &Device,
    aa: &CudaSlice<f32>,
    gg: &CudaSlice<f32>,
    n1: usize,
    n2: usize,
    t: usize,
    e: usize,
    diagonal: bool,
    beta: f32,
    scale: f32,
    accumulate: bool,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let n_out = n1 * n2 * if diagonal { e } else { e * e };
    let aa_len = n1 * t * n2 * t;
    let gg_len = aa_len * e * e;
    if out.len() < n_out || aa.len() < aa_len || gg.len() < gg_len {
        return Err(Error::shape("out", &[n_out, aa_len, gg_len], &[out.len(), aa.len(), gg.len()]));
    }
    let params = NtkvNtkCombineParams {
        n_out: n_out as u64,
        n1: to_u32("n1", n1)?,
        n2: to_u32("n2", n2)?,
        t: to_u32("t", t)?,
        e: to_u32("o", e)?,
        kind: u32::from(diagonal),
        accumulate: u32::from(accumulate),
        beta,
        scale,
    };
    let f = dev.function(Module::Ntk, "ntkv_ntk_combine")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, n_out)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(aa).arg(gg).arg(out);
    // SAFETY: ntkv_ntk_combine(NtkvNtkCombineParams, const float* aa, const float* gg, float*
    // out) writes out[idx < n_out] and reads aa[(i t + ti)·(n2 t) + (j t + si)] (< n1·t·n2·t)
    // and gg[((i t + ti) e + a)·(n2 t e) + (j t + si) e + b] (< n1·t·e·n2·t·e), all checked.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// Forward epilogue: `z = pre + bias`, `act_out = φ(z)` (or `z` when `apply_act` is false).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bias_act(
    dev: &Device,
    pre: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    cols: usize,
    apply_act: bool,
    act: u32,
    z: &mut CudaSlice<f32>,
    act_out: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = pre.len();
    if z.len() != total || act_out.len() != total || cols == 0 || total % cols != 0 {
        return Err(Error::shape("z", &[total], &[z.len()]));
    }
    if let Some(b) = bias {
        if b.len() != cols {
            return Err(Error::shape("bias", &[cols], &[b.len()]));
        }
    }
    let params = NtkvNtkBiasActParams {
        total: total as u64,
        cols: to_u32("cols", cols)?,
        has_bias: u32::from(bias.is_some()),
        apply_act: u32::from(apply_act),
        act,
    };
    let f = dev.function(Module::Ntk, "ntkv_ntk_bias_act")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, total)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = dev.stream().launch_builder(&f);
    // Without a bias the kernel never reads the bias pointer; pass `pre` as a valid stand-in.
    builder.arg(&params).arg(pre).arg(bias.unwrap_or(pre)).arg(z).arg(act_out);
    // SAFETY: ntkv_ntk_bias_act(params, const float* pre, const float* bias, float* z, float*
    // act_out) touches index < total of pre, z and act_out (all exactly total long) and
    // bias[idx % cols] only when has_bias, with bias.len() == cols.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// Cotangents: `identity` writes `g[(n,a), c] = (a == c)` (`[n, o, o]`); otherwise
/// `g[(n,a), c] = pre[(n,a), c]·φ'(z[n, c])`.
pub(crate) fn cotangent(
    dev: &Device,
    pre: Option<&CudaSlice<f32>>,
    z: Option<&CudaSlice<f32>>,
    o: usize,
    cols: usize,
    act: u32,
    g: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = g.len();
    if cols == 0 || o == 0 || total % (cols * o) != 0 {
        return Err(Error::shape("g", &[total], &[cols * o]));
    }
    let mode = match (pre, z) {
        (None, None) => {
            if cols != o {
                return Err(Error::shape("g", &[o], &[cols]));
            }
            0
        }
        (Some(p), Some(zz)) => {
            if p.len() != total || zz.len() != total / o {
                return Err(Error::shape("pre", &[total, total / o], &[p.len(), zz.len()]));
            }
            1
        }
        _ => return Err(Error::invalid("pre", "pre and z go together")),
    };
    let params =
        NtkvNtkCotangentParams { total: total as u64, o: to_u32("o", o)?, cols: to_u32("cols", cols)?, mode, act };
    let f = dev.function(Module::Ntk, "ntkv_ntk_cotangent")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, total)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let dummy = dev.stream().alloc_zeros::<f32>(1)?;
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(pre.unwrap_or(&dummy)).arg(z.unwrap_or(&dummy)).arg(g);
    // SAFETY: ntkv_ntk_cotangent(params, const float* pre, const float* z, float* g) writes
    // g[idx < total]; in mode 1 it reads pre[idx] (pre.len() == total) and z[n·cols + c] with
    // n < total/(o·cols), c < cols (z.len() == total/o); mode 0 reads neither.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// The inputs of one fused JVP step (see `NtkvNtkJvpParams`).
pub(crate) struct JvpStep<'a> {
    pub pre: &'a CudaSlice<f32>,
    pub t1: &'a CudaSlice<f32>,
    pub t2: Option<&'a CudaSlice<f32>>,
    pub bias: Option<(&'a CudaSlice<f32>, &'a CudaSlice<f32>)>,
    pub cols: usize,
    pub is_last: bool,
    pub act: u32,
}

pub(crate) fn jvp(
    dev: &Device,
    s: &JvpStep<'_>,
    a_out: &mut CudaSlice<f32>,
    da_out: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = s.pre.len();
    let bad_t2 = s.t2.is_some_and(|t| t.len() != total);
    let bad_b = s.bias.is_some_and(|(b, db)| b.len() != s.cols || db.len() != s.cols);
    if s.t1.len() != total || bad_t2 || bad_b || a_out.len() != total || da_out.len() != total || s.cols == 0 {
        return Err(Error::shape("jvp", &[total], &[s.t1.len(), a_out.len(), da_out.len()]));
    }
    let params = NtkvNtkJvpParams {
        total: total as u64,
        cols: to_u32("cols", s.cols)?,
        has_bias: u32::from(s.bias.is_some()),
        has_t2: u32::from(s.t2.is_some()),
        is_last: u32::from(s.is_last),
        act: s.act,
        _pad0: 0,
    };
    let f = dev.function(Module::Ntk, "ntkv_ntk_jvp")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(dev, total)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (b, db) = s.bias.unwrap_or((s.pre, s.pre));
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(s.pre).arg(s.t1).arg(s.t2.unwrap_or(s.t1)).arg(b).arg(db).arg(a_out).arg(da_out);
    // SAFETY: ntkv_ntk_jvp(params, pre, t1, t2, bias, dbias, a_out, da_out) touches index <
    // total of pre, t1, t2 (when has_t2), a_out and da_out (all total long, checked) and
    // bias/dbias[idx % cols] only when has_bias, with both cols long.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// What the statistics pass compares the kernel with.
pub(crate) enum StatsTarget<'a> {
    None,
    Labels(&'a CudaSlice<u32>),
    Dense(&'a CudaSlice<f32>),
}

/// `[Σk', Σk'², Σ diag k', Σm', Σm'², Σk'm']` in f64 (see `NtkvNtkStatsParams`); `cent` holds
/// the centring vectors of k and m when given.
pub(crate) fn stats(
    dev: &Device,
    k: &CudaSlice<f32>,
    n: usize,
    target: StatsTarget<'_>,
    cent: Option<&CudaSlice<f64>>,
) -> Result<[f64; 6]> {
    let total = n * n;
    if k.len() != total || n == 0 {
        return Err(Error::shape("kernel", &[total], &[k.len()]));
    }
    let stream = dev.stream();
    let dummy_f = stream.alloc_zeros::<f32>(1)?;
    let dummy_u = stream.alloc_zeros::<u32>(1)?;
    let dummy_d = stream.alloc_zeros::<f64>(1)?;
    let (m_kind, m, labels) = match &target {
        StatsTarget::None => (0, &dummy_f, &dummy_u),
        StatsTarget::Labels(l) => {
            if l.len() != n {
                return Err(Error::shape("labels", &[n], &[l.len()]));
            }
            (1, &dummy_f, *l)
        }
        StatsTarget::Dense(m) => {
            if m.len() != total {
                return Err(Error::shape("targets", &[total], &[m.len()]));
            }
            (2, *m, &dummy_u)
        }
    };
    if let Some(c) = cent {
        if c.len() != 4 * n + 2 || m_kind != 2 {
            return Err(Error::shape("centering", &[4 * n + 2], &[c.len()]));
        }
    }
    let blocks = total.div_ceil(256).clamp(1, dev.props().sm_count.max(1) as usize * 8);
    let params = NtkvNtkStatsParams {
        total: total as u64,
        n: to_u32("n", n)?,
        m_kind,
        center: u32::from(cent.is_some()),
        blocks: to_u32("blocks", blocks)?,
    };
    let mut partials = stream.alloc_zeros::<f64>(blocks * 6)?;
    let mut out = stream.alloc_zeros::<f64>(6)?;
    let f = dev.function(Module::Ntk, "ntkv_ntk_stats")?;
    let cfg = LaunchConfig { grid_dim: (params.blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = stream.launch_builder(&f);
    builder.arg(&params).arg(k).arg(m).arg(labels).arg(cent.unwrap_or(&dummy_d)).arg(&mut partials);
    // SAFETY: ntkv_ntk_stats(params, const float* k, const float* m, const u32* labels, const
    // double* cent, double* partials) reads k[idx < n²]; m[idx] only for m_kind 2 (m.len() ==
    // n²); labels[i < n] only for m_kind 1 (labels.len() == n); cent[< 4n + 2] only when
    // centering (checked); writes partials[block·6 + q] for block < blocks (blocks·6 long).
    unsafe { builder.launch(cfg) }?;
    let f2 = dev.function(Module::Ntk, "ntkv_ntk_stats_finish")?;
    let cfg2 = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b2 = stream.launch_builder(&f2);
    b2.arg(&params).arg(&partials).arg(&mut out);
    // SAFETY: ntkv_ntk_stats_finish(params, const double* partials, double* out) reads
    // partials[b·6 + q] for b < blocks and writes out[q < 6]; both buffers are that long.
    unsafe { b2.launch(cfg2) }?;
    let host = stream.clone_dtoh(&out)?;
    let mut r = [0.0f64; 6];
    r.copy_from_slice(&host[..6]);
    Ok(r)
}

/// Row means, column means and the grand mean of `x [n, n]` into `out[offset..offset + 2n + 1]`.
pub(crate) fn means(dev: &Device, x: &CudaSlice<f32>, n: usize, out: &mut CudaSlice<f64>) -> Result<()> {
    if x.len() != n * n || out.len() != 2 * n + 1 || n == 0 {
        return Err(Error::shape("kernel", &[n * n, 2 * n + 1], &[x.len(), out.len()]));
    }
    let params = NtkvNtkMeansParams { n: to_u32("n", n)?, _pad0: 0 };
    let f = dev.function(Module::Ntk, "ntkv_ntk_means")?;
    let blocks = to_u32("blocks", n + n.div_ceil(256))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut builder = dev.stream().launch_builder(&f);
    builder.arg(&params).arg(x).arg(&mut *out);
    // SAFETY: ntkv_ntk_means(params, const float* x, double* out): blocks < n read row
    // blockIdx of x (n² long) and write out[i < n]; the other blocks write out[n + col] for
    // col < n after reading column col; out is 2n + 1 long.
    unsafe { builder.launch(cfg) }?;
    let f2 = dev.function(Module::Ntk, "ntkv_ntk_grand_mean")?;
    let cfg2 = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b2 = dev.stream().launch_builder(&f2);
    b2.arg(&params).arg(out);
    // SAFETY: ntkv_ntk_grand_mean(params, double* out) reads out[i < n] and writes out[2n].
    unsafe { b2.launch(cfg2) }?;
    Ok(())
}

/// A growable f32 device buffer for split-K partials and intermediate Grams.
#[derive(Default)]
pub(crate) struct Scratch {
    buf: Option<CudaSlice<f32>>,
}

impl Scratch {
    /// A buffer of at least `len` f32 (contents unspecified: every user overwrites it).
    pub fn get(&mut self, dev: &Device, len: usize) -> Result<&mut CudaSlice<f32>> {
        let need = len.max(1);
        if self.buf.as_ref().map_or(true, |b| b.len() < need) {
            self.buf = None;
            self.buf = Some(dev.stream().alloc_zeros::<f32>(need)?);
        }
        self.buf.as_mut().ok_or_else(|| Error::invalid("scratch", "allocation vanished"))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// `C [ra, rb] = A [ra, k] · B [rb, k]ᵀ` (both row-major f32, contiguous rows) with the
/// given precision; `b = None` is the symmetric `A·Aᵀ`.
pub(crate) fn matmul_abt(
    dev: &Device,
    a: &CudaSlice<f32>,
    ra: usize,
    b: Option<(&CudaSlice<f32>, usize)>,
    k: usize,
    precision: Precision,
    scratch: &mut Scratch,
) -> Result<CudaSlice<f32>> {
    let rb = b.map_or(ra, |(_, r)| r);
    let plan = GemmPlan::new(gemm_slots(dev, precision), ra, rb, k, 1, b.is_none())?;
    let op_a = Operand { data: a, rows: ra, row_stride: k, batch_stride: 0 };
    let op_b = b.map(|(data, rows)| Operand { data, rows, row_stride: k, batch_stride: 0 });
    let partials = scratch.get(dev, plan.partial_elems())?;
    gemm(dev, &plan, &op_a, op_b.as_ref(), precision, partials)?;
    let mut out = dev.stream().alloc_zeros::<f32>(ra * rb)?;
    reduce(dev, &plan, partials, ReduceLayout::Plain, 1.0, &mut out)?;
    Ok(out)
}

/// The kernels' index arithmetic transliterated to the host, so the tests can run the whole
/// launch geometry (tile enumeration, split ranges, partial layout, the reduction's output
/// decode and mirroring, the combine decode) on the CPU. The arithmetic inside a tile is a
/// plain dot product here; the GPU tests cover the kernels themselves.
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

    /// One launch of the split-K GEMM: every block (tile, split, batch) writes its rows < m1 and
    /// columns < m2 of its partial plane; anything no block writes stays NaN.
    pub(crate) fn gemm(
        plan: &GemmPlan,
        a: &[f32],
        b: Option<&[f32]>,
        row_stride: usize,
        batch_stride: usize,
    ) -> Vec<f32> {
        let b = b.unwrap_or(a);
        let mut part = vec![f32::NAN; plan.partial_elems()];
        let plane = plan.m1 * plan.m2;
        for x in 0..plan.tiles {
            let (tr, tc) =
                if plan.symmetric { sym_tile(x, plan.col_tiles) } else { (x / plan.col_tiles, x % plan.col_tiles) };
            for split in 0..plan.splits {
                let kbeg = split * plan.k_chunk;
                let kend = (kbeg + plan.k_chunk).min(plan.k);
                for z in 0..plan.batch {
                    for r in tr * TILE..tr * TILE + TILE {
                        for c in tc * TILE..tc * TILE + TILE {
                            if r >= plan.m1 || c >= plan.m2 {
                                continue;
                            }
                            let ra = z * batch_stride + r * row_stride;
                            let rb = z * batch_stride + c * row_stride;
                            let mut acc = 0.0f32;
                            for q in kbeg..kend.max(kbeg) {
                                acc = a[ra + q].mul_add(b[rb + q], acc);
                            }
                            part[(z * plan.splits + split) * plane + r * plan.m2 + c] = acc;
                        }
                    }
                }
            }
        }
        part
    }

    /// `ntkv_ntk_reduce`; panics if it reads a partial no block wrote.
    pub(crate) fn reduce(plan: &GemmPlan, part: &[f32], layout: ReduceLayout, scale: f32) -> Vec<f32> {
        let n_out = plan.batch * plan.m1 * plan.m2;
        let plane = plan.m1 * plan.m2;
        (0..n_out)
            .map(|idx| {
                let (z, mut r, mut c) = match layout {
                    ReduceLayout::Full { n2, o } => {
                        let (bb, q) = (idx % o, idx / o);
                        let (aa, q) = (q % o, q / o);
                        let (j, i) = (q % n2, q / n2);
                        (0, i * o + aa, j * o + bb)
                    }
                    ReduceLayout::Diagonal { n2, o } => {
                        let (aa, q) = (idx % o, idx / o);
                        (aa, q / n2, q % n2)
                    }
                    ReduceLayout::Plain => (idx / plane, idx % plane / plan.m2, idx % plane % plan.m2),
                };
                if plan.symmetric && r / TILE > c / TILE {
                    std::mem::swap(&mut r, &mut c);
                }
                let mut s = 0.0f32;
                for k in 0..plan.splits {
                    let v = part[(z * plan.splits + k) * plane + r * plan.m2 + c];
                    assert!(!v.is_nan(), "reduce read an unwritten partial at z={z} split={k} ({r}, {c})");
                    s += v;
                }
                s * scale
            })
            .collect()
    }

    /// `ntkv_ntk_presum_*`.
    pub(crate) fn presum(j: &[f32], n: usize, o: usize, p: usize) -> Vec<f32> {
        (0..n * p).map(|idx| (0..o).map(|a| j[(idx / p * o + a) * p + idx % p]).sum()).collect()
    }

    /// `ntkv_ntk_combine`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn combine(
        aa: &[f32],
        gg: &[f32],
        _n1: usize,
        n2: usize,
        t: usize,
        e: usize,
        diagonal: bool,
        beta: f32,
        scale: f32,
        accumulate: bool,
        out: &mut [f32],
    ) {
        let aa_cols = n2 * t;
        let gg_cols = aa_cols * e;
        for (idx, o) in out.iter_mut().enumerate() {
            let mut q = idx;
            let (oa, ob) = if diagonal {
                let a = q % e;
                q /= e;
                (a, a)
            } else {
                let b = q % e;
                q /= e;
                let a = q % e;
                q /= e;
                (a, b)
            };
            let (j, i) = (q % n2, q / n2);
            let mut s = 0.0f32;
            for ti in 0..t {
                let ar = i * t + ti;
                let gr = ar * e + oa;
                for si in 0..t {
                    let ac = j * t + si;
                    let gc = ac * e + ob;
                    s = (aa[ar * aa_cols + ac] + beta).mul_add(gg[gr * gg_cols + gc], s);
                }
            }
            s *= scale;
            *o = if accumulate { *o + s } else { s };
        }
    }

    /// `matmul_abt`: plan, GEMM and a plain reduction.
    pub(crate) fn matmul_abt(slots: usize, a: &[f32], ra: usize, b: Option<(&[f32], usize)>, k: usize) -> Vec<f32> {
        let rb = b.map_or(ra, |(_, r)| r);
        let plan = GemmPlan::new(slots, ra, rb, k, 1, b.is_none()).expect("plan");
        let part = gemm(&plan, a, b.map(|(x, _)| x), k, 0);
        reduce(&plan, &part, ReduceLayout::Plain, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::emulate::sym_tile;
    use super::*;

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
            let p = GemmPlan::new(slots, m1, m2, k, batch, sym).unwrap();
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
        assert!(GemmPlan::new(132, 21, 21, 200_003, 1, true).unwrap().splits > 1);
        assert_eq!(GemmPlan::new(132, 4096, 4096, 1 << 18, 1, true).unwrap().splits, 1);
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
    fn plan_rejects_bad_geometry() {
        assert!(GemmPlan::new(132, 0, 4, 8, 1, false).is_err());
        assert!(GemmPlan::new(132, 4, 0, 8, 1, false).is_err());
        assert!(GemmPlan::new(132, 4, 4, 8, 0, false).is_err());
        assert!(GemmPlan::new(132, 4, 5, 8, 1, true).is_err());
        assert!(GemmPlan::new(132, 4, 4, 8, 70_000, false).is_err());
        assert!(GemmPlan::new(132, 1 << 33, 4, 8, 1, false).is_err());
    }

    #[test]
    fn kernel_choice_follows_dtype_precision_and_alignment() {
        assert_eq!(gemm_kernel(DType::F32, Precision::F32, true).unwrap().0, "ntkv_ntk_gemm_f32_ffma");
        assert_eq!(gemm_kernel(DType::F32, Precision::Tf32, true).unwrap().0, "ntkv_ntk_gemm_f32_tf32_async");
        assert_eq!(gemm_kernel(DType::F32, Precision::Tf32, false).unwrap().0, "ntkv_ntk_gemm_f32_tf32");
        assert_eq!(gemm_kernel(DType::F32, Precision::Bf16, true).unwrap().0, "ntkv_ntk_gemm_f32_bf16");
        assert_eq!(gemm_kernel(DType::BF16, Precision::Bf16, true).unwrap().0, "ntkv_ntk_gemm_bf16_bf16_async");
        assert_eq!(gemm_kernel(DType::BF16, Precision::Bf16, false).unwrap().0, "ntkv_ntk_gemm_bf16_bf16");
        assert!(gemm_kernel(DType::F16, Precision::F32, true).is_err());
        // Shared memory of every flavour fits the H200's 227 KiB opt-in limit.
        for smem in [SMEM_FFMA, SMEM_TF32, SMEM_BF16, SMEM_TF32_ASYNC, SMEM_BF16_ASYNC] {
            assert!(smem <= 227 * 1024);
        }
        assert_eq!(gemm_kernel(DType::BF16, Precision::Bf16, true).unwrap().2, 128);
        assert_eq!(gemm_kernel(DType::F32, Precision::F32, true).unwrap().2, 256);
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

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    // TODO(platform): list every id; filled in as the launchers move to `KernelId`.
    Vec::new()
}
