//! The CPU reference of sparse-index decode: dense attention over the whole cache with an
//! explicit token mask built from the index lists, accumulated in f64 (SPEC §0).
//!
//! It validates its inputs exactly as the GPU plan does (same errors, same wording), so
//! the tests can hold the two paths to the same contract.

use super::{validate_lists, DecodeConfig};
use crate::error::{check_shape, Result};
use crate::tensor::Float;

/// The reference's outputs, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeReference {
    /// `[B, Tq, Hq, D]`.
    pub o: Vec<f64>,
    /// `[B, Tq, Hq]`, natural log; `-inf` where no token is visible.
    pub lse: Vec<f64>,
}

/// The explicit mask `[B, Hkv, Tcap]`: `true` where the token is in the list of
/// `(b, kv head)`. The lists must have been validated.
pub fn token_mask(cfg: &DecodeConfig, indptr: &[u32], indices: &[u32]) -> Vec<bool> {
    let mut mask = vec![false; cfg.n_lists() * cfg.cache_capacity];
    for l in 0..cfg.n_lists() {
        for &i in &indices[indptr[l] as usize..indptr[l + 1] as usize] {
            mask[l * cfg.cache_capacity + i as usize] = true;
        }
    }
    mask
}

/// Sparse-index decode attention on the CPU (see the [module docs](super) for layouts and
/// math): for every query row, dense attention over tokens `0..cache_lens[b]` keeping only
/// those in the mask (and, with `causal`, at most `cache_lens[b] − Tq + t`).
///
/// Scores are `scale · Σ_d q_d·k_d` in f64 from the widened inputs (the scale is the f32
/// value in effect, widened); the softmax uses the running max; `o = 0`, `lse = −inf` for a
/// row with no visible token.
///
/// # Errors
/// Everything [`super::validate_lists`] reports, and [`crate::Error::Shape`] for `q`, `k`, `v`
/// whose lengths are not those of `[B, Tq, Hq, D]` and `[B, Hkv, Tcap, D]`.
pub fn sparse_decode<T: Float>(
    cfg: &DecodeConfig,
    q: &[T],
    k: &[T],
    v: &[T],
    cache_lens: &[u32],
    indptr: &[u32],
    indices: &[u32],
) -> Result<DecodeReference> {
    validate_lists(cfg, cache_lens, indptr, indices)?;
    let q_len = cfg.q_shape().iter().product::<usize>();
    let kv_len = cfg.kv_shape().iter().product::<usize>();
    check_shape("q", &[q_len], &[q.len()])?;
    check_shape("k", &[kv_len], &[k.len()])?;
    check_shape("v", &[kv_len], &[v.len()])?;

    let mask = token_mask(cfg, indptr, indices);
    let (tq_n, hq, hkv, d, tcap) = (cfg.q_tokens, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.cache_capacity);
    let group = cfg.group();
    let scale = f64::from(cfg.softmax_scale());
    let mut o = vec![0.0f64; q_len];
    let mut lse = vec![f64::NEG_INFINITY; cfg.batch * tq_n * hq];
    let mut scores = vec![0.0f64; tcap];
    let mut visible = vec![false; tcap];
    for (b, &cache_len) in cache_lens.iter().enumerate() {
        let cache_len = cache_len as usize;
        for t in 0..tq_n {
            // Causal limit in global positions: query t of Tq sits at cache_len − Tq + t.
            let limit = cache_len as i64 - tq_n as i64 + t as i64;
            for h in 0..hq {
                let hk = h / group;
                let list = b * hkv + hk;
                let row = (b * tq_n + t) * hq + h;
                let qr = &q[row * d..(row + 1) * d];
                let mut m = f64::NEG_INFINITY;
                for j in 0..cache_len {
                    visible[j] = mask[list * tcap + j] && (!cfg.causal || j as i64 <= limit);
                    if !visible[j] {
                        continue;
                    }
                    let kr = &k[(list * tcap + j) * d..(list * tcap + j + 1) * d];
                    let dot: f64 =
                        qr.iter().zip(kr).map(|(&a, &b)| f64::from(a.to_f32()) * f64::from(b.to_f32())).sum();
                    scores[j] = scale * dot;
                    m = m.max(scores[j]);
                }
                if m == f64::NEG_INFINITY {
                    continue; // nothing visible: o stays 0, lse -inf
                }
                let mut l = 0.0f64;
                let out = &mut o[row * d..(row + 1) * d];
                for j in (0..cache_len).filter(|&j| visible[j]) {
                    let p = (scores[j] - m).exp();
                    l += p;
                    let vr = &v[(list * tcap + j) * d..(list * tcap + j + 1) * d];
                    for (acc, &x) in out.iter_mut().zip(vr) {
                        *acc += p * f64::from(x.to_f32());
                    }
                }
                for acc in out.iter_mut() {
                    *acc /= l;
                }
                lse[row] = m + l.ln();
            }
        }
    }
    Ok(DecodeReference { o, lse })
}
