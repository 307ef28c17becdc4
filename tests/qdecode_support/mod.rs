//! Random quantized-decode problems shared by the CPU and GPU tests: a KIVI-layout cache
//! (host codes from the quant CPU reference plus f16 residual windows) and MiKV caches (the
//! CPU reference cache), each with its dense reconstruction, the input of the reference.
#![allow(dead_code)]

use half::f16;
use ntkv::qdecode::{cpu, QdecodeOptions, QdecodeShape};
use ntkv::quant::cpu::{quantize, MikvCacheCpu, QuantizedHost};
use ntkv::quant::{Axis, HiPrecision, MikvConfig, QuantLayout, QuantSpec};
use ntkv::rng::Rng;
use ntkv::Float;

pub fn shape(batch: usize, q_tokens: usize, hq: usize, hkv: usize, head_dim: usize, capacity: usize) -> QdecodeShape {
    QdecodeShape { batch, q_tokens, hq, hkv, head_dim, capacity }
}

pub fn f16_vec(rng: &mut Rng, n: usize) -> Vec<f16> {
    rng.normal_vec(n).into_iter().map(f16::from_f32).collect()
}

pub fn q_vec<T: Float>(rng: &mut Rng, s: &QdecodeShape) -> Vec<T> {
    rng.normal_vec(s.q_shape().iter().product()).into_iter().map(T::from_f32).collect()
}

/// A KIVI cache on the host: `[H, Tq, D]` keys and values quantized with their specs, and
/// residual windows `[H, rcap, D]` of which `residual_len` rows are used.
pub struct Kivi {
    pub dims: [usize; 3],
    pub k_spec: QuantSpec,
    pub v_spec: QuantSpec,
    pub k: QuantizedHost,
    pub v: QuantizedHost,
    pub k_res: Vec<f16>,
    pub v_res: Vec<f16>,
    pub rcap: usize,
    pub residual_len: usize,
}

impl Kivi {
    pub fn random(
        rng: &mut Rng,
        s: &QdecodeShape,
        tq: usize,
        k_spec: QuantSpec,
        v_spec: QuantSpec,
        rcap: usize,
        residual_len: usize,
    ) -> Self {
        let h = s.n_lists();
        let d = s.head_dim;
        let dims = [h, tq, d];
        let k = quantize(k_spec, &dims, &f16_vec(rng, h * tq * d)).unwrap();
        let v = quantize(v_spec, &dims, &f16_vec(rng, h * tq * d)).unwrap();
        Kivi {
            dims,
            k_spec,
            v_spec,
            k,
            v,
            k_res: f16_vec(rng, h * rcap * d),
            v_res: f16_vec(rng, h * rcap * d),
            rcap,
            residual_len,
        }
    }

    pub fn tokens(&self) -> usize {
        self.dims[1] + self.residual_len
    }

    pub fn layouts(&self) -> (QuantLayout, QuantLayout) {
        (QuantLayout::new(self.k_spec, &self.dims).unwrap(), QuantLayout::new(self.v_spec, &self.dims).unwrap())
    }

    /// Dense `[H, T, D]` keys and values.
    pub fn dense(&self) -> (Vec<f16>, Vec<f16>) {
        (
            cpu::kivi_dense(self.k_spec, self.dims, &self.k, &self.k_res, self.rcap, self.residual_len).unwrap(),
            cpu::kivi_dense(self.v_spec, self.dims, &self.v, &self.v_res, self.rcap, self.residual_len).unwrap(),
        )
    }
}

pub fn mikv_cfg(
    lo_bits: u32,
    hi: HiPrecision,
    group: usize,
    axis: Axis,
    residual: usize,
    capacity: usize,
) -> MikvConfig {
    MikvConfig { lo_bits, hi, group, axis, residual, capacity }
}

/// Which tokens are important.
#[derive(Clone, Copy, Debug)]
pub enum Important {
    None,
    All,
    /// About one in `n`.
    Every(usize),
}

pub fn important_lists(rng: &mut Rng, heads: usize, tokens: usize, which: Important) -> Vec<Vec<u32>> {
    (0..heads)
        .map(|_| match which {
            Important::None => Vec::new(),
            Important::All => (0..tokens as u32).collect(),
            Important::Every(n) => (0..tokens as u32).filter(|_| rng.below(n) == 0).collect(),
        })
        .collect()
}

/// Random sorted CSR lists over `heads` heads of `tokens` tokens (about one token in three).
pub fn random_lists(rng: &mut Rng, heads: usize, tokens: usize) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for h in 0..heads {
        if h % 4 != 3 {
            indices.extend((0..tokens as u32).filter(|_| rng.below(3) == 0));
        }
        indptr.push(indices.len() as u32);
    }
    (indptr, indices)
}

/// The reference over dense keys and values.
pub fn reference<T: Float>(
    s: &QdecodeShape,
    opts: &QdecodeOptions,
    q: &[T],
    k: &[f16],
    v: &[f16],
    tokens: usize,
    lists: Option<(&[u32], &[u32])>,
) -> cpu::QdecodeReference {
    cpu::reference(s, opts, q, k, v, tokens, lists).unwrap()
}

/// Random key and value prefills `[H, T, D]` and their important lists, both valid for the
/// configs.
pub struct MikvPrefill {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub k_important: Vec<Vec<u32>>,
    pub v_important: Vec<Vec<u32>>,
}

/// A random MiKV key and value prefill, checked against the CPU reference caches.
pub fn mikv_pair(
    rng: &mut Rng,
    heads: usize,
    dim: usize,
    tokens: usize,
    k_cfg: MikvConfig,
    v_cfg: MikvConfig,
    which: Important,
) -> MikvPrefill {
    let kx = f16_vec(rng, heads * tokens * dim);
    let vx = f16_vec(rng, heads * tokens * dim);
    let ki = important_lists(rng, heads, tokens, which);
    let vi = important_lists(rng, heads, tokens, which);
    // Both configs must be valid for the shape.
    MikvCacheCpu::from_prefill(k_cfg, &kx, &[heads, tokens, dim], &ki).unwrap();
    MikvCacheCpu::from_prefill(v_cfg, &vx, &[heads, tokens, dim], &vi).unwrap();
    MikvPrefill { k: kx, v: vx, k_important: ki, v_important: vi }
}
