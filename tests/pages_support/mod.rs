//! Random problems shared by the pages CPU and GPU tests.
#![allow(dead_code)]

use ntkv::pages::{LandmarkSelectShape, QuestSelectShape};

/// A positional constructor `name(batch, hq, hkv, tq, d, cap, extra, k)` of a selection shape,
/// fields in declaration order; the two shapes differ only in their seventh field.
macro_rules! select_shape {
    ($(#[$doc:meta])* $name:ident -> $shape:ident { $extra:ident }) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name(
            batch: usize,
            hq: usize,
            hkv: usize,
            tq: usize,
            d: usize,
            cap: usize,
            $extra: usize,
            k: usize,
        ) -> $shape {
            $shape { batch, hq, hkv, q_tokens: tq, head_dim: d, capacity: cap, $extra, budget: k }
        }
    };
}

select_shape!(
    /// A Quest selection shape (seventh field: page size).
    qshape -> QuestSelectShape { page_size }
);
select_shape!(
    /// A ShadowKV selection shape (seventh field: outliers).
    lshape -> LandmarkSelectShape { outliers }
);

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

/// The element type of a table-driven case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    F32,
    F16,
    Bf16,
}

impl Ty {
    /// This type's entry of `[f32, f16, bf16]` (the instantiations of one generic check).
    pub fn pick<F: Copy>(self, by_type: [F; 3]) -> F {
        by_type[self as usize]
    }
}

/// One selection case of a differential table.
#[derive(Clone, Copy, Debug)]
pub enum Case {
    Quest(QuestSelectShape, Keys),
    Landmark(LandmarkSelectShape, Keys),
}

/// The `[f32, f16, bf16]` instantiations of one generic check of a selection shape `S`, called
/// with the case's context (its seed, and the device on the GPU) and its keys.
pub type Checks<C, S> = [fn(C, S, Keys); 3];

/// Runs every `(type, context, case)` through the check of its kind and type.
pub fn run_cases<C: Copy>(
    cases: &[(Ty, C, Case)],
    quest: Checks<C, QuestSelectShape>,
    landmark: Checks<C, LandmarkSelectShape>,
) {
    for &(ty, ctx, case) in cases {
        match case {
            Case::Quest(s, keys) => ty.pick(quest)(ctx, s, keys),
            Case::Landmark(s, keys) => ty.pick(landmark)(ctx, s, keys),
        }
    }
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
