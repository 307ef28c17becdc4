//! GPU plans of the policy family: the kernels of `cuda/policy.cu` chained with the shared
//! top-k and expansion of [`crate::select`] and the H2O accumulation and compaction of
//! [`crate::topk`]. Every plan validates its shape in `new`; every run checks the device,
//! shape and length of each buffer before anything is enqueued.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, PushKernelArg};

use super::{validate_lazy_state, LazyOptions, PrefixShape, WindowKvOptions, LAZY_MAX_STEP};
use crate::device::{Device, Module};
use crate::error::{to_u32, to_u64, Error, Result};
use crate::launch::{grid_for, KernelId};
use crate::params::{NtkvPolicyLazyParams, NtkvPolicyPrefixParams, NtkvPolicyWindowParams};
use crate::select::gpu::TopkOutput;
use crate::select::{BlockMap, ExpandPlan, ExpandShape, TopkOptions, TopkPlan, TopkShape};
use crate::tensor::{DeviceTensor, Float, TensorMut, TensorRef};
use crate::topk::gpu::{accumulate, check_attn_support, compact, AttnScratch, CompactBufs, EvictionPlan};
use crate::topk::{AttnShape, GqaReduce};

/// Threads per block of every policy kernel.
pub(crate) const POLICY_THREADS: u32 = 256;
/// Candidate keys per round of the PrefixKV ratio search (8 bits).
const PROBES: usize = 256;
/// The WindowKV and LazyEviction kernels of `cuda/policy.cu`.
const STEP_OPS: [&str; 2] = ["policy_window_sums", "policy_lazy_update"];
/// The PrefixKV kernels, in the order a run launches them.
const PREFIX_OPS: [&str; 4] =
    ["policy_prefix_cumsum", "policy_prefix_probe", "policy_prefix_split", "policy_prefix_keep"];

fn policy_id(op: &'static str) -> KernelId {
    KernelId::new(Module::Policy, op)
}

/// Every kernel id this module's launchers can form (checked against the images by
/// `tests/kernel_names.rs`).
pub(crate) fn kernels() -> Vec<KernelId> {
    STEP_OPS.iter().chain(&PREFIX_OPS).map(|op| policy_id(op)).collect()
}

/// A reusable WindowKV selection for `rows` rows of caches of `t` tokens (see
/// [`crate::policy`] for the contract): window sums on the device, the shared top-k of the
/// window scores with the recent window appended as one more block, and the shared
/// expansion of the blocks into sorted CSR token lists.
///
/// For index sharing, run the plan on a group's leader and pass its `indptr`/`indices` to
/// the group's other layers ([`WindowKvOptions::is_leader`]); nothing is launched for them.
#[derive(Debug)]
pub struct WindowKvPlan {
    device: Device,
    rows: usize,
    t: usize,
    options: WindowKvOptions,
    nw: usize,
    m: usize,
    sums: CudaFunction,
    ws: CudaSlice<f32>,
    topk: Option<TopkPlan>,
    blocks: DeviceTensor<u32>,
    ranges: DeviceTensor<u32>,
    lengths: DeviceTensor<u32>,
    expand: ExpandPlan,
    attn: Option<(AttnShape, AttnScratch, DeviceTensor<f32>)>,
}

impl WindowKvPlan {
    /// Validates the options, loads the kernels and allocates the scratch (the window scores,
    /// the top-k's, the block list `[rows, m + 1]` and the window ranges `[nw + 1, 2]`).
    ///
    /// # Errors
    /// As [`WindowKvOptions::validate`]; [`Error::KernelsNotBuilt`]; driver errors.
    pub fn new(device: &Device, rows: usize, t: usize, options: WindowKvOptions) -> Result<Self> {
        options.validate(rows, t)?;
        let (nw, m) = (options.windows(t), options.kept_windows(t));
        let older = t - options.recent;
        let w = options.window;
        let mut ranges = Vec::with_capacity((nw + 1) * 2);
        for i in 0..nw {
            ranges.extend([to_u32("window", i * w)?, to_u32("window", ((i + 1) * w).min(older))?]);
        }
        ranges.extend([to_u32("scores", older)?, to_u32("scores", t)?]);
        // The block list: the top-k writes it when windows compete; otherwise it is fixed.
        let fixed: Vec<u32> =
            if m == nw { (0..rows).flat_map(|_| 0..=nw as u32).collect() } else { vec![nw as u32; rows * (m + 1)] };
        let topk = if m > 0 && m < nw {
            Some(TopkPlan::new(device, &TopkShape { rows, n: nw, k: m }, TopkOptions::default())?)
        } else {
            None
        };
        let shape = ExpandShape { rows, kb: m + 1, nb: nw + 1, t, map: BlockMap::Ranges { shared: true } };
        Ok(WindowKvPlan {
            device: device.clone(),
            rows,
            t,
            options,
            nw,
            m,
            sums: device.kernel(policy_id(STEP_OPS[0]))?,
            ws: device.stream().alloc_zeros::<f32>((rows * nw).max(1))?,
            topk,
            blocks: DeviceTensor::from_host(device, &fixed, &[rows, m + 1])?,
            ranges: DeviceTensor::from_host(device, &ranges, &[nw + 1, 2])?,
            lengths: DeviceTensor::from_host(device, &vec![to_u32("scores", t)?; rows], &[rows])?,
            expand: ExpandPlan::new(device, &shape)?,
            attn: None,
        })
    }

    /// A plan that also computes the token scores from the observation window, one row per
    /// kv head (`rows = shape.hkv`, `t = shape.t`, `shape.tq = options.recent`).
    ///
    /// # Errors
    /// As [`Self::new`] and [`AttnShape::validate`]; [`Error::InvalidArgument`] naming
    /// `recent` when `shape.tq` differs from it.
    pub fn with_attention(device: &Device, shape: &AttnShape, options: WindowKvOptions) -> Result<Self> {
        shape.validate()?;
        if shape.tq != options.recent {
            return Err(Error::invalid(
                "recent",
                format!("{} differs from the window's {} queries", options.recent, shape.tq),
            ));
        }
        let mut plan = Self::new(device, shape.hkv, shape.t, options)?;
        let votes = DeviceTensor::<f32>::zeros(device, &[shape.hkv, shape.t])?;
        plan.attn = Some((*shape, AttnScratch::new(device, *shape)?, votes));
        Ok(plan)
    }

    /// The entries `indices` must hold: `rows · t`.
    ///
    /// # Errors
    /// As [`ExpandShape::capacity`] (never for a plan that was built).
    pub fn capacity(&self) -> Result<usize> {
        self.expand.shape().capacity()
    }

    /// Whether the token scores are read at all: only when some windows compete.
    fn needs_scores(&self) -> bool {
        self.topk.is_some()
    }

    /// Selects from token scores `scores [rows, t − recent]` into `indptr [rows + 1]` and
    /// `indices [≥ capacity]` (`u32`); the entries past `indptr[rows]` are left as they were.
    /// `scores` is neither read nor checked when all windows, or none, are kept.
    ///
    /// # Errors
    /// [`Error::Shape`] for a buffer of another shape; [`Error::DeviceMismatch`]; driver errors.
    pub fn run(
        &mut self,
        scores: &impl TensorRef<f32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let older = self.t - self.options.recent;
        self.check_outputs(indptr, indices)?;
        if self.needs_scores() {
            self.device.check_buffer("scores", scores, &[self.rows, older])?;
            self.rank(&scores.cuda_view(), older)?;
        }
        self.expand.run_ranges(&self.blocks, &self.ranges, &self.lengths, indptr, indices)
    }

    /// Selects from the observation window `q_window [hq, recent, d]` over `k [hkv, t, d]`
    /// (`f16` or `bf16`, `d ∈ {64, 128, 256}`): the votes of the H2O accumulation (as
    /// SnapKV's, unpooled) into [`Self::run`]'s selection. Needs [`Self::with_attention`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `q_window` for a plan without attention or an
    /// unsupported dtype or `d`; as [`Self::run`].
    pub fn run_attention<T: Float>(
        &mut self,
        q_window: &impl TensorRef<T>,
        k: &impl TensorRef<T>,
        reduce: GqaReduce,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<()> {
        let Some((s, _, _)) = self.attn.as_ref() else {
            return Err(Error::invalid("q_window", "this plan was built without attention (use with_attention)"));
        };
        let s = *s;
        self.device.check_buffer("q_window", q_window, &[s.hq, s.tq, s.d])?;
        self.device.check_buffer("k", k, &[s.hkv, s.t, s.d])?;
        check_attn_support(s, T::DTYPE)?;
        self.check_outputs(indptr, indices)?;
        if self.needs_scores() {
            // Taken out for the launches (they borrow the plan), and always put back.
            let (shape, mut scratch, mut votes) =
                self.attn.take().ok_or_else(|| Error::internal("attention scratch vanished"))?;
            let mut vv = votes.view_mut();
            let ranked =
                accumulate(&self.device, &mut scratch, &q_window.cuda_view(), &k.cuda_view(), &mut vv, reduce, true)
                    .and_then(|()| self.rank(&votes.slice().as_view(), s.t));
            self.attn = Some((shape, scratch, votes));
            ranked?;
        }
        self.expand.run_ranges(&self.blocks, &self.ranges, &self.lengths, indptr, indices)
    }

    fn check_outputs(&self, indptr: &impl TensorMut<u32>, indices: &impl TensorMut<u32>) -> Result<()> {
        self.device.check_buffer("indptr", indptr, &[self.rows + 1])?;
        self.device.check_tensor("indices", indices)?;
        let cap = self.capacity()?;
        if indices.shape().len() != 1 || indices.len() < cap {
            return Err(Error::shape("indices", &[cap], indices.shape()));
        }
        Ok(())
    }

    /// Window sums of `scores` (rows `stride` apart, the first `t − recent` read), then the
    /// top-`m` windows plus the recent block into the block list.
    fn rank(&mut self, scores: &CudaView<'_, f32>, stride: usize) -> Result<()> {
        let (rows, nw, m) = (self.rows, self.nw, self.m);
        let older = self.t - self.options.recent;
        if scores.len() < (rows - 1) * stride + older || stride < older {
            return Err(Error::internal("window scores do not match the plan"));
        }
        let params = NtkvPolicyWindowParams {
            rows: to_u32("scores", rows)?,
            older: to_u32("scores", older)?,
            w: to_u32("window", self.options.window)?,
            nw: to_u32("window", nw)?,
            ld: to_u64("scores", stride)?,
        };
        let cfg = grid_for(&self.device, &self.sums, POLICY_THREADS, 0, (rows * nw).div_ceil(256), true)?;
        let mut b = self.device.stream().launch_builder(&self.sums);
        b.arg(&params).arg(scores).arg(&mut self.ws);
        // SAFETY: ntkv_policy_window_sums(NtkvPolicyWindowParams, const float* scores, float* ws).
        // For e < rows * nw (grid-stride) it reads scores[r * ld + j] for j < older (ld = stride),
        // inside (rows - 1) * stride + older <= scores.len() (checked above), and writes ws[e], inside
        // the plan's rows * nw buffer.
        unsafe { b.launch(cfg) }?;
        let plan = self.topk.as_mut().ok_or_else(|| Error::internal("ranking without competing windows"))?;
        let out = TopkOutput { uniform_len: nw, has_lengths: false, out_stride: m + 1, tail_count: 1, tail_first: nw };
        let ws = self.ws.slice(..rows * nw);
        plan.launch::<f32>(&ws, out, None, &mut self.blocks.cuda_view_mut())
    }
}

/// The LazyEviction state of one layer on the device: `acc`, `last_hit` and `mri`, each
/// `[hkv, t]` `f32` (see [`crate::policy`]).
pub struct LazyStateMut<'a> {
    /// The H2O accumulator.
    pub acc: &'a mut dyn TensorMut<f32>,
    /// The step of each token's last hit.
    pub last_hit: &'a mut dyn TensorMut<f32>,
    /// Each token's maximum recurrence interval.
    pub mri: &'a mut dyn TensorMut<f32>,
}

/// A reusable LazyEviction decode step for one shape (`q [hq, tq, d]` of the step over
/// `k [hkv, t, d]`, `f16` or `bf16`, `d ∈ {64, 128, 256}`) and options.
#[derive(Debug)]
pub struct LazyPlan {
    device: Device,
    shape: AttnShape,
    options: LazyOptions,
    reduce: GqaReduce,
    scratch: AttnScratch,
    mass: DeviceTensor<f32>,
    scores: DeviceTensor<f32>,
    update: CudaFunction,
    evict: Option<EvictionPlan>,
    keep: Option<DeviceTensor<u32>>,
}

impl LazyPlan {
    /// Validates the shape and options, loads the kernels and allocates the step's mass and
    /// score buffers (`[hkv, t]` each) and, when `t > budget`, the eviction's.
    ///
    /// # Errors
    /// As [`AttnShape::validate`], [`LazyOptions::validate`] and
    /// [`crate::topk::validate_select`]; driver errors.
    pub fn new(device: &Device, shape: &AttnShape, options: LazyOptions, reduce: GqaReduce) -> Result<Self> {
        shape.validate()?;
        options.validate()?;
        validate_lazy_state(shape.hkv, shape.t, 0, &[])?;
        let (hkv, t) = (shape.hkv, shape.t);
        let (evict, keep) = if t > options.budget {
            let plan = EvictionPlan::h2o(device, hkv, t, options.budget, options.recent)?;
            (Some(plan), Some(DeviceTensor::<u32>::zeros(device, &[hkv, options.budget])?))
        } else {
            (None, None)
        };
        Ok(LazyPlan {
            device: device.clone(),
            shape: *shape,
            options,
            reduce,
            scratch: AttnScratch::new(device, *shape)?,
            mass: DeviceTensor::zeros(device, &[hkv, t])?,
            scores: DeviceTensor::zeros(device, &[hkv, t])?,
            update: device.kernel(policy_id(STEP_OPS[1]))?,
            evict,
            keep,
        })
    }

    /// The keep list `[hkv, budget]` of the last eviction (`None` when `t ≤ budget`).
    pub fn keep(&self) -> Option<&DeviceTensor<u32>> {
        self.keep.as_ref()
    }

    /// Decode step `step`: the H2O accumulation of `q` over `k_cache` into the step's mass,
    /// the state update, and, when [`LazyOptions::evicts_after`] the step and `t > budget`,
    /// the eviction: keep list ([`Self::keep`]), then the in-place compaction of `k_cache`,
    /// `v_cache` (`[hkv, t, d]`), `acc`, `last_hit` and `mri` (two compactions, each checking
    /// the keep list on the device first: two 8-byte read-backs). Returns whether it evicted;
    /// after an eviction each head's first `budget` rows hold the kept tokens.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `step` at or past 2^24, or `q` for an unsupported
    /// dtype or `d`; [`Error::Shape`]; [`Error::DeviceMismatch`]; driver errors. Nothing is
    /// written on an argument error.
    pub fn step<T: Float>(
        &mut self,
        step: usize,
        q: &impl TensorRef<T>,
        k_cache: &mut impl TensorMut<T>,
        v_cache: &mut impl TensorMut<T>,
        state: LazyStateMut<'_>,
    ) -> Result<bool> {
        let s = self.shape;
        let (hkv, t) = (s.hkv, s.t);
        if step >= LAZY_MAX_STEP {
            return Err(Error::invalid("step", format!("step {step} reaches 2^24")));
        }
        self.device.check_buffer("q", q, &[s.hq, s.tq, s.d])?;
        self.device.check_buffer("k_cache", k_cache, &[hkv, t, s.d])?;
        self.device.check_buffer("v_cache", v_cache, &[hkv, t, s.d])?;
        self.device.check_buffer("acc", &*state.acc, &[hkv, t])?;
        self.device.check_buffer("last_hit", &*state.last_hit, &[hkv, t])?;
        self.device.check_buffer("mri", &*state.mri, &[hkv, t])?;
        check_attn_support(s, T::DTYPE)?;
        let evict = self.options.evicts_after(step) && self.evict.is_some();

        let mut mv = self.mass.cuda_view_mut();
        accumulate(&self.device, &mut self.scratch, &q.cuda_view(), &k_cache.cuda_view(), &mut mv, self.reduce, true)?;
        let params = NtkvPolicyLazyParams {
            step: step as f32,
            hit: self.options.threshold,
            hkv: to_u32("acc", hkv)?,
            t: to_u32("acc", t)?,
            scores: u32::from(evict),
        };
        let cfg = grid_for(&self.device, &self.update, POLICY_THREADS, 0, (hkv * t).div_ceil(256), true)?;
        let (mut acc, mut lh, mut mri) =
            (state.acc.cuda_view_mut(), state.last_hit.cuda_view_mut(), state.mri.cuda_view_mut());
        let mut b = self.device.stream().launch_builder(&self.update);
        let mut sv = self.scores.view_mut();
        b.arg(&params).arg(self.mass.slice()).arg(&mut acc).arg(&mut lh).arg(&mut mri).arg(&mut sv);
        // SAFETY: ntkv_policy_lazy_update(NtkvPolicyLazyParams, const float* mass, float* acc,
        // float* last_hit, float* mri, float* scores) touches element e < hkv * t of each
        // (grid-stride); every buffer is [hkv, t] (the plan's two by construction, the state's
        // checked above).
        unsafe { b.launch(cfg) }?;
        if !evict {
            return Ok(false);
        }
        let (Some(plan), Some(keep)) = (self.evict.as_mut(), self.keep.as_mut()) else {
            return Err(Error::internal("an eviction without its plan"));
        };
        plan.run(Some(&self.scores.cuda_view()), &mut keep.cuda_view_mut())?;
        let budget = self.options.budget;
        let bufs = CompactBufs {
            keep: keep.cuda_view(),
            k_cache: k_cache.cuda_view_mut(),
            v_cache: v_cache.cuda_view_mut(),
            acc: Some(acc),
        };
        compact(&self.device, bufs, (hkv, t, s.d, budget))?;
        // The state rides the same compaction as rows of one f32.
        let bufs = CompactBufs { keep: keep.cuda_view(), k_cache: lh, v_cache: mri, acc: None };
        compact(&self.device, bufs, (hkv, t, 1, budget))?;
        Ok(true)
    }
}

/// The budgets of a [`PrefixPlan::run`]: per row, and the ratio.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixBudgets {
    /// Tokens kept per row `[rows]`, summing to the budget.
    pub budgets: Vec<u32>,
    /// The retention ratio `p*`.
    pub ratio: f64,
}

/// A reusable PrefixKV budget computation for one [`PrefixShape`]: the sort (the shared
/// top-k with `k = n`) and the thresholds on the device, the ratio search driven from the
/// host over small read-backs (8 rounds of 256 counts, then 2 counts per row), and the keep
/// lists on the device.
#[derive(Debug)]
pub struct PrefixPlan {
    device: Device,
    shape: PrefixShape,
    topk: TopkPlan,
    sorted: DeviceTensor<f32>,
    order: DeviceTensor<u32>,
    keys: CudaSlice<u64>,
    counts: CudaSlice<u64>,
    split: CudaSlice<u32>,
    budgets: CudaSlice<u32>,
    fns: [CudaFunction; 4],
}

impl PrefixPlan {
    /// Validates the shape, loads the kernels and allocates the scratch (about
    /// `16 · rows · n` bytes plus the top-k's).
    ///
    /// # Errors
    /// As [`PrefixShape::validate`]; driver errors.
    pub fn new(device: &Device, shape: &PrefixShape) -> Result<Self> {
        shape.validate()?;
        let PrefixShape { rows, n, .. } = *shape;
        let stream = device.stream();
        Ok(PrefixPlan {
            device: device.clone(),
            shape: *shape,
            topk: TopkPlan::new(device, &TopkShape { rows, n, k: n }, TopkOptions::default())?,
            sorted: DeviceTensor::zeros(device, &[rows, n])?,
            order: DeviceTensor::zeros(device, &[rows, n])?,
            keys: stream.alloc_zeros::<u64>(rows * n)?,
            counts: stream.alloc_zeros::<u64>(PROBES)?,
            split: stream.alloc_zeros::<u32>(rows * 2)?,
            budgets: stream.alloc_zeros::<u32>(rows)?,
            fns: prefix_kernels(device)?,
        })
    }

    /// Runs PrefixKV on `importance [rows, n]` (`f32`): writes the keep lists into
    /// `indptr [rows + 1]` and `indices [budget]` and returns the budgets and the ratio. It
    /// synchronizes with the device 9 times (the search's read-backs).
    ///
    /// # Errors
    /// [`Error::Shape`] for a buffer of another shape; [`Error::DeviceMismatch`]; driver
    /// errors. Nothing is written on an argument error.
    pub fn run(
        &mut self,
        importance: &impl TensorRef<f32>,
        indptr: &mut impl TensorMut<u32>,
        indices: &mut impl TensorMut<u32>,
    ) -> Result<PrefixBudgets> {
        let PrefixShape { rows, n, budget } = self.shape;
        self.device.check_buffer("importance", importance, &[rows, n])?;
        self.device.check_buffer("indptr", indptr, &[rows + 1])?;
        self.device.check_buffer("indices", indices, &[budget])?;
        self.topk.run(importance, None, &mut self.sorted, &mut self.order)?;
        let stream = self.device.stream().clone();
        let mut params = NtkvPolicyPrefixParams {
            key: 0,
            cap: to_u32("indices", budget)?,
            rows: to_u32("importance", rows)?,
            n: to_u32("importance", n)?,
            bit: 0,
        };
        let [cumsum, probe, split, keep] = self.fns.clone();
        let row_grid = |f: &CudaFunction| grid_for(&self.device, f, POLICY_THREADS, 0, rows, true);
        let cfg = row_grid(&cumsum)?;
        let mut b = stream.launch_builder(&cumsum);
        b.arg(&params).arg(self.sorted.slice()).arg(&mut self.keys);
        // SAFETY: ntkv_policy_prefix_cumsum(NtkvPolicyPrefixParams, const float* sorted, u64* keys).
        // Block r (grid-stride, r < rows) reads sorted[r * n + i] and writes keys[r * n + i] for
        // i < n; both buffers hold rows * n. Static shared memory only.
        unsafe { b.launch(cfg) }?;

        let mut prefix = 0u64;
        for shift in (0..8).rev().map(|d| d * 8) {
            stream.memset_zeros(&mut self.counts)?;
            params.key = prefix;
            params.bit = shift;
            let cfg = row_grid(&probe)?;
            let mut b = stream.launch_builder(&probe);
            b.arg(&params).arg(&self.keys).arg(&mut self.counts);
            // SAFETY: ntkv_policy_prefix_probe(NtkvPolicyPrefixParams, const u64* keys, u64* counts):
            // block r < rows reads keys[r * n .. (r + 1) * n) (binary searches) and atomically adds
            // into counts[d], d < 256 = the buffer's length.
            unsafe { b.launch(cfg) }?;
            let counts = stream.clone_dtoh(&self.counts)?;
            let d = counts.iter().position(|&c| c >= budget as u64).unwrap_or(PROBES - 1);
            prefix |= (d as u64) << shift;
        }
        params.key = prefix;
        let cfg = grid_for(&self.device, &split, POLICY_THREADS, 0, rows.div_ceil(256), true)?;
        let mut b = stream.launch_builder(&split);
        b.arg(&params).arg(&self.keys).arg(&mut self.split);
        // SAFETY: ntkv_policy_prefix_split(NtkvPolicyPrefixParams, const u64* keys, u32* split):
        // thread r < rows reads keys[r * n .. (r + 1) * n) and writes split[2r], split[2r + 1],
        // inside rows * n and rows * 2.
        unsafe { b.launch(cfg) }?;
        let counts = stream.clone_dtoh(&self.split)?;
        let budgets = split_budgets(&counts, budget)?;
        let mut ptr = Vec::with_capacity(rows + 1);
        ptr.push(0u32);
        for &b in &budgets {
            ptr.push(ptr[ptr.len() - 1] + b);
        }
        stream.memcpy_htod(&budgets, &mut self.budgets)?;
        let mut ipv = indptr.cuda_view_mut();
        stream.memcpy_htod(&ptr, &mut ipv)?;
        let cfg = row_grid(&keep)?;
        let mut iv = indices.cuda_view_mut();
        let mut b = stream.launch_builder(&keep);
        let ipr = ipv.as_view();
        b.arg(&params).arg(self.order.slice()).arg(&self.budgets).arg(&ipr).arg(&mut iv);
        // SAFETY: ntkv_policy_prefix_keep(NtkvPolicyPrefixParams, const u32* order, const u32*
        // budgets, const u32* indptr, u32* indices): block r < rows reads order[r * n + i] for
        // i < min(budgets[r], n), budgets[r] and indptr[r] ([rows + 1], just written), and
        // writes indices[pos] only for pos < cap = budget = indices.len() (checked).
        unsafe { b.launch(cfg) }?;
        Ok(PrefixBudgets { budgets, ratio: f64::from_bits(prefix) })
    }
}

/// The PrefixKV kernels, loaded.
fn prefix_kernels(device: &Device) -> Result<[CudaFunction; 4]> {
    let [a, b, c, d] = PREFIX_OPS.map(|op| device.kernel(policy_id(op)));
    Ok([a?, b?, c?, d?])
}

/// The host's share of the search: row `r` keeps its `below` entries plus, in row order, its
/// `equal` entries until the total reaches `budget`.
fn split_budgets(split: &[u32], budget: usize) -> Result<Vec<u32>> {
    let below: usize = split.chunks_exact(2).map(|c| c[0] as usize).sum();
    let mut rem =
        budget.checked_sub(below).ok_or_else(|| Error::internal("more entries below the ratio than the budget"))?;
    let mut out = Vec::with_capacity(split.len() / 2);
    for c in split.chunks_exact(2) {
        let extra = (c[1] as usize).min(rem);
        rem -= extra;
        out.push(c[0] + extra as u32);
    }
    if rem != 0 {
        return Err(Error::internal("the ratio search left budget unassigned"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_fills_ties_in_row_order() {
        assert_eq!(split_budgets(&[1, 2, 0, 3, 2, 1], 6).unwrap(), vec![3, 1, 2]);
        assert_eq!(split_budgets(&[1, 0, 1, 0], 2).unwrap(), vec![1, 1]);
        assert!(split_budgets(&[3, 0], 2).is_err());
        assert!(split_budgets(&[1, 0], 2).is_err());
    }

    #[test]
    fn every_kernel_is_registered() {
        let ids: Vec<String> = kernels().iter().map(|k| k.symbol()).collect();
        assert!(ids.contains(&"ntkv_policy_prefix_keep".to_string()), "{ids:?}");
        assert_eq!(ids.len(), STEP_OPS.len() + PREFIX_OPS.len());
    }
}
