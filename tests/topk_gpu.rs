//! Differential tests of the top-k family: GPU against the CPU reference.
//! Top-k and selection indices must be exactly equal; attention masses within tolerance.
//! Without a GPU every test prints SKIP (NTKV_REQUIRE_GPU=1 makes that a failure).

mod common;
mod topk_common;

use half::{bf16, f16};
use ntkv::rng::Rng;
use ntkv::topk::{self, cpu, AttnShape, GqaReduce, H2oOptions, H2oPlan, TopkOptions, TopkPlan, TopkShape};
use ntkv::{Device, DeviceTensor, Error, Float, TensorRef, TensorView, TensorViewMut};
use topk_common::{same_values, spicy_row};

fn plan(dev: &Device, rows: usize, n: usize, k: usize) -> TopkPlan {
    TopkPlan::new(dev, &TopkShape { rows, n, k }, TopkOptions::default()).unwrap()
}

/// Runs the GPU top-k and the CPU reference and requires identical indices and value bits.
fn check_topk<T: Float>(
    dev: &Device,
    host: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    lengths: Option<&[u32]>,
    what: &str,
) {
    let scores: Vec<T> = host.iter().map(|&x| T::from_f32(x)).collect();
    let (want_v, want_i) = cpu::topk(&scores, rows, n, k, lengths).unwrap();
    let d = DeviceTensor::from_host(dev, &scores, &[rows, n]).unwrap();
    let (gv, gi) = topk::topk(dev, &d, k, lengths).unwrap();
    let (gv, gi) = (gv.to_host().unwrap(), gi.to_host().unwrap());
    if let Some(p) = gi.iter().zip(&want_i).position(|(a, b)| a != b) {
        panic!(
            "{what} ({}, rows {rows}, n {n}, k {k}): index slot {p} (row {}, slot {}) got {} want {}",
            T::DTYPE,
            p / k,
            p % k,
            gi[p],
            want_i[p]
        );
    }
    same_values(what, &gv, &want_v);
}

#[test]
fn topk_random_shapes_all_dtypes() {
    let dev = gpu_or_skip!("topk_random_shapes_all_dtypes");
    let mut rng = Rng::new(11);
    for case in 0..24 {
        let rows = 1 + rng.below(6);
        let n = 1 + rng.below(if case % 4 == 0 { 300_000 } else { 20_000 });
        let k = match case % 5 {
            0 => 1,
            1 => n.min(16384),
            2 => (n + 1 + rng.below(50)).min(16384),
            _ => 1 + rng.below(n.min(4000)),
        };
        let host: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
        let lengths: Option<Vec<u32>> = (case % 3 == 0).then(|| (0..rows).map(|_| rng.below(n + 1) as u32).collect());
        let l = lengths.as_deref();
        match case % 3 {
            0 => check_topk::<f32>(dev, &host, rows, n, k, l, &format!("case {case}")),
            1 => check_topk::<f16>(dev, &host, rows, n, k, l, &format!("case {case}")),
            _ => check_topk::<bf16>(dev, &host, rows, n, k, l, &format!("case {case}")),
        }
    }
}

#[test]
fn topk_special_rows() {
    let dev = gpu_or_skip!("topk_special_rows");
    let n = 10_007;
    // Rows full of ties, of NaN, a mix of ±inf and NaN, ±0, and a few distinct values.
    let mut host = vec![1.25f32; n];
    host.extend(vec![f32::NAN; n]);
    host.extend((0..n).map(|i| [f32::INFINITY, f32::NAN, f32::NEG_INFINITY, 2.0][i % 4]));
    host.extend((0..n).map(|i| if i % 2 == 0 { 0.0 } else { -0.0 }));
    host.extend((0..n).map(|i| (i % 5) as f32));
    let rows = 5;
    for k in [1, 2, 100, 4999, n, 16384] {
        check_topk::<f32>(dev, &host, rows, n, k, None, "special rows");
        check_topk::<bf16>(dev, &host, rows, n, k, None, "special rows");
    }
    check_topk::<f32>(dev, &host, rows, n, 777, Some(&[0, 1, 776, 778, n as u32]), "special rows, lengths");

    // The same patterns on enough rows for the fused one-block-per-row path (more candidates
    // than the shared-memory stage holds in the all-ties rows).
    let (rows, n) = (160, 9001);
    assert_eq!(plan(dev, rows, n, 100).layout().blocks_per_row, 1);
    let pattern = |r: usize, i: usize| -> f32 {
        match r % 5 {
            0 => 1.25,
            1 => f32::NAN,
            2 => [f32::INFINITY, f32::NAN, f32::NEG_INFINITY, 2.0][i % 4],
            3 => {
                if i % 2 == 0 {
                    0.0
                } else {
                    -0.0
                }
            }
            _ => (i % 5) as f32,
        }
    };
    let host: Vec<f32> = (0..rows * n).map(|e| pattern(e / n, e % n)).collect();
    let lengths: Vec<u32> = (0..rows).map(|r| ((r * 37) % (n + 1)) as u32).collect();
    for k in [1, 100, 9000, 9001, 12000] {
        check_topk::<f32>(dev, &host, rows, n, k, None, "fused special rows");
        check_topk::<f16>(dev, &host, rows, n, k, Some(&lengths), "fused special rows, lengths");
    }
}

#[test]
fn topk_one_block_and_many_block_paths() {
    let dev = gpu_or_skip!("topk_one_block_and_many_block_paths");
    let mut rng = Rng::new(12);
    // Many short rows: one block per row.
    let (rows, n) = (700, 3001);
    assert_eq!(plan(dev, rows, n, 64).layout().blocks_per_row, 1);
    let host: Vec<f32> = (0..rows * n).map(|_| rng.normal()).collect();
    check_topk::<f32>(dev, &host, rows, n, 64, None, "one block per row");
    // Few long rows: many blocks per row.
    let (rows, n) = (3, 1_000_003);
    assert!(plan(dev, rows, n, 8192).layout().blocks_per_row > 1);
    let host: Vec<f32> = (0..rows * n).map(|_| rng.normal()).collect();
    check_topk::<f32>(dev, &host, rows, n, 8192, None, "many blocks per row");
    check_topk::<f16>(dev, &host, rows, n, 3000, None, "many blocks per row");
    // Row lengths that are multiples of 4 take the vector-load path; lengths that are not
    // leave a tail of 1-3 elements after the last whole quad.
    let (rows, n) = (3, 262_144);
    let host: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
    let lengths = [262_143u32, 200_001, 262_144];
    check_topk::<f32>(dev, &host, rows, n, 5000, Some(&lengths), "vector loads, many blocks");
    check_topk::<bf16>(dev, &host, rows, n, 77, Some(&lengths), "vector loads, many blocks");
    let (rows, n) = (300, 4096);
    let host: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
    let lengths: Vec<u32> = (0..rows).map(|r| (n - r % 7) as u32).collect();
    check_topk::<f32>(dev, &host, rows, n, 1000, Some(&lengths), "vector loads, fused");
    check_topk::<f16>(dev, &host, rows, n, 4096, None, "vector loads, fused");
}

#[test]
fn topk_longest_rows_run_in_batches() {
    let dev = gpu_or_skip!("topk_longest_rows_run_in_batches");
    let (rows, n, k) = (5, topk::MAX_N, 300);
    let p = plan(dev, rows, n, k);
    assert!(p.layout().rows_per_batch < rows, "{:?}", p.layout());
    let mut rng = Rng::new(13);
    let host: Vec<f32> = (0..rows * n).map(|_| rng.uniform()).collect();
    // The reference by partial selection (a full sort of 2^24 elements per row is slow).
    let d = DeviceTensor::from_host(dev, &host, &[rows, n]).unwrap();
    let (_, gi) = topk::topk(dev, &d, k, None).unwrap();
    let gi = gi.to_host().unwrap();
    for r in 0..rows {
        let row = &host[r * n..(r + 1) * n];
        let mut idx: Vec<u32> = (0..n as u32).collect();
        let cmp =
            |a: &u32, b: &u32| cpu::rank_key(row[*b as usize]).cmp(&cpu::rank_key(row[*a as usize])).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        let mut top = idx[..k].to_vec();
        top.sort_unstable_by(cmp);
        assert_eq!(&gi[r * k..(r + 1) * k], &top[..], "row {r}");
    }
}

#[test]
fn topk_plan_reuse_is_deterministic() {
    let dev = gpu_or_skip!("topk_plan_reuse_is_deterministic");
    let mut rng = Rng::new(14);
    let (rows, n, k) = (9, 70_001, 2048);
    let host: Vec<f32> = (0..rows).flat_map(|_| spicy_row(&mut rng, n)).collect();
    let scores = DeviceTensor::from_host(dev, &host, &[rows, n]).unwrap();
    let mut plan = plan(dev, rows, n, k);
    let mut v = DeviceTensor::<f32>::zeros(dev, &[rows, k]).unwrap();
    let mut i = DeviceTensor::<u32>::zeros(dev, &[rows, k]).unwrap();
    let lengths: Vec<u32> = (0..rows).map(|r| (n - r * 5000) as u32).collect();
    let (want_v, want_i) = cpu::topk(&host, rows, n, k, Some(&lengths)).unwrap();
    let mut first = None;
    for rep in 0..4 {
        plan.run(&scores, Some(&lengths), &mut v, &mut i).unwrap();
        let got = (i.to_host().unwrap(), v.to_host().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(got.0, want_i, "rep {rep}");
        if let Some(f) = &first {
            assert_eq!(&got, f, "rep {rep} differs from rep 0");
        } else {
            first = Some(got);
        }
        // A run without lengths in between must not disturb the next one.
        plan.run(&scores, None, &mut v, &mut i).unwrap();
    }
    assert_eq!(v.to_host().unwrap().len(), want_v.len());
}

#[test]
fn topk_bad_arguments_write_nothing() {
    let dev = gpu_or_skip!("topk_bad_arguments_write_nothing");
    let host = vec![1.0f32; 3 * 100];
    let scores = DeviceTensor::from_host(dev, &host, &[3, 100]).unwrap();
    assert!(matches!(topk::topk(dev, &scores, 0, None), Err(Error::InvalidArgument { arg: "k", .. })));
    assert!(matches!(topk::topk(dev, &scores, 16385, None), Err(Error::InvalidArgument { arg: "k", .. })));
    assert!(matches!(
        topk::topk(dev, &scores, 5, Some(&[1, 101, 3])),
        Err(Error::InvalidArgument { arg: "lengths", .. })
    ));
    let mut plan = plan(dev, 3, 100, 5);
    let sentinel_v = vec![42.0f32; 15];
    let sentinel_i = vec![7u32; 15];
    let mut v = DeviceTensor::from_host(dev, &sentinel_v, &[3, 5]).unwrap();
    let mut i = DeviceTensor::from_host(dev, &sentinel_i, &[3, 5]).unwrap();
    assert!(plan.run(&scores, Some(&[1, 2, 101]), &mut v, &mut i).is_err());
    assert!(plan.run(&scores, Some(&[1, 2]), &mut v, &mut i).is_err());
    let mut wrong = DeviceTensor::<u32>::zeros(dev, &[3, 4]).unwrap();
    assert!(matches!(plan.run(&scores, None, &mut v, &mut wrong), Err(Error::Shape { arg: "indices", .. })));
    assert_eq!(v.to_host().unwrap(), sentinel_v);
    assert_eq!(i.to_host().unwrap(), sentinel_i);
}

fn rand_half<T: Float>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.normal())).collect()
}

/// GPU accumulation (plan, run twice, and the one-shot function) against the f64 reference,
/// all starting from the same `acc`.
fn check_accumulate<T: Float>(dev: &Device, shape: AttnShape, reduce: GqaReduce, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let q: Vec<T> = rand_half(&mut rng, shape.hq * shape.tq * shape.d);
    let k: Vec<T> = rand_half(&mut rng, shape.hkv * shape.t * shape.d);
    let acc0: Vec<f32> = (0..shape.hkv * shape.t).map(|_| rng.uniform()).collect();
    let mut want = acc0.clone();
    cpu::h2o_accumulate(&q, &k, &mut want, shape, reduce).unwrap();
    let dq = DeviceTensor::from_host(dev, &q, &[shape.hq, shape.tq, shape.d]).unwrap();
    let dk = DeviceTensor::from_host(dev, &k, &[shape.hkv, shape.t, shape.d]).unwrap();
    let mut dacc = DeviceTensor::from_host(dev, &acc0, &[shape.hkv, shape.t]).unwrap();
    let options = H2oOptions { reduce, budget: 1, recent: 0 };
    let mut plan = H2oPlan::new(dev, &shape, options).unwrap();
    plan.accumulate(&dq, &dk, &mut dacc).unwrap();
    // A second call on the same plan, and the one-shot function: the same bits.
    let mut again = DeviceTensor::from_host(dev, &acc0, &[shape.hkv, shape.t]).unwrap();
    plan.accumulate(&dq, &dk, &mut again).unwrap();
    let mut once = DeviceTensor::from_host(dev, &acc0, &[shape.hkv, shape.t]).unwrap();
    topk::h2o_accumulate(dev, &dq, &dk, &mut once, reduce).unwrap();
    let got = dacc.to_host().unwrap();
    for (what, other) in [("a rerun", again.to_host().unwrap()), ("the one-shot call", once.to_host().unwrap())] {
        assert!(got.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} differs: {shape:?}");
    }
    let g: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
    let w: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
    common::assert_close(&format!("h2o accumulate {shape:?} {reduce:?} {}", T::DTYPE), &g, &w, 1e-4, 1e-6);
    got
}

#[test]
fn h2o_accumulate_matches_reference() {
    let dev = gpu_or_skip!("h2o_accumulate_matches_reference");
    let shapes = [
        AttnShape { hq: 2, hkv: 2, tq: 1, t: 1, d: 64 },
        AttnShape { hq: 12, hkv: 6, tq: 2, t: 2049, d: 64 },
        AttnShape { hq: 4, hkv: 2, tq: 5, t: 100, d: 64 },
        AttnShape { hq: 8, hkv: 1, tq: 16, t: 257, d: 128 },
        AttnShape { hq: 4, hkv: 4, tq: 17, t: 17, d: 128 },
        AttnShape { hq: 6, hkv: 2, tq: 33, t: 1000, d: 128 },
        AttnShape { hq: 2, hkv: 1, tq: 3, t: 130, d: 256 },
    ];
    for (i, &shape) in shapes.iter().enumerate() {
        for reduce in [GqaReduce::Sum, GqaReduce::Max] {
            check_accumulate::<f16>(dev, shape, reduce, 100 + i as u64);
            check_accumulate::<bf16>(dev, shape, reduce, 200 + i as u64);
        }
    }
}

#[test]
fn h2o_accumulate_is_deterministic_and_validates() {
    let dev = gpu_or_skip!("h2o_accumulate_is_deterministic_and_validates");
    let shape = AttnShape { hq: 8, hkv: 2, tq: 16, t: 3000, d: 128 };
    let a = check_accumulate::<f16>(dev, shape, GqaReduce::Sum, 7);
    let b = check_accumulate::<f16>(dev, shape, GqaReduce::Sum, 7);
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "two runs differ");
    // Bad arguments: f32 inputs, unsupported D, wrong acc shape; acc stays untouched.
    let q = DeviceTensor::<f16>::zeros(dev, &[2, 1, 32]).unwrap();
    let k = DeviceTensor::<f16>::zeros(dev, &[2, 8, 32]).unwrap();
    let sentinel = vec![3.0f32; 16];
    let mut acc = DeviceTensor::from_host(dev, &sentinel, &[2, 8]).unwrap();
    assert!(topk::h2o_accumulate(dev, &q, &k, &mut acc, GqaReduce::Sum).is_err());
    let q32 = DeviceTensor::<f32>::zeros(dev, &[2, 1, 64]).unwrap();
    let k32 = DeviceTensor::<f32>::zeros(dev, &[2, 8, 64]).unwrap();
    assert!(topk::h2o_accumulate(dev, &q32, &k32, &mut acc, GqaReduce::Sum).is_err());
    let q = DeviceTensor::<f16>::zeros(dev, &[2, 9, 64]).unwrap();
    let k = DeviceTensor::<f16>::zeros(dev, &[2, 8, 64]).unwrap();
    assert!(topk::h2o_accumulate(dev, &q, &k, &mut acc, GqaReduce::Sum).is_err());
    assert_eq!(acc.to_host().unwrap(), sentinel);
}

#[test]
fn h2o_select_and_compact_match_reference() {
    let dev = gpu_or_skip!("h2o_select_and_compact_match_reference");
    let mut rng = Rng::new(15);
    for (hkv, t, d, budget, recent) in
        [(3, 5000, 128, 700, 64), (2, 33, 64, 33, 0), (4, 20_001, 128, 2048, 64), (1, 90, 8, 10, 10)]
    {
        // Coarse scores so there are many ties.
        let acc: Vec<f32> = (0..hkv * t).map(|_| (rng.below(50) as f32) * 0.5).collect();
        let dacc = DeviceTensor::from_host(dev, &acc, &[hkv, t]).unwrap();
        let keep = topk::h2o_select(dev, &dacc, budget, recent).unwrap();
        let want = cpu::h2o_select(&acc, hkv, t, budget, recent).unwrap();
        assert_eq!(keep.to_host().unwrap(), want, "select hkv {hkv} t {t} budget {budget} recent {recent}");

        let kc: Vec<f16> = rand_half(&mut rng, hkv * t * d);
        let vc: Vec<f16> = rand_half(&mut rng, hkv * t * d);
        let (mut wk, mut wv, mut wa) = (kc.clone(), vc.clone(), acc.clone());
        cpu::h2o_compact(&want, hkv, t, d, &mut wk, &mut wv, Some(&mut wa)).unwrap();
        let mut dk = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
        let mut dv = DeviceTensor::from_host(dev, &vc, &[hkv, t, d]).unwrap();
        let mut da = DeviceTensor::from_host(dev, &acc, &[hkv, t]).unwrap();
        let bits = |v: Vec<f16>| v.into_iter().map(f16::to_bits).collect::<Vec<_>>();
        // Out of place into packed caches: the first `budget` rows of each compacted head.
        let mut gk = DeviceTensor::<f16>::zeros(dev, &[hkv, budget, d]).unwrap();
        let mut gv = DeviceTensor::<f16>::zeros(dev, &[hkv, budget, d]).unwrap();
        let mut ga = DeviceTensor::<f32>::zeros(dev, &[hkv, budget]).unwrap();
        topk::h2o_gather(dev, &keep, &dk, &dv, Some((&da, &mut ga)), &mut gk, &mut gv).unwrap();
        let packed = |v: &[f16]| -> Vec<u16> {
            (0..hkv).flat_map(|h| v[h * t * d..(h * t + budget) * d].iter().map(|x| x.to_bits())).collect()
        };
        assert!(bits(gk.to_host().unwrap()) == packed(&wk), "gathered K differs");
        assert!(bits(gv.to_host().unwrap()) == packed(&wv), "gathered V differs");
        let packed_acc: Vec<f32> = (0..hkv).flat_map(|h| wa[h * t..h * t + budget].to_vec()).collect();
        assert_eq!(ga.to_host().unwrap(), packed_acc, "gathered acc differs");
        topk::h2o_compact(dev, &keep, &mut dk, &mut dv, Some(&mut da)).unwrap();
        assert!(bits(dk.to_host().unwrap()) == bits(wk), "compacted K differs");
        assert!(bits(dv.to_host().unwrap()) == bits(wv), "compacted V differs");
        assert_eq!(da.to_host().unwrap(), wa, "compacted acc differs");
    }
}

#[test]
fn h2o_bad_arguments_write_nothing() {
    let dev = gpu_or_skip!("h2o_bad_arguments_write_nothing");
    let acc = DeviceTensor::<f32>::zeros(dev, &[2, 100]).unwrap();
    assert!(matches!(topk::h2o_select(dev, &acc, 10, 20), Err(Error::InvalidArgument { arg: "budget", .. })));
    assert!(matches!(topk::h2o_select(dev, &acc, 101, 20), Err(Error::InvalidArgument { arg: "budget", .. })));
    let (hkv, t, d) = (2, 10, 4);
    let kc: Vec<f32> = (0..hkv * t * d).map(|i| i as f32).collect();
    let mut dk = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
    let mut dv = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
    for bad in [vec![0u32, 2, 2, 0, 1, 2], vec![0, 1, 10, 0, 1, 2], vec![3, 1, 2, 0, 1, 2]] {
        let keep = DeviceTensor::from_host(dev, &bad, &[2, 3]).unwrap();
        let r = topk::h2o_compact(dev, &keep, &mut dk, &mut dv, None);
        assert!(matches!(r, Err(Error::InvalidArgument { arg: "keep", .. })), "{bad:?}: {r:?}");
        let sentinel = vec![9.0f32; hkv * 3 * d];
        let mut gk = DeviceTensor::from_host(dev, &sentinel, &[hkv, 3, d]).unwrap();
        let mut gv = DeviceTensor::from_host(dev, &sentinel, &[hkv, 3, d]).unwrap();
        let r = topk::h2o_gather(dev, &keep, &dk, &dv, None, &mut gk, &mut gv);
        assert!(matches!(r, Err(Error::InvalidArgument { arg: "keep", .. })), "{bad:?}: {r:?}");
        assert_eq!(gk.to_host().unwrap(), sentinel);
    }
    assert_eq!(dk.to_host().unwrap(), kc);
    assert_eq!(dv.to_host().unwrap(), kc);
}

#[test]
fn snapkv_matches_reference() {
    let dev = gpu_or_skip!("snapkv_matches_reference");
    let mut rng = Rng::new(16);
    for (hq, hkv, w, t, d, cap) in [(4, 2, 8, 300, 64, 40), (8, 8, 32, 4099, 128, 1000), (2, 1, 5, 6, 128, 5)] {
        let shape = AttnShape { hq, hkv, tq: w, t, d };
        let q: Vec<bf16> = rand_half(&mut rng, hq * w * d);
        let k: Vec<bf16> = rand_half(&mut rng, hkv * t * d);
        let dq = DeviceTensor::from_host(dev, &q, &[hq, w, d]).unwrap();
        let dk = DeviceTensor::from_host(dev, &k, &[hkv, t, d]).unwrap();
        for reduce in [GqaReduce::Sum, GqaReduce::Max] {
            let pooled = topk::snapkv_scores(dev, &dq, &dk, reduce).unwrap().to_host().unwrap();
            let want = cpu::snapkv_scores(&q, &k, shape, reduce).unwrap();
            let g: Vec<f64> = pooled.iter().map(|&x| f64::from(x)).collect();
            let wv: Vec<f64> = want.iter().map(|&x| f64::from(x)).collect();
            common::assert_close("snapkv pooled", &g, &wv, 1e-4, 1e-6);
            // Selection is exact given the same pooled scores.
            let keep = topk::snapkv_select(dev, &dq, &dk, cap, reduce).unwrap().to_host().unwrap();
            let want_keep = cpu::snapkv_select_from_scores(&pooled, hkv, t, w, cap).unwrap();
            assert_eq!(keep, want_keep, "snapkv select {shape:?} cap {cap} {reduce:?}");
        }
    }
}

/// A tensor whose reported shape does not match its memory (a `TensorRef` implemented
/// outside the crate can do this): every launcher must check the length, not just the shape.
struct Liar<'a> {
    inner: &'a mut DeviceTensor<f32>,
    shape: Vec<usize>,
}

impl TensorRef<f32> for Liar<'_> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn cuda_view(&self) -> ntkv::cudarc::driver::CudaView<'_, f32> {
        self.inner.cuda_view()
    }
    fn alloc_stream(&self) -> &std::sync::Arc<ntkv::cudarc::driver::CudaStream> {
        self.inner.alloc_stream()
    }
}

impl ntkv::TensorMut<f32> for Liar<'_> {
    fn cuda_view_mut(&mut self) -> ntkv::cudarc::driver::CudaViewMut<'_, f32> {
        ntkv::TensorMut::cuda_view_mut(self.inner)
    }
}

#[test]
fn h2o_gather_checks_output_lengths_not_just_shapes() {
    let dev = gpu_or_skip!("h2o_gather_checks_output_lengths_not_just_shapes");
    let (hkv, t, d, budget) = (2, 10, 4, 3);
    let kc: Vec<f32> = (0..hkv * t * d).map(|i| i as f32).collect();
    let dk = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
    let dv = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
    let keep = DeviceTensor::from_host(dev, &[0u32, 1, 2, 3, 4, 5], &[hkv, budget]).unwrap();
    // A 1-row k_out that claims to be [hkv, budget, d].
    let mut small = DeviceTensor::<f32>::zeros(dev, &[d]).unwrap();
    let mut k_out = Liar { inner: &mut small, shape: vec![hkv, budget, d] };
    let mut v_out = DeviceTensor::<f32>::zeros(dev, &[hkv, budget, d]).unwrap();
    let r = topk::h2o_gather(dev, &keep, &dk, &dv, None, &mut k_out, &mut v_out);
    assert!(matches!(r, Err(Error::Shape { arg: "k_out", .. })), "{r:?}");
    let mut acc_small = DeviceTensor::<f32>::zeros(dev, &[1]).unwrap();
    let acc = DeviceTensor::<f32>::zeros(dev, &[hkv, t]).unwrap();
    let mut acc_out = Liar { inner: &mut acc_small, shape: vec![hkv, budget] };
    let mut k_out = DeviceTensor::<f32>::zeros(dev, &[hkv, budget, d]).unwrap();
    let r = topk::h2o_gather(dev, &keep, &dk, &dv, Some((&acc, &mut acc_out)), &mut k_out, &mut v_out);
    assert!(matches!(r, Err(Error::Shape { arg: "acc_out", .. })), "{r:?}");
}

#[test]
fn topk_runs_on_borrowed_views() {
    let dev = gpu_or_skip!("topk_runs_on_borrowed_views");
    let mut rng = Rng::new(17);
    // Layer 1 of a [3, 4, 5000] buffer: a view, no copy; outputs into part of a larger buffer.
    let (rows, n, k) = (4, 5000, 77);
    let host: Vec<f32> = (0..3 * rows * n).map(|_| rng.normal()).collect();
    let all = DeviceTensor::from_host(dev, &host, &[3, rows, n]).unwrap();
    let layer = TensorView::new(all.slice().slice(rows * n..2 * rows * n), &[rows, n]).unwrap();
    let mut vals = DeviceTensor::<f32>::zeros(dev, &[2 * rows * k]).unwrap();
    let mut idx = DeviceTensor::<u32>::zeros(dev, &[rows * k + 5]).unwrap();
    {
        let (mut vv, mut iv) = (vals.view_mut(), idx.view_mut());
        let mut v = TensorViewMut::new(vv.slice_mut(rows * k..), &[rows, k]).unwrap();
        let mut i = TensorViewMut::new(iv.slice_mut(..rows * k), &[rows, k]).unwrap();
        plan(dev, rows, n, k).run(&layer, None, &mut v, &mut i).unwrap();
    }
    let (want_v, want_i) = cpu::topk(&host[rows * n..2 * rows * n], rows, n, k, None).unwrap();
    assert_eq!(idx.to_host().unwrap()[..rows * k], want_i[..]);
    assert_eq!(vals.to_host().unwrap()[rows * k..], want_v[..]);
}

#[test]
fn misaligned_views_are_loaded_safely_or_refused() {
    let dev = gpu_or_skip!("misaligned_views_are_loaded_safely_or_refused");
    let mut rng = Rng::new(18);
    // Top-k rows that start one element past a 16-byte boundary: the vector loads must not
    // be used (or fault); the result is still exact.
    let (rows, n, k) = (3, 4096, 100);
    let host: Vec<f32> = (0..rows * n + 1).map(|_| rng.normal()).collect();
    let all = DeviceTensor::from_host(dev, &host, &[rows * n + 1]).unwrap();
    let view = TensorView::new(all.slice().slice(1..), &[rows, n]).unwrap();
    let (_, gi) = topk::topk(dev, &view, k, None).unwrap();
    assert_eq!(gi.to_host().unwrap(), cpu::topk(&host[1..], rows, n, k, None).unwrap().1);
    // The accumulation loads 16-bit pairs as words: a view at an odd f16 offset is refused.
    let shape = AttnShape { hq: 1, hkv: 1, tq: 1, t: 8, d: 64 };
    let qs = DeviceTensor::<f16>::zeros(dev, &[65]).unwrap();
    let q = TensorView::new(qs.slice().slice(1..), &[1, 1, 64]).unwrap();
    let kc = DeviceTensor::<f16>::zeros(dev, &[1, 8, 64]).unwrap();
    let mut acc = DeviceTensor::<f32>::zeros(dev, &[1, 8]).unwrap();
    let r = topk::h2o_accumulate(dev, &q, &kc, &mut acc, GqaReduce::Sum);
    assert!(matches!(r, Err(Error::InvalidArgument { arg: "q", .. })), "{shape:?}: {r:?}");
}
