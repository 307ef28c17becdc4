//! One ShadowKV decode step end to end: factor the pre-RoPE keys at prefill, then, with the
//! selected positions on the device, reconstruct the keys (post RoPE) into a gathered cache,
//! gather the values, and run sparse decode, all without a host synchronization; compare with
//! the CPU reference of the whole step.
//!
//! `cargo run --example shadowkv` (prints why and exits cleanly without a GPU).

use half::bf16;
use ntkv::decode::{DecodeOptions, DecodePlan, DecodeShape};
use ntkv::lowrank::{
    cpu, FactorOptions, FactorPlan, FactorShape, KeyLayout, ReconstructPlan, ReconstructShape, RopeOptions,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

fn bf(v: Vec<f32>) -> Vec<bf16> {
    v.into_iter().map(bf16::from_f32).collect()
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
    let (t, hkv, hq, d, r, chunk, kept) = (4096usize, 8, 32, 128, 160, 8, 64);
    let mut rng = Rng::new(1);

    // Prefill: low-rank keys (a rank-40 signal plus noise stands in for real keys).
    let fshape = FactorShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let basis = rng.normal_vec(40 * hkv * d);
    let coef = rng.normal_vec(t * 40);
    let keys: Vec<f32> = (0..t * hkv * d)
        .map(|i| {
            let (row, col) = (i / (hkv * d), i % (hkv * d));
            (0..40).map(|j| coef[row * 40 + j] * basis[j * hkv * d + col]).sum::<f32>() + 0.01 * rng.normal()
        })
        .collect();
    let k = DeviceTensor::from_host(&device, &bf(keys), &fshape.k_shape())?;
    let mut u = DeviceTensor::<bf16>::zeros(&device, &fshape.u_shape())?;
    let mut sv = DeviceTensor::<bf16>::zeros(&device, &fshape.sv_shape())?;
    let s = FactorPlan::new(&device, &fshape, FactorOptions::default(), &[t as u32])?.run(&k, &mut u, &mut sv)?;
    println!("top singular values: {:.3?}", &s[..4]);

    // Selection (given here): per kv head, `kept` chunks of 8 tokens (ShadowKV's landmarks)
    // plus the last chunk, expanded to sorted positions.
    let mut indices = Vec::new();
    let mut indptr = vec![0u32];
    for _ in 0..hkv {
        let mut chunks: Vec<usize> = (0..t / chunk - 1).collect();
        for i in 0..kept {
            let j = i + rng.below(chunks.len() - i);
            chunks.swap(i, j);
        }
        let mut sel: Vec<usize> = chunks[..kept].to_vec();
        sel.push(t / chunk - 1);
        sel.sort_unstable();
        indices.extend(sel.iter().flat_map(|&c| (c * chunk..(c + 1) * chunk).map(|p| p as u32)));
        indptr.push(indices.len() as u32);
    }
    let budget = (kept + 1) * chunk;
    let ip = DeviceTensor::from_host(&device, &indptr, &[indptr.len()])?;
    let ix = DeviceTensor::from_host(&device, &indices, &[indices.len()])?;

    let shape = ReconstructShape { batch: 1, capacity: t, kv_heads: hkv, head_dim: d, rank: r };
    let rope = RopeOptions::default();
    let plan = ReconstructPlan::new(&device, &shape, rope, KeyLayout::Gathered { budget }, &[t as u32], &ip, &ix)?;
    let dshape = DecodeShape { batch: 1, q_tokens: 1, hq, hkv, head_dim: d, capacity: budget };
    let mut decode =
        DecodePlan::new(&device, &dshape, DecodeOptions::default(), &[budget as u32], &ip, plan.decode_indices())?;
    let v_host = bf(rng.normal_vec(hkv * t * d));
    let q_host = bf(rng.normal_vec(hq * d));
    let v = DeviceTensor::from_host(&device, &v_host, &shape.v_shape())?;
    let q = DeviceTensor::from_host(&device, &q_host, &dshape.q_shape())?;
    let mut k_sel = DeviceTensor::<bf16>::zeros(&device, &shape.gathered_shape(budget))?;
    let mut v_sel = DeviceTensor::<bf16>::zeros(&device, &shape.gathered_shape(budget))?;
    let mut o = DeviceTensor::<bf16>::zeros(&device, &dshape.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(&device, &dshape.lse_shape())?;
    plan.run(&u, &sv, &mut k_sel)?;
    plan.gather_values(&v, &mut v_sel)?;
    decode.run(&q, &k_sel, &v_sel, &mut o, &mut lse)?;
    let got = o.to_host()?;

    let (uh, svh) = (u.to_host()?, sv.to_host()?);
    let x = cpu::StepInputs {
        q: &q_host,
        u: &uh,
        sv: &svh,
        v: &v_host,
        seq_lens: &[t as u32],
        indptr: &indptr,
        indices: &indices,
    };
    let (want, _) = cpu::shadowkv_step(&shape, &rope, &dshape, &DecodeOptions::default(), budget, &x)?;
    let num: f64 = got.iter().zip(&want).map(|(g, w)| (f64::from(g.to_f32()) - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    println!(
        "ShadowKV step over {} selected tokens per head: rel L2 vs CPU reference {:.2e}",
        budget,
        (num / den).sqrt()
    );
    Ok(())
}
