//! Differential tests of the gemm module on the GPU: every transposition of A, B and C with
//! padded batch strides, the k-means and randomized-SVD shapes, the symmetric Gram, every
//! precision and storage type, the F32 result bit for bit against the CPU's split order, and
//! run-to-run bit identity.

mod common;
mod ntk_support;

use half::bf16;
use ntk_support::{bf16_rounded, f64s};
use ntkv::gemm::{cpu, GemmPlan, GemmShape, Operand, Precision};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

/// Runs `shape` on random data at every precision (f32 storage, and bf16 storage for the
/// tensor-core paths) and checks it against the references; returns nothing, panics on a miss.
fn check_shape(dev: &Device, shape: &GemmShape, rng: &mut Rng, what: &str) {
    let e = shape.extents().unwrap();
    let a = rng.normal_vec(e.a);
    let b = rng.normal_vec(e.b.max(1));
    let ta = DeviceTensor::from_host(dev, &a, &[a.len()]).unwrap();
    let tb = DeviceTensor::from_host(dev, &b, &[b.len()]).unwrap();
    let sentinel = vec![f32::from_bits(0x7fc0_1234); e.c];
    let mut want = vec![f64::NAN; e.c];
    cpu::gemm(shape, &a, &b, &mut want).unwrap();
    for precision in Precision::ALL {
        let mut plan = GemmPlan::new(dev, shape, precision).unwrap();
        let mut c = DeviceTensor::from_host(dev, &sentinel, &[e.c]).unwrap();
        let run = |plan: &mut GemmPlan, c: &mut DeviceTensor<f32>| {
            if shape.symmetric {
                plan.run_symmetric(&ta, c).unwrap()
            } else {
                plan.run(&ta, &tb, c).unwrap()
            }
        };
        run(&mut plan, &mut c);
        let got = c.to_host().unwrap();
        // Gaps of a strided C keep their sentinel; the described elements are all written.
        let described: Vec<usize> = (0..e.c).filter(|&i| !want[i].is_nan()).collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if w.is_nan() {
                assert_eq!(g.to_bits(), sentinel[i].to_bits(), "{what} {precision:?}: c[{i}] written");
            }
        }
        let pick = |v: &[f64]| described.iter().map(|&i| v[i]).collect::<Vec<f64>>();
        let tol = if precision == Precision::Bf16 { 1e-2 } else { precision.rel_l2_bound() };
        common::assert_rel_l2(&format!("{what} {precision:?}"), &pick(&f64s(&got)), &pick(&want), tol);
        if precision == Precision::F32 {
            // Exact FMA in the documented split order: the same bits as the CPU.
            let mut exact = sentinel.clone();
            cpu::gemm_f32_ordered(shape, plan.k_chunk(), &a, &b, &mut exact).unwrap();
            for &i in &described {
                assert_eq!(got[i].to_bits(), exact[i].to_bits(), "{what}: c[{i}] {} vs {}", got[i], exact[i]);
            }
        }
        // Run to run: bit-identical.
        let mut again = DeviceTensor::from_host(dev, &sentinel, &[e.c]).unwrap();
        run(&mut plan, &mut again);
        let again = again.to_host().unwrap();
        assert!(
            got.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what} {precision:?}: not bit-identical"
        );
    }
    // bf16 storage against the reference on the same bf16 values.
    let (ra, rb) = (bf16_rounded(&a), bf16_rounded(&b));
    let ha: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
    let hb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
    let (tha, thb) = (
        DeviceTensor::from_host(dev, &ha, &[ha.len()]).unwrap(),
        DeviceTensor::from_host(dev, &hb, &[hb.len()]).unwrap(),
    );
    let mut want_b = vec![f64::NAN; e.c];
    cpu::gemm(shape, &ra, &rb, &mut want_b).unwrap();
    let described: Vec<usize> = (0..e.c).filter(|&i| !want_b[i].is_nan()).collect();
    for precision in Precision::ALL {
        let mut plan = GemmPlan::new(dev, shape, precision).unwrap();
        let mut c = DeviceTensor::from_host(dev, &sentinel, &[e.c]).unwrap();
        if shape.symmetric {
            plan.run_symmetric(&tha, &mut c).unwrap();
        } else {
            plan.run(&tha, &thb, &mut c).unwrap();
        }
        let got = f64s(&c.to_host().unwrap());
        let pick = |v: &[f64]| described.iter().map(|&i| v[i]).collect::<Vec<f64>>();
        let tol = if precision == Precision::F32 { 1e-5 } else { 2e-3 };
        common::assert_rel_l2(&format!("{what} bf16 storage {precision:?}"), &pick(&got), &pick(&want_b), tol);
    }
}

fn op(transposed: bool, rows: usize, cols: usize, pad: usize) -> Operand {
    let (r, c) = if transposed { (cols, rows) } else { (rows, cols) };
    Operand { transposed, ld: c + pad, batch_stride: r * (c + pad) + pad }
}

#[test]
fn every_transposition_with_padded_batches() {
    let dev = gpu_or_skip!("every_transposition_with_padded_batches");
    let mut rng = Rng::new(51);
    for &(batch, m, n, k, pad) in
        &[(3usize, 37usize, 53usize, 301usize, 3usize), (2, 130, 9, 64, 0), (1, 5, 140, 1000, 1)]
    {
        for bits in 0..8u32 {
            let (ta, tb, tc) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let shape = GemmShape {
                batch,
                m,
                n,
                k,
                a: op(ta, m, k, pad),
                b: op(tb, k, n, pad),
                c: op(tc, m, n, pad),
                symmetric: false,
            };
            check_shape(dev, &shape, &mut rng, &format!("b{batch} {m}x{n}x{k} ta={ta} tb={tb} tc={tc}"));
        }
    }
}

#[test]
fn kmeans_and_randomized_svd_shapes() {
    let dev = gpu_or_skip!("kmeans_and_randomized_svd_shapes");
    let mut rng = Rng::new(53);
    // k-means scores: keys [H, T, D] × centroidsᵀ [H, C, D] → [H, T, C].
    let (h, t, d, c) = (4, 300, 128, 20);
    let kmeans = GemmShape {
        batch: h,
        m: t,
        n: c,
        k: d,
        a: Operand::row_major(d).batch_stride(t * d),
        b: Operand::transposed(d).batch_stride(c * d),
        c: Operand::row_major(c).batch_stride(t * c),
        symmetric: false,
    };
    check_shape(dev, &kmeans, &mut rng, "k-means");
    // Randomized SVD: A [T, n] · Ω [n, r], Aᵀ · Y [T, r], and the Gram AᵀA.
    let (tt, nn, r) = (2000, 96, 12);
    let sketch = GemmShape {
        batch: 1,
        m: tt,
        n: r,
        k: nn,
        a: Operand::row_major(nn),
        b: Operand::row_major(r),
        c: Operand::row_major(r),
        symmetric: false,
    };
    check_shape(dev, &sketch, &mut rng, "A·Ω");
    let project = GemmShape {
        batch: 1,
        m: nn,
        n: r,
        k: tt,
        a: Operand::transposed(nn),
        b: Operand::row_major(r),
        c: Operand::row_major(r),
        symmetric: false,
    };
    check_shape(dev, &project, &mut rng, "Aᵀ·Y");
    let a = Operand::transposed(nn);
    let gram =
        GemmShape { batch: 1, m: nn, n: nn, k: tt, a, b: a.flipped(), c: Operand::row_major(nn), symmetric: true };
    check_shape(dev, &gram, &mut rng, "AᵀA");
    // A symmetric Gram over several tiles: exactly symmetric.
    let a = Operand::row_major(77);
    let big = GemmShape {
        batch: 2,
        m: 300,
        n: 300,
        k: 77,
        a: a.batch_stride(300 * 77),
        b: a.flipped().batch_stride(300 * 77),
        c: Operand::row_major(300).batch_stride(90_000),
        symmetric: true,
    };
    check_shape(dev, &big, &mut rng, "A·Aᵀ 300");
    let x = DeviceTensor::from_host(dev, &rng.normal_vec(2 * 300 * 77), &[2, 300, 77]).unwrap();
    let mut out = DeviceTensor::<f32>::zeros(dev, &[2, 300, 300]).unwrap();
    GemmPlan::new(dev, &big, Precision::Tf32).unwrap().run_symmetric(&x, &mut out).unwrap();
    let o = out.to_host().unwrap();
    for z in 0..2 {
        for i in 0..300 {
            for j in 0..300 {
                assert_eq!(o[z * 90_000 + i * 300 + j].to_bits(), o[z * 90_000 + j * 300 + i].to_bits());
            }
        }
    }
}

#[test]
fn deep_split_k_is_deterministic_and_bit_exact() {
    let dev = gpu_or_skip!("deep_split_k_is_deterministic_and_bit_exact");
    let mut rng = Rng::new(55);
    let k = 200_003;
    let shape = GemmShape {
        batch: 1,
        m: 21,
        n: 19,
        k,
        a: Operand::row_major(k),
        b: Operand::row_major(19),
        c: Operand::row_major(19),
        symmetric: false,
    };
    assert!(GemmPlan::new(dev, &shape, Precision::F32).unwrap().splits() > 1, "a deep, narrow GEMM should split K");
    check_shape(dev, &shape, &mut rng, "deep k, strided B");
}

#[test]
fn validation_and_devices() {
    let dev = gpu_or_skip!("validation_and_devices");
    let shape = GemmShape {
        batch: 1,
        m: 4,
        n: 4,
        k: 8,
        a: Operand::row_major(8),
        b: Operand::row_major(4),
        c: Operand::row_major(4),
        symmetric: false,
    };
    let mut plan = GemmPlan::new(dev, &shape, Precision::F32).unwrap();
    let a = DeviceTensor::<f32>::zeros(dev, &[32]).unwrap();
    let short = DeviceTensor::<f32>::zeros(dev, &[31]).unwrap();
    let mut c = DeviceTensor::from_host(dev, &[5.0f32; 16], &[16]).unwrap();
    assert!(matches!(plan.run(&short, &a, &mut c), Err(ntkv::Error::Shape { arg: "a", .. })));
    assert!(matches!(plan.run(&a, &short, &mut c), Err(ntkv::Error::Shape { arg: "b", .. })));
    let mut short_c = DeviceTensor::<f32>::zeros(dev, &[15]).unwrap();
    assert!(matches!(plan.run(&a, &a, &mut short_c), Err(ntkv::Error::Shape { arg: "c", .. })));
    assert!(matches!(plan.run_symmetric(&a, &mut c), Err(ntkv::Error::InvalidArgument { .. })));
    let h = DeviceTensor::<half::f16>::zeros(dev, &[32]).unwrap();
    assert!(matches!(plan.run(&h, &h, &mut c), Err(ntkv::Error::InvalidArgument { .. })));
    assert_eq!(c.to_host().unwrap(), vec![5.0; 16], "a failed run must not write");
    plan.run(&a, &a, &mut c).unwrap();
    assert_eq!(c.to_host().unwrap(), vec![0.0; 16]);
}
