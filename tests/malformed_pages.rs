//! Every pages validator at its boundary, absurd sizes, wrong buffer lengths: typed errors,
//! never a panic, and (on the CPU) nothing written.

use ntkv::pages::cpu;
use ntkv::pages::{
    validate_lens, LandmarkSelectShape, LandmarkShape, QuestMetaShape, QuestSelectShape, MAX_HEAD_DIM, MAX_PAGE_SIZE,
};
use ntkv::Error;

fn meta() -> QuestMetaShape {
    QuestMetaShape { batch: 2, hkv: 2, capacity: 40, head_dim: 16, page_size: 16 }
}

fn quest() -> QuestSelectShape {
    QuestSelectShape { batch: 2, hq: 4, hkv: 2, q_tokens: 1, head_dim: 16, capacity: 40, page_size: 16, budget: 2 }
}

fn lmark() -> LandmarkShape {
    LandmarkShape { batch: 2, hkv: 2, capacity: 40, head_dim: 16, outliers: 1 }
}

fn lsel() -> LandmarkSelectShape {
    LandmarkSelectShape { batch: 2, hq: 4, hkv: 2, q_tokens: 2, head_dim: 16, capacity: 40, outliers: 1, budget: 2 }
}

fn names(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::Shape { arg, .. } | Error::TooLarge { arg, .. } => arg,
        other => panic!("unexpected error kind: {other:?}"),
    }
}

/// An argument name and the edits of a valid shape that its validation must reject naming it.
type Rejects<'a, S> = (&'a str, &'a [fn(&mut S)]);

/// Asserts that `base` validates and that each edit listed under an argument fails naming it.
fn assert_rejects<S: Copy>(base: S, validate: fn(&S) -> Result<(), Error>, rejects: &[Rejects<'_, S>]) {
    assert!(validate(&base).is_ok());
    for &(arg, edits) in rejects {
        for (i, edit) in edits.iter().enumerate() {
            let mut s = base;
            edit(&mut s);
            assert_eq!(names(validate(&s).unwrap_err()), arg, "edit {i} under {arg}");
        }
    }
}

#[test]
fn meta_shape_boundaries() {
    assert_rejects(
        meta(),
        QuestMetaShape::validate,
        &[
            ("keys", &[|s| s.batch = 0, |s| s.hkv = 0, |s| s.batch = usize::MAX, |s| s.hkv = 1 << 40]),
            ("capacity", &[|s| s.capacity = 0, |s| s.capacity = usize::MAX]),
            ("head_dim", &[|s| s.head_dim = 0, |s| s.head_dim = 12, |s| s.head_dim = MAX_HEAD_DIM + 8]),
            ("page_size", &[|s| s.page_size = 0, |s| s.page_size = MAX_PAGE_SIZE + 1]),
        ],
    );
    let mut s = meta();
    s.head_dim = MAX_HEAD_DIM;
    s.page_size = MAX_PAGE_SIZE;
    assert!(s.validate().is_ok());
}

#[test]
fn select_shape_boundaries() {
    assert_rejects(
        quest(),
        QuestSelectShape::validate,
        &[
            ("hq", &[|s| s.hq = 3, |s| s.hq = 0]),
            ("q_tokens", &[|s| s.q_tokens = 0, |s| s.q_tokens = 17]),
            ("budget", &[|s| s.budget = 0, |s| s.budget = 16385]),
            ("head_dim", &[|s| s.head_dim = 20]),
        ],
    );
    let mut s = quest();
    s.budget = 16384;
    assert!(s.validate().is_ok());
    s.batch = 1 << 20;
    s.capacity = 1 << 30;
    s.page_size = 1;
    assert!(s.validate().is_err());

    assert_rejects(
        lsel(),
        LandmarkSelectShape::validate,
        &[
            // 16384 chunks plus one outlier
            ("budget", &[|s| s.budget = 0, |s| s.budget = 16384]),
            ("outliers", &[|s| s.outliers = 16385]),
            ("hq", &[|s| s.hq = 5]),
            ("q_tokens", &[|s| s.q_tokens = 17]),
        ],
    );
    let mut l = lmark();
    l.outliers = 16385;
    assert_eq!(names(l.validate().unwrap_err()), "outliers");
    l.outliers = 0;
    assert!(l.validate().is_ok());
}

#[test]
fn lens_are_checked() {
    assert!(validate_lens(&[40, 0], 2, 40).is_ok());
    assert_eq!(names(validate_lens(&[41, 0], 2, 40).unwrap_err()), "lens");
    assert_eq!(names(validate_lens(&[1], 2, 40).unwrap_err()), "lens");
    assert_eq!(names(validate_lens(&[1, 2, 3], 2, 40).unwrap_err()), "lens");
}

#[test]
fn references_reject_bad_buffers_and_write_nothing() {
    let s = meta();
    let keys = vec![0.5f32; 2 * 2 * 40 * 16];
    let n = 2 * 2 * 3 * 16;
    assert_eq!(names(cpu::quest_meta(&s, &keys[1..], &[40, 40]).unwrap_err()), "keys");
    assert_eq!(names(cpu::quest_meta(&s, &keys, &[41, 40]).unwrap_err()), "lens");
    let (mut mx, mut mn) = (vec![7.0f32; n], vec![7.0f32; n]);
    let e = cpu::quest_meta_append(&s, &keys, &[20, 10], &[10, 10], &mut mx, &mut mn).unwrap_err();
    assert_eq!(names(e), "lens");
    let e = cpu::quest_meta_append(&s, &keys, &[0, 0], &[10, 10], &mut mx[1..], &mut mn).unwrap_err();
    assert_eq!(names(e), "page_max");
    assert!(mx.iter().chain(&mn).all(|&x| x == 7.0), "nothing written on an error");

    let q = quest();
    let qv = vec![1.0f32; 2 * 4 * 16];
    assert_eq!(names(cpu::quest_select(&q, &qv[1..], &mx, &mn, &[40, 40]).unwrap_err()), "q");
    assert_eq!(names(cpu::quest_select(&q, &qv, &mx[1..], &mn, &[40, 40]).unwrap_err()), "page_max");
    assert_eq!(names(cpu::quest_select(&q, &qv, &mx, &mn, &[40]).unwrap_err()), "lens");

    let l = lsel();
    let lm = cpu::landmarks(&l.landmarks(), &keys, &[40, 33]).unwrap();
    let q2 = vec![1.0f32; 2 * 2 * 4 * 16];
    assert_eq!(names(cpu::landmarks(&l.landmarks(), &keys[..10], &[40, 33]).unwrap_err()), "keys");
    assert_eq!(
        names(cpu::landmark_select(&l, &q2, &lm.landmarks[1..], &lm.outliers, &[40, 33]).unwrap_err()),
        "landmarks"
    );
    assert_eq!(
        names(cpu::landmark_select(&l, &q2, &lm.landmarks, &lm.outliers[1..], &[40, 33]).unwrap_err()),
        "outliers"
    );
    assert_eq!(names(cpu::landmark_select(&l, &q2[1..], &lm.landmarks, &lm.outliers, &[40, 33]).unwrap_err()), "q");
    let mut bad = lsel();
    bad.budget = 0;
    assert_eq!(names(cpu::landmark_select(&bad, &q2, &lm.landmarks, &lm.outliers, &[40, 33]).unwrap_err()), "budget");
}

#[test]
fn non_finite_inputs_do_not_panic() {
    let s = quest();
    let keys: Vec<f32> = (0..2 * 2 * 40 * 16).map(|i| if i % 7 == 0 { f32::NAN } else { f32::INFINITY }).collect();
    let (mx, mn) = cpu::quest_meta(&s.meta(), &keys, &[40, 17]).unwrap();
    let q = vec![f32::NAN; 2 * 4 * 16];
    let sel = cpu::quest_select(&s, &q, &mx, &mn, &[40, 17]).unwrap();
    assert_eq!(sel.indptr.len(), 5);
    let l = lsel();
    let lm = cpu::landmarks(&l.landmarks(), &keys, &[40, 17]).unwrap();
    let q2 = vec![f32::NAN; 2 * 2 * 4 * 16];
    let sel = cpu::landmark_select(&l, &q2, &lm.landmarks, &lm.outliers, &[40, 17]).unwrap();
    assert_eq!(sel.indptr.len(), 5);
}
