//! CPU references of the selection primitives, written for clarity, not speed.
//!
//! They share the GPU's ranking key bit for bit, so the differential tests compare indices
//! with `==`. Every function validates its arguments as the GPU plan does and returns a
//! typed error (never a panic) on a bad one.

use super::{ExpandShape, SegmentShape, TopkOrder, TopkShape};
use crate::error::{Error, Result};
use crate::tensor::Float;

/// The ranking key of a score: larger numbers give larger keys, `-0.0` and `+0.0` give the
/// same key (they tie, so the lower index wins), and every NaN gives 0, below `-inf`.
/// It is the same function as the kernels' `rank_key`.
pub fn rank_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let x = if x == 0.0 { 0.0f32 } else { x };
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The top-`k` of one row into `values`/`indices` (each `k` long, pre-filled with padding).
fn topk_row<T: Float>(row: &[T], k: usize, order: TopkOrder, values: &mut [T], indices: &mut [u32]) {
    let mut ranked: Vec<(u32, u32)> = row.iter().zip(0u32..).map(|(x, i)| (rank_key(x.to_f32()), i)).collect();
    // Descending key, then ascending index.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.truncate(k);
    if order == TopkOrder::Index {
        ranked.sort_unstable_by_key(|&(_, i)| i);
    }
    for (slot, &(_, i)) in ranked.iter().enumerate() {
        values[slot] = row[i as usize];
        indices[slot] = i;
    }
}

/// Top-`k` of every row of `scores [rows, n]`, limited to `lengths[r]` elements per row,
/// descending by value (ties by lower index, NaN below every number).
///
/// Returns `(values [rows, k], indices [rows, k])`; slots past a row's length hold
/// `u32::MAX` and `-inf`.
///
/// # Errors
/// As [`super::validate_topk`], and [`Error::Shape`] naming `scores` when
/// `scores.len() != rows · n`.
pub fn topk<T: Float>(
    scores: &[T],
    rows: usize,
    n: usize,
    k: usize,
    lengths: Option<&[u32]>,
) -> Result<(Vec<T>, Vec<u32>)> {
    topk_ordered(scores, &TopkShape { rows, n, k }, lengths, TopkOrder::Value)
}

/// [`topk`] with a choice of output order ([`TopkOrder::Index`]: the same selected set,
/// indices ascending).
///
/// # Errors
/// As [`topk`].
pub fn topk_ordered<T: Float>(
    scores: &[T],
    shape: &TopkShape,
    lengths: Option<&[u32]>,
    order: TopkOrder,
) -> Result<(Vec<T>, Vec<u32>)> {
    shape.validate()?;
    if let Some(l) = lengths {
        shape.validate_lengths(l)?;
    }
    let TopkShape { rows, n, k } = *shape;
    if Some(scores.len()) != rows.checked_mul(n) {
        return Err(Error::shape("scores", &[rows, n], &[scores.len()]));
    }
    let mut values = vec![T::from_f32(f32::NEG_INFINITY); rows * k];
    let mut indices = vec![u32::MAX; rows * k];
    for (r, row) in scores.chunks_exact(n).enumerate() {
        let len = lengths.map_or(n, |l| l[r] as usize);
        let (v, i) = (&mut values[r * k..(r + 1) * k], &mut indices[r * k..(r + 1) * k]);
        topk_row(&row[..len], k, order, v, i);
    }
    Ok((values, indices))
}

/// Top-`k` of every segment `scores[indptr[s] .. indptr[s + 1]]` of a ragged array,
/// descending by value, with indices local to the segment. With `ks`, segment `s` keeps only
/// its top-`ks[s]` (the first `ks[s]` slots); every other slot holds `u32::MAX` and `-inf`.
///
/// Returns `(values [segments, k], indices [segments, k])`.
///
/// # Errors
/// As [`SegmentShape::validate`], [`SegmentShape::validate_indptr`] and
/// [`SegmentShape::validate_ks`]; [`Error::Shape`] naming `scores` when its length is not
/// `total`.
pub fn topk_segments<T: Float>(
    scores: &[T],
    shape: &SegmentShape,
    indptr: &[u32],
    ks: Option<&[u32]>,
) -> Result<(Vec<T>, Vec<u32>)> {
    shape.validate()?;
    shape.validate_indptr(indptr)?;
    if let Some(ks) = ks {
        shape.validate_ks(ks)?;
    }
    if scores.len() != shape.total {
        return Err(Error::shape("scores", &[shape.total], &[scores.len()]));
    }
    let k = shape.k;
    let mut values = vec![T::from_f32(f32::NEG_INFINITY); shape.segments * k];
    let mut indices = vec![u32::MAX; shape.segments * k];
    for (s, w) in indptr.windows(2).enumerate() {
        let kk = ks.map_or(k, |ks| ks[s] as usize);
        let (v, i) = (&mut values[s * k..s * k + kk], &mut indices[s * k..s * k + kk]);
        topk_row(&scores[w[0] as usize..w[1] as usize], kk, TopkOrder::Value, v, i);
    }
    Ok((values, indices))
}

/// Expands selected block ids `blocks [rows, kb]` into sorted, unique CSR token lists (see
/// [`ExpandShape`] for the contract). `lengths [rows]` bounds each row (clipped to `t`);
/// `ranges` is the map of [`super::BlockMap::Ranges`] (`None` for fixed blocks).
///
/// Returns `(indptr [rows + 1], indices [indptr[rows]])`.
///
/// # Errors
/// As [`ExpandShape::validate`]; [`Error::Shape`] naming `blocks`, `lengths` or `ranges`
/// for a buffer of the wrong length; [`Error::InvalidArgument`] naming `ranges` when it is
/// given for fixed blocks or missing for ranges.
pub fn expand_blocks(
    shape: &ExpandShape,
    blocks: &[u32],
    lengths: &[u32],
    ranges: Option<&[u32]>,
) -> Result<(Vec<u32>, Vec<u32>)> {
    shape.validate()?;
    let ExpandShape { rows, kb, nb, t, map } = *shape;
    if blocks.len() != rows * kb {
        return Err(Error::shape("blocks", &[rows, kb], &[blocks.len()]));
    }
    if lengths.len() != rows {
        return Err(Error::shape("lengths", &[rows], &[lengths.len()]));
    }
    match (shape.ranges_shape(), ranges) {
        (None, None) => {}
        (Some(want), Some(r)) => {
            if r.len() != want.iter().product::<usize>() {
                return Err(Error::shape("ranges", &want, &[r.len()]));
            }
        }
        (None, Some(_)) => return Err(Error::invalid("ranges", "fixed-size blocks take no ranges map")),
        (Some(_), None) => return Err(Error::invalid("ranges", "a ranges map is required for BlockMap::Ranges")),
    }
    let mut indptr = Vec::with_capacity(rows + 1);
    indptr.push(0u32);
    let mut indices = Vec::new();
    for r in 0..rows {
        let len = (lengths[r] as usize).min(t);
        // The row's intervals, clipped to the row, sorted by start and merged.
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(kb);
        for &b in &blocks[r * kb..(r + 1) * kb] {
            let b = b as usize;
            if b >= nb {
                continue;
            }
            let (s, e) = match (map, ranges) {
                (super::BlockMap::Fixed { block_size }, _) => {
                    let s = b.saturating_mul(block_size);
                    (s, s.saturating_add(block_size))
                }
                (super::BlockMap::Ranges { shared }, Some(m)) => {
                    let row = if shared { 0 } else { r };
                    let at = (row * nb + b) * 2;
                    (m[at] as usize, m[at + 1] as usize)
                }
                (super::BlockMap::Ranges { .. }, None) => return Err(Error::internal("ranges checked above")),
            };
            let e = e.min(len);
            if s < e {
                spans.push((s, e));
            }
        }
        spans.sort_unstable();
        let mut end = 0usize;
        for (s, e) in spans {
            // Tokens already listed (below `end`) are skipped: the list stays unique.
            let from = s.max(end);
            if from < e {
                indices.extend(from as u32..e as u32);
                end = e;
            }
        }
        let total =
            u32::try_from(indices.len()).map_err(|_| Error::too_large("indices", "more than u32::MAX tokens"))?;
        indptr.push(total);
    }
    Ok((indptr, indices))
}
