//! Sparse-index decode attention (SPEC §3, "Sparse-index decode"): `Tq = 1..=16` query
//! tokens per sequence attend to a sorted list of token indices per `(sequence, kv head)`
//! in the KV cache. This is the consumer of every selection method in ntkv (H2O, SnapKV,
//! Quest, clusters, ShadowKV): they produce exactly the index lists this takes.
//!
//! # Layouts (row-major, outermost first)
//! - `q`, `o`: `[B, Tq, Hq, D]`, f16 or bf16 (`o` has `q`'s dtype).
//! - `k`, `v`: `[B, Hkv, Tcap, D]`, the **head-major** cache (what compaction produces), same
//!   dtype as `q`. Sequence `b` holds `cache_lens[b] ≤ Tcap` valid tokens.
//! - `lse`: `[B, Tq, Hq]` f32, the natural-log log-sum-exp of the scaled scores.
//! - Index lists in CSR form over the `B·Hkv` lists, list `l = b·Hkv + h`:
//!   `indptr [B·Hkv + 1]` u32 with `indptr[0] = 0`, non-decreasing, and
//!   `indptr[B·Hkv] ≤ indices.len()` (a longer `indices` buffer is allowed; the tail is
//!   unused); `indices[indptr[l]..indptr[l+1]]` is strictly ascending and every entry is
//!   `< cache_lens[b]`.
//! - `D ∈ {64, 128}`, `Hq % Hkv == 0`; query head `h` reads kv head `h / (Hq/Hkv)`.
//!
//! # Math
//! For query token `t`, head `h` (kv head `hk`) of sequence `b`, with the visible set
//! `S = {i ∈ list(b, hk) : !causal || i ≤ cache_lens[b] − Tq + t}`:
//! `o = Σ_{i∈S} softmax_i(scale · q·k_i) v_i` and `lse = ln Σ_{i∈S} exp(scale · q·k_i)`,
//! `scale = 1/√D` unless overridden. Without `causal` every selected index is visible to
//! all `Tq` queries (the usual case: the selection already ends at the current token). An
//! empty visible set gives `o = 0` and `lse = −inf`, never NaN.
//!
//! # Plan, then run
//! [`DecodePlan::new`] validates everything about the lists before any attention launch.
//! The lists are device resident (that is where the selection kernels leave them), so the
//! plan reads back `indptr` (`B·Hkv + 1` words) to check it on the host and to size the
//! split, then runs a device validation kernel over `indices` that reports the lowest bad
//! position (unsorted, duplicate, out of range) through a one-word flag it reads back.
//! A bad list is an [`Error::InvalidArgument`] naming `indptr`, `indices` or `cache_lens`,
//! and nothing is launched that writes an output. The plan borrows the lists, so they
//! cannot change while it lives, and can be reused for every layer of a decode step.
//! [`DecodePlan::run`] then launches the attention kernel (and the merge kernel when a
//! list is split), without synchronizing.
//!
//! # Kernel
//! One CTA per `(list, chunk of the list, tile of 16 query rows)`. The `Hq/Hkv · Tq` query
//! rows of one kv head share the CTA, so each selected K/V row is gathered once per row
//! tile, with 16-byte `cp.async` copies into a double-buffered shared-memory tile of 64
//! tokens. Scores and the online softmax are f32. Long lists are split into chunks of
//! `chunk_tokens` so that `B·Hkv·chunks` fills the GPU; each chunk writes its partial state
//! `(acc, m, l)` and a merge kernel combines the chunks of a list in chunk order: an exact
//! log-sum-exp merge, deterministic, no atomics.

//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::decode::{DecodeConfig, DecodePlan};
//! use ntkv::{Device, DeviceTensor};
//! # fn main() -> ntkv::Result<()> {
//! let dev = Device::new(0)?;
//! // 1 sequence, 1 query token, 32 query heads over 8 kv heads, D = 128, a 4096-token cache.
//! let cfg = DecodeConfig::new(1, 1, 32, 8, 128, 4096);
//! let q = DeviceTensor::<f16>::zeros(&dev, &cfg.q_shape())?;
//! let k = DeviceTensor::<f16>::zeros(&dev, &cfg.kv_shape())?;
//! let v = DeviceTensor::<f16>::zeros(&dev, &cfg.kv_shape())?;
//! // Per kv head, the selected tokens (here: the first 64 and the last 64).
//! let list: Vec<u32> = (0..64).chain(4032..4096).collect();
//! let indices: Vec<u32> = (0..8).flat_map(|_| list.iter().copied()).collect();
//! let indptr: Vec<u32> = (0..=8).map(|h| h * 128).collect();
//! let indptr = DeviceTensor::from_host(&dev, &indptr, &[9])?;
//! let indices = DeviceTensor::from_host(&dev, &indices, &[indices.len()])?;
//! let mut o = DeviceTensor::<f16>::zeros(&dev, &cfg.q_shape())?;
//! let mut lse = DeviceTensor::<f32>::zeros(&dev, &cfg.lse_shape())?;
//! let mut plan = DecodePlan::new(&dev, &cfg, &[4096], &indptr, &indices)?; // validates
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
/// Most chunks per list (bounds the workspace and the merge loop).
pub const MAX_CHUNKS: usize = 1024;

/// The shape and options of a sparse-index decode call.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeConfig {
    /// `B`, sequences.
    pub batch: usize,
    /// `Tq`, query tokens per sequence, `1..=16`.
    pub q_tokens: usize,
    /// `Hq`, query heads.
    pub q_heads: usize,
    /// `Hkv`, key/value heads; divides `Hq`.
    pub kv_heads: usize,
    /// `D`, 64 or 128.
    pub head_dim: usize,
    /// `Tcap`, the cache's token capacity (its third dimension).
    pub cache_capacity: usize,
    /// Softmax scale; `None` means `1/√D`.
    pub scale: Option<f32>,
    /// Causal among the `Tq` queries: query `t` sees index `i` iff `i ≤ cache_len − Tq + t`.
    pub causal: bool,
    /// Tokens of a list per CTA; `None` lets the plan choose from the device's SM count.
    /// Must be a positive multiple of [`TILE_TOKENS`]. For tests and tuning.
    pub chunk_tokens: Option<usize>,
}

impl DecodeConfig {
    /// A non-causal configuration with the default scale and automatic chunking.
    pub fn new(
        batch: usize,
        q_tokens: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        cache_capacity: usize,
    ) -> Self {
        DecodeConfig {
            batch,
            q_tokens,
            q_heads,
            kv_heads,
            head_dim,
            cache_capacity,
            scale: None,
            causal: false,
            chunk_tokens: None,
        }
    }

    /// Sets causal masking among the query tokens.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Overrides the softmax scale.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Fixes the chunk length (a positive multiple of [`TILE_TOKENS`]).
    pub fn chunk_tokens(mut self, chunk_tokens: usize) -> Self {
        self.chunk_tokens = Some(chunk_tokens);
        self
    }

    /// The softmax scale in effect.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// `Hq / Hkv`.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Query rows per kv head: `group · Tq`.
    pub fn rows(&self) -> usize {
        self.group() * self.q_tokens
    }

    /// Number of index lists, `B·Hkv`.
    pub fn n_lists(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// The shape of `q` and `o`: `[B, Tq, Hq, D]`.
    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.q_tokens, self.q_heads, self.head_dim]
    }

    /// The shape of `k` and `v`: `[B, Hkv, Tcap, D]`.
    pub fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.cache_capacity, self.head_dim]
    }

    /// The shape of `lse`: `[B, Tq, Hq]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.q_tokens, self.q_heads]
    }

    /// Checks the configuration on its own (no tensors).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field (`config.batch`, `config.q_tokens`, …).
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [
            ("config.batch", self.batch),
            ("config.q_heads", self.q_heads),
            ("config.kv_heads", self.kv_heads),
            ("config.cache_capacity", self.cache_capacity),
        ] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if !(1..=MAX_Q_TOKENS).contains(&self.q_tokens) {
            return Err(Error::invalid(
                "config.q_tokens",
                format!("{} query tokens; 1 to {MAX_Q_TOKENS} are supported", self.q_tokens),
            ));
        }
        if self.head_dim != 64 && self.head_dim != 128 {
            return Err(Error::invalid("config.head_dim", format!("{}; 64 and 128 are supported", self.head_dim)));
        }
        if self.q_heads % self.kv_heads != 0 {
            return Err(Error::invalid(
                "config.q_heads",
                format!("{} query heads is not a multiple of {} kv heads", self.q_heads, self.kv_heads),
            ));
        }
        if self.cache_capacity > u32::MAX as usize {
            return Err(Error::too_large("config.cache_capacity", "token indices are u32"));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::invalid("config.scale", format!("{s} is not finite")));
            }
        }
        if let Some(c) = self.chunk_tokens {
            if c == 0 || c % TILE_TOKENS != 0 || c > u32::MAX as usize {
                return Err(Error::invalid(
                    "config.chunk_tokens",
                    format!("{c} is not a positive multiple of {TILE_TOKENS}"),
                ));
            }
        }
        for (arg, shape) in [("q", &self.q_shape()[..]), ("k", &self.kv_shape()[..])] {
            crate::tensor::numel(arg, shape)?;
        }
        Ok(())
    }
}

/// Checks `cache_lens` (`[B]`, each `≤ Tcap`) against the configuration.
///
/// # Errors
/// [`Error::Shape`] or [`Error::InvalidArgument`] naming `cache_lens`.
pub fn validate_cache_lens(cfg: &DecodeConfig, cache_lens: &[u32]) -> Result<()> {
    if cache_lens.len() != cfg.batch {
        return Err(Error::shape("cache_lens", &[cfg.batch], &[cache_lens.len()]));
    }
    if let Some((b, &len)) = cache_lens.iter().enumerate().find(|(_, &l)| l as usize > cfg.cache_capacity) {
        return Err(Error::invalid(
            "cache_lens",
            format!("cache_lens[{b}] = {len} exceeds the cache capacity {}", cfg.cache_capacity),
        ));
    }
    Ok(())
}

/// Checks the CSR row pointer: `B·Hkv + 1` entries, starting at 0, non-decreasing, ending
/// at most at `n_indices`, and no list longer than its sequence's cache (a strictly
/// ascending list below `cache_lens[b]` cannot be).
///
/// # Errors
/// [`Error::Shape`] or [`Error::InvalidArgument`] naming `indptr`.
pub fn validate_indptr(cfg: &DecodeConfig, cache_lens: &[u32], indptr: &[u32], n_indices: usize) -> Result<()> {
    let n_lists = cfg.n_lists();
    if indptr.len() != n_lists + 1 {
        return Err(Error::shape("indptr", &[n_lists + 1], &[indptr.len()]));
    }
    if indptr[0] != 0 {
        return Err(Error::invalid("indptr", format!("indptr[0] = {}; it must be 0", indptr[0])));
    }
    for l in 0..n_lists {
        let (s, e) = (indptr[l], indptr[l + 1]);
        if e < s {
            return Err(Error::invalid("indptr", format!("indptr[{}] = {e} is below indptr[{l}] = {s}", l + 1)));
        }
        let cache_len = cache_lens.get(l / cfg.kv_heads).copied().unwrap_or(0);
        if e - s > cache_len {
            return Err(Error::invalid(
                "indptr",
                format!(
                    "list {l} (sequence {}, kv head {}) has {} entries but its cache holds {cache_len} tokens",
                    l / cfg.kv_heads,
                    l % cfg.kv_heads,
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
pub(crate) enum IndexFault {
    /// Not below the sequence's cache length (code 1).
    OutOfRange,
    /// Equal to the previous entry of its list (code 2).
    Duplicate,
    /// Below the previous entry of its list (code 3).
    Unsorted,
}

impl IndexFault {
    pub(crate) fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(IndexFault::OutOfRange),
            2 => Some(IndexFault::Duplicate),
            3 => Some(IndexFault::Unsorted),
            _ => None,
        }
    }

    /// The fault of `value` at a position of a list (`prev` is the entry before, if any).
    /// Out of range is checked first, as the device kernel does.
    pub(crate) fn of(value: u32, prev: Option<u32>, cache_len: u32) -> Option<Self> {
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
}

/// The error for a bad entry at flat position `pos` of `indices`, worded the same on the
/// host and device paths.
pub(crate) fn index_error(
    cfg: &DecodeConfig,
    cache_lens: &[u32],
    indptr: &[u32],
    pos: usize,
    value: u32,
    prev: Option<u32>,
    fault: IndexFault,
) -> Error {
    // The list holding pos: the last l with indptr[l] <= pos (and pos < indptr[l+1]).
    let list = indptr.partition_point(|&p| p as usize <= pos).saturating_sub(1);
    let (b, h) = (list / cfg.kv_heads.max(1), list % cfg.kv_heads.max(1));
    let at = pos - indptr.get(list).map_or(0, |&p| p as usize);
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

/// Validates host-resident index lists completely: `cache_lens`, `indptr`, then every
/// entry of `indices` (the first bad entry in flat order is reported).
///
/// # Errors
/// [`Error::Shape`] / [`Error::InvalidArgument`] naming `cache_lens`, `indptr` or `indices`.
pub fn validate_lists(cfg: &DecodeConfig, cache_lens: &[u32], indptr: &[u32], indices: &[u32]) -> Result<()> {
    cfg.validate()?;
    validate_cache_lens(cfg, cache_lens)?;
    validate_indptr(cfg, cache_lens, indptr, indices.len())?;
    for l in 0..cfg.n_lists() {
        let cache_len = cache_lens[l / cfg.kv_heads];
        let (s, e) = (indptr[l] as usize, indptr[l + 1] as usize);
        for pos in s..e {
            let prev = (pos > s).then(|| indices[pos - 1]);
            if let Some(fault) = IndexFault::of(indices[pos], prev, cache_len) {
                return Err(index_error(cfg, cache_lens, indptr, pos, indices[pos], prev, fault));
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
    /// Whether every list fits one chunk, so the kernel writes `o` and `lse` directly and no
    /// merge runs.
    pub fn direct(&self) -> bool {
        self.max_chunks == 1
    }
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
/// `forced` (from [`DecodeConfig::chunk_tokens`]) is taken as is. Deterministic: the same
/// lists on the same GPU give the same split, hence the same output bits.
pub fn plan_chunks(list_lens: &[usize], rows: usize, sm_count: usize, forced: Option<usize>) -> ChunkPlan {
    let row_tiles = rows.div_ceil(ROWS_PER_CTA).max(1);
    let max_len = list_lens.iter().copied().max().unwrap_or(0);
    let chunk_tokens = match forced {
        Some(c) => c.max(1),
        None => {
            let total: usize = list_lens.iter().sum::<usize>().saturating_mul(row_tiles);
            let slots = 2 * sm_count.max(1);
            let aim = total.div_ceil(8 * slots).div_ceil(TILE_TOKENS) * TILE_TOKENS;
            let floor = max_len.div_ceil(MAX_CHUNKS).div_ceil(TILE_TOKENS) * TILE_TOKENS;
            aim.max(MIN_CHUNK_TOKENS).max(floor)
        }
    };
    let max_chunks = chunks_of(max_len, chunk_tokens);
    let busy_ctas = list_lens.iter().map(|&l| chunks_of(l, chunk_tokens)).sum::<usize>() * row_tiles;
    ChunkPlan { chunk_tokens, max_chunks, busy_ctas }
}
