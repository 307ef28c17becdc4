//! Every validator of the cluster family at its boundary, absurd sizes, and the CPU
//! references' argument errors: typed errors naming the argument, never a panic.

mod common;

use common::arg_of;

use ntkv::cluster::cpu;
use ntkv::cluster::{
    validate_append, AssignPrecision, KmeansOptions, KmeansShape, Metric, RetrieveOptions, RetrieveShape, MAX_CLUSTERS,
    MAX_HEAD_DIM, MAX_ITERATIONS,
};

const GOOD: KmeansShape = KmeansShape { heads: 2, tokens: 10, capacity: 12, clusters: 3, head_dim: 8 };
const GOOD_R: RetrieveShape =
    RetrieveShape { batch: 2, q_tokens: 1, hq: 4, hkv: 2, head_dim: 8, clusters: 3, capacity: 12 };

/// A shape with what its validation said, so that a failing row names its shape.
macro_rules! checked {
    ($shape:expr) => {{
        let s = $shape;
        (format!("{s:?}"), s.validate())
    }};
}

#[test]
fn shape_boundaries() {
    assert!(GOOD.validate().is_ok());
    assert!(GOOD_R.validate().is_ok());
    // Grouped by the argument named: the k-means and the retrieval rows of each together.
    let cases: Vec<((String, ntkv::Result<()>), &str)> = vec![
        (checked!(KmeansShape { heads: 0, ..GOOD }), "heads"),
        (checked!(KmeansShape { tokens: 0, ..GOOD }), "tokens"),
        (checked!(KmeansShape { capacity: 9, ..GOOD }), "capacity"),
        (checked!(KmeansShape { capacity: u32::MAX as usize + 1, ..GOOD }), "capacity"),
        (checked!(RetrieveShape { capacity: 0, ..GOOD_R }), "capacity"),
        (checked!(RetrieveShape { capacity: u32::MAX as usize + 1, ..GOOD_R }), "capacity"),
        (checked!(KmeansShape { clusters: 0, ..GOOD }), "clusters"),
        (checked!(KmeansShape { clusters: 11, ..GOOD }), "clusters"),
        (checked!(KmeansShape { tokens: 1 << 20, capacity: 1 << 20, clusters: MAX_CLUSTERS + 1, ..GOOD }), "clusters"),
        (checked!(RetrieveShape { clusters: 0, ..GOOD_R }), "clusters"),
        (checked!(RetrieveShape { clusters: MAX_CLUSTERS + 1, ..GOOD_R }), "clusters"),
        (checked!(KmeansShape { head_dim: 0, ..GOOD }), "head_dim"),
        (checked!(KmeansShape { head_dim: MAX_HEAD_DIM + 1, ..GOOD }), "head_dim"),
        (checked!(RetrieveShape { head_dim: 0, ..GOOD_R }), "head_dim"),
        (checked!(RetrieveShape { head_dim: 1025, ..GOOD_R }), "head_dim"),
        (checked!(KmeansShape { heads: usize::MAX, ..GOOD }), "keys"),
        (checked!(KmeansShape { heads: 1 << 40, tokens: 1 << 20, capacity: 1 << 20, head_dim: 1024, ..GOOD }), "keys"),
        (checked!(RetrieveShape { batch: 0, ..GOOD_R }), "batch"),
        (checked!(RetrieveShape { batch: 40000, hq: 4, hkv: 2, ..GOOD_R }), "batch"),
        (checked!(RetrieveShape { q_tokens: 0, ..GOOD_R }), "q_tokens"),
        (checked!(RetrieveShape { q_tokens: 17, ..GOOD_R }), "q_tokens"),
        (checked!(RetrieveShape { hq: 0, ..GOOD_R }), "hq"),
        (checked!(RetrieveShape { hq: 5, ..GOOD_R }), "hq"),
        (checked!(RetrieveShape { hkv: 0, ..GOOD_R }), "hkv"),
        (checked!(RetrieveShape { batch: usize::MAX, ..GOOD_R }), "q"),
    ];
    for ((s, r), arg) in cases {
        assert_eq!(arg_of(&r.unwrap_err()), arg, "{s}");
    }
    assert!(KmeansShape { clusters: 10, ..GOOD }.validate().is_ok(), "C = T");
    assert!(KmeansShape { head_dim: MAX_HEAD_DIM, ..GOOD }.validate().is_ok());
}

#[test]
fn kmeans_options_and_append_boundaries() {
    for it in [0, MAX_ITERATIONS + 1] {
        let o = KmeansOptions { iterations: it, ..Default::default() };
        assert_eq!(arg_of(&o.validate().unwrap_err()), "iterations");
    }
    assert!(KmeansOptions { iterations: MAX_ITERATIONS, ..Default::default() }.validate().is_ok());
    assert_eq!(arg_of(&validate_append(&GOOD, 0, 0).unwrap_err()), "to");
    assert_eq!(arg_of(&validate_append(&GOOD, 0, 13).unwrap_err()), "to");
    assert_eq!(arg_of(&validate_append(&GOOD, 6, 5).unwrap_err()), "from");
    assert!(validate_append(&GOOD, 10, 12).is_ok());
    assert!(validate_append(&GOOD, 12, 12).is_ok());
    // The TF32 assignment takes head dims 64 and 128 only.
    let tf32 = KmeansOptions { assign: AssignPrecision::Tf32, ..Default::default() };
    for d in [8, 63, 96, 129, 256] {
        let s = KmeansShape { head_dim: d, ..GOOD };
        assert_eq!(arg_of(&tf32.validate_for(&s).unwrap_err()), "assign", "head dim {d}");
        assert!(KmeansOptions::default().validate_for(&s).is_ok());
    }
    for d in ntkv::cluster::TF32_HEAD_DIMS {
        assert!(tf32.validate_for(&KmeansShape { head_dim: d, ..GOOD }).is_ok());
    }
    let keys = vec![0.0f32; 2 * 12 * 8];
    assert_eq!(arg_of(&cpu::kmeans(&GOOD, &tf32, &keys).unwrap_err()), "assign");
}

#[test]
fn kmeans_reference_rejects_bad_buffers() {
    let keys = vec![0.0f32; 2 * 12 * 8];
    assert_eq!(arg_of(&cpu::kmeans(&GOOD, &KmeansOptions::default(), &keys[1..]).unwrap_err()), "keys");
    let bad = KmeansShape { clusters: 0, ..GOOD };
    assert_eq!(arg_of(&cpu::kmeans(&bad, &KmeansOptions::default(), &keys).unwrap_err()), "clusters");
    let o = KmeansOptions { iterations: 0, ..Default::default() };
    assert_eq!(arg_of(&cpu::kmeans(&GOOD, &o, &keys).unwrap_err()), "iterations");
    let mut st = cpu::kmeans(&GOOD, &KmeansOptions::default(), &keys).unwrap();
    let before = st.clone();
    assert_eq!(arg_of(&cpu::assign_appended(&GOOD, Metric::L2, &keys, 10, 13, &mut st).unwrap_err()), "to");
    assert_eq!(arg_of(&cpu::assign_appended(&GOOD, Metric::L2, &keys[..5], 10, 12, &mut st).unwrap_err()), "keys");
    st.members.pop();
    assert_eq!(arg_of(&cpu::assign_appended(&GOOD, Metric::L2, &keys, 10, 12, &mut st).unwrap_err()), "members");
    st.members.push(before.members[before.members.len() - 1]);
    assert_eq!(st, before, "nothing written on an error");
}

#[test]
fn retrieve_option_boundaries() {
    for (o, arg) in [
        (RetrieveOptions { budget: u32::MAX as usize + 1, ..Default::default() }, "budget"),
        (RetrieveOptions { sinks: u32::MAX as usize + 1, ..Default::default() }, "sinks"),
        (RetrieveOptions { window: usize::MAX, ..Default::default() }, "window"),
    ] {
        assert_eq!(arg_of(&o.validate().unwrap_err()), arg);
    }
    let big = RetrieveShape { batch: 65535, hq: 1, hkv: 1, capacity: u32::MAX as usize, ..GOOD_R };
    let o = RetrieveOptions { budget: 1 << 20, ..Default::default() };
    assert_eq!(arg_of(&big.indices_capacity(&o).unwrap_err()), "indices");
    let o = RetrieveOptions { budget: 5, sinks: 4, window: 4, ..Default::default() };
    assert_eq!(GOOD_R.indices_capacity(&o).unwrap(), 4 * 8, "max(budget, S + W) per list");
    assert_eq!(o.cluster_budget(), 0);
}

#[test]
fn retrieve_reference_rejects_bad_buffers() {
    let km = GOOD_R.kmeans_shape();
    let q = vec![0.0f32; 2 * 4 * 8];
    let cent = vec![0.0f32; 4 * 3 * 8];
    let ip = vec![0u32; 4 * 4];
    let mem = vec![0u32; 4 * 12];
    let lens = vec![12u32, 12];
    let o = RetrieveOptions { budget: 4, ..Default::default() };
    assert_eq!(km.heads, 4);
    assert!(cpu::retrieve(&GOOD_R, &o, &q, &cent, &ip, &mem, &lens).is_ok());
    let err = |r: ntkv::Result<(Vec<u32>, Vec<u32>)>| arg_of(&r.unwrap_err());
    assert_eq!(err(cpu::retrieve(&GOOD_R, &o, &q[1..], &cent, &ip, &mem, &lens)), "q");
    assert_eq!(err(cpu::retrieve(&GOOD_R, &o, &q, &cent[1..], &ip, &mem, &lens)), "centroids");
    assert_eq!(err(cpu::retrieve(&GOOD_R, &o, &q, &cent, &ip[1..], &mem, &lens)), "cluster_indptr");
    assert_eq!(err(cpu::retrieve(&GOOD_R, &o, &q, &cent, &ip, &mem[1..], &lens)), "members");
    assert_eq!(err(cpu::retrieve(&GOOD_R, &o, &q, &cent, &ip, &mem, &lens[1..])), "seq_lens");
    let bad = RetrieveOptions { budget: usize::MAX, ..o };
    assert_eq!(err(cpu::retrieve(&GOOD_R, &bad, &q, &cent, &ip, &mem, &lens)), "budget");
    // Corrupt offsets and lengths never panic: they are clamped as on the GPU.
    let wild_ip = vec![u32::MAX; 4 * 4];
    let wild_mem = vec![u32::MAX; 4 * 12];
    let wild_lens = vec![u32::MAX, 3];
    assert!(cpu::retrieve(&GOOD_R, &o, &q, &cent, &wild_ip, &wild_mem, &wild_lens).is_ok());
}
