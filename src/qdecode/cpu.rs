//! The CPU reference of the quantized decode: f64 attention over the dense reconstruction of
//! the cache (`dequantize_dense` for MiKV, [`kivi_dense`] for the KIVI layout), the result
//! the GPU kernel must match within the attention tolerances.

use half::f16;

use super::{QdecodeOptions, QdecodeShape};
use crate::error::{check_shape, to_u32, Error, Result};
use crate::quant::cpu::{dequantize, QuantizedHost};
use crate::quant::QuantSpec;
use crate::tensor::{checked_numel, Float};

/// The reference's outputs, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct QdecodeReference {
    /// `[B, Tq, Hq, D]`.
    pub o: Vec<f64>,
    /// `[B, Tq, Hq]`, natural log; `-inf` where no token is visible.
    pub lse: Vec<f64>,
}

/// The dense f16 `[H, Tq + residual_len, D]` of a KIVI-layout operand: the codes `q` of
/// `spec` for `[H, Tq, D]` dequantized (exactly [`dequantize`]), then the first
/// `residual_len` rows of each head's residual window (`residual`, `[H, rcap, D]`).
///
/// # Errors
/// The errors of [`dequantize`]; [`Error::Shape`] naming `residual`;
/// [`Error::InvalidArgument`] naming `residual_len` when it exceeds `rcap`.
pub fn kivi_dense(
    spec: QuantSpec,
    dims: [usize; 3],
    q: &QuantizedHost,
    residual: &[f16],
    rcap: usize,
    residual_len: usize,
) -> Result<Vec<f16>> {
    let [h, tq, d] = dims;
    let coded: Vec<f16> = dequantize(spec, &dims, q)?;
    check_shape("residual", &[checked_numel::<f16>("residual", &[h, rcap, d])?], &[residual.len()])?;
    if residual_len > rcap {
        return Err(Error::invalid("residual_len", format!("{residual_len} exceeds {rcap}")));
    }
    let t = tq + residual_len;
    let mut out = Vec::with_capacity(checked_numel::<f16>("k", &[h, t, d])?);
    for head in 0..h {
        out.extend_from_slice(&coded[head * tq * d..(head + 1) * tq * d]);
        out.extend_from_slice(&residual[head * rcap * d..(head * rcap + residual_len) * d]);
    }
    Ok(out)
}

/// Decode attention on the CPU over dense `k`, `v` (f16 `[B·Hkv, T, D]`, cache head
/// `b·Hkv + h`), for `q [B, Tq, Hq, D]` (see the [module docs](super) for the math). With
/// `lists = Some((indptr, indices))` (CSR over the `B·Hkv` heads, validated as
/// [`crate::decode::validate_lists`] does with every `cache_len = T`) only the listed
/// tokens are visible. Scores are `scale · Σ_d q_d·k_d` in f64 from the widened values; an
/// empty visible set gives `o = 0`, `lse = −inf`; a NaN score makes the row NaN.
///
/// # Errors
/// The errors of [`QdecodeShape::validate`] and [`QdecodeOptions::validate`];
/// [`Error::InvalidArgument`] naming `tokens` (above the capacity); [`Error::Shape`] naming
/// `q`, `k` or `v`; the list errors of [`crate::decode::validate_lists`].
pub fn reference<T: Float>(
    shape: &QdecodeShape,
    options: &QdecodeOptions,
    q: &[T],
    k: &[f16],
    v: &[f16],
    tokens: usize,
    lists: Option<(&[u32], &[u32])>,
) -> Result<QdecodeReference> {
    shape.validate()?;
    options.validate()?;
    if tokens > shape.capacity {
        return Err(Error::invalid("tokens", format!("{tokens} exceeds the capacity {}", shape.capacity)));
    }
    let (b_n, tq_n, hq, hkv, d) = (shape.batch, shape.q_tokens, shape.hq, shape.hkv, shape.head_dim);
    check_shape("q", &[checked_numel::<T>("q", &shape.q_shape())?], &[q.len()])?;
    let kv_len = checked_numel::<f16>("k", &[shape.n_lists(), tokens, d])?;
    check_shape("k", &[kv_len], &[k.len()])?;
    check_shape("v", &[kv_len], &[v.len()])?;
    if let Some((indptr, indices)) = lists {
        crate::decode::validate_lists(shape, &vec![to_u32("tokens", tokens)?; b_n], indptr, indices)?;
    }
    let group = shape.group();
    let scale = f64::from(options.scale_for(d));
    let mut o = vec![0.0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; b_n * tq_n * hq];
    let all: Vec<u32> = (0..to_u32("tokens", tokens)?).collect();
    for b in 0..b_n {
        for h in 0..hkv {
            let head = b * hkv + h;
            let list: &[u32] = match lists {
                Some((indptr, indices)) => &indices[indptr[head] as usize..indptr[head + 1] as usize],
                None => &all,
            };
            for t in 0..tq_n {
                let lim = tokens as i64 - tq_n as i64 + t as i64;
                for g in 0..group {
                    let row = (b * tq_n + t) * hq + h * group + g;
                    let qr = &q[row * d..(row + 1) * d];
                    let visible = list.iter().map(|&i| i as usize).filter(|&i| !options.causal || i as i64 <= lim);
                    let scores: Vec<(usize, f64)> = visible
                        .map(|i| {
                            let kr = &k[(head * tokens + i) * d..(head * tokens + i + 1) * d];
                            let dot: f64 =
                                qr.iter().zip(kr).map(|(&a, &b)| f64::from(a.to_f32()) * f64::from(b.to_f32())).sum();
                            (i, scale * dot)
                        })
                        .collect();
                    if scores.is_empty() {
                        continue;
                    }
                    if scores.iter().any(|s| s.1.is_nan()) {
                        o[row * d..(row + 1) * d].fill(f64::NAN);
                        lse[row] = f64::NAN;
                        continue;
                    }
                    let m = scores.iter().fold(f64::NEG_INFINITY, |a, s| a.max(s.1));
                    let mut z = 0.0;
                    let out = &mut o[row * d..(row + 1) * d];
                    for &(i, s) in &scores {
                        let p = (s - m).exp();
                        z += p;
                        let vr = &v[(head * tokens + i) * d..(head * tokens + i + 1) * d];
                        for (acc, &x) in out.iter_mut().zip(vr) {
                            *acc += p * f64::from(x.to_f32());
                        }
                    }
                    out.iter_mut().for_each(|x| *x /= z);
                    lse[row] = m + z.ln();
                }
            }
        }
    }
    Ok(QdecodeReference { o, lse })
}
