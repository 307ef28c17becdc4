//! The gemm module's CPU references and shape validation: hand cases, every transposition of
//! A, B and C against one dense product, batches with padded strides, the symmetric case, and
//! the bit-exact split order against the f64 product.

use ntkv::gemm::{cpu, GemmShape, Operand};
use ntkv::rng::Rng;
use proptest::prelude::*;

/// A dense `[rows, cols]` matrix stored as `op` describes (`transposed` stores `[cols, rows]`),
/// padded to the operand's leading dimension and batch stride, padding NaN.
fn store(op: &Operand, rows: usize, cols: usize, batches: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; len];
    for (z, m) in batches.iter().enumerate() {
        for r in 0..rows {
            for c in 0..cols {
                let off = if op.transposed { c * op.ld + r } else { r * op.ld + c };
                out[z * op.batch_stride + off] = m[r * cols + c];
            }
        }
    }
    out
}

fn dense_product(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    (0..m * n).map(|q| (0..k).map(|p| f64::from(a[q / n * k + p]) * f64::from(b[p * n + q % n])).sum()).collect()
}

#[test]
fn hand_case() {
    // [[1, 2], [3, 4]] · [[5, 6], [7, 8]] = [[19, 22], [43, 50]].
    let shape = GemmShape {
        batch: 1,
        m: 2,
        n: 2,
        k: 2,
        a: Operand::row_major(2),
        b: Operand::row_major(2),
        c: Operand::row_major(2),
        symmetric: false,
    };
    let mut c = vec![0.0; 4];
    cpu::gemm(&shape, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], &mut c).unwrap();
    assert_eq!(c, vec![19.0, 22.0, 43.0, 50.0]);
    let mut c32 = vec![0.0f32; 4];
    cpu::gemm_f32_ordered(&shape, 32, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], &mut c32).unwrap();
    assert_eq!(c32, vec![19.0, 22.0, 43.0, 50.0]);
}

#[test]
fn every_transposition_and_padded_batches_agree_with_one_dense_product() {
    let mut rng = Rng::new(41);
    let (batch, m, n, k) = (3, 7, 5, 11);
    let da: Vec<Vec<f32>> = (0..batch).map(|_| rng.normal_vec(m * k)).collect();
    let db: Vec<Vec<f32>> = (0..batch).map(|_| rng.normal_vec(k * n)).collect();
    for bits in 0..8u32 {
        let (ta, tb, tc) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        let op = |t: bool, rows: usize, cols: usize| {
            let (r, c) = if t { (cols, rows) } else { (rows, cols) };
            Operand { transposed: t, ld: c + 2, batch_stride: r * (c + 2) + 3 }
        };
        let shape = GemmShape { batch, m, n, k, a: op(ta, m, k), b: op(tb, k, n), c: op(tc, m, n), symmetric: false };
        let e = shape.extents().unwrap();
        let a = store(&shape.a, m, k, &da, e.a);
        let b = store(&shape.b, k, n, &db, e.b);
        let mut c = vec![f64::NAN; e.c + 4];
        cpu::gemm(&shape, &a, &b, &mut c).unwrap();
        let mut c32 = vec![f32::NAN; e.c];
        cpu::gemm_f32_ordered(&shape, 32, &a, &b, &mut c32).unwrap();
        for z in 0..batch {
            let want = dense_product(&da[z], &db[z], m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let off = z * shape.c.batch_stride + if tc { j * shape.c.ld + i } else { i * shape.c.ld + j };
                    let w = want[i * n + j];
                    assert!((c[off] - w).abs() < 1e-12 * (1.0 + w.abs()), "bits {bits}: {} vs {w}", c[off]);
                    assert!((f64::from(c32[off]) - w).abs() < 1e-5 * (1.0 + w.abs()));
                }
            }
        }
        // Gaps of the strided C are never written.
        let written = batch * m * n;
        assert_eq!(c.iter().filter(|v| !v.is_nan()).count(), written, "bits {bits}");
    }
}

#[test]
fn symmetric_gram_of_a_tall_matrix() {
    let mut rng = Rng::new(43);
    let (t, r) = (40, 6);
    let a = rng.normal_vec(t * r);
    // AᵀA: A [t, r] stored row-major is the transposed operand of an [r, t] left factor.
    let op = Operand::transposed(r);
    let shape =
        GemmShape { batch: 1, m: r, n: r, k: t, a: op, b: op.flipped(), c: Operand::row_major(r), symmetric: true };
    let mut c = vec![0.0; r * r];
    cpu::gemm(&shape, &a, &[], &mut c).unwrap();
    for i in 0..r {
        for j in 0..r {
            let w: f64 = (0..t).map(|q| f64::from(a[q * r + i]) * f64::from(a[q * r + j])).sum();
            assert!((c[i * r + j] - w).abs() < 1e-12 * (1.0 + w.abs()));
            assert_eq!(c[i * r + j], c[j * r + i]);
        }
    }
}

#[test]
fn ordered_f32_is_the_split_sum_of_fma_chains() {
    let mut rng = Rng::new(47);
    let k = 100;
    let a = rng.normal_vec(k);
    let b = rng.normal_vec(k);
    let shape = GemmShape {
        batch: 1,
        m: 1,
        n: 1,
        k,
        a: Operand::row_major(k),
        b: Operand::transposed(k),
        c: Operand::row_major(1),
        symmetric: false,
    };
    for chunk in [32usize, 64, 96, 128] {
        let mut want = 0.0f32;
        for lo in (0..k).step_by(chunk) {
            let mut acc = 0.0f32;
            for q in lo..(lo + chunk).min(k) {
                acc = a[q].mul_add(b[q], acc);
            }
            want += acc;
        }
        let mut c = [0.0f32];
        cpu::gemm_f32_ordered(&shape, chunk, &a, &b, &mut c).unwrap();
        assert_eq!(c[0].to_bits(), want.to_bits(), "k_chunk {chunk}");
    }
    let mut c = [0.0f32];
    assert!(cpu::gemm_f32_ordered(&shape, 0, &a, &b, &mut c).is_err());
}

#[test]
fn k_zero_gives_zeros() {
    let shape = GemmShape {
        batch: 2,
        m: 3,
        n: 2,
        k: 0,
        a: Operand::row_major(0),
        b: Operand::row_major(2),
        c: Operand::row_major(2).batch_stride(6),
        symmetric: false,
    };
    let e = shape.extents().unwrap();
    assert_eq!((e.a, e.b, e.c), (0, 0, 12));
    let mut c = vec![7.0; 12];
    cpu::gemm(&shape, &[], &[], &mut c).unwrap();
    assert!(c.iter().all(|&v| v == 0.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn ordered_f32_stays_near_f64(m in 1usize..6, n in 1usize..6, k in 0usize..70, chunk in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let shape = GemmShape {
            batch: 1, m, n, k,
            a: Operand::row_major(k), b: Operand::row_major(n), c: Operand::row_major(n), symmetric: false,
        };
        let e = shape.extents().unwrap();
        let a = rng.normal_vec(e.a);
        let b = rng.normal_vec(e.b);
        let mut c64 = vec![0.0; e.c];
        let mut c32 = vec![0.0f32; e.c];
        cpu::gemm(&shape, &a, &b, &mut c64).unwrap();
        cpu::gemm_f32_ordered(&shape, chunk * 32, &a, &b, &mut c32).unwrap();
        let scale: f64 = (0..k).map(|_| 1.0).sum::<f64>().max(1.0);
        for (x, w) in c32.iter().zip(&c64) {
            prop_assert!((f64::from(*x) - w).abs() <= 1e-5 * scale);
        }
    }
}
