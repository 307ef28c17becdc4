//! Differential tests of the NTK family: GPU kernels against the `f64` CPU reference, on
//! shapes that are not multiples of any tile.

mod common;
mod ntk_support;

use half::bf16;
use ntk_support::{bf16_rounded, f64s, MODES};
use ntkv::ntk::{self, cpu, metrics, Activation, FactoredLayer, GramPlan, GramShape, NtkMode, Precision};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn upload(dev: &Device, v: &[f32], shape: &[usize]) -> DeviceTensor<f32> {
    DeviceTensor::from_host(dev, v, shape).unwrap()
}

/// Uploads `j1 [n1, o, p]` (and `j2 [n2, o, p]`) and runs the one-call contraction.
fn run_gram(
    dev: &Device,
    j1: &[f32],
    j2: Option<&[f32]>,
    [n1, n2, o, p]: [usize; 4],
    mode: NtkMode,
    prec: Precision,
) -> Vec<f64> {
    let t1 = upload(dev, j1, &[n1, o, p]);
    let out = match j2 {
        Some(j) => ntk::gram_cross(dev, &t1, &upload(dev, j, &[n2, o, p]), mode, prec).unwrap(),
        None => ntk::gram(dev, &t1, mode, prec).unwrap(),
    };
    assert_eq!(out.shape(), mode.output_shape(n1, n2, o).as_slice());
    f64s(&out.to_host().unwrap())
}

#[test]
fn gram_f32_every_mode_cross_and_symmetric() {
    let dev = gpu_or_skip!("gram_f32_every_mode_cross_and_symmetric");
    let mut rng = Rng::new(1);
    for &(n1, n2, o, p) in
        &[(37usize, 53usize, 3usize, 301usize), (5, 130, 1, 77), (131, 9, 2, 33), (1, 1, 4, 5), (29, 41, 3, 136)]
    {
        let j1 = rng.normal_vec(n1 * o * p);
        let j2 = rng.normal_vec(n2 * o * p);
        for mode in MODES {
            let want = cpu::gram(&j1, Some(&j2), n1, n2, o, p, mode).unwrap();
            let got = run_gram(dev, &j1, Some(&j2), [n1, n2, o, p], mode, Precision::F32);
            common::assert_rel_l2(&format!("cross {mode:?} {n1}x{n2} o{o} p{p}"), &got, &want, 1e-5);
            let want = cpu::gram(&j1, None, n1, n1, o, p, mode).unwrap();
            let got = run_gram(dev, &j1, None, [n1, n1, o, p], mode, Precision::F32);
            common::assert_rel_l2(&format!("sym {mode:?} {n1} o{o} p{p}"), &got, &want, 1e-5);
        }
    }
}

#[test]
fn gram_symmetric_spans_several_tiles() {
    // N·O = 300 rows: 3 row tiles, so the mirrored lower triangle is exercised off the diagonal.
    let dev = gpu_or_skip!("gram_symmetric_spans_several_tiles");
    let mut rng = Rng::new(2);
    let (n, o, p) = (100, 3, 45);
    let j = rng.normal_vec(n * o * p);
    let want = cpu::gram(&j, None, n, n, o, p, NtkMode::Full).unwrap();
    let got = run_gram(dev, &j, None, [n, n, o, p], NtkMode::Full, Precision::F32);
    common::assert_rel_l2("sym full 300 rows", &got, &want, 1e-5);
    // Exactly symmetric: the mirror reads the same bits.
    for i in 0..n {
        for k in 0..n {
            for a in 0..o {
                for b in 0..o {
                    assert_eq!(got[((i * n + k) * o + a) * o + b], got[((k * n + i) * o + b) * o + a]);
                }
            }
        }
    }
}

#[test]
fn gram_tensor_core_precisions_within_bounds() {
    let dev = gpu_or_skip!("gram_tensor_core_precisions_within_bounds");
    let mut rng = Rng::new(3);
    // p = 517: unaligned rows (scalar loads); p = 264: aligned rows (vector loads, cp.async).
    for &(n1, n2, o, p) in &[(45usize, 70usize, 2usize, 517usize), (45, 139, 2, 264)] {
        let j1 = rng.normal_vec(n1 * o * p);
        let j2 = rng.normal_vec(n2 * o * p);
        // bf16-rounded copies: the reference for bf16 storage.
        let (r1, r2) = (bf16_rounded(&j1), bf16_rounded(&j2));
        let b1: Vec<bf16> = j1.iter().map(|&v| bf16::from_f32(v)).collect();
        let b2: Vec<bf16> = j2.iter().map(|&v| bf16::from_f32(v)).collect();
        let tb1 = DeviceTensor::from_host(dev, &b1, &[n1, o, p]).unwrap();
        let tb2 = DeviceTensor::from_host(dev, &b2, &[n2, o, p]).unwrap();
        for mode in MODES {
            let want = cpu::gram(&j1, Some(&j2), n1, n2, o, p, mode).unwrap();
            let got = run_gram(dev, &j1, Some(&j2), [n1, n2, o, p], mode, Precision::Tf32);
            common::assert_rel_l2(&format!("tf32 {mode:?}"), &got, &want, Precision::Tf32.rel_l2_bound());
            // f32 storage rounded to bf16 on the fly: within 1e-2 of the unrounded reference.
            let got = run_gram(dev, &j1, Some(&j2), [n1, n2, o, p], mode, Precision::Bf16);
            common::assert_rel_l2(&format!("bf16 (f32 in) {mode:?}"), &got, &want, 1e-2);
            // bf16 storage against the reference on the same bf16 values.
            let want_b = cpu::gram(&r1, Some(&r2), n1, n2, o, p, mode).unwrap();
            for prec in [Precision::Bf16, Precision::Tf32, Precision::F32] {
                let out = ntk::gram_cross(dev, &tb1, &tb2, mode, prec).unwrap();
                let got = f64s(&out.to_host().unwrap());
                let tol = if prec == Precision::F32 { 1e-5 } else { Precision::Bf16.rel_l2_bound() };
                common::assert_rel_l2(&format!("bf16 storage {prec:?} {mode:?}"), &got, &want_b, tol);
            }
            // Symmetric tensor-core path.
            let want_s = cpu::gram(&j1, None, n1, n1, o, p, mode).unwrap();
            let got = run_gram(dev, &j1, None, [n1, n1, o, p], mode, Precision::Tf32);
            common::assert_rel_l2(&format!("tf32 sym {mode:?}"), &got, &want_s, Precision::Tf32.rel_l2_bound());
            let want_sb = cpu::gram(&r1, None, n1, n1, o, p, mode).unwrap();
            let got = ntk::gram(dev, &tb1, mode, Precision::Bf16).unwrap();
            common::assert_rel_l2(&format!("bf16 sym {mode:?}"), &f64s(&got.to_host().unwrap()), &want_sb, 2e-3);
        }
    }
}

#[test]
fn gram_split_k_is_deterministic_and_exact() {
    let dev = gpu_or_skip!("gram_split_k_is_deterministic_and_exact");
    let mut rng = Rng::new(4);
    for p in [200_003usize, 200_000] {
        let (n, o) = (21, 1);
        let j = rng.normal_vec(n * o * p);
        let t = upload(dev, &j, &[n, o, p]);
        let jb: Vec<bf16> = j.iter().map(|&v| bf16::from_f32(v)).collect();
        let tb = DeviceTensor::from_host(dev, &jb, &[n, o, p]).unwrap();
        let a = ntk::gram(dev, &tb, NtkMode::Full, Precision::Bf16).unwrap().to_host().unwrap();
        let b = ntk::gram(dev, &tb, NtkMode::Full, Precision::Bf16).unwrap().to_host().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 storage: not bit-identical");
        let rb: Vec<f32> = jb.iter().map(|v| v.to_f32()).collect();
        let want_b = cpu::gram(&rb, None, n, n, o, p, NtkMode::Full).unwrap();
        common::assert_rel_l2("split-k bf16 storage", &f64s(&a), &want_b, 2e-3);
        for prec in [Precision::F32, Precision::Tf32, Precision::Bf16] {
            let plan = GramPlan::new(dev, &GramShape::symmetric(n, o, p, NtkMode::Full), prec).unwrap();
            assert!(plan.splits() > 1, "a deep, narrow Gram should split K");
            let a = ntk::gram(dev, &t, NtkMode::Full, prec).unwrap().to_host().unwrap();
            let b = ntk::gram(dev, &t, NtkMode::Full, prec).unwrap().to_host().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{prec:?}: not bit-identical");
            let want = cpu::gram(&j, None, n, n, o, p, NtkMode::Full).unwrap();
            let tol = if prec == Precision::Bf16 { 1e-2 } else { prec.rel_l2_bound() };
            common::assert_rel_l2(&format!("split-k {prec:?} p={p}"), &f64s(&a), &want, tol);
        }
    }
}

#[test]
fn gram_edge_cases_and_validation() {
    let dev = gpu_or_skip!("gram_edge_cases_and_validation");
    // Odd P (unaligned rows: scalar loads).
    let mut rng = Rng::new(5);
    let j = rng.normal_vec(3 * 2 * 7);
    let got = run_gram(dev, &j, None, [3, 3, 2, 7], NtkMode::Full, Precision::Bf16);
    let r = bf16_rounded(&j);
    common::assert_rel_l2("odd p", &got, &cpu::gram(&r, None, 3, 3, 2, 7, NtkMode::Full).unwrap(), 1e-5);

    let t = upload(dev, &j, &[3, 2, 7]);
    let mut plan = GramPlan::new(dev, &GramShape::symmetric(3, 2, 7, NtkMode::Full), Precision::F32).unwrap();
    let mut out = DeviceTensor::<f32>::zeros(dev, &[3, 3, 2, 2]).unwrap();
    let sentinel = vec![7.0f32; 36];
    out.copy_from_host(&sentinel).unwrap();
    let wrong = upload(dev, &j, &[3, 7, 2]);
    assert!(matches!(plan.run(&wrong, &mut out), Err(ntkv::Error::Shape { arg: "j1", .. })));
    assert!(matches!(plan.run_cross(&t, &t, &mut out), Err(ntkv::Error::InvalidArgument { arg: "j2", .. })));
    let mut bad_out = DeviceTensor::<f32>::zeros(dev, &[3, 3, 2]).unwrap();
    assert!(matches!(plan.run(&t, &mut bad_out), Err(ntkv::Error::Shape { arg: "out", .. })));
    // A view whose shape claims the right extent but is a window of another buffer works;
    // a view of the wrong length cannot be made.
    let big = upload(dev, &[j.clone(), j.clone()].concat(), &[84]);
    let window = ntkv::TensorView::new(big.slice().slice(42..84), &[3, 2, 7]).unwrap();
    let mut viewed = DeviceTensor::<f32>::zeros(dev, &[3, 3, 2, 2]).unwrap();
    plan.run(&window, &mut viewed).unwrap();
    assert!(ntkv::TensorView::new(big.slice().slice(0..41), &[3, 2, 7]).is_err());
    assert_eq!(out.to_host().unwrap(), sentinel, "a failed run must not write");
    let h = DeviceTensor::<half::f16>::zeros(dev, &[3, 2, 7]).unwrap();
    assert!(matches!(ntk::gram(dev, &h, NtkMode::Full, Precision::F32), Err(ntkv::Error::InvalidArgument { .. })));
    assert!(matches!(
        GramPlan::new(dev, &GramShape::symmetric(0, 1, 1, NtkMode::Full), Precision::F32),
        Err(ntkv::Error::InvalidArgument { arg: "n1", .. })
    ));
    assert!(matches!(
        GramPlan::new(dev, &GramShape::symmetric(1, 0, 1, NtkMode::Full), Precision::F32),
        Err(ntkv::Error::InvalidArgument { arg: "outputs", .. })
    ));
    plan.run(&t, &mut out).unwrap();
    assert_ne!(out.to_host().unwrap(), sentinel);
    assert_eq!(viewed.to_host().unwrap(), out.to_host().unwrap(), "a view runs like an owned tensor");
}

#[test]
fn factored_ntk_matches_reference_t1_and_t3() {
    let dev = gpu_or_skip!("factored_ntk_matches_reference_t1_and_t3");
    let mut rng = Rng::new(6);
    for &(t, n1, n2, o) in &[(1usize, 29usize, 17usize, 3usize), (3, 11, 6, 2)] {
        let dims = [(13usize, 21usize, true), (21, 5, false)];
        let mut host1 = Vec::new();
        let mut host2 = Vec::new();
        for &(din, dout, _) in &dims {
            host1.push((rng.normal_vec(n1 * t * din), rng.normal_vec(n1 * t * o * dout)));
            host2.push((rng.normal_vec(n2 * t * din), rng.normal_vec(n2 * t * o * dout)));
        }
        let dev_side = |h: &[(Vec<f32>, Vec<f32>)], n: usize| -> Vec<(DeviceTensor<f32>, DeviceTensor<f32>)> {
            h.iter()
                .zip(&dims)
                .map(|((a, g), &(din, dout, _))| (upload(dev, a, &[n, t, din]), upload(dev, g, &[n, t, o, dout])))
                .collect()
        };
        let d1 = dev_side(&host1, n1);
        let d2 = dev_side(&host2, n2);
        let l1: Vec<FactoredLayer<'_>> =
            d1.iter().zip(&dims).map(|((a, g), d)| FactoredLayer { a, g, bias: d.2 }).collect();
        let l2: Vec<FactoredLayer<'_>> =
            d2.iter().zip(&dims).map(|((a, g), d)| FactoredLayer { a, g, bias: d.2 }).collect();
        let (c1, c2) =
            (cpu::FactoredLayer::from_factors(&host1, &dims), cpu::FactoredLayer::from_factors(&host2, &dims));
        for mode in MODES {
            let want = cpu::factored_ntk(&c1, Some(&c2), n1, n2, t, o, mode).unwrap();
            let got = ntk::factored_ntk(dev, &l1, Some(&l2), mode, Precision::F32).unwrap();
            common::assert_rel_l2(&format!("factored t{t} {mode:?}"), &f64s(&got.to_host().unwrap()), &want, 1e-5);
            let want = cpu::factored_ntk(&c1, None, n1, n1, t, o, mode).unwrap();
            let got = ntk::factored_ntk(dev, &l1, None, mode, Precision::Tf32).unwrap();
            common::assert_rel_l2(
                &format!("factored sym tf32 t{t} {mode:?}"),
                &f64s(&got.to_host().unwrap()),
                &want,
                2e-3,
            );
        }
    }
}

fn random_mlp(rng: &mut Rng, widths: &[usize], act: Activation) -> cpu::Mlp {
    ntk_support::random_mlp(rng, widths, act, |l| l != 1)
}

#[test]
fn mlp_factors_and_empirical_ntk_match_explicit_jacobian() {
    let dev = gpu_or_skip!("mlp_factors_and_empirical_ntk_match_explicit_jacobian");
    let mut rng = Rng::new(7);
    for act in [Activation::Tanh, Activation::Gelu, Activation::Relu] {
        let host = random_mlp(&mut rng, &[13, 33, 19, 3], act);
        let mlp = ntk::Mlp::from_host(dev, &host).unwrap();
        let (n1, n2) = (23, 10);
        let x1 = rng.normal_vec(n1 * 13);
        let x2 = rng.normal_vec(n2 * 13);
        let (tx1, tx2) = (upload(dev, &x1, &[n1, 13]), upload(dev, &x2, &[n2, 13]));
        let pass = host.pass(&x1, n1).unwrap();
        let f = mlp.factors(&tx1).unwrap();
        common::assert_close("output", &f64s(&f.output.to_host().unwrap()), &pass.output, 1e-5, 1e-5);
        for l in 0..3 {
            common::assert_close("A_l", &f64s(&f.inputs[l].to_host().unwrap()), &pass.inputs[l], 1e-5, 1e-5);
            common::assert_close("G_l", &f64s(&f.cotangents[l].to_host().unwrap()), &pass.cotangents[l], 1e-5, 1e-5);
        }
        let j1: Vec<f32> = host.jacobian(&x1, n1).unwrap().iter().map(|&v| v as f32).collect();
        let j2: Vec<f32> = host.jacobian(&x2, n2).unwrap().iter().map(|&v| v as f32).collect();
        let p = host.param_count();
        for mode in MODES {
            let want = cpu::gram(&j1, Some(&j2), n1, n2, 3, p, mode).unwrap();
            let got = mlp.empirical_ntk(&tx1, Some(&tx2), mode, Precision::F32).unwrap();
            common::assert_rel_l2(&format!("eNTK {act:?} {mode:?}"), &f64s(&got.to_host().unwrap()), &want, 1e-5);
            // Same kernel from the explicit-Jacobian GPU path.
            let explicit = run_gram(dev, &j1, Some(&j2), [n1, n2, 3, p], mode, Precision::F32);
            common::assert_rel_l2(&format!("explicit {act:?} {mode:?}"), &explicit, &want, 1e-5);
            let want = cpu::gram(&j1, None, n1, n1, 3, p, mode).unwrap();
            let got = mlp.empirical_ntk(&tx1, None, mode, Precision::Tf32).unwrap();
            common::assert_rel_l2(
                &format!("eNTK sym tf32 {act:?} {mode:?}"),
                &f64s(&got.to_host().unwrap()),
                &want,
                2e-3,
            );
        }
    }
}

#[test]
fn mlp_linearized_matches_reference() {
    let dev = gpu_or_skip!("mlp_linearized_matches_reference");
    let mut rng = Rng::new(8);
    let host = random_mlp(&mut rng, &[9, 40, 17, 4], Activation::Gelu);
    let delta = random_mlp(&mut rng, &[9, 40, 17, 4], Activation::Gelu);
    let n = 19;
    let x = rng.normal_vec(n * 9);
    let want = host.linearized(&delta, &x, n).unwrap();
    let mlp = ntk::Mlp::from_host(dev, &host).unwrap();
    let d = ntk::Mlp::from_host(dev, &delta).unwrap();
    let got = mlp.linearized(&d, &upload(dev, &x, &[n, 9])).unwrap();
    assert_eq!(got.shape(), &[n, 4]);
    common::assert_close("f_lin", &f64s(&got.to_host().unwrap()), &want, 1e-4, 1e-5);
    let other = ntk::Mlp::from_host(dev, &random_mlp(&mut rng, &[9, 41, 17, 4], Activation::Gelu)).unwrap();
    assert!(matches!(mlp.linearized(&other, &upload(dev, &x, &[n, 9])), Err(ntkv::Error::Shape { .. })));
    assert!(matches!(mlp.linearized(&d, &upload(dev, &x, &[9, n])), Err(ntkv::Error::Shape { arg: "x", .. })));
}

#[test]
fn metrics_match_reference() {
    let dev = gpu_or_skip!("metrics_match_reference");
    let mut rng = Rng::new(9);
    let (n, p, c) = (77, 40, 5);
    let j = rng.normal_vec(n * p);
    let k = cpu::gram(&j, None, n, n, 1, p, NtkMode::Full).unwrap();
    let k32: Vec<f32> = k.iter().map(|&v| v as f32).collect();
    let k64 = f64s(&k32);
    let tk = upload(dev, &k32, &[n, n]);
    let s = metrics::stats(dev, &tk).unwrap();
    common::assert_close("trace", &[s.trace], &[cpu::trace(&k64, n).unwrap()], 1e-12, 1e-12);
    common::assert_close(
        "frob",
        &[metrics::frobenius_norm(dev, &tk).unwrap()],
        &[cpu::frobenius_norm(&k64, n).unwrap()],
        1e-12,
        0.0,
    );
    common::assert_close("mean", &[metrics::mean(dev, &tk).unwrap()], &[cpu::mean(&k64, n).unwrap()], 1e-10, 1e-12);
    let labels: Vec<u32> = (0..n).map(|_| rng.below(c) as u32).collect();
    common::assert_close(
        "lga",
        &[metrics::lga(dev, &tk, &labels).unwrap()],
        &[cpu::lga(&k64, n, &labels).unwrap()],
        1e-8,
        1e-10,
    );
    let mut y = vec![0.0f32; n * c];
    for (i, &l) in labels.iter().enumerate() {
        y[i * c + l as usize] = 1.0;
    }
    let ty = upload(dev, &y, &[n, c]);
    for centered in [false, true] {
        let got = metrics::alignment(dev, &tk, &ty, centered).unwrap();
        let want = cpu::alignment(&k64, n, &y, c, centered).unwrap();
        common::assert_close(&format!("alignment centered={centered}"), &[got], &[want], 1e-8, 1e-10);
    }
    // Dense (non one-hot) targets.
    let yr = rng.normal_vec(n * 3);
    let got = metrics::alignment(dev, &tk, &upload(dev, &yr, &[n, 3]), true).unwrap();
    common::assert_close("alignment dense", &[got], &[cpu::alignment(&k64, n, &yr, 3, true).unwrap()], 1e-5, 1e-8);
    // Eigenvalues, condition number, regression (host f64 after a copy).
    let ev = metrics::eigenvalues(dev, &tk).unwrap();
    common::assert_close("eig", &ev, &cpu::eigenvalues_symmetric(&k64, n).unwrap(), 1e-12, 1e-9);
    let cond = metrics::condition_number(dev, &tk).unwrap();
    assert!(!cond.is_nan());
    // The same host f64 computation as the reference, so the same bits (rank 40 < N = 77:
    // 37 eigenvalues are rounding noise of the f32 kernel).
    assert_eq!(cond.to_bits(), cpu::condition_number(&k64, n).unwrap().to_bits());
    let ytr: Vec<f32> = rng.normal_vec(n * 2);
    let pred = metrics::ntk_regression(dev, &tk, &tk, &ytr, 1e-3).unwrap();
    let want = cpu::ntk_regression(&k64, &k64, &f64s(&ytr), n, n, 2, 1e-3).unwrap();
    common::assert_close("regression", &pred, &want, 1e-9, 1e-9);
    // Non-PSD input: finite or ∞, never NaN.
    let mut neg = vec![0.0f32; 9];
    neg[0] = 1.0;
    neg[4] = -2.0;
    neg[8] = 3.0;
    assert_eq!(metrics::condition_number(dev, &upload(dev, &neg, &[3, 3])).unwrap(), f64::INFINITY);
    // A well-conditioned kernel has a finite condition number equal to the reference's.
    let spd: Vec<f32> = (0..9).map(|q| if q % 4 == 0 { 4.0 } else { 1.0 }).collect();
    let want = cpu::condition_number(&f64s(&spd), 3).unwrap();
    assert!(want.is_finite());
    common::assert_close(
        "cond",
        &[metrics::condition_number(dev, &upload(dev, &spd, &[3, 3])).unwrap()],
        &[want],
        1e-12,
        0.0,
    );
    assert!(matches!(metrics::trace(dev, &upload(dev, &k32[..n * 3], &[n, 3])), Err(ntkv::Error::Shape { .. })));
    assert!(matches!(metrics::lga(dev, &tk, &labels[1..]), Err(ntkv::Error::Shape { arg: "labels", .. })));
}
