//! NTK cases:
//! - `gram`: symmetric `J·Jᵀ` (Full mode, O = 1) at `1024x1048576` and `4096x262144`, dtypes
//!   `f32`, `tf32`, `bf16` (bf16 reads bf16 storage, like the torch peer). FLOPs are counted as
//!   the full GEMM's `2·N²·P`, which is what the peer does.
//! - `mlp_entk_full` / `mlp_entk_trace`: empirical NTK of a ReLU MLP 784-1024-1024-10 at
//!   N = 256 (`256 784-1024-1024-10`, `f32`), forward + backward + factored Grams, against
//!   torch.func vmap(jacrev) + einsum.
//! - `ntk_metrics`: trace/sum/sum² + LGA + centered alignment on a 4096 × 4096 kernel.
//!
//! Without a GPU, the CPU references run at small sizes.

use half::bf16;
use ntkv::cudarc::driver::CudaSlice;
use ntkv::ntk::{self, cpu, metrics, Activation, GramPlan, GramShape, NtkMode, Precision};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor};

use crate::harness::{Bench, Work};

const FAMILY: &str = "ntk";
const MLP_WIDTHS: [usize; 4] = [784, 1024, 1024, 10];

fn random_mlp(rng: &mut Rng, widths: &[usize]) -> cpu::Mlp {
    let layers = widths.len() - 1;
    cpu::Mlp {
        widths: widths.to_vec(),
        weights: (0..layers)
            .map(|l| {
                let s = (2.0 / widths[l] as f32).sqrt();
                rng.normal_vec(widths[l + 1] * widths[l]).into_iter().map(|v| v * s).collect()
            })
            .collect(),
        biases: (0..layers).map(|l| Some(rng.uniform_vec(widths[l + 1], -0.1, 0.1))).collect(),
        activation: Activation::Relu,
    }
}

fn mlp_shape(n: usize, widths: &[usize]) -> String {
    let w: Vec<String> = widths.iter().map(|w| w.to_string()).collect();
    format!("{n} {}", w.join("-"))
}

pub fn run_gpu(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let mut rng = Rng::new(0x004e_544b);
    if b.wants(FAMILY, "gram") {
        for &(n, p) in &[(1024usize, 1usize << 20), (4096, 1 << 18)] {
            let shape = format!("{n}x{p}");
            // 4 GiB of J: tile a 2^24-element random pattern on the device instead of
            // generating 2^30 values on the host (GEMM speed does not depend on the values).
            let pattern = rng.uniform_vec(1 << 24, -1.0, 1.0);
            let pattern_b: Vec<bf16> = pattern.iter().map(|&v| bf16::from_f32(v)).collect();
            let j = DeviceTensor::from_slice(tile_pattern(dev, &pattern, n * p)?, &[n, 1, p])?;
            let jb = DeviceTensor::from_slice(tile_pattern(dev, &pattern_b, n * p)?, &[n, 1, p])?;
            let work = Work { bytes: (n * p * 4) as f64, flops: 2.0 * (n * n) as f64 * p as f64 };
            for prec in [Precision::F32, Precision::Tf32, Precision::Bf16] {
                let mut plan = GramPlan::new(dev, &GramShape::symmetric(n, 1, p, NtkMode::Full), prec)?;
                let mut out = DeviceTensor::<f32>::zeros(dev, &plan.output_shape())?;
                let w = if prec == Precision::Bf16 { Work { bytes: work.bytes / 2.0, ..work } } else { work };
                if prec == Precision::Bf16 {
                    b.gpu(FAMILY, "gram", &shape, prec.name(), w, |_| plan.run(&jb, &mut out))?;
                } else {
                    b.gpu(FAMILY, "gram", &shape, prec.name(), w, |_| plan.run(&j, &mut out))?;
                }
            }
        }
    }
    let n = 256;
    if b.wants(FAMILY, "mlp_entk_full") || b.wants(FAMILY, "mlp_entk_trace") {
        let host = random_mlp(&mut rng, &MLP_WIDTHS);
        let mlp = ntk::Mlp::from_host(dev, &host)?;
        let x = DeviceTensor::from_host(dev, &rng.normal_vec(n * MLP_WIDTHS[0]), &[n, MLP_WIDTHS[0]])?;
        let shape = mlp_shape(n, &MLP_WIDTHS);
        let o = 10usize;
        check_mlp_entk(dev, &host, &mlp, &mut rng)?;
        // FLOPs of the factored path: backward GEMMs + the per-layer Grams.
        let gg_rows = |full: bool| if full { n * o } else { n };
        for (op, mode) in
            [("mlp_entk_full", NtkMode::Full), ("mlp_entk_trace", NtkMode::Trace { divide_by_outputs: false })]
        {
            if !b.wants(FAMILY, op) {
                continue;
            }
            let full = mode == NtkMode::Full;
            let mut flops = 2.0 * (n * o * 1024 * 1024) as f64;
            for l in 0..3 {
                let (din, dout) = (MLP_WIDTHS[l], MLP_WIDTHS[l + 1]);
                let r = gg_rows(full) as f64;
                let depth = if full { dout } else { o * dout } as f64;
                flops += 2.0 * (n * n * din) as f64 + 2.0 * r * r * depth;
            }
            b.gpu(FAMILY, op, &shape, "f32", Work::flops(flops), |_| {
                mlp.empirical_ntk(&x, None, mode, Precision::F32).map(|_| ())
            })?;
        }
    }
    if b.wants(FAMILY, "ntk_metrics") {
        let n = 4096;
        let j = DeviceTensor::from_host(dev, &rng.normal_vec(n * 64), &[n, 1, 64])?;
        let k = ntk::gram(dev, &j, NtkMode::Full, Precision::F32)?.reshape(&[n, n])?;
        let labels: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
        let mut y = vec![0.0f32; n * 10];
        for (i, &l) in labels.iter().enumerate() {
            y[i * 10 + l as usize] = 1.0;
        }
        let yt = DeviceTensor::from_host(dev, &y, &[n, 10])?;
        let bytes = Work::bytes((n * n * 4) as f64);
        let shape = format!("{n}x{n}");
        b.gpu(FAMILY, "ntk_metrics_stats", &shape, "f32", bytes, |_| metrics::stats(dev, &k).map(|_| ()))?;
        b.gpu(FAMILY, "ntk_metrics_lga", &shape, "f32", bytes, |_| metrics::lga(dev, &k, &labels).map(|_| ()))?;
        b.gpu(FAMILY, "ntk_metrics_align_centered", &shape, "f32", Work::bytes(3.0 * bytes.bytes), |_| {
            metrics::alignment(dev, &k, &yt, true).map(|_| ())
        })?;
    }
    Ok(())
}

/// A device buffer of `total` elements filled by repeating `pattern`.
fn tile_pattern<T: ntkv::Float>(dev: &Device, pattern: &[T], total: usize) -> ntkv::Result<CudaSlice<T>> {
    let stream = dev.stream();
    let src = stream.clone_htod(pattern)?;
    let mut dst = stream.alloc_zeros::<T>(total)?;
    let mut off = 0;
    while off < total {
        let len = pattern.len().min(total - off);
        stream.memcpy_dtod(&src.slice(0..len), &mut dst.slice_mut(off..off + len))?;
        off += len;
    }
    Ok(dst)
}

/// The "results matching to 1e-4 relative": the GPU eNTK (both modes) of the bench
/// MLP on 8 samples against the f64 CPU reference (forward/backward + factored NTK in f64).
fn check_mlp_entk(dev: &Device, host: &cpu::Mlp, mlp: &ntk::Mlp, rng: &mut Rng) -> ntkv::Result<()> {
    let n = 8;
    let x = rng.normal_vec(n * MLP_WIDTHS[0]);
    let xt = DeviceTensor::from_host(dev, &x, &[n, MLP_WIDTHS[0]])?;
    let pass = host.pass(&x, n)?;
    let a: Vec<Vec<f32>> = pass.inputs.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
    let g: Vec<Vec<f32>> = pass.cotangents.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
    let layers: Vec<cpu::FactoredLayer<'_>> = (0..3)
        .map(|l| cpu::FactoredLayer { a: &a[l], g: &g[l], d_in: MLP_WIDTHS[l], d_out: MLP_WIDTHS[l + 1], bias: true })
        .collect();
    for mode in [NtkMode::Full, NtkMode::Trace { divide_by_outputs: false }] {
        let want = cpu::factored_ntk(&layers, None, n, n, 1, 10, mode)?;
        let got = mlp.empirical_ntk(&xt, None, mode, Precision::F32)?.to_host()?;
        let num: f64 = got.iter().zip(&want).map(|(&g, &w)| (f64::from(g) - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        println!("check mlp_entk {}: relative L2 vs the f64 CPU reference on {n} samples = {rel:.2e}", mode.name());
        if !rel.is_finite() || rel > 1e-4 {
            return Err(ntkv::Error::invalid(
                "mlp_entk",
                format!("{} differs from the reference by {rel:e}", mode.name()),
            ));
        }
    }
    Ok(())
}

pub fn run_cpu(b: &mut Bench) -> ntkv::Result<()> {
    let mut rng = Rng::new(0x004e_544b);
    if b.wants(FAMILY, "gram") {
        let (n, o, p) = (48, 2, 2048);
        let j = rng.normal_vec(n * o * p);
        let shape = format!("{n}x{o}x{p}");
        for mode in [NtkMode::Full, NtkMode::Trace { divide_by_outputs: false }, NtkMode::Pseudo] {
            let flops = 2.0 * (n * n * o * o * p) as f64;
            b.cpu(FAMILY, &format!("gram_{}", mode.name()), &shape, "f64", Work::flops(flops), |_| {
                cpu::gram(&j, None, n, n, o, p, mode).map(|_| ())
            })?;
        }
    }
    if b.wants(FAMILY, "mlp_entk_full") || b.wants(FAMILY, "mlp_entk_trace") {
        let widths = [32usize, 64, 64, 10];
        let n = 16;
        let host = random_mlp(&mut rng, &widths);
        let x = rng.normal_vec(n * widths[0]);
        let shape = mlp_shape(n, &widths);
        for (op, mode) in
            [("mlp_entk_full", NtkMode::Full), ("mlp_entk_trace", NtkMode::Trace { divide_by_outputs: false })]
        {
            b.cpu(FAMILY, op, &shape, "f64", Work::default(), |_| {
                let pass = host.pass(&x, n)?;
                let a: Vec<Vec<f32>> = pass.inputs.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
                let g: Vec<Vec<f32>> = pass.cotangents.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect();
                let layers: Vec<cpu::FactoredLayer<'_>> = (0..3)
                    .map(|l| cpu::FactoredLayer {
                        a: &a[l],
                        g: &g[l],
                        d_in: widths[l],
                        d_out: widths[l + 1],
                        bias: true,
                    })
                    .collect();
                cpu::factored_ntk(&layers, None, n, n, 1, 10, mode).map(|_| ())
            })?;
        }
    }
    if b.wants(FAMILY, "ntk_metrics") {
        let n = 192;
        let j = rng.normal_vec(n * 256);
        let k = cpu::gram(&j, None, n, n, 1, 256, NtkMode::Full)?;
        let labels: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
        let shape = format!("{n}x{n}");
        b.cpu(FAMILY, "ntk_metrics_lga", &shape, "f64", Work::bytes((n * n * 8) as f64), |_| {
            cpu::lga(&k, n, &labels).map(|_| ())
        })?;
        b.cpu(FAMILY, "ntk_metrics_eigenvalues", &shape, "f64", Work::default(), |_| {
            cpu::eigenvalues_symmetric(&k, n).map(|_| ())
        })?;
    }
    Ok(())
}
