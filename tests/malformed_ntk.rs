//! Malformed inputs thrown at the NTK and GEMM validators and CPU references: every one gives a
//! typed error and none panics (each call runs under `catch_unwind`). Also the exact
//! boundaries (at, one below, one above) of every validator limit, the singular-kernel
//! condition-number rule and the overflow scaling of the eigenvalue solver.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ntkv::gemm::{self, cpu as gcpu, GemmShape, Operand};
use ntkv::ntk::{cpu, Activation, GramShape, NtkMode, MAX_OUTPUT};
use ntkv::Error;

/// Runs `f`, failing the test on a panic, and returns its result.
fn no_panic<T>(what: &str, f: impl FnOnce() -> ntkv::Result<T>) -> ntkv::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("{what} panicked"),
    }
}

fn is_err<T>(what: &str, f: impl FnOnce() -> ntkv::Result<T>) -> Error {
    match no_panic(what, f) {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => e,
    }
}

const BIG: usize = usize::MAX;

#[test]
fn cpu_gram_with_absurd_sizes() {
    let j = [1.0f32; 4];
    for mode in NtkMode::ALL {
        for (n1, n2, o, p) in
            [(BIG, 1, 1, 1), (1, BIG, 1, 1), (2, 2, BIG, 2), (1 << 33, 1 << 33, 1, 0), (BIG, BIG, BIG, BIG)]
        {
            let e = is_err("gram", || cpu::gram(&j, Some(&j), n1, n2, o, p, mode));
            assert!(matches!(e, Error::TooLarge { .. } | Error::Shape { .. }), "{mode:?} {e}");
            is_err("gram sym", || cpu::gram(&j, None, n1, n1, o, p, mode));
        }
        // Empty J with a huge output: refused, not an allocation abort.
        let e = is_err("gram empty", || cpu::gram(&[], None, 1 << 40, 1 << 40, 1, 0, mode));
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }
}

#[test]
fn cpu_factored_and_mlp_with_absurd_sizes() {
    let a = [1.0f32; 4];
    let layer = cpu::FactoredLayer { a: &a, g: &a, d_in: BIG, d_out: 2, bias: true };
    for mode in NtkMode::ALL {
        is_err("factored", || cpu::factored_ntk(std::slice::from_ref(&layer), None, 2, 2, 1, 1, mode));
        is_err("factored t", || cpu::factored_ntk(std::slice::from_ref(&layer), None, 2, 2, BIG, 1, mode));
        let l2 = cpu::FactoredLayer { d_in: 3, ..layer.clone() };
        is_err("factored widths", || {
            cpu::factored_ntk(std::slice::from_ref(&l2), Some(std::slice::from_ref(&layer)), 2, 2, 1, 1, mode)
        });
    }
    let mlp = cpu::Mlp {
        widths: vec![BIG, 2],
        weights: vec![vec![0.0; 2]],
        biases: vec![None],
        activation: Activation::Relu,
    };
    assert!(matches!(is_err("validate", || mlp.validate()), Error::TooLarge { .. } | Error::Shape { .. }));
    let ok =
        cpu::Mlp { widths: vec![1, 2], weights: vec![vec![0.5; 2]], biases: vec![None], activation: Activation::Tanh };
    is_err("pass", || ok.pass(&[1.0], BIG));
    is_err("jacobian", || ok.jacobian(&[1.0], BIG));
    is_err("linearized", || ok.linearized(&mlp, &[1.0], 1));
    let empty = cpu::Mlp { widths: vec![3], weights: vec![], biases: vec![], activation: Activation::Gelu };
    is_err("one width", || empty.validate());
}

#[test]
fn cpu_metrics_with_absurd_sizes() {
    let k = [1.0f64; 4];
    is_err("trace", || cpu::trace(&k, BIG));
    is_err("frob", || cpu::frobenius_norm(&k, 1 << 33));
    is_err("mean", || cpu::mean(&k, 0));
    is_err("lga", || cpu::lga(&k, BIG, &[0, 1]));
    is_err("lga labels", || cpu::lga(&k, 2, &[0]));
    is_err("alignment", || cpu::alignment(&k, 2, &[1.0; 4], BIG, false));
    is_err("eig", || cpu::eigenvalues_symmetric(&k, BIG));
    is_err("cond", || cpu::condition_number(&k, 3));
    is_err("cholesky", || cpu::cholesky(&k, BIG, "a"));
    is_err("cholesky shape", || cpu::cholesky(&k, 3, "a"));
    is_err("regression m", || cpu::ntk_regression(&k, &k, &[1.0, 1.0], 2, BIG, 1, 0.0));
    is_err("regression c", || cpu::ntk_regression(&k, &k, &[1.0, 1.0], 2, 2, BIG, 0.0));
    is_err("regression reg", || cpu::ntk_regression(&[1.0, 0.0, 0.0, 1.0], &k, &[1.0, 1.0], 2, 2, 1, f64::NAN));
    let e = is_err("eig nan", || cpu::eigenvalues_symmetric(&[1.0, f64::NAN, f64::NAN, 1.0], 2));
    assert!(matches!(e, Error::NonFinite { index: 1, .. }), "{e}");
}

fn shape(batch: usize, m: usize, n: usize, k: usize) -> GemmShape {
    GemmShape {
        batch,
        m,
        n,
        k,
        a: Operand::row_major(k).batch_stride(m.saturating_mul(k)),
        b: Operand::row_major(n).batch_stride(k.saturating_mul(n)),
        c: Operand::row_major(n).batch_stride(m.saturating_mul(n)),
        symmetric: false,
    }
}

#[test]
fn gemm_shape_limits_at_their_boundaries() {
    let ok = |s: &GemmShape| no_panic("extents", || s.extents()).is_ok();
    // batch: 1..=MAX_BATCH.
    assert!(!ok(&shape(0, 2, 2, 2)));
    assert!(ok(&shape(gemm::MAX_BATCH - 1, 2, 2, 2)));
    assert!(ok(&shape(gemm::MAX_BATCH, 2, 2, 2)));
    assert!(matches!(shape(gemm::MAX_BATCH + 1, 2, 2, 2).extents(), Err(Error::TooLarge { arg: "batch", .. })));
    // m and n: 1..=MAX_ROWS (k = 0 keeps the operands empty).
    for (m, n) in [(gemm::MAX_ROWS - 1, 1), (gemm::MAX_ROWS, 1), (1, gemm::MAX_ROWS - 1), (1, gemm::MAX_ROWS)] {
        assert!(ok(&shape(1, m, n, 0)), "{m} x {n}");
    }
    assert!(matches!(shape(1, gemm::MAX_ROWS + 1, 1, 0).extents(), Err(Error::TooLarge { arg: "m", .. })));
    assert!(matches!(shape(1, 1, gemm::MAX_ROWS + 1, 0).extents(), Err(Error::TooLarge { arg: "n", .. })));
    assert!(matches!(shape(1, 0, 1, 1).extents(), Err(Error::InvalidArgument { arg: "m", .. })));
    // Both at MAX_ROWS: the workspace overflows; an error, not a panic.
    assert!(!ok(&shape(1, gemm::MAX_ROWS, gemm::MAX_ROWS, 1)));
    // Leading dimensions: at the stored row width, one above, one below.
    for (which, base) in [("a", 7usize), ("b", 5), ("c", 5)] {
        for (delta, good) in [(0isize, true), (1, true), (-1, false)] {
            let mut s = shape(1, 3, 5, 7);
            let ld = (base as isize + delta) as usize;
            match which {
                "a" => s.a.ld = ld,
                "b" => s.b.ld = ld,
                _ => s.c.ld = ld,
            }
            assert_eq!(ok(&s), good, "{which}.ld = {ld}");
        }
    }
    // Batches of C must not overlap: stride at one batch's extent, above, below.
    for (stride, good) in [(15usize, true), (16, true), (14, false)] {
        let mut s = shape(2, 3, 5, 7);
        s.c.batch_stride = stride;
        assert_eq!(ok(&s), good, "c.batch_stride = {stride}");
    }
    // Extents that overflow usize.
    let mut s = shape(2, 3, 5, 7);
    s.a.batch_stride = BIG / 2;
    assert!(matches!(s.extents(), Err(Error::TooLarge { arg: "a", .. })));
    let mut s = shape(1, 3, 5, 7);
    s.b.ld = BIG;
    assert!(matches!(s.extents(), Err(Error::TooLarge { arg: "b", .. })));
    // Symmetric: m = n and b = a flipped.
    let a = Operand::row_major(4);
    let sym = GemmShape { batch: 1, m: 3, n: 3, k: 4, a, b: a.flipped(), c: Operand::row_major(3), symmetric: true };
    assert!(ok(&sym));
    assert!(matches!(
        GemmShape { n: 4, c: Operand::row_major(4), ..sym }.extents(),
        Err(Error::InvalidArgument { arg: "n", .. })
    ));
    assert!(matches!(GemmShape { b: a, ..sym }.extents(), Err(Error::InvalidArgument { arg: "b", .. })));
}

#[test]
fn gemm_cpu_references_refuse_short_buffers() {
    let s = shape(2, 3, 5, 7);
    let e = s.extents().unwrap();
    let (a, b) = (vec![1.0f32; e.a], vec![1.0f32; e.b]);
    let mut c = vec![0.0f64; e.c];
    let mut c32 = vec![0.0f32; e.c];
    assert!(no_panic("gemm", || gcpu::gemm(&s, &a, &b, &mut c)).is_ok());
    assert!(matches!(is_err("a", || gcpu::gemm(&s, &a[1..], &b, &mut c)), Error::Shape { arg: "a", .. }));
    assert!(matches!(is_err("b", || gcpu::gemm(&s, &a, &b[1..], &mut c)), Error::Shape { arg: "b", .. }));
    assert!(matches!(is_err("c", || gcpu::gemm(&s, &a, &b, &mut c[1..])), Error::Shape { arg: "c", .. }));
    assert!(matches!(is_err("c32", || gcpu::gemm_f32_ordered(&s, 32, &a, &b, &mut c32[1..])), Error::Shape { .. }));
    is_err("absurd", || gcpu::gemm(&shape(BIG, BIG, BIG, BIG), &a, &b, &mut c));
    is_err("absurd ordered", || gcpu::gemm_f32_ordered(&shape(1, BIG, 1, 1), 32, &a, &b, &mut c32));
}

#[test]
fn gram_shape_limits_at_their_boundaries() {
    let ok = |s: GramShape| no_panic("gram shape", || s.validate()).is_ok();
    let trace = NtkMode::Trace { divide_by_outputs: false };
    // The output limit MAX_OUTPUT = 2^32 − 1 elements: at, one below, one above.
    assert_eq!(65_535usize * 65_537, MAX_OUTPUT);
    assert!(ok(GramShape::cross(65_535, 65_537, 1, 0, trace)));
    assert!(ok(GramShape::cross(2, (MAX_OUTPUT - 1) / 2, 1, 0, trace)));
    assert!(matches!(
        GramShape::cross(65_536, 65_536, 1, 0, trace).validate(),
        Err(Error::TooLarge { arg: "out", .. })
    ));
    // Zeros and a symmetric n2 ≠ n1.
    assert!(matches!(
        GramShape::symmetric(0, 1, 1, NtkMode::Full).validate(),
        Err(Error::InvalidArgument { arg: "n1", .. })
    ));
    assert!(matches!(
        GramShape::cross(1, 0, 1, 1, NtkMode::Full).validate(),
        Err(Error::InvalidArgument { arg: "n2", .. })
    ));
    assert!(matches!(
        GramShape::symmetric(1, 0, 1, NtkMode::Full).validate(),
        Err(Error::InvalidArgument { arg: "outputs", .. })
    ));
    let bad = GramShape { n2: 3, ..GramShape::symmetric(2, 1, 1, NtkMode::Full) };
    assert!(matches!(bad.validate(), Err(Error::InvalidArgument { arg: "n2", .. })));
    // Full's GEMM has N·O rows: at MAX_ROWS it passes the GEMM limit, above it does not.
    assert!(ok(GramShape::cross(gemm::MAX_ROWS - 1, 1, 1, 0, NtkMode::Full)));
    assert!(ok(GramShape::cross(gemm::MAX_ROWS, 1, 1, 0, NtkMode::Full)));
    assert!(matches!(
        GramShape::cross(gemm::MAX_ROWS + 1, 1, 1, 0, NtkMode::Full).validate(),
        Err(Error::TooLarge { arg: "m", .. })
    ));
    // Diagonal batches over O: at the GEMM's MAX_BATCH, above it.
    assert!(ok(GramShape::cross(1, 1, gemm::MAX_BATCH, 1, NtkMode::Diagonal)));
    assert!(matches!(
        GramShape::cross(1, 1, gemm::MAX_BATCH + 1, 1, NtkMode::Diagonal).validate(),
        Err(Error::TooLarge { arg: "batch", .. })
    ));
    // J that overflows, for every mode.
    for mode in NtkMode::ALL {
        assert!(!ok(GramShape::cross(BIG, 1, 1, 1, mode)));
        assert!(!ok(GramShape::symmetric(2, BIG, BIG, mode)));
        assert!(!ok(GramShape::cross(1, 1, 1 << 40, 1 << 40, mode)));
    }
}

#[test]
fn numerically_singular_kernels_have_infinite_condition_number() {
    let eps = f64::EPSILON;
    // n = 2: the threshold is λ_min ≤ 2·ε·λ_max.
    let hi = 3.0;
    let at = 2.0 * eps * hi;
    assert_eq!(cpu::condition_number_of(&[at, hi]), f64::INFINITY);
    assert_eq!(cpu::condition_number_of(&[at * (1.0 - eps), hi]), f64::INFINITY);
    let above = at * (1.0 + 4.0 * eps);
    let c = cpu::condition_number_of(&[above, hi]);
    assert!(c.is_finite() && (c - hi / above).abs() <= 1e-3 * c, "{c}");
    // Negative, zero, NaN, infinite, empty: ∞, never NaN.
    for ev in [vec![-1.0, 2.0], vec![0.0, 0.0], vec![f64::NAN, 1.0], vec![1.0, f64::INFINITY], vec![], vec![-2.0, -1.0]]
    {
        assert_eq!(cpu::condition_number_of(&ev), f64::INFINITY, "{ev:?}");
    }
    // A rank-1 kernel computed in floating point: λ_min is rounding noise, so exactly ∞.
    let v = [0.3f64, -1.7, 2.2, 0.9];
    let k: Vec<f64> = (0..16).map(|q| v[q / 4] * v[q % 4]).collect();
    assert_eq!(cpu::condition_number(&k, 4).unwrap(), f64::INFINITY);
    // A well-conditioned one is finite and right.
    let c = cpu::condition_number(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
    assert!((c - 3.0).abs() < 1e-13);
}

#[test]
fn eigenvalues_near_overflow_are_computed_on_a_scaled_matrix() {
    // [[a, b], [b, a]] with entries near f64::MAX / 4: eigenvalues a − b and a + b, both finite.
    let (a, b) = (4e307, 2e307);
    let ev = no_panic("eig", || cpu::eigenvalues_symmetric(&[a, b, b, a], 2)).unwrap();
    assert!((ev[0] - (a - b)).abs() <= 1e-12 * (a - b), "{ev:?}");
    assert!((ev[1] - (a + b)).abs() <= 1e-12 * (a + b), "{ev:?}");
    // Diagonal at f64::MAX: exact.
    let ev = cpu::eigenvalues_symmetric(&[f64::MAX, 0.0, 0.0, f64::MAX / 2.0], 2).unwrap();
    assert_eq!(ev, vec![f64::MAX / 2.0, f64::MAX]);
    // An eigenvalue beyond f64::MAX is refused with a typed error.
    let m = f64::MAX;
    assert!(matches!(cpu::eigenvalues_symmetric(&[m, m, m, m], 2), Err(Error::TooLarge { .. })));
    // Tiny entries are not flushed to zero either.
    let t = 1e-300;
    let ev = cpu::eigenvalues_symmetric(&[2.0 * t, t, t, 2.0 * t], 2).unwrap();
    assert!((ev[0] - t).abs() <= 1e-12 * t && (ev[1] - 3.0 * t).abs() <= 1e-12 * t, "{ev:?}");
    // The condition number of the scaled case is finite.
    assert!((cpu::condition_number(&[a, b, b, a], 2).unwrap() - 3.0).abs() < 1e-12);
}
