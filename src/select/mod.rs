//! Shared selection primitives: exact radix top-k over the rows of a matrix or the segments
//! of a ragged array, and the expansion of selected blocks (pages, chunks, clusters of
//! consecutive tokens) into sorted CSR token lists.
//!
//! Every eviction and retrieval method in the crate ranks something and keeps the best:
//! [`crate::topk`] (plain top-k, H2O, SnapKV) calls this module, and page, chunk and cluster
//! ranking call it the same way. Each operation has a CPU reference in [`cpu`] that the GPU
//! matches bit for bit.
//!
//! # The ranking contract (all operations)
//! - The `k` largest elements, **descending** by value; **ties go to the lower index**.
//! - **NaN ranks below every number, `-inf` included**, and every NaN ties with every other
//!   NaN (so among NaNs the lower index wins). `-0.0` and `+0.0` tie.
//! - `f16` and `bf16` rank by their exact `f32` value.
//! - When fewer than `k` elements are eligible (a short row or segment, or a per-segment
//!   `k` below the width), the slots past them hold the **padding**: index `u32::MAX` and
//!   value `-inf`. Padding is always at the end of a row.
//! - [`TopkOrder::Index`] writes the same selected set with the indices ascending instead
//!   (values follow their indices).
//! - Sizes: `1 ≤ k ≤ 16384` ([`MAX_K`]), `1 ≤ n ≤ 2^24` ([`MAX_N`]) elements per row or
//!   segment, any number of rows; `rows · n` must not overflow.
//!
//! # Algorithm (GPU)
//! A radix select on a 32-bit order-preserving key ([`cpu::rank_key`]): a 12-bit histogram
//! of the whole row finds the bucket of the `k`-th key, keys above it are taken, and 8-bit
//! passes over the candidates of that bucket, on the 56-bit composite
//! `key · 2^24 + (2^24 − 1 − index)` (unique per element, so ties resolve by index), find the
//! exact threshold. A bitonic sort of the `k` selected composites in shared memory orders
//! the output. No row is ever sorted whole. With at least one row per SM, one block per row
//! does everything in one launch; otherwise several blocks share each row's histogram and
//! filter passes (as many as fit on the device in one wave, from the kernel's real
//! occupancy: [`TopkLayout::choose`]) and a third launch finishes each row.
//!
//! # Segments
//! [`SegmentTopkPlan`] takes the top-`k` of every segment `s` of a ragged `scores [total]`,
//! `scores[indptr[s] .. indptr[s + 1]]`, with an optional per-segment `ks[s] ≤ k`; the output
//! is `[segments, k]`, indices local to the segment, padded as above.
//!
//! # Expansion
//! [`ExpandPlan`] turns selected block ids `blocks [rows, kb]` into, per row, the sorted
//! unique list of the tokens those blocks cover (see [`ExpandShape`]), as CSR `indptr
//! [rows + 1]` and `indices`: exactly the lists the sparse-index decode consumes.
//!
//! # Errors
//! Every argument is checked before any launch; a bad one returns an error naming it and
//! nothing is written. No validator, reference or accessor panics on any argument.

pub mod cpu;
pub(crate) mod gpu;

use crate::error::{checked_mul, Error, Result};

pub use gpu::{ExpandPlan, SegmentTopkPlan, TopkPlan};

/// The largest `k` the top-k accepts.
pub const MAX_K: usize = 16384;
/// The longest row (or segment) the top-k accepts: indices use 24 bits inside the kernels.
pub const MAX_N: usize = 1 << 24;
/// The most scratch memory a [`TopkPlan`] allocates; larger problems run in row batches.
pub const TOPK_WORKSPACE_BYTES: usize = 256 << 20;
/// The grid's y limit, which bounds the rows of one launch batch.
const MAX_BATCH_ROWS: usize = 65535;

/// The order of a top-k's output row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TopkOrder {
    /// Descending by value, ties by ascending index (the default).
    #[default]
    Value,
    /// The same selected set with the indices ascending: a sorted index list.
    Index,
}

/// Options of a [`TopkPlan`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TopkOptions {
    /// The output order.
    pub order: TopkOrder,
}

/// The shape of a row top-k: the top-`k` of each of `rows` rows of `n` scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopkShape {
    /// Rows (at least 1).
    pub rows: usize,
    /// Scores per row, `1 ..= 2^24`.
    pub n: usize,
    /// Selected slots per row, `1 ..= 16384` (may exceed `n`: the extra slots are padding).
    pub k: usize,
}

impl TopkShape {
    /// Checks `rows ≥ 1`, `1 ≤ n ≤ 2^24`, `1 ≤ k ≤ 16384`, and that `rows · n` and
    /// `rows · k` (the buffers' element counts) do not overflow.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `scores` (empty shape) or `k`; [`Error::TooLarge`]
    /// naming `scores` for `n > 2^24` or an overflowing size.
    pub fn validate(&self) -> Result<()> {
        let TopkShape { rows, n, k } = *self;
        if rows == 0 || n == 0 {
            return Err(Error::invalid("scores", format!("shape [{rows}, {n}] is empty")));
        }
        if n > MAX_N {
            return Err(Error::too_large("scores", format!("rows of {n} elements; at most {MAX_N}")));
        }
        if k == 0 {
            return Err(Error::invalid("k", "k must be at least 1"));
        }
        if k > MAX_K {
            return Err(Error::invalid("k", format!("k = {k} exceeds the maximum {MAX_K}")));
        }
        checked_numel4("scores", rows, n)?;
        checked_numel4("values", rows, k)?;
        Ok(())
    }

    /// Checks per-row `lengths`: `rows` entries, each at most `n`.
    ///
    /// # Errors
    /// [`Error::Shape`] for another count; [`Error::InvalidArgument`] naming `lengths` for an
    /// entry above `n`.
    pub fn validate_lengths(&self, lengths: &[u32]) -> Result<()> {
        crate::error::check_counts("lengths", lengths, self.rows, self.n, "the row length")
    }
}

/// `a · b` elements of at most 4 bytes must fit the address space.
fn checked_numel4(arg: &'static str, a: usize, b: usize) -> Result<usize> {
    let n = checked_mul(arg, a, b)?;
    if n > (isize::MAX as usize) / 4 {
        return Err(Error::too_large(arg, format!("{a} x {b} elements overflow the address space")));
    }
    Ok(n)
}

/// Checks top-k arguments: as [`TopkShape::validate`], then `lengths` (when given) as
/// [`TopkShape::validate_lengths`].
///
/// # Errors
/// As those two.
pub fn validate_topk(rows: usize, n: usize, k: usize, lengths: Option<&[u32]>) -> Result<()> {
    let shape = TopkShape { rows, n, k };
    shape.validate()?;
    lengths.map_or(Ok(()), |l| shape.validate_lengths(l))
}

/// How the GPU top-k splits its work; chosen once per shape by [`TopkLayout::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopkLayout {
    /// Blocks that share one row in the histogram and filter passes. 1 selects the fused
    /// path: one block per row does the whole selection in a single launch.
    pub blocks_per_row: usize,
    /// Elements of a row per block (a multiple of 2048).
    pub chunk: usize,
    /// Rows per launch batch (bounded by [`TOPK_WORKSPACE_BYTES`] and the grid's y limit).
    pub rows_per_batch: usize,
    /// The shared-memory sort size: the power of two `≥ k`.
    pub kpad: usize,
    /// Blocks per row of the finalize launch (split path; 1 on the fused path): a power of
    /// two `≤ kpad / 256` (or 1), each writing `kpad / finalize_blocks` output slots.
    pub finalize_blocks: usize,
}

impl TopkLayout {
    /// Chooses the split for the top-`k` of `rows × n` on a device with `sm_count` SMs, where
    /// `blocks_per_sm` blocks of the histogram and filter kernels fit on one SM (the
    /// driver's occupancy of those kernels, [`crate::launch::blocks_per_sm`]; 3 on an H200).
    ///
    /// With at least one row per SM in a batch, each row gets one block that does everything
    /// in one launch. Otherwise each row is split into chunks (multiples of 2048 elements,
    /// never fewer than 4096 per block) so that a batch's histogram and filter grids fill
    /// the device in at most one wave (`blocks_per_row · rows_per_batch ≤ blocks_per_sm ·
    /// sm_count` whenever a row can be split that far), and a third launch finishes each row
    /// with `finalize_blocks` blocks (the largest power of two `≤ sm_count / rows_per_batch`,
    /// at most `kpad / 256`), each sorting one slice of the row's output.
    ///
    /// A pure function of its arguments, so a geometry report can call it without a GPU.
    ///
    /// # Errors
    /// As [`TopkShape::validate`]; [`Error::InvalidArgument`] naming `sm_count` or
    /// `blocks_per_sm` when zero.
    pub fn choose(rows: usize, n: usize, k: usize, sm_count: usize, blocks_per_sm: usize) -> Result<Self> {
        TopkShape { rows, n, k }.validate()?;
        if sm_count == 0 {
            return Err(Error::invalid("sm_count", "a device has at least one SM"));
        }
        if blocks_per_sm == 0 {
            return Err(Error::invalid("blocks_per_sm", "at least one block must fit on an SM"));
        }
        // n <= 2^24 and k <= 2^14 after validation: none of the sums below can overflow.
        let kpad = k.next_power_of_two();
        let per_row_bytes = Self::per_row_words(n, k) * 4;
        let rows_per_batch = (TOPK_WORKSPACE_BYTES / per_row_bytes).clamp(1, rows.min(MAX_BATCH_ROWS));
        let max_bpr = n.div_ceil(4096).max(1);
        let bpr = if rows_per_batch >= sm_count {
            1
        } else {
            let resident = blocks_per_sm.saturating_mul(sm_count);
            (resident / rows_per_batch).clamp(1, max_bpr)
        };
        let chunk = n.div_ceil(bpr).div_ceil(2048) * 2048;
        let blocks_per_row = n.div_ceil(chunk).max(1);
        // About one finalize block per SM: each sorts a slice of at least 256 of the kpad words.
        let finalize_blocks = if blocks_per_row == 1 {
            1
        } else {
            let per_row = (sm_count / rows_per_batch).max(1);
            let floor_pow2 = 1usize << per_row.ilog2();
            floor_pow2.min((kpad / 256).max(1))
        };
        Ok(TopkLayout { blocks_per_row, chunk, rows_per_batch, kpad, finalize_blocks })
    }

    fn per_row_words(n: usize, k: usize) -> usize {
        n + k + 4096 + 8
    }

    /// Bytes of device scratch the layout needs for rows of `n` and top-`k`, or `None` on
    /// overflow (never for a layout that [`Self::choose`] returned, with its `n` and `k`).
    pub fn workspace_bytes(&self, n: usize, k: usize) -> Option<usize> {
        n.checked_add(k)?.checked_add(4096 + 8)?.checked_mul(4)?.checked_mul(self.rows_per_batch)
    }

    /// The histogram grid of one full batch in waves of `blocks_per_sm · sm_count` resident
    /// blocks (the figure the static review checks; 0 for the fused path, which launches one
    /// block per row instead).
    pub fn waves(&self, sm_count: usize, blocks_per_sm: usize) -> f64 {
        if self.blocks_per_row == 1 {
            return 0.0;
        }
        let resident = sm_count.saturating_mul(blocks_per_sm).max(1);
        (self.blocks_per_row.saturating_mul(self.rows_per_batch)) as f64 / resident as f64
    }
}

/// The shape of a segmented top-k: the top-`k` of each of `segments` segments of a ragged
/// `scores [total]`, none longer than `max_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentShape {
    /// Segments (at least 1); `indptr` has `segments + 1` entries.
    pub segments: usize,
    /// Elements of the ragged array (`indptr[segments]`), at most `u32::MAX`.
    pub total: usize,
    /// The longest segment allowed, `1 ..= 2^24` (the GPU pads segments to it).
    pub max_len: usize,
    /// Output slots per segment, `1 ..= 16384`.
    pub k: usize,
}

impl SegmentShape {
    /// Checks the sizes: as [`TopkShape::validate`] for `[segments, max_len]` top-`k`, and
    /// `total ≤ u32::MAX` (indptr is `u32`).
    ///
    /// # Errors
    /// As [`TopkShape::validate`]; [`Error::TooLarge`] naming `indptr` for a `total` above
    /// `u32::MAX`.
    pub fn validate(&self) -> Result<()> {
        TopkShape { rows: self.segments, n: self.max_len, k: self.k }.validate()?;
        if self.total > u32::MAX as usize {
            return Err(Error::too_large("indptr", format!("{} elements do not fit u32 offsets", self.total)));
        }
        Ok(())
    }

    /// Checks `indptr [segments + 1]`: `indptr[0] = 0`, non-decreasing, `indptr[segments] =
    /// total`, and no segment longer than `max_len`.
    ///
    /// # Errors
    /// [`Error::Shape`] for another length; [`Error::InvalidArgument`] naming `indptr`.
    pub fn validate_indptr(&self, indptr: &[u32]) -> Result<()> {
        if Some(indptr.len()) != self.segments.checked_add(1) {
            return Err(Error::shape("indptr", &[self.segments.saturating_add(1)], &[indptr.len()]));
        }
        if indptr[0] != 0 {
            return Err(Error::invalid("indptr", format!("indptr[0] = {}; it must be 0", indptr[0])));
        }
        for (s, w) in indptr.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(Error::invalid(
                    "indptr",
                    format!("indptr[{}] = {} is below indptr[{s}] = {}", s + 1, w[1], w[0]),
                ));
            }
            let len = (w[1] - w[0]) as usize;
            if len > self.max_len {
                return Err(Error::invalid(
                    "indptr",
                    format!("segment {s} has {len} elements; max_len is {}", self.max_len),
                ));
            }
        }
        let last = indptr[self.segments] as usize;
        if last != self.total {
            return Err(Error::invalid(
                "indptr",
                format!("indptr[{}] = {last}; it must equal total = {}", self.segments, self.total),
            ));
        }
        Ok(())
    }

    /// Checks per-segment `ks [segments]`: each at most `k` (0 selects nothing).
    ///
    /// # Errors
    /// [`Error::Shape`] for another length; [`Error::InvalidArgument`] naming `ks`.
    pub fn validate_ks(&self, ks: &[u32]) -> Result<()> {
        crate::error::check_counts("ks", ks, self.segments, self.k, "the output width k =")
    }
}

/// Where the tokens of a block come from in an [`ExpandShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockMap {
    /// Block `b` covers tokens `b · block_size .. (b + 1) · block_size` (pages, chunks).
    Fixed {
        /// Tokens per block, at least 1.
        block_size: usize,
    },
    /// Block `b` covers `ranges[b, 0] .. ranges[b, 1]` (a `u32` tensor `[nb, 2]` shared by
    /// every row when `shared`, else `[rows, nb, 2]`, one map per row). A range whose start
    /// is not below its end is empty; ranges may overlap.
    Ranges {
        /// Whether one map serves every row.
        shared: bool,
    },
}

/// The shape of a block expansion: `blocks [rows, kb]` selected block ids per row, among
/// `nb` blocks, over rows of at most `t` tokens.
///
/// Row `r`'s list is every token `j < min(lengths[r], t)` that lies in a block
/// `blocks[r, i] < nb`, ascending and without repeats. Ids `≥ nb` (the `u32::MAX` padding
/// of a top-k, for example) select nothing; repeated ids and overlapping ranges are merged.
/// The output is CSR: `indptr [rows + 1]` (`indptr[0] = 0`) and `indices`, which must hold at
/// least [`Self::capacity`] entries (the longest possible output); the entries past
/// `indptr[rows]` are left as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpandShape {
    /// Rows (for the sparse decode: sequences × kv heads), at least 1.
    pub rows: usize,
    /// Selected block ids per row, `1 ..= 16384`.
    pub kb: usize,
    /// Blocks per row (the ids that select something are `0 .. nb`), at least 1.
    pub nb: usize,
    /// Tokens per row at most (`lengths` are clipped to it), `1 ..= u32::MAX`.
    pub t: usize,
    /// How block ids map to tokens.
    pub map: BlockMap,
}

impl ExpandShape {
    /// Checks the sizes, and that the longest output fits `u32` offsets.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `blocks`, `block_size` or `lengths`;
    /// [`Error::TooLarge`] naming `indices` when the output could exceed `u32::MAX` tokens.
    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.kb == 0 || self.nb == 0 {
            return Err(Error::invalid(
                "blocks",
                format!("rows = {}, kb = {} and nb = {} must all be positive", self.rows, self.kb, self.nb),
            ));
        }
        if self.kb > MAX_K {
            return Err(Error::invalid("blocks", format!("{} ids per row; at most {MAX_K}", self.kb)));
        }
        if self.nb > u32::MAX as usize {
            return Err(Error::too_large("blocks", format!("{} blocks do not fit u32 ids", self.nb)));
        }
        if self.t == 0 || self.t > u32::MAX as usize {
            return Err(Error::invalid("lengths", format!("t = {} must be in 1 ..= u32::MAX", self.t)));
        }
        if let BlockMap::Fixed { block_size } = self.map {
            if block_size == 0 || block_size > u32::MAX as usize {
                return Err(Error::invalid("block_size", format!("{block_size} must be in 1 ..= u32::MAX")));
            }
        }
        crate::tensor::checked_numel::<u64>("blocks", &[self.rows, self.kb])?;
        if let Some(shape) = self.ranges_shape() {
            crate::tensor::checked_numel::<u32>("ranges", &shape)?;
        }
        self.capacity()?;
        Ok(())
    }

    /// The most tokens one row can expand to: `min(t, kb · block_size)` for fixed blocks,
    /// `t` for ranges.
    pub fn max_tokens_per_row(&self) -> usize {
        match self.map {
            BlockMap::Fixed { block_size } => self.t.min(self.kb.saturating_mul(block_size)),
            BlockMap::Ranges { .. } => self.t,
        }
    }

    /// The entries `indices` must hold: `rows · max_tokens_per_row`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming `indices` when that exceeds `u32::MAX`.
    pub fn capacity(&self) -> Result<usize> {
        let c = checked_mul("indices", self.rows, self.max_tokens_per_row())?;
        if c > u32::MAX as usize {
            return Err(Error::too_large("indices", format!("up to {c} tokens do not fit u32 offsets")));
        }
        Ok(c)
    }

    /// The expected shape of the ranges map: `[nb, 2]` shared, `[rows, nb, 2]` per row, or
    /// `None` for fixed blocks.
    pub fn ranges_shape(&self) -> Option<Vec<usize>> {
        match self.map {
            BlockMap::Fixed { .. } => None,
            BlockMap::Ranges { shared: true } => Some(vec![self.nb, 2]),
            BlockMap::Ranges { shared: false } => Some(vec![self.rows, self.nb, 2]),
        }
    }
}

/// Every kernel id the select launchers can form.
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    gpu::kernels()
}
