//! Launchers for the NTK kernels of `cuda/ntk.cu` (crate-private): the contraction layouts of
//! the split-K reduction, the Pseudo pre-sum, the factored-NTK combine, the MLP's elementwise
//! steps and the metric reductions. The GEMMs themselves are the [`crate::gemm`] module's. The
//! public API in `mod.rs` validates every argument before calling in here; each launcher
//! re-checks the extents its kernel touches.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use crate::device::{Device, Module};
use crate::error::{checked_mul, to_u32, to_u64, Error, Result};
use crate::gemm::gpu::{launch_reduce, reduce_params, Split, THREADS};
use crate::gemm::{GemmPlan, GemmShape, Operand, Precision};
use crate::launch::{self, KernelId};
use crate::params::{
    NtkvNtkBiasActParams, NtkvNtkCombineParams, NtkvNtkCotangentParams, NtkvNtkJvpParams, NtkvNtkMeansParams,
    NtkvNtkPresumParams, NtkvNtkStatsParams,
};
use crate::tensor::{DType, Float};

/// The id of an NTK kernel without specialisation.
fn ntk(op: &'static str) -> KernelId {
    KernelId::new(Module::Ntk, op)
}

fn presum_id(dtype: DType) -> Result<KernelId> {
    match dtype {
        DType::F16 => Err(Error::invalid("j1", "f16 storage is not supported; use f32 or bf16")),
        d => Ok(ntk("ntk_presum").dtype(d)),
    }
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

/// Sums the split-K partials (split order) into `out` with `layout`, times `scale`.
pub(crate) fn reduce(
    device: &Device,
    split: &Split,
    partials: &CudaSlice<f32>,
    layout: ReduceLayout,
    scale: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n_out = split.batch * split.m1 * split.m2;
    if out.len() < n_out {
        return Err(Error::shape("out", &[n_out], &[out.len()]));
    }
    let (kind, n2, o) = match layout {
        ReduceLayout::Plain => (0, 1, 1),
        ReduceLayout::Full { n2, o } => {
            if split.batch != 1 || split.m2 != n2 * o || o == 0 || split.m1 % o != 0 {
                return Err(Error::internal("the Full layout needs one batch of [(n1·o), (n2·o)]"));
            }
            (1, n2, o)
        }
        ReduceLayout::Diagonal { n2, o } => {
            if split.batch != o || split.m2 != n2 {
                return Err(Error::internal("the Diagonal layout needs o batches of [n1, n2]"));
            }
            (2, n2, o)
        }
    };
    let params = reduce_params(split, kind, n2, o, scale, 0, 0)?;
    launch_reduce(device, ntk("ntk_reduce"), &params, split, partials, out)
}

/// `out[i, q] = Σ_a j[i, a, q]` for `j [n, o, p]`.
pub(crate) fn presum<T: Float>(
    device: &Device,
    j: &CudaView<'_, T>,
    n: usize,
    o: usize,
    p: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let total = checked_mul("j", n, p)?;
    let need = checked_mul("j", total, o)?;
    if j.len() < need || out.len() < total {
        return Err(Error::shape("j", &[need, total], &[j.len(), out.len()]));
    }
    let params =
        NtkvNtkPresumParams { p: to_u64("p", p)?, n_out: to_u64("n", total)?, n: to_u32("n", n)?, o: to_u32("o", o)? };
    let (f, cfg) = launch::grid_stride_kernel(device, presum_id(T::DTYPE)?, THREADS, total)?;
    let mut builder = device.stream().launch_builder(&f);
    builder.arg(&params).arg(j).arg(out);
    // SAFETY: ntkv_ntk_presum_*(NtkvNtkPresumParams, const T* j, float* out) writes out[idx]
    // for idx < n·p ≤ out.len() and reads j[(i·o + a)·p + q] with i < n, a < o, q < p, inside
    // the n·o·p ≤ j.len() elements checked above.
    unsafe { builder.launch(cfg) }?;
    Ok(())
}

/// One layer's combine step of the factored NTK, `out (+)= scale·Σ_{t,s}(aa + β)·gg` (see
/// `NtkvNtkCombineParams`): `aa [n1·t, n2·t]`, `gg [n1·t·e, n2·t·e]`, and `out [n1, n2, e]`
/// (`diagonal`) or `[n1, n2, e, e]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Combine {
    pub n1: usize,
    pub n2: usize,
    /// Samples per slot (weight sharing: rows of `aa` per input).
    pub t: usize,
    /// Output entries per side.
    pub e: usize,
    pub diagonal: bool,
    /// 1 when the layer has a bias (its all-ones column), else 0.
    pub beta: f32,
    pub scale: f32,
    /// Adds to `out` instead of overwriting it (every layer after the first).
    pub accumulate: bool,
}

/// Launches [`Combine`] on `aa` and `gg`, writing `out`.
pub(crate) fn combine(
    device: &Device,
    c: &Combine,
    aa: &CudaSlice<f32>,
    gg: &CudaSlice<f32>,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let Combine { n1, n2, t, e, diagonal, beta, scale, accumulate } = *c;
    let pair = checked_mul("n2", n1, n2)?;
    let n_out = checked_mul("o", pair, if diagonal { e } else { checked_mul("o", e, e)? })?;
    let aa_len = checked_mul("t", checked_mul("t", n1, t)?, checked_mul("t", n2, t)?)?;
    let gg_len = checked_mul("o", aa_len, checked_mul("o", e, e)?)?;
    if out.len() < n_out || aa.len() < aa_len || gg.len() < gg_len {
        return Err(Error::shape("out", &[n_out, aa_len, gg_len], &[out.len(), aa.len(), gg.len()]));
    }
    let params = NtkvNtkCombineParams {
        n_out: to_u64("out", n_out)?,
        n1: to_u32("n1", n1)?,
        n2: to_u32("n2", n2)?,
        t: to_u32("t", t)?,
        e: to_u32("o", e)?,
        kind: u32::from(diagonal),
        accumulate: u32::from(accumulate),
        beta,
        scale,
    };
    let (f, cfg) = launch::grid_stride_kernel(device, ntk("ntk_combine"), THREADS, n_out)?;
    let mut builder = device.stream().launch_builder(&f);
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
    device: &Device,
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
        total: to_u64("x", total)?,
        cols: to_u32("cols", cols)?,
        has_bias: u32::from(bias.is_some()),
        apply_act: u32::from(apply_act),
        act,
    };
    let (f, cfg) = launch::grid_stride_kernel(device, ntk("ntk_bias_act"), THREADS, total)?;
    let mut builder = device.stream().launch_builder(&f);
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
    device: &Device,
    pre: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
    o: usize,
    cols: usize,
    act: u32,
    g: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = g.len();
    if cols == 0 || o == 0 || total % checked_mul("g", cols, o)? != 0 {
        return Err(Error::shape("g", &[total], &[cols * o]));
    }
    let mode = match pre {
        None if cols != o => return Err(Error::shape("g", &[o], &[cols])),
        None => 0,
        Some((p, zz)) if p.len() != total || zz.len() != total / o => {
            return Err(Error::shape("pre", &[total, total / o], &[p.len(), zz.len()]))
        }
        Some(_) => 1,
    };
    let params = NtkvNtkCotangentParams {
        total: to_u64("g", total)?,
        o: to_u32("o", o)?,
        cols: to_u32("cols", cols)?,
        mode,
        act,
    };
    let (f, cfg) = launch::grid_stride_kernel(device, ntk("ntk_cotangent"), THREADS, total)?;
    // Mode 0 reads neither input; a one-element buffer stands in for both pointers.
    let dummy = device.stream().alloc_zeros::<f32>(1)?;
    let (p, zz) = pre.unwrap_or((&dummy, &dummy));
    let mut builder = device.stream().launch_builder(&f);
    builder.arg(&params).arg(p).arg(zz).arg(g);
    // SAFETY: ntkv_ntk_cotangent(params, const float* pre, const float* z, float* g) writes
    // g[idx < total]; in mode 1 it reads pre[idx] (pre.len() == total) and z[n·cols + c] with
    // n < total/(o·cols), c < cols (z.len() == total/o); mode 0 reads neither pointer.
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
    device: &Device,
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
        total: to_u64("x", total)?,
        cols: to_u32("cols", s.cols)?,
        has_bias: u32::from(s.bias.is_some()),
        has_t2: u32::from(s.t2.is_some()),
        is_last: u32::from(s.is_last),
        act: s.act,
        _pad0: 0,
    };
    let (f, cfg) = launch::grid_stride_kernel(device, ntk("ntk_jvp"), THREADS, total)?;
    let (b, db) = s.bias.unwrap_or((s.pre, s.pre));
    let mut builder = device.stream().launch_builder(&f);
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
    device: &Device,
    k: &CudaView<'_, f32>,
    n: usize,
    target: StatsTarget<'_>,
    cent: Option<&CudaSlice<f64>>,
) -> Result<[f64; 6]> {
    let total = checked_mul("kernel", n, n)?;
    if k.len() != total || n == 0 {
        return Err(Error::shape("kernel", &[total], &[k.len()]));
    }
    let stream = device.stream();
    let dummy_f = stream.alloc_zeros::<f32>(1)?;
    let dummy_u = stream.alloc_zeros::<u32>(1)?;
    let dummy_d = stream.alloc_zeros::<f64>(1)?;
    let (m_kind, m, labels) = match &target {
        StatsTarget::None => (0, &dummy_f, &dummy_u),
        StatsTarget::Labels(l) if l.len() != n => return Err(Error::shape("labels", &[n], &[l.len()])),
        StatsTarget::Labels(l) => (1, &dummy_f, *l),
        StatsTarget::Dense(m) if m.len() != total => return Err(Error::shape("targets", &[total], &[m.len()])),
        StatsTarget::Dense(m) => (2, *m, &dummy_u),
    };
    if let Some(c) = cent {
        if c.len() != 4 * n + 2 || m_kind != 2 {
            return Err(Error::internal("the centring vectors need dense targets and 4n + 2 entries"));
        }
    }
    let (f, cfg) = launch::grid_stride_kernel(device, ntk("ntk_stats"), THREADS, total)?;
    let blocks = cfg.grid_dim.0;
    let params = NtkvNtkStatsParams {
        total: to_u64("kernel", total)?,
        n: to_u32("n", n)?,
        m_kind,
        center: u32::from(cent.is_some()),
        blocks,
    };
    let mut partials = stream.alloc_zeros::<f64>(blocks as usize * 6)?;
    let mut out = stream.alloc_zeros::<f64>(6)?;
    let mut builder = stream.launch_builder(&f);
    builder.arg(&params).arg(k).arg(m).arg(labels).arg(cent.unwrap_or(&dummy_d)).arg(&mut partials);
    // SAFETY: ntkv_ntk_stats(params, const float* k, const float* m, const u32* labels, const
    // double* cent, double* partials), launched with exactly `blocks` blocks, reads k[idx <
    // n²]; m[idx] only for m_kind 2 (m.len() == n²); labels[i < n] only for m_kind 1
    // (labels.len() == n); cent[< 4n + 2] only when centring (checked); writes
    // partials[block·6 + q] for block < blocks (blocks·6 long).
    unsafe { builder.launch(cfg) }?;
    let f2 = device.kernel(ntk("ntk_stats_finish"))?;
    let cfg2 = launch::grid_for(device, &f2, THREADS, 0, 1, false)?;
    let mut b2 = stream.launch_builder(&f2);
    b2.arg(&params).arg(&partials).arg(&mut out);
    // SAFETY: ntkv_ntk_stats_finish(params, const double* partials, double* out), one block,
    // reads partials[b·6 + q] for b < blocks and writes out[q < 6]; both buffers are that long.
    unsafe { b2.launch(cfg2) }?;
    let host = stream.clone_dtoh(&out)?;
    let mut r = [0.0f64; 6];
    r.copy_from_slice(&host[..6]);
    Ok(r)
}

/// Row means, column means and the grand mean of `x [n, n]` into `out [2n + 1]`.
pub(crate) fn means(device: &Device, x: &CudaView<'_, f32>, n: usize, out: &mut CudaViewMut<'_, f64>) -> Result<()> {
    let total = checked_mul("kernel", n, n)?;
    if x.len() != total || out.len() != 2 * n + 1 || n == 0 {
        return Err(Error::shape("kernel", &[total, 2 * n + 1], &[x.len(), out.len()]));
    }
    let params = NtkvNtkMeansParams { n: to_u32("n", n)?, _pad0: 0 };
    let f = device.kernel(ntk("ntk_means"))?;
    // One block per row, then one thread per column: one block per work item.
    let cfg = launch::grid_for(device, &f, THREADS, 0, n + n.div_ceil(THREADS as usize), false)?;
    let mut builder = device.stream().launch_builder(&f);
    builder.arg(&params).arg(x).arg(&mut *out);
    // SAFETY: ntkv_ntk_means(params, const float* x, double* out): blocks < n read row
    // blockIdx of x (n² long) and write out[i < n]; the other blocks write out[n + col] for
    // col < n after reading column col; out is 2n + 1 long.
    unsafe { builder.launch(cfg) }?;
    let f2 = device.kernel(ntk("ntk_grand_mean"))?;
    let cfg2 = launch::grid_for(device, &f2, THREADS, 0, 1, false)?;
    let mut b2 = device.stream().launch_builder(&f2);
    b2.arg(&params).arg(out);
    // SAFETY: ntkv_ntk_grand_mean(params, double* out) reads out[i < n] and writes out[2n].
    unsafe { b2.launch(cfg2) }?;
    Ok(())
}

/// The shape of `C [ra, rb] = A [ra, k] · B [rb, k]ᵀ` (contiguous rows); `symmetric` is `A·Aᵀ`.
pub(crate) fn abt_shape(ra: usize, rb: usize, k: usize, symmetric: bool) -> GemmShape {
    let a = Operand::row_major(k);
    GemmShape { batch: 1, m: ra, n: rb, k, a, b: a.flipped(), c: Operand::row_major(rb), symmetric }
}

/// `C [ra, rb] = A [ra, k] · B [rb, k]ᵀ` (both row-major f32) with the gemm module at
/// `precision`; `b = None` is the symmetric `A·Aᵀ`.
pub(crate) fn matmul_abt(
    device: &Device,
    a: &CudaView<'_, f32>,
    ra: usize,
    b: Option<(&CudaView<'_, f32>, usize)>,
    k: usize,
    precision: Precision,
) -> Result<CudaSlice<f32>> {
    let rb = b.map_or(ra, |(_, r)| r);
    let mut plan = GemmPlan::new(device, &abt_shape(ra, rb, k, b.is_none()), precision)?;
    let mut out = device.stream().alloc_zeros::<f32>(checked_mul("c", ra, rb)?.max(1))?;
    plan.run_views(a, b.map(|(v, _)| v), &mut out.as_view_mut())?;
    Ok(out)
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`). The GEMMs are listed by [`crate::gemm::kernels`].
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids: Vec<KernelId> = [
        "ntk_reduce",
        "ntk_combine",
        "ntk_bias_act",
        "ntk_cotangent",
        "ntk_jvp",
        "ntk_stats",
        "ntk_stats_finish",
        "ntk_means",
        "ntk_grand_mean",
    ]
    .into_iter()
    .map(ntk)
    .collect();
    ids.extend([DType::F32, DType::F16, DType::BF16].into_iter().filter_map(|d| presum_id(d).ok()));
    ids
}

/// The NTK kernels' index arithmetic on the host (the contraction layouts of the reduction, the
/// pre-sum, the combine), on top of the gemm module's emulated split-K launch.
#[cfg(test)]
pub(crate) mod emulate {
    use super::*;
    use crate::gemm::gpu::{emulate as gemm_emu, Geometry};

    /// `ntkv_ntk_reduce`; panics if it reads a partial no block wrote.
    pub(crate) fn reduce(split: &Split, part: &[f32], layout: ReduceLayout, scale: f32) -> Vec<f32> {
        let n_out = split.batch * split.m1 * split.m2;
        let plane = split.m1 * split.m2;
        (0..n_out)
            .map(|idx| {
                let (z, r, c) = match layout {
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
                    ReduceLayout::Plain => (idx / plane, idx % plane / split.m2, idx % plane % split.m2),
                };
                gemm_emu::sum_splits(split, part, z, r, c) * scale
            })
            .collect()
    }

    /// `ntkv_ntk_presum_*`.
    pub(crate) fn presum(j: &[f32], n: usize, o: usize, p: usize) -> Vec<f32> {
        (0..n * p).map(|idx| (0..o).map(|a| j[(idx / p * o + a) * p + idx % p]).sum()).collect()
    }

    /// `ntkv_ntk_combine`.
    pub(crate) fn combine(c: &Combine, aa: &[f32], gg: &[f32], out: &mut [f32]) {
        let Combine { n2, t, e, diagonal, beta, scale, accumulate, .. } = *c;
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

    /// The split-K launch of a geometry, as the plan would run it with `slots`.
    pub(crate) fn gemm(slots: usize, shape: &GemmShape, x: &[f32], y: Option<&[f32]>) -> (Split, Vec<f32>) {
        let g = Geometry::of(shape);
        let split = Split::new(slots, g.m1, g.m2, shape.k, shape.batch, shape.symmetric).expect("split");
        let part = gemm_emu::gemm(&split, &g, x, y);
        (split, part)
    }

    /// `matmul_abt`: plan, GEMM and a plain reduction.
    pub(crate) fn matmul_abt(slots: usize, a: &[f32], ra: usize, b: Option<(&[f32], usize)>, k: usize) -> Vec<f32> {
        let rb = b.map_or(ra, |(_, r)| r);
        let (split, part) = gemm(slots, &abt_shape(ra, rb, k, b.is_none()), a, b.map(|(x, _)| x));
        reduce(&split, &part, ReduceLayout::Plain, 1.0)
    }
}
