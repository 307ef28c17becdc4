//! The llama forward of SmolLM2 on the CPU, in f32 throughout.
//!
//! Weights are dequantized once at load (Q4_1 and Q8_0 to f32) and every projection is a
//! candle-core f32 matmul, so the forward is the model's exact f32 math: no activation is
//! quantized, unlike llama.cpp's CPU path on quantized weights. Three facts of this file
//! are easy to get wrong and are handled here:
//! - there is no `output.weight`: the logits use the tied `token_embd` (Q8_0);
//! - q and k are stored in llama.cpp's RoPE layout, rotating adjacent pairs
//!   `(x[2i], x[2i+1])` by `pos · base^(−2i/D)` (base 100000 here), not rotate-half;
//! - the residual stream exceeds 10^4 in magnitude, so it stays f32 (norms sum in f64).
//!
//! Attention itself is not here: [`Model::qkv`] produces post-RoPE q, k, v and
//! [`Model::finish_layer`] takes the attention output, so the caller decides how each layer
//! attends (full causal prefill in [`crate::attn`], or a KV policy through ntkv).

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use crate::gguf::{Config, Gguf};

struct Layer {
    attn_norm: Vec<f32>,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Vec<f32>,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// SmolLM2 (llama architecture) with f32 weights.
pub struct Model {
    /// Hyper-parameters.
    pub cfg: Config,
    embd: Tensor,
    embd_rows: Vec<f32>,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    inv_freq: Vec<f64>,
    act_q8: bool,
}

fn vec_of(g: &Gguf, name: &str) -> Result<Vec<f32>> {
    Ok(g.tensor_f32(name)?.flatten_all()?.to_vec1::<f32>()?)
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
    let t = g.tensor_f32(name)?;
    ensure!(t.dims() == [rows, cols], "`{name}` has dims {:?}, expected [{rows}, {cols}]", t.dims());
    Ok(t)
}

/// `y [n, out] = x [n, in] · wᵀ` for `w [out, in]`.
pub fn linear(x: &[f32], n: usize, w: &Tensor) -> Result<Vec<f32>> {
    let xin = Tensor::from_slice(x, (n, w.dims()[1]), &Device::Cpu)?;
    Ok(xin.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `x` rounded as llama.cpp's CPU path rounds a quantized matmul's activations: blocks of
/// 32 along the row, `d = max|x| / 127`, `x ≈ d · round(x / d)` (q8_0 / q8_1).
pub fn round_q8(x: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    for block in out.chunks_mut(32) {
        let amax = block.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.iter_mut().for_each(|v| *v = (*v * id).round() * d);
    }
    out
}

/// RMSNorm of each `width`-row of `x` times `w` (the sum of squares in f64).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / w.len() as f64;
        let scale = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = v * scale * g;
        }
    }
    out
}

impl Model {
    /// Loads and dequantizes every tensor.
    pub fn load(g: &Gguf) -> Result<Self> {
        let cfg = g.config()?;
        ensure!(
            !g.content.tensor_infos.contains_key("output.weight"),
            "this file has an output.weight; the forward assumes tied embeddings"
        );
        let (e, f, kv) = (cfg.embd, cfg.ffn, cfg.hkv * cfg.head_dim);
        let embd = matrix(g, "token_embd.weight", cfg.vocab, e)?;
        let embd_rows = embd.flatten_all()?.to_vec1::<f32>()?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec_of(g, &n("attn_norm"))?,
                wq: matrix(g, &n("attn_q"), e, e)?,
                wk: matrix(g, &n("attn_k"), kv, e)?,
                wv: matrix(g, &n("attn_v"), kv, e)?,
                wo: matrix(g, &n("attn_output"), e, e)?,
                ffn_norm: vec_of(g, &n("ffn_norm"))?,
                gate: matrix(g, &n("ffn_gate"), f, e)?,
                up: matrix(g, &n("ffn_up"), f, e)?,
                down: matrix(g, &n("ffn_down"), e, f)?,
            });
        }
        let d = cfg.head_dim;
        let inv_freq = (0..d / 2).map(|i| f64::from(cfg.rope_base).powf(-2.0 * i as f64 / d as f64)).collect();
        Ok(Model { embd, embd_rows, layers, out_norm: vec_of(g, "output_norm.weight")?, inv_freq, cfg, act_q8: false })
    }

    /// With `on`, every projection's input is first rounded by [`round_q8`], to reproduce
    /// llama.cpp's CPU path on the shipped quantized file (off by default: the evaluation
    /// runs the exact f32 math).
    pub fn set_activation_q8(&mut self, on: bool) {
        self.act_q8 = on;
    }

    fn linear(&self, x: &[f32], n: usize, w: &Tensor) -> Result<Vec<f32>> {
        if self.act_q8 {
            linear(&round_q8(x), n, w)
        } else {
            linear(x, n, w)
        }
    }

    /// The embedding rows of `tokens`, `[n, embd]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let e = self.cfg.embd;
        let mut x = Vec::with_capacity(tokens.len() * e);
        for &t in tokens {
            ensure!((t as usize) < self.cfg.vocab, "token {t} is outside the vocabulary");
            x.extend_from_slice(&self.embd_rows[t as usize * e..(t as usize + 1) * e]);
        }
        Ok(x)
    }

    /// Rotates adjacent pairs of every head of each row of `x` (`[n, heads·D]`), row `i` at
    /// position `pos0 + i` (llama.cpp's "normal" RoPE; angles in f64).
    pub fn rope(&self, x: &mut [f32], heads: usize, pos0: usize) {
        let d = self.cfg.head_dim;
        for (i, row) in x.chunks_exact_mut(heads * d).enumerate() {
            let pos = (pos0 + i) as f64;
            for head in row.chunks_exact_mut(d) {
                for (j, &f) in self.inv_freq.iter().enumerate() {
                    let (s, c) = (pos * f).sin_cos();
                    let (a, b) = (f64::from(head[2 * j]), f64::from(head[2 * j + 1]));
                    head[2 * j] = (a * c - b * s) as f32;
                    head[2 * j + 1] = (a * s + b * c) as f32;
                }
            }
        }
    }

    /// Post-RoPE `q [n, Hq·D]`, `k [n, Hkv·D]` and `v [n, Hkv·D]` of layer `l` for the
    /// residual rows `x [n, embd]` at positions `pos0..pos0 + n`.
    pub fn qkv(&self, l: usize, x: &[f32], pos0: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut q, mut k, v) = self.qkv_unrotated(l, x)?;
        self.rope(&mut q, self.cfg.hq, pos0);
        self.rope(&mut k, self.cfg.hkv, pos0);
        Ok((q, k, v))
    }

    /// [`Self::qkv`] before RoPE: the projections of the normed rows.
    pub fn qkv_unrotated(&self, l: usize, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let layer = &self.layers[l];
        let n = x.len() / self.cfg.embd;
        let h = rms_norm(x, &layer.attn_norm, self.cfg.rms_eps);
        Ok((self.linear(&h, n, &layer.wq)?, self.linear(&h, n, &layer.wk)?, self.linear(&h, n, &layer.wv)?))
    }

    /// The rest of layer `l` given its attention output `o [n, Hq·D]`: the output
    /// projection and the SwiGLU MLP, each added to the residual `x [n, embd]` in place.
    pub fn finish_layer(&self, l: usize, x: &mut [f32], o: &[f32]) -> Result<()> {
        let layer = &self.layers[l];
        let n = x.len() / self.cfg.embd;
        let attn = self.linear(o, n, &layer.wo)?;
        x.iter_mut().zip(&attn).for_each(|(r, a)| *r += a);
        let h = rms_norm(x, &layer.ffn_norm, self.cfg.rms_eps);
        let gate = self.linear(&h, n, &layer.gate)?;
        let up = self.linear(&h, n, &layer.up)?;
        let act: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        let down = self.linear(&act, n, &layer.down)?;
        x.iter_mut().zip(&down).for_each(|(r, d)| *r += d);
        Ok(())
    }

    /// Logits `[n, vocab]` of the residual rows `x [n, embd]`: the final norm, then the tied
    /// embedding.
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let n = x.len() / self.cfg.embd;
        let h = rms_norm(x, &self.out_norm, self.cfg.rms_eps);
        self.linear(&h, n, &self.embd)
    }
}
