//! Launch code for `cuda/pages.cu`: the Quest metadata and selection plans and the ShadowKV
//! landmark and selection plans. Every plan validates its shape in `new`; every run checks
//! each buffer and the host lengths before anything is enqueued.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{
    cpu::check_append, landmark_scale, lanes, validate_lens, LandmarkSelectShape, LandmarkShape, QuestMetaShape,
    QuestSelectShape, CHUNK_TOKENS, COSINE_EPS,
};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::launch::{grid_for, KernelId};
use crate::params::{NtkvPagesLandmarkParams, NtkvPagesMetaParams, NtkvPagesScoreParams, NtkvPagesShadowParams};
use crate::select::gpu::{check_aligned, TopkOutput};
use crate::select::{ExpandPlan, ExpandShape, TopkOptions, TopkPlan, TopkShape};
use crate::tensor::{DType, DeviceTensor, Float, TensorMut, TensorRef};

/// Threads per block of every pages kernel (`THREADS` in cuda/pages.cu).
pub const PAGES_THREADS: u32 = 256;
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const _: () = assert!(DTYPES[0] as usize == 0 && DTYPES[1] as usize == 1 && DTYPES[2] as usize == 2);
const TYPED_OPS: [&str; 4] = ["pages_quest_meta", "pages_quest_score", "pages_landmark", "pages_shadow_logits"];
const UNTYPED_OPS: [&str; 3] = ["pages_shadow_softmax", "pages_shadow_score", "pages_shadow_mark"];

fn typed_id(op: &'static str, dtype: DType) -> KernelId {
    KernelId::new(Module::Pages, op).dtype(dtype)
}

/// One typed kernel in every dtype, with its grid for `work` blocks of work (grid-stride,
/// capped at one resident wave).
#[derive(Clone, Debug)]
struct Typed {
    f: [CudaFunction; 3],
    cfg: [LaunchConfig; 3],
}

impl Typed {
    fn load(device: &Device, op: &'static str, work: usize) -> Result<Self> {
        let load = |dt| device.kernel(typed_id(op, dt));
        let f = [load(DTYPES[0])?, load(DTYPES[1])?, load(DTYPES[2])?];
        let grid = |f: &CudaFunction| grid_for(device, f, PAGES_THREADS, 0, work, true);
        let cfg = [grid(&f[0])?, grid(&f[1])?, grid(&f[2])?];
        Ok(Typed { f, cfg })
    }

    fn get<T: Float>(&self) -> (&CudaFunction, LaunchConfig) {
        // DTYPES lists the variants in declaration order, so the discriminant is the slot.
        let slot = T::DTYPE as usize;
        (&self.f[slot], self.cfg[slot])
    }
}

fn untyped(device: &Device, op: &'static str, work: usize) -> Result<(CudaFunction, LaunchConfig)> {
    let f = device.kernel(KernelId::new(Module::Pages, op))?;
    let cfg = grid_for(device, &f, PAGES_THREADS, 0, work, true)?;
    Ok((f, cfg))
}

/// Checks a buffer's device, shape, length and 16-byte alignment (the kernels load 8
/// elements at a time).
fn check_vec<T>(device: &Device, arg: &'static str, t: &impl TensorRef<T>, shape: &[usize]) -> Result<()> {
    device.check_buffer(arg, t, shape)?;
    check_aligned(device, arg, &t.cuda_view(), 16)
}

/// Checks CSR outputs as the expansion will: `indptr [rows + 1]`, `indices` 1-D with room for
/// the longest output.
fn check_csr(
    device: &Device,
    es: &ExpandShape,
    indptr: &impl TensorRef<u32>,
    indices: &impl TensorRef<u32>,
) -> Result<()> {
    device.check_buffer("indptr", indptr, &[es.rows + 1])?;
    let cap = es.capacity()?;
    device.check_tensor("indices", indices)?;
    if indices.shape().len() != 1 || indices.shape()[0] != indices.len() || indices.len() < cap {
        return Err(Error::shape("indices", &[cap], indices.shape()));
    }
    Ok(())
}

/// `outliers [rows, n_out]`; with no outliers the tensor is only checked for its device (a
/// zero-length device buffer cannot exist) and never touched.
fn check_outliers(device: &Device, outliers: &impl TensorRef<u32>, s: &LandmarkShape) -> Result<()> {
    if s.outliers == 0 {
        device.check_tensor("outliers", outliers)
    } else {
        device.check_buffer("outliers", outliers, &s.outliers_shape())
    }
}

fn items(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// Per-row host lengths (`lens[b]` repeated for each kv head, mapped by `f`) into `buf`.
fn fill_rows(buf: &mut [u32], lens: &[u32], hkv: usize, f: impl Fn(u32) -> u32) {
    for (r, v) in buf.iter_mut().enumerate() {
        *v = f(lens[r / hkv]);
    }
}

/// A plan's `shape()` accessor, and `Debug` by the shape alone (the kernels and workspaces
/// have nothing worth printing).
macro_rules! by_shape {
    ($($plan:ident: $shape:ident),*) => {$(
        impl $plan {
            /// The shape this plan serves.
            pub fn shape(&self) -> $shape {
                self.shape
            }
        }

        crate::launch::plan_debug!($plan, stringify!($plan), shape);
    )*};
}
by_shape!(
    QuestMetaPlan: QuestMetaShape,
    QuestSelectPlan: QuestSelectShape,
    LandmarkPlan: LandmarkShape,
    LandmarkSelectPlan: LandmarkSelectShape
);

/// The key geometry of the metadata kernels as `[batch, kv_heads, capacity, head_dim]`.
fn key_dims(batch: usize, hkv: usize, capacity: usize, head_dim: usize) -> Result<[u32; 4]> {
    Ok([to_u32("keys", batch)?, to_u32("keys", hkv)?, to_u32("capacity", capacity)?, to_u32("head_dim", head_dim)?])
}

/// The query geometry of the selection kernels as `[batch, kv_heads, q_heads, q_tokens,
/// head_dim, lanes, lanes_pow2, group]`.
fn query_dims(batch: usize, hkv: usize, hq: usize, q_tokens: usize, head_dim: usize) -> Result<[u32; 8]> {
    let (l, lp) = lanes(head_dim);
    Ok([
        to_u32("q", batch)?,
        to_u32("q", hkv)?,
        to_u32("q", hq)?,
        to_u32("q", q_tokens)?,
        to_u32("head_dim", head_dim)?,
        to_u32("head_dim", l)?,
        to_u32("head_dim", lp)?,
        to_u32("hq", hq / hkv)?,
    ])
}

/// What both selection plans share: the sequence lengths on the device, a per-row host
/// scratch, and the expansion of the selected blocks into sorted CSR token lists.
struct Selection {
    expand: ExpandPlan,
    lens: CudaSlice<u32>,
    row_lens: DeviceTensor<u32>,
    host_rows: Vec<u32>,
}

impl Selection {
    fn new(device: &Device, es: &ExpandShape, batch: usize) -> Result<Self> {
        Ok(Selection {
            expand: ExpandPlan::new(device, es)?,
            lens: device.stream().alloc_zeros::<u32>(batch)?,
            row_lens: DeviceTensor::zeros(device, &[es.rows])?,
            host_rows: vec![0; es.rows],
        })
    }

    /// Expands `blocks` with each row's token count (`lens[b]` for its sequence).
    fn expand(
        &mut self,
        blocks: &impl TensorRef<u32>,
        lens: &[u32],
        hkv: usize,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        fill_rows(&mut self.host_rows, lens, hkv, |n| n);
        self.row_lens.copy_from_host(&self.host_rows)?;
        self.expand.run(blocks, &self.row_lens, indptr, indices)
    }
}

/// Builds and refreshes Quest page metadata (see the [module docs](super) for the contract):
/// one kernel pass over the keys, 8 channels per thread in 16-byte loads.
pub struct QuestMetaPlan {
    device: Device,
    shape: QuestMetaShape,
    meta: Typed,
    lens: CudaSlice<u32>,
    host_lens: Vec<u32>,
}

impl QuestMetaPlan {
    /// Validates `shape`, loads the kernels and sizes the grid.
    ///
    /// # Errors
    /// As [`QuestMetaShape::validate`]; [`Error::KernelsNotBuilt`] without compiled kernels;
    /// driver errors.
    pub fn new(device: &Device, shape: &QuestMetaShape) -> Result<Self> {
        shape.validate()?;
        let n = items(&[shape.batch, shape.hkv, shape.n_pages(), shape.head_dim / 8]);
        Ok(QuestMetaPlan {
            device: device.clone(),
            shape: *shape,
            meta: Typed::load(device, "pages_quest_meta", n.div_ceil(PAGES_THREADS as usize))?,
            lens: device.stream().alloc_zeros::<u32>(2 * shape.batch)?,
            host_lens: vec![0; 2 * shape.batch],
        })
    }

    /// Builds the metadata of every page of `keys [B, Hkv, Tcap, D]` holding `lens[b]` valid
    /// tokens into `page_max` and `page_min` (`[B, Hkv, NP, D]`, the keys' dtype). Pages past a
    /// row's last page are not written.
    ///
    /// # Errors
    /// As [`Self::append`].
    pub fn build<T: Float>(
        &mut self,
        keys: &impl TensorRef<T>,
        lens: &[u32],
        page_max: &mut impl TensorMut<T>,
        page_min: &mut impl TensorMut<T>,
    ) -> Result<()> {
        self.enqueue(keys, None, lens, page_max, page_min)
    }

    /// Refreshes the metadata after row `b` grew from `old[b]` to `new[b]` valid tokens: the
    /// pages from `old[b] / P` (the partial page the append continues) to `ceil(new[b] / P)`
    /// are recomputed from all their valid tokens; no other page is read or written.
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] or [`Error::InvalidArgument`] (a view not
    /// 16-byte aligned) naming `keys`, `page_max` or `page_min`; as [`validate_lens`] for `old`
    /// and `new`, and [`Error::InvalidArgument`] naming `lens` when `old[b] > new[b]`; driver
    /// errors. Nothing is written on an error.
    pub fn append<T: Float>(
        &mut self,
        keys: &impl TensorRef<T>,
        old: &[u32],
        new: &[u32],
        page_max: &mut impl TensorMut<T>,
        page_min: &mut impl TensorMut<T>,
    ) -> Result<()> {
        self.enqueue(keys, Some(old), new, page_max, page_min)
    }

    fn enqueue<T: Float>(
        &mut self,
        keys: &impl TensorRef<T>,
        old: Option<&[u32]>,
        new: &[u32],
        page_max: &mut impl TensorMut<T>,
        page_min: &mut impl TensorMut<T>,
    ) -> Result<()> {
        let s = self.shape;
        match old {
            Some(o) => check_append(&s, o, new)?,
            None => validate_lens(new, s.batch, s.capacity)?,
        }
        check_vec(&self.device, "keys", keys, &s.keys_shape())?;
        check_vec(&self.device, "page_max", page_max, &s.meta_shape())?;
        check_vec(&self.device, "page_min", page_min, &s.meta_shape())?;
        let (lo, hi) = self.host_lens.split_at_mut(s.batch);
        match old {
            Some(o) => lo.copy_from_slice(o),
            None => lo.fill(0),
        }
        hi.copy_from_slice(new);
        let stream = self.device.stream().clone();
        stream.memcpy_htod(&self.host_lens, &mut self.lens)?;
        let [batch, kv_heads, capacity, head_dim] = key_dims(s.batch, s.hkv, s.capacity, s.head_dim)?;
        let params = NtkvPagesMetaParams {
            n_items: to_u64("page_max", items(&[s.batch, s.hkv, s.n_pages(), s.head_dim / 8]))?,
            batch,
            kv_heads,
            capacity,
            head_dim,
            page_size: to_u32("page_size", s.page_size)?,
            n_pages: to_u32("page_max", s.n_pages())?,
            lanes: to_u32("head_dim", s.head_dim / 8)?,
            _pad0: 0,
        };
        let (f, cfg) = self.meta.get::<T>();
        let (kv, mut mx, mut mn) = (keys.cuda_view(), page_max.cuda_view_mut(), page_min.cuda_view_mut());
        let mut b = stream.launch_builder(f);
        b.arg(&params).arg(&kv).arg(&self.lens).arg(&mut mx).arg(&mut mn);
        // SAFETY: ntkv_pages_quest_meta_<T>(NtkvPagesMetaParams, const T* keys, const u32* lens,
        // T* page_max, T* page_min). Item (row, page, lane) < n_items = rows * n_pages * D/8 only
        // touches pages with page * P < lens[batch + b] <= capacity (validated), so it reads keys
        // [row, t, 8 lane .. +8] for t < capacity (keys is [B, Hkv, Tcap, D], checked) and writes
        // 8 elements at (row * n_pages + page) * D + 8 lane, inside page_max and page_min ([B, Hkv,
        // NP, D], checked). lens holds 2 * batch words. Every 8-element access is 16-byte aligned:
        // the views start aligned (checked) and D is a multiple of 8.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// A Quest selection step (see the [module docs](super)): page bounds, the top `budget − 1`
/// pages by the radix top-k of [`crate::select`], the forced last page, and the expansion to
/// sorted CSR token lists, in four launches with no host synchronization.
pub struct QuestSelectPlan {
    device: Device,
    shape: QuestSelectShape,
    score: Typed,
    topk: Option<TopkPlan>,
    sel: Selection,
    scores: CudaSlice<f32>,
}

impl QuestSelectPlan {
    /// Validates `shape`, loads the kernels, builds the top-k (for a budget above 1) and
    /// expansion plans and allocates the score workspace (`4 · B · Hkv · NP` bytes).
    ///
    /// # Errors
    /// As [`QuestSelectShape::validate`]; [`Error::KernelsNotBuilt`]; driver errors.
    pub fn new(device: &Device, shape: &QuestSelectShape) -> Result<Self> {
        shape.validate()?;
        let (rows, np) = (shape.rows(), shape.meta().n_pages());
        let gpb = PAGES_THREADS as usize / lanes(shape.head_dim).1;
        let topk = if shape.budget > 1 {
            Some(TopkPlan::new(device, &TopkShape { rows, n: np, k: shape.budget - 1 }, TopkOptions::default())?)
        } else {
            None
        };
        let stream = device.stream();
        Ok(QuestSelectPlan {
            device: device.clone(),
            shape: *shape,
            score: Typed::load(device, "pages_quest_score", (rows * np).div_ceil(gpb))?,
            topk,
            sel: Selection::new(device, &shape.expand_shape(), shape.batch)?,
            scores: stream.alloc_zeros::<f32>(rows * np)?,
        })
    }

    /// Selects the pages of every row for the queries `q [B, Tq, Hq, D]` against `page_max`
    /// and `page_min` (`[B, Hkv, NP, D]`, from a [`QuestMetaPlan`] over the same `lens`):
    /// writes `pages [B·Hkv, budget]` (ranked pages, then the last page) and the CSR
    /// `indptr [B·Hkv + 1]`, `indices` (at least [`QuestSelectShape::capacity_tokens`] entries).
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] or [`Error::InvalidArgument`] (alignment)
    /// naming the buffer; as [`validate_lens`]; driver errors. Nothing is written on an error.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        page_max: &impl TensorRef<T>,
        page_min: &impl TensorRef<T>,
        lens: &[u32],
        pages: &mut impl TensorMut<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let s = self.shape;
        let meta = s.meta();
        validate_lens(lens, s.batch, s.capacity)?;
        check_vec(&self.device, "q", q, &s.q_shape())?;
        check_vec(&self.device, "page_max", page_max, &meta.meta_shape())?;
        check_vec(&self.device, "page_min", page_min, &meta.meta_shape())?;
        self.device.check_buffer("pages", pages, &s.pages_shape())?;
        check_csr(&self.device, &s.expand_shape(), indptr, indices)?;
        let (rows, np, k) = (s.rows(), meta.n_pages(), s.budget);
        let stream = self.device.stream().clone();
        stream.memcpy_htod(lens, &mut self.sel.lens)?;
        let [batch, kv_heads, q_heads, q_tokens, head_dim, lanes, lanes_pow2, group] =
            query_dims(s.batch, s.hkv, s.hq, s.q_tokens, s.head_dim)?;
        let params = NtkvPagesScoreParams {
            n_items: to_u64("page_max", rows * np)?,
            batch,
            kv_heads,
            q_heads,
            q_tokens,
            head_dim,
            page_size: to_u32("page_size", s.page_size)?,
            n_pages: to_u32("page_max", np)?,
            lanes,
            lanes_pow2,
            group,
            blocks_stride: to_u32("budget", k)?,
            last_col: to_u32("budget", k - 1)?,
        };
        let (f, cfg) = self.score.get::<T>();
        let (qv, mxv, mnv) = (q.cuda_view(), page_max.cuda_view(), page_min.cuda_view());
        {
            let mut pv = pages.cuda_view_mut();
            let mut b = stream.launch_builder(f);
            b.arg(&params).arg(&qv).arg(&mxv).arg(&mnv).arg(&self.sel.lens).arg(&mut self.scores).arg(&mut pv);
            // SAFETY: ntkv_pages_quest_score_<T>(NtkvPagesScoreParams, const T* q, const T*
            // page_max, const T* page_min, const u32* lens, float* scores, u32* blocks). Item
            // (row, page) < rows * NP reads 8 elements at item * D + 8 lane of the metadata ([B,
            // Hkv, NP, D], checked) and of q at ((b Tq + t) Hq + h) D + 8 lane for t < Tq, h <
            // Hq (q is [B, Tq, Hq, D], checked), 16-byte aligned; writes scores[item] (rows * NP
            // floats) and pages[r * budget + budget - 1] for r < rows (pages is [rows, budget]).
            // lens holds batch words; b is clamped below batch.
            unsafe { b.launch(cfg) }?;
        }
        if let Some(topk) = self.topk.as_mut() {
            let pp = s.page_size as u32;
            fill_rows(&mut self.sel.host_rows, lens, s.hkv, |n| n.div_ceil(pp).saturating_sub(1));
            stream.memcpy_htod(&self.sel.host_rows, topk.lengths_mut())?;
            let out = TopkOutput { uniform_len: np, has_lengths: true, out_stride: k, tail_count: 0, tail_first: 0 };
            let mut pv = pages.cuda_view_mut();
            topk.launch::<f32>(&self.scores.as_view(), out, None, &mut pv)?;
        }
        self.sel.expand(&*pages, lens, s.hkv, indptr, indices)
    }
}

/// Builds ShadowKV landmarks, minimum cosines and outlier chunks (see the [module
/// docs](super)): one kernel pass (a lane group per chunk) and, with outliers, a top-k of the
/// negated cosines.
pub struct LandmarkPlan {
    device: Device,
    shape: LandmarkShape,
    landmark: Typed,
    topk: Option<TopkPlan>,
    neg: CudaSlice<f32>,
    lens: CudaSlice<u32>,
    host_rows: Vec<u32>,
}

impl LandmarkPlan {
    /// Validates `shape`, loads the kernels, builds the outlier top-k and allocates
    /// `4 · B · Hkv · NC` bytes of workspace.
    ///
    /// # Errors
    /// As [`LandmarkShape::validate`]; [`Error::KernelsNotBuilt`]; driver errors.
    pub fn new(device: &Device, shape: &LandmarkShape) -> Result<Self> {
        shape.validate()?;
        let (rows, nc) = (shape.rows(), shape.n_chunks());
        let gpb = PAGES_THREADS as usize / lanes(shape.head_dim).1;
        let topk = if shape.outliers > 0 {
            Some(TopkPlan::new(device, &TopkShape { rows, n: nc, k: shape.outliers }, TopkOptions::default())?)
        } else {
            None
        };
        Ok(LandmarkPlan {
            device: device.clone(),
            shape: *shape,
            landmark: Typed::load(device, "pages_landmark", (rows * nc).div_ceil(gpb))?,
            topk,
            neg: device.stream().alloc_zeros::<f32>(rows * nc)?,
            lens: device.stream().alloc_zeros::<u32>(shape.batch)?,
            host_rows: vec![0; rows],
        })
    }

    /// Computes, for `keys [B, Hkv, Tcap, D]` with `lens[b]` valid tokens, `landmarks [B, Hkv,
    /// NC, D]` and `min_cos [B, Hkv, NC]` (f32; chunks past a row's last are not written) and
    /// `outliers [B·Hkv, n_out]` (u32, lowest `min_cos` first, `u32::MAX` padding).
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] or [`Error::InvalidArgument`] (alignment)
    /// naming the buffer; as [`validate_lens`]; driver errors. Nothing is written on an error.
    pub fn run<T: Float>(
        &mut self,
        keys: &impl TensorRef<T>,
        lens: &[u32],
        landmarks: &mut impl TensorMut<f32>,
        min_cos: &mut impl TensorMut<f32>,
        outliers: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let s = self.shape;
        validate_lens(lens, s.batch, s.capacity)?;
        check_vec(&self.device, "keys", keys, &s.keys_shape())?;
        check_vec(&self.device, "landmarks", landmarks, &s.landmarks_shape())?;
        self.device.check_buffer("min_cos", min_cos, &s.cos_shape())?;
        check_outliers(&self.device, outliers, &s)?;
        let (rows, nc) = (s.rows(), s.n_chunks());
        let (l, lp) = lanes(s.head_dim);
        let stream = self.device.stream().clone();
        stream.memcpy_htod(lens, &mut self.lens)?;
        let [batch, kv_heads, capacity, head_dim] = key_dims(s.batch, s.hkv, s.capacity, s.head_dim)?;
        let params = NtkvPagesLandmarkParams {
            n_items: to_u64("landmarks", rows * nc)?,
            batch,
            kv_heads,
            capacity,
            head_dim,
            n_chunks: to_u32("landmarks", nc)?,
            lanes: to_u32("head_dim", l)?,
            lanes_pow2: to_u32("head_dim", lp)?,
            eps: COSINE_EPS,
        };
        let (f, cfg) = self.landmark.get::<T>();
        let kv = keys.cuda_view();
        {
            let (mut lv, mut cv) = (landmarks.cuda_view_mut(), min_cos.cuda_view_mut());
            let mut b = stream.launch_builder(f);
            b.arg(&params).arg(&kv).arg(&self.lens).arg(&mut lv).arg(&mut cv).arg(&mut self.neg);
            // SAFETY: ntkv_pages_landmark_<T>(NtkvPagesLandmarkParams, const T* keys, const u32*
            // lens, float* landmarks, float* min_cos, float* neg_cos). Item (row, chunk) < rows *
            // NC with 8 chunk < lens[b] <= capacity reads keys [row, t, 8 lane .. +8] for t <
            // min(8 chunk + 8, lens[b]) (keys [B, Hkv, Tcap, D], checked, 16-byte aligned), writes
            // landmarks at item * D + 8 lane (+8; [B, Hkv, NC, D], checked, aligned) and min_cos,
            // neg_cos at item (rows * NC each). lens holds batch words; b is clamped below batch.
            unsafe { b.launch(cfg) }?;
        }
        if let Some(topk) = self.topk.as_mut() {
            fill_rows(&mut self.host_rows, lens, s.hkv, |n| n.div_ceil(CHUNK_TOKENS as u32));
            stream.memcpy_htod(&self.host_rows, topk.lengths_mut())?;
            let out =
                TopkOutput { uniform_len: nc, has_lengths: true, out_stride: s.outliers, tail_count: 0, tail_first: 0 };
            let mut ov = outliers.cuda_view_mut();
            topk.launch::<f32>(&self.neg.as_view(), out, None, &mut ov)?;
        }
        Ok(())
    }
}

/// A ShadowKV selection step (see the [module docs](super)): landmark logits, the per-row
/// softmax, the chunk scores, the outlier exclusion, the top `budget` chunks and the
/// expansion with the outliers added, with no host synchronization.
pub struct LandmarkSelectPlan {
    device: Device,
    shape: LandmarkSelectShape,
    logits_k: Typed,
    softmax: (CudaFunction, LaunchConfig),
    score: (CudaFunction, LaunchConfig),
    mark: Option<(CudaFunction, LaunchConfig)>,
    topk: TopkPlan,
    sel: Selection,
    logits: CudaSlice<f32>,
    sums: CudaSlice<f32>,
    scores: CudaSlice<f32>,
}

impl LandmarkSelectPlan {
    /// Validates `shape`, loads the kernels, builds the top-k and expansion plans and allocates
    /// the logits workspace (`4 · B · Hq · Tq · NC` bytes) and the score workspace.
    ///
    /// # Errors
    /// As [`LandmarkSelectShape::validate`]; [`Error::KernelsNotBuilt`]; driver errors.
    pub fn new(device: &Device, shape: &LandmarkSelectShape) -> Result<Self> {
        shape.validate()?;
        let (rows, nc) = (shape.rows(), shape.landmarks().n_chunks());
        let qrows = shape.batch * shape.hq * shape.q_tokens;
        let gpb = PAGES_THREADS as usize / lanes(shape.head_dim).1;
        let threads = PAGES_THREADS as usize;
        let mark = if shape.outliers > 0 {
            Some(untyped(device, "pages_shadow_mark", (rows * shape.outliers).div_ceil(threads))?)
        } else {
            None
        };
        let stream = device.stream();
        Ok(LandmarkSelectPlan {
            device: device.clone(),
            shape: *shape,
            logits_k: Typed::load(device, "pages_shadow_logits", (rows * nc).div_ceil(gpb))?,
            softmax: untyped(device, "pages_shadow_softmax", qrows)?,
            score: untyped(device, "pages_shadow_score", (rows * nc).div_ceil(threads))?,
            mark,
            topk: TopkPlan::new(device, &TopkShape { rows, n: nc, k: shape.budget }, TopkOptions::default())?,
            sel: Selection::new(device, &shape.expand_shape(), shape.batch)?,
            logits: stream.alloc_zeros::<f32>(qrows * nc)?,
            sums: stream.alloc_zeros::<f32>(qrows)?,
            scores: stream.alloc_zeros::<f32>(rows * nc)?,
        })
    }

    /// Selects the chunks of every row for `q [B, Tq, Hq, D]` against `landmarks [B, Hkv, NC,
    /// D]` (f32) and `outliers [B·Hkv, n_out]` (from a [`LandmarkPlan`] over the same `lens`):
    /// writes `chunks [B·Hkv, budget + n_out]` and the CSR `indptr`, `indices` (at least
    /// [`LandmarkSelectShape::capacity_tokens`] entries).
    ///
    /// # Errors
    /// [`Error::DeviceMismatch`], [`Error::Shape`] or [`Error::InvalidArgument`] (alignment)
    /// naming the buffer; as [`validate_lens`]; driver errors. Nothing is written on an error.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        landmarks: &impl TensorRef<f32>,
        outliers: &impl TensorRef<u32>,
        lens: &[u32],
        chunks: &mut impl TensorMut<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let s = self.shape;
        let lm = s.landmarks();
        validate_lens(lens, s.batch, s.capacity)?;
        check_vec(&self.device, "q", q, &s.q_shape())?;
        check_vec(&self.device, "landmarks", landmarks, &lm.landmarks_shape())?;
        check_outliers(&self.device, outliers, &lm)?;
        self.device.check_buffer("chunks", chunks, &s.chunks_shape())?;
        check_csr(&self.device, &s.expand_shape(), indptr, indices)?;
        let (rows, nc, k) = (s.rows(), lm.n_chunks(), s.budget);
        let stream = self.device.stream().clone();
        stream.memcpy_htod(lens, &mut self.sel.lens)?;
        let [batch, kv_heads, q_heads, q_tokens, head_dim, lanes, lanes_pow2, group] =
            query_dims(s.batch, s.hkv, s.hq, s.q_tokens, s.head_dim)?;
        let mut params = NtkvPagesShadowParams {
            n_items: to_u64("landmarks", rows * nc)?,
            batch,
            kv_heads,
            q_heads,
            q_tokens,
            head_dim,
            n_chunks: to_u32("landmarks", nc)?,
            lanes,
            lanes_pow2,
            group,
            k: to_u32("budget", k)?,
            n_outliers: to_u32("outliers", s.outliers)?,
            blocks_stride: to_u32("budget", k + s.outliers)?,
            scale: landmark_scale(s.head_dim),
            _pad0: 0,
        };
        let (f, cfg) = self.logits_k.get::<T>();
        let (qv, lv) = (q.cuda_view(), landmarks.cuda_view());
        let mut b = stream.launch_builder(f);
        b.arg(&params).arg(&qv).arg(&lv).arg(&self.sel.lens).arg(&mut self.logits);
        // SAFETY: ntkv_pages_shadow_logits_<T>(NtkvPagesShadowParams, const T* q, const float*
        // landmarks, const u32* lens, float* logits). Item (row, chunk) < rows * NC reads 8
        // floats at item * D + 8 lane of landmarks ([B, Hkv, NC, D], checked, aligned) and 8
        // elements of q rows (b, t, h) with t < Tq, h < Hq ([B, Tq, Hq, D], checked, aligned);
        // writes logits[((b Hq + h) Tq + t) NC + chunk] inside the B Hq Tq NC workspace.
        unsafe { b.launch(cfg) }?;

        let (f, cfg) = &self.softmax;
        let mut b = stream.launch_builder(f);
        b.arg(&params).arg(&self.sel.lens).arg(&mut self.logits).arg(&mut self.sums);
        // SAFETY: ntkv_pages_shadow_softmax(NtkvPagesShadowParams, const u32* lens, float*
        // logits, float* sums). Block row qrow < B Hq Tq reads and rewrites logits[qrow NC + c]
        // for c < ceil(lens[b] / 8) <= NC and writes sums[qrow] (B Hq Tq floats); static shared
        // memory only.
        unsafe { b.launch(*cfg) }?;

        let (f, cfg) = &self.score;
        let mut b = stream.launch_builder(f);
        b.arg(&params).arg(&self.sel.lens).arg(&self.logits).arg(&self.sums).arg(&mut self.scores);
        // SAFETY: ntkv_pages_shadow_score(NtkvPagesShadowParams, const u32* lens, const float*
        // expd, const float* sums, float* scores). Item (row, chunk) < rows * NC reads expd and
        // sums of the row's query rows (inside both workspaces) and writes scores[item].
        unsafe { b.launch(*cfg) }?;

        let ov = outliers.cuda_view();
        if let Some((f, cfg)) = &self.mark {
            params.n_items = to_u64("outliers", rows * s.outliers)?;
            let mut cv = chunks.cuda_view_mut();
            let mut b = stream.launch_builder(f);
            b.arg(&params).arg(&self.sel.lens).arg(&ov).arg(&mut self.scores).arg(&mut cv);
            // SAFETY: ntkv_pages_shadow_mark(NtkvPagesShadowParams, const u32* lens, const u32*
            // outliers, float* scores, u32* blocks). Item (row, j) < rows * n_out reads
            // outliers[item] ([rows, n_out], checked), writes blocks[row (k + n_out) + k + j]
            // (chunks is [rows, k + n_out], checked) and scores[row NC + x] only for x below the
            // row's chunk count <= NC.
            unsafe { b.launch(*cfg) }?;
        }
        fill_rows(&mut self.sel.host_rows, lens, s.hkv, |n| n.div_ceil(CHUNK_TOKENS as u32));
        stream.memcpy_htod(&self.sel.host_rows, self.topk.lengths_mut())?;
        let out =
            TopkOutput { uniform_len: nc, has_lengths: true, out_stride: k + s.outliers, tail_count: 0, tail_first: 0 };
        {
            let mut cv: CudaViewMut<'_, u32> = chunks.cuda_view_mut();
            let sv: CudaView<'_, f32> = self.scores.as_view();
            self.topk.launch::<f32>(&sv, out, None, &mut cv)?;
        }
        self.sel.expand(&*chunks, lens, s.hkv, indptr, indices)
    }
}

/// Every kernel id the launchers above can form.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids: Vec<KernelId> =
        DTYPES.iter().flat_map(|&dt| TYPED_OPS.iter().map(move |op| typed_id(op, dt))).collect();
    ids.extend(UNTYPED_OPS.iter().map(|op| KernelId::new(Module::Pages, op)));
    ids
}
