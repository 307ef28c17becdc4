//! The fused quantized decode on the GPU against the f64 reference over `dequantize_dense`
//! (relative L2 ≤ 5e-4 for f16 `o`, ≤ 4e-3 for bf16; lse within 1e-3 + 1e-4·|lse|): KIVI
//! caches at every bit width and group, residual windows empty, partial and full, GQA 1, 3
//! and 8, several query tokens, causal, forced splits; MiKV caches with f16 and int8
//! important rows, all and no token important, lengths that are not a group multiple; CSR
//! lists; append → decode equal bit for bit to prefill → decode with one reused plan; and
//! the same bits run after run.

mod common;
mod qdecode_support;

use half::{bf16, f16};
use ntkv::qdecode::{KiviCache, QdecodeCache, QdecodeLists, QdecodeOptions, QdecodePlan, QdecodeShape};
use ntkv::quant::{Axis, HiPrecision, MikvCache, MikvConfig, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::{DType, Device, DeviceTensor, Float};
use qdecode_support::*;

fn tol<T: Float>() -> f64 {
    if T::DTYPE == DType::F16 {
        5e-4
    } else {
        4e-3
    }
}

struct Out {
    o: Vec<f64>,
    lse: Vec<f64>,
    bits: Vec<u32>,
}

fn run<T: Float>(
    dev: &Device,
    plan: &mut QdecodePlan,
    q: &[T],
    cache: &QdecodeCache<'_>,
    lists: Option<&QdecodeLists<'_>>,
) -> Out {
    let s = plan.shape().clone();
    let qd = DeviceTensor::from_host(dev, q, &s.q_shape()).unwrap();
    let mut o = DeviceTensor::<T>::zeros(dev, &s.q_shape()).unwrap();
    let mut lse = DeviceTensor::<f32>::zeros(dev, &s.lse_shape()).unwrap();
    plan.run(&qd, cache, lists, &mut o, &mut lse).unwrap();
    let oh = o.to_host().unwrap();
    Out {
        o: oh.iter().map(|x| f64::from(x.to_f32())).collect(),
        lse: lse.to_host().unwrap().iter().map(|&x| f64::from(x)).collect(),
        bits: oh.iter().map(|x| x.to_f32().to_bits()).collect(),
    }
}

fn check<T: Float>(what: &str, got: &Out, want: &ntkv::qdecode::cpu::QdecodeReference) {
    common::assert_rel_l2(&format!("{what}: o"), &got.o, &want.o, tol::<T>());
    common::assert_close(&format!("{what}: lse"), &got.lse, &want.lse, 1e-4, 1e-3);
}

struct KiviDev {
    k: QuantizedTensor,
    v: QuantizedTensor,
    kr: DeviceTensor<f16>,
    vr: DeviceTensor<f16>,
}

fn upload_kivi(dev: &Device, s: &QdecodeShape, kv: &Kivi) -> KiviDev {
    let (kl, vl) = kv.layouts();
    let rshape = [s.batch, s.hkv, kv.rcap, s.head_dim];
    KiviDev {
        k: QuantizedTensor::from_host(dev, &kl, &kv.k).unwrap(),
        v: QuantizedTensor::from_host(dev, &vl, &kv.v).unwrap(),
        kr: DeviceTensor::from_host(dev, &kv.k_res, &rshape).unwrap(),
        vr: DeviceTensor::from_host(dev, &kv.v_res, &rshape).unwrap(),
    }
}

#[allow(clippy::too_many_arguments)]
fn kivi_case<T: Float>(
    seed: u64,
    s: QdecodeShape,
    opts: QdecodeOptions,
    tq: usize,
    kspec: QuantSpec,
    vspec: QuantSpec,
    rcap: usize,
    rlen: usize,
) {
    let dev = gpu_or_skip!("kivi_case");
    let mut rng = Rng::new(seed);
    let kv = Kivi::random(&mut rng, &s, tq, kspec, vspec, rcap, rlen);
    let q = q_vec::<T>(&mut rng, &s);
    let (kd, vd) = kv.dense();
    let want = reference(&s, &opts, &q, &kd, &vd, kv.tokens(), None);
    let d = upload_kivi(dev, &s, &kv);
    let cache =
        QdecodeCache::Kivi(KiviCache { k: &d.k, v: &d.v, k_residual: &d.kr, v_residual: &d.vr, residual_len: rlen });
    let what = format!("kivi seed {seed} {s:?} K {kspec:?} V {vspec:?} residual {rlen}/{rcap} {opts:?}");
    // The fast kernel takes KIVI's layout whenever K and V share bits and group.
    let want_fast = kspec.axis == Axis::PerChannel
        && vspec.axis == Axis::PerToken
        && kspec.bits == vspec.bits
        && kspec.group == vspec.group
        && kspec.group <= s.head_dim;
    let fast = check_twice(dev, &what, (&s, opts), &q, &cache, &want);
    assert_eq!(fast, want_fast, "{what}: fast path chosen = {fast}");
}

/// Runs a fresh plan over `cache`, checks it against `want`, then runs it again and requires
/// the same bits. When the run took the fast kernel, runs the general kernel too and checks
/// it against `want`. Returns whether the fast kernel ran.
fn check_twice<T: Float>(
    dev: &Device,
    what: &str,
    (s, opts): (&QdecodeShape, QdecodeOptions),
    q: &[T],
    cache: &QdecodeCache<'_>,
    want: &ntkv::qdecode::cpu::QdecodeReference,
) -> bool {
    let mut plan = QdecodePlan::new(dev, s, opts).unwrap();
    let fast = plan.fast_path_applies(cache);
    let got = run(dev, &mut plan, q, cache, None);
    check::<T>(what, &got, want);
    let again = run(dev, &mut plan, q, cache, None);
    assert_eq!(got.bits, again.bits, "{what}: not deterministic");
    if fast {
        plan.set_fast_path(false);
        assert!(!plan.fast_path_applies(cache), "{what}: the fast path is still chosen after set_fast_path(false)");
        let general = run(dev, &mut plan, q, cache, None);
        check::<T>(&format!("{what} (general kernel)"), &general, want);
    }
    fast
}

fn spec(bits: u32, group: usize, axis: Axis) -> QuantSpec {
    QuantSpec::new(bits, group, axis).unwrap()
}

#[test]
fn kivi_every_bit_width_and_group() {
    let mut seed = 100;
    for bits in [2, 4, 8] {
        for group in [32, 64, 128] {
            seed += 1;
            let s = shape(1, 1, 8, 8, 128, 2048);
            let tq = 512 + group * 2;
            kivi_case::<f16>(
                seed,
                s,
                QdecodeOptions::default(),
                tq,
                spec(bits, group, Axis::PerChannel),
                spec(bits, group, Axis::PerToken),
                64,
                37,
            );
        }
    }
}

/// A KIVI case: (shape (B, Tq, Hq, Hkv, D, capacity), causal, forced chunk, quantized
/// tokens, K spec (bits, group), V spec, residual rows, residual rows in use, bf16).
type KiviRow = (
    (usize, usize, usize, usize, usize, usize),
    bool,
    Option<usize>,
    usize,
    (u32, usize),
    (u32, usize),
    usize,
    usize,
    bool,
);

#[test]
fn kivi_gqa_residual_and_queries() {
    // GQA 1, 3, 8; residual empty, partial, full; Tq 1 to 16; f16 and bf16; D 64 and 128;
    // forced splits; a long cache with the automatic split.
    let rows: &[KiviRow] = &[
        ((2, 1, 4, 4, 64, 1024), false, None, 256, (4, 32), (4, 32), 32, 0, false),
        ((1, 1, 6, 2, 128, 1024), false, None, 320, (2, 64), (2, 32), 48, 48, true),
        ((1, 4, 16, 2, 128, 4096), true, None, 1024, (4, 128), (8, 64), 128, 100, false),
        ((1, 16, 8, 1, 64, 700), true, None, 640, (8, 32), (4, 64), 16, 16, true),
        ((1, 2, 3, 1, 128, 600), false, Some(64), 512, (2, 32), (2, 128), 80, 77, false),
        ((1, 1, 32, 8, 128, 1 << 15), false, None, 32000, (4, 32), (4, 32), 128, 100, false),
    ];
    for (i, &((b, tq, hq, hkv, d, cap), causal, chunk, n, (kb, kg), (vb, vg), rcap, rlen, bf)) in
        rows.iter().enumerate()
    {
        let s = shape(b, tq, hq, hkv, d, cap);
        let opts = QdecodeOptions { causal, chunk_tokens: chunk, scale: if i == 4 { Some(0.05) } else { None } };
        let (ks, vs) = (spec(kb, kg, Axis::PerChannel), spec(vb, vg, Axis::PerToken));
        if bf {
            kivi_case::<bf16>(i as u64 + 1, s, opts, n, ks, vs, rcap, rlen);
        } else {
            kivi_case::<f16>(i as u64 + 1, s, opts, n, ks, vs, rcap, rlen);
        }
    }
}

struct MikvPair {
    k: MikvCache,
    v: MikvCache,
    k_cpu: ntkv::quant::cpu::MikvCacheCpu,
    v_cpu: ntkv::quant::cpu::MikvCacheCpu,
}

#[allow(clippy::too_many_arguments)]
fn mikv_upload(
    dev: &Device,
    h: usize,
    d: usize,
    t: usize,
    kcfg: MikvConfig,
    vcfg: MikvConfig,
    rng: &mut Rng,
    which: Important,
) -> MikvPair {
    let MikvPrefill { k: kx, v: vx, k_important: ki, v_important: vi } = mikv_pair(rng, h, d, t, kcfg, vcfg, which);
    let kxd = DeviceTensor::from_host(dev, &kx, &[h, t, d]).unwrap();
    let vxd = DeviceTensor::from_host(dev, &vx, &[h, t, d]).unwrap();
    use ntkv::quant::cpu::MikvCacheCpu;
    MikvPair {
        k: MikvCache::from_prefill(dev, kcfg, &kxd, &ki).unwrap(),
        v: MikvCache::from_prefill(dev, vcfg, &vxd, &vi).unwrap(),
        k_cpu: MikvCacheCpu::from_prefill(kcfg, &kx, &[h, t, d], &ki).unwrap(),
        v_cpu: MikvCacheCpu::from_prefill(vcfg, &vx, &[h, t, d], &vi).unwrap(),
    }
}

/// A MiKV cache of `t` tokens with the K and V configurations `cfg`.
fn mikv_case<T: Float>(
    seed: u64,
    (s, opts): (QdecodeShape, QdecodeOptions),
    t: usize,
    cfg: [MikvConfig; 2],
    which: Important,
) {
    let [kcfg, vcfg] = cfg;
    let dev = gpu_or_skip!("mikv_case");
    let mut rng = Rng::new(seed);
    let p = mikv_upload(dev, s.n_lists(), s.head_dim, t, kcfg, vcfg, &mut rng, which);
    let q = q_vec::<T>(&mut rng, &s);
    let (kd, vd) = (p.k_cpu.dequantize_dense().unwrap(), p.v_cpu.dequantize_dense().unwrap());
    let want = reference(&s, &opts, &q, &kd, &vd, t, None);
    let what = format!("mikv seed {seed} {s:?} T {t} K {kcfg:?} V {vcfg:?} {which:?}");
    check_twice(dev, &what, (&s, opts), &q, &QdecodeCache::Mikv { k: &p.k, v: &p.v }, &want);
}

/// A MiKV case: (shape (B, Tq, Hq, Hkv, D, capacity), causal, forced chunk, tokens, K
/// (bits, hi, group, residual), V likewise, important tokens, bf16).
type MikvRow = (
    (usize, usize, usize, usize, usize, usize),
    bool,
    Option<usize>,
    usize,
    (u32, HiPrecision, usize, usize),
    (u32, HiPrecision, usize, usize),
    Important,
    bool,
);

#[test]
fn mikv_important_rows_and_lengths() {
    use HiPrecision::{Int8, F16};
    let rows: &[MikvRow] = &[
        // 10% important f16 rows, int4, T not a group multiple.
        ((1, 1, 8, 8, 128, 4096), false, None, 3001, (4, F16, 32, 128), (4, F16, 32, 128), Important::Every(10), false),
        // int2 with int8 important rows, GQA 3.
        ((1, 1, 6, 2, 64, 2048), false, None, 1500, (2, Int8, 64, 64), (2, Int8, 64, 64), Important::Every(5), true),
        // All tokens important, GQA 8, several causal queries; then none important.
        ((1, 3, 8, 1, 128, 1024), true, None, 777, (4, Int8, 128, 0), (2, F16, 32, 0), Important::All, false),
        ((2, 1, 2, 2, 64, 1024), false, None, 999, (4, F16, 32, 32), (4, F16, 32, 32), Important::None, false),
        // Residual window full (T < R: nothing quantized yet) and exactly at a block edge.
        ((1, 1, 4, 4, 128, 512), false, None, 100, (4, F16, 64, 128), (4, F16, 64, 128), Important::Every(3), false),
        ((1, 1, 4, 4, 128, 512), false, Some(128), 256, (2, F16, 64, 64), (2, Int8, 64, 64), Important::Every(7), true),
    ];
    for (i, &((b, tq, hq, hkv, d, cap), causal, chunk, t, (kb, kh, kg, kr), (vb, vh, vg, vr), which, bf)) in
        rows.iter().enumerate()
    {
        let s = shape(b, tq, hq, hkv, d, cap);
        let opts = QdecodeOptions { causal, chunk_tokens: chunk, scale: None };
        let kcfg = mikv_cfg(kb, kh, kg, Axis::PerChannel, kr, cap);
        let vcfg = mikv_cfg(vb, vh, vg, Axis::PerToken, vr, cap);
        if bf {
            mikv_case::<bf16>(i as u64 + 11, (s, opts), t, [kcfg, vcfg], which);
        } else {
            mikv_case::<f16>(i as u64 + 11, (s, opts), t, [kcfg, vcfg], which);
        }
    }
}

#[test]
fn lists_compose_with_quantization() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(21);
    let s = shape(1, 2, 8, 2, 128, 2048);
    let t = 1500;
    let p = mikv_upload(
        dev,
        2,
        128,
        t,
        mikv_cfg(4, HiPrecision::F16, 32, Axis::PerChannel, 64, 2048),
        mikv_cfg(4, HiPrecision::Int8, 32, Axis::PerToken, 64, 2048),
        &mut rng,
        Important::Every(8),
    );
    let (indptr, indices) = random_lists(&mut rng, 2, t);
    let q = q_vec::<f16>(&mut rng, &s);
    let (kd, vd) = (p.k_cpu.dequantize_dense().unwrap(), p.v_cpu.dequantize_dense().unwrap());
    let want = reference(&s, &QdecodeOptions::default(), &q, &kd, &vd, t, Some((&indptr, &indices)));
    let ip = DeviceTensor::from_host(dev, &indptr, &[indptr.len()]).unwrap();
    let ix = DeviceTensor::from_host(dev, &indices, &[indices.len()]).unwrap();
    let lists = QdecodeLists::new(dev, &s, t, &ip, &ix).unwrap();
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions { chunk_tokens: Some(128), ..Default::default() }).unwrap();
    let got = run(dev, &mut plan, &q, &QdecodeCache::Mikv { k: &p.k, v: &p.v }, Some(&lists));
    check::<f16>("mikv over lists", &got, &want);
}

#[test]
fn append_then_decode_equals_prefill_then_decode() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(31);
    let (h, d, t0, n) = (4, 128, 300, 70);
    let s = shape(1, 1, 8, 4, d, 1024);
    let kcfg = mikv_cfg(4, HiPrecision::F16, 32, Axis::PerChannel, 64, 1024);
    let vcfg = mikv_cfg(2, HiPrecision::Int8, 32, Axis::PerToken, 64, 1024);
    let kx = f16_vec(&mut rng, h * (t0 + n) * d);
    let vx = f16_vec(&mut rng, h * (t0 + n) * d);
    let imp = important_lists(&mut rng, h, t0, Important::Every(10));
    let prefix = |x: &[f16], t: usize| -> Vec<f16> {
        (0..h).flat_map(|hh| x[hh * (t0 + n) * d..(hh * (t0 + n) + t) * d].to_vec()).collect()
    };
    let token = |x: &[f16], i: usize| -> Vec<f16> {
        (0..h).flat_map(|hh| x[(hh * (t0 + n) + i) * d..(hh * (t0 + n) + i + 1) * d].to_vec()).collect()
    };
    let up = |x: Vec<f16>, t: usize| DeviceTensor::from_host(dev, &x, &[h, t, d]).unwrap();
    let mut k = MikvCache::from_prefill(dev, kcfg, &up(prefix(&kx, t0), t0), &imp).unwrap();
    let mut v = MikvCache::from_prefill(dev, vcfg, &up(prefix(&vx, t0), t0), &imp).unwrap();
    let mut plan = QdecodePlan::new(dev, &s, QdecodeOptions::default()).unwrap();
    for i in t0..t0 + n {
        let q = q_vec::<f16>(&mut rng, &s);
        let stepped = run(dev, &mut plan, &q, &QdecodeCache::Mikv { k: &k, v: &v }, None);
        // The same tokens as one prefill.
        let kp = MikvCache::from_prefill(dev, kcfg, &up(prefix(&kx, i), i), &imp).unwrap();
        let vp = MikvCache::from_prefill(dev, vcfg, &up(prefix(&vx, i), i), &imp).unwrap();
        let fresh = run(dev, &mut plan, &q, &QdecodeCache::Mikv { k: &kp, v: &vp }, None);
        assert_eq!(stepped.bits, fresh.bits, "step {i}: append differs from prefill");
        if i % 16 == 0 {
            let want = reference(
                &s,
                &QdecodeOptions::default(),
                &q,
                &kp.to_cpu().unwrap().dequantize_dense().unwrap(),
                &vp.to_cpu().unwrap().dequantize_dense().unwrap(),
                i,
                None,
            );
            check::<f16>(&format!("step {i}"), &stepped, &want);
        }
        k.append(&DeviceTensor::from_host(dev, &token(&kx, i), &[h, d]).unwrap()).unwrap();
        v.append(&DeviceTensor::from_host(dev, &token(&vx, i), &[h, d]).unwrap()).unwrap();
    }
}
