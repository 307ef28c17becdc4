//! Full causal attention for the prefill (shared by every policy), with the per-key
//! attention mass that H2O and MiKV rank by.
//!
//! The scores and `P·V` are candle f32 matmuls over blocks of query rows; the softmax is
//! f32 with the row max subtracted. ntkv's CPU references are f64 and written for clarity, far
//! too slow for a 4096² prefill in 30 layers, so the prefill does not go through them; the
//! tests check this function against `ntkv::decode::cpu::sparse_decode` and
//! `ntkv::topk::cpu::attention_mass`.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Query rows per block: bounds the score block to `ROWS × n` floats.
const ROWS: usize = 512;

/// Head-major copy `[heads, n, d]` of the token-major rows `x [n, heads·d]`.
pub fn head_major(x: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let n = x.len() / (heads * d);
    let mut out = vec![0.0f32; x.len()];
    for t in 0..n {
        for h in 0..heads {
            out[(h * n + t) * d..][..d].copy_from_slice(&x[(t * heads + h) * d..][..d]);
        }
    }
    out
}

/// Causal attention of `q [n, Hq·D]` over `k`, `v [n, Hkv·D]` (token-major, post-RoPE),
/// scale `1/√D`, query head `h` reading kv head `h / (Hq/Hkv)`.
///
/// Returns `o [n, Hq·D]` and the mass `[Hkv, n]`: for each kv head, `Σ` over its query heads
/// and over all queries of the softmax probability each key receives (H2O's accumulated
/// score, GQA `Sum`).
pub fn causal(q: &[f32], k: &[f32], v: &[f32], hq: usize, hkv: usize, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = q.len() / (hq * d);
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let qh = head_major(q, hq, d);
    let kh = head_major(k, hkv, d);
    let vh = head_major(v, hkv, d);
    let mut o = vec![0.0f32; q.len()];
    let mut mass = vec![0.0f32; hkv * n];
    let mut mass64 = vec![0.0f64; n];
    for hk in 0..hkv {
        let kt = Tensor::from_slice(&kh[hk * n * d..(hk + 1) * n * d], (n, d), &Device::Cpu)?.t()?;
        let vt = Tensor::from_slice(&vh[hk * n * d..(hk + 1) * n * d], (n, d), &Device::Cpu)?;
        mass64.iter_mut().for_each(|m| *m = 0.0);
        for g in 0..group {
            let h = hk * group + g;
            for r0 in (0..n).step_by(ROWS) {
                let rows = ROWS.min(n - r0);
                // Keys past the block's last query are never visible: score only 0..r0+rows.
                let cols = r0 + rows;
                let qb = Tensor::from_slice(&qh[(h * n + r0) * d..(h * n + r0 + rows) * d], (rows, d), &Device::Cpu)?;
                let s = qb.matmul(&kt.narrow(1, 0, cols)?)?.flatten_all()?.to_vec1::<f32>()?;
                let mut p = vec![0.0f32; rows * cols];
                for i in 0..rows {
                    let vis = r0 + i + 1;
                    let srow = &s[i * cols..i * cols + vis];
                    let m = srow.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
                    let prow = &mut p[i * cols..i * cols + vis];
                    let mut sum = 0.0f64;
                    for (pj, &sj) in prow.iter_mut().zip(srow) {
                        *pj = (sj * scale - m).exp();
                        sum += f64::from(*pj);
                    }
                    let inv = (1.0 / sum) as f32;
                    for (j, pj) in prow.iter_mut().enumerate() {
                        *pj *= inv;
                        mass64[j] += f64::from(*pj);
                    }
                }
                let pb = Tensor::from_slice(&p, (rows, cols), &Device::Cpu)?;
                let ob = pb.matmul(&vt.narrow(0, 0, cols)?)?.flatten_all()?.to_vec1::<f32>()?;
                for i in 0..rows {
                    o[((r0 + i) * hq + h) * d..][..d].copy_from_slice(&ob[i * d..(i + 1) * d]);
                }
            }
        }
        for (m, &x) in mass[hk * n..(hk + 1) * n].iter_mut().zip(&mass64) {
            *m = x as f32;
        }
    }
    Ok((o, mass))
}
