//! The CPU reference of the quantization family: exactly the f32 operations the module docs
//! the same order as the kernels, so codes, scales and mins are bit-equal to the GPU's.
//!
//! Also the reference of the whole MiKV cache ([`MikvCacheCpu`]), with the same storage
//! layout as the device cache, so the two can be compared buffer by buffer.

use half::f16;

use super::{quantizable, value_error, Axis, QuantLayout, QuantSpec, Region};
use crate::error::{check_shape, Error, Result};
use crate::tensor::Float;

pub use super::mikv::MikvCacheCpu;

/// Codes, scales and mins on the host, in the layout of [`QuantLayout`].
#[derive(Clone, Debug, Default)]
pub struct QuantizedHost {
    /// Packed codes.
    pub codes: Vec<u32>,
    /// f16 scales.
    pub scales: Vec<f16>,
    /// f16 mins.
    pub mins: Vec<f16>,
}

impl QuantizedHost {
    /// Zero-filled buffers for `layout`.
    pub fn zeros(layout: &QuantLayout) -> Self {
        QuantizedHost {
            codes: vec![0; layout.n_words()],
            scales: vec![f16::ZERO; layout.n_groups()],
            mins: vec![f16::ZERO; layout.n_groups()],
        }
    }

    /// Whether every code, scale and min has the same bits as in `other`.
    pub fn same_bits(&self, other: &QuantizedHost) -> bool {
        self.codes == other.codes
            && same_f16_bits(&self.scales, &other.scales)
            && same_f16_bits(&self.mins, &other.mins)
    }
}

/// Whether two f16 slices hold the same bit patterns.
pub fn same_f16_bits(a: &[f16], b: &[f16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `2^bits − 1` for a supported code width, or an error naming `bits`.
fn qmax_of(bits: u32) -> Result<u32> {
    if matches!(bits, 2 | 4 | 8) {
        Ok((1u32 << bits) - 1)
    } else {
        Err(Error::invalid("bits", format!("{bits} is not 2, 4 or 8")))
    }
}

/// The stored `(scale, min)` of a group with minimum `mn` and maximum `mx` (f32):
/// `scale = f16((mx − mn) / (2^bits − 1))`, `min = f16(mn)`.
///
/// Adding `+0.0` first turns a `-0` min or max into `+0`, so the order in which they are
/// taken (which of two signed zeros wins) cannot change the stored bits.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `bits` when it is not 2, 4 or 8.
pub fn group_params(bits: u32, mn: f32, mx: f32) -> Result<(f16, f16)> {
    let qmax = qmax_of(bits)? as f32;
    let (mn, mx) = (mn + 0.0, mx + 0.0);
    Ok((f16::from_f32((mx - mn) / qmax), f16::from_f32(mn)))
}

/// `1 / scale` in f32, or 0 when the scale is 0 (then every code is 0).
pub fn inverse_scale(scale: f16) -> f32 {
    let s = scale.to_f32();
    if s == 0.0 {
        0.0
    } else {
        1.0 / s
    }
}

/// The code of `x`: `clamp(round_half_even((x − mn) · inv), 0, 2^bits − 1)`, with the
/// subtraction and product rounded separately; 0 when `scale == 0` (`inv == 0`). A NaN
/// product (never reached through [`quantize`], which refuses non-finite input) gives 0.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `bits` when it is not 2, 4 or 8.
pub fn encode(x: f32, mn: f16, inv: f32, bits: u32) -> Result<u32> {
    let qmax = qmax_of(bits)? as f32;
    if inv == 0.0 {
        return Ok(0);
    }
    let d = x - mn.to_f32();
    let q = (d * inv).round_ties_even();
    Ok(q.max(0.0).min(qmax) as u32)
}

/// `fma(code, scale, mn)` in f32.
pub fn decode(code: u32, scale: f16, mn: f16) -> f32 {
    (code as f32).mul_add(scale.to_f32(), mn.to_f32())
}

/// Packs codes little-end-first into `u32` words: code `i` goes to word `i / (32/bits)` at
/// bits `[(i % (32/bits))·bits, …)`. Each code is masked to `bits` bits; a final partial word
/// is zero-padded.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `bits` when it is not 2, 4 or 8.
pub fn pack_codes(bits: u32, codes: &[u32]) -> Result<Vec<u32>> {
    let mask = qmax_of(bits)?;
    let e = (32 / bits) as usize;
    Ok(codes
        .chunks(e)
        .map(|c| c.iter().enumerate().fold(0u32, |w, (j, &v)| w | ((v & mask) << (j as u32 * bits))))
        .collect())
}

/// Unpacks `n` codes from words packed by [`pack_codes`]; codes past the end of `words` are
/// 0.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `bits` when it is not 2, 4 or 8, [`Error::TooLarge`]
/// naming `n` when `n` exceeds what `words` can hold by more than one word.
pub fn unpack_codes(bits: u32, words: &[u32], n: usize) -> Result<Vec<u32>> {
    let mask = qmax_of(bits)?;
    let e = (32 / bits) as usize;
    if n.div_ceil(e) > words.len().saturating_add(1) {
        return Err(Error::too_large("n", format!("{n} codes from {} words of {e}", words.len())));
    }
    Ok((0..n).map(|i| words.get(i / e).map_or(0, |w| (w >> ((i % e) as u32 * bits)) & mask)).collect())
}

/// Quantizes `x` (shape `[.., T, D]`) to the layout of [`QuantLayout::new`]`(spec, shape)`.
///
/// # Errors
/// As [`QuantLayout::new`]; [`Error::Shape`] naming `x` when `x.len()` is not the product of
/// `shape`; [`Error::NonFinite`] (NaN/Inf) or [`Error::InvalidArgument`] (|x| ≥ 65520) naming
/// `x` with the lowest bad flat index.
pub fn quantize<T: Float>(spec: QuantSpec, shape: &[usize], x: &[T]) -> Result<QuantizedHost> {
    let layout = QuantLayout::new(spec, shape)?;
    check_shape("x", &[layout.numel()], &[x.len()])?;
    check_values("x", x)?;
    let mut q = QuantizedHost::zeros(&layout);
    quantize_region(&spec, &layout.region(), x, &mut q.codes, &mut q.scales, &mut q.mins)?;
    Ok(q)
}

/// Dequantizes `q` (layout of `spec` and `shape`) to a `[.., T, D]` vector of `T`.
///
/// # Errors
/// As [`QuantLayout::new`]; [`Error::Shape`] naming `codes`, `scales` or `mins` for buffers
/// of the wrong length.
pub fn dequantize<T: Float>(spec: QuantSpec, shape: &[usize], q: &QuantizedHost) -> Result<Vec<T>> {
    let layout = QuantLayout::new(spec, shape)?;
    check_shape("codes", &[layout.n_words()], &[q.codes.len()])?;
    check_shape("scales", &[layout.n_groups()], &[q.scales.len()])?;
    check_shape("mins", &[layout.n_groups()], &[q.mins.len()])?;
    let mut out = vec![T::default(); layout.numel()];
    dequantize_region(&spec, &layout.region(), &q.codes, &q.scales, &q.mins, &mut out)?;
    Ok(out)
}

/// Returns the error for the first value that cannot be quantized, if any.
pub(crate) fn check_values<T: Float>(arg: &'static str, x: &[T]) -> Result<()> {
    match x.iter().position(|v| !quantizable(v.to_f32())) {
        Some(i) => Err(value_error(arg, i, !x[i].to_f32().is_finite())),
        None => Ok(()),
    }
}

/// Index helpers of a region: where value `(h, t, c)`'s group, code word and slot are.
struct Addr {
    e: usize,
    group: usize,
}

impl Addr {
    /// (group-parameter index, word index, code slot in the word) of value `(h, t, c)`.
    fn locate(&self, spec: &QuantSpec, r: &Region, h: usize, t: usize, c: usize) -> (usize, usize, usize) {
        match spec.axis {
            Axis::PerToken => {
                let within = t * r.dim + c;
                (r.s_off + h * r.s_hs + within / self.group, r.c_off + h * r.c_hs + within / self.e, c % self.e)
            }
            Axis::PerChannel => (
                r.s_off + h * r.s_hs + (t / self.group) * r.dim + c,
                r.c_off + h * r.c_hs + (t / self.e) * r.dim + c,
                t % self.e,
            ),
        }
    }
}

/// Quantizes a strided region (the shared description of the kernels' work). Assumes the
/// values were checked; checks every index against the buffers' lengths first.
pub(crate) fn quantize_region<T: Float>(
    spec: &QuantSpec,
    r: &Region,
    x: &[T],
    codes: &mut [u32],
    scales: &mut [f16],
    mins: &mut [f16],
) -> Result<()> {
    spec.validate()?;
    r.check(spec, x.len(), codes.len(), scales.len().min(mins.len()))?;
    let addr = Addr { e: spec.codes_per_word(), group: spec.group };
    let (gt, gd) = match spec.axis {
        Axis::PerToken => (1, spec.group),
        Axis::PerChannel => (spec.group, 1),
    };
    if r.tokens % gt != 0 || r.dim % gd != 0 {
        return Err(Error::invalid("region", "tokens or dim is not a multiple of the group"));
    }
    let at = |h: usize, t: usize, c: usize| x[r.x_off + h * r.x_hs + t * r.dim + c].to_f32();
    for h in 0..r.heads {
        for t0 in (0..r.tokens).step_by(gt) {
            for c0 in (0..r.dim).step_by(gd) {
                let members = || (0..gt).flat_map(move |i| (0..gd).map(move |j| (t0 + i, c0 + j)));
                let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
                for (t, c) in members() {
                    let v = at(h, t, c);
                    mn = mn.min(v);
                    mx = mx.max(v);
                }
                let (scale, min) = group_params(spec.bits, mn, mx)?;
                let inv = inverse_scale(scale);
                let (gi, _, _) = addr.locate(spec, r, h, t0, c0);
                scales[gi] = scale;
                mins[gi] = min;
                for (t, c) in members() {
                    let code = encode(at(h, t, c), min, inv, spec.bits)?;
                    let (_, wi, slot) = addr.locate(spec, r, h, t, c);
                    let shift = slot as u32 * spec.bits;
                    let mask = spec.qmax() << shift;
                    codes[wi] = (codes[wi] & !mask) | (code << shift);
                }
            }
        }
    }
    Ok(())
}

/// Dequantizes a strided region into `out` (indexed like the region's values).
pub(crate) fn dequantize_region<T: Float>(
    spec: &QuantSpec,
    r: &Region,
    codes: &[u32],
    scales: &[f16],
    mins: &[f16],
    out: &mut [T],
) -> Result<()> {
    spec.validate()?;
    r.check(spec, out.len(), codes.len(), scales.len().min(mins.len()))?;
    let addr = Addr { e: spec.codes_per_word(), group: spec.group };
    for h in 0..r.heads {
        for t in 0..r.tokens {
            for c in 0..r.dim {
                let (gi, wi, slot) = addr.locate(spec, r, h, t, c);
                let code = (codes[wi] >> (slot as u32 * spec.bits)) & spec.qmax();
                out[r.x_off + h * r.x_hs + t * r.dim + c] = T::from_f32(decode(code, scales[gi], mins[gi]));
            }
        }
    }
    Ok(())
}
