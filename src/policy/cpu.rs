//! CPU references of WindowKV, LazyEviction and PrefixKV, written for clarity, not speed.
//!
//! Every selection is exact: window sums, LazyEviction's state and scores, and PrefixKV's
//! thresholds are computed in the order the module docs fix, and the rankings use the shared
//! [`crate::select::cpu::rank_key`], so the GPU's index lists equal these bit for bit. Every
//! function validates its arguments first and returns a typed error (never a panic).

use super::{validate_lazy_state, Csr, LazyOptions, PrefixShape, WindowKvOptions, PREFIX_SCAN_CHUNKS};
use crate::error::{Error, Result};
use crate::select::cpu::{topk, topk_ordered};
use crate::select::{TopkOrder, TopkShape};
use crate::tensor::Float;
use crate::topk::cpu::{h2o_select, snapkv_votes};
use crate::topk::{AttnShape, GqaReduce};

/// Appends one row's sorted list to a CSR under construction.
fn push_row(csr: &mut Csr, row: impl IntoIterator<Item = u32>) -> Result<()> {
    csr.indices.extend(row);
    let end =
        u32::try_from(csr.indices.len()).map_err(|_| Error::too_large("indices", "more than u32::MAX entries"))?;
    csr.indptr.push(end);
    Ok(())
}

/// WindowKV window scores `[rows, nw]`: window `i` of row `r` is the `f32` sum, in ascending
/// token order from `0.0`, of `scores[r, i·w .. min((i + 1)·w, older)]` (`nw = ⌈older / w⌉`).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `window` for `w = 0`; [`Error::Shape`] naming `scores`
/// when its length is not `rows · older`.
pub fn window_scores(scores: &[f32], rows: usize, older: usize, w: usize) -> Result<Vec<f32>> {
    if w == 0 {
        return Err(Error::invalid("window", "a window holds at least one token"));
    }
    if Some(scores.len()) != rows.checked_mul(older) {
        return Err(Error::shape("scores", &[rows, older], &[scores.len()]));
    }
    let nw = older.div_ceil(w);
    let mut out = Vec::with_capacity(rows * nw);
    for r in 0..rows {
        let row = &scores[r * older..(r + 1) * older];
        out.extend(row.chunks(w).map(|c| c.iter().fold(0.0f32, |a, &x| a + x)));
    }
    Ok(out)
}

/// WindowKV selection from token scores `scores [rows, t − recent]` (see the module docs):
/// per row, the kept windows' tokens and the recent window, ascending, as CSR.
///
/// # Errors
/// As [`WindowKvOptions::validate`]; [`Error::Shape`] naming `scores` for another length.
pub fn windowkv_select(scores: &[f32], rows: usize, t: usize, options: &WindowKvOptions) -> Result<Csr> {
    options.validate(rows, t)?;
    let older = t - options.recent;
    let w = options.window;
    let ws = window_scores(scores, rows, older, w)?;
    let (nw, m) = (options.windows(t), options.kept_windows(t));
    let mut csr = Csr { indptr: vec![0], indices: Vec::new() };
    for r in 0..rows {
        let chosen: Vec<u32> = if m == nw {
            (0..nw as u32).collect()
        } else if m == 0 {
            Vec::new()
        } else {
            let shape = TopkShape { rows: 1, n: nw, k: m };
            topk_ordered(&ws[r * nw..(r + 1) * nw], &shape, None, TopkOrder::Index)?.1
        };
        let tokens = chosen.iter().flat_map(|&i| {
            let s = i as usize * w;
            s as u32..(s + w).min(older) as u32
        });
        push_row(&mut csr, tokens.chain(older as u32..t as u32))?;
    }
    Ok(csr)
}

/// WindowKV end to end from the observation window `q_window [hq, recent, d]` over
/// `k [hkv, t, d]`: the votes of [`snapkv_votes`] (`f64`, rounded to `f32`) into
/// [`windowkv_select`], one row per kv head.
///
/// # Errors
/// As [`snapkv_votes`] and [`windowkv_select`]; [`Error::InvalidArgument`] naming `recent`
/// when the window's query count `shape.tq` is not `options.recent`.
pub fn windowkv_select_attn<T: Float>(
    q_window: &[T],
    k: &[T],
    shape: AttnShape,
    options: &WindowKvOptions,
    reduce: GqaReduce,
) -> Result<Csr> {
    shape.validate()?;
    if shape.tq != options.recent {
        return Err(Error::invalid(
            "recent",
            format!("{} differs from the observation window's {} queries", options.recent, shape.tq),
        ));
    }
    options.validate(shape.hkv, shape.t)?;
    let votes: Vec<f32> = snapkv_votes(q_window, k, shape, reduce)?.into_iter().map(|v| v as f32).collect();
    windowkv_select(&votes, shape.hkv, shape.t, options)
}

/// WindowKV's index sharing across a group of layers: the lists of the latest group leader,
/// reused by the group's other layers.
#[derive(Clone, Debug)]
pub struct WindowKvGroup {
    options: WindowKvOptions,
    rows: usize,
    t: usize,
    current: Option<(usize, Csr)>,
}

impl WindowKvGroup {
    /// A group state for `rows` rows of caches of `t` tokens.
    ///
    /// # Errors
    /// As [`WindowKvOptions::validate`].
    pub fn new(options: WindowKvOptions, rows: usize, t: usize) -> Result<Self> {
        options.validate(rows, t)?;
        Ok(WindowKvGroup { options, rows, t, current: None })
    }

    /// The lists for `layer`. A leader ([`WindowKvOptions::is_leader`]) selects from its
    /// `scores [rows, t − recent]`; any other layer reuses its leader's lists and reads no
    /// scores (pass `None`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `scores` when a leader gets none, or naming `layer`
    /// when a follower's leader has not selected yet (layers run in order); as
    /// [`windowkv_select`].
    pub fn select_layer(&mut self, layer: usize, scores: Option<&[f32]>) -> Result<&Csr> {
        let leader = layer - layer % self.options.share_layers;
        if leader == layer {
            let s = scores.ok_or_else(|| Error::invalid("scores", format!("layer {layer} leads its group")))?;
            self.current = Some((leader, windowkv_select(s, self.rows, self.t, &self.options)?));
        }
        match &self.current {
            Some((l, csr)) if *l == leader => Ok(csr),
            _ => Err(Error::invalid("layer", format!("layer {layer}'s leader {leader} has not selected yet"))),
        }
    }
}

/// One LazyEviction state update at decode step `step` from the step's attention mass
/// `p [hkv, t]`: `acc += p` (`f32`), and where `p ≥ threshold`, `mri = max(mri, step −
/// last_hit)` and `last_hit = step` (`acc`, `last_hit`, `mri` are `[hkv, t]`).
///
/// # Errors
/// As [`validate_lazy_state`]; [`Error::InvalidArgument`] naming `threshold` when it is not
/// finite and positive, or `last_hit` for an entry above `step` or not a whole number.
#[allow(clippy::too_many_arguments)]
pub fn lazy_update(
    p: &[f32],
    acc: &mut [f32],
    last_hit: &mut [f32],
    mri: &mut [f32],
    hkv: usize,
    t: usize,
    step: usize,
    threshold: f32,
) -> Result<()> {
    validate_lazy_state(
        hkv,
        t,
        step,
        &[("p", p.len()), ("acc", acc.len()), ("last_hit", last_hit.len()), ("mri", mri.len())],
    )?;
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(Error::invalid("threshold", format!("{threshold} must be finite and positive")));
    }
    check_steps(last_hit, step)?;
    let s = step as f32;
    for j in 0..hkv * t {
        acc[j] += p[j];
        if p[j] >= threshold {
            mri[j] = mri[j].max(s - last_hit[j]);
            last_hit[j] = s;
        }
    }
    Ok(())
}

/// Every `last_hit` entry is a whole number in `0 ..= step`.
fn check_steps(last_hit: &[f32], step: usize) -> Result<()> {
    match last_hit.iter().position(|&h| !(h >= 0.0 && h <= step as f32 && h.fract() == 0.0)) {
        Some(j) => {
            Err(Error::invalid("last_hit", format!("entry {j} = {} is not a step in 0 ..= {step}", last_hit[j])))
        }
        None => Ok(()),
    }
}

/// LazyEviction scores `[hkv, t]` at step `step`: `mri − (step − last_hit)`, exact in `f32`.
///
/// # Errors
/// As [`validate_lazy_state`]; as [`lazy_update`] for `last_hit`.
pub fn lazy_scores(last_hit: &[f32], mri: &[f32], hkv: usize, t: usize, step: usize) -> Result<Vec<f32>> {
    validate_lazy_state(hkv, t, step, &[("last_hit", last_hit.len()), ("mri", mri.len())])?;
    check_steps(last_hit, step)?;
    let s = step as f32;
    Ok(last_hit.iter().zip(mri).map(|(&h, &m)| m - (s - h)).collect())
}

/// LazyEviction keep list `[hkv, budget]` at step `step`: the top-`(budget − recent)` older
/// tokens `0 .. t − recent` by [`lazy_scores`] (ties to the lower index), ascending, then the
/// last `recent` tokens.
///
/// # Errors
/// As [`lazy_scores`] and [`crate::topk::validate_select`].
pub fn lazy_select(
    last_hit: &[f32],
    mri: &[f32],
    hkv: usize,
    t: usize,
    step: usize,
    budget: usize,
    recent: usize,
) -> Result<Vec<u32>> {
    let scores = lazy_scores(last_hit, mri, hkv, t, step)?;
    h2o_select(&scores, hkv, t, budget, recent)
}

/// A LazyEviction cache on the host: `K`, `V` (`[hkv, t, d]`) and the state (`acc`,
/// `last_hit`, `mri`, `[hkv, t]`), driven one decode step at a time (the reference of the
/// GPU plan and the model loop an evaluation runs).
#[derive(Clone, Debug)]
pub struct LazyEviction<T> {
    options: LazyOptions,
    hkv: usize,
    d: usize,
    t: usize,
    step: usize,
    k: Vec<T>,
    v: Vec<T>,
    acc: Vec<f32>,
    last_hit: Vec<f32>,
    mri: Vec<f32>,
}

impl<T: Copy> LazyEviction<T> {
    /// A cache holding a prefill of `t` tokens (`k`, `v` `[hkv, t, d]`) at step 0: every
    /// token has `last_hit = 0`, `mri = 0` and `acc = 0`.
    ///
    /// # Errors
    /// As [`LazyOptions::validate`] and [`validate_lazy_state`]; [`Error::InvalidArgument`]
    /// naming `k` for `d = 0`; [`Error::Shape`] naming `k` or `v`.
    pub fn new(options: LazyOptions, hkv: usize, t: usize, d: usize, k: Vec<T>, v: Vec<T>) -> Result<Self> {
        options.validate()?;
        validate_lazy_state(hkv, t, 0, &[])?;
        if d == 0 {
            return Err(Error::invalid("k", "the head dimension must be positive"));
        }
        let n = crate::error::checked_mul("k", hkv * t, d)?;
        if k.len() != n {
            return Err(Error::shape("k", &[hkv, t, d], &[k.len()]));
        }
        if v.len() != n {
            return Err(Error::shape("v", &[hkv, t, d], &[v.len()]));
        }
        let z = vec![0.0f32; hkv * t];
        Ok(LazyEviction { options, hkv, d, t, step: 0, k, v, acc: z.clone(), last_hit: z.clone(), mri: z })
    }

    /// Tokens per head now.
    pub fn len(&self) -> usize {
        self.t
    }

    /// Whether the cache is empty (never, after [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.t == 0
    }

    /// The next decode step's number.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The key cache `[hkv, len, d]`.
    pub fn k(&self) -> &[T] {
        &self.k
    }

    /// The value cache `[hkv, len, d]`.
    pub fn v(&self) -> &[T] {
        &self.v
    }

    /// The H2O accumulator `[hkv, len]`.
    pub fn acc(&self) -> &[f32] {
        &self.acc
    }

    /// The step of each token's last hit `[hkv, len]`.
    pub fn last_hit(&self) -> &[f32] {
        &self.last_hit
    }

    /// Each token's maximum recurrence interval `[hkv, len]`.
    pub fn mri(&self) -> &[f32] {
        &self.mri
    }

    /// Appends one token per head (`k_new`, `v_new` `[hkv, d]`) at the current step:
    /// `last_hit = step`, `mri = 0`, `acc = 0`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `k_new` or `v_new`; [`Error::TooLarge`] naming `k` past 2^24
    /// tokens.
    pub fn append(&mut self, k_new: &[T], v_new: &[T]) -> Result<()> {
        let (hkv, d, t) = (self.hkv, self.d, self.t);
        if k_new.len() != hkv * d {
            return Err(Error::shape("k_new", &[hkv, d], &[k_new.len()]));
        }
        if v_new.len() != hkv * d {
            return Err(Error::shape("v_new", &[hkv, d], &[v_new.len()]));
        }
        if t + 1 > crate::select::MAX_N {
            return Err(Error::too_large("k", "the cache would exceed 2^24 tokens"));
        }
        let grow = |x: &mut Vec<T>, new: &[T], width: usize| {
            let mut out = Vec::with_capacity(hkv * (t + 1) * width);
            for h in 0..hkv {
                out.extend_from_slice(&x[h * t * width..(h + 1) * t * width]);
                out.extend_from_slice(&new[h * width..(h + 1) * width]);
            }
            *x = out;
        };
        grow(&mut self.k, k_new, d);
        grow(&mut self.v, v_new, d);
        let s = self.step as f32;
        for (x, val) in [(&mut self.acc, 0.0f32), (&mut self.last_hit, s), (&mut self.mri, 0.0)] {
            let mut out = Vec::with_capacity(hkv * (t + 1));
            for h in 0..hkv {
                out.extend_from_slice(&x[h * t..(h + 1) * t]);
                out.push(val);
            }
            *x = out;
        }
        self.t = t + 1;
        Ok(())
    }

    /// Runs decode step [`Self::step`] with its attention mass `p [hkv, len]`: the update of
    /// [`lazy_update`], then, when [`LazyOptions::evicts_after`] the step and more than
    /// `budget` tokens are held, the eviction of [`lazy_select`] and the compaction of `K`,
    /// `V` and the state. Returns the keep list `[hkv, budget]` when it evicted.
    ///
    /// # Errors
    /// As [`lazy_update`] and [`lazy_select`]; nothing changes on an error.
    pub fn decode_step(&mut self, p: &[f32]) -> Result<Option<Vec<u32>>> {
        let (hkv, t, step, o) = (self.hkv, self.t, self.step, self.options);
        let evict = o.evicts_after(step) && t > o.budget;
        if evict {
            // Checked before the update, so that an error leaves the state as it was.
            crate::topk::validate_select(hkv, t, o.budget, o.recent, "recent")?;
        }
        let mut acc = self.acc.clone();
        let mut last_hit = self.last_hit.clone();
        let mut mri = self.mri.clone();
        lazy_update(p, &mut acc, &mut last_hit, &mut mri, hkv, t, step, o.threshold)?;
        let keep = if evict { Some(lazy_select(&last_hit, &mri, hkv, t, step, o.budget, o.recent)?) } else { None };
        (self.acc, self.last_hit, self.mri) = (acc, last_hit, mri);
        if let Some(keep) = &keep {
            let b = o.budget;
            let gather = |x: &[f32]| -> Vec<f32> {
                (0..hkv).flat_map(|h| keep[h * b..(h + 1) * b].iter().map(move |&j| x[h * t + j as usize])).collect()
            };
            self.acc = gather(&self.acc);
            self.last_hit = gather(&self.last_hit);
            self.mri = gather(&self.mri);
            let d = self.d;
            let rows = |x: &[T]| -> Vec<T> {
                (0..hkv)
                    .flat_map(|h| keep[h * b..(h + 1) * b].iter().map(move |&j| (h * t + j as usize) * d))
                    .flat_map(|s| x[s..s + d].iter().copied())
                    .collect()
            };
            self.k = rows(&self.k);
            self.v = rows(&self.v);
            self.t = b;
        }
        self.step = step + 1;
        Ok(keep)
    }
}

/// A token's PrefixKV mass: its importance when finite and positive, else 0.
pub fn prefix_mass(x: f32) -> f64 {
    if x.is_finite() && x > 0.0 {
        f64::from(x)
    } else {
        0.0
    }
}

/// PrefixKV step 1: each row of `importance [rows, n]` sorted descending (ties to the lower
/// index, NaN last): `(values [rows, n], indices [rows, n])`.
///
/// # Errors
/// As [`PrefixShape::validate`]; [`Error::Shape`] naming `importance`.
pub fn prefix_sort(importance: &[f32], shape: &PrefixShape) -> Result<(Vec<f32>, Vec<u32>)> {
    shape.validate()?;
    topk(importance, shape.rows, shape.n, shape.n, None)
}

/// PrefixKV steps 2 and 3: the entry thresholds `[rows, n]` (`f64`) of rows sorted
/// descending (`sorted [rows, n]`, as [`prefix_sort`] returns), in the fixed chunk order of
/// the module docs.
///
/// # Errors
/// [`Error::Shape`] naming `sorted` when its length is not `rows · n`.
pub fn prefix_thresholds(sorted: &[f32], rows: usize, n: usize) -> Result<Vec<f64>> {
    if n == 0 || Some(sorted.len()) != rows.checked_mul(n) {
        return Err(Error::shape("sorted", &[rows, n], &[sorted.len()]));
    }
    let chunk = n.div_ceil(PREFIX_SCAN_CHUNKS);
    let mut out = vec![0.0f64; rows * n];
    let mut cum = vec![0.0f64; n];
    for (row, e) in sorted.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut base = 0.0f64;
        for (c, cc) in row.chunks(chunk).zip(cum.chunks_mut(chunk)) {
            let mut run = base;
            for (x, o) in c.iter().zip(cc.iter_mut()) {
                run += prefix_mass(*x);
                *o = run;
            }
            base += c.iter().fold(0.0f64, |a, x| a + prefix_mass(*x));
        }
        let total = base;
        for i in 1..n {
            e[i] = if total > 0.0 { cum[i - 1] / total } else { 1.0 };
        }
    }
    Ok(out)
}

/// PrefixKV step 4: from thresholds `[rows, n]` (each row non-decreasing), the per-row
/// budgets summing to `budget` and the ratio `p*` (see the module docs).
///
/// # Errors
/// As [`PrefixShape::validate`]; [`Error::Shape`] naming `thresholds`;
/// [`Error::InvalidArgument`] naming `thresholds` for a row that decreases or a negative or
/// NaN entry.
pub fn prefix_search(thresholds: &[f64], shape: &PrefixShape) -> Result<(Vec<u32>, f64)> {
    shape.validate()?;
    let PrefixShape { rows, n, budget } = *shape;
    if thresholds.len() != rows * n {
        return Err(Error::shape("thresholds", &[rows, n], &[thresholds.len()]));
    }
    let mut all: Vec<(u64, usize)> = Vec::with_capacity(rows * n);
    for (r, row) in thresholds.chunks_exact(n).enumerate() {
        for (i, &e) in row.iter().enumerate() {
            if e.is_nan() || e < 0.0 || (i > 0 && e < row[i - 1]) {
                return Err(Error::invalid(
                    "thresholds",
                    format!("entry {i} of row {r} is {e}: rows must be non-decreasing and non-negative"),
                ));
            }
            // Non-negative doubles order as their bits; +0.0 is the only zero produced.
            all.push(((e + 0.0).to_bits(), r * n + i));
        }
    }
    // By (threshold, row, entry): the flat index orders row then entry.
    all.sort_unstable();
    let mut budgets = vec![0u32; rows];
    for &(_, flat) in &all[..budget] {
        budgets[flat / n] += 1;
    }
    Ok((budgets, f64::from_bits(all[budget - 1].0)))
}

/// The result of [`prefixkv`].
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixKv {
    /// Tokens kept per row `[rows]`, summing to the budget.
    pub budgets: Vec<u32>,
    /// The retention ratio `p*`.
    pub ratio: f64,
    /// Each row's kept tokens, ascending.
    pub keep: Csr,
}

/// PrefixKV end to end on `importance [rows, n]`: sort, thresholds, search, keep lists.
///
/// # Errors
/// As [`PrefixShape::validate`]; [`Error::Shape`] naming `importance` for another length.
pub fn prefixkv(importance: &[f32], shape: &PrefixShape) -> Result<PrefixKv> {
    shape.validate()?;
    if importance.len() != shape.rows * shape.n {
        return Err(Error::shape("importance", &[shape.rows, shape.n], &[importance.len()]));
    }
    let (values, order) = prefix_sort(importance, shape)?;
    let thresholds = prefix_thresholds(&values, shape.rows, shape.n)?;
    let (budgets, ratio) = prefix_search(&thresholds, shape)?;
    let n = shape.n;
    let mut keep = Csr { indptr: vec![0], indices: Vec::new() };
    for (r, &b) in budgets.iter().enumerate() {
        let mut kept = order[r * n..r * n + b as usize].to_vec();
        kept.sort_unstable();
        push_row(&mut keep, kept)?;
    }
    Ok(PrefixKv { budgets, ratio, keep })
}
