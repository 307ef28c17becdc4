//! Sparse-index decode attention: `Tq = 1..=16` query tokens per sequence attend to a sorted
//! list of token indices per `(sequence, kv head)` in the KV cache. This is the consumer of
//! every selection method in ntkv (H2O, SnapKV, Quest, clusters, ShadowKV): they produce
//! exactly the index lists this takes.
//!
//! # Layouts (row-major, outermost first)
//! - `q`, `o`: `[B, Tq, Hq, D]`, f16 or bf16 (`o` has `q`'s dtype).
//! - `k`, `v`: `[B, Hkv, Tcap, D]`, the **head-major** cache (what compaction produces), same
//!   dtype as `q`. Sequence `b` holds `cache_lens[b] ≤ Tcap` valid tokens.
//! - `lse`: `[B, Tq, Hq]` f32, the natural-log log-sum-exp of the scaled scores.
//! - Index lists in CSR form over the `B·Hkv` lists, list `l = b·Hkv + h`:
//!   `indptr [B·Hkv + 1]` u32 with `indptr[0] = 0`, non-decreasing, and
//!   `indptr[B·Hkv] ≤ indices.len()` (a longer `indices` buffer is allowed; the tail is
//!   unused); `indices[indptr[l]..indptr[l+1]]` is strictly ascending (sorted and unique)
//!   and every entry is `< cache_lens[b]`.
//! - `D ∈ {64, 128}`, `Hq % Hkv == 0`; query head `h` reads kv head `h / (Hq/Hkv)` (GQA;
//!   `Hq = Hkv` is multi-head attention, `Hkv = 1` multi-query).
//!
//! # Math
//! For query token `t`, head `h` (kv head `hk`) of sequence `b`, with the visible set
//! `S = {i ∈ list(b, hk) : !causal || i ≤ cache_lens[b] − Tq + t}` (causal is bottom-right
//! aligned in global cache positions: query `t` of `Tq` sits at position
//! `cache_lens[b] − Tq + t`):
//! `o = Σ_{i∈S} softmax_i(scale · q·k_i) v_i` and `lse = ln Σ_{i∈S} exp(scale · q·k_i)`,
//! `scale = 1/√D` unless overridden. Without `causal` every selected index is visible to
//! all `Tq` queries (the usual case: the selection already ends at the current token). An
//! empty visible set gives `o = 0` and `lse = −inf`, never NaN.
//!
//! # Non-finite inputs (the same contract as [`crate::attention`])
//! A NaN in `q` of a row, or in `k_i` of a visible token `i`, makes that row's whole `o` and
//! its `lse` NaN; a NaN in `v_i[d]` of a visible token makes `o[d]` of the row NaN. Such a
//! row never passes for an empty one (`o = 0`, `lse = −inf` is reserved for an empty visible
//! set), on the CPU reference and on the GPU alike, split or not. The one difference: on the
//! GPU a NaN or infinity in `v_i` of a *listed* token that causality hides from the row also
//! reaches `o` (its weight is exactly 0, and `0 · NaN` is NaN in the fused multiply-add, as
//! in FlashAttention), while the reference skips hidden tokens entirely. Tokens that are not
//! listed are never read.
//!
//! # Precision
//! Scores, softmax and accumulation are f32 on the GPU; the reference is f64 on the widened
//! storage values. Against it the GPU output meets a relative L2 error ≤ 5e-4 for f16 and
//! ≤ 2e-3 for bf16 (rounding `o` to the storage dtype dominates), and `lse` agrees to about
//! 1e-4 relative.
//!
//! # Plan, then run
//! [`DecodePlan::new`] validates everything about the lists before any attention launch.
//! The lists are device resident (that is where the selection kernels leave them), so the
//! plan reads back `indptr` (`B·Hkv + 1` words) to check it on the host and to size the
//! split, then runs a device validation kernel over `indices` that reports the lowest bad
//! position (unsorted, duplicate, out of range) in 64 bits through a one-word flag it reads
//! back (see [`VERDICT_NONE`]). A bad list is an [`Error::InvalidArgument`] naming `indptr`,
//! `indices` or `cache_lens`, worded exactly as [`validate_lists`] words it, and nothing is
//! launched that writes an output. The plan borrows the lists, so they cannot change while it
//! lives, and can be reused for every layer of a decode step. [`DecodePlan::run`] then
//! launches one kernel, which also merges split lists, without synchronizing, allocating or
//! copying: the workspace and the merge tickets live in the plan.
//!
//! # Kernel, split and merge
//! One CTA per `(list, chunk of the list, tile of 16 query rows)`. The `Hq/Hkv · Tq` query
//! rows of one kv head share the CTA, so each selected K/V row is gathered once per row
//! tile, with 16-byte `cp.async` copies into a double-buffered shared-memory tile of 64
//! tokens. Scores and the online softmax are f32. Long lists are split into chunks of
//! `chunk_tokens` so that `B·Hkv·chunks` fills the GPU. A list of one chunk writes `o` and
//! `lse` directly. Each chunk of a longer list writes its partial state `(acc, m, l)` and
//! takes a ticket (an integer `atomicAdd` on a counter per list and row tile, after a memory
//! fence); the CTA that draws the last ticket combines the chunks of its rows in chunk order
//! with the exact log-sum-exp merge `o = Σ_c 2^(m_c − M) acc_c / Σ_c 2^(m_c − M) l_c`,
//! `M = max_c m_c`, and resets the counter for the next run. No CTA waits for another, the
//! merge order does not depend on which CTA came last, and there are no float atomics, so
//! the same lists on the same GPU give the same bits. The split depends only on the list
//! lengths and the SM count ([`plan_chunks`]).
//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::decode::{DecodeOptions, DecodePlan, DecodeShape};
//! use ntkv::{Device, DeviceTensor};
//! # fn main() -> ntkv::Result<()> {
//! let device = Device::new(0)?;
//! // 1 sequence, 1 query token, 32 query heads over 8 kv heads, D = 128, a 4096-token cache.
//! let shape = DecodeShape { batch: 1, q_tokens: 1, hq: 32, hkv: 8, head_dim: 128, capacity: 4096 };
//! let q = DeviceTensor::<f16>::zeros(&device, &shape.q_shape())?;
//! let k = DeviceTensor::<f16>::zeros(&device, &shape.kv_shape())?;
//! let v = DeviceTensor::<f16>::zeros(&device, &shape.kv_shape())?;
//! // Per kv head, the selected tokens (here: the first 64 and the last 64).
//! let list: Vec<u32> = (0..64).chain(4032..4096).collect();
//! let indices: Vec<u32> = (0..8).flat_map(|_| list.iter().copied()).collect();
//! let indptr: Vec<u32> = (0..=8).map(|h| h * 128).collect();
//! let indptr = DeviceTensor::from_host(&device, &indptr, &[9])?;
//! let indices = DeviceTensor::from_host(&device, &indices, &[indices.len()])?;
//! let mut o = DeviceTensor::<f16>::zeros(&device, &shape.q_shape())?;
//! let mut lse = DeviceTensor::<f32>::zeros(&device, &shape.lse_shape())?;
//! let mut plan = DecodePlan::new(&device, &shape, DecodeOptions::default(), &[4096], &indptr, &indices)?;
//! for _layer in 0..32 {
//!     plan.run(&q, &k, &v, &mut o, &mut lse)?; // one plan, every layer
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Verification
//! [`cpu::sparse_decode`] is the reference (dense attention with the explicit token mask, in
//! f64); `tests/decode_gpu.rs` compares the GPU against it. `tools/emu/run.sh` runs the
//! kernel source itself on the CPU (one thread per CUDA thread, AddressSanitizer on)
//! against an f64 reference, and `tools/gpu-run.sh` runs `tests/decode_gpu.rs` under
//! compute-sanitizer memcheck and racecheck on the GPU machine.

pub mod cpu;
pub(crate) mod gpu;

pub use gpu::{attn_smem_bytes, DecodePlan};

use crate::error::{Error, Result};

/// Most query tokens per sequence.
pub const MAX_Q_TOKENS: usize = 16;
/// Tokens per shared-memory tile of the kernel; `chunk_tokens` is a multiple of it.
pub const TILE_TOKENS: usize = 64;
/// Query rows per CTA (rows of one kv head beyond this are split across CTAs).
pub const ROWS_PER_CTA: usize = 16;
/// Smallest automatic chunk: shorter chunks would cost more in merging than they save.
pub const MIN_CHUNK_TOKENS: usize = 256;
/// Most chunks per list (bounds the workspace and the merge loop of the folding CTA).
pub const MAX_CHUNKS: usize = 1024;
/// The head dimensions the kernels support.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// The sizes of a sparse-index decode call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    /// `B`, sequences (at least 1).
    pub batch: usize,
    /// `Tq`, query tokens per sequence, `1..=16`.
    pub q_tokens: usize,
    /// `Hq`, query heads (at least 1).
    pub hq: usize,
    /// `Hkv`, key/value heads; divides `Hq`.
    pub hkv: usize,
    /// `D`, 64 or 128.
    pub head_dim: usize,
    /// `Tcap`, the cache's token capacity (the third dimension of `k` and `v`), `1..=u32::MAX`.
    pub capacity: usize,
}

impl DecodeShape {
    /// `Hq / Hkv` (0 for an invalid shape with `Hkv = 0`).
    pub fn group(&self) -> usize {
        self.hq.checked_div(self.hkv).unwrap_or(0)
    }

    /// Query rows per kv head: `group · Tq`.
    pub fn rows(&self) -> usize {
        self.group().saturating_mul(self.q_tokens)
    }

    /// Number of index lists, `B·Hkv` (saturating for an invalid shape).
    pub fn n_lists(&self) -> usize {
        self.batch.saturating_mul(self.hkv)
    }

    /// The shape of `q` and `o`: `[B, Tq, Hq, D]`.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.q_tokens, self.hq, self.head_dim]
    }

    /// The shape of `k` and `v`: `[B, Hkv, Tcap, D]`.
    pub fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.hkv, self.capacity, self.head_dim]
    }

    /// The shape of `lse`: `[B, Tq, Hq]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.q_tokens, self.hq]
    }

    /// Checks the shape on its own (no tensors): every count positive, `Tq ≤ 16`,
    /// `D ∈ {64, 128}`, `Hkv | Hq`, `Tcap ≤ u32::MAX`, and the `q` and `k` sizes in bytes fit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field (`batch`, `q_tokens`, `hq`, `hkv`,
    /// `head_dim`, `capacity`); [`Error::TooLarge`] naming `capacity`, `q` or `k`.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [("batch", self.batch), ("hq", self.hq), ("hkv", self.hkv), ("capacity", self.capacity)] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if !(1..=MAX_Q_TOKENS).contains(&self.q_tokens) {
            return Err(Error::invalid(
                "q_tokens",
                format!("{} query tokens; 1 to {MAX_Q_TOKENS} are supported", self.q_tokens),
            ));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::invalid("head_dim", format!("{}; 64 and 128 are supported", self.head_dim)));
        }
        if self.hq % self.hkv != 0 {
            return Err(Error::invalid(
                "hq",
                format!("{} query heads is not a multiple of {} kv heads", self.hq, self.hkv),
            ));
        }
        if self.capacity > u32::MAX as usize {
            return Err(Error::too_large("capacity", "token indices are u32"));
        }
        crate::tensor::checked_numel::<u16>("q", &self.q_shape())?;
        crate::tensor::checked_numel::<u16>("k", &self.kv_shape())?;
        // The kernels index lists and rows in u32 and the grid in i32.
        crate::error::to_i32("hkv", self.n_lists())?;
        crate::error::to_i32("hq", self.n_lists().saturating_mul(self.rows()))?;
        Ok(())
    }
}

/// The options of a sparse-index decode call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeOptions {
    /// Causal among the `Tq` queries: query `t` sees index `i` iff `i ≤ cache_len − Tq + t`.
    pub causal: bool,
    /// Softmax scale; `None` means `1/√D`. Must be finite.
    pub scale: Option<f32>,
    /// Tokens of a list per CTA; `None` lets the plan choose from the device's SM count
    /// ([`plan_chunks`]). Must be a positive multiple of [`TILE_TOKENS`], at most `u32::MAX`.
    /// For tests and tuning.
    pub chunk_tokens: Option<usize>,
}

impl DecodeOptions {
    /// The softmax scale in effect for head dimension `head_dim`.
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.scale.unwrap_or_else(|| 1.0 / (head_dim as f32).sqrt())
    }

    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `scale` (not finite) or `chunk_tokens` (zero, not a
    /// multiple of [`TILE_TOKENS`], or above `u32::MAX`).
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::invalid("scale", format!("{s} is not finite")));
            }
        }
        if let Some(c) = self.chunk_tokens {
            if c == 0 || c % TILE_TOKENS != 0 || c > u32::MAX as usize {
                return Err(Error::invalid(
                    "chunk_tokens",
                    format!("{c} is not a positive multiple of {TILE_TOKENS} below 2^32"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks `cache_lens` (`[B]`, each `≤ Tcap`) against the shape (validated first).
///
/// # Errors
/// The errors of [`DecodeShape::validate`]; [`Error::Shape`] or [`Error::InvalidArgument`]
/// naming `cache_lens`.
pub fn validate_cache_lens(shape: &DecodeShape, cache_lens: &[u32]) -> Result<()> {
    shape.validate()?;
    if cache_lens.len() != shape.batch {
        return Err(Error::shape("cache_lens", &[shape.batch], &[cache_lens.len()]));
    }
    if let Some((b, &len)) = cache_lens.iter().enumerate().find(|(_, &l)| l as usize > shape.capacity) {
        return Err(Error::invalid(
            "cache_lens",
            format!("cache_lens[{b}] = {len} exceeds the cache capacity {}", shape.capacity),
        ));
    }
    Ok(())
}

/// Checks the CSR row pointer: `B·Hkv + 1` entries, starting at 0, non-decreasing, ending
/// at most at `n_indices`, and no list longer than its sequence's cache (a strictly
/// ascending list below `cache_lens[b]` cannot be). Checks `shape` and `cache_lens` first.
///
/// # Errors
/// The errors of [`validate_cache_lens`]; [`Error::Shape`] or [`Error::InvalidArgument`]
/// naming `indptr`.
pub fn validate_indptr(shape: &DecodeShape, cache_lens: &[u32], indptr: &[u32], n_indices: usize) -> Result<()> {
    validate_cache_lens(shape, cache_lens)?;
    let n_lists = shape.n_lists();
    if indptr.len() != n_lists + 1 {
        return Err(Error::shape("indptr", &[n_lists + 1], &[indptr.len()]));
    }
    if indptr[0] != 0 {
        return Err(Error::invalid("indptr", format!("indptr[0] = {}; it must be 0", indptr[0])));
    }
    for (l, w) in indptr.windows(2).enumerate() {
        let (s, e) = (w[0], w[1]);
        if e < s {
            return Err(Error::invalid("indptr", format!("indptr[{}] = {e} is below indptr[{l}] = {s}", l + 1)));
        }
        let cache_len = cache_lens[l / shape.hkv];
        if e - s > cache_len {
            return Err(Error::invalid(
                "indptr",
                format!(
                    "list {l} (sequence {}, kv head {}) has {} entries but its cache holds {cache_len} tokens",
                    l / shape.hkv,
                    l % shape.hkv,
                    e - s
                ),
            ));
        }
    }
    let last = indptr[n_lists] as usize;
    if last > n_indices {
        return Err(Error::invalid(
            "indptr",
            format!("indptr[{n_lists}] = {last} exceeds the {n_indices} entries of indices"),
        ));
    }
    Ok(())
}

/// What is wrong with one index entry; the device validation kernel reports the same codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexFault {
    /// Not below the sequence's cache length (code 1).
    OutOfRange,
    /// Equal to the previous entry of its list (code 2).
    Duplicate,
    /// Below the previous entry of its list (code 3).
    Unsorted,
}

impl IndexFault {
    /// The fault of `value` at a position of a list (`prev` is the entry before, if any).
    /// Out of range is checked first, as the device kernel does.
    pub fn of(value: u32, prev: Option<u32>, cache_len: u32) -> Option<Self> {
        if value >= cache_len {
            Some(IndexFault::OutOfRange)
        } else {
            match prev {
                Some(p) if value == p => Some(IndexFault::Duplicate),
                Some(p) if value < p => Some(IndexFault::Unsorted),
                _ => None,
            }
        }
    }

    fn code(self) -> u64 {
        match self {
            IndexFault::OutOfRange => 1,
            IndexFault::Duplicate => 2,
            IndexFault::Unsorted => 3,
        }
    }
}

/// The device validator's "no bad entry" verdict: the initial value of its 64-bit flag.
///
/// A bad entry at flat position `pos` of `indices` is reported as `pos << 2 | code` (code 1,
/// 2, 3 as in [`IndexFault`]), and the kernel keeps the lowest with a 64-bit `atomicMin`, so
/// the report does not depend on scheduling. Positions lie below `indptr[B·Hkv] ≤ u32::MAX`,
/// so a real verdict is at most `(u32::MAX << 2) | 3 < 2^34` and can never equal this
/// sentinel; [`encode_verdict`] refuses any position above [`MAX_VERDICT_POS`].
pub const VERDICT_NONE: u64 = u64::MAX;

/// The largest position a verdict can carry: `(MAX_VERDICT_POS << 2) | 3` is the largest
/// value below [`VERDICT_NONE`].
pub const MAX_VERDICT_POS: u64 = (u64::MAX >> 2) - 1;

/// The verdict the device validator writes for a fault at flat position `pos`.
///
/// # Errors
/// [`Error::TooLarge`] naming `indices` when `pos > MAX_VERDICT_POS`.
pub fn encode_verdict(pos: u64, fault: IndexFault) -> Result<u64> {
    if pos > MAX_VERDICT_POS {
        return Err(Error::too_large("indices", format!("position {pos} does not fit a 64-bit verdict")));
    }
    Ok((pos << 2) | fault.code())
}

/// Reads a verdict back: `None` for [`VERDICT_NONE`], else the position and the fault.
///
/// # Errors
/// [`Error::Internal`] for a value the kernel cannot write (code 0).
pub fn decode_verdict(verdict: u64) -> Result<Option<(u64, IndexFault)>> {
    if verdict == VERDICT_NONE {
        return Ok(None);
    }
    let fault = match verdict & 3 {
        1 => IndexFault::OutOfRange,
        2 => IndexFault::Duplicate,
        3 => IndexFault::Unsorted,
        c => return Err(Error::internal(format!("the validation kernel returned code {c} in {verdict:#x}"))),
    };
    Ok(Some((verdict >> 2, fault)))
}

/// The error for a bad entry at flat position `pos` of `indices`, worded the same on the
/// host and device paths. `indptr` must have been validated.
pub(crate) fn index_error(
    shape: &DecodeShape,
    cache_lens: &[u32],
    indptr: &[u32],
    pos: usize,
    value: u32,
    prev: Option<u32>,
    fault: IndexFault,
) -> Error {
    // The list holding pos: the last l with indptr[l] <= pos (and pos < indptr[l+1]).
    let list = indptr.partition_point(|&p| p as usize <= pos).saturating_sub(1);
    let hkv = shape.hkv.max(1);
    let (b, h) = (list / hkv, list % hkv);
    let at = pos.saturating_sub(indptr.get(list).map_or(0, |&p| p as usize));
    let cache_len = cache_lens.get(b).copied().unwrap_or(0);
    let what = match fault {
        IndexFault::OutOfRange => format!("index {value} is not below cache_lens[{b}] = {cache_len}"),
        IndexFault::Duplicate => format!("index {value} repeats the previous entry"),
        IndexFault::Unsorted => {
            format!("index {value} is below the previous entry {} (lists must be sorted ascending)", prev.unwrap_or(0))
        }
    };
    Error::invalid("indices", format!("list {list} (sequence {b}, kv head {h}), entry {at} (indices[{pos}]): {what}"))
}

/// Validates host-resident index lists completely: the shape, `cache_lens`, `indptr`, then
/// every entry of `indices` (the first bad entry in flat order is reported).
///
/// # Errors
/// The errors of [`validate_indptr`]; [`Error::InvalidArgument`] naming `indices` with the
/// list, entry, value and fault of the first bad entry.
pub fn validate_lists(shape: &DecodeShape, cache_lens: &[u32], indptr: &[u32], indices: &[u32]) -> Result<()> {
    validate_indptr(shape, cache_lens, indptr, indices.len())?;
    for l in 0..shape.n_lists() {
        let cache_len = cache_lens[l / shape.hkv];
        let (s, e) = (indptr[l] as usize, indptr[l + 1] as usize);
        for pos in s..e {
            let prev = (pos > s).then(|| indices[pos - 1]);
            if let Some(fault) = IndexFault::of(indices[pos], prev, cache_len) {
                return Err(index_error(shape, cache_lens, indptr, pos, indices[pos], prev, fault));
            }
        }
    }
    Ok(())
}

/// How the lists are split across CTAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Tokens of a list per CTA (a multiple of [`TILE_TOKENS`]).
    pub chunk_tokens: usize,
    /// Chunks of the longest list (at least 1): the workspace stride.
    pub max_chunks: usize,
    /// CTAs of the attention launch that do work: `Σ_lists chunks · row_tiles`.
    pub busy_ctas: usize,
}

impl ChunkPlan {
    /// Whether every list fits one chunk, so every CTA writes `o` and `lse` directly and no
    /// partial state or ticket is used.
    pub fn direct(&self) -> bool {
        self.max_chunks == 1
    }
}

/// The launch sizes of a split into `max_chunks` chunks per list (decode's [`ChunkPlan`] or
/// the quantized decode's split) over `lists` lists of `rows` query rows in `row_tiles` tiles,
/// `head_dim` channels: the attention grid (`lists · max_chunks · row_tiles` CTAs, one per
/// work item) and the f32 lengths of the partial-state workspace (`[states, D]` accumulators
/// and `[states, 2]` (max, sum) pairs; one element each for a single chunk, which writes the
/// output directly).
///
/// # Errors
/// [`Error::TooLarge`] naming `grid_arg` when the grid overflows, or `workspace`.
pub(crate) fn split_sizes(
    max_chunks: usize,
    grid_arg: &'static str,
    (lists, rows, row_tiles): (usize, usize, usize),
    head_dim: usize,
) -> Result<SplitSizes> {
    let per_list = |x: usize| lists.checked_mul(max_chunks).and_then(|n| n.checked_mul(x));
    let blocks = per_list(row_tiles).ok_or_else(|| Error::too_large(grid_arg, "the launch grid overflows"))?;
    if max_chunks == 1 {
        return Ok(SplitSizes { blocks, acc_len: 1, ml_len: 1 });
    }
    let states = per_list(rows).ok_or_else(|| Error::too_large("workspace", "partial states overflow usize"))?;
    Ok(SplitSizes {
        blocks,
        acc_len: crate::tensor::checked_numel::<f32>("workspace", &[states, head_dim])?,
        ml_len: crate::error::checked_mul("workspace", states, 2)?,
    })
}

/// What [`split_sizes`] returns.
pub(crate) struct SplitSizes {
    pub blocks: usize,
    pub acc_len: usize,
    pub ml_len: usize,
}

/// Chunks of a list of `len` tokens (an empty list still has one, which writes the empty
/// result).
pub fn chunks_of(len: usize, chunk_tokens: usize) -> usize {
    len.div_ceil(chunk_tokens.max(1)).max(1)
}

/// Chooses the chunk length from the list lengths and the number of SMs.
///
/// About two CTAs fit on an SM, so `slots = 2·SMs`. The chunk length aims at eight waves of
/// work (`Σ len · row_tiles / (8·slots)` tokens, rounded up to a tile) so that the last
/// partial wave costs little, but never below [`MIN_CHUNK_TOKENS`] (short lists stay whole
/// and skip the merge) and never so short that a list has more than [`MAX_CHUNKS`] chunks.
/// `forced` (from [`DecodeOptions::chunk_tokens`]) is taken as is. Deterministic: the same
/// lists on the same GPU give the same split, hence the same output bits.
pub fn plan_chunks(list_lens: &[usize], rows: usize, sm_count: usize, forced: Option<usize>) -> ChunkPlan {
    let row_tiles = rows.div_ceil(ROWS_PER_CTA).max(1);
    let max_len = list_lens.iter().copied().max().unwrap_or(0);
    let chunk_tokens = match forced {
        Some(c) => c.max(1),
        None => {
            let total = list_lens.iter().fold(0usize, |a, &l| a.saturating_add(l)).saturating_mul(row_tiles);
            let slots = sm_count.max(1).saturating_mul(2);
            let aim = total.div_ceil(slots.saturating_mul(8)).div_ceil(TILE_TOKENS).saturating_mul(TILE_TOKENS);
            let floor = max_len.div_ceil(MAX_CHUNKS).div_ceil(TILE_TOKENS).saturating_mul(TILE_TOKENS);
            aim.max(MIN_CHUNK_TOKENS).max(floor)
        }
    };
    let max_chunks = chunks_of(max_len, chunk_tokens);
    let busy_ctas =
        list_lens.iter().fold(0usize, |a, &l| a.saturating_add(chunks_of(l, chunk_tokens))).saturating_mul(row_tiles);
    ChunkPlan { chunk_tokens, max_chunks, busy_ctas }
}
