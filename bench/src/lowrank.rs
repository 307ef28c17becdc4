//! Low-rank (ShadowKV) cases at the ANCHORS shapes: the rank-160 factorization of a
//! 32768 × 1024 f32 matrix (peer: `torch.svd_lowrank(niter=2)`, 17.7 ms), and the
//! reconstruction with RoPE of 2048 tokens × 8 kv heads from `U [128k, 160]`,
//! `SV [160, 8·128]` bf16 (peer: torch `index_select` + einsum + RoPE, 0.427 ms).
//!
//! The factorization time is the whole `FactorPlan::run`, host steps (CholeskyQR2 Grams,
//! core SVD) and their synchronizations included. The reconstruction rotates through
//! [`ROTATE`] position selections, as tools/peers/lowrank.py does.

use half::bf16;
use ntkv::lowrank::{
    cpu, FactorOptions, FactorPlan, FactorShape, KeyLayout, ReconstructPlan, ReconstructShape, RopeOptions,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Float};

use crate::harness::{Bench, Work};

/// The lowrank tests' list generators (one copy for tests, benches and the runner).
#[path = "../../tests/lowrank_support/mod.rs"]
mod lowrank_support;

const FAMILY: &str = "lowrank";
const ROTATE: usize = 4;

/// (op, shape, T, Hkv, D, rank) of the factorization case.
pub(crate) const FACTOR_CASE: (&str, &str, usize, usize, usize, usize) =
    ("lowrank_factor", "T32768 N1024 r160", 32768, 8, 128, 160);
/// (op, shape, T, Hkv, D, rank, selected per head) of the reconstruction case.
pub(crate) const ROPE_CASE: (&str, &str, usize, usize, usize, usize, usize) =
    ("lowrank_rope", "T131072 Hkv8 D128 r160 sel2048", 131072, 8, 128, 160, 2048);

fn factor_work(t: usize, n: usize, l: usize, r: usize, q: usize) -> Work {
    // 1 + 2q passes of A·X or Aᵀ·X, Qᵀ·A, the Grams and applies, Q·W and Wᵀ·Bc.
    let (t, n, l, r, q) = (t as f64, n as f64, l as f64, r as f64, q as f64);
    let flops = 2.0 * t * n * l * (2.0 + 2.0 * q) + 2.0 * (q + 1.0) * 4.0 * t * l * l + 2.0 * (t + n) * l * r;
    Work { bytes: 4.0 * t * n * (3.0 + 2.0 * q), flops }
}

fn rope_work(rows: usize, r: usize, d: usize, hkv: usize, elem: usize) -> Work {
    let bytes = (rows * (r + d) * elem + rows * 4 + r * hkv * d * elem) as f64;
    Work { bytes, flops: 2.0 * (rows * r * d) as f64 }
}

fn gpu_factor(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let (op, shape_s, t, hkv, d, r) = FACTOR_CASE;
    let shape = FactorShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let mut rng = Rng::new(5);
    let k = DeviceTensor::from_host(dev, &rng.normal_vec(t * hkv * d), &shape.k_shape())?;
    let mut u = DeviceTensor::<f32>::zeros(dev, &shape.u_shape())?;
    let mut sv = DeviceTensor::<f32>::zeros(dev, &shape.sv_shape())?;
    for (opts, dtype) in [
        (FactorOptions::default(), "f32"),
        (FactorOptions { precision: ntkv::gemm::Precision::Tf32, ..FactorOptions::default() }, "f32-tf32"),
    ] {
        let mut plan = FactorPlan::new(dev, &shape, opts, &[t as u32])?;
        let w = factor_work(t, hkv * d, plan.sketch_cols(), r, opts.power_iters);
        b.gpu(FAMILY, op, shape_s, dtype, w, |_| plan.run(&k, &mut u, &mut sv).map(|_| ()))?;
    }
    Ok(())
}

fn gpu_rope(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let (op, shape_s, t, hkv, d, r, sel) = ROPE_CASE;
    let shape = ReconstructShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let mut rng = Rng::new(6);
    let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let u = DeviceTensor::from_host(dev, &to_bf16(rng.normal_vec(t * r)), &shape.u_shape())?;
    let sv = DeviceTensor::from_host(dev, &to_bf16(rng.normal_vec(r * hkv * d)), &shape.sv_shape())?;
    let mut sels = Vec::new();
    for _ in 0..ROTATE {
        let (p, i) = lowrank_support::fixed_lists(&mut rng, t, hkv, sel);
        sels.push((DeviceTensor::from_host(dev, &p, &[p.len()])?, DeviceTensor::from_host(dev, &i, &[i.len()])?));
    }
    let layout = KeyLayout::Gathered { budget: sel };
    let plans = sels
        .iter()
        .map(|(p, i)| ReconstructPlan::new(dev, &shape, RopeOptions::default(), layout, &[t as u32], p, i))
        .collect::<ntkv::Result<Vec<_>>>()?;
    let mut out = DeviceTensor::<bf16>::zeros(dev, &shape.gathered_shape(sel))?;
    let w = rope_work(hkv * sel, r, d, hkv, 2);
    b.gpu(FAMILY, op, shape_s, "bf16", w, |i| plans[i % ROTATE].run(&u, &sv, &mut out))
}

fn cpu_cases(b: &mut Bench) -> ntkv::Result<()> {
    // Reduced stand-ins: a 1024 × 256 factorization at rank 16, 256 tokens × 2 heads.
    let (t, hkv, d, r) = (1024, 2, 128, 16);
    let shape = FactorShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let mut rng = Rng::new(7);
    let k = rng.normal_vec(t * hkv * d);
    if b.wants(FAMILY, FACTOR_CASE.0) {
        let l = FactorOptions::default().sketch_cols(&shape, &[t as u32]);
        let w = factor_work(t, hkv * d, l, r, 2);
        b.cpu(FAMILY, FACTOR_CASE.0, "T1024 N256 r16", "f32", w, |_| {
            cpu::factorize(&shape, &FactorOptions::default(), &[t as u32], &k).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, ROPE_CASE.0) {
        let rs = ReconstructShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
        let u: Vec<bf16> = rng.normal_vec(t * r).into_iter().map(bf16::from_f32).collect();
        let sv: Vec<bf16> = rng.normal_vec(r * hkv * d).into_iter().map(bf16::from_f32).collect();
        let (p, i) = lowrank_support::fixed_lists(&mut rng, t, hkv, 256);
        let w = rope_work(hkv * 256, r, d, hkv, 2);
        b.cpu(FAMILY, ROPE_CASE.0, "T1024 Hkv2 D128 r16 sel256", bf16::DTYPE.name(), w, |_| {
            cpu::reconstruct(&rs, &RopeOptions::default(), &[t as u32], &u, &sv, &p, &i).map(|_| ())
        })?;
    }
    Ok(())
}

pub fn run(b: &mut Bench) -> ntkv::Result<()> {
    match b.device.clone() {
        Some(dev) => {
            if b.wants(FAMILY, FACTOR_CASE.0) {
                gpu_factor(b, &dev)?;
            }
            if b.wants(FAMILY, ROPE_CASE.0) {
                gpu_rope(b, &dev)?;
            }
            Ok(())
        }
        None => cpu_cases(b),
    }
}
