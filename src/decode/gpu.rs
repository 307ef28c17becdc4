//! The GPU path: [`DecodePlan`] (validate the lists, choose the split, hold the workspace)
//! and [`DecodePlan::run`] (one attention launch, which also merges split lists).

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{
    decode_verdict, index_error, plan_chunks, validate_indptr, ChunkPlan, DecodeOptions, DecodeShape, HEAD_DIMS,
    ROWS_PER_CTA, TILE_TOKENS, VERDICT_NONE,
};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::launch::{grid_2d, grid_for, KernelId};
use crate::params::{NtkvDecodeParams, NtkvDecodeValidateParams};
use crate::tensor::{DType, Float, TensorMut, TensorRef};

/// Threads per CTA of the attention kernel (`THREADS` in cuda/decode.cu).
const ATTN_THREADS: u32 = 128;
/// Threads per CTA of the validation kernel.
const VALIDATE_THREADS: u32 = 256;
/// Most CTAs the validation kernel gives one list.
const VALIDATE_MAX_SEGMENTS: usize = 64;
/// The dtypes the kernels are built for.
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// The attention kernel of `dtype` at head dim `head_dim`.
fn attn_id(dtype: DType, head_dim: usize) -> Result<KernelId> {
    Ok(KernelId::new(Module::Decode, "decode_attn").dtype(dtype).head_dim(to_u32("head_dim", head_dim)?))
}

/// The list validation kernel.
const VALIDATE_ID: KernelId = KernelId::new(Module::Decode, "decode_validate");

/// Dynamic shared memory of the attention kernel for head dim `d`, in bytes: the query tile
/// (f32), scores, per-row state, two index buffers and two stages of padded K and V tiles.
/// Must equal `attn_smem_bytes` in cuda/decode.cu (the kernel checks it and does nothing
/// when launched with less). Saturates for absurd `d`.
pub fn attn_smem_bytes(d: usize) -> usize {
    let (r, tk) = (ROWS_PER_CTA, TILE_TOKENS);
    let per_d = r * 4 + 2 * 2 * tk * 2;
    d.saturating_mul(per_d).saturating_add(r * tk * 4 + 3 * r * 4 + r * 8 + 2 * tk * 4 + 2 * 2 * tk * 8 * 2)
}

/// A validated sparse-decode launch plan: the shape and options, the (borrowed, validated)
/// index lists, the chunk split, the launch geometry, the partial-state workspace and the
/// merge tickets.
///
/// Build it once per decode step (the lists change per step) and [`run`](Self::run) it for
/// every layer. The borrow keeps the lists unchanged while the plan lives.
///
/// Every device buffer a run touches besides its arguments is allocated here, once:
/// [`run`](Self::run) allocates no device memory, copies nothing between host and device and
/// never synchronizes; it enqueues one kernel. The tickets (one `u32` per list and tile of
/// 16 query rows) start at zero, and each launch leaves them at zero again (the CTA that
/// draws a group's last ticket resets it), so they need no clearing between runs.
pub struct DecodePlan<'a> {
    device: Device,
    shape: DecodeShape,
    options: DecodeOptions,
    indptr: CudaView<'a, u32>,
    indices: CudaView<'a, u32>,
    cache_lens: CudaSlice<u32>,
    split: ChunkPlan,
    ws_acc: CudaSlice<f32>,
    ws_ml: CudaSlice<f32>,
    /// One merge ticket per (list, row tile) of a split plan (one unused word when direct):
    /// zero between launches.
    tickets: CudaSlice<u32>,
    /// Loaded once, shared memory prepared, grids sized: `run` only launches.
    kernels_f16: Kernels,
    kernels_bf16: Kernels,
    attn_cfg: LaunchConfig,
}

/// The attention function of one dtype at the plan's head dim.
struct Kernels {
    attn: CudaFunction,
}

impl Kernels {
    fn load(device: &Device, dtype: DType, head_dim: usize) -> Result<(Self, u32)> {
        let attn = device.kernel(attn_id(dtype, head_dim)?)?;
        let smem = device.prepare_shared_mem(&attn, attn_smem_bytes(head_dim))?;
        Ok((Kernels { attn }, smem))
    }
}

crate::launch::plan_debug!(DecodePlan<'_>, "DecodePlan", shape, options, split);

impl<'a> DecodePlan<'a> {
    /// Validates the shape, the options and the lists and plans the launch.
    ///
    /// `cache_lens` (`[B]`, host) are the valid tokens of each sequence; `indptr`
    /// (`[B·Hkv + 1]`) and `indices` are the device-resident CSR lists (module docs). This
    /// synchronizes with the device's stream twice: to read `indptr` back, and to read the
    /// validation kernel's 64-bit verdict on `indices`.
    ///
    /// # Errors
    /// - [`Error::InvalidArgument`] naming a shape field, `scale`, `chunk_tokens`,
    ///   `cache_lens`, `indptr` or `indices` (with the list, entry and value of the first bad
    ///   entry: out of range, duplicate, or below the previous entry), worded as
    ///   [`super::validate_lists`] words it;
    /// - [`Error::Shape`] for `cache_lens` or `indptr` of the wrong length;
    /// - [`Error::DeviceMismatch`] when `indptr` or `indices` lives on another device;
    /// - [`Error::TooLarge`] when the launch geometry or workspace overflows;
    /// - [`Error::KernelsNotBuilt`] / [`Error::Driver`] from the device.
    pub fn new(
        device: &Device,
        shape: &DecodeShape,
        options: DecodeOptions,
        cache_lens: &[u32],
        indptr: &'a impl TensorRef<u32>,
        indices: &'a impl TensorRef<u32>,
    ) -> Result<Self> {
        shape.validate()?;
        options.validate()?;
        let n_lists = shape.n_lists();
        let (indptr_host, cache_lens_dev) = validate_lists_on_device(device, shape, cache_lens, indptr, indices)?;
        let (indptr, indices) = (indptr.cuda_view(), indices.cuda_view());
        let stream = device.stream();
        let list_lens: Vec<usize> = indptr_host.windows(2).map(|w| (w[1] - w[0]) as usize).collect();

        let split = plan_chunks(&list_lens, shape.rows(), device.props().sm_count as usize, options.chunk_tokens);
        // Launch geometry must fit the kernels' block index (one CTA per work item).
        let row_tiles = shape.rows().div_ceil(ROWS_PER_CTA);
        let sizes = crate::decode::split_sizes(
            split.max_chunks,
            "indices",
            (n_lists, shape.rows(), row_tiles),
            shape.head_dim,
        )?;
        let (kernels_f16, attn_smem) = Kernels::load(device, DType::F16, shape.head_dim)?;
        let (kernels_bf16, _) = Kernels::load(device, DType::BF16, shape.head_dim)?;
        let attn_cfg = grid_for(device, &kernels_f16.attn, ATTN_THREADS, attn_smem, sizes.blocks, false)?;
        let ws_acc = stream.alloc_zeros::<f32>(sizes.acc_len)?;
        let ws_ml = stream.alloc_zeros::<f32>(sizes.ml_len)?;
        let n_tickets = if split.direct() { 1 } else { crate::error::checked_mul("workspace", n_lists, row_tiles)? };
        let tickets = stream.alloc_zeros::<u32>(n_tickets)?;
        Ok(DecodePlan {
            device: device.clone(),
            shape: shape.clone(),
            options,
            indptr,
            indices,
            cache_lens: cache_lens_dev,
            split,
            ws_acc,
            ws_ml,
            tickets,
            kernels_f16,
            kernels_bf16,
            attn_cfg,
        })
    }

    /// The shape the plan was made for.
    pub fn shape(&self) -> &DecodeShape {
        &self.shape
    }

    /// The options the plan was made for.
    pub fn options(&self) -> &DecodeOptions {
        &self.options
    }

    /// The chunk split chosen.
    pub fn split(&self) -> ChunkPlan {
        self.split
    }

    /// Runs the attention: writes `o` `[B, Tq, Hq, D]` (dtype of `q`) and `lse` `[B, Tq, Hq]`
    /// from `q [B, Tq, Hq, D]`, `k, v [B, Hkv, Tcap, D]`. One kernel launch enqueued on the
    /// device's stream, and nothing else: no device allocation, no host copy, no
    /// synchronization. Every row of `o` and `lse` is written.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `q`, `k`, `v`, `o` or `lse` when a shape or a length differs
    /// from the plan's; [`Error::DeviceMismatch`] naming a tensor on another device;
    /// [`Error::InvalidArgument`] naming `q` for f32 (f16 and bf16 are supported); driver
    /// errors. Nothing is written when an error is returned before the launch.
    pub fn run<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
        v: &impl TensorRef<T>,
        o: &mut impl TensorMut<T>,
        lse: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        let shape = &self.shape;
        let kernels = match T::DTYPE {
            DType::F16 => &self.kernels_f16,
            DType::BF16 => &self.kernels_bf16,
            DType::F32 => return Err(Error::invalid("q", "f32 is not supported; use f16 or bf16")),
        };
        let dev = &self.device;
        let shapes = [&shape.q_shape()[..], &shape.kv_shape(), &shape.lse_shape()];
        crate::attention::check_attention_buffers(dev, q, k, v, o, lse, shapes)?;

        let row_tiles = shape.rows().div_ceil(ROWS_PER_CTA);
        let params = NtkvDecodeParams {
            n_indices: to_u64("indices", self.indices.len())?,
            scale_log2: self.options.scale_for(shape.head_dim) * std::f32::consts::LOG2_E,
            batch: to_u32("batch", shape.batch)?,
            q_tokens: to_u32("q_tokens", shape.q_tokens)?,
            q_heads: to_u32("hq", shape.hq)?,
            kv_heads: to_u32("hkv", shape.hkv)?,
            head_dim: to_u32("head_dim", shape.head_dim)?,
            cache_capacity: to_u32("capacity", shape.capacity)?,
            group: to_u32("hq", shape.group())?,
            rows: to_u32("hq", shape.rows())?,
            row_tiles: to_u32("hq", row_tiles)?,
            chunk_tokens: to_u32("chunk_tokens", self.split.chunk_tokens)?,
            max_chunks: to_u32("indices", self.split.max_chunks)?,
            causal: u32::from(self.options.causal),
            direct: u32::from(self.split.direct()),
            _pad0: 0,
            _pad1: 0,
        };
        let stream = self.device.stream();
        let (qv, kv, vv) = (q.cuda_view(), k.cuda_view(), v.cuda_view());
        {
            let (mut ov, mut lv) = (o.cuda_view_mut(), lse.cuda_view_mut());
            let mut b = stream.launch_builder(&kernels.attn);
            b.arg(&params)
                .arg(&qv)
                .arg(&kv)
                .arg(&vv)
                .arg(&self.indptr)
                .arg(&self.indices)
                .arg(&self.cache_lens)
                .arg(&mut ov)
                .arg(&mut lv)
                .arg(&mut self.ws_acc)
                .arg(&mut self.ws_ml)
                .arg(&mut self.tickets);
            // SAFETY: ntkv_decode_attn_<T>_d<D>(NtkvDecodeParams, const T* q, const T* k,
            // const T* v, const u32* indptr, const u32* indices, const u32* cache_lens, T* o,
            // float* lse, float* ws_acc, float* ws_ml, u32* tickets), T and D matching the
            // plan's head dim and T. q/o have B*Tq*Hq*D elements and k/v B*Hkv*Tcap*D (shapes
            // and lengths checked above); the kernel reads q and writes o only at rows
            // (b < B, tq < Tq, head < Hq) and d < D; it gathers k/v rows only for indices below
            // min(cache_lens[b], Tcap) (others are zero-filled, not read); it reads
            // indptr[list], indptr[list+1] for list < B*Hkv (indptr has B*Hkv+1 entries,
            // checked in new) and indices only below p.n_indices = indices.len();
            // cache_lens has B entries. The grid is B*Hkv*max_chunks*row_tiles blocks and
            // blocks past the work return. A list of one chunk (every list in direct mode)
            // writes o and lse ([B,Tq,Hq]); a longer one writes ws_acc / ws_ml at states
            // (list*max_chunks + chunk)*rows + row with chunk < max_chunks, row < rows, and
            // takes a ticket at tickets[list*row_tiles + row_tile], which the plan allocated
            // (times D and 2, and B*Hkv*row_tiles tickets) whenever max_chunks > 1; the CTA
            // with the last ticket reads those states and writes o and lse of its rows. The
            // tickets are zero here: zeroed in new, and each launch returns each one it takes
            // to zero (`&mut self` keeps two runs of this plan from overlapping, and the one
            // stream orders them). Dynamic shared memory is attn_smem_bytes(D), checked
            // against the device limit (and opted in) by prepare_shared_mem for both dtypes
            // in the plan.
            unsafe { b.launch(self.attn_cfg) }?;
        }
        Ok(())
    }
}

/// Validates device-resident CSR lists (`indptr` on the host after one read-back, `indices`
/// with the device validator) for `shape` and `cache_lens`; returns `indptr` on the host and
/// `cache_lens` on the device. Also the list check of [`crate::qdecode::QdecodeLists`].
pub(crate) fn validate_lists_on_device(
    device: &Device,
    shape: &DecodeShape,
    cache_lens: &[u32],
    indptr: &impl TensorRef<u32>,
    indices: &impl TensorRef<u32>,
) -> Result<(Vec<u32>, CudaSlice<u32>)> {
    shape.validate()?;
    device.check_buffer("indptr", indptr, &[shape.n_lists() + 1])?;
    device.check_tensor("indices", indices)?;
    let (indptr, indices) = (indptr.cuda_view(), indices.cuda_view());
    let stream = device.stream();
    let indptr_host = stream.clone_dtoh(&indptr)?;
    validate_indptr(shape, cache_lens, &indptr_host, indices.len())?;
    let cache_lens_dev = stream.clone_htod(cache_lens)?;
    let list_lens: Vec<usize> = indptr_host.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let lists = Lists { host: &indptr_host, lens: &list_lens, indptr: &indptr, indices: &indices };
    validate_indices_on_device(device, shape, cache_lens, &lists, &cache_lens_dev)?;
    Ok((indptr_host, cache_lens_dev))
}

/// The lists as the plan holds them: `indptr` on the host and both arrays on the device.
struct Lists<'v, 'a> {
    host: &'v [u32],
    lens: &'v [usize],
    indptr: &'v CudaView<'a, u32>,
    indices: &'v CudaView<'a, u32>,
}

/// Runs the device validation kernel over `indices` and turns its verdict into an error.
fn validate_indices_on_device(
    device: &Device,
    shape: &DecodeShape,
    cache_lens: &[u32],
    lists: &Lists<'_, '_>,
    cache_lens_dev: &CudaSlice<u32>,
) -> Result<()> {
    let max_len = lists.lens.iter().copied().max().unwrap_or(0);
    if max_len == 0 {
        return Ok(());
    }
    let stream = device.stream();
    let mut flag = stream.clone_htod(&[VERDICT_NONE])?;
    let params = NtkvDecodeValidateParams {
        n_indices: to_u64("indices", lists.indices.len())?,
        n_lists: to_u32("indptr", shape.n_lists())?,
        kv_heads: to_u32("hkv", shape.hkv)?,
        batch: to_u32("batch", shape.batch)?,
        _pad0: 0,
    };
    let segments = max_len.div_ceil(VALIDATE_THREADS as usize * 8).clamp(1, VALIDATE_MAX_SEGMENTS);
    let lc = grid_2d(shape.n_lists(), segments, VALIDATE_THREADS, 0)?;
    let f = device.kernel(VALIDATE_ID)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(lists.indptr).arg(lists.indices).arg(cache_lens_dev).arg(&mut flag);
    // SAFETY: ntkv_decode_validate(NtkvDecodeValidateParams, const u32* indptr,
    // const u32* indices, const u32* cache_lens, u64* first_bad). Block x = list < n_lists
    // reads indptr[list], indptr[list+1] (B*Hkv+1 entries, checked), cache_lens[list / Hkv]
    // (B entries), and indices[j] for j inside the list's bounds clamped to n_indices =
    // indices.len(); it writes the single u64 of flag.
    unsafe { b.launch(lc) }?;
    let verdict = stream.clone_dtoh(&flag)?.first().copied().unwrap_or(VERDICT_NONE);
    let Some((pos, fault)) = decode_verdict(verdict)? else {
        return Ok(());
    };
    let pos = usize::try_from(pos).map_err(|_| Error::internal(format!("verdict position {pos} exceeds usize")))?;
    if pos >= lists.indices.len() {
        return Err(Error::internal(format!("verdict position {pos} is past indices.len()")));
    }
    // Read back the bad entry and the one before it, for the message.
    let lo = pos.saturating_sub(1);
    let pair = stream.clone_dtoh(&lists.indices.slice(lo..=pos))?;
    let value = pair.last().copied().unwrap_or(0);
    let list = lists.host.partition_point(|&p| p as usize <= pos).saturating_sub(1);
    let list_begin = lists.host.get(list).map_or(0, |&p| p as usize);
    let prev = if pos > list_begin { pair.first().copied() } else { None };
    Err(index_error(shape, cache_lens, lists.host, pos, value, prev, fault))
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`), built by the same helpers the launchers use.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = vec![VALIDATE_ID];
    for dt in DTYPES {
        ids.extend(HEAD_DIMS.iter().filter_map(|&d| attn_id(dt, d).ok()));
    }
    ids
}
