//! The CPU reference of the GEMM: [`gemm`] accumulates in `f64`; [`gemm_f32_ordered`] does the
//! `F32` kernel's exact fp32 operations in its order, so a GPU result can be compared bit for bit.
//!
//! Both validate the shape ([`GemmShape::extents`]) and every buffer length first, write only
//! the elements of `C` the shape describes, and return a typed error (never panic) on any
//! argument. For a symmetric shape `b` is not read (`B` is `A` transposed).

use crate::error::{Error, Result};
use crate::gemm::GemmShape;

/// Element `A_z[i, q]`, `B_z[q, j]`, and the offset of `C_z[i, j]`.
struct Index<'a> {
    s: &'a GemmShape,
}

impl Index<'_> {
    fn a(&self, a: &[f32], z: usize, i: usize, q: usize) -> f32 {
        let o = &self.s.a;
        a[z * o.batch_stride + if o.transposed { q * o.ld + i } else { i * o.ld + q }]
    }
    fn b(&self, a: &[f32], b: &[f32], z: usize, q: usize, j: usize) -> f32 {
        if self.s.symmetric {
            // B[q, j] = A[j, q].
            return self.a(a, z, j, q);
        }
        let o = &self.s.b;
        b[z * o.batch_stride + if o.transposed { j * o.ld + q } else { q * o.ld + j }]
    }
    fn c(&self, z: usize, i: usize, j: usize) -> usize {
        let o = &self.s.c;
        z * o.batch_stride + if o.transposed { j * o.ld + i } else { i * o.ld + j }
    }
}

fn check_lengths<T>(shape: &GemmShape, a: &[f32], b: &[f32], c: &[T]) -> Result<()> {
    let e = shape.extents()?;
    for (arg, need, have) in [("a", e.a, a.len()), ("b", e.b, b.len()), ("c", e.c, c.len())] {
        if have < need {
            return Err(Error::shape(arg, &[need], &[have]));
        }
    }
    Ok(())
}

/// `C_z = A_z · B_z` with every product and sum in `f64`.
///
/// # Errors
/// As [`GemmShape::extents`]; [`Error::Shape`] for a buffer shorter than its extent.
pub fn gemm(shape: &GemmShape, a: &[f32], b: &[f32], c: &mut [f64]) -> Result<()> {
    check_lengths(shape, a, b, c)?;
    let ix = Index { s: shape };
    for z in 0..shape.batch {
        for i in 0..shape.m {
            for j in 0..shape.n {
                let s: f64 = (0..shape.k).map(|q| f64::from(ix.a(a, z, i, q)) * f64::from(ix.b(a, b, z, q, j))).sum();
                c[ix.c(z, i, j)] = s;
            }
        }
    }
    Ok(())
}

/// The `F32` kernel's result, bit for bit, for a plan with split depth `k_chunk`
/// ([`crate::gemm::GemmPlan::k_chunk`]): per split `s` an fp32 FMA chain from +0 over
/// `q ∈ [s·k_chunk, min((s+1)·k_chunk, k))` in increasing `q`, then the splits added in order
/// from +0. (A symmetric plan computes the mirrored half as the transposed element, which has
/// the same value: `fma` is commutative in its two factors.)
///
/// # Errors
/// As [`gemm`]; [`Error::InvalidArgument`] for `k_chunk = 0` when `k > 0`.
pub fn gemm_f32_ordered(shape: &GemmShape, k_chunk: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    check_lengths(shape, a, b, c)?;
    if k_chunk == 0 && shape.k > 0 {
        return Err(Error::invalid("k_chunk", "must be positive"));
    }
    let ix = Index { s: shape };
    let splits = if shape.k == 0 { 1 } else { shape.k.div_ceil(k_chunk) };
    for z in 0..shape.batch {
        for i in 0..shape.m {
            for j in 0..shape.n {
                let mut sum = 0.0f32;
                for s in 0..splits {
                    let lo = s * k_chunk;
                    let hi = lo.saturating_add(k_chunk).min(shape.k);
                    let mut acc = 0.0f32;
                    for q in lo..hi {
                        acc = ix.a(a, z, i, q).mul_add(ix.b(a, b, z, q, j), acc);
                    }
                    sum += acc;
                }
                c[ix.c(z, i, j)] = sum;
            }
        }
    }
    Ok(())
}
