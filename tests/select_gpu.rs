//! Differential tests of the shared selection primitives (`ntkv::select`): GPU against the
//! CPU reference, indices and value bits exactly equal. Without a GPU every test prints SKIP
//! (NTKV_REQUIRE_GPU=1 makes that a failure).

mod common;
mod topk_common;

use half::{bf16, f16};
use ntkv::rng::Rng;
use ntkv::select::{
    cpu, BlockMap, ExpandPlan, ExpandShape, SegmentShape, SegmentTopkPlan, TopkOptions, TopkOrder, TopkPlan, TopkShape,
};
use ntkv::{Device, DeviceTensor, Error, Float};
use topk_common::{same_values, spicy_row};

fn check_rows<T: Float>(dev: &Device, host: &[f32], shape: TopkShape, lengths: Option<&[u32]>, order: TopkOrder) {
    let scores: Vec<T> = host.iter().map(|&x| T::from_f32(x)).collect();
    let (want_v, want_i) = cpu::topk_ordered(&scores, &shape, lengths, order).unwrap();
    let d = DeviceTensor::from_host(dev, &scores, &[shape.rows, shape.n]).unwrap();
    let mut plan = TopkPlan::new(dev, &shape, TopkOptions { order }).unwrap();
    let mut v = DeviceTensor::<T>::zeros(dev, &[shape.rows, shape.k]).unwrap();
    let mut i = DeviceTensor::<u32>::zeros(dev, &[shape.rows, shape.k]).unwrap();
    plan.run(&d, lengths, &mut v, &mut i).unwrap();
    assert_eq!(i.to_host().unwrap(), want_i, "{shape:?} {order:?} {}", T::DTYPE);
    same_values(&format!("{shape:?} {order:?}"), &v.to_host().unwrap(), &want_v);
}

#[test]
fn rows_in_index_order_match_reference() {
    let dev = gpu_or_skip!("rows_in_index_order_match_reference");
    let mut rng = Rng::new(31);
    // Fused (many rows) and split (few long rows) layouts.
    for (rows, n, k) in [(300usize, 3001usize, 100usize), (3, 200_003, 4000), (2, 70_000, 16384)] {
        let host: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
        let lengths: Vec<u32> = (0..rows).map(|_| rng.below(n + 1) as u32).collect();
        let shape = TopkShape { rows, n, k };
        check_rows::<f32>(dev, &host, shape, None, TopkOrder::Index);
        check_rows::<bf16>(dev, &host, shape, Some(&lengths), TopkOrder::Index);
        check_rows::<f16>(dev, &host, shape, Some(&lengths), TopkOrder::Value);
    }
}

fn check_segments<T: Float>(dev: &Device, lens: &[usize], k: usize, with_ks: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let segments = lens.len();
    let total: usize = lens.iter().sum();
    let max_len = lens.iter().copied().max().unwrap_or(1).max(1);
    let mut indptr = vec![0u32];
    for &l in lens {
        indptr.push(indptr.last().unwrap() + l as u32);
    }
    let ks: Option<Vec<u32>> = with_ks.then(|| (0..segments).map(|_| rng.below(k + 1) as u32).collect());
    let scores: Vec<T> = spicy_row(&mut rng, total).into_iter().map(T::from_f32).collect();
    let shape = SegmentShape { segments, total, max_len, k };
    let (want_v, want_i) = cpu::topk_segments(&scores, &shape, &indptr, ks.as_deref()).unwrap();
    let d = DeviceTensor::from_host(dev, &scores, &[total]).unwrap();
    let mut plan = SegmentTopkPlan::<T>::new(dev, &shape).unwrap();
    let mut v = DeviceTensor::<T>::zeros(dev, &[segments, k]).unwrap();
    let mut i = DeviceTensor::<u32>::zeros(dev, &[segments, k]).unwrap();
    for rep in 0..2 {
        plan.run(&d, &indptr, ks.as_deref(), &mut v, &mut i).unwrap();
        assert_eq!(i.to_host().unwrap(), want_i, "segments {lens:?} k {k} ks {ks:?} rep {rep}");
        same_values("segments", &v.to_host().unwrap(), &want_v);
    }
}

#[test]
fn segments_match_reference() {
    let dev = gpu_or_skip!("segments_match_reference");
    let mut rng = Rng::new(32);
    for case in 0..12u64 {
        let segments = 1 + rng.below(300);
        let lens: Vec<usize> = (0..segments).map(|_| rng.below(if case % 3 == 0 { 50_000 } else { 3000 })).collect();
        let k = 1 + rng.below(2000);
        match case % 3 {
            0 => check_segments::<f32>(dev, &lens, k, case % 2 == 0, case),
            1 => check_segments::<f16>(dev, &lens, k, case % 2 == 0, case),
            _ => check_segments::<bf16>(dev, &lens, k, case % 2 == 0, case),
        }
    }
    // Empty segments and a single long one (the split layout).
    check_segments::<f32>(dev, &[0, 5, 0, 1_000_000, 0], 3000, true, 99);
}

#[test]
fn segments_reject_bad_indptr_and_write_nothing() {
    let dev = gpu_or_skip!("segments_reject_bad_indptr_and_write_nothing");
    let shape = SegmentShape { segments: 2, total: 10, max_len: 6, k: 2 };
    let mut plan = SegmentTopkPlan::<f32>::new(dev, &shape).unwrap();
    let d = DeviceTensor::from_host(dev, &[1.0f32; 10], &[10]).unwrap();
    let mut v = DeviceTensor::from_host(dev, &[7.0f32; 4], &[2, 2]).unwrap();
    let mut i = DeviceTensor::from_host(dev, &[7u32; 4], &[2, 2]).unwrap();
    for bad in [&[0u32, 3, 9][..], &[0, 2, 10], &[0, 11, 10], &[0, 10]] {
        assert!(plan.run(&d, bad, None, &mut v, &mut i).is_err(), "{bad:?}");
    }
    assert!(matches!(
        plan.run(&d, &[0, 5, 10], Some(&[3, 0]), &mut v, &mut i),
        Err(Error::InvalidArgument { arg: "ks", .. })
    ));
    assert_eq!(i.to_host().unwrap(), vec![7; 4]);
    assert_eq!(v.to_host().unwrap(), vec![7.0; 4]);
}

fn check_expand(dev: &Device, shape: ExpandShape, blocks: &[u32], lengths: &[u32], ranges: Option<&[u32]>) {
    let (want_ptr, want_idx) = cpu::expand_blocks(&shape, blocks, lengths, ranges).unwrap();
    let mut plan = ExpandPlan::new(dev, &shape).unwrap();
    let db = DeviceTensor::from_host(dev, blocks, &[shape.rows, shape.kb]).unwrap();
    let dl = DeviceTensor::from_host(dev, lengths, &[shape.rows]).unwrap();
    let cap = shape.capacity().unwrap();
    let sentinel = 0xdead_beefu32;
    let mut ptr = DeviceTensor::<u32>::zeros(dev, &[shape.rows + 1]).unwrap();
    let mut idx = DeviceTensor::from_host(dev, &vec![sentinel; cap + 3], &[cap + 3]).unwrap();
    match (ranges, shape.ranges_shape()) {
        (Some(r), Some(rs)) => {
            let dr = DeviceTensor::from_host(dev, r, &rs).unwrap();
            plan.run_ranges(&db, &dr, &dl, &mut ptr, &mut idx).unwrap();
        }
        _ => plan.run(&db, &dl, &mut ptr, &mut idx).unwrap(),
    }
    let got_ptr = ptr.to_host().unwrap();
    let got_idx = idx.to_host().unwrap();
    assert_eq!(got_ptr, want_ptr, "{shape:?}");
    let n = want_idx.len();
    assert_eq!(got_idx[..n], want_idx[..], "{shape:?}");
    assert!(got_idx[n..].iter().all(|&x| x == sentinel), "entries past indptr[rows] are left as they were");
}

fn random_blocks(rng: &mut Rng, rows: usize, kb: usize, nb: usize) -> Vec<u32> {
    (0..rows * kb).map(|_| if rng.below(8) == 0 { u32::MAX } else { rng.below(nb + 1) as u32 }).collect()
}

#[test]
fn expand_matches_reference() {
    let dev = gpu_or_skip!("expand_matches_reference");
    let mut rng = Rng::new(33);
    for case in 0..16 {
        let (rows, t) = (1 + rng.below(200), 1 + rng.below(70_000));
        let kb = 1 + rng.below(if case % 4 == 0 { 5000 } else { 64 });
        let lengths: Vec<u32> = (0..rows).map(|_| rng.below(t + 100) as u32).collect();
        if case % 2 == 0 {
            let bs = [1usize, 8, 16, 64][case % 4 / 2 + 2 * (case % 3 == 0) as usize];
            let nb = t.div_ceil(bs);
            let shape = ExpandShape { rows, kb, nb, t, map: BlockMap::Fixed { block_size: bs } };
            if shape.capacity().is_err() {
                continue;
            }
            check_expand(dev, shape, &random_blocks(&mut rng, rows, kb, nb), &lengths, None);
        } else {
            let shared = case % 4 == 1;
            let nb = 1 + rng.below(500);
            let map_rows = if shared { 1 } else { rows };
            let ranges: Vec<u32> = (0..map_rows * nb)
                .flat_map(|_| {
                    let s = rng.below(t) as u32;
                    [s, s + rng.below(300) as u32]
                })
                .collect();
            let shape = ExpandShape { rows, kb, nb, t, map: BlockMap::Ranges { shared } };
            if shape.capacity().is_err() {
                continue;
            }
            check_expand(dev, shape, &random_blocks(&mut rng, rows, kb, nb), &lengths, Some(&ranges));
        }
    }
}

#[test]
fn expand_feeds_on_a_topk_of_pages() {
    // Quest-style: top-4 of 64 page scores per row, expanded with pages of 16 tokens.
    let dev = gpu_or_skip!("expand_feeds_on_a_topk_of_pages");
    let mut rng = Rng::new(34);
    let (rows, pages, k, bs, t) = (8usize, 64usize, 4usize, 16usize, 1000usize);
    let page_scores: Vec<f32> = (0..rows * pages).map(|_| rng.normal()).collect();
    let d = DeviceTensor::from_host(dev, &page_scores, &[rows, pages]).unwrap();
    let (_, sel) = ntkv::topk::topk(dev, &d, k, None).unwrap();
    let lengths = vec![t as u32; rows];
    let shape = ExpandShape { rows, kb: k, nb: pages, t, map: BlockMap::Fixed { block_size: bs } };
    check_expand(dev, shape, &sel.to_host().unwrap(), &lengths, None);
}
