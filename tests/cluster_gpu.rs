//! The cluster kernels on the GPU against the CPU references, bit for bit: k-means labels,
//! sizes, CSR members, iteration counts and centroids (cosine and L2, f32/f16/bf16, T not a
//! tile multiple, C = 1, C = T, all-equal keys, empty clusters, stop when stable), the
//! incremental assignment, and retrieved token lists (GQA 1, 3, 8; budgets below S + W);
//! buffer errors before any launch; run-to-run determinism. The TF32 assignment mode: every
//! label admissible against the f32 scores (`cpu::tf32_label_admissible`), the CSR exactly
//! that of its labels, deterministic.

mod cluster_support;
mod common;

use cluster_support::{keys, normal, Keys};
use half::{bf16, f16};
use ntkv::cluster::cpu::{self, KmeansResult};
use ntkv::cluster::{
    AssignPrecision, ClusterState, Combine, KmeansOptions, KmeansPlan, KmeansShape, Metric, RetrieveOptions,
    RetrievePlan, RetrieveShape,
};
use ntkv::decode::{DecodeOptions, DecodePlan};
use ntkv::{Device, DeviceTensor, Error, Float};

/// A test of `$body` on the device (skipped without one), failing with `$what` on its first
/// error.
macro_rules! gpu_test {
    ($name:ident, $body:ident, $what:expr) => {
        #[test]
        fn $name() {
            let dev = gpu_or_skip!();
            $body(dev).expect($what);
        }
    };
}

/// Compares the written parts of a device state with the reference (labels `0..t`, members
/// up to each head's total).
fn assert_state_eq(s: &KmeansShape, got: &KmeansResult, want: &KmeansResult, t: usize, what: &str) {
    for h in 0..s.heads {
        let r = h * s.capacity..h * s.capacity + t;
        assert_eq!(got.labels[r.clone()], want.labels[r], "{what}: labels of head {h}");
        let n = want.indptr[h * (s.clusters + 1) + s.clusters] as usize;
        let m = h * s.capacity..h * s.capacity + n;
        assert_eq!(got.members[m.clone()], want.members[m], "{what}: members of head {h}");
    }
    assert_eq!(got.sizes, want.sizes, "{what}: sizes");
    assert_eq!(got.indptr, want.indptr, "{what}: indptr");
    assert_eq!(got.iterations, want.iterations, "{what}: iterations");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.centroids), bits(&want.centroids), "{what}: centroid bits");
}

fn kmeans_case<T: Float>(dev: &Device, s: KmeansShape, o: KmeansOptions, kind: Keys, seed: u64) -> Result<(), Error> {
    let k = keys::<T>(&s, kind, seed);
    let want = cpu::kmeans(&s, &o, &k)?;
    let keys_dev = DeviceTensor::from_host(dev, &k, &s.keys_shape())?;
    let mut state = ClusterState::zeros(dev, &s)?;
    let mut plan = KmeansPlan::new(dev, &s, o)?;
    plan.run(&keys_dev, &mut state)?;
    let got = state.to_host()?;
    let what = format!("{s:?} {o:?} {kind:?} {}", T::DTYPE);
    assert_state_eq(&s, &got, &want, s.tokens, &what);
    // Same inputs, same bits.
    plan.run(&keys_dev, &mut state)?;
    assert_eq!(state.to_host()?, got, "{what}: determinism");
    if s.capacity > s.tokens {
        let mut want = want;
        cpu::assign_appended(&s, o.metric, &k, s.tokens, s.capacity, &mut want)?;
        plan.assign_appended(&keys_dev, s.tokens, s.capacity, &mut state)?;
        assert_state_eq(&s, &state.to_host()?, &want, s.capacity, &format!("{what} appended"));
    }
    Ok(())
}

fn ks(heads: usize, tokens: usize, capacity: usize, clusters: usize, head_dim: usize) -> KmeansShape {
    KmeansShape { heads, tokens, capacity, clusters, head_dim }
}

gpu_test!(kmeans_matches_the_reference_bit_for_bit, kmeans_all, "k-means cases");

fn kmeans_all(dev: &Device) -> Result<(), Error> {
    for metric in [Metric::Cosine, Metric::L2] {
        let o = KmeansOptions { metric, iterations: 4, ..Default::default() };
        kmeans_case::<f16>(dev, ks(3, 1000, 1100, 37, 128), o, Keys::Normal, 1)?;
        kmeans_case::<bf16>(dev, ks(2, 333, 333, 9, 64), o, Keys::Blobs, 2)?;
        kmeans_case::<f32>(dev, ks(2, 257, 300, 1, 40), o, Keys::Normal, 3)?;
        kmeans_case::<f32>(dev, ks(1, 130, 130, 130, 16), o, Keys::Normal, 4)?;
        kmeans_case::<f16>(dev, ks(1, 200, 200, 8, 32), o, Keys::Equal, 5)?;
        kmeans_case::<f32>(dev, ks(2, 500, 520, 20, 24), o, Keys::Ternary, 6)?;
        let stop = KmeansOptions { stop_when_stable: true, iterations: 50, ..o };
        kmeans_case::<f32>(dev, ks(4, 700, 700, 16, 48), stop, Keys::Blobs, 7)?;
    }
    Ok(())
}

gpu_test!(tf32_assignment_is_admissible_and_deterministic, tf32_all, "TF32 assignment cases");

/// The TF32 mode against the f32 scores: an f32 k-means gives centroids; the TF32 plan
/// relabels every token from them (`assign_appended` over `0..Tcap`), and each label must be
/// admissible; then a whole TF32 run must be deterministic and its CSR that of its labels.
fn tf32_case<T: Float>(dev: &Device, s: KmeansShape, metric: Metric, kind: Keys, seed: u64) -> Result<(), Error> {
    let k = keys::<T>(&s, kind, seed);
    let keys_dev = DeviceTensor::from_host(dev, &k, &s.keys_shape())?;
    let f32_opts = KmeansOptions { metric, iterations: 3, ..Default::default() };
    let tf32_opts = KmeansOptions { assign: AssignPrecision::Tf32, ..f32_opts };
    let mut state = ClusterState::zeros(dev, &s)?;
    KmeansPlan::new(dev, &s, f32_opts)?.run(&keys_dev, &mut state)?;
    let mut plan = KmeansPlan::new(dev, &s, tf32_opts)?;
    plan.assign_appended(&keys_dev, 0, s.capacity, &mut state)?;
    let got = state.to_host()?;
    let (d, c) = (s.head_dim, s.clusters);
    for h in 0..s.heads {
        let cents = &got.centroids[h * c * d..(h + 1) * c * d];
        for t in 0..s.capacity {
            let x: Vec<f32> = k[(h * s.capacity + t) * d..][..d].iter().map(|v| v.to_f32()).collect();
            let label = got.labels[h * s.capacity + t];
            assert!(
                cpu::tf32_label_admissible(metric, &x, cents, label),
                "{s:?} {metric:?} {}: head {h} token {t} label {label} is not admissible",
                T::DTYPE
            );
        }
    }
    // The f32 labels of the same centroids: disagreements need a near-tie, so they are few.
    let mut f32_labels = got.clone();
    cpu::assign_appended(&s, metric, &k, 0, s.capacity, &mut f32_labels)?;
    let differ = got.labels.iter().zip(&f32_labels.labels).filter(|(a, b)| a != b).count();
    let n = s.heads * s.capacity;
    println!("{s:?} {metric:?} {}: {differ} of {n} TF32 labels differ from f32 (all admissible)", T::DTYPE);
    assert!(differ <= n / if kind == Keys::Blobs { 10 } else { 50 }, "{differ} of {n} labels differ");
    // The CSR is exactly that of the TF32 labels (an empty append rebuilds it from them).
    let mut csr = got.clone();
    cpu::assign_appended(&s, metric, &k, s.capacity, s.capacity, &mut csr)?;
    assert_eq!(got.sizes, csr.sizes, "TF32 sizes");
    assert_eq!(got.indptr, csr.indptr, "TF32 indptr");
    assert_eq!(got.members, csr.members, "TF32 members");
    // A whole TF32 run, twice: the same bits.
    let mut a = ClusterState::zeros(dev, &s)?;
    plan.run(&keys_dev, &mut a)?;
    let first = a.to_host()?;
    plan.run(&keys_dev, &mut a)?;
    assert_eq!(a.to_host()?, first, "TF32 run determinism");
    Ok(())
}

fn tf32_all(dev: &Device) -> Result<(), Error> {
    for metric in [Metric::Cosine, Metric::L2] {
        tf32_case::<f32>(dev, ks(2, 1000, 1000, 70, 128), metric, Keys::Normal, 11)?;
        tf32_case::<f16>(dev, ks(3, 777, 777, 256, 64), metric, Keys::Blobs, 12)?;
        tf32_case::<bf16>(dev, ks(1, 300, 300, 7, 128), metric, Keys::Normal, 13)?;
    }
    Ok(())
}

fn retrieve_case<T: Float>(dev: &Device, rs: RetrieveShape, o: RetrieveOptions, seed: u64) -> Result<(), Error> {
    let km = rs.kmeans_shape();
    let k = keys::<T>(&km, Keys::Normal, seed);
    let kplan_opts = KmeansOptions { iterations: 3, ..Default::default() };
    let mut kplan = KmeansPlan::new(dev, &km, kplan_opts)?;
    let keys_dev = DeviceTensor::from_host(dev, &k, &km.keys_shape())?;
    let mut state = ClusterState::zeros(dev, &km)?;
    kplan.run(&keys_dev, &mut state)?;
    let st = state.to_host()?;
    let q = normal::<T>(rs.batch * rs.q_tokens * rs.hq * rs.head_dim, seed + 1);
    let lens: Vec<u32> = (0..rs.batch).map(|b| (rs.capacity - (b * 13) % rs.capacity) as u32).collect();
    let (want_ip, want_ix) = cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &lens)?;
    let mut plan = RetrievePlan::new(dev, &rs, o)?;
    let q_dev = DeviceTensor::from_host(dev, &q, &rs.q_shape())?;
    let lens_dev = DeviceTensor::from_host(dev, &lens, &[rs.batch])?;
    let mut ip = DeviceTensor::<u32>::zeros(dev, &[rs.n_lists() + 1])?;
    let mut ix = DeviceTensor::<u32>::zeros(dev, &[plan.indices_capacity()])?;
    plan.run(&q_dev, &state, &lens_dev, &mut ip, &mut ix)?;
    let got_ip = ip.to_host()?;
    let got_ix = ix.to_host()?;
    assert_eq!(got_ip, want_ip, "{rs:?} {o:?}: indptr");
    assert_eq!(got_ix[..want_ix.len()], want_ix[..], "{rs:?} {o:?}: indices");
    // The lists feed the sparse decode as they are (its plan validates them on the device).
    if rs.head_dim == 64 || rs.head_dim == 128 {
        let ds = rs.decode_shape();
        DecodePlan::new(dev, &ds, DecodeOptions::default(), &lens, &ip, &ix)?;
    }
    Ok(())
}

gpu_test!(retrieval_matches_the_reference, retrieval_all, "retrieval cases");

fn retrieval_all(dev: &Device) -> Result<(), Error> {
    let rs = |b, tq, hq, hkv, d, c, cap| RetrieveShape {
        batch: b,
        q_tokens: tq,
        hq,
        hkv,
        head_dim: d,
        clusters: c,
        capacity: cap,
    };
    let o = |combine, budget, sinks, window| RetrieveOptions { combine, budget, sinks, window };
    retrieve_case::<f16>(dev, rs(2, 1, 8, 8, 128, 64, 4000), o(Combine::Max, 600, 4, 64), 10)?;
    retrieve_case::<bf16>(dev, rs(3, 4, 6, 2, 64, 30, 777), o(Combine::Sum, 200, 2, 16), 11)?;
    retrieve_case::<f32>(dev, rs(1, 16, 16, 2, 64, 17, 513), o(Combine::Max, 100, 1, 8), 12)?;
    retrieve_case::<f16>(dev, rs(2, 2, 4, 1, 128, 40, 1000), o(Combine::Max, 20, 16, 64), 13)?;
    retrieve_case::<f32>(dev, rs(1, 1, 4, 4, 40, 300, 900), o(Combine::Sum, 100_000, 0, 0), 14)?;
    retrieve_case::<f16>(dev, rs(1, 1, 3, 3, 64, 1, 200), o(Combine::Max, 50, 0, 0), 15)?;
    Ok(())
}

gpu_test!(bad_buffers_are_rejected_before_any_launch, bad_buffers, "setup");

fn bad_buffers(dev: &Device) -> Result<(), Error> {
    let s = ks(2, 100, 100, 4, 16);
    let tf32 = KmeansOptions { assign: AssignPrecision::Tf32, ..Default::default() };
    assert!(
        matches!(KmeansPlan::new(dev, &s, tf32), Err(Error::InvalidArgument { arg: "assign", .. })),
        "the TF32 assignment at head dim 16"
    );
    let mut plan = KmeansPlan::new(dev, &s, KmeansOptions::default())?;
    let keys_dev = DeviceTensor::<f32>::zeros(dev, &[2, 99, 16])?;
    let mut state = ClusterState::zeros(dev, &s)?;
    let before = state.to_host()?;
    assert!(matches!(plan.run(&keys_dev, &mut state), Err(Error::Shape { arg: "keys", .. })));
    let good = DeviceTensor::<f32>::zeros(dev, &s.keys_shape())?;
    assert!(matches!(plan.assign_appended(&good, 50, 101, &mut state), Err(Error::InvalidArgument { arg: "to", .. })));
    let mut small = ClusterState::zeros(dev, &ks(2, 100, 100, 3, 16))?;
    assert!(matches!(plan.run(&good, &mut small), Err(Error::Shape { arg: "centroids", .. })));
    assert_eq!(state.to_host()?, before, "nothing written");
    Ok(())
}
