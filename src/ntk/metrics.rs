//! Metrics on an `[N, N]` kernel on the device.
//!
//! Definitions (`K` the kernel, all sums over the `N²` entries, diagonal included):
//! - trace `Σ_i K_ii`, Frobenius norm `‖K‖_F = (Σ K_ij²)^½`, mean `Σ K_ij / N²`;
//! - LGA (label-gradient alignment): the Pearson correlation of the entries of `K` and of
//!   `L`, `L_ij = +1` if `labels[i] == labels[j]` else `−1`, with one global mean for each
//!   matrix (no double-centering): `Σ(K−K̄)(L−L̄) / (Σ(K−K̄)² · Σ(L−L̄)²)^½`; NaN when `K` or
//!   `L` is constant, as `numpy.corrcoef`;
//! - kernel-target alignment `⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)` for targets `Y [N, C]`, and its
//!   centered form on `HKH` and `H·YYᵀ·H`, `H = I − 11ᵀ/N` (Cortes et al.); NaN when a
//!   (centered) matrix is zero;
//! - eigenvalues of the symmetric kernel (ascending) and the condition number `λ_max/λ_min`,
//!   which is `∞` whenever the kernel is numerically singular or not positive definite:
//!   `λ_min ≤ N·ε·λ_max` with `ε = f64::EPSILON` (this includes `λ_min ≤ 0`); never NaN and
//!   never a huge finite number made of rounding noise;
//! - NTK regression `f(x*) = Θ(x*, X)·[Θ(X, X) + λI]⁻¹·Y` with `λ = diag_reg·tr(Θ(X, X))/N`.
//!
//! Where each runs:
//! - [`trace`], [`frobenius_norm`], [`mean`], [`stats`], [`lga`], [`alignment`]: GPU
//!   reductions. Each block sums its share in `f64` and a single block adds the block sums in
//!   a fixed order, so the results are deterministic; one 48-byte read-back per call.
//!   [`alignment`] forms `YYᵀ` with the `F32` GEMM; its centered form first computes row,
//!   column and grand means of `K` and `YYᵀ` on the GPU (fixed order).
//! - [`eigenvalues`], [`condition_number`], [`ntk_regression`]: copy the kernel to the host and
//!   run in `f64` on the CPU ([`cpu::eigenvalues_symmetric`]: Householder + implicit QL on the
//!   matrix scaled by its largest entry; [`cpu::ntk_regression`]: Cholesky). O(N³): about a
//!   minute at N = 4096.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ntk::gpu::{self, StatsTarget};
use crate::ntk::{cpu, Precision};
use crate::tensor::TensorRef;

/// `N` of a square, non-empty kernel on `device` (shape and length checked).
fn square(device: &Device, arg: &'static str, k: &impl TensorRef<f32>) -> Result<usize> {
    let s = k.shape();
    if s.len() != 2 || s[0] != s[1] || s[0] == 0 {
        let n = s.first().copied().unwrap_or(0).max(1);
        return Err(Error::shape(arg, &[n, n], s));
    }
    device.check_buffer(arg, k, s)?;
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
        self.sum / (self.n as f64 * self.n as f64)
    }
}

/// Trace, sum and sum of squares of `k [N, N]` in one GPU pass.
///
/// # Errors
/// [`Error::Shape`] unless `k` is square and non-empty; [`Error::DeviceMismatch`] for a kernel
/// on another device.
pub fn stats(device: &Device, k: &impl TensorRef<f32>) -> Result<KernelStats> {
    let n = square(device, "kernel", k)?;
    let s = gpu::stats(device, &k.cuda_view(), n, StatsTarget::None, None)?;
    Ok(KernelStats { n, sum: s[0], sum_sq: s[1], trace: s[2] })
}

/// `Σ K_ii` (GPU).
///
/// # Errors
/// As [`stats`].
pub fn trace(device: &Device, k: &impl TensorRef<f32>) -> Result<f64> {
    Ok(stats(device, k)?.trace)
}

/// `‖K‖_F` (GPU).
///
/// # Errors
/// As [`stats`].
pub fn frobenius_norm(device: &Device, k: &impl TensorRef<f32>) -> Result<f64> {
    Ok(stats(device, k)?.frobenius_norm())
}

/// The mean of all `N²` entries (GPU).
///
/// # Errors
/// As [`stats`].
pub fn mean(device: &Device, k: &impl TensorRef<f32>) -> Result<f64> {
    Ok(stats(device, k)?.mean())
}

/// Label-gradient alignment (GPU), as defined in the module docs: one global mean, diagonal
/// included, NaN for a constant `K` or `L`.
///
/// # Errors
/// As [`stats`]; [`Error::Shape`] when `labels` is not `[N]`.
pub fn lga(device: &Device, k: &impl TensorRef<f32>, labels: &[u32]) -> Result<f64> {
    let n = square(device, "kernel", k)?;
    if labels.len() != n {
        return Err(Error::shape("labels", &[n], &[labels.len()]));
    }
    let l = device.stream().clone_htod(labels)?;
    let s = gpu::stats(device, &k.cuda_view(), n, StatsTarget::Labels(&l), None)?;
    let cnt = n as f64 * n as f64;
    let cov = s[5] - s[0] * s[3] / cnt;
    let vk = s[1] - s[0] * s[0] / cnt;
    let vl = s[4] - s[3] * s[3] / cnt;
    Ok(cov / (vk.max(0.0) * vl.max(0.0)).sqrt())
}

/// Kernel-target alignment (GPU) for targets `y [N, C]`, centered or not (module docs).
///
/// # Errors
/// As [`stats`]; [`Error::Shape`] when `y` is not `[N, C]` with `C ≥ 1`.
pub fn alignment(device: &Device, k: &impl TensorRef<f32>, y: &impl TensorRef<f32>, centered: bool) -> Result<f64> {
    let n = square(device, "kernel", k)?;
    let ys = y.shape();
    if ys.len() != 2 || ys[0] != n || ys[1] == 0 {
        return Err(Error::shape("targets", &[n, ys.get(1).copied().unwrap_or(1).max(1)], ys));
    }
    device.check_buffer("targets", y, ys)?;
    let yy = gpu::matmul_abt(device, &y.cuda_view(), n, None, ys[1], Precision::F32)?;
    let kv = k.cuda_view();
    let s = if centered {
        // cent = [k_row n][k_col n][k_all][m_row n][m_col n][m_all]
        let mut cent = device.stream().alloc_zeros::<f64>(4 * n + 2)?;
        gpu::means(device, &kv, n, &mut cent.slice_mut(0..2 * n + 1))?;
        gpu::means(device, &yy.as_view(), n, &mut cent.slice_mut(2 * n + 1..4 * n + 2))?;
        gpu::stats(device, &kv, n, StatsTarget::Dense(&yy), Some(&cent))?
    } else {
        gpu::stats(device, &kv, n, StatsTarget::Dense(&yy), None)?
    };
    Ok(s[5] / (s[1].sqrt() * s[4].sqrt()))
}

/// The kernel on the host in `f64`, and `N`.
fn host_square(device: &Device, arg: &'static str, k: &impl TensorRef<f32>) -> Result<(Vec<f64>, usize)> {
    let n = square(device, arg, k)?;
    Ok((to_host_f64(device, k)?, n))
}

fn to_host_f64(device: &Device, k: &impl TensorRef<f32>) -> Result<Vec<f64>> {
    Ok(device.stream().clone_dtoh(&k.cuda_view())?.into_iter().map(f64::from).collect())
}

/// All eigenvalues of the symmetric kernel `k [N, N]`, ascending. Copies `k` to the host and
/// runs [`cpu::eigenvalues_symmetric`] in `f64` (O(N³) on the CPU; only the lower triangle is
/// read).
///
/// # Errors
/// As [`stats`]; [`Error::NonFinite`] for NaN or infinite entries.
pub fn eigenvalues(device: &Device, k: &impl TensorRef<f32>) -> Result<Vec<f64>> {
    let (h, n) = host_square(device, "kernel", k)?;
    cpu::eigenvalues_symmetric(&h, n)
}

/// `λ_max / λ_min` of the symmetric kernel (host `f64`, see [`eigenvalues`]); `∞` when the
/// kernel is numerically singular (`λ_min ≤ N·ε·λ_max`) or not positive definite, never NaN.
///
/// # Errors
/// As [`eigenvalues`].
pub fn condition_number(device: &Device, k: &impl TensorRef<f32>) -> Result<f64> {
    let (h, n) = host_square(device, "kernel", k)?;
    cpu::condition_number(&h, n)
}

/// NTK regression `f(x*) = Θ(x*, X)·[Θ(X, X) + λI]⁻¹·Y`, `λ = diag_reg·tr(Θ(X, X))/N`
/// (neural-tangents' default `diag_reg_absolute_scale=False`), by Cholesky in `f64` on the
/// host (see [`cpu::ntk_regression`]). `theta_train [N, N]`, `theta_test [M, N]` on `device`,
/// `y [N, C]` (host, row-major); returns `[M, C]`.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes; [`Error::DeviceMismatch`]; as
/// [`cpu::ntk_regression`] otherwise.
pub fn ntk_regression(
    device: &Device,
    theta_train: &impl TensorRef<f32>,
    theta_test: &impl TensorRef<f32>,
    y: &[f32],
    diag_reg: f64,
) -> Result<Vec<f64>> {
    let (train, n) = host_square(device, "theta_train", theta_train)?;
    let t = theta_test.shape();
    if t.len() != 2 || t[1] != n {
        return Err(Error::shape("theta_test", &[t.first().copied().unwrap_or(0), n], t));
    }
    device.check_buffer("theta_test", theta_test, t)?;
    if y.is_empty() || y.len() % n != 0 {
        return Err(Error::shape("targets", &[n, (y.len() / n).max(1)], &[y.len()]));
    }
    let c = y.len() / n;
    let yd: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    cpu::ntk_regression(&train, &to_host_f64(device, theta_test)?, &yd, n, t[0], c, diag_reg)
}
