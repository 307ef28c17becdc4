//! Differential tests of the policy family (`ntkv::policy`): GPU plans against the CPU
//! references, index lists, budgets and state exactly equal. Without a GPU every test prints
//! SKIP (NTKV_REQUIRE_GPU=1 makes that a failure).

mod common;

use half::f16;
use ntkv::policy::{cpu, LazyOptions, LazyPlan, LazyStateMut, PrefixPlan, PrefixShape, WindowKvOptions, WindowKvPlan};
use ntkv::rng::Rng;
use ntkv::topk::{AttnShape, GqaReduce};
use ntkv::{Device, DeviceTensor};

/// Runs a WindowKV plan on host scores and returns the CSR, trimmed to `indptr[rows]`.
fn gpu_windowkv(dev: &Device, scores: &[f32], rows: usize, t: usize, o: WindowKvOptions) -> (Vec<u32>, Vec<u32>) {
    let mut plan = WindowKvPlan::new(dev, rows, t, o).unwrap();
    let older = t - o.recent;
    // With no older tokens the scores are unread: any tensor stands in.
    let host = if scores.is_empty() { vec![0.0f32; rows] } else { scores.to_vec() };
    let d = DeviceTensor::from_host(dev, &host, &[rows, older.max(1)]).unwrap();
    let mut indptr = DeviceTensor::<u32>::zeros(dev, &[rows + 1]).unwrap();
    let cap = plan.capacity().unwrap();
    let mut indices = DeviceTensor::<u32>::zeros(dev, &[cap]).unwrap();
    plan.run(&d, &mut indptr, &mut indices).unwrap();
    let ip = indptr.to_host().unwrap();
    let mut ix = indices.to_host().unwrap();
    ix.truncate(ip[rows] as usize);
    (ip, ix)
}

#[test]
fn windowkv_from_scores_matches_reference() {
    let dev = gpu_or_skip!("windowkv_from_scores_matches_reference");
    let mut rng = Rng::new(5);
    // (rows, t, window, recent, budget): straddling windows, a budget below one window,
    // everything fitting, w = 1, many rows and long rows (the split top-k layout).
    let cases = [
        (1, 12, 3, 2, 8),
        (4, 12, 4, 3, 7),
        (3, 12, 4, 2, 5),
        (2, 7, 2, 2, 7),
        (5, 1000, 1, 16, 300),
        (64, 4099, 32, 64, 1024),
        (2, 300_000, 16, 32, 40_000),
        (3, 50, 8, 50, 50),
    ];
    for (rows, t, window, recent, budget) in cases {
        let o = WindowKvOptions { window, recent, budget, share_layers: 1 };
        let older = t - recent;
        // Coarse values: many exact window ties, decided by index.
        let scores: Vec<f32> = (0..rows * older).map(|_| rng.below(4) as f32 * 0.5).collect();
        let want = cpu::windowkv_select(&scores, rows, t, &o).unwrap();
        let (ip, ix) = gpu_windowkv(dev, &scores, rows, t, o);
        assert_eq!(ip, want.indptr, "{o:?} t {t}");
        assert_eq!(ix, want.indices, "{o:?} t {t}");
    }
}

#[test]
fn windowkv_from_attention_matches_reference() {
    let dev = gpu_or_skip!("windowkv_from_attention_matches_reference");
    let mut rng = Rng::new(6);
    let shape = AttnShape { hq: 8, hkv: 2, tq: 16, t: 1000, d: 128 };
    let o = WindowKvOptions { window: 32, recent: 16, budget: 16 + 4 * 32, share_layers: 4 };
    // Keys are noise except in a few windows that copy the queries' direction: their votes
    // stand far apart, so rounding cannot reorder the windows.
    let dir: Vec<f32> = (0..shape.d).map(|_| rng.normal()).collect();
    let mut k = vec![0.0f32; shape.hkv * shape.t * shape.d];
    for h in 0..shape.hkv {
        for j in 0..shape.t {
            let hot = [3usize, 7, 11, 20, 25].contains(&(j / 32)) && (j / 32 + h) % 2 == 0 || j / 32 == 28;
            for c in 0..shape.d {
                let x = rng.normal() * 0.3;
                k[(h * shape.t + j) * shape.d + c] = if hot { x + dir[c] * 0.4 } else { x };
            }
        }
    }
    let q: Vec<f32> = (0..shape.hq * shape.tq * shape.d).map(|i| dir[i % shape.d] * 0.4 + rng.normal() * 0.1).collect();
    let (q, k): (Vec<f16>, Vec<f16>) =
        (q.iter().map(|&x| f16::from_f32(x)).collect(), k.iter().map(|&x| f16::from_f32(x)).collect());
    let want = cpu::windowkv_select_attn(&q, &k, shape, &o, GqaReduce::Sum).unwrap();
    let mut plan = WindowKvPlan::with_attention(dev, &shape, o).unwrap();
    let dq = DeviceTensor::from_host(dev, &q, &[shape.hq, shape.tq, shape.d]).unwrap();
    let dk = DeviceTensor::from_host(dev, &k, &[shape.hkv, shape.t, shape.d]).unwrap();
    let mut indptr = DeviceTensor::<u32>::zeros(dev, &[shape.hkv + 1]).unwrap();
    let mut indices = DeviceTensor::<u32>::zeros(dev, &[plan.capacity().unwrap()]).unwrap();
    plan.run_attention(&dq, &dk, GqaReduce::Sum, &mut indptr, &mut indices).unwrap();
    let ip = indptr.to_host().unwrap();
    assert_eq!(ip, want.indptr);
    assert_eq!(indices.to_host().unwrap()[..ip[shape.hkv] as usize], want.indices[..]);
}

#[test]
fn lazy_step_matches_reference() {
    let dev = gpu_or_skip!("lazy_step_matches_reference");
    let mut rng = Rng::new(7);
    let shape = AttnShape { hq: 8, hkv: 2, tq: 1, t: 300, d: 64 };
    let (hkv, t, d) = (shape.hkv, shape.t, shape.d);
    for (lag, step) in [(1usize, 9usize), (4, 7), (8, 5)] {
        let o = LazyOptions { budget: 100, recent: 8, lag, threshold: 0.01 };
        let q: Vec<f16> = (0..shape.hq * d).map(|_| f16::from_f32(rng.normal())).collect();
        let kc: Vec<f16> = (0..hkv * t * d).map(|_| f16::from_f32(rng.normal())).collect();
        let vc: Vec<f16> = (0..hkv * t * d).map(|_| f16::from_f32(rng.normal())).collect();
        let acc: Vec<f32> = (0..hkv * t).map(|_| rng.uniform()).collect();
        let lh: Vec<f32> = (0..hkv * t).map(|_| rng.below(step + 1) as f32).collect();
        let mri: Vec<f32> = (0..hkv * t).map(|_| rng.below(step + 1) as f32).collect();

        // Reference: the step's mass in f64 rounded once, the update, the eviction.
        let p: Vec<f32> = ntkv::topk::cpu::attention_mass(&q, &kc, shape, GqaReduce::Sum)
            .unwrap()
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let (mut wa, mut wl, mut wm) = (acc.clone(), lh.clone(), mri.clone());
        cpu::lazy_update(&p, &mut wa, &mut wl, &mut wm, hkv, t, step, o.threshold).unwrap();
        let evicts = o.evicts_after(step);
        let (mut wk, mut wv) = (kc.clone(), vc.clone());
        let keep = if evicts {
            let keep = cpu::lazy_select(&wl, &wm, hkv, t, step, o.budget, o.recent).unwrap();
            ntkv::topk::cpu::h2o_compact(&keep, hkv, t, d, &mut wk, &mut wv, Some(&mut wa)).unwrap();
            ntkv::topk::cpu::h2o_compact(&keep, hkv, t, 1, &mut wl, &mut wm, None).unwrap();
            Some(keep)
        } else {
            None
        };

        let mut plan = LazyPlan::new(dev, &shape, o, GqaReduce::Sum).unwrap();
        let dq = DeviceTensor::from_host(dev, &q, &[shape.hq, 1, d]).unwrap();
        let mut dk = DeviceTensor::from_host(dev, &kc, &[hkv, t, d]).unwrap();
        let mut dv = DeviceTensor::from_host(dev, &vc, &[hkv, t, d]).unwrap();
        let mut da = DeviceTensor::from_host(dev, &acc, &[hkv, t]).unwrap();
        let mut dl = DeviceTensor::from_host(dev, &lh, &[hkv, t]).unwrap();
        let mut dm = DeviceTensor::from_host(dev, &mri, &[hkv, t]).unwrap();
        let state = LazyStateMut { acc: &mut da, last_hit: &mut dl, mri: &mut dm };
        let evicted = plan.step(step, &dq, &mut dk, &mut dv, state).unwrap();
        assert_eq!(evicted, evicts, "lag {lag} step {step}");
        if let Some(keep) = &keep {
            assert_eq!(&plan.keep().unwrap().to_host().unwrap(), keep, "lag {lag}");
        }
        // The state is exact; K and V rows moved exactly; acc within the accumulation's bound.
        assert_eq!(dl.to_host().unwrap(), wl, "last_hit, lag {lag}");
        assert_eq!(dm.to_host().unwrap(), wm, "mri, lag {lag}");
        let bits = |x: &[f16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dk.to_host().unwrap()), bits(&wk));
        assert_eq!(bits(&dv.to_host().unwrap()), bits(&wv));
        let got: Vec<f64> = da.to_host().unwrap().iter().map(|&x| f64::from(x)).collect();
        let want: Vec<f64> = wa.iter().map(|&x| f64::from(x)).collect();
        common::assert_close("acc", &got, &want, 1e-4, 1e-6);
    }
}

#[test]
fn prefixkv_matches_reference() {
    let dev = gpu_or_skip!("prefixkv_matches_reference");
    let mut rng = Rng::new(8);
    for (rows, n, budget, ties) in [
        (32usize, 4096usize, 32 * 1024usize, false),
        (4, 16384, 9000, false),
        (7, 100, 1, true),
        (5, 33, 165, true),
        (64, 2000, 12345, true),
    ] {
        let imp: Vec<f32> = (0..rows * n)
            .map(|_| match rng.below(12) {
                0 => 0.0,
                1 => -1.0,
                _ if ties => (1 + rng.below(3)) as f32,
                _ => rng.uniform(),
            })
            .collect();
        let shape = PrefixShape { rows, n, budget };
        let want = cpu::prefixkv(&imp, &shape).unwrap();
        let mut plan = PrefixPlan::new(dev, &shape).unwrap();
        let d = DeviceTensor::from_host(dev, &imp, &[rows, n]).unwrap();
        let mut indptr = DeviceTensor::<u32>::zeros(dev, &[rows + 1]).unwrap();
        let mut indices = DeviceTensor::<u32>::zeros(dev, &[budget]).unwrap();
        let got = plan.run(&d, &mut indptr, &mut indices).unwrap();
        assert_eq!(got.budgets, want.budgets, "{shape:?}");
        assert_eq!(got.ratio.to_bits(), want.ratio.to_bits(), "{shape:?}");
        assert_eq!(indptr.to_host().unwrap(), want.keep.indptr);
        assert_eq!(indices.to_host().unwrap(), want.keep.indices);
    }
}

#[test]
fn plans_reject_bad_buffers_and_write_nothing() {
    let dev = gpu_or_skip!("plans_reject_bad_buffers_and_write_nothing");
    let o = WindowKvOptions { window: 4, recent: 2, budget: 10, share_layers: 1 };
    let mut plan = WindowKvPlan::new(dev, 2, 40, o).unwrap();
    let scores = DeviceTensor::from_host(dev, &[1.0f32; 2 * 37], &[2, 37]).unwrap();
    let mut indptr = DeviceTensor::from_host(dev, &[7u32; 3], &[3]).unwrap();
    let mut indices = DeviceTensor::<u32>::zeros(dev, &[80]).unwrap();
    assert!(plan.run(&scores, &mut indptr, &mut indices).is_err());
    let mut short = DeviceTensor::<u32>::zeros(dev, &[79]).unwrap();
    let good = DeviceTensor::from_host(dev, &[1.0f32; 2 * 38], &[2, 38]).unwrap();
    assert!(plan.run(&good, &mut indptr, &mut short).is_err());
    assert_eq!(indptr.to_host().unwrap(), vec![7, 7, 7]);
    let shape = PrefixShape { rows: 2, n: 8, budget: 5 };
    let mut pp = PrefixPlan::new(dev, &shape).unwrap();
    let imp = DeviceTensor::from_host(dev, &[1.0f32; 16], &[2, 8]).unwrap();
    let mut bad_idx = DeviceTensor::<u32>::zeros(dev, &[4]).unwrap();
    assert!(pp.run(&imp, &mut indptr, &mut bad_idx).is_err());
    assert_eq!(indptr.to_host().unwrap(), vec![7, 7, 7]);
}
