//! KV-cache policies, each a per-layer cache that attends one decode step at a time through
//! ntkv's CPU references.
//!
//! Every policy starts from the same full-attention prefill ([`Prefill`]) and owns its own
//! cache per layer. One decode step at layer `l` appends the new token's post-RoPE `k`, `v`
//! (`[Hkv·D]`) and returns the attention output `o [Hq·D]` of its query `q [Hq·D]`:
//! - selection policies (full, StreamingLLM, SnapKV, Quest, ClusterKV, ShadowKV's landmarks)
//!   build CSR token lists over a cache that keeps every row, and attend with
//!   `ntkv::decode::cpu::sparse_decode`;
//! - ShadowKV's low-rank keys rebuild the prompt's keys from a rank-`r` factorization
//!   (`ntkv::lowrank::cpu`) and attend to every token;
//! - H2O keeps a compacted cache of `budget + 1` rows per kv head and evicts with `ntkv::topk::cpu`
//!   (`h2o_accumulate`, `h2o_select`, `h2o_compact`); LazyEviction keeps
//!   `ntkv::policy::cpu::LazyEviction`'s cache, evicting every [`LAZY_LAG`] steps;
//! - WindowKV and PrefixKV compress the prompt once (`ntkv::policy::cpu`'s
//!   `WindowKvGroup::select_layer` and `prefixkv`) and keep every decoded token;
//! - KIVI and MiKV keep their caches quantized (`ntkv::quant::cpu`, `MikvCacheCpu`) and
//!   attend through the fused quantized decode's reference, `ntkv::qdecode::cpu::reference`,
//!   over the f16 reconstruction its kernel reads (`qdecode::cpu::kivi_dense` of the KIVI
//!   codes and residual window, `MikvCacheCpu::dequantize_dense`).

use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Result};
use half::f16;
use ntkv::cluster::cpu::{assign_appended, kmeans, retrieve, KmeansResult};
use ntkv::cluster::{Combine, KmeansOptions, KmeansShape, Metric, RetrieveOptions, RetrieveShape};
use ntkv::decode::{cpu::sparse_decode, DecodeOptions, DecodeShape};
use ntkv::lowrank::cpu::{factorize, reconstruct};
use ntkv::lowrank::{FactorOptions, FactorShape, ReconstructShape, RopeOptions};
use ntkv::pages::cpu::{landmark_select, landmarks, quest_meta, quest_meta_append, quest_select, Landmarks};
use ntkv::pages::{
    LandmarkSelectShape, LandmarkShape, QuestMetaShape, QuestSelectShape, CHUNK_TOKENS, DEFAULT_PAGE_SIZE,
};
use ntkv::policy::cpu::{prefixkv, LazyEviction, WindowKvGroup};
use ntkv::policy::{LazyOptions, PrefixShape, WindowKvOptions};
use ntkv::qdecode::cpu::{kivi_dense, reference as qdecode_reference};
use ntkv::qdecode::{QdecodeOptions, QdecodeShape};
use ntkv::quant::cpu::{quantize, MikvCacheCpu};
use ntkv::quant::{Axis, HiPrecision, MikvConfig, QuantSpec};
use ntkv::topk::cpu::{h2o_accumulate, h2o_compact, h2o_select, snapkv_select_from_scores};
use ntkv::topk::{AttnShape, GqaReduce};

/// Attention sinks kept by StreamingLLM.
pub const SINKS: usize = 4;
/// KIVI's and MiKV's full-precision residual window (a multiple of [`GROUP`]).
pub const RESIDUAL: usize = 128;
/// Quantization group size.
pub const GROUP: usize = 32;
/// ClusterKV: prompt tokens per k-means cluster on average (`C = P / 32`).
pub const CLUSTER_TOKENS: usize = 32;
/// ClusterKV: k-means iterations (cosine, stopping early once no label changes).
pub const CLUSTER_ITERATIONS: usize = 10;
/// ClusterKV: the most recent tokens always kept (inside the budget, with the sinks).
pub const CLUSTER_WINDOW: usize = 16;
/// ShadowKV: the share of the budget's chunks spent on outlier chunks (`1/8`, at least 1).
pub const OUTLIER_SHARE: usize = 8;
/// WindowKV: tokens per window.
pub const WINDOWKV_TOKENS: usize = 8;
/// WindowKV: layers per index-sharing group (the group's first layer selects for both).
pub const WINDOWKV_SHARE: usize = 2;
/// LazyEviction: steps between evictions.
pub const LAZY_LAG: usize = 8;
/// LazyEviction: the attention mass (summed over a GQA group) at which a token counts as hit.
pub const LAZY_THRESHOLD: f32 = 0.01;

/// What the prefill leaves for one layer.
#[derive(Clone, Debug)]
pub struct PrefillLayer {
    /// Post-RoPE keys `[Hkv, P, D]`.
    pub k: Vec<f32>,
    /// Values `[Hkv, P, D]`.
    pub v: Vec<f32>,
    /// Attention mass per key `[Hkv, P]` over all prompt queries (GQA sum).
    pub mass: Vec<f32>,
    /// What the observation window (the last `window` prompt queries) gives each older key.
    pub window: WindowVotes,
    /// The keys before RoPE, token-major as the model computes them, `[P, Hkv·D]`.
    pub k_pre: Vec<f32>,
}

/// The observation window's votes for the older prompt keys, `[Hkv, P − window]` each: the
/// attention mass the last `window` prompt queries give each key, summed over the GQA group.
#[derive(Clone, Debug)]
pub struct WindowVotes {
    /// SnapKV's scores: the votes average-pooled over 5 tokens (`ntkv::topk::cpu::snapkv_scores`).
    pub pooled: Vec<f32>,
    /// The votes themselves (`snapkv_votes`, rounded to f32): WindowKV's and PrefixKV's scores.
    pub raw: Vec<f32>,
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
    /// The model's RoPE base (adjacent pairs: channels `2i`, `2i + 1` rotate together).
    pub rope_base: f32,
    /// The prompt keys' k-means per layer, made by the first cluster policy built from this
    /// prefill and shared by the others (every budget clusters the same keys).
    pub clusters: SharedKmeans,
}

/// A k-means of every layer's prompt keys for caches of one capacity, computed once.
#[derive(Clone, Debug, Default)]
pub struct SharedKmeans(Arc<Mutex<Option<(usize, LayerKmeans)>>>);

/// One k-means state per layer.
type LayerKmeans = Arc<Vec<KmeansResult>>;

impl SharedKmeans {
    /// The k-means of the keys of each layer's cache (`caches`, all of `shape.capacity` rows
    /// per head, holding the prefill), computing it on the first call for that capacity.
    fn get(&self, caches: &[Dense], shape: &KmeansShape) -> Result<LayerKmeans> {
        let mut slot = self.0.lock().map_err(|_| anyhow::anyhow!("a k-means thread panicked"))?;
        if let Some((c, r)) = slot.as_ref() {
            if *c == shape.capacity {
                return Ok(Arc::clone(r));
            }
        }
        let options = KmeansOptions {
            metric: Metric::Cosine,
            iterations: CLUSTER_ITERATIONS,
            stop_when_stable: true,
            seed: 0,
            ..Default::default()
        };
        let all = Arc::new(caches.iter().map(|c| kmeans(shape, &options, &c.k)).collect::<ntkv::Result<Vec<_>>>()?);
        *slot = Some((shape.capacity, Arc::clone(&all)));
        Ok(all)
    }
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
    /// ClusterKV: the prompt keys of each kv head in `P / 32` cosine k-means clusters; each
    /// step takes whole clusters by `q·centroid` (max over the GQA group) while `budget`
    /// allows, plus [`SINKS`] sinks and the last [`CLUSTER_WINDOW`] tokens (`budget` in
    /// all). Decoded tokens join their nearest cluster.
    Cluster { budget: usize },
    /// ShadowKV's sparse attention: `budget / 8` chunks of 8 prompt tokens per step, of which
    /// 1/8 are the fixed outlier chunks (least similar to their own mean key) and the rest
    /// are ranked by the landmark (chunk mean) score; decoded tokens are all kept.
    ShadowKv { budget: usize },
    /// WindowKV: the prompt compressed once to `budget` in whole windows of
    /// [`WINDOWKV_TOKENS`] tokens, ranked by the observation window's summed votes, plus that
    /// window; layers share indices in groups of [`WINDOWKV_SHARE`]; decoded tokens all kept.
    WindowKv { budget: usize },
    /// LazyEviction: H2O's prompt compression to `budget`, then every [`LAZY_LAG`] steps an
    /// eviction down to `budget` that keeps `budget / 2` recent tokens and ranks the others by
    /// their recurrence headroom (`mri − age`); hits at [`LAZY_THRESHOLD`].
    Lazy { budget: usize },
    /// PrefixKV: `budget` prompt tokens per layer on average. The observation window (the
    /// last `window` prompt tokens, as in SnapKV) is kept in every layer; over the older
    /// tokens, one retention ratio of the layers' sorted window votes gives each layer its own
    /// budget (summing to `layers · (budget − window)`) and keep list, shared by its kv heads.
    /// Decoded tokens are all kept.
    PrefixKv { budget: usize },
    /// ShadowKV's low-rank keys: the prompt's pre-RoPE keys `[P, Hkv·D]` replaced by their
    /// rank-`rank` randomized SVD, rebuilt with RoPE at every position; values exact,
    /// decoded keys exact, every token attended.
    LowRank { rank: usize },
    /// KIVI: keys per channel, values per token, `bits` bits in groups of [`GROUP`], the last
    /// [`RESIDUAL`] to [`RESIDUAL`] + [`GROUP`] tokens in full precision.
    Kivi { bits: u32 },
    /// MiKV: the `budget` prompt tokens of highest attention mass in f16, the rest in
    /// `lo_bits`, with KIVI's axes and residual window.
    Mikv { budget: usize, lo_bits: u32 },
}

impl Spec {
    /// The policy's name (without the budget).
    #[rustfmt::skip]
    pub fn family(&self) -> &'static str {
        match self {
            Spec::Full => "full", Spec::Streaming { .. } => "streaming", Spec::H2o { .. } => "h2o",
            Spec::SnapKv { .. } => "snapkv", Spec::WindowKv { .. } => "windowkv", Spec::Lazy { .. } => "lazy",
            Spec::PrefixKv { .. } => "prefixkv", Spec::Quest { .. } => "quest", Spec::Cluster { .. } => "cluster",
            Spec::ShadowKv { .. } => "shadowkv", Spec::LowRank { .. } => "lowrank", Spec::Kivi { .. } => "kivi",
            Spec::Mikv { .. } => "mikv",
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Spec::Full => write!(f, "full"),
            Spec::Kivi { bits } => write!(f, "kivi int{bits}"),
            Spec::LowRank { rank } => write!(f, "lowrank (rank {rank})"),
            Spec::Mikv { budget, lo_bits } => write!(f, "mikv f16+int{lo_bits} ({budget} f16)"),
            Spec::Streaming { budget }
            | Spec::H2o { budget }
            | Spec::SnapKv { budget }
            | Spec::Quest { budget }
            | Spec::Cluster { budget }
            | Spec::ShadowKv { budget }
            | Spec::WindowKv { budget }
            | Spec::Lazy { budget }
            | Spec::PrefixKv { budget } => write!(f, "{} ({budget})", self.family()),
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
                let keep = snapkv_select_from_scores(&layer.window.pooled, pre.heads.hkv, pre.len, pre.window, budget)?;
                kept.push(keep.chunks(budget).map(<[u32]>::to_vec).collect());
            }
            Box::new(Listed::new(pre, capacity, Lists::Kept { kept }))
        }
        Spec::WindowKv { budget } => {
            budget_ok(budget)?;
            ensure!(budget > pre.window, "a WindowKV budget must exceed its window {}", pre.window);
            let options =
                WindowKvOptions { window: WINDOWKV_TOKENS, recent: pre.window, budget, share_layers: WINDOWKV_SHARE };
            let mut group = WindowKvGroup::new(options, pre.heads.hkv, pre.len)?;
            let mut kept = Vec::with_capacity(pre.layers.len());
            for (l, layer) in pre.layers.iter().enumerate() {
                let scores = options.is_leader(l).then_some(layer.window.raw.as_slice());
                let csr = group.select_layer(l, scores)?;
                kept.push(csr_rows(&csr.indptr, &csr.indices).map(<[u32]>::to_vec).collect());
            }
            Box::new(Listed::new(pre, capacity, Lists::Kept { kept }))
        }
        Spec::PrefixKv { budget } => {
            budget_ok(budget)?;
            ensure!(budget > pre.window, "a PrefixKV budget must exceed its window {}", pre.window);
            let (layers, hkv, w) = (pre.layers.len(), pre.heads.hkv, pre.window);
            let older = pre.len - w;
            // One row per layer over the older tokens: the observation window's votes, its kv
            // heads summed (the public code averages a layer's heads first).
            let importance: Vec<f32> = pre
                .layers
                .iter()
                .flat_map(|l| (0..older).map(move |t| (0..hkv).map(|h| l.window.raw[h * older + t]).sum()))
                .collect();
            let shape = PrefixShape { rows: layers, n: older, budget: (budget - w) * layers };
            let r = prefixkv(&importance, &shape)?;
            let window = older as u32..pre.len as u32;
            let kept = csr_rows(&r.keep.indptr, &r.keep.indices)
                .map(|row| vec![row.iter().copied().chain(window.clone()).collect(); hkv])
                .collect();
            Box::new(Listed::new(pre, capacity, Lists::Kept { kept }))
        }
        Spec::Lazy { budget } => {
            budget_ok(budget)?;
            Box::new(Lazy::new(pre, budget)?)
        }
        Spec::Quest { budget } => {
            budget_ok(budget)?;
            Box::new(Quest::new(pre, capacity, (budget / DEFAULT_PAGE_SIZE).max(1))?)
        }
        Spec::H2o { budget } => {
            budget_ok(budget)?;
            Box::new(H2o::new(pre, budget)?)
        }
        Spec::Cluster { budget } => {
            budget_ok(budget)?;
            ensure!(
                budget > SINKS + CLUSTER_WINDOW,
                "a cluster budget must exceed its {SINKS} sinks and {CLUSTER_WINDOW}-token window"
            );
            Box::new(Cluster::new(pre, capacity, budget)?)
        }
        Spec::ShadowKv { budget } => {
            budget_ok(budget)?;
            ensure!(budget >= 2 * CHUNK_TOKENS, "a ShadowKV budget must hold two chunks of {CHUNK_TOKENS} tokens");
            Box::new(ShadowKv::new(pre, capacity, budget / CHUNK_TOKENS)?)
        }
        Spec::Kivi { bits } => Box::new(Kivi::new(pre, capacity, bits)?),
        Spec::LowRank { rank } => {
            Box::new(Listed { caches: low_rank_caches(pre, capacity, rank)?, lists: Lists::All, prompt: pre.len })
        }
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

/// The lists of CSR `(indptr, indices)`, one slice per row: the inverse of [`csr`].
fn csr_rows<'a>(indptr: &'a [u32], indices: &'a [u32]) -> impl Iterator<Item = &'a [u32]> + 'a {
    indptr.windows(2).map(move |w| &indices[w[0] as usize..w[1] as usize])
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

/// ClusterKV: the whole cache, its k-means state per layer, and the retrieval options.
struct Cluster {
    caches: Vec<Dense>,
    states: Vec<KmeansResult>,
    shape: KmeansShape,
    options: RetrieveOptions,
}

impl Cluster {
    fn new(pre: &Prefill, cap: usize, budget: usize) -> Result<Self> {
        let Heads { hkv, d, .. } = pre.heads;
        let clusters = (pre.len / CLUSTER_TOKENS).max(1);
        let shape = KmeansShape { heads: hkv, tokens: pre.len, capacity: cap, clusters, head_dim: d };
        let caches: Vec<Dense> = pre.layers.iter().map(|l| Dense::from_prefill(l, pre, cap)).collect();
        let states = pre.clusters.get(&caches, &shape)?.as_ref().clone();
        let options = RetrieveOptions { combine: Combine::Max, budget, sinks: SINKS, window: CLUSTER_WINDOW };
        Ok(Cluster { caches, states, shape, options })
    }
}

impl Policy for Cluster {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let cache = &mut self.caches[layer];
        cache.push(k, v)?;
        let (len, cap, h) = (cache.len, cache.cap, cache.heads);
        let state = &mut self.states[layer];
        assign_appended(&self.shape, Metric::Cosine, &cache.k, len - 1, len, state)?;
        let shape = RetrieveShape {
            batch: 1,
            q_tokens: 1,
            hq: h.hq,
            hkv: h.hkv,
            head_dim: h.d,
            clusters: self.shape.clusters,
            capacity: cap,
        };
        let (indptr, indices) =
            retrieve(&shape, &self.options, q, &state.centroids, &state.indptr, &state.members, &[len as u32])?;
        attend(h, q, &cache.k, &cache.v, cap, len, &indptr, &indices)
    }
}

/// ShadowKV: the whole cache, the prompt's landmarks and outlier chunks per layer.
struct ShadowKv {
    caches: Vec<Dense>,
    index: Vec<Landmarks>,
    shape: LandmarkSelectShape,
}

impl ShadowKv {
    fn new(pre: &Prefill, cap: usize, chunks: usize) -> Result<Self> {
        let Heads { hq, hkv, d } = pre.heads;
        let outliers = (chunks / OUTLIER_SHARE).max(1);
        let shape = LandmarkSelectShape {
            batch: 1,
            q_tokens: 1,
            hq,
            hkv,
            head_dim: d,
            capacity: pre.len,
            outliers,
            budget: chunks - outliers,
        };
        let lshape: LandmarkShape = shape.landmarks();
        let index =
            pre.layers.iter().map(|l| landmarks(&lshape, &l.k, &[pre.len as u32])).collect::<ntkv::Result<_>>()?;
        let caches = pre.layers.iter().map(|l| Dense::from_prefill(l, pre, cap)).collect();
        Ok(ShadowKv { caches, index, shape })
    }
}

impl Policy for ShadowKv {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let cache = &mut self.caches[layer];
        cache.push(k, v)?;
        let p = self.shape.capacity as u32;
        let lm = &self.index[layer];
        let sel = landmark_select(&self.shape, q, &lm.landmarks, &lm.outliers, &[p])?;
        let lists: Vec<Vec<u32>> = csr_rows(&sel.indptr, &sel.indices)
            .map(|row| row.iter().copied().chain(p..cache.len as u32).collect())
            .collect();
        cache.attend(q, &lists)
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

/// The channel of model channel `c` in ntkv's rotate-half layout: the model rotates the
/// adjacent pair `(2i, 2i + 1)`, ntkv the pair `(i, i + D/2)`, by the same angle.
fn rotate_half_channel(c: usize, d: usize) -> usize {
    if c % 2 == 0 {
        c / 2
    } else {
        c / 2 + d / 2
    }
}

/// Every layer's cache with its prompt keys rebuilt from the rank-`rank` factors of the
/// pre-RoPE keys (`ntkv::lowrank::cpu::factorize`, then `reconstruct` at every position).
/// The channels of each head are permuted into ntkv's rotate-half layout and back, which
/// leaves every `q·k` unchanged.
fn low_rank_caches(pre: &Prefill, cap: usize, rank: usize) -> Result<Vec<Dense>> {
    let Heads { hkv, d, .. } = pre.heads;
    let (p, n) = (pre.len, hkv * d);
    ensure!(rank >= 1 && rank <= n.min(p), "rank {rank} must be in 1..={}", n.min(p));
    let fshape = FactorShape { batch: 1, capacity: p, kv_heads: hkv, head_dim: d, rank };
    let rshape = ReconstructShape { batch: 1, capacity: p, kv_heads: hkv, head_dim: d, rank };
    let all: Vec<u32> = (0..p as u32).collect();
    let (indptr, indices) = csr(&vec![all; hkv]);
    let mut caches = Vec::with_capacity(pre.layers.len());
    for l in &pre.layers {
        let mut permuted = vec![0.0f32; p * n];
        for t in 0..p {
            for h in 0..hkv {
                for c in 0..d {
                    permuted[t * n + h * d + rotate_half_channel(c, d)] = l.k_pre[t * n + h * d + c];
                }
            }
        }
        let f = factorize(&fshape, &FactorOptions::default(), &[p as u32], &permuted)?;
        let (u, sv): (Vec<f32>, Vec<f32>) =
            (f.u.iter().map(|&x| x as f32).collect(), f.sv.iter().map(|&x| x as f32).collect());
        let rope = RopeOptions { base: pre.rope_base };
        let keys = reconstruct(&rshape, &rope, &[p as u32], &u, &sv, &indptr, &indices)?;
        let mut cache = Dense::from_prefill(l, pre, cap);
        for h in 0..hkv {
            for t in 0..p {
                for c in 0..d {
                    cache.k[(h * cap + t) * d + c] = keys[(h * p + t) * d + rotate_half_channel(c, d)] as f32;
                }
            }
        }
        caches.push(cache);
    }
    Ok(caches)
}

/// LazyEviction: per layer, `ntkv::policy::cpu::LazyEviction` over the H2O-compressed prompt.
struct Lazy {
    layers: Vec<LazyEviction<f32>>,
    heads: Heads,
}

impl Lazy {
    fn new(pre: &Prefill, budget: usize) -> Result<Self> {
        let Heads { hkv, d, .. } = pre.heads;
        let p = pre.len;
        let options = LazyOptions { budget, recent: budget / 2, lag: LAZY_LAG, threshold: LAZY_THRESHOLD };
        let mut layers = Vec::with_capacity(pre.layers.len());
        for l in &pre.layers {
            // The prompt enters compressed as H2O compresses it; its tokens start unhit
            // (`last_hit = 0`, `mri = 0`), as LazyEviction's state begins at the first step.
            let keep = h2o_select(&l.mass, hkv, p, budget, budget / 2)?;
            let (mut k, mut v) = (l.k.clone(), l.v.clone());
            h2o_compact(&keep, hkv, p, d, &mut k, &mut v, None)?;
            let take =
                |x: &[f32]| -> Vec<f32> { (0..hkv).flat_map(|h| x[h * p * d..][..budget * d].to_vec()).collect() };
            layers.push(LazyEviction::new(options, hkv, budget, d, take(&k), take(&v))?);
        }
        Ok(Lazy { layers, heads: pre.heads })
    }
}

impl Policy for Lazy {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let Heads { hq, hkv, d } = self.heads;
        let cache = &mut self.layers[layer];
        cache.append(k, v)?;
        let t = cache.len();
        let all: Vec<u32> = (0..t as u32).collect();
        let (indptr, indices) = csr(&vec![all; hkv]);
        let o = attend(self.heads, q, cache.k(), cache.v(), t, t, &indptr, &indices)?;
        // The step's attention mass, GQA-summed: the update's input (evicts every LAZY_LAG steps).
        let mut mass = vec![0.0f32; hkv * t];
        h2o_accumulate(q, cache.k(), &mut mass, AttnShape { hq, hkv, tq: 1, t, d }, GqaReduce::Sum)?;
        cache.decode_step(&mass)?;
        Ok(o)
    }
}

/// `o [Hq·D]` of one query over every token of a dense f16 cache `[Hkv, T, D]`, through the
/// quantized decode's reference (`ntkv::qdecode::cpu::reference`).
fn attend_f16(heads: Heads, q: &[f32], k: &[f16], v: &[f16], tokens: usize) -> Result<Vec<f32>> {
    let shape =
        QdecodeShape { batch: 1, q_tokens: 1, hq: heads.hq, hkv: heads.hkv, head_dim: heads.d, capacity: tokens };
    let r = qdecode_reference(&shape, &QdecodeOptions::default(), q, k, v, tokens, None)?;
    Ok(r.o.iter().map(|&x| x as f32).collect())
}

/// Rows `t0..t1` of each head of `x [Hkv, cap, D]`, packed as `[Hkv, t1 − t0, D]`.
fn rows(x: &[f16], heads: Heads, cap: usize, t0: usize, t1: usize) -> Vec<f16> {
    let d = heads.d;
    (0..heads.hkv).flat_map(|h| x[(h * cap + t0) * d..(h * cap + t1) * d].iter().copied()).collect()
}

/// One KIVI operand of a layer: the f16 rows as written, the codes of the first `quantized`
/// of them, and the f16 residual window after them.
struct KiviOperand {
    spec: QuantSpec,
    /// `[Hkv, cap, D]`, f16 (what a KIVI cache stores before quantizing).
    raw: Vec<f16>,
    /// The reconstruction `[Hkv, quantized, D]` of the codes of rows `0..quantized` of every
    /// head (`kivi_dense` with an empty residual), remade when a group is quantized; empty
    /// before the first.
    coded: Vec<f16>,
}

impl KiviOperand {
    fn quantize(&mut self, heads: Heads, cap: usize, quantized: usize) -> Result<()> {
        // Per-channel groups run along tokens from row 0 and per-token groups along D, so
        // quantizing the whole prefix again gives the earlier groups' codes unchanged.
        let dims = [heads.hkv, quantized, heads.d];
        let codes = quantize(self.spec, &dims, &rows(&self.raw, heads, cap, 0, quantized))?;
        self.coded = kivi_dense(self.spec, dims, &codes, &[], 0, 0)?;
        Ok(())
    }

    /// The f16 `[Hkv, len, D]` the quantized decode reads: per head the dequantized codes,
    /// then the residual rows (what `kivi_dense` assembles, here from its cached output).
    fn dense(&self, heads: Heads, cap: usize, quantized: usize, len: usize) -> Vec<f16> {
        let d = heads.d;
        let mut out = Vec::with_capacity(heads.hkv * len * d);
        for h in 0..heads.hkv {
            if quantized > 0 {
                out.extend_from_slice(&self.coded[h * quantized * d..(h + 1) * quantized * d]);
            }
            out.extend_from_slice(&self.raw[(h * cap + quantized) * d..(h * cap + len) * d]);
        }
        out
    }
}

/// KIVI: per layer, keys quantized per channel and values per token, all but the last
/// [`RESIDUAL`] to [`RESIDUAL`] + [`GROUP`] rows.
struct Kivi {
    layers: Vec<(KiviOperand, KiviOperand)>,
    len: Vec<usize>,
    quantized: Vec<usize>,
    cap: usize,
    heads: Heads,
}

impl Kivi {
    fn new(pre: &Prefill, cap: usize, bits: u32) -> Result<Self> {
        let kspec = QuantSpec::new(bits, GROUP, Axis::PerChannel)?;
        let vspec = QuantSpec::new(bits, GROUP, Axis::PerToken)?;
        let q = pre.len.saturating_sub(RESIDUAL) / GROUP * GROUP;
        let mut layers = Vec::with_capacity(pre.layers.len());
        for l in &pre.layers {
            let dense = Dense::from_prefill(l, pre, cap);
            let mut k = KiviOperand { spec: kspec, raw: to_f16(&dense.k), coded: Vec::new() };
            let mut v = KiviOperand { spec: vspec, raw: to_f16(&dense.v), coded: Vec::new() };
            if q > 0 {
                k.quantize(pre.heads, cap, q)?;
                v.quantize(pre.heads, cap, q)?;
            }
            layers.push((k, v));
        }
        let n = layers.len();
        Ok(Kivi { layers, len: vec![pre.len; n], quantized: vec![q; n], cap, heads: pre.heads })
    }
}

impl Policy for Kivi {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let (heads, cap) = (self.heads, self.cap);
        let (kop, vop) = &mut self.layers[layer];
        let len = &mut self.len[layer];
        ensure!(*len < cap, "the cache is full ({cap} tokens)");
        let d = heads.d;
        for h in 0..heads.hkv {
            kop.raw[(h * cap + *len) * d..][..d].copy_from_slice(&to_f16(&k[h * d..(h + 1) * d]));
            vop.raw[(h * cap + *len) * d..][..d].copy_from_slice(&to_f16(&v[h * d..(h + 1) * d]));
        }
        *len += 1;
        let done = &mut self.quantized[layer];
        if *len - *done >= RESIDUAL + GROUP {
            *done += GROUP;
            kop.quantize(heads, cap, *done)?;
            vop.quantize(heads, cap, *done)?;
        }
        let (kd, vd) = (kop.dense(heads, cap, *done, *len), vop.dense(heads, cap, *done, *len));
        attend_f16(heads, q, &kd, &vd, *len)
    }
}

/// MiKV: a pair of `MikvCacheCpu` per layer and their f16 reconstruction `[Hkv, cap, D]`
/// (`dequantize_dense`, refreshed whenever rows are quantized), attended through it.
struct Mikv {
    layers: Vec<(MikvCacheCpu, MikvCacheCpu, Vec<f16>, Vec<f16>)>,
    heads: Heads,
    cap: usize,
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
            let (mut kd, mut vd) = (vec![f16::ZERO; hkv * cap * d], vec![f16::ZERO; hkv * cap * d]);
            refresh(&mut kd, &kc, pre.heads, cap)?;
            refresh(&mut vd, &vc, pre.heads, cap)?;
            layers.push((kc, vc, kd, vd));
        }
        Ok(Mikv { layers, heads: pre.heads, cap })
    }
}

/// Writes `cache.dequantize_dense()` (`[Hkv, T, D]`) into rows `0..T` of `x [Hkv, cap, D]`.
fn refresh(x: &mut [f16], cache: &MikvCacheCpu, heads: Heads, cap: usize) -> Result<()> {
    let (t, d) = (cache.len(), heads.d);
    let dense = cache.dequantize_dense()?;
    if dense.len() != heads.hkv * t * d {
        bail!("dequantize_dense returned {} values for [{}, {t}, {d}]", dense.len(), heads.hkv);
    }
    for h in 0..heads.hkv {
        x[h * cap * d..][..t * d].copy_from_slice(&dense[h * t * d..][..t * d]);
    }
    Ok(())
}

impl Policy for Mikv {
    fn step(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let (heads, cap) = (self.heads, self.cap);
        let (kc, vc, kd, vd) = &mut self.layers[layer];
        let (kq, vq) = (kc.quantized_len(), vc.quantized_len());
        let (k16, v16) = (to_f16(k), to_f16(v));
        kc.append(&k16)?;
        vc.append(&v16)?;
        let t = kc.len();
        ensure!(t <= cap, "the cache is full ({cap} tokens)");
        // A new row enters MiKV's f16 ring, so its reconstruction is its f16 rounding; the
        // quantized rows change only when the ring spills a group into the codes.
        let d = heads.d;
        for h in 0..heads.hkv {
            kd[(h * cap + t - 1) * d..][..d].copy_from_slice(&k16[h * d..(h + 1) * d]);
            vd[(h * cap + t - 1) * d..][..d].copy_from_slice(&v16[h * d..(h + 1) * d]);
        }
        if kc.quantized_len() != kq {
            refresh(kd, kc, heads, cap)?;
        }
        if vc.quantized_len() != vq {
            refresh(vd, vc, heads, cap)?;
        }
        attend_f16(heads, q, &rows(kd, heads, cap, 0, t), &rows(vd, heads, cap, 0, t), t)
    }
}
