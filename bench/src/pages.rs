//! Quest and ShadowKV retrieval cases at the peer table's shapes (ANCHORS: page min/max over
//! 32 heads × 128k × 128 f16 with pages of 16, against torch amax/amin; bounds plus the top
//! 128 of 8192 pages, against torch), and the ShadowKV landmark selection (chunks of 8, 256
//! chunks plus 16 outliers kept of 16384) against tools/peers/pages.py.
//!
//! The metadata build reads 1.07 GB and the page scores 134 MB of metadata, both beyond the 60
//! MB L2, so no rotation is needed. The min/max work does not depend on the key values, so
//! the cache is zero-filled on the device; the selection cases use random metadata so the
//! top-k sees real ranks. The build's share of the in-run copy ceiling is its bar (≥ 70%).

use half::f16;
use ntkv::pages::{
    cpu, LandmarkPlan, LandmarkSelectPlan, LandmarkSelectShape, QuestMetaPlan, QuestMetaShape, QuestSelectPlan,
    QuestSelectShape,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Float};

use crate::harness::{Bench, Work};

const FAMILY: &str = "pages";

/// The ANCHORS Quest shape: 32 heads (MHA), 128k tokens, D = 128, pages of 16, top 128 pages.
pub fn quest_shape(capacity: usize, heads: usize) -> QuestSelectShape {
    QuestSelectShape {
        batch: 1,
        hq: heads,
        hkv: heads,
        q_tokens: 1,
        head_dim: 128,
        capacity,
        page_size: 16,
        budget: 128,
    }
}

/// The ShadowKV shape: 32 query heads over 8 kv heads, 128k tokens, 256 chunks + 16 outliers.
pub fn landmark_shape(capacity: usize, hq: usize) -> LandmarkSelectShape {
    LandmarkSelectShape { batch: 1, hq, hkv: hq / 4, q_tokens: 1, head_dim: 128, capacity, outliers: 16, budget: 256 }
}

fn meta_work(s: &QuestMetaShape, elem: usize) -> Work {
    let keys = (s.batch * s.hkv * s.capacity * s.head_dim * elem) as f64;
    let meta = (2 * s.batch * s.hkv * s.n_pages() * s.head_dim * elem) as f64;
    Work::bytes(keys + meta)
}

fn select_work(s: &QuestSelectShape, elem: usize) -> Work {
    let np = s.meta().n_pages();
    let meta = (2 * s.rows() * np * s.head_dim * elem) as f64;
    let scores = (s.rows() * np * 4) as f64;
    Work { bytes: meta + 2.0 * scores, flops: 4.0 * (s.rows() * np * s.head_dim * (s.hq / s.hkv)) as f64 }
}

fn landmark_work(s: &LandmarkSelectShape) -> Work {
    let nc = s.landmarks().n_chunks();
    let lm = (s.rows() * nc * s.head_dim * 4) as f64;
    let logits = (s.batch * s.hq * s.q_tokens * nc * 4) as f64;
    Work { bytes: lm + 4.0 * logits, flops: 2.0 * (s.batch * s.hq * s.q_tokens * nc * s.head_dim) as f64 }
}

fn random<T: Float>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

pub fn gpu_cases(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let s = quest_shape(131072, 32);
    let meta = s.meta();
    let lens = [s.capacity as u32];
    let mut rng = Rng::new(3);
    if b.wants(FAMILY, "quest_meta") {
        let keys = DeviceTensor::<f16>::zeros(dev, &meta.keys_shape())?;
        let mut mx = DeviceTensor::<f16>::zeros(dev, &meta.meta_shape())?;
        let mut mn = DeviceTensor::<f16>::zeros(dev, &meta.meta_shape())?;
        let mut plan = QuestMetaPlan::new(dev, &meta)?;
        b.gpu(FAMILY, "quest_meta", "B1 Hkv32 T131072 D128 P16", "f16", meta_work(&meta, 2), |_| {
            plan.build(&keys, &lens, &mut mx, &mut mn)
        })?;
    }
    if b.wants(FAMILY, "quest_select") {
        let n: usize = meta.meta_shape().iter().product();
        let a: Vec<f16> = random(&mut rng, n);
        let c: Vec<f16> = random(&mut rng, n);
        let (hi, lo): (Vec<f16>, Vec<f16>) =
            a.iter().zip(&c).map(|(&x, &y)| if x >= y { (x, y) } else { (y, x) }).unzip();
        let mx = DeviceTensor::from_host(dev, &hi, &meta.meta_shape())?;
        let mn = DeviceTensor::from_host(dev, &lo, &meta.meta_shape())?;
        let q = DeviceTensor::from_host(dev, &random::<f16>(&mut rng, s.q_shape().iter().product()), &s.q_shape())?;
        let mut pages = DeviceTensor::<u32>::zeros(dev, &s.pages_shape())?;
        let mut ip = DeviceTensor::<u32>::zeros(dev, &[s.rows() + 1])?;
        let mut ix = DeviceTensor::<u32>::zeros(dev, &[s.capacity_tokens()?])?;
        let mut plan = QuestSelectPlan::new(dev, &s)?;
        b.gpu(FAMILY, "quest_select", "B1 Hq32 Hkv32 NP8192 D128 top128", "f16", select_work(&s, 2), |_| {
            plan.run(&q, &mx, &mn, &lens, &mut pages, &mut ip, &mut ix)
        })?;
    }
    let l = landmark_shape(131072, 32);
    let ls = l.landmarks();
    if b.wants(FAMILY, "landmark_build") || b.wants(FAMILY, "landmark_select") {
        let keys =
            DeviceTensor::from_host(dev, &random::<f16>(&mut rng, ls.keys_shape().iter().product()), &ls.keys_shape())?;
        let mut lm = DeviceTensor::<f32>::zeros(dev, &ls.landmarks_shape())?;
        let mut mc = DeviceTensor::<f32>::zeros(dev, &ls.cos_shape())?;
        let mut outl = DeviceTensor::<u32>::zeros(dev, &ls.outliers_shape())?;
        let mut build = LandmarkPlan::new(dev, &ls)?;
        let elem = (ls.rows() * ls.capacity * ls.head_dim * 2) as f64;
        if b.wants(FAMILY, "landmark_build") {
            b.gpu(FAMILY, "landmark_build", "B1 Hkv8 T131072 D128 out16", "f16", Work::bytes(elem * 1.5), |_| {
                build.run(&keys, &[l.capacity as u32], &mut lm, &mut mc, &mut outl)
            })?;
        } else {
            build.run(&keys, &[l.capacity as u32], &mut lm, &mut mc, &mut outl)?;
        }
        if b.wants(FAMILY, "landmark_select") {
            let q = DeviceTensor::from_host(dev, &random::<f16>(&mut rng, l.q_shape().iter().product()), &l.q_shape())?;
            let mut chunks = DeviceTensor::<u32>::zeros(dev, &l.chunks_shape())?;
            let mut ip = DeviceTensor::<u32>::zeros(dev, &[l.rows() + 1])?;
            let mut ix = DeviceTensor::<u32>::zeros(dev, &[l.capacity_tokens()?])?;
            let mut plan = LandmarkSelectPlan::new(dev, &l)?;
            b.gpu(FAMILY, "landmark_select", "B1 Hq32 Hkv8 NC16384 D128 top256+16", "f16", landmark_work(&l), |_| {
                plan.run(&q, &lm, &outl, &[l.capacity as u32], &mut chunks, &mut ip, &mut ix)
            })?;
        }
    }
    Ok(())
}

pub fn cpu_cases(b: &mut Bench) -> ntkv::Result<()> {
    // Reduced stand-ins: 4 heads over 8192 tokens.
    let mut rng = Rng::new(5);
    let s = quest_shape(8192, 4);
    let meta = s.meta();
    let lens = [s.capacity as u32];
    let keys: Vec<f16> = random(&mut rng, meta.keys_shape().iter().product());
    let q: Vec<f16> = random(&mut rng, s.q_shape().iter().product());
    if b.wants(FAMILY, "quest_meta") {
        b.cpu(FAMILY, "quest_meta", "B1 Hkv4 T8192 D128 P16", "f16", meta_work(&meta, 2), |_| {
            cpu::quest_meta(&meta, &keys, &lens).map(|_| ())
        })?;
    }
    let (mx, mn) = cpu::quest_meta(&meta, &keys, &lens)?;
    if b.wants(FAMILY, "quest_select") {
        b.cpu(FAMILY, "quest_select", "B1 Hq4 Hkv4 NP512 D128 top128", "f16", select_work(&s, 2), |_| {
            cpu::quest_select(&s, &q, &mx, &mn, &lens).map(|_| ())
        })?;
    }
    let l = landmark_shape(8192, 8);
    let ls = l.landmarks();
    let keys: Vec<f16> = random(&mut rng, ls.keys_shape().iter().product());
    let lens = [l.capacity as u32];
    if b.wants(FAMILY, "landmark_build") {
        let w = Work::bytes((ls.rows() * ls.capacity * ls.head_dim * 2) as f64);
        b.cpu(FAMILY, "landmark_build", "B1 Hkv2 T8192 D128 out16", "f16", w, |_| {
            cpu::landmarks(&ls, &keys, &lens).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "landmark_select") {
        let lm = cpu::landmarks(&ls, &keys, &lens)?;
        let q: Vec<f16> = random(&mut rng, l.q_shape().iter().product());
        b.cpu(FAMILY, "landmark_select", "B1 Hq8 Hkv2 NC1024 D128 top256+16", "f16", landmark_work(&l), |_| {
            cpu::landmark_select(&l, &q, &lm.landmarks, &lm.outliers, &lens).map(|_| ())
        })?;
    }
    Ok(())
}
