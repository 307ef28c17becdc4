//! Shared by the decode tests and benches: a shape-plus-options helper, random problems and
//! index lists.
#![allow(dead_code)]

use ntkv::decode::{DecodeOptions, DecodeShape};
use ntkv::rng::Rng;
use ntkv::Float;

/// A decode shape with its options (a test shorthand: the library takes the two apart).
#[derive(Clone, Debug, PartialEq)]
pub struct Cfg {
    pub shape: DecodeShape,
    pub opts: DecodeOptions,
}

impl Cfg {
    /// Non-causal, default scale, automatic chunking.
    pub fn new(batch: usize, q_tokens: usize, hq: usize, hkv: usize, head_dim: usize, capacity: usize) -> Self {
        Cfg { shape: DecodeShape { batch, q_tokens, hq, hkv, head_dim, capacity }, opts: DecodeOptions::default() }
    }

    pub fn causal(mut self, causal: bool) -> Self {
        self.opts.causal = causal;
        self
    }

    pub fn scale(mut self, scale: f32) -> Self {
        self.opts.scale = Some(scale);
        self
    }

    pub fn chunk_tokens(mut self, chunk: usize) -> Self {
        self.opts.chunk_tokens = Some(chunk);
        self
    }

    pub fn softmax_scale(&self) -> f32 {
        self.opts.scale_for(self.shape.head_dim)
    }
}

impl std::ops::Deref for Cfg {
    type Target = DecodeShape;
    fn deref(&self) -> &DecodeShape {
        &self.shape
    }
}

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
    pub cfg: Cfg,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub cache_lens: Vec<u32>,
    pub indptr: Vec<u32>,
    pub indices: Vec<u32>,
}

impl<T: Float> Problem<T> {
    /// The CPU reference on this problem.
    pub fn reference(&self) -> ntkv::Result<ntkv::decode::cpu::DecodeReference> {
        ntkv::decode::cpu::sparse_decode(
            &self.cfg.shape,
            &self.cfg.opts,
            &self.q,
            &self.k,
            &self.v,
            &self.cache_lens,
            &self.indptr,
            &self.indices,
        )
    }
}

/// CSR lists, one per `(b, kv head)`, of `lens` sorted indices below each sequence's cache
/// length.
pub fn random_lists(rng: &mut Rng, shape: &DecodeShape, cache_lens: &[u32], lens: Lens) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for l in 0..shape.n_lists() {
        let n = cache_lens[l / shape.hkv] as usize;
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

/// `n` N(0, 1) values rounded to `T`.
pub fn normal<T: Float>(rng: &mut Rng, n: usize) -> Vec<T> {
    rng.normal_vec(n).into_iter().map(T::from_f32).collect()
}

pub fn random_problem<T: Float>(rng: &mut Rng, cfg: Cfg, lens: Lens) -> Problem<T> {
    let cache_lens: Vec<u32> = (0..cfg.batch)
        .map(|_| {
            // Mostly near the capacity, sometimes short, never above it.
            let c = cfg.capacity;
            (if rng.below(4) == 0 { rng.below(c + 1) } else { c - rng.below(c.min(8)) }) as u32
        })
        .collect();
    let (indptr, indices) = random_lists(rng, &cfg, &cache_lens, lens);
    let q = normal(rng, cfg.q_shape().iter().product());
    let k = normal(rng, cfg.kv_shape().iter().product());
    let v = normal(rng, cfg.kv_shape().iter().product());
    Problem { cfg, q, k, v, cache_lens, indptr, indices }
}

pub fn widen<T: Float>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| f64::from(v.to_f32())).collect()
}
