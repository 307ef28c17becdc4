//! Properties of the k-means and cluster-retrieval references: labels are the argmax (ties
//! to the lower index), the CSR lists match the labels, centroids are the members' means or
//! unit directions, empty clusters keep their centroid, C = 1, C = T, all-equal keys, stop
//! when stable, incremental assignment, and retrieval lists (whole clusters, the cut, sinks,
//! window, budgets below S + W, GQA 1, 3, 8) that the sparse decode accepts.

mod cluster_support;

use cluster_support::{check_argmax, check_csr, check_lists, keys, normal, Keys};
use half::{bf16, f16};
use ntkv::cluster::cpu::{self, KmeansResult};
use ntkv::cluster::{
    tf32_score_bound, AssignPrecision, Combine, KmeansOptions, KmeansShape, Metric, RetrieveOptions, RetrieveShape,
};
use ntkv::decode::{validate_lists, DecodeShape};
use ntkv::Float;

fn shape(heads: usize, tokens: usize, capacity: usize, clusters: usize, head_dim: usize) -> KmeansShape {
    KmeansShape { heads, tokens, capacity, clusters, head_dim }
}

fn opts(metric: Metric, iterations: usize) -> KmeansOptions {
    KmeansOptions { metric, iterations, ..Default::default() }
}

fn run<T: Float>(s: &KmeansShape, o: &KmeansOptions, kind: Keys, seed: u64) -> (Vec<T>, KmeansResult) {
    let k = keys::<T>(s, kind, seed);
    let r = cpu::kmeans(s, o, &k).expect("valid k-means");
    (k, r)
}

/// The labels of an n-iteration run are the assignment against the centroids of the
/// (n-1)-iteration run: the last pass labels, then the last update moves the centroids.
fn centroids_before_last_pass<T: Float>(s: &KmeansShape, o: &KmeansOptions, k: &[T]) -> Vec<f32> {
    cpu::kmeans(s, &KmeansOptions { iterations: o.iterations - 1, ..*o }, k).expect("valid").centroids
}

#[test]
fn labels_are_argmax_and_csr_matches_every_metric_and_dtype() {
    for (metric, seed) in [(Metric::Cosine, 1u64), (Metric::L2, 2)] {
        let s = shape(2, 203, 210, 9, 20);
        let o = opts(metric, 4);
        let (k, r) = run::<f16>(&s, &o, Keys::Normal, seed);
        let prev = centroids_before_last_pass(&s, &o, &k);
        for h in 0..2 {
            check_csr(&s, &r, h, 203);
            check_argmax(&s, metric, &k, &r, &prev, h, 0, 203);
        }
        assert!(r.labels[203..210].iter().all(|&l| l == cpu::NO_LABEL), "tokens past T are unlabelled");
        let (k, r) = run::<bf16>(&s, &o, Keys::Blobs, seed);
        check_csr(&s, &r, 1, 203);
        check_argmax(&s, metric, &k, &r, &centroids_before_last_pass(&s, &o, &k), 1, 0, 203);
        let (_, r32) = run::<f32>(&s, &o, Keys::Ternary, seed);
        check_csr(&s, &r32, 0, 203);
    }
}

#[test]
fn centroids_are_means_or_unit_directions() {
    let s = shape(1, 150, 150, 6, 12);
    let (k, r) = run::<f32>(&s, &opts(Metric::L2, 3), Keys::Blobs, 5);
    for c in 0..6 {
        let m = r.members_of(&s, 0, c);
        if m.is_empty() {
            continue;
        }
        for d in 0..12 {
            let mean: f64 = m.iter().map(|&t| f64::from(k[t as usize * 12 + d])).sum::<f64>() / m.len() as f64;
            let got = f64::from(r.centroids[c * 12 + d]);
            assert!((got - mean).abs() <= 1e-5 * (1.0 + mean.abs()), "cluster {c} d {d}: {got} vs {mean}");
        }
    }
    let (_, r) = run::<f32>(&s, &opts(Metric::Cosine, 3), Keys::Normal, 6);
    for c in r.centroids.chunks_exact(12) {
        let n: f64 = c.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((n - 1.0).abs() < 1e-5, "unit centroid, |c|^2 = {n}");
    }
}

#[test]
fn single_cluster_takes_every_token() {
    let s = shape(2, 77, 80, 1, 16);
    let (k, r) = run::<f32>(&s, &opts(Metric::L2, 2), Keys::Normal, 7);
    for h in 0..2 {
        assert!(r.labels[h * 80..h * 80 + 77].iter().all(|&l| l == 0));
        assert_eq!(r.sizes[h], 77);
        check_csr(&s, &r, h, 77);
        let mean: f64 = (0..77).map(|t| f64::from(k[(h * 80 + t) * 16])).sum::<f64>() / 77.0;
        assert!((f64::from(r.centroids[h * 16]) - mean).abs() < 1e-5);
    }
}

#[test]
fn as_many_clusters_as_tokens_gives_singletons() {
    let s = shape(1, 40, 40, 40, 8);
    let (_, r) = run::<f32>(&s, &opts(Metric::L2, 3), Keys::Normal, 8);
    assert!(r.sizes.iter().all(|&n| n == 1), "sizes {:?}", r.sizes);
    check_csr(&s, &r, 0, 40);
}

#[test]
fn equal_keys_tie_to_cluster_zero_and_empty_clusters_keep_their_centroid() {
    for metric in [Metric::Cosine, Metric::L2] {
        // One pass: the initial centroids are all the same key, so every score ties. (A second
        // pass may move keys: cluster 0's updated centroid can round away from the shared key,
        // while the empty clusters keep it exactly.)
        let s = shape(1, 50, 50, 4, 8);
        let (k, r) = run::<f32>(&s, &opts(metric, 1), Keys::Equal, 9);
        assert!(r.labels[..50].iter().all(|&l| l == 0), "{metric:?}: ties go to the lower index");
        assert_eq!(&r.sizes, &[50, 0, 0, 0]);
        // Clusters 1..4 never had members: still their initial sample (the shared key).
        let x: Vec<f32> = k[..8].to_vec();
        let inv = cpu::inv_norm(&x);
        for c in 1..4 {
            for (got, &xd) in r.centroids[c * 8..(c + 1) * 8].iter().zip(&x) {
                let want = if metric == Metric::Cosine { xd * inv } else { xd };
                assert_eq!(got.to_bits(), want.to_bits());
            }
        }
    }
}

#[test]
fn init_is_a_seeded_sample_of_distinct_tokens() {
    for (t, c) in [(100usize, 7usize), (50, 50), (33, 1)] {
        for seed in [0u64, 1, 99] {
            let mut toks: Vec<usize> = (0..c).map(|i| cpu::init_token(seed, 3, i, t, c)).collect();
            toks.sort_unstable();
            toks.dedup();
            assert_eq!(toks.len(), c);
            assert!(toks.iter().all(|&x| x < t));
        }
    }
    let s = shape(1, 120, 120, 5, 8);
    let k = keys::<f32>(&s, Keys::Normal, 10);
    let a = cpu::kmeans(&s, &KmeansOptions { seed: 1, ..opts(Metric::L2, 1) }, &k).unwrap();
    let b = cpu::kmeans(&s, &KmeansOptions { seed: 1, ..opts(Metric::L2, 1) }, &k).unwrap();
    let c = cpu::kmeans(&s, &KmeansOptions { seed: 2, ..opts(Metric::L2, 1) }, &k).unwrap();
    assert_eq!(a, b, "same seed, same state");
    assert_ne!(a.centroids, c.centroids, "another seed, another sample");
}

#[test]
fn stop_when_stable_equals_the_fixed_run_of_that_length() {
    let s = shape(2, 160, 160, 8, 10);
    let k = keys::<f32>(&s, Keys::Blobs, 11);
    let stop = cpu::kmeans(&s, &KmeansOptions { stop_when_stable: true, ..opts(Metric::L2, 100) }, &k).unwrap();
    for h in 0..2 {
        let n = stop.iterations[h] as usize;
        assert!(n < 100, "blobs converge");
        let fixed = cpu::kmeans(&s, &opts(Metric::L2, n), &k).unwrap();
        assert_eq!(fixed.labels[h * 160..(h + 1) * 160], stop.labels[h * 160..(h + 1) * 160]);
        assert_eq!(fixed.centroids[h * 80..(h + 1) * 80], stop.centroids[h * 80..(h + 1) * 80]);
    }
}

#[test]
fn appended_keys_join_the_nearest_centroid_without_moving_it() {
    for metric in [Metric::Cosine, Metric::L2] {
        let s = shape(2, 100, 130, 6, 16);
        let (k, mut r) = run::<f16>(&s, &opts(metric, 3), Keys::Normal, 12);
        let before = r.clone();
        cpu::assign_appended(&s, metric, &k, 100, 130, &mut r).unwrap();
        assert_eq!(r.centroids, before.centroids);
        for h in 0..2 {
            assert_eq!(r.labels[h * 130..h * 130 + 100], before.labels[h * 130..h * 130 + 100]);
            check_csr(&s, &r, h, 130);
            check_argmax(&s, metric, &k, &r, &r.centroids, h, 100, 130);
            for c in 0..6 {
                let old = before.members_of(&s, h, c);
                assert_eq!(&r.members_of(&s, h, c)[..old.len()], old, "lists grow at the end");
            }
        }
    }
}

fn retrieval_problem(
    b: usize,
    tq: usize,
    hq: usize,
    hkv: usize,
    c: usize,
    cap: usize,
) -> (RetrieveShape, Vec<f32>, KmeansResult, Vec<u32>) {
    let d = 16;
    let rs = RetrieveShape { batch: b, q_tokens: tq, hq, hkv, head_dim: d, clusters: c, capacity: cap };
    let ks = shape(b * hkv, cap, cap, c, d);
    let (_, state) = run::<f32>(&ks, &opts(Metric::Cosine, 2), Keys::Normal, 13 + hq as u64);
    let q = normal::<f32>(b * tq * hq * d, 14);
    let lens: Vec<u32> = (0..b).map(|i| (cap - 7 * i) as u32).collect();
    (rs, q, state, lens)
}

#[test]
fn retrieval_takes_whole_clusters_then_cuts_the_next() {
    for (hq, hkv) in [(4usize, 4usize), (6, 2), (16, 2)] {
        let (rs, q, st, lens) = retrieval_problem(2, 3, hq, hkv, 10, 300);
        for combine in [Combine::Max, Combine::Sum] {
            let o = RetrieveOptions { combine, budget: 120, sinks: 4, window: 8 };
            let (ip, ix) = cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &lens).unwrap();
            check_lists(&ip, &ix, &lens, hkv, 120, 4, 8);
            let scores = cpu::scores(&rs, combine, &q, &st.centroids).unwrap();
            let ks = rs.kmeans_shape();
            for l in 0..rs.n_lists() {
                let list = &ix[ip[l] as usize..ip[l + 1] as usize];
                let row = &scores[l * 10..(l + 1) * 10];
                let (_, ranked) = ntkv::select::cpu::topk(row, 1, 10, 10, None).unwrap();
                let first = ranked[0] as usize;
                let m = st.members_of(&ks, l, first);
                let take = m.len().min(120 - 12);
                for &t in &m[..take] {
                    if (t as usize) < lens[l / hkv] as usize {
                        assert!(list.binary_search(&t).is_ok(), "best cluster's lowest members kept");
                    }
                }
            }
            // The decode's own validator accepts the lists.
            let ds = DecodeShape { batch: 2, q_tokens: 3, hq, hkv, head_dim: 64, capacity: 300 };
            validate_lists(&ds, &lens, &ip, &ix).expect("decode-ready lists");
        }
    }
}

#[test]
fn budget_below_sinks_and_window_keeps_exactly_them() {
    let (rs, q, st, lens) = retrieval_problem(1, 1, 3, 1, 5, 100);
    let o = RetrieveOptions { combine: Combine::Max, budget: 10, sinks: 6, window: 20 };
    let (ip, ix) = cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &lens).unwrap();
    let want: Vec<u32> = (0..6).chain(80..100).collect();
    assert_eq!(ip, vec![0, 26]);
    assert_eq!(ix, want);
}

#[test]
fn budget_above_the_cache_keeps_every_token() {
    let (rs, q, st, lens) = retrieval_problem(2, 1, 8, 8, 7, 90);
    let o = RetrieveOptions { combine: Combine::Sum, budget: 10_000, sinks: 2, window: 2 };
    let (ip, ix) = cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &lens).unwrap();
    for l in 0..16 {
        let list = &ix[ip[l] as usize..ip[l + 1] as usize];
        let want: Vec<u32> = (0..lens[l / 8]).collect();
        assert_eq!(list, &want[..]);
    }
}

#[test]
fn nan_scores_rank_last() {
    let (rs, q, mut st, lens) = retrieval_problem(1, 1, 2, 2, 4, 64);
    // A NaN centroid in list 0, cluster 0: it ranks below every other cluster.
    st.centroids[0] = f32::NAN;
    let s = cpu::scores(&rs, Combine::Max, &q, &st.centroids).unwrap();
    assert!(s[0].is_nan());
    let ks = rs.kmeans_shape();
    let o = RetrieveOptions { combine: Combine::Max, budget: 64 - st.sizes[0] as usize, sinks: 0, window: 0 };
    let (ip, ix) = cpu::retrieve(&rs, &o, &q, &st.centroids, &st.indptr, &st.members, &lens).unwrap();
    let list = &ix[ip[0] as usize..ip[1] as usize];
    for &t in st.members_of(&ks, 0, 0) {
        assert!(list.binary_search(&t).is_err(), "the NaN cluster is not taken before the others");
    }
}

/// The admissibility rule of the TF32 assignment: the f32 label always; another label only
/// within the summed score bounds, never a bit-equal twin of a lower centroid, never out of
/// range or against a non-finite score.
#[test]
fn tf32_admissibility_rule() {
    let d = 4;
    // x = e0; centroids score 1, 1 - 1e-4 (a near tie), 0.5, and a twin of centroid 0.
    let x = [1.0f32, 0.0, 0.0, 0.0];
    let mut cents = vec![
        1.0f32,
        0.0,
        0.0,
        0.0, //
        1.0 - 1e-4,
        0.014,
        0.0,
        0.0, //
        0.5,
        0.866,
        0.0,
        0.0, //
        1.0,
        0.0,
        0.0,
        0.0,
    ];
    for metric in [Metric::Cosine, Metric::L2] {
        assert!(cpu::tf32_label_admissible(metric, &x, &cents, 0), "{metric:?}: the f32 label");
        assert!(cpu::tf32_label_admissible(metric, &x, &cents, 1), "{metric:?}: a near tie");
        assert!(!cpu::tf32_label_admissible(metric, &x, &cents, 2), "{metric:?}: a clear loser");
        assert!(!cpu::tf32_label_admissible(metric, &x, &cents, 3), "{metric:?}: the higher twin");
        assert!(!cpu::tf32_label_admissible(metric, &x, &cents, 4), "{metric:?}: out of range");
        assert!(!cpu::tf32_label_admissible(metric, &x, &cents, u32::MAX), "{metric:?}: no label");
    }
    assert!(!cpu::tf32_label_admissible(Metric::Cosine, &x, &cents[..d * 2 - 1], 0), "misshapen centroids");
    assert!(!cpu::tf32_label_admissible(Metric::Cosine, &[], &cents, 0), "empty key");
    // A NaN centroid never is an admissible alternative.
    cents[9] = f32::NAN;
    assert!(!cpu::tf32_label_admissible(Metric::Cosine, &x, &cents, 2));
    // The bound: cosine eps|x||c|, L2 eps(2|x||c| + |c|^2).
    let eps = ntkv::cluster::TF32_EPSILON;
    assert_eq!(tf32_score_bound(Metric::Cosine, 2.0, 3.0), eps * 6.0);
    assert_eq!(tf32_score_bound(Metric::L2, 2.0, 3.0), eps * 21.0);
    // The TF32 option runs the f32 reference (validated against the shape first).
    let s = shape(1, 50, 50, 4, 64);
    let k = keys::<f32>(&s, Keys::Normal, 9);
    let tf32 = KmeansOptions { assign: AssignPrecision::Tf32, ..opts(Metric::L2, 2) };
    assert_eq!(cpu::kmeans(&s, &tf32, &k).unwrap(), cpu::kmeans(&s, &opts(Metric::L2, 2), &k).unwrap());
}
