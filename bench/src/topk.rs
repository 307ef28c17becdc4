//! Top-k, H2O and SnapKV cases: the top-k rows of the family's bars, one H2O step
//! (accumulate + select) and one SnapKV selection.
//!
//! The op, shape and dtype strings are the join keys with tools/peers/topk.py.
use half::{bf16, f16};
use ntkv::rng::Rng;
use ntkv::topk::{
    self, cpu, AttnShape, GqaReduce, H2oOptions, H2oPlan, SnapKvOptions, SnapKvPlan, TopkOptions, TopkPlan, TopkShape,
};
use ntkv::{DType, Device, DeviceTensor, Float};

use crate::harness::{Bench, Work};

const FAMILY: &str = "topk";

/// The top-k shapes of the family's bars: (rows, n, k, dtype). The geometry step uses them too.
pub(crate) const TOPK_CASES: &[(usize, usize, usize, DType)] = &[
    (32, 131072, 2048, DType::F32),
    (32, 131072, 2048, DType::F16),
    (32, 131072, 2048, DType::BF16),
    (256, 32768, 1024, DType::F32),
    (32, 1048576, 8192, DType::F32),
    (1, 1048576, 4096, DType::F32),
];

/// Tie-heavy rows, timed as `topk_ties`: every score equal, so the whole row lands in one
/// histogram bucket and every element is a candidate (an all-zero H2O accumulator is the
/// `zero` case; `equal` is any other constant). (rows, n, k, fill name, fill value).
pub(crate) const TIE_CASES: &[(usize, usize, usize, &str, f32)] =
    &[(32, 131072, 2048, "zero", 0.0), (32, 131072, 2048, "equal", 0.5), (32, 1048576, 8192, "zero", 0.0)];
/// The same fills at the CPU reference's size (no GPU).
const TIE_CASES_CPU: &[(usize, usize, usize, &str, f32)] =
    &[(8, 16384, 256, "zero", 0.0), (8, 16384, 256, "equal", 0.5)];

/// H2O: 32 heads (MHA), 16 new queries over 32k keys, D = 128, keep 2048 with 64 recent.
const H2O: (AttnShape, usize, usize) = (AttnShape { hq: 32, hkv: 32, tq: 16, t: 32768, d: 128 }, 2048, 64);
/// SnapKV: 32 heads, window 32 over 32k keys, D = 128, pool 5, keep 2048.
const SNAPKV: (AttnShape, usize) = (AttnShape { hq: 32, hkv: 32, tq: 32, t: 32768, d: 128 }, 2048);

pub fn topk_shape(rows: usize, n: usize, k: usize) -> String {
    format!("{rows}x{n} k{k}")
}

pub fn tie_shape(rows: usize, n: usize, k: usize, fill: &str) -> String {
    format!("{rows}x{n} k{k} {fill}")
}

pub fn h2o_shape(s: AttnShape, budget: usize, recent: usize) -> String {
    format!("hq{} hkv{} tq{} t{} d{} keep{budget} recent{recent}", s.hq, s.hkv, s.tq, s.t, s.d)
}

pub fn snapkv_shape(s: AttnShape, capacity: usize) -> String {
    format!("hq{} hkv{} w{} t{} d{} keep{capacity} pool5", s.hq, s.hkv, s.tq, s.t, s.d)
}

/// Enough copies of an input of `bytes` to cycle through more than the 60 MB L2 (at most 8).
fn rotation(bytes: usize) -> usize {
    (128usize << 20).div_ceil(bytes.max(1)).clamp(1, 8)
}

fn time_topk<T: Float>(b: &mut Bench, dev: &Device, rows: usize, n: usize, k: usize) -> ntkv::Result<()> {
    let mut rng = Rng::new(1);
    let copies = rotation(rows * n * T::DTYPE.size());
    let inputs: Vec<DeviceTensor<T>> = (0..copies)
        .map(|_| {
            let host: Vec<T> = (0..rows * n).map(|_| T::from_f32(rng.normal())).collect();
            DeviceTensor::from_host(dev, &host, &[rows, n])
        })
        .collect::<ntkv::Result<_>>()?;
    let mut plan = TopkPlan::new(dev, &TopkShape { rows, n, k }, TopkOptions::default())?;
    let mut values = DeviceTensor::<T>::zeros(dev, &[rows, k])?;
    let mut indices = DeviceTensor::<u32>::zeros(dev, &[rows, k])?;
    let bytes = (rows * n * T::DTYPE.size() + rows * k * (T::DTYPE.size() + 4)) as f64;
    b.gpu(FAMILY, "topk", &topk_shape(rows, n, k), T::DTYPE.name(), Work::bytes(bytes), |i| {
        plan.run(&inputs[i % copies], None, &mut values, &mut indices)
    })
}

/// A tie-heavy row set (one constant, f32): one input, since a constant is the same in every copy.
fn time_ties(
    b: &mut Bench,
    dev: &Device,
    &(rows, n, k, fill, v): &(usize, usize, usize, &str, f32),
) -> ntkv::Result<()> {
    let input = DeviceTensor::from_host(dev, &vec![v; rows * n], &[rows, n])?;
    let mut plan = TopkPlan::new(dev, &TopkShape { rows, n, k }, TopkOptions::default())?;
    let mut values = DeviceTensor::<f32>::zeros(dev, &[rows, k])?;
    let mut indices = DeviceTensor::<u32>::zeros(dev, &[rows, k])?;
    let bytes = (rows * n * 4 + rows * k * 8) as f64;
    b.gpu(FAMILY, "topk_ties", &tie_shape(rows, n, k, fill), "f32", Work::bytes(bytes), |_| {
        plan.run(&input, None, &mut values, &mut indices)
    })
}

pub fn run_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    if b.wants(FAMILY, "topk") {
        for &(rows, n, k, dtype) in TOPK_CASES {
            match dtype {
                DType::F32 => time_topk::<f32>(b, dev, rows, n, k)?,
                DType::F16 => time_topk::<f16>(b, dev, rows, n, k)?,
                DType::BF16 => time_topk::<bf16>(b, dev, rows, n, k)?,
            }
        }
    }
    if b.wants(FAMILY, "topk_ties") {
        for case in TIE_CASES {
            time_ties(b, dev, case)?;
        }
    }
    let mut rng = Rng::new(2);
    if b.wants(FAMILY, "h2o_accumulate_select") {
        let (s, budget, recent) = H2O;
        let q: Vec<f16> = (0..s.hq * s.tq * s.d).map(|_| f16::from_f32(rng.normal())).collect();
        let k: Vec<f16> = (0..s.hkv * s.t * s.d).map(|_| f16::from_f32(rng.normal())).collect();
        let dq = DeviceTensor::from_host(dev, &q, &[s.hq, s.tq, s.d])?;
        let dk = DeviceTensor::from_host(dev, &k, &[s.hkv, s.t, s.d])?;
        let mut acc = DeviceTensor::<f32>::zeros(dev, &[s.hkv, s.t])?;
        let mut keep = DeviceTensor::<u32>::zeros(dev, &[s.hkv, budget])?;
        let mut plan = H2oPlan::new(dev, &s, H2oOptions { reduce: GqaReduce::Sum, budget, recent })?;
        // Minimum traffic: K once, q once, acc read and written, keep written.
        let bytes = (s.hkv * s.t * s.d * 2 + s.hq * s.tq * s.d * 2 + s.hkv * s.t * 8 + s.hkv * budget * 4) as f64;
        let flops = (2 * s.hq * s.tq * s.t * s.d) as f64;
        b.gpu(FAMILY, "h2o_accumulate_select", &h2o_shape(s, budget, recent), "f16", Work { bytes, flops }, |_| {
            plan.accumulate(&dq, &dk, &mut acc)?;
            plan.select(&acc, &mut keep)
        })?;
    }
    if b.wants(FAMILY, "snapkv_select") {
        let (s, capacity) = SNAPKV;
        let q: Vec<f16> = (0..s.hq * s.tq * s.d).map(|_| f16::from_f32(rng.normal())).collect();
        let k: Vec<f16> = (0..s.hkv * s.t * s.d).map(|_| f16::from_f32(rng.normal())).collect();
        let dq = DeviceTensor::from_host(dev, &q, &[s.hq, s.tq, s.d])?;
        let dk = DeviceTensor::from_host(dev, &k, &[s.hkv, s.t, s.d])?;
        let mut keep = DeviceTensor::<u32>::zeros(dev, &[s.hkv, capacity])?;
        let mut plan = SnapKvPlan::new(dev, &s, SnapKvOptions { capacity, reduce: GqaReduce::Sum })?;
        let bytes = (s.hkv * s.t * s.d * 2 + s.hq * s.tq * s.d * 2 + s.hkv * capacity * 4) as f64;
        let flops = (2 * s.hq * s.tq * s.t * s.d) as f64;
        b.gpu(FAMILY, "snapkv_select", &snapkv_shape(s, capacity), "f16", Work { bytes, flops }, |_| {
            plan.select(&dq, &dk, &mut keep)
        })?;
    }
    Ok(())
}

/// The CPU references at small sizes (no GPU): not comparable with the peers.
pub fn run_cpu(b: &mut Bench) -> ntkv::Result<()> {
    let mut rng = Rng::new(3);
    if b.wants(FAMILY, "topk") {
        let (rows, n, k) = (8, 16384, 256);
        let host: Vec<f32> = rng.normal_vec(rows * n);
        let bytes = (rows * n * 4 + rows * k * 8) as f64;
        b.cpu(FAMILY, "topk", &topk_shape(rows, n, k), "f32", Work::bytes(bytes), |_| {
            cpu::topk(&host, rows, n, k, None).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "topk_ties") {
        for &(rows, n, k, fill, v) in TIE_CASES_CPU {
            let host = vec![v; rows * n];
            let bytes = (rows * n * 4 + rows * k * 8) as f64;
            b.cpu(FAMILY, "topk_ties", &tie_shape(rows, n, k, fill), "f32", Work::bytes(bytes), |_| {
                cpu::topk(&host, rows, n, k, None).map(|_| ())
            })?;
        }
    }
    let s = AttnShape { hq: 4, hkv: 2, tq: 8, t: 1024, d: 64 };
    let q: Vec<f16> = (0..s.hq * s.tq * s.d).map(|_| f16::from_f32(rng.normal())).collect();
    let k: Vec<f16> = (0..s.hkv * s.t * s.d).map(|_| f16::from_f32(rng.normal())).collect();
    let flops = (2 * s.hq * s.tq * s.t * s.d) as f64;
    if b.wants(FAMILY, "h2o_accumulate_select") {
        let (budget, recent) = (128, 16);
        let mut acc = vec![0.0f32; s.hkv * s.t];
        b.cpu(FAMILY, "h2o_accumulate_select", &h2o_shape(s, budget, recent), "f16", Work::flops(flops), |_| {
            cpu::h2o_accumulate(&q, &k, &mut acc, s, GqaReduce::Sum)?;
            cpu::h2o_select(&acc, s.hkv, s.t, budget, recent).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "snapkv_select") {
        let capacity = 128;
        b.cpu(FAMILY, "snapkv_select", &snapkv_shape(s, capacity), "f16", Work::flops(flops), |_| {
            topk::cpu::snapkv_select(&q, &k, s, capacity, GqaReduce::Sum).map(|_| ())
        })?;
    }
    Ok(())
}
