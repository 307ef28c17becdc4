//! Quantization cases (the peer table of docs/benchmarks.md: int4 group-32 over 4M tokens × 128).
//!
//! Keys (op | shape | dtype), shared with tools/peers/quant.py:
//! - `dequant | 4194304x128 g32 int4 per_token | f16`: codes + scales + mins read, f16 written;
//! - `quant | … | f16`: the default checked quantize (a device scan of the input, then the
//!   kernel): the same minimum bytes are counted, although the input is read twice;
//! - `quant_single_pass | … | f16`: the kernel flags bad values itself (input read once);
//! - further bit widths and axes at the same shape, and the MiKV dense reconstruction.
//!
//! Without a GPU the CPU reference runs at 4096 × 128.

use half::f16;
use ntkv::quant::cpu;
use ntkv::quant::{
    Axis, HiPrecision, MikvCache, MikvConfig, QuantLayout, QuantPlan, QuantShape, QuantSpec, QuantizedTensor,
};
use ntkv::rng::Rng;
use ntkv::{DType, Device, DeviceTensor};

use crate::harness::{Bench, Work};

const FAMILY: &str = "quant";
/// The anchor shape: 4M tokens × 128 channels.
const TOKENS: usize = 4_194_304;
const DIM: usize = 128;
/// Rows of the CPU fallback.
const CPU_TOKENS: usize = 4096;

fn shape_key(tokens: usize, spec: &QuantSpec) -> String {
    format!("{tokens}x{DIM} g{} int{} {}", spec.group, spec.bits, spec.axis.name())
}

/// Bytes of codes + scales + mins for `n` values.
fn packed_bytes(n: usize, spec: &QuantSpec) -> f64 {
    (n * spec.bits as usize / 8 + 4 * (n / spec.group)) as f64
}

/// `n` f16 values: a 1M-value random block, tiled (generating 537M normals on the host would
/// take longer than every timed case together; the kernels' speed does not depend on it).
fn tiled_f16(n: usize, seed: u64) -> Vec<f16> {
    let block: Vec<f16> = Rng::new(seed).normal_vec(1 << 20).into_iter().map(f16::from_f32).collect();
    (0..n).map(|i| block[i & ((1 << 20) - 1)]).collect()
}

fn specs() -> ntkv::Result<Vec<QuantSpec>> {
    Ok(vec![
        QuantSpec::new(4, 32, Axis::PerToken)?,
        QuantSpec::new(2, 64, Axis::PerToken)?,
        QuantSpec::new(8, 128, Axis::PerToken)?,
        QuantSpec::new(4, 32, Axis::PerChannel)?,
    ])
}

/// The timed MiKV layout: int4 keys per channel in groups of 32, f16 important rows, a
/// residual of 128.
fn mikv_config(capacity: usize) -> MikvConfig {
    MikvConfig { lo_bits: 4, hi: HiPrecision::F16, group: 32, axis: Axis::PerChannel, residual: 128, capacity }
}

pub fn run_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let shape = [TOKENS, DIM];
    let n = TOKENS * DIM;
    let x = DeviceTensor::from_host(dev, &tiled_f16(n, 1), &shape)?;
    let mut y = DeviceTensor::<f16>::zeros(dev, &shape)?;
    for (i, spec) in specs()?.into_iter().enumerate() {
        let key = shape_key(TOKENS, &spec);
        let plan = QuantPlan::new(dev, &QuantShape { dims: shape.to_vec(), dtype: DType::F16 }, spec)?;
        let mut q = QuantizedTensor::zeros(dev, plan.layout())?;
        plan.quantize(&x, &mut q)?;
        let bytes = Work::bytes(packed_bytes(n, &spec) + (n * 2) as f64);
        // Dequantization is one FMA per value.
        let dequant_work = Work { bytes: bytes.bytes, ..Work::flops(2.0 * n as f64) };
        if b.wants(FAMILY, "dequant") {
            b.gpu(FAMILY, "dequant", &key, "f16", dequant_work, |_| plan.dequantize(&q, &mut y))?;
        }
        // The checked and single-pass quantize at the anchor spec and the KIVI key spec.
        if i == 0 || spec.axis == Axis::PerChannel {
            if b.wants(FAMILY, "quant") {
                b.gpu(FAMILY, "quant", &key, "f16", bytes, |_| plan.quantize(&x, &mut q))?;
            }
            if b.wants(FAMILY, "quant_single_pass") {
                // The flag read-back is deferred past the timed region, as a pipeline that
                // checks once per step would do; every flag is still checked below.
                let mut pending = Vec::new();
                b.gpu(FAMILY, "quant_single_pass", &key, "f16", bytes, |_| {
                    pending.push(plan.quantize_deferred(&x, &mut q)?);
                    Ok(())
                })?;
                for p in pending {
                    p.wait()?;
                }
            }
        }
    }
    drop(y);
    drop(x);
    if b.wants(FAMILY, "mikv_dense") {
        // 32 KV heads × 32768 tokens × 128, int4 keys (per channel, group 32), 10% important
        // tokens in f16, residual 128: rebuild the dense f16 tensor.
        let (heads, tokens) = (32usize, 32_768usize);
        let cfg = mikv_config(tokens + 1024);
        let kv = DeviceTensor::from_host(dev, &tiled_f16(heads * tokens * DIM, 2), &[heads, tokens, DIM])?;
        let important: Vec<Vec<u32>> =
            (0..heads).map(|h| (0..tokens as u32).filter(|t| (t + h as u32) % 10 == 0).collect()).collect();
        let cache = MikvCache::from_prefill(dev, cfg, &kv, &important)?;
        let mut out = DeviceTensor::<f16>::zeros(dev, &[heads, tokens, DIM])?;
        let m = heads * tokens * DIM;
        let spec = cfg.lo_spec();
        let bytes = Work::bytes(packed_bytes(m, &spec) + (m * 2) as f64 + (m / 10 * 2 * 2) as f64);
        let key = format!("{heads}x{tokens}x{DIM} g32 int4 per_channel hi_f16 10%");
        b.gpu(FAMILY, "mikv_dense", &key, "f16", bytes, |_| cache.dequantize_dense(&mut out))?;
    }
    Ok(())
}

pub fn run_cpu(b: &mut Bench) -> ntkv::Result<()> {
    let shape = [CPU_TOKENS, DIM];
    let n = CPU_TOKENS * DIM;
    let x: Vec<f16> = tiled_f16(n, 1);
    for (i, spec) in specs()?.into_iter().enumerate() {
        QuantLayout::new(spec, &shape)?;
        let key = shape_key(CPU_TOKENS, &spec);
        let q = cpu::quantize(spec, &shape, &x)?;
        let bytes = Work::bytes(packed_bytes(n, &spec) + (n * 2) as f64);
        if b.wants(FAMILY, "dequant") {
            b.cpu(FAMILY, "dequant", &key, "f16", bytes, |_| cpu::dequantize::<f16>(spec, &shape, &q).map(drop))?;
        }
        if (i == 0 || spec.axis == Axis::PerChannel) && b.wants(FAMILY, "quant") {
            b.cpu(FAMILY, "quant", &key, "f16", bytes, |_| cpu::quantize(spec, &shape, &x).map(drop))?;
        }
    }
    if b.wants(FAMILY, "mikv_dense") {
        let (heads, tokens) = (4usize, 1024usize);
        let cfg = mikv_config(tokens);
        let kv = tiled_f16(heads * tokens * DIM, 2);
        let important: Vec<Vec<u32>> = (0..heads).map(|_| (0..tokens as u32).step_by(10).collect()).collect();
        let cache = cpu::MikvCacheCpu::from_prefill(cfg, &kv, &[heads, tokens, DIM], &important)?;
        let m = heads * tokens * DIM;
        let bytes = Work::bytes(packed_bytes(m, &cfg.lo_spec()) + (m * 2) as f64);
        let key = format!("{heads}x{tokens}x{DIM} g32 int4 per_channel hi_f16 10%");
        b.cpu(FAMILY, "mikv_dense", &key, "f16", bytes, |_| cache.dequantize_dense().map(drop))?;
    }
    Ok(())
}
