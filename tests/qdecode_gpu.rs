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
    let mut plan = QdecodePlan::new(dev, &s, opts).unwrap();
    let got = run(dev, &mut plan, &q, &cache, None);
    let what = format!("kivi seed {seed} {s:?} K {kspec:?} V {vspec:?} residual {rlen}/{rcap} {opts:?}");
    check::<T>(&what, &got, &want);
    // Deterministic: the same bits again.
    let again = run(dev, &mut plan, &q, &cache, None);
    assert_eq!(got.bits, again.bits, "{what}: not deterministic");
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

#[test]
fn kivi_gqa_residual_and_queries() {
    // GQA 1, 3, 8; residual empty, partial, full; Tq 1, 4, 16; bf16 and f16; D 64 and 128.
    kivi_case::<f16>(
        1,
        shape(2, 1, 4, 4, 64, 1024),
        QdecodeOptions::default(),
        256,
        spec(4, 32, Axis::PerChannel),
        spec(4, 32, Axis::PerToken),
        32,
        0,
    );
    kivi_case::<bf16>(
        2,
        shape(1, 1, 6, 2, 128, 1024),
        QdecodeOptions::default(),
        320,
        spec(2, 64, Axis::PerChannel),
        spec(2, 32, Axis::PerToken),
        48,
        48,
    );
    kivi_case::<f16>(
        3,
        shape(1, 4, 16, 2, 128, 4096),
        QdecodeOptions { causal: true, ..Default::default() },
        1024,
        spec(4, 128, Axis::PerChannel),
        spec(8, 64, Axis::PerToken),
        128,
        100,
    );
    kivi_case::<bf16>(
        4,
        shape(1, 16, 8, 1, 64, 700),
        QdecodeOptions { causal: true, ..Default::default() },
        640,
        spec(8, 32, Axis::PerChannel),
        spec(4, 64, Axis::PerToken),
        16,
        16,
    );
    kivi_case::<f16>(
        5,
        shape(1, 2, 3, 1, 128, 600),
        QdecodeOptions { chunk_tokens: Some(64), scale: Some(0.05), ..Default::default() },
        512,
        spec(2, 32, Axis::PerChannel),
        spec(2, 128, Axis::PerToken),
        80,
        77,
    );
    // A long cache, automatic split.
    kivi_case::<f16>(
        6,
        shape(1, 1, 32, 8, 128, 1 << 15),
        QdecodeOptions::default(),
        32000,
        spec(4, 32, Axis::PerChannel),
        spec(4, 32, Axis::PerToken),
        128,
        100,
    );
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

fn mikv_case<T: Float>(
    seed: u64,
    s: QdecodeShape,
    opts: QdecodeOptions,
    t: usize,
    kcfg: MikvConfig,
    vcfg: MikvConfig,
    which: Important,
) {
    let dev = gpu_or_skip!("mikv_case");
    let mut rng = Rng::new(seed);
    let p = mikv_upload(dev, s.cache_heads(), s.head_dim, t, kcfg, vcfg, &mut rng, which);
    let q = q_vec::<T>(&mut rng, &s);
    let (kd, vd) = (p.k_cpu.dequantize_dense().unwrap(), p.v_cpu.dequantize_dense().unwrap());
    let want = reference(&s, &opts, &q, &kd, &vd, t, None);
    let mut plan = QdecodePlan::new(dev, &s, opts).unwrap();
    let got = run(dev, &mut plan, &q, &QdecodeCache::Mikv { k: &p.k, v: &p.v }, None);
    check::<T>(&format!("mikv seed {seed} {s:?} T {t} K {kcfg:?} V {vcfg:?} {which:?}"), &got, &want);
}

#[test]
fn mikv_important_rows_and_lengths() {
    let k = |bits, hi, g, r, cap| mikv_cfg(bits, hi, g, Axis::PerChannel, r, cap);
    let v = |bits, hi, g, r, cap| mikv_cfg(bits, hi, g, Axis::PerToken, r, cap);
    let d = QdecodeOptions::default();
    // 10% important f16 rows, int4, T not a group multiple.
    mikv_case::<f16>(
        11,
        shape(1, 1, 8, 8, 128, 4096),
        d,
        3001,
        k(4, HiPrecision::F16, 32, 128, 4096),
        v(4, HiPrecision::F16, 32, 128, 4096),
        Important::Every(10),
    );
    // int2 with int8 important rows, GQA 3.
    mikv_case::<bf16>(
        12,
        shape(1, 1, 6, 2, 64, 2048),
        d,
        1500,
        k(2, HiPrecision::Int8, 64, 64, 2048),
        v(2, HiPrecision::Int8, 64, 64, 2048),
        Important::Every(5),
    );
    // All tokens important / none important, GQA 8, several queries.
    mikv_case::<f16>(
        13,
        shape(1, 3, 8, 1, 128, 1024),
        QdecodeOptions { causal: true, ..d },
        777,
        k(4, HiPrecision::Int8, 128, 0, 1024),
        v(2, HiPrecision::F16, 32, 0, 1024),
        Important::All,
    );
    mikv_case::<f16>(
        14,
        shape(2, 1, 2, 2, 64, 1024),
        d,
        999,
        k(4, HiPrecision::F16, 32, 32, 1024),
        v(4, HiPrecision::F16, 32, 32, 1024),
        Important::None,
    );
    // Residual window full (T < R: nothing quantized yet) and exactly at a block edge.
    mikv_case::<f16>(
        15,
        shape(1, 1, 4, 4, 128, 512),
        d,
        100,
        k(4, HiPrecision::F16, 64, 128, 512),
        v(4, HiPrecision::F16, 64, 128, 512),
        Important::Every(3),
    );
    mikv_case::<bf16>(
        16,
        shape(1, 1, 4, 4, 128, 512),
        QdecodeOptions { chunk_tokens: Some(96), ..d },
        256,
        k(2, HiPrecision::F16, 64, 64, 512),
        v(2, HiPrecision::Int8, 64, 64, 512),
        Important::Every(7),
    );
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
