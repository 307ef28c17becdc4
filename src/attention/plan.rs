//! The prefill plan: validation and the per-CTA work list (host side), and the launch.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{BlockMask, MaskHeads, PrefillOptions, PrefillShape, PvPrecision};
use crate::device::{Device, Module};
use crate::error::{check_shape, to_u32, Error, Result};
use crate::params::{NtkvAttnPrefillParams, NTKV_ATTN_BLOCK_WORDS, NTKV_ATTN_ITEM_WORDS};
use crate::tensor::{DType, DeviceTensor, Float};

const ITEM_WORDS: usize = NTKV_ATTN_ITEM_WORDS as usize;
const BLOCK_WORDS: usize = NTKV_ATTN_BLOCK_WORDS as usize;

/// The validated work list of a prefill, on the host. [`PrefillPlan`] uploads it.
///
/// One work item per (batch entry, row block, query head); each item is one CTA. Items are
/// ordered by decreasing number of visited blocks, so the longest CTAs start first; ties go
/// head-major (query head, then first query row) so that CTAs in flight share K/V in L2.
///
/// `items` holds [`NTKV_ATTN_ITEM_WORDS`] `u32` per item: first query token (global), valid
/// query rows, first key token of the entry (global), `Tk_b`, the causal offset (`i32` bits:
/// local row `r` of the block sees local key `j` iff `j ≤ r + offset`), the item's range
/// `begin..end` in `blocks`, and the query head.
///
/// `blocks` holds [`NTKV_ATTN_BLOCK_WORDS`] `u32` per visited block: the column block, 1 when
/// the kernel must check elements (the block crosses the causal diagonal or is the partial last
/// key block), the token-mask id (or [`super::NO_TOKEN_MASK`]), and 0. Blocks that causality hides
/// entirely are dropped here, so they cost nothing on the device. Lists are shared by the query
/// heads that read the same mask.
#[derive(Clone, Debug, PartialEq)]
pub struct HostPlan {
    /// The shape the plan was made for.
    pub shape: PrefillShape,
    /// The options the plan was made for.
    pub options: PrefillOptions,
    /// `BR`.
    pub block_rows: usize,
    /// `BC`.
    pub block_cols: usize,
    /// Work items, [`NTKV_ATTN_ITEM_WORDS`] words each.
    pub items: Vec<u32>,
    /// Visited blocks, [`NTKV_ATTN_BLOCK_WORDS`] words each.
    pub blocks: Vec<u32>,
    /// The token-mask pool, `[n, BR, BC/32]`.
    pub token_masks: Vec<u32>,
}

impl HostPlan {
    /// Validates `shape`, `options` and `mask` and lays out the work.
    ///
    /// # Errors
    /// Everything [`BlockMask::validate`] reports; [`Error::InvalidArgument`] naming `scale`
    /// when it is not finite; [`Error::TooLarge`] when the work list overflows `u32`.
    pub fn new(shape: &PrefillShape, options: PrefillOptions, mask: &BlockMask) -> Result<Self> {
        mask.validate(shape)?;
        let scale = options.scale_for(shape.head_dim);
        if !scale.is_finite() {
            return Err(Error::invalid("scale", format!("must be finite, got {scale}")));
        }
        let (br, bc) = (mask.block_rows, mask.block_cols);
        let mut items: Vec<[u32; ITEM_WORDS]> = Vec::new();
        let mut blocks: Vec<u32> = Vec::new();
        let group = shape.group();
        let mh = mask.mask_heads(shape);
        // Start of BSR (b, m) in indptr, for every entry and mask head (one pass, not O(B) each).
        let mut bsr_bases = Vec::with_capacity(shape.batch() * mh);
        let mut next = 0usize;
        for b in 0..shape.batch() {
            for _ in 0..mh {
                bsr_bases.push(next);
                next += shape.seq_q(b).div_ceil(br) + 1;
            }
        }
        for b in 0..shape.batch() {
            let (tq, tk) = (shape.seq_q(b), shape.seq_k(b));
            let n_rb = tq.div_ceil(br);
            // Local row r of block rb sees local key j iff j <= rb*BR + r + (tk - tq).
            let diag = tk as i64 - tq as i64;
            for rb in 0..n_rb {
                let n_rows = (tq - rb * br).min(br);
                let causal_off = rb as i64 * br as i64 + diag;
                // The visited-block list of each mask head of this row block.
                let mut lists = Vec::with_capacity(mh);
                for m in 0..mh {
                    let base = bsr_bases[b * mh + m];
                    let (lo, hi) = (mask.indptr[base + rb] as usize, mask.indptr[base + rb + 1] as usize);
                    let begin = blocks.len() / BLOCK_WORDS;
                    for pos in lo..hi {
                        let cb = mask.indices[pos] as usize;
                        let first_key = (cb * bc) as i64;
                        let last_key = ((cb + 1) * bc).min(tk) as i64 - 1;
                        let mut check = (cb + 1) * bc > tk;
                        if options.causal {
                            // Hidden from the block's last row: nothing in it is visible.
                            if first_key > causal_off + n_rows as i64 - 1 {
                                continue;
                            }
                            // Some key is hidden from the block's first row: check elements.
                            check |= last_key > causal_off;
                        }
                        blocks.extend_from_slice(&[
                            to_u32("indices", cb)?,
                            u32::from(check),
                            mask.token_mask_id(pos),
                            0,
                        ]);
                    }
                    lists.push((begin, blocks.len() / BLOCK_WORDS));
                }
                let q_row0 = shape.cu_seqlens_q[b] as usize + rb * br;
                for h in 0..shape.num_q_heads {
                    let m = match mask.heads {
                        MaskHeads::Shared => 0,
                        MaskHeads::PerKvHead => h / group,
                    };
                    let (begin, end) = lists[m];
                    items.push([
                        to_u32("cu_seqlens_q", q_row0)?,
                        to_u32("cu_seqlens_q", n_rows)?,
                        shape.cu_seqlens_k[b],
                        to_u32("cu_seqlens_k", tk)?,
                        i32::try_from(causal_off)
                            .map_err(|_| Error::too_large("cu_seqlens_k", "causal offset overflows i32"))?
                            as u32,
                        to_u32("indices", begin)?,
                        to_u32("indices", end)?,
                        to_u32("num_q_heads", h)?,
                    ]);
                }
            }
        }
        // Longest lists first; ties head-major (query head, then first query row), so CTAs
        // running together mostly read the same K/V head and find it in L2. The key is unique
        // per item, so the order is fully determined.
        items.sort_by_key(|it| (std::cmp::Reverse(it[6] - it[5]), it[7], it[0]));
        // One CTA per item: grid.x is limited to 2^31 - 1.
        crate::error::to_i32("work items", items.len())?;
        Ok(HostPlan {
            shape: shape.clone(),
            options,
            block_rows: br,
            block_cols: bc,
            items: items.concat(),
            blocks,
            token_masks: mask.token_masks.clone(),
        })
    }

    /// Number of work items (CTAs).
    pub fn n_items(&self) -> usize {
        self.items.len() / ITEM_WORDS
    }

    /// Number of visited (block, mask head) pairs in the lists.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len() / BLOCK_WORDS
    }

    /// Query-key pairs the kernel computes (visited blocks × BR × BC, per query head),
    /// the work the throughput figures count.
    pub fn visited_pairs(&self) -> u64 {
        self.items
            .chunks_exact(ITEM_WORDS)
            .map(|it| u64::from(it[6] - it[5]) * (self.block_rows * self.block_cols) as u64)
            .sum()
    }

    /// Dynamic shared memory of the kernel: double-buffered K and V tiles of `BC` rows of
    /// `D + 8` elements (16 bytes of padding per row against bank conflicts).
    pub fn shared_mem_bytes(&self) -> usize {
        4 * self.block_cols * (self.shape.head_dim + 8) * 2
    }

    /// Whether the kernel for `dtype` splits P into hi + lo (bf16 with [`PvPrecision::Split`]).
    pub fn split_p(&self, dtype: DType) -> bool {
        dtype == DType::BF16 && self.options.pv_precision == PvPrecision::Split
    }

    /// The kernel for `dtype`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `q` for a dtype other than f16 and bf16.
    pub fn kernel_name(&self, dtype: DType) -> Result<&'static str> {
        kernel_name(dtype, self.shape.head_dim, self.block_rows, self.block_cols, self.split_p(dtype))
    }
}

fn kernel_name(dtype: DType, d: usize, br: usize, bc: usize, split: bool) -> Result<&'static str> {
    macro_rules! pick {
        ($($dt:ident $dn:literal $brn:literal $bcn:literal $sp:literal => $name:literal),* $(,)?) => {
            match (dtype, d, br, bc, split) {
                $((DType::$dt, $dn, $brn, $bcn, $sp) => Ok($name),)*
                _ => Err(Error::invalid("q", format!("no prefill kernel for dtype {dtype}, D = {d}, BR = {br}, BC = {bc} (f16 and bf16, D and blocks 64 or 128)"))),
            }
        };
    }
    pick!(
        F16 64 64 64 false => "ntkv_attention_prefill_f16_d64_br64_bc64",
        F16 64 64 128 false => "ntkv_attention_prefill_f16_d64_br64_bc128",
        F16 64 128 64 false => "ntkv_attention_prefill_f16_d64_br128_bc64",
        F16 64 128 128 false => "ntkv_attention_prefill_f16_d64_br128_bc128",
        F16 128 64 64 false => "ntkv_attention_prefill_f16_d128_br64_bc64",
        F16 128 64 128 false => "ntkv_attention_prefill_f16_d128_br64_bc128",
        F16 128 128 64 false => "ntkv_attention_prefill_f16_d128_br128_bc64",
        F16 128 128 128 false => "ntkv_attention_prefill_f16_d128_br128_bc128",
        BF16 64 64 64 false => "ntkv_attention_prefill_bf16_d64_br64_bc64",
        BF16 64 64 128 false => "ntkv_attention_prefill_bf16_d64_br64_bc128",
        BF16 64 128 64 false => "ntkv_attention_prefill_bf16_d64_br128_bc64",
        BF16 64 128 128 false => "ntkv_attention_prefill_bf16_d64_br128_bc128",
        BF16 128 64 64 false => "ntkv_attention_prefill_bf16_d128_br64_bc64",
        BF16 128 64 128 false => "ntkv_attention_prefill_bf16_d128_br64_bc128",
        BF16 128 128 64 false => "ntkv_attention_prefill_bf16_d128_br128_bc64",
        BF16 128 128 128 false => "ntkv_attention_prefill_bf16_d128_br128_bc128",
        BF16 64 64 64 true => "ntkv_attention_prefill_bf16_d64_br64_bc64_split",
        BF16 64 64 128 true => "ntkv_attention_prefill_bf16_d64_br64_bc128_split",
        BF16 64 128 64 true => "ntkv_attention_prefill_bf16_d64_br128_bc64_split",
        BF16 64 128 128 true => "ntkv_attention_prefill_bf16_d64_br128_bc128_split",
        BF16 128 64 64 true => "ntkv_attention_prefill_bf16_d128_br64_bc64_split",
        BF16 128 64 128 true => "ntkv_attention_prefill_bf16_d128_br64_bc128_split",
        BF16 128 128 64 true => "ntkv_attention_prefill_bf16_d128_br128_bc64_split",
        BF16 128 128 128 true => "ntkv_attention_prefill_bf16_d128_br128_bc128_split",
    )
}

/// A validated prefill with its work list on the device: make once per mask and sequence
/// layout, run many times.
#[derive(Debug)]
pub struct PrefillPlan {
    device: Device,
    host: HostPlan,
    items: CudaSlice<u32>,
    blocks: CudaSlice<u32>,
    token_masks: CudaSlice<u32>,
}

impl PrefillPlan {
    /// Validates (see [`HostPlan::new`]) and uploads the work list.
    ///
    /// # Errors
    /// The validation errors of [`HostPlan::new`]; [`Error::Driver`] when the upload fails.
    pub fn new(device: &Device, shape: &PrefillShape, options: PrefillOptions, mask: &BlockMask) -> Result<Self> {
        let host = HostPlan::new(shape, options, mask)?;
        Self::from_host(device, host)
    }

    /// Uploads a plan made by [`HostPlan::new`].
    pub fn from_host(device: &Device, host: HostPlan) -> Result<Self> {
        let stream = device.stream();
        // Empty arrays become one zero word: the kernel never reads them then, but every
        // argument stays a valid allocation.
        let upload = |v: &[u32]| if v.is_empty() { stream.clone_htod(&[0u32]) } else { stream.clone_htod(v) };
        let items = upload(&host.items)?;
        let blocks = upload(&host.blocks)?;
        let token_masks = upload(&host.token_masks)?;
        Ok(PrefillPlan { device: device.clone(), host, items, blocks, token_masks })
    }

    /// The host-side plan.
    pub fn host(&self) -> &HostPlan {
        &self.host
    }

    /// Enqueues the prefill on the device's stream.
    ///
    /// `q [Tq_total, Hq, D]`, `k, v [Tk_total, Hkv, D]`, `o [Tq_total, Hq, D]` of `T` (f16 or
    /// bf16), `lse [Hq, Tq_total]` f32. Every row of `o` and `lse` is written.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose shape differs; [`Error::InvalidArgument`]
    /// naming `q` for an f32 `T`; [`Error::TooLarge`] when the kernel's shared memory exceeds
    /// the device's; driver errors from the launch. Nothing is written on error.
    pub fn run<T: Float>(
        &self,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
        o: &mut DeviceTensor<T>,
        lse: &mut DeviceTensor<f32>,
    ) -> Result<()> {
        let s = &self.host.shape;
        let (tq, tk, hq, hkv, d) = (s.tq_total(), s.tk_total(), s.num_q_heads, s.num_kv_heads, s.head_dim);
        check_shape("q", &[tq, hq, d], q.shape())?;
        check_shape("k", &[tk, hkv, d], k.shape())?;
        check_shape("v", &[tk, hkv, d], v.shape())?;
        check_shape("o", &[tq, hq, d], o.shape())?;
        check_shape("lse", &[hq, tq], lse.shape())?;
        let name = self.host.kernel_name(T::DTYPE)?;
        let n_items = self.host.n_items();
        if n_items == 0 {
            return Ok(());
        }
        let f = self.device.function(Module::Attention, name)?;
        let smem = self.device.prepare_shared_mem(&f, self.host.shared_mem_bytes())?;
        let params = NtkvAttnPrefillParams {
            n_items: to_u32("work items", n_items)?,
            num_q_heads: to_u32("num_q_heads", hq)?,
            num_kv_heads: to_u32("num_kv_heads", hkv)?,
            tq_total: to_u32("cu_seqlens_q", tq)?,
            scale_log2: self.host.options.scale_for(d) * std::f32::consts::LOG2_E,
            causal: u32::from(self.host.options.causal),
        };
        let threads = to_u32("block_rows", self.host.block_rows * 2)?;
        let cfg = LaunchConfig { grid_dim: (params.n_items, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        let stream = self.device.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&params)
            .arg(&self.items)
            .arg(&self.blocks)
            .arg(&self.token_masks)
            .arg(q.slice())
            .arg(k.slice())
            .arg(v.slice())
            .arg(o.slice_mut())
            .arg(lse.slice_mut());
        // SAFETY: the kernel is ntkv_attention_prefill_<T>_d<D>_br<BR>_bc<BC>(NtkvAttnPrefillParams,
        // const u32* items, const u32* blocks, const u32* tmask, const T* q, const T* k,
        // const T* v, T* o, float* lse), chosen for T, D, BR, BC of this plan. Block x reads item
        // x < n_items (items holds n_items * 8 words). HostPlan::new validated the mask against
        // the shape, so every item's rows lie in its entry (q_row0 + n_rows <= Tq_total), its
        // block range lies in `blocks`, every listed column block is < ceil(Tk_b / BC) (keys past
        // Tk_b are zero-filled, not read), and every token-mask id indexes the uploaded pool.
        // q, k, v, o, lse were checked above to be [Tq, Hq, D], [Tk, Hkv, D] (twice),
        // [Tq, Hq, D] and [Hq, Tq] for the plan's shape, and the shared-memory size was
        // checked against the device by prepare_shared_mem.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::NO_TOKEN_MASK;

    #[test]
    fn every_supported_combination_has_a_kernel() {
        for dt in [DType::F16, DType::BF16] {
            for d in [64, 128] {
                for br in [64, 128] {
                    for bc in [64, 128] {
                        let name = kernel_name(dt, d, br, bc, false).unwrap();
                        assert!(name.contains(&format!("_d{d}_br{br}_bc{bc}")) && name.contains(dt.name()));
                        if dt == DType::BF16 {
                            assert!(kernel_name(dt, d, br, bc, true).unwrap().ends_with("_split"));
                        }
                    }
                }
            }
        }
        assert!(kernel_name(DType::F32, 64, 64, 64, false).is_err());
    }

    #[test]
    fn block_words_constant_matches() {
        assert_eq!(NO_TOKEN_MASK, u32::MAX);
        assert_eq!(ITEM_WORDS, 8);
        assert_eq!(BLOCK_WORDS, 4);
    }
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    // TODO(platform): list every id; filled in as the launchers move to `KernelId`.
    Vec::new()
}
