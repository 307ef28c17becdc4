//! CPU references of the page and chunk retrieval: the same f32 operations in the same order
//! as the kernels (see the module docs' *Determinism*), so every output is bit-exact against
//! the GPU. They validate their arguments as the plans do and never panic.

use super::{
    landmark_scale, lanes, validate_lens, LandmarkSelectShape, LandmarkShape, QuestMetaShape, QuestSelectShape,
    CHUNK_TOKENS, COSINE_EPS,
};
use crate::error::{Error, Result};
use crate::select::cpu::{expand_blocks, topk};
use crate::tensor::Float;

/// Partials per row of the softmax's max and sum (the kernel's block size).
const SOFTMAX_PARTIALS: usize = 256;

/// The larger of two floats, ignoring a NaN unless both are NaN; a tie keeps `a`.
pub fn nanmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b > a {
        b
    } else {
        a
    }
}

/// The smaller of two floats, ignoring a NaN unless both are NaN; a tie keeps `a`.
pub fn nanmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b < a {
        b
    } else {
        a
    }
}

/// The softmax's exp, the same function as the kernels' `exp_det`: `x = n ln2 + r` with
/// `n = round_ties_even(x · log2 e)` and a two-part `ln 2`, a degree-7 Taylor polynomial in
/// `r`, times `2^n`. Within about 1 ulp of `exp`; 0 below `-87`, `+inf` above 88, NaN for NaN.
pub fn exp_det(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < -87.0 {
        return 0.0;
    }
    if x > 88.0 {
        return f32::INFINITY;
    }
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln 2 = LN2_HI + LN2_LO: the high part has 16 significant bits, so n · LN2_HI is exact.
    let r = (x - n * f32::from_bits(0x3f31_7200)) - n * f32::from_bits(0x35bf_be8e);
    let mut p = 1.0f32 / 5040.0;
    for c in [1.0f32 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    let e = (n as i32 + 127) as u32;
    p * f32::from_bits(e << 23)
}

/// Folds `parts[..n]` (`n` a power of two) by halving: `p[i] = op(p[i], p[i + h])`.
fn halve(parts: &mut [f32], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut n = parts.len();
    while n > 1 {
        n /= 2;
        for i in 0..n {
            parts[i] = op(parts[i], parts[i + n]);
        }
    }
    parts.first().copied().unwrap_or(0.0)
}

/// A sum over `D` channels in the kernels' order: `term(d)` summed per 8-channel group from
/// `0.0`, then the groups (padded with zeros to a power of two) folded by halving.
pub fn lane_sum(head_dim: usize, term: impl Fn(usize) -> f32) -> f32 {
    let (l, lp) = lanes(head_dim);
    let mut parts = [0.0f32; 32];
    for (j, p) in parts.iter_mut().enumerate().take(l) {
        let mut acc = 0.0f32;
        for c in 0..8 {
            acc += term(8 * j + c);
        }
        *p = acc;
    }
    halve(&mut parts[..lp.min(32)], |a, b| a + b)
}

fn check_len(arg: &'static str, want: &[usize], got: usize) -> Result<()> {
    let n = crate::tensor::numel(arg, want)?;
    if n != got {
        return Err(Error::shape(arg, want, &[got]));
    }
    Ok(())
}

/// Refreshes the Quest metadata in place, as [`super::QuestMetaPlan::append`]: for every row,
/// the pages from `old[b] / P` up to `ceil(new[b] / P)` get the max and min of their valid
/// tokens (those below `new[b]`); nothing else is written. [`quest_meta`] is the build
/// (`old = 0`).
///
/// # Errors
/// As [`QuestMetaShape::validate`] and [`validate_lens`] (for both `old` and `new`);
/// [`Error::InvalidArgument`] naming `lens` when `old[b] > new[b]`; [`Error::Shape`] naming
/// `keys`, `page_max` or `page_min` for a buffer of the wrong length.
pub fn quest_meta_append<T: Float>(
    shape: &QuestMetaShape,
    keys: &[T],
    old: &[u32],
    new: &[u32],
    page_max: &mut [T],
    page_min: &mut [T],
) -> Result<()> {
    shape.validate()?;
    check_append(shape, old, new)?;
    check_len("keys", &shape.keys_shape(), keys.len())?;
    check_len("page_max", &shape.meta_shape(), page_max.len())?;
    check_len("page_min", &shape.meta_shape(), page_min.len())?;
    let QuestMetaShape { hkv, capacity, head_dim: d, page_size: ps, .. } = *shape;
    let np = shape.n_pages();
    for row in 0..shape.batch * hkv {
        let b = row / hkv;
        let len = new[b] as usize;
        for page in old[b] as usize / ps..len.div_ceil(ps) {
            let out = (row * np + page) * d;
            for c in 0..d {
                let (mut mx, mut mn) = (f32::NAN, f32::NAN);
                for t in page * ps..(page * ps + ps).min(len) {
                    let v = keys[(row * capacity + t) * d + c].to_f32();
                    mx = nanmax(mx, v);
                    mn = nanmin(mn, v);
                }
                page_max[out + c] = T::from_f32(mx);
                page_min[out + c] = T::from_f32(mn);
            }
        }
    }
    Ok(())
}

pub(crate) fn check_append(shape: &QuestMetaShape, old: &[u32], new: &[u32]) -> Result<()> {
    validate_lens(old, shape.batch, shape.capacity)?;
    validate_lens(new, shape.batch, shape.capacity)?;
    if let Some(b) = (0..shape.batch).find(|&b| old[b] > new[b]) {
        return Err(Error::invalid("lens", format!("old[{b}] = {} exceeds new[{b}] = {}", old[b], new[b])));
    }
    Ok(())
}

/// The Quest metadata build from zero-filled buffers: `(page_max, page_min)`, each `[B, Hkv,
/// NP, D]`; pages past a row's last page stay 0.
///
/// # Errors
/// As [`quest_meta_append`].
pub fn quest_meta<T: Float>(shape: &QuestMetaShape, keys: &[T], lens: &[u32]) -> Result<(Vec<T>, Vec<T>)> {
    shape.validate()?;
    let n = crate::tensor::numel("page_max", &shape.meta_shape())?;
    let mut mx = vec![T::default(); n];
    let mut mn = vec![T::default(); n];
    quest_meta_append(shape, keys, &vec![0; lens.len()], lens, &mut mx, &mut mn)?;
    Ok((mx, mn))
}

fn check_select_lens(batch: usize, capacity: usize, lens: &[u32]) -> Result<()> {
    validate_lens(lens, batch, capacity)
}

/// The Quest page scores `[B·Hkv, NP]` (f32): pages below a row's last page get their bound
/// (max over the group and the query tokens); the last page and those past it are NaN (they are
/// not ranked).
///
/// # Errors
/// As [`QuestSelectShape::validate`] and [`validate_lens`]; [`Error::Shape`] naming `q`,
/// `page_max` or `page_min`.
pub fn quest_scores<T: Float>(
    shape: &QuestSelectShape,
    q: &[T],
    page_max: &[T],
    page_min: &[T],
    lens: &[u32],
) -> Result<Vec<f32>> {
    shape.validate()?;
    check_select_lens(shape.batch, shape.capacity, lens)?;
    let meta = shape.meta();
    check_len("q", &shape.q_shape(), q.len())?;
    check_len("page_max", &meta.meta_shape(), page_max.len())?;
    check_len("page_min", &meta.meta_shape(), page_min.len())?;
    let (d, np, group) = (shape.head_dim, meta.n_pages(), shape.hq / shape.hkv);
    let mut scores = vec![f32::NAN; shape.rows() * np];
    for row in 0..shape.rows() {
        let (b, hk) = (row / shape.hkv, row % shape.hkv);
        let pages = (lens[b] as usize).div_ceil(shape.page_size);
        for page in 0..pages.saturating_sub(1) {
            let m = (row * np + page) * d;
            let mut best = f32::NAN;
            for t in 0..shape.q_tokens {
                for g in 0..group {
                    let qo = ((b * shape.q_tokens + t) * shape.hq + hk * group + g) * d;
                    let s = lane_sum(d, |c| {
                        let qv = q[qo + c].to_f32();
                        nanmax(qv * page_max[m + c].to_f32(), qv * page_min[m + c].to_f32())
                    });
                    best = nanmax(best, s);
                }
            }
            scores[row * np + page] = best;
        }
    }
    Ok(scores)
}

/// A selection's outputs: the kept blocks per row and their CSR token lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// `[B·Hkv, slots]`: pages (Quest) or chunks (ShadowKV), as the plans write them.
    pub blocks: Vec<u32>,
    /// `[B·Hkv + 1]`.
    pub indptr: Vec<u32>,
    /// `indptr[B·Hkv]` tokens, ascending per row.
    pub indices: Vec<u32>,
}

/// The Quest selection, as [`super::QuestSelectPlan::run`]: the ranked pages, the forced last
/// page and the expanded token lists.
///
/// # Errors
/// As [`quest_scores`].
pub fn quest_select<T: Float>(
    shape: &QuestSelectShape,
    q: &[T],
    page_max: &[T],
    page_min: &[T],
    lens: &[u32],
) -> Result<Selection> {
    let scores = quest_scores(shape, q, page_max, page_min, lens)?;
    let (rows, k, np) = (shape.rows(), shape.budget, shape.meta().n_pages());
    let pages_of = |row: usize| (lens[row / shape.hkv] as usize).div_ceil(shape.page_size);
    let mut blocks = vec![u32::MAX; rows * k];
    if k > 1 {
        let ranked_lens: Vec<u32> = (0..rows).map(|r| pages_of(r).saturating_sub(1) as u32).collect();
        let (_, idx) = topk(&scores, rows, np, k - 1, Some(&ranked_lens))?;
        for r in 0..rows {
            blocks[r * k..r * k + k - 1].copy_from_slice(&idx[r * (k - 1)..(r + 1) * (k - 1)]);
        }
    }
    for r in 0..rows {
        blocks[r * k + k - 1] = pages_of(r).checked_sub(1).map_or(u32::MAX, |p| p as u32);
    }
    expand(&shape.expand_shape(), shape.hkv, blocks, lens)
}

fn expand(es: &crate::select::ExpandShape, hkv: usize, blocks: Vec<u32>, lens: &[u32]) -> Result<Selection> {
    let row_lens: Vec<u32> = (0..es.rows).map(|r| lens[r / hkv]).collect();
    let (indptr, indices) = expand_blocks(es, &blocks, &row_lens, None)?;
    Ok(Selection { blocks, indptr, indices })
}

/// The landmark build's outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Landmarks {
    /// `[B, Hkv, NC, D]` f32; chunks past a row's last chunk are 0.
    pub landmarks: Vec<f32>,
    /// `[B, Hkv, NC]` f32; 0 past a row's last chunk.
    pub min_cos: Vec<f32>,
    /// `[B·Hkv, n_out]` u32, lowest `min_cos` first, `u32::MAX` padding.
    pub outliers: Vec<u32>,
}

/// The ShadowKV landmarks, cosines and outliers, as [`super::LandmarkPlan::run`] writes them
/// into zero-filled buffers.
///
/// # Errors
/// As [`LandmarkShape::validate`] and [`validate_lens`]; [`Error::Shape`] naming `keys`.
pub fn landmarks<T: Float>(shape: &LandmarkShape, keys: &[T], lens: &[u32]) -> Result<Landmarks> {
    shape.validate()?;
    validate_lens(lens, shape.batch, shape.capacity)?;
    check_len("keys", &shape.keys_shape(), keys.len())?;
    let (d, nc, cap) = (shape.head_dim, shape.n_chunks(), shape.capacity);
    let rows = shape.rows();
    let mut lm = vec![0.0f32; rows * nc * d];
    let mut min_cos = vec![0.0f32; rows * nc];
    let mut neg = vec![f32::NAN; rows * nc];
    let key = |row: usize, t: usize, c: usize| keys[(row * cap + t) * d + c].to_f32();
    for row in 0..rows {
        let len = lens[row / shape.hkv] as usize;
        for chunk in 0..len.div_ceil(CHUNK_TOKENS) {
            let t0 = chunk * CHUNK_TOKENS;
            let n = CHUNK_TOKENS.min(len - t0);
            let m = &mut lm[(row * nc + chunk) * d..(row * nc + chunk + 1) * d];
            for (c, mc) in m.iter_mut().enumerate() {
                let mut s = key(row, t0, c);
                for i in 1..n {
                    s += key(row, t0 + i, c);
                }
                *mc = s / n as f32;
            }
            let m = &*m;
            let clamp = |x: f32| if x > COSINE_EPS { x } else { COSINE_EPS };
            let ln = clamp(lane_sum(d, |c| m[c] * m[c]).sqrt());
            let mut worst = f32::NAN;
            for i in 0..n {
                let dot = lane_sum(d, |c| m[c] * key(row, t0 + i, c));
                let kn = clamp(lane_sum(d, |c| key(row, t0 + i, c) * key(row, t0 + i, c)).sqrt());
                worst = nanmin(worst, dot / (ln * kn));
            }
            min_cos[row * nc + chunk] = worst;
            neg[row * nc + chunk] = -worst;
        }
    }
    let n_out = shape.outliers;
    let outliers = if n_out == 0 {
        Vec::new()
    } else {
        let chunk_lens: Vec<u32> =
            (0..rows).map(|r| (lens[r / shape.hkv] as usize).div_ceil(CHUNK_TOKENS) as u32).collect();
        topk(&neg, rows, nc, n_out, Some(&chunk_lens))?.1
    };
    Ok(Landmarks { landmarks: lm, min_cos, outliers })
}

/// The ShadowKV chunk scores `[B·Hkv, NC]` before the outliers are excluded: per query head
/// and token the softmax over the row's chunks, summed over the tokens, max over the group;
/// NaN past a row's last chunk.
///
/// # Errors
/// As [`LandmarkSelectShape::validate`] and [`validate_lens`]; [`Error::Shape`] naming `q` or
/// `landmarks`.
pub fn landmark_scores<T: Float>(
    shape: &LandmarkSelectShape,
    q: &[T],
    landmarks: &[f32],
    lens: &[u32],
) -> Result<Vec<f32>> {
    shape.validate()?;
    validate_lens(lens, shape.batch, shape.capacity)?;
    let lshape = shape.landmarks();
    check_len("q", &shape.q_shape(), q.len())?;
    check_len("landmarks", &lshape.landmarks_shape(), landmarks.len())?;
    let (d, nc, tq, hq, hkv) = (shape.head_dim, lshape.n_chunks(), shape.q_tokens, shape.hq, shape.hkv);
    let group = hq / hkv;
    let scale = landmark_scale(d);
    // The softmax of every query row (b, h, t), its exp values and row sum.
    let mut expd = vec![0.0f32; shape.batch * hq * tq * nc];
    let mut sums = vec![0.0f32; shape.batch * hq * tq];
    for (b, &len) in lens.iter().enumerate() {
        let n = (len as usize).div_ceil(CHUNK_TOKENS);
        for h in 0..hq {
            let row = b * hkv + h / group;
            for t in 0..tq {
                let qrow = (b * hq + h) * tq + t;
                let qo = ((b * tq + t) * hq + h) * d;
                let l = &mut expd[qrow * nc..qrow * nc + n];
                for (c, lc) in l.iter_mut().enumerate() {
                    let lo = (row * nc + c) * d;
                    *lc = lane_sum(d, |x| q[qo + x].to_f32() * landmarks[lo + x]) * scale;
                }
                let mut parts = [f32::NAN; SOFTMAX_PARTIALS];
                for (c, &v) in l.iter().enumerate() {
                    parts[c % SOFTMAX_PARTIALS] = nanmax(parts[c % SOFTMAX_PARTIALS], v);
                }
                let top = halve(&mut parts, nanmax);
                let mut parts = [0.0f32; SOFTMAX_PARTIALS];
                for (c, v) in l.iter_mut().enumerate() {
                    *v = exp_det(*v - top);
                    parts[c % SOFTMAX_PARTIALS] += *v;
                }
                sums[qrow] = halve(&mut parts, |a, b| a + b);
            }
        }
    }
    let mut scores = vec![f32::NAN; shape.rows() * nc];
    for row in 0..shape.rows() {
        let (b, hk) = (row / hkv, row % hkv);
        for c in 0..(lens[b] as usize).div_ceil(CHUNK_TOKENS) {
            let mut best = f32::NAN;
            for g in 0..group {
                let mut acc = 0.0f32;
                for t in 0..tq {
                    let qrow = (b * hq + hk * group + g) * tq + t;
                    acc += expd[qrow * nc + c] / sums[qrow];
                }
                best = nanmax(best, acc);
            }
            scores[row * nc + c] = best;
        }
    }
    Ok(scores)
}

/// The ShadowKV selection, as [`super::LandmarkSelectPlan::run`]: the top `budget` non-outlier
/// chunks, the outliers after them, and the expanded token lists.
///
/// # Errors
/// As [`landmark_scores`]; [`Error::Shape`] naming `outliers`.
pub fn landmark_select<T: Float>(
    shape: &LandmarkSelectShape,
    q: &[T],
    landmarks: &[f32],
    outliers: &[u32],
    lens: &[u32],
) -> Result<Selection> {
    let mut scores = landmark_scores(shape, q, landmarks, lens)?;
    check_len("outliers", &shape.landmarks().outliers_shape(), outliers.len())?;
    let (rows, k, n_out, nc) = (shape.rows(), shape.budget, shape.outliers, shape.landmarks().n_chunks());
    let chunks_of = |row: usize| (lens[row / shape.hkv] as usize).div_ceil(CHUNK_TOKENS);
    for (i, &x) in outliers.iter().enumerate() {
        let row = i / n_out.max(1);
        if (x as usize) < chunks_of(row) {
            scores[row * nc + x as usize] = f32::NAN;
        }
    }
    let chunk_lens: Vec<u32> = (0..rows).map(|r| chunks_of(r) as u32).collect();
    let (_, idx) = topk(&scores, rows, nc, k, Some(&chunk_lens))?;
    let stride = k + n_out;
    let mut blocks = vec![u32::MAX; rows * stride];
    for r in 0..rows {
        blocks[r * stride..r * stride + k].copy_from_slice(&idx[r * k..(r + 1) * k]);
        blocks[r * stride + k..(r + 1) * stride].copy_from_slice(&outliers[r * n_out..(r + 1) * n_out]);
    }
    expand(&shape.expand_shape(), shape.hkv, blocks, lens)
}
