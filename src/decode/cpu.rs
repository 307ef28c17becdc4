//! The CPU reference of sparse-index decode: dense attention over the whole cache with an
//! explicit token mask built from the index lists, accumulated in f64.
//!
//! It validates its inputs exactly as the GPU plan does (same errors, same wording), so
//! the tests can hold the two paths to the same contract, including the NaN contract of the
//! [module docs](super).

use super::{validate_lists, DecodeOptions, DecodeShape};
use crate::error::{check_shape, Error, Result};
use crate::tensor::{checked_numel, Float};

/// The reference's outputs, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeReference {
    /// `[B, Tq, Hq, D]`.
    pub o: Vec<f64>,
    /// `[B, Tq, Hq]`, natural log; `-inf` where no token is visible.
    pub lse: Vec<f64>,
}

/// The explicit mask `[B, Hkv, Tcap]`: `true` where the token is in the list of
/// `(b, kv head)`.
///
/// # Errors
/// The errors of [`validate_lists`]; [`Error::TooLarge`] naming `capacity` when the mask
/// cannot be allocated.
pub fn token_mask(shape: &DecodeShape, cache_lens: &[u32], indptr: &[u32], indices: &[u32]) -> Result<Vec<bool>> {
    validate_lists(shape, cache_lens, indptr, indices)?;
    let n = checked_numel::<bool>("capacity", &[shape.n_lists(), shape.capacity])?;
    let mut mask = Vec::new();
    mask.try_reserve_exact(n).map_err(|_| Error::too_large("capacity", format!("a mask of {n} tokens")))?;
    mask.resize(n, false);
    for (l, w) in indptr.windows(2).enumerate() {
        for &i in &indices[w[0] as usize..w[1] as usize] {
            mask[l * shape.capacity + i as usize] = true;
        }
    }
    Ok(mask)
}

/// `q·k` in f64 from the widened storage values.
pub(crate) fn dot<T: Float>(q: &[T], k: &[T]) -> f64 {
    q.iter().zip(k).map(|(&a, &b)| f64::from(a.to_f32()) * f64::from(b.to_f32())).sum()
}

/// Sparse-index decode attention on the CPU (see the [module docs](super) for layouts and
/// math): for every query row, dense attention over tokens `0..cache_lens[b]` keeping only
/// those in the mask (and, with `causal`, at most `cache_lens[b] − Tq + t`).
///
/// Scores are `scale · Σ_d q_d·k_d` in f64 from the widened inputs (the scale is the f32
/// value in effect, widened); the softmax uses the running max; `o = 0`, `lse = −inf` for a
/// row with no visible token. A NaN score (a NaN in `q` or in `k` of a visible token) makes
/// the row's `o` and `lse` NaN, never the empty result.
///
/// # Errors
/// Everything [`super::validate_lists`] and [`DecodeOptions::validate`] report, and
/// [`crate::Error::Shape`] for `q`, `k`, `v` whose lengths are not those of `[B, Tq, Hq, D]`
/// and `[B, Hkv, Tcap, D]`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_decode<T: Float>(
    shape: &DecodeShape,
    options: &DecodeOptions,
    q: &[T],
    k: &[T],
    v: &[T],
    cache_lens: &[u32],
    indptr: &[u32],
    indices: &[u32],
) -> Result<DecodeReference> {
    options.validate()?;
    validate_lists(shape, cache_lens, indptr, indices)?;
    let q_len = checked_numel::<T>("q", &shape.q_shape())?;
    let kv_len = checked_numel::<T>("k", &shape.kv_shape())?;
    check_shape("q", &[q_len], &[q.len()])?;
    check_shape("k", &[kv_len], &[k.len()])?;
    check_shape("v", &[kv_len], &[v.len()])?;

    // Sized by k (checked above), so the mask allocation is no larger than an input.
    let mask = token_mask(shape, cache_lens, indptr, indices)?;
    let (tq_n, hq, hkv, d, tcap) = (shape.q_tokens, shape.hq, shape.hkv, shape.head_dim, shape.capacity);
    let group = shape.group();
    let scale = f64::from(options.scale_for(d));
    let mut o = vec![0.0f64; q_len];
    let mut lse = vec![f64::NEG_INFINITY; shape.batch * tq_n * hq];
    let mut scores = vec![0.0f64; tcap];
    let mut visible = vec![false; tcap];
    for (b, &cache_len) in cache_lens.iter().enumerate() {
        let cache_len = cache_len as usize;
        for t in 0..tq_n {
            // Causal limit in global positions: query t of Tq sits at cache_len − Tq + t.
            let limit = cache_len as i64 - tq_n as i64 + t as i64;
            for h in 0..hq {
                let list = b * hkv + h / group;
                let row = (b * tq_n + t) * hq + h;
                let qr = &q[row * d..(row + 1) * d];
                let mut m = f64::NEG_INFINITY;
                let mut any = false;
                for j in 0..cache_len {
                    visible[j] = mask[list * tcap + j] && (!options.causal || j as i64 <= limit);
                    if !visible[j] {
                        continue;
                    }
                    any = true;
                    scores[j] = scale * dot(qr, &k[(list * tcap + j) * d..][..d]);
                    // f64::max ignores NaN: a NaN score reaches l (and so o and lse) below.
                    m = m.max(scores[j]);
                }
                if !any {
                    continue; // nothing visible: o stays 0, lse -inf
                }
                // Every score NaN leaves m = -inf; shift by 0 then, as the kernel does.
                let base = if m == f64::NEG_INFINITY { 0.0 } else { m };
                let mut l = 0.0f64;
                let out = &mut o[row * d..(row + 1) * d];
                for j in (0..cache_len).filter(|&j| visible[j]) {
                    let p = (scores[j] - base).exp();
                    l += p;
                    let vr = &v[(list * tcap + j) * d..][..d];
                    for (acc, &x) in out.iter_mut().zip(vr) {
                        *acc += p * f64::from(x.to_f32());
                    }
                }
                if l == 0.0 {
                    // Every score -inf (an infinite input): no weight anywhere, as the kernel.
                    out.iter_mut().for_each(|x| *x = 0.0);
                    continue;
                }
                for acc in out.iter_mut() {
                    *acc /= l;
                }
                lse[row] = base + l.ln();
            }
        }
    }
    Ok(DecodeReference { o, lse })
}
