//! Fused quantized-decode cases (issue 11's bars): 1 query × 32 heads (MHA, D = 128) over a
//! 128k-token cache with K quantized per channel and V per token (KIVI's layout), group 32, at
//! int4, int2 and int8; ntkv's own f16 decode ([`ntkv::decode`] over every token) on the same
//! tokens; and a MiKV cache pair (int4, 10% important f16 rows, a 128-token residual).
//!
//! Each record's bytes are what the kernel reads: the codes, scales and mins (and for MiKV
//! the important rows, their lists and the residual), plus q, o and lse, so its share of the
//! in-run copy bandwidth is the "% of copy bandwidth on the bytes actually read".
//! The caches (671 MB at int4) are far larger than the 60 MB L2, so no rotation is needed;
//! their contents do not change the work, so they are zero-filled on the device.

use half::f16;
use ntkv::decode::{DecodeOptions, DecodePlan, DecodeShape};
use ntkv::qdecode::{cpu, KiviCache, QdecodeCache, QdecodeOptions, QdecodePlan, QdecodeShape};
use ntkv::quant::{Axis, HiPrecision, MikvCache, MikvConfig, QuantLayout, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

use crate::harness::{Bench, Work};

const FAMILY: &str = "qdecode";
/// The shape: 32 heads, 128k tokens, D = 128, group 32.
pub(crate) const SHAPE: &str = "B1 Hq32 Hkv32 T131072 D128 g32";
pub(crate) const HEADS: usize = 32;
pub(crate) const TOKENS: usize = 131072;
pub(crate) const DIM: usize = 128;
pub(crate) const GROUP: usize = 32;
/// The KIVI cases: (op, bits).
pub(crate) const KIVI_CASES: &[(&str, u32)] =
    &[("qdecode_kivi_int4", 4), ("qdecode_kivi_int2", 2), ("qdecode_kivi_int8", 8)];
/// The int4 KIVI case on the general kernel (`QdecodePlan::set_fast_path(false)`), for
/// comparison with the fast kernel's `qdecode_kivi_int4`.
pub(crate) const GENERAL_OP: &str = "qdecode_kivi_int4_general";
/// The MiKV case: residual window and one important token in `IMPORTANT_EVERY`.
pub(crate) const MIKV_OP: &str = "qdecode_mikv_int4_imp10";
const MIKV_RESIDUAL: usize = 128;
const IMPORTANT_EVERY: usize = 10;

pub(crate) fn shape(capacity: usize) -> QdecodeShape {
    QdecodeShape { batch: 1, q_tokens: 1, hq: HEADS, hkv: HEADS, head_dim: DIM, capacity }
}

/// q, o and lse of one f16 query per head.
fn io_bytes() -> f64 {
    (HEADS * DIM * 2 * 2 + HEADS * 4) as f64
}

/// Bytes of one operand's codes, scales and mins for `tokens` tokens.
fn coded_bytes(bits: u32, tokens: usize) -> f64 {
    let n = (HEADS * tokens * DIM) as f64;
    n * bits as f64 / 8.0 + 2.0 * 2.0 * n / GROUP as f64
}

fn kivi_gpu(b: &mut Bench, dev: &Device, op: &str, bits: u32, fast: bool) -> ntkv::Result<()> {
    let s = shape(TOKENS);
    let dims = [1, HEADS, TOKENS, DIM];
    let k = QuantizedTensor::zeros(dev, &QuantLayout::new(QuantSpec::new(bits, GROUP, Axis::PerChannel)?, &dims)?)?;
    let v = QuantizedTensor::zeros(dev, &QuantLayout::new(QuantSpec::new(bits, GROUP, Axis::PerToken)?, &dims)?)?;
    let res = DeviceTensor::<f16>::zeros(dev, &[1, HEADS, 1, DIM])?;
    let q = DeviceTensor::from_host(
        dev,
        &Rng::new(1).normal_vec(HEADS * DIM).into_iter().map(f16::from_f32).collect::<Vec<_>>(),
        &s.q_shape(),
    )?;
    let mut o = DeviceTensor::<f16>::zeros(dev, &s.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &s.lse_shape())?;
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions::default())?;
    plan.set_fast_path(fast);
    let cache = QdecodeCache::Kivi(KiviCache { k: &k, v: &v, k_residual: &res, v_residual: &res, residual_len: 0 });
    let bytes = 2.0 * coded_bytes(bits, TOKENS) + io_bytes();
    let flops = 4.0 * (HEADS * TOKENS * DIM) as f64;
    b.gpu(FAMILY, op, SHAPE, "f16", Work { bytes, flops }, |_| plan.run(&q, &cache, None, &mut o, &mut lse))
}

fn f16_decode_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let s = DecodeShape { batch: 1, q_tokens: 1, hq: HEADS, hkv: HEADS, head_dim: DIM, capacity: TOKENS };
    let k = DeviceTensor::<f16>::zeros(dev, &s.kv_shape())?;
    let v = DeviceTensor::<f16>::zeros(dev, &s.kv_shape())?;
    let q = DeviceTensor::<f16>::zeros(dev, &s.q_shape())?;
    let mut o = DeviceTensor::<f16>::zeros(dev, &s.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &s.lse_shape())?;
    let indptr: Vec<u32> = (0..=HEADS).map(|h| (h * TOKENS) as u32).collect();
    let indices: Vec<u32> = (0..HEADS).flat_map(|_| 0..TOKENS as u32).collect();
    let ip = DeviceTensor::from_host(dev, &indptr, &[indptr.len()])?;
    let ix = DeviceTensor::from_host(dev, &indices, &[indices.len()])?;
    let mut plan = DecodePlan::new(dev, &s, DecodeOptions::default(), &[TOKENS as u32], &ip, &ix)?;
    let bytes = 2.0 * (HEADS * TOKENS * DIM * 2) as f64 + (HEADS * TOKENS * 4) as f64 + io_bytes();
    let flops = 4.0 * (HEADS * TOKENS * DIM) as f64;
    b.gpu(FAMILY, "qdecode_f16_decode", SHAPE, "f16", Work { bytes, flops }, |_| plan.run(&q, &k, &v, &mut o, &mut lse))
}

fn mikv_cfg(axis: Axis) -> MikvConfig {
    MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: GROUP, axis, residual: MIKV_RESIDUAL, capacity: TOKENS }
}

fn mikv_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let s = shape(TOKENS);
    let mut rng = Rng::new(3);
    let important: Vec<Vec<u32>> =
        (0..HEADS).map(|_| (0..TOKENS as u32).filter(|_| rng.below(IMPORTANT_EVERY) == 0).collect()).collect();
    let n_imp: usize = important.iter().map(Vec::len).sum();
    let (k, v) = {
        let kv = DeviceTensor::<f16>::zeros(dev, &[HEADS, TOKENS, DIM])?;
        (
            MikvCache::from_prefill(dev, mikv_cfg(Axis::PerChannel), &kv, &important)?,
            MikvCache::from_prefill(dev, mikv_cfg(Axis::PerToken), &kv, &important)?,
        )
    };
    let q = DeviceTensor::from_host(
        dev,
        &rng.normal_vec(HEADS * DIM).into_iter().map(f16::from_f32).collect::<Vec<_>>(),
        &s.q_shape(),
    )?;
    let mut o = DeviceTensor::<f16>::zeros(dev, &s.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &s.lse_shape())?;
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions::default())?;
    let cache = QdecodeCache::Mikv { k: &k, v: &v };
    let quantized = k.quantized_len();
    // The fast kernel reads every quantized word row of K and V (important tokens share
    // them; their weights are zeroed), the important f16 rows, the lists and the live
    // residual.
    let bytes = coded_bytes(4, quantized)
        + coded_bytes(4, quantized)
        + 2.0 * (n_imp * DIM * 2 + n_imp * 4) as f64
        + 2.0 * ((TOKENS - quantized) * HEADS * DIM * 2) as f64
        + io_bytes();
    let flops = 4.0 * (HEADS * TOKENS * DIM) as f64;
    b.gpu(FAMILY, MIKV_OP, SHAPE, "f16", Work { bytes, flops }, |_| plan.run(&q, &cache, None, &mut o, &mut lse))
}

/// Without a GPU: the CPU reference over a small KIVI cache (8 heads, 4096 tokens).
fn cpu_case(b: &mut Bench, op: &str, bits: u32) -> ntkv::Result<()> {
    let (heads, tokens) = (8, 4096);
    let s = QdecodeShape { batch: 1, q_tokens: 1, hq: heads, hkv: heads, head_dim: DIM, capacity: tokens };
    let mut rng = Rng::new(5);
    let dims = [heads, tokens, DIM];
    let x: Vec<f16> = rng.normal_vec(heads * tokens * DIM).into_iter().map(f16::from_f32).collect();
    let kspec = QuantSpec::new(bits, GROUP, Axis::PerChannel)?;
    let vspec = QuantSpec::new(bits, GROUP, Axis::PerToken)?;
    let kq = ntkv::quant::cpu::quantize(kspec, &dims, &x)?;
    let vq = ntkv::quant::cpu::quantize(vspec, &dims, &x)?;
    let q: Vec<f16> = rng.normal_vec(heads * DIM).into_iter().map(f16::from_f32).collect();
    let shape = format!("B1 Hq{heads} Hkv{heads} T{tokens} D{DIM} g{GROUP}");
    let bytes = 2.0 * (heads * tokens * DIM) as f64 * (bits as f64 / 8.0 + 4.0 / GROUP as f64);
    b.cpu(FAMILY, op, &shape, "f16", Work::bytes(bytes), |_| {
        let k = cpu::kivi_dense(kspec, dims, &kq, &[f16::ZERO; DIM * 8], 1, 0)?;
        let v = cpu::kivi_dense(vspec, dims, &vq, &[f16::ZERO; DIM * 8], 1, 0)?;
        cpu::reference(&s, &QdecodeOptions::default(), &q, &k, &v, tokens, None).map(|_| ())
    })
}

pub fn run(b: &mut Bench) -> ntkv::Result<()> {
    match b.device.clone() {
        Some(dev) => {
            for &(op, bits) in KIVI_CASES {
                if b.wants(FAMILY, op) {
                    kivi_gpu(b, &dev, op, bits, true)?;
                }
            }
            if b.wants(FAMILY, GENERAL_OP) {
                kivi_gpu(b, &dev, GENERAL_OP, 4, false)?;
            }
            if b.wants(FAMILY, "qdecode_f16_decode") {
                f16_decode_gpu(b, &dev)?;
            }
            if b.wants(FAMILY, MIKV_OP) {
                mikv_gpu(b, &dev)?;
            }
        }
        None => {
            for &(op, bits) in KIVI_CASES {
                if b.wants(FAMILY, op) {
                    cpu_case(b, op, bits)?;
                }
            }
        }
    }
    Ok(())
}
