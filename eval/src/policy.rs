//! KV-cache policies, each a per-layer cache that attends one decode step at a time through
//! ntkv's CPU references.
//!
//! Every policy starts from the same full-attention prefill ([`Prefill`]) and owns its own
//! cache per layer. One decode step at layer `l` appends the new token's post-RoPE `k`, `v`
//! (`[Hkv·D]`) and returns the attention output `o [Hq·D]` of its query `q [Hq·D]`:
//! - selection policies (full, StreamingLLM, SnapKV, Quest) build CSR token lists over a
//!   cache that keeps every row, and attend with `ntkv::decode::cpu::sparse_decode`;
//! - H2O keeps a compacted cache of `budget + 1` rows and evicts with `ntkv::topk::cpu`
//!   (`h2o_accumulate`, `h2o_select`, `h2o_compact`);
//! - KIVI and MiKV replace the quantized rows by their reconstruction (`ntkv::quant::cpu`,
//!   `MikvCacheCpu`) and attend over the dense result with the same decode reference, which is
//!   what `ntkv::qdecode::cpu::reference` computes for the fused quantized decode.

use std::fmt;

use anyhow::{bail, ensure, Result};
use half::f16;
use ntkv::decode::{cpu::sparse_decode, DecodeOptions, DecodeShape};
use ntkv::pages::cpu::{quest_meta, quest_meta_append, quest_select};
use ntkv::pages::{QuestMetaShape, QuestSelectShape, DEFAULT_PAGE_SIZE};
use ntkv::quant::cpu::{dequantize, quantize, MikvCacheCpu};
use ntkv::quant::{Axis, HiPrecision, MikvConfig, QuantSpec};
use ntkv::topk::cpu::{h2o_accumulate, h2o_compact, h2o_select, snapkv_select_from_scores};
use ntkv::topk::{AttnShape, GqaReduce};

/// Attention sinks kept by StreamingLLM.
pub const SINKS: usize = 4;
/// KIVI's and MiKV's full-precision residual window (a multiple of [`GROUP`]).
pub const RESIDUAL: usize = 128;
/// Quantization group size.
pub const GROUP: usize = 32;

/// What the prefill leaves for one layer.
#[derive(Clone, Debug)]
pub struct PrefillLayer {
    /// Post-RoPE keys `[Hkv, P, D]`.
    pub k: Vec<f32>,
    /// Values `[Hkv, P, D]`.
    pub v: Vec<f32>,
    /// Attention mass per key `[Hkv, P]` over all prompt queries (GQA sum).
    pub mass: Vec<f32>,
    /// SnapKV's pooled votes of the last `window` prompt queries, `[Hkv, P − window]`.
    pub snap_scores: Vec<f32>,
}

/// The head geometry: `hq` query heads over `hkv` key/value heads, of dimension `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

/// The shared prefill: every layer's cache and scores for a `len`-token prompt.
#[derive(Clone, Debug)]
pub struct Prefill {
    /// Per layer.
    pub layers: Vec<PrefillLayer>,
    /// Prompt tokens, `P`.
    pub len: usize,
    /// SnapKV's observation window.
    pub window: usize,
    /// Head geometry.
    pub heads: Heads,
}

/// A policy and its budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spec {
    /// Every token (the baseline).
    Full,
    /// StreamingLLM: [`SINKS`] sinks plus the most recent tokens, `budget` in all.
    Streaming { budget: usize },
    /// H2O: half heavy hitters by accumulated attention, half recent, `budget` in all.
    H2o { budget: usize },
    /// SnapKV: the prompt compressed once to `budget` by the observation window's votes;
    /// decoded tokens are all kept.
    SnapKv { budget: usize },
    /// Quest: `budget / 16` pages of 16 tokens per step, ranked by the page bound.
    Quest { budget: usize },
    /// KIVI: keys per channel, values per token, `bits` bits in groups of [`GROUP`], the last
    /// [`RESIDUAL`] to [`RESIDUAL`] + [`GROUP`] tokens in full precision.
    Kivi { bits: u32 },
    /// MiKV: the `budget` prompt tokens of highest attention mass in f16, the rest in
    /// `lo_bits`, with KIVI's axes and residual window.
    Mikv { budget: usize, lo_bits: u32 },
}

impl Spec {
    /// The policy's name (without the budget).
    pub fn family(&self) -> &'static str {
        match self {
            Spec::Full => "full",
            Spec::Streaming { .. } => "streaming",
            Spec::H2o { .. } => "h2o",
            Spec::SnapKv { .. } => "snapkv",
            Spec::Quest { .. } => "quest",
            Spec::Kivi { .. } => "kivi",
            Spec::Mikv { .. } => "mikv",
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Spec::Full => write!(f, "full"),
            Spec::Kivi { bits } => write!(f, "kivi int{bits}"),
            Spec::Mikv { budget, lo_bits } => write!(f, "mikv f16+int{lo_bits} ({budget} f16)"),
            Spec::Streaming { budget } | Spec::H2o { budget } | Spec::SnapKv { budget } | Spec::Quest { budget } => {
                write!(f, "{} ({budget})", self.family())
            }
        }
    }
}

/// A per-layer KV cache under one policy.
pub trait Policy: Send {
    /// Appends the token's `k`, `v` (`[Hkv·D]`, post-RoPE) to layer `layer` and returns
    /// `o [Hq·D]` for `q [Hq·D]`.
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>>;
}

/// Builds the policy for `spec` from the shared prefill; the caches hold up to
/// `capacity ≥ P` tokens.
pub fn build(spec: Spec, pre: &Prefill, capacity: usize) -> Result<Box<dyn Policy>> {
    ensure!(capacity >= pre.len, "capacity {capacity} is below the prompt length {}", pre.len);
    let budget_ok = |b: usize| {
        ensure!(b >= 2 && b < pre.len, "budget {b} must be in 2..{} (below the prompt length)", pre.len);
        Ok(())
    };
    Ok(match spec {
        Spec::Full => Box::new(Listed::new(pre, capacity, Lists::All)),
        Spec::Streaming { budget } => {
            budget_ok(budget)?;
            ensure!(budget > SINKS, "a streaming budget must exceed the {SINKS} sinks");
            Box::new(Listed::new(pre, capacity, Lists::Streaming { budget }))
        }
        Spec::SnapKv { budget } => {
            budget_ok(budget)?;
            ensure!(budget > pre.window, "a SnapKV budget must exceed its window {}", pre.window);
            let mut kept = Vec::with_capacity(pre.layers.len());
            for layer in &pre.layers {
                let keep = snapkv_select_from_scores(&layer.snap_scores, pre.heads.hkv, pre.len, pre.window, budget)?;
                kept.push(keep.chunks(budget).map(<[u32]>::to_vec).collect());
            }
            Box::new(Listed::new(pre, capacity, Lists::Kept { kept }))
        }
        Spec::Quest { budget } => {
            budget_ok(budget)?;
            Box::new(Quest::new(pre, capacity, (budget / DEFAULT_PAGE_SIZE).max(1))?)
        }
        Spec::H2o { budget } => {
            budget_ok(budget)?;
            Box::new(H2o::new(pre, budget)?)
        }
        Spec::Kivi { bits } => Box::new(Kivi::new(pre, capacity, bits)?),
        Spec::Mikv { budget, lo_bits } => {
            budget_ok(budget)?;
            Box::new(Mikv::new(pre, capacity, budget, lo_bits)?)
        }
    })
}

/// CSR lists from one ascending list per kv head.
pub fn csr(lists: &[Vec<u32>]) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for l in lists {
        indices.extend_from_slice(l);
        indptr.push(indices.len() as u32);
    }
    (indptr, indices)
}

/// `o [Hq·D]` of one query over the listed rows of a head-major cache `[Hkv, cap, D]`
/// holding `len` tokens, through `ntkv::decode::cpu::sparse_decode`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    heads: Heads,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cap: usize,
    len: usize,
    indptr: &[u32],
    indices: &[u32],
) -> Result<Vec<f32>> {
    let shape = DecodeShape { batch: 1, q_tokens: 1, hq: heads.hq, hkv: heads.hkv, head_dim: heads.d, capacity: cap };
    let r = sparse_decode(&shape, &DecodeOptions::default(), q, k, v, &[len as u32], indptr, indices)?;
    Ok(r.o.iter().map(|&x| x as f32).collect())
}

/// A head-major cache `[Hkv, cap, D]` of keys and values that keeps every row.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Rows per head.
    pub cap: usize,
    /// Tokens held.
    pub len: usize,
    heads: Heads,
}

impl Dense {
    /// The prompt's cache of one layer, with room for `cap` tokens.
    pub fn from_prefill(layer: &PrefillLayer, pre: &Prefill, cap: usize) -> Self {
        let Heads { hkv, d, .. } = pre.heads;
        let p = pre.len;
        let mut k = vec![0.0f32; hkv * cap * d];
        let mut v = vec![0.0f32; hkv * cap * d];
        for h in 0..hkv {
            k[h * cap * d..][..p * d].copy_from_slice(&layer.k[h * p * d..][..p * d]);
            v[h * cap * d..][..p * d].copy_from_slice(&layer.v[h * p * d..][..p * d]);
        }
        Dense { k, v, cap, len: p, heads: pre.heads }
    }

    /// Appends one token's `k`, `v` (`[Hkv·D]`).
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        let (cap, d) = (self.cap, self.heads.d);
        ensure!(self.len < cap, "the cache is full ({cap} tokens)");
        for h in 0..self.heads.hkv {
            self.k[(h * cap + self.len) * d..][..d].copy_from_slice(&k[h * d..(h + 1) * d]);
            self.v[(h * cap + self.len) * d..][..d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
        self.len += 1;
        Ok(())
    }

    /// Attention of `q` over the listed rows.
    pub fn attend(&self, q: &[f32], lists: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (indptr, indices) = csr(lists);
        attend(self.heads, q, &self.k, &self.v, self.cap, self.len, &indptr, &indices)
    }

    /// Attention of `q` over every row.
    pub fn attend_all(&self, q: &[f32]) -> Result<Vec<f32>> {
        let all: Vec<u32> = (0..self.len as u32).collect();
        self.attend(q, &vec![all; self.heads.hkv])
    }
}

enum Lists {
    All,
    Streaming {
        budget: usize,
    },
    /// Per layer, per kv head: the prompt rows kept; every decoded row is kept too.
    Kept {
        kept: Vec<Vec<Vec<u32>>>,
    },
}

/// The policies that only choose which rows of a complete cache a step reads.
struct Listed {
    caches: Vec<Dense>,
    lists: Lists,
    prompt: usize,
}

impl Listed {
    fn new(pre: &Prefill, cap: usize, lists: Lists) -> Self {
        let caches = pre.layers.iter().map(|l| Dense::from_prefill(l, pre, cap)).collect();
        Listed { caches, lists, prompt: pre.len }
    }
}

impl Policy for Listed {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let cache = &mut self.caches[layer];
        cache.push(k, v)?;
        let len = cache.len as u32;
        let hkv = cache.heads.hkv;
        match &self.lists {
            Lists::All => cache.attend_all(q),
            Lists::Streaming { budget } => {
                let b = *budget as u32;
                let list: Vec<u32> = if len <= b {
                    (0..len).collect()
                } else {
                    (0..SINKS as u32).chain(len - (b - SINKS as u32)..len).collect()
                };
                cache.attend(q, &vec![list; hkv])
            }
            Lists::Kept { kept } => {
                let p = self.prompt as u32;
                let lists: Vec<Vec<u32>> =
                    kept[layer].iter().map(|h| h.iter().copied().chain(p..len).collect()).collect();
                cache.attend(q, &lists)
            }
        }
    }
}

/// Quest: the whole cache, page min/max metadata, `pages` pages read per step.
struct Quest {
    caches: Vec<Dense>,
    meta: Vec<(Vec<f32>, Vec<f32>)>,
    pages: usize,
}

impl Quest {
    fn meta_shape(&self, cap: usize) -> QuestMetaShape {
        let h = self.caches[0].heads;
        QuestMetaShape { batch: 1, hkv: h.hkv, capacity: cap, head_dim: h.d, page_size: DEFAULT_PAGE_SIZE }
    }

    fn new(pre: &Prefill, cap: usize, pages: usize) -> Result<Self> {
        let caches: Vec<Dense> = pre.layers.iter().map(|l| Dense::from_prefill(l, pre, cap)).collect();
        let mut q = Quest { caches, meta: Vec::new(), pages };
        let shape = q.meta_shape(cap);
        for c in &q.caches {
            let m = quest_meta(&shape, &c.k, &[c.len as u32])?;
            q.meta.push(m);
        }
        Ok(q)
    }
}

impl Policy for Quest {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let cap = self.caches[layer].cap;
        let shape = self.meta_shape(cap);
        let cache = &mut self.caches[layer];
        let old = cache.len as u32;
        cache.push(k, v)?;
        let len = cache.len as u32;
        let (mx, mn) = &mut self.meta[layer];
        quest_meta_append(&shape, &cache.k, &[old], &[len], mx, mn)?;
        let h = cache.heads;
        let sel_shape = QuestSelectShape {
            batch: 1,
            hq: h.hq,
            hkv: h.hkv,
            q_tokens: 1,
            head_dim: h.d,
            capacity: cap,
            page_size: DEFAULT_PAGE_SIZE,
            budget: self.pages,
        };
        let sel = quest_select(&sel_shape, q, mx, mn, &[len])?;
        attend(h, q, &cache.k, &cache.v, cap, cache.len, &sel.indptr, &sel.indices)
    }
}

/// H2O: a compacted cache of `budget + 1` rows per kv head and the accumulated scores.
struct H2o {
    layers: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    budget: usize,
    recent: usize,
    heads: Heads,
}

impl H2o {
    fn new(pre: &Prefill, budget: usize) -> Result<Self> {
        let Heads { hkv, d, .. } = pre.heads;
        let (p, rows) = (pre.len, budget + 1);
        let recent = budget / 2;
        let mut layers = Vec::with_capacity(pre.layers.len());
        for l in &pre.layers {
            let keep = h2o_select(&l.mass, hkv, p, budget, recent)?;
            let (mut k, mut v, mut acc) = (l.k.clone(), l.v.clone(), l.mass.clone());
            h2o_compact(&keep, hkv, p, d, &mut k, &mut v, Some(&mut acc))?;
            // The kept rows are now the first `budget` of each head; move them to stride budget + 1.
            let mut kc = vec![0.0f32; hkv * rows * d];
            let mut vc = vec![0.0f32; hkv * rows * d];
            let mut ac = vec![0.0f32; hkv * rows];
            for h in 0..hkv {
                kc[h * rows * d..][..budget * d].copy_from_slice(&k[h * p * d..][..budget * d]);
                vc[h * rows * d..][..budget * d].copy_from_slice(&v[h * p * d..][..budget * d]);
                ac[h * rows..][..budget].copy_from_slice(&acc[h * p..][..budget]);
            }
            layers.push((kc, vc, ac));
        }
        Ok(H2o { layers, budget, recent, heads: pre.heads })
    }
}

impl Policy for H2o {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let Heads { hq, hkv, d } = self.heads;
        let (b, rows) = (self.budget, self.budget + 1);
        let (kc, vc, acc) = &mut self.layers[layer];
        for h in 0..hkv {
            kc[(h * rows + b) * d..][..d].copy_from_slice(&k[h * d..(h + 1) * d]);
            vc[(h * rows + b) * d..][..d].copy_from_slice(&v[h * d..(h + 1) * d]);
            acc[h * rows + b] = 0.0;
        }
        let all: Vec<u32> = (0..rows as u32).collect();
        let (indptr, indices) = csr(&vec![all; hkv]);
        let o = attend(self.heads, q, kc, vc, rows, rows, &indptr, &indices)?;
        let shape = AttnShape { hq, hkv, tq: 1, t: rows, d };
        h2o_accumulate(q, kc, acc, shape, GqaReduce::Sum)?;
        let keep = h2o_select(acc, hkv, rows, b, self.recent)?;
        h2o_compact(&keep, hkv, rows, d, kc, vc, Some(acc))?;
        Ok(o)
    }
}

/// Replaces rows `t0..t0 + n` of `x [Hkv, cap, D]` by their reconstruction under `spec`.
fn requantize(x: &mut [f32], heads: Heads, cap: usize, t0: usize, n: usize, spec: QuantSpec) -> Result<()> {
    let d = heads.d;
    let mut block = Vec::with_capacity(heads.hkv * n * d);
    for h in 0..heads.hkv {
        block.extend_from_slice(&x[(h * cap + t0) * d..][..n * d]);
    }
    let dims = [heads.hkv, n, d];
    let back: Vec<f32> = dequantize(spec, &dims, &quantize(spec, &dims, &block)?)?;
    for h in 0..heads.hkv {
        x[(h * cap + t0) * d..][..n * d].copy_from_slice(&back[h * n * d..][..n * d]);
    }
    Ok(())
}

/// KIVI: rows older than the residual window hold their dequantized codes.
struct Kivi {
    caches: Vec<Dense>,
    quantized: Vec<usize>,
    kspec: QuantSpec,
    vspec: QuantSpec,
}

impl Kivi {
    fn new(pre: &Prefill, cap: usize, bits: u32) -> Result<Self> {
        let kspec = QuantSpec::new(bits, GROUP, Axis::PerChannel)?;
        let vspec = QuantSpec::new(bits, GROUP, Axis::PerToken)?;
        let mut caches: Vec<Dense> = pre.layers.iter().map(|l| Dense::from_prefill(l, pre, cap)).collect();
        let q = pre.len.saturating_sub(RESIDUAL) / GROUP * GROUP;
        for c in &mut caches {
            if q > 0 {
                requantize(&mut c.k, pre.heads, cap, 0, q, kspec)?;
                requantize(&mut c.v, pre.heads, cap, 0, q, vspec)?;
            }
        }
        let quantized = vec![q; caches.len()];
        Ok(Kivi { caches, quantized, kspec, vspec })
    }
}

impl Policy for Kivi {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let c = &mut self.caches[layer];
        c.push(k, v)?;
        let done = &mut self.quantized[layer];
        if c.len - *done >= RESIDUAL + GROUP {
            requantize(&mut c.k, c.heads, c.cap, *done, GROUP, self.kspec)?;
            requantize(&mut c.v, c.heads, c.cap, *done, GROUP, self.vspec)?;
            *done += GROUP;
        }
        c.attend_all(q)
    }
}

/// MiKV: a pair of `MikvCacheCpu` per layer and the dense reconstruction the step reads.
struct Mikv {
    layers: Vec<(MikvCacheCpu, MikvCacheCpu, Dense)>,
}

fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

impl Mikv {
    fn config(axis: Axis, cap: usize, lo_bits: u32) -> MikvConfig {
        MikvConfig { lo_bits, hi: HiPrecision::F16, group: GROUP, axis, residual: RESIDUAL, capacity: cap }
    }

    fn new(pre: &Prefill, cap: usize, budget: usize, lo_bits: u32) -> Result<Self> {
        let Heads { hkv, d, .. } = pre.heads;
        let dims = [hkv, pre.len, d];
        let mut layers = Vec::with_capacity(pre.layers.len());
        for l in &pre.layers {
            // The important tokens: the top `budget` by prompt attention mass (no recent part).
            let keep = h2o_select(&l.mass, hkv, pre.len, budget, 0)?;
            let important: Vec<Vec<u32>> = keep.chunks(budget).map(<[u32]>::to_vec).collect();
            let cache = |axis, x: &[f32]| {
                MikvCacheCpu::from_prefill(Self::config(axis, cap, lo_bits), &to_f16(x), &dims, &important)
            };
            let (kc, vc) = (cache(Axis::PerChannel, &l.k)?, cache(Axis::PerToken, &l.v)?);
            let mut dense = Dense::from_prefill(l, pre, cap);
            refresh(&mut dense.k, &kc, pre.heads, cap)?;
            refresh(&mut dense.v, &vc, pre.heads, cap)?;
            layers.push((kc, vc, dense));
        }
        Ok(Mikv { layers })
    }
}

/// Writes `cache.dequantize_dense()` (`[Hkv, T, D]`) into rows `0..T` of `x [Hkv, cap, D]`.
fn refresh(x: &mut [f32], cache: &MikvCacheCpu, heads: Heads, cap: usize) -> Result<()> {
    let (t, d) = (cache.len(), heads.d);
    let dense = cache.dequantize_dense()?;
    if dense.len() != heads.hkv * t * d {
        bail!("dequantize_dense returned {} values for [{}, {t}, {d}]", dense.len(), heads.hkv);
    }
    for h in 0..heads.hkv {
        for (dst, src) in x[h * cap * d..][..t * d].iter_mut().zip(&dense[h * t * d..][..t * d]) {
            *dst = src.to_f32();
        }
    }
    Ok(())
}

impl Policy for Mikv {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let (kc, vc, dense) = &mut self.layers[layer];
        let (kq, vq) = (kc.quantized_len(), vc.quantized_len());
        kc.append(&to_f16(k))?;
        vc.append(&to_f16(v))?;
        // The new row sits in the f16 ring: exactly its f16 rounding.
        let k16: Vec<f32> = to_f16(k).iter().map(|x| x.to_f32()).collect();
        let v16: Vec<f32> = to_f16(v).iter().map(|x| x.to_f32()).collect();
        dense.push(&k16, &v16)?;
        let (heads, cap) = (dense.heads, dense.cap);
        if kc.quantized_len() != kq {
            refresh(&mut dense.k, kc, heads, cap)?;
        }
        if vc.quantized_len() != vq {
            refresh(&mut dense.v, vc, heads, cap)?;
        }
        dense.attend_all(q)
    }
}
