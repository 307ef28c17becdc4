//! Page and chunk retrieval over a full KV cache: **Quest** page bounds and **ShadowKV** chunk
//! landmarks. Each keeps a small index of the cache (per-page min/max keys, per-chunk mean
//! keys), scores it against the current queries, keeps the best pages or chunks, and expands
//! them to the sorted CSR token lists that [`crate::decode::DecodePlan`] consumes.
//!
//! # Layouts (row-major, outermost first)
//! - `keys`: `[B, Hkv, Tcap, D]`, the head-major **post-RoPE** key cache (f16, bf16 or f32);
//!   sequence `b` holds `lens[b] ≤ Tcap` valid tokens (`lens` is a host slice of `B` entries).
//! - `q`: `[B, Tq, Hq, D]` in the keys' dtype, `1 ≤ Tq ≤ 16` query tokens per sequence
//!   (the layout of [`crate::decode`]). Query head `h` reads kv head `h / (Hq / Hkv)`.
//! - A **row** is one `(sequence, kv head)` pair, `row = b · Hkv + h`; every per-row output
//!   has `B · Hkv` rows in that order, which is the decode's list order.
//! - `D` is a multiple of 8 in `8 ..= 256`; buffers start 16-byte aligned (owned tensors
//!   always do; a view that does not is an [`Error::InvalidArgument`]).
//!
//! # Quest ([`QuestMetaPlan`], [`QuestSelectPlan`])
//! Page `p` of a row holds tokens `p·P .. min((p+1)·P, lens[b])` (page size `P`, default
//! [`DEFAULT_PAGE_SIZE`]); a row has `ceil(lens[b] / P)` pages, the last one possibly
//! partial.
//! - **Metadata**: `page_max [B, Hkv, NP, D]` and `page_min` (the keys' dtype, `NP =
//!   ceil(Tcap / P)`): per page and channel the max and min over the page's **valid** tokens
//!   only. Max and min ignore NaN unless every value is NaN (then NaN); among equal values
//!   (`-0.0`, `+0.0`) the earlier token's is kept. The values are copies of key elements, so
//!   GPU and CPU agree bit for bit. [`QuestMetaPlan::append`] refreshes only the pages that an
//!   append from `old[b]` to `new[b]` tokens touches (from the partial page `old[b] / P` on);
//!   pages past a row's last page are never written.
//! - **Page score** (f32): `ub(p) = Σ_d max(q_d·max_{p,d}, q_d·min_{p,d})`, taken as the max
//!   over the GQA group's query heads **and** over the `Tq` query tokens (a page matters if it
//!   matters to any query row reading it). Products and sums are single f32 roundings in a
//!   fixed order (see *Determinism*).
//! - **Selection** with a budget of `k` pages per row: the row's **last page is always kept**,
//!   and the other `k − 1` slots are the top pages among pages `0 .. last` by score
//!   (descending, ties to the lower page, NaN below every number: [`crate::select`]). A row
//!   with at most `k` pages keeps them all; a budget of 1 keeps only the last page.
//!   `pages [B·Hkv, k]` (u32) holds the ranked pages in slots `0 .. k−1` (padding `u32::MAX`
//!   past the row's pages) and the last page in slot `k − 1` (`u32::MAX` for an empty row).
//!   The CSR output (`indptr [B·Hkv + 1]`, `indices`) lists every valid token of the kept
//!   pages, ascending.
//!
//! # ShadowKV ([`LandmarkPlan`], [`LandmarkSelectPlan`])
//! Chunk `c` of a row holds tokens `8c .. min(8c + 8, lens[b])` ([`CHUNK_TOKENS`]); a partial
//! last chunk counts only its valid tokens.
//! - **Landmark** (f32, `[B, Hkv, NC, D]`, `NC = ceil(Tcap / 8)`): the mean of the chunk's
//!   keys, `(k_0 + k_1 + … ) / n` summed in token order.
//! - **Outliers**: `min_cos [B, Hkv, NC]` (f32) is the lowest cosine between the landmark and
//!   the chunk's keys, `cos = l·k / (max(‖l‖, ε)·max(‖k‖, ε))` with `ε = 1e-8` (torch's
//!   `cosine_similarity`). The `n_out` chunks with the **lowest** `min_cos` (ties to the lower
//!   chunk, NaN last) are the outliers: `outliers [B·Hkv, n_out]` (u32, lowest first, padding
//!   `u32::MAX` for rows with fewer chunks). ShadowKV keeps those chunks exactly.
//! - **Selection** with a budget of `k` chunks: per query head and query token, `softmax(q ·
//!   Lᵀ · s)` over the row's chunks (`s = 1/√D`, computed as `1 / sqrt(D as f32)`), summed over
//!   the `Tq` query tokens, max over the GQA group; the top `k` of the **non-outlier** chunks
//!   by that score (descending, ties lower, NaN last), then the outliers. `chunks [B·Hkv, k +
//!   n_out]` holds the `k` ranked chunks (the slots past the row's non-outlier chunks take
//!   outlier chunks, then padding) followed by the row's `n_out` outliers; the CSR lists every
//!   valid token of those chunks once, ascending.
//!
//! # Determinism
//! Every float in the pipeline is computed by the same f32 operations in the same order on
//! the GPU and in [`cpu`], so scores, landmarks, cosines and every index list are **bit-exact**
//! (the tests compare with `==`). Each dot product over `D` is summed in 8-channel groups (a
//! group's channels in order, starting from `0.0`), then over the `D/8` group partials, padded
//! with zeros to the power of two `L`, by halving (`p[i] += p[i + n]` for `n = L/2, …, 1`).
//! The softmax uses its own exp ([`cpu::exp_det`]: a degree-7 polynomial after a two-part
//! `ln 2` reduction, 0 below `-87`) instead of the hardware approximation; its max and sum run
//! over 256 strided partials (`c ≡ i mod 256`, in order) folded by halving. Max and min ignore
//! NaN unless every value is NaN. Nothing uses atomics.
//!
//! # Plans
//! Every plan validates its shape, loads its kernels, sizes its grids from the kernels'
//! occupancy and allocates its workspace in `new`; a `run` checks every buffer (device, shape,
//! length, alignment) and the host `lens`, copies the per-row lengths from plan-owned host
//! buffers into the plan's device buffers (host-to-device only, as [`crate::select::TopkPlan`]
//! does) and enqueues launches: no allocation and no device-to-host read-back. A plan serves
//! every layer and every decode step of its shape.
//!
//! The only device-resident index input is `outliers`; it needs no validation pass: an id at or
//! past its row's chunk count (the `u32::MAX` padding included) excludes nothing and expands to
//! no token, so no value can make a kernel read or write out of bounds.
//!
//! # Errors
//! Every argument is checked before any launch: [`Error::InvalidArgument`],
//! [`Error::Shape`], [`Error::TooLarge`] or [`Error::DeviceMismatch`] naming it, and nothing
//! is written. No validator, reference or plan panics on any argument.
//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::pages::{QuestMetaPlan, QuestMetaShape, QuestSelectPlan, QuestSelectShape};
//! use ntkv::{Device, DeviceTensor};
//! # fn main() -> ntkv::Result<()> {
//! let device = Device::new(0)?;
//! // 1 sequence, 8 kv heads (32 query heads), D = 128, a 32768-token cache, pages of 16.
//! let meta = QuestMetaShape { batch: 1, hkv: 8, capacity: 32768, head_dim: 128, page_size: 16 };
//! let keys = DeviceTensor::<f16>::zeros(&device, &meta.keys_shape())?;
//! let mut page_max = DeviceTensor::<f16>::zeros(&device, &meta.meta_shape())?;
//! let mut page_min = DeviceTensor::<f16>::zeros(&device, &meta.meta_shape())?;
//! let mut meta_plan = QuestMetaPlan::new(&device, &meta)?;
//! meta_plan.build(&keys, &[30000], &mut page_max, &mut page_min)?;
//!
//! // Each decode step: keep 64 pages (1024 tokens) per kv head.
//! let sel = QuestSelectShape { batch: 1, hq: 32, hkv: 8, q_tokens: 1, head_dim: 128, capacity: 32768, page_size: 16, budget: 64 };
//! let mut plan = QuestSelectPlan::new(&device, &sel)?;
//! let q = DeviceTensor::<f16>::zeros(&device, &sel.q_shape())?;
//! let mut pages = DeviceTensor::<u32>::zeros(&device, &sel.pages_shape())?;
//! let mut indptr = DeviceTensor::<u32>::zeros(&device, &[sel.rows() + 1])?;
//! let mut indices = DeviceTensor::<u32>::zeros(&device, &[sel.capacity_tokens()?])?;
//! plan.run(&q, &page_max, &page_min, &[30000], &mut pages, &mut indptr, &mut indices)?;
//! // indptr / indices feed DecodePlan::new directly.
//! # Ok(())
//! # }
//! ```

pub mod cpu;
pub(crate) mod gpu;

pub use gpu::{LandmarkPlan, LandmarkSelectPlan, QuestMetaPlan, QuestSelectPlan};

use crate::error::{checked_mul, Error, Result};
use crate::select::{BlockMap, ExpandShape, MAX_K};

/// Quest's page size unless the shape says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 16;
/// The largest page size accepted.
pub const MAX_PAGE_SIZE: usize = 4096;
/// Tokens per ShadowKV chunk.
pub const CHUNK_TOKENS: usize = 8;
/// The largest head dim accepted (`D/8` lanes must fit a warp).
pub const MAX_HEAD_DIM: usize = 256;
/// Most query tokens per sequence.
pub const MAX_Q_TOKENS: usize = 16;
/// The norm floor of the cosine (torch's `cosine_similarity` eps).
pub const COSINE_EPS: f32 = 1e-8;
/// Most work items (lane groups or threads) of one launch: the kernels index them in 32 bits.
const MAX_ITEMS: usize = 1 << 31;

/// The lanes of one dot product: `D / 8` partials, padded to the power of two `L` (`≤ 32`).
pub fn lanes(head_dim: usize) -> (usize, usize) {
    let l = head_dim / 8;
    (l, l.next_power_of_two().max(1))
}

/// The softmax scale of the landmark selection: `1 / sqrt(D)` in f32.
pub fn landmark_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

fn check_cache(batch: usize, hkv: usize, capacity: usize, head_dim: usize) -> Result<()> {
    if batch == 0 || hkv == 0 {
        return Err(Error::invalid("keys", format!("batch = {batch} and hkv = {hkv} must be positive")));
    }
    if capacity == 0 || capacity > u32::MAX as usize / 2 {
        return Err(Error::invalid("capacity", format!("{capacity} must be in 1 ..= 2^31 - 1")));
    }
    if head_dim == 0 || head_dim % 8 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid("head_dim", format!("{head_dim} must be a multiple of 8 in 8 ..= {MAX_HEAD_DIM}")));
    }
    let rows = checked_mul("keys", batch, hkv)?;
    if rows > u32::MAX as usize {
        return Err(Error::too_large("keys", format!("{rows} rows do not fit u32")));
    }
    crate::tensor::checked_numel::<f32>("keys", &[rows, capacity, head_dim])?;
    Ok(())
}

fn check_items(arg: &'static str, dims: &[usize]) -> Result<()> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= MAX_ITEMS => Ok(()),
        _ => Err(Error::too_large(arg, format!("{dims:?} work items exceed 2^31"))),
    }
}

fn check_queries(hq: usize, hkv: usize, q_tokens: usize) -> Result<()> {
    if hq == 0 || hq % hkv != 0 {
        return Err(Error::invalid("hq", format!("hq = {hq} must be a positive multiple of hkv = {hkv}")));
    }
    if q_tokens == 0 || q_tokens > MAX_Q_TOKENS {
        return Err(Error::invalid("q_tokens", format!("{q_tokens} must be in 1 ..= {MAX_Q_TOKENS}")));
    }
    Ok(())
}

/// Checks host `lens [batch]`: each at most `capacity`.
///
/// # Errors
/// [`Error::Shape`] naming `lens` for another count; [`Error::InvalidArgument`] naming `lens`
/// for an entry above `capacity`.
pub fn validate_lens(lens: &[u32], batch: usize, capacity: usize) -> Result<()> {
    if lens.len() != batch {
        return Err(Error::shape("lens", &[batch], &[lens.len()]));
    }
    if let Some((b, &l)) = lens.iter().enumerate().find(|&(_, &l)| l as usize > capacity) {
        return Err(Error::invalid("lens", format!("lens[{b}] = {l} exceeds the capacity {capacity}")));
    }
    Ok(())
}

/// The shape of a Quest metadata build: keys `[batch, hkv, capacity, head_dim]`, pages of
/// `page_size` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuestMetaShape {
    /// Sequences, at least 1.
    pub batch: usize,
    /// Key/value heads, at least 1.
    pub hkv: usize,
    /// Tokens the cache holds per row, `1 ..= 2^31 − 1`.
    pub capacity: usize,
    /// Channels, a multiple of 8 in `8 ..= 256`.
    pub head_dim: usize,
    /// Tokens per page, `1 ..= 4096` (Quest uses [`DEFAULT_PAGE_SIZE`]).
    pub page_size: usize,
}

impl QuestMetaShape {
    /// Checks every size (see the fields) and that the work fits 32-bit indexing.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `keys`, `capacity`, `head_dim` or `page_size`;
    /// [`Error::TooLarge`] naming `keys` or `page_max` when the sizes overflow.
    pub fn validate(&self) -> Result<()> {
        check_cache(self.batch, self.hkv, self.capacity, self.head_dim)?;
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return Err(Error::invalid("page_size", format!("{} must be in 1 ..= {MAX_PAGE_SIZE}", self.page_size)));
        }
        check_items("page_max", &[self.batch, self.hkv, self.n_pages(), self.head_dim / 8])
    }

    /// Pages per row: `ceil(capacity / page_size)`.
    pub fn n_pages(&self) -> usize {
        self.capacity.div_ceil(self.page_size.max(1))
    }

    /// `[batch, hkv, capacity, head_dim]`.
    pub fn keys_shape(&self) -> Vec<usize> {
        vec![self.batch, self.hkv, self.capacity, self.head_dim]
    }

    /// `[batch, hkv, n_pages, head_dim]`, the shape of `page_max` and `page_min`.
    pub fn meta_shape(&self) -> Vec<usize> {
        vec![self.batch, self.hkv, self.n_pages(), self.head_dim]
    }
}

/// Declares a selection shape: the query fields every selection step shares (`batch`, `hq`,
/// `hkv`, `q_tokens`, `head_dim`, `capacity`), then the step's own.
macro_rules! selection_shape {
    ($(#[$m:meta])* $name:ident, $head_dim_doc:literal, { $($(#[$fm:meta])* $field:ident,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name {
            /// Sequences.
            pub batch: usize,
            /// Query heads, a multiple of `hkv`.
            pub hq: usize,
            /// Key/value heads.
            pub hkv: usize,
            /// Query tokens per sequence, `1 ..= 16`.
            pub q_tokens: usize,
            #[doc = $head_dim_doc]
            pub head_dim: usize,
            /// Tokens of the cache per row.
            pub capacity: usize,
            $($(#[$fm])* pub $field: usize,)*
        }
    };
}

selection_shape!(
    /// The shape of a Quest selection step: `q [batch, q_tokens, hq, head_dim]` against the
    /// metadata of a [`QuestMetaShape`] with the same `batch`, `hkv`, `capacity`, `head_dim`
    /// and `page_size`, keeping `budget` pages per row.
    QuestSelectShape,
    "Channels, a multiple of 8 in `8 ..= 256`.",
    {
        /// Tokens per page.
        page_size,
        /// Pages kept per row, the last page included, `1 ..= 16384`.
        budget,
    }
);

/// `rows()` and `q_shape()` of the selection shapes, which share the query fields.
macro_rules! query_rows_and_shape {
    () => {
        /// Rows: `batch · hkv`.
        pub fn rows(&self) -> usize {
            self.batch.saturating_mul(self.hkv)
        }

        /// `[batch, q_tokens, hq, head_dim]`.
        pub fn q_shape(&self) -> Vec<usize> {
            vec![self.batch, self.q_tokens, self.hq, self.head_dim]
        }
    };
}

impl QuestSelectShape {
    /// The metadata shape this selection reads.
    pub fn meta(&self) -> QuestMetaShape {
        QuestMetaShape {
            batch: self.batch,
            hkv: self.hkv,
            capacity: self.capacity,
            head_dim: self.head_dim,
            page_size: self.page_size,
        }
    }

    /// Checks the metadata shape, the heads, `q_tokens` and `budget`.
    ///
    /// # Errors
    /// As [`QuestMetaShape::validate`]; [`Error::InvalidArgument`] naming `hq`, `q_tokens` or
    /// `budget`; [`Error::TooLarge`] naming `indices` when the token lists could exceed
    /// `u32::MAX` entries.
    pub fn validate(&self) -> Result<()> {
        self.meta().validate()?;
        check_queries(self.hq, self.hkv, self.q_tokens)?;
        if self.budget == 0 || self.budget > MAX_K {
            return Err(Error::invalid("budget", format!("{} pages must be in 1 ..= {MAX_K}", self.budget)));
        }
        crate::tensor::checked_numel::<f32>("q", &self.q_shape())?;
        check_items("page_max", &[self.rows(), self.meta().n_pages()])?;
        self.expand_shape().validate()
    }

    query_rows_and_shape!();

    /// `[batch · hkv, budget]`, the shape of `pages`.
    pub fn pages_shape(&self) -> Vec<usize> {
        vec![self.rows(), self.budget]
    }

    /// The expansion of the kept pages.
    pub fn expand_shape(&self) -> ExpandShape {
        ExpandShape {
            rows: self.rows(),
            kb: self.budget,
            nb: self.meta().n_pages(),
            t: self.capacity,
            map: BlockMap::Fixed { block_size: self.page_size },
        }
    }

    /// The entries `indices` must hold: `rows · min(capacity, budget · page_size)`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming `indices` beyond `u32::MAX`.
    pub fn capacity_tokens(&self) -> Result<usize> {
        self.expand_shape().capacity()
    }
}

/// The shape of a ShadowKV landmark build: keys `[batch, hkv, capacity, head_dim]` in chunks of
/// [`CHUNK_TOKENS`], with `outliers` outlier chunks per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LandmarkShape {
    /// Sequences.
    pub batch: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Tokens of the cache per row.
    pub capacity: usize,
    /// Channels, a multiple of 8 in `8 ..= 256`.
    pub head_dim: usize,
    /// Outlier chunks per row, `0 ..= 16384` (0: none; the plans then take any `u32` tensor of
    /// the device for `outliers`, check only its device and never touch it, and the CPU
    /// references take an empty slice).
    pub outliers: usize,
}

impl LandmarkShape {
    /// Checks the sizes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `keys`, `capacity`, `head_dim` or `outliers`;
    /// [`Error::TooLarge`] naming `keys` or `landmarks`.
    pub fn validate(&self) -> Result<()> {
        check_cache(self.batch, self.hkv, self.capacity, self.head_dim)?;
        if self.outliers > MAX_K {
            return Err(Error::invalid("outliers", format!("{} must be at most {MAX_K}", self.outliers)));
        }
        check_items("landmarks", &[self.rows(), self.n_chunks(), lanes(self.head_dim).1])
    }

    /// Chunks per row: `ceil(capacity / 8)`.
    pub fn n_chunks(&self) -> usize {
        self.capacity.div_ceil(CHUNK_TOKENS)
    }

    /// Rows: `batch · hkv`.
    pub fn rows(&self) -> usize {
        self.batch.saturating_mul(self.hkv)
    }

    /// `[batch, hkv, capacity, head_dim]`.
    pub fn keys_shape(&self) -> Vec<usize> {
        vec![self.batch, self.hkv, self.capacity, self.head_dim]
    }

    /// `[batch, hkv, n_chunks, head_dim]` (f32).
    pub fn landmarks_shape(&self) -> Vec<usize> {
        vec![self.batch, self.hkv, self.n_chunks(), self.head_dim]
    }

    /// `[batch, hkv, n_chunks]` (f32), the shape of `min_cos`.
    pub fn cos_shape(&self) -> Vec<usize> {
        vec![self.batch, self.hkv, self.n_chunks()]
    }

    /// `[batch · hkv, outliers]` (u32).
    pub fn outliers_shape(&self) -> Vec<usize> {
        vec![self.rows(), self.outliers]
    }
}

selection_shape!(
    /// The shape of a ShadowKV selection step: `q [batch, q_tokens, hq, head_dim]` against the
    /// landmarks and outliers of a [`LandmarkShape`] with the same `batch`, `hkv`, `capacity`,
    /// `head_dim` and `outliers`, ranking `budget` chunks per row.
    LandmarkSelectShape,
    "Channels, as [`LandmarkShape::head_dim`].",
    {
        /// Outlier chunks per row (kept on top of the budget).
        outliers,
        /// Ranked chunks per row, `1 ..= 16384`.
        budget,
    }
);

impl LandmarkSelectShape {
    /// The landmark shape this selection reads.
    pub fn landmarks(&self) -> LandmarkShape {
        LandmarkShape {
            batch: self.batch,
            hkv: self.hkv,
            capacity: self.capacity,
            head_dim: self.head_dim,
            outliers: self.outliers,
        }
    }

    /// Checks the landmark shape, the heads, `q_tokens` and `budget`.
    ///
    /// # Errors
    /// As [`LandmarkShape::validate`]; [`Error::InvalidArgument`] naming `hq`, `q_tokens` or
    /// `budget` (also when `budget + outliers` exceeds 16384); [`Error::TooLarge`] naming
    /// `logits` or `indices`.
    pub fn validate(&self) -> Result<()> {
        let lm = self.landmarks();
        lm.validate()?;
        check_queries(self.hq, self.hkv, self.q_tokens)?;
        if self.budget == 0 || self.budget.saturating_add(self.outliers) > MAX_K {
            return Err(Error::invalid(
                "budget",
                format!("{} chunks (plus {} outliers) must be in 1 ..= {MAX_K}", self.budget, self.outliers),
            ));
        }
        crate::tensor::checked_numel::<f32>("q", &self.q_shape())?;
        check_items("logits", &[self.batch, self.hq, self.q_tokens, lm.n_chunks()])?;
        check_items("landmarks", &[self.rows(), lm.n_chunks(), lanes(self.head_dim).1])?;
        self.expand_shape().validate()
    }

    query_rows_and_shape!();

    /// `[batch · hkv, budget + outliers]`, the shape of `chunks`.
    pub fn chunks_shape(&self) -> Vec<usize> {
        vec![self.rows(), self.budget + self.outliers]
    }

    /// The expansion of the kept chunks.
    pub fn expand_shape(&self) -> ExpandShape {
        ExpandShape {
            rows: self.rows(),
            kb: self.budget.saturating_add(self.outliers),
            nb: self.landmarks().n_chunks(),
            t: self.capacity,
            map: BlockMap::Fixed { block_size: CHUNK_TOKENS },
        }
    }

    /// The entries `indices` must hold.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming `indices` beyond `u32::MAX`.
    pub fn capacity_tokens(&self) -> Result<usize> {
        self.expand_shape().capacity()
    }
}

/// Every kernel id the launchers of this module can form.
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    gpu::kernels()
}
