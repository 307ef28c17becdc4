//! k-means and cluster retrieval cases (the peer table: k-means of 32 heads × 32768 keys ×
//! 128 into 256 clusters, 10 iterations, f32, against torch cdist/argmin/scatter_add; and
//! ranking 1024 centroids per head for one query per head, 32 heads, with the budget
//! prefix, against torch). tools/peers/cluster.py times the peers on the same shapes.
//!
//! The retrieval state (centroids, member lists) is synthesized on the host from random
//! labels: the kernels' work depends on the sizes, not on how the clusters were found.

use ntkv::cluster::{
    cpu, AssignPrecision, ClusterState, Combine, KmeansOptions, KmeansPlan, KmeansShape, Metric, RetrieveOptions,
    RetrievePlan, RetrieveShape,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

use crate::harness::{Bench, Work};

const FAMILY: &str = "cluster";

/// A k-means case: the shape (`capacity` leaves room for the appended tokens of the
/// incremental case) and the iterations.
pub struct KmeansCase {
    pub op: &'static str,
    pub shape: &'static str,
    pub dims: KmeansShape,
    pub iterations: usize,
    /// The assignment's arithmetic; the record's dtype is `f32` or `f32-tf32`.
    pub assign: AssignPrecision,
}

impl KmeansCase {
    /// The record's dtype label: the keys' dtype, suffixed by the TF32 mode.
    pub fn dtype(&self) -> &'static str {
        match self.assign {
            AssignPrecision::F32 => "f32",
            AssignPrecision::Tf32 => "f32-tf32",
        }
    }
}

/// A case reads as its shape (`kc.heads`, `kc.tokens`), as the resource report uses it.
impl std::ops::Deref for KmeansCase {
    type Target = KmeansShape;
    fn deref(&self) -> &KmeansShape {
        &self.dims
    }
}

/// A retrieval case: one query token per sequence, D = 128.
pub struct RetrieveCase {
    pub op: &'static str,
    pub shape: &'static str,
    pub batch: usize,
    pub hq: usize,
    pub hkv: usize,
    pub clusters: usize,
    pub capacity: usize,
    pub budget: usize,
    pub sinks: usize,
    pub window: usize,
}

const KMEANS_DIMS: KmeansShape =
    KmeansShape { heads: 32, tokens: 32768, capacity: 32768 + APPEND, clusters: 256, head_dim: 128 };
pub const KMEANS_CASES: &[KmeansCase] = &[
    KmeansCase {
        op: "kmeans",
        shape: "H32 T32768 D128 C256 it10",
        dims: KMEANS_DIMS,
        iterations: 10,
        assign: AssignPrecision::F32,
    },
    KmeansCase {
        op: "kmeans",
        shape: "H32 T32768 D128 C256 it10",
        dims: KMEANS_DIMS,
        iterations: 10,
        assign: AssignPrecision::Tf32,
    },
];
pub const RETRIEVE_CASES: &[RetrieveCase] = &[RetrieveCase {
    op: "cluster_retrieve",
    shape: "B1 Hq32 Hkv32 C1024 T131072 D128 budget2048",
    batch: 1,
    hq: 32,
    hkv: 32,
    clusters: 1024,
    capacity: 131072,
    budget: 2048,
    sinks: 4,
    window: 64,
}];
/// Tokens appended per head in the incremental-assignment case.
const APPEND: usize = 16;

fn kmeans_work(h: usize, t: usize, c: usize, d: usize, it: usize) -> Work {
    let (h, t, c, d, it) = (h as f64, t as f64, c as f64, d as f64, it as f64);
    Work { bytes: it * 2.0 * h * t * d * 4.0, flops: it * 2.0 * h * t * c * d }
}

fn random_keys(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal()).collect()
}

/// A state of random labels over `capacity` tokens per list (CSR built on the host).
fn synthetic_state(dev: &Device, rs: &RetrieveShape, seed: u64) -> ntkv::Result<ClusterState> {
    let km = rs.kmeans_shape();
    let (l, c, cap, d) = (rs.n_lists(), rs.clusters, rs.capacity, rs.head_dim);
    let mut rng = Rng::new(seed);
    let centroids: Vec<f32> = (0..l * c * d).map(|_| rng.normal()).collect();
    let mut sizes = vec![0u32; l * c];
    let mut indptr = vec![0u32; l * (c + 1)];
    let mut members = vec![0u32; l * cap];
    let mut labels = vec![0u32; l * cap];
    for li in 0..l {
        let lab = &mut labels[li * cap..(li + 1) * cap];
        for x in lab.iter_mut() {
            *x = (rng.next_u64() % c as u64) as u32;
        }
        for &x in lab.iter() {
            sizes[li * c + x as usize] += 1;
        }
        for ci in 0..c {
            indptr[li * (c + 1) + ci + 1] = indptr[li * (c + 1) + ci] + sizes[li * c + ci];
        }
        let mut cur = indptr[li * (c + 1)..li * (c + 1) + c].to_vec();
        for (t, &x) in lab.iter().enumerate() {
            members[li * cap + cur[x as usize] as usize] = t as u32;
            cur[x as usize] += 1;
        }
    }
    Ok(ClusterState {
        centroids: DeviceTensor::from_host(dev, &centroids, &km.centroids_shape())?,
        labels: DeviceTensor::from_host(dev, &labels, &km.labels_shape())?,
        sizes: DeviceTensor::from_host(dev, &sizes, &km.sizes_shape())?,
        indptr: DeviceTensor::from_host(dev, &indptr, &km.indptr_shape())?,
        members: DeviceTensor::from_host(dev, &members, &km.labels_shape())?,
        iterations: DeviceTensor::zeros(dev, &[l])?,
    })
}

fn retrieve_shape(batch: usize, hq: usize, hkv: usize, c: usize, cap: usize) -> RetrieveShape {
    RetrieveShape { batch, q_tokens: 1, hq, hkv, head_dim: 128, clusters: c, capacity: cap }
}

pub fn gpu_cases(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    for kc in KMEANS_CASES {
        let (op, shape, s, it) = (kc.op, kc.shape, kc.dims, kc.iterations);
        let (h, t, c, d) = (s.heads, s.tokens, s.clusters, s.head_dim);
        let keys = DeviceTensor::from_host(dev, &random_keys(h * s.capacity * d, 1), &s.keys_shape())?;
        let mut state = ClusterState::zeros(dev, &s)?;
        // L2, as the torch peer (cdist); f32 keys.
        let o = KmeansOptions { metric: Metric::L2, iterations: it, assign: kc.assign, ..Default::default() };
        let mut plan = KmeansPlan::new(dev, &s, o)?;
        if b.wants(FAMILY, op) {
            b.gpu(FAMILY, op, shape, kc.dtype(), kmeans_work(h, t, c, d, it), |_| plan.run(&keys, &mut state))?;
        }
        if kc.assign == AssignPrecision::F32 && b.wants(FAMILY, "kmeans_append") {
            plan.run(&keys, &mut state)?;
            let w = Work {
                bytes: (h * APPEND * d * 4 + h * (t + APPEND) * 8) as f64,
                flops: (2 * h * APPEND * c * d) as f64,
            };
            let sh = format!("H{h} T{t}+{APPEND} D{d} C{c}");
            b.gpu(FAMILY, "kmeans_append", &sh, "f32", w, |_| plan.assign_appended(&keys, t, t + APPEND, &mut state))?;
        }
    }
    for rc in RETRIEVE_CASES {
        let (op, shape, batch, hq, hkv) = (rc.op, rc.shape, rc.batch, rc.hq, rc.hkv);
        let (c, cap, budget, sinks, window) = (rc.clusters, rc.capacity, rc.budget, rc.sinks, rc.window);
        if !b.wants(FAMILY, op) {
            continue;
        }
        let rs = retrieve_shape(batch, hq, hkv, c, cap);
        let state = synthetic_state(dev, &rs, 2)?;
        let o = RetrieveOptions { combine: Combine::Max, budget, sinks, window };
        let mut plan = RetrievePlan::new(dev, &rs, o)?;
        let qh: Vec<half::f16> = random_keys(batch * hq * 128, 3).into_iter().map(half::f16::from_f32).collect();
        let q = DeviceTensor::from_host(dev, &qh, &rs.q_shape())?;
        let lens = DeviceTensor::from_host(dev, &vec![cap as u32; batch], &[batch])?;
        let mut ip = DeviceTensor::<u32>::zeros(dev, &[rs.n_lists() + 1])?;
        let mut ix = DeviceTensor::<u32>::zeros(dev, &[plan.indices_capacity()])?;
        let l = rs.n_lists();
        let w = Work {
            bytes: (l * c * 128 * 4 + l * cap * 4 / 16 + l * budget * 8) as f64,
            flops: (2 * l * c * 128) as f64,
        };
        b.gpu(FAMILY, op, shape, "f16", w, |_| plan.run(&q, &state, &lens, &mut ip, &mut ix))?;
    }
    Ok(())
}

pub fn cpu_cases(b: &mut Bench) -> ntkv::Result<()> {
    // Small stand-ins: 2 heads × 2048 keys × 64 into 32 clusters, 3 iterations; 256 centroids
    // over 8192 tokens.
    if b.wants(FAMILY, "kmeans") {
        let s = KmeansShape { heads: 2, tokens: 2048, capacity: 2048, clusters: 32, head_dim: 64 };
        let keys = random_keys(2 * 2048 * 64, 1);
        let o = KmeansOptions { metric: Metric::L2, iterations: 3, ..Default::default() };
        b.cpu(FAMILY, "kmeans", "H2 T2048 D64 C32 it3", "f32", kmeans_work(2, 2048, 32, 64, 3), |_| {
            cpu::kmeans(&s, &o, &keys).map(|_| ())
        })?;
    }
    if b.wants(FAMILY, "cluster_retrieve") {
        let rs = RetrieveShape { head_dim: 64, ..retrieve_shape(1, 8, 8, 256, 8192) };
        let ks = rs.kmeans_shape();
        let ks = KmeansShape { tokens: 8192, ..ks };
        let keys = random_keys(8 * 8192 * 64, 4);
        let st = cpu::kmeans(&ks, &KmeansOptions { iterations: 1, ..Default::default() }, &keys)?;
        let q = random_keys(8 * 64, 5);
        let o = RetrieveOptions { combine: Combine::Max, budget: 512, sinks: 4, window: 64 };
        let w = Work { bytes: (8 * 256 * 64 * 4) as f64, flops: (2 * 8 * 256 * 64) as f64 };
        b.cpu(FAMILY, "cluster_retrieve", "B1 Hq8 Hkv8 C256 T8192 D64 budget512", "f32", w, |_| {
            cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &[8192]).map(|_| ())
        })?;
    }
    Ok(())
}
