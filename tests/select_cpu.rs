//! CPU references and validation of the shared selection primitives (`ntkv::select`):
//! the rank key, a step-by-step model of the GPU radix select, top-k in both output orders,
//! top-k over segments, and the expansion of selected blocks into token lists. Runs anywhere.

mod topk_common;

use ntkv::rng::Rng;
use ntkv::select::{cpu, BlockMap, ExpandShape, SegmentShape, TopkOrder, TopkShape, MAX_K};
use ntkv::Error;
use proptest::prelude::*;
use topk_common::{brute_expand, naive_topk, spicy_row};

#[test]
fn rank_key_orders_numbers_and_puts_nan_last() {
    let vals = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-40, 2.0, f32::MAX, f32::INFINITY];
    for w in vals.windows(2) {
        let (a, b) = (cpu::rank_key(w[0]), cpu::rank_key(w[1]));
        if w[0] == w[1] {
            assert_eq!(a, b, "{} and {} must tie", w[0], w[1]);
        } else {
            assert!(a < b, "{} must rank below {}", w[0], w[1]);
        }
    }
    assert_eq!(cpu::rank_key(f32::NAN), 0);
    assert_eq!(cpu::rank_key(-f32::NAN), 0);
    assert!(cpu::rank_key(f32::NEG_INFINITY) > 0);
    let mut rng = Rng::new(1);
    for _ in 0..10_000 {
        let (a, b) = (rng.normal() * 100.0, rng.normal() * 100.0);
        assert_eq!(a < b, cpu::rank_key(a) < cpu::rank_key(b), "{a} vs {b}");
    }
}

#[test]
fn index_order_is_the_same_set_ascending() {
    let mut rng = Rng::new(21);
    for _ in 0..100 {
        let (rows, n) = (1 + rng.below(3), 1 + rng.below(400));
        let k = 1 + rng.below(n + 10);
        let scores: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
        let lengths: Vec<u32> = (0..rows).map(|_| rng.below(n + 1) as u32).collect();
        let shape = TopkShape { rows, n, k };
        let (bv, bi) = cpu::topk_ordered(&scores, &shape, Some(&lengths), TopkOrder::Value).unwrap();
        let (iv, ii) = cpu::topk_ordered(&scores, &shape, Some(&lengths), TopkOrder::Index).unwrap();
        for r in 0..rows {
            let mut want: Vec<u32> = bi[r * k..(r + 1) * k].to_vec();
            let real = want.iter().filter(|&&i| i != u32::MAX).count();
            want[..real].sort_unstable();
            assert_eq!(&ii[r * k..(r + 1) * k], &want[..]);
            for s in 0..k {
                let i = ii[r * k + s];
                let v = iv[r * k + s];
                if i == u32::MAX {
                    assert_eq!(v, f32::NEG_INFINITY);
                } else {
                    assert_eq!(v.to_bits(), scores[r * n + i as usize].to_bits());
                }
            }
            assert_eq!(bv.len(), iv.len());
        }
    }
}

#[test]
fn segments_match_per_segment_topk() {
    let mut rng = Rng::new(22);
    for case in 0..100 {
        let segments = 1 + rng.below(6);
        let lens: Vec<usize> = (0..segments).map(|_| rng.below(200)).collect();
        let max_len = lens.iter().copied().max().unwrap().max(1) + rng.below(3);
        let total: usize = lens.iter().sum();
        let indptr: Vec<u32> = std::iter::once(0)
            .chain(lens.iter().scan(0u32, |a, &l| {
                *a += l as u32;
                Some(*a)
            }))
            .collect();
        let k = 1 + rng.below(max_len + 5);
        let ks: Option<Vec<u32>> = (case % 2 == 0).then(|| (0..segments).map(|_| rng.below(k + 1) as u32).collect());
        let scores = spicy_row(&mut rng, total);
        let shape = SegmentShape { segments, total, max_len, k };
        let (v, i) = cpu::topk_segments(&scores, &shape, &indptr, ks.as_deref()).unwrap();
        for s in 0..segments {
            let seg = &scores[indptr[s] as usize..indptr[s + 1] as usize];
            let kk = ks.as_ref().map_or(k, |ks| ks[s] as usize);
            let want = naive_topk(seg, kk);
            let got = &i[s * k..(s + 1) * k];
            assert_eq!(&got[..want.len()], &want[..], "case {case} segment {s}");
            assert!(got[want.len()..].iter().all(|&x| x == u32::MAX), "case {case}: padding");
            for (slot, &g) in got.iter().enumerate() {
                let val = v[s * k + slot];
                if g == u32::MAX {
                    assert_eq!(val, f32::NEG_INFINITY);
                } else {
                    assert_eq!(val.to_bits(), seg[g as usize].to_bits());
                }
            }
        }
    }
}

#[test]
fn segment_validation_boundaries() {
    let shape = SegmentShape { segments: 2, total: 7, max_len: 4, k: 3 };
    assert!(shape.validate_indptr(&[0, 3, 7]).is_ok());
    assert!(shape.validate_indptr(&[0, 4, 7]).is_ok(), "a segment of exactly max_len");
    assert!(
        matches!(shape.validate_indptr(&[0, 2, 7]), Err(Error::InvalidArgument { arg: "indptr", .. })),
        "5 > max_len"
    );
    assert!(
        matches!(shape.validate_indptr(&[0, 3, 6]), Err(Error::InvalidArgument { arg: "indptr", .. })),
        "last != total"
    );
    assert!(matches!(shape.validate_indptr(&[1, 3, 7]), Err(Error::InvalidArgument { arg: "indptr", .. })));
    assert!(matches!(shape.validate_indptr(&[0, 8, 7]), Err(Error::InvalidArgument { arg: "indptr", .. })));
    assert!(matches!(shape.validate_indptr(&[0, 7]), Err(Error::Shape { arg: "indptr", .. })));
    assert!(shape.validate_ks(&[3, 0]).is_ok());
    assert!(matches!(shape.validate_ks(&[4, 0]), Err(Error::InvalidArgument { arg: "ks", .. })));
    assert!(matches!(shape.validate_ks(&[1]), Err(Error::Shape { arg: "ks", .. })));
    assert!(SegmentShape { total: u32::MAX as usize, ..shape }.validate().is_ok());
    assert!(matches!(SegmentShape { total: u32::MAX as usize + 1, ..shape }.validate(), Err(Error::TooLarge { .. })));
    assert!(SegmentShape { k: MAX_K, ..shape }.validate().is_ok());
    assert!(matches!(SegmentShape { k: MAX_K + 1, ..shape }.validate(), Err(Error::InvalidArgument { arg: "k", .. })));
    // An empty segment selects nothing: its row is all padding.
    let (v, i) = cpu::topk_segments(
        &[1.0f32, 2.0, 3.0],
        &SegmentShape { segments: 2, total: 3, max_len: 3, k: 2 },
        &[0, 0, 3],
        None,
    )
    .unwrap();
    assert_eq!(i, vec![u32::MAX, u32::MAX, 2, 1]);
    assert_eq!(v[..2], [f32::NEG_INFINITY; 2]);
}

fn random_blocks(rng: &mut Rng, rows: usize, kb: usize, nb: usize) -> Vec<u32> {
    (0..rows * kb)
        .map(|_| match rng.below(8) {
            0 => u32::MAX,
            1 => (nb + rng.below(3)) as u32, // out of range: selects nothing
            _ => rng.below(nb) as u32,       // repeats are likely
        })
        .collect()
}

#[test]
fn expand_fixed_blocks_matches_brute_force() {
    let mut rng = Rng::new(23);
    for case in 0..200 {
        let (rows, kb, bs) = (1 + rng.below(5), 1 + rng.below(12), 1 + rng.below(20));
        let t = 1 + rng.below(300);
        let nb = t.div_ceil(bs) + rng.below(2);
        let blocks = random_blocks(&mut rng, rows, kb, nb);
        let lengths: Vec<u32> = (0..rows).map(|_| rng.below(t + 40) as u32).collect();
        let shape = ExpandShape { rows, kb, nb, t, map: BlockMap::Fixed { block_size: bs } };
        let (indptr, idx) = cpu::expand_blocks(&shape, &blocks, &lengths, None).unwrap();
        let lens: Vec<usize> = lengths.iter().map(|&l| (l as usize).min(t)).collect();
        let want = brute_expand(rows, kb, nb, &blocks, &lens, |_, b| (b * bs, (b + 1) * bs));
        assert_eq!((indptr.clone(), idx.clone()), want, "case {case}");
        for r in 0..rows {
            let row = &idx[indptr[r] as usize..indptr[r + 1] as usize];
            assert!(row.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
            assert!(row.len() <= shape.max_tokens_per_row());
        }
        assert!(idx.len() <= shape.capacity().unwrap());
    }
}

#[test]
fn expand_ranges_matches_brute_force() {
    let mut rng = Rng::new(24);
    for case in 0..200 {
        let (rows, kb, nb, t) = (1 + rng.below(4), 1 + rng.below(10), 1 + rng.below(12), 1 + rng.below(200));
        let shared = case % 2 == 0;
        let map_rows = if shared { 1 } else { rows };
        // Overlapping, empty and reversed ranges, some past t.
        let ranges: Vec<u32> = (0..map_rows * nb)
            .flat_map(|_| {
                let s = rng.below(t + 20) as u32;
                let e = if rng.below(5) == 0 { s.saturating_sub(3) } else { s + rng.below(60) as u32 };
                [s, e]
            })
            .collect();
        let blocks = random_blocks(&mut rng, rows, kb, nb);
        let lengths: Vec<u32> = (0..rows).map(|_| rng.below(t + 10) as u32).collect();
        let shape = ExpandShape { rows, kb, nb, t, map: BlockMap::Ranges { shared } };
        let got = cpu::expand_blocks(&shape, &blocks, &lengths, Some(&ranges)).unwrap();
        let lens: Vec<usize> = lengths.iter().map(|&l| (l as usize).min(t)).collect();
        let span = |r: usize, b: usize| {
            let at = ((if shared { 0 } else { r }) * nb + b) * 2;
            (ranges[at] as usize, ranges[at + 1] as usize)
        };
        assert_eq!(got, brute_expand(rows, kb, nb, &blocks, &lens, span), "case {case}");
    }
}

#[test]
fn expand_validation_boundaries() {
    let ok = ExpandShape { rows: 2, kb: 3, nb: 4, t: 10, map: BlockMap::Fixed { block_size: 4 } };
    assert!(ok.validate().is_ok());
    assert_eq!(ok.max_tokens_per_row(), 10);
    assert_eq!(ExpandShape { kb: 2, ..ok }.max_tokens_per_row(), 8);
    assert_eq!(ok.capacity().unwrap(), 20);
    assert!(ExpandShape { kb: MAX_K, ..ok }.validate().is_ok());
    assert!(matches!(
        ExpandShape { kb: MAX_K + 1, ..ok }.validate(),
        Err(Error::InvalidArgument { arg: "blocks", .. })
    ));
    assert!(matches!(ExpandShape { kb: 0, ..ok }.validate(), Err(Error::InvalidArgument { arg: "blocks", .. })));
    assert!(matches!(ExpandShape { t: 0, ..ok }.validate(), Err(Error::InvalidArgument { arg: "lengths", .. })));
    let bad_bs = ExpandShape { map: BlockMap::Fixed { block_size: 0 }, ..ok };
    assert!(matches!(bad_bs.validate(), Err(Error::InvalidArgument { arg: "block_size", .. })));
    // The output must fit u32 offsets: exactly u32::MAX tokens is fine, one more is not.
    let r = ExpandShape { rows: 1, kb: 1, nb: 1, t: u32::MAX as usize, map: BlockMap::Ranges { shared: true } };
    assert_eq!(r.capacity().unwrap(), u32::MAX as usize);
    assert!(r.validate().is_ok());
    assert!(matches!(ExpandShape { rows: 2, ..r }.validate(), Err(Error::TooLarge { arg: "indices", .. })));
    assert!(matches!(ExpandShape { t: u32::MAX as usize + 1, ..r }.validate(), Err(Error::InvalidArgument { .. })));
    // Buffers of the wrong length, and a map given to the wrong layout.
    assert!(matches!(cpu::expand_blocks(&ok, &[0; 5], &[1, 1], None), Err(Error::Shape { arg: "blocks", .. })));
    assert!(matches!(cpu::expand_blocks(&ok, &[0; 6], &[1], None), Err(Error::Shape { arg: "lengths", .. })));
    assert!(matches!(
        cpu::expand_blocks(&ok, &[0; 6], &[1, 1], Some(&[0, 1])),
        Err(Error::InvalidArgument { arg: "ranges", .. })
    ));
    let rs = ExpandShape { map: BlockMap::Ranges { shared: false }, ..ok };
    assert!(matches!(
        cpu::expand_blocks(&rs, &[0; 6], &[1, 1], None),
        Err(Error::InvalidArgument { arg: "ranges", .. })
    ));
    assert!(matches!(
        cpu::expand_blocks(&rs, &[0; 6], &[1, 1], Some(&[0; 8])),
        Err(Error::Shape { arg: "ranges", .. })
    ));
    assert!(cpu::expand_blocks(&rs, &[0; 6], &[1, 1], Some(&[0; 16])).is_ok());
    // Quest-style: pages of 16, the last (partial) page and two others, out of order.
    let quest = ExpandShape { rows: 1, kb: 3, nb: 7, t: 100, map: BlockMap::Fixed { block_size: 16 } };
    let (indptr, idx) = cpu::expand_blocks(&quest, &[6, 0, 2], &[100], None).unwrap();
    let want: Vec<u32> = (0..16).chain(32..48).chain(96..100).collect();
    assert_eq!((indptr, idx), (vec![0, want.len() as u32], want));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn expansion_of_all_blocks_is_the_whole_row(bs in 1usize..40, t in 1usize..500, len in 0u32..600) {
        let nb = t.div_ceil(bs);
        let kb = nb.min(MAX_K);
        let shape = ExpandShape { rows: 1, kb, nb, t, map: BlockMap::Fixed { block_size: bs } };
        let blocks: Vec<u32> = (0..kb as u32).rev().collect();
        let (indptr, idx) = cpu::expand_blocks(&shape, &blocks, &[len], None).unwrap();
        let n = (len as usize).min(t);
        prop_assert_eq!(indptr, vec![0, n as u32]);
        prop_assert_eq!(idx, (0..n as u32).collect::<Vec<_>>());
    }
}

/// A step-by-step model of the GPU algorithm (the radix select of `ntkv::select`) (12-bit bucket histogram, then
/// 8-bit radix refinement of the bucket's candidates on the 44-bit rest of the composite
/// key·2^24 + (2^24 − 1 − index), then a descending sort of the selected words), so that its
/// threshold logic is checked here even without a GPU.
fn gpu_model_topk(row: &[f32], k: usize, by_index: bool) -> Vec<u32> {
    const REST: u32 = 44;
    let len = row.len();
    let kk = k.min(len);
    let mut out = vec![u32::MAX; k];
    if kk == 0 {
        return out;
    }
    let keys: Vec<u32> = row.iter().map(|&x| cpu::rank_key(x)).collect();
    let mut hist = vec![0usize; 4096];
    for &key in &keys {
        hist[(key >> 20) as usize] += 1;
    }
    // The last block's bucket search: running count from the top.
    let (mut running, mut bucket, mut above) = (0usize, usize::MAX, 0usize);
    for bin in (0..4096).rev() {
        if running < kk && running + hist[bin] >= kk {
            bucket = bin;
            above = running;
        }
        running += hist[bin];
    }
    assert_ne!(bucket, usize::MAX);
    let sel: Vec<u32> = (0..len as u32).filter(|&i| (keys[i as usize] >> 20) as usize > bucket).collect();
    let cand: Vec<u32> = (0..len as u32).filter(|&i| (keys[i as usize] >> 20) as usize == bucket).collect();
    assert_eq!(sel.len(), above);
    let rest = |i: u32| -> u64 { (u64::from(keys[i as usize] & 0xF_FFFF) << 24) | u64::from(0xFF_FFFF - i) };
    let (mut need, mut matching, mut prefix, mut bits) = (kk - above, cand.len(), 0u64, 0u32);
    assert!(need >= 1 && need <= matching);
    while need < matching && bits < REST {
        let width = (REST - bits).min(8);
        let shift = REST - bits - width;
        let mut dh = [0usize; 256];
        for &c in &cand {
            let r = rest(c);
            if bits == 0 || (r >> (REST - bits)) == prefix {
                dh[((r >> shift) & ((1 << width) - 1)) as usize] += 1;
            }
        }
        let mut above_d = 0usize;
        let mut found = false;
        for d in (0..256).rev() {
            if above_d < need && above_d + dh[d] >= need {
                need -= above_d;
                matching = dh[d];
                prefix = (prefix << width) | d as u64;
                bits += width;
                found = true;
                break;
            }
            above_d += dh[d];
        }
        assert!(found);
    }
    let threshold = prefix << (REST - bits);
    let word = |i: u32| -> u64 {
        let rev = u64::from(u32::MAX - i);
        if by_index {
            rev
        } else {
            (u64::from(keys[i as usize]) << 32) | rev
        }
    };
    let mut words: Vec<u64> = sel.iter().map(|&i| word(i)).collect();
    words.extend(cand.iter().filter(|&&c| rest(c) >= threshold).map(|&c| word(c)));
    assert_eq!(words.len(), kk, "the refinement must select exactly k");
    words.sort_unstable_by(|a, b| b.cmp(a));
    for (s, w) in words.iter().enumerate() {
        out[s] = u32::MAX - (*w & 0xFFFF_FFFF) as u32;
    }
    out
}

#[test]
fn gpu_algorithm_model_matches_reference() {
    let mut rng = Rng::new(7);
    let mut rows: Vec<Vec<f32>> = vec![
        vec![3.0; 5000],                                                    // all ties
        (0..4000).map(|i| (i % 3) as f32).collect(),                        // few distinct values
        (0..3000).map(|i| f32::from_bits(0x3f80_0000 + (i % 7))).collect(), // same 12-bit bucket
        vec![f32::NAN; 100],
    ];
    for _ in 0..30 {
        let n = 1 + rng.below(5000);
        rows.push(spicy_row(&mut rng, n));
        rows.push(rng.normal_vec(n));
    }
    for (r, row) in rows.iter().enumerate() {
        let n = row.len();
        for k in [1, 2, n / 3 + 1, n.saturating_sub(1).max(1), n, n + 7, 16384.min(n + 100)] {
            let want = cpu::topk(row, 1, n, k, None).unwrap().1;
            assert_eq!(gpu_model_topk(row, k, false), want, "row {r} (n = {n}), k = {k}");
            let mut by_index: Vec<u32> = want.iter().copied().filter(|&i| i != u32::MAX).collect();
            by_index.sort_unstable();
            by_index.resize(k, u32::MAX);
            assert_eq!(gpu_model_topk(row, k, true), by_index, "row {r}, k = {k}, by index");
        }
    }
}
