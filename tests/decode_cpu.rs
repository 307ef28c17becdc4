//! Sparse-index decode on the CPU: the reference against independent formulas, validation
//! of configurations and index lists, the chunk planner, and an f32 emulation of the
//! kernel's algorithm (tiles, log2-domain online softmax, chunk split and exact merge)
//! against the reference.

mod common;

use common::arg_of;
mod decode_support;

use decode_support::{random_problem, sorted_subset, widen, Cfg, Lens, Problem};
use half::{bf16, f16};
use ntkv::decode::{
    attn_smem_bytes, chunks_of, cpu, plan_chunks, validate_lists, DecodeOptions, DecodeShape, MAX_CHUNKS,
    MIN_CHUNK_TOKENS, TILE_TOKENS,
};
use ntkv::rng::Rng;
use ntkv::{Error, Float};
use proptest::prelude::*;

// ---- the reference against independent formulas ---------------------------------------

/// Plain softmax attention over an explicit token set, with no running max: an independent
/// formula for the reference to agree with.
fn naive_row(q: &[f64], keys: &[Vec<f64>], vals: &[Vec<f64>], scale: f64) -> (Vec<f64>, f64) {
    let d = q.len();
    if keys.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let s: Vec<f64> = keys.iter().map(|k| scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()).collect();
    let e: Vec<f64> = s.iter().map(|x| x.exp()).collect();
    let z: f64 = e.iter().sum();
    let mut o = vec![0.0; d];
    for (w, v) in e.iter().zip(vals) {
        for (acc, x) in o.iter_mut().zip(v) {
            *acc += w / z * x;
        }
    }
    (o, z.ln())
}

fn check_against_naive<T: Float>(seed: u64, cfg: Cfg, lens: Lens) {
    let mut rng = Rng::new(seed);
    let p = random_problem::<T>(&mut rng, cfg, lens);
    let cfg = &p.cfg;
    let r = p.reference().unwrap();
    let (q, k, v) = (widen(&p.q), widen(&p.k), widen(&p.v));
    let (d, tcap, group) = (cfg.head_dim, cfg.capacity, cfg.group());
    for b in 0..cfg.batch {
        for t in 0..cfg.q_tokens {
            for h in 0..cfg.hq {
                let list = b * cfg.hkv + h / group;
                let row = (b * cfg.q_tokens + t) * cfg.hq + h;
                let limit = p.cache_lens[b] as i64 - cfg.q_tokens as i64 + t as i64;
                let sel: Vec<usize> = p.indices[p.indptr[list] as usize..p.indptr[list + 1] as usize]
                    .iter()
                    .map(|&i| i as usize)
                    .filter(|&i| !cfg.opts.causal || i as i64 <= limit)
                    .collect();
                let keys: Vec<Vec<f64>> = sel.iter().map(|&i| k[(list * tcap + i) * d..][..d].to_vec()).collect();
                let vals: Vec<Vec<f64>> = sel.iter().map(|&i| v[(list * tcap + i) * d..][..d].to_vec()).collect();
                let (o, lse) = naive_row(&q[row * d..][..d], &keys, &vals, f64::from(cfg.softmax_scale()));
                common::assert_close("o", &r.o[row * d..][..d], &o, 1e-12, 1e-12);
                common::assert_close("lse", &[r.lse[row]], &[lse], 1e-12, 1e-12);
            }
        }
    }
}

#[test]
fn reference_matches_naive_softmax_gqa_groups() {
    for (i, &(hq, hkv)) in [(4, 4), (4, 2), (8, 2), (8, 1)].iter().enumerate() {
        let cfg = Cfg::new(2, 3, hq, hkv, 64, 37);
        check_against_naive::<f16>(10 + i as u64, cfg.clone(), Lens::Random);
        check_against_naive::<bf16>(20 + i as u64, cfg.causal(true), Lens::Random);
    }
}

#[test]
fn reference_full_and_single_lists() {
    check_against_naive::<f16>(1, Cfg::new(2, 1, 4, 2, 128, 29), Lens::Full);
    check_against_naive::<f16>(2, Cfg::new(2, 2, 4, 2, 64, 29).causal(true), Lens::Full);
    check_against_naive::<bf16>(3, Cfg::new(1, 1, 2, 1, 64, 50), Lens::Fixed(1));
}

#[test]
fn single_index_returns_its_value_row() {
    let cfg = Cfg::new(1, 1, 2, 1, 64, 10);
    let mut rng = Rng::new(5);
    let mut p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Fixed(1));
    p.cache_lens = vec![10];
    p.indptr = vec![0, 1];
    p.indices = vec![7];
    let r = cpu::sparse_decode(&cfg, &cfg.opts, &p.q, &p.k, &p.v, &p.cache_lens, &p.indptr, &p.indices).unwrap();
    let v = widen(&p.v);
    for h in 0..2 {
        assert_eq!(&r.o[h * 64..][..64], &v[7 * 64..][..64]);
    }
    let q = widen(&p.q);
    let k = widen(&p.k);
    let s: f64 = (0..64).map(|d| q[d] * k[7 * 64 + d]).sum::<f64>() * f64::from(cfg.softmax_scale());
    assert!((r.lse[0] - s).abs() < 1e-12);
}

#[test]
fn empty_lists_and_causal_hidden_rows_give_zero_and_neg_inf() {
    // List 0 is empty; list 1 holds only the last token, which causal hides from query 0.
    let cfg = Cfg::new(1, 2, 2, 2, 64, 8).causal(true);
    let mut rng = Rng::new(6);
    let p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Random);
    let cache_lens = vec![8];
    let indptr = vec![0, 0, 1];
    let indices = vec![7];
    let r = cpu::sparse_decode(&cfg, &cfg.opts, &p.q, &p.k, &p.v, &cache_lens, &indptr, &indices).unwrap();
    // rows: (t, h) = (0,0) (0,1) (1,0) (1,1)
    for (row, visible) in [(0, false), (1, false), (2, false), (3, true)] {
        assert_eq!(r.lse[row].is_finite(), visible, "row {row}");
        if !visible {
            assert_eq!(r.lse[row], f64::NEG_INFINITY);
            assert!(r.o[row * 64..][..64].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn scale_override_is_used() {
    let mut rng = Rng::new(8);
    let cfg = Cfg::new(1, 1, 1, 1, 64, 16);
    let p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Full);
    let a = cpu::sparse_decode(&cfg, &cfg.opts, &p.q, &p.k, &p.v, &p.cache_lens, &p.indptr, &p.indices).unwrap();
    let cfg0 = cfg.clone().scale(0.0);
    let z = cpu::sparse_decode(&cfg0, &cfg0.opts, &p.q, &p.k, &p.v, &p.cache_lens, &p.indptr, &p.indices).unwrap();
    assert_ne!(a.lse, z.lse);
    // Scale 0: a uniform average of the selected value rows, lse = ln(count).
    let n = p.indptr[1] as f64;
    if n > 0.0 {
        assert!((z.lse[0] - n.ln()).abs() < 1e-12);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Attention over a list equals dense attention over the compacted cache (the selected
    /// rows gathered in order, with a full list): the mask and the gather agree bit for bit.
    #[test]
    fn list_equals_compacted_dense_cache(seed in any::<u64>(), hkv in 1usize..3, group in 1usize..3,
                                          tcap in 1usize..40, causal in any::<bool>()) {
        let mut rng = Rng::new(seed);
        let cfg = Cfg::new(1, 1, hkv * group, hkv, 64, tcap).causal(causal);
        let p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Random);
        let r = cpu::sparse_decode(&cfg, &cfg.opts, &p.q, &p.k, &p.v, &p.cache_lens, &p.indptr, &p.indices).unwrap();
        // Compacted cache with capacity = the longest list; causal off there because the
        // compacted positions differ (Tq = 1 and every index < cache_len, so causal hides
        // nothing in the original either).
        let longest = p.indptr.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0).max(1);
        let ccfg = Cfg::new(1, 1, hkv * group, hkv, 64, longest);
        let mut ck = vec![f16::ZERO; hkv * longest * 64];
        let mut cv = ck.clone();
        let mut cidx = Vec::new();
        let mut cptr = vec![0u32];
        let mut clens = 0;
        for l in 0..hkv {
            let sel = &p.indices[p.indptr[l] as usize..p.indptr[l + 1] as usize];
            for (n, &i) in sel.iter().enumerate() {
                let src = (l * tcap + i as usize) * 64;
                let dst = (l * longest + n) * 64;
                ck[dst..dst + 64].copy_from_slice(&p.k[src..src + 64]);
                cv[dst..dst + 64].copy_from_slice(&p.v[src..src + 64]);
                cidx.push(n as u32);
            }
            clens = clens.max(sel.len());
            cptr.push(cidx.len() as u32);
        }
        // One sequence: its cache length must cover every list.
        let c = cpu::sparse_decode(&ccfg, &ccfg.opts, &p.q, &ck, &cv, &[clens.max(1) as u32], &cptr, &cidx).unwrap();
        prop_assert_eq!(r.o, c.o);
        prop_assert_eq!(r.lse, c.lse);
    }

    /// The f32 emulation of the kernel's algorithm agrees with the f64 reference far inside
    /// the f16/bf16 tolerances (5e-4, 2e-3), for any split of the lists.
    #[test]
    fn kernel_algorithm_matches_reference(seed in any::<u64>(), b in 1usize..3, tq in 1usize..5,
                                          hkv in 1usize..3, gi in 0usize..4, tcap in 1usize..300,
                                          causal in any::<bool>(), chunk_tiles in 1usize..4) {
        let group = [1, 2, 4, 8][gi];
        let cfg = Cfg::new(b, tq, hkv * group, hkv, 64, tcap).causal(causal);
        let mut rng = Rng::new(seed);
        let p = random_problem::<bf16>(&mut rng, cfg.clone(), Lens::Random);
        let r = p.reference().unwrap();
        let (o, lse) = emulate_kernel(&p, chunk_tiles * TILE_TOKENS);
        let e = common::rel_l2(&o, &r.o);
        prop_assert!(e <= 1e-5, "rel L2 {e}");
        for (i, (&g, &w)) in lse.iter().zip(&r.lse).enumerate() {
            prop_assert!(g == w || (g - w).abs() <= 1e-4 * w.abs().max(1.0), "lse[{i}] {g} vs {w}");
        }
    }
}

/// The kernel's algorithm on the CPU, in f32 and in the kernel's order: per (list, chunk of
/// `chunk_tokens`, row), tiles of 64 tokens with masked scores at -inf, an online softmax in
/// log2 units (rescale alpha, running m and l), then the chunk merge.
fn emulate_kernel<T: Float>(p: &Problem<T>, chunk_tokens: usize) -> (Vec<f64>, Vec<f64>) {
    let (cfg, q, k, v) = (&p.cfg, &p.q, &p.k, &p.v);
    let (cache_lens, indptr, indices) = (&p.cache_lens, &p.indptr, &p.indices);
    let (d, tcap, group) = (cfg.head_dim, cfg.capacity, cfg.group());
    let scale_log2 = cfg.softmax_scale() * std::f32::consts::LOG2_E;
    let mut o = vec![0.0f64; cfg.q_shape().iter().product()];
    let mut lse = vec![f64::NEG_INFINITY; cfg.lse_shape().iter().product()];
    for list in 0..cfg.n_lists() {
        let (b, hk) = (list / cfg.hkv, list % cfg.hkv);
        let cache_len = cache_lens[b];
        let (ls, le) = (indptr[list] as usize, indptr[list + 1] as usize);
        let n_chunks = chunks_of(le - ls, chunk_tokens);
        for gr in 0..cfg.rows() {
            let (t, g) = (gr / group, gr % group);
            let row = (b * cfg.q_tokens + t) * cfg.hq + hk * group + g;
            let qs: Vec<f32> = q[row * d..][..d].iter().map(|x| x.to_f32() * scale_log2).collect();
            let lim = if cfg.opts.causal { cache_len as i64 - cfg.q_tokens as i64 + t as i64 } else { i64::MAX };
            let mut parts = Vec::new();
            for c in 0..n_chunks {
                let cb = (ls + c * chunk_tokens).min(le);
                let ce = (cb + chunk_tokens).min(le);
                let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
                let mut acc = vec![0.0f32; d];
                let mut tile = cb;
                while tile < ce {
                    let idx: Vec<u32> =
                        (0..TILE_TOKENS).map(|j| if tile + j < ce { indices[tile + j] } else { u32::MAX }).collect();
                    let s: Vec<f32> = idx
                        .iter()
                        .map(|&i| {
                            if i < cache_len && i64::from(i) <= lim {
                                let kr = &k[((list * tcap) + i as usize) * d..][..d];
                                qs.iter().zip(kr).fold(0.0f32, |a, (&x, &y)| x.mul_add(y.to_f32(), a))
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m_new = s.iter().fold(m, |a, &x| a.max(x));
                    let p: Vec<f32> =
                        s.iter().map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { (x - m_new).exp2() }).collect();
                    let alpha = if m == f32::NEG_INFINITY { 0.0 } else { (m - m_new).exp2() };
                    l = l * alpha + p.iter().sum::<f32>();
                    m = m_new;
                    for (dd, a) in acc.iter_mut().enumerate() {
                        let mut x = *a * alpha;
                        for (j, &i) in idx.iter().enumerate() {
                            let vv =
                                if i < cache_len { v[((list * tcap) + i as usize) * d + dd].to_f32() } else { 0.0 };
                            x = p[j].mul_add(vv, x);
                        }
                        *a = x;
                    }
                    tile += TILE_TOKENS;
                }
                parts.push((m, l, acc));
            }
            // The folding CTA's merge, in chunk order: chunks with l == 0 saw nothing; a NaN l
            // stays NaN.
            let m_max = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.0));
            let m_base = if m_max == f32::NEG_INFINITY { 0.0 } else { m_max };
            let (mut l_sum, mut a_sum) = (0.0f32, vec![0.0f32; d]);
            for (m, l, acc) in &parts {
                if *l == 0.0 {
                    continue;
                }
                let w = (m - m_base).exp2();
                l_sum = l.mul_add(w, l_sum);
                for (s, a) in a_sum.iter_mut().zip(acc) {
                    *s = a.mul_add(w, *s);
                }
            }
            for (dd, s) in a_sum.iter().enumerate() {
                o[row * d + dd] = f64::from(if l_sum == 0.0 { 0.0 } else { s / l_sum });
            }
            lse[row] = if l_sum == 0.0 {
                f64::NEG_INFINITY
            } else {
                f64::from((m_max + l_sum.log2()) * std::f32::consts::LN_2)
            };
        }
    }
    (o, lse)
}

// ---- validation -------------------------------------------------------------------------

#[test]
fn shape_errors_name_the_field_at_each_boundary() {
    let ok = DecodeShape { batch: 1, q_tokens: 1, hq: 8, hkv: 2, head_dim: 128, capacity: 100 };
    assert!(ok.validate().is_ok());
    let cases: Vec<(DecodeShape, &str)> = vec![
        (DecodeShape { batch: 0, ..ok.clone() }, "batch"),
        (DecodeShape { hq: 0, ..ok.clone() }, "hq"),
        (DecodeShape { hkv: 0, ..ok.clone() }, "hkv"),
        (DecodeShape { capacity: 0, ..ok.clone() }, "capacity"),
        (DecodeShape { q_tokens: 0, ..ok.clone() }, "q_tokens"),
        (DecodeShape { q_tokens: 17, ..ok.clone() }, "q_tokens"),
        (DecodeShape { head_dim: 96, ..ok.clone() }, "head_dim"),
        (DecodeShape { head_dim: 256, ..ok.clone() }, "head_dim"),
        (DecodeShape { hq: 9, ..ok.clone() }, "hq"),
        (DecodeShape { capacity: u32::MAX as usize + 1, ..ok.clone() }, "capacity"),
        (DecodeShape { batch: usize::MAX, ..ok.clone() }, "q"),
        (DecodeShape { batch: 1 << 40, hq: 1 << 20, hkv: 1 << 20, q_tokens: 1, ..ok.clone() }, "q"),
    ];
    for (s, arg) in cases {
        let e = s.validate().unwrap_err();
        assert_eq!(arg_of(&e), arg, "{s:?}: {e}");
    }
    // Boundaries that are fine.
    for s in [
        DecodeShape { q_tokens: 16, ..ok.clone() },
        DecodeShape { head_dim: 64, ..ok.clone() },
        DecodeShape { capacity: u32::MAX as usize, ..ok.clone() },
    ] {
        assert!(s.validate().is_ok(), "{s:?}");
    }
}

#[test]
fn option_errors_name_the_field_at_each_boundary() {
    for (o, arg) in [
        (DecodeOptions { scale: Some(f32::NAN), ..Default::default() }, "scale"),
        (DecodeOptions { scale: Some(f32::INFINITY), ..Default::default() }, "scale"),
        (DecodeOptions { chunk_tokens: Some(0), ..Default::default() }, "chunk_tokens"),
        (DecodeOptions { chunk_tokens: Some(48), ..Default::default() }, "chunk_tokens"),
        (DecodeOptions { chunk_tokens: Some(1 << 40), ..Default::default() }, "chunk_tokens"),
    ] {
        assert_eq!(arg_of(&o.validate().unwrap_err()), arg);
    }
    assert!(DecodeOptions { chunk_tokens: Some(64), scale: Some(0.0), causal: true }.validate().is_ok());
}

fn list_err(cache_lens: &[u32], indptr: &[u32], indices: &[u32]) -> Error {
    let cfg = Cfg::new(2, 1, 2, 2, 64, 16);
    validate_lists(&cfg, cache_lens, indptr, indices).unwrap_err()
}

#[test]
fn malformed_lists_are_errors() {
    let good = (vec![16u32, 10], vec![0u32, 2, 2, 3, 5], vec![1u32, 5, 9, 0, 9]);
    let cfg = Cfg::new(2, 1, 2, 2, 64, 16);
    validate_lists(&cfg, &good.0, &good.1, &good.2).unwrap();
    // A longer indices buffer is fine (the tail is unused).
    validate_lists(&cfg, &good.0, &good.1, &[1, 5, 9, 0, 9, 77]).unwrap();

    // cache_lens
    assert_eq!(arg_of(&list_err(&[16], &good.1, &good.2)), "cache_lens");
    assert_eq!(arg_of(&list_err(&[17, 10], &good.1, &good.2)), "cache_lens");
    // indptr
    assert_eq!(arg_of(&list_err(&good.0, &[0, 2, 2, 3], &good.2)), "indptr");
    assert_eq!(arg_of(&list_err(&good.0, &[1, 2, 2, 3, 5], &good.2)), "indptr");
    assert_eq!(arg_of(&list_err(&good.0, &[0, 2, 1, 3, 5], &good.2)), "indptr");
    assert_eq!(arg_of(&list_err(&good.0, &[0, 2, 2, 3, 6], &good.2)), "indptr");
    // a list longer than its sequence's cache
    let long: Vec<u32> = (0..11).collect();
    assert_eq!(arg_of(&list_err(&good.0, &[0, 0, 0, 11, 11], &long)), "indptr");

    // indices: unsorted, duplicate, out of range (>= cache_lens[b] but < capacity), and the
    // message names list, entry and value.
    let e = list_err(&good.0, &good.1, &[5, 1, 9, 0, 9]);
    assert_eq!(arg_of(&e), "indices");
    assert!(e.to_string().contains("list 0 (sequence 0, kv head 0), entry 1 (indices[1]): index 1 is below"), "{e}");
    let e = list_err(&good.0, &good.1, &[1, 5, 9, 9, 9]);
    assert!(e.to_string().contains("list 3 (sequence 1, kv head 1), entry 1 (indices[4]): index 9 repeats"), "{e}");
    let e = list_err(&good.0, &good.1, &[1, 5, 9, 0, 12]);
    assert!(e.to_string().contains("index 12 is not below cache_lens[1] = 10"), "{e}");
    // Out of range is reported before order at the same entry; the lowest position wins.
    let e = list_err(&good.0, &good.1, &[1, 16, 9, 0, 3]);
    assert!(e.to_string().contains("indices[1]): index 16 is not below cache_lens[0] = 16"), "{e}");
    // Empty lists before the bad entry are skipped when naming the list.
    let e = list_err(&good.0, &[0, 0, 0, 0, 2], &[3, 3]);
    assert!(e.to_string().contains("list 3 (sequence 1, kv head 1), entry 1 (indices[1])"), "{e}");
}

#[test]
fn reference_rejects_bad_inputs() {
    let cfg = Cfg::new(1, 1, 2, 1, 64, 8);
    let q = vec![f16::ZERO; 2 * 64];
    let kv = vec![f16::ZERO; 8 * 64];
    let e = cpu::sparse_decode(&cfg, &cfg.opts, &q[1..], &kv, &kv, &[8], &[0, 1], &[3]).unwrap_err();
    assert_eq!(arg_of(&e), "q");
    let e = cpu::sparse_decode(&cfg, &cfg.opts, &q, &kv, &kv[1..], &[8], &[0, 1], &[3]).unwrap_err();
    assert_eq!(arg_of(&e), "v");
    let e = cpu::sparse_decode(&cfg, &cfg.opts, &q, &kv, &kv, &[8], &[0, 1], &[8]).unwrap_err();
    assert_eq!(arg_of(&e), "indices");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Any corruption of a valid list (swap two entries, duplicate one, push one past the
    /// cache) is caught, and valid random lists always pass.
    #[test]
    fn corrupted_lists_are_caught(seed in any::<u64>(), kind in 0usize..3) {
        let mut rng = Rng::new(seed);
        let cfg = Cfg::new(2, 1, 4, 2, 64, 50);
        let cache_lens = vec![50u32, 30];
        let (indptr, mut indices) = decode_support::random_lists(&mut rng, &cfg, &cache_lens, decode_support::Lens::Random);
        prop_assert!(validate_lists(&cfg, &cache_lens, &indptr, &indices).is_ok());
        let lists: Vec<usize> = (0..4).filter(|&l| indptr[l + 1] - indptr[l] >= 2).collect();
        prop_assume!(!lists.is_empty());
        let l = lists[rng.below(lists.len())];
        let (s, e) = (indptr[l] as usize, indptr[l + 1] as usize);
        let j = s + 1 + rng.below(e - s - 1);
        match kind {
            0 => indices.swap(j - 1, j),
            1 => indices[j] = indices[j - 1],
            _ => indices[e - 1] = cache_lens[l / 2] + rng.below(5) as u32,
        }
        let err = validate_lists(&cfg, &cache_lens, &indptr, &indices).unwrap_err();
        prop_assert_eq!(arg_of(&err), "indices");
    }
}

// ---- planning -----------------------------------------------------------------------------

#[test]
fn chunk_plan_fills_the_gpu() {
    // ANCHORS shape: 32 lists of 2048 tokens, one query row per list, 132 SMs: 8 chunks of
    // 256 tokens per list = 256 CTAs, one wave of the ~264 resident slots.
    let p = plan_chunks(&[2048; 32], 1, 132, None);
    assert_eq!((p.chunk_tokens, p.max_chunks, p.busy_ctas), (256, 8, 256));
    assert!(!p.direct());
    // Full 128k cache: many waves of equal chunks.
    let p = plan_chunks(&[131072; 32], 1, 132, None);
    assert_eq!(p.chunk_tokens % TILE_TOKENS, 0);
    assert!(p.busy_ctas >= 8 * 264 * 9 / 10, "{p:?}");
    // Short lists stay whole: no merge.
    let p = plan_chunks(&[100, 0, 3], 8, 132, None);
    assert!(p.direct());
    assert_eq!(p.chunk_tokens, MIN_CHUNK_TOKENS);
    // Empty lists still get one chunk (which writes the empty result).
    assert_eq!(plan_chunks(&[0, 0], 1, 132, None).max_chunks, 1);
    // Forced chunking.
    let p = plan_chunks(&[1000, 64, 0], 20, 132, Some(64));
    assert_eq!((p.chunk_tokens, p.max_chunks, p.busy_ctas), (64, 16, (16 + 1 + 1) * 2));
}

proptest! {
    #[test]
    fn chunk_plan_invariants(lens in proptest::collection::vec(0usize..2_000_000, 1..64), rows in 1usize..129,
                             sms in 1usize..200) {
        let p = plan_chunks(&lens, rows, sms, None);
        prop_assert_eq!(p.chunk_tokens % TILE_TOKENS, 0);
        prop_assert!(p.chunk_tokens >= MIN_CHUNK_TOKENS);
        prop_assert!(p.max_chunks >= 1 && p.max_chunks <= MAX_CHUNKS);
        let max = lens.iter().copied().max().unwrap_or(0);
        prop_assert_eq!(p.max_chunks, chunks_of(max, p.chunk_tokens));
        // The same input gives the same plan (determinism of the split).
        prop_assert_eq!(p, plan_chunks(&lens, rows, sms, None));
    }
}

#[test]
fn shared_memory_matches_the_kernel_formula() {
    // cuda/decode.cu attn_smem_bytes: q 16*D*4, scores 16*64*4, 3 row arrays, limits 16*8,
    // 2 index buffers, 2 stages of K and V at (D + 8) halves per row.
    assert_eq!(attn_smem_bytes(128), 8192 + 4096 + 192 + 128 + 512 + 69632);
    assert_eq!(attn_smem_bytes(64), 4096 + 4096 + 192 + 128 + 512 + 36864);
    // Two CTAs fit one H200 SM (228 KiB) at D = 128.
    assert!(2 * attn_smem_bytes(128) <= 227 * 1024);
}

#[test]
fn sorted_subset_is_sorted_and_exact() {
    let mut rng = Rng::new(3);
    for n in [0usize, 1, 7, 100] {
        for len in [0usize, 1, n / 2, n] {
            let s = sorted_subset(&mut rng, n, len);
            assert_eq!(s.len(), len.min(n));
            assert!(s.windows(2).all(|w| w[0] < w[1]));
            assert!(s.iter().all(|&i| (i as usize) < n));
        }
    }
}

// ---- the NaN contract ---------------------------------------------------------------------

/// A problem with a NaN in q of row (t 0, head 0) and in k of the last token (visible, with
/// causal, only to query t = 1), and one in v of token 10 at d = 5. Full lists, cache 300.
fn nan_problem(cfg: Cfg) -> Problem<f16> {
    let mut rng = Rng::new(77);
    let mut p = random_problem::<f16>(&mut rng, cfg, Lens::Full);
    p.cache_lens = vec![300];
    let (indptr, indices) = decode_support::random_lists(&mut rng, &p.cfg, &p.cache_lens, Lens::Full);
    (p.indptr, p.indices) = (indptr, indices);
    p.q[3] = f16::NAN;
    p.k[299 * 64 + 9] = f16::NAN;
    p.v[10 * 64 + 5] = f16::NAN;
    p
}

/// Rows (t, h) = (0, 0), (0, 1), (1, 0), (1, 1): which must be NaN (o and lse) under the
/// contract, and o[d = 5] of every row is NaN (v of a visible token).
fn check_nan_rows(what: &str, o: &[f64], lse: &[f64]) {
    for (row, nan) in [(0, true), (1, false), (2, true), (3, true)] {
        assert_eq!(lse[row].is_nan(), nan, "{what}: lse of row {row}");
        for d in 0..64 {
            assert_eq!(o[row * 64 + d].is_nan(), nan || d == 5, "{what}: o of row {row}, d {d}");
        }
    }
}

#[test]
fn nan_inputs_make_their_rows_nan_not_empty() {
    let cfg = Cfg::new(1, 2, 2, 1, 64, 300).causal(true);
    let p = nan_problem(cfg.clone());
    let r = p.reference().unwrap();
    check_nan_rows("reference", &r.o, &r.lse);
    // The kernel's algorithm, unsplit (one chunk) and split (the merge carries the NaN).
    for chunk in [320, 64] {
        let (o, lse) = emulate_kernel(&p, chunk);
        check_nan_rows(&format!("emulation, chunk {chunk}"), &o, &lse);
    }
    // A row whose every score is NaN (NaN in q) is NaN, not the empty row, in a chunk of its own.
    let cfg1 = Cfg::new(1, 1, 1, 1, 64, 300);
    let mut p1 = nan_problem(cfg1.clone());
    p1.k[299 * 64 + 9] = f16::ZERO;
    p1.v[10 * 64 + 5] = f16::ZERO;
    let r1 = p1.reference().unwrap();
    assert!(r1.lse[0].is_nan() && r1.o.iter().all(|x| x.is_nan()));
    for chunk in [320, 64] {
        let (o, lse) = emulate_kernel(&p1, chunk);
        assert!(lse[0].is_nan() && o.iter().all(|x| x.is_nan()), "chunk {chunk}");
    }
}
