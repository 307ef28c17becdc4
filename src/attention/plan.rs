//! The prefill plan: validation and the per-CTA work list (host side), and the launch.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{BlockMask, MaskHeads, PrefillOptions, PrefillShape, PvPrecision, BLOCK_SIZES, HEAD_DIMS, NO_TOKEN_MASK};
use crate::device::{Device, Module};
use crate::error::{to_u32, Error, Result};
use crate::launch::{grid_for, KernelId};
use crate::params::{NtkvAttnPrefillParams, NTKV_ATTN_BLOCK_WORDS, NTKV_ATTN_ITEM_WORDS};
use crate::tensor::{DType, Float, TensorMut, TensorRef};

const ITEM_WORDS: usize = NTKV_ATTN_ITEM_WORDS as usize;
const BLOCK_WORDS: usize = NTKV_ATTN_BLOCK_WORDS as usize;

/// The validated work list of a prefill, on the host. [`PrefillPlan`] uploads it.
///
/// One work item per (batch entry, row block, query head); each item is one CTA. Items run
/// head-major: by batch entry, then kv head, so that the CTAs of one wave (132 on an H200, one
/// per SM) read one or two kv heads' K/V, which fit in L2 (4 MiB per head at 8k tokens, D=128,
/// bf16), instead of a dozen heads' streamed from HBM. Within a kv head the longest lists go
/// first (so a causal triangle's long rows do not form the tail), then query head and first
/// query row.
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
///
/// The fields are private: a `HostPlan` only comes from [`HostPlan::new`], so what
/// [`PrefillPlan::from_host`] uploads was validated; `from_host` checks the work list's
/// invariants once more anyway ([`HostPlan::check`]) before anything reaches a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct HostPlan {
    shape: PrefillShape,
    options: PrefillOptions,
    block_rows: usize,
    block_cols: usize,
    items: Vec<u32>,
    blocks: Vec<u32>,
    token_masks: Vec<u32>,
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
                next += shape.seq_q(b)?.div_ceil(br) + 1;
            }
        }
        for b in 0..shape.batch() {
            let (tq, tk) = (shape.seq_q(b)?, shape.seq_k(b)?);
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
                            mask.token_mask_id(pos)?,
                            0,
                        ]);
                    }
                    lists.push((begin, blocks.len() / BLOCK_WORDS));
                }
                let q_row0 = shape.cu_seqlens_q[b] as usize + rb * br;
                for h in 0..shape.hq {
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
                        to_u32("hq", h)?,
                    ]);
                }
            }
        }
        // Head-major (entry, kv head), then longest lists first, then query head and row: the
        // CTAs running together read the same K/V head and find it in L2. The key is unique per
        // item (query head and first row), so the order is fully determined.
        items.sort_by_key(|it| (it[2], it[7] / group as u32, std::cmp::Reverse(it[6] - it[5]), it[7], it[0]));
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

    /// The shape the plan was made for.
    pub fn shape(&self) -> &PrefillShape {
        &self.shape
    }

    /// The options the plan was made for.
    pub fn options(&self) -> &PrefillOptions {
        &self.options
    }

    /// `BR`.
    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    /// `BC`.
    pub fn block_cols(&self) -> usize {
        self.block_cols
    }

    /// Work items, [`NTKV_ATTN_ITEM_WORDS`] words each (layout above).
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// Visited blocks, [`NTKV_ATTN_BLOCK_WORDS`] words each (layout above).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// The token-mask pool, `[n, BR, BC/32]`.
    pub fn token_masks(&self) -> &[u32] {
        &self.token_masks
    }

    /// Re-checks the invariants the kernel relies on: every item's rows lie inside
    /// `Tq_total` and its entry's keys inside `Tk_total`, its head is `< Hq`, its block range
    /// lies in `blocks`, every column block is `< ceil(Tk_b / BC)`, and every token-mask id
    /// indexes the pool.
    ///
    /// # Errors
    /// [`Error::Internal`] naming the first broken invariant (a plan from [`HostPlan::new`]
    /// always passes).
    pub fn check(&self) -> Result<()> {
        self.shape.validate()?;
        let bad = |what: String| Err(Error::internal(format!("prefill work list: {what}")));
        if !BLOCK_SIZES.contains(&self.block_rows) || !BLOCK_SIZES.contains(&self.block_cols) {
            return bad(format!("block sizes {} x {}", self.block_rows, self.block_cols));
        }
        let words = self.block_rows * self.block_cols / 32;
        if self.items.len() % ITEM_WORDS != 0
            || self.blocks.len() % BLOCK_WORDS != 0
            || self.token_masks.len() % words != 0
        {
            return bad("array lengths are not whole records".into());
        }
        let (tq, tk, n_blocks, n_masks) =
            (self.shape.tq_total(), self.shape.tk_total(), self.n_blocks(), self.token_masks.len() / words);
        for (x, it) in self.items.chunks_exact(ITEM_WORDS).enumerate() {
            let (q0, rows, k0, tk_b) = (it[0] as usize, it[1] as usize, it[2] as usize, it[3] as usize);
            let (begin, end, h) = (it[5] as usize, it[6] as usize, it[7] as usize);
            if rows > self.block_rows || q0 + rows > tq || k0 + tk_b > tk || h >= self.shape.hq {
                return bad(format!("item {x} reaches past the tensors"));
            }
            if begin > end || end > n_blocks {
                return bad(format!("item {x} has block range {begin}..{end} of {n_blocks}"));
            }
            for blk in self.blocks[begin * BLOCK_WORDS..end * BLOCK_WORDS].chunks_exact(BLOCK_WORDS) {
                let (col, id) = (blk[0] as usize, blk[2]);
                if col >= tk_b.div_ceil(self.block_cols) || (id != NO_TOKEN_MASK && id as usize >= n_masks) {
                    return bad(format!("item {x} lists column block {col} / token mask {id}"));
                }
            }
        }
        Ok(())
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
    pub fn kernel_id(&self, dtype: DType) -> Result<KernelId> {
        prefill_id(dtype, self.shape.head_dim, self.block_rows, self.block_cols, self.split_p(dtype))
    }
}

/// The prefill kernel of `dtype` at head dim `d`, tile `br × bc`, with P split into hi + lo
/// or not: the one place the launcher and [`kernels`] build the id.
fn prefill_id(dtype: DType, d: usize, br: usize, bc: usize, split: bool) -> Result<KernelId> {
    let supported = matches!(dtype, DType::F16 | DType::BF16)
        && HEAD_DIMS.contains(&d)
        && BLOCK_SIZES.contains(&br)
        && BLOCK_SIZES.contains(&bc)
        && (!split || dtype == DType::BF16);
    if !supported {
        return Err(Error::invalid(
            "q",
            format!(
                "no prefill kernel for dtype {dtype}, D = {d}, BR = {br}, BC = {bc}, split = {split} (f16 and bf16, D and \
                 blocks 64 or 128, split for bf16 only)"
            ),
        ));
    }
    let id = KernelId::new(Module::Attention, "attention_prefill")
        .dtype(dtype)
        .head_dim(to_u32("head_dim", d)?)
        .tile(to_u32("block_rows", br)?, to_u32("block_cols", bc)?);
    Ok(if split { id.variant("split") } else { id })
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

    /// Uploads a plan made by [`HostPlan::new`], after re-checking its work list
    /// ([`HostPlan::check`]).
    ///
    /// # Errors
    /// [`Error::Internal`] from the check; [`Error::Driver`] when the upload fails.
    pub fn from_host(device: &Device, host: HostPlan) -> Result<Self> {
        host.check()?;
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
    /// bf16), `lse [Hq, Tq_total]` f32, all on the plan's device. Every row of `o` and `lse`
    /// is written.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the first tensor whose shape or length differs;
    /// [`Error::DeviceMismatch`] naming a tensor on another device; [`Error::InvalidArgument`]
    /// naming `q` for an f32 `T`; [`Error::TooLarge`] when the kernel's shared memory exceeds
    /// the device's; driver errors from the launch. Nothing is written on error.
    pub fn run<T: Float>(
        &self,
        q: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
        v: &impl TensorRef<T>,
        o: &mut impl TensorMut<T>,
        lse: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        let s = &self.host.shape;
        let (tq, hq, hkv, d) = (s.tq_total(), s.hq, s.hkv, s.head_dim);
        let dev = &self.device;
        super::check_attention_buffers(dev, q, k, v, o, lse, [&s.q_shape(), &s.kv_shape(), &s.lse_shape()])?;
        let id = self.host.kernel_id(T::DTYPE)?;
        let n_items = self.host.n_items();
        if n_items == 0 {
            return Ok(());
        }
        let f = dev.kernel(id)?;
        let smem = dev.prepare_shared_mem(&f, self.host.shared_mem_bytes())?;
        let params = NtkvAttnPrefillParams {
            n_items: to_u32("work items", n_items)?,
            num_q_heads: to_u32("hq", hq)?,
            num_kv_heads: to_u32("hkv", hkv)?,
            tq_total: to_u32("cu_seqlens_q", tq)?,
            scale_log2: self.host.options.scale_for(d) * std::f32::consts::LOG2_E,
            causal: u32::from(self.host.options.causal),
        };
        let threads = to_u32("block_rows", self.host.block_rows * 2)?;
        // One CTA per work item (the kernel has no grid-stride loop).
        let cfg = grid_for(dev, &f, threads, smem, n_items, false)?;
        let (qv, kv, vv) = (q.cuda_view(), k.cuda_view(), v.cuda_view());
        let (mut ov, mut lv) = (o.cuda_view_mut(), lse.cuda_view_mut());
        let stream = dev.stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&params)
            .arg(&self.items)
            .arg(&self.blocks)
            .arg(&self.token_masks)
            .arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut ov)
            .arg(&mut lv);
        // SAFETY: the kernel is ntkv_attention_prefill_<T>_d<D>_br<BR>_bc<BC>[_split]
        // (NtkvAttnPrefillParams, const u32* items, const u32* blocks, const u32* tmask,
        // const T* q, const T* k, const T* v, T* o, float* lse), chosen for T, D, BR, BC of
        // this plan. The grid has exactly n_items blocks; block x reads item x (items holds
        // n_items * 8 words). HostPlan::new validated the mask against the shape and
        // from_host re-checked the work list (HostPlan::check), so every item's rows lie in
        // its entry (q_row0 + n_rows <= Tq_total), its head is < Hq, its block range lies in
        // `blocks`, every listed column block is < ceil(Tk_b / BC) (keys past Tk_b are
        // zero-filled, not read), and every token-mask id indexes the uploaded pool. q, k, v,
        // o, lse were checked above to have the shapes and lengths [Tq, Hq, D], [Tk, Hkv, D]
        // (twice), [Tq, Hq, D] and [Hq, Tq] of the plan's shape and to live on its device,
        // and the shared-memory size was checked against the device by prepare_shared_mem.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`), built by [`prefill_id`] as the launcher builds it.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = Vec::new();
    for dt in [DType::F16, DType::BF16] {
        for d in HEAD_DIMS {
            for br in BLOCK_SIZES {
                for bc in BLOCK_SIZES {
                    for split in [false, true] {
                        ids.extend(prefill_id(dt, d, br, bc, split).ok());
                    }
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{BlockMask, MaskHeads};

    #[test]
    fn every_supported_combination_has_a_kernel() {
        let ids = kernels();
        assert_eq!(ids.len(), 16 + 8, "f16 and bf16 plain, bf16 split");
        for dt in [DType::F16, DType::BF16] {
            for d in [64, 128] {
                for br in [64, 128] {
                    for bc in [64, 128] {
                        let name = prefill_id(dt, d, br, bc, false).unwrap().symbol();
                        assert_eq!(name, format!("ntkv_attention_prefill_{}_d{d}_br{br}_bc{bc}", dt.name()));
                        let split = prefill_id(dt, d, br, bc, true);
                        assert_eq!(split.is_ok(), dt == DType::BF16);
                        if let Ok(id) = split {
                            assert_eq!(id.symbol(), format!("{name}_split"));
                        }
                    }
                }
            }
        }
        assert!(prefill_id(DType::F32, 64, 64, 64, false).is_err());
        assert!(prefill_id(DType::F16, 96, 64, 64, false).is_err());
    }

    #[test]
    fn block_words_constant_matches() {
        assert_eq!(NO_TOKEN_MASK, u32::MAX);
        assert_eq!(ITEM_WORDS, 8);
        assert_eq!(BLOCK_WORDS, 4);
    }

    /// A work list tampered with after `HostPlan::new` is refused before any upload.
    #[test]
    fn tampered_work_lists_are_internal_errors() {
        let shape = PrefillShape::new(2, 1, 64, vec![0, 100], vec![0, 130]).unwrap();
        let mask = BlockMask::dense(64, 64, MaskHeads::Shared, &shape).unwrap();
        let good = HostPlan::new(&shape, PrefillOptions::default(), &mask).unwrap();
        good.check().unwrap();
        let tamper: [&dyn Fn(&mut HostPlan); 6] = [
            &|p| p.items[0] = 1000, // first query row past Tq_total
            &|p| p.items[3] = 1000, // Tk_b past Tk_total
            &|p| p.items[6] = 1000, // block range past the list
            &|p| p.items[7] = 2,    // query head past Hq
            &|p| p.blocks[0] = 3,   // column block 3 of 3
            &|p| p.blocks[2] = 0,   // token mask 0 of an empty pool
        ];
        for (x, f) in tamper.iter().enumerate() {
            let mut p = good.clone();
            f(&mut p);
            assert!(matches!(p.check(), Err(Error::Internal(_))), "case {x}");
        }
    }
}
