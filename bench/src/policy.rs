//! WindowKV, LazyEviction and PrefixKV cases at the H2O / SnapKV shapes of the topk family:
//! a WindowKV selection from a 32-query observation window, one LazyEviction decode step that
//! evicts (lag 1, the most work a step does), and one PrefixKV budget computation over 32
//! layers.
//!
//! The op, shape and dtype strings are the join keys with tools/peers/policy.py.
use half::f16;
use ntkv::policy::{cpu, LazyOptions, LazyPlan, LazyStateMut, PrefixPlan, PrefixShape, WindowKvOptions, WindowKvPlan};
use ntkv::rng::Rng;
use ntkv::topk::{AttnShape, GqaReduce};
use ntkv::{Device, DeviceTensor};

use crate::harness::{Bench, Work};

const FAMILY: &str = "policy";

/// WindowKV: SnapKV's shape (32 heads, window 32 over 32k keys, D = 128), windows of 8,
/// keep 2048.
pub(crate) const WINDOWKV: (AttnShape, usize, usize) =
    (AttnShape { hq: 32, hkv: 32, tq: 32, t: 32768, d: 128 }, 8, 2048);
/// LazyEviction: H2O's cache (32 heads, 32k keys, D = 128, keep 2048 with 64 recent), one
/// decode query.
pub(crate) const LAZY: (AttnShape, usize, usize) = (AttnShape { hq: 32, hkv: 32, tq: 1, t: 32768, d: 128 }, 2048, 64);
/// PrefixKV: 32 layers of 16384 tokens (the sort's limit), 2048 per layer on average.
pub(crate) const PREFIX: PrefixShape = PrefixShape { rows: 32, n: 16384, budget: 32 * 2048 };

pub fn windowkv_shape(s: AttnShape, w: usize, budget: usize) -> String {
    format!("hq{} hkv{} w{} t{} d{} win{w} keep{budget}", s.hq, s.hkv, s.tq, s.t, s.d)
}

pub fn lazy_shape(s: AttnShape, budget: usize, recent: usize) -> String {
    format!("hq{} hkv{} tq{} t{} d{} keep{budget} recent{recent} lag1", s.hq, s.hkv, s.tq, s.t, s.d)
}

pub fn prefix_shape(p: PrefixShape) -> String {
    format!("{}x{} keep{}", p.rows, p.n, p.budget)
}

fn f16_vec(rng: &mut Rng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(rng.normal())).collect()
}

pub fn run_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let mut rng = Rng::new(4);
    if b.wants(FAMILY, "windowkv_select") {
        let (s, window, budget) = WINDOWKV;
        let o = WindowKvOptions { window, recent: s.tq, budget, share_layers: 1 };
        let dq = DeviceTensor::from_host(dev, &f16_vec(&mut rng, s.hq * s.tq * s.d), &[s.hq, s.tq, s.d])?;
        let dk = DeviceTensor::from_host(dev, &f16_vec(&mut rng, s.hkv * s.t * s.d), &[s.hkv, s.t, s.d])?;
        let mut plan = WindowKvPlan::with_attention(dev, &s, o)?;
        let mut indptr = DeviceTensor::<u32>::zeros(dev, &[s.hkv + 1])?;
        let mut indices = DeviceTensor::<u32>::zeros(dev, &[plan.capacity()?])?;
        // Minimum traffic: K and q once, the kept token lists written.
        let bytes = (s.hkv * s.t * s.d * 2 + s.hq * s.tq * s.d * 2 + s.hkv * budget * 4) as f64;
        let flops = (2 * s.hq * s.tq * s.t * s.d) as f64;
        b.gpu(FAMILY, "windowkv_select", &windowkv_shape(s, window, budget), "f16", Work { bytes, flops }, |_| {
            plan.run_attention(&dq, &dk, GqaReduce::Sum, &mut indptr, &mut indices)
        })?;
    }
    if b.wants(FAMILY, "lazy_step") {
        let (s, budget, recent) = LAZY;
        let o = LazyOptions { budget, recent, lag: 1, threshold: 1e-4 };
        let dq = DeviceTensor::from_host(dev, &f16_vec(&mut rng, s.hq * s.d), &[s.hq, 1, s.d])?;
        let mut dk = DeviceTensor::from_host(dev, &f16_vec(&mut rng, s.hkv * s.t * s.d), &[s.hkv, s.t, s.d])?;
        let mut dv = DeviceTensor::from_host(dev, &f16_vec(&mut rng, s.hkv * s.t * s.d), &[s.hkv, s.t, s.d])?;
        let mut acc = DeviceTensor::<f32>::zeros(dev, &[s.hkv, s.t])?;
        let mut last_hit = DeviceTensor::<f32>::zeros(dev, &[s.hkv, s.t])?;
        let mut mri = DeviceTensor::<f32>::zeros(dev, &[s.hkv, s.t])?;
        let mut plan = LazyPlan::new(dev, &s, o, GqaReduce::Sum)?;
        // K read by the accumulation; the state read and written; the kept K and V rows moved.
        let bytes =
            (s.hkv * s.t * s.d * 2 + s.hkv * s.t * 4 * 8 + 2 * s.hkv * budget * s.d * 2 * 2 + s.hkv * budget * 4)
                as f64;
        let flops = (2 * s.hq * s.t * s.d) as f64;
        b.gpu(FAMILY, "lazy_step", &lazy_shape(s, budget, recent), "f16", Work { bytes, flops }, |_| {
            let state = LazyStateMut { acc: &mut acc, last_hit: &mut last_hit, mri: &mut mri };
            plan.step(0, &dq, &mut dk, &mut dv, state).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "prefixkv_budgets") {
        let p = PREFIX;
        let host: Vec<f32> = (0..p.rows * p.n).map(|_| rng.uniform()).collect();
        let imp = DeviceTensor::from_host(dev, &host, &[p.rows, p.n])?;
        let mut plan = PrefixPlan::new(dev, &p)?;
        let mut indptr = DeviceTensor::<u32>::zeros(dev, &[p.rows + 1])?;
        let mut indices = DeviceTensor::<u32>::zeros(dev, &[p.budget])?;
        let bytes = (p.rows * p.n * 4 + p.budget * 4) as f64;
        b.gpu(FAMILY, "prefixkv_budgets", &prefix_shape(p), "f32", Work::bytes(bytes), |_| {
            plan.run(&imp, &mut indptr, &mut indices).map(|_| ())
        })?;
    }
    Ok(())
}

/// The CPU references at small sizes (no GPU): not comparable with the peers.
pub fn run_cpu(b: &mut Bench) -> ntkv::Result<()> {
    let mut rng = Rng::new(5);
    let s = AttnShape { hq: 4, hkv: 2, tq: 8, t: 1024, d: 64 };
    if b.wants(FAMILY, "windowkv_select") {
        let (window, budget) = (8, 128);
        let o = WindowKvOptions { window, recent: s.tq, budget, share_layers: 1 };
        let q = f16_vec(&mut rng, s.hq * s.tq * s.d);
        let k = f16_vec(&mut rng, s.hkv * s.t * s.d);
        let flops = (2 * s.hq * s.tq * s.t * s.d) as f64;
        b.cpu(FAMILY, "windowkv_select", &windowkv_shape(s, window, budget), "f16", Work::flops(flops), |_| {
            cpu::windowkv_select_attn(&q, &k, s, &o, GqaReduce::Sum).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "lazy_step") {
        // The state update and eviction ranking from a given step mass (no attention).
        let ls = AttnShape { hq: 2, hkv: 2, tq: 1, t: 4096, d: 64 };
        let (hkv, t, budget, recent) = (ls.hkv, ls.t, 256, 16);
        let p: Vec<f32> = (0..hkv * t).map(|_| rng.uniform() * 1e-3).collect();
        let (mut acc, mut lh, mut mri) = (vec![0.0f32; hkv * t], vec![0.0f32; hkv * t], vec![0.0f32; hkv * t]);
        b.cpu(FAMILY, "lazy_step", &lazy_shape(ls, budget, recent), "f32", Work::bytes((hkv * t * 20) as f64), |_| {
            cpu::lazy_update(&p, &mut acc, &mut lh, &mut mri, hkv, t, 0, 5e-4)?;
            cpu::lazy_select(&lh, &mri, hkv, t, 0, budget, recent).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "prefixkv_budgets") {
        let p = PrefixShape { rows: 8, n: 4096, budget: 8 * 512 };
        let host: Vec<f32> = (0..p.rows * p.n).map(|_| rng.uniform()).collect();
        b.cpu(FAMILY, "prefixkv_budgets", &prefix_shape(p), "f32", Work::bytes((p.rows * p.n * 4) as f64), |_| {
            cpu::prefixkv(&host, &p).map(|_| ())
        })?;
    }
    Ok(())
}
