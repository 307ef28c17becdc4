//! A deterministic split-K GEMM on the GPU, for any family: batched, strided, and with either
//! operand (and the output) transposed.
//!
//! # The product
//! For every batch `z < batch`, `C_z [m, n] = A_z [m, k] · B_z [k, n]`, accumulated in fp32 and
//! written as f32. Each operand is described by an [`Operand`]: a leading dimension `ld`, a
//! batch stride, and whether it is stored transposed:
//!
//! | operand | `transposed: false` (row-major) | `transposed: true` |
//! |---|---|---|
//! | `A` | `A_z[i, q]` at `z·bs + i·ld + q` (`ld ≥ k`) | stored `[k, m]`: at `z·bs + q·ld + i` (`ld ≥ m`) |
//! | `B` | `B_z[q, j]` at `z·bs + q·ld + j` (`ld ≥ n`) | stored `[n, k]`: at `z·bs + j·ld + q` (`ld ≥ k`) |
//! | `C` | `C_z[i, j]` at `z·bs + i·ld + j` (`ld ≥ n`) | stored `[n, m]`: at `z·bs + j·ld + i` (`ld ≥ m`) |
//!
//! So k-means scores (keys `[H, T, D]` times the centroids `[H, C, D]` transposed, per head) are
//! `batch = H, m = T, n = C, k = D`, `a = Operand::row_major(D).batch_stride(T·D)`,
//! `b = Operand::transposed(D).batch_stride(C·D)`; a randomized SVD's `A[T, n]·Ω[n, r]` is two
//! row-major operands, `Aᵀ·B` sets `a.transposed`, and the Gram `AᵀA` of a tall matrix is the
//! symmetric case below. Elements of `C` outside the described positions (gaps of a strided
//! `C`) are never written.
//!
//! # Symmetric case
//! With [`GemmShape::symmetric`], `B` is `A` itself read transposed (`C = op(A)·op(A)ᵀ`, so
//! `m = n`, and `b` must equal `a` with `transposed` flipped): only the 128 × 128 output tiles
//! on or above the diagonal are computed, and the rest is mirrored from them, so the output is
//! exactly symmetric (bit for bit) and costs about half. Run it with
//! [`GemmPlan::run_symmetric`].
//!
//! # Precisions
//! - [`Precision::F32`]: exact fp32 FMA on the CUDA cores (8 × 8 register tiles).
//! - [`Precision::Tf32`]: `mma.sync.m16n8k8` tensor cores; each input is rounded to tf32
//!   (10-bit mantissa, to nearest with ties away from zero, as `cvt.rna.tf32.f32`), fp32
//!   accumulation.
//! - [`Precision::Bf16`]: `mma.sync.m16n8k16` tensor cores; bf16 inputs are used as they are,
//!   f32 inputs are rounded to bf16 (to nearest even) when staged; fp32 accumulation.
//!
//! Inputs are `f32` or `bf16` (`half::bf16`); `f16` storage is refused. Both operands have the
//! same storage type. The bounds [`Precision::rel_l2_bound`] are the relative L2 error of the
//! whole output against an `f64` product of the values the kernel reads.
//!
//! # Split-K and the reduction order (determinism)
//! The plan cuts `k` into `splits` consecutive chunks of `k_chunk` (a multiple of 32):
//! split `s` covers `q ∈ [s·k_chunk, min((s+1)·k_chunk, k))`. Every (tile, split, batch) block
//! accumulates its chunk in increasing `q` into its own f32 partial plane (for `F32`, one FMA
//! chain per output element, starting from +0); a second kernel then adds the partials of each
//! element in split order `s = 0, 1, …, splits − 1`, starting from +0, and stores the sum. No
//! atomics: the same plan on the same buffers gives the same bits on every run.
//! [`cpu::gemm_f32_ordered`] reproduces the `F32` result bit for bit from
//! [`GemmPlan::k_chunk`]. The split count is chosen from the device's occupancy of the kernel to
//! fill whole waves (at most 32 splits, and at most 2^28 f32 of partials unless one split
//! already needs more).
//!
//! # Kernels
//! Operands whose contraction axis is contiguous (row-major `A`, transposed `B`) run the
//! `ntkv_ntk_gemm_*` kernels: when rows, batches and `k` are whole 16-byte chunks and the
//! storage is the mma's own type (f32 for `Tf32`, bf16 for `Bf16`), a 3–4 stage `cp.async`
//! pipeline; otherwise a register-staged double buffer. An operand with the contraction axis
//! strided (row-major `B`, transposed `A`) runs the `ntkv_gemm_*` kernels, the same tiles with
//! strided scalar loads (coalesced across rows).

pub mod cpu;
pub(crate) mod gpu;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Float, TensorMut, TensorRef};

pub use gpu::kernels;

/// The arithmetic of a product. All accumulate in fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Exact fp32 FMA on the CUDA cores; the reference for tests.
    F32,
    /// TF32 tensor cores (`mma.sync.m16n8k8`), inputs rounded to tf32 as `cvt.rna.tf32.f32` does.
    Tf32,
    /// BF16 tensor cores (`mma.sync.m16n8k16`), inputs as bf16.
    Bf16,
}

impl Precision {
    /// Every precision.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// `f32`, `tf32` or `bf16`: the dtype string of the bench tables.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The relative-L2 bound against the `f64` product of the values the kernel reads (for
    /// `Bf16` on f32 storage, of the bf16-rounded values): `1e-5` for `F32` (exact FMA, fp32
    /// rounding only), `2e-3` for `Tf32` (each input carries up to 2⁻¹¹ relative rounding) and
    /// `Bf16` (fp32 accumulation of exact bf16 products). Against unrounded f32 input, `Bf16`
    /// stays within `1e-2` (each input carries 2⁻⁹).
    pub fn rel_l2_bound(self) -> f64 {
        match self {
            Precision::F32 => 1e-5,
            Precision::Tf32 | Precision::Bf16 => 2e-3,
        }
    }
}

/// How one operand lies in memory (see the module docs for the index formulas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Operand {
    /// Stored transposed (see the table in the module docs).
    pub transposed: bool,
    /// Elements between consecutive stored rows.
    pub ld: usize,
    /// Elements between consecutive batches (ignored when `batch = 1`).
    pub batch_stride: usize,
}

impl Operand {
    /// A row-major operand with leading dimension `ld` and batch stride 0.
    pub const fn row_major(ld: usize) -> Self {
        Operand { transposed: false, ld, batch_stride: 0 }
    }

    /// A transposed operand with leading dimension `ld` and batch stride 0.
    pub const fn transposed(ld: usize) -> Self {
        Operand { transposed: true, ld, batch_stride: 0 }
    }

    /// The same operand with batch stride `s`.
    pub const fn batch_stride(mut self, s: usize) -> Self {
        self.batch_stride = s;
        self
    }

    /// The same operand with `transposed` flipped (the same memory read the other way round).
    pub const fn flipped(mut self) -> Self {
        self.transposed = !self.transposed;
        self
    }
}

/// The largest batch (the launch grid's z extent).
pub const MAX_BATCH: usize = 65535;
/// The largest `m` and `n` (tile row indices stay inside the kernels' 32-bit arithmetic).
pub const MAX_ROWS: usize = 1 << 31;

/// A batched, strided GEMM `C_z = A_z · B_z` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Independent products, `1..=MAX_BATCH`.
    pub batch: usize,
    /// Rows of `C`, `1..=MAX_ROWS`.
    pub m: usize,
    /// Columns of `C`, `1..=MAX_ROWS`.
    pub n: usize,
    /// Contraction depth; `0` gives a zero `C`.
    pub k: usize,
    /// The left operand.
    pub a: Operand,
    /// The right operand (for `symmetric`, `a` flipped).
    pub b: Operand,
    /// The output (f32). Its batches must not overlap.
    pub c: Operand,
    /// `B` is `A` read transposed: `m = n`, one triangle of tiles computed and mirrored.
    pub symmetric: bool,
}

/// The smallest buffer lengths (in elements) a shape reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmExtents {
    /// Elements of `A` (0 when `A` has no element, e.g. `k = 0`).
    pub a: usize,
    /// Elements of `B` (0 for a symmetric shape, which reads only `A`).
    pub b: usize,
    /// Elements of `C`.
    pub c: usize,
}

/// Elements an operand with `rows × cols` stored elements spans over `batch` batches.
fn extent(arg: &'static str, op: &Operand, rows: usize, cols: usize, batch: usize) -> Result<usize> {
    if op.ld < cols {
        return Err(Error::invalid(arg, format!("leading dimension {} is less than the {cols} stored columns", op.ld)));
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let overflow = || Error::too_large(arg, "the operand's extent overflows usize");
    let one = (rows - 1).checked_mul(op.ld).and_then(|v| v.checked_add(cols)).ok_or_else(overflow)?;
    let last = (batch - 1).checked_mul(op.batch_stride).and_then(|v| v.checked_add(one)).ok_or_else(overflow)?;
    // Every element index must also fit the byte size of an allocation.
    if last > isize::MAX as usize / 4 {
        return Err(overflow());
    }
    Ok(last)
}

impl GemmShape {
    /// The stored `(rows, cols)` of `A`, `B` and `C`.
    fn stored(&self) -> [(usize, usize); 3] {
        let (m, n, k) = (self.m, self.n, self.k);
        [
            if self.a.transposed { (k, m) } else { (m, k) },
            if self.b.transposed { (n, k) } else { (k, n) },
            if self.c.transposed { (n, m) } else { (m, n) },
        ]
    }

    /// Checks every extent and stride and returns the buffer lengths the shape needs.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `batch`, `m` or `n`, a leading dimension shorter
    /// than its stored row, overlapping batches of `C`, or a symmetric shape with `m ≠ n` or
    /// `b ≠ a` flipped; [`Error::TooLarge`] for `batch > MAX_BATCH`, `m` or `n > MAX_ROWS`,
    /// or an extent, tile count or workspace that overflows.
    pub fn extents(&self) -> Result<GemmExtents> {
        for (arg, v) in [("batch", self.batch), ("m", self.m), ("n", self.n)] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if self.batch > MAX_BATCH {
            return Err(Error::too_large("batch", format!("{} exceeds {MAX_BATCH}", self.batch)));
        }
        for (arg, v) in [("m", self.m), ("n", self.n)] {
            if v > MAX_ROWS {
                return Err(Error::too_large(arg, format!("{v} exceeds 2^31")));
            }
        }
        if self.symmetric {
            if self.m != self.n {
                return Err(Error::invalid("n", "a symmetric product needs m == n"));
            }
            if self.b != self.a.flipped() {
                return Err(Error::invalid("b", "a symmetric product reads A transposed: b must equal a.flipped()"));
            }
        }
        let [sa, sb, sc] = self.stored();
        let a = extent("a", &self.a, sa.0, sa.1, self.batch)?;
        let b = if self.symmetric { 0 } else { extent("b", &self.b, sb.0, sb.1, self.batch)? };
        let c = extent("c", &self.c, sc.0, sc.1, self.batch)?;
        let per_batch = extent("c", &self.c, sc.0, sc.1, 1)?;
        if self.batch > 1 && self.c.batch_stride < per_batch {
            return Err(Error::invalid(
                "c.batch_stride",
                format!(
                    "{} is less than one batch's {per_batch} elements: batches of C would overlap",
                    self.c.batch_stride
                ),
            ));
        }
        gpu::Split::tiles(self.m, self.n, self.symmetric)?;
        let plane = self.m.checked_mul(self.n).and_then(|v| v.checked_mul(self.batch));
        match plane {
            Some(p) if p <= isize::MAX as usize / 4 => {}
            _ => return Err(Error::too_large("c", "the split-K workspace overflows the address space")),
        }
        Ok(GemmExtents { a, b, c })
    }

    /// Checks the shape (see [`GemmShape::extents`]).
    ///
    /// # Errors
    /// As [`GemmShape::extents`].
    pub fn validate(&self) -> Result<()> {
        self.extents().map(|_| ())
    }
}

/// A planned GEMM: validated shape, split-K choice, workspace, and the device it runs on.
///
/// Workspace: `splits · batch · m · n` f32 partials, allocated once by [`GemmPlan::new`].
#[derive(Debug)]
pub struct GemmPlan {
    device: Device,
    shape: GemmShape,
    extents: GemmExtents,
    precision: Precision,
    geometry: gpu::Geometry,
    split: gpu::Split,
    workspace: CudaSlice<f32>,
}

impl GemmPlan {
    /// Validates `shape`, chooses the split-K from the device's occupancy of the kernel, and
    /// allocates the workspace.
    ///
    /// # Errors
    /// As [`GemmShape::extents`]; [`Error::KernelsNotBuilt`] in a build without nvcc; driver
    /// errors (out of memory) from the allocation.
    pub fn new(device: &Device, shape: &GemmShape, precision: Precision) -> Result<Self> {
        let extents = shape.extents()?;
        let geometry = gpu::Geometry::of(shape);
        let slots = gpu::slots(device, precision, geometry.contiguous())?;
        let split = gpu::Split::new(slots, geometry.m1, geometry.m2, shape.k, shape.batch, shape.symmetric)?;
        let workspace = device.stream().alloc_zeros::<f32>(split.partial_elems().max(1))?;
        Ok(GemmPlan { device: device.clone(), shape: *shape, extents, precision, geometry, split, workspace })
    }

    /// The planned shape.
    pub fn shape(&self) -> &GemmShape {
        &self.shape
    }

    /// The buffer lengths the plan needs.
    pub fn extents(&self) -> GemmExtents {
        self.extents
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The number of split-K partitions.
    pub fn splits(&self) -> usize {
        self.split.splits
    }

    /// The depth of each split (a multiple of 32); see the module docs.
    pub fn k_chunk(&self) -> usize {
        self.split.k_chunk
    }

    /// Bytes of device workspace the plan holds.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len() * 4
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `C = A·B` for a plan that is not symmetric. `a`, `b` (`f32` or `bf16`) and `c` (`f32`)
    /// may have any shape; their lengths must be at least [`GemmPlan::extents`]. Only the
    /// elements of `C` the shape describes are written.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a symmetric plan or f16 storage; [`Error::Shape`] for a
    /// buffer shorter than its extent; [`Error::DeviceMismatch`] for a tensor of another
    /// device. Nothing is written on error.
    pub fn run<T: Float>(
        &mut self,
        a: &impl TensorRef<T>,
        b: &impl TensorRef<T>,
        c: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        if self.shape.symmetric {
            return Err(Error::invalid("b", "the plan is symmetric (B = Aᵀ): use run_symmetric"));
        }
        self.device.check_tensor("a", a)?;
        self.device.check_tensor("b", b)?;
        self.device.check_tensor("c", c)?;
        let (av, bv) = (a.cuda_view(), b.cuda_view());
        let mut cv = c.cuda_view_mut();
        self.run_views(&av, Some(&bv), &mut cv)
    }

    /// `C = op(A)·op(A)ᵀ` for a symmetric plan (see [`GemmPlan::run`] for the buffers).
    ///
    /// # Errors
    /// As [`GemmPlan::run`]; [`Error::InvalidArgument`] for a plan that is not symmetric.
    pub fn run_symmetric<T: Float>(&mut self, a: &impl TensorRef<T>, c: &mut impl TensorMut<f32>) -> Result<()> {
        if !self.shape.symmetric {
            return Err(Error::invalid("b", "the plan is not symmetric: use run with B"));
        }
        self.device.check_tensor("a", a)?;
        self.device.check_tensor("c", c)?;
        let av = a.cuda_view();
        let mut cv = c.cuda_view_mut();
        self.run_views(&av, None, &mut cv)
    }

    /// The launches behind both run methods, on views (`b = None` for symmetric plans).
    pub(crate) fn run_views<T: Float>(
        &mut self,
        a: &CudaView<'_, T>,
        b: Option<&CudaView<'_, T>>,
        c: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if c.len() < self.extents.c {
            return Err(Error::shape("c", &[self.extents.c], &[c.len()]));
        }
        self.launch_partials(a, b)?;
        gpu::reduce_into(&self.device, &self.split, &self.geometry, &self.workspace, c)
    }

    /// The split-K GEMM into the workspace only (the caller reduces [`GemmPlan::partials`]).
    pub(crate) fn launch_partials<T: Float>(&mut self, a: &CudaView<'_, T>, b: Option<&CudaView<'_, T>>) -> Result<()> {
        if T::DTYPE == DType::F16 {
            return Err(Error::invalid("a", "f16 storage is not supported; use f32 or bf16"));
        }
        if a.len() < self.extents.a {
            return Err(Error::shape("a", &[self.extents.a], &[a.len()]));
        }
        match (b, self.shape.symmetric) {
            (Some(b), false) if b.len() < self.extents.b => {
                return Err(Error::shape("b", &[self.extents.b], &[b.len()]))
            }
            (Some(_), true) => return Err(Error::internal("a symmetric GEMM was given a second operand")),
            (None, false) => return Err(Error::internal("a cross GEMM was given no second operand")),
            _ => {}
        }
        let (x, y) = match (b, self.geometry.swap) {
            (Some(b), true) => (b, Some(a)),
            (b, _) => (a, b),
        };
        gpu::launch_gemm(&self.device, &self.split, &self.geometry, self.precision, x, y, &mut self.workspace)
    }

    /// The split geometry (for callers that reduce the partials themselves).
    pub(crate) fn split(&self) -> &gpu::Split {
        &self.split
    }

    /// The partials written by the last [`GemmPlan::launch_partials`].
    pub(crate) fn partials(&self) -> &CudaSlice<f32> {
        &self.workspace
    }
}

/// One call: plans and runs `C = A·B` (see [`GemmPlan::run`]).
///
/// # Errors
/// As [`GemmPlan::new`] and [`GemmPlan::run`].
pub fn gemm<T: Float>(
    device: &Device,
    shape: &GemmShape,
    precision: Precision,
    a: &impl TensorRef<T>,
    b: &impl TensorRef<T>,
    c: &mut impl TensorMut<f32>,
) -> Result<()> {
    GemmPlan::new(device, shape, precision)?.run(a, b, c)
}
