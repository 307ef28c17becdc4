//! The GPU path: [`DecodePlan`] (validate the lists, choose the split) and
//! [`DecodePlan::run`] (the attention launch and, for split lists, the merge launch).

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::{
    index_error, plan_chunks, validate_cache_lens, validate_indptr, ChunkPlan, DecodeConfig, IndexFault, ROWS_PER_CTA,
    TILE_TOKENS,
};
use crate::device::{Device, Module};
use crate::error::{check_shape, to_u32, Error, Result};
use crate::params::{NtkvDecodeParams, NtkvDecodeValidateParams};
use crate::tensor::{DType, DeviceTensor, Float};

/// Threads per CTA of the attention kernel (`THREADS` in cuda/decode.cu).
const ATTN_THREADS: u32 = 128;
/// Threads per CTA of the validation kernel.
const VALIDATE_THREADS: u32 = 256;
/// Most CTAs the validation kernel gives one list.
const VALIDATE_MAX_SEGMENTS: usize = 64;

/// Dynamic shared memory of the attention kernel for head dim `d`, in bytes: the query tile
/// (f32), scores, per-row state, two index buffers and two stages of padded K and V tiles.
/// Must equal `attn_smem_bytes` in cuda/decode.cu (the kernel checks it and does nothing
/// when launched with less).
pub fn attn_smem_bytes(d: usize) -> usize {
    let (r, tk) = (ROWS_PER_CTA, TILE_TOKENS);
    r * d * 4 + r * tk * 4 + 3 * r * 4 + r * 8 + 2 * tk * 4 + 2 * 2 * tk * (d + 8) * 2
}

/// A validated sparse-decode launch plan: the configuration, the (borrowed, validated)
/// index lists, the chunk split and the merge workspace.
///
/// Build it once per decode step (the lists change per step) and [`run`](Self::run) it for
/// every layer. The borrow keeps the lists unchanged while the plan lives.
pub struct DecodePlan<'a> {
    device: Device,
    cfg: DecodeConfig,
    indptr: &'a DeviceTensor<u32>,
    indices: &'a DeviceTensor<u32>,
    cache_lens: CudaSlice<u32>,
    split: ChunkPlan,
    ws_acc: CudaSlice<f32>,
    ws_ml: CudaSlice<f32>,
    /// Loaded once, shared memory prepared: `run` only launches.
    kernels_f16: Kernels,
    kernels_bf16: Kernels,
    attn_smem: u32,
}

/// The attention and merge functions of one dtype at the plan's head dim.
struct Kernels {
    attn: CudaFunction,
    merge: CudaFunction,
}

impl Kernels {
    fn load(device: &Device, dtype: DType, head_dim: usize) -> Result<(Self, u32)> {
        let attn_name: &'static str = match (dtype, head_dim) {
            (DType::F16, 64) => "ntkv_decode_attn_f16_d64",
            (DType::F16, _) => "ntkv_decode_attn_f16_d128",
            (_, 64) => "ntkv_decode_attn_bf16_d64",
            _ => "ntkv_decode_attn_bf16_d128",
        };
        let merge_name = if dtype == DType::F16 { "ntkv_decode_merge_f16" } else { "ntkv_decode_merge_bf16" };
        let attn = device.function(Module::Decode, attn_name)?;
        let smem = device.prepare_shared_mem(&attn, attn_smem_bytes(head_dim))?;
        let merge = device.function(Module::Decode, merge_name)?;
        Ok((Kernels { attn, merge }, smem))
    }
}

impl std::fmt::Debug for DecodePlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePlan").field("cfg", &self.cfg).field("split", &self.split).finish()
    }
}

impl<'a> DecodePlan<'a> {
    /// Validates the configuration and the lists and plans the launch.
    ///
    /// `cache_lens` (`[B]`, host) are the valid tokens of each sequence; `indptr`
    /// (`[B·Hkv + 1]`) and `indices` are the device-resident CSR lists (module docs). This
    /// synchronizes with the device's stream twice: to read `indptr` back, and to read the
    /// validation kernel's one-word verdict on `indices`.
    ///
    /// # Errors
    /// - [`Error::InvalidArgument`] naming a `config.*` field, `cache_lens`, `indptr` or
    ///   `indices` (with the list, entry and value of the first bad entry: out of range,
    ///   duplicate, or below the previous entry);
    /// - [`Error::Shape`] for `cache_lens` or `indptr` of the wrong length;
    /// - [`Error::TooLarge`] when the launch geometry or workspace overflows;
    /// - [`Error::KernelsNotBuilt`] / [`Error::Driver`] from the device.
    pub fn new(
        device: &Device,
        cfg: &DecodeConfig,
        cache_lens: &[u32],
        indptr: &'a DeviceTensor<u32>,
        indices: &'a DeviceTensor<u32>,
    ) -> Result<Self> {
        cfg.validate()?;
        validate_cache_lens(cfg, cache_lens)?;
        let n_lists = cfg.n_lists();
        check_shape("indptr", &[n_lists + 1], &[indptr.len()])?;
        let stream = device.stream();
        let indptr_host = stream.clone_dtoh(indptr.slice())?;
        validate_indptr(cfg, cache_lens, &indptr_host, indices.len())?;
        let cache_lens_dev = stream.clone_htod(cache_lens)?;

        let list_lens: Vec<usize> = indptr_host.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        validate_indices_on_device(
            device,
            cfg,
            cache_lens,
            &indptr_host,
            &list_lens,
            indptr,
            indices,
            &cache_lens_dev,
        )?;

        let split = plan_chunks(&list_lens, cfg.rows(), device.props().sm_count as usize, cfg.chunk_tokens);
        // Launch geometry must fit the kernels' u32 block index.
        let row_tiles = cfg.rows().div_ceil(ROWS_PER_CTA);
        let attn_blocks = n_lists
            .checked_mul(split.max_chunks)
            .and_then(|x| x.checked_mul(row_tiles))
            .ok_or_else(|| Error::too_large("indices", "the launch grid overflows"))?;
        if attn_blocks > i32::MAX as usize || n_lists * cfg.rows() > i32::MAX as usize {
            return Err(Error::too_large("indices", format!("{attn_blocks} CTAs exceed the launch limit")));
        }
        let (ws_acc_len, ws_ml_len) = if split.direct() {
            (1, 1)
        } else {
            let states = n_lists
                .checked_mul(split.max_chunks)
                .and_then(|x| x.checked_mul(cfg.rows()))
                .ok_or_else(|| Error::too_large("workspace", "partial states overflow usize"))?;
            let acc = states
                .checked_mul(cfg.head_dim)
                .ok_or_else(|| Error::too_large("workspace", "partial states overflow usize"))?;
            (acc, 2 * states)
        };
        let ws_acc = stream.alloc_zeros::<f32>(ws_acc_len)?;
        let ws_ml = stream.alloc_zeros::<f32>(ws_ml_len)?;
        let (kernels_f16, attn_smem) = Kernels::load(device, DType::F16, cfg.head_dim)?;
        let (kernels_bf16, _) = Kernels::load(device, DType::BF16, cfg.head_dim)?;
        Ok(DecodePlan {
            device: device.clone(),
            cfg: cfg.clone(),
            indptr,
            indices,
            cache_lens: cache_lens_dev,
            split,
            ws_acc,
            ws_ml,
            kernels_f16,
            kernels_bf16,
            attn_smem,
        })
    }

    /// The configuration the plan was made for.
    pub fn config(&self) -> &DecodeConfig {
        &self.cfg
    }

    /// The chunk split chosen.
    pub fn split(&self) -> ChunkPlan {
        self.split
    }

    /// Runs the attention: writes `o` `[B, Tq, Hq, D]` (dtype of `q`) and `lse` `[B, Tq, Hq]`.
    /// Enqueued on the device's stream; no synchronization.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `q`, `k`, `v`, `o` or `lse` when a shape differs from the
    /// configuration's; [`Error::InvalidArgument`] naming `q` for f32 (f16 and bf16 are
    /// supported); driver errors. Nothing is written when an error is returned before the
    /// launch.
    pub fn run<T: Float>(
        &mut self,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
        o: &mut DeviceTensor<T>,
        lse: &mut DeviceTensor<f32>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let kernels = match T::DTYPE {
            DType::F16 => &self.kernels_f16,
            DType::BF16 => &self.kernels_bf16,
            DType::F32 => return Err(Error::invalid("q", "f32 is not supported; use f16 or bf16")),
        };
        check_shape("q", &cfg.q_shape(), q.shape())?;
        check_shape("k", &cfg.kv_shape(), k.shape())?;
        check_shape("v", &cfg.kv_shape(), v.shape())?;
        check_shape("o", &cfg.q_shape(), o.shape())?;
        check_shape("lse", &cfg.lse_shape(), lse.shape())?;

        let n_lists = cfg.n_lists();
        let row_tiles = cfg.rows().div_ceil(ROWS_PER_CTA);
        let params = NtkvDecodeParams {
            n_indices: self.indices.len() as u64,
            scale_log2: cfg.softmax_scale() * std::f32::consts::LOG2_E,
            batch: to_u32("config.batch", cfg.batch)?,
            q_tokens: to_u32("config.q_tokens", cfg.q_tokens)?,
            q_heads: to_u32("config.q_heads", cfg.q_heads)?,
            kv_heads: to_u32("config.kv_heads", cfg.kv_heads)?,
            head_dim: to_u32("config.head_dim", cfg.head_dim)?,
            cache_capacity: to_u32("config.cache_capacity", cfg.cache_capacity)?,
            group: to_u32("config.q_heads", cfg.group())?,
            rows: to_u32("config.q_heads", cfg.rows())?,
            row_tiles: to_u32("config.q_heads", row_tiles)?,
            chunk_tokens: to_u32("config.chunk_tokens", self.split.chunk_tokens)?,
            max_chunks: to_u32("indices", self.split.max_chunks)?,
            causal: u32::from(cfg.causal),
            direct: u32::from(self.split.direct()),
            _pad0: 0,
            _pad1: 0,
        };
        // n_lists * rows and the CTA count fit in i32: checked by the plan.
        let blocks = to_u32("indices", n_lists * self.split.max_chunks * row_tiles)?;
        let stream = self.device.stream();
        let cfg_attn = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: self.attn_smem,
        };
        {
            let mut b = stream.launch_builder(&kernels.attn);
            b.arg(&params)
                .arg(q.slice())
                .arg(k.slice())
                .arg(v.slice())
                .arg(self.indptr.slice())
                .arg(self.indices.slice())
                .arg(&self.cache_lens)
                .arg(o.slice_mut())
                .arg(lse.slice_mut())
                .arg(&mut self.ws_acc)
                .arg(&mut self.ws_ml);
            // SAFETY: ntkv_decode_attn_<T>_d<D>(NtkvDecodeParams, const T* q, const T* k,
            // const T* v, const u32* indptr, const u32* indices, const u32* cache_lens, T* o,
            // float* lse, float* ws_acc, float* ws_ml), T and D matching the plan's head dim and T.
            // q/o have B*Tq*Hq*D elements and k/v B*Hkv*Tcap*D (shapes checked above); the
            // kernel reads q and writes o only at rows (b < B, tq < Tq, head < Hq) and
            // d < D; it gathers k/v rows only for indices below min(cache_lens[b], Tcap)
            // (others are zero-filled, not read); it reads indptr[list], indptr[list+1] for
            // list < B*Hkv (indptr has B*Hkv+1 entries) and indices only below p.n_indices
            // = indices.len(); cache_lens has B entries. In direct mode it writes o and lse
            // ([B,Tq,Hq]); otherwise it writes ws_acc / ws_ml at states
            // (list*max_chunks + chunk)*rows + row with chunk < max_chunks, row < rows, which
            // the plan allocated (times D and 2). Dynamic shared memory is attn_smem_bytes(D),
            // checked against the device limit (and opted in) by prepare_shared_mem in the plan.
            unsafe { b.launch(cfg_attn) }?;
        }
        if !self.split.direct() {
            let merge_blocks = to_u32("indices", n_lists * cfg.rows())?;
            let cfg_merge = LaunchConfig {
                grid_dim: (merge_blocks, 1, 1),
                block_dim: (to_u32("config.head_dim", cfg.head_dim)?, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&kernels.merge);
            b.arg(&params)
                .arg(self.indptr.slice())
                .arg(&self.ws_acc)
                .arg(&self.ws_ml)
                .arg(o.slice_mut())
                .arg(lse.slice_mut());
            // SAFETY: ntkv_decode_merge_<T>(NtkvDecodeParams, const u32* indptr,
            // const float* ws_acc, const float* ws_ml, T* o, float* lse). One CTA per
            // (list < B*Hkv, row < rows), one thread per d < D; it reads the list's bounds
            // (clamped to indices.len()), the states of chunks < min(chunks, max_chunks) of
            // that list and row (inside the workspace the plan allocated), and writes o at
            // row (b, tq, head) and d, and lse at (b, tq, head), all inside the shapes checked
            // above.
            unsafe { b.launch(cfg_merge) }?;
        }
        Ok(())
    }
}

/// Runs the device validation kernel over `indices` and turns its verdict into an error.
#[allow(clippy::too_many_arguments)]
fn validate_indices_on_device(
    device: &Device,
    cfg: &DecodeConfig,
    cache_lens: &[u32],
    indptr_host: &[u32],
    list_lens: &[usize],
    indptr: &DeviceTensor<u32>,
    indices: &DeviceTensor<u32>,
    cache_lens_dev: &CudaSlice<u32>,
) -> Result<()> {
    let max_len = list_lens.iter().copied().max().unwrap_or(0);
    if max_len == 0 {
        return Ok(());
    }
    let stream = device.stream();
    let mut flag = stream.clone_htod(&[u64::MAX])?;
    let params = NtkvDecodeValidateParams {
        n_indices: indices.len() as u64,
        n_lists: to_u32("indptr", cfg.n_lists())?,
        kv_heads: to_u32("config.kv_heads", cfg.kv_heads)?,
        batch: to_u32("config.batch", cfg.batch)?,
        _pad0: 0,
    };
    let segments = max_len.div_ceil(VALIDATE_THREADS as usize * 8).clamp(1, VALIDATE_MAX_SEGMENTS);
    let lc = LaunchConfig {
        grid_dim: (to_u32("indptr", cfg.n_lists())?, to_u32("indices", segments)?, 1),
        block_dim: (VALIDATE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = device.function(Module::Decode, "ntkv_decode_validate")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&params).arg(indptr.slice()).arg(indices.slice()).arg(cache_lens_dev).arg(&mut flag);
    // SAFETY: ntkv_decode_validate(NtkvDecodeValidateParams, const u32* indptr,
    // const u32* indices, const u32* cache_lens, u64* first_bad). Block x = list < n_lists
    // reads indptr[list], indptr[list+1] (B*Hkv+1 entries, checked), cache_lens[list / Hkv]
    // (B entries), and indices[j] for j inside the list's bounds clamped to n_indices =
    // indices.len(); it writes the single u64 of flag.
    unsafe { b.launch(lc) }?;
    let verdict = stream.clone_dtoh(&flag)?.first().copied().unwrap_or(u64::MAX);
    if verdict == u64::MAX {
        return Ok(());
    }
    let pos = usize::try_from(verdict >> 2).map_err(|_| Error::invalid("indices", "bad verdict"))?;
    let fault = IndexFault::from_code(verdict & 3)
        .ok_or_else(|| Error::invalid("indices", format!("validation kernel returned code {}", verdict & 3)))?;
    // Read back the bad entry and the one before it, for the message.
    let lo = pos.saturating_sub(1);
    let pair = stream.clone_dtoh(&indices.slice().slice(lo..=pos))?;
    let value = pair.last().copied().unwrap_or(0);
    let list = indptr_host.partition_point(|&p| p as usize <= pos).saturating_sub(1);
    let list_begin = indptr_host.get(list).map_or(0, |&p| p as usize);
    let prev = if pos > list_begin { pair.first().copied() } else { None };
    Err(index_error(cfg, cache_lens, indptr_host, pos, value, prev, fault))
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<crate::launch::KernelId> {
    // TODO(platform): list every id; filled in as the launchers move to `KernelId`.
    Vec::new()
}
