//! The GPU path: [`FactorPlan`] (the randomized SVD on the shared split-K GEMM, with the
//! small host steps of the module docs) and [`ReconstructPlan`] (the fused
//! gather + GEMM + RoPE launch, and the value gather of the ShadowKV step).

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::cpu::{cholesky_upper, core_svd, decode_indices, householder_q, sketch, upper_inverse};
use super::{FactorOptions, FactorShape, KeyLayout, ReconstructShape, RopeOptions, HEAD_DIMS};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::gemm::{GemmPlan, GemmShape, Operand};
use crate::launch::{grid_for, grid_stride, KernelId};
use crate::params::{NtkvLowrankCastParams, NtkvLowrankGatherParams, NtkvLowrankRopeParams};
use crate::tensor::{DType, DeviceTensor, Float, TensorMut, TensorRef};

/// Threads per block of every lowrank kernel (`THREADS` in cuda/lowrank.cu).
pub(crate) const THREADS: u32 = 256;
/// Value rows per gather block (`GATHER_ROWS`).
pub(crate) const GATHER_ROWS: usize = 16;
const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

/// Tokens per block of the reconstruction kernel at head dim `d` (`Tile<D>::TT`): 256
/// threads in `D/8` column groups, 4 tokens each.
pub(crate) fn tile_tokens(d: usize) -> usize {
    (THREADS as usize / (d / 8).max(1)) * 4
}

fn rope_id(dtype: DType, d: usize) -> Result<KernelId> {
    Ok(KernelId::new(Module::Lowrank, "lowrank_rope").dtype(dtype).head_dim(to_u32("head_dim", d)?))
}
fn gather_id(dtype: DType) -> KernelId {
    KernelId::new(Module::Lowrank, "lowrank_gather").dtype(dtype)
}
fn widen_id(dtype: DType) -> KernelId {
    KernelId::new(Module::Lowrank, "lowrank_widen").dtype(dtype)
}
fn narrow_id(dtype: DType) -> KernelId {
    KernelId::new(Module::Lowrank, "lowrank_narrow").dtype(dtype)
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<KernelId> {
    let mut ids = Vec::new();
    for dt in DTYPES {
        ids.extend(HEAD_DIMS.iter().filter_map(|&d| rope_id(dt, d).ok()));
        ids.extend([gather_id(dt), widen_id(dt), narrow_id(dt)]);
    }
    ids
}

fn dtype_slot(dtype: DType) -> usize {
    match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        DType::F32 => 2,
    }
}

/// One function per storage dtype, loaded once.
struct PerDtype([CudaFunction; 3]);

impl PerDtype {
    fn load(device: &Device, id: impl Fn(DType) -> Result<KernelId>) -> Result<Self> {
        Ok(PerDtype([
            device.kernel(id(DType::F16)?)?,
            device.kernel(id(DType::BF16)?)?,
            device.kernel(id(DType::F32)?)?,
        ]))
    }
    fn get(&self, dtype: DType) -> &CudaFunction {
        &self.0[dtype_slot(dtype)]
    }
}

/// A validated reconstruction: the shape, the RoPE table, the (borrowed, validated) position
/// lists, the output layout, and the launch geometry. Build it once per decode step and run
/// it for every layer; [`run`](Self::run) and [`gather_values`](Self::gather_values) only
/// launch.
pub struct ReconstructPlan<'a> {
    device: Device,
    shape: ReconstructShape,
    layout: KeyLayout,
    lists: DeviceLists<'a>,
    rows: usize,
    tiles_per_list: usize,
    gather_tiles: usize,
    inv_freq: CudaSlice<f32>,
    decode_indices: DeviceTensor<u32>,
    rope: PerDtype,
    gather: PerDtype,
    rope_cfg: LaunchConfig,
    gather_cfg: LaunchConfig,
}

crate::launch::plan_debug!(ReconstructPlan<'_>, "ReconstructPlan", shape, layout, rows);

/// The borrowed, validated CSR position lists of a plan.
struct DeviceLists<'a> {
    indptr: CudaView<'a, u32>,
    indices: CudaView<'a, u32>,
}

/// Checks the device-resident position lists' buffers against the (validated) shape, reads
/// them back (one synchronization) and validates every entry on the host: the lists' views
/// and the host copy of `indptr`.
fn read_lists<'a>(
    device: &Device,
    shape: &ReconstructShape,
    seq_lens: &[u32],
    indptr: &'a impl TensorRef<u32>,
    indices: &'a impl TensorRef<u32>,
) -> Result<(DeviceLists<'a>, Vec<u32>)> {
    device.check_buffer("indptr", indptr, &[shape.n_lists() + 1])?;
    device.check_tensor("indices", indices)?;
    let (indptr, indices) = (indptr.cuda_view(), indices.cuda_view());
    let indptr_host = device.stream().clone_dtoh(&indptr)?;
    shape.validate_lists(seq_lens, &indptr_host, &device.stream().clone_dtoh(&indices)?)?;
    Ok((DeviceLists { indptr, indices }, indptr_host))
}

impl<'a> ReconstructPlan<'a> {
    /// Validates the shape, the options, the layout and the lists, and plans the launch.
    ///
    /// `seq_lens` (`[B]`, host) are the valid tokens of each sequence; `indptr`
    /// (`[B·Hkv + 1]`) and `indices` are the device-resident CSR positions. The plan reads
    /// both back once (one synchronization) and checks every entry on the host.
    ///
    /// # Errors
    /// - [`Error::InvalidArgument`] naming a shape field, `base`, `seq_lens`, `indptr`,
    ///   `indices` (out of range, duplicate, unsorted: see
    ///   [`ReconstructShape::validate_lists`]) or `budget`;
    /// - [`Error::Shape`] for `seq_lens` or `indptr` of the wrong length;
    /// - [`Error::DeviceMismatch`] for lists on another device;
    /// - [`Error::KernelsNotBuilt`] / [`Error::Driver`] from the device.
    pub fn new(
        device: &Device,
        shape: &ReconstructShape,
        options: RopeOptions,
        layout: KeyLayout,
        seq_lens: &[u32],
        indptr: &'a impl TensorRef<u32>,
        indices: &'a impl TensorRef<u32>,
    ) -> Result<Self> {
        let inv_freq = super::rope_table(shape, &options)?;
        let (lists, indptr_host) = read_lists(device, shape, seq_lens, indptr, indices)?;
        super::validate_layout(shape, layout, &indptr_host)?;
        let stream = device.stream();
        let rows = indptr_host[shape.n_lists()] as usize;
        let longest = indptr_host.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let tiles_per_list = longest.div_ceil(tile_tokens(shape.head_dim)).max(1);
        let gather_tiles = longest.div_ceil(GATHER_ROWS).max(1);
        let n_lists = shape.n_lists();
        let work = |tiles: usize| {
            n_lists.checked_mul(tiles).ok_or_else(|| Error::too_large("indices", "the launch grid overflows"))
        };
        let rope = PerDtype::load(device, |dt| rope_id(dt, shape.head_dim))?;
        let gather = PerDtype::load(device, |dt| Ok(gather_id(dt)))?;
        let rope_cfg = grid_for(device, rope.get(DType::F16), THREADS, 0, work(tiles_per_list)?, false)?;
        let gather_cfg = grid_for(device, gather.get(DType::F16), THREADS, 0, work(gather_tiles)?, false)?;
        let inv_freq = stream.clone_htod(&inv_freq)?;
        let decode_list = decode_indices(&indptr_host);
        let padded = if decode_list.is_empty() { vec![0] } else { decode_list };
        let decode_indices = DeviceTensor::from_host(device, &padded, &[padded.len()])?;
        Ok(ReconstructPlan {
            device: device.clone(),
            shape: shape.clone(),
            layout,
            lists,
            rows,
            tiles_per_list,
            gather_tiles,
            inv_freq,
            decode_indices,
            rope,
            gather,
            rope_cfg,
            gather_cfg,
        })
    }

    /// The shape the plan was made for.
    pub fn shape(&self) -> &ReconstructShape {
        &self.shape
    }

    /// The output layout.
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// The shape of the keys [`run`](Self::run) writes: `[n, D]` or `[B, Hkv, budget, D]`.
    pub fn out_shape(&self) -> Vec<usize> {
        match self.layout {
            KeyLayout::Compact => vec![self.rows, self.shape.head_dim],
            KeyLayout::Gathered { budget } => self.shape.gathered_shape(budget).to_vec(),
        }
    }

    /// The lists `0..len` (same `indptr`) that [`crate::decode::DecodePlan`] reads a gathered
    /// cache with (one padding entry when every list is empty).
    pub fn decode_indices(&self) -> &DeviceTensor<u32> {
        &self.decode_indices
    }

    /// Writes the selected keys, RoPE applied, from `u [B, Tcap, r]` and `sv [B, r, Hkv·D]`
    /// into `out` ([`out_shape`](Self::out_shape)), in `T` (f16, bf16 or f32). Enqueued on
    /// the device's stream; no synchronization. Rows of a gathered cache past a list's length
    /// are left as they were.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `u`, `sv` or `out`; [`Error::DeviceMismatch`]; driver errors.
    /// Nothing is written on error.
    pub fn run<T: Float>(
        &self,
        u: &impl TensorRef<T>,
        sv: &impl TensorRef<T>,
        out: &mut impl TensorMut<T>,
    ) -> Result<()> {
        let s = &self.shape;
        let dev = &self.device;
        dev.check_buffer("u", u, &s.u_shape())?;
        dev.check_buffer("sv", sv, &s.sv_shape())?;
        dev.check_buffer("out", out, &self.out_shape())?;
        if self.rows == 0 {
            return Ok(());
        }
        let params = NtkvLowrankRopeParams {
            n_indices: to_u64("indices", self.lists.indices.len())?,
            u_batch_stride: to_u64("u", s.capacity * s.rank)?,
            sv_batch_stride: to_u64("sv", s.rank * s.kv_heads * s.head_dim)?,
            batch: to_u32("batch", s.batch)?,
            kv_heads: to_u32("kv_heads", s.kv_heads)?,
            rank: to_u32("rank", s.rank)?,
            capacity: to_u32("capacity", s.capacity)?,
            budget: match self.layout {
                KeyLayout::Compact => 0,
                KeyLayout::Gathered { budget } => to_u32("budget", budget)?,
            },
            tiles_per_list: to_u32("indices", self.tiles_per_list)?,
        };
        let (uv, svv) = (u.cuda_view(), sv.cuda_view());
        let mut ov = out.cuda_view_mut();
        let mut b = dev.stream().launch_builder(self.rope.get(T::DTYPE));
        b.arg(&params)
            .arg(&uv)
            .arg(&svv)
            .arg(&self.inv_freq)
            .arg(&self.lists.indptr)
            .arg(&self.lists.indices)
            .arg(&mut ov);
        // SAFETY: ntkv_lowrank_rope_<T>_d<D>(NtkvLowrankRopeParams, const T* u, const T* sv,
        // const float* inv_freq, const u32* indptr, const u32* indices, T* out), T and D the
        // plan's. Block x = list * tiles_per_list + tile with list < B*Hkv (blocks past it
        // return); it reads indptr[list], indptr[list+1] (B*Hkv+1 entries, checked) and
        // indices only below n_indices = indices.len(); positions are clamped below Tcap, so
        // u is read at b*Tcap*r + pos*r + j < B*Tcap*r and sv at b*r*N + j*N + h*D + c with
        // j < r, c < D (shapes checked above); inv_freq has D/2 entries. Rows written are
        // indptr[list] + n < indptr[B*Hkv] = rows (compact, out is [rows, D]) or
        // list*budget + n with n < list length <= budget (gathered, validated in new).
        // Static shared memory only (at most 37632 bytes, below the 48 KiB default).
        unsafe { b.launch(self.rope_cfg) }?;
        Ok(())
    }

    /// Gathers the value rows of the same lists from `v [B, Hkv, Tcap, D]` into
    /// `out [B, Hkv, budget, D]` (a [`KeyLayout::Gathered`] plan only). No synchronization.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `layout` for a compact plan; [`Error::Shape`] naming
    /// `v` or `out`; [`Error::DeviceMismatch`]; driver errors. Nothing is written on error.
    pub fn gather_values<T: Float>(&self, v: &impl TensorRef<T>, out: &mut impl TensorMut<T>) -> Result<()> {
        let KeyLayout::Gathered { budget } = self.layout else {
            return Err(Error::invalid("layout", "gather_values needs a KeyLayout::Gathered plan"));
        };
        let s = &self.shape;
        self.device.check_buffer("v", v, &s.v_shape())?;
        self.device.check_buffer("out", out, &s.gathered_shape(budget))?;
        if self.rows == 0 {
            return Ok(());
        }
        let params = NtkvLowrankGatherParams {
            n_indices: to_u64("indices", self.lists.indices.len())?,
            n_lists: to_u32("kv_heads", s.n_lists())?,
            capacity: to_u32("capacity", s.capacity)?,
            budget: to_u32("budget", budget)?,
            head_dim: to_u32("head_dim", s.head_dim)?,
            tiles_per_list: to_u32("indices", self.gather_tiles)?,
            _pad0: 0,
        };
        let vv = v.cuda_view();
        let mut ov = out.cuda_view_mut();
        let mut b = self.device.stream().launch_builder(self.gather.get(T::DTYPE));
        b.arg(&params).arg(&self.lists.indptr).arg(&self.lists.indices).arg(&vv).arg(&mut ov);
        // SAFETY: ntkv_lowrank_gather_<T>(NtkvLowrankGatherParams, const u32* indptr,
        // const u32* indices, const T* v, T* out). Block x = list * tiles + tile, list <
        // n_lists (others return); indptr has n_lists+1 entries and indices are read below
        // n_indices = indices.len(); positions are clamped below Tcap, so v is read at
        // (list*Tcap + pos)*D + d < B*Hkv*Tcap*D, and out written at (list*budget + n)*D + d
        // with n < list length <= budget (validated in new); both shapes checked above.
        unsafe { b.launch(self.gather_cfg) }?;
        Ok(())
    }
}

/// Runs a cast kernel (`widen` or `narrow`) over `[batch, rows, cols]`.
#[allow(clippy::too_many_arguments)]
fn launch_cast<A, B>(
    device: &Device,
    f: &CudaFunction,
    batch: usize,
    rows: usize,
    cols: usize,
    seq_lens: &CudaSlice<u32>,
    masked: bool,
    x: &CudaView<'_, A>,
    y: &mut impl TensorMut<B>,
) -> Result<()> {
    let total = batch * rows * cols;
    if x.len() < total || y.len() < total {
        return Err(Error::internal("a lowrank cast was given a short buffer"));
    }
    let params = NtkvLowrankCastParams {
        total: to_u64("k", total)?,
        batch: to_u32("batch", batch)?,
        rows: to_u32("capacity", rows)?,
        cols: to_u32("cols", cols)?,
        masked: u32::from(masked),
    };
    let cfg = grid_stride(device, f, THREADS, total)?;
    let mut yv = y.cuda_view_mut();
    let mut b = device.stream().launch_builder(f);
    b.arg(&params).arg(seq_lens).arg(x).arg(&mut yv);
    // SAFETY: ntkv_lowrank_{widen,narrow}_<T>(NtkvLowrankCastParams, const u32* seq_lens,
    // const A* x, B* y): a grid-stride loop over i < total, reading x[i] and writing y[i]
    // (both at least total long, checked above) and, when masked, seq_lens[i / (rows*cols)]
    // with that index < batch = seq_lens.len() (the plan's B lengths).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The planned products of a factorization (all batched over the `B` sequences).
struct Gemms {
    sketch: GemmPlan,
    at_q: GemmPlan,
    a_z: GemmPlan,
    gram_t: GemmPlan,
    gram_n: GemmPlan,
    apply_t: GemmPlan,
    apply_n: GemmPlan,
    qt_a: GemmPlan,
    q_w: GemmPlan,
    wt_b: GemmPlan,
}

/// Device buffers of a factorization (f32).
struct Buffers {
    a: DeviceTensor<f32>,
    omega: DeviceTensor<f32>,
    y: DeviceTensor<f32>,
    y2: DeviceTensor<f32>,
    z: DeviceTensor<f32>,
    z2: DeviceTensor<f32>,
    g: DeviceTensor<f32>,
    rinv: DeviceTensor<f32>,
    bc: DeviceTensor<f32>,
    w: DeviceTensor<f32>,
    u: DeviceTensor<f32>,
    sv: DeviceTensor<f32>,
}

/// A planned randomized SVD of `k [B, Tcap, Hkv·D]` (module docs): the validated shape and
/// lengths, the sketch, every GEMM plan and every workspace, allocated once.
///
/// [`run`](Self::run) synchronizes with the stream several times: the CholeskyQR2 Grams and
/// the core SVD are small host steps in f64 (`ℓ × ℓ` and `ℓ × N`). The core SVD (the
/// `ℓ × ℓ` Gram of `Bc`, then tridiagonal QL) runs on one CPU thread, about 0.1 s at
/// `ℓ = 176`, `N = 1024` as measured on a heavily loaded machine, so at the 32768 × 1024,
/// `r = 160` bench shape it can dominate the GEMMs; a GPU core would remove that.
pub struct FactorPlan {
    device: Device,
    shape: FactorShape,
    options: FactorOptions,
    seq_lens: Vec<u32>,
    seq_lens_dev: CudaSlice<u32>,
    l: usize,
    gemms: Gemms,
    buf: Buffers,
    widen: PerDtype,
    narrow: PerDtype,
}

crate::launch::plan_debug!(FactorPlan, "FactorPlan", shape, options, sketch_cols = l);

/// Row-major operand with batch stride `bs`.
const fn rm(ld: usize, bs: usize) -> Operand {
    Operand::row_major(ld).batch_stride(bs)
}
/// Transposed operand with batch stride `bs`.
const fn tr(ld: usize, bs: usize) -> Operand {
    Operand::transposed(ld).batch_stride(bs)
}

fn product(batch: usize, m: usize, n: usize, k: usize, a: Operand, b: Operand) -> GemmShape {
    GemmShape { batch, m, n, k, a, b, c: rm(n, m * n), symmetric: false }
}

/// The Gram `YᵀY` of `Y [B, rows, l]`.
fn gram(batch: usize, rows: usize, l: usize) -> GemmShape {
    let a = tr(l, rows * l);
    GemmShape { batch, m: l, n: l, k: rows, a, b: a.flipped(), c: rm(l, l * l), symmetric: true }
}

impl FactorPlan {
    /// Validates the shape, `seq_lens` and the options; draws the sketch; plans every GEMM and
    /// allocates every workspace (about `4·B·Tcap·(N + 2ℓ + r)` bytes plus the GEMMs' split-K
    /// partials).
    ///
    /// # Errors
    /// As [`FactorShape::validate_seq_lens`] and [`FactorOptions::validate`] (a rank above
    /// `min(T, Hkv·D)` is [`Error::InvalidArgument`] naming `rank`); the GEMM plans' errors;
    /// [`Error::KernelsNotBuilt`] / driver errors.
    pub fn new(device: &Device, shape: &FactorShape, options: FactorOptions, seq_lens: &[u32]) -> Result<Self> {
        shape.validate_seq_lens(seq_lens)?;
        options.validate()?;
        let (bt, t, n, r) = (shape.batch, shape.capacity, shape.cols(), shape.rank);
        let l = options.sketch_cols(shape, seq_lens);
        let p = options.precision;
        let plan = |s: GemmShape| GemmPlan::new(device, &s, p);
        let gemms = Gemms {
            sketch: plan(product(bt, t, l, n, rm(n, t * n), rm(l, 0)))?,
            at_q: plan(product(bt, n, l, t, tr(n, t * n), rm(l, t * l)))?,
            a_z: plan(product(bt, t, l, n, rm(n, t * n), rm(l, n * l)))?,
            gram_t: plan(gram(bt, t, l))?,
            gram_n: plan(gram(bt, n, l))?,
            apply_t: plan(product(bt, t, l, l, rm(l, t * l), rm(l, l * l)))?,
            apply_n: plan(product(bt, n, l, l, rm(l, n * l), rm(l, l * l)))?,
            qt_a: plan(product(bt, l, n, t, tr(l, t * l), rm(n, t * n)))?,
            q_w: plan(product(bt, t, r, l, rm(l, t * l), rm(r, l * r)))?,
            wt_b: plan(product(bt, r, n, l, tr(r, l * r), rm(n, l * n)))?,
        };
        let z = |s: &[usize]| DeviceTensor::<f32>::zeros(device, s);
        let buf = Buffers {
            a: z(&[bt, t, n])?,
            omega: DeviceTensor::from_host(device, &sketch(options.seed, n, l), &[n, l])?,
            y: z(&[bt, t, l])?,
            y2: z(&[bt, t, l])?,
            z: z(&[bt, n, l])?,
            z2: z(&[bt, n, l])?,
            g: z(&[bt, l, l])?,
            rinv: z(&[bt, l, l])?,
            bc: z(&[bt, l, n])?,
            w: z(&[bt, l, r])?,
            u: z(&[bt, t, r])?,
            sv: z(&[bt, r, n])?,
        };
        Ok(FactorPlan {
            device: device.clone(),
            shape: shape.clone(),
            options,
            seq_lens: seq_lens.to_vec(),
            seq_lens_dev: device.stream().clone_htod(seq_lens)?,
            l,
            gemms,
            buf,
            widen: PerDtype::load(device, |dt| Ok(widen_id(dt)))?,
            narrow: PerDtype::load(device, |dt| Ok(narrow_id(dt)))?,
        })
    }

    /// The sketch width `ℓ`.
    pub fn sketch_cols(&self) -> usize {
        self.l
    }

    /// The planned shape.
    pub fn shape(&self) -> &FactorShape {
        &self.shape
    }

    /// Factors `k [B, Tcap, Hkv·D]` into `u [B, Tcap, r]` and `sv [B, r, Hkv·D]` (all `T`),
    /// and returns the top `r` singular values `[B, r]` (f64, from the core SVD). Returns when
    /// the factors are written (it synchronizes).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `k`, `u` or `sv`; [`Error::DeviceMismatch`]; driver errors.
    /// Nothing is written to `u` or `sv` when the checks fail.
    pub fn run<T: Float>(
        &mut self,
        k: &impl TensorRef<T>,
        u: &mut impl TensorMut<T>,
        sv: &mut impl TensorMut<T>,
    ) -> Result<Vec<f64>> {
        let s = self.shape.clone();
        let dev = self.device.clone();
        dev.check_buffer("k", k, &s.k_shape())?;
        dev.check_buffer("u", u, &s.u_shape())?;
        dev.check_buffer("sv", sv, &s.sv_shape())?;
        let (bt, t, n, r, l) = (s.batch, s.capacity, s.cols(), s.rank, self.l);
        let kv = k.cuda_view();
        launch_cast(&dev, self.widen.get(T::DTYPE), bt, t, n, &self.seq_lens_dev, true, &kv, &mut self.buf.a)?;

        let valid_t: Vec<usize> = self.seq_lens.iter().map(|&x| x as usize).collect();
        let valid_n = vec![n; bt];
        let (g, b) = (&mut self.gemms, &mut self.buf);
        g.sketch.run(&b.a, &b.omega, &mut b.y)?;
        let mut orth_t = Orth { gram: &mut g.gram_t, apply: &mut g.apply_t, g: &mut b.g, rinv: &mut b.rinv, l };
        orth_t.run(&dev, &mut b.y, &mut b.y2, t, &valid_t)?;
        for _ in 0..self.options.power_iters {
            g.at_q.run(&b.a, &b.y, &mut b.z)?;
            Orth { gram: &mut g.gram_n, apply: &mut g.apply_n, g: &mut b.g, rinv: &mut b.rinv, l }
                .run(&dev, &mut b.z, &mut b.z2, n, &valid_n)?;
            g.a_z.run(&b.a, &b.z, &mut b.y)?;
            Orth { gram: &mut g.gram_t, apply: &mut g.apply_t, g: &mut b.g, rinv: &mut b.rinv, l }
                .run(&dev, &mut b.y, &mut b.y2, t, &valid_t)?;
        }
        g.qt_a.run(&b.y, &b.a, &mut b.bc)?;
        let bc = b.bc.to_host()?;
        let mut w_host = vec![0f32; bt * l * r];
        let mut values = Vec::with_capacity(bt * r);
        for z in 0..bt {
            let m: Vec<f64> = bc[z * l * n..(z + 1) * l * n].iter().map(|&x| f64::from(x)).collect();
            let (w, sv) = core_svd(&m, l, n, r);
            for (dst, src) in w_host[z * l * r..(z + 1) * l * r].iter_mut().zip(&w) {
                *dst = *src as f32;
            }
            values.extend(sv);
        }
        b.w.copy_from_host(&w_host)?;
        g.q_w.run(&b.y, &b.w, &mut b.u)?;
        g.wt_b.run(&b.w, &b.bc, &mut b.sv)?;
        let (uv, svv) = (b.u.cuda_view(), b.sv.cuda_view());
        launch_cast(&dev, self.narrow.get(T::DTYPE), bt, t, r, &self.seq_lens_dev, true, &uv, u)?;
        launch_cast(&dev, self.narrow.get(T::DTYPE), bt, r, n, &self.seq_lens_dev, false, &svv, sv)?;
        dev.synchronize()?;
        Ok(values)
    }
}

/// CholeskyQR2 over `Y [B, rows, l]` with the Householder fallback per sequence.
struct Orth<'p> {
    gram: &'p mut GemmPlan,
    apply: &'p mut GemmPlan,
    g: &'p mut DeviceTensor<f32>,
    rinv: &'p mut DeviceTensor<f32>,
    l: usize,
}

impl Orth<'_> {
    /// Orthonormalizes the columns of each `y[b, 0..valid[b], :]` in place (`tmp` is scratch
    /// of the same shape; rows past `valid[b]` are zero and stay zero).
    fn run(
        &mut self,
        device: &Device,
        y: &mut DeviceTensor<f32>,
        tmp: &mut DeviceTensor<f32>,
        rows: usize,
        valid: &[usize],
    ) -> Result<()> {
        let l = self.l;
        for pass in 0..2 {
            let (src, dst) = if pass == 0 { (&*y, &mut *tmp) } else { (&*tmp, &mut *y) };
            self.gram.run_symmetric(src, &mut *self.g)?;
            let gh = self.g.to_host()?;
            let mut rinv = vec![0f32; valid.len() * l * l];
            let mut fallback = Vec::new();
            for (z, block) in rinv.chunks_mut(l * l).enumerate() {
                let gz: Vec<f64> = gh[z * l * l..(z + 1) * l * l].iter().map(|&x| f64::from(x)).collect();
                match cholesky_upper(&gz, l) {
                    Some(r) => {
                        for (d, s) in block.iter_mut().zip(upper_inverse(&r, l)) {
                            *d = s as f32;
                        }
                    }
                    None => {
                        (0..l).for_each(|i| block[i * l + i] = 1.0);
                        fallback.push(z);
                    }
                }
            }
            self.rinv.copy_from_host(&rinv)?;
            self.apply.run(src, &*self.rinv, dst)?;
            for z in fallback {
                let range = z * rows * l..(z * rows + valid[z]) * l;
                let stream = device.stream();
                let mut host = vec![0f32; range.len()];
                stream.memcpy_dtoh(&src.slice().slice(range.clone()), &mut host)?;
                let a: Vec<f64> = host.iter().map(|&x| f64::from(x)).collect();
                let q: Vec<f32> = householder_q(&a, valid[z], l).into_iter().map(|x| x as f32).collect();
                let mut view = dst.view_mut();
                stream.memcpy_htod(&q, &mut view.slice_mut(range))?;
            }
        }
        Ok(())
    }
}
