//! The NTK family's CPU reference: contraction modes, the factored NTK against the
//! explicit Jacobian, the MLP's Jacobian against finite differences, the linearized model,
//! and the metrics on hand-computed cases.

mod common;
mod ntk_support;

use ntk_support::{f32s, HostFactors, MODES};
use ntkv::ntk::cpu::{self, FactoredLayer, Mlp};
use ntkv::ntk::{Activation, NtkMode};
use ntkv::rng::Rng;
use proptest::prelude::*;

fn random_mlp(rng: &mut Rng, widths: &[usize], act: Activation, bias: bool) -> Mlp {
    ntk_support::random_mlp(rng, widths, act, |_| bias)
}

#[test]
fn gram_hand_case() {
    // N=2, O=1, P=2: J = [[1, 2], [3, 4]] -> Θ = [[5, 11], [11, 25]].
    let j = [1.0f32, 2.0, 3.0, 4.0];
    let k = cpu::gram(&j, None, 2, 2, 1, 2, NtkMode::Full).unwrap();
    assert_eq!(k, vec![5.0, 11.0, 11.0, 25.0]);
    // O=2, P=1: J[i] = [[1],[2]] and [[3],[4]]: Full[0,1] = [[3,4],[6,8]], trace 11, pseudo 3*7.
    let j = [1.0f32, 2.0, 3.0, 4.0];
    let full = cpu::gram(&j, None, 2, 2, 2, 1, NtkMode::Full).unwrap();
    assert_eq!(&full[4..8], &[3.0, 4.0, 6.0, 8.0]);
    let tr = cpu::gram(&j, None, 2, 2, 2, 1, NtkMode::Trace { divide_by_outputs: false }).unwrap();
    assert_eq!(tr, vec![5.0, 11.0, 11.0, 25.0]);
    let tro = cpu::gram(&j, None, 2, 2, 2, 1, NtkMode::Trace { divide_by_outputs: true }).unwrap();
    assert_eq!(tro, vec![2.5, 5.5, 5.5, 12.5]);
    let dg = cpu::gram(&j, None, 2, 2, 2, 1, NtkMode::Diagonal).unwrap();
    assert_eq!(dg, vec![1.0, 4.0, 3.0, 8.0, 3.0, 8.0, 9.0, 16.0]);
    let ps = cpu::gram(&j, None, 2, 2, 2, 1, NtkMode::Pseudo).unwrap();
    assert_eq!(ps, vec![9.0, 21.0, 21.0, 49.0]);
}

#[test]
fn modes_are_contractions_of_full() {
    let mut rng = Rng::new(11);
    let (n1, n2, o, p) = (3, 4, 3, 17);
    let j1 = rng.normal_vec(n1 * o * p);
    let j2 = rng.normal_vec(n2 * o * p);
    let full = cpu::gram(&j1, Some(&j2), n1, n2, o, p, NtkMode::Full).unwrap();
    let at = |i: usize, j: usize, a: usize, b: usize| full[((i * n2 + j) * o + a) * o + b];
    let tr = cpu::gram(&j1, Some(&j2), n1, n2, o, p, NtkMode::Trace { divide_by_outputs: true }).unwrap();
    let dg = cpu::gram(&j1, Some(&j2), n1, n2, o, p, NtkMode::Diagonal).unwrap();
    let ps = cpu::gram(&j1, Some(&j2), n1, n2, o, p, NtkMode::Pseudo).unwrap();
    for i in 0..n1 {
        for j in 0..n2 {
            let t: f64 = (0..o).map(|a| at(i, j, a, a)).sum();
            assert!((tr[i * n2 + j] - t / o as f64).abs() < 1e-12);
            let s: f64 = (0..o).flat_map(|a| (0..o).map(move |b| (a, b))).map(|(a, b)| at(i, j, a, b)).sum();
            assert!((ps[i * n2 + j] - s).abs() < 1e-9);
            for a in 0..o {
                assert_eq!(dg[(i * n2 + j) * o + a], at(i, j, a, a));
            }
        }
    }
}

#[test]
fn gram_validates_shapes() {
    let j = vec![0.0f32; 12];
    assert!(matches!(cpu::gram(&j, None, 2, 2, 2, 4, NtkMode::Full), Err(ntkv::Error::Shape { arg: "j1", .. })));
    assert!(matches!(cpu::gram(&j, None, 2, 3, 2, 3, NtkMode::Full), Err(ntkv::Error::Shape { arg: "n2", .. })));
    assert!(matches!(
        cpu::gram(&j, Some(&j[..6]), 2, 2, 2, 3, NtkMode::Full),
        Err(ntkv::Error::Shape { arg: "j2", .. })
    ));
}

/// Explicit Jacobian of dense layers with weight sharing over T: `J[i,a,(r,c)] =
/// Σ_t G[i,t,a,r]·A[i,t,c]` and `J[i,a,bias r] = Σ_t G[i,t,a,r]`.
fn explicit_from_factors(a: &[f32], g: &[f32], n: usize, t: usize, o: usize, din: usize, dout: usize) -> Vec<f32> {
    let p = dout * din + dout;
    let mut j = vec![0.0f64; n * o * p];
    for i in 0..n {
        for oa in 0..o {
            for s in 0..t {
                for r in 0..dout {
                    let gv = f64::from(g[((i * t + s) * o + oa) * dout + r]);
                    for c in 0..din {
                        j[(i * o + oa) * p + r * din + c] += gv * f64::from(a[(i * t + s) * din + c]);
                    }
                    j[(i * o + oa) * p + dout * din + r] += gv;
                }
            }
        }
    }
    f32s(&j)
}

#[test]
fn factored_equals_explicit_for_t1_and_t3() {
    let mut rng = Rng::new(5);
    for &(t, n1, n2) in &[(1usize, 3usize, 4usize), (3, 2, 3)] {
        let (o, din, dout) = (2, 5, 3);
        let a1 = rng.normal_vec(n1 * t * din);
        let g1 = rng.normal_vec(n1 * t * o * dout);
        let a2 = rng.normal_vec(n2 * t * din);
        let g2 = rng.normal_vec(n2 * t * o * dout);
        let j1 = explicit_from_factors(&a1, &g1, n1, t, o, din, dout);
        let j2 = explicit_from_factors(&a2, &g2, n2, t, o, din, dout);
        let l1 = [FactoredLayer { a: &a1, g: &g1, d_in: din, d_out: dout, bias: true }];
        let l2 = [FactoredLayer { a: &a2, g: &g2, d_in: din, d_out: dout, bias: true }];
        for mode in MODES {
            let want = cpu::gram(&j1, Some(&j2), n1, n2, o, dout * din + dout, mode).unwrap();
            let got = cpu::factored_ntk(&l1, Some(&l2), n1, n2, t, o, mode).unwrap();
            // The explicit J went through f32, so allow its rounding.
            common::assert_rel_l2(&format!("factored t={t} {mode:?}"), &got, &want, 1e-6);
        }
    }
}

#[test]
fn mlp_jacobian_matches_finite_differences() {
    let mut rng = Rng::new(7);
    for act in [Activation::Tanh, Activation::Gelu, Activation::Relu] {
        let mlp = random_mlp(&mut rng, &[4, 6, 5, 3], act, true);
        let n = 2;
        let x = rng.normal_vec(n * 4);
        let j = mlp.jacobian(&x, n).unwrap();
        let p = mlp.param_count();
        assert_eq!(p, 6 * 4 + 6 + 5 * 6 + 5 + 3 * 5 + 3);
        // Central differences in f64 by perturbing a copy of the weights; f32 weights limit
        // the step, so perturb through an f64 forward instead.
        let theta = mlp.flat_params().unwrap();
        let eval = |th: &[f64]| -> Vec<f64> { forward_f64(&mlp, th, &x, n) };
        let h = 1e-5;
        for q in (0..p).step_by(3) {
            let mut tp = theta.clone();
            tp[q] += h;
            let mut tm = theta.clone();
            tm[q] -= h;
            let (fp, fm) = (eval(&tp), eval(&tm));
            for row in 0..n * 3 {
                let fd = (fp[row] - fm[row]) / (2.0 * h);
                let an = j[row * p + q];
                assert!(
                    (fd - an).abs() < 1e-6 * (1.0 + an.abs()),
                    "{act:?} param {q} row {row}: fd {fd} analytic {an}"
                );
            }
        }
    }
}

/// Forward pass with parameters in the flat Jacobian order, in f64.
fn forward_f64(mlp: &Mlp, theta: &[f64], x: &[f32], n: usize) -> Vec<f64> {
    let w = &mlp.widths;
    let mut a: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut off = 0;
    for l in 0..mlp.layers() {
        let (din, dout) = (w[l], w[l + 1]);
        let wl = &theta[off..off + din * dout];
        off += din * dout;
        let bl = if mlp.biases[l].is_some() {
            off += dout;
            Some(&theta[off - dout..off])
        } else {
            None
        };
        let mut z = vec![0.0; n * dout];
        for i in 0..n {
            for r in 0..dout {
                z[i * dout + r] =
                    (0..din).map(|c| wl[r * din + c] * a[i * din + c]).sum::<f64>() + bl.map_or(0.0, |b| b[r]);
            }
        }
        a = if l + 1 < mlp.layers() { z.iter().map(|&v| cpu::activate(mlp.activation, v)).collect() } else { z };
    }
    a
}

#[test]
fn mlp_factored_ntk_equals_explicit_full() {
    let mut rng = Rng::new(9);
    for (act, bias) in [(Activation::Relu, true), (Activation::Gelu, false), (Activation::Tanh, true)] {
        let mlp = random_mlp(&mut rng, &[5, 7, 4], act, bias);
        let (n1, n2, o) = (3, 2, 4);
        let x1 = rng.normal_vec(n1 * 5);
        let x2 = rng.normal_vec(n2 * 5);
        let j1 = f32s(&mlp.jacobian(&x1, n1).unwrap());
        let j2 = f32s(&mlp.jacobian(&x2, n2).unwrap());
        let (h1, h2) = (HostFactors::of(&mlp, &x1, n1), HostFactors::of(&mlp, &x2, n2));
        let (l1, l2) = (h1.layers(&mlp), h2.layers(&mlp));
        for mode in MODES {
            let want = cpu::gram(&j1, Some(&j2), n1, n2, o, mlp.param_count(), mode).unwrap();
            let got = cpu::factored_ntk(&l1, Some(&l2), n1, n2, 1, o, mode).unwrap();
            common::assert_rel_l2(&format!("mlp {act:?} {mode:?}"), &got, &want, 1e-6);
        }
    }
}

#[test]
fn linearized_is_first_order_taylor() {
    let mut rng = Rng::new(13);
    let mlp = random_mlp(&mut rng, &[3, 8, 2], Activation::Tanh, true);
    let mut delta = random_mlp(&mut rng, &[3, 8, 2], Activation::Tanh, true);
    let n = 4;
    let x = rng.normal_vec(n * 3);
    // Δθ = 0 gives f(θ0).
    let zero = Mlp {
        weights: delta.weights.iter().map(|w| vec![0.0; w.len()]).collect(),
        biases: delta.biases.iter().map(|b| b.as_ref().map(|b| vec![0.0; b.len()])).collect(),
        ..delta.clone()
    };
    let f0 = mlp.pass(&x, n).unwrap().output;
    assert_eq!(mlp.linearized(&zero, &x, n).unwrap(), f0);
    // f_lin(θ0 + εΔ) − f(θ0 + εΔ) = O(ε²).
    let eps = 1e-3f32;
    for w in delta.weights.iter_mut() {
        w.iter_mut().for_each(|v| *v *= eps);
    }
    for b in delta.biases.iter_mut().flatten() {
        b.iter_mut().for_each(|v| *v *= eps);
    }
    let lin = mlp.linearized(&delta, &x, n).unwrap();
    let theta: Vec<f64> =
        mlp.flat_params().unwrap().iter().zip(delta.flat_params().unwrap()).map(|(a, b)| a + b).collect();
    let moved = forward_f64(&mlp, &theta, &x, n);
    for (l, m) in lin.iter().zip(&moved) {
        assert!((l - m).abs() < 1e-4, "lin {l} moved {m}");
    }
    let bad = random_mlp(&mut rng, &[3, 7, 2], Activation::Tanh, true);
    assert!(matches!(mlp.linearized(&bad, &x, n), Err(ntkv::Error::Shape { arg: "delta.widths", .. })));
}

#[test]
fn erf_matches_known_values() {
    let cases = [
        (0.0, 0.0),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (-2.0, -0.995_322_265_018_952_7),
        (3.5, 0.999_999_256_901_627_7),
        (6.0, 1.0),
    ];
    for (x, want) in cases {
        assert!((cpu::erf(x) - want).abs() < 1e-14, "erf({x}) = {} want {want}", cpu::erf(x));
    }
}

#[test]
fn basic_metrics_hand_case() {
    let k = [2.0, -1.0, 3.0, 4.0];
    assert_eq!(cpu::trace(&k, 2).unwrap(), 6.0);
    assert!((cpu::frobenius_norm(&k, 2).unwrap() - 30f64.sqrt()).abs() < 1e-15);
    assert_eq!(cpu::mean(&k, 2).unwrap(), 2.0);
    assert!(matches!(cpu::trace(&k, 3), Err(ntkv::Error::Shape { .. })));
    assert!(matches!(cpu::trace(&[], 0), Err(ntkv::Error::InvalidArgument { .. })));
}

#[test]
fn lga_hand_case() {
    // labels [0, 0, 1]: L = [[1,1,-1],[1,1,-1],[-1,-1,1]].
    let k = [3.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 1.0, 4.0];
    // mean K = 13/9, mean L = 1/9. Hand: Σ(K−mK)(L−mL) = ΣKL − 9·mK·mL = (3+1+2+4 −2·1 ... )
    // ΣKL = 3+1−0+1+2−1−0−1+4 = 9; ΣK = 13; ΣL = 1; ΣK² = 9+1+1+4+1+1+16 = 33; ΣL² = 9.
    let cov: f64 = 9.0 - 13.0 * 1.0 / 9.0;
    let vk: f64 = 33.0 - 13.0 * 13.0 / 9.0;
    let vl: f64 = 9.0 - 1.0 / 9.0;
    let want = cov / (vk * vl).sqrt();
    let got = cpu::lga(&k, 3, &[0, 0, 1]).unwrap();
    assert!((got - want).abs() < 1e-14, "{got} vs {want}");
    // A kernel that is exactly affine in L correlates perfectly.
    let l: Vec<f64> = (0..9).map(|q| if [0, 0, 1][q / 3] == [0, 0, 1][q % 3] { 5.0 } else { 1.0 }).collect();
    assert!((cpu::lga(&l, 3, &[0, 0, 1]).unwrap() - 1.0).abs() < 1e-14);
    // All labels equal: L is constant, correlation undefined.
    assert!(cpu::lga(&k, 3, &[2, 2, 2]).unwrap().is_nan());
}

#[test]
fn alignment_hand_case() {
    // One-hot targets for labels [0, 1]: YYᵀ = I. K = [[2, 1], [1, 2]].
    let k = [2.0, 1.0, 1.0, 2.0];
    let y = [1.0f32, 0.0, 0.0, 1.0];
    let want = 4.0 / (10f64.sqrt() * 2f64.sqrt());
    assert!((cpu::alignment(&k, 2, &y, 2, false).unwrap() - want).abs() < 1e-15);
    // Centered: HKH = [[.5,-.5],[-.5,.5]], H I H = same shape → alignment 1.
    assert!((cpu::alignment(&k, 2, &y, 2, true).unwrap() - 1.0).abs() < 1e-14);
    // K = YYᵀ aligns perfectly.
    assert!((cpu::alignment(&[1.0, 0.0, 0.0, 1.0], 2, &y, 2, false).unwrap() - 1.0).abs() < 1e-15);
    assert!(matches!(cpu::alignment(&k, 2, &y, 0, false), Err(ntkv::Error::InvalidArgument { arg: "targets", .. })));
    assert!(matches!(cpu::alignment(&k, 2, &y[..3], 2, false), Err(ntkv::Error::Shape { arg: "targets", .. })));
}

#[test]
fn eigenvalues_known_cases() {
    let ev = cpu::eigenvalues_symmetric(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
    assert!((ev[0] - 1.0).abs() < 1e-14 && (ev[1] - 3.0).abs() < 1e-14, "{ev:?}");
    let ev = cpu::eigenvalues_symmetric(&[5.0], 1).unwrap();
    assert_eq!(ev, vec![5.0]);
    // Diagonal input.
    let mut d = vec![0.0; 16];
    for (i, v) in [4.0, -1.0, 2.5, 0.0].iter().enumerate() {
        d[i * 4 + i] = *v;
    }
    assert_eq!(cpu::eigenvalues_symmetric(&d, 4).unwrap(), vec![-1.0, 0.0, 2.5, 4.0]);
    // A Gram of rank 2 in 5 dimensions: three zero eigenvalues.
    let j = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0, 1.0, 1.0, 2.0, -2.0];
    let k = cpu::gram(&j, None, 5, 5, 1, 2, NtkMode::Full).unwrap();
    let ev = cpu::eigenvalues_symmetric(&k, 5).unwrap();
    for v in &ev[..3] {
        assert!(v.abs() < 1e-12, "{ev:?}");
    }
    assert!((ev.iter().sum::<f64>() - cpu::trace(&k, 5).unwrap()).abs() < 1e-12);
    let mut bad = k.clone();
    bad[7] = f64::NAN;
    assert!(matches!(cpu::eigenvalues_symmetric(&bad, 5), Err(ntkv::Error::NonFinite { .. })));
}

#[test]
fn condition_number_is_finite_or_inf_never_nan() {
    assert!((cpu::condition_number(&[2.0, 1.0, 1.0, 2.0], 2).unwrap() - 3.0).abs() < 1e-13);
    // Indefinite, singular, zero.
    assert_eq!(cpu::condition_number(&[1.0, 2.0, 2.0, 1.0], 2).unwrap(), f64::INFINITY);
    // Singular: λ_min is 0 up to rounding, so the condition number is exactly ∞.
    assert_eq!(cpu::condition_number(&[1.0, 1.0, 1.0, 1.0], 2).unwrap(), f64::INFINITY);
    assert_eq!(cpu::condition_number(&[0.0; 9], 3).unwrap(), f64::INFINITY);
    assert_eq!(cpu::condition_number(&[-3.0, 0.0, 0.0, -1.0], 2).unwrap(), f64::INFINITY);
    assert_eq!(cpu::condition_number_of(&[]), f64::INFINITY);
}

#[test]
fn ntk_regression_matches_direct_solve() {
    let mut rng = Rng::new(21);
    let (n, m, c, p) = (6, 3, 2, 10);
    let jx = rng.normal_vec(n * p);
    let jt = rng.normal_vec(m * p);
    let train = cpu::gram(&jx, None, n, n, 1, p, NtkMode::Full).unwrap();
    let test = cpu::gram(&jt, Some(&jx), m, n, 1, p, NtkMode::Full).unwrap();
    let y: Vec<f64> = rng.normal_vec(n * c).into_iter().map(f64::from).collect();
    // With no regularization the training points are interpolated.
    let fit = cpu::ntk_regression(&train, &train, &y, n, n, c, 0.0).unwrap();
    common::assert_close("interpolation", &fit, &y, 1e-8, 1e-8);
    // With diag_reg the solution satisfies (Θ + λI)·α = Y, λ = diag_reg·tr/n.
    let reg = 0.1;
    let lambda = reg * cpu::trace(&train, n).unwrap() / n as f64;
    let pred = cpu::ntk_regression(&train, &test, &y, n, m, c, reg).unwrap();
    let mut a = train.clone();
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    let alpha = gauss_solve(&a, &y, n, c);
    for r in 0..m {
        for col in 0..c {
            let want: f64 = (0..n).map(|q| test[r * n + q] * alpha[q * c + col]).sum();
            assert!((pred[r * c + col] - want).abs() < 1e-9 * (1.0 + want.abs()));
        }
    }
    // Not PD: a typed error, never NaN.
    let neg = [-1.0, 0.0, 0.0, -1.0];
    assert!(matches!(
        cpu::ntk_regression(&neg, &neg, &[1.0, 1.0], 2, 2, 1, 0.0),
        Err(ntkv::Error::InvalidArgument { arg: "theta_train", .. })
    ));
    assert!(matches!(
        cpu::ntk_regression(&train, &test, &y, n, m, c, -1.0),
        Err(ntkv::Error::InvalidArgument { arg: "diag_reg", .. })
    ));
}

fn gauss_solve(a: &[f64], b: &[f64], n: usize, c: usize) -> Vec<f64> {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs())).unwrap();
        for q in 0..n {
            a.swap(col * n + q, piv * n + q);
        }
        for q in 0..c {
            b.swap(col * c + q, piv * c + q);
        }
        for r in 0..n {
            if r != col {
                let f = a[r * n + col] / a[col * n + col];
                for q in 0..n {
                    a[r * n + q] -= f * a[col * n + q];
                }
                for q in 0..c {
                    b[r * c + q] -= f * b[col * c + q];
                }
            }
        }
    }
    (0..n * c).map(|q| b[q] / a[(q / c) * n + q / c]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn symmetric_gram_is_symmetric_and_eigs_sum_to_trace(n in 1usize..7, o in 1usize..4, p in 1usize..9, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let j = rng.normal_vec(n * o * p);
        let full = cpu::gram(&j, None, n, n, o, p, NtkMode::Full).unwrap();
        let same = cpu::gram(&j, Some(&j), n, n, o, p, NtkMode::Full).unwrap();
        prop_assert_eq!(&full, &same);
        let m = n * o;
        // As an [N·O, N·O] matrix in (i,a) order.
        let mut k = vec![0.0; m * m];
        for i in 0..n { for jj in 0..n { for a in 0..o { for b in 0..o {
            k[(i * o + a) * m + jj * o + b] = full[((i * n + jj) * o + a) * o + b];
        }}}}
        for r in 0..m { for c in 0..m { prop_assert_eq!(k[r * m + c], k[c * m + r]); } }
        let ev = cpu::eigenvalues_symmetric(&k, m).unwrap();
        let tr = cpu::trace(&k, m).unwrap();
        prop_assert!((ev.iter().sum::<f64>() - tr).abs() <= 1e-9 * (1.0 + tr.abs()));
        // PSD up to rounding.
        prop_assert!(ev[0] >= -1e-9 * (1.0 + tr.abs()));
        let fro2: f64 = k.iter().map(|v| v * v).sum();
        let ev2: f64 = ev.iter().map(|v| v * v).sum();
        prop_assert!((fro2 - ev2).abs() <= 1e-9 * (1.0 + fro2));
        prop_assert!(!cpu::condition_number_of(&ev).is_nan());
    }

    #[test]
    fn random_symmetric_eigs_preserve_invariants(n in 1usize..12, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let mut k = vec![0.0f64; n * n];
        for i in 0..n { for j in 0..=i {
            let v = f64::from(rng.normal());
            k[i * n + j] = v;
            k[j * n + i] = v;
        }}
        let ev = cpu::eigenvalues_symmetric(&k, n).unwrap();
        prop_assert!(ev.windows(2).all(|w| w[0] <= w[1]));
        let tr: f64 = (0..n).map(|i| k[i * n + i]).sum();
        prop_assert!((ev.iter().sum::<f64>() - tr).abs() <= 1e-10 * (1.0 + tr.abs() + n as f64));
        let fro2: f64 = k.iter().map(|v| v * v).sum();
        let ev2: f64 = ev.iter().map(|v| v * v).sum();
        prop_assert!((fro2 - ev2).abs() <= 1e-10 * (1.0 + fro2));
        let cond = cpu::condition_number_of(&ev);
        prop_assert!(!cond.is_nan());
        prop_assert!(cond == f64::INFINITY || cond >= 1.0);
    }
}
