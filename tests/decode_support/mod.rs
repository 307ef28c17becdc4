//! Shared by the decode tests: random problems and index lists.
#![allow(dead_code)]

use ntkv::decode::DecodeConfig;
use ntkv::rng::Rng;
use ntkv::Float;

/// `len` distinct indices from `0..n`, ascending (Knuth's selection sampling).
pub fn sorted_subset(rng: &mut Rng, n: usize, len: usize) -> Vec<u32> {
    let len = len.min(n);
    let mut out = Vec::with_capacity(len);
    let mut needed = len;
    for i in 0..n {
        if needed == 0 {
            break;
        }
        if rng.below(n - i) < needed {
            out.push(i as u32);
            needed -= 1;
        }
    }
    out
}

/// How to size each list.
#[derive(Clone, Copy, Debug)]
pub enum Lens {
    /// Uniform in `0..=cache_len`.
    Random,
    /// Every list is the whole cache `0..cache_len`.
    Full,
    /// Exactly this many (capped by the cache length).
    Fixed(usize),
}

/// A random problem: inputs as f32 values already rounded to `T`.
pub struct Problem<T> {
    pub cfg: DecodeConfig,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub cache_lens: Vec<u32>,
    pub indptr: Vec<u32>,
    pub indices: Vec<u32>,
}

pub fn random_lists(rng: &mut Rng, cfg: &DecodeConfig, cache_lens: &[u32], lens: Lens) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for l in 0..cfg.n_lists() {
        let n = cache_lens[l / cfg.kv_heads] as usize;
        let len = match lens {
            Lens::Random => rng.below(n + 1),
            Lens::Full => n,
            Lens::Fixed(x) => x.min(n),
        };
        indices.extend(sorted_subset(rng, n, len));
        indptr.push(indices.len() as u32);
    }
    (indptr, indices)
}

pub fn random_problem<T: Float>(rng: &mut Rng, cfg: DecodeConfig, lens: Lens) -> Problem<T> {
    let cache_lens: Vec<u32> = (0..cfg.batch)
        .map(|_| {
            // Mostly near the capacity, sometimes short, never above it.
            let c = cfg.cache_capacity;
            (if rng.below(4) == 0 { rng.below(c + 1) } else { c - rng.below(c.min(8)) }) as u32
        })
        .collect();
    let (indptr, indices) = random_lists(rng, &cfg, &cache_lens, lens);
    let q_len: usize = cfg.q_shape().iter().product();
    let kv_len: usize = cfg.kv_shape().iter().product();
    let gen = |rng: &mut Rng, n: usize| -> Vec<T> { rng.normal_vec(n).into_iter().map(T::from_f32).collect() };
    let q = gen(rng, q_len);
    let k = gen(rng, kv_len);
    let v = gen(rng, kv_len);
    Problem { cfg, q, k, v, cache_lens, indptr, indices }
}

pub fn widen<T: Float>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| f64::from(v.to_f32())).collect()
}
