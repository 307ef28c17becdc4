//! k-means of keys per head, and cluster retrieval: the index of ClusterKV / LouisKV-style
//! retrieval attention. The keys of each head are clustered once (at prefill); at every decode
//! step the centroids are scored against the queries, the best clusters are taken whole
//! while a token budget allows, and their members (plus sinks and a recent window) become
//! the sorted token lists that [`crate::decode::DecodePlan`] attends to.
//!
//! # k-means ([`KmeansPlan`], reference [`cpu::kmeans`])
//! Layouts (row-major, outermost first), with `H` heads (for a batch of sequences, fold the
//! batch in: `H = B·Hkv`, head `b·Hkv + h`), `T` clustered tokens of a cache row of capacity
//! `Tcap ≥ T`, `C` clusters and head dim `D`:
//! - `keys [H, Tcap, D]`, f32, f16 or bf16 (tokens `0..T` of each row are clustered);
//! - `centroids [H, C, D]` f32; `labels [H, Tcap]` u32; `sizes [H, C]` u32;
//!   `cluster_indptr [H, C + 1]` u32 and `members [H, Tcap]` u32: the CSR member lists, per
//!   head, with offsets local to the head's row of `members`: the members of cluster `c` of
//!   head `h` are `members[h, indptr[h, c] .. indptr[h, c + 1]]`, **ascending**;
//!   `iterations [H]` u32, the assignment passes each head ran. Entries of `labels` and
//!   `members` past the clustered tokens are not written.
//!
//! Metrics ([`Metric`]):
//! - **Cosine** (ClusterKV): centroids are unit vectors; a key `x` goes to
//!   `argmax_c x·ĉ` (the key's own norm does not change the argmax, so keys are not
//!   normalized for the assignment). The update is `ĉ = u / |u|` with `u = Σ_{m} x_m / |x_m|`
//!   over the members; a zero key, or a zero `u`, contributes or changes nothing.
//! - **L2**: a key goes to `argmin_c (|c|² − 2 x·c)` (the squared distance less the key's
//!   own `|x|²`); the update is the members' mean.
//!
//! Every dot product `x·c` and squared norm is one f32 fused multiply-add chain over
//! `d = 0, 1, …, D − 1` starting from `+0`; `1/|x|` is `1 / sqrt(Σ x_d²)` with IEEE division
//! and square root (0 for a zero vector); the cosine update is `u_d = fma(x_d, 1/|x_m|, u_d)`
//! over the members in ascending token order, the L2 one `Σ x_d` in that order divided by
//! the count. The GPU performs exactly these operations in exactly this order, so labels,
//! members and centroids are **bit-identical** to [`cpu::kmeans`]. Scores that compare
//! equal (including `-0` and `+0`) go to the **lower cluster index**; a NaN score never
//! wins, and a key whose every score is NaN goes to cluster 0.
//!
//! Initialization (deterministic from [`KmeansOptions::seed`]), a seeded strided sample:
//! head `h` takes `o_h = mix(seed ⊕ (0x9E3779B97F4A7C15 · (h + 1))) mod T`, with `mix` the
//! SplitMix64 output function, and centroid `c` starts as key `(o_h + ⌊c·T/C⌋) mod T`
//! (normalized for cosine). These are `C` distinct tokens since `C ≤ T`.
//!
//! Each iteration is one assignment pass and one update; the outputs after the last
//! iteration are consistent: `labels` are the last assignment, `members`/`sizes` list
//! exactly those labels, and the centroids are the update from those members. An **empty
//! cluster keeps its centroid**. With [`KmeansOptions::stop_when_stable`], a head stops at the
//! first pass that changes no label (that pass counts in `iterations`); the host never waits
//! for this: every iteration is enqueued, and the kernels of a finished head return at once.
//!
//! **Update without float atomics**: a counting sort of the labels (integer histogram,
//! prefix sum, then a stable scatter) yields `sizes`, `cluster_indptr` and `members`, and
//! each cluster's centroid is reduced over its member list in order.
//!
//! **Incremental assignment** ([`KmeansPlan::assign_appended`], [`cpu::assign_appended`]):
//! tokens `from..to` appended to the cache are labelled with the nearest existing centroid
//! (same scores as above), and the member lists are rebuilt over `0..to` from the labels
//! (new tokens land at the end of their clusters' lists, which stay ascending); centroids
//! do not move.
//!
//! **TF32 assignment** ([`KmeansOptions::assign`] = [`AssignPrecision::Tf32`], head dims 64
//! and 128): the assignment's dot products run on the tensor cores, about 4× the f32 FMA
//! rate. Keys are rounded to TF32 (to nearest) and centroids truncated to it (the tensor
//! core reads their top 19 bits); for L2, `|c|²` is still an exact f32 sum (four fma chains,
//! chain `q` over the depths `d` with `⌊(d mod 32)/8⌋ = q` in ascending order, added as
//! `(s₀ + s₁) + (s₂ + s₃)`). A key with no score above `−∞` goes to cluster 0. A label
//! may then differ from the f32 one only where the f32 scores of the two labels are within
//! the sum of their [`tf32_score_bound`]s (`ε = 2⁻⁹` relative per term, checked by
//! [`cpu::tf32_label_admissible`]); a centroid equal to a lower-index one never wins. The
//! counting sort and the update are the f32 ones, applied to the labels the GPU chose, so a
//! run is deterministic and self-consistent, but after its first pass it follows its own
//! labels rather than [`cpu::kmeans`]'s.
//!
//! # Cluster retrieval ([`RetrievePlan`], reference [`cpu::retrieve`])
//! For `B` sequences of `Tq ∈ 1..=16` query tokens and `Hq` query heads over `Hkv` kv heads
//! (group `g = Hq/Hkv`), list `l = b·Hkv + h` uses the clusters of k-means head `l`:
//! - `q [B, Tq, Hq, D]` (f32, f16 or bf16); the state of a k-means over `H = B·Hkv` heads
//!   (`centroids [B·Hkv, C, D]`, `cluster_indptr [B·Hkv, C + 1]`, `members [B·Hkv, Tcap]`);
//!   `seq_lens [B]` u32 on the device (the valid tokens of each sequence; a value above
//!   `Tcap` counts as `Tcap`).
//! - Score: `s_c = ⊕_r q_r·c` over the list's `g·Tq` query rows in the order
//!   `r = t·g + j` (query token `t`, head `h·g + j`), `⊕` = [`Combine::Max`] (a NaN row makes
//!   the score NaN) or [`Combine::Sum`] (f32 adds in row order); each `q_r·c` is the fma
//!   chain above. Bit-identical on both sides.
//! - Rank descending, ties to the lower cluster index, NaN last ([`crate::select`]'s
//!   contract). With the cluster budget `Bc = budget − S − W` (0 when the budget is below
//!   `S + W`), whole clusters are taken in rank order while their sizes sum to at most `Bc`;
//!   the next cluster is cut to its lowest-index members to fill `Bc` exactly (or all
//!   clusters are taken when their sizes sum to less).
//! - Added always: the `S` sink tokens `0..min(S, len)` and the window of the last `W`
//!   tokens. Members at or beyond `len` are dropped.
//! - Output: the union, sorted ascending and unique, as CSR over the `B·Hkv` lists:
//!   `indptr [B·Hkv + 1]` (`indptr[0] = 0`) and `indices` of
//!   [`RetrieveShape::indices_capacity`] entries (the entries past `indptr[B·Hkv]` are not
//!   written): exactly the lists [`crate::decode::DecodePlan`] takes, with the same
//!   `seq_lens` as its `cache_lens`. A list holds at most `min(len, max(budget, S + W))`
//!   tokens.
//!
//! A run enqueues the score kernel, [`crate::select`]'s top-k over the `[B·Hkv, C]` scores
//! (k = C, descending), a marking kernel (budget prefix over the ranked sizes; sinks, window
//! and members into a token bitmap per list) and a compaction kernel. Nothing is read back.
//!
//! # Errors
//! Every shape and option is checked in the plan's `new` and every buffer in `run`; a bad
//! one is an [`Error`] naming it, and nothing is written. Device-resident values are not
//! read back: `seq_lens` above the capacity are clamped, cluster offsets are clamped to the
//! members row, and a member index at or above `len` is dropped, so no value makes a kernel
//! read or write out of bounds.
//!
//! # Example
//! ```no_run
//! use half::f16;
//! use ntkv::cluster::{ClusterState, KmeansOptions, KmeansPlan, KmeansShape, RetrieveOptions, RetrievePlan, RetrieveShape};
//! use ntkv::decode::{DecodeOptions, DecodePlan, DecodeShape};
//! use ntkv::{Device, DeviceTensor};
//! # fn main() -> ntkv::Result<()> {
//! let device = Device::new(0)?;
//! // 8 kv heads of a 4096-token cache (one sequence), D = 128, 64 clusters per head.
//! let km = KmeansShape { heads: 8, tokens: 4096, capacity: 4096, clusters: 64, head_dim: 128 };
//! let keys = DeviceTensor::<f16>::zeros(&device, &km.keys_shape())?;
//! let mut state = ClusterState::zeros(&device, &km)?;
//! let mut kmeans = KmeansPlan::new(&device, &km, KmeansOptions::default())?;
//! kmeans.run(&keys, &mut state)?;
//! // Per decode step: 32 query heads, budget 512 tokens with 4 sinks and a window of 64.
//! let rs = RetrieveShape { batch: 1, q_tokens: 1, hq: 32, hkv: 8, head_dim: 128, clusters: 64, capacity: 4096 };
//! let opts = RetrieveOptions { budget: 512, sinks: 4, window: 64, ..Default::default() };
//! let mut retrieve = RetrievePlan::new(&device, &rs, opts)?;
//! let q = DeviceTensor::<f16>::zeros(&device, &rs.q_shape())?;
//! let seq_lens = DeviceTensor::from_host(&device, &[4096u32], &[1])?;
//! let mut indptr = DeviceTensor::<u32>::zeros(&device, &[rs.n_lists() + 1])?;
//! let mut indices = DeviceTensor::<u32>::zeros(&device, &[retrieve.indices_capacity()])?;
//! retrieve.run(&q, &state, &seq_lens, &mut indptr, &mut indices)?;
//! // The lists feed the sparse decode directly.
//! let ds = DecodeShape { batch: 1, q_tokens: 1, hq: 32, hkv: 8, head_dim: 128, capacity: 4096 };
//! let plan = DecodePlan::new(&device, &ds, DecodeOptions::default(), &[4096], &indptr, &indices)?;
//! # let _ = plan;
//! # Ok(())
//! # }
//! ```
//!
//! # Verification
//! `tests/cluster_cpu.rs` checks the references' properties, `tests/malformed_cluster.rs`
//! every validator, `tests/cluster_gpu.rs` the GPU against the references (labels, members,
//! centroids and token lists equal bit for bit), and `tools/emu/run.sh cluster` runs the
//! kernel source itself on the CPU against a transliteration of the same f32 order.

pub mod cpu;
pub(crate) mod gpu;

pub use gpu::{
    mark_smem_bytes, ClusterState, KmeansPlan, RetrievePlan, ASSIGN_KEYS, ASSIGN_THREADS, LIST_THREADS, ROW_THREADS,
    TF32_ASSIGN_SMEM,
};

use crate::error::{Error, Result};

/// The buffers of a k-means state, one layout on the host ([`cpu::KmeansResult`], `Vec`s) and
/// on the device ([`ClusterState`], device tensors): `F` holds f32 values, `U` u32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct KmeansBuffers<F, U> {
    /// `[H, C, D]`.
    pub centroids: F,
    /// `[H, Tcap]`; [`cpu::NO_LABEL`] past the labelled tokens (host reference).
    pub labels: U,
    /// `[H, C]`.
    pub sizes: U,
    /// `[H, C + 1]`, offsets local to each head's row of `members`.
    pub indptr: U,
    /// `[H, Tcap]`; [`cpu::NO_LABEL`] past each head's `indptr[h, C]` (host reference).
    pub members: U,
    /// `[H]`, assignment passes run.
    pub iterations: U,
}

impl<F, U> KmeansBuffers<F, U> {
    /// The same state with every buffer converted (a copy between host and device), the
    /// first error returned.
    pub fn try_map<G, V, E>(
        &self,
        f: impl FnOnce(&F) -> std::result::Result<G, E>,
        mut u: impl FnMut(&U) -> std::result::Result<V, E>,
    ) -> std::result::Result<KmeansBuffers<G, V>, E> {
        Ok(KmeansBuffers {
            centroids: f(&self.centroids)?,
            labels: u(&self.labels)?,
            sizes: u(&self.sizes)?,
            indptr: u(&self.indptr)?,
            members: u(&self.members)?,
            iterations: u(&self.iterations)?,
        })
    }
}

/// The most clusters per head: the retrieval ranks all of them with one top-k
/// ([`crate::select::MAX_K`]).
pub const MAX_CLUSTERS: usize = crate::select::MAX_K;
/// The largest head dim (the kernels stage one f32 row of it in shared memory).
pub const MAX_HEAD_DIM: usize = 1024;
/// The most k-means iterations one run accepts.
pub const MAX_ITERATIONS: usize = 1000;
/// The most query tokens per sequence of a retrieval.
pub const MAX_Q_TOKENS: usize = 16;

/// The distance of the k-means and of the assignment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Unit centroids, argmax of `x·ĉ` (ClusterKV).
    #[default]
    Cosine,
    /// Squared Euclidean distance: argmin of `|c|² − 2 x·c`.
    L2,
}

impl Metric {
    pub(crate) fn code(self) -> u32 {
        match self {
            Metric::Cosine => 0,
            Metric::L2 => 1,
        }
    }
}

/// How the assignment forms the dot products `x·c` of its scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AssignPrecision {
    /// f32 fused multiply-add chains in the order of the module docs: labels, members and
    /// centroids bit-identical to [`cpu::kmeans`].
    #[default]
    F32,
    /// The tensor cores (TF32 `mma`), for head dims in [`TF32_HEAD_DIMS`]: keys are rounded
    /// to TF32 (10 explicit mantissa bits, to nearest, ties away from zero), centroids
    /// truncated to it, and the products accumulate in f32 in the hardware's order; L2's
    /// `|c|²` stays an exact f32 sum. A label may then differ from the f32 one, but only where
    /// [`cpu::tf32_label_admissible`] admits it: the f32 scores of the two labels are within
    /// the sum of their [`tf32_score_bound`]s. Equal centroids still score equal bit for
    /// bit, so ties go to the lower index. The sort and the update are the f32 path's, so
    /// `members`, `sizes` and the centroids are exactly those of the labels the GPU chose;
    /// after the first pass the run follows its own labels, so it is not bit-comparable with
    /// [`cpu::kmeans`] (which always computes the f32 path). Deterministic run to run.
    Tf32,
}

/// The head dims of the [`AssignPrecision::Tf32`] assignment (each warp holds its keys' whole
/// rows as tensor-core fragments in registers).
pub const TF32_HEAD_DIMS: [usize; 2] = [64, 128];

/// The relative error `ε = 2⁻⁹` allowed to one TF32 score term: the keys' rounding (`2⁻¹¹`),
/// the centroids' truncation (`2⁻¹⁰`) and the f32 accumulation of at most 128 products
/// (`< 2⁻¹⁵`) stay under `0.76·ε`.
pub const TF32_EPSILON: f64 = 1.0 / 512.0;

/// How far the TF32 score of key `x` against centroid `c` can be from its f32 score:
/// `ε·|x|·|c|` for cosine, `2ε·|x|·|c| + ε·|c|²` for L2 (the score `2x·c − |c|²`), with
/// `ε` = [`TF32_EPSILON`]; norms in f64.
pub fn tf32_score_bound(metric: Metric, x_norm: f64, c_norm: f64) -> f64 {
    match metric {
        Metric::Cosine => TF32_EPSILON * x_norm * c_norm,
        Metric::L2 => TF32_EPSILON * (2.0 * x_norm * c_norm + c_norm * c_norm),
    }
}

/// The sizes of a k-means over `heads` rows of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KmeansShape {
    /// `H`, heads (rows of keys), at least 1.
    pub heads: usize,
    /// `T`, the tokens of each row that are clustered, `clusters ..= capacity`.
    pub tokens: usize,
    /// `Tcap`, the token capacity of each row of `keys`, `labels` and `members`, at most
    /// `u32::MAX`.
    pub capacity: usize,
    /// `C`, clusters per head, `1 ..= min(T, 16384)`.
    pub clusters: usize,
    /// `D`, `1 ..= 1024`.
    pub head_dim: usize,
}

impl KmeansShape {
    /// `[H, Tcap, D]`.
    pub fn keys_shape(&self) -> [usize; 3] {
        [self.heads, self.capacity, self.head_dim]
    }
    /// `[H, C, D]`.
    pub fn centroids_shape(&self) -> [usize; 3] {
        [self.heads, self.clusters, self.head_dim]
    }
    /// `[H, Tcap]`, of `labels` and `members`.
    pub fn labels_shape(&self) -> [usize; 2] {
        [self.heads, self.capacity]
    }
    /// `[H, C]`.
    pub fn sizes_shape(&self) -> [usize; 2] {
        [self.heads, self.clusters]
    }
    /// `[H, C + 1]`.
    pub fn indptr_shape(&self) -> [usize; 2] {
        [self.heads, self.clusters.saturating_add(1)]
    }

    /// Checks every count: `H ≥ 1`, `1 ≤ C ≤ T ≤ Tcap ≤ u32::MAX`, `C ≤ 16384`,
    /// `1 ≤ D ≤ 1024`, and that every buffer's size fits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `heads`, `tokens`, `capacity`, `clusters` or
    /// `head_dim`; [`Error::TooLarge`] naming `capacity` or `keys`.
    pub fn validate(&self) -> Result<()> {
        if self.heads == 0 {
            return Err(Error::invalid("heads", "must be at least 1"));
        }
        if self.tokens == 0 {
            return Err(Error::invalid("tokens", "must be at least 1"));
        }
        if self.capacity < self.tokens {
            return Err(Error::invalid(
                "capacity",
                format!("capacity {} is below the {} clustered tokens", self.capacity, self.tokens),
            ));
        }
        if self.capacity > u32::MAX as usize {
            return Err(Error::too_large("capacity", "token indices are u32"));
        }
        if self.clusters == 0 || self.clusters > self.tokens || self.clusters > MAX_CLUSTERS {
            return Err(Error::invalid(
                "clusters",
                format!("{} clusters; 1 to min(tokens = {}, {MAX_CLUSTERS}) are supported", self.clusters, self.tokens),
            ));
        }
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return Err(Error::invalid("head_dim", format!("{}; 1 to {MAX_HEAD_DIM} are supported", self.head_dim)));
        }
        crate::tensor::checked_numel::<f32>("keys", &self.keys_shape())?;
        crate::tensor::checked_numel::<f32>("centroids", &self.centroids_shape())?;
        crate::tensor::checked_numel::<u32>("labels", &self.labels_shape())?;
        // Heads x clusters and heads x token tiles index the grids in u32.
        crate::error::to_i32("heads", self.heads.saturating_mul(self.clusters))?;
        crate::error::to_i32("heads", self.heads.saturating_mul(self.capacity.div_ceil(128)))?;
        Ok(())
    }
}

/// The options of a k-means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KmeansOptions {
    /// The metric (default cosine).
    pub metric: Metric,
    /// Iterations (assignment + update), `1 ..= 1000` (default 10).
    pub iterations: usize,
    /// Stop a head at the first pass that changes no label (default false: always run
    /// `iterations`). Either way the host never waits.
    pub stop_when_stable: bool,
    /// The seed of the initial sample (default 0).
    pub seed: u64,
    /// The assignment's arithmetic (default [`AssignPrecision::F32`], bit-exact).
    pub assign: AssignPrecision,
}

impl Default for KmeansOptions {
    fn default() -> Self {
        KmeansOptions {
            metric: Metric::Cosine,
            iterations: 10,
            stop_when_stable: false,
            seed: 0,
            assign: AssignPrecision::F32,
        }
    }
}

impl KmeansOptions {
    /// Checks `iterations`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `iterations` outside `1 ..= 1000`.
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 || self.iterations > MAX_ITERATIONS {
            return Err(Error::invalid(
                "iterations",
                format!("{} iterations; 1 to {MAX_ITERATIONS} are supported", self.iterations),
            ));
        }
        Ok(())
    }

    /// Checks the options against a shape: [`AssignPrecision::Tf32`] needs a head dim in
    /// [`TF32_HEAD_DIMS`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `assign`.
    pub fn validate_for(&self, shape: &KmeansShape) -> Result<()> {
        if self.assign == AssignPrecision::Tf32 && !TF32_HEAD_DIMS.contains(&shape.head_dim) {
            return Err(Error::invalid(
                "assign",
                format!("the TF32 assignment takes head dims {TF32_HEAD_DIMS:?}, not {}", shape.head_dim),
            ));
        }
        Ok(())
    }
}

/// Checks the token range of an incremental assignment: `from ≤ to`, `1 ≤ to ≤ Tcap`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `from` or `to`.
pub fn validate_append(shape: &KmeansShape, from: usize, to: usize) -> Result<()> {
    if to == 0 || to > shape.capacity {
        return Err(Error::invalid("to", format!("{to} is outside 1 ..= capacity {}", shape.capacity)));
    }
    if from > to {
        return Err(Error::invalid("from", format!("{from} is above to = {to}")));
    }
    Ok(())
}

/// How the scores of a GQA group's query rows are combined into one cluster score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Combine {
    /// The largest row score (a NaN row makes the score NaN).
    #[default]
    Max,
    /// The sum of the row scores, in row order.
    Sum,
}

/// The sizes of a cluster retrieval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetrieveShape {
    /// `B`, sequences, at least 1.
    pub batch: usize,
    /// `Tq`, query tokens per sequence, `1 ..= 16`.
    pub q_tokens: usize,
    /// `Hq`, query heads, a multiple of `hkv`.
    pub hq: usize,
    /// `Hkv`, kv heads, at least 1.
    pub hkv: usize,
    /// `D`, `1 ..= 1024`.
    pub head_dim: usize,
    /// `C`, clusters per list, `1 ..= 16384`.
    pub clusters: usize,
    /// `Tcap`, the cache's token capacity (the row length of `members`), `1 ..= u32::MAX`.
    pub capacity: usize,
}

impl RetrieveShape {
    /// The sparse-decode shape of the same sequences, heads and cache (the consumer of the
    /// lists; the decode itself takes head dims 64 and 128 only).
    pub fn decode_shape(&self) -> crate::decode::DecodeShape {
        crate::decode::DecodeShape {
            batch: self.batch,
            q_tokens: self.q_tokens,
            hq: self.hq,
            hkv: self.hkv,
            head_dim: self.head_dim,
            capacity: self.capacity,
        }
    }
    /// `Hq / Hkv` (0 for `Hkv = 0`).
    pub fn group(&self) -> usize {
        self.decode_shape().group()
    }
    /// Query rows per list, `group · Tq`.
    pub fn rows(&self) -> usize {
        self.decode_shape().rows()
    }
    /// `B·Hkv`.
    pub fn n_lists(&self) -> usize {
        self.decode_shape().n_lists()
    }
    /// `[B, Tq, Hq, D]`.
    pub fn q_shape(&self) -> [usize; 4] {
        self.decode_shape().q_shape()
    }
    /// The k-means shape whose state this retrieval reads (its `tokens` is the capacity:
    /// only the sizes of the state's buffers matter here).
    pub fn kmeans_shape(&self) -> KmeansShape {
        KmeansShape {
            heads: self.n_lists(),
            tokens: self.capacity,
            capacity: self.capacity,
            clusters: self.clusters,
            head_dim: self.head_dim,
        }
    }

    /// The entries `indices` must hold: `B·Hkv · min(Tcap, max(budget, S + W))`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming `indices` when that exceeds `u32::MAX`.
    pub fn indices_capacity(&self, options: &RetrieveOptions) -> Result<usize> {
        let per = self.capacity.min(options.budget.max(options.sinks.saturating_add(options.window)));
        let n = crate::error::checked_mul("indices", self.n_lists(), per)?;
        if n > u32::MAX as usize {
            return Err(Error::too_large("indices", format!("up to {n} tokens do not fit u32 offsets")));
        }
        Ok(n.max(1))
    }

    /// Checks every count: positive sizes, `Tq ≤ 16`, `Hkv | Hq`, `D ≤ 1024`,
    /// `C ≤ 16384`, `Tcap ≤ u32::MAX`, buffer sizes that fit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `batch`, `q_tokens`, `hq`, `hkv`, `head_dim`,
    /// `clusters` or `capacity`; [`Error::TooLarge`] naming `capacity`, `q`, `k` (the size
    /// the sparse decode checks for a cache of this shape) or `members`.
    pub fn validate(&self) -> Result<()> {
        // The lists are the sparse decode's, so are the rules on sequences, query tokens,
        // heads and capacity (errors named alike); the head dim is checked on its own below.
        crate::decode::DecodeShape { head_dim: crate::decode::HEAD_DIMS[0], ..self.decode_shape() }.validate()?;
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return Err(Error::invalid("head_dim", format!("{}; 1 to {MAX_HEAD_DIM} are supported", self.head_dim)));
        }
        if self.clusters == 0 || self.clusters > MAX_CLUSTERS {
            return Err(Error::invalid(
                "clusters",
                format!("{} clusters; 1 to {MAX_CLUSTERS} are supported", self.clusters),
            ));
        }
        crate::tensor::checked_numel::<f32>("q", &self.q_shape())?;
        crate::tensor::checked_numel::<u32>("members", &[self.n_lists(), self.capacity])?;
        crate::tensor::checked_numel::<f32>("centroids", &[self.n_lists(), self.clusters, self.head_dim])?;
        crate::error::to_i32("hkv", self.n_lists().saturating_mul(self.clusters))?;
        crate::error::to_i32("hq", self.n_lists().saturating_mul(self.rows()))?;
        if self.n_lists() > 65535 {
            return Err(Error::too_large("batch", format!("{} lists; at most 65535", self.n_lists())));
        }
        Ok(())
    }
}

/// The options of a cluster retrieval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RetrieveOptions {
    /// How a group's row scores combine (default max).
    pub combine: Combine,
    /// The token budget of a list, sinks and window included (`≤ u32::MAX`).
    pub budget: usize,
    /// `S`, sink tokens always kept (`≤ u32::MAX`).
    pub sinks: usize,
    /// `W`, the most recent tokens always kept (`≤ u32::MAX`).
    pub window: usize,
}

impl RetrieveOptions {
    /// The tokens taken from clusters: `budget − S − W`, or 0.
    pub fn cluster_budget(&self) -> usize {
        self.budget.saturating_sub(self.sinks.saturating_add(self.window))
    }

    /// Checks that `budget`, `sinks` and `window` fit `u32`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [("budget", self.budget), ("sinks", self.sinks), ("window", self.window)] {
            if v > u32::MAX as usize {
                return Err(Error::too_large(arg, format!("{v} does not fit u32")));
            }
        }
        Ok(())
    }
}
