//! Shared by the top-k family's test files: input generators and independent references.
#![allow(dead_code)]

use ntkv::rng::Rng;
use ntkv::Float;

/// Random scores with ties, NaN, ±inf and ±0 mixed in (one special in `1 / specials_per`).
pub fn spicy_row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(20) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5..=9 => (rng.below(4) as f32) - 1.5,
            _ => rng.normal(),
        })
        .collect()
}

/// An independent top-k: repeated selection of the best remaining element, where "better"
/// is spelled out with float comparisons (NaN worst, zeros equal, lower index on ties).
pub fn naive_topk(row: &[f32], k: usize) -> Vec<u32> {
    let better = |a: (f32, usize), b: (f32, usize)| -> bool {
        match (a.0.is_nan(), b.0.is_nan()) {
            (true, true) => a.1 < b.1,
            (true, false) => false,
            (false, true) => true,
            (false, false) => a.0 > b.0 || (a.0 == b.0 && a.1 < b.1),
        }
    };
    let mut taken = vec![false; row.len()];
    let mut out = Vec::new();
    for _ in 0..k.min(row.len()) {
        let mut best: Option<usize> = None;
        for i in 0..row.len() {
            if !taken[i] && best.map_or(true, |b| better((row[i], i), (row[b], b))) {
                best = Some(i);
            }
        }
        let b = best.expect("a remaining element");
        taken[b] = true;
        out.push(b as u32);
    }
    out
}

/// Brute-force keep list: sort the older tokens by (score desc, index asc), take, sort.
pub fn brute_keep(scores: &[f32], older: usize, k_sel: usize, recent: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..older as u32).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (scores[a as usize], scores[b as usize]);
        y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
    });
    let mut keep: Vec<u32> = idx[..k_sel].to_vec();
    keep.sort_unstable();
    keep.extend(older as u32..(older + recent) as u32);
    keep
}

/// Brute-force block expansion: mark every token of every selected block, list the marks.
/// `span(r, b)` gives block `b`'s token range in row `r`.
pub fn brute_expand(
    rows: usize,
    kb: usize,
    nb: usize,
    blocks: &[u32],
    lens: &[usize],
    span: impl Fn(usize, usize) -> (usize, usize),
) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut out = Vec::new();
    for r in 0..rows {
        let mut mark = vec![false; lens[r]];
        for &b in &blocks[r * kb..(r + 1) * kb] {
            if (b as usize) < nb {
                let (s, e) = span(r, b as usize);
                let e = e.min(lens[r]);
                if s < e {
                    mark[s..e].iter_mut().for_each(|m| *m = true);
                }
            }
        }
        out.extend((0..lens[r]).filter(|&j| mark[j]).map(|j| j as u32));
        indptr.push(out.len() as u32);
    }
    (indptr, out)
}

/// Value slots must hold the same bits (any NaN matches any NaN).
pub fn same_values<T: Float>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (s, (a, b)) in got.iter().zip(want).enumerate() {
        let (a, b) = (a.to_f32(), b.to_f32());
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what}: value slot {s} got {a} want {b}");
    }
}
