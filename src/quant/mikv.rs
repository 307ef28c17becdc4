//! The MiKV mixed-precision KV cache, on the device ([`MikvCache`]) and its CPU reference
//! ([`MikvCacheCpu`]). Both hold the same buffers in the same layout.
//!
//! The design is documented on [`MikvCache`].

use cudarc::driver::CudaSlice;
use half::f16;

use super::cpu::{self, QuantizedHost};
use super::gpu::{self, Rows};
use super::{Axis, QuantLayout, QuantSpec, Region};
use crate::checks::ensure_finite;
use crate::device::Device;
use crate::error::{check_shape, to_u32, Error, Result};
use crate::tensor::{TensorMut, TensorRef};

/// `len`, `is_empty` and `quantized_len`, the same for the CPU and the device cache.
macro_rules! len_accessors {
    () => {
        /// Tokens held, `T`.
        pub fn len(&self) -> usize {
            self.tokens
        }

        /// Whether the cache holds no token.
        pub fn is_empty(&self) -> bool {
            self.tokens == 0
        }

        /// Tokens in the low-precision codes, `Tq`.
        pub fn quantized_len(&self) -> usize {
            self.quantized
        }
    };
}

/// The precision of important tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HiPrecision {
    /// Kept as f16: reconstructed exactly.
    F16,
    /// Int8, grouped along `D` with the cache's group size: within `scale/2 + ε`.
    Int8,
}

/// The configuration of a [`MikvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MikvConfig {
    /// Bits of the ordinary tokens: 4 or 2.
    pub lo_bits: u32,
    /// Precision of the important tokens.
    pub hi: HiPrecision,
    /// Group size (32, 64 or 128) of the low-precision codes (and of the int8 rows).
    pub group: usize,
    /// Grouping axis of the low-precision codes (`PerChannel` for keys, `PerToken` for values).
    pub axis: Axis,
    /// Residual window `R`: at least this many most recent tokens stay f16. A multiple of
    /// `group` for `PerChannel`; any value for `PerToken`.
    pub residual: usize,
    /// Most tokens the cache can hold (prefill plus appends).
    pub capacity: usize,
}

impl MikvConfig {
    /// The spec of the low-precision codes.
    pub fn lo_spec(&self) -> QuantSpec {
        QuantSpec { bits: self.lo_bits, group: self.group, axis: self.axis }
    }

    /// The spec of int8 important rows (per token along `D`).
    pub fn hi_spec(&self) -> QuantSpec {
        QuantSpec { bits: 8, group: self.group, axis: Axis::PerToken }
    }

    /// Tokens quantized together: `group` for `PerChannel`, 1 for `PerToken`.
    pub fn block(&self) -> usize {
        match self.axis {
            Axis::PerToken => 1,
            Axis::PerChannel => self.group,
        }
    }

    /// The quantized prefix length for `tokens` tokens: `⌊max(T − R, 0) / block⌋ · block`.
    pub fn quantized_len(&self, tokens: usize) -> usize {
        tokens.saturating_sub(self.residual) / self.block() * self.block()
    }

    /// Rows of the per-head residual ring, `R + block` (saturating; [`MikvConfig::validate`]
    /// refuses a residual for which it would not fit).
    pub fn ring_rows(&self) -> usize {
        self.residual.saturating_add(self.block())
    }

    /// Token capacity of the code storage (`capacity` rounded up to whole groups for
    /// `PerChannel`; saturating, and [`MikvConfig::validate`] refuses a capacity for which
    /// it would not fit).
    pub fn code_capacity(&self) -> usize {
        self.capacity.div_ceil(self.block()).saturating_mul(self.block())
    }

    /// Validates the configuration for `heads` heads of dimension `dim`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `lo_bits`, `group`, `residual`, `capacity` or `dim`.
    pub fn validate(&self, heads: usize, dim: usize) -> Result<()> {
        if !matches!(self.lo_bits, 2 | 4) {
            return Err(Error::invalid("lo_bits", format!("{} is not 4 or 2", self.lo_bits)));
        }
        self.lo_spec().validate()?;
        if heads == 0 || dim == 0 {
            return Err(Error::invalid("kv", "Hkv and D must be positive"));
        }
        if self.capacity == 0 {
            return Err(Error::invalid("capacity", "must be positive"));
        }
        let needs_d_groups = self.axis == Axis::PerToken || self.hi == HiPrecision::Int8;
        if needs_d_groups && dim % self.group != 0 {
            return Err(Error::invalid(
                "dim",
                format!("D = {dim} must be a multiple of the group {} (PerToken codes or int8 rows)", self.group),
            ));
        }
        if self.axis == Axis::PerChannel && self.residual % self.group != 0 {
            return Err(Error::invalid(
                "residual",
                format!("{} is not a multiple of the group {} (PerChannel)", self.residual, self.group),
            ));
        }
        // Both sizes are u32 kernel arguments; checking them before any use of the ring size
        // keeps `t % ring_rows` from ever dividing by a wrapped-around zero.
        let ring = self
            .residual
            .checked_add(self.block())
            .ok_or_else(|| Error::too_large("residual", format!("{} plus one block overflows", self.residual)))?;
        to_u32("residual", ring)?;
        let cap = self
            .capacity
            .div_ceil(self.block())
            .checked_mul(self.block())
            .ok_or_else(|| Error::too_large("capacity", format!("{} overflows", self.capacity)))?;
        to_u32("capacity", cap)?;
        to_u32("dim", dim)?;
        crate::tensor::numel("capacity", &[heads, cap, dim])?;
        Ok(())
    }
}

/// Validated important lists: zero-padded `[H, Kmax]` indices and per-head counts.
#[derive(Clone, Debug)]
struct Important {
    kmax: usize,
    idx: Vec<u32>,
    counts: Vec<u32>,
}

fn validate_important(important: &[Vec<u32>], heads: usize, tokens: usize) -> Result<Important> {
    if important.len() != heads {
        return Err(Error::shape("important", &[heads], &[important.len()]));
    }
    for list in important {
        if let Some(&last) = list.last() {
            if last as usize >= tokens {
                return Err(Error::invalid("important", format!("index {last} out of range (T = {tokens})")));
            }
        }
        if list.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("important", "each head's list must be sorted ascending without repeats"));
        }
    }
    let kmax = important.iter().map(Vec::len).max().unwrap_or(0);
    let mut idx = vec![0u32; heads * kmax];
    let mut counts = Vec::with_capacity(heads);
    for (h, list) in important.iter().enumerate() {
        idx[h * kmax..h * kmax + list.len()].copy_from_slice(list);
        counts.push(to_u32("important", list.len())?);
    }
    Ok(Important { kmax, idx, counts })
}

/// The geometry shared by the CPU and GPU caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    cfg: MikvConfig,
    heads: usize,
    dim: usize,
}

impl Geometry {
    fn lo_layout(&self) -> Result<QuantLayout> {
        QuantLayout::new(self.cfg.lo_spec(), &[self.heads, self.cfg.code_capacity(), self.dim])
    }

    fn hi_layout(&self, kmax: usize) -> Result<Option<QuantLayout>> {
        if self.cfg.hi != HiPrecision::Int8 || kmax == 0 {
            return Ok(None);
        }
        QuantLayout::new(self.cfg.hi_spec(), &[self.heads, kmax, self.dim]).map(Some)
    }

    /// Tokens `[t0, t0 + n)` of the code storage, read from values at `x_off + h·x_hs`.
    fn lo_region(&self, t0: usize, n: usize, x_off: usize, x_hs: usize) -> Region {
        let spec = self.cfg.lo_spec();
        let cap = self.cfg.code_capacity();
        let (e, g, d) = (spec.codes_per_word(), spec.group, self.dim);
        let (c_off, s_off) = match spec.axis {
            Axis::PerToken => (t0 * d / e, t0 * d / g),
            Axis::PerChannel => (t0 / e * d, t0 / g * d),
        };
        Region { heads: self.heads, tokens: n, dim: d, x_off, x_hs, c_off, c_hs: cap * d / e, s_off, s_hs: cap * d / g }
    }

    fn ring_len(&self) -> usize {
        self.heads * self.cfg.ring_rows() * self.dim
    }
}

/// The CPU reference of [`MikvCache`]: the same buffers, filled by the same steps.
#[derive(Clone, Debug)]
pub struct MikvCacheCpu {
    geo: Geometry,
    tokens: usize,
    quantized: usize,
    lo: QuantizedHost,
    ring: Vec<f16>,
    important: Important,
    hi_f16: Vec<f16>,
    hi_q: QuantizedHost,
}

fn kv_dims(shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        &[h, t, d] => Ok((h, t, d)),
        _ => Err(Error::invalid("kv", format!("shape {shape:?} is not [Hkv, T, D]"))),
    }
}

impl MikvCacheCpu {
    /// Builds the cache from a prefill tensor `kv` of shape `[Hkv, T, D]` and per-head sorted
    /// important token indices (`important.len() == Hkv`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] / [`Error::Shape`] for a bad config, shape or list (naming
    /// it), `T > capacity`, or [`Error::NonFinite`] for NaN/Inf in `kv`.
    pub fn from_prefill(cfg: MikvConfig, kv: &[f16], shape: &[usize], important: &[Vec<u32>]) -> Result<Self> {
        let (heads, tokens, dim) = kv_dims(shape)?;
        cfg.validate(heads, dim)?;
        check_shape("kv", &[heads * tokens * dim], &[kv.len()])?;
        if tokens > cfg.capacity {
            return Err(Error::invalid("kv", format!("T = {tokens} exceeds the capacity {}", cfg.capacity)));
        }
        let important = validate_important(important, heads, tokens)?;
        cpu::check_values("kv", kv)?;
        let geo = Geometry { cfg, heads, dim };
        let lo_layout = geo.lo_layout()?;
        let mut lo = QuantizedHost::zeros(&lo_layout);
        let quantized = cfg.quantized_len(tokens);
        let spec = cfg.lo_spec();
        cpu::quantize_region(
            &spec,
            &geo.lo_region(0, quantized, 0, tokens * dim),
            kv,
            &mut lo.codes,
            &mut lo.scales,
            &mut lo.mins,
        )?;
        let ring_rows = cfg.ring_rows();
        let mut ring = vec![f16::ZERO; geo.ring_len()];
        // The ring holds the most recent min(T, R + block) tokens; [Tq, T) are live.
        for h in 0..heads {
            for t in tokens.saturating_sub(ring_rows)..tokens {
                let dst = (h * ring_rows + t % ring_rows) * dim;
                let src = (h * tokens + t) * dim;
                ring[dst..dst + dim].copy_from_slice(&kv[src..src + dim]);
            }
        }
        let kmax = important.kmax;
        let mut hi_f16 = vec![f16::ZERO; heads * kmax * dim];
        for h in 0..heads {
            for k in 0..important.counts[h] as usize {
                let t = important.idx[h * kmax + k] as usize;
                let src = (h * tokens + t) * dim;
                let dst = (h * kmax + k) * dim;
                hi_f16[dst..dst + dim].copy_from_slice(&kv[src..src + dim]);
            }
        }
        let mut hi_q = QuantizedHost::default();
        if let Some(layout) = geo.hi_layout(kmax)? {
            hi_q = QuantizedHost::zeros(&layout);
            cpu::quantize_region(
                &layout.spec,
                &layout.region(),
                &hi_f16,
                &mut hi_q.codes,
                &mut hi_q.scales,
                &mut hi_q.mins,
            )?;
            hi_f16 = Vec::new();
        }
        Ok(MikvCacheCpu { geo, tokens, quantized, lo, ring, important, hi_f16, hi_q })
    }

    /// Appends one token (`[Hkv, D]`, one row per head) at position `T`, quantizing the block
    /// that leaves the residual window, if any.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `token`; [`Error::TooLarge`] naming `token` when the cache is
    /// full; [`Error::NonFinite`] for NaN/Inf. Nothing changes on error.
    pub fn append(&mut self, token: &[f16]) -> Result<()> {
        let (heads, dim) = (self.geo.heads, self.geo.dim);
        check_shape("token", &[heads * dim], &[token.len()])?;
        if self.tokens >= self.geo.cfg.capacity {
            return Err(Error::too_large("token", format!("the cache is full ({} tokens)", self.geo.cfg.capacity)));
        }
        cpu::check_values("token", token)?;
        let ring_rows = self.geo.cfg.ring_rows();
        let slot = self.tokens % ring_rows;
        for h in 0..heads {
            let dst = (h * ring_rows + slot) * dim;
            self.ring[dst..dst + dim].copy_from_slice(&token[h * dim..(h + 1) * dim]);
        }
        self.tokens += 1;
        let target = self.geo.cfg.quantized_len(self.tokens);
        if target > self.quantized {
            let n = target - self.quantized;
            let region = self.geo.lo_region(self.quantized, n, (self.quantized % ring_rows) * dim, ring_rows * dim);
            let spec = self.geo.cfg.lo_spec();
            cpu::quantize_region(
                &spec,
                &region,
                &self.ring,
                &mut self.lo.codes,
                &mut self.lo.scales,
                &mut self.lo.mins,
            )?;
            self.quantized = target;
        }
        Ok(())
    }

    len_accessors!();

    /// Reconstructs `[Hkv, T, D]` as f16 (see the module docs for the order of the parts).
    pub fn dequantize_dense(&self) -> Result<Vec<f16>> {
        let (heads, dim, tokens) = (self.geo.heads, self.geo.dim, self.tokens);
        let mut out = vec![f16::ZERO; heads * tokens * dim];
        let spec = self.geo.cfg.lo_spec();
        let region = self.geo.lo_region(0, self.quantized, 0, tokens * dim);
        cpu::dequantize_region(&spec, &region, &self.lo.codes, &self.lo.scales, &self.lo.mins, &mut out)?;
        let kmax = self.important.kmax;
        let hi_rows: Vec<f16> = match self.geo.hi_layout(kmax)? {
            Some(layout) => {
                let mut v = vec![f16::ZERO; layout.numel()];
                cpu::dequantize_region(
                    &layout.spec,
                    &layout.region(),
                    &self.hi_q.codes,
                    &self.hi_q.scales,
                    &self.hi_q.mins,
                    &mut v,
                )?;
                v
            }
            None => self.hi_f16.clone(),
        };
        for h in 0..heads {
            for k in 0..self.important.counts[h] as usize {
                let t = self.important.idx[h * kmax + k] as usize;
                if t < tokens {
                    let src = (h * kmax + k) * dim;
                    let dst = (h * tokens + t) * dim;
                    out[dst..dst + dim].copy_from_slice(&hi_rows[src..src + dim]);
                }
            }
        }
        let ring_rows = self.geo.cfg.ring_rows();
        for h in 0..heads {
            for t in self.quantized..tokens {
                let src = (h * ring_rows + t % ring_rows) * dim;
                let dst = (h * tokens + t) * dim;
                out[dst..dst + dim].copy_from_slice(&self.ring[src..src + dim]);
            }
        }
        Ok(out)
    }

    /// Whether every buffer (codes, scales, mins, ring, important rows) and counter has the
    /// same bits as `other`'s.
    pub fn same_bits(&self, other: &MikvCacheCpu) -> bool {
        self.geo == other.geo
            && self.tokens == other.tokens
            && self.quantized == other.quantized
            && self.lo.same_bits(&other.lo)
            && cpu::same_f16_bits(&self.ring, &other.ring)
            && self.important.kmax == other.important.kmax
            && self.important.idx == other.important.idx
            && self.important.counts == other.important.counts
            && cpu::same_f16_bits(&self.hi_f16, &other.hi_f16)
            && self.hi_q.same_bits(&other.hi_q)
    }
}

/// The MiKV mixed-precision cache on the device; [`MikvCacheCpu`] is its CPU reference,
/// with the same buffers in the same layout.
///
/// # Design
/// One cache holds one f16 tensor `[Hkv, T, D]` (the keys or the values of one layer) in
/// three parts:
/// - **Low precision, every quantized token.** Tokens `[0, Tq)` are quantized with
///   `QuantSpec { bits: lo_bits, group, axis }` into code storage preallocated for
///   `capacity` tokens (laid out like a `[Hkv, capacity, D]` tensor, see the
///   [quant module docs](super)). Groups are positional (token `t` of a `PerChannel` cache is in
///   group `t / group`), so appending tokens one at a time yields exactly the codes that
///   quantizing the whole tensor at once gives.
/// - **High precision, the important tokens.** Per head, a sorted list of important token
///   indices (given at prefill, validated sorted, unique and `< T`). Their rows are copied
///   into `[Hkv, Kmax, D]` (`Kmax` = the longest list, shorter lists zero-padded) as f16, or
///   int8-quantized per token along `D` with the cache's group size ([`HiPrecision`]). They
///   are *also* in the low-precision storage: this keeps the groups positional (a list can
///   later change without requantizing anything) at the cost of `Kmax·D` extra low-bit codes
///   per head, a few percent for MiKV's typical 10–20 % important tokens.
/// - **Residual window.** The most recent tokens stay f16 in a per-head ring buffer of
///   `R + block` rows, where `block` is `group` for `PerChannel` (a group must be whole) and 1
///   for `PerToken`. The quantized prefix is always
///   `Tq = ⌊max(T − R, 0) / block⌋ · block`, so the residual holds `T − Tq` tokens: between
///   `R` and `R + block − 1` once `T ≥ R` (the ring holds the last `min(T, R + block)`
///   tokens; `[Tq, T)` of them are live). When an append makes a whole block older than
///   the window, that block is quantized from the ring into the code storage (one kernel
///   launch); a partial group simply waits in the ring. Nothing is dropped: every token
///   `t < T` is in the codes or in the ring.
///
/// [`MikvCache::dequantize_dense`] rebuilds `[Hkv, T, D]`: the codes of `[0, Tq)`, then the
/// important rows over them, then the residual rows over everything (so a token still in the
/// window is exact f16 even if it is important and int8). Important rows come back exactly
/// (f16) or within the int8 bound `scale/2 + ε` of their own group.
///
/// Appended tokens are never important (lists refer to prefill tokens): they join the
/// low-precision storage when their block leaves the window, as in KIVI.
///
/// # Example
/// ```no_run
/// # fn main() -> ntkv::Result<()> {
/// use half::f16;
/// use ntkv::quant::{Axis, HiPrecision, MikvCache, MikvConfig};
/// use ntkv::{Device, DeviceTensor};
/// let dev = Device::new(0)?;
/// let cfg = MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerChannel, residual: 128, capacity: 8192 };
/// let kv = DeviceTensor::<f16>::zeros(&dev, &[8, 1000, 128])?;
/// let important: Vec<Vec<u32>> = (0..8).map(|_| vec![0, 5, 17]).collect();
/// let mut cache = MikvCache::from_prefill(&dev, cfg, &kv, &important)?;
/// cache.append(&DeviceTensor::<f16>::zeros(&dev, &[8, 128])?)?;
/// let mut dense = DeviceTensor::<f16>::zeros(&dev, &[8, 1001, 128])?;
/// cache.dequantize_dense(&mut dense)?;
/// # Ok(()) }
/// ```
pub struct MikvCache {
    device: Device,
    geo: Geometry,
    tokens: usize,
    quantized: usize,
    lo_codes: CudaSlice<u32>,
    lo_scales: CudaSlice<f16>,
    lo_mins: CudaSlice<f16>,
    ring: CudaSlice<f16>,
    important: Important,
    /// `[Hkv, Kmax]` indices and `[Hkv]` counts on the device (None when `Kmax == 0`).
    imp_dev: Option<(CudaSlice<u32>, CudaSlice<u32>)>,
    hi_f16: Option<CudaSlice<f16>>,
    hi_q: Option<(CudaSlice<u32>, CudaSlice<f16>, CudaSlice<f16>)>,
}

impl std::fmt::Debug for MikvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MikvCache")
            .field("config", &self.geo.cfg)
            .field("heads", &self.geo.heads)
            .field("dim", &self.geo.dim)
            .field("tokens", &self.tokens)
            .field("quantized", &self.quantized)
            .finish()
    }
}

impl MikvCache {
    /// Builds the cache on the device from a prefill tensor `kv` `[Hkv, T, D]` (f16) and per-head
    /// sorted important token indices (`important.len() == Hkv`, each list sorted ascending,
    /// unique, `< T`).
    ///
    /// # Errors
    /// As [`MikvCacheCpu::from_prefill`]; every check runs before anything is allocated or
    /// launched. The finiteness check runs on the device (synchronizes once).
    pub fn from_prefill(
        device: &Device,
        cfg: MikvConfig,
        kv: &impl TensorRef<f16>,
        important: &[Vec<u32>],
    ) -> Result<Self> {
        device.check_tensor("kv", kv)?;
        let (heads, tokens, dim) = kv_dims(kv.shape())?;
        cfg.validate(heads, dim)?;
        if tokens > cfg.capacity {
            return Err(Error::invalid("kv", format!("T = {tokens} exceeds the capacity {}", cfg.capacity)));
        }
        let important = validate_important(important, heads, tokens)?;
        let kv_view = kv.cuda_view();
        ensure_finite(device, "kv", &kv_view)?;
        let geo = Geometry { cfg, heads, dim };
        let stream = device.stream();
        let lo_layout = geo.lo_layout()?;
        let mut lo_codes = stream.alloc_zeros::<u32>(lo_layout.n_words())?;
        let mut lo_scales = stream.alloc_zeros::<f16>(lo_layout.n_groups())?;
        let mut lo_mins = stream.alloc_zeros::<f16>(lo_layout.n_groups())?;
        let quantized = cfg.quantized_len(tokens);
        let mut flags = gpu::new_flags(device)?;
        gpu::quantize_region(
            device,
            &cfg.lo_spec(),
            &geo.lo_region(0, quantized, 0, tokens * dim),
            &kv_view,
            &mut lo_codes.as_view_mut(),
            &mut lo_scales.as_view_mut(),
            &mut lo_mins.as_view_mut(),
            &mut flags,
        )?;
        let ring_rows = cfg.ring_rows();
        let mut ring = stream.alloc_zeros::<f16>(geo.ring_len())?;
        gpu::copy_rows(
            device,
            gpu::RowCopy::Residual,
            &Rows {
                heads,
                dim,
                rows: tokens.min(ring_rows),
                src_hs: tokens * dim,
                dst_hs: ring_rows * dim,
                src_rows: tokens,
                dst_rows: ring_rows,
                first: tokens.saturating_sub(ring_rows),
                ring: ring_rows,
                to_ring: true,
            },
            &kv_view,
            &mut ring.as_view_mut(),
        )?;
        let kmax = important.kmax;
        let (mut imp_dev, mut hi_f16, mut hi_q) = (None, None, None);
        if kmax > 0 {
            let idx = stream.clone_htod(&important.idx)?;
            let counts = stream.clone_htod(&important.counts)?;
            let mut rows = stream.alloc_zeros::<f16>(heads * kmax * dim)?;
            let m = Rows {
                heads,
                dim,
                rows: kmax,
                src_hs: tokens * dim,
                dst_hs: kmax * dim,
                src_rows: tokens,
                dst_rows: kmax,
                first: 0,
                ring: 0,
                to_ring: false,
            };
            gpu::move_rows(
                device,
                gpu::RowMove::Gather,
                &m,
                &kv_view,
                &idx.as_view(),
                &counts.as_view(),
                &mut rows.as_view_mut(),
            )?;
            if let Some(layout) = geo.hi_layout(kmax)? {
                let mut codes = stream.alloc_zeros::<u32>(layout.n_words())?;
                let mut scales = stream.alloc_zeros::<f16>(layout.n_groups())?;
                let mut mins = stream.alloc_zeros::<f16>(layout.n_groups())?;
                gpu::quantize_region(
                    device,
                    &layout.spec,
                    &layout.region(),
                    &rows.as_view(),
                    &mut codes.as_view_mut(),
                    &mut scales.as_view_mut(),
                    &mut mins.as_view_mut(),
                    &mut flags,
                )?;
                hi_q = Some((codes, scales, mins));
            } else {
                hi_f16 = Some(rows);
            }
            imp_dev = Some((idx, counts));
        }
        Ok(MikvCache {
            device: device.clone(),
            geo,
            tokens,
            quantized,
            lo_codes,
            lo_scales,
            lo_mins,
            ring,
            important,
            imp_dev,
            hi_f16,
            hi_q,
        })
    }

    /// Appends one decode token `[Hkv, D]` (f16) at position `T`. When a whole block leaves the
    /// residual window it is quantized (one extra launch).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `token`; [`Error::TooLarge`] naming `token` when the cache is
    /// full; [`Error::NonFinite`] for NaN/Inf (checked on the device first, one sync).
    /// Nothing changes on error.
    pub fn append(&mut self, token: &impl TensorRef<f16>) -> Result<()> {
        let device = &self.device;
        device.check_tensor("token", token)?;
        let (heads, dim) = (self.geo.heads, self.geo.dim);
        if token.len() != heads * dim || token.shape().iter().product::<usize>() != token.len() {
            return Err(Error::shape("token", &[heads, dim], token.shape()));
        }
        if self.tokens >= self.geo.cfg.capacity {
            return Err(Error::too_large("token", format!("the cache is full ({} tokens)", self.geo.cfg.capacity)));
        }
        let token_view = token.cuda_view();
        ensure_finite(device, "token", &token_view)?;
        let ring_rows = self.geo.cfg.ring_rows();
        let m = Rows {
            heads,
            dim,
            rows: 1,
            src_hs: dim,
            dst_hs: ring_rows * dim,
            src_rows: 1,
            dst_rows: ring_rows,
            first: self.tokens % ring_rows,
            ring: ring_rows,
            to_ring: false,
        };
        gpu::copy_rows(device, gpu::RowCopy::Append, &m, &token_view, &mut self.ring.as_view_mut())?;
        let target = self.geo.cfg.quantized_len(self.tokens + 1);
        if target > self.quantized {
            let n = target - self.quantized;
            let region = self.geo.lo_region(self.quantized, n, (self.quantized % ring_rows) * dim, ring_rows * dim);
            let mut flags = gpu::new_flags(device)?;
            gpu::quantize_region(
                device,
                &self.geo.cfg.lo_spec(),
                &region,
                &self.ring.as_view(),
                &mut self.lo_codes.as_view_mut(),
                &mut self.lo_scales.as_view_mut(),
                &mut self.lo_mins.as_view_mut(),
                &mut flags,
            )?;
            self.quantized = target;
        }
        self.tokens += 1;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &MikvConfig {
        &self.geo.cfg
    }

    len_accessors!();

    /// Reconstructs the cache as `[Hkv, T, D]` f16 into `out`: the codes of `[0, Tq)`, then the
    /// important rows, then the residual rows.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `out` when it is not `[Hkv, T, D]`; nothing is written then.
    pub fn dequantize_dense(&self, out: &mut impl TensorMut<f16>) -> Result<()> {
        let device = &self.device;
        device.check_tensor("out", out)?;
        let (heads, dim, tokens) = (self.geo.heads, self.geo.dim, self.tokens);
        check_shape("out", &[heads, tokens, dim], out.shape())?;
        let mut out_view = out.cuda_view_mut();
        let region = self.geo.lo_region(0, self.quantized, 0, tokens * dim);
        gpu::dequantize_region(
            device,
            &self.geo.cfg.lo_spec(),
            &region,
            &self.lo_codes.as_view(),
            &self.lo_scales.as_view(),
            &self.lo_mins.as_view(),
            &mut out_view,
        )?;
        let kmax = self.important.kmax;
        if let Some((idx, counts)) = &self.imp_dev {
            let scratch;
            let rows: &CudaSlice<f16> = match (&self.hi_f16, &self.hi_q, self.geo.hi_layout(kmax)?) {
                (Some(r), _, _) => r,
                (None, Some((codes, scales, mins)), Some(layout)) => {
                    let mut tmp = device.stream().alloc_zeros::<f16>(layout.numel())?;
                    gpu::dequantize_region(
                        device,
                        &layout.spec,
                        &layout.region(),
                        &codes.as_view(),
                        &scales.as_view(),
                        &mins.as_view(),
                        &mut tmp.as_view_mut(),
                    )?;
                    scratch = tmp;
                    &scratch
                }
                _ => return Err(Error::internal("MiKV cache: important rows missing")),
            };
            let m = Rows {
                heads,
                dim,
                rows: kmax,
                src_hs: kmax * dim,
                dst_hs: tokens * dim,
                src_rows: kmax,
                dst_rows: tokens,
                first: 0,
                ring: 0,
                to_ring: false,
            };
            gpu::move_rows(
                device,
                gpu::RowMove::Scatter,
                &m,
                &rows.as_view(),
                &idx.as_view(),
                &counts.as_view(),
                &mut out_view,
            )?;
        }
        let ring_rows = self.geo.cfg.ring_rows();
        let m = Rows {
            heads,
            dim,
            rows: tokens - self.quantized,
            src_hs: ring_rows * dim,
            dst_hs: tokens * dim,
            src_rows: ring_rows,
            dst_rows: tokens,
            first: self.quantized,
            ring: ring_rows,
            to_ring: false,
        };
        gpu::copy_rows(device, gpu::RowCopy::Residual, &m, &self.ring.as_view(), &mut out_view)
    }

    /// The device buffers and geometry a fused decode reads (see [`crate::qdecode`]).
    pub(crate) fn decode_parts(&self) -> MikvParts<'_> {
        MikvParts {
            cfg: self.geo.cfg,
            heads: self.geo.heads,
            dim: self.geo.dim,
            tokens: self.tokens,
            quantized: self.quantized,
            kmax: self.important.kmax,
            lo: (&self.lo_codes, &self.lo_scales, &self.lo_mins),
            ring: &self.ring,
            important: self.imp_dev.as_ref().map(|(i, c)| (i, c)),
            hi_f16: self.hi_f16.as_ref(),
            hi_q: self.hi_q.as_ref().map(|(c, s, m)| (c, s, m)),
        }
    }

    /// Downloads every buffer into the CPU reference's form, for bit-exact comparison
    /// ([`MikvCacheCpu::same_bits`]). Synchronizes.
    pub fn to_cpu(&self) -> Result<MikvCacheCpu> {
        let stream = self.ring.stream();
        let lo = QuantizedHost {
            codes: stream.clone_dtoh(&self.lo_codes)?,
            scales: stream.clone_dtoh(&self.lo_scales)?,
            mins: stream.clone_dtoh(&self.lo_mins)?,
        };
        let hi_f16 = match &self.hi_f16 {
            Some(r) => stream.clone_dtoh(r)?,
            None => Vec::new(),
        };
        let hi_q = match &self.hi_q {
            Some((c, s, m)) => QuantizedHost {
                codes: stream.clone_dtoh(c)?,
                scales: stream.clone_dtoh(s)?,
                mins: stream.clone_dtoh(m)?,
            },
            None => QuantizedHost::default(),
        };
        Ok(MikvCacheCpu {
            geo: self.geo,
            tokens: self.tokens,
            quantized: self.quantized,
            lo,
            ring: stream.clone_dtoh(&self.ring)?,
            important: self.important.clone(),
            hi_f16,
            hi_q,
        })
    }
}

/// A borrowed view of a [`MikvCache`]'s buffers for the fused decode: the geometry, the
/// low-precision codes, scales and mins (`[Hkv, code_capacity, D]` layout), the residual ring
/// (`[Hkv, R + block, D]`), the important lists (`[Hkv, Kmax]`, counts `[Hkv]`) and their f16
/// rows or int8 codes, scales and mins (`[Hkv, Kmax, D]` layout).
pub(crate) struct MikvParts<'a> {
    pub cfg: MikvConfig,
    pub heads: usize,
    pub dim: usize,
    pub tokens: usize,
    pub quantized: usize,
    pub kmax: usize,
    pub lo: (&'a CudaSlice<u32>, &'a CudaSlice<f16>, &'a CudaSlice<f16>),
    pub ring: &'a CudaSlice<f16>,
    pub important: Option<(&'a CudaSlice<u32>, &'a CudaSlice<u32>)>,
    pub hi_f16: Option<&'a CudaSlice<f16>>,
    pub hi_q: Option<(&'a CudaSlice<u32>, &'a CudaSlice<f16>, &'a CudaSlice<f16>)>,
}
