//! Malformed inputs for the policy family: every validator at its boundary (at the limit
//! accepted, one past it rejected with the argument named), absurd sizes, and no output or
//! state changed by a call that fails. Runs anywhere (no GPU).

mod common;

use common::arg_of;

use std::panic::{catch_unwind, AssertUnwindSafe};

use ntkv::policy::cpu::{self, LazyEviction, WindowKvGroup};
use ntkv::policy::{validate_lazy_state, LazyOptions, PrefixShape, WindowKvOptions, LAZY_MAX_STEP};
use ntkv::select::{MAX_K, MAX_N};
use ntkv::topk::{AttnShape, GqaReduce};
use ntkv::Error;

const BIG: usize = usize::MAX;

fn rejects<R: std::fmt::Debug>(what: &str, f: impl FnOnce() -> ntkv::Result<R>) -> Error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Err(e)) => e,
        Ok(Ok(r)) => panic!("{what}: accepted ({r:?})"),
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

fn w(window: usize, recent: usize, budget: usize) -> WindowKvOptions {
    WindowKvOptions { window, recent, budget, share_layers: 1 }
}

#[test]
fn windowkv_validator_boundaries() {
    let ok = |o: WindowKvOptions, rows, t| o.validate(rows, t).unwrap();
    let bad = |o: WindowKvOptions, rows, t| arg_of(&o.validate(rows, t).unwrap_err());
    // rows, t.
    assert_eq!(bad(w(1, 0, 1), 0, 4), "scores");
    assert_eq!(bad(w(1, 0, 1), 1, 0), "scores");
    ok(w(1 << 10, 0, 1), 1, MAX_N);
    assert_eq!(bad(w(1 << 10, 0, 1), 1, MAX_N + 1), "scores");
    // window, share_layers.
    assert_eq!(bad(w(0, 0, 1), 1, 4), "window");
    assert_eq!(bad(WindowKvOptions { share_layers: 0, ..w(1, 0, 1) }, 1, 4), "share_layers");
    // recent ≤ budget ≤ t, budget ≥ 1.
    ok(w(1, 4, 4), 1, 4);
    assert_eq!(bad(w(1, 5, 5), 1, 4), "recent");
    assert_eq!(bad(w(1, 2, 1), 1, 4), "budget");
    assert_eq!(bad(w(1, 0, 0), 1, 4), "budget");
    assert_eq!(bad(w(1, 0, 5), 1, 4), "budget");
    // At most MAX_K − 1 kept windows (the recent window is one more block of the expansion).
    ok(w(1, 0, MAX_K - 1), 1, MAX_K + 1);
    assert_eq!(bad(w(1, 0, MAX_K), 1, MAX_K + 2), "budget");
    // ...also when everything fits and no top-k runs.
    ok(w(1, 0, MAX_K - 1), 1, MAX_K - 1);
    assert_eq!(bad(w(1, 0, MAX_K), 1, MAX_K), "budget");
    // rows · t within u32 offsets.
    ok(w(1 << 12, 0, 1), (u32::MAX as usize) / MAX_N, MAX_N);
    assert_eq!(bad(w(1 << 12, 0, 1), (u32::MAX as usize) / MAX_N + 1, MAX_N), "indices");
    assert_eq!(bad(w(1 << 12, 0, 1), BIG, MAX_N), "indices");
}

#[test]
fn windowkv_rejects_buffers_of_the_wrong_length() {
    let e = rejects("short scores", || cpu::windowkv_select(&[1.0; 5], 1, 8, &w(2, 2, 4)));
    assert!(matches!(e, Error::Shape { arg: "scores", .. }), "{e:?}");
    let e = rejects("rows overflow", || cpu::windowkv_select(&[1.0; 5], BIG, 8, &w(2, 2, 4)));
    assert_eq!(arg_of(&e), "indices");
    rejects("window 0", || cpu::window_scores(&[1.0; 4], 1, 4, 0));
    rejects("window scores overflow", || cpu::window_scores(&[1.0; 4], BIG, 2, 1));
    let shape = AttnShape { hq: 2, hkv: 1, tq: 2, t: 8, d: 4 };
    let (q, k) = (vec![0.0f32; 16], vec![0.0f32; 32]);
    let e = rejects("recent vs window", || cpu::windowkv_select_attn(&q, &k, shape, &w(2, 3, 4), GqaReduce::Sum));
    assert_eq!(arg_of(&e), "recent");
    rejects("short q", || cpu::windowkv_select_attn(&q[..8], &k, shape, &w(2, 2, 4), GqaReduce::Sum));
    rejects("group options", || WindowKvGroup::new(w(0, 0, 1), 1, 4));
    let mut g = WindowKvGroup::new(w(2, 0, 2), 1, 4).unwrap();
    rejects("leader without scores", || g.select_layer(0, None).cloned());
    rejects("leader with short scores", || g.select_layer(0, Some(&[1.0])).cloned());
}

fn lazy(budget: usize, recent: usize, lag: usize, threshold: f32) -> LazyOptions {
    LazyOptions { budget, recent, lag, threshold }
}

#[test]
fn lazy_validator_boundaries() {
    let bad = |o: LazyOptions| arg_of(&o.validate().unwrap_err());
    lazy(1, 0, 1, 0.1).validate().unwrap();
    lazy(MAX_K + 3, 3, LAZY_MAX_STEP, f32::MIN_POSITIVE).validate().unwrap();
    assert_eq!(bad(lazy(0, 0, 1, 0.1)), "budget");
    assert_eq!(bad(lazy(2, 3, 1, 0.1)), "recent");
    assert_eq!(bad(lazy(MAX_K + 4, 3, 1, 0.1)), "budget");
    assert_eq!(bad(lazy(1, 0, 0, 0.1)), "lag");
    assert_eq!(bad(lazy(1, 0, LAZY_MAX_STEP + 1, 0.1)), "lag");
    for th in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_eq!(bad(lazy(1, 0, 1, th)), "threshold", "{th}");
    }
    // The state.
    validate_lazy_state(1, MAX_N, LAZY_MAX_STEP - 1, &[]).unwrap();
    assert_eq!(arg_of(&validate_lazy_state(0, 4, 0, &[]).unwrap_err()), "acc");
    assert_eq!(arg_of(&validate_lazy_state(1, 0, 0, &[]).unwrap_err()), "acc");
    assert_eq!(arg_of(&validate_lazy_state(1, MAX_N + 1, 0, &[]).unwrap_err()), "acc");
    assert_eq!(arg_of(&validate_lazy_state(1, 4, LAZY_MAX_STEP, &[]).unwrap_err()), "step");
    assert_eq!(arg_of(&validate_lazy_state(BIG, MAX_N, 0, &[]).unwrap_err()), "acc");
    assert_eq!(arg_of(&validate_lazy_state(2, 4, 0, &[("mri", 7)]).unwrap_err()), "mri");
}

#[test]
fn lazy_update_writes_nothing_on_an_error() {
    let p = [0.9f32; 4];
    let (mut acc, mut lh, mut mri) = ([1.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
    let before = (acc, lh, mri);
    let e = rejects("threshold", || cpu::lazy_update(&p, &mut acc, &mut lh, &mut mri, 1, 4, 3, f32::NAN));
    assert_eq!(arg_of(&e), "threshold");
    let e = rejects("short p", || cpu::lazy_update(&p[..3], &mut acc, &mut lh, &mut mri, 1, 4, 3, 0.5));
    assert_eq!(arg_of(&e), "p");
    // A last_hit past the step, negative, fractional or NaN.
    for bad in [4.0, -1.0, 0.5, f32::NAN] {
        let mut lh2 = [0.0, 0.0, bad, 0.0f32];
        let e = rejects("last_hit", || cpu::lazy_update(&p, &mut acc, &mut lh2, &mut mri, 1, 4, 3, 0.5));
        assert_eq!(arg_of(&e), "last_hit");
        assert_eq!(lh2[0], 0.0);
    }
    assert_eq!((acc, lh, mri), before);
    rejects("scores step", || cpu::lazy_scores(&lh, &mri, 1, 4, LAZY_MAX_STEP));
    rejects("select budget", || cpu::lazy_select(&lh, &mri, 1, 4, 3, 5, 0));
    rejects("select recent", || cpu::lazy_select(&lh, &mri, 1, 4, 3, 2, 3));
}

#[test]
fn lazy_driver_rejects_and_keeps_its_state() {
    let o = lazy(2, 1, 1, 0.5);
    rejects("bad options", || LazyEviction::new(lazy(0, 0, 1, 0.5), 1, 2, 1, vec![0.0f32; 2], vec![0.0; 2]));
    rejects("d = 0", || LazyEviction::<f32>::new(o, 1, 2, 0, vec![], vec![]));
    rejects("short k", || LazyEviction::new(o, 1, 2, 1, vec![0.0f32; 1], vec![0.0; 2]));
    rejects("short v", || LazyEviction::new(o, 1, 2, 1, vec![0.0f32; 2], vec![0.0; 1]));
    rejects("huge", || LazyEviction::new(o, BIG, 2, 1, vec![0.0f32; 2], vec![0.0; 2]));
    let mut c = LazyEviction::new(o, 1, 2, 1, vec![0.0f32, 1.0], vec![0.0, 1.0]).unwrap();
    let e = rejects("short k_new", || c.append(&[], &[0.0]));
    assert_eq!(arg_of(&e), "k_new");
    c.append(&[2.0], &[2.0]).unwrap();
    let snapshot = c.clone();
    let e = rejects("short p", || c.decode_step(&[0.9; 2]));
    assert_eq!(arg_of(&e), "p");
    assert_eq!((c.k(), c.acc(), c.last_hit(), c.step()), (snapshot.k(), snapshot.acc(), snapshot.last_hit(), 0));
    assert!(c.decode_step(&[0.9; 3]).unwrap().is_some());
}

#[test]
fn prefix_validator_boundaries() {
    let bad = |rows, n, budget| arg_of(&PrefixShape { rows, n, budget }.validate().unwrap_err());
    PrefixShape { rows: 1, n: 1, budget: 1 }.validate().unwrap();
    PrefixShape { rows: 3, n: MAX_K, budget: 3 * MAX_K }.validate().unwrap();
    assert_eq!(bad(0, 4, 1), "importance");
    assert_eq!(bad(1, 0, 1), "importance");
    assert_eq!(bad(1, MAX_K + 1, 1), "importance");
    assert_eq!(bad(2, 4, 0), "budget");
    assert_eq!(bad(2, 4, 9), "budget");
    let rows_max = u32::MAX as usize / MAX_K;
    PrefixShape { rows: rows_max, n: MAX_K, budget: 1 }.validate().unwrap();
    assert_eq!(bad(rows_max + 1, MAX_K, 1), "importance");
    assert_eq!(bad(BIG, MAX_K, 1), "importance");
}

#[test]
fn prefix_functions_reject_bad_buffers() {
    let s = PrefixShape { rows: 2, n: 3, budget: 4 };
    let e = rejects("short importance", || cpu::prefixkv(&[1.0; 5], &s));
    assert_eq!(arg_of(&e), "importance");
    rejects("sort", || cpu::prefix_sort(&[1.0; 5], &s));
    rejects("thresholds n = 0", || cpu::prefix_thresholds(&[], 1, 0));
    rejects("thresholds overflow", || cpu::prefix_thresholds(&[1.0], BIG, 2));
    let e = rejects("search length", || cpu::prefix_search(&[0.0; 5], &s));
    assert_eq!(arg_of(&e), "thresholds");
    for row in [[0.0, 0.5, 0.4], [0.0, f64::NAN, 1.0], [-0.5, 0.0, 0.0]] {
        let mut e6 = row.to_vec();
        e6.extend_from_slice(&[0.0, 0.1, 0.2]);
        let e = rejects("search order", || cpu::prefix_search(&e6, &s));
        assert_eq!(arg_of(&e), "thresholds");
    }
}
