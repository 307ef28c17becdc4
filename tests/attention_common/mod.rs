//! Shared by the attention tests: random shapes and masks, and a host emulation of the
//! kernel's algorithm on a plan's work list.
#![allow(dead_code)]

use ntkv::attention::{BlockMask, HostPlan, MaskHeads, PrefillOptions, PrefillShape, NO_TOKEN_MASK};
use ntkv::rng::Rng;
use ntkv::Float;

/// Runs `f`, failing the test on a panic; returns its result (the malformed-input suites).
pub fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what} panicked"))
}

/// `f` returns an error (of any typed kind) without panicking.
pub fn errs<R: std::fmt::Debug>(what: &str, f: impl FnOnce() -> ntkv::Result<R>) -> ntkv::Error {
    match no_panic(what, f) {
        Ok(r) => panic!("{what}: expected an error, got {r:?}"),
        Err(e) => e,
    }
}

/// Random sequence lengths (0 allowed when `allow_empty`) and their cu_seqlens.
pub fn random_cu(rng: &mut Rng, batch: usize, max_len: usize, allow_empty: bool) -> Vec<u32> {
    let mut cu = vec![0u32];
    for _ in 0..batch {
        let lo = usize::from(!allow_empty);
        let len = lo + rng.below(max_len + 1 - lo);
        cu.push(cu[cu.len() - 1] + len as u32);
    }
    cu
}

/// A random block mask of roughly `density` (each block listed with that probability), with
/// token masks on about `token_frac` of the listed blocks (each bit set with probability 1/2).
pub fn random_mask(
    rng: &mut Rng,
    shape: &PrefillShape,
    br: usize,
    bc: usize,
    heads: MaskHeads,
    density: f32,
    token_frac: f32,
) -> BlockMask {
    let mh = match heads {
        MaskHeads::Shared => 1,
        MaskHeads::PerKvHead => shape.hkv,
    };
    let mut rows = Vec::new();
    for b in 0..shape.batch() {
        let n_rb = shape.seq_q(b).unwrap().div_ceil(br);
        let n_cb = shape.seq_k(b).unwrap().div_ceil(bc) as u32;
        for _ in 0..mh {
            rows.push((0..n_rb).map(|_| (0..n_cb).filter(|_| rng.uniform() < density).collect()).collect());
        }
    }
    let mut mask = BlockMask::from_lists(br, bc, heads, &rows).unwrap();
    if token_frac > 0.0 {
        let words = br * bc / 32;
        let mut ids = Vec::with_capacity(mask.indices.len());
        for _ in 0..mask.indices.len() {
            if rng.uniform() < token_frac {
                ids.push((mask.token_masks.len() / words) as u32);
                for _ in 0..words {
                    mask.token_masks.push(rng.next_u64() as u32);
                }
            } else {
                ids.push(NO_TOKEN_MASK);
            }
        }
        mask.token_mask_ids = ids;
    }
    mask
}

/// Random storage values in [-1, 1) (scaled) as `T`.
pub fn random_vec<T: Float>(rng: &mut Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(scale * rng.uniform_in(-1.0, 1.0))).collect()
}

pub fn to_f64<T: Float>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| f64::from(v.to_f32())).collect()
}

/// Emulates the kernel on the host: for every work item, walk its block list, mask as the
/// kernel does (element checks only where the plan flagged them), online softmax in f32 in
/// 64-key steps with P rounded to `T`, output rounded to `T`. Returns (o, lse) as f64.
pub fn emulate_kernel<T: Float>(plan: &HostPlan, q: &[T], k: &[T], v: &[T]) -> (Vec<f64>, Vec<f64>) {
    let split = plan.split_p(T::DTYPE);
    let s = &plan.shape();
    let (tq, hq, hkv, d) = (s.tq_total(), s.hq, s.hkv, s.head_dim);
    let (br, bc) = (plan.block_rows(), plan.block_cols());
    let scale_log2 = plan.options().scale_for(d) * std::f32::consts::LOG2_E;
    let mut o = vec![f64::NAN; tq * hq * d];
    let mut lse = vec![f64::NAN; hq * tq];
    let words_per_row = bc / 32;
    for it in plan.items().chunks_exact(8) {
        let (q_row0, n_rows, k_tok0, tk) = (it[0] as usize, it[1] as usize, it[2] as usize, it[3] as usize);
        let causal_off = it[4] as i32 as i64;
        let (lb, le, h) = (it[5] as usize, it[6] as usize, it[7] as usize);
        let kvh = h / (hq / hkv);
        for r in 0..n_rows {
            let qrow = &q[((q_row0 + r) * hq + h) * d..][..d];
            let mut m = f32::NEG_INFINITY;
            let mut l = 0f32;
            let mut acc = vec![0f32; d];
            for e in lb..le {
                let blk = &plan.blocks()[e * 4..e * 4 + 4];
                let (col, check, tmid) = (blk[0] as usize, blk[1] != 0, blk[2]);
                for sub in (0..bc).step_by(64) {
                    let mut sc = [0f32; 64];
                    for (c, x) in sc.iter_mut().enumerate() {
                        let kc = sub + c;
                        let key = col * bc + kc;
                        // Keys past tk are zero-filled in shared memory.
                        let dot: f32 = if key < tk {
                            let krow = &k[((k_tok0 + key) * hkv + kvh) * d..][..d];
                            qrow.iter().zip(krow).map(|(a, b)| a.to_f32() * b.to_f32()).sum()
                        } else {
                            0.0
                        };
                        let mut val = dot * scale_log2;
                        if check || tmid != NO_TOKEN_MASK {
                            let mut vis = key < tk;
                            if plan.options().causal {
                                vis &= key as i64 <= r as i64 + causal_off;
                            }
                            if tmid != NO_TOKEN_MASK {
                                let w = plan.token_masks()[(tmid as usize * br + r) * words_per_row + kc / 32];
                                vis &= (w >> (kc % 32)) & 1 == 1;
                            }
                            if !vis {
                                val = f32::NEG_INFINITY;
                            }
                        }
                        *x = val;
                    }
                    let mx = sc.iter().copied().fold(m, f32::max);
                    let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                    let alpha = (m - base).exp2();
                    m = mx;
                    l *= alpha;
                    acc.iter_mut().for_each(|a| *a *= alpha);
                    for (c, &x) in sc.iter().enumerate() {
                        let p = (x - base).exp2();
                        l += p;
                        let hi = T::from_f32(p).to_f32();
                        // Split P: the residual goes through a second mma in the storage dtype.
                        let pr = if split { hi + T::from_f32(p - hi).to_f32() } else { hi };
                        let key = col * bc + sub + c;
                        if key < tk && pr != 0.0 {
                            let vrow = &v[((k_tok0 + key) * hkv + kvh) * d..][..d];
                            for (a, y) in acc.iter_mut().zip(vrow) {
                                *a += pr * y.to_f32();
                            }
                        }
                    }
                }
            }
            // As the kernel: l == 0 only for a row with no visible key; a NaN l stays NaN.
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            let out = &mut o[((q_row0 + r) * hq + h) * d..][..d];
            for (y, a) in out.iter_mut().zip(&acc) {
                *y = f64::from(T::from_f32(a * inv).to_f32());
            }
            lse[h * tq + q_row0 + r] =
                if l == 0.0 { f64::NEG_INFINITY } else { f64::from((m + l.log2()) * std::f32::consts::LN_2) };
        }
    }
    (o, lse)
}

/// One differential case: shapes, options, mask.
pub struct Case {
    pub shape: PrefillShape,
    pub opts: PrefillOptions,
    pub mask: BlockMask,
}

/// q, k, v with N(0, 1) entries for `shape`.
pub fn normal_inputs<T: Float>(rng: &mut Rng, s: &PrefillShape) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (tq, tk, hq, hkv, d) = (s.tq_total(), s.tk_total(), s.hq, s.hkv, s.head_dim);
    let q: Vec<T> = (0..tq * hq * d).map(|_| T::from_f32(rng.normal())).collect();
    let k: Vec<T> = (0..tk * hkv * d).map(|_| T::from_f32(rng.normal())).collect();
    let v: Vec<T> = (0..tk * hkv * d).map(|_| T::from_f32(rng.normal())).collect();
    (q, k, v)
}

/// The GPU differential suite's random cases (the CPU suite emulates the same ones): ragged
/// batches (empty entries too), GQA groups 1, 2, 4, 8, D = 64 and 128, every block size,
/// shared and per-kv-head masks, densities 1/8 to 1, token masks, causal and not.
pub fn random_cases(seed: u64, n: usize) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|case| {
            let hkv = [1, 2, 1, 2][case % 4];
            let group = [1, 2, 4, 8][(case / 2) % 4];
            let d = [64, 128][case % 2];
            let batch = 1 + case % 3;
            let cu_q = random_cu(&mut rng, batch, 300, case % 5 == 4);
            let cu_k = if case % 3 == 0 { cu_q.clone() } else { random_cu(&mut rng, batch, 300, case % 5 == 4) };
            let shape = PrefillShape::new(hkv * group, hkv, d, cu_q, cu_k).unwrap();
            let (br, bc) = ([64, 128][(case / 2) % 2], [64, 128][(case / 4) % 2]);
            let heads = if case % 3 == 2 { MaskHeads::PerKvHead } else { MaskHeads::Shared };
            let density = [0.125, 0.25, 0.5, 1.0][case % 4];
            let token_frac = if case % 4 == 3 { 0.5 } else { 0.0 };
            let mask = random_mask(&mut rng, &shape, br, bc, heads, density, token_frac);
            let opts = PrefillOptions { causal: case % 2 == 1, ..Default::default() };
            Case { shape, opts, mask }
        })
        .collect()
}
