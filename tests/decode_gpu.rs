//! Sparse-index decode on the GPU against the f64 CPU reference (tolerances: relative
//! L2 ≤ 5e-4 for f16, ≤ 2e-3 for bf16), GQA groups 1, 2, 4, 8, lists from empty to the whole
//! cache, split and unsplit lists, causal and not; malformed lists rejected before launch
//! with the CPU's errors; determinism.

mod common;
mod decode_support;

use decode_support::{random_problem, Cfg, Lens, Problem};
use half::{bf16, f16};
use ntkv::decode::{cpu, validate_lists, DecodePlan};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Error, Float, TensorView, TensorViewMut};

struct Outputs {
    o: Vec<f64>,
    lse: Vec<f64>,
    o_bits: Vec<u32>,
}

fn bits<T: Float>(x: &[T]) -> Vec<u32> {
    // Widening f16/bf16 to f32 is exact, so equal f32 bits mean equal stored bits.
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// Problem `p`'s lists on the device. The index buffer gets one unused tail entry, so it is
/// never empty (a zero-length device allocation is not allowed); the API allows the extra.
fn upload_lists<T: Float>(dev: &Device, p: &Problem<T>) -> Result<(DeviceTensor<u32>, DeviceTensor<u32>), Error> {
    let indptr = DeviceTensor::from_host(dev, &p.indptr, &[p.indptr.len()])?;
    let mut idx = p.indices.clone();
    idx.push(u32::MAX);
    let indices = DeviceTensor::from_host(dev, &idx, &[idx.len()])?;
    Ok((indptr, indices))
}

/// `q`, `k` and `v` on the device, in the shapes of `cfg`.
fn upload_qkv<T: Float>(dev: &Device, cfg: &Cfg, q: &[T], k: &[T], v: &[T]) -> Result<QkvTensors<T>, Error> {
    Ok((
        DeviceTensor::from_host(dev, q, &cfg.q_shape())?,
        DeviceTensor::from_host(dev, k, &cfg.kv_shape())?,
        DeviceTensor::from_host(dev, v, &cfg.kv_shape())?,
    ))
}

type QkvTensors<T> = (DeviceTensor<T>, DeviceTensor<T>, DeviceTensor<T>);

fn run_gpu<T: Float>(dev: &Device, p: &Problem<T>) -> Result<Outputs, Error> {
    let cfg = &p.cfg;
    let (q, k, v) = upload_qkv(dev, cfg, &p.q, &p.k, &p.v)?;
    let (indptr, indices) = upload_lists(dev, p)?;
    let mut o = DeviceTensor::<T>::zeros(dev, &cfg.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape())?;
    let mut plan = DecodePlan::new(dev, cfg, cfg.opts, &p.cache_lens, &indptr, &indices)?;
    plan.run(&q, &k, &v, &mut o, &mut lse)?;
    let oh = o.to_host()?;
    Ok(Outputs {
        o: oh.iter().map(|x| f64::from(x.to_f32())).collect(),
        lse: lse.to_host()?.iter().map(|&x| f64::from(x)).collect(),
        o_bits: bits(&oh),
    })
}

fn tol<T: Float>() -> f64 {
    if T::DTYPE == ntkv::DType::F16 {
        5e-4
    } else {
        2e-3
    }
}

fn check_case<T: Float>(dev: &Device, seed: u64, cfg: Cfg, lens: Lens) {
    let mut rng = Rng::new(seed);
    let p = random_problem::<T>(&mut rng, cfg, lens);
    let want = p.reference().unwrap();
    let got = run_gpu(dev, &p).unwrap();
    let what = format!("seed {seed} {:?} {:?}", p.cfg, T::DTYPE);
    common::assert_rel_l2(&format!("o {what}"), &got.o, &want.o, tol::<T>());
    // lse: f32 accumulation of scores of widened inputs; -inf exactly where nothing is visible.
    common::assert_close(&format!("lse {what}"), &got.lse, &want.lse, 1e-4, 1e-3);
    // Rows with nothing visible are exactly zero.
    let d = p.cfg.head_dim;
    for (row, &l) in want.lse.iter().enumerate() {
        if l == f64::NEG_INFINITY {
            assert!(got.o[row * d..][..d].iter().all(|&x| x == 0.0), "{what}: empty row {row} not zero");
        }
    }
}

#[test]
fn differential_gqa_groups_and_head_dims() {
    let dev = gpu_or_skip!("differential_gqa_groups_and_head_dims");
    let mut seed = 100;
    for &group in &[1usize, 2, 4, 8] {
        for &d in &[64usize, 128] {
            for &causal in &[false, true] {
                let hkv = if group == 8 { 1 } else { 2 };
                let tq = 1 + (seed as usize % 5);
                let cfg = Cfg::new(2, tq, hkv * group, hkv, d, 203).causal(causal);
                check_case::<f16>(dev, seed, cfg.clone(), Lens::Random);
                check_case::<bf16>(dev, seed + 1, cfg, Lens::Random);
                seed += 2;
            }
        }
    }
}

#[test]
fn differential_split_lists_merge() {
    let dev = gpu_or_skip!("differential_split_lists_merge");
    // Forced small chunks: every list of more than 64 tokens is split, so the merge runs;
    // lengths 1, a partial tile, several tiles, and the whole cache.
    for (i, &chunk) in [64usize, 128, 192].iter().enumerate() {
        let s = 300 + 10 * i as u64;
        let cfg = Cfg::new(3, 2, 8, 2, 128, 517).chunk_tokens(chunk);
        check_case::<f16>(dev, s, cfg.clone(), Lens::Random);
        check_case::<bf16>(dev, s + 1, cfg.clone(), Lens::Full);
        check_case::<f16>(dev, s + 2, cfg.clone().causal(true), Lens::Fixed(1));
        check_case::<bf16>(dev, s + 3, cfg.causal(true), Lens::Fixed(65));
    }
}

#[test]
fn differential_many_query_rows() {
    let dev = gpu_or_skip!("differential_many_query_rows");
    // group 8 x Tq 16 = 128 rows per kv head: eight row tiles per chunk.
    let cfg = Cfg::new(1, 16, 16, 2, 64, 300).causal(true);
    check_case::<f16>(dev, 400, cfg.clone(), Lens::Random);
    check_case::<bf16>(dev, 401, cfg.chunk_tokens(64), Lens::Random);
    // 3 x 5 = 15 rows (a partial row tile) and 6 x 3 = 18 rows (one full, one partial).
    check_case::<f16>(dev, 402, Cfg::new(2, 5, 3, 1, 128, 77), Lens::Random);
    check_case::<bf16>(dev, 403, Cfg::new(2, 3, 12, 2, 128, 77).chunk_tokens(64), Lens::Random);
}

#[test]
fn differential_long_lists_automatic_split() {
    let dev = gpu_or_skip!("differential_long_lists_automatic_split");
    // Long enough that the automatic planner splits (chunks of at least 256 tokens).
    let cfg = Cfg::new(1, 1, 8, 4, 128, 5000);
    check_case::<f16>(dev, 500, cfg.clone(), Lens::Full);
    check_case::<f16>(dev, 501, cfg.clone(), Lens::Fixed(2048));
    check_case::<bf16>(dev, 502, cfg.scale(0.05), Lens::Random);
}

#[test]
fn empty_lists_give_zero_and_neg_inf() {
    let dev = gpu_or_skip!("empty_lists_give_zero_and_neg_inf");
    for chunk in [None, Some(64)] {
        let mut cfg = Cfg::new(2, 2, 4, 2, 64, 90);
        cfg.opts.chunk_tokens = chunk;
        let mut rng = Rng::new(600);
        let mut p = random_problem::<f16>(&mut rng, cfg, Lens::Random);
        // Lists 1 and 2 empty, the others kept.
        let lists: Vec<Vec<u32>> =
            (0..4).map(|l| p.indices[p.indptr[l] as usize..p.indptr[l + 1] as usize].to_vec()).collect();
        let mut indptr = vec![0u32];
        let mut indices = Vec::new();
        for (l, list) in lists.iter().enumerate() {
            if l != 1 && l != 2 {
                indices.extend_from_slice(list);
            }
            indptr.push(indices.len() as u32);
        }
        p.indptr = indptr;
        p.indices = indices;
        let got = run_gpu(dev, &p).unwrap();
        let want = p.reference().unwrap();
        for (row, &l) in want.lse.iter().enumerate() {
            if l == f64::NEG_INFINITY {
                assert_eq!(got.lse[row], f64::NEG_INFINITY, "row {row}");
            }
        }
        common::assert_rel_l2("o", &got.o, &want.o, 5e-4);
        assert!(got.o.iter().all(|x| !x.is_nan()));
    }
}

#[test]
fn deterministic_bits() {
    let dev = gpu_or_skip!("deterministic_bits");
    let cfg = Cfg::new(2, 4, 8, 2, 128, 1500);
    let mut rng = Rng::new(700);
    let p = random_problem::<bf16>(&mut rng, cfg, Lens::Random);
    let a = run_gpu(dev, &p).unwrap();
    let b = run_gpu(dev, &p).unwrap();
    assert_eq!(a.o_bits, b.o_bits);
    assert_eq!(
        a.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

/// The device validation reports exactly what the host validation reports, and nothing is
/// written to the outputs.
#[test]
fn malformed_lists_rejected_before_launch() {
    let dev = gpu_or_skip!("malformed_lists_rejected_before_launch");
    let cfg = Cfg::new(2, 1, 4, 2, 64, 4000);
    let mut rng = Rng::new(800);
    let mut p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Fixed(3000));
    // Fixed cache lengths so that every list holds exactly 3000 entries.
    p.cache_lens = vec![4000, 3500];
    let (ptr, idx) = decode_support::random_lists(&mut rng, &cfg, &p.cache_lens, Lens::Fixed(3000));
    p.indptr = ptr;
    p.indices = idx;
    assert_eq!(p.indices.len(), 12000);
    let bad_lists: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = {
        let mut v = Vec::new();
        let n = p.indices.len();
        // unsorted (deep in a long list, past the first validation segment)
        let mut x = p.indices.clone();
        x.swap(2500, 2501);
        v.push((p.cache_lens.clone(), p.indptr.clone(), x));
        // duplicate in the last list
        let mut x = p.indices.clone();
        x[n - 1] = x[n - 2];
        v.push((p.cache_lens.clone(), p.indptr.clone(), x));
        // out of range for its sequence (but inside the capacity): shrink cache_lens[1]
        let mut lens = p.cache_lens.clone();
        lens[1] = p.indices[n - 1];
        v.push((lens, p.indptr.clone(), p.indices.clone()));
        // two faults: the lower position wins
        let mut x = p.indices.clone();
        x[4000] = x[3999];
        x[10] = 5000;
        v.push((p.cache_lens.clone(), p.indptr.clone(), x));
        // bad indptr
        let mut ptr = p.indptr.clone();
        ptr[2] = ptr[1] - 1;
        v.push((p.cache_lens.clone(), ptr, p.indices.clone()));
        v
    };
    for (i, (lens, ptr, idx)) in bad_lists.into_iter().enumerate() {
        let want = validate_lists(&cfg, &lens, &ptr, &idx).unwrap_err();
        let indptr = DeviceTensor::from_host(dev, &ptr, &[ptr.len()]).unwrap();
        let indices = DeviceTensor::from_host(dev, &idx, &[idx.len()]).unwrap();
        let got = DecodePlan::new(dev, &cfg, cfg.opts, &lens, &indptr, &indices).unwrap_err();
        assert_eq!(got.to_string(), want.to_string(), "case {i}");
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "case {i}");
    }
    // Plan errors leave outputs untouched: there is no run without a plan. Check that a
    // valid plan's run with a wrong shape writes nothing either.
    let indptr = DeviceTensor::from_host(dev, &p.indptr, &[p.indptr.len()]).unwrap();
    let indices = DeviceTensor::from_host(dev, &p.indices, &[p.indices.len()]).unwrap();
    let mut plan = DecodePlan::new(dev, &cfg, cfg.opts, &p.cache_lens, &indptr, &indices).unwrap();
    let q = DeviceTensor::from_host(dev, &p.q, &cfg.q_shape()).unwrap();
    let k = DeviceTensor::from_host(dev, &p.k, &cfg.kv_shape()).unwrap();
    let v_bad = DeviceTensor::<f16>::zeros(dev, &[2, 2, 3999, 64]).unwrap();
    let sentinel = vec![f16::from_f32(7.0); q.len()];
    let mut o = DeviceTensor::from_host(dev, &sentinel, &cfg.q_shape()).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape()).unwrap();
    match plan.run(&q, &k, &v_bad, &mut o, &mut lse) {
        Err(Error::Shape { arg: "v", .. }) => {}
        other => panic!("expected a shape error for v, got {other:?}"),
    }
    assert_eq!(o.to_host().unwrap(), sentinel);
    let mut lse_bad = DeviceTensor::<f32>::zeros(dev, &[2, 4]).unwrap();
    assert!(matches!(plan.run(&q, &k, &k, &mut o, &mut lse_bad), Err(Error::Shape { arg: "lse", .. })));
    // f32 is refused.
    let q32 = DeviceTensor::<f32>::zeros(dev, &cfg.q_shape()).unwrap();
    let k32 = DeviceTensor::<f32>::zeros(dev, &cfg.kv_shape()).unwrap();
    let mut o32 = DeviceTensor::<f32>::zeros(dev, &cfg.q_shape()).unwrap();
    assert!(matches!(plan.run(&q32, &k32, &k32, &mut o32, &mut lse), Err(Error::InvalidArgument { arg: "q", .. })));
}

#[test]
fn plan_is_reusable_across_layers() {
    let dev = gpu_or_skip!("plan_is_reusable_across_layers");
    let cfg = Cfg::new(1, 2, 4, 2, 128, 700).chunk_tokens(128);
    let mut rng = Rng::new(900);
    let a = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Random);
    let (indptr, indices) = upload_lists(dev, &a).unwrap();
    let mut plan = DecodePlan::new(dev, &cfg, cfg.opts, &a.cache_lens, &indptr, &indices).unwrap();
    for layer in 0..3u64 {
        let mut r = Rng::new(1000 + layer);
        let gen = |r: &mut Rng, n: usize| -> Vec<f16> { r.normal_vec(n).into_iter().map(f16::from_f32).collect() };
        let nq: usize = cfg.q_shape().iter().product();
        let nk: usize = cfg.kv_shape().iter().product();
        let (qh, kh, vh) = (gen(&mut r, nq), gen(&mut r, nk), gen(&mut r, nk));
        let (q, k, v) = upload_qkv(dev, &cfg, &qh, &kh, &vh).unwrap();
        let mut o = DeviceTensor::<f16>::zeros(dev, &cfg.q_shape()).unwrap();
        let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape()).unwrap();
        plan.run(&q, &k, &v, &mut o, &mut lse).unwrap();
        let want = cpu::sparse_decode(&cfg, &cfg.opts, &qh, &kh, &vh, &a.cache_lens, &a.indptr, &a.indices).unwrap();
        let got: Vec<f64> = o.to_host().unwrap().iter().map(|x| f64::from(x.to_f32())).collect();
        common::assert_rel_l2(&format!("layer {layer}"), &got, &want.o, 5e-4);
    }
}

/// One plan run again and again (a decode loop over layers) on the same inputs: the split
/// lists' merge is folded into whichever CTA of a list finishes last, and the plan's tickets
/// are reused without clearing, so every run must still give the reference's answer and the
/// same bits as the first, whichever CTA folded.
#[test]
fn one_plan_repeated_runs_fold_the_same_bits() {
    let dev = gpu_or_skip!("one_plan_repeated_runs_fold_the_same_bits");
    // Chunks of 64 tokens: lists of up to 1200 tokens make up to 19 CTAs per row tile.
    let cfg = Cfg::new(2, 3, 8, 2, 128, 1200).chunk_tokens(64);
    let mut rng = Rng::new(4242);
    let p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Random);
    let want = p.reference().unwrap();
    let (q, k, v) = upload_qkv(dev, &cfg, &p.q, &p.k, &p.v).unwrap();
    let (indptr, indices) = upload_lists(dev, &p).unwrap();
    let mut plan = DecodePlan::new(dev, &cfg, cfg.opts, &p.cache_lens, &indptr, &indices).unwrap();
    assert!(plan.split().max_chunks > 1, "the case must split");
    let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
    for run in 0..6 {
        let mut o = DeviceTensor::<f16>::zeros(dev, &cfg.q_shape()).unwrap();
        let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape()).unwrap();
        plan.run(&q, &k, &v, &mut o, &mut lse).unwrap();
        let (oh, lh) = (o.to_host().unwrap(), lse.to_host().unwrap());
        let got: Vec<f64> = oh.iter().map(|x| f64::from(x.to_f32())).collect();
        common::assert_rel_l2(&format!("run {run}"), &got, &want.o, 5e-4);
        let now = (bits(&oh), lh.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        match &first {
            None => first = Some(now),
            Some(f) => assert!(f == &now, "run {run} differs from run 0 in its bits"),
        }
    }
}

/// The NaN contract on the GPU, direct and split: exactly the CPU reference's NaN rows and
/// columns (see tests/decode_cpu.rs), never an empty row.
#[test]
fn nan_inputs_make_their_rows_nan_not_empty() {
    let dev = gpu_or_skip!("nan_inputs_make_their_rows_nan_not_empty");
    for chunk in [None, Some(64)] {
        let mut cfg = Cfg::new(1, 2, 2, 1, 64, 300).causal(true);
        cfg.opts.chunk_tokens = chunk;
        let mut rng = Rng::new(77);
        let mut p = random_problem::<f16>(&mut rng, cfg, Lens::Full);
        p.cache_lens = vec![300];
        let (indptr, indices) = decode_support::random_lists(&mut rng, &p.cfg, &p.cache_lens, Lens::Full);
        (p.indptr, p.indices) = (indptr, indices);
        p.q[3] = f16::NAN; // row (t 0, head 0)
        p.k[299 * 64 + 9] = f16::NAN; // the last token: visible (causally) to t = 1 only
        p.v[10 * 64 + 5] = f16::NAN; // o[d = 5] of every row
        let want = p.reference().unwrap();
        let got = run_gpu(dev, &p).unwrap();
        for row in 0..4 {
            assert_eq!(got.lse[row].is_nan(), want.lse[row].is_nan(), "{chunk:?}: lse of row {row}");
            for d in 0..64 {
                let (g, w) = (got.o[row * 64 + d], want.o[row * 64 + d]);
                assert_eq!(g.is_nan(), w.is_nan(), "{chunk:?}: o of row {row}, d {d}");
            }
        }
        assert!(want.lse[0].is_nan() && !want.lse[1].is_nan() && want.lse[2].is_nan());
    }
}

/// Borrowed views run like owned tensors, and every buffer's length is checked: a view of
/// the right shape from a slice of a larger allocation gives the same bits.
#[test]
fn views_of_a_larger_buffer_match_owned_tensors() {
    let dev = gpu_or_skip!("views_of_a_larger_buffer_match_owned_tensors");
    let cfg = Cfg::new(1, 2, 4, 2, 64, 200);
    let mut rng = Rng::new(950);
    let p = random_problem::<f16>(&mut rng, cfg.clone(), Lens::Random);
    let owned = run_gpu(dev, &p).unwrap();
    // Two "layers" of k in one buffer; layer 1 holds this problem's k.
    let nk = p.k.len();
    let mut both = vec![f16::from_f32(9.0); nk];
    both.extend_from_slice(&p.k);
    let big = DeviceTensor::from_host(dev, &both, &[2 * nk]).unwrap();
    let k = TensorView::new(big.slice().slice(nk..2 * nk), &cfg.kv_shape()).unwrap();
    let q = DeviceTensor::from_host(dev, &p.q, &cfg.q_shape()).unwrap();
    let v = DeviceTensor::from_host(dev, &p.v, &cfg.kv_shape()).unwrap();
    let (indptr, indices) = upload_lists(dev, &p).unwrap();
    let mut o_all = DeviceTensor::<f16>::zeros(dev, &[2 * q.len()]).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape()).unwrap();
    let mut plan = DecodePlan::new(dev, &cfg, cfg.opts, &p.cache_lens, &indptr, &indices).unwrap();
    {
        let n = q.len();
        let mut whole = o_all.view_mut();
        let mut o = TensorViewMut::new(whole.slice_mut(n..2 * n), &cfg.q_shape()).unwrap();
        plan.run(&q, &k, &v, &mut o, &mut lse).unwrap();
    }
    let oh = o_all.to_host().unwrap();
    assert!(oh[..q.len()].iter().all(|x| x.to_f32() == 0.0), "the other half is untouched");
    let got: Vec<u32> = oh[q.len()..].iter().map(|x| x.to_f32().to_bits()).collect();
    assert_eq!(got, owned.o_bits);
}
