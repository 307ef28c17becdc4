//! Metrics on an `[N, N]` kernel on the device (SPEC §6).
//!
//! Where each runs:
//! - [`trace`], [`frobenius_norm`], [`mean`], [`stats`], [`lga`], [`alignment`]: GPU
//!   reductions. Each block sums its share in `f64` and a single block adds the block sums in
//!   a fixed order, so the results are deterministic; one 48-byte read-back per call.
//!   [`alignment`] forms `YYᵀ` with the F32 GEMM kernel; its centered form first computes row,
//!   column and grand means of `K` and `YYᵀ` on the GPU (fixed order).
//! - [`eigenvalues`], [`condition_number`], [`ntk_regression`]: copy the kernel to the host and
//!   run in `f64` on the CPU ([`cpu::eigenvalues_symmetric`]: Householder + implicit QL;
//!   [`cpu::ntk_regression`]: Cholesky). O(N³): about a minute at N = 4096.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ntk::gpu::{self, Scratch, StatsTarget};
use crate::ntk::{cpu, Precision};
use crate::tensor::DeviceTensor;

fn square(arg: &'static str, k: &DeviceTensor<f32>) -> Result<usize> {
    let s = k.shape();
    if s.len() != 2 || s[0] != s[1] || s[0] == 0 {
        let n = s.first().copied().unwrap_or(0).max(1);
        return Err(Error::shape(arg, &[n, n], s));
    }
    Ok(s[0])
}

/// The basic sums of a kernel, from one GPU pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelStats {
    /// `N`.
    pub n: usize,
    /// `Σ K_ij`.
    pub sum: f64,
    /// `Σ K_ij²`.
    pub sum_sq: f64,
    /// `Σ K_ii`.
    pub trace: f64,
}

impl KernelStats {
    /// `‖K‖_F`.
    pub fn frobenius_norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }
    /// Mean over all `N²` entries.
    pub fn mean(&self) -> f64 {
        self.sum / (self.n * self.n) as f64
    }
}

/// Trace, sum and sum of squares of `k [N, N]` in one GPU pass.
///
/// # Errors
/// [`Error::Shape`] unless `k` is square and non-empty.
pub fn stats(dev: &Device, k: &DeviceTensor<f32>) -> Result<KernelStats> {
    let n = square("kernel", k)?;
    let s = gpu::stats(dev, k.slice(), n, StatsTarget::None, None)?;
    Ok(KernelStats { n, sum: s[0], sum_sq: s[1], trace: s[2] })
}

/// `Σ K_ii` (GPU).
///
/// # Errors
/// As [`stats`].
pub fn trace(dev: &Device, k: &DeviceTensor<f32>) -> Result<f64> {
    Ok(stats(dev, k)?.trace)
}

/// `‖K‖_F` (GPU).
///
/// # Errors
/// As [`stats`].
pub fn frobenius_norm(dev: &Device, k: &DeviceTensor<f32>) -> Result<f64> {
    Ok(stats(dev, k)?.frobenius_norm())
}

/// The mean of all `N²` entries (GPU).
///
/// # Errors
/// As [`stats`].
pub fn mean(dev: &Device, k: &DeviceTensor<f32>) -> Result<f64> {
    Ok(stats(dev, k)?.mean())
}

/// Label-gradient alignment (GPU): the Pearson correlation over all `N²` entries (diagonal
/// included) between `K` and `L`, `L_ij = +1` if `labels[i] == labels[j]` else `−1`, with one
/// global mean (no double-centering). NaN when `K` or `L` is constant (as `numpy.corrcoef`).
///
/// # Errors
/// As [`stats`]; [`Error::Shape`] when `labels` is not `[N]`.
pub fn lga(dev: &Device, k: &DeviceTensor<f32>, labels: &[u32]) -> Result<f64> {
    let n = square("kernel", k)?;
    if labels.len() != n {
        return Err(Error::shape("labels", &[n], &[labels.len()]));
    }
    let l = dev.stream().clone_htod(labels)?;
    let s = gpu::stats(dev, k.slice(), n, StatsTarget::Labels(&l), None)?;
    let cnt = (n * n) as f64;
    let cov = s[5] - s[0] * s[3] / cnt;
    let vk = s[1] - s[0] * s[0] / cnt;
    let vl = s[4] - s[3] * s[3] / cnt;
    Ok(cov / (vk.max(0.0) * vl.max(0.0)).sqrt())
}

/// Kernel-target alignment `⟨K, YYᵀ⟩ / (‖K‖_F ‖YYᵀ‖_F)` (GPU) for targets `y [N, C]`; with
/// `centered`, the same on `HKH` and `H·YYᵀ·H`, `H = I − 11ᵀ/N`. NaN when a (centered)
/// matrix is zero.
///
/// # Errors
/// As [`stats`]; [`Error::Shape`] when `y` is not `[N, C]` with `C ≥ 1`.
pub fn alignment(dev: &Device, k: &DeviceTensor<f32>, y: &DeviceTensor<f32>, centered: bool) -> Result<f64> {
    let n = square("kernel", k)?;
    let ys = y.shape();
    if ys.len() != 2 || ys[0] != n || ys[1] == 0 {
        return Err(Error::shape("targets", &[n, ys.get(1).copied().unwrap_or(1).max(1)], ys));
    }
    let mut scratch = Scratch::default();
    let yy = gpu::matmul_abt(dev, y.slice(), n, None, ys[1], Precision::F32, &mut scratch)?;
    let s = if centered {
        let mut ck = dev.stream().alloc_zeros::<f64>(2 * n + 1)?;
        let mut cm = dev.stream().alloc_zeros::<f64>(2 * n + 1)?;
        gpu::means(dev, k.slice(), n, &mut ck)?;
        gpu::means(dev, &yy, n, &mut cm)?;
        let mut cent = dev.stream().alloc_zeros::<f64>(4 * n + 2)?;
        dev.stream().memcpy_dtod(&ck, &mut cent.slice_mut(0..2 * n + 1))?;
        dev.stream().memcpy_dtod(&cm, &mut cent.slice_mut(2 * n + 1..4 * n + 2))?;
        gpu::stats(dev, k.slice(), n, StatsTarget::Dense(&yy), Some(&cent))?
    } else {
        gpu::stats(dev, k.slice(), n, StatsTarget::Dense(&yy), None)?
    };
    Ok(s[5] / (s[1].sqrt() * s[4].sqrt()))
}

fn to_host_f64(k: &DeviceTensor<f32>) -> Result<Vec<f64>> {
    Ok(k.to_host()?.into_iter().map(f64::from).collect())
}

/// All eigenvalues of the symmetric kernel `k [N, N]`, ascending. Copies `k` to the host and
/// runs [`cpu::eigenvalues_symmetric`] in `f64` (O(N³) on the CPU; only the lower triangle is
/// read).
///
/// # Errors
/// As [`stats`]; [`Error::NonFinite`] for NaN or infinite entries.
pub fn eigenvalues(k: &DeviceTensor<f32>) -> Result<Vec<f64>> {
    let s = k.shape();
    if s.len() != 2 || s[0] != s[1] || s[0] == 0 {
        return Err(Error::shape("kernel", &[s.first().copied().unwrap_or(1).max(1); 2], s));
    }
    cpu::eigenvalues_symmetric(&to_host_f64(k)?, s[0])
}

/// `λ_max / λ_min` of the symmetric kernel (host `f64`, see [`eigenvalues`]); `∞` when
/// `λ_min ≤ 0`, never NaN.
///
/// # Errors
/// As [`eigenvalues`].
pub fn condition_number(k: &DeviceTensor<f32>) -> Result<f64> {
    Ok(cpu::condition_number_of(&eigenvalues(k)?))
}

/// NTK regression `f(x*) = Θ(x*, X)·[Θ(X, X) + λI]⁻¹·Y`, `λ = diag_reg·tr(Θ(X, X))/N`
/// (neural-tangents' default `diag_reg_absolute_scale=False`), by Cholesky in `f64` on the
/// host (see [`cpu::ntk_regression`]). `theta_train [N, N]`, `theta_test [M, N]`,
/// `y [N, C]` (host, row-major); returns `[M, C]`.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes; as [`cpu::ntk_regression`] otherwise.
pub fn ntk_regression(
    theta_train: &DeviceTensor<f32>,
    theta_test: &DeviceTensor<f32>,
    y: &[f32],
    diag_reg: f64,
) -> Result<Vec<f64>> {
    let s = theta_train.shape();
    if s.len() != 2 || s[0] != s[1] || s[0] == 0 {
        return Err(Error::shape("theta_train", &[s.first().copied().unwrap_or(1).max(1); 2], s));
    }
    let n = s[0];
    let t = theta_test.shape();
    if t.len() != 2 || t[1] != n {
        return Err(Error::shape("theta_test", &[t.first().copied().unwrap_or(0), n], t));
    }
    if y.is_empty() || y.len() % n != 0 {
        return Err(Error::shape("targets", &[n, (y.len() / n).max(1)], &[y.len()]));
    }
    let c = y.len() / n;
    let yd: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    cpu::ntk_regression(&to_host_f64(theta_train)?, &to_host_f64(theta_test)?, &yd, n, t[0], c, diag_reg)
}
