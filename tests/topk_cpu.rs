//! CPU reference, validation and planning of the top-k family (H2O, SnapKV). Runs anywhere.
//! The selection primitive itself (rank key, radix model, segments, expansion) is tested in
//! tests/select_cpu.rs.

mod topk_common;

use half::{bf16, f16};
use ntkv::rng::Rng;
use ntkv::topk::{
    cpu, validate_compact, validate_select, validate_topk, AttnShape, GqaReduce, TopkLayout, MAX_K, MAX_N,
    TOPK_WORKSPACE_BYTES,
};
use ntkv::Error;
use proptest::prelude::*;
use topk_common::{brute_keep, naive_topk, spicy_row};

#[test]
fn topk_matches_naive_on_random_rows_with_specials() {
    let mut rng = Rng::new(2);
    for case in 0..200 {
        let rows = 1 + rng.below(3);
        let n = 1 + rng.below(300);
        let k = 1 + rng.below(n + 20);
        let scores: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
        let lengths: Option<Vec<u32>> = (case % 2 == 0).then(|| (0..rows).map(|_| rng.below(n + 1) as u32).collect());
        let (values, indices) = cpu::topk(&scores, rows, n, k, lengths.as_deref()).unwrap();
        for r in 0..rows {
            let len = lengths.as_ref().map_or(n, |l| l[r] as usize);
            let row = &scores[r * n..r * n + len];
            let want = naive_topk(row, k);
            let got = &indices[r * k..(r + 1) * k];
            assert_eq!(&got[..want.len()], &want[..], "case {case} row {r}");
            for s in 0..k {
                if s < want.len() {
                    assert_eq!(values[r * k + s].to_bits(), row[got[s] as usize].to_bits());
                } else {
                    assert_eq!(got[s], u32::MAX, "case {case}: slot {s} past the row must be empty");
                    assert_eq!(values[r * k + s], f32::NEG_INFINITY);
                }
            }
        }
    }
}

#[test]
fn topk_edge_cases() {
    // k = 1 and k = N on a row of ties: the lowest indices win, in index order.
    let ties = vec![7.0f32; 10];
    assert_eq!(cpu::topk(&ties, 1, 10, 1, None).unwrap().1, vec![0]);
    assert_eq!(cpu::topk(&ties, 1, 10, 10, None).unwrap().1, (0..10).collect::<Vec<u32>>());
    // NaN below -inf; -0 ties +0.
    let row = [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, f32::NAN, 1.0];
    let (v, i) = cpu::topk(&row, 1, 6, 6, None).unwrap();
    assert_eq!(i, vec![5, 2, 3, 1, 0, 4]);
    assert!(v[4].is_nan() && v[5].is_nan());
    assert_eq!(v[1].to_bits(), (-0.0f32).to_bits(), "values keep their sign bits");
    // k > N and lengths: empty slots.
    let (v, i) = cpu::topk(&[1.0f32, 2.0, 3.0, 4.0], 2, 2, 3, Some(&[2, 0])).unwrap();
    assert_eq!(i, vec![1, 0, u32::MAX, u32::MAX, u32::MAX, u32::MAX]);
    assert_eq!(v[2], f32::NEG_INFINITY);
    assert!(v[3..].iter().all(|&x| x == f32::NEG_INFINITY));
    // Half types rank through f32.
    let h: Vec<f16> = [1.0f32, 3.0, 3.0, -2.0].iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(cpu::topk(&h, 1, 4, 2, None).unwrap().1, vec![1, 2]);
    let b: Vec<bf16> = [f32::NAN, -1.0, 0.5].iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(cpu::topk(&b, 1, 3, 3, None).unwrap().1, vec![2, 1, 0]);
}

#[test]
fn topk_validation_names_the_argument() {
    let is_invalid = |r: ntkv::Result<()>, name: &str| match r {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, name),
        other => panic!("expected InvalidArgument({name}), got {other:?}"),
    };
    is_invalid(validate_topk(2, 10, 0, None), "k");
    is_invalid(validate_topk(2, 100_000, MAX_K + 1, None), "k");
    is_invalid(validate_topk(2, 10, 3, Some(&[5, 11])), "lengths");
    is_invalid(validate_topk(0, 10, 3, None), "scores");
    is_invalid(validate_topk(2, 0, 3, None), "scores");
    assert!(matches!(validate_topk(2, 10, 3, Some(&[5])), Err(Error::Shape { arg: "lengths", .. })));
    assert!(matches!(validate_topk(1, MAX_N + 1, 3, None), Err(Error::TooLarge { arg: "scores", .. })));
    assert!(validate_topk(1, MAX_N, MAX_K, Some(&[MAX_N as u32])).is_ok());
    assert!(validate_topk(3, 10, 20, None).is_ok(), "k > N fills the extra slots");
    // The reference validates the same way and writes nothing.
    assert!(cpu::topk(&[1.0f32; 10], 1, 10, 0, None).is_err());
    assert!(cpu::topk(&[1.0f32; 10], 2, 5, 1, Some(&[6, 1])).is_err());
}

#[test]
fn layout_covers_every_row_and_fits_the_workspace() {
    let shapes = [
        (32, 131072, 2048),
        (256, 32768, 1024),
        (32, 1 << 20, 8192),
        (1, 1 << 20, 4096),
        (5000, 777, 1),
        (3, 5, 16384),
    ];
    for &(rows, n, k) in &shapes {
        for sms in [1usize, 108, 132] {
            for per_sm in [1usize, 3, 4] {
                let l = TopkLayout::choose(rows, n, k, sms, per_sm).unwrap();
                assert!(l.blocks_per_row >= 1 && l.chunk % 2048 == 0 && l.chunk > 0, "{l:?}");
                assert!(l.blocks_per_row * l.chunk >= n, "{l:?} does not cover {n}");
                assert!((l.blocks_per_row - 1) * l.chunk < n, "{l:?} has an empty block");
                assert!(l.kpad.is_power_of_two() && l.kpad >= k && l.kpad < 2 * k.max(1));
                assert!(l.rows_per_batch >= 1 && l.rows_per_batch <= rows.min(65535));
                // The finalize slices tile kpad; the fused path is one block per row.
                let fb = l.finalize_blocks;
                assert!(fb.is_power_of_two() && fb <= l.kpad && l.kpad % fb == 0, "{l:?}");
                assert!(l.blocks_per_row > 1 || fb == 1, "{l:?}");
                assert!(fb == 1 || (l.kpad / fb >= 256 && fb * l.rows_per_batch <= sms), "{l:?}");
                let ws = l.workspace_bytes(n, k).unwrap();
                assert!(l.rows_per_batch == 1 || ws <= TOPK_WORKSPACE_BYTES);
                // A split grid never runs more than one wave of the blocks that fit.
                if l.blocks_per_row > 1 && l.chunk > 4096 {
                    assert!(l.waves(sms, per_sm) <= 1.0, "{rows}x{n} on {sms} SMs x {per_sm}: {l:?}");
                }
            }
        }
    }
    // Few long rows: many blocks per row; many short rows: one block per row.
    assert!(TopkLayout::choose(32, 131072, 2048, 132, 3).unwrap().blocks_per_row > 1);
    assert_eq!(TopkLayout::choose(4096, 4096, 64, 132, 3).unwrap().blocks_per_row, 1);
    // The largest rows run in batches.
    assert!(TopkLayout::choose(64, MAX_N, 16, 132, 3).unwrap().rows_per_batch < 64);
}

#[test]
fn layout_uses_the_real_occupancy() {
    // The static review: on 132 SMs the histogram and filter kernels fit 3 blocks per SM,
    // not 4. The bench shapes must then fill at most one wave of 396 blocks; assuming 4
    // gave 1.3-1.4 waves.
    for (rows, n, k) in [(32usize, 131072usize, 2048usize), (32, 1 << 20, 8192), (1, 1 << 20, 4096)] {
        let l = TopkLayout::choose(rows, n, k, 132, 3).unwrap();
        let blocks = l.blocks_per_row * l.rows_per_batch;
        assert!(blocks <= 396, "{rows}x{n}: {l:?} launches {blocks} blocks");
        assert!(l.waves(132, 3) <= 1.0);
        // The old fixed assumption of 4 per SM now gives a visibly different (larger) grid.
        let four = TopkLayout::choose(rows, n, k, 132, 4).unwrap();
        assert!(four.blocks_per_row >= l.blocks_per_row, "{four:?} vs {l:?}");
        assert!(four.waves(132, 3) > l.waves(132, 3) || four == l);
    }
    assert_eq!(TopkLayout::choose(4096, 4096, 64, 132, 3).unwrap().waves(132, 3), 0.0, "the fused path");
}

#[test]
fn finalize_is_wide_on_the_bench_shapes() {
    // One finalize block per row left 100+ SMs idle; the slices give about one block per SM.
    let fin = |rows, n, k| TopkLayout::choose(rows, n, k, 132, 3).unwrap().finalize_blocks;
    assert_eq!(fin(32, 131072, 2048), 4); // 128 blocks, slices of 512
    assert_eq!(fin(32, 1 << 20, 8192), 4); // 128 blocks, slices of 2048
    assert_eq!(fin(1, 1 << 20, 4096), 16); // 16 blocks, slices of 256
    assert_eq!(fin(32, 131072, 100), 1); // kpad 128: too small to slice
    assert_eq!(fin(256, 32768, 1024), 1); // the fused path
}

/// Standard-normal f16 queries `[hq, tq, d]` and keys `[hkv, t, d]` for `shape`.
fn random_qk(seed: u64, shape: AttnShape) -> (Vec<f16>, Vec<f16>) {
    let mut rng = Rng::new(seed);
    let mut half_vec = |n: usize| (0..n).map(|_| f16::from_f32(rng.normal())).collect::<Vec<_>>();
    let q = half_vec(shape.hq * shape.tq * shape.d);
    (q, half_vec(shape.hkv * shape.t * shape.d))
}

#[test]
fn attention_mass_sums_to_the_number_of_queries() {
    let shape = AttnShape { hq: 4, hkv: 2, tq: 5, t: 37, d: 16 };
    let (q, k) = random_qk(3, shape);
    let sum = cpu::attention_mass(&q, &k, shape, GqaReduce::Sum).unwrap();
    let max = cpu::attention_mass(&q, &k, shape, GqaReduce::Max).unwrap();
    for h in 0..shape.hkv {
        let total: f64 = sum[h * shape.t..(h + 1) * shape.t].iter().sum();
        // Every query distributes mass 1; the group has 2 heads of 5 queries.
        assert!((total - 10.0).abs() < 1e-9, "head {h}: {total}");
    }
    for (s, m) in sum.iter().zip(&max) {
        assert!(*m <= *s + 1e-12 && *m >= 0.0);
    }
}

#[test]
fn attention_mass_of_equal_keys_is_causal_uniform() {
    // All-zero keys give uniform softmax over the visible prefix: query i (position t-tq+i)
    // gives 1/(pos+1) to each key j <= pos.
    let shape = AttnShape { hq: 1, hkv: 1, tq: 3, t: 6, d: 8 };
    let q: Vec<f32> = (0..24).map(|i| i as f32 * 0.1).collect();
    let k = vec![0.0f32; 48];
    let mass = cpu::attention_mass(&q, &k, shape, GqaReduce::Sum).unwrap();
    for (j, &m) in mass.iter().enumerate() {
        let want: f64 = (3..6).filter(|&pos| j <= pos).map(|pos| 1.0 / (pos as f64 + 1.0)).sum();
        assert!((m - want).abs() < 1e-12, "key {j}: {m} vs {want}");
    }
    let mut acc = vec![1.0f32; 6];
    cpu::h2o_accumulate(&q, &k, &mut acc, shape, GqaReduce::Sum).unwrap();
    assert!((acc[5] - (1.0 + 1.0 / 6.0) as f32).abs() < 1e-6);
}

#[test]
fn attn_shape_validation() {
    let ok = AttnShape { hq: 8, hkv: 2, tq: 4, t: 10, d: 64 };
    assert!(ok.validate().is_ok());
    assert!(matches!(AttnShape { hq: 6, hkv: 4, ..ok }.validate(), Err(Error::InvalidArgument { arg: "q", .. })));
    assert!(matches!(AttnShape { tq: 11, ..ok }.validate(), Err(Error::InvalidArgument { arg: "q", .. })));
    assert!(matches!(AttnShape { hkv: 0, ..ok }.validate(), Err(Error::InvalidArgument { arg: "k", .. })));
    assert!(matches!(AttnShape::from_shapes(&[8, 4, 64], &[2, 10, 32]), Err(Error::Shape { arg: "k", .. })));
    assert_eq!(AttnShape::from_shapes(&[8, 4, 64], &[2, 10, 64]).unwrap(), ok);
}

#[test]
fn h2o_select_keeps_recent_and_heavy_hitters() {
    let mut rng = Rng::new(4);
    for _ in 0..50 {
        let (hkv, t) = (1 + rng.below(3), 1 + rng.below(200));
        let recent = rng.below(t + 1);
        let budget = recent.max(1) + rng.below(t - recent.max(1) + 1);
        // Coarse values so there are ties.
        let acc: Vec<f32> = (0..hkv * t).map(|_| (rng.below(10) as f32) * 0.25).collect();
        let keep = cpu::h2o_select(&acc, hkv, t, budget, recent).unwrap();
        assert_eq!(keep.len(), hkv * budget);
        for h in 0..hkv {
            let row = &keep[h * budget..(h + 1) * budget];
            assert!(row.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
            let want = brute_keep(&acc[h * t..(h + 1) * t], t - recent, budget - recent, recent);
            assert_eq!(row, &want[..]);
        }
    }
}

#[test]
fn select_validation() {
    let name = |r: ntkv::Result<()>| match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(name(validate_select(2, 100, 10, 20, "recent")), "budget");
    assert_eq!(name(validate_select(2, 100, 101, 20, "recent")), "budget");
    assert_eq!(name(validate_select(2, 100, 50, 101, "recent")), "recent");
    assert_eq!(name(validate_select(2, 100, 0, 0, "recent")), "budget");
    assert_eq!(name(validate_select(2, 100_000, MAX_K + 65, 64, "recent")), "budget");
    assert_eq!(name(validate_select(2, 100, 10, 20, "window")), "capacity");
    assert!(validate_select(2, 100, 20, 20, "recent").is_ok());
    assert!(validate_select(2, 100_000, MAX_K + 64, 64, "recent").is_ok());
    assert!(cpu::h2o_select(&[0.0; 10], 1, 10, 3, 4).is_err());
}

#[test]
fn compaction_in_place_equals_gather() {
    let mut rng = Rng::new(5);
    let (hkv, t, d) = (3, 40, 6);
    let k0: Vec<f32> = rng.normal_vec(hkv * t * d);
    let v0: Vec<f32> = rng.normal_vec(hkv * t * d);
    let a0: Vec<f32> = rng.normal_vec(hkv * t);
    let keep = cpu::h2o_select(&a0, hkv, t, 17, 5).unwrap();
    let (mut k, mut v, mut a) = (k0.clone(), v0.clone(), a0.clone());
    cpu::h2o_compact(&keep, hkv, t, d, &mut k, &mut v, Some(&mut a)).unwrap();
    for h in 0..hkv {
        for i in 0..17 {
            let s = keep[h * 17 + i] as usize;
            assert_eq!(k[(h * t + i) * d..(h * t + i + 1) * d], k0[(h * t + s) * d..(h * t + s + 1) * d]);
            assert_eq!(v[(h * t + i) * d..(h * t + i + 1) * d], v0[(h * t + s) * d..(h * t + s + 1) * d]);
            assert_eq!(a[h * t + i], a0[h * t + s]);
        }
        // Rows past the budget are unchanged.
        assert_eq!(k[(h * t + 17) * d..(h + 1) * t * d], k0[(h * t + 17) * d..(h + 1) * t * d]);
    }
}

#[test]
fn compaction_rejects_bad_keep_and_writes_nothing() {
    let (hkv, t, d) = (2, 10, 4);
    let k0: Vec<f32> = (0..hkv * t * d).map(|i| i as f32).collect();
    let mut k = k0.clone();
    let mut v = k0.clone();
    for bad in [vec![0u32, 2, 2, 0, 1, 2], vec![0, 1, 10, 0, 1, 2], vec![3, 1, 2, 0, 1, 2]] {
        let r = cpu::h2o_compact(&bad, hkv, t, d, &mut k, &mut v, None);
        assert!(matches!(r, Err(Error::InvalidArgument { arg: "keep", .. })), "{bad:?}: {r:?}");
        assert_eq!(k, k0);
    }
    assert!(matches!(validate_compact(7, 2, 10, 4, 80, 80, None), Err(Error::Shape { arg: "keep", .. })));
    assert!(matches!(validate_compact(22, 2, 10, 4, 80, 80, None), Err(Error::InvalidArgument { arg: "keep", .. })));
    assert!(matches!(validate_compact(6, 2, 10, 4, 80, 79, None), Err(Error::Shape { arg: "v_cache", .. })));
    assert!(matches!(validate_compact(6, 2, 10, 4, 80, 80, Some(19)), Err(Error::Shape { arg: "acc", .. })));
    assert_eq!(validate_compact(6, 2, 10, 4, 80, 80, Some(20)).unwrap(), 3);
}

#[test]
fn pool5_counts_padding() {
    let x = [5.0, 10.0, 0.0, 0.0, 5.0, 0.0, 10.0];
    let p = cpu::pool5(&x, 1, 7).unwrap();
    let want = [3.0, 3.0, 4.0, 3.0, 3.0, 3.0, 3.0];
    for (a, b) in p.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{p:?}");
    }
    assert_eq!(cpu::pool5(&[5.0], 1, 1).unwrap(), vec![1.0]);
    assert!(matches!(cpu::pool5(&[5.0; 6], 1, 7), Err(Error::Shape { arg: "x", .. })));
}

#[test]
fn snapkv_select_keeps_window_and_top_pooled() {
    let shape = AttnShape { hq: 4, hkv: 2, tq: 4, t: 50, d: 16 };
    let (q, k) = random_qk(6, shape);
    let pooled = cpu::snapkv_scores(&q, &k, shape, GqaReduce::Max).unwrap();
    assert_eq!(pooled.len(), 2 * 46);
    let keep = cpu::snapkv_select(&q, &k, shape, 12, GqaReduce::Max).unwrap();
    for h in 0..2 {
        let row = &keep[h * 12..(h + 1) * 12];
        assert_eq!(row, &brute_keep(&pooled[h * 46..(h + 1) * 46], 46, 8, 4)[..]);
    }
    // capacity == window keeps only the window; capacity < window is an error.
    assert_eq!(cpu::snapkv_select_from_scores(&pooled, 2, 50, 4, 4).unwrap(), vec![46, 47, 48, 49, 46, 47, 48, 49]);
    assert!(matches!(
        cpu::snapkv_select(&q, &k, shape, 3, GqaReduce::Sum),
        Err(Error::InvalidArgument { arg: "capacity", .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn topk_is_sorted_and_exact(seed in any::<u64>(), n in 1usize..120, k in 1usize..130) {
        let mut rng = Rng::new(seed);
        let row = spicy_row(&mut rng, n);
        let (values, idx) = cpu::topk(&row, 1, n, k, None).unwrap();
        let want = naive_topk(&row, k);
        prop_assert_eq!(&idx[..want.len()], &want[..]);
        // Descending by rank key, ties ascending by index.
        for w in idx[..want.len()].windows(2) {
            let (a, b) = (cpu::rank_key(row[w[0] as usize]), cpu::rank_key(row[w[1] as usize]));
            prop_assert!(a > b || (a == b && w[0] < w[1]));
        }
        prop_assert!(values[want.len()..].iter().all(|&v| v == f32::NEG_INFINITY));
    }

    #[test]
    fn topk_half_agrees_with_f32_of_the_same_values(seed in any::<u64>(), n in 1usize..100, k in 1usize..100) {
        let mut rng = Rng::new(seed);
        let row: Vec<bf16> = spicy_row(&mut rng, n).into_iter().map(bf16::from_f32).collect();
        let wide: Vec<f32> = row.iter().map(|x| x.to_f32()).collect();
        prop_assert_eq!(cpu::topk(&row, 1, n, k, None).unwrap().1, cpu::topk(&wide, 1, n, k, None).unwrap().1);
    }
}
