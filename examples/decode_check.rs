//! A small, self-checking run of every sparse-decode kernel variant, sized for
//! compute-sanitizer (memcheck and racecheck are slow):
//!
//! ```text
//! cargo build --release --example decode_check
//! compute-sanitizer --tool memcheck  target/release/examples/decode_check
//! compute-sanitizer --tool racecheck target/release/examples/decode_check
//! ```
//!
//! Covers f16 and bf16, D = 64 and 128, direct and split (merge) launches, causal, GQA,
//! several row tiles, empty lists, and a rejected malformed list. Exits non-zero when a
//! result is outside the SPEC tolerance.

use half::{bf16, f16};
use ntkv::decode::{cpu, DecodeConfig, DecodePlan};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Float};

fn lists(rng: &mut Rng, cfg: &DecodeConfig, cache_len: usize) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for l in 0..cfg.n_lists() {
        // list 1 empty; others random density
        let keep = if l == 1 { 0 } else { 1 + rng.below(4) };
        for i in 0..cache_len {
            if keep > 0 && rng.below(4) < keep {
                indices.push(i as u32);
            }
        }
        indptr.push(indices.len() as u32);
    }
    (indptr, indices)
}

fn case<T: Float>(dev: &Device, seed: u64, cfg: DecodeConfig) -> anyhow::Result<f64> {
    let mut rng = Rng::new(seed);
    let cache_len = cfg.cache_capacity - 3;
    let cache_lens = vec![cache_len as u32; cfg.batch];
    let (ptr, mut idx) = lists(&mut rng, &cfg, cache_len);
    let gen = |rng: &mut Rng, n: usize| -> Vec<T> { rng.normal_vec(n).into_iter().map(T::from_f32).collect() };
    let qh = gen(&mut rng, cfg.q_shape().iter().product());
    let kh = gen(&mut rng, cfg.kv_shape().iter().product());
    let vh = gen(&mut rng, cfg.kv_shape().iter().product());
    let want = cpu::sparse_decode(&cfg, &qh, &kh, &vh, &cache_lens, &ptr, &idx)?;
    idx.push(0); // unused tail: keeps the buffer non-empty
    let q = DeviceTensor::from_host(dev, &qh, &cfg.q_shape())?;
    let k = DeviceTensor::from_host(dev, &kh, &cfg.kv_shape())?;
    let v = DeviceTensor::from_host(dev, &vh, &cfg.kv_shape())?;
    let indptr = DeviceTensor::from_host(dev, &ptr, &[ptr.len()])?;
    let indices = DeviceTensor::from_host(dev, &idx, &[idx.len()])?;
    let mut o = DeviceTensor::<T>::zeros(dev, &cfg.q_shape())?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &cfg.lse_shape())?;
    let mut plan = DecodePlan::new(dev, &cfg, &cache_lens, &indptr, &indices)?;
    plan.run(&q, &k, &v, &mut o, &mut lse)?;
    let got: Vec<f64> = o.to_host()?.iter().map(|x| f64::from(x.to_f32())).collect();
    let num: f64 = got.iter().zip(&want.o).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.o.iter().map(|w| w * w).sum();
    let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    let lse_got = lse.to_host()?;
    for (g, w) in lse_got.iter().zip(&want.lse) {
        let ok = if w.is_infinite() { f64::from(*g) == *w } else { (f64::from(*g) - w).abs() <= 1e-3 + 1e-4 * w.abs() };
        anyhow::ensure!(ok, "lse {g} vs {w} in {cfg:?}");
    }
    println!("{:<5} {:?} split {:?}: rel L2 {rel:.2e}", T::DTYPE.name(), cfg, plan.split());
    Ok(rel)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::new(0)?;
    let mut worst_f16: f64 = 0.0;
    let mut worst_bf16: f64 = 0.0;
    for (i, &d) in [64usize, 128].iter().enumerate() {
        let s = 10 * i as u64;
        worst_f16 = worst_f16.max(case::<f16>(&dev, s, DecodeConfig::new(2, 1, 4, 2, d, 200))?);
        worst_bf16 = worst_bf16.max(case::<bf16>(&dev, s + 1, DecodeConfig::new(2, 3, 8, 2, d, 300).chunk_tokens(64))?);
        worst_f16 = worst_f16.max(case::<f16>(&dev, s + 2, DecodeConfig::new(1, 5, 8, 1, d, 150).causal(true))?);
        worst_bf16 = worst_bf16.max(case::<bf16>(
            &dev,
            s + 3,
            DecodeConfig::new(1, 4, 8, 2, d, 400).causal(true).chunk_tokens(128),
        )?);
    }
    // A malformed list is refused before any launch.
    let cfg = DecodeConfig::new(1, 1, 1, 1, 64, 16);
    let indptr = DeviceTensor::from_host(&dev, &[0u32, 3], &[2])?;
    let indices = DeviceTensor::from_host(&dev, &[1u32, 4, 4], &[3])?;
    anyhow::ensure!(DecodePlan::new(&dev, &cfg, &[16], &indptr, &indices).is_err(), "duplicate not caught");
    println!("worst rel L2: f16 {worst_f16:.2e} (bound 5e-4), bf16 {worst_bf16:.2e} (bound 2e-3)");
    anyhow::ensure!(worst_f16 <= 5e-4 && worst_bf16 <= 2e-3, "outside the SPEC tolerance");
    println!("decode_check: OK");
    Ok(())
}
