//! The lowrank CPU references: the dense linear algebra, the factorization quality bar
//! (within 1% of the optimal rank-r error on fast-decay, slow-decay and key-like spectra, at
//! reduced size), determinism, RoPE properties, layouts, and the whole ShadowKV step.

mod lowrank_support;

use half::bf16;
use lowrank_support::{random_lists, rel_l2, to_storage, widen, with_spectrum, Spectrum};
use ntkv::decode::{DecodeOptions, DecodeShape};
use ntkv::lowrank::{cpu, FactorOptions, FactorShape, KeyLayout, ReconstructShape, RopeOptions};
use ntkv::rng::Rng;

#[test]
fn sym_eigen_reconstructs_and_orders() {
    let mut rng = Rng::new(1);
    let n = 23;
    let x: Vec<f64> = rng.normal_vec(n * n).into_iter().map(f64::from).collect();
    let m = cpu::matmul(&x, true, &x, n, n, n);
    let (vals, vecs) = cpu::sym_eigen(&m, n);
    assert!(vals.windows(2).all(|w| w[0] >= w[1]), "not descending: {vals:?}");
    let mut err: f64 = 0.0;
    for i in 0..n {
        for j in 0..n {
            let r: f64 = (0..n).map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k]).sum();
            err = err.max((r - m[i * n + j]).abs());
        }
    }
    assert!(err < 1e-9 * vals[0], "V diag(λ) Vᵀ differs from M by {err}");
    for k in 0..n {
        let big = (0..n).map(|i| vecs[i * n + k]).fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
        assert!(big > 0.0, "eigenvector {k} is not signed by its largest entry");
    }
}

#[test]
fn householder_and_cholesky_qr_agree() {
    let mut rng = Rng::new(2);
    let (m, n) = (57, 9);
    let y: Vec<f64> = rng.normal_vec(m * n).into_iter().map(f64::from).collect();
    let q = cpu::householder_q(&y, m, n);
    let qtq = cpu::matmul(&q, true, &q, n, m, n);
    for i in 0..n {
        for j in 0..n {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((qtq[i * n + j] - want).abs() < 1e-12, "QᵀQ[{i},{j}] = {}", qtq[i * n + j]);
        }
    }
    let g = cpu::matmul(&y, true, &y, n, m, n);
    let r = cpu::cholesky_upper(&g, n).expect("a Gaussian Gram is well conditioned");
    let q2 = cpu::matmul(&y, false, &cpu::upper_inverse(&r, n), m, n, n);
    // The same column space: |Q1ᵀ Q2| is orthogonal with columns of matching sign up to ±1.
    let c = cpu::matmul(&q, true, &q2, n, m, n);
    for i in 0..n {
        assert!((c[i * n + i].abs() - 1.0).abs() < 1e-9, "column {i}: {}", c[i * n + i]);
    }
    // An ill-conditioned Gram falls back.
    let mut bad = y.clone();
    for i in 0..m {
        bad[i * n + 1] = bad[i * n] * (1.0 + 1e-7);
    }
    let gb = cpu::matmul(&bad, true, &bad, n, m, n);
    assert!(cpu::cholesky_upper(&gb, n).is_none());
}

fn quality(spectrum: Spectrum, m: usize, hkv: usize, d: usize, r: usize, seed: u64) -> f64 {
    let n = hkv * d;
    let mut rng = Rng::new(seed);
    let a = with_spectrum(&mut rng, m, n, spectrum);
    let k: Vec<f32> = to_storage(&a);
    let a32 = widen(&k);
    let shape = FactorShape { batch: 1, capacity: m, kv_heads: hkv, head_dim: d, rank: r };
    let f = cpu::factorize(&shape, &FactorOptions::default(), &[m as u32], &k).unwrap();
    let err = cpu::residual(&a32, &f.u, &f.sv, m, n, r);
    let opt = cpu::optimal_error(&a32, m, n, r);
    let ratio = err / opt;
    println!("{spectrum:?} {m}x{n} rank {r}: error {err:.6e}, optimal {opt:.6e}, ratio {ratio:.5}");
    ratio
}

/// Within 1% of the optimal rank-`r` error: (spectrum, T, Hkv, D, ranks, seed).
#[test]
fn quality_near_optimal() {
    let cases: [(Spectrum, usize, usize, usize, [usize; 3], u64); 3] = [
        (Spectrum::Fast, 203, 2, 48, [1, 7, 16], 10),
        (Spectrum::Slow, 203, 2, 48, [1, 7, 24], 11),
        (Spectrum::KeyLike, 250, 3, 32, [7, 16, 40], 12),
    ];
    for (spectrum, m, hkv, d, ranks, seed) in cases {
        for r in ranks {
            assert!(quality(spectrum, m, hkv, d, r, seed) <= 1.01, "{spectrum:?} rank {r}");
        }
    }
}

#[test]
fn factorization_is_deterministic_batched_and_shaped() {
    let (t, hkv, d, r) = (90, 2, 16, 5);
    let n = hkv * d;
    let mut rng = Rng::new(3);
    let mut k = Vec::new();
    for _ in 0..2 {
        k.extend(to_storage::<bf16>(&with_spectrum(&mut rng, t, n, Spectrum::KeyLike)));
    }
    let shape = FactorShape { batch: 2, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let lens = [90u32, 61];
    let f1 = cpu::factorize(&shape, &FactorOptions::default(), &lens, &k).unwrap();
    let f2 = cpu::factorize(&shape, &FactorOptions::default(), &lens, &k).unwrap();
    assert_eq!(
        f1.u.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        f2.u.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(f1.sv, f2.sv);
    // Rows past a sequence's length are zero, and the second sequence only sees its rows.
    assert!(f1.u[(t + 61) * r..2 * t * r].iter().all(|&x| x == 0.0));
    let a1: Vec<f64> = widen(&k[t * n..(t + 61) * n]);
    let err = cpu::residual(&a1, &f1.u[t * r..(t + 61) * r], &f1.sv[r * n..], 61, n, r);
    let opt = cpu::optimal_error(&a1, 61, n, r);
    assert!(err <= 1.01 * opt, "sequence 1: {err} vs optimal {opt}");
    // Singular values descend and match the exact ones.
    let exact = cpu::singular_values(&a1, 61, n);
    for i in 0..r {
        let s = f1.singular_values[r + i];
        assert!((s - exact[i]).abs() <= 1e-6 * exact[0], "σ{i}: {s} vs {}", exact[i]);
    }
    // Another seed gives another sketch.
    let other = FactorOptions { seed: 7, ..FactorOptions::default() };
    assert_ne!(cpu::sketch(other.seed, n, 8), cpu::sketch(FactorOptions::default().seed, n, 8));
}

#[test]
fn rope_rotation_properties() {
    let inv = cpu::rope_inv_freq(128, 10000.0);
    assert_eq!(inv[0], 1.0);
    assert!(inv.windows(2).all(|w| w[1] < w[0]));
    let mut rng = Rng::new(4);
    let x: Vec<f64> = rng.normal_vec(128).into_iter().map(f64::from).collect();
    let mut at0 = x.clone();
    cpu::rope_row(&mut at0, 0, &inv);
    assert_eq!(at0, x, "position 0 is the identity");
    for pos in [1u32, 1000, (1 << 20) - 3, 1 << 20] {
        let mut y = x.clone();
        cpu::rope_row(&mut y, pos, &inv);
        for i in 0..64 {
            let a = x[i] * x[i] + x[i + 64] * x[i + 64];
            let b = y[i] * y[i] + y[i + 64] * y[i + 64];
            assert!((a - b).abs() < 1e-12 * a.max(1.0), "pair {i} at {pos} changed norm");
        }
        // The angle is the f32 product: pair 0 turns by exactly (f32)pos radians.
        let ang = f64::from(pos as f32 * inv[0]);
        assert!((y[0] - (x[0] * ang.cos() - x[64] * ang.sin())).abs() < 1e-12);
    }
}

#[test]
fn reconstruct_matches_the_definition_and_layouts() {
    let shape = ReconstructShape { batch: 2, capacity: 77, kv_heads: 3, head_dim: 64, rank: 7 };
    let mut rng = Rng::new(5);
    let u: Vec<f32> = rng.normal_vec(2 * 77 * 7);
    let sv: Vec<f32> = rng.normal_vec(2 * 7 * 3 * 64);
    let lens = [77u32, 40];
    let (indptr, indices) = random_lists(&mut rng, &lens, 3, 30, false, &[0]);
    let rows = cpu::reconstruct(&shape, &RopeOptions::default(), &lens, &u, &sv, &indptr, &indices).unwrap();
    let inv = cpu::rope_inv_freq(64, 10000.0);
    for l in 0..6 {
        let (b, h) = (l / 3, l % 3);
        for j in indptr[l] as usize..indptr[l + 1] as usize {
            let pos = indices[j] as usize;
            let mut want: Vec<f64> = (0..64)
                .map(|c| {
                    (0..7)
                        .map(|q| f64::from(u[(b * 77 + pos) * 7 + q]) * f64::from(sv[(b * 7 + q) * 192 + h * 64 + c]))
                        .sum()
                })
                .collect();
            cpu::rope_row(&mut want, pos as u32, &inv);
            assert_eq!(&rows[j * 64..(j + 1) * 64], &want[..]);
        }
    }
    let budget = 31;
    let g = cpu::place_rows(&rows, 64, &indptr, KeyLayout::Gathered { budget }, f64::NAN).unwrap();
    for l in 0..6 {
        let len = (indptr[l + 1] - indptr[l]) as usize;
        for j in 0..budget {
            let row = &g[(l * budget + j) * 64..][..64];
            if j < len {
                assert_eq!(row, &rows[(indptr[l] as usize + j) * 64..][..64]);
            } else {
                assert!(row.iter().all(|x| x.is_nan()));
            }
        }
    }
    assert_eq!(cpu::decode_indices(&[0, 2, 2, 5]), vec![0, 1, 0, 1, 2]);
}

#[test]
fn shadowkv_step_equals_decode_over_the_full_post_rope_cache() {
    // The step (gather, then decode over 0..len of the gathered caches) must equal decode
    // over a full cache of every reconstructed key with the original positions as lists.
    let (b, hkv, hq, d, r, t) = (2, 2, 4, 64, 9, 50);
    let shape = ReconstructShape { batch: b, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let mut rng = Rng::new(6);
    let u: Vec<bf16> = to_storage(&rng.normal_vec(b * t * r).into_iter().map(f64::from).collect::<Vec<_>>());
    let sv: Vec<bf16> =
        to_storage(&rng.normal_vec(b * r * hkv * d).into_iter().map(|x| f64::from(x) * 0.3).collect::<Vec<_>>());
    let v: Vec<bf16> = to_storage(&rng.normal_vec(b * hkv * t * d).into_iter().map(f64::from).collect::<Vec<_>>());
    let q: Vec<bf16> = to_storage(&rng.normal_vec(b * hq * d).into_iter().map(f64::from).collect::<Vec<_>>());
    let lens = [50u32, 33];
    let (indptr, indices) = random_lists(&mut rng, &lens, hkv, 20, true, &[0]);
    let dshape = DecodeShape { batch: b, q_tokens: 1, hq, hkv, head_dim: d, capacity: t };
    let opts = DecodeOptions::default();
    let x = cpu::StepInputs { q: &q, u: &u, sv: &sv, v: &v, seq_lens: &lens, indptr: &indptr, indices: &indices };
    let (o, lse) = cpu::shadowkv_step(&shape, &RopeOptions::default(), &dshape, &opts, 24, &x).unwrap();

    // Full cache: every position of every head reconstructed, rounded to bf16.
    let all_indptr: Vec<u32> = (0..=b * hkv).map(|l| (l * t) as u32).collect();
    let all_idx: Vec<u32> = (0..b * hkv).flat_map(|_| 0..t as u32).collect();
    let full_lens = [t as u32; 2];
    let full = cpu::reconstruct(&shape, &RopeOptions::default(), &full_lens, &u, &sv, &all_indptr, &all_idx).unwrap();
    let k_full: Vec<bf16> = full.iter().map(|&y| bf16::from_f32(y as f32)).collect();
    let want = ntkv::decode::cpu::sparse_decode(&dshape, &opts, &q, &k_full, &v, &lens, &indptr, &indices).unwrap();
    assert!(rel_l2(&o, &want.o) < 1e-12, "o differs: {}", rel_l2(&o, &want.o));
    assert!(rel_l2(&lse, &want.lse) < 1e-12);
}
