//! Every lowrank validator at its boundary: typed errors naming the argument, no panics,
//! and (with a GPU) nothing written when a plan or a run refuses its input.

mod common;

use ntkv::lowrank::{
    cpu, validate_layout, FactorOptions, FactorPlan, FactorShape, KeyLayout, ReconstructPlan, ReconstructShape,
    RopeOptions, MAX_RANK,
};
use ntkv::{DeviceTensor, Error};

/// Asserts that `r` is a typed refusal naming `name`; acceptance or any other kind of error
/// fails the test (`context` says which case of a table it was).
#[track_caller]
fn refuses<T>(r: Result<T, Error>, name: &str, context: &dyn std::fmt::Debug) {
    match r {
        Err(Error::InvalidArgument { arg, .. } | Error::Shape { arg, .. } | Error::TooLarge { arg, .. }) => {
            assert_eq!(arg, name, "{context:?}")
        }
        Err(other) => panic!("expected a refusal naming {name}, got {other:?} ({context:?})"),
        Ok(_) => panic!("expected a refusal naming {name}, but it was accepted ({context:?})"),
    }
}

fn fshape(t: usize, hkv: usize, d: usize, r: usize) -> FactorShape {
    FactorShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r }
}

#[test]
fn rank_above_min_t_n_is_refused() {
    // min(T, N) = min(10, 2*4) = 8.
    assert!(fshape(10, 2, 4, 8).validate().is_ok());
    refuses(fshape(10, 2, 4, 9).validate(), "rank", &"");
    refuses(fshape(6, 2, 4, 7).validate(), "rank", &"");
    // Per-sequence lengths: rank 5 with a 4-token sequence.
    let s = FactorShape { batch: 2, capacity: 10, kv_heads: 2, head_dim: 4, rank: 5 };
    refuses(s.validate_seq_lens(&[10, 4]), "rank", &"");
    assert!(s.validate_seq_lens(&[10, 5]).is_ok());
    refuses(s.validate_seq_lens(&[10, 0]), "seq_lens", &"");
    refuses(s.validate_seq_lens(&[10, 11]), "seq_lens", &"");
    refuses(s.validate_seq_lens(&[10]), "seq_lens", &"");
    let big = FactorShape { batch: 1, capacity: 5000, kv_heads: 16, head_dim: 128, rank: MAX_RANK + 1 };
    refuses(big.validate(), "rank", &"");
    for (s, name) in [
        (FactorShape { batch: 0, ..fshape(10, 2, 4, 2) }, "batch"),
        (fshape(0, 2, 4, 1), "capacity"),
        (fshape(10, 0, 4, 1), "kv_heads"),
        (fshape(10, 2, 0, 1), "head_dim"),
        (fshape(10, 2, 4, 0), "rank"),
    ] {
        refuses(s.validate(), name, &"");
    }
    let absurd = FactorShape { batch: usize::MAX, capacity: usize::MAX / 2, kv_heads: 3, head_dim: 3, rank: 1 };
    assert!(absurd.validate().is_err());
    // The CPU reference refuses the same way and checks k's length.
    let k = vec![0f32; 10 * 8];
    refuses(cpu::factorize(&fshape(10, 2, 4, 9), &FactorOptions::default(), &[10], &k), "rank", &"");
    refuses(cpu::factorize(&fshape(10, 2, 4, 2), &FactorOptions::default(), &[10], &k[1..]), "k", &"");
    let bad_q = FactorOptions { power_iters: 17, ..FactorOptions::default() };
    refuses(bad_q.validate(), "power_iters", &"");
    let bad_p = FactorOptions { oversample: 5000, ..FactorOptions::default() };
    refuses(bad_p.validate(), "oversample", &"");
}

fn rshape() -> ReconstructShape {
    ReconstructShape { batch: 2, capacity: 100, kv_heads: 2, head_dim: 64, rank: 4 }
}

fn check_lists(indptr: &[u32], indices: &[u32]) -> Result<(), Error> {
    rshape().validate_lists(&[100, 50], indptr, indices)
}

#[test]
fn lists_out_of_range_unsorted_duplicate() {
    assert!(check_lists(&[0, 2, 3, 5, 5], &[0, 99, 5, 0, 49]).is_ok());
    // Position 50 in sequence 1 (seq_lens[1] = 50).
    let e = check_lists(&[0, 2, 3, 5, 5], &[0, 99, 5, 0, 50]).unwrap_err();
    assert!(e.to_string().contains("not below"), "{e}");
    refuses(Err::<(), _>(e), "indices", &"");
    // Position 100 in sequence 0.
    refuses(check_lists(&[0, 2, 3, 3, 3], &[0, 100, 5]), "indices", &"");
    // Unsorted.
    let e = check_lists(&[0, 2, 3, 3, 3], &[9, 3, 5]).unwrap_err();
    assert!(e.to_string().contains("sorted"), "{e}");
    // Duplicate.
    let e = check_lists(&[0, 2, 3, 3, 3], &[9, 9, 5]).unwrap_err();
    assert!(e.to_string().contains("repeats"), "{e}");
    // indptr problems.
    refuses(check_lists(&[0, 2, 3, 3], &[1, 2, 3]), "indptr", &"");
    refuses(check_lists(&[1, 2, 3, 3, 3], &[1, 2, 3]), "indptr", &"");
    refuses(check_lists(&[0, 2, 1, 3, 3], &[1, 2, 3]), "indptr", &"");
    refuses(check_lists(&[0, 2, 3, 3, 9], &[1, 2, 3]), "indptr", &"");
    // seq_lens.
    refuses(rshape().validate_lists(&[100], &[0, 0, 0, 0, 0], &[]), "seq_lens", &"");
    refuses(rshape().validate_lists(&[101, 1], &[0, 0, 0, 0, 0], &[]), "seq_lens", &"");
}

#[test]
fn shapes_options_layouts() {
    for (s, name) in [
        (ReconstructShape { head_dim: 96, ..rshape() }, "head_dim"),
        (ReconstructShape { head_dim: 0, ..rshape() }, "head_dim"),
        (ReconstructShape { rank: 0, ..rshape() }, "rank"),
        (ReconstructShape { rank: MAX_RANK + 1, ..rshape() }, "rank"),
        (ReconstructShape { batch: 0, ..rshape() }, "batch"),
        (ReconstructShape { kv_heads: 0, ..rshape() }, "kv_heads"),
        (ReconstructShape { capacity: (1 << 24) + 1, ..rshape() }, "capacity"),
    ] {
        refuses(s.validate(), name, &s);
    }
    for base in [f32::NAN, f32::INFINITY, 1.0, -3.0] {
        refuses(RopeOptions { base }.validate(), "base", &"");
    }
    let indptr = [0u32, 3, 3, 10, 12];
    assert!(validate_layout(&rshape(), KeyLayout::Gathered { budget: 7 }, &indptr).is_ok());
    refuses(validate_layout(&rshape(), KeyLayout::Gathered { budget: 6 }, &indptr), "budget", &"");
    refuses(validate_layout(&rshape(), KeyLayout::Gathered { budget: 0 }, &[0, 0, 0, 0, 0]), "budget", &"");
    assert!(validate_layout(&rshape(), KeyLayout::Gathered { budget: usize::MAX }, &indptr).is_err());
    // The reference checks the factor lengths.
    let u = vec![0f32; 2 * 100 * 4];
    let sv = vec![0f32; 2 * 4 * 128];
    let ok = cpu::reconstruct(&rshape(), &RopeOptions::default(), &[100, 50], &u, &sv, &[0, 1, 1, 1, 1], &[3]);
    assert!(ok.is_ok());
    let e = cpu::reconstruct(&rshape(), &RopeOptions::default(), &[100, 50], &u[1..], &sv, &[0, 1, 1, 1, 1], &[3]);
    refuses(e, "u", &"");
    let e = cpu::reconstruct(&rshape(), &RopeOptions::default(), &[100, 50], &u, &sv[1..], &[0, 1, 1, 1, 1], &[3]);
    refuses(e, "sv", &"");
}

#[test]
fn gpu_plans_refuse_and_write_nothing() {
    let dev = gpu_or_skip!();
    let s = rshape();
    let seq = [100u32, 50];
    let u = DeviceTensor::<f32>::zeros(dev, &s.u_shape()).unwrap();
    let sv = DeviceTensor::<f32>::zeros(dev, &s.sv_shape()).unwrap();
    let bad: [(&[u32], &[u32], &str); 4] = [
        (&[0, 2, 3, 5, 5], &[0, 99, 5, 0, 50], "indices"),
        (&[0, 2, 3, 3, 3], &[9, 3, 5], "indices"),
        (&[0, 2, 3, 3, 3], &[9, 9, 5], "indices"),
        (&[0, 2, 1, 3, 3], &[1, 2, 3], "indptr"),
    ];
    for (ip, ix, name) in bad {
        let indptr = DeviceTensor::from_host(dev, ip, &[ip.len()]).unwrap();
        let indices = DeviceTensor::from_host(dev, ix, &[ix.len()]).unwrap();
        let plan = ReconstructPlan::new(dev, &s, RopeOptions::default(), KeyLayout::Compact, &seq, &indptr, &indices);
        refuses(plan, name, &(ip, ix));
    }
    // A good plan refuses wrong buffers and leaves the output untouched.
    let indptr = DeviceTensor::from_host(dev, &[0u32, 2, 3, 5, 5], &[5]).unwrap();
    let indices = DeviceTensor::from_host(dev, &[0u32, 99, 5, 0, 49], &[5]).unwrap();
    let plan = ReconstructPlan::new(
        dev,
        &s,
        RopeOptions::default(),
        KeyLayout::Gathered { budget: 2 },
        &seq,
        &indptr,
        &indices,
    )
    .unwrap();
    let sentinel = vec![7.5f32; 2 * 2 * 2 * 64];
    let mut out = DeviceTensor::from_host(dev, &sentinel, &[2, 2, 2, 64]).unwrap();
    let short_u = DeviceTensor::<f32>::zeros(dev, &[2, 100, 3]).unwrap();
    refuses(plan.run(&short_u, &sv, &mut out), "u", &"");
    let mut wrong = DeviceTensor::<f32>::zeros(dev, &[2, 2, 3, 64]).unwrap();
    refuses(plan.run(&u, &sv, &mut wrong), "out", &"");
    assert_eq!(out.to_host().unwrap(), sentinel);
    // Factorization: rank above min(T, N) of a sequence.
    let fs = FactorShape { batch: 2, capacity: 20, kv_heads: 1, head_dim: 8, rank: 6 };
    refuses(FactorPlan::new(dev, &fs, FactorOptions::default(), &[20, 5]), "rank", &"");
}
