//! Shared by the integration tests: the GPU-or-SKIP handle and differential checks.
#![allow(dead_code)]

use std::sync::OnceLock;

use ntkv::Device;

/// The argument a validation error names; fails the test on an error that names none.
pub fn arg_of(e: &ntkv::Error) -> &'static str {
    e.arg().unwrap_or_else(|| panic!("expected an error naming an argument, got {e:?}"))
}

/// Whether `NTKV_REQUIRE_GPU=1`: then a missing GPU fails the test instead of skipping it.
pub fn gpu_required() -> bool {
    std::env::var("NTKV_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn shared() -> &'static Result<Device, String> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    DEV.get_or_init(|| {
        if !ntkv::kernels_built() {
            return Err("kernels not built (nvcc was not found at build time)".to_owned());
        }
        Device::new(0).map_err(|e| e.to_string())
    })
}

/// The shared test device, or `None` after printing a `SKIP` line for `test`.
/// Panics instead when `NTKV_REQUIRE_GPU=1`.
pub fn gpu(test: &str) -> Option<&'static Device> {
    match shared() {
        Ok(d) => Some(d),
        Err(reason) => {
            if gpu_required() {
                panic!("NTKV_REQUIRE_GPU=1 but no GPU for {test}: {reason}");
            }
            skip(test, &format!("no GPU ({reason})"));
            None
        }
    }
}

/// Prints `SKIP: <test>: <why>` straight to the process's stderr, past libtest's output
/// capture, so skips are visible in a plain `cargo test` run.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}

/// Returns the device or skips the calling test.
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match common::gpu(module_path!()) {
            Some(d) => d,
            None => return,
        }
    };
    ($name:expr) => {
        match common::gpu($name) {
            Some(d) => d,
            None => return,
        }
    };
}

/// The worst element of a comparison, for a readable failure message.
#[derive(Debug, Clone, Copy)]
pub struct Worst {
    pub index: usize,
    pub got: f64,
    pub want: f64,
    pub err: f64,
}

/// Elementwise check `|got - want| <= atol + rtol * |want|`; on failure names the worst
/// element (index, GPU value, CPU value).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let mut worst: Option<Worst> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let same_nonfinite = (g.is_nan() && w.is_nan()) || (g.is_infinite() && g == w);
        let err = if same_nonfinite { 0.0 } else { (g - w).abs() / (atol + rtol * w.abs()) };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        if worst.map_or(true, |x| err > x.err) {
            worst = Some(Worst { index: i, got: g, want: w, err });
        }
    }
    if let Some(w) = worst {
        assert!(
            w.err <= 1.0,
            "{what}: worst element {} got {} want {} (|diff| = {:e}, allowed {:e})",
            w.index,
            w.got,
            w.want,
            (w.got - w.want).abs(),
            atol + rtol * w.want.abs()
        );
    }
}

/// Relative L2 error `‖got − want‖ / ‖want‖` (absolute when `want` is all zero).
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Asserts `rel_l2(got, want) <= tol`, naming the worst element on failure.
pub fn assert_rel_l2(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let e = rel_l2(got, want);
    // NaN must fail too, hence no `e > tol`.
    if e.is_nan() || e > tol {
        let (i, g, w) = got
            .iter()
            .zip(want)
            .enumerate()
            .map(|(i, (g, w))| (i, *g, *w))
            .max_by(|a, b| (a.1 - a.2).abs().total_cmp(&(b.1 - b.2).abs()))
            .unwrap_or((0, 0.0, 0.0));
        panic!("{what}: relative L2 error {e:e} > {tol:e}; worst element {i}: got {g} want {w}");
    }
}

/// Random values with a fresh scale (10^-3 … 10^2.5) and offset every `dim` elements, so that
/// quantization groups see very different ranges.
pub fn ranged_rows<T: ntkv::Float>(rng: &mut ntkv::rng::Rng, n: usize, dim: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let (mut amp, mut off) = (1.0f32, 0.0f32);
    for i in 0..n {
        if i % dim == 0 {
            amp = 10f32.powf(rng.uniform_in(-3.0, 2.5));
            off = rng.normal() * amp;
        }
        out.push(T::from_f32(off + amp * rng.normal()));
    }
    out
}
