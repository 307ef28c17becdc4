//! The CPU reference of the NTK family, in `f64`.
//!
//! Everything here is the definition the GPU kernels are tested against: explicit Jacobian
//! contractions, the factored (structured-derivative) MLP NTK, an MLP with an explicit
//! per-sample Jacobian, the linearized model, and the kernel metrics. Inputs are `f32`
//! slices (the storage the GPU reads); every sum accumulates in `f64`. Every function checks
//! its sizes with checked arithmetic and reserves its output fallibly, so absurd sizes give
//! [`Error::TooLarge`] or [`Error::Shape`], never a panic or an abort.

use crate::error::{check_shape, checked_mul, Error, Result};
use crate::linalg;
use crate::ntk::{Activation, NtkMode};

/// Output shape of a Jacobian contraction: `Full` `[n1, n2, o, o]`, `Trace` and `Pseudo`
/// `[n1, n2]`, `Diagonal` `[n1, n2, o]`.
pub fn output_shape(mode: NtkMode, n1: usize, n2: usize, o: usize) -> Vec<usize> {
    match mode {
        NtkMode::Full => vec![n1, n2, o, o],
        NtkMode::Trace { .. } | NtkMode::Pseudo => vec![n1, n2],
        NtkMode::Diagonal => vec![n1, n2, o],
    }
}

/// `a·b·c`, or [`Error::TooLarge`] naming `arg`.
fn mul3(arg: &'static str, a: usize, b: usize, c: usize) -> Result<usize> {
    checked_mul(arg, checked_mul(arg, a, b)?, c)
}

/// A zero-filled output of `len` `f64`, reserved fallibly (an impossible size is an error,
/// not an allocation abort).
fn zeros(arg: &'static str, len: usize) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::too_large(arg, format!("{len} f64 do not fit in memory")))?;
    v.resize(len, 0.0);
    Ok(v)
}

/// The element count of `mode`'s output for `n1 × n2` samples and `o` outputs, checked.
fn output_len(mode: NtkMode, n1: usize, n2: usize, o: usize) -> Result<usize> {
    output_shape(mode, n1, n2, o).iter().try_fold(1usize, |acc, &d| checked_mul("out", acc, d))
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// The explicit contraction of per-sample Jacobians `j1 [n1, o, p]` and `j2 [n2, o, p]`
/// in `mode` (see [`NtkMode`]), accumulated in `f64`. Pass `j2 = None` for `J1 = J2`.
///
/// # Errors
/// [`Error::Shape`] when a slice length does not match its shape; [`Error::TooLarge`] when a
/// size or the output overflows or does not fit in memory.
pub fn gram(
    j1: &[f32],
    j2: Option<&[f32]>,
    n1: usize,
    n2: usize,
    o: usize,
    p: usize,
    mode: NtkMode,
) -> Result<Vec<f64>> {
    check_shape("j1", &[mul3("j1", n1, o, p)?], &[j1.len()])?;
    let j2 = match j2 {
        Some(j) => {
            check_shape("j2", &[mul3("j2", n2, o, p)?], &[j.len()])?;
            j
        }
        None => {
            check_shape("n2", &[n1], &[n2])?;
            j1
        }
    };
    let row1 = |i: usize, a: usize| &j1[(i * o + a) * p..(i * o + a + 1) * p];
    let row2 = |j: usize, b: usize| &j2[(j * o + b) * p..(j * o + b + 1) * p];
    let mut out = zeros("out", output_len(mode, n1, n2, o)?)?;
    out.clear();
    match mode {
        NtkMode::Full => {
            for i in 0..n1 {
                for j in 0..n2 {
                    for a in 0..o {
                        for b in 0..o {
                            out.push(dot(row1(i, a), row2(j, b)));
                        }
                    }
                }
            }
        }
        NtkMode::Trace { divide_by_outputs } => {
            let scale = if divide_by_outputs && o > 0 { 1.0 / o as f64 } else { 1.0 };
            for i in 0..n1 {
                for j in 0..n2 {
                    let s: f64 = (0..o).map(|a| dot(row1(i, a), row2(j, a))).sum();
                    out.push(s * scale);
                }
            }
        }
        NtkMode::Diagonal => {
            for i in 0..n1 {
                for j in 0..n2 {
                    for a in 0..o {
                        out.push(dot(row1(i, a), row2(j, a)));
                    }
                }
            }
        }
        NtkMode::Pseudo => {
            let sum_rows = |jac: &[f32], n: usize| -> Result<Vec<f64>> {
                let mut s = zeros("j1", checked_mul("j1", n, p)?)?;
                for i in 0..n {
                    for a in 0..o {
                        for (q, &v) in jac[(i * o + a) * p..(i * o + a + 1) * p].iter().enumerate() {
                            s[i * p + q] += f64::from(v);
                        }
                    }
                }
                Ok(s)
            };
            let s1 = sum_rows(j1, n1)?;
            let s2 = sum_rows(j2, n2)?;
            for i in 0..n1 {
                for j in 0..n2 {
                    out.push((0..p).map(|q| s1[i * p + q] * s2[j * p + q]).sum());
                }
            }
        }
    }
    Ok(out)
}

/// One dense layer's factors for the factored NTK: inputs `a [n, t, d_in]`, cotangents
/// `g [n, t, o, d_out]` (`g[i,t,a,:] = ∂f_a(x_i)/∂z[t,:]`, with `z = W·a + b`), and whether
/// the layer has a bias.
#[derive(Clone, Debug)]
pub struct FactoredLayer<'a> {
    /// `[n, t, d_in]`.
    pub a: &'a [f32],
    /// `[n, t, o, d_out]`.
    pub g: &'a [f32],
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// `β = 1` when true.
    pub bias: bool,
}

impl<'a> FactoredLayer<'a> {
    /// Layers from host factors `(a, g)` and their `(d_in, d_out, bias)`, pairwise (the
    /// shorter list bounds the count).
    pub fn from_factors(factors: &'a [(Vec<f32>, Vec<f32>)], dims: &[(usize, usize, bool)]) -> Vec<Self> {
        factors
            .iter()
            .zip(dims)
            .map(|((a, g), &(d_in, d_out, bias))| FactoredLayer { a, g, d_in, d_out, bias })
            .collect()
    }
}

/// The factored NTK of dense layers:
/// `Θ[i,j,a,b] = Σ_l Σ_{t,s} (A_l[i,t]·A_l[j,s] + β_l)·(G_l[i,t,a]·G_l[j,s,b])`, contracted
/// per `mode` exactly like [`gram`] on the explicit Jacobian. `layers2 = None` means the same
/// samples on both sides.
///
/// # Errors
/// [`Error::Shape`] when a factor's length disagrees with `n`, `t`, `o` and its widths, or
/// when the two sides have different layer counts or widths; [`Error::TooLarge`] when a size
/// overflows or the output does not fit in memory.
pub fn factored_ntk(
    layers1: &[FactoredLayer<'_>],
    layers2: Option<&[FactoredLayer<'_>]>,
    n1: usize,
    n2: usize,
    t: usize,
    o: usize,
    mode: NtkMode,
) -> Result<Vec<f64>> {
    let layers2 = match layers2 {
        Some(l) => l,
        None => {
            check_shape("n2", &[n1], &[n2])?;
            layers1
        }
    };
    check_shape("layers2", &[layers1.len()], &[layers2.len()])?;
    let mut out = zeros("out", output_len(mode, n1, n2, o)?)?;
    for (l1, l2) in layers1.iter().zip(layers2) {
        check_shape("layers2.d_in", &[l1.d_in, l1.d_out], &[l2.d_in, l2.d_out])?;
        check_shape("layers.a", &[mul3("layers.a", n1, t, l1.d_in)?], &[l1.a.len()])?;
        check_shape("layers.g", &[checked_mul("layers.g", mul3("layers.g", n1, t, o)?, l1.d_out)?], &[l1.g.len()])?;
        check_shape("layers2.a", &[mul3("layers2.a", n2, t, l1.d_in)?], &[l2.a.len()])?;
        check_shape("layers2.g", &[checked_mul("layers2.g", mul3("layers2.g", n2, t, o)?, l1.d_out)?], &[l2.g.len()])?;
        let beta = if l1.bias { 1.0 } else { 0.0 };
        let (din, dout) = (l1.d_in, l1.d_out);
        let a1 = |i: usize, s: usize| &l1.a[(i * t + s) * din..(i * t + s + 1) * din];
        let a2 = |j: usize, s: usize| &l2.a[(j * t + s) * din..(j * t + s + 1) * din];
        let g1 = |i: usize, s: usize, a: usize| &l1.g[((i * t + s) * o + a) * dout..((i * t + s) * o + a + 1) * dout];
        let g2 = |j: usize, s: usize, b: usize| &l2.g[((j * t + s) * o + b) * dout..((j * t + s) * o + b + 1) * dout];
        // Σ_{t,s} (⟨A_it, A_js⟩ + β)·⟨G_ita, G_jsb⟩
        let theta = |i: usize, j: usize, a: usize, b: usize| -> f64 {
            let mut acc = 0.0;
            for ti in 0..t {
                for si in 0..t {
                    acc += (dot(a1(i, ti), a2(j, si)) + beta) * dot(g1(i, ti, a), g2(j, si, b));
                }
            }
            acc
        };
        let mut k = 0;
        for i in 0..n1 {
            for j in 0..n2 {
                match mode {
                    NtkMode::Full => {
                        for a in 0..o {
                            for b in 0..o {
                                out[k] += theta(i, j, a, b);
                                k += 1;
                            }
                        }
                    }
                    NtkMode::Trace { divide_by_outputs } => {
                        let s: f64 = (0..o).map(|a| theta(i, j, a, a)).sum();
                        out[k] += if divide_by_outputs && o > 0 { s / o as f64 } else { s };
                        k += 1;
                    }
                    NtkMode::Diagonal => {
                        for a in 0..o {
                            out[k] += theta(i, j, a, a);
                            k += 1;
                        }
                    }
                    NtkMode::Pseudo => {
                        let mut s = 0.0;
                        for a in 0..o {
                            for b in 0..o {
                                s += theta(i, j, a, b);
                            }
                        }
                        out[k] += s;
                        k += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `φ(x)` in `f64` (GELU is the exact erf form, as `torch.nn.GELU()` by default).
pub fn activate(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }
}

/// `φ'(x)` in `f64`; ReLU's derivative at 0 is 0 (as in PyTorch).
pub fn activate_grad(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
    }
}

/// The error function to about 1e-15: Maclaurin series for `|x| < 3`, Lentz's continued
/// fraction for `erfc` beyond (std has no `erf`).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let r = if ax < 3.0 {
        // erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = ax;
        let mut sum = ax;
        let x2 = ax * ax;
        let mut n = 0.0f64;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else if ax > 27.0 {
        1.0
    } else {
        // erfc(x) = exp(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...)))))
        let tiny = 1e-300;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for k in 1..200 {
            let an = k as f64 / 2.0;
            d = ax + an * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = ax + an / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// A dense MLP on the host: layer `l` computes `z_l = a_l·W_lᵀ + b_l`, with `W_l [d_out, d_in]`
/// row-major (the PyTorch `nn.Linear` layout), and `a_{l+1} = φ(z_l)` except after the last.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// Layer widths `[d_0, d_1, …, d_L]`; `d_L = O`.
    pub widths: Vec<usize>,
    /// `W_l [d_{l+1}, d_l]` per layer.
    pub weights: Vec<Vec<f32>>,
    /// `b_l [d_{l+1}]` per layer, or `None` for a layer without bias.
    pub biases: Vec<Option<Vec<f32>>>,
    /// The hidden activation.
    pub activation: Activation,
}

/// What the forward and per-output backward pass of an [`Mlp`] produce, in `f64`.
#[derive(Clone, Debug)]
pub struct MlpPass {
    /// Layer inputs `A_l [n, d_l]` per layer.
    pub inputs: Vec<Vec<f64>>,
    /// Cotangents `G_l [n, O, d_{l+1}]`: `G_l[i,a,:] = ∂f_a(x_i)/∂z_l`.
    pub cotangents: Vec<Vec<f64>>,
    /// Outputs `f [n, O]`.
    pub output: Vec<f64>,
}

impl Mlp {
    /// Validates the widths against the weights and biases.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for fewer than two widths or a zero width, [`Error::Shape`]
    /// for a weight or bias of the wrong length.
    pub fn validate(&self) -> Result<()> {
        if self.widths.len() < 2 {
            return Err(Error::invalid("widths", "an MLP needs at least an input and an output width"));
        }
        if self.widths.contains(&0) {
            return Err(Error::invalid("widths", "every width must be positive"));
        }
        let layers = self.widths.len() - 1;
        check_shape("weights", &[layers], &[self.weights.len()])?;
        check_shape("biases", &[layers], &[self.biases.len()])?;
        for l in 0..layers {
            check_shape(
                "weights",
                &[checked_mul("widths", self.widths[l + 1], self.widths[l])?],
                &[self.weights[l].len()],
            )?;
            if let Some(b) = &self.biases[l] {
                check_shape("biases", &[self.widths[l + 1]], &[b.len()])?;
            }
        }
        Ok(())
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.widths.len() - 1
    }

    /// Output width `O`.
    pub fn outputs(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    /// Parameter count `P` in the explicit Jacobian's order: per layer `W_l` row-major, then
    /// `b_l` when present.
    pub fn param_count(&self) -> usize {
        (0..self.layers())
            .map(|l| {
                self.widths[l + 1] * self.widths[l] + if self.biases[l].is_some() { self.widths[l + 1] } else { 0 }
            })
            .sum()
    }

    /// Forward pass and per-output backward pass on `x [n, d_0]`.
    ///
    /// # Errors
    /// As [`Mlp::validate`], and [`Error::Shape`] for `x`.
    pub fn pass(&self, x: &[f32], n: usize) -> Result<MlpPass> {
        self.validate()?;
        let w = &self.widths;
        check_shape("x", &[checked_mul("x", n, w[0])?], &[x.len()])?;
        let layers = self.layers();
        let o = self.outputs();
        let mut inputs = Vec::with_capacity(layers);
        let mut pre = Vec::with_capacity(layers);
        let mut a: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for l in 0..layers {
            let (din, dout) = (w[l], w[l + 1]);
            let mut z = zeros("x", checked_mul("x", n, dout)?)?;
            for i in 0..n {
                for r in 0..dout {
                    let wr = &self.weights[l][r * din..(r + 1) * din];
                    let mut s: f64 =
                        wr.iter().zip(&a[i * din..(i + 1) * din]).map(|(&wv, &av)| f64::from(wv) * av).sum();
                    if let Some(b) = &self.biases[l] {
                        s += f64::from(b[r]);
                    }
                    z[i * dout + r] = s;
                }
            }
            inputs.push(a);
            a = if l + 1 < layers { z.iter().map(|&v| activate(self.activation, v)).collect() } else { z.clone() };
            pre.push(z);
        }
        let output = a;
        // Backward: G_{L-1}[i,a,c] = δ_ac; G_{l-1} = (G_l · W_l) ⊙ φ'(z_{l-1}).
        let mut cot = vec![Vec::new(); layers];
        let mut g = zeros("x", mul3("x", n, o, o)?)?;
        for i in 0..n {
            for a in 0..o {
                g[(i * o + a) * o + a] = 1.0;
            }
        }
        for l in (0..layers).rev() {
            if l > 0 {
                let (din, dout) = (w[l], w[l + 1]);
                let mut gp = zeros("x", mul3("x", n, o, din)?)?;
                for i in 0..n {
                    for a in 0..o {
                        let grow = &g[(i * o + a) * dout..(i * o + a + 1) * dout];
                        let dst = &mut gp[(i * o + a) * din..(i * o + a + 1) * din];
                        for (r, &gv) in grow.iter().enumerate() {
                            for (c, d) in dst.iter_mut().enumerate() {
                                *d += gv * f64::from(self.weights[l][r * din + c]);
                            }
                        }
                        for (c, d) in dst.iter_mut().enumerate() {
                            *d *= activate_grad(self.activation, pre[l - 1][i * din + c]);
                        }
                    }
                }
                cot[l] = std::mem::replace(&mut g, gp);
            } else {
                cot[0] = std::mem::take(&mut g);
            }
        }
        Ok(MlpPass { inputs, cotangents: cot, output })
    }

    /// The explicit per-sample Jacobian `J [n, O, P]` (parameter order as in
    /// [`Mlp::param_count`]), from the backward pass: `∂f_a/∂W_l[r,c] = G_l[a,r]·A_l[c]`,
    /// `∂f_a/∂b_l[r] = G_l[a,r]`.
    ///
    /// # Errors
    /// As [`Mlp::pass`].
    pub fn jacobian(&self, x: &[f32], n: usize) -> Result<Vec<f64>> {
        let pass = self.pass(x, n)?;
        let o = self.outputs();
        let p = self.param_count();
        let mut j = zeros("x", mul3("x", n, o, p)?)?;
        for i in 0..n {
            for a in 0..o {
                let row = &mut j[(i * o + a) * p..(i * o + a + 1) * p];
                let mut off = 0;
                for l in 0..self.layers() {
                    let (din, dout) = (self.widths[l], self.widths[l + 1]);
                    let g = &pass.cotangents[l][(i * o + a) * dout..(i * o + a + 1) * dout];
                    let x = &pass.inputs[l][i * din..(i + 1) * din];
                    for r in 0..dout {
                        for c in 0..din {
                            row[off + r * din + c] = g[r] * x[c];
                        }
                    }
                    off += dout * din;
                    if self.biases[l].is_some() {
                        row[off..off + dout].copy_from_slice(g);
                        off += dout;
                    }
                }
            }
        }
        Ok(j)
    }

    /// Flattens a parameter-shaped MLP (same widths and bias pattern) into the Jacobian's
    /// parameter order.
    ///
    /// # Errors
    /// As [`Mlp::validate`].
    pub fn flat_params(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let mut v = Vec::with_capacity(self.param_count());
        for l in 0..self.layers() {
            v.extend(self.weights[l].iter().map(|&x| f64::from(x)));
            if let Some(b) = &self.biases[l] {
                v.extend(b.iter().map(|&x| f64::from(x)));
            }
        }
        Ok(v)
    }

    /// The linearized model `f_lin(x) = f(x; θ0) + J(x; θ0)·Δθ` by the explicit Jacobian,
    /// `[n, O]`. `delta` has this MLP's widths and bias pattern.
    ///
    /// # Errors
    /// As [`Mlp::pass`], and [`Error::Shape`] when `delta` has other widths or biases.
    pub fn linearized(&self, delta: &Mlp, x: &[f32], n: usize) -> Result<Vec<f64>> {
        check_same_structure(self, delta)?;
        let pass = self.pass(x, n)?;
        let j = self.jacobian(x, n)?;
        let d = delta.flat_params()?;
        let p = d.len();
        let o = self.outputs();
        Ok((0..n * o)
            .map(|row| pass.output[row] + j[row * p..(row + 1) * p].iter().zip(&d).map(|(a, b)| a * b).sum::<f64>())
            .collect())
    }
}

/// Checks that `delta` has `mlp`'s widths and bias pattern.
pub(crate) fn check_same_structure(mlp: &Mlp, delta: &Mlp) -> Result<()> {
    check_shape("delta.widths", &mlp.widths, &delta.widths)?;
    let pattern = |m: &Mlp| m.biases.iter().map(|b| usize::from(b.is_some())).collect::<Vec<_>>();
    check_shape("delta.biases", &pattern(mlp), &pattern(delta))
}

// ---------------------------------------------------------------------------------------
// Metrics on an [N, N] kernel.
// ---------------------------------------------------------------------------------------

fn check_square(arg: &'static str, k: &[f64], n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(arg, "the kernel is empty (N = 0)"));
    }
    check_shape(arg, &[checked_mul(arg, n, n)?], &[k.len()])
}

/// `Σ_i K_ii`.
///
/// # Errors
/// [`Error::Shape`] unless `k` is `[n, n]`; [`Error::InvalidArgument`] for `n = 0`.
pub fn trace(k: &[f64], n: usize) -> Result<f64> {
    check_square("kernel", k, n)?;
    Ok((0..n).map(|i| k[i * n + i]).sum())
}

/// `‖K‖_F`.
///
/// # Errors
/// As [`trace`].
pub fn frobenius_norm(k: &[f64], n: usize) -> Result<f64> {
    check_square("kernel", k, n)?;
    Ok(k.iter().map(|v| v * v).sum::<f64>().sqrt())
}

/// The mean of all `N²` entries.
///
/// # Errors
/// As [`trace`].
pub fn mean(k: &[f64], n: usize) -> Result<f64> {
    check_square("kernel", k, n)?;
    Ok(k.iter().sum::<f64>() / (n * n) as f64)
}

/// Pearson correlation of two equal-length sequences; NaN when either is constant.
fn pearson(x: impl Iterator<Item = (f64, f64)> + Clone, count: f64) -> f64 {
    let (mut sx, mut sy) = (0.0, 0.0);
    for (a, b) in x.clone() {
        sx += a;
        sy += b;
    }
    let (mx, my) = (sx / count, sy / count);
    let (mut cxy, mut cxx, mut cyy) = (0.0, 0.0, 0.0);
    for (a, b) in x {
        cxy += (a - mx) * (b - my);
        cxx += (a - mx) * (a - mx);
        cyy += (b - my) * (b - my);
    }
    cxy / (cxx * cyy).sqrt()
}

/// Label-gradient alignment: the Pearson correlation over all `N²` entries (diagonal
/// included) between `K` and `L`, `L_ij = +1` if `labels[i] == labels[j]` else `−1`, with a
/// single global mean. NaN when `K` or `L` is constant (as `numpy.corrcoef`).
///
/// # Errors
/// As [`trace`], and [`Error::Shape`] when `labels` is not `[n]`.
pub fn lga(k: &[f64], n: usize, labels: &[u32]) -> Result<f64> {
    check_square("kernel", k, n)?;
    check_shape("labels", &[n], &[labels.len()])?;
    let it = (0..n * n).map(|q| (k[q], if labels[q / n] == labels[q % n] { 1.0 } else { -1.0 }));
    Ok(pearson(it, (n * n) as f64))
}

/// `Y·Yᵀ` for targets `y [n, c]`, in `f64`.
fn outer_targets(y: &[f32], n: usize, c: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = dot(&y[i * c..(i + 1) * c], &y[j * c..(j + 1) * c]);
        }
    }
    m
}

fn center(m: &[f64], n: usize) -> Vec<f64> {
    let rows: Vec<f64> = (0..n).map(|i| m[i * n..(i + 1) * n].iter().sum::<f64>() / n as f64).collect();
    let cols: Vec<f64> = (0..n).map(|j| (0..n).map(|i| m[i * n + j]).sum::<f64>() / n as f64).collect();
    let all = rows.iter().sum::<f64>() / n as f64;
    (0..n * n).map(|q| m[q] - rows[q / n] - cols[q % n] + all).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let aa: f64 = a.iter().map(|x| x * x).sum();
    let bb: f64 = b.iter().map(|x| x * x).sum();
    ab / (aa.sqrt() * bb.sqrt())
}

/// Kernel-target alignment `⟨K, YYᵀ⟩ / (‖K‖_F ‖YYᵀ‖_F)` for targets `y [n, c]`; with
/// `centered`, the same on `HKH` and `H·YYᵀ·H`, `H = I − 11ᵀ/N` (Cortes et al.). NaN when a
/// (centered) matrix is zero.
///
/// # Errors
/// As [`trace`], [`Error::Shape`] when `y` is not `[n, c]`, [`Error::InvalidArgument`] for
/// `c = 0`.
pub fn alignment(k: &[f64], n: usize, y: &[f32], c: usize, centered: bool) -> Result<f64> {
    check_square("kernel", k, n)?;
    if c == 0 {
        return Err(Error::invalid("targets", "targets need at least one column"));
    }
    check_shape("targets", &[checked_mul("targets", n, c)?], &[y.len()])?;
    let m = outer_targets(y, n, c);
    Ok(if centered { cosine(&center(k, n), &center(&m, n)) } else { cosine(k, &m) })
}

/// All eigenvalues of the symmetric `[n, n]` matrix `k`, ascending, in `f64`: Householder
/// reduction to tridiagonal form, then the implicit QL algorithm with Wilkinson shifts.
/// Only the lower triangle is read. O(n³) on the CPU.
///
/// The matrix is first divided by its largest absolute entry `s` (so every entry is in
/// `[-1, 1]` and no intermediate sum of squares can overflow, even for entries near
/// `f64::MAX`), and the eigenvalues are multiplied back by `s`. A zero matrix has all-zero
/// eigenvalues.
///
/// # Errors
/// As [`trace`]; [`Error::NonFinite`] for a NaN or infinity; [`Error::TooLarge`] when an
/// eigenvalue itself exceeds `f64::MAX` after unscaling (possible only for entries within a
/// factor `n` of it); [`Error::InvalidArgument`] if QL fails to converge (it does not in
/// practice on finite input).
pub fn eigenvalues_symmetric(k: &[f64], n: usize) -> Result<Vec<f64>> {
    check_square("kernel", k, n)?;
    if let Some(index) = k.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { arg: "kernel", index });
    }
    let scale = (0..n).flat_map(|i| (0..=i).map(move |j| (i, j))).fold(0.0f64, |m, (i, j)| m.max(k[i * n + j].abs()));
    if scale == 0.0 {
        return zeros("kernel", n);
    }
    let mut a = zeros("kernel", k.len())?;
    // Symmetrize from the lower triangle so the input's upper triangle is never trusted.
    for i in 0..n {
        for j in 0..=i {
            let v = k[i * n + j] / scale;
            a[i * n + j] = v;
            a[j * n + i] = v;
        }
    }
    let (_, mut e) = linalg::householder_tridiagonalize(&mut a, n);
    let mut d = linalg::diagonal(&a, n);
    if !linalg::tridiagonal_ql(&mut d, &mut e, None) {
        return Err(Error::invalid("kernel", "the QL eigenvalue iteration did not converge in 60 sweeps"));
    }
    for v in d.iter_mut() {
        *v *= scale;
        if !v.is_finite() {
            return Err(Error::too_large("kernel", "an eigenvalue exceeds f64::MAX"));
        }
    }
    d.sort_by(f64::total_cmp);
    Ok(d)
}

/// `λ_max / λ_min` of the eigenvalues (sorted ascending) of an `n × n` symmetric matrix,
/// `n = eigenvalues.len()`: `∞` when the matrix is numerically singular or not positive
/// definite, i.e. when `λ_min ≤ n·ε·λ_max` (`ε = f64::EPSILON`; this includes `λ_min ≤ 0` and
/// `λ_max ≤ 0`), and for an empty or non-finite list. Never NaN, and never a huge finite
/// ratio of rounding noise: below that threshold `λ_min` is indistinguishable from 0 at the
/// precision of the eigensolver.
pub fn condition_number_of(eigenvalues: &[f64]) -> f64 {
    let n = eigenvalues.len() as f64;
    match (eigenvalues.first(), eigenvalues.last()) {
        (Some(&lo), Some(&hi)) if lo.is_finite() && hi.is_finite() && hi > 0.0 && lo > n * f64::EPSILON * hi => hi / lo,
        _ => f64::INFINITY,
    }
}

/// The condition number of a symmetric kernel (see [`condition_number_of`]).
///
/// # Errors
/// As [`eigenvalues_symmetric`].
pub fn condition_number(k: &[f64], n: usize) -> Result<f64> {
    Ok(condition_number_of(&eigenvalues_symmetric(k, n)?))
}

/// Cholesky factor `L` (lower, row-major) of a symmetric positive-definite `[n, n]` matrix.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `arg` when a pivot is not positive; [`Error::Shape`] when
/// `a` is not `n × n`.
pub fn cholesky(a: &[f64], n: usize, arg: &'static str) -> Result<Vec<f64>> {
    check_shape(arg, &[checked_mul(arg, n, n)?], &[a.len()])?;
    let mut l = zeros(arg, a.len())?;
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for q in 0..j {
                s -= l[i * n + q] * l[j * n + q];
            }
            if i == j {
                if !s.is_finite() || s <= 0.0 {
                    return Err(Error::invalid(
                        arg,
                        format!("not positive definite after regularization (pivot {i} is {s:e}); raise diag_reg"),
                    ));
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// NTK regression (the infinite-time mean of gradient-descent MSE training, as
/// neural-tangents' `predict.gradient_descent_mse(..., t=None)`):
/// `f(x*) = Θ(x*, X)·[Θ(X, X) + λI]⁻¹·Y` with `λ = diag_reg·tr(Θ(X, X))/n`
/// (`diag_reg_absolute_scale=False`), solved by Cholesky in `f64`.
///
/// `theta_train [n, n]`, `theta_test [m, n]`, `y [n, c]`; returns `[m, c]`.
///
/// # Errors
/// [`Error::Shape`] for mismatched lengths, [`Error::InvalidArgument`] for a negative or
/// non-finite `diag_reg` or a matrix that is not positive definite after regularization,
/// [`Error::NonFinite`] for non-finite inputs.
pub fn ntk_regression(
    theta_train: &[f64],
    theta_test: &[f64],
    y: &[f64],
    n: usize,
    m: usize,
    c: usize,
    diag_reg: f64,
) -> Result<Vec<f64>> {
    check_square("theta_train", theta_train, n)?;
    check_shape("theta_test", &[checked_mul("theta_test", m, n)?], &[theta_test.len()])?;
    check_shape("targets", &[checked_mul("targets", n, c)?], &[y.len()])?;
    if !diag_reg.is_finite() || diag_reg < 0.0 {
        return Err(Error::invalid("diag_reg", format!("must be finite and ≥ 0, got {diag_reg}")));
    }
    for (arg, v) in [("theta_train", theta_train), ("theta_test", theta_test), ("targets", y)] {
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { arg, index });
        }
    }
    let tr: f64 = (0..n).map(|i| theta_train[i * n + i]).sum();
    let lambda = diag_reg * tr / n as f64;
    let mut a = theta_train.to_vec();
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    let l = cholesky(&a, n, "theta_train")?;
    // Solve (L Lᵀ) X = Y column by column.
    let mut x = y.to_vec();
    for col in 0..c {
        for i in 0..n {
            let mut s = x[i * c + col];
            for q in 0..i {
                s -= l[i * n + q] * x[q * c + col];
            }
            x[i * c + col] = s / l[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = x[i * c + col];
            for q in i + 1..n {
                s -= l[q * n + i] * x[q * c + col];
            }
            x[i * c + col] = s / l[i * n + i];
        }
    }
    let mut out = zeros("out", checked_mul("out", m, c)?)?;
    for r in 0..m {
        for col in 0..c {
            out[r * c + col] = (0..n).map(|q| theta_test[r * n + q] * x[q * c + col]).sum();
        }
    }
    Ok(out)
}
