//! Random problems shared by the pages CPU and GPU tests.
#![allow(dead_code)]

use ntkv::pages::{LandmarkSelectShape, QuestSelectShape};

/// A Quest selection shape, fields in declaration order.
#[allow(clippy::too_many_arguments)]
pub fn qshape(
    batch: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
    cap: usize,
    p: usize,
    k: usize,
) -> QuestSelectShape {
    QuestSelectShape { batch, hq, hkv, q_tokens: tq, head_dim: d, capacity: cap, page_size: p, budget: k }
}

/// A ShadowKV selection shape, fields in declaration order.
#[allow(clippy::too_many_arguments)]
pub fn lshape(
    batch: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
    cap: usize,
    out: usize,
    k: usize,
) -> LandmarkSelectShape {
    LandmarkSelectShape { batch, hq, hkv, q_tokens: tq, head_dim: d, capacity: cap, outliers: out, budget: k }
}

/// The sorted unique valid tokens (below `len`) of the blocks (of `block` tokens) that are
/// below `n_blocks`.
pub fn block_tokens(blocks: &[u32], block: usize, n_blocks: usize, len: usize) -> Vec<u32> {
    let mut tokens: Vec<u32> = blocks
        .iter()
        .filter(|&&b| (b as usize) < n_blocks)
        .flat_map(|&b| (b as usize * block..((b as usize + 1) * block).min(len)).map(|t| t as u32))
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    tokens
}
use ntkv::rng::Rng;
use ntkv::Float;

/// One retrieval problem: a key cache, per-sequence lengths and queries.
pub struct Problem<T> {
    pub keys: Vec<T>,
    pub lens: Vec<u32>,
    pub q: Vec<T>,
}

/// How the keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys {
    /// Independent normals.
    Normal,
    /// Every key the same vector: all page bounds and landmarks tie.
    AllEqual,
    /// Normals rounded to a few values: many exact ties among scores.
    Coarse,
}

pub fn quest(s: &QuestSelectShape) -> (usize, usize, usize, usize) {
    (s.batch, s.hkv, s.capacity, s.head_dim)
}

/// A problem for caches of `[batch, hkv, capacity, d]` and queries `[batch, tq, hq, d]`;
/// lengths: the last sequence full, the others random (one possibly empty when `allow_empty`).
pub fn problem<T: Float>(
    rng: &mut Rng,
    (batch, hkv, capacity, d): (usize, usize, usize, usize),
    (tq, hq): (usize, usize),
    keys: Keys,
    allow_empty: bool,
) -> Problem<T> {
    let n = batch * hkv * capacity * d;
    let base = rng.normal_vec(d);
    let kv: Vec<T> = (0..n)
        .map(|i| {
            let x = match keys {
                Keys::Normal => rng.normal(),
                Keys::AllEqual => base[i % d],
                Keys::Coarse => (rng.normal() * 2.0).round() / 2.0,
            };
            T::from_f32(x)
        })
        .collect();
    let lens = (0..batch)
        .map(|b| {
            if b + 1 == batch {
                capacity as u32
            } else if allow_empty && b == 0 {
                0
            } else {
                1 + rng.below(capacity) as u32
            }
        })
        .collect();
    let q = (0..batch * tq * hq * d).map(|_| T::from_f32(rng.normal())).collect();
    Problem { keys: kv, lens, q }
}

pub fn quest_problem<T: Float>(rng: &mut Rng, s: &QuestSelectShape, keys: Keys, empty: bool) -> Problem<T> {
    problem(rng, quest(s), (s.q_tokens, s.hq), keys, empty)
}

pub fn landmark_problem<T: Float>(rng: &mut Rng, s: &LandmarkSelectShape, keys: Keys, empty: bool) -> Problem<T> {
    problem(rng, (s.batch, s.hkv, s.capacity, s.head_dim), (s.q_tokens, s.hq), keys, empty)
}

/// Checks a CSR selection's structure: indptr starts at 0 and is non-decreasing, each row is
/// strictly ascending and below its sequence's length.
pub fn assert_csr(indptr: &[u32], indices: &[u32], lens: &[u32], hkv: usize) {
    assert_eq!(indptr[0], 0);
    for (r, w) in indptr.windows(2).enumerate() {
        assert!(w[0] <= w[1], "indptr decreases at row {r}");
        let row = &indices[w[0] as usize..w[1] as usize];
        assert!(row.windows(2).all(|p| p[0] < p[1]), "row {r} is not strictly ascending");
        assert!(row.iter().all(|&t| t < lens[r / hkv]), "row {r} lists a token past its length");
    }
}
