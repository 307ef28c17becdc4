//! Block-sparse flash attention prefill with Graph-KV masks.
//!
//! # Shapes and dtypes
//! - `q [Tq_total, Hq, D]`, `k, v [Tk_total, Hkv, D]`, all `f16` or all `bf16`, `D ∈ {64, 128}`,
//!   `Hq % Hkv == 0` (query head `h` reads kv head `h / (Hq / Hkv)`).
//! - Batched variable-length inputs: `cu_seqlens_q`, `cu_seqlens_k` (`[B+1]`, `u32`, starting at
//!   0, non-decreasing). Batch entry `b` owns query tokens `cu_seqlens_q[b]..cu_seqlens_q[b+1]`
//!   and key tokens `cu_seqlens_k[b]..cu_seqlens_k[b+1]`; positions inside an entry are local.
//! - Outputs: `o [Tq_total, Hq, D]` (the input dtype) and `lse [Hq, Tq_total]` (`f32`, natural
//!   log of the softmax denominator, scale included).
//!
//! # What is computed
//! For batch entry `b`, query head `h`, local query `i` and local key `j`, the key is
//! *visible* when all of these hold:
//! - the mask of `(b, mask head)` lists column block `j / BC` in row block `i / BR`
//!   (the mask head is 0 for [`MaskHeads::Shared`], the kv head for [`MaskHeads::PerKvHead`]);
//! - when that listed block carries a token mask, its bit for `(i % BR, j % BC)` is set;
//! - with `causal`, `j ≤ i + (Tk_b − Tq_b)`: bottom-right alignment over the whole entry
//!   (the last query sees the last key, whatever the block sizes; this is not FlashInfer's
//!   per-block-row meaning). With `Tq_b > Tk_b` the first `Tq_b − Tk_b` queries see nothing.
//!
//! Then `o[i] = Σ_j softmax_j(scale · q_i·k_j) v_j` over visible keys, with `scale = 1/√D`
//! unless overridden, and `lse[h, i] = ln Σ_j exp(scale · q_i·k_j)`. A row with no visible key
//! gives `o = 0` and `lse = −inf` (never NaN).
//!
//! Non-finite inputs: a NaN in `q_i`, or in `k_j` or `v_j` of a key visible to row `i`, makes
//! that row's `o` and `lse` NaN (it never passes for an empty row). On the GPU a NaN or inf in
//! `v_j` of a key that is *hidden* from row `i` but lies in a block the row's CTA visits also
//! reaches `o[i]` (its weight is exactly 0, but `0 · NaN` is NaN in the tensor-core product, as
//! in FlashAttention); the reference skips hidden keys entirely. [`crate::decode`] follows the
//! same contract.
//!
//! # Precision
//! The GPU computes scores and the online softmax in f32 with tensor-core products in the
//! storage dtype. Against [`cpu::prefill`] (f64 on the widened storage values) `o` meets a
//! relative L2 error ≤ 5e-4 for f16 and ≤ 4e-3 for bf16 (about 2.2e-3 on N(0, 1) inputs with
//! the default [`PvPrecision::Storage`]; ≤ 2e-3 with [`PvPrecision::Split`]), and `lse` agrees
//! to about 1e-4. Attention is compiled with denormals flushed to zero (`-ftz=true`): an
//! `exp2` result below 2⁻¹²⁶ becomes 0, a change far below those bounds. The output does not
//! depend on scheduling: the same plan and inputs give the same bits.
//!
//! # Using it
//! [`PrefillPlan::new`] validates the mask against the shapes (sorted, unique, in range) and
//! uploads the per-CTA work list; [`PrefillPlan::run`] launches on the device's stream. A plan
//! is reused across layers and steps that share the mask and sequence lengths.
//! [`cpu::prefill`] is the f64 reference; [`graph::graph_kv_mask`] builds the Graph-KV mask.
//!
//! ```no_run
//! # fn main() -> ntkv::Result<()> {
//! use ntkv::attention::{BlockMask, MaskHeads, PrefillOptions, PrefillPlan, PrefillShape};
//! use ntkv::{Device, DeviceTensor};
//! use half::bf16;
//! let device = Device::new(0)?;
//! let shape = PrefillShape::new(32, 8, 128, vec![0, 4096], vec![0, 4096])?;
//! let mask = BlockMask::dense(128, 128, MaskHeads::Shared, &shape)?;
//! let plan = PrefillPlan::new(&device, &shape, PrefillOptions { causal: true, ..Default::default() }, &mask)?;
//! let q = DeviceTensor::<bf16>::zeros(&device, &shape.q_shape())?;
//! let k = DeviceTensor::<bf16>::zeros(&device, &shape.kv_shape())?;
//! let v = DeviceTensor::<bf16>::zeros(&device, &shape.kv_shape())?;
//! let mut o = DeviceTensor::<bf16>::zeros(&device, &shape.q_shape())?;
//! let mut lse = DeviceTensor::<f32>::zeros(&device, &shape.lse_shape())?;
//! plan.run(&q, &k, &v, &mut o, &mut lse)?;
//! # Ok(()) }
//! ```

pub mod cpu;
pub mod graph;
pub(crate) mod plan;

pub use plan::{HostPlan, PrefillPlan};

use crate::error::{Error, Result};

/// Checks the five buffers every attention call takes (prefill and decode alike): `q` and
/// `o` against `q_shape`, `k` and `v` against `kv_shape`, `lse` against `lse_shape`, each on
/// `device`, in that order, so the first bad one is the one named.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_attention_buffers<T: crate::tensor::Float>(
    device: &crate::device::Device,
    q: &impl crate::tensor::TensorRef<T>,
    k: &impl crate::tensor::TensorRef<T>,
    v: &impl crate::tensor::TensorRef<T>,
    o: &impl crate::tensor::TensorRef<T>,
    lse: &impl crate::tensor::TensorRef<f32>,
    shapes: [&[usize]; 3],
) -> Result<()> {
    let [q_shape, kv_shape, lse_shape] = shapes;
    device.check_buffer("q", q, q_shape)?;
    device.check_buffer("k", k, kv_shape)?;
    device.check_buffer("v", v, kv_shape)?;
    device.check_buffer("o", o, q_shape)?;
    device.check_buffer("lse", lse, lse_shape)
}

/// Token-mask id of a listed block that has no token mask (every pair in it is visible, up to
/// causality and the sequence ends).
pub const NO_TOKEN_MASK: u32 = crate::params::NTKV_ATTN_NO_TOKEN_MASK;

/// The block sizes the kernels support, for both `BR` and `BC`.
pub const BLOCK_SIZES: [usize; 2] = [64, 128];

/// The head dimensions the kernels support.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether one mask serves every head or each kv head has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskHeads {
    /// One BSR per batch entry, shared by all heads.
    Shared,
    /// One BSR per (batch entry, kv head); query head `h` uses the one of kv head `h / (Hq/Hkv)`.
    PerKvHead,
}

/// Sequence layout and head counts of a batched variable-length prefill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    /// `Hq`, query heads, `1..=`[`MAX_HEADS`].
    pub hq: usize,
    /// `Hkv`, dividing `Hq`.
    pub hkv: usize,
    /// `D` (64 or 128).
    pub head_dim: usize,
    /// `[B+1]` query offsets, starting at 0, non-decreasing.
    pub cu_seqlens_q: Vec<u32>,
    /// `[B+1]` key offsets, starting at 0, non-decreasing.
    pub cu_seqlens_k: Vec<u32>,
}

impl PrefillShape {
    /// Builds and validates a shape.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `hq`, `hkv`, `head_dim`, `cu_seqlens_q` or
    /// `cu_seqlens_k` when a count is zero, `Hkv` does not divide `Hq`, `D` is not 64 or 128,
    /// or the offsets are empty, do not start at 0, decrease, or differ in length;
    /// [`Error::TooLarge`] naming `hq` above [`MAX_HEADS`] or `cu_seqlens_q` /
    /// `cu_seqlens_k` when a total exceeds `i32::MAX` tokens (or `Tq_total · Hq` does).
    pub fn new(hq: usize, hkv: usize, head_dim: usize, cu_seqlens_q: Vec<u32>, cu_seqlens_k: Vec<u32>) -> Result<Self> {
        let s = PrefillShape { hq, hkv, head_dim, cu_seqlens_q, cu_seqlens_k };
        s.validate()?;
        Ok(s)
    }

    /// Checks the invariants listed in [`PrefillShape::new`].
    pub fn validate(&self) -> Result<()> {
        if self.hq == 0 {
            return Err(Error::invalid("hq", "must be at least 1"));
        }
        if self.hq > MAX_HEADS {
            return Err(Error::too_large("hq", format!("{} query heads; at most {MAX_HEADS}", self.hq)));
        }
        if self.hkv == 0 || self.hq % self.hkv != 0 {
            return Err(Error::invalid(
                "hkv",
                format!("must be positive and divide hq = {}, got {}", self.hq, self.hkv),
            ));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::invalid("head_dim", format!("must be 64 or 128, got {}", self.head_dim)));
        }
        check_cu_seqlens("cu_seqlens_q", &self.cu_seqlens_q)?;
        check_cu_seqlens("cu_seqlens_k", &self.cu_seqlens_k)?;
        if self.cu_seqlens_q.len() != self.cu_seqlens_k.len() {
            return Err(Error::invalid(
                "cu_seqlens_k",
                format!(
                    "has {} entries but cu_seqlens_q has {}; both are [B+1]",
                    self.cu_seqlens_k.len(),
                    self.cu_seqlens_q.len()
                ),
            ));
        }
        // Heads x tokens must fit the kernel's 32-bit lse index and i32 causal offsets.
        let rows = self.tq_total().saturating_mul(self.hq);
        if rows > i32::MAX as usize {
            return Err(Error::too_large("cu_seqlens_q", format!("Tq_total x Hq = {rows} exceeds i32::MAX")));
        }
        Ok(())
    }

    /// Number of batch entries `B`.
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    /// Total query tokens.
    pub fn tq_total(&self) -> usize {
        self.cu_seqlens_q.last().map_or(0, |&x| x as usize)
    }

    /// Total key tokens.
    pub fn tk_total(&self) -> usize {
        self.cu_seqlens_k.last().map_or(0, |&x| x as usize)
    }

    /// Query tokens of entry `b`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `b` when `b ≥ B`, or `cu_seqlens_q` when its
    /// offsets decrease at `b`.
    pub fn seq_q(&self, b: usize) -> Result<usize> {
        entry_len("cu_seqlens_q", &self.cu_seqlens_q, b)
    }

    /// Key tokens of entry `b`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `b` when `b ≥ B`, or `cu_seqlens_k` when its
    /// offsets decrease at `b`.
    pub fn seq_k(&self, b: usize) -> Result<usize> {
        entry_len("cu_seqlens_k", &self.cu_seqlens_k, b)
    }

    /// Query heads per kv head (0 for an invalid shape with `Hkv = 0`).
    pub fn group(&self) -> usize {
        self.hq.checked_div(self.hkv).unwrap_or(0)
    }

    /// The shape of `q` and `o`: `[Tq_total, Hq, D]`.
    pub fn q_shape(&self) -> [usize; 3] {
        [self.tq_total(), self.hq, self.head_dim]
    }

    /// The shape of `k` and `v`: `[Tk_total, Hkv, D]`.
    pub fn kv_shape(&self) -> [usize; 3] {
        [self.tk_total(), self.hkv, self.head_dim]
    }

    /// The shape of `lse`: `[Hq, Tq_total]`.
    pub fn lse_shape(&self) -> [usize; 2] {
        [self.hq, self.tq_total()]
    }
}

/// Most heads a prefill takes (`Hq`, hence `Hkv`).
pub const MAX_HEADS: usize = 1 << 16;

/// `cu[b + 1] − cu[b]`, checked.
fn entry_len(arg: &'static str, cu: &[u32], b: usize) -> Result<usize> {
    let (Some(&lo), Some(&hi)) = (cu.get(b), b.checked_add(1).and_then(|b1| cu.get(b1))) else {
        return Err(Error::invalid("b", format!("entry {b} is out of range ({} entries)", cu.len().saturating_sub(1))));
    };
    hi.checked_sub(lo)
        .map(|n| n as usize)
        .ok_or_else(|| Error::invalid(arg, format!("decreases at entry {b}: {lo} > {hi}")))
}

fn check_cu_seqlens(arg: &'static str, cu: &[u32]) -> Result<()> {
    if cu.is_empty() {
        return Err(Error::invalid(arg, "must hold B+1 >= 1 offsets"));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(arg, format!("must start at 0, starts at {}", cu[0])));
    }
    if let Some(w) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::invalid(arg, format!("decreases at entry {}: {} > {}", w + 1, cu[w], cu[w + 1])));
    }
    if cu[cu.len() - 1] > i32::MAX as u32 {
        return Err(Error::too_large(arg, "more than i32::MAX tokens"));
    }
    Ok(())
}

/// Softmax options.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefillOptions {
    /// Bottom-right aligned causal masking in each entry's local positions:
    /// query `i` sees key `j` iff `j ≤ i + (Tk_b − Tq_b)`.
    pub causal: bool,
    /// Softmax scale; `None` means `1/√D`. Must be finite.
    pub scale: Option<f32>,
    /// How the softmax numerators P enter the P·V product on the GPU.
    pub pv_precision: PvPrecision,
}

/// How the GPU kernel feeds the softmax numerators `P` (f32) to the `P·V` tensor-core product,
/// whose operands are in the storage dtype.
///
/// With bf16, rounding `P` to bf16 (what FlashAttention-2 does) adds a relative error of about
/// 1.5e-3 on N(0, 1) inputs on top of the 1.65e-3 that rounding the output to bf16 costs:
/// about 2.2e-3 together, within the 4e-3 relative L2 bound that bf16 attention is held to
/// against the f64 reference. That is the default. [`PvPrecision::Split`] sends `P` as
/// `hi + lo` (two bf16 mmas sharing the V fragments), which removes the P rounding (≤ 2e-3) at
/// the cost of 50% more tensor-core work per visited block. f16 keeps 11 bits of `P`, within
/// the 5e-4 bound of f16, so both settings run the same f16 kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvPrecision {
    /// `P` rounded once to the storage dtype (FlashAttention-2 behaviour): about 2.2e-3
    /// relative L2 error on N(0, 1) bf16 inputs, one mma per fragment. The default.
    #[default]
    Storage,
    /// bf16: `P = hi + lo`, two mmas, ≤ 2e-3 relative L2. The high-precision option; 1.5× the
    /// P·V tensor work.
    Split,
}

impl PrefillOptions {
    /// The scale in effect for head dimension `d`.
    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d as f32).sqrt())
    }
}

/// A block-sparse row (BSR) mask: one BSR per batch entry (and per kv head with
/// [`MaskHeads::PerKvHead`]), all packed into two arrays, plus optional token-exact masks of
/// listed blocks.
///
/// # Packed layout
/// Let `M` be 1 ([`MaskHeads::Shared`]) or `Hkv` ([`MaskHeads::PerKvHead`]), and for entry `b`
/// let `R_b = ceil(Tq_b / BR)` row blocks and `C_b = ceil(Tk_b / BC)` column blocks.
/// - BSR `s = b·M + m` (entry `b`, mask head `m`) owns the `R_b + 1` consecutive entries of
///   `indptr` that start at `Σ_{s' < s} (R_{b(s')} + 1)`.
/// - `indptr` values are absolute positions in `indices`: BSR 0 starts at 0, each BSR starts
///   where the previous one ended, the values never decrease, and the last is `indices.len()`.
/// - Row block `r` of BSR `s` lists the column blocks `indices[indptr[base_s + r] ..
///   indptr[base_s + r + 1]]`: local column block numbers `< C_b`, strictly increasing.
/// - `token_mask_ids` is empty (no token masks) or parallel to `indices`: [`NO_TOKEN_MASK`] or
///   an id `< n` into `token_masks`.
/// - `token_masks` is `[n, BR, BC/32]` `u32` words: bit `c % 32` of word `c / 32` of row `r`
///   of mask `id` says whether local query `r` of the block sees local key `c` of the block.
///
/// A partial last block (fewer than `BR` queries or `BC` keys) is listed like any other; the
/// positions past the sequence end are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    /// Queries per row block, `BR ∈ {64, 128}`.
    pub block_rows: usize,
    /// Keys per column block, `BC ∈ {64, 128}`.
    pub block_cols: usize,
    /// Shared by all heads or one per kv head.
    pub heads: MaskHeads,
    /// Row pointers of every BSR, packed as described above.
    pub indptr: Vec<u32>,
    /// Column blocks of every row block, packed.
    pub indices: Vec<u32>,
    /// Empty, or one token-mask id per entry of `indices`.
    pub token_mask_ids: Vec<u32>,
    /// `[n, BR, BC/32]` bit rows of the token masks.
    pub token_masks: Vec<u32>,
}

impl BlockMask {
    /// Builds a mask from explicit lists: `rows[s][r]` is the sorted column-block list of row
    /// block `r` of BSR `s = b·M + m` (see the packed layout). No token masks.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when the lists hold more than `u32::MAX` entries. The lists are
    /// checked against shapes later, by [`BlockMask::validate`].
    pub fn from_lists(block_rows: usize, block_cols: usize, heads: MaskHeads, rows: &[Vec<Vec<u32>>]) -> Result<Self> {
        let mut indptr = Vec::new();
        let mut indices = Vec::new();
        for bsr in rows {
            indptr.push(crate::error::to_u32("rows", indices.len())?);
            for row in bsr {
                indices.extend_from_slice(row);
                indptr.push(crate::error::to_u32("rows", indices.len())?);
            }
        }
        Ok(BlockMask {
            block_rows,
            block_cols,
            heads,
            indptr,
            indices,
            token_mask_ids: Vec::new(),
            token_masks: Vec::new(),
        })
    }

    /// The mask that lists every block of every entry (dense attention).
    ///
    /// # Errors
    /// The errors of [`PrefillShape::validate`]; [`Error::InvalidArgument`] naming
    /// `block_rows` or `block_cols` when not 64 or 128.
    pub fn dense(block_rows: usize, block_cols: usize, heads: MaskHeads, shape: &PrefillShape) -> Result<Self> {
        shape.validate()?;
        check_block_sizes(block_rows, block_cols)?;
        let m = mask_heads_of(heads, shape);
        let mut rows = Vec::new();
        for b in 0..shape.batch() {
            let r = shape.seq_q(b)?.div_ceil(block_rows);
            let c = crate::error::to_u32("cu_seqlens_k", shape.seq_k(b)?.div_ceil(block_cols))?;
            for _ in 0..m {
                rows.push(vec![(0..c).collect::<Vec<u32>>(); r]);
            }
        }
        Self::from_lists(block_rows, block_cols, heads, &rows)
    }

    /// Number of BSRs per batch entry (`M`).
    pub fn mask_heads(&self, shape: &PrefillShape) -> usize {
        mask_heads_of(self.heads, shape)
    }

    /// `u32` words of one token mask (`BR · BC / 32`; saturating for invalid block sizes).
    pub fn token_mask_words(&self) -> usize {
        self.block_rows.saturating_mul(self.block_cols) / 32
    }

    /// Start of BSR `(b, m)` in `indptr` (the packed layout above).
    ///
    /// # Errors
    /// The errors of [`PrefillShape::validate`] and of the block-size check (`BR`, `BC` in {64, 128});
    /// [`Error::InvalidArgument`] naming `b` (`≥ B`) or `m` (`≥ M`).
    pub fn bsr_base(&self, shape: &PrefillShape, b: usize, m: usize) -> Result<usize> {
        shape.validate()?;
        check_block_sizes(self.block_rows, self.block_cols)?;
        let mh = self.mask_heads(shape);
        if m >= mh {
            return Err(Error::invalid("m", format!("mask head {m} is out of range ({mh} per entry)")));
        }
        let len_b = shape.seq_q(b)?.div_ceil(self.block_rows) + 1;
        let mut before = 0usize;
        for bb in 0..b {
            before += mh * (shape.seq_q(bb)?.div_ceil(self.block_rows) + 1);
        }
        Ok(before + m * len_b)
    }

    /// Checks the mask against `shape`: block sizes, packing, sorted unique in-range indices,
    /// token-mask ids and pool size.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `block_rows`, `block_cols`, `indptr`, `indices`,
    /// `token_mask_ids` or `token_masks`, with the first offending position.
    pub fn validate(&self, shape: &PrefillShape) -> Result<()> {
        shape.validate()?;
        check_block_sizes(self.block_rows, self.block_cols)?;
        let mh = self.mask_heads(shape);
        // Bounded: B + 1 ≤ cu_seqlens_q.len(), mh ≤ MAX_HEADS, row blocks ≤ i32::MAX tokens.
        let mut expected_len = 0usize;
        for b in 0..shape.batch() {
            expected_len += mh * (shape.seq_q(b)?.div_ceil(self.block_rows) + 1);
        }
        if self.indptr.len() != expected_len {
            return Err(Error::invalid(
                "indptr",
                format!(
                    "has {} entries; the packed layout needs {expected_len} (sum over entries and mask heads of \
                     ceil(Tq_b / BR) + 1)",
                    self.indptr.len()
                ),
            ));
        }
        let nnz = self.indices.len();
        let mut pos = 0usize;
        let mut prev_end = 0usize;
        for b in 0..shape.batch() {
            let n_rb = shape.seq_q(b)?.div_ceil(self.block_rows);
            let n_cb = shape.seq_k(b)?.div_ceil(self.block_cols);
            for m in 0..mh {
                let seg = &self.indptr[pos..pos + n_rb + 1];
                if seg[0] as usize != prev_end {
                    return Err(Error::invalid(
                        "indptr",
                        format!(
                            "BSR of entry {b}, mask head {m} starts at {} but the previous one ended at {prev_end}",
                            seg[0]
                        ),
                    ));
                }
                for r in 0..n_rb {
                    let (lo, hi) = (seg[r] as usize, seg[r + 1] as usize);
                    if hi < lo || hi > nnz {
                        return Err(Error::invalid(
                            "indptr",
                            format!(
                                "entry {b}, mask head {m}, row block {r}: range {lo}..{hi} is decreasing or past \
                                 indices.len() = {nnz}"
                            ),
                        ));
                    }
                    check_row(&self.indices[lo..hi], lo, n_cb, (b, m, r))?;
                }
                prev_end = seg[n_rb] as usize;
                pos += n_rb + 1;
            }
        }
        if prev_end != nnz {
            return Err(Error::invalid("indptr", format!("ends at {prev_end} but indices has {nnz} entries")));
        }
        let words = self.token_mask_words();
        if self.token_masks.len() % words != 0 {
            return Err(Error::invalid(
                "token_masks",
                format!("length {} is not a multiple of BR * BC / 32 = {words}", self.token_masks.len()),
            ));
        }
        let n_masks = self.token_masks.len() / words;
        if !self.token_mask_ids.is_empty() {
            if self.token_mask_ids.len() != nnz {
                return Err(Error::invalid(
                    "token_mask_ids",
                    format!("must be empty or hold one id per index ({nnz}), holds {}", self.token_mask_ids.len()),
                ));
            }
            if let Some(p) = self.token_mask_ids.iter().position(|&id| id != NO_TOKEN_MASK && id as usize >= n_masks) {
                return Err(Error::invalid(
                    "token_mask_ids",
                    format!("id {} at position {p} is out of range ({n_masks} token masks)", self.token_mask_ids[p]),
                ));
            }
        }
        Ok(())
    }

    /// The token-mask id of `indices[pos]` ([`NO_TOKEN_MASK`] when the mask has no token
    /// masks).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `pos` when `pos ≥ indices.len()`.
    pub fn token_mask_id(&self, pos: usize) -> Result<u32> {
        if pos >= self.indices.len() {
            return Err(Error::invalid("pos", format!("{pos} is past indices.len() = {}", self.indices.len())));
        }
        Ok(self.token_mask_ids.get(pos).copied().unwrap_or(NO_TOKEN_MASK))
    }

    /// Whether local query `i` of entry `b` sees local key `j` through mask head `m`, ignoring
    /// causality (see the module docs). The mask is validated against `shape` first, which
    /// costs `O(indices)` per call.
    ///
    /// # Errors
    /// The errors of [`BlockMask::validate`] and [`BlockMask::bsr_base`];
    /// [`Error::InvalidArgument`] naming `i` (`≥ Tq_b`) or `j` (`≥ Tk_b`).
    pub fn visible(&self, shape: &PrefillShape, b: usize, m: usize, i: usize, j: usize) -> Result<bool> {
        self.validate(shape)?;
        self.visible_unchecked(shape, b, m, i, j)
    }

    /// [`BlockMask::visible`] for a mask already validated against `shape`.
    pub(crate) fn visible_unchecked(
        &self,
        shape: &PrefillShape,
        b: usize,
        m: usize,
        i: usize,
        j: usize,
    ) -> Result<bool> {
        let base = self.bsr_base(shape, b, m)?;
        if i >= shape.seq_q(b)? {
            return Err(Error::invalid("i", format!("query {i} is past the entry's {} queries", shape.seq_q(b)?)));
        }
        if j >= shape.seq_k(b)? {
            return Err(Error::invalid("j", format!("key {j} is past the entry's {} keys", shape.seq_k(b)?)));
        }
        let r = i / self.block_rows;
        let (lo, hi) = (self.indptr[base + r] as usize, self.indptr[base + r + 1] as usize);
        let Ok(x) = self.indices[lo..hi].binary_search(&((j / self.block_cols) as u32)) else {
            return Ok(false);
        };
        let id = self.token_mask_id(lo + x)?;
        if id == NO_TOKEN_MASK {
            return Ok(true);
        }
        let words_per_row = self.block_cols / 32;
        let (rr, cc) = (i % self.block_rows, j % self.block_cols);
        let w = self.token_masks[id as usize * self.token_mask_words() + rr * words_per_row + cc / 32];
        Ok((w >> (cc % 32)) & 1 == 1)
    }
}

/// Checks one row block's column list: in range and strictly increasing.
fn check_row(row: &[u32], lo: usize, n_cb: usize, (b, m, r): (usize, usize, usize)) -> Result<()> {
    for (x, &c) in row.iter().enumerate() {
        if c as usize >= n_cb {
            return Err(Error::invalid(
                "indices",
                format!(
                    "entry {b}, mask head {m}, row block {r}: column block {c} at position {} is out of range (the \
                     entry has {n_cb} column blocks)",
                    lo + x
                ),
            ));
        }
        if x > 0 && row[x - 1] >= c {
            return Err(Error::invalid(
                "indices",
                format!(
                    "entry {b}, mask head {m}, row block {r}: not sorted and unique at position {} ({} then {c})",
                    lo + x,
                    row[x - 1]
                ),
            ));
        }
    }
    Ok(())
}

fn mask_heads_of(heads: MaskHeads, shape: &PrefillShape) -> usize {
    match heads {
        MaskHeads::Shared => 1,
        MaskHeads::PerKvHead => shape.hkv,
    }
}

fn check_block_sizes(block_rows: usize, block_cols: usize) -> Result<()> {
    if !BLOCK_SIZES.contains(&block_rows) {
        return Err(Error::invalid("block_rows", format!("must be 64 or 128, got {block_rows}")));
    }
    if !BLOCK_SIZES.contains(&block_cols) {
        return Err(Error::invalid("block_cols", format!("must be 64 or 128, got {block_cols}")));
    }
    Ok(())
}
