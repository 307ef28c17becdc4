//! The GPU path: [`QdecodePlan`] (validate, choose the split, load the kernels, allocate
//! the workspace) and [`QdecodePlan::run`] (the attention launch and, for a split cache, the
//! merge launch).

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use half::f16;

use super::{plan_split, QdecodeOptions, QdecodeShape, Split, ROWS_PER_CTA};
use crate::decode::HEAD_DIMS;
use crate::device::{Device, Module};
use crate::error::{check_shape, to_u32, to_u64, Error, Result};
use crate::launch::{grid_for, KernelId};
use crate::params::{NtkvQdecodeOperand, NtkvQdecodeParams};
use crate::quant::{Axis, HiPrecision, MikvCache, MikvParts, QuantizedTensor};
use crate::tensor::{DType, DeviceKey, DeviceTensor, Float, TensorMut, TensorRef};

/// Threads per CTA of the attention kernel (`THREADS` in cuda/qdecode.cu).
pub(crate) const ATTN_THREADS: u32 = 128;
/// Threads per CTA of the fast KIVI-layout kernel (`FAST_THREADS` in cuda/qdecode.cu).
pub(crate) const FAST_THREADS: u32 = 256;
/// The (bits, group) pairs the fast kernel is built for, with their kernel-name suffixes;
/// head dim 64 takes the groups that divide 64.
const FAST_VARIANTS: [(u32, u32, &str); 9] = [
    (2, 32, "b2_g32"),
    (4, 32, "b4_g32"),
    (8, 32, "b8_g32"),
    (2, 64, "b2_g64"),
    (4, 64, "b4_g64"),
    (8, 64, "b8_g64"),
    (2, 128, "b2_g128"),
    (4, 128, "b4_g128"),
    (8, 128, "b8_g128"),
];
/// The dtypes the kernels are built for.
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];
/// The row-tile variants: 1 row (one query per kv head) and [`ROWS_PER_CTA`] rows.
const ROW_VARIANTS: [usize; 2] = [1, ROWS_PER_CTA];

fn variant(rows: usize) -> &'static str {
    if rows <= 1 {
        "r1"
    } else {
        "r8"
    }
}

/// The attention kernel of `dtype`, head dim `head_dim`, for `rows` query rows per kv head.
pub(crate) fn attn_id(dtype: DType, head_dim: usize, rows: usize) -> Result<KernelId> {
    Ok(KernelId::new(Module::Qdecode, "qdecode_attn")
        .dtype(dtype)
        .head_dim(to_u32("head_dim", head_dim)?)
        .variant(variant(rows)))
}

/// The fast KIVI-layout kernel of `dtype`, head dim `head_dim`, for K and V codes of `bits`
/// bits in groups of `group`; `None` where none is built (`group > head_dim`, or a pair
/// outside [`FAST_VARIANTS`]).
pub(crate) fn fast_id(dtype: DType, head_dim: usize, bits: u32, group: u32) -> Option<KernelId> {
    if group as usize > head_dim {
        return None;
    }
    let (_, _, suffix) = *FAST_VARIANTS.iter().find(|v| v.0 == bits && v.1 == group)?;
    Some(
        KernelId::new(Module::Qdecode, "qdecode_fast")
            .dtype(dtype)
            .head_dim(u32::try_from(head_dim).ok()?)
            .variant(suffix),
    )
}

/// The merge kernel of `dtype`.
pub(crate) fn merge_id(dtype: DType) -> KernelId {
    KernelId::new(Module::Qdecode, "qdecode_merge").dtype(dtype)
}

/// A KIVI-layout cache, borrowed for one run: quantized keys and values for tokens
/// `[0, Tq)` and f16 residual windows for `[Tq, Tq + residual_len)` (module docs).
#[derive(Clone, Copy, Debug)]
pub struct KiviCache<'c> {
    /// Keys, `[B, Hkv, Tq, D]` (KIVI: [`Axis::PerChannel`]).
    pub k: &'c QuantizedTensor,
    /// Values, the same shape (KIVI: [`Axis::PerToken`]).
    pub v: &'c QuantizedTensor,
    /// The keys' residual window, f16 `[B, Hkv, Rcap, D]`.
    pub k_residual: &'c DeviceTensor<f16>,
    /// The values' residual window, f16 `[B, Hkv, Rcap, D]`.
    pub v_residual: &'c DeviceTensor<f16>,
    /// Rows of the residual windows in use, `0..=Rcap`.
    pub residual_len: usize,
}

/// The cache a [`QdecodePlan::run`] reads.
#[derive(Clone, Copy, Debug)]
pub enum QdecodeCache<'c> {
    /// A KIVI-layout cache.
    Kivi(KiviCache<'c>),
    /// A pair of MiKV caches, keys and values, with `B·Hkv` heads each and the same length.
    Mikv {
        /// The keys' cache.
        k: &'c MikvCache,
        /// The values' cache.
        v: &'c MikvCache,
    },
}

/// Sorted CSR token lists per cache head, validated once for caches of at least `tokens`
/// tokens (module docs of [`crate::decode`] for the format: `indptr [B·Hkv + 1]`, each list
/// strictly ascending, every entry `< tokens`).
#[derive(Debug)]
pub struct QdecodeLists<'a> {
    indptr: CudaView<'a, u32>,
    indices: CudaView<'a, u32>,
    tokens: usize,
    heads: usize,
}

impl<'a> QdecodeLists<'a> {
    /// Validates device-resident lists for `shape` against a cache of `tokens` tokens, with
    /// the checks and wording of [`crate::decode::DecodePlan::new`] (every sequence's
    /// `cache_len` is `tokens`). Synchronizes twice (reads `indptr` back, then the device
    /// validator's verdict). The borrow keeps the lists unchanged while this lives.
    ///
    /// # Errors
    /// The errors of [`QdecodeShape::validate`]; [`Error::InvalidArgument`] naming `tokens`
    /// (above the capacity), `indptr` or `indices`; [`Error::Shape`] naming `indptr`;
    /// [`Error::DeviceMismatch`]; driver errors.
    pub fn new(
        device: &Device,
        shape: &QdecodeShape,
        tokens: usize,
        indptr: &'a impl TensorRef<u32>,
        indices: &'a impl TensorRef<u32>,
    ) -> Result<Self> {
        shape.validate()?;
        if tokens > shape.capacity {
            return Err(Error::invalid("tokens", format!("{tokens} exceeds the capacity {}", shape.capacity)));
        }
        let cache_lens = vec![to_u32("tokens", tokens)?; shape.batch];
        crate::decode::gpu::validate_lists_on_device(device, shape, &cache_lens, indptr, indices)?;
        Ok(QdecodeLists { indptr: indptr.cuda_view(), indices: indices.cuda_view(), tokens, heads: shape.n_lists() })
    }

    /// The cache length the lists were validated for.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// A validated quantized-decode plan for one cache shape: kernels loaded, grid sized for
/// `capacity` tokens, merge workspace allocated. Reuse it for every layer and step.
pub struct QdecodePlan {
    device: Device,
    shape: QdecodeShape,
    options: QdecodeOptions,
    split: Split,
    kernels_f16: (CudaFunction, CudaFunction),
    kernels_bf16: (CudaFunction, CudaFunction),
    /// The fast kernels of each dtype, with their (bits, group).
    fast_f16: Vec<(u32, u32, CudaFunction)>,
    fast_bf16: Vec<(u32, u32, CudaFunction)>,
    fast_enabled: bool,
    attn_cfg: LaunchConfig,
    fast_cfg: LaunchConfig,
    merge_cfg: LaunchConfig,
    ws_acc: CudaSlice<f32>,
    ws_ml: CudaSlice<f32>,
    dummy: Dummies,
}

/// What the operand checks need of the plan (borrowed field by field, so the workspace can
/// be borrowed mutably beside it).
#[derive(Clone, Copy)]
struct Ctx<'b> {
    device: &'b Device,
    shape: &'b QdecodeShape,
    dummy: &'b Dummies,
}

/// One-element buffers that absent operand parts point at (never read by the kernel).
struct Dummies {
    u32: CudaSlice<u32>,
    f16: CudaSlice<f16>,
}

crate::launch::plan_debug!(QdecodePlan, "QdecodePlan", shape, options, split);

/// One operand's buffers as the kernel takes them (absent parts point at a dummy).
struct OperandArgs<'b> {
    p: NtkvQdecodeOperand,
    codes: CudaView<'b, u32>,
    scales: CudaView<'b, f16>,
    mins: CudaView<'b, f16>,
    ring: CudaView<'b, f16>,
    imp_idx: CudaView<'b, u32>,
    imp_counts: CudaView<'b, u32>,
    hi_rows: CudaView<'b, f16>,
    hi_codes: CudaView<'b, u32>,
    hi_scales: CudaView<'b, f16>,
    hi_mins: CudaView<'b, f16>,
}

/// Code words and groups per head for `tokens` tokens of `dim` channels.
fn per_head(spec: &crate::quant::QuantSpec, tokens: usize, dim: usize) -> Result<(u64, u64)> {
    let n = crate::error::checked_mul("tokens", tokens, dim)?;
    Ok((to_u64("codes", n / spec.codes_per_word())?, to_u64("scales", n / spec.group)?))
}

impl QdecodePlan {
    /// Validates the shape and options, plans the split for `capacity` tokens on this
    /// device, loads the kernels of both dtypes and allocates the merge workspace.
    ///
    /// # Errors
    /// The errors of [`QdecodeShape::validate`] and [`QdecodeOptions::validate`];
    /// [`Error::TooLarge`] when the grid or workspace overflows; [`Error::KernelsNotBuilt`] /
    /// [`Error::Driver`] from the device.
    pub fn new(device: &Device, shape: &QdecodeShape, options: QdecodeOptions) -> Result<Self> {
        shape.validate()?;
        options.validate()?;
        let split = plan_split(shape, device.props().sm_count as usize, options.chunk_tokens);
        let rows = shape.rows();
        let row_tiles = rows.div_ceil(if rows <= 1 { 1 } else { ROWS_PER_CTA });
        let heads = shape.n_lists();
        let sizes = crate::decode::split_sizes(split.max_chunks, "capacity", (heads, rows, row_tiles), shape.head_dim)?;
        let load = |dt| -> Result<(CudaFunction, CudaFunction)> {
            Ok((device.kernel(attn_id(dt, shape.head_dim, rows)?)?, device.kernel(merge_id(dt))?))
        };
        let kernels_f16 = load(DType::F16)?;
        let kernels_bf16 = load(DType::BF16)?;
        let load_fast = |dt| -> Result<Vec<(u32, u32, CudaFunction)>> {
            let mut v = Vec::new();
            for &(bits, group, _) in &FAST_VARIANTS {
                if let Some(id) = fast_id(dt, shape.head_dim, bits, group) {
                    v.push((bits, group, device.kernel(id)?));
                }
            }
            Ok(v)
        };
        let fast_f16 = load_fast(DType::F16)?;
        let fast_bf16 = load_fast(DType::BF16)?;
        let attn_cfg = grid_for(device, &kernels_f16.0, ATTN_THREADS, 0, sizes.blocks, false)?;
        let fast_cfg = match fast_f16.first() {
            Some((_, _, f)) => grid_for(device, f, FAST_THREADS, 0, sizes.blocks, false)?,
            None => attn_cfg,
        };
        let merge_cfg = grid_for(device, &kernels_f16.1, to_u32("head_dim", shape.head_dim)?, 0, heads * rows, false)?;
        let stream = device.stream();
        Ok(QdecodePlan {
            device: device.clone(),
            shape: shape.clone(),
            options,
            split,
            kernels_f16,
            kernels_bf16,
            fast_f16,
            fast_bf16,
            fast_enabled: true,
            attn_cfg,
            fast_cfg,
            merge_cfg,
            ws_acc: stream.alloc_zeros::<f32>(sizes.acc_len)?,
            ws_ml: stream.alloc_zeros::<f32>(sizes.ml_len)?,
            dummy: Dummies { u32: stream.alloc_zeros::<u32>(1)?, f16: stream.alloc_zeros::<f16>(1)? },
        })
    }

    /// The shape the plan was made for.
    pub fn shape(&self) -> &QdecodeShape {
        &self.shape
    }

    /// The split chosen.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Allows (the default) or forbids the fast KIVI-layout kernel (module docs, "Kernels").
    /// With it forbidden every run takes the general kernel: the same contract and tolerance,
    /// slower; useful to compare the two.
    pub fn set_fast_path(&mut self, enabled: bool) {
        self.fast_enabled = enabled;
    }

    /// Whether a [`QdecodePlan::run`] over `cache` without lists takes the fast kernel: keys
    /// [`Axis::PerChannel`] and values [`Axis::PerToken`] with the same bits and group (a
    /// group that divides `D`), and the fast path allowed. Runs with lists always take the
    /// general kernel.
    pub fn fast_path_applies(&self, cache: &QdecodeCache<'_>) -> bool {
        let (k, v, kq) = match cache {
            QdecodeCache::Kivi(c) => (c.k.layout().spec, c.v.layout().spec, c.k.layout().tokens),
            QdecodeCache::Mikv { k, v } => (k.config().lo_spec(), v.config().lo_spec(), k.quantized_len()),
        };
        let op = |spec: crate::quant::QuantSpec| {
            (spec.bits, u32::try_from(spec.group).unwrap_or(u32::MAX), spec.axis == Axis::PerChannel)
        };
        self.fast_enabled && fast_kernel(&self.fast_f16, op(k), op(v), kq).is_some()
    }

    /// Checks a quantized tensor of a KIVI cache against the plan: `B·Hkv` heads of `D`.
    fn kivi_operand<'b>(
        ctx: &Ctx<'b>,
        arg: &'static str,
        t: &'b QuantizedTensor,
        res: &'b DeviceTensor<f16>,
        res_arg: &'static str,
        residual_len: usize,
    ) -> Result<OperandArgs<'b>> {
        let Ctx { device, shape, dummy } = *ctx;
        let (heads, d) = (shape.n_lists(), shape.head_dim);
        let layout = t.layout();
        device.check_key(arg, t.device_key())?;
        device.check_tensor(res_arg, res)?;
        if layout.heads != heads || layout.dim != d {
            return Err(Error::shape(arg, &[heads, layout.tokens, d], &[layout.heads, layout.tokens, layout.dim]));
        }
        let rshape = res.shape();
        let rcap = if rshape.len() == 4 { rshape[2] } else { 0 };
        check_shape(res_arg, &[shape.batch, shape.hkv, rcap.max(1), d], rshape)?;
        if residual_len > rcap {
            return Err(Error::invalid("residual_len", format!("{residual_len} exceeds the {rcap} rows of {res_arg}")));
        }
        let spec = layout.spec;
        let (codes_hs, groups_hs) = per_head(&spec, layout.tokens, d)?;
        let p = NtkvQdecodeOperand {
            codes_hs,
            groups_hs,
            ring_hs: to_u64(res_arg, rcap * d)?,
            hi_hs: 0,
            hi_groups_hs: 0,
            bits: spec.bits,
            group: to_u32("group", spec.group)?,
            per_channel: u32::from(spec.axis == Axis::PerChannel),
            quantized: to_u32(arg, layout.tokens)?,
            ring_rows: to_u32(res_arg, rcap)?,
            ring_base: to_u32(arg, layout.tokens)?,
            kmax: 0,
            hi_kind: 0,
        };
        Ok(OperandArgs {
            p,
            codes: t.codes().cuda_view(),
            scales: t.scales().cuda_view(),
            mins: t.mins().cuda_view(),
            ring: res.cuda_view(),
            imp_idx: dummy.u32.as_view(),
            imp_counts: dummy.u32.as_view(),
            hi_rows: dummy.f16.as_view(),
            hi_codes: dummy.u32.as_view(),
            hi_scales: dummy.f16.as_view(),
            hi_mins: dummy.f16.as_view(),
        })
    }

    /// Checks a MiKV cache against the plan: `B·Hkv` heads of `D`.
    fn mikv_operand<'b>(ctx: &Ctx<'b>, arg: &'static str, m: &'b MikvParts<'b>) -> Result<OperandArgs<'b>> {
        let Ctx { device, shape, dummy } = *ctx;
        let (heads, d) = (shape.n_lists(), shape.head_dim);
        device.check_key(arg, DeviceKey::of_stream(m.ring.stream()))?;
        if m.heads != heads || m.dim != d {
            return Err(Error::shape(arg, &[heads, m.tokens, d], &[m.heads, m.tokens, m.dim]));
        }
        let spec = m.cfg.lo_spec();
        let (codes_hs, groups_hs) = per_head(&spec, m.cfg.code_capacity(), d)?;
        let ring_rows = m.cfg.ring_rows();
        let kmax_d = crate::error::checked_mul("important", m.kmax, d)?;
        let (hi_kind, hi_hs, hi_groups_hs) = match (m.important.is_some(), m.cfg.hi) {
            (false, _) => (0, 0, 0),
            (true, HiPrecision::F16) => (1, kmax_d, 0),
            (true, HiPrecision::Int8) => (2, kmax_d / 4, kmax_d / m.cfg.group),
        };
        let p = NtkvQdecodeOperand {
            codes_hs,
            groups_hs,
            ring_hs: to_u64(arg, ring_rows * d)?,
            hi_hs: to_u64(arg, hi_hs)?,
            hi_groups_hs: to_u64(arg, hi_groups_hs)?,
            bits: spec.bits,
            group: to_u32("group", spec.group)?,
            per_channel: u32::from(spec.axis == Axis::PerChannel),
            quantized: to_u32(arg, m.quantized)?,
            ring_rows: to_u32(arg, ring_rows)?,
            ring_base: 0,
            kmax: to_u32(arg, m.kmax)?,
            hi_kind,
        };
        let (imp_idx, imp_counts) = match m.important {
            Some((i, c)) => (i.as_view(), c.as_view()),
            None => (dummy.u32.as_view(), dummy.u32.as_view()),
        };
        let hi_rows = m.hi_f16.map_or(dummy.f16.as_view(), |r| r.as_view());
        let (hi_codes, hi_scales, hi_mins) = match m.hi_q {
            Some((c, s, mm)) => (c.as_view(), s.as_view(), mm.as_view()),
            None => (dummy.u32.as_view(), dummy.f16.as_view(), dummy.f16.as_view()),
        };
        Ok(OperandArgs {
            p,
            codes: m.lo.0.as_view(),
            scales: m.lo.1.as_view(),
            mins: m.lo.2.as_view(),
            ring: m.ring.as_view(),
            imp_idx,
            imp_counts,
            hi_rows,
            hi_codes,
            hi_scales,
            hi_mins,
        })
    }

    /// Runs the decode: writes `o` `[B, Tq, Hq, D]` (dtype of `q`) and `lse` `[B, Tq, Hq]`
    /// from `q [B, Tq, Hq, D]` over `cache` (all `T` tokens, or only those of `lists`).
    /// Enqueued on the device's stream: no synchronization, no allocation. Every row of `o`
    /// and `lse` is written.
    ///
    /// # Errors
    /// - [`Error::Shape`] naming `q`, `o`, `lse`, `k`, `v`, `k_residual` or `v_residual` for
    ///   a shape that is not the plan's (cache heads must be `B·Hkv` of dimension `D`);
    /// - [`Error::InvalidArgument`] naming `q` (f32), `v` (a length or token count that
    ///   differs from `k`'s), `residual_len` (above the windows' rows), `tokens` (above the
    ///   plan's capacity) or `lists` (validated for more tokens than the cache holds, or for
    ///   another number of heads);
    /// - [`Error::DeviceMismatch`] naming a buffer on another device; driver errors.
    ///
    /// Nothing is written when an error is returned.
    pub fn run<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        cache: &QdecodeCache<'_>,
        lists: Option<&QdecodeLists<'_>>,
        o: &mut impl TensorMut<T>,
        lse: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        let kernels = match T::DTYPE {
            DType::F16 => &self.kernels_f16,
            DType::BF16 => &self.kernels_bf16,
            DType::F32 => return Err(Error::invalid("q", "f32 is not supported; use f16 or bf16")),
        };
        let shape = &self.shape;
        let dev = &self.device;
        let dummy = &self.dummy;
        let ctx = Ctx { device: dev, shape, dummy };
        dev.check_buffer("q", q, &shape.q_shape())?;
        dev.check_buffer("o", o, &shape.q_shape())?;
        dev.check_buffer("lse", lse, &shape.lse_shape())?;
        let (kp, vp);
        let (k, v, tokens) = match cache {
            QdecodeCache::Kivi(c) => {
                let k = Self::kivi_operand(&ctx, "k", c.k, c.k_residual, "k_residual", c.residual_len)?;
                let v = Self::kivi_operand(&ctx, "v", c.v, c.v_residual, "v_residual", c.residual_len)?;
                if c.k.layout().tokens != c.v.layout().tokens {
                    return Err(Error::invalid(
                        "v",
                        format!("{} quantized tokens but k has {}", c.v.layout().tokens, c.k.layout().tokens),
                    ));
                }
                (k, v, c.k.layout().tokens + c.residual_len)
            }
            QdecodeCache::Mikv { k, v } => {
                kp = k.decode_parts();
                vp = v.decode_parts();
                if kp.tokens != vp.tokens {
                    return Err(Error::invalid("v", format!("{} tokens but k has {}", vp.tokens, kp.tokens)));
                }
                (Self::mikv_operand(&ctx, "k", &kp)?, Self::mikv_operand(&ctx, "v", &vp)?, kp.tokens)
            }
        };
        if tokens > shape.capacity {
            return Err(Error::invalid(
                "tokens",
                format!("the cache holds {tokens}, above the plan's capacity {}", shape.capacity),
            ));
        }
        let (indptr, indices, n_indices) = match lists {
            Some(l) => {
                if l.heads != shape.n_lists() {
                    return Err(Error::invalid(
                        "lists",
                        format!("made for {} heads, the plan has {}", l.heads, shape.n_lists()),
                    ));
                }
                if l.tokens > tokens {
                    return Err(Error::invalid(
                        "lists",
                        format!("validated for {} tokens but the cache holds {tokens}", l.tokens),
                    ));
                }
                (l.indptr.slice(..), l.indices.slice(..), l.indices.len())
            }
            None => (dummy.u32.as_view(), dummy.u32.as_view(), 0),
        };
        let rows = shape.rows();
        let tile = if rows <= 1 { 1 } else { ROWS_PER_CTA };
        let fast_table = match T::DTYPE {
            DType::F16 => &self.fast_f16,
            _ => &self.fast_bf16,
        };
        let op = |p: &NtkvQdecodeOperand| (p.bits, p.group, p.per_channel == 1);
        let fast = (self.fast_enabled && lists.is_none())
            .then(|| fast_kernel(fast_table, op(&k.p), op(&v.p), k.p.quantized as usize))
            .flatten();
        let (attn_kernel, attn_cfg) = match fast {
            Some(f) => (f, self.fast_cfg),
            None => (&kernels.0, self.attn_cfg),
        };
        let params = NtkvQdecodeParams {
            k: k.p,
            v: v.p,
            n_indices: to_u64("indices", n_indices)?,
            scale_log2: self.options.scale_for(shape.head_dim) * std::f32::consts::LOG2_E,
            tokens: to_u32("tokens", tokens)?,
            batch: to_u32("batch", shape.batch)?,
            q_tokens: to_u32("q_tokens", shape.q_tokens)?,
            q_heads: to_u32("hq", shape.hq)?,
            kv_heads: to_u32("hkv", shape.hkv)?,
            head_dim: to_u32("head_dim", shape.head_dim)?,
            group: to_u32("hq", shape.group())?,
            rows: to_u32("hq", rows)?,
            row_tiles: to_u32("hq", rows.div_ceil(tile))?,
            chunk_tokens: to_u32("chunk_tokens", self.split.chunk_tokens)?,
            max_chunks: to_u32("capacity", self.split.max_chunks)?,
            causal: u32::from(self.options.causal),
            direct: u32::from(self.split.direct()),
            indexed: u32::from(lists.is_some()),
            _pad0: 0,
        };
        let stream = dev.stream();
        let qv = q.cuda_view();
        {
            let (mut ov, mut lv) = (o.cuda_view_mut(), lse.cuda_view_mut());
            let mut b = stream.launch_builder(attn_kernel);
            b.arg(&params).arg(&qv);
            for op in [&k, &v] {
                b.arg(&op.codes)
                    .arg(&op.scales)
                    .arg(&op.mins)
                    .arg(&op.ring)
                    .arg(&op.imp_idx)
                    .arg(&op.imp_counts)
                    .arg(&op.hi_rows)
                    .arg(&op.hi_codes)
                    .arg(&op.hi_scales)
                    .arg(&op.hi_mins);
            }
            b.arg(&indptr).arg(&indices).arg(&mut ov).arg(&mut lv).arg(&mut self.ws_acc).arg(&mut self.ws_ml);
            // SAFETY: ntkv_qdecode_attn_<T>_d<D>_r<R>(NtkvQdecodeParams, const T* q, then for
            // k and v: const u32* codes, const f16* scales, mins, ring, const u32* imp_idx,
            // imp_counts, const f16* hi_rows, const u32* hi_codes, const f16* hi_scales,
            // hi_mins; const u32* indptr, indices, T* o, float* lse, float* ws_acc, ws_ml),
            // T, D and R matching the kernel loaded for this plan. q/o are [B,Tq,Hq,D] and lse
            // [B,Tq,Hq] (checked above); the kernel touches rows b < B, tq < Tq, head < Hq
            // and d < D only. Each operand's offsets were derived from its own buffers'
            // layouts: codes/scales/mins are read at head < B*Hkv (= the buffers' heads,
            // checked) times codes_hs/groups_hs, for tokens t < quantized (<= the tokens the
            // layout holds); the ring at head*ring_hs + ((t - ring_base) % ring_rows)*D + d <
            // heads*ring_rows*D (ring_rows >= 1); important rows only when hi_kind != 0, at
            // i < min(imp_counts[head], kmax) of lists with kmax entries per head, whose rows
            // are [heads, kmax, D] (f16) or its int8 layout; absent parts are never read
            // (hi_kind 0 or kmax 0) and point at a one-element dummy. Positions are tokens
            // < tokens, or with lists the entries of indptr[head..=head+1] (heads+1 entries,
            // validated, clamped to n_indices = indices.len()), each token checked < tokens
            // before any read. Direct mode writes o and lse; otherwise ws_acc/ws_ml at states
            // (head*max_chunks + chunk)*rows + row < the workspace allocated in new (times D
            // and 2). Static shared memory only; the grid is heads*max_chunks*row_tiles
            // blocks and blocks past the work return. The fast kernel
            // ntkv_qdecode_fast_<T>_d<D>_b<B>_g<G> takes the same arguments (it ignores the
            // lists: it is chosen only without them) and reads the same buffers within the same
            // bounds: it is chosen only when k is per channel and v per token with B = bits and
            // G = group of both and k's quantized count a multiple of G, so K word rows < kq / E
            // and groups < kq / G, V code words and groups of tokens < v's quantized count, rows
            // through the general kernel's row loader; 256 threads, static shared memory only,
            // its rows tiles of ROWS_PER_CTA rows (row_tiles above, the same count).
            unsafe { b.launch(attn_cfg) }?;
        }
        if !self.split.direct() {
            let (mut ov, mut lv) = (o.cuda_view_mut(), lse.cuda_view_mut());
            let mut b = stream.launch_builder(&kernels.1);
            b.arg(&params).arg(&indptr).arg(&self.ws_acc).arg(&self.ws_ml).arg(&mut ov).arg(&mut lv);
            // SAFETY: ntkv_qdecode_merge_<T>(NtkvQdecodeParams, const u32* indptr,
            // const float* ws_acc, const float* ws_ml, T* o, float* lse). One CTA per
            // (head < B*Hkv, row < rows) (exactly that many blocks), one thread per d < D; it
            // reads indptr[head..=head+1] only in indexed mode (clamped to n_indices), the
            // states of chunks < min(chunks, max_chunks) inside the workspace, and writes o
            // and lse at row (b, tq, head) inside the shapes checked above.
            unsafe { b.launch(self.merge_cfg) }?;
        }
        Ok(())
    }
}

/// The fast kernel of `table` (the plan's, for one dtype and its head dim) that takes a cache
/// whose keys and values are `(bits, group, per_channel)` with `k_quantized` quantized key
/// tokens: keys per channel, values per token, one bits and group that the table holds, and
/// whole key groups. `None` when the general kernel must run.
fn fast_kernel(
    table: &[(u32, u32, CudaFunction)],
    k: (u32, u32, bool),
    v: (u32, u32, bool),
    k_quantized: usize,
) -> Option<&CudaFunction> {
    let ((kb, kg, kpc), (vb, vg, vpc)) = (k, v);
    if !kpc || vpc || kb != vb || kg != vg {
        return None;
    }
    // The table's groups are 32, 64 or 128, so the division below is by a nonzero group.
    let (_, _, f) = table.iter().find(|f| f.0 == kb && f.1 == kg)?;
    (k_quantized % kg as usize == 0).then_some(f)
}

/// Every kernel id this module's launchers can form.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = Vec::new();
    for dt in DTYPES {
        for &d in &HEAD_DIMS {
            for &r in &ROW_VARIANTS {
                ids.extend(attn_id(dt, d, r).ok());
            }
        }
        for &d in &HEAD_DIMS {
            for &(bits, group, _) in &FAST_VARIANTS {
                ids.extend(fast_id(dt, d, bits, group));
            }
        }
        ids.push(merge_id(dt));
    }
    ids
}
