//! CPU references of the low-rank family, in f64, and the small dense linear algebra the GPU
//! path runs on the host (Cholesky, Householder QR, the core SVD): one implementation of each,
//! so that the GPU factorization and its reference take the same decisions.
//!
//! Matrices are row-major `Vec<f64>`: element `(i, j)` of an `m × n` matrix at `i·n + j`.

use super::{FactorOptions, FactorShape, KeyLayout, ReconstructShape, RopeOptions, MAX_GRAM_COND};
use crate::decode::{DecodeOptions, DecodeShape};
use crate::error::{check_shape, Error, Result};
use crate::linalg;
use crate::rng::Rng;
use crate::tensor::{checked_numel, Float};

/// The Gaussian sketch `Ω [n, l]` (row-major, f32) of a seed: the values
/// [`Rng::normal`] draws in order from `Rng::new(seed)`.
pub fn sketch(seed: u64, n: usize, l: usize) -> Vec<f32> {
    Rng::new(seed).normal_vec(n.saturating_mul(l))
}

/// `C = op(A)·B` for row-major f64 matrices: `A` is `m × k` (or `k × m` when `a_t`), `B` is
/// `k × n`; `C` is `m × n`.
pub fn matmul(a: &[f64], a_t: bool, b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for q in 0..k {
        let brow = &b[q * n..(q + 1) * n];
        for i in 0..m {
            let x = if a_t { a[q * m + i] } else { a[i * k + q] };
            if x == 0.0 {
                continue;
            }
            for (cv, &bv) in c[i * n..(i + 1) * n].iter_mut().zip(brow) {
                *cv += x * bv;
            }
        }
    }
    c
}

/// The upper Cholesky factor `R` (`G = RᵀR`) of a symmetric `l × l` Gram, or `None` when it
/// is not positive definite or its condition estimate `(max Rᵢᵢ / min Rᵢᵢ)²` exceeds
/// [`MAX_GRAM_COND`] (the caller then falls back to [`householder_q`]).
pub fn cholesky_upper(g: &[f64], l: usize) -> Option<Vec<f64>> {
    let mut r = vec![0.0; l * l];
    for j in 0..l {
        let d = g[j * l + j] - (0..j).map(|k| r[k * l + j] * r[k * l + j]).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let rjj = d.sqrt();
        r[j * l + j] = rjj;
        for i in j + 1..l {
            let s = g[j * l + i] - (0..j).map(|k| r[k * l + j] * r[k * l + i]).sum::<f64>();
            r[j * l + i] = s / rjj;
        }
    }
    let diag = (0..l).map(|i| r[i * l + i]);
    let (lo, hi) = diag.fold((f64::INFINITY, 0.0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    let cond = (hi / lo) * (hi / lo);
    (cond <= MAX_GRAM_COND).then_some(r)
}

/// The inverse of an upper-triangular `l × l` matrix with a nonzero diagonal (upper again).
pub fn upper_inverse(r: &[f64], l: usize) -> Vec<f64> {
    let mut x = vec![0.0; l * l];
    for j in 0..l {
        x[j * l + j] = 1.0 / r[j * l + j];
        for i in (0..j).rev() {
            let s: f64 = (i + 1..=j).map(|k| r[i * l + k] * x[k * l + j]).sum();
            x[i * l + j] = -s / r[i * l + i];
        }
    }
    x
}

/// The thin orthonormal factor `Q` (`m × n`, `m ≥ n`) of `A = QR` by Householder reflections
/// (a zero column leaves its reflector out, so `Q` stays orthonormal for any input).
pub fn householder_q(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut r = a.to_vec();
    let mut vs: Vec<Option<Vec<f64>>> = Vec::with_capacity(n);
    for j in 0..n.min(m) {
        let norm = (j..m).map(|i| r[i * n + j] * r[i * n + j]).sum::<f64>().sqrt();
        if norm == 0.0 {
            vs.push(None);
            continue;
        }
        let x0 = r[j * n + j];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (j..m).map(|i| r[i * n + j]).collect();
        v[0] -= alpha;
        let vv: f64 = v.iter().map(|x| x * x).sum();
        if vv == 0.0 {
            vs.push(None);
            continue;
        }
        reflect(&mut r, n, j, &v, vv, j);
        vs.push(Some(v));
    }
    let mut q = vec![0.0; m * n];
    for i in 0..n.min(m) {
        q[i * n + i] = 1.0;
    }
    for (j, v) in vs.iter().enumerate().rev() {
        if let Some(v) = v {
            let vv: f64 = v.iter().map(|x| x * x).sum();
            reflect(&mut q, n, j, v, vv, 0);
        }
    }
    q
}

/// Applies `I − 2vvᵀ/(vᵀv)` to rows `row0..` of a matrix with `n` columns, columns `col0..`.
fn reflect(a: &mut [f64], n: usize, row0: usize, v: &[f64], vv: f64, col0: usize) {
    for c in col0..n {
        let dot: f64 = v.iter().enumerate().map(|(i, &vi)| vi * a[(row0 + i) * n + c]).sum();
        let f = 2.0 * dot / vv;
        for (i, &vi) in v.iter().enumerate() {
            a[(row0 + i) * n + c] -= f * vi;
        }
    }
}

/// Eigen-decomposition of a symmetric `n × n` matrix: Householder reduction to tridiagonal
/// form and the implicit QL iteration (`O(n³)`, a few times cheaper than Jacobi), with cyclic
/// Jacobi rotations as the fallback should QL not converge. Returns the eigenvalues in
/// descending order (ties by index) and the matching unit eigenvectors as the columns of an
/// `n × n` row-major matrix, each signed so that its entry of largest magnitude (the first,
/// on ties) is positive.
pub fn sym_eigen(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let (a, v) = tridiagonal_ql(m, n).unwrap_or_else(|| jacobi(m, n));
    sorted_eigen(&a, &v, n)
}

/// Householder tridiagonalization then implicit QL: `(diag, vectors)` as `(n × n with the
/// eigenvalues on the diagonal, eigenvectors in columns)`, or `None` without convergence.
fn tridiagonal_ql(m: &[f64], n: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    let mut a = m.to_vec();
    let (h, mut e) = linalg::householder_tridiagonalize(&mut a, n);
    // a becomes the orthogonal reduction; QL accumulates its rotations into it.
    let mut d = linalg::accumulate_reflectors(&mut a, n, &h);
    if !linalg::tridiagonal_ql(&mut d, &mut e, Some(&mut a)) || d.iter().chain(a.iter()).any(|x| !x.is_finite()) {
        return None;
    }
    let mut diag = vec![0.0; n * n];
    for i in 0..n {
        diag[i * n + i] = d[i];
    }
    Some((diag, a))
}

/// Cyclic Jacobi rotations: `(matrix with the eigenvalues on the diagonal, eigenvectors in
/// columns)`.
fn jacobi(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    (a, v)
}

/// Orders and signs the eigenpairs of [`sym_eigen`].
fn sorted_eigen(a: &[f64], v: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let vals: Vec<f64> = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (dst, &src) in order.iter().enumerate() {
        let big = (0..n).fold(0usize, |best, i| if v[i * n + src].abs() > v[best * n + src].abs() { i } else { best });
        let sign = if v[big * n + src] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..n {
            vecs[i * n + dst] = sign * v[i * n + src];
        }
    }
    (vals, vecs)
}

/// The core SVD of the small `l × n` matrix `Bc`: the left singular vectors `W[:, :r]`
/// (`l × r`, row-major) from the eigen-decomposition of `Bc·Bcᵀ`, ordered and signed as
/// [`sym_eigen`] orders them, and the top `r` singular values.
pub fn core_svd(bc: &[f64], l: usize, n: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    let mut g = vec![0.0; l * l];
    for i in 0..l {
        for j in i..l {
            let s: f64 = (0..n).map(|c| bc[i * n + c] * bc[j * n + c]).sum();
            g[i * l + j] = s;
            g[j * l + i] = s;
        }
    }
    let (vals, vecs) = sym_eigen(&g, l);
    let w: Vec<f64> = (0..l).flat_map(|i| vecs[i * l..i * l + r].to_vec()).collect();
    (w, vals.iter().take(r).map(|&x| x.max(0.0).sqrt()).collect())
}

/// The singular values of an `m × n` matrix, descending (square roots of the eigenvalues of
/// the smaller Gram, in f64).
pub fn singular_values(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let (g, k) = if m >= n { (matmul(a, true, a, n, m, n), n) } else { (gram_rows(a, m, n), m) };
    sym_eigen(&g, k).0.into_iter().map(|x| x.max(0.0).sqrt()).collect()
}

fn gram_rows(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut g = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            g[i * m + j] = (0..n).map(|c| a[i * n + c] * a[j * n + c]).sum();
        }
    }
    g
}

/// The optimal rank-`r` Frobenius error `(Σ_{i>r} σᵢ²)^{1/2}` of an `m × n` matrix.
pub fn optimal_error(a: &[f64], m: usize, n: usize, r: usize) -> f64 {
    singular_values(a, m, n).iter().skip(r).map(|s| s * s).sum::<f64>().sqrt()
}

/// `‖A − U·SV‖_F` for `A [m, n]`, `U [m, r]`, `SV [r, n]`.
pub fn residual(a: &[f64], u: &[f64], sv: &[f64], m: usize, n: usize, r: usize) -> f64 {
    let p = matmul(u, false, sv, m, r, n);
    a.iter().zip(&p).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

/// A rank-`r` factorization in f64: `u [B, Tcap, r]` (zero past `seq_lens[b]`),
/// `sv [B, r, N]`, and the top `r` singular values `[B, r]`.
#[derive(Clone, Debug)]
pub struct Factors {
    /// `[B, Tcap, r]`.
    pub u: Vec<f64>,
    /// `[B, r, N]`.
    pub sv: Vec<f64>,
    /// `[B, r]`, descending per sequence.
    pub singular_values: Vec<f64>,
}

/// The randomized subspace iteration of the module docs in f64, with Householder QR for
/// every orthonormalization.
///
/// # Errors
/// As [`FactorShape::validate_seq_lens`] and [`FactorOptions::validate`]; [`Error::Shape`]
/// naming `k` when its length is not that of `[B, Tcap, N]`.
pub fn factorize<T: Float>(shape: &FactorShape, options: &FactorOptions, seq_lens: &[u32], k: &[T]) -> Result<Factors> {
    shape.validate_seq_lens(seq_lens)?;
    options.validate()?;
    let len = checked_numel::<T>("k", &shape.k_shape())?;
    check_shape("k", &[len], &[k.len()])?;
    let (tcap, n, r) = (shape.capacity, shape.cols(), shape.rank);
    let l = options.sketch_cols(shape, seq_lens);
    let omega: Vec<f64> = sketch(options.seed, n, l).into_iter().map(f64::from).collect();
    let mut out = Factors {
        u: vec![0.0; shape.batch * tcap * r],
        sv: vec![0.0; shape.batch * r * n],
        singular_values: vec![0.0; shape.batch * r],
    };
    for b in 0..shape.batch {
        let m = seq_lens[b] as usize;
        let a: Vec<f64> = k[b * tcap * n..(b * tcap + m) * n].iter().map(|x| f64::from(x.to_f32())).collect();
        let mut q = householder_q(&matmul(&a, false, &omega, m, n, l), m, l);
        for _ in 0..options.power_iters {
            let z = householder_q(&matmul(&a, true, &q, n, m, l), n, l);
            q = householder_q(&matmul(&a, false, &z, m, n, l), m, l);
        }
        let bc = matmul(&q, true, &a, l, m, n);
        let (w, s) = core_svd(&bc, l, n, r);
        let u = matmul(&q, false, &w, m, l, r);
        let sv = matmul(&w, true, &bc, r, l, n);
        out.u[b * tcap * r..(b * tcap + m) * r].copy_from_slice(&u);
        out.sv[b * r * n..(b + 1) * r * n].copy_from_slice(&sv);
        out.singular_values[b * r..(b + 1) * r].copy_from_slice(&s);
    }
    Ok(out)
}

/// `θᵢ = base^(−2i/D)` for `i < D/2`, computed in f64 and rounded to f32: the table the
/// kernel multiplies positions with.
pub fn rope_inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| f64::from(base).powf(-2.0 * i as f64 / head_dim as f64) as f32).collect()
}

/// Rotate-half RoPE of one row in place, at `pos`, with the f32 angle `(f32)pos · θᵢ` and
/// f64 sin and cos of it.
pub fn rope_row(row: &mut [f64], pos: u32, inv_freq: &[f32]) {
    let half = row.len() / 2;
    for (i, &th) in inv_freq.iter().enumerate().take(half) {
        let ang = f64::from(pos as f32 * th);
        let (s, c) = ang.sin_cos();
        let (x, y) = (row[i], row[i + half]);
        row[i] = x * c - y * s;
        row[i + half] = y * c + x * s;
    }
}

/// The fused reconstruction in f64 (module docs), in the compact layout: row `indptr[l] + j`
/// is entry `j` of list `l`, `[indptr[B·Hkv], D]`.
///
/// # Errors
/// As [`ReconstructShape::validate_lists`] and [`RopeOptions::validate`]; [`Error::Shape`]
/// naming `u` or `sv` for a length that is not that of `[B, Tcap, r]` / `[B, r, Hkv·D]`.
#[allow(clippy::too_many_arguments)]
pub fn reconstruct<T: Float>(
    shape: &ReconstructShape,
    options: &RopeOptions,
    seq_lens: &[u32],
    u: &[T],
    sv: &[T],
    indptr: &[u32],
    indices: &[u32],
) -> Result<Vec<f64>> {
    let inv = super::rope_table(shape, options)?;
    shape.validate_lists(seq_lens, indptr, indices)?;
    check_shape("u", &[checked_numel::<T>("u", &shape.u_shape())?], &[u.len()])?;
    check_shape("sv", &[checked_numel::<T>("sv", &shape.sv_shape())?], &[sv.len()])?;
    let (d, r, hkv, tcap) = (shape.head_dim, shape.rank, shape.kv_heads, shape.capacity);
    let n = hkv * d;
    let total = indptr[shape.n_lists()] as usize;
    let mut out = vec![0.0; total * d];
    for l in 0..shape.n_lists() {
        let (b, h) = (l / hkv, l % hkv);
        for j in indptr[l] as usize..indptr[l + 1] as usize {
            let pos = indices[j];
            let urow = &u[(b * tcap + pos as usize) * r..][..r];
            let row = &mut out[j * d..(j + 1) * d];
            for (c, x) in row.iter_mut().enumerate() {
                *x = (0..r)
                    .map(|q| f64::from(urow[q].to_f32()) * f64::from(sv[(b * r + q) * n + h * d + c].to_f32()))
                    .sum();
            }
            rope_row(row, pos, &inv);
        }
    }
    Ok(out)
}

/// Places compact rows (`[indptr[B·Hkv], D]`) into a layout: unchanged for
/// [`KeyLayout::Compact`]; into `[B, Hkv, budget, D]` for `Gathered`, filling rows past a
/// list's length with `fill`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `budget` when a list is longer than it;
/// [`Error::Shape`] naming `rows` for a length that does not match `indptr`.
pub fn place_rows<V: Copy>(rows: &[V], head_dim: usize, indptr: &[u32], layout: KeyLayout, fill: V) -> Result<Vec<V>> {
    let total = indptr.last().copied().unwrap_or(0) as usize * head_dim;
    check_shape("rows", &[total], &[rows.len()])?;
    let KeyLayout::Gathered { budget } = layout else { return Ok(rows.to_vec()) };
    let n_lists = indptr.len().saturating_sub(1);
    let mut out = vec![fill; n_lists * budget * head_dim];
    for l in 0..n_lists {
        let (s, e) = (indptr[l] as usize, indptr[l + 1] as usize);
        if e - s > budget {
            return Err(Error::invalid("budget", format!("list {l} has {} entries, above budget {budget}", e - s)));
        }
        out[l * budget * head_dim..][..(e - s) * head_dim].copy_from_slice(&rows[s * head_dim..e * head_dim]);
    }
    Ok(out)
}

/// The lists `0..len` over the gathered cache, with the same `indptr`: what sparse decode
/// reads a gathered cache with.
pub fn decode_indices(indptr: &[u32]) -> Vec<u32> {
    indptr.windows(2).flat_map(|w| 0..w[1].saturating_sub(w[0])).collect()
}

/// The inputs of one ShadowKV decode step (module docs).
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a, T> {
    /// `[B, Tq, Hq, D]` queries.
    pub q: &'a [T],
    /// `[B, Tcap, r]`.
    pub u: &'a [T],
    /// `[B, r, Hkv·D]`.
    pub sv: &'a [T],
    /// `[B, Hkv, Tcap, D]` values.
    pub v: &'a [T],
    /// `[B]`.
    pub seq_lens: &'a [u32],
    /// `[B·Hkv + 1]`.
    pub indptr: &'a [u32],
    /// The selected positions.
    pub indices: &'a [u32],
}

/// The reference of the whole ShadowKV step: reconstruct the selected keys (f64, then rounded
/// to `T` as the cache dtype the kernel writes), gather the values, and run
/// [`crate::decode::cpu::sparse_decode`] over the gathered caches (capacity `budget`, lists
/// `0..len`). Returns `(o [B, Tq, Hq, D], lse [B, Tq, Hq])` in f64.
///
/// # Errors
/// As [`reconstruct`], [`validate_layout`](super::validate_layout) and the decode reference
/// (whose shape needs `D ∈ {64, 128}` and `Hq % Hkv == 0`).
pub fn shadowkv_step<T: Float>(
    shape: &ReconstructShape,
    rope: &RopeOptions,
    decode: &DecodeShape,
    options: &DecodeOptions,
    budget: usize,
    x: &StepInputs<'_, T>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let rows = reconstruct(shape, rope, x.seq_lens, x.u, x.sv, x.indptr, x.indices)?;
    let layout = KeyLayout::Gathered { budget };
    super::validate_layout(shape, layout, x.indptr)?;
    check_shape("v", &[checked_numel::<T>("v", &shape.v_shape())?], &[x.v.len()])?;
    let d = shape.head_dim;
    let k_rows: Vec<T> = rows.iter().map(|&y| T::from_f32(y as f32)).collect();
    let mut v_rows = Vec::with_capacity(k_rows.len());
    for l in 0..shape.n_lists() {
        for &pos in &x.indices[x.indptr[l] as usize..x.indptr[l + 1] as usize] {
            v_rows.extend_from_slice(&x.v[(l * shape.capacity + pos as usize) * d..][..d]);
        }
    }
    let zero = T::from_f32(0.0);
    let k_sel = place_rows(&k_rows, d, x.indptr, layout, zero)?;
    let v_sel = place_rows(&v_rows, d, x.indptr, layout, zero)?;
    let lists = decode_indices(x.indptr);
    let dshape = DecodeShape { capacity: budget, ..decode.clone() };
    let cache_lens =
        vec![u32::try_from(budget).map_err(|_| Error::too_large("budget", "budget must fit u32"))?; shape.batch];
    let r = crate::decode::cpu::sparse_decode(&dshape, options, x.q, &k_sel, &v_sel, &cache_lens, x.indptr, &lists)?;
    Ok((r.o, r.lse))
}
