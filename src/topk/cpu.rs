//! CPU references for top-k, H2O and SnapKV, written for clarity, not speed.
//!
//! Top-k is exact and shares the GPU's ranking key bit for bit, so the differential tests
//! compare indices with `==`. The attention masses accumulate in `f64`.

use crate::error::{Error, Result};
use crate::tensor::Float;

use super::{validate_compact, validate_select, AttnShape, GqaReduce};

pub use crate::select::cpu::{rank_key, topk};

/// The attention mass each key receives, reduced over the GQA group: `[hkv, t]` in `f64`.
///
/// For query head `h` and query `i` (global position `t − tq + i`), `p = softmax_j(q·k_j/√d)`
/// over the visible keys `j ≤ t − tq + i`; each head sums `p` over its queries, then the
/// group's heads are reduced by `reduce`.
pub fn attention_mass<T: Float>(q: &[T], k: &[T], shape: AttnShape, reduce: GqaReduce) -> Result<Vec<f64>> {
    shape.validate()?;
    let AttnShape { hq, hkv, tq, t, d } = shape;
    if q.len() != hq * tq * d {
        return Err(Error::shape("q", &[hq, tq, d], &[q.len()]));
    }
    if k.len() != hkv * t * d {
        return Err(Error::shape("k", &[hkv, t, d], &[k.len()]));
    }
    let group = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut mass = vec![0.0f64; hkv * t];
    let mut head = vec![0.0f64; t];
    let mut scores = vec![0.0f64; t];
    for hk in 0..hkv {
        for g in 0..group {
            let h = hk * group + g;
            head.iter_mut().for_each(|x| *x = 0.0);
            for i in 0..tq {
                let pos = t - tq + i;
                let qv = &q[(h * tq + i) * d..(h * tq + i + 1) * d];
                let mut mx = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(pos + 1) {
                    let kv = &k[(hk * t + j) * d..(hk * t + j + 1) * d];
                    let dot: f64 = qv.iter().zip(kv).map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32())).sum();
                    *s = dot * scale;
                    mx = mx.max(*s);
                }
                let sum: f64 = scores[..=pos].iter().map(|s| (s - mx).exp()).sum();
                for (hj, s) in head.iter_mut().zip(&scores[..=pos]) {
                    *hj += (s - mx).exp() / sum;
                }
            }
            let out = &mut mass[hk * t..(hk + 1) * t];
            for (o, &v) in out.iter_mut().zip(&head) {
                *o = if g == 0 {
                    v
                } else {
                    match reduce {
                        GqaReduce::Sum => *o + v,
                        GqaReduce::Max => o.max(v),
                    }
                }
            }
        }
    }
    Ok(mass)
}

/// H2O accumulation: `acc[hkv, t] += attention_mass(q, k)` (the sum in `f64`, rounded once).
///
/// # Errors
/// As [`AttnShape::validate`], and [`Error::Shape`] for a buffer of the wrong length.
pub fn h2o_accumulate<T: Float>(q: &[T], k: &[T], acc: &mut [f32], shape: AttnShape, reduce: GqaReduce) -> Result<()> {
    shape.validate()?;
    if acc.len() != shape.hkv * shape.t {
        return Err(Error::shape("acc", &[shape.hkv, shape.t], &[acc.len()]));
    }
    let mass = attention_mass(q, k, shape, reduce)?;
    for (a, m) in acc.iter_mut().zip(mass) {
        *a = (f64::from(*a) + m) as f32;
    }
    Ok(())
}

/// The keep list of `rows` heads from `scores [rows, stride]`: the top-`(budget − recent)`
/// of the first `older` columns, ascending, followed by `older .. older + recent`.
fn keep_list(
    scores: &[f32],
    rows: usize,
    stride: usize,
    older: usize,
    budget: usize,
    recent: usize,
) -> Result<Vec<u32>> {
    let k_sel = budget - recent;
    let mut keep = Vec::with_capacity(rows * budget);
    for r in 0..rows {
        let row = &scores[r * stride..r * stride + older];
        let mut chosen = if k_sel > 0 { topk(row, 1, older, k_sel, None)?.1 } else { Vec::new() };
        chosen.sort_unstable();
        keep.extend_from_slice(&chosen);
        keep.extend((older..older + recent).map(|i| i as u32));
    }
    Ok(keep)
}

/// H2O eviction: per kv head, the last `recent` tokens plus the top-`(budget − recent)` of
/// `acc` over the older tokens `0 .. t − recent`, as an ascending list `[hkv, budget]`.
///
/// # Errors
/// As [`super::validate_select`].
pub fn h2o_select(acc: &[f32], hkv: usize, t: usize, budget: usize, recent: usize) -> Result<Vec<u32>> {
    validate_select(hkv, t, budget, recent, "recent")?;
    if acc.len() != hkv * t {
        return Err(Error::shape("acc", &[hkv, t], &[acc.len()]));
    }
    keep_list(acc, hkv, t, t - recent, budget, recent)
}

/// In-place compaction: row `i` of every head of `k_cache`, `v_cache` (`[hkv, t, d]`) and
/// `acc` (`[hkv, t]`) takes row `keep[h, i]`, for `i < budget`; later rows are unchanged.
///
/// # Errors
/// As [`super::validate_compact`] (which also checks that each keep row is strictly
/// ascending and below `t`).
pub fn h2o_compact<T: Copy>(
    keep: &[u32],
    hkv: usize,
    t: usize,
    d: usize,
    k_cache: &mut [T],
    v_cache: &mut [T],
    acc: Option<&mut [f32]>,
) -> Result<()> {
    let budget = validate_compact(keep.len(), hkv, t, d, k_cache.len(), v_cache.len(), acc.as_ref().map(|a| a.len()))?;
    for (r, row) in keep.chunks(budget.max(1)).enumerate().take(hkv) {
        if let Some(bad) = row.iter().enumerate().find(|&(i, &v)| v as usize >= t || (i > 0 && row[i - 1] >= v)) {
            return Err(Error::invalid(
                "keep",
                format!("entry {} of head {r} is {} (must be < t = {t} and strictly ascending)", bad.0, bad.1),
            ));
        }
    }
    let mut acc = acc;
    for h in 0..hkv {
        for i in 0..budget {
            let src = keep[h * budget + i] as usize;
            let (s, dst) = ((h * t + src) * d, (h * t + i) * d);
            k_cache.copy_within(s..s + d, dst);
            v_cache.copy_within(s..s + d, dst);
            if let Some(a) = acc.as_deref_mut() {
                a[h * t + i] = a[h * t + src];
            }
        }
    }
    Ok(())
}

/// SnapKV votes `s_j = Σ_window A[:, j]` for `j < t − w`, `[hkv, t − w]`, where the window
/// is `q_window [hq, w, d]` (queries at positions `t − w .. t`), reduced over the GQA group.
pub fn snapkv_votes<T: Float>(q_window: &[T], k: &[T], shape: AttnShape, reduce: GqaReduce) -> Result<Vec<f64>> {
    let mass = attention_mass(q_window, k, shape, reduce)?;
    let older = shape.t - shape.tq;
    Ok((0..shape.hkv).flat_map(|h| mass[h * shape.t..h * shape.t + older].to_vec()).collect())
}

/// 1-D average pooling of each row of `x [rows, n]`: kernel 5, stride 1, zero padding 2,
/// padding counted (always divides by 5).
///
/// # Errors
/// [`Error::Shape`] naming `x` when `x.len() != rows · n`.
pub fn pool5(x: &[f64], rows: usize, n: usize) -> Result<Vec<f64>> {
    if Some(x.len()) != rows.checked_mul(n) {
        return Err(Error::shape("x", &[rows, n], &[x.len()]));
    }
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(n.max(1))) {
        for (j, oj) in o.iter_mut().enumerate() {
            let lo = j.saturating_sub(2);
            let hi = (j + 2).min(n - 1);
            *oj = row[lo..=hi].iter().sum::<f64>() / 5.0;
        }
    }
    Ok(out)
}

/// SnapKV pooled scores `[hkv, t − w]` in `f32`: [`pool5`] of [`snapkv_votes`].
pub fn snapkv_scores<T: Float>(q_window: &[T], k: &[T], shape: AttnShape, reduce: GqaReduce) -> Result<Vec<f32>> {
    let votes = snapkv_votes(q_window, k, shape, reduce)?;
    Ok(pool5(&votes, shape.hkv, shape.t - shape.tq)?.into_iter().map(|v| v as f32).collect())
}

/// SnapKV keep list from pooled scores `[hkv, t − w]`: the top-`(capacity − w)` older tokens,
/// ascending, then the window `t − w .. t`; `[hkv, capacity]`.
///
/// # Errors
/// As [`super::validate_select`] with `recent = w`.
pub fn snapkv_select_from_scores(pooled: &[f32], hkv: usize, t: usize, w: usize, capacity: usize) -> Result<Vec<u32>> {
    validate_select(hkv, t, capacity, w, "window")?;
    let older = t - w;
    if pooled.len() != hkv * older {
        return Err(Error::shape("pooled", &[hkv, older], &[pooled.len()]));
    }
    keep_list(pooled, hkv, older, older, capacity, w)
}

/// SnapKV selection end to end: [`snapkv_scores`] then [`snapkv_select_from_scores`].
pub fn snapkv_select<T: Float>(
    q_window: &[T],
    k: &[T],
    shape: AttnShape,
    capacity: usize,
    reduce: GqaReduce,
) -> Result<Vec<u32>> {
    validate_select(shape.hkv, shape.t, capacity, shape.tq, "window")?;
    let pooled = snapkv_scores(q_window, k, shape, reduce)?;
    snapkv_select_from_scores(&pooled, shape.hkv, shape.t, shape.tq, capacity)
}
