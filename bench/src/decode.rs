//! Sparse-index decode cases (the peer table in docs/benchmarks.md: 32 heads, 2048 selected tokens of a 128k f16 cache,
//! D = 128, against torch gather + SDPA; and the full 128k cache against SDPA).
//!
//! The sparse case touches 33.5 MB, inside the 60 MB L2, so it rotates through
//! [`ROTATE`] different index selections (134 MB in all); tools/peers/decode.py rotates the
//! same way. The cache contents do not change the kernel's work, so the 2 GiB caches are
//! zero-filled on the device instead of generated on the host.

use half::{bf16, f16};
use ntkv::decode::{cpu, DecodeOptions, DecodePlan, DecodeShape};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Float};

use crate::harness::{Bench, Work};

/// The decode tests' list generators (one copy for tests, benches and this runner).
#[path = "../../tests/decode_support/mod.rs"]
mod decode_support;

const FAMILY: &str = "decode";
/// Index selections the sparse cases rotate through (more than L2 in all).
const ROTATE: usize = 4;

struct Case {
    op: &'static str,
    shape: &'static str,
    batch: usize,
    q_tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    cache: usize,
    /// Selected tokens per list; `None` = the whole cache.
    selected: Option<usize>,
}

const CASES: &[Case] = &[
    Case {
        op: "decode_sparse",
        shape: "B1 Hq32 Hkv32 T131072 D128 sel2048",
        batch: 1,
        q_tokens: 1,
        q_heads: 32,
        kv_heads: 32,
        cache: 131072,
        selected: Some(2048),
    },
    Case {
        op: "decode_full",
        shape: "B1 Hq32 Hkv32 T131072 D128 all",
        batch: 1,
        q_tokens: 1,
        q_heads: 32,
        kv_heads: 32,
        cache: 131072,
        selected: None,
    },
    Case {
        op: "decode_sparse_gqa",
        shape: "B1 Tq4 Hq32 Hkv8 T131072 D128 sel2048",
        batch: 1,
        q_tokens: 4,
        q_heads: 32,
        kv_heads: 8,
        cache: 131072,
        selected: Some(2048),
    },
];

/// Random sorted selections per list, as CSR: `selected` tokens of each list (`None` = the
/// whole cache).
fn selection(rng: &mut Rng, shape: &DecodeShape, selected: Option<usize>) -> (Vec<u32>, Vec<u32>) {
    let lens = vec![shape.capacity as u32; shape.batch];
    let how = selected.map_or(decode_support::Lens::Full, decode_support::Lens::Fixed);
    decode_support::random_lists(rng, shape, &lens, how)
}

fn shape_of(c: &Case, hq: usize, hkv: usize, capacity: usize) -> DecodeShape {
    DecodeShape { batch: c.batch, q_tokens: c.q_tokens, hq, hkv, head_dim: 128, capacity }
}

fn work(cfg: &DecodeShape, per_list: usize, elem: usize) -> Work {
    let tokens = (cfg.n_lists() * per_list) as f64;
    let d = cfg.head_dim as f64;
    let rows = (cfg.batch * cfg.q_tokens * cfg.hq) as f64;
    let bytes = tokens * d * elem as f64 * 2.0 + tokens * 4.0 + 2.0 * rows * d * elem as f64 + rows * 4.0;
    Work { bytes, ..Work::flops(4.0 * rows * per_list as f64 * d) }
}

fn gpu_case<T: Float>(b: &mut Bench, dev: &Device, c: &Case) -> ntkv::Result<()> {
    let cfg = shape_of(c, c.q_heads, c.kv_heads, c.cache);
    let mut rng = Rng::new(42);
    let q_host: Vec<T> = decode_support::normal(&mut rng, cfg.q_shape().iter().product());
    let q = DeviceTensor::from_host(dev, &q_host, &cfg.q_shape())?;
    let k = DeviceTensor::<T>::zeros(dev, &cfg.kv_shape())?;
    let v = DeviceTensor::<T>::zeros(dev, &cfg.kv_shape())?;
    let mut o = DeviceTensor::<T>::zeros(dev, &cfg.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape())?;
    let cache_lens = vec![c.cache as u32; c.batch];
    let rotations = if c.selected.is_some() { ROTATE } else { 1 };
    let mut lists = Vec::new();
    for _ in 0..rotations {
        let (ptr, idx) = selection(&mut rng, &cfg, c.selected);
        lists.push((
            DeviceTensor::from_host(dev, &ptr, &[ptr.len()])?,
            DeviceTensor::from_host(dev, &idx, &[idx.len()])?,
        ));
    }
    let per_list = c.selected.unwrap_or(c.cache);
    let dtype = T::DTYPE.name();
    if b.wants(FAMILY, c.op) {
        let mut plans = lists
            .iter()
            .map(|(p, i)| DecodePlan::new(dev, &cfg, DecodeOptions::default(), &cache_lens, p, i))
            .collect::<ntkv::Result<Vec<_>>>()?;
        let n = plans.len();
        b.gpu(FAMILY, c.op, c.shape, dtype, work(&cfg, per_list, 2), |i| {
            plans[i % n].run(&q, &k, &v, &mut o, &mut lse)
        })?;
    }
    // The plan (indptr read-back, device validation of every index, split) once per step.
    if c.selected.is_some() && c.q_tokens == 1 && b.wants(FAMILY, "decode_plan") {
        let bytes = (cfg.n_lists() * per_list * 4) as f64;
        b.gpu(FAMILY, "decode_plan", c.shape, dtype, Work::bytes(bytes), |i| {
            let (p, idx) = &lists[i % lists.len()];
            DecodePlan::new(dev, &cfg, DecodeOptions::default(), &cache_lens, p, idx).map(|_| ())
        })?;
    }
    Ok(())
}

fn cpu_case<T: Float>(b: &mut Bench, c: &Case) -> ntkv::Result<()> {
    // Small stand-ins of the GPU shapes: 8 query heads over a 4096-token cache.
    let (cache, hq) = (4096, 8);
    let hkv = hq * c.kv_heads / c.q_heads;
    let cfg = shape_of(c, hq, hkv, cache);
    let selected = c.selected.map(|n| n / 8);
    let mut rng = Rng::new(7);
    let q: Vec<T> = decode_support::normal(&mut rng, cfg.q_shape().iter().product());
    let k: Vec<T> = decode_support::normal(&mut rng, cfg.kv_shape().iter().product());
    let v: Vec<T> = decode_support::normal(&mut rng, cfg.kv_shape().iter().product());
    let (ptr, idx) = selection(&mut rng, &cfg, selected);
    let shape = format!(
        "B1 Tq{} Hq{hq} Hkv{hkv} T{cache} D128 {}",
        c.q_tokens,
        selected.map_or("all".into(), |n| format!("sel{n}"))
    );
    let w = work(&cfg, selected.unwrap_or(cache), 2);
    b.cpu(FAMILY, c.op, &shape, T::DTYPE.name(), w, |_| {
        let opts = DecodeOptions::default();
        cpu::sparse_decode(&cfg, &opts, &q, &k, &v, &[cache as u32], &ptr, &idx).map(|_| ())
    })
}

pub fn run(b: &mut Bench) -> ntkv::Result<()> {
    let wanted: Vec<&Case> = CASES
        .iter()
        .filter(|c| b.wants(FAMILY, c.op) || (c.op == "decode_sparse" && b.wants(FAMILY, "decode_plan")))
        .collect();
    match b.device.clone() {
        Some(dev) => {
            for c in wanted {
                if c.op == "decode_sparse_gqa" {
                    gpu_case::<bf16>(b, &dev, c)?;
                } else {
                    gpu_case::<f16>(b, &dev, c)?;
                }
            }
        }
        None => {
            let cpu_cases: Vec<&Case> = CASES.iter().filter(|c| b.wants(FAMILY, c.op)).collect();
            for c in cpu_cases {
                if c.op == "decode_sparse_gqa" {
                    cpu_case::<bf16>(b, c)?;
                } else {
                    cpu_case::<f16>(b, c)?;
                }
            }
        }
    }
    Ok(())
}
