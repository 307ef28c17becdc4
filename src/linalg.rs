//! Dense symmetric eigen-solver pieces shared by the CPU-side references (the low-rank
//! family's core SVD and the NTK spectra): Householder tridiagonalization and the implicit QL
//! iteration, one implementation of each so both families take the same rounding decisions.
//!
//! Matrices are row-major `f64`: element `(i, j)` of an `n × n` matrix at `i·n + j`.

/// Householder reduction, in place, of the symmetric `n × n` matrix `a` (its lower triangle is
/// read) to tridiagonal form. Returns `(h, e)`: `h[i]` the scaled squared norm of step `i`'s
/// reflector (0 where the step is skipped, and always for `i = 0`) and the sub-diagonal `e`
/// (`e[0] = 0`, `e[i]` couples `i - 1` and `i`). The diagonal is left on `a`'s diagonal and the
/// reflectors in `a`'s off-diagonal entries, for [`diagonal`] or [`accumulate_reflectors`].
pub(crate) fn householder_tridiagonalize(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut h_of = vec![0.0; n];
    let mut e = vec![0.0; n];
    for i in (1..n).rev() {
        let l = i - 1;
        let mut h = 0.0;
        if l > 0 {
            let scale: f64 = (0..=l).map(|k| a[i * n + k].abs()).sum();
            if scale == 0.0 {
                e[i] = a[i * n + l];
            } else {
                for k in 0..=l {
                    a[i * n + k] /= scale;
                    h += a[i * n + k] * a[i * n + k];
                }
                let f = a[i * n + l];
                let g = if f >= 0.0 { -h.sqrt() } else { h.sqrt() };
                e[i] = scale * g;
                h -= f * g;
                a[i * n + l] = f - g;
                let mut f = 0.0;
                for j in 0..=l {
                    // Column i above the diagonal is read only by accumulate_reflectors.
                    a[j * n + i] = a[i * n + j] / h;
                    let mut g = 0.0;
                    for k in 0..=j {
                        g += a[j * n + k] * a[i * n + k];
                    }
                    for k in j + 1..=l {
                        g += a[k * n + j] * a[i * n + k];
                    }
                    e[j] = g / h;
                    f += e[j] * a[i * n + j];
                }
                let hh = f / (h + h);
                for j in 0..=l {
                    let f = a[i * n + j];
                    let g = e[j] - hh * f;
                    e[j] = g;
                    for k in 0..=j {
                        a[j * n + k] -= f * e[k] + g * a[i * n + k];
                    }
                }
            }
        } else {
            e[i] = a[i * n + l];
        }
        h_of[i] = h;
    }
    if n > 0 {
        e[0] = 0.0;
    }
    (h_of, e)
}

/// The diagonal of the `n × n` matrix `a`.
pub(crate) fn diagonal(a: &[f64], n: usize) -> Vec<f64> {
    (0..n).map(|i| a[i * n + i]).collect()
}

/// After [`householder_tridiagonalize`] (whose `h` it takes): overwrites `a` with the
/// orthogonal matrix of the reduction and returns the tridiagonal's diagonal.
pub(crate) fn accumulate_reflectors(a: &mut [f64], n: usize, h: &[f64]) -> Vec<f64> {
    let mut d = vec![0.0; n];
    for i in 0..n {
        if h[i] != 0.0 {
            for j in 0..i {
                let g: f64 = (0..i).map(|k| a[i * n + k] * a[k * n + j]).sum();
                for k in 0..i {
                    a[k * n + j] -= g * a[k * n + i];
                }
            }
        }
        d[i] = a[i * n + i];
        a[i * n + i] = 1.0;
        for j in 0..i {
            a[j * n + i] = 0.0;
            a[i * n + j] = 0.0;
        }
    }
    d
}

/// Implicit QL with shifts on the symmetric tridiagonal `(d, e)` of
/// [`householder_tridiagonalize`]: `d` becomes the eigenvalues (unordered) and, given `z`
/// (`n × n` row-major, `n = d.len()`), the rotations are accumulated into its columns, so a
/// `z` holding the reduction's orthogonal matrix ends holding the eigenvectors. Returns
/// `false` when some eigenvalue needs more than 60 iterations.
pub(crate) fn tridiagonal_ql(d: &mut [f64], e: &mut [f64], mut z: Option<&mut [f64]>) -> bool {
    let n = d.len();
    if n == 0 {
        return true;
    }
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                return false;
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r.abs() } else { -r.abs() });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut underflow = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                if let Some(z) = z.as_deref_mut() {
                    for k in 0..n {
                        let f = z[k * n + i + 1];
                        z[k * n + i + 1] = s * z[k * n + i] + c * f;
                        z[k * n + i] = c * z[k * n + i] - s * f;
                    }
                }
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    true
}
