//! Properties of the pages CPU references: Quest metadata against a naive min/max (partial
//! last pages count only valid tokens; appends equal rebuilds), page bounds against f64,
//! selection invariants (last page kept, budgets below the kept pages, ties to the lower page,
//! GQA groups 1, 3 and 8), the deterministic exp, ShadowKV landmarks and cosines against f64,
//! planted outliers found, and the landmark selection against an f64 ranking.

mod pages_support;

use half::{bf16, f16};
use ntkv::pages::cpu::{self, exp_det, lane_sum};
use ntkv::pages::{LandmarkSelectShape, LandmarkShape, QuestMetaShape, QuestSelectShape, CHUNK_TOKENS};
use ntkv::rng::Rng;
use ntkv::Float;
use pages_support::{
    assert_csr, block_tokens, landmark_problem, lshape, qshape, quest_problem, run_cases, Case, Checks, Keys, Ty,
};

fn meta_naive<T: Float>(s: &QuestMetaShape, keys: &[T], lens: &[u32]) -> Vec<Option<(f32, f32)>> {
    let np = s.n_pages();
    let mut out: Vec<Option<(f32, f32)>> = vec![None; s.batch * s.hkv * np * s.head_dim];
    for row in 0..s.batch * s.hkv {
        let len = lens[row / s.hkv] as usize;
        for t in 0..len {
            let page = t / s.page_size;
            for c in 0..s.head_dim {
                let v = keys[(row * s.capacity + t) * s.head_dim + c].to_f32();
                let o = &mut out[(row * np + page) * s.head_dim + c];
                *o = Some(match *o {
                    None => (v, v),
                    Some((mx, mn)) => (mx.max(v), mn.min(v)),
                });
            }
        }
    }
    out
}

fn check_meta<T: Float>(seed: u64, s: QuestMetaShape) {
    let mut rng = Rng::new(seed);
    let sel = qshape(s.batch, s.hkv, s.hkv, 1, s.head_dim, s.capacity, s.page_size, 1);
    let mut p = quest_problem::<T>(&mut rng, &sel, Keys::Normal, true);
    // Tokens past each length are huge: a partial page must not see them.
    for row in 0..s.batch * s.hkv {
        for t in p.lens[row / s.hkv] as usize..s.capacity {
            for c in 0..s.head_dim {
                p.keys[(row * s.capacity + t) * s.head_dim + c] = T::from_f32(1e4);
            }
        }
    }
    let (mx, mn) = cpu::quest_meta(&s, &p.keys, &p.lens).unwrap();
    for (i, want) in meta_naive(&s, &p.keys, &p.lens).into_iter().enumerate() {
        match want {
            Some((a, b)) => assert_eq!((mx[i].to_f32(), mn[i].to_f32()), (a, b), "element {i} of {s:?}"),
            None => assert_eq!((mx[i].to_f32(), mn[i].to_f32()), (0.0, 0.0), "untouched element {i}"),
        }
    }
}

#[test]
fn quest_append_equals_rebuild() {
    let s = QuestMetaShape { batch: 3, hkv: 2, capacity: 70, head_dim: 32, page_size: 16 };
    let mut rng = Rng::new(7);
    let sel = qshape(s.batch, s.hkv, s.hkv, 1, s.head_dim, s.capacity, s.page_size, 1);
    let p = quest_problem::<f16>(&mut rng, &sel, Keys::Normal, false);
    let old: Vec<u32> = p.lens.iter().map(|&l| l / 2 + 3).map(|l| l.min(70)).collect();
    let new: Vec<u32> = old.iter().zip(&p.lens).map(|(&o, &l)| l.max(o)).collect();
    let (mut mx, mut mn) = cpu::quest_meta(&s, &p.keys, &old).unwrap();
    cpu::quest_meta_append(&s, &p.keys, &old, &new, &mut mx, &mut mn).unwrap();
    // Token by token too: every single-token append lands in a partial page.
    let (mut mx1, mut mn1) = cpu::quest_meta(&s, &p.keys, &old).unwrap();
    let mut cur = old.clone();
    while cur != new {
        let next: Vec<u32> = cur.iter().zip(&new).map(|(&c, &n)| (c + 1).min(n)).collect();
        cpu::quest_meta_append(&s, &p.keys, &cur, &next, &mut mx1, &mut mn1).unwrap();
        cur = next;
    }
    let (fx, fn_) = cpu::quest_meta(&s, &p.keys, &new).unwrap();
    assert_eq!(mx, fx);
    assert_eq!(mn, fn_);
    assert_eq!(mx1, fx);
    assert_eq!(mn1, fn_);
}

fn ub_f64<T: Float>(s: &QuestSelectShape, q: &[T], mx: &[T], mn: &[T], row: usize, page: usize) -> f64 {
    let (d, np, group) = (s.head_dim, s.meta().n_pages(), s.hq / s.hkv);
    let (b, hk) = (row / s.hkv, row % s.hkv);
    let mut best = f64::NEG_INFINITY;
    for t in 0..s.q_tokens {
        for g in 0..group {
            let qo = ((b * s.q_tokens + t) * s.hq + hk * group + g) * d;
            let m = (row * np + page) * d;
            let v: f64 = (0..d)
                .map(|c| {
                    let qv = f64::from(q[qo + c].to_f32());
                    (qv * f64::from(mx[m + c].to_f32())).max(qv * f64::from(mn[m + c].to_f32()))
                })
                .sum();
            best = best.max(v);
        }
    }
    best
}

fn check_quest<T: Float>(seed: u64, s: QuestSelectShape, keys: Keys) {
    let mut rng = Rng::new(seed);
    let p = quest_problem::<T>(&mut rng, &s, keys, true);
    let (mx, mn) = cpu::quest_meta(&s.meta(), &p.keys, &p.lens).unwrap();
    let scores = cpu::quest_scores(&s, &p.q, &mx, &mn, &p.lens).unwrap();
    let np = s.meta().n_pages();
    for row in 0..s.rows() {
        let pages = (p.lens[row / s.hkv] as usize).div_ceil(s.page_size);
        for page in 0..pages.saturating_sub(1) {
            let want = ub_f64(&s, &p.q, &mx, &mn, row, page);
            let got = f64::from(scores[row * np + page]);
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {row} page {page}: {got} vs {want}");
        }
    }
    let sel = cpu::quest_select(&s, &p.q, &mx, &mn, &p.lens).unwrap();
    assert_csr(&sel.indptr, &sel.indices, &p.lens, s.hkv);
    let k = s.budget;
    for row in 0..s.rows() {
        let len = p.lens[row / s.hkv] as usize;
        let pages = len.div_ceil(s.page_size);
        let blocks = &sel.blocks[row * k..(row + 1) * k];
        let list = &sel.indices[sel.indptr[row] as usize..sel.indptr[row + 1] as usize];
        if pages == 0 {
            assert!(blocks.iter().all(|&b| b == u32::MAX));
            assert!(list.is_empty());
            continue;
        }
        assert_eq!(blocks[k - 1] as usize, pages - 1, "the last page is kept");
        let ranked: Vec<u32> = blocks[..k - 1].iter().copied().filter(|&b| b != u32::MAX).collect();
        assert_eq!(ranked.len(), (k - 1).min(pages - 1));
        // The ranked pages are the best by score, ties to the lower page.
        let row_scores = &scores[row * np..row * np + pages - 1];
        let mut order: Vec<usize> = (0..pages - 1).collect();
        order.sort_by(|&a, &b| row_scores[b].partial_cmp(&row_scores[a]).unwrap().then(a.cmp(&b)));
        let want: Vec<u32> = order.iter().take(k - 1).map(|&x| x as u32).collect();
        assert_eq!(ranked, want, "row {row}");
        // The list is every valid token of the kept pages.
        let tokens = block_tokens(blocks, s.page_size, pages, len);
        assert_eq!(list, &tokens[..]);
        if k >= pages {
            assert_eq!(list.len(), len, "a budget of all pages keeps every token");
        }
    }
}

#[test]
fn quest_ties_go_to_lower_pages() {
    let s = qshape(1, 3, 1, 1, 16, 96, 16, 3);
    check_quest::<f16>(20, s, Keys::AllEqual);
    let mut rng = Rng::new(21);
    let p = quest_problem::<f16>(&mut rng, &s, Keys::AllEqual, false);
    let (mx, mn) = cpu::quest_meta(&s.meta(), &p.keys, &p.lens).unwrap();
    let sel = cpu::quest_select(&s, &p.q, &mx, &mn, &p.lens).unwrap();
    assert_eq!(sel.blocks, vec![0, 1, 5]);
    assert_eq!(sel.indices, (0..32).chain(80..96).collect::<Vec<u32>>());
}

#[test]
fn exp_det_is_within_two_ulp_of_exp() {
    let mut x = -87.0f32;
    while x <= 0.0 {
        let want = (f64::from(x)).exp();
        let got = f64::from(exp_det(x));
        assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}) = {got}, want {want}");
        x += 0.0137;
    }
    assert_eq!(exp_det(0.0), 1.0);
    assert_eq!(exp_det(-100.0), 0.0);
    assert!(exp_det(f32::NAN).is_nan());
    assert_eq!(exp_det(f32::INFINITY), f32::INFINITY);
}

#[test]
fn lane_sum_is_a_sum() {
    let mut rng = Rng::new(30);
    for d in [8, 24, 96, 128, 256] {
        let v = rng.normal_vec(d);
        let want: f64 = v.iter().map(|&x| f64::from(x)).sum();
        assert!((f64::from(lane_sum(d, |c| v[c])) - want).abs() < 1e-4, "d = {d}");
    }
}

fn check_landmarks<T: Float>(seed: u64, s: LandmarkShape) {
    let mut rng = Rng::new(seed);
    let sel = LandmarkSelectShape {
        batch: s.batch,
        hq: s.hkv,
        hkv: s.hkv,
        q_tokens: 1,
        head_dim: s.head_dim,
        capacity: s.capacity,
        outliers: s.outliers,
        budget: 1,
    };
    let mut p = landmark_problem::<T>(&mut rng, &sel, Keys::Normal, true);
    let nc = s.n_chunks();
    // Plant an outlier in chunk 1 of every row that has a second chunk: one key reversed.
    for row in 0..s.rows() {
        if p.lens[row / s.hkv] as usize > CHUNK_TOKENS + 2 {
            let at = (row * s.capacity + CHUNK_TOKENS + 1) * s.head_dim;
            let prev = (row * s.capacity + CHUNK_TOKENS) * s.head_dim;
            for c in 0..s.head_dim {
                p.keys[at + c] = T::from_f32(-8.0 * p.keys[prev + c].to_f32());
            }
        }
    }
    let r = cpu::landmarks(&s, &p.keys, &p.lens).unwrap();
    let d = s.head_dim;
    for row in 0..s.rows() {
        let len = p.lens[row / s.hkv] as usize;
        for chunk in 0..len.div_ceil(CHUNK_TOKENS) {
            let toks: Vec<usize> = (chunk * CHUNK_TOKENS..((chunk + 1) * CHUNK_TOKENS).min(len)).collect();
            let key = |t: usize, c: usize| f64::from(p.keys[(row * s.capacity + t) * d + c].to_f32());
            let mean: Vec<f64> =
                (0..d).map(|c| toks.iter().map(|&t| key(t, c)).sum::<f64>() / toks.len() as f64).collect();
            for (c, m) in mean.iter().enumerate() {
                let got = f64::from(r.landmarks[(row * nc + chunk) * d + c]);
                assert!((got - m).abs() <= 1e-5 * (1.0 + m.abs()), "landmark {row} {chunk} {c}");
            }
            let ln = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-8);
            let want = toks
                .iter()
                .map(|&t| {
                    let kn = (0..d).map(|c| key(t, c) * key(t, c)).sum::<f64>().sqrt().max(1e-8);
                    (0..d).map(|c| mean[c] * key(t, c)).sum::<f64>() / (ln * kn)
                })
                .fold(f64::INFINITY, f64::min);
            let got = f64::from(r.min_cos[row * nc + chunk]);
            assert!((got - want).abs() <= 1e-4, "min_cos {row} {chunk}: {got} vs {want}");
        }
        if s.outliers > 0 {
            let outs = &r.outliers[row * s.outliers..(row + 1) * s.outliers];
            let chunks = len.div_ceil(CHUNK_TOKENS);
            assert_eq!(outs.iter().filter(|&&x| x != u32::MAX).count(), s.outliers.min(chunks));
            if len > CHUNK_TOKENS + 2 {
                assert_eq!(outs[0], 1, "the planted outlier ranks first in row {row}");
            }
        }
    }
}

/// A metadata build case: Quest page bounds or ShadowKV landmarks.
#[derive(Clone, Copy)]
enum Build {
    Meta(QuestMetaShape),
    Landmarks(LandmarkShape),
}

#[test]
fn builds_match_naive_min_max_and_f64() {
    // Quest bounds against a naive min/max (partial pages); landmarks and outliers against f64.
    let meta: [fn(u64, QuestMetaShape); 3] = [check_meta::<f32>, check_meta::<f16>, check_meta::<bf16>];
    let landmarks: [fn(u64, LandmarkShape); 3] =
        [check_landmarks::<f32>, check_landmarks::<f16>, check_landmarks::<bf16>];
    let cases = [
        (Ty::F32, 1, Build::Meta(QuestMetaShape { batch: 3, hkv: 2, capacity: 37, head_dim: 16, page_size: 16 })),
        (Ty::F16, 2, Build::Meta(QuestMetaShape { batch: 2, hkv: 3, capacity: 50, head_dim: 24, page_size: 7 })),
        (Ty::Bf16, 3, Build::Meta(QuestMetaShape { batch: 2, hkv: 1, capacity: 16, head_dim: 8, page_size: 16 })),
        (Ty::F16, 4, Build::Meta(QuestMetaShape { batch: 1, hkv: 2, capacity: 5, head_dim: 128, page_size: 1 })),
        (Ty::F32, 40, Build::Landmarks(LandmarkShape { batch: 2, hkv: 2, capacity: 45, head_dim: 16, outliers: 2 })),
        (Ty::F16, 41, Build::Landmarks(LandmarkShape { batch: 3, hkv: 1, capacity: 64, head_dim: 24, outliers: 3 })),
        (Ty::Bf16, 42, Build::Landmarks(LandmarkShape { batch: 2, hkv: 3, capacity: 30, head_dim: 128, outliers: 1 })),
        (Ty::F16, 43, Build::Landmarks(LandmarkShape { batch: 2, hkv: 2, capacity: 21, head_dim: 8, outliers: 0 })),
    ];
    for (ty, seed, build) in cases {
        match build {
            Build::Meta(s) => ty.pick(meta)(seed, s),
            Build::Landmarks(s) => ty.pick(landmarks)(seed, s),
        }
    }
}

fn check_landmark_select<T: Float>(seed: u64, s: LandmarkSelectShape, keys: Keys) {
    let mut rng = Rng::new(seed);
    let p = landmark_problem::<T>(&mut rng, &s, keys, true);
    let lm = cpu::landmarks(&s.landmarks(), &p.keys, &p.lens).unwrap();
    let scores = cpu::landmark_scores(&s, &p.q, &lm.landmarks, &p.lens).unwrap();
    let sel = cpu::landmark_select(&s, &p.q, &lm.landmarks, &lm.outliers, &p.lens).unwrap();
    assert_csr(&sel.indptr, &sel.indices, &p.lens, s.hkv);
    let (d, nc, group) = (s.head_dim, s.landmarks().n_chunks(), s.hq / s.hkv);
    let stride = s.budget + s.outliers;
    for row in 0..s.rows() {
        let (b, hk) = (row / s.hkv, row % s.hkv);
        let chunks = (p.lens[b] as usize).div_ceil(CHUNK_TOKENS);
        // f64 softmax scores.
        let mut want = vec![f64::NEG_INFINITY; chunks];
        for g in 0..group {
            let mut acc = vec![0.0f64; chunks];
            for t in 0..s.q_tokens {
                let qo = ((b * s.q_tokens + t) * s.hq + hk * group + g) * d;
                let logits: Vec<f64> = (0..chunks)
                    .map(|c| {
                        (0..d)
                            .map(|x| f64::from(p.q[qo + x].to_f32()) * f64::from(lm.landmarks[(row * nc + c) * d + x]))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                for (a, l) in acc.iter_mut().zip(&logits) {
                    *a += (l - m).exp() / z;
                }
            }
            for (w, a) in want.iter_mut().zip(&acc) {
                *w = w.max(*a);
            }
        }
        for (c, w) in want.iter().enumerate() {
            let got = f64::from(scores[row * nc + c]);
            assert!((got - w).abs() <= 1e-5 * (1.0 + w), "score {row} {c}: {got} vs {w}");
        }
        let blocks = &sel.blocks[row * stride..(row + 1) * stride];
        let outs = &blocks[s.budget..];
        assert_eq!(outs, &lm.outliers[row * s.outliers..(row + 1) * s.outliers]);
        let ranked: Vec<u32> = blocks[..s.budget].iter().copied().filter(|&x| x != u32::MAX).collect();
        assert_eq!(ranked.len(), s.budget.min(chunks));
        // Non-outliers come first in ranking order.
        let non_out: Vec<usize> = (0..chunks).filter(|c| !outs.contains(&(*c as u32))).collect();
        for (i, &x) in ranked.iter().enumerate().take(non_out.len()) {
            assert!(!outs.contains(&x), "row {row}: slot {i} holds outlier {x} while non-outliers remain");
        }
        for w in ranked.windows(2).take(non_out.len().saturating_sub(1)) {
            let (a, c) = (scores[row * nc + w[0] as usize], scores[row * nc + w[1] as usize]);
            assert!(a > c || (a == c && w[0] < w[1]), "row {row}: {w:?} out of order");
        }
        let list = &sel.indices[sel.indptr[row] as usize..sel.indptr[row + 1] as usize];
        let len = p.lens[b] as usize;
        let tokens = block_tokens(blocks, CHUNK_TOKENS, chunks, len);
        assert_eq!(list, &tokens[..]);
    }
}

#[test]
fn selection_gqa_groups_and_edges() {
    // GQA 1, 3, 8; T not a page or chunk multiple; several query tokens; budgets 1, below, at
    // and above the page or chunk count; no outliers.
    let cases = [
        (Ty::F32, 10, Case::Quest(qshape(2, 2, 2, 1, 16, 53, 16, 3), Keys::Normal)),
        (Ty::F16, 11, Case::Quest(qshape(3, 6, 2, 2, 24, 100, 16, 4), Keys::Normal)),
        (Ty::Bf16, 12, Case::Quest(qshape(2, 8, 1, 3, 32, 77, 8, 100), Keys::Normal)),
        (Ty::F16, 13, Case::Quest(qshape(2, 3, 1, 1, 8, 40, 16, 1), Keys::Normal)),
        (Ty::F32, 14, Case::Quest(qshape(1, 4, 4, 1, 40, 129, 4, 2), Keys::Coarse)),
        (Ty::F32, 50, Case::Landmark(lshape(2, 2, 2, 1, 16, 61, 2, 3), Keys::Normal)),
        (Ty::F16, 51, Case::Landmark(lshape(3, 6, 2, 4, 24, 100, 1, 5), Keys::Normal)),
        (Ty::Bf16, 52, Case::Landmark(lshape(2, 8, 1, 2, 32, 77, 3, 100), Keys::Normal)),
        (Ty::F16, 53, Case::Landmark(lshape(2, 3, 1, 1, 8, 40, 0, 1), Keys::Normal)),
        (Ty::F16, 54, Case::Landmark(lshape(1, 3, 1, 1, 16, 64, 2, 2), Keys::AllEqual)),
    ];
    let quest: Checks<u64, QuestSelectShape> = [check_quest::<f32>, check_quest::<f16>, check_quest::<bf16>];
    let landmark: Checks<u64, LandmarkSelectShape> =
        [check_landmark_select::<f32>, check_landmark_select::<f16>, check_landmark_select::<bf16>];
    run_cases(&cases, quest, landmark);
}
