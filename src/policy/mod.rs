//! Three more eviction and selection policies on the shared [`crate::select`] primitives:
//! WindowKV window selection, LazyEviction's lagged recurrence-aware eviction, and PrefixKV's
//! per-layer budgets.
//!
//! Each policy has a CPU reference in [`cpu`] (the contract in plain Rust) and, where it
//! adds device work, kernels in `cuda/policy.cu` that the CPU emulator runs. All three rank
//! with the crate's ranking contract (descending, **ties to the lower index**, NaN below every
//! number; see [`crate::select`]) and return **ascending** token lists.
//!
//! # WindowKV ([`WindowKvOptions`], [`cpu::windowkv_select`])
//! The input is one token score per older token, `scores [rows, t − recent]` `f32`, one row
//! per (sequence, kv head): the attention mass the observation window (the last `recent`
//! queries) gives each older key, reduced over the GQA group, exactly as SnapKV's votes
//! ([`crate::topk::cpu::snapkv_votes`], rounded to `f32`), without SnapKV's pooling (the
//! window sum already smooths).
//! - The older tokens `0 .. t − recent` are cut into `nw = ⌈(t − recent) / w⌉` windows of `w`
//!   consecutive tokens: window `i` is `i·w .. min((i + 1)·w, t − recent)`. The last window is
//!   shorter when `w` does not divide `t − recent`; a window never reaches into the recent
//!   window (it is clipped at its start).
//! - A window's score is the `f32` sum of its tokens' scores, added in ascending token order
//!   starting from `0.0` (the GPU adds in the same order, so window scores are bit-exact).
//! - The kept windows: all `nw` when `t − recent ≤ budget − recent` (everything fits), else
//!   the top `m = ⌊(budget − recent) / w⌋` windows by score (ties to the lower window).
//! - The row's list: the tokens of the kept windows and the recent window `t − recent .. t`,
//!   ascending: at most `budget` tokens, as CSR (`indptr [rows + 1]`, `indices`).
//!
//! **Choices where the paper leaves a detail open.** Its public code scores a window by the
//! mean (or the mean of the largest scores) and keeps `nw − ⌈(t − recent − budget')/w⌉`
//! windows, which can exceed the budget when the last window is short; here the score is the
//! sum (a short last window is not inflated) and the count is `⌊budget' / w⌋`, so the list
//! never exceeds `budget`. As there, the whole context is kept when it fits, and a budget
//! below one window keeps only the recent window.
//!
//! **Index sharing.** [`WindowKvOptions::share_layers`] `= g` groups layers `0 .. g`,
//! `g .. 2g`, …: the group's first layer selects and the others reuse its lists (the public
//! code's choice: the leader is the first layer of the group). [`cpu::WindowKvGroup`] holds a
//! group's lists across layers; [`WindowKvOptions::is_leader`] says which layers select.
//!
//! # LazyEviction ([`LazyOptions`], [`cpu::LazyEviction`])
//! Per kv head and token, beside H2O's accumulator `acc [hkv, t]`, two state arrays:
//! `last_hit [hkv, t]`, the decode step at which the token was last hit, and `mri [hkv, t]`,
//! its maximum recurrence interval (the longest gap between consecutive hits). Both are
//! whole numbers stored as `f32` (exact below 2^24, which the validators enforce), so the
//! compaction that moves `acc` moves them too, with no second kernel.
//! - **Update** (every decode step `s`, [`cpu::lazy_update`]), from the step's attention mass
//!   `p [hkv, t]` (the H2O accumulation of the step's queries, GQA-reduced): `acc += p`, and
//!   for every token with `p ≥ threshold`: `mri = max(mri, s − last_hit)`, `last_hit = s`.
//!   On the GPU the step's mass comes from the H2O accumulation written to a step buffer, and
//!   one elementwise pass over `[hkv, t]` applies the update (no extra pass over `K`); `acc`
//!   gets the same `f32` addition as an H2O accumulation, so the bits agree with H2O's.
//! - **New tokens** enter with `last_hit = s` (the step that appended them), `mri = 0`,
//!   `acc = 0` ([`cpu::LazyEviction::append`]).
//! - **Eviction** runs after the update of step `s` when `(s + 1) % lag == 0` and the cache
//!   holds more than `budget` tokens: keep the last `recent` tokens, then the top
//!   `budget − recent` older tokens by the score `mri − (s − last_hit)` (ties to the lower
//!   index), ascending; compact `K`, `V`, `acc`, `last_hit` and `mri` by that keep list with
//!   the in-place compaction of [`crate::topk::h2o_compact`]. `lag = 1` evicts every step
//!   (eager); between evictions the cache grows by up to `lag` tokens beyond `budget`.
//!
//! **Choices.** The paper's code was not available to this crate. The hit test is the
//! probability threshold (not the per-step top set); the score is the interval headroom
//! `mri − age` (a token silent for longer than its longest gap ranks lowest); both are exact
//! integer arithmetic in `f32`, so the ranking has no rounding.
//!
//! # PrefixKV ([`PrefixShape`], [`cpu::prefixkv`])
//! The input is `importance [rows, n]` `f32`, one row per budgeted unit: a layer (the public
//! code averages the heads of a layer first) or a (layer, head) pair. A token's **mass** is its
//! importance when that is finite and positive, else 0.
//! 1. **Sort** each row descending with the crate's ranking (the [`crate::select`] top-k with
//!    `k = n`; ties to the lower index), so `n ≤ 16384`.
//! 2. **Cumulative mass** in `f64`, in a fixed order: the row is cut into
//!    [`PREFIX_SCAN_CHUNKS`] chunks of `⌈n / 1024⌉` sorted entries; each chunk is summed in
//!    order from `0.0`; the chunk bases are the running sum of those chunk sums in order; entry
//!    `i`'s cumulative mass `C_i` is its chunk's base plus the chunk's entries up to `i`, added
//!    in order to the base; the row's total is the sum of all chunk sums in order.
//! 3. **Entry thresholds**: entry 0's is 0 and entry `i ≥ 1`'s is `e_i = C_{i−1} / total` (the
//!    share of the row's mass reached before it): a prefix of `c` entries reaches a ratio `p`
//!    exactly when `e_c ≥ p`. A row with no mass has `e_i = 1` for `i ≥ 1`.
//! 4. **Search** one ratio `p*`: order every entry of every row by `(e, row, i)` and keep the
//!    first `budget`. Each row then keeps a prefix of its sorted order: every entry with
//!    `e < p*` (its shortest prefix reaching `p*`), plus, where rows tie exactly at `p*`, the
//!    tied entries of the lower rows first until the kept counts sum to `budget` exactly.
//!    `p*` is the threshold of the last entry kept.
//! 5. **Output**: the per-row budgets `[rows]` and the keep lists (each row's kept tokens,
//!    ascending) as CSR.
//!
//! On the GPU the sort (the shared top-k) and the cumulative sums run on the device; the
//! search reads back 256 counts per round (8 rounds of 8 bits over the 64-bit threshold key)
//! and then two counts per row, which the host turns into the budgets.
//!
//! **Choices.** The public code binary-searches the ratio until the kept total is within 5 of
//! the target and then rescales the counts; here the search is exact (the counts sum to the
//! budget), with the tie rule above. It protects the first tokens and the last one; here
//! nothing is protected (raise a token's importance to keep it).
//!
//! # GPU plans
//! - [`WindowKvPlan`]: `new(device, rows, t, options)` then `run(scores, indptr, indices)`;
//!   or `with_attention(device, shape, options)` then `run_attention(q_window, k, reduce,
//!   indptr, indices)`, which computes the votes with the H2O accumulation first. Kernels:
//!   the window sums, the shared top-k of the window scores (the recent window appended as one
//!   more block), the shared expansion into CSR. `indices` holds at least `rows · t` entries.
//! - [`LazyPlan`]: `new(device, shape, options, reduce)` for one cache length `t`, then
//!   `step(step, q, k_cache, v_cache, LazyStateMut { acc, last_hit, mri })` per decode step;
//!   [`LazyPlan::keep`] holds the last eviction's keep list.
//! - [`PrefixPlan`]: `new(device, shape)` then `run(importance, indptr, indices)` returns the
//!   budgets and the ratio ([`PrefixBudgets`]); `indices` holds `budget` entries.
//!
//! Each plan's output equals its CPU reference exactly (given the same token scores; the
//! attention-fed paths share the H2O accumulation's `f32` rounding, within `1e-4` of the
//! references' `f64` masses).
//!
//! # Errors
//! Every argument is checked before anything is computed or written; a bad one returns a
//! typed [`crate::Error`] naming it. No validator, reference or accessor panics.

pub mod cpu;
pub(crate) mod gpu;

use crate::error::{checked_mul, Error, Result};
use crate::select::{MAX_K, MAX_N};

pub use gpu::{LazyPlan, LazyStateMut, PrefixBudgets, PrefixPlan, WindowKvPlan};

/// Every kernel id the policy launchers can form.
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    gpu::kernels()
}

/// The chunks of PrefixKV's fixed-order cumulative sum (one per thread of the GPU's block).
pub const PREFIX_SCAN_CHUNKS: usize = 1024;
/// The largest step or interval LazyEviction stores: its state is exact integers in `f32`.
pub const LAZY_MAX_STEP: usize = 1 << 24;

/// A CSR list per row: `indptr [rows + 1]` with `indptr[0] = 0`, row `r`'s entries at
/// `indices[indptr[r] .. indptr[r + 1]]`, ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Csr {
    /// Row offsets, `rows + 1` entries.
    pub indptr: Vec<u32>,
    /// The entries of every row, row after row.
    pub indices: Vec<u32>,
}

impl Csr {
    /// Rows of the list (`indptr.len() − 1`; 0 for an empty `indptr`).
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// Row `r`'s entries, or `None` past the last row (or for a malformed `indptr`).
    pub fn row(&self, r: usize) -> Option<&[u32]> {
        let (s, e) = (*self.indptr.get(r)? as usize, *self.indptr.get(r + 1)? as usize);
        self.indices.get(s..e)
    }
}

/// The options of a WindowKV selection (see the module docs for the contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowKvOptions {
    /// Tokens per window `w`, at least 1.
    pub window: usize,
    /// The observation (recent) window: the last `recent` tokens, always kept.
    pub recent: usize,
    /// Tokens kept per row at most, recent window included (`recent ≤ budget ≤ t`, `≥ 1`).
    pub budget: usize,
    /// Layers per index-sharing group `g ≥ 1` (1: every layer selects its own).
    pub share_layers: usize,
}

impl WindowKvOptions {
    /// Whether `layer` selects (the first of its group) or reuses its group leader's lists.
    /// `share_layers = 0` (invalid) counts every layer as a leader.
    pub fn is_leader(&self, layer: usize) -> bool {
        layer % self.share_layers.max(1) == 0
    }

    /// Windows over the older tokens of a cache of `t`: `⌈(t − recent) / w⌉` (0 when
    /// `recent ≥ t` or `w = 0`).
    pub fn windows(&self, t: usize) -> usize {
        t.saturating_sub(self.recent)
            .checked_div(self.window)
            .map_or(0, |q| q + usize::from(t.saturating_sub(self.recent) % self.window != 0))
    }

    /// Windows kept per row for a cache of `t`: all of them when the older tokens fit
    /// `budget − recent`, else `⌊(budget − recent) / w⌋`.
    pub fn kept_windows(&self, t: usize) -> usize {
        let sel = self.budget.saturating_sub(self.recent);
        if t.saturating_sub(self.recent) <= sel {
            self.windows(t)
        } else {
            sel.checked_div(self.window).unwrap_or(0)
        }
    }

    /// Checks the options for `rows` rows of a cache of `t` tokens: `rows ≥ 1`,
    /// `1 ≤ t ≤ 2^24`, `window ≥ 1`, `share_layers ≥ 1`, `recent ≤ budget ≤ t`, `budget ≥ 1`,
    /// at most 16383 kept windows (with the recent window, the 16384 blocks of the shared expansion) and `rows · t` within `u32` CSR offsets.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `scores`, `window`, `share_layers`, `recent` or
    /// `budget`; [`Error::TooLarge`] naming `scores` or `indices`.
    pub fn validate(&self, rows: usize, t: usize) -> Result<()> {
        if rows == 0 || t == 0 {
            return Err(Error::invalid(
                "scores",
                format!("{rows} rows of a cache of {t} tokens: both must be positive"),
            ));
        }
        if t > MAX_N {
            return Err(Error::too_large("scores", format!("a cache of {t} tokens; at most {MAX_N}")));
        }
        if self.window == 0 {
            return Err(Error::invalid("window", "a window holds at least one token"));
        }
        if self.share_layers == 0 {
            return Err(Error::invalid("share_layers", "a sharing group holds at least one layer"));
        }
        if self.recent > t {
            return Err(Error::invalid("recent", format!("{} exceeds the cache length {t}", self.recent)));
        }
        if self.budget == 0 {
            return Err(Error::invalid("budget", "must keep at least one token"));
        }
        if self.budget < self.recent {
            return Err(Error::invalid("budget", format!("{} is below recent = {}", self.budget, self.recent)));
        }
        if self.budget > t {
            return Err(Error::invalid("budget", format!("{} exceeds the cache length {t}", self.budget)));
        }
        let m = self.kept_windows(t);
        if m >= MAX_K {
            return Err(Error::invalid(
                "budget",
                format!(
                    "{m} kept windows and the recent window exceed the expansion's {MAX_K} blocks; use wider windows"
                ),
            ));
        }
        let cap = checked_mul("indices", rows, t)?;
        if cap > u32::MAX as usize {
            return Err(Error::too_large("indices", format!("{rows} rows of {t} tokens overflow u32 offsets")));
        }
        Ok(())
    }
}

/// The options of LazyEviction (see the module docs for the contract).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LazyOptions {
    /// Tokens kept per kv head after an eviction (`recent ≤ budget`, `budget ≥ 1`,
    /// `budget − recent ≤ 16384`).
    pub budget: usize,
    /// The last tokens always kept.
    pub recent: usize,
    /// Steps between evictions, at least 1 (1: evict every step).
    pub lag: usize,
    /// The attention mass at or above which a token counts as hit: finite and positive.
    pub threshold: f32,
}

impl LazyOptions {
    /// Checks the options: `budget ≥ 1`, `recent ≤ budget`, `budget − recent ≤ 16384`,
    /// `1 ≤ lag ≤ 2^24`, `threshold` finite and positive.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `budget`, `recent`, `lag` or `threshold`.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 {
            return Err(Error::invalid("budget", "must keep at least one token"));
        }
        if self.recent > self.budget {
            return Err(Error::invalid("recent", format!("{} exceeds budget = {}", self.recent, self.budget)));
        }
        if self.budget - self.recent > MAX_K {
            return Err(Error::invalid(
                "budget",
                format!("{} selected tokens exceed the top-k maximum {MAX_K}", self.budget - self.recent),
            ));
        }
        if self.lag == 0 || self.lag > LAZY_MAX_STEP {
            return Err(Error::invalid("lag", format!("{} must be in 1 ..= {LAZY_MAX_STEP}", self.lag)));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err(Error::invalid("threshold", format!("{} must be finite and positive", self.threshold)));
        }
        Ok(())
    }

    /// Whether the step `step` ends with an eviction check: `(step + 1) % lag == 0`.
    pub fn evicts_after(&self, step: usize) -> bool {
        (step % self.lag.max(1)) + 1 == self.lag.max(1)
    }
}

/// Checks a LazyEviction state: `hkv ≥ 1`, `1 ≤ t ≤ 2^24`, `step < 2^24` and the buffers'
/// lengths (`hkv · t` each).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `acc` or `step`; [`Error::TooLarge`] naming `acc`;
/// [`Error::Shape`] naming the buffer of the wrong length.
pub fn validate_lazy_state(hkv: usize, t: usize, step: usize, lens: &[(&'static str, usize)]) -> Result<()> {
    if hkv == 0 || t == 0 {
        return Err(Error::invalid("acc", format!("shape [{hkv}, {t}] is empty")));
    }
    if t > MAX_N {
        return Err(Error::too_large("acc", format!("{t} tokens; at most {MAX_N}")));
    }
    if step >= LAZY_MAX_STEP {
        return Err(Error::invalid("step", format!("step {step} reaches 2^24, past the exact range of the state")));
    }
    let n = checked_mul("acc", hkv, t)?;
    for &(arg, len) in lens {
        if len != n {
            return Err(Error::shape(arg, &[hkv, t], &[len]));
        }
    }
    Ok(())
}

/// The shape of a PrefixKV budget computation: `importance [rows, n]` and a global budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixShape {
    /// Budgeted rows (layers, or layer × head pairs), at least 1.
    pub rows: usize,
    /// Tokens per row, `1 ..= 16384` (the sort is the shared top-k with `k = n`).
    pub n: usize,
    /// Tokens kept over all rows, `1 ..= rows · n`.
    pub budget: usize,
}

impl PrefixShape {
    /// Checks `rows ≥ 1`, `1 ≤ n ≤ 16384`, `1 ≤ budget ≤ rows · n` and `rows · n ≤ u32::MAX`
    /// (the keep lists' CSR offsets).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `importance` or `budget`; [`Error::TooLarge`] naming
    /// `importance`.
    pub fn validate(&self) -> Result<()> {
        let PrefixShape { rows, n, budget } = *self;
        // The sort is the shared top-k with k = n: its limits, under this argument's name.
        crate::select::validate_topk(rows, n, n, None).map_err(|e| renamed(e, "importance"))?;
        let total = rows * n;
        if total > u32::MAX as usize {
            return Err(Error::too_large("importance", format!("{rows} x {n} tokens overflow u32 offsets")));
        }
        if budget == 0 || budget > total {
            return Err(Error::invalid("budget", format!("{budget} must be in 1 ..= rows · n = {total}")));
        }
        Ok(())
    }
}

/// The same error, naming `arg` instead (for a shared validator run on this family's behalf).
fn renamed(e: Error, arg: &'static str) -> Error {
    match e {
        Error::InvalidArgument { reason, .. } => Error::InvalidArgument { arg, reason },
        Error::TooLarge { reason, .. } => Error::TooLarge { arg, reason },
        Error::Shape { expected, actual, .. } => Error::Shape { arg, expected, actual },
        other => other,
    }
}
