//! Shared by the cluster tests: random keys and queries, and the property checks of a k-means
//! state and of retrieved lists.
#![allow(dead_code)]

use ntkv::cluster::cpu::{self, KmeansResult};
use ntkv::cluster::{KmeansShape, Metric};
use ntkv::rng::Rng;
use ntkv::Float;

/// How the keys of a case are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys {
    /// Standard normal.
    Normal,
    /// Every key the same vector (all scores tie).
    Equal,
    /// Values in {-1, 0, 1} (many ties).
    Ternary,
    /// Eight tight blobs (with more clusters than blobs, some clusters end empty).
    Blobs,
}

pub fn keys<T: Float>(shape: &KmeansShape, kind: Keys, seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    let d = shape.head_dim;
    let centers: Vec<f32> = (0..8 * d).map(|_| 4.0 * rng.normal()).collect();
    (0..shape.heads * shape.capacity * d)
        .map(|i| {
            let v = match kind {
                Keys::Normal => rng.normal(),
                Keys::Equal => 0.5 + (i % d) as f32 * 0.25,
                Keys::Ternary => (rng.next_u64() % 3) as f32 - 1.0,
                Keys::Blobs => centers[((i / d) % 8) * d + i % d] + 0.1 * rng.normal(),
            };
            T::from_f32(v)
        })
        .collect()
}

pub fn normal<T: Float>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

/// The score of key `x` against centroid `c` under the metric (larger is better).
pub fn score(metric: Metric, x: &[f32], c: &[f32]) -> f32 {
    let dt = cpu::dot(x, c);
    match metric {
        Metric::Cosine => dt,
        Metric::L2 => -((-2.0f32).mul_add(dt, cpu::dot(c, c))),
    }
}

/// Checks the CSR of head `h` against its labels over tokens `0..t`: sizes, offsets, every
/// member labelled with its cluster, ascending, and every token listed once.
pub fn check_csr(shape: &KmeansShape, r: &KmeansResult, h: usize, t: usize) {
    let c = shape.clusters;
    let labels = &r.labels[h * shape.capacity..h * shape.capacity + t];
    let ip = &r.indptr[h * (c + 1)..(h + 1) * (c + 1)];
    assert_eq!(ip[0], 0);
    assert_eq!(ip[c] as usize, t, "every token is a member");
    let mut seen = vec![false; t];
    for cl in 0..c {
        let m = r.members_of(shape, h, cl);
        assert_eq!(m.len() as u32, r.sizes[h * c + cl], "size of cluster {cl}");
        assert!(m.windows(2).all(|w| w[0] < w[1]), "members of {cl} ascending");
        for &tok in m {
            assert_eq!(labels[tok as usize] as usize, cl, "token {tok} listed under {cl}");
            assert!(!seen[tok as usize]);
            seen[tok as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// Checks that every label of `r`'s head `h` over `from..to` is the best score against
/// `centroids` (`[H, C, D]`: those the labelling pass used), ties to the lower index.
#[allow(clippy::too_many_arguments)]
pub fn check_argmax<T: Float>(
    shape: &KmeansShape,
    metric: Metric,
    keys: &[T],
    r: &KmeansResult,
    centroids: &[f32],
    h: usize,
    from: usize,
    to: usize,
) {
    let d = shape.head_dim;
    let cents = &centroids[h * shape.clusters * d..(h + 1) * shape.clusters * d];
    for t in from..to {
        let x: Vec<f32> = keys[(h * shape.capacity + t) * d..][..d].iter().map(|v| v.to_f32()).collect();
        let l = r.labels[h * shape.capacity + t] as usize;
        let s = score(metric, &x, &cents[l * d..(l + 1) * d]);
        for (c, cent) in cents.chunks_exact(d).enumerate() {
            let o = score(metric, &x, cent);
            assert!(o < s || (o == s && c >= l), "token {t}: cluster {c} ({o}) beats label {l} ({s})");
        }
    }
}

/// Checks a retrieved CSR: sorted unique lists below each length, sinks and window present,
/// no longer than max(budget, S + W).
pub fn check_lists(
    indptr: &[u32],
    indices: &[u32],
    lens: &[u32],
    hkv: usize,
    budget: usize,
    sinks: usize,
    window: usize,
) {
    assert_eq!(indptr[0], 0);
    for l in 0..indptr.len() - 1 {
        let list = &indices[indptr[l] as usize..indptr[l + 1] as usize];
        let len = lens[l / hkv] as usize;
        assert!(list.windows(2).all(|w| w[0] < w[1]), "list {l} strictly ascending");
        assert!(list.iter().all(|&t| (t as usize) < len), "list {l} below its length");
        for t in (0..sinks.min(len)).chain(len - window.min(len)..len) {
            assert!(list.binary_search(&(t as u32)).is_ok(), "list {l} misses sink/window token {t}");
        }
        assert!(list.len() <= budget.max(sinks + window).min(len), "list {l} over budget");
    }
}
