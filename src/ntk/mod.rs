//! NTK Jacobian contractions: the empirical neural tangent kernel from per-sample Jacobians,
//! the factored (structured-derivative) MLP NTK that never materializes `J`, an MLP helper, the
//! linearized model, and metrics on an `[N, N]` kernel.
//!
//! # Jacobians and modes
//! Per-sample Jacobians are `J [N, O, P]` row-major, `J[i,a,p] = ∂f_a(x_i)/∂θ_p`; a cross kernel
//! takes `J1 [N1, O, P]` and `J2 [N2, O, P]`. Outputs are `f32`, in one of four [`NtkMode`]s:
//! - `Full`: `Θ[i,j,a,b] = Σ_p J1[i,a,p]·J2[j,b,p]`, shape `[N1, N2, O, O]`;
//! - `Trace`: `Σ_a Θ[i,j,a,a]`, shape `[N1, N2]`, optionally divided by `O`
//!   (neural-tangents divides, the PyTorch tutorial does not: both are offered);
//! - `Diagonal`: `Θ[i,j,a,a]`, shape `[N1, N2, O]`;
//! - `Pseudo`: `(Σ_a J1[i,a,:])·(Σ_b J2[j,b,:])`, shape `[N1, N2]`: the scalar-output NTK of
//!   TE-NAS and LGA.
//!
//! # What runs where
//! - [`GramPlan`] / [`gram`] / [`gram_cross`]: the contractions on the GPU through the
//!   [`crate::gemm`] split-K GEMM (tiled 128×128×32; see there for the kernels, the split-K
//!   order that makes results bit-identical run to run, and the precisions). The symmetric
//!   case (`J2 = J1`) computes only the tiles on or above the diagonal and mirrors them, so the
//!   output is exactly symmetric. `P` is streamed through split-K, so any `P` whose `J` fits in
//!   memory works (`P` in the millions included).
//! - [`factored_ntk`], [`Mlp::empirical_ntk`], [`Mlp::linearized`]: the same GEMMs plus small
//!   elementwise kernels.
//! - [`metrics`]: trace, Frobenius norm, mean, LGA and the alignments are GPU reductions in
//!   `f64` with a fixed order; eigenvalues, the condition number and NTK regression copy the
//!   kernel to the host and run in `f64` on the CPU (O(N³), fine for N ≤ 4096).
//! - [`cpu`]: the `f64` reference of everything, which the tests compare against.
//!
//! # Precision and tolerances (relative L2 over the output, against the `f64` reference)
//! - [`Precision::F32`]: exact fp32 FMA, ≤ 1e-5.
//! - [`Precision::Tf32`]: inputs rounded to tf32 (at most 2⁻¹¹ relative each), fp32
//!   accumulation: ≤ 2e-3 (the typical error on random data is a few 1e-4).
//! - [`Precision::Bf16`]: `J` stored as bf16 is used as is; `J` stored as `f32` is rounded to
//!   bf16 on the fly. fp32 accumulation. Against the reference on the bf16 values: ≤ 2e-3;
//!   against the unrounded f32 input: ≤ 1e-2 (each input carries 2⁻⁹ relative rounding).
//!
//! `J` may be stored as `f32` or `bf16`; `f16` storage is refused. `Pseudo` first sums `J` over
//! the outputs in f32 (in output order), then multiplies the sums at `precision`.

pub mod cpu;

pub use crate::gemm::Precision;

/// How the `[N1, N2, O, O]` kernel is contracted over the output axes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NtkMode {
    /// `Θ[i,j,a,b] = Σ_p J1[i,a,p]·J2[j,b,p]`, shape `[N1, N2, O, O]`.
    Full,
    /// `Σ_a Θ[i,j,a,a]`, shape `[N1, N2]`; neural-tangents divides by `O`
    /// (`divide_by_outputs: true`), the PyTorch tutorial does not.
    Trace {
        /// Divide the trace by `O`.
        divide_by_outputs: bool,
    },
    /// `Θ[i,j,a,a]`, shape `[N1, N2, O]`.
    Diagonal,
    /// `(Σ_a J1[i,a])·(Σ_b J2[j,b])`, shape `[N1, N2]`: the scalar-output NTK of TE-NAS and LGA.
    Pseudo,
}

impl NtkMode {
    /// Every mode (both trace variants).
    pub const ALL: [NtkMode; 5] = [
        NtkMode::Full,
        NtkMode::Trace { divide_by_outputs: false },
        NtkMode::Trace { divide_by_outputs: true },
        NtkMode::Diagonal,
        NtkMode::Pseudo,
    ];

    /// A short name for tables (`full`, `trace`, `trace/O`, `diag`, `pseudo`).
    pub fn name(self) -> &'static str {
        match self {
            NtkMode::Full => "full",
            NtkMode::Trace { divide_by_outputs: false } => "trace",
            NtkMode::Trace { divide_by_outputs: true } => "trace/O",
            NtkMode::Diagonal => "diag",
            NtkMode::Pseudo => "pseudo",
        }
    }

    /// The output shape for `n1 × n2` samples and `o` outputs.
    pub fn output_shape(self, n1: usize, n2: usize, o: usize) -> Vec<usize> {
        cpu::output_shape(self, n1, n2, o)
    }
}

/// A hidden activation of the MLP helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)`; derivative 0 at 0 (as PyTorch).
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// Exact GELU `x·Φ(x)` (erf form, `torch.nn.GELU()`'s default).
    Gelu,
}

impl Activation {
    /// The code the kernels use: 0 ReLU, 1 tanh, 2 GELU.
    pub fn code(self) -> u32 {
        match self {
            Activation::Relu => 0,
            Activation::Tanh => 1,
            Activation::Gelu => 2,
        }
    }
}

pub(crate) mod gpu;
pub mod metrics;
mod mlp;

pub use mlp::{Mlp, MlpFactors};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::device::Device;
use crate::error::{check_shape, Error, Result};
use crate::gemm::{GemmPlan, GemmShape, Operand};
use crate::tensor::{checked_numel, DType, DeviceTensor, Float, TensorMut, TensorRef};
use gpu::ReduceLayout;

fn check_dtype<T: Float>(arg: &'static str) -> Result<()> {
    if T::DTYPE == DType::F16 {
        return Err(Error::invalid(arg, "f16 storage is not supported; use f32 or bf16"));
    }
    Ok(())
}

/// How one contraction mode maps onto the gemm module's `C_z = A_z·B_zᵀ` over `J` (pure: the
/// plan, the launches and the CPU emulation in the tests share it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ModeGeometry {
    /// Rows of A (side 1) and B (side 2).
    pub m1: usize,
    pub m2: usize,
    /// Contraction depth.
    pub k: usize,
    /// Independent GEMMs (`O` for `Diagonal`).
    pub batch: usize,
    /// Elements between rows and between batches of an operand (the same on both sides).
    pub row_stride: usize,
    pub batch_stride: usize,
    /// The operands are `J` summed over outputs (`[N, P]`), not `J`.
    pub presum: bool,
    pub layout: ReduceLayout,
    pub scale: f32,
}

impl ModeGeometry {
    /// The GEMM: `A` the side-1 rows (row-major), `B` the side-2 rows read transposed.
    pub(crate) fn gemm_shape(&self, symmetric: bool) -> GemmShape {
        let a = Operand { transposed: false, ld: self.row_stride, batch_stride: self.batch_stride };
        let plane = self.m1.saturating_mul(self.m2);
        GemmShape {
            batch: self.batch,
            m: self.m1,
            n: self.m2,
            k: self.k,
            a,
            b: a.flipped(),
            c: Operand::row_major(self.m2).batch_stride(plane),
            symmetric,
        }
    }
}

/// The GEMM geometry of `mode` for `J1 [n1, o, p]`, `J2 [n2, o, p]`:
/// - `Full`: rows `(i, a)` of `J` as they lie (`N·O` rows of `P`), output `[N1, N2, O, O]`;
/// - `Trace`: rows `i` of depth `O·P` (`Σ_a Σ_p` is one dot product of a sample's whole slab);
/// - `Diagonal`: `O` batched GEMMs, batch `a` reading rows `i` at stride `O·P` from offset `a·P`;
/// - `Pseudo`: rows of the `O`-summed `J` (`[N, P]`).
///
/// # Errors
/// [`Error::TooLarge`] when a size overflows.
pub(crate) fn mode_geometry(mode: NtkMode, n1: usize, n2: usize, o: usize, p: usize) -> Result<ModeGeometry> {
    let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::too_large("params", "size overflows"));
    let op = mul(o, p)?;
    let plain = |m1, m2, k, row_stride, presum, scale| ModeGeometry {
        m1,
        m2,
        k,
        batch: 1,
        row_stride,
        batch_stride: 0,
        presum,
        layout: ReduceLayout::Plain,
        scale,
    };
    Ok(match mode {
        NtkMode::Full => {
            ModeGeometry { layout: ReduceLayout::Full { n2, o }, ..plain(mul(n1, o)?, mul(n2, o)?, p, p, false, 1.0) }
        }
        NtkMode::Trace { divide_by_outputs } => {
            plain(n1, n2, op, op, false, if divide_by_outputs { 1.0 / o as f32 } else { 1.0 })
        }
        NtkMode::Diagonal => ModeGeometry {
            batch: o,
            batch_stride: p,
            layout: ReduceLayout::Diagonal { n2, o },
            ..plain(n1, n2, p, op, false, 1.0)
        },
        NtkMode::Pseudo => plain(n1, n2, p, p, true, 1.0),
    })
}

/// The largest output of a contraction, in elements (the reduction decodes indices in 32 bits).
pub const MAX_OUTPUT: usize = u32::MAX as usize;

/// The shape of a Jacobian contraction: `J1 [n1, outputs, params]` against
/// `J2 [n2, outputs, params]` (or against itself when `symmetric`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GramShape {
    /// Samples on side 1, `≥ 1`.
    pub n1: usize,
    /// Samples on side 2, `≥ 1` (equal to `n1` when `symmetric`).
    pub n2: usize,
    /// Outputs `O`, `≥ 1`.
    pub outputs: usize,
    /// Parameters `P`; `0` gives a zero kernel.
    pub params: usize,
    /// The contraction.
    pub mode: NtkMode,
    /// `J2 = J1`: one triangle of tiles computed and mirrored.
    pub symmetric: bool,
}

impl GramShape {
    /// The symmetric contraction of `J [n, outputs, params]` with itself.
    pub fn symmetric(n: usize, outputs: usize, params: usize, mode: NtkMode) -> Self {
        GramShape { n1: n, n2: n, outputs, params, mode, symmetric: true }
    }

    /// The cross contraction of `J1 [n1, ..]` with `J2 [n2, ..]`.
    pub fn cross(n1: usize, n2: usize, outputs: usize, params: usize, mode: NtkMode) -> Self {
        GramShape { n1, n2, outputs, params, mode, symmetric: false }
    }

    /// The output shape (see [`NtkMode`]).
    pub fn output_shape(&self) -> Vec<usize> {
        self.mode.output_shape(self.n1, self.n2, self.outputs)
    }

    /// Checks the shape and returns the GEMM geometry it maps to.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `n1`, `n2` or `outputs`, or a symmetric shape with
    /// `n2 ≠ n1`; [`Error::TooLarge`] when `J` or the output overflows, the output exceeds
    /// [`MAX_OUTPUT`] elements, or the GEMM exceeds [`crate::gemm::GemmShape::extents`]'s
    /// limits.
    pub(crate) fn geometry(&self) -> Result<ModeGeometry> {
        for (arg, v) in [("n1", self.n1), ("n2", self.n2), ("outputs", self.outputs)] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be at least 1"));
            }
        }
        if self.symmetric && self.n2 != self.n1 {
            return Err(Error::invalid("n2", "a symmetric contraction needs n2 == n1"));
        }
        for (arg, n) in [("j1", self.n1), ("j2", self.n2)] {
            checked_numel::<f32>(arg, &[n, self.outputs, self.params])?;
        }
        let out = checked_numel::<f32>("out", &self.output_shape())?;
        if out > MAX_OUTPUT {
            return Err(Error::too_large("out", format!("{out} elements exceed {MAX_OUTPUT}")));
        }
        let g = mode_geometry(self.mode, self.n1, self.n2, self.outputs, self.params)?;
        g.gemm_shape(self.symmetric).validate()?;
        Ok(g)
    }

    /// Checks the shape: zero `n1`, `n2` or `outputs` and a symmetric `n2 ≠ n1` are
    /// invalid; `J`, the output (at most [`MAX_OUTPUT`] elements) and the GEMM (see
    /// [`crate::gemm::GemmShape::extents`]) must fit.
    ///
    /// # Errors
    /// As described there.
    pub fn validate(&self) -> Result<()> {
        self.geometry().map(|_| ())
    }
}

/// A planned Jacobian contraction: [`GramPlan::new`] validates the shape, chooses the GEMM
/// geometry and split-K and allocates every workspace once; [`GramPlan::run`] (symmetric) or
/// [`GramPlan::run_cross`] only launches.
///
/// Cost: `Full` is one GEMM over rows `N·O` (`2·N1·N2·O²·P` FLOPs); `Trace` is one GEMM over
/// rows `N` with depth `O·P` (`2·N1·N2·O·P`), never forming the off-diagonal output blocks;
/// `Diagonal` is `O` batched GEMMs of depth `P` (same FLOPs as `Trace`); `Pseudo` sums `J` over
/// `O` first (one pass over `J`) and then does one GEMM of depth `P` (`2·N1·N2·P`). The
/// symmetric case computes only the 128×128 tiles on or above the diagonal (about half).
///
/// Workspace: the GEMM's `splits × output` f32 partials (see [`crate::gemm`]), plus
/// `(N1 + N2)·P` f32 (`N1·P` when symmetric) for `Pseudo`.
#[derive(Debug)]
pub struct GramPlan {
    device: Device,
    shape: GramShape,
    geometry: ModeGeometry,
    gemm: GemmPlan,
    sums: Option<(CudaSlice<f32>, Option<CudaSlice<f32>>)>,
}

impl GramPlan {
    /// Plans the contraction `shape` at `precision` on `device`.
    ///
    /// # Errors
    /// As [`GramShape::validate`] and [`GemmPlan::new`].
    pub fn new(device: &Device, shape: &GramShape, precision: Precision) -> Result<Self> {
        let geometry = shape.geometry()?;
        let gemm = GemmPlan::new(device, &geometry.gemm_shape(shape.symmetric), precision)?;
        let sums = if geometry.presum {
            let alloc = |n: usize| device.stream().alloc_zeros::<f32>(n.saturating_mul(shape.params).max(1));
            Some((alloc(shape.n1)?, if shape.symmetric { None } else { Some(alloc(shape.n2)?) }))
        } else {
            None
        };
        Ok(GramPlan { device: device.clone(), shape: *shape, geometry, gemm, sums })
    }

    /// The planned shape.
    pub fn shape(&self) -> &GramShape {
        &self.shape
    }

    /// The output shape (see [`NtkMode`]).
    pub fn output_shape(&self) -> Vec<usize> {
        self.shape.output_shape()
    }

    /// The precision.
    pub fn precision(&self) -> Precision {
        self.gemm.precision()
    }

    /// The number of split-K partitions of the contraction depth the plan uses.
    pub fn splits(&self) -> usize {
        self.gemm.splits()
    }

    /// Bytes of device workspace the plan holds.
    pub fn workspace_bytes(&self) -> usize {
        let sums = self.sums.as_ref().map_or(0, |(a, b)| a.len() + b.as_ref().map_or(0, |b| b.len()));
        self.gemm.workspace_bytes() + sums * 4
    }

    /// Runs a symmetric plan: `out = Θ(J, J)` for `j [n1, outputs, params]` (`f32` or `bf16`)
    /// into `out` (shape [`GramPlan::output_shape`], `f32`).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `j1` or `out` (shape or length); [`Error::InvalidArgument`] for
    /// a cross plan or f16 storage; [`Error::DeviceMismatch`] for a tensor of another device.
    /// Nothing is written on error.
    pub fn run<T: Float>(&mut self, j: &impl TensorRef<T>, out: &mut impl TensorMut<f32>) -> Result<()> {
        if !self.shape.symmetric {
            return Err(Error::invalid("j2", "the plan is for a cross kernel; use run_cross"));
        }
        self.check("j1", j, self.shape.n1)?;
        self.device.check_buffer("out", out, &self.output_shape())?;
        self.run_views(j.cuda_view(), None, out.cuda_view_mut())
    }

    /// Runs a cross plan: `out = Θ(J1, J2)` for `j1 [n1, outputs, params]` and
    /// `j2 [n2, outputs, params]` of one storage type.
    ///
    /// # Errors
    /// As [`GramPlan::run`], naming `j2` too; [`Error::InvalidArgument`] for a symmetric plan.
    pub fn run_cross<T: Float>(
        &mut self,
        j1: &impl TensorRef<T>,
        j2: &impl TensorRef<T>,
        out: &mut impl TensorMut<f32>,
    ) -> Result<()> {
        if self.shape.symmetric {
            return Err(Error::invalid("j2", "the plan is symmetric (J2 = J1); use run"));
        }
        self.check("j1", j1, self.shape.n1)?;
        self.check("j2", j2, self.shape.n2)?;
        self.device.check_buffer("out", out, &self.output_shape())?;
        self.run_views(j1.cuda_view(), Some(j2.cuda_view()), out.cuda_view_mut())
    }

    fn check<T: Float>(&self, arg: &'static str, j: &impl TensorRef<T>, n: usize) -> Result<()> {
        check_dtype::<T>(arg)?;
        self.device.check_buffer(arg, j, &[n, self.shape.outputs, self.shape.params])
    }

    fn run_views<T: Float>(
        &mut self,
        j1: CudaView<'_, T>,
        j2: Option<CudaView<'_, T>>,
        mut out: CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let GramShape { n1, n2, outputs: o, params: p, .. } = self.shape;
        let g = self.geometry;
        match &mut self.sums {
            Some((s1, s2)) => {
                gpu::presum(&self.device, &j1, n1, o, p, &mut s1.as_view_mut())?;
                if let (Some(j2), Some(s2)) = (&j2, s2.as_mut()) {
                    gpu::presum(&self.device, j2, n2, o, p, &mut s2.as_view_mut())?;
                }
                let s2v = s2.as_ref().map(|s| s.as_view());
                self.gemm.launch_partials(&s1.as_view(), s2v.as_ref())?;
            }
            None => self.gemm.launch_partials(&j1, j2.as_ref())?,
        }
        gpu::reduce(&self.device, self.gemm.split(), self.gemm.partials(), g.layout, g.scale, &mut out)
    }
}

/// One call: plans and runs the symmetric contraction `Θ(J, J)` of `j [N, O, P]`, returning a
/// new `f32` tensor of [`NtkMode::output_shape`].
///
/// # Errors
/// [`Error::Shape`] unless `j` has three axes; as [`GramPlan::new`] and [`GramPlan::run`].
pub fn gram<T: Float>(
    device: &Device,
    j: &impl TensorRef<T>,
    mode: NtkMode,
    precision: Precision,
) -> Result<DeviceTensor<f32>> {
    let [n, o, p] = three_axes("j1", j.shape())?;
    let mut plan = GramPlan::new(device, &GramShape::symmetric(n, o, p, mode), precision)?;
    let mut out = DeviceTensor::zeros(device, &plan.output_shape())?;
    plan.run(j, &mut out)?;
    Ok(out)
}

/// One call: plans and runs the cross contraction `Θ(J1, J2)`.
///
/// # Errors
/// As [`gram`], naming `j2` too.
pub fn gram_cross<T: Float>(
    device: &Device,
    j1: &impl TensorRef<T>,
    j2: &impl TensorRef<T>,
    mode: NtkMode,
    precision: Precision,
) -> Result<DeviceTensor<f32>> {
    let [n1, o, p] = three_axes("j1", j1.shape())?;
    let [n2, ..] = three_axes("j2", j2.shape())?;
    let mut plan = GramPlan::new(device, &GramShape::cross(n1, n2, o, p, mode), precision)?;
    let mut out = DeviceTensor::zeros(device, &plan.output_shape())?;
    plan.run_cross(j1, j2, &mut out)?;
    Ok(out)
}

fn three_axes(arg: &'static str, s: &[usize]) -> Result<[usize; 3]> {
    match *s {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(Error::shape(arg, &[0, 0, 0], s)),
    }
}

/// One dense layer's factors on the device: inputs `a [N, T, d_in]`, cotangents
/// `g [N, T, O, d_out]` (`g[i,t,a,:] = ∂f_a(x_i)/∂z_t` for `z_t = W·a_t + b`), and whether the
/// layer has a bias (`β = 1`).
#[derive(Clone, Copy, Debug)]
pub struct FactoredLayer<'a> {
    /// `[N, T, d_in]`, f32.
    pub a: &'a DeviceTensor<f32>,
    /// `[N, T, O, d_out]`, f32.
    pub g: &'a DeviceTensor<f32>,
    /// Whether the layer has a bias.
    pub bias: bool,
}

fn factored_dims(device: &Device, arg: &'static str, layers: &[FactoredLayer<'_>]) -> Result<(usize, usize, usize)> {
    let first = layers.first().ok_or_else(|| Error::invalid(arg, "need at least one layer"))?;
    let (a, g) = (first.a.shape(), first.g.shape());
    if a.len() != 3 || g.len() != 4 {
        return Err(Error::shape(arg, &[0, 0, 0, 0], g));
    }
    let (n, t, o) = (a[0], a[1], g[2]);
    for l in layers {
        device.check_tensor(arg, l.a)?;
        device.check_tensor(arg, l.g)?;
        let (sa, sg) = (l.a.shape(), l.g.shape());
        if sa.len() != 3 || sa[0] != n || sa[1] != t || sa[2] == 0 {
            return Err(Error::shape(arg, &[n, t, sa.get(2).copied().unwrap_or(0)], sa));
        }
        if sg.len() != 4 || sg[0] != n || sg[1] != t || sg[2] != o || sg[3] == 0 {
            return Err(Error::shape(arg, &[n, t, o, sg.get(3).copied().unwrap_or(0)], sg));
        }
    }
    if n == 0 || t == 0 || o == 0 {
        return Err(Error::invalid(arg, "N, T and O must be positive"));
    }
    Ok((n, t, o))
}

/// How one mode of the factored NTK uses a layer's cotangents `G [N, T, O, d_out]` (pure:
/// shared by [`factored_ntk`] and the CPU emulation in the tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FactoredGeometry {
    /// Cotangent-Gram rows per `(sample, t)`: `O` (rows `(i, t, a)`) or 1.
    pub rows_per_slot: usize,
    /// Cotangent-Gram depth: `d_out`, or `O·d_out` for `Trace` (`Σ_a` folded into the dot).
    pub depth: usize,
    /// The combine kernel's `e`: output entries per side of a sample pair (`O` or 1).
    pub e: usize,
    /// `Diagonal`: only `a = b` of the `e × e` block.
    pub diagonal: bool,
    /// The Gram is over the `O`-summed cotangents (`Pseudo`).
    pub presum: bool,
    pub scale: f32,
}

pub(crate) fn factored_geometry(mode: NtkMode, o: usize, dout: usize) -> FactoredGeometry {
    let per_output =
        FactoredGeometry { rows_per_slot: o, depth: dout, e: o, diagonal: false, presum: false, scale: 1.0 };
    let scalar = FactoredGeometry { rows_per_slot: 1, e: 1, ..per_output };
    match mode {
        NtkMode::Full => per_output,
        NtkMode::Diagonal => FactoredGeometry { diagonal: true, ..per_output },
        NtkMode::Trace { divide_by_outputs } => {
            FactoredGeometry { depth: o * dout, scale: if divide_by_outputs { 1.0 / o as f32 } else { 1.0 }, ..scalar }
        }
        NtkMode::Pseudo => FactoredGeometry { presum: true, ..scalar },
    }
}

/// The factored (structured-derivative) NTK of dense layers, on the GPU, never forming `J`:
/// `Θ[i,j,a,b] = Σ_l Σ_{t,s} (⟨A_l[i,t], A_l[j,s]⟩ + β_l)·⟨G_l[i,t,a], G_l[j,s,b]⟩`, contracted
/// per `mode` like [`gram_cross`] on the explicit Jacobian of the same layers (`β_l = 1` for a
/// layer with a bias, else 0). This is exact: a dense layer `z_t = W·a_t + b` shared over `t`
/// has `∂f_a/∂W = Σ_t G[t,a]·A[t]ᵀ` and `∂f_a/∂b = Σ_t G[t,a]`, so the Jacobian inner product
/// of two samples factors into the input Gram times the cotangent Gram.
///
/// Per layer it computes the input Gram `A·Aᵀ` over `d_in` (rows `N·T`) and the cotangent
/// Gram over `d_out` (rows `N·T·O` for `Full` and `Diagonal`; rows `N·T` with depth
/// `O·d_out` for `Trace`; the `O`-summed cotangents for `Pseudo`) with the GEMM at
/// `precision`, then combines them elementwise (`T = 1`: the Hadamard form
/// `(AAᵀ + β) ⊙ (GGᵀ)`; `T > 1`: the sum over `t, s`), adding the layers in order
/// (deterministic). `layers2 = None` is the symmetric case.
///
/// Train-mode BatchNorm couples samples and is not a dense layer: it cannot be expressed here.
///
/// # Errors
/// [`Error::InvalidArgument`] for no layers or zero sizes; [`Error::Shape`] when the layers
/// disagree on `N`, `T`, `O` or the two sides on widths; [`Error::DeviceMismatch`] for a
/// tensor of another device.
pub fn factored_ntk(
    device: &Device,
    layers1: &[FactoredLayer<'_>],
    layers2: Option<&[FactoredLayer<'_>]>,
    mode: NtkMode,
    precision: Precision,
) -> Result<DeviceTensor<f32>> {
    let (n1, t, o) = factored_dims(device, "layers1", layers1)?;
    let n2 = match layers2 {
        Some(l2) => {
            let (n2, t2, o2) = factored_dims(device, "layers2", l2)?;
            check_shape("layers2", &[t, o], &[t2, o2])?;
            check_shape("layers2", &[layers1.len()], &[l2.len()])?;
            for (x, y) in layers1.iter().zip(l2) {
                check_shape("layers2", &[x.a.shape()[2], x.g.shape()[3]], &[y.a.shape()[2], y.g.shape()[3]])?;
                if x.bias != y.bias {
                    return Err(Error::invalid("layers2", "bias flags differ between the two sides"));
                }
            }
            n2
        }
        None => n1,
    };
    let shape = mode.output_shape(n1, n2, o);
    let mut out = DeviceTensor::<f32>::zeros(device, &shape)?;
    for (l, x) in layers1.iter().enumerate() {
        let y = layers2.map(|l2| &l2[l]);
        let din = x.a.shape()[2];
        let dout = x.g.shape()[3];
        let ya = y.map(|y| y.a.cuda_view());
        let aa = gpu::matmul_abt(device, &x.a.cuda_view(), n1 * t, ya.as_ref().map(|v| (v, n2 * t)), din, precision)?;
        let fg = factored_geometry(mode, o, dout);
        let (r1, r2) = (n1 * t * fg.rows_per_slot, n2 * t * fg.rows_per_slot);
        let gg = if fg.presum {
            let sum = |g: &DeviceTensor<f32>, n: usize| -> Result<CudaSlice<f32>> {
                let mut s = device.stream().alloc_zeros::<f32>(n * t * dout)?;
                gpu::presum(device, &g.cuda_view(), n * t, o, dout, &mut s.as_view_mut())?;
                Ok(s)
            };
            let s1 = sum(x.g, n1)?;
            let s2 = y.map(|y| sum(y.g, n2)).transpose()?;
            let s2v = s2.as_ref().map(|s| s.as_view());
            gpu::matmul_abt(device, &s1.as_view(), r1, s2v.as_ref().map(|v| (v, r2)), fg.depth, precision)?
        } else {
            let yg = y.map(|y| y.g.cuda_view());
            gpu::matmul_abt(device, &x.g.cuda_view(), r1, yg.as_ref().map(|v| (v, r2)), fg.depth, precision)?
        };
        let beta = if x.bias { 1.0 } else { 0.0 };
        let mut ov = out.cuda_view_mut();
        let step = gpu::Combine { n1, n2, t, e: fg.e, diagonal: fg.diagonal, beta, scale: fg.scale, accumulate: l > 0 };
        gpu::combine(device, &step, &aa, &gg, &mut ov)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The host-side geometry of every mode, run end to end through the CPU emulation of the
    //! kernels' index arithmetic (tiles, splits, partials, reduction layouts, combine).
    use super::gpu::emulate;
    use super::*;
    use crate::rng::Rng;

    const MODES: [NtkMode; 5] = NtkMode::ALL;

    fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    #[test]
    fn every_mode_through_the_emulated_launches_matches_the_reference() {
        let mut rng = Rng::new(17);
        // (n1, n2 or symmetric, o, p, slots): several row tiles, splits > 1, odd sizes.
        let cases = [
            (3usize, Some(5usize), 2usize, 7usize, 132usize),
            (70, None, 3, 40, 132),
            (130, Some(20), 1, 33, 132),
            (45, None, 4, 300, 4),
            (9, Some(140), 2, 64, 2),
        ];
        for &(n1, n2, o, p, slots) in &cases {
            let n2v = n2.unwrap_or(n1);
            let j1 = rng.normal_vec(n1 * o * p);
            let j2 = rng.normal_vec(n2v * o * p);
            for mode in MODES {
                let g = mode_geometry(mode, n1, n2v, o, p).unwrap();
                assert_eq!(g.batch * g.m1 * g.m2, mode.output_shape(n1, n2v, o).iter().product::<usize>());
                let (a, b) = if g.presum {
                    (emulate::presum(&j1, n1, o, p), emulate::presum(&j2, n2v, o, p))
                } else {
                    (j1.clone(), j2.clone())
                };
                let shape = g.gemm_shape(n2.is_none());
                let (split, part) = emulate::gemm(slots, &shape, &a, n2.map(|_| b.as_slice()));
                let got = emulate::reduce(&split, &part, g.layout, g.scale);
                let want = cpu::gram(&j1, n2.map(|_| j2.as_slice()), n1, n2v, o, p, mode).unwrap();
                let e = rel_l2(&got, &want);
                assert!(e < 1e-5, "{mode:?} n1={n1} n2={n2:?} o={o} p={p} splits={}: rel L2 {e:e}", split.splits);
            }
        }
    }

    #[test]
    fn factored_modes_through_the_emulated_launches_match_the_reference() {
        let mut rng = Rng::new(19);
        for &(n1, n2, t, o, slots) in
            &[(5usize, Some(3usize), 1usize, 3usize, 132usize), (7, None, 2, 2, 3), (50, None, 1, 3, 132)]
        {
            let n2v = n2.unwrap_or(n1);
            let dims = [(6usize, 9usize, true), (9, 4, false)];
            let h1: Vec<(Vec<f32>, Vec<f32>)> = dims
                .iter()
                .map(|&(di, d_o, _)| (rng.normal_vec(n1 * t * di), rng.normal_vec(n1 * t * o * d_o)))
                .collect();
            let h2: Vec<(Vec<f32>, Vec<f32>)> = dims
                .iter()
                .map(|&(di, d_o, _)| (rng.normal_vec(n2v * t * di), rng.normal_vec(n2v * t * o * d_o)))
                .collect();
            let side2 = if n2.is_some() { &h2 } else { &h1 };
            for mode in MODES {
                let mut out = vec![0.0f32; mode.output_shape(n1, n2v, o).iter().product()];
                for (l, &(din, dout, bias)) in dims.iter().enumerate() {
                    let (a1, g1) = &h1[l];
                    let (a2, g2) = &side2[l];
                    let other_a = n2.map(|_| (a2.as_slice(), n2v * t));
                    let aa = emulate::matmul_abt(slots, a1, n1 * t, other_a, din);
                    let fg = factored_geometry(mode, o, dout);
                    let (s1, s2) = if fg.presum {
                        (emulate::presum(g1, n1 * t, o, dout), emulate::presum(g2, n2v * t, o, dout))
                    } else {
                        (g1.clone(), g2.clone())
                    };
                    let other_g = n2.map(|_| (s2.as_slice(), n2v * t * fg.rows_per_slot));
                    let gg = emulate::matmul_abt(slots, &s1, n1 * t * fg.rows_per_slot, other_g, fg.depth);
                    let beta = if bias { 1.0 } else { 0.0 };
                    let step = gpu::Combine {
                        n1,
                        n2: n2v,
                        t,
                        e: fg.e,
                        diagonal: fg.diagonal,
                        beta,
                        scale: fg.scale,
                        accumulate: l > 0,
                    };
                    emulate::combine(&step, &aa, &gg, &mut out);
                }
                let (c1, c2) =
                    (cpu::FactoredLayer::from_factors(&h1, &dims), cpu::FactoredLayer::from_factors(side2, &dims));
                let want = cpu::factored_ntk(&c1, n2.map(|_| c2.as_slice()), n1, n2v, t, o, mode).unwrap();
                let e = rel_l2(&out, &want);
                assert!(e < 1e-5, "factored {mode:?} n1={n1} n2={n2:?} t={t}: rel L2 {e:e}");
            }
        }
    }
}
