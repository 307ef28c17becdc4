//! NTK Jacobian contractions (SPEC §6): the empirical NTK from per-sample Jacobians, the
//! factored (structured-derivative) MLP NTK that never materializes `J`, an MLP helper, the
//! linearized model, and metrics on an `[N, N]` kernel.
//!
//! # What runs where
//! - [`Gram`] / [`gram`]: Jacobian contractions on the GPU (tiled 128×128×32 GEMM kernels:
//!   FFMA with an 8×8 register tile for [`Precision::F32`], inline-PTX `mma.sync` tensor cores
//!   for [`Precision::Tf32`] (`m16n8k8`) and [`Precision::Bf16`] (`m16n8k16`), fp32
//!   accumulation; split-K over `P` into f32 partials summed in split order by a second
//!   kernel, so results are bit-identical run to run). Inputs whose rows are 16-byte
//!   multiples and already in the mma's type (f32 for Tf32, bf16 for Bf16) stream through a
//!   3–4 stage `cp.async` pipeline (4 warps of 64×64 per block, two blocks per SM); other
//!   inputs go through a register-staged double buffer
//!   that converts on the fly (f32 → bf16 with round-to-nearest-even, f32 → tf32 to nearest
//!   with ties away from zero, `cvt.rna`'s rule).
//! - [`factored_ntk`], [`Mlp::empirical_ntk`], [`Mlp::linearized`]: GPU (the same GEMM
//!   kernels plus small elementwise kernels).
//! - [`metrics`]: trace, Frobenius norm, mean, LGA and the alignments are GPU reductions
//!   (per-block `f64` partial sums, then one block sums them in a fixed order); eigenvalues,
//!   the condition number and NTK regression copy the kernel to the host and run in `f64` on
//!   the CPU (O(N³), fine for N ≤ 4096).
//! - [`cpu`]: the `f64` reference of everything, which the tests compare against.
//!
//! # Layouts
//! Per-sample Jacobians are `J [N, O, P]` row-major (`J[i,a,p] = ∂f_a(x_i)/∂θ_p`). Outputs
//! are `f32`: `Full` `[N1, N2, O, O]`, `Trace` and `Pseudo` `[N1, N2]`, `Diagonal`
//! `[N1, N2, O]`.
//!
//! # Precision and tolerances (against the `f64` reference, relative L2 over the output)
//! - `F32`: exact fp32 FMA, ≤ 1e-5.
//!
//! `tests/ntk_gpu.rs` checks every bound above against the `f64` reference.
//! - `Tf32`: inputs rounded to tf32 (10-bit mantissa, `cvt.rna`'s rule: at most 2⁻¹¹
//!   relative per input), fp32 accumulation: ≤ 2e-3 (what the tests assert, on random data;
//!   the typical error there is a few 1e-4).
//! - `Bf16`: `J` stored as bf16 (`half::bf16`) is used as is; `J` stored as `f32` is rounded to
//!   bf16 on the fly when staged into shared memory. fp32 accumulation. Against the reference
//!   on the bf16 values: ≤ 2e-3 (SPEC's bf16 GEMM bar); against the unrounded f32 input:
//!   ≤ 1e-2 (each input carries 2⁻⁹ relative rounding).

pub mod cpu;

/// How the `[N1, N2, O, O]` kernel is contracted over the output axes.
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

/// The arithmetic of a contraction. All accumulate in fp32.
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
    /// `f32`, `tf32` or `bf16`: the dtype string of the bench tables.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The relative-L2 bound against the `f64` reference of the values the kernel reads
    /// (documented at module level).
    pub fn rel_l2_bound(self) -> f64 {
        match self {
            Precision::F32 => 1e-5,
            Precision::Tf32 | Precision::Bf16 => 2e-3,
        }
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

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::error::{check_shape, Error, Result};
use crate::tensor::{DType, DeviceTensor, Float};
use gpu::{GemmPlan, Operand, ReduceLayout, Scratch};

fn check_dtype<T: Float>(arg: &'static str) -> Result<()> {
    if T::DTYPE == DType::F16 {
        return Err(Error::invalid(arg, "f16 storage is not supported; use f32 or bf16"));
    }
    Ok(())
}

/// How one contraction mode maps onto the split-K GEMM `C_z = A_z·B_zᵀ` over `J` (pure: the
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

/// The GEMM geometry of `mode` for `J1 [n1, o, p]`, `J2 [n2, o, p]`:
/// - `Full`: rows `(i, a)` of `J` as they lie (`N·O` rows of `P`), output `[N1, N2, O, O]`;
/// - `Trace`: rows `i` of depth `O·P` (`Σ_a Σ_p` is one dot product of a sample's whole slab);
/// - `Diagonal`: `O` batched GEMMs, batch `a` reading rows `i` at stride `O·P` from offset `a·P`;
/// - `Pseudo`: rows of the `O`-summed `J` (`[N, P]`).
///
/// # Errors
/// [`Error::TooLarge`] when a size overflows.
pub(crate) fn mode_geometry(mode: NtkMode, n1: usize, n2: usize, o: usize, p: usize) -> Result<ModeGeometry> {
    let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| Error::too_large("o", "size overflows"));
    let op = mul(o, p)?;
    Ok(match mode {
        NtkMode::Full => ModeGeometry {
            m1: mul(n1, o)?,
            m2: mul(n2, o)?,
            k: p,
            batch: 1,
            row_stride: p,
            batch_stride: 0,
            presum: false,
            layout: ReduceLayout::Full { n2, o },
            scale: 1.0,
        },
        NtkMode::Trace { divide_by_outputs } => ModeGeometry {
            m1: n1,
            m2: n2,
            k: op,
            batch: 1,
            row_stride: op,
            batch_stride: 0,
            presum: false,
            layout: ReduceLayout::Plain,
            scale: if divide_by_outputs { 1.0 / o as f32 } else { 1.0 },
        },
        NtkMode::Diagonal => ModeGeometry {
            m1: n1,
            m2: n2,
            k: p,
            batch: o,
            row_stride: op,
            batch_stride: p,
            presum: false,
            layout: ReduceLayout::Diagonal { n2, o },
            scale: 1.0,
        },
        NtkMode::Pseudo => ModeGeometry {
            m1: n1,
            m2: n2,
            k: p,
            batch: 1,
            row_stride: p,
            batch_stride: 0,
            presum: true,
            layout: ReduceLayout::Plain,
            scale: 1.0,
        },
    })
}

/// A planned Jacobian contraction (FlashInfer-style: [`Gram::plan`] validates the shapes and
/// chooses the GEMM geometry and split-K once; [`Gram::run`] launches, reusing its workspace).
///
/// Cost: `Full` is one GEMM over rows `N·O` (`2·N1·N2·O²·P` FLOPs); `Trace` is one GEMM over
/// rows `N` with depth `O·P` (`2·N1·N2·O·P`), never forming the off-diagonal output blocks;
/// `Diagonal` is `O` batched GEMMs of depth `P` (same FLOPs as `Trace`); `Pseudo` sums `J` over
/// `O` first (one pass over `J`) and then does one GEMM of depth `P` (`2·N1·N2·P`). The
/// symmetric case computes only the 128×128 tiles on or above the diagonal (about half).
///
/// Workspace: `splits × (output rows × output columns)` f32 partials, with `splits` chosen
/// to fill the GPU's SMs and capped at 1 GiB of partials (see [`Gram::workspace_bytes`]), plus
/// `(N1 + N2)·P` f32 for `Pseudo`. `P` is streamed, so any `P` that fits `J` works.
#[derive(Debug)]
pub struct Gram {
    n1: usize,
    n2: usize,
    o: usize,
    p: usize,
    mode: NtkMode,
    precision: Precision,
    symmetric: bool,
    geometry: ModeGeometry,
    plan: GemmPlan,
    scratch: ScratchDebug,
}

#[derive(Default)]
struct ScratchDebug(Scratch, Option<CudaSlice<f32>>, Option<CudaSlice<f32>>);

impl std::fmt::Debug for ScratchDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workspace({} bytes)", self.0.bytes())
    }
}

impl Gram {
    /// Plans `Θ = J1·J2ᵀ` contracted per `mode`, for `J1 [n1, o, p]` and `J2 [n2, o, p]`;
    /// `n2 = None` plans the symmetric case `J2 = J1` (one triangle computed).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `n1`, `n2` or `o` (`p = 0` is allowed and gives
    /// zeros); [`Error::TooLarge`] when a dimension exceeds the kernels' index types.
    pub fn plan(
        dev: &Device,
        n1: usize,
        n2: Option<usize>,
        o: usize,
        p: usize,
        mode: NtkMode,
        precision: Precision,
    ) -> Result<Self> {
        if n1 == 0 {
            return Err(Error::invalid("n1", "need at least one sample"));
        }
        if n2 == Some(0) {
            return Err(Error::invalid("n2", "need at least one sample"));
        }
        if o == 0 {
            return Err(Error::invalid("o", "need at least one output"));
        }
        let symmetric = n2.is_none();
        let n2v = n2.unwrap_or(n1);
        let geometry = mode_geometry(mode, n1, n2v, o, p)?;
        let g = &geometry;
        let plan = GemmPlan::new(gpu::gemm_slots(dev, precision), g.m1, g.m2, g.k, g.batch, symmetric)?;
        let out: usize =
            mode.output_shape(n1, n2v, o).iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX);
        crate::error::to_u32("output", out)?;
        Ok(Gram { n1, n2: n2v, o, p, mode, precision, symmetric, geometry, plan, scratch: ScratchDebug::default() })
    }

    /// The output shape (see [`NtkMode`]).
    pub fn output_shape(&self) -> Vec<usize> {
        self.mode.output_shape(self.n1, self.n2, self.o)
    }

    /// The number of split-K partitions of `P` the plan uses.
    pub fn splits(&self) -> usize {
        self.plan.splits
    }

    /// Bytes of device workspace a run allocates (once, then reused).
    pub fn workspace_bytes(&self) -> usize {
        let pseudo = if self.mode == NtkMode::Pseudo {
            (self.n1 + if self.symmetric { 0 } else { self.n2 }) * self.p
        } else {
            0
        };
        (self.plan.partial_elems() + pseudo) * 4
    }

    /// Runs the contraction into `out` (shape [`Gram::output_shape`], f32).
    ///
    /// `j1 [n1, o, p]` and, unless the plan is symmetric, `j2 [n2, o, p]`, both `f32` or `bf16`
    /// (see the module docs for how each precision reads each dtype).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `j1`, `j2` or `out`; [`Error::InvalidArgument`] for `j2` given to
    /// a symmetric plan or missing from a cross plan, or for f16 storage. Nothing is written
    /// on error.
    pub fn run<T: Float>(
        &mut self,
        dev: &Device,
        j1: &DeviceTensor<T>,
        j2: Option<&DeviceTensor<T>>,
        out: &mut DeviceTensor<f32>,
    ) -> Result<()> {
        check_dtype::<T>("j1")?;
        check_shape("j1", &[self.n1, self.o, self.p], j1.shape())?;
        match (j2, self.symmetric) {
            (Some(_), true) => return Err(Error::invalid("j2", "the plan is symmetric (J2 = J1); pass None")),
            (None, false) => return Err(Error::invalid("j2", "the plan is for a cross kernel; pass J2")),
            (Some(j), false) => check_shape("j2", &[self.n2, self.o, self.p], j.shape())?,
            (None, true) => {}
        }
        check_shape("out", &self.output_shape(), out.shape())?;
        let (n1, n2, o, p) = (self.n1, self.n2, self.o, self.p);
        let g = self.geometry;
        let plan = self.plan.clone();
        let precision = self.precision;
        let ScratchDebug(scratch, sum1, sum2) = &mut self.scratch;
        let partials = scratch.get(dev, plan.partial_elems())?;
        fn operand<'a>(g: &ModeGeometry, data: &'a CudaSlice<f32>, rows: usize) -> Operand<'a, f32> {
            Operand { data, rows, row_stride: g.row_stride, batch_stride: g.batch_stride }
        }
        if g.presum {
            for (j, n, sum) in [(Some(j1), n1, &mut *sum1), (j2, n2, &mut *sum2)] {
                let Some(j) = j else { continue };
                let need = (n * p).max(1);
                if sum.as_ref().map_or(true, |s| s.len() != need) {
                    *sum = Some(dev.stream().alloc_zeros::<f32>(need)?);
                }
                let s = sum.as_mut().ok_or_else(|| Error::invalid("workspace", "allocation vanished"))?;
                gpu::presum(dev, j.slice(), n, o, p, s)?;
            }
            let s1 = sum1.as_ref().ok_or_else(|| Error::invalid("workspace", "allocation vanished"))?;
            let a = operand(&g, s1, g.m1);
            let b = match (j2, sum2.as_ref()) {
                (Some(_), Some(s2)) => Some(operand(&g, s2, g.m2)),
                _ => None,
            };
            gpu::gemm(dev, &plan, &a, b.as_ref(), precision, partials)?;
        } else {
            let a = Operand { data: j1.slice(), rows: g.m1, row_stride: g.row_stride, batch_stride: g.batch_stride };
            let b = j2.map(|j| Operand {
                data: j.slice(),
                rows: g.m2,
                row_stride: g.row_stride,
                batch_stride: g.batch_stride,
            });
            gpu::gemm(dev, &plan, &a, b.as_ref(), precision, partials)?;
        }
        gpu::reduce(dev, &plan, partials, g.layout, g.scale, out.slice_mut())
    }
}

/// One call: plans and runs a Jacobian contraction, returning a new `f32` tensor.
/// `j2 = None` is the symmetric case `J2 = J1`.
///
/// # Errors
/// As [`Gram::plan`] and [`Gram::run`].
pub fn gram<T: Float>(
    dev: &Device,
    j1: &DeviceTensor<T>,
    j2: Option<&DeviceTensor<T>>,
    mode: NtkMode,
    precision: Precision,
) -> Result<DeviceTensor<f32>> {
    let s = j1.shape();
    if s.len() != 3 {
        return Err(Error::shape("j1", &[0, 0, 0], s));
    }
    let n2 = match j2 {
        Some(j) => {
            if j.shape().len() != 3 {
                return Err(Error::shape("j2", &[0, s[1], s[2]], j.shape()));
            }
            Some(j.shape()[0])
        }
        None => None,
    };
    let mut plan = Gram::plan(dev, s[0], n2, s[1], s[2], mode, precision)?;
    let mut out = DeviceTensor::zeros(dev, &plan.output_shape())?;
    plan.run(dev, j1, j2, &mut out)?;
    Ok(out)
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

fn factored_dims(arg: &'static str, layers: &[FactoredLayer<'_>]) -> Result<(usize, usize, usize)> {
    let first = layers.first().ok_or_else(|| Error::invalid(arg, "need at least one layer"))?;
    let a = first.a.shape();
    let g = first.g.shape();
    if a.len() != 3 || g.len() != 4 {
        return Err(Error::shape(arg, &[0, 0, 0, 0], g));
    }
    let (n, t, o) = (a[0], a[1], g[2]);
    for l in layers {
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
    match mode {
        NtkMode::Full | NtkMode::Diagonal => FactoredGeometry {
            rows_per_slot: o,
            depth: dout,
            e: o,
            diagonal: mode == NtkMode::Diagonal,
            presum: false,
            scale: 1.0,
        },
        NtkMode::Trace { divide_by_outputs } => FactoredGeometry {
            rows_per_slot: 1,
            depth: o * dout,
            e: 1,
            diagonal: false,
            presum: false,
            scale: if divide_by_outputs { 1.0 / o as f32 } else { 1.0 },
        },
        NtkMode::Pseudo => {
            FactoredGeometry { rows_per_slot: 1, depth: dout, e: 1, diagonal: false, presum: true, scale: 1.0 }
        }
    }
}

/// The factored (structured-derivative) NTK of dense layers, on the GPU, never forming `J`:
/// `Θ[i,j,a,b] = Σ_l Σ_{t,s} (A_l[i,t]·A_l[j,s] + β_l)·(G_l[i,t,a]·G_l[j,s,b])` (SPEC §6),
/// contracted per `mode` like [`gram`] on the explicit Jacobian of the same layers.
///
/// Per layer it computes the input Gram `A·Aᵀ` over `d_in` (rows `N·T`) and the cotangent
/// Gram over `d_out` (rows `N·T·O` for `Full` and `Diagonal`; rows `N·T` with depth
/// `O·d_out` for `Trace`; the `O`-summed cotangents for `Pseudo`) with the GEMM kernels at
/// `precision`, then combines them elementwise (`T = 1`: the Hadamard form
/// `(AAᵀ + β) ⊙ (GGᵀ)`; `T > 1`: the sum over `t, s`, i.e. the Frobenius form), adding the
/// layers in order (deterministic). `layers2 = None` is the symmetric case.
///
/// Train-mode BatchNorm couples samples and is not a dense layer: it cannot be expressed here.
///
/// # Errors
/// [`Error::InvalidArgument`] for no layers or zero sizes; [`Error::Shape`] when the layers
/// disagree on `N`, `T`, `O` or the two sides on widths.
pub fn factored_ntk(
    dev: &Device,
    layers1: &[FactoredLayer<'_>],
    layers2: Option<&[FactoredLayer<'_>]>,
    mode: NtkMode,
    precision: Precision,
) -> Result<DeviceTensor<f32>> {
    let (n1, t, o) = factored_dims("layers1", layers1)?;
    let n2 = match layers2 {
        Some(l2) => {
            let (n2, t2, o2) = factored_dims("layers2", l2)?;
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
    let mut out = DeviceTensor::<f32>::zeros(dev, &shape)?;
    let mut scratch = Scratch::default();
    for (l, x) in layers1.iter().enumerate() {
        let y = layers2.map(|l2| &l2[l]);
        let din = x.a.shape()[2];
        let dout = x.g.shape()[3];
        let aa =
            gpu::matmul_abt(dev, x.a.slice(), n1 * t, y.map(|y| (y.a.slice(), n2 * t)), din, precision, &mut scratch)?;
        let fg = factored_geometry(mode, o, dout);
        let gg = if fg.presum {
            let mut s1 = dev.stream().alloc_zeros::<f32>(n1 * t * dout)?;
            gpu::presum(dev, x.g.slice(), n1 * t, o, dout, &mut s1)?;
            let s2 = match y {
                Some(y) => {
                    let mut s2 = dev.stream().alloc_zeros::<f32>(n2 * t * dout)?;
                    gpu::presum(dev, y.g.slice(), n2 * t, o, dout, &mut s2)?;
                    Some(s2)
                }
                None => None,
            };
            let other = s2.as_ref().map(|s2| (s2, n2 * t * fg.rows_per_slot));
            gpu::matmul_abt(dev, &s1, n1 * t * fg.rows_per_slot, other, fg.depth, precision, &mut scratch)?
        } else {
            let other = y.map(|y| (y.g.slice(), n2 * t * fg.rows_per_slot));
            gpu::matmul_abt(dev, x.g.slice(), n1 * t * fg.rows_per_slot, other, fg.depth, precision, &mut scratch)?
        };
        let (e, diagonal, scale) = (fg.e, fg.diagonal, fg.scale);
        let beta = if x.bias { 1.0 } else { 0.0 };
        gpu::combine(dev, &aa, &gg, n1, n2, t, e, diagonal, beta, scale, l > 0, out.slice_mut())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! The host-side geometry of every mode, run end to end through the CPU emulation of the
    //! kernels' index arithmetic (tiles, splits, partials, reduction layouts, combine).
    use super::gpu::{emulate, GemmPlan};
    use super::*;
    use crate::rng::Rng;

    const MODES: [NtkMode; 5] = [
        NtkMode::Full,
        NtkMode::Trace { divide_by_outputs: false },
        NtkMode::Trace { divide_by_outputs: true },
        NtkMode::Diagonal,
        NtkMode::Pseudo,
    ];

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
                let plan = GemmPlan::new(slots, g.m1, g.m2, g.k, g.batch, n2.is_none()).unwrap();
                let (a, b) = if g.presum {
                    (emulate::presum(&j1, n1, o, p), emulate::presum(&j2, n2v, o, p))
                } else {
                    (j1.clone(), j2.clone())
                };
                let part = emulate::gemm(&plan, &a, n2.map(|_| b.as_slice()), g.row_stride, g.batch_stride);
                let got = emulate::reduce(&plan, &part, g.layout, g.scale);
                let want = cpu::gram(&j1, n2.map(|_| j2.as_slice()), n1, n2v, o, p, mode).unwrap();
                let e = rel_l2(&got, &want);
                assert!(e < 1e-5, "{mode:?} n1={n1} n2={n2:?} o={o} p={p} splits={}: rel L2 {e:e}", plan.splits);
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
                    emulate::combine(&aa, &gg, n1, n2v, t, fg.e, fg.diagonal, beta, fg.scale, l > 0, &mut out);
                }
                let c1: Vec<cpu::FactoredLayer<'_>> = h1
                    .iter()
                    .zip(&dims)
                    .map(|((a, g), &(d_in, d_out, bias))| cpu::FactoredLayer { a, g, d_in, d_out, bias })
                    .collect();
                let c2: Vec<cpu::FactoredLayer<'_>> = side2
                    .iter()
                    .zip(&dims)
                    .map(|((a, g), &(d_in, d_out, bias))| cpu::FactoredLayer { a, g, d_in, d_out, bias })
                    .collect();
                let want = cpu::factored_ntk(&c1, n2.map(|_| c2.as_slice()), n1, n2v, t, o, mode).unwrap();
                let e = rel_l2(&out, &want);
                assert!(e < 1e-5, "factored {mode:?} n1={n1} n2={n2:?} t={t}: rel L2 {e:e}");
            }
        }
    }
}
