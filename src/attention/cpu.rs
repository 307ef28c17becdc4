//! The CPU reference of the prefill: dense attention under the explicit token mask, in f64.

use super::{BlockMask, MaskHeads, PrefillOptions, PrefillShape};
use crate::error::{check_shape, Result};
use crate::tensor::{checked_numel, Float};

/// Output of [`prefill`]: `o [Tq_total, Hq, D]` and `lse [Hq, Tq_total]`, both in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillOutput {
    /// Attention output, row-major `[Tq_total, Hq, D]`.
    pub o: Vec<f64>,
    /// Natural-log softmax denominators, `[Hq, Tq_total]`; `-inf` for rows with no visible key.
    pub lse: Vec<f64>,
}

/// Whether local query `i` of entry `b` sees local key `j` for query head `h`: the block
/// mask (with token masks) and, with `causal`, `j ≤ i + (Tk_b − Tq_b)`.
///
/// # Errors
/// The errors of [`BlockMask::visible`]; [`crate::Error::InvalidArgument`] naming `h` when
/// `h ≥ Hq`.
pub fn visible(
    shape: &PrefillShape,
    options: &PrefillOptions,
    mask: &BlockMask,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> Result<bool> {
    mask.validate(shape)?;
    visible_unchecked(shape, options, mask, (b, h, i, j))
}

/// [`visible`] for a mask already validated against `shape`, at `(b, h, i, j)`.
fn visible_unchecked(
    shape: &PrefillShape,
    options: &PrefillOptions,
    mask: &BlockMask,
    (b, h, i, j): (usize, usize, usize, usize),
) -> Result<bool> {
    if h >= shape.hq {
        return Err(crate::Error::invalid("h", format!("query head {h} is out of range ({} heads)", shape.hq)));
    }
    let (tq, tk) = (shape.seq_q(b)?, shape.seq_k(b)?);
    // Bottom-right alignment; every count is below i32::MAX, so i64 cannot overflow.
    if options.causal && j as i64 > i as i64 + tk as i64 - tq as i64 {
        return Ok(false);
    }
    let m = match mask.heads {
        MaskHeads::Shared => 0,
        MaskHeads::PerKvHead => h / shape.group(),
    };
    mask.visible_unchecked(shape, b, m, i, j)
}

/// Dense masked attention in f64 on the storage values of `q`, `k`, `v` (see the module docs
/// of [`crate::attention`] for the math, the empty-row and the NaN contract).
///
/// # Errors
/// The validation errors of [`BlockMask::validate`] and [`crate::attention::HostPlan::new`];
/// [`crate::Error::Shape`] naming `q`, `k` or `v` when a length does not match the shape.
pub fn prefill<T: Float>(
    shape: &PrefillShape,
    options: PrefillOptions,
    mask: &BlockMask,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<PrefillOutput> {
    // The same validation as the GPU path (mask, scale), so both reject the same inputs.
    super::HostPlan::new(shape, options, mask)?;
    let (tq, hq, hkv, d) = (shape.tq_total(), shape.hq, shape.hkv, shape.head_dim);
    check_shape("q", &[checked_numel::<T>("q", &shape.q_shape())?], &[q.len()])?;
    let kv_len = checked_numel::<T>("k", &shape.kv_shape())?;
    check_shape("k", &[kv_len], &[k.len()])?;
    check_shape("v", &[kv_len], &[v.len()])?;
    let scale = f64::from(options.scale_for(d));
    let group = shape.group();
    let mut o = vec![0.0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; hq * tq];
    let mut scores = Vec::new();
    let mut acc = vec![0.0f64; d];
    for b in 0..shape.batch() {
        let (q0, k0) = (shape.cu_seqlens_q[b] as usize, shape.cu_seqlens_k[b] as usize);
        for h in 0..hq {
            let kvh = h / group;
            for i in 0..shape.seq_q(b)? {
                let qrow = &q[((q0 + i) * hq + h) * d..][..d];
                scores.clear();
                for j in 0..shape.seq_k(b)? {
                    if !visible_unchecked(shape, &options, mask, (b, h, i, j))? {
                        continue;
                    }
                    let krow = &k[((k0 + j) * hkv + kvh) * d..][..d];
                    scores.push((j, crate::decode::cpu::dot(qrow, krow) * scale));
                }
                if scores.is_empty() {
                    continue; // o stays 0, lse stays -inf
                }
                // f64::max skips NaN scores; they reach denom (and so o and lse) below.
                let mx = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                acc.iter_mut().for_each(|x| *x = 0.0);
                let mut denom = 0.0;
                for &(j, s) in &scores {
                    let p = (s - mx).exp();
                    denom += p;
                    let vrow = &v[((k0 + j) * hkv + kvh) * d..][..d];
                    for (a, x) in acc.iter_mut().zip(vrow) {
                        *a += p * f64::from(x.to_f32());
                    }
                }
                let out = &mut o[((q0 + i) * hq + h) * d..][..d];
                for (y, a) in out.iter_mut().zip(&acc) {
                    *y = a / denom;
                }
                lse[h * tq + q0 + i] = mx + denom.ln();
            }
        }
    }
    Ok(PrefillOutput { o, lse })
}
