//! Group-wise asymmetric quantization (KIVI) and the MiKV mixed-precision KV cache.
//!
//! # The arithmetic (bit-exact on CPU and GPU)
//! For one group of values `x` (f16, bf16 or f32, widened to f32 exactly):
//! - `mn = min(x)`, `mx = max(x)`; the stored min is `f16(mn)` and the stored scale is
//!   `f16((mx − mn) / (2^bits − 1))`, both rounded to nearest even, the division in f32;
//! - with the **stored** `scale` and `mn` widened back to f32, `inv = 1 / scale` (one IEEE
//!   f32 division), and `code = clamp(round_half_even((x − mn) · inv), 0, 2^bits − 1)`,
//!   the subtraction and the product each rounded separately (never fused into an FMA);
//!   when the stored scale is 0, every code is 0;
//! - dequantization is `x̂ = fma(code, scale, mn)` in f32, then a round-to-nearest-even cast
//!   to the output dtype.
//!
//! `mn` and `mx` get `+ 0.0` first (turning `-0` into `+0`), so the order the extremes are
//! found in (a shuffle tree on the GPU, a fold on the CPU) cannot change a stored bit.
//!
//! The CPU reference ([`cpu`]) and the kernels do exactly these f32 operations, so codes,
//! scales and mins are bit-equal between them, and so is every dequantized value.
//!
//! # Error bound
//! With the stored `scale` and `mn`, every element satisfies
//! `|x − x̂| ≤ scale/2 + ε`, `ε = ½·ulp_f16(mn) + qmax·2^-25 + δ`, where
//! - `½·ulp_f16(mn)`: the stored min is `mn` rounded to f16, which shifts the grid;
//! - `qmax·2^-25` (`qmax = 2^bits − 1`): the subnormal-scale term. When the true scale
//!   `(mx − mn)/qmax` is below `2^-14` the stored f16 scale is subnormal, with an absolute
//!   spacing of `2^-24` instead of a relative one, so it can be up to `2^-25` smaller than
//!   the true scale and the top codes clamp short of `mx` by up to `qmax·2^-25`. Below
//!   `2^-25` the stored scale is 0 and every code is 0 (the whole group reads back as
//!   `mn`), an error that this term still covers;
//! - `δ`: f32 rounding of the subtraction, product and fma, a few ulp of `max(|x|, |mn|)`.
//!
//! A normal (non-subnormal) stored scale needs no extra term: codes are computed with the
//! stored scale itself. The CPU property tests check exactly this bound.
//!
//! # Layouts
//! The input is a row-major tensor `[.., T, D]` (rank ≥ 2). The leading dimensions are
//! flattened into `H` "heads", so it is read as `[H, T, D]`. With `E = 32 / bits` codes per
//! `u32` word, code `j` of a word sitting at bits `[j·bits, (j+1)·bits)`:
//!
//! | axis | groups | codes (`u32`) | scales, mins (`f16`) | requires |
//! |---|---|---|---|---|
//! | [`Axis::PerToken`] | `group` consecutive channels of one token | `[.., T, D/E]`: word `(h, t, w)` holds channels `w·E + j` of token `t` | `[.., T, D/group]` | `D % group == 0` |
//! | [`Axis::PerChannel`] | `group` consecutive tokens of one channel | `[.., T/E, D]`: word `(h, r, d)` holds tokens `r·E + j` of channel `d` | `[.., T/group, D]` | `T % group == 0` |
//!
//! `PerToken` is KIVI's value cache and `PerChannel` its key cache. A `PerChannel` tensor whose
//! `T` is not a multiple of `group` is rejected ([`Error::InvalidArgument`] naming `x`): the
//! caller keeps the tail of fewer than `group` tokens in f16, as [`MikvCache`] does with its
//! residual window. Nothing is ever dropped silently.
//!
//! # Non-finite input
//! A NaN or infinity in a tensor to quantize is an error, [`Error::NonFinite`]. So is a finite
//! value whose magnitude is at least 65520 (possible in f32 and bf16 inputs), since its group's
//! stored f16 min or scale would be infinite: that one is [`Error::InvalidArgument`] naming `x`.
//! The default, [`FiniteCheck::Checked`], scans the input on the device before launching and
//! writes nothing on error. [`FiniteCheck::SinglePass`] lets the quantize kernel itself flag
//! bad values and reports the same errors after it ran: it reads the input once instead of
//! twice, but the outputs are unspecified when it returns an error.
//! [`QuantPlan::quantize_deferred`] is the single-pass kernel without the wait: it returns a
//! [`PendingCheck`] to resolve later, so a pipeline can check many calls with one sync. The
//! error flags live in the plan (allocated once by [`QuantPlan::new`]), so no quantize call
//! allocates, and `Checked` and `SinglePass` synchronize once per call.
//!
//! # Kernels (`cuda/quant.cu`)
//! - `PerToken` quantize: one thread per group, adjacent lanes on adjacent groups (a warp
//!   reads `32·group` contiguous values). The group is read in 64-byte slices (four 16-byte
//!   loads); its min/max, stored scale and min and `1/scale` are computed once per group, and
//!   its code words are written with 16-byte (or 8/4-byte) stores. A one-slice group (f16 or
//!   bf16, group 32) stays in registers; a larger one is read a second time (from L1/L2) for
//!   its codes. The round to nearest even is a magic-number add (`t + 1.5·2²³` after the
//!   clamp), the same bits as the CPU's `round_ties_even`.
//! - `PerToken` dequantize: one thread per code word, 8 independent word loads in flight per
//!   thread, each word written as one 16-byte (or 8/32-byte) vector store, so stores are
//!   fully coalesced.
//! - `PerChannel`: one thread per (token group, channel) to quantize and per code word to
//!   dequantize, adjacent lanes on adjacent channels (coalesced along `D`).
//! - Grids are one full wave (the driver's occupancy for the kernel × SMs) with grid-stride
//!   loops; heads run along grid y. No shared memory, no float atomics (error flags are
//!   integer `atomicMax` of `!index`, so the lowest bad index is reported deterministically).
//!
//! `tools/emu/run.sh quant` runs these kernels on the CPU (one thread per CUDA thread, with
//! ASan/UBSan) against a scalar reference, for machines without a GPU.
//!
//! # Plan, then run
//! ```no_run
//! # fn main() -> ntkv::Result<()> {
//! use ntkv::quant::{Axis, QuantPlan, QuantShape, QuantSpec};
//! use ntkv::{DType, Device, DeviceTensor};
//! let device = Device::new(0)?;
//! let spec = QuantSpec::new(4, 32, Axis::PerToken)?;
//! let plan = QuantPlan::new(&device, &QuantShape { dims: vec![4096, 128], dtype: DType::F16 }, spec)?;
//! let x = DeviceTensor::<half::f16>::zeros(&device, &[4096, 128])?;
//! let mut q = plan.alloc_output()?;
//! plan.quantize(&x, &mut q)?;
//! let mut y = DeviceTensor::<half::f16>::zeros(&device, &[4096, 128])?;
//! plan.dequantize(&q, &mut y)?;
//! # Ok(()) }
//! ```

pub mod cpu;
pub(crate) mod gpu;
mod mikv;

pub(crate) use mikv::MikvParts;
pub use mikv::{HiPrecision, MikvCache, MikvConfig};

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaSlice;
use half::f16;

use crate::device::Device;
use crate::error::{check_shape, to_u32, Error, Result};
use crate::tensor::{numel, DType, DeviceKey, DeviceTensor, Float, TensorMut, TensorRef};

/// The axis quantization groups run along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Groups of `group` consecutive channels (along `D`) within one token: KIVI's values.
    PerToken,
    /// Groups of `group` consecutive tokens (along `T`) within one channel: KIVI's keys.
    PerChannel,
}

impl Axis {
    /// `per_token` or `per_channel` (used in bench keys).
    pub fn name(self) -> &'static str {
        match self {
            Axis::PerToken => "per_token",
            Axis::PerChannel => "per_channel",
        }
    }
}

/// A quantization format: bits per code, group size and grouping axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// Bits per code: 2, 4 or 8.
    pub bits: u32,
    /// Values per group: 32, 64 or 128.
    pub group: usize,
    /// The axis groups run along.
    pub axis: Axis,
}

impl QuantSpec {
    /// A validated spec.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `bits` (not 2, 4 or 8) or `group` (not 32, 64 or 128).
    pub fn new(bits: u32, group: usize, axis: Axis) -> Result<Self> {
        let s = QuantSpec { bits, group, axis };
        s.validate()?;
        Ok(s)
    }

    /// Checks `bits` and `group` (a spec built as a struct literal is checked by every call).
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.bits, 2 | 4 | 8) {
            return Err(Error::invalid("bits", format!("{} is not 2, 4 or 8", self.bits)));
        }
        if !matches!(self.group, 32 | 64 | 128) {
            return Err(Error::invalid("group", format!("{} is not 32, 64 or 128", self.group)));
        }
        Ok(())
    }

    /// The largest code, `2^bits − 1`.
    pub fn qmax(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Codes per `u32` word, `32 / bits`.
    pub fn codes_per_word(&self) -> usize {
        32 / self.bits as usize
    }

    /// Words per group, `group · bits / 32` (a power of two from 2 to 32).
    pub fn words_per_group(&self) -> usize {
        self.group / self.codes_per_word()
    }
}

/// The shapes of a quantized tensor (see the [module docs](self) for the layouts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantLayout {
    /// The spec.
    pub spec: QuantSpec,
    /// The input's shape `[.., T, D]`.
    pub shape: Vec<usize>,
    /// The leading dimensions flattened (`H`, 1 for a rank-2 input).
    pub heads: usize,
    /// `T`.
    pub tokens: usize,
    /// `D`.
    pub dim: usize,
    /// Shape of the `u32` codes.
    pub codes_shape: Vec<usize>,
    /// Shape of the f16 scales, and of the f16 mins.
    pub scales_shape: Vec<usize>,
}

impl QuantLayout {
    /// Validates `shape` against `spec` and derives the output shapes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `x` when the rank is below 2, a dimension is 0,
    /// `D % group != 0` (`PerToken`) or `T % group != 0` (`PerChannel`);
    /// [`Error::TooLarge`] when `T` or `D` exceeds `u32`.
    pub fn new(spec: QuantSpec, shape: &[usize]) -> Result<Self> {
        spec.validate()?;
        if shape.len() < 2 {
            return Err(Error::invalid("x", format!("shape {shape:?} has rank < 2; expected [.., T, D]")));
        }
        if shape.contains(&0) {
            return Err(Error::invalid("x", format!("shape {shape:?} has a zero dimension")));
        }
        let n = shape.len();
        let (tokens, dim) = (shape[n - 2], shape[n - 1]);
        let heads = numel("x", &shape[..n - 2])?;
        numel("x", shape)?;
        to_u32("x tokens", tokens)?;
        to_u32("x dim", dim)?;
        let e = spec.codes_per_word();
        let lead = &shape[..n - 2];
        let (codes_last2, scales_last2) = match spec.axis {
            Axis::PerToken => {
                if dim % spec.group != 0 {
                    return Err(Error::invalid(
                        "x",
                        format!("PerToken needs D ({dim}) to be a multiple of the group ({})", spec.group),
                    ));
                }
                ([tokens, dim / e], [tokens, dim / spec.group])
            }
            Axis::PerChannel => {
                if tokens % spec.group != 0 {
                    return Err(Error::invalid(
                        "x",
                        format!(
                            "PerChannel needs T ({tokens}) to be a multiple of the group ({}); keep the \
                             tail in f16 (a residual window, as MikvCache does)",
                            spec.group
                        ),
                    ));
                }
                ([tokens / e, dim], [tokens / spec.group, dim])
            }
        };
        let codes_shape = lead.iter().copied().chain(codes_last2).collect();
        let scales_shape = lead.iter().copied().chain(scales_last2).collect();
        Ok(QuantLayout { spec, shape: shape.to_vec(), heads, tokens, dim, codes_shape, scales_shape })
    }

    /// Number of input elements.
    pub fn numel(&self) -> usize {
        self.heads * self.tokens * self.dim
    }

    /// Number of `u32` code words.
    pub fn n_words(&self) -> usize {
        self.numel() / self.spec.codes_per_word()
    }

    /// Number of groups (= scales = mins).
    pub fn n_groups(&self) -> usize {
        self.numel() / self.spec.group
    }

    /// The whole tensor as one strided region (offsets 0, dense head strides). `PerToken`
    /// groups never cross a token, so its heads fold into one block of `H·T` tokens, which
    /// spreads small-`T` tensors over the whole grid.
    pub(crate) fn region(&self) -> Region {
        let (heads, tokens) = match self.spec.axis {
            Axis::PerToken => (1, self.heads * self.tokens),
            Axis::PerChannel => (self.heads, self.tokens),
        };
        Region {
            heads,
            tokens,
            dim: self.dim,
            x_off: 0,
            x_hs: tokens * self.dim,
            c_off: 0,
            c_hs: tokens * self.dim / self.spec.codes_per_word(),
            s_off: 0,
            s_hs: tokens * self.dim / self.spec.group,
        }
    }
}

/// A strided view of `heads` blocks of `[tokens, dim]` values and their codes, scales and
/// mins, each block at `offset + h · head_stride` (in elements of the buffer it indexes).
/// The CPU reference and the kernels share this description, so the MiKV cache can quantize
/// a slice of its ring buffer into its code storage with the same code as a plain tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub heads: usize,
    pub tokens: usize,
    pub dim: usize,
    pub x_off: usize,
    pub x_hs: usize,
    pub c_off: usize,
    pub c_hs: usize,
    pub s_off: usize,
    pub s_hs: usize,
}

impl Region {
    /// One past the last index each buffer is accessed at: (values, code words, scales).
    /// Saturating, so an absurd region fails [`Region::check`] instead of wrapping around.
    pub(crate) fn extents(&self, spec: &QuantSpec) -> (usize, usize, usize) {
        let per_head = self.tokens.saturating_mul(self.dim);
        let last = self.heads.saturating_sub(1);
        let end = |off: usize, hs: usize, n: usize| {
            if self.heads == 0 || n == 0 {
                0
            } else {
                off.saturating_add(last.saturating_mul(hs)).saturating_add(n)
            }
        };
        (
            end(self.x_off, self.x_hs, per_head),
            end(self.c_off, self.c_hs, per_head / spec.codes_per_word()),
            end(self.s_off, self.s_hs, per_head / spec.group),
        )
    }

    /// Checks that every access stays inside buffers of the given lengths.
    pub(crate) fn check(&self, spec: &QuantSpec, x_len: usize, codes_len: usize, sm_len: usize) -> Result<()> {
        let (x, c, s) = self.extents(spec);
        if x > x_len {
            return Err(Error::shape("x", &[x], &[x_len]));
        }
        if c > codes_len {
            return Err(Error::shape("codes", &[c], &[codes_len]));
        }
        if s > sm_len {
            return Err(Error::shape("scales", &[s], &[sm_len]));
        }
        Ok(())
    }
}

/// How a quantize call guards against NaN, infinity and values outside the f16 range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FiniteCheck {
    /// Scan the input on the device first (one extra read of the input and a host sync);
    /// on a bad value return the error having written nothing. The default.
    #[default]
    Checked,
    /// The quantize kernel flags bad values while it quantizes; the call synchronizes and
    /// returns the same error afterwards, but the outputs are then unspecified (partly
    /// written). Reads the input once: use it when the input is known to be finite or the
    /// outputs are scratch.
    SinglePass,
}

/// The device error flags of a [`QuantPlan`], allocated once by [`QuantPlan::new`] and shared
/// by its clones: `kernel` collects what the single-pass and deferred quantize kernels flag
/// until a read clears it, `scan` is the checked path's pre-scan, zero between calls.
#[derive(Debug)]
struct PlanFlags {
    kernel: CudaSlice<u64>,
    scan: CudaSlice<u64>,
}

type SharedFlags = Arc<Mutex<PlanFlags>>;

fn lock_flags(flags: &SharedFlags) -> Result<MutexGuard<'_, PlanFlags>> {
    flags.lock().map_err(|_| Error::internal("quant plan: the error flags' lock is poisoned"))
}

/// The pending error check of a launched single-pass quantize ([`QuantPlan::quantize_deferred`]).
#[must_use = "a deferred quantize is only checked for NaN/Inf when wait() returns Ok"]
#[derive(Debug)]
pub struct PendingCheck {
    flags: SharedFlags,
}

impl PendingCheck {
    /// Waits for the stream and reads the plan's error flag (one host synchronization): returns
    /// [`Error::NonFinite`] (NaN/Inf) or [`Error::InvalidArgument`] naming `x` (|x| ≥ 65520)
    /// at the lowest bad flat index, and clears the flag.
    ///
    /// The flag is the plan's (see [`QuantPlan::quantize_deferred`]): it collects every
    /// single-pass and deferred call of the plan and its clones since it was last read, so
    /// the first `wait` of a batch checks the whole batch and reports the lowest bad index
    /// among its calls, and the later ones find it clear.
    pub fn wait(self) -> Result<()> {
        gpu::take_flags(&mut lock_flags(&self.flags)?.kernel)
    }
}

/// Codes, scales and mins of a quantized tensor on the device, with the layout they were
/// made for. The buffers are private, so their shapes always match the layout.
#[derive(Debug)]
pub struct QuantizedTensor {
    layout: QuantLayout,
    codes: DeviceTensor<u32>,
    scales: DeviceTensor<f16>,
    mins: DeviceTensor<f16>,
}

impl QuantizedTensor {
    /// Zero-filled buffers for `layout`.
    pub fn zeros(device: &Device, layout: &QuantLayout) -> Result<Self> {
        Ok(QuantizedTensor {
            layout: layout.clone(),
            codes: DeviceTensor::zeros(device, &layout.codes_shape)?,
            scales: DeviceTensor::zeros(device, &layout.scales_shape)?,
            mins: DeviceTensor::zeros(device, &layout.scales_shape)?,
        })
    }

    /// Uploads host codes, scales and mins (for example from [`cpu::quantize`]).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `data` when a buffer's length is not the layout's.
    pub fn from_host(device: &Device, layout: &QuantLayout, q: &cpu::QuantizedHost) -> Result<Self> {
        Ok(QuantizedTensor {
            layout: layout.clone(),
            codes: DeviceTensor::from_host(device, &q.codes, &layout.codes_shape)?,
            scales: DeviceTensor::from_host(device, &q.scales, &layout.scales_shape)?,
            mins: DeviceTensor::from_host(device, &q.mins, &layout.scales_shape)?,
        })
    }

    /// Downloads the buffers (waits for the stream).
    pub fn to_host(&self) -> Result<cpu::QuantizedHost> {
        Ok(cpu::QuantizedHost {
            codes: self.codes.to_host()?,
            scales: self.scales.to_host()?,
            mins: self.mins.to_host()?,
        })
    }

    /// The layout the buffers hold.
    pub fn layout(&self) -> &QuantLayout {
        &self.layout
    }

    /// The packed `u32` codes, [`QuantLayout::codes_shape`].
    pub fn codes(&self) -> &DeviceTensor<u32> {
        &self.codes
    }

    /// The f16 scales, [`QuantLayout::scales_shape`].
    pub fn scales(&self) -> &DeviceTensor<f16> {
        &self.scales
    }

    /// The f16 mins, [`QuantLayout::scales_shape`].
    pub fn mins(&self) -> &DeviceTensor<f16> {
        &self.mins
    }

    /// The device the buffers live on.
    pub fn device_key(&self) -> DeviceKey {
        self.codes.device_key()
    }

    fn check(&self, device: &Device, layout: &QuantLayout) -> Result<()> {
        device.check_tensor("codes", &self.codes)?;
        device.check_tensor("scales", &self.scales)?;
        device.check_tensor("mins", &self.mins)?;
        check_shape("codes", &layout.codes_shape, self.codes.shape())?;
        check_shape("scales", &layout.scales_shape, self.scales.shape())?;
        check_shape("mins", &layout.scales_shape, self.mins.shape())?;
        if self.layout.spec != layout.spec {
            return Err(Error::invalid(
                "codes",
                format!("quantized as {:?}, but the plan is for {:?}", self.layout.spec, layout.spec),
            ));
        }
        Ok(())
    }
}

/// What a [`QuantPlan`] quantizes: the value tensor's shape `[.., T, D]` (rank ≥ 2; the leading
/// dimensions are heads) and its dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantShape {
    /// The shape `[.., T, D]`, outermost first.
    pub dims: Vec<usize>,
    /// The dtype of the values: the input of quantize and the output of dequantize.
    pub dtype: DType,
}

/// A validated quantization of one shape and dtype on one device: build once, run many times.
///
/// The plan owns its error flags (four `u64` on the device, allocated by [`QuantPlan::new`]),
/// so no quantize call allocates. A clone shares them with the plan it was cloned from.
#[derive(Clone, Debug)]
pub struct QuantPlan {
    device: Device,
    layout: QuantLayout,
    dtype: DType,
    flags: SharedFlags,
}

impl QuantPlan {
    /// Validates `spec` against `shape` for inputs (quantize) and outputs (dequantize) of
    /// `shape.dtype` on `device`.
    ///
    /// Allocates the plan's error flags (zeroed, stream-ordered: no host synchronization).
    ///
    /// # Errors
    /// As [`QuantSpec::validate`] and [`QuantLayout::new`]; a driver error if the flags cannot
    /// be allocated.
    pub fn new(device: &Device, shape: &QuantShape, spec: QuantSpec) -> Result<Self> {
        let layout = QuantLayout::new(spec, &shape.dims)?;
        let flags = PlanFlags { kernel: gpu::new_flags(device)?, scan: gpu::new_flags(device)? };
        Ok(QuantPlan { device: device.clone(), layout, dtype: shape.dtype, flags: Arc::new(Mutex::new(flags)) })
    }

    /// The layout of the quantized tensor.
    pub fn layout(&self) -> &QuantLayout {
        &self.layout
    }

    /// The spec.
    pub fn spec(&self) -> QuantSpec {
        self.layout.spec
    }

    /// The dtype of the values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Zero-filled output buffers for this plan.
    pub fn alloc_output(&self) -> Result<QuantizedTensor> {
        QuantizedTensor::zeros(&self.device, &self.layout)
    }

    fn check_values<T: Float>(&self, arg: &'static str, t: &(impl TensorRef<T> + ?Sized)) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::invalid(arg, format!("dtype {} but the plan is for {}", T::DTYPE, self.dtype)));
        }
        self.device.check_tensor(arg, t)?;
        check_shape(arg, &self.layout.shape, t.shape())?;
        if t.len() != self.layout.numel() {
            return Err(Error::shape(arg, &[self.layout.numel()], &[t.len()]));
        }
        Ok(())
    }

    /// Quantizes `x` into `out` with the safe [`FiniteCheck::Checked`] mode.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::InvalidArgument`] for a shape or dtype that is not the
    /// plan's, [`Error::DeviceMismatch`] for a buffer on another device; [`Error::NonFinite`]
    /// for NaN/Inf in `x`; [`Error::InvalidArgument`] naming `x` for a value of magnitude
    /// ≥ 65520. Nothing is written on any error.
    pub fn quantize<T: Float>(&self, x: &impl TensorRef<T>, out: &mut QuantizedTensor) -> Result<()> {
        self.quantize_with(x, out, FiniteCheck::Checked)
    }

    /// Quantizes `x` into `out` with the chosen [`FiniteCheck`]. Both modes synchronize with
    /// the stream once and allocate nothing (the flags are the plan's): `Checked` to read the
    /// scan's flag back (before the quantize kernel is launched, which the call does not wait
    /// for), `SinglePass` to read the kernel's flag.
    ///
    /// `SinglePass` reads and clears the plan's kernel flag, which also holds what earlier
    /// [`QuantPlan::quantize_deferred`] calls flagged and no [`PendingCheck::wait`] has read
    /// yet: such an error is reported here.
    ///
    /// # Errors
    /// As [`QuantPlan::quantize`]; with [`FiniteCheck::SinglePass`] the outputs are
    /// unspecified when a value error is returned (shape errors still write nothing).
    pub fn quantize_with<T: Float>(
        &self,
        x: &impl TensorRef<T>,
        out: &mut QuantizedTensor,
        check: FiniteCheck,
    ) -> Result<()> {
        self.validate_quantize(x, out)?;
        let mut flags = lock_flags(&self.flags)?;
        if check == FiniteCheck::Checked {
            gpu::scan_range(&self.device, &x.cuda_view(), &mut flags.scan)?;
            // The scan tested every value with the predicate the quantize kernel flags
            // (`quantizable`), so the kernel adds nothing to its flag: not reading it back
            // keeps the checked path at one host synchronization.
            return self.launch_quantize(x, out, &mut flags.kernel);
        }
        self.launch_quantize(x, out, &mut flags.kernel)?;
        gpu::take_flags(&mut flags.kernel)
    }

    /// The single-pass quantize without waiting: launches the kernel, which adds any bad value
    /// to the plan's error flag, and returns a [`PendingCheck`] whose [`PendingCheck::wait`]
    /// reads and clears that flag (one sync). Until a `wait` returns `Ok`, treat `out` as
    /// unverified; on an error it is unspecified.
    ///
    /// The flag lives in the plan (allocated once by [`QuantPlan::new`]; this call allocates
    /// nothing and never synchronizes), and it accumulates: calls launched one after another
    /// are all checked by the first `wait` that follows them, which reports the lowest bad flat
    /// index among them. So a pipeline can check many quantize calls (say, every layer of a
    /// step) with one synchronization at the end. A [`PendingCheck`] dropped unread leaves its
    /// error in the flag, for the next `wait` or [`FiniteCheck::SinglePass`] call to report.
    ///
    /// # Errors
    /// Shape, dtype and device errors as [`QuantPlan::quantize`], before anything is launched.
    pub fn quantize_deferred<T: Float>(
        &self,
        x: &impl TensorRef<T>,
        out: &mut QuantizedTensor,
    ) -> Result<PendingCheck> {
        self.validate_quantize(x, out)?;
        self.launch_quantize(x, out, &mut lock_flags(&self.flags)?.kernel)?;
        Ok(PendingCheck { flags: Arc::clone(&self.flags) })
    }

    fn validate_quantize<T: Float>(&self, x: &impl TensorRef<T>, out: &QuantizedTensor) -> Result<()> {
        self.check_values("x", x)?;
        out.check(&self.device, &self.layout)
    }

    fn launch_quantize<T: Float>(
        &self,
        x: &impl TensorRef<T>,
        out: &mut QuantizedTensor,
        flags: &mut CudaSlice<u64>,
    ) -> Result<()> {
        gpu::quantize_region(
            &self.device,
            &self.layout.spec,
            &self.layout.region(),
            &x.cuda_view(),
            &mut out.codes.view_mut(),
            &mut out.scales.view_mut(),
            &mut out.mins.view_mut(),
            flags,
        )
    }

    /// Dequantizes `q` into `out` (shape `[.., T, D]`, the plan's dtype).
    ///
    /// Scales and mins are used as stored; a NaN in them (never produced by ntkv) would
    /// propagate into `out`.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::InvalidArgument`] for shapes, a spec or a dtype that is not
    /// the plan's, [`Error::DeviceMismatch`] for a buffer on another device; nothing is
    /// written then.
    pub fn dequantize<T: Float>(&self, q: &QuantizedTensor, out: &mut impl TensorMut<T>) -> Result<()> {
        self.check_values("out", out)?;
        q.check(&self.device, &self.layout)?;
        let region = self.layout.region();
        gpu::dequantize_region(
            &self.device,
            &self.layout.spec,
            &region,
            &q.codes.cuda_view(),
            &q.scales.cuda_view(),
            &q.mins.cuda_view(),
            &mut out.cuda_view_mut(),
        )
    }
}

/// The error for the value at flat `index` that cannot be quantized: [`Error::NonFinite`] for
/// NaN/Inf, [`Error::InvalidArgument`] for a finite magnitude of at least 65520 (which rounds
/// to infinity in f16). Shared by the CPU reference and the kernels' flag decoding.
pub(crate) fn value_error(arg: &'static str, index: usize, nonfinite: bool) -> Error {
    if nonfinite {
        Error::NonFinite { arg, index }
    } else {
        Error::invalid(
            arg,
            format!(
                "the value at flat index {index} has magnitude >= 65520, outside the f16 range of \
                 the stored mins and scales"
            ),
        )
    }
}

/// Whether a value can be quantized (finite and rounds to a finite f16).
pub(crate) fn quantizable(x: f32) -> bool {
    x.abs() < F16_LIMIT
}

/// The smallest magnitude that rounds to infinity in f16.
pub(crate) const F16_LIMIT: f32 = 65520.0;
