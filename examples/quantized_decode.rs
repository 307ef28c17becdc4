//! Decode attention over a KIVI-layout int4 cache: keys quantized per channel and values per
//! token (group 32) plus an f16 residual window, read in one pass with no dequantized copy.
//! Runs the plan's choice (the fast KIVI-layout kernel) and the general kernel, and compares
//! both with the CPU reference (f64 attention over `dequantize_dense`'s output).
//!
//! `cargo run --example quantized_decode` (prints why and exits cleanly without a GPU).

use half::f16;
use ntkv::qdecode::{cpu, KiviCache, QdecodeCache, QdecodeOptions, QdecodePlan, QdecodeShape};
use ntkv::quant::{Axis, QuantLayout, QuantSpec, QuantizedTensor};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn rel_l2(got: &[f16], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(g.to_f32()) - w).powi(2);
        den += w * w;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn main() -> anyhow::Result<()> {
    let device = match Device::new(0) {
        Ok(d) if ntkv::kernels_built() => d,
        Ok(_) => {
            println!("kernels not built (no nvcc at build time): nothing to run");
            return Ok(());
        }
        Err(e) => {
            println!("no GPU: {e}");
            return Ok(());
        }
    };
    // One sequence, 32 query heads over 8 kv heads (GQA 4), 8192 quantized tokens and 100 of
    // a 128-row residual window.
    let (hq, hkv, d, tq, rcap, rlen) = (32usize, 8usize, 128usize, 8192usize, 128usize, 100usize);
    let shape = QdecodeShape { batch: 1, q_tokens: 1, hq, hkv, head_dim: d, capacity: tq + rcap };
    let mut rng = Rng::new(7);
    let mut f16s = |n: usize| -> Vec<f16> { rng.normal_vec(n).into_iter().map(f16::from_f32).collect() };
    let (keys, values) = (f16s(hkv * tq * d), f16s(hkv * tq * d));
    let (k_res, v_res) = (f16s(hkv * rcap * d), f16s(hkv * rcap * d));
    let q = f16s(hq * d);

    // Quantize (KIVI: keys per channel, values per token) and upload.
    let dims = [hkv, tq, d];
    let kspec = QuantSpec::new(4, 32, Axis::PerChannel)?;
    let vspec = QuantSpec::new(4, 32, Axis::PerToken)?;
    let (kq, vq) =
        (ntkv::quant::cpu::quantize(kspec, &dims, &keys)?, ntkv::quant::cpu::quantize(vspec, &dims, &values)?);
    let k = QuantizedTensor::from_host(&device, &QuantLayout::new(kspec, &dims)?, &kq)?;
    let v = QuantizedTensor::from_host(&device, &QuantLayout::new(vspec, &dims)?, &vq)?;
    let rshape = [1, hkv, rcap, d];
    let kr = DeviceTensor::from_host(&device, &k_res, &rshape)?;
    let vr = DeviceTensor::from_host(&device, &v_res, &rshape)?;
    let cache = QdecodeCache::Kivi(KiviCache { k: &k, v: &v, k_residual: &kr, v_residual: &vr, residual_len: rlen });

    // The reference over exactly what the cache stores.
    let kd = cpu::kivi_dense(kspec, dims, &kq, &k_res, rcap, rlen)?;
    let vd = cpu::kivi_dense(vspec, dims, &vq, &v_res, rcap, rlen)?;
    let want = cpu::reference(&shape, &QdecodeOptions::default(), &q, &kd, &vd, tq + rlen, None)?;

    let qd = DeviceTensor::from_host(&device, &q, &shape.q_shape())?;
    let mut o = DeviceTensor::<f16>::zeros(&device, &shape.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(&device, &shape.lse_shape())?;
    let mut plan = QdecodePlan::new(&device, &shape, QdecodeOptions::default())?;
    for fast in [true, false] {
        plan.set_fast_path(fast);
        let kernel = if plan.fast_path_applies(&cache) { "fast KIVI-layout kernel" } else { "general kernel" };
        plan.run(&qd, &cache, None, &mut o, &mut lse)?;
        let err = rel_l2(&o.to_host()?, &want.o);
        println!("{kernel}: relative L2 error of o against the reference {err:.2e} (bound 5e-4)");
        anyhow::ensure!(err <= 5e-4, "{kernel}: error {err:.2e} above the f16 bound");
    }
    Ok(())
}
