//! Launch code for `cuda/cluster.cu`: the k-means plan (init, norms, assign, sort, update)
//! and the retrieval plan (score, [`crate::select`]'s top-k, mark, write).

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::cpu::KmeansResult;
use super::{
    validate_append, AssignPrecision, Combine, KmeansBuffers, KmeansOptions, KmeansShape, Metric, RetrieveOptions,
    RetrieveShape, TF32_HEAD_DIMS,
};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Result};
use crate::launch::{grid_for, KernelId};
use crate::params::{NtkvClusterRetrieveParams, NtkvKmeansParams};
use crate::select::{TopkOptions, TopkPlan, TopkShape};
use crate::tensor::{DType, DeviceTensor, Float, TensorMut, TensorRef};

/// Threads of the init, update and score kernels (`ROW_THREADS` in the kernel source).
pub const ROW_THREADS: u32 = 128;
/// Threads of the assignment kernel.
pub const ASSIGN_THREADS: u32 = 256;
/// Keys per assignment CTA.
pub const ASSIGN_KEYS: usize = 128;
/// Dynamic shared memory of a TF32 assignment CTA: its 3-stage ring of 64 centroids × 32
/// f32 (rows padded to 36 words), `TF32_RING_BYTES` in the kernel source.
pub const TF32_ASSIGN_SMEM: u32 = 27_648;
/// Threads of the sort, mark and write kernels (one CTA per head or list).
pub const LIST_THREADS: u32 = 256;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const TYPED_OPS: [&str; 5] = ["kmeans_init", "kmeans_norms", "kmeans_assign", "kmeans_update", "cluster_score"];
const SORT_ID: KernelId = KernelId::new(Module::Cluster, "kmeans_sort");
const MARK_ID: KernelId = KernelId::new(Module::Cluster, "cluster_mark");
const WRITE_ID: KernelId = KernelId::new(Module::Cluster, "cluster_write");

fn typed_id(op: &'static str, dtype: DType) -> KernelId {
    KernelId::new(Module::Cluster, op).dtype(dtype)
}

/// The TF32 assignment kernels, one per head dim of [`TF32_HEAD_DIMS`].
const TF32_ASSIGN_OPS: [&str; 2] = ["kmeans_assign_tf32_d64", "kmeans_assign_tf32_d128"];

/// The assignment kernel of a precision (the TF32 ones by head dim, validated by
/// [`KmeansOptions::validate_for`]; another dim maps to the f32 kernel, never launched).
fn assign_id(precision: AssignPrecision, head_dim: usize, dtype: DType) -> KernelId {
    match (precision, TF32_HEAD_DIMS.iter().position(|&d| d == head_dim)) {
        (AssignPrecision::Tf32, Some(i)) => typed_id(TF32_ASSIGN_OPS[i], dtype),
        _ => typed_id(TYPED_OPS[2], dtype),
    }
}

fn slot(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Bytes of dynamic shared memory of the mark kernel: the `C + 1` prefix sums.
pub fn mark_smem_bytes(clusters: usize) -> usize {
    (clusters + 1) * 4
}

/// A k-means state on the device (see the [module docs](super) for every layout): the output
/// of [`KmeansPlan::run`], grown by [`KmeansPlan::assign_appended`], read by
/// [`RetrievePlan::run`].
pub type ClusterState = KmeansBuffers<DeviceTensor<f32>, DeviceTensor<u32>>;

impl ClusterState {
    /// Zeroed buffers of the shapes `shape` gives.
    ///
    /// # Errors
    /// As [`KmeansShape::validate`]; driver errors.
    pub fn zeros(device: &Device, shape: &KmeansShape) -> Result<Self> {
        shape.validate()?;
        Ok(ClusterState {
            centroids: DeviceTensor::zeros(device, &shape.centroids_shape())?,
            labels: DeviceTensor::zeros(device, &shape.labels_shape())?,
            sizes: DeviceTensor::zeros(device, &shape.sizes_shape())?,
            indptr: DeviceTensor::zeros(device, &shape.indptr_shape())?,
            members: DeviceTensor::zeros(device, &shape.labels_shape())?,
            iterations: DeviceTensor::zeros(device, &[shape.heads])?,
        })
    }

    /// Copies the state to the host (synchronizes).
    ///
    /// # Errors
    /// Driver errors.
    pub fn to_host(&self) -> Result<KmeansResult> {
        self.try_map(DeviceTensor::to_host, DeviceTensor::to_host)
    }

    fn check(&self, device: &Device, shape: &KmeansShape) -> Result<()> {
        device.check_buffer("centroids", &self.centroids, &shape.centroids_shape())?;
        device.check_buffer("labels", &self.labels, &shape.labels_shape())?;
        device.check_buffer("sizes", &self.sizes, &shape.sizes_shape())?;
        device.check_buffer("indptr", &self.indptr, &shape.indptr_shape())?;
        device.check_buffer("members", &self.members, &shape.labels_shape())?;
        device.check_buffer("iterations", &self.iterations, &[shape.heads])
    }
}

#[derive(Clone, Debug)]
struct KmeansKernels {
    init: CudaFunction,
    norms: CudaFunction,
    assign: CudaFunction,
    update: CudaFunction,
}

/// A validated k-means with its workspace, reusable for every layer of the same shape:
/// [`Self::run`] clusters, [`Self::assign_appended`] grows a state by appended tokens. Neither
/// allocates or synchronizes.
#[derive(Debug)]
pub struct KmeansPlan {
    device: Device,
    shape: KmeansShape,
    options: KmeansOptions,
    kernels: [KmeansKernels; 3],
    sort: CudaFunction,
    norms_cfg: LaunchConfig,
    inv_norm: CudaSlice<f32>,
    done: CudaSlice<u32>,
    changed: CudaSlice<u32>,
    cursor: CudaSlice<u32>,
}

impl KmeansPlan {
    /// Validates `shape` and `options`, loads the kernels of every dtype and allocates the
    /// workspace (`4·H·Tcap` bytes of key norms for cosine, `4·H·(C + 2)` of flags and
    /// cursors).
    ///
    /// # Errors
    /// As [`KmeansShape::validate`], [`KmeansOptions::validate`] and
    /// [`KmeansOptions::validate_for`]; [`crate::Error::KernelsNotBuilt`] without compiled
    /// kernels; driver errors.
    pub fn new(device: &Device, shape: &KmeansShape, options: KmeansOptions) -> Result<Self> {
        shape.validate()?;
        options.validate()?;
        options.validate_for(shape)?;
        let load = |dt: DType| -> Result<KmeansKernels> {
            Ok(KmeansKernels {
                init: device.kernel(typed_id(TYPED_OPS[0], dt))?,
                norms: device.kernel(typed_id(TYPED_OPS[1], dt))?,
                assign: device.kernel(assign_id(options.assign, shape.head_dim, dt))?,
                update: device.kernel(typed_id(TYPED_OPS[3], dt))?,
            })
        };
        let kernels = [load(DTYPES[0])?, load(DTYPES[1])?, load(DTYPES[2])?];
        let norm_blocks = shape.heads.saturating_mul(shape.tokens).div_ceil(ROW_THREADS as usize);
        let norms_cfg = grid_for(device, &kernels[0].norms, ROW_THREADS, 0, norm_blocks, true)?;
        let stream = device.stream();
        let norm_len = if options.metric == Metric::Cosine { shape.heads * shape.capacity } else { 1 };
        Ok(KmeansPlan {
            device: device.clone(),
            shape: *shape,
            options,
            kernels,
            sort: device.kernel(SORT_ID)?,
            norms_cfg,
            inv_norm: stream.alloc_zeros(norm_len)?,
            done: stream.alloc_zeros(shape.heads)?,
            changed: stream.alloc_zeros(shape.heads)?,
            cursor: stream.alloc_zeros(shape.heads * shape.clusters)?,
        })
    }

    /// The shape the plan serves.
    pub fn shape(&self) -> &KmeansShape {
        &self.shape
    }

    /// The options the plan serves.
    pub fn options(&self) -> &KmeansOptions {
        &self.options
    }

    fn params(&self, tokens: usize, first: usize, track: u32) -> Result<NtkvKmeansParams> {
        let s = &self.shape;
        Ok(NtkvKmeansParams {
            seed: self.options.seed,
            heads: to_u32("heads", s.heads)?,
            tokens: to_u32("tokens", tokens)?,
            capacity: to_u32("capacity", s.capacity)?,
            clusters: to_u32("clusters", s.clusters)?,
            head_dim: to_u32("head_dim", s.head_dim)?,
            metric: self.options.metric.code(),
            first: to_u32("from", first)?,
            track,
        })
    }

    /// Clusters tokens `0..T` of every head of `keys [H, Tcap, D]` into `state` (every field
    /// written; see the [module docs](super)). Enqueued without synchronization.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] or [`crate::Error::DeviceMismatch`] naming `keys` or a field of
    /// `state`; driver errors. Nothing is written on an error.
    pub fn run<T: Float>(&mut self, keys: &impl TensorRef<T>, state: &mut ClusterState) -> Result<()> {
        let dev = self.device.clone();
        dev.check_buffer("keys", keys, &self.shape.keys_shape())?;
        state.check(&dev, &self.shape)?;
        let track = if self.options.stop_when_stable { 2 } else { 1 };
        let p = self.params(self.shape.tokens, 0, track)?;
        let k = self.kernels[slot(T::DTYPE)].clone();
        let stream = dev.stream();
        let kv = keys.cuda_view();
        let (h, c) = (self.shape.heads, self.shape.clusters);
        {
            let cfg = grid_for(&dev, &k.init, ROW_THREADS, 0, h * c, false)?;
            let mut cent = state.centroids.view_mut();
            let mut labels = state.labels.view_mut();
            let mut iters = state.iterations.view_mut();
            let mut b = stream.launch_builder(&k.init);
            b.arg(&p)
                .arg(&kv)
                .arg(&mut cent)
                .arg(&mut labels)
                .arg(&mut iters)
                .arg(&mut self.done)
                .arg(&mut self.changed);
            // SAFETY: ntkv_kmeans_init_<T>(NtkvKmeansParams, const T* keys, float* centroids,
            // u32* labels, u32* iterations, u32* done, u32* changed). Block (h < H, c < C)
            // (exactly H*C blocks; extra blocks return) reads key row (h, t) with t < T <=
            // Tcap of keys [H, Tcap, D] (checked), writes centroid (h, c) of [H, C, D],
            // labels (h, t < T) of [H, Tcap], and iterations/done/changed [H] (state checked,
            // flags allocated with H entries). D <= 1024, the static row buffer.
            unsafe { b.launch(cfg) }?;
        }
        if self.options.metric == Metric::Cosine {
            let mut b = stream.launch_builder(&k.norms);
            b.arg(&p).arg(&kv).arg(&mut self.inv_norm);
            // SAFETY: ntkv_kmeans_norms_<T>(NtkvKmeansParams, const T* keys, float* inv_norm).
            // Grid-stride over (h < H, t < T): reads key row (h, t) of [H, Tcap, D] and writes
            // inv_norm[h*Tcap + t], allocated with H*Tcap entries for cosine.
            unsafe { b.launch(self.norms_cfg) }?;
        }
        let update_cfg = grid_for(&dev, &k.update, ROW_THREADS, 0, h * c, false)?;
        for _ in 0..self.options.iterations {
            self.enqueue_assign(&k, &p, &kv, state)?;
            self.enqueue_sort(&p, state)?;
            let mut cent = state.centroids.view_mut();
            let mut b = stream.launch_builder(&k.update);
            b.arg(&p)
                .arg(&kv)
                .arg(&self.inv_norm)
                .arg(state.indptr.slice())
                .arg(state.members.slice())
                .arg(&self.done)
                .arg(&mut cent);
            // SAFETY: ntkv_kmeans_update_<T>(NtkvKmeansParams, const T* keys,
            // const float* inv_norm, const u32* indptr, const u32* members, const u32* done,
            // float* centroids). Block (h < H, c < C) reads indptr (h, c..=c+1) of [H, C+1],
            // members of row h clamped below Tcap (so key rows (h, m < Tcap) of [H, Tcap, D]
            // and inv_norm[h*Tcap + m], only read for cosine, where it has H*Tcap entries),
            // done[h], and writes centroid (h, c). All buffers checked above.
            unsafe { b.launch(update_cfg) }?;
        }
        Ok(())
    }

    /// Labels tokens `from..to` of `keys [H, Tcap, D]` with the nearest centroid of `state`
    /// and rebuilds its `sizes`, `indptr` and `members` over `0..to` (centroids unchanged;
    /// labels of `0..from` are read as they are). Enqueued without synchronization.
    ///
    /// # Errors
    /// As [`validate_append`]; as [`Self::run`] for the buffers.
    pub fn assign_appended<T: Float>(
        &mut self,
        keys: &impl TensorRef<T>,
        from: usize,
        to: usize,
        state: &mut ClusterState,
    ) -> Result<()> {
        validate_append(&self.shape, from, to)?;
        self.device.check_buffer("keys", keys, &self.shape.keys_shape())?;
        state.check(&self.device, &self.shape)?;
        let p = self.params(to, from, 0)?;
        let k = self.kernels[slot(T::DTYPE)].clone();
        if from < to {
            self.enqueue_assign(&k, &p, &keys.cuda_view(), state)?;
        }
        self.enqueue_sort(&p, state)
    }

    fn enqueue_assign<T>(
        &self,
        k: &KmeansKernels,
        p: &NtkvKmeansParams,
        kv: &cudarc::driver::CudaView<'_, T>,
        state: &mut ClusterState,
    ) -> Result<()> {
        let tiles = (p.tokens - p.first).div_ceil(ASSIGN_KEYS as u32) as usize;
        let smem = if self.options.assign == AssignPrecision::Tf32 { TF32_ASSIGN_SMEM } else { 0 };
        let cfg = grid_for(&self.device, &k.assign, ASSIGN_THREADS, smem, self.shape.heads * tiles.max(1), false)?;
        let stream = self.device.stream();
        let mut labels = state.labels.view_mut();
        let mut b = stream.launch_builder(&k.assign);
        b.arg(p).arg(kv).arg(state.centroids.slice()).arg(&self.done).arg(&mut labels).arg(&self.changed);
        // SAFETY: ntkv_kmeans_assign_<T> or ntkv_kmeans_assign_tf32_d<D>_<T> (the same
        // signature; the TF32 kernel's D is the plan's validated head dim, it returns when
        // p.head_dim differs, and it gets its TF32_ASSIGN_SMEM bytes of ring)(NtkvKmeansParams, const T* keys,
        // const float* centroids, const u32* done, u32* labels, u32* changed). Block
        // (h < H, tile) covers tokens first + 128*tile .. min(+128, tokens) with tokens <= Tcap
        // (validated): it reads those key rows of [H, Tcap, D], every centroid of head h in
        // [H, C, D] (zero-padded past C and D), done[h] and writes labels (h, t) of [H, Tcap]
        // and changed[h] ([H] entries). `changed` is written through the pointer only by the
        // kernel; the plan holds it exclusively.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn enqueue_sort(&mut self, p: &NtkvKmeansParams, state: &mut ClusterState) -> Result<()> {
        let cfg = grid_for(&self.device, &self.sort, LIST_THREADS, 0, self.shape.heads, false)?;
        let stream = self.device.stream();
        let mut iters = state.iterations.view_mut();
        let mut sizes = state.sizes.view_mut();
        let mut indptr = state.indptr.view_mut();
        let mut members = state.members.view_mut();
        let mut b = stream.launch_builder(&self.sort);
        b.arg(p)
            .arg(state.labels.slice())
            .arg(&mut self.done)
            .arg(&mut self.changed)
            .arg(&mut iters)
            .arg(&mut sizes)
            .arg(&mut indptr)
            .arg(&mut members)
            .arg(&mut self.cursor);
        // SAFETY: ntkv_kmeans_sort(NtkvKmeansParams, const u32* labels, u32* done,
        // u32* changed, u32* iterations, u32* sizes, u32* indptr, u32* members, u32* cursor).
        // Block h < H reads labels (h, t < tokens <= Tcap), writes sizes and cursor (h, c < C)
        // ([H, C] each), indptr (h, c <= C) ([H, C+1]), members (h, pos < Tcap) ([H, Tcap];
        // positions are below the count of labelled tokens), and done/changed/iterations[h]
        // ([H] each). All checked above or allocated by the plan.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// A validated cluster retrieval with its workspace (scores, the top-k plan, the token
/// bitmaps), reusable across decode steps and layers: [`Self::run`] only enqueues.
#[derive(Debug)]
pub struct RetrievePlan {
    device: Device,
    shape: RetrieveShape,
    options: RetrieveOptions,
    score: [CudaFunction; 3],
    mark: CudaFunction,
    write: CudaFunction,
    mark_smem: u32,
    topk: TopkPlan,
    scores: DeviceTensor<f32>,
    values: DeviceTensor<f32>,
    ranked: DeviceTensor<u32>,
    bitmap: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    capacity: usize,
}

impl RetrievePlan {
    /// Validates `shape` and `options`, loads the kernels, makes the top-k plan over the
    /// `[B·Hkv, C]` scores and allocates the workspace (`12·B·Hkv·C` bytes of scores and
    /// ranks, `B·Hkv·⌈Tcap/32⌉` words of bitmap).
    ///
    /// # Errors
    /// As [`RetrieveShape::validate`], [`RetrieveOptions::validate`] and
    /// [`RetrieveShape::indices_capacity`]; [`crate::Error::TooLarge`] naming
    /// `shared memory` when the `C + 1` prefix sums exceed the device's limit;
    /// [`crate::Error::KernelsNotBuilt`]; driver errors.
    pub fn new(device: &Device, shape: &RetrieveShape, options: RetrieveOptions) -> Result<Self> {
        shape.validate()?;
        options.validate()?;
        let capacity = shape.indices_capacity(&options)?;
        let (l, c) = (shape.n_lists(), shape.clusters);
        let score = [
            device.kernel(typed_id(TYPED_OPS[4], DTYPES[0]))?,
            device.kernel(typed_id(TYPED_OPS[4], DTYPES[1]))?,
            device.kernel(typed_id(TYPED_OPS[4], DTYPES[2]))?,
        ];
        let mark = device.kernel(MARK_ID)?;
        let mark_smem = device.prepare_shared_mem(&mark, mark_smem_bytes(c))?;
        let topk = TopkPlan::new(device, &TopkShape { rows: l, n: c, k: c }, TopkOptions::default())?;
        let words = shape.capacity.div_ceil(32);
        let stream = device.stream();
        Ok(RetrievePlan {
            device: device.clone(),
            shape: *shape,
            options,
            score,
            mark,
            write: device.kernel(WRITE_ID)?,
            mark_smem,
            topk,
            scores: DeviceTensor::zeros(device, &[l, c])?,
            values: DeviceTensor::zeros(device, &[l, c])?,
            ranked: DeviceTensor::zeros(device, &[l, c])?,
            bitmap: stream.alloc_zeros(l * words)?,
            counts: stream.alloc_zeros(l)?,
            capacity,
        })
    }

    /// The length `indices` must have ([`RetrieveShape::indices_capacity`]).
    pub fn indices_capacity(&self) -> usize {
        self.capacity
    }

    /// The shape the plan serves.
    pub fn shape(&self) -> &RetrieveShape {
        &self.shape
    }

    /// The options the plan serves.
    pub fn options(&self) -> &RetrieveOptions {
        &self.options
    }

    /// Retrieves the token lists of every `(sequence, kv head)` from `q [B, Tq, Hq, D]`, the
    /// k-means `state` of the `B·Hkv` lists (a [`ClusterState`] of
    /// [`RetrieveShape::kmeans_shape`]'s sizes) and `seq_lens [B]`, into `indptr [B·Hkv + 1]`
    /// and `indices [indices_capacity]` (see the [module docs](super)). Enqueued without
    /// synchronization or allocation.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] or [`crate::Error::DeviceMismatch`] naming `q`, `centroids`,
    /// `indptr` (the state's or the output), `members`, `seq_lens` or `indices`; driver
    /// errors. Nothing is written on an error.
    pub fn run<T: Float>(
        &mut self,
        q: &impl TensorRef<T>,
        state: &ClusterState,
        seq_lens: &impl TensorRef<u32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let s = self.shape;
        let (l, c) = (s.n_lists(), s.clusters);
        let dev = &self.device;
        dev.check_buffer("q", q, &s.q_shape())?;
        let km = s.kmeans_shape();
        dev.check_buffer("centroids", &state.centroids, &km.centroids_shape())?;
        dev.check_buffer("indptr", &state.indptr, &km.indptr_shape())?;
        dev.check_buffer("members", &state.members, &km.labels_shape())?;
        dev.check_buffer("seq_lens", seq_lens, &[s.batch])?;
        dev.check_buffer("indptr", indptr, &[l + 1])?;
        dev.check_buffer("indices", indices, &[self.capacity])?;
        let p = NtkvClusterRetrieveParams {
            n_indices: to_u64("indices", self.capacity)?,
            batch: to_u32("batch", s.batch)?,
            q_tokens: to_u32("q_tokens", s.q_tokens)?,
            q_heads: to_u32("hq", s.hq)?,
            kv_heads: to_u32("hkv", s.hkv)?,
            head_dim: to_u32("head_dim", s.head_dim)?,
            clusters: to_u32("clusters", c)?,
            capacity: to_u32("capacity", s.capacity)?,
            group: to_u32("hq", s.group())?,
            rows: to_u32("hq", s.rows())?,
            combine: u32::from(self.options.combine == Combine::Sum),
            cluster_budget: to_u32("budget", self.options.cluster_budget())?,
            sinks: to_u32("sinks", self.options.sinks)?,
            window: to_u32("window", self.options.window)?,
            words: to_u32("capacity", s.capacity.div_ceil(32))?,
            n_lists: to_u32("hkv", l)?,
            _pad0: 0,
        };
        let stream = dev.stream().clone();
        let (qv, lens) = (q.cuda_view(), seq_lens.cuda_view());
        {
            let f = &self.score[slot(T::DTYPE)];
            let cfg = grid_for(dev, f, ROW_THREADS, 0, l * c.div_ceil(ROW_THREADS as usize), false)?;
            let mut sv = self.scores.view_mut();
            let mut b = stream.launch_builder(f);
            b.arg(&p).arg(&qv).arg(state.centroids.slice()).arg(&mut sv);
            // SAFETY: ntkv_cluster_score_<T>(NtkvClusterRetrieveParams, const T* q,
            // const float* centroids, float* scores). Block (list < B*Hkv, centroid tile)
            // reads the list's query rows (b, tq < Tq, head < Hq, d < D) of q [B, Tq, Hq, D],
            // centroids (list, c < C, d < D) of [B*Hkv, C, D], and writes scores (list, c < C)
            // of the plan's [B*Hkv, C] buffer. All checked above.
            unsafe { b.launch(cfg) }?;
        }
        self.topk.run(&self.scores, None, &mut self.values, &mut self.ranked)?;
        {
            let cfg = LaunchConfig {
                grid_dim: (p.n_lists, 1, 1),
                block_dim: (LIST_THREADS, 1, 1),
                shared_mem_bytes: self.mark_smem,
            };
            let mut b = stream.launch_builder(&self.mark);
            b.arg(&p)
                .arg(self.ranked.slice())
                .arg(state.indptr.slice())
                .arg(state.members.slice())
                .arg(&lens)
                .arg(&mut self.bitmap)
                .arg(&mut self.counts);
            // SAFETY: ntkv_cluster_mark(NtkvClusterRetrieveParams, const u32* ranked,
            // const u32* cindptr, const u32* members, const u32* seq_lens, u32* bitmap,
            // u32* counts). Block list < B*Hkv (grid exactly B*Hkv <= 65535) reads ranked
            // (list, i < C), cluster offsets (list, <= C) clamped to Tcap, members
            // (list, < Tcap), seq_lens[b < B]; writes bitmap words (list, w < ceil(len/32))
            // with len clamped to Tcap (the plan allocated B*Hkv*ceil(Tcap/32)) and
            // counts[list]. Dynamic shared memory (C+1)*4 bytes, prepared in new.
            unsafe { b.launch(cfg) }?;
        }
        {
            let cfg =
                LaunchConfig { grid_dim: (p.n_lists, 1, 1), block_dim: (LIST_THREADS, 1, 1), shared_mem_bytes: 0 };
            let (mut ipv, mut ixv) = (indptr.cuda_view_mut(), indices.cuda_view_mut());
            let mut b = stream.launch_builder(&self.write);
            b.arg(&p).arg(&lens).arg(&self.bitmap).arg(&self.counts).arg(&mut ipv).arg(&mut ixv);
            // SAFETY: ntkv_cluster_write(NtkvClusterRetrieveParams, const u32* seq_lens,
            // const u32* bitmap, const u32* counts, u32* indptr, u32* indices). Block
            // list < B*Hkv reads counts[0..=list], its bitmap words below ceil(len/32) with
            // len <= Tcap, seq_lens[b]; writes indptr[list + 1] (and indptr[0]) of [B*Hkv+1]
            // and indices only at positions below p.n_indices = indices.len() (checked).
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }
}

/// Every kernel id this module's launchers can form.
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = vec![SORT_ID, MARK_ID, WRITE_ID];
    for dt in DTYPES {
        ids.extend(TYPED_OPS.iter().chain(&TF32_ASSIGN_OPS).map(|op| typed_id(op, dt)));
    }
    ids
}
