//! Every validator of the quantized decode at its boundary, absurd sizes, and no panics: the
//! shape, the options, the CPU reference's inputs and lists, and (with a GPU) the plan's
//! checks of the cache against it, each leaving `o` and `lse` untouched.

mod common;

use common::arg_of;
mod qdecode_support;

use half::f16;
use ntkv::qdecode::{cpu, KiviCache, QdecodeCache, QdecodeLists, QdecodeOptions, QdecodePlan, QdecodeShape};
use ntkv::quant::{Axis, HiPrecision, MikvCache, QuantLayout, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::DeviceTensor;
use qdecode_support::*;

// The shape and the options are decode's (`QdecodeShape = DecodeShape`): tests/decode_cpu.rs
// checks every field of both at its boundaries.

#[test]
fn reference_rejects_bad_inputs() {
    let mut rng = Rng::new(7);
    let s = shape(1, 1, 2, 2, 64, 10);
    let q = q_vec::<f16>(&mut rng, &s);
    let kv = f16_vec(&mut rng, 2 * 8 * 64);
    let o = QdecodeOptions::default();
    let r = |q: &[f16], k: &[f16], t: usize, l: Option<(&[u32], &[u32])>| {
        cpu::reference(&s, &o, q, k, &kv[..k.len().min(kv.len())], t, l)
    };
    assert_eq!(arg_of(&r(&q[1..], &kv, 8, None).unwrap_err()), "q");
    assert_eq!(arg_of(&r(&q, &kv[1..], 8, None).unwrap_err()), "k");
    assert_eq!(arg_of(&r(&q, &kv, 11, None).unwrap_err()), "tokens");
    assert_eq!(arg_of(&cpu::reference(&s, &o, &q, &kv, &kv[1..], 8, None).unwrap_err()), "v");
    // Lists: wrong length, unsorted, out of range.
    assert_eq!(arg_of(&r(&q, &kv, 8, Some((&[0, 1], &[0]))).unwrap_err()), "indptr");
    assert_eq!(arg_of(&r(&q, &kv, 8, Some((&[0, 2, 2], &[3, 1]))).unwrap_err()), "indices");
    assert_eq!(arg_of(&r(&q, &kv, 8, Some((&[0, 1, 1], &[8]))).unwrap_err()), "indices");
    assert_eq!(arg_of(&r(&q, &kv, 8, Some((&[0, 1, 5], &[0]))).unwrap_err()), "indptr");
    let bad = QdecodeShape { head_dim: 65, ..s.clone() };
    assert_eq!(arg_of(&cpu::reference(&bad, &o, &q, &kv, &kv, 8, None).unwrap_err()), "head_dim");
    // Absurd KIVI reconstructions are errors, not panics.
    let spec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let qh = ntkv::quant::cpu::QuantizedHost::default();
    assert!(cpu::kivi_dense(spec, [usize::MAX, 2, 64], &qh, &[], 1, 0).is_err());
    assert!(cpu::kivi_dense(spec, [1, 2, 64], &qh, &[], 1, 0).is_err());
}

fn sentinel_outputs(dev: &ntkv::Device, s: &QdecodeShape) -> (DeviceTensor<f16>, DeviceTensor<f32>) {
    let o =
        DeviceTensor::from_host(dev, &vec![f16::from_f32(7.0); s.q_shape().iter().product()], &s.q_shape()).unwrap();
    let l = DeviceTensor::from_host(dev, &vec![7.0f32; s.lse_shape().iter().product()], &s.lse_shape()).unwrap();
    (o, l)
}

fn untouched(o: &DeviceTensor<f16>, l: &DeviceTensor<f32>) {
    assert!(o.to_host().unwrap().iter().all(|x| x.to_f32() == 7.0), "o was written");
    assert!(l.to_host().unwrap().iter().all(|&x| x == 7.0), "lse was written");
}

#[test]
fn plan_rejects_mismatched_caches_and_writes_nothing() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(8);
    let s = shape(1, 1, 4, 2, 64, 256);
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions::default()).unwrap();
    let q = DeviceTensor::from_host(dev, &q_vec::<f16>(&mut rng, &s), &s.q_shape()).unwrap();
    let (mut o, mut l) = sentinel_outputs(dev, &s);
    let kspec = QuantSpec::new(4, 32, Axis::PerChannel).unwrap();
    let vspec = QuantSpec::new(4, 32, Axis::PerToken).unwrap();
    let up = |spec, dims: &[usize]| {
        let layout = QuantLayout::new(spec, dims).unwrap();
        let host = ntkv::quant::cpu::quantize(spec, dims, &f16_vec(&mut Rng::new(9), dims.iter().product())).unwrap();
        QuantizedTensor::from_host(dev, &layout, &host).unwrap()
    };
    let k = up(kspec, &[1, 2, 64, 64]);
    let v = up(vspec, &[1, 2, 64, 64]);
    let v_short = up(vspec, &[1, 2, 32, 64]);
    let k_heads = up(kspec, &[1, 3, 64, 64]);
    let k_d128 = up(kspec, &[1, 2, 64, 128]);
    let res = DeviceTensor::<f16>::zeros(dev, &[1, 2, 8, 64]).unwrap();
    let res_bad = DeviceTensor::<f16>::zeros(dev, &[2, 8, 64]).unwrap();
    let kivi =
        |k, v, kr, vr, n| QdecodeCache::Kivi(KiviCache { k, v, k_residual: kr, v_residual: vr, residual_len: n });
    for (cache, arg) in [
        (kivi(&k_heads, &v, &res, &res, 0), "k"),
        (kivi(&k_d128, &v, &res, &res, 0), "k"),
        (kivi(&k, &v_short, &res, &res, 0), "v"),
        (kivi(&k, &v, &res_bad, &res, 0), "k_residual"),
        (kivi(&k, &v, &res, &res_bad, 0), "v_residual"),
        (kivi(&k, &v, &res, &res, 9), "residual_len"),
    ] {
        let e = plan.run(&q, &cache, None, &mut o, &mut l).unwrap_err();
        assert_eq!(arg_of(&e), arg, "{e}");
    }
    // Wrong q / o / lse shapes.
    let good = kivi(&k, &v, &res, &res, 8);
    let q_bad = DeviceTensor::<f16>::zeros(dev, &[1, 1, 4, 63]).unwrap();
    assert_eq!(arg_of(&plan.run(&q_bad, &good, None, &mut o, &mut l).unwrap_err()), "q");
    let mut l_bad = DeviceTensor::<f32>::zeros(dev, &[1, 4]).unwrap();
    assert_eq!(arg_of(&plan.run(&q, &good, None, &mut o, &mut l_bad).unwrap_err()), "lse");
    // A cache longer than the plan's capacity.
    let small = QdecodePlan::new(dev, &shape(1, 1, 4, 2, 64, 70), QdecodeOptions::default());
    let mut small = small.unwrap();
    assert_eq!(arg_of(&small.run(&q, &good, None, &mut o, &mut l).unwrap_err()), "tokens");
    // MiKV pairs of different lengths or heads.
    let cfg = mikv_cfg(4, HiPrecision::F16, 32, Axis::PerChannel, 32, 256);
    let vcfg = mikv_cfg(4, HiPrecision::F16, 32, Axis::PerToken, 32, 256);
    let mk = |cfg, h: usize, t: usize| {
        let x = DeviceTensor::from_host(dev, &f16_vec(&mut Rng::new(3), h * t * 64), &[h, t, 64]).unwrap();
        MikvCache::from_prefill(dev, cfg, &x, &vec![vec![]; h]).unwrap()
    };
    let (mk_a, mv_a, mv_b, mk_h) = (mk(cfg, 2, 100), mk(vcfg, 2, 100), mk(vcfg, 2, 101), mk(cfg, 1, 100));
    assert_eq!(
        arg_of(&plan.run(&q, &QdecodeCache::Mikv { k: &mk_a, v: &mv_b }, None, &mut o, &mut l).unwrap_err()),
        "v"
    );
    assert_eq!(
        arg_of(&plan.run(&q, &QdecodeCache::Mikv { k: &mk_h, v: &mv_a }, None, &mut o, &mut l).unwrap_err()),
        "k"
    );
    // Lists validated for more tokens than the cache holds; bad lists.
    let indptr = DeviceTensor::from_host(dev, &[0u32, 1, 2], &[3]).unwrap();
    let indices = DeviceTensor::from_host(dev, &[150u32, 3], &[2]).unwrap();
    let lists = QdecodeLists::new(dev, &s, 200, &indptr, &indices).unwrap();
    assert_eq!(
        arg_of(&plan.run(&q, &QdecodeCache::Mikv { k: &mk_a, v: &mv_a }, Some(&lists), &mut o, &mut l).unwrap_err()),
        "lists"
    );
    assert_eq!(arg_of(&QdecodeLists::new(dev, &s, 100, &indptr, &indices).unwrap_err()), "indices");
    assert_eq!(arg_of(&QdecodeLists::new(dev, &s, 300, &indptr, &indices).unwrap_err()), "tokens");
    untouched(&o, &l);
}
