//! Block-sparse prefill cases (the peer table in docs/benchmarks.md: dense 1x32x8192x128 and
//! 1x32x32768x128 bf16 against SDPA flash; 128x128 block masks of 12.5 / 25 / 50% over 32k tokens, D = 128 and 64, and a
//! causal 25%-of-lower-triangle mask, against FlexAttention with the same mask).
//!
//! The block masks are the deterministic pattern of [`listed`], which tools/peers/attention.py
//! reproduces, so both sides run the same mask. Throughput counts `4·D` FLOPs per query-key
//! pair of every listed block (the "effective" FLOPs of the peer table).

use half::{bf16, f16};
use ntkv::attention::{cpu, BlockMask, MaskHeads, PrefillOptions, PrefillPlan, PrefillShape, PvPrecision};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Float};

use crate::harness::{Bench, Work};

const FAMILY: &str = "attention";

/// Whether block (r, c) is listed in a mask of `permille` density: a fixed integer hash, the
/// same in tools/peers/attention.py.
pub fn listed(r: u32, c: u32, permille: u32) -> bool {
    (r.wrapping_mul(73_856_093) ^ c.wrapping_mul(19_349_663)) % 1000 < permille
}

/// Kinds of mask the cases use.
#[derive(Clone, Copy)]
enum Pattern {
    Dense,
    /// `permille` of all blocks.
    Random(u32),
    /// `permille` of the blocks strictly below the diagonal, plus the diagonal; causal inside.
    CausalRandom(u32),
}

fn mask_for(pattern: Pattern, block: usize, block_cols: usize, shape: &PrefillShape) -> ntkv::Result<BlockMask> {
    let n_rb = ntkv::error::to_u32("tokens", shape.seq_q(0)?.div_ceil(block))?;
    let n_cb = ntkv::error::to_u32("tokens", shape.seq_k(0)?.div_ceil(block_cols))?;
    let rows: Vec<Vec<u32>> = (0..n_rb)
        .map(|r| {
            (0..n_cb)
                .filter(|&c| match pattern {
                    Pattern::Dense => true,
                    Pattern::Random(pm) => listed(r, c, pm),
                    Pattern::CausalRandom(pm) => c == r || (c < r && listed(r, c, pm)),
                })
                .collect()
        })
        .collect();
    BlockMask::from_lists(block, block_cols, MaskHeads::Shared, &[rows])
}

/// Device inputs filled with a repeated N(0, 1) pattern (timing does not depend on values).
fn filled<T: Float>(dev: &Device, rng: &mut Rng, shape: &[usize]) -> ntkv::Result<DeviceTensor<T>> {
    let n: usize = shape.iter().product();
    let pattern: Vec<T> = (0..(1 << 20).min(n)).map(|_| T::from_f32(rng.normal())).collect();
    let data: Vec<T> = pattern.iter().copied().cycle().take(n).collect();
    DeviceTensor::from_host(dev, &data, shape)
}

struct GpuCase {
    op: &'static str,
    /// Column-block size of the mask (rows are always 128).
    block_cols: usize,
    shape_key: String,
    heads: usize,
    tokens: usize,
    d: usize,
    pattern: Pattern,
    causal: bool,
}

fn gpu_case<T: Float>(b: &mut Bench, dev: &Device, c: &GpuCase, precision: PvPrecision, op: &str) -> ntkv::Result<()> {
    if !b.wants(FAMILY, op) {
        return Ok(());
    }
    let n = ntkv::error::to_u32("tokens", c.tokens)?;
    let shape = PrefillShape::new(c.heads, c.heads, c.d, vec![0, n], vec![0, n])?;
    let mask = mask_for(c.pattern, 128, c.block_cols, &shape)?;
    let opts = PrefillOptions { causal: c.causal, pv_precision: precision, ..Default::default() };
    let plan = PrefillPlan::new(dev, &shape, opts, &mask)?;
    let mut rng = Rng::new(0xa77e);
    let q = filled::<T>(dev, &mut rng, &[c.tokens, c.heads, c.d])?;
    let k = filled::<T>(dev, &mut rng, &[c.tokens, c.heads, c.d])?;
    let v = filled::<T>(dev, &mut rng, &[c.tokens, c.heads, c.d])?;
    let mut o = DeviceTensor::<T>::zeros(dev, &[c.tokens, c.heads, c.d])?;
    let mut lse = DeviceTensor::<f32>::zeros(dev, &[c.heads, c.tokens])?;
    let flops = 4.0 * c.d as f64 * plan.host().visited_pairs() as f64;
    let bytes = (4 * c.tokens * c.heads * c.d * T::DTYPE.size() + c.heads * c.tokens * 4) as f64;
    b.gpu(FAMILY, op, &c.shape_key, T::DTYPE.name(), Work { bytes, flops }, |_| plan.run(&q, &k, &v, &mut o, &mut lse))
}

/// A 32-head case of `tokens` tokens at head dim `d` (rows of 128, columns of `block_cols`).
fn case(op: &'static str, block_cols: usize, shape_key: String, tokens: usize, d: usize, pattern: Pattern) -> GpuCase {
    let causal = matches!(pattern, Pattern::CausalRandom(_));
    GpuCase { op, block_cols, shape_key, heads: 32, tokens, d, pattern, causal }
}

fn gpu_cases(b: &mut Bench, dev: &Device) -> ntkv::Result<()> {
    let mut cases = vec![
        case("prefill_dense", 128, "1x32x8192x128".into(), 8192, 128, Pattern::Dense),
        case("prefill_dense", 128, "1x32x32768x128".into(), 32768, 128, Pattern::Dense),
    ];
    for d in [128usize, 64] {
        for (pm, pct) in [(125u32, "12.5%"), (250, "25%"), (500, "50%")] {
            cases.push(case("prefill_bsr", 128, format!("1x32x32768x{d} b128 {pct}"), 32768, d, Pattern::Random(pm)));
        }
        let key = format!("1x32x32768x{d} b128 25%tri+diag");
        cases.push(case("prefill_bsr_causal", 128, key, 32768, d, Pattern::CausalRandom(250)));
    }
    // The dense bar shape with 128 x 64 blocks too (the other kernel tiling), for tuning.
    cases.push(case("prefill_dense_bc64", 64, "1x32x8192x128".into(), 8192, 128, Pattern::Dense));
    for c in &cases {
        // The default: FlashAttention-2's single rounding of P (~2.2e-3 rel L2).
        gpu_case::<bf16>(b, dev, c, PvPrecision::Storage, c.op)?;
        // The high-precision option (P = hi + lo, 1.5x the P·V MMAs) under `_split`.
        gpu_case::<bf16>(b, dev, c, PvPrecision::Split, &format!("{}_split", c.op))?;
    }
    // f16 on the bar shapes.
    for c in cases.iter().take(1).chain(cases.iter().filter(|c| c.shape_key.ends_with("x128 b128 25%"))) {
        gpu_case::<f16>(b, dev, c, PvPrecision::Storage, c.op)?;
    }
    Ok(())
}

fn cpu_case<T: Float>(b: &mut Bench, op: &str, tokens: u32, pattern: Pattern, causal: bool) -> ntkv::Result<()> {
    if !b.wants(FAMILY, op) {
        return Ok(());
    }
    let (heads, d) = (4usize, 64usize);
    let shape = PrefillShape::new(heads, heads, d, vec![0, tokens], vec![0, tokens])?;
    let mask = mask_for(pattern, 64, 64, &shape)?;
    let opts = PrefillOptions { causal, ..Default::default() };
    let plan = ntkv::attention::HostPlan::new(&shape, opts, &mask)?;
    let mut rng = Rng::new(1);
    let n = tokens as usize * heads * d;
    let q: Vec<T> = (0..n).map(|_| T::from_f32(rng.normal())).collect();
    let k: Vec<T> = (0..n).map(|_| T::from_f32(rng.normal())).collect();
    let v: Vec<T> = (0..n).map(|_| T::from_f32(rng.normal())).collect();
    let flops = 4.0 * d as f64 * plan.visited_pairs() as f64;
    let key = format!("1x{heads}x{tokens}x{d} b64");
    b.cpu(FAMILY, op, &key, T::DTYPE.name(), Work { bytes: (4 * n * 2) as f64, flops }, |_| {
        cpu::prefill(&shape, opts, &mask, &q, &k, &v).map(|_| ())
    })
}

pub fn run(b: &mut Bench) -> ntkv::Result<()> {
    if let Some(dev) = b.device.clone() {
        return gpu_cases(b, &dev);
    }
    cpu_case::<bf16>(b, "prefill_dense", 256, Pattern::Dense, false)?;
    cpu_case::<f16>(b, "prefill_dense", 256, Pattern::Dense, false)?;
    cpu_case::<bf16>(b, "prefill_bsr", 512, Pattern::Random(250), false)?;
    cpu_case::<bf16>(b, "prefill_bsr_causal", 512, Pattern::CausalRandom(250), true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_pattern_has_about_the_asked_density() {
        let n = 256u32;
        let count = (0..n).flat_map(|r| (0..n).map(move |c| (r, c))).filter(|&(r, c)| listed(r, c, 250)).count();
        let frac = count as f64 / f64::from(n * n);
        assert!((frac - 0.25).abs() < 0.01, "{frac}");
        // Pinned values: tools/peers/attention.py must list the same blocks.
        assert_eq!((0..8).map(|c| u8::from(listed(3, c, 250))).collect::<Vec<_>>(), vec![0, 1, 1, 1, 0, 0, 1, 0]);
    }
}
