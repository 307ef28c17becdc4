//! The shared prefill and the teacher-forced decode of one policy.
//!
//! The decode runs layer by layer over the whole continuation: the projections and the MLP of
//! a layer take all `N` continuation rows in one matmul, and the attention of that layer steps
//! through the rows in order, token `i` appending its `k`, `v` before it attends. Every layer's
//! cache depends only on that layer's inputs, so this is the same computation as decoding the
//! tokens one at a time, step by step, with the same policy decisions.

use std::time::Instant;

use anyhow::{ensure, Result};
use ntkv::topk::cpu::{snapkv_scores, snapkv_votes};
use ntkv::topk::{AttnShape, GqaReduce};

use crate::attn::{causal, head_major};
use crate::model::Model;
use crate::policy::{Heads, Policy, Prefill, PrefillLayer, WindowVotes};

/// The head geometry of the model.
pub fn heads(model: &Model) -> Heads {
    Heads { hq: model.cfg.hq, hkv: model.cfg.hkv, d: model.cfg.head_dim }
}

/// Prefills `tokens` with full causal attention and keeps, per layer, the head-major cache,
/// the attention mass of every key and SnapKV's pooled votes from the last `window` queries
/// (`ntkv::topk::cpu::snapkv_scores`). With `logits`, also returns the logits `[P, vocab]`.
pub fn prefill(model: &Model, tokens: &[u32], window: usize, logits: bool) -> Result<(Prefill, Option<Vec<f32>>)> {
    let h = heads(model);
    let p = tokens.len();
    ensure!(p > window, "the prompt ({p} tokens) must exceed the SnapKV window {window}");
    let mut x = model.embed(tokens)?;
    let mut layers = Vec::with_capacity(model.cfg.layers);
    for l in 0..model.cfg.layers {
        let (mut q, mut k, v) = model.qkv_unrotated(l, &x)?;
        let k_pre = k.clone();
        model.rope(&mut q, h.hq, 0);
        model.rope(&mut k, h.hkv, 0);
        let (o, mass) = causal(&q, &k, &v, h.hq, h.hkv, h.d)?;
        let q_window = head_major(&q[(p - window) * h.hq * h.d..], h.hq, h.d);
        let (k, v) = (head_major(&k, h.hkv, h.d), head_major(&v, h.hkv, h.d));
        let shape = AttnShape { hq: h.hq, hkv: h.hkv, tq: window, t: p, d: h.d };
        let snap_scores = snapkv_scores(&q_window, &k, shape, GqaReduce::Sum)?;
        let votes = snapkv_votes(&q_window, &k, shape, GqaReduce::Sum)?.into_iter().map(|x| x as f32).collect();
        model.finish_layer(l, &mut x, &o)?;
        layers.push(PrefillLayer { k, v, mass, window: WindowVotes { pooled: snap_scores, raw: votes }, k_pre });
    }
    let logits = if logits { Some(model.logits(&x)?) } else { None };
    let rope_base = model.cfg.rope_base;
    Ok((Prefill { layers, len: p, window, heads: h, rope_base, clusters: Default::default() }, logits))
}

/// What one teacher-forced decode measured.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// `−ln p(target)` per fed token.
    pub nll: Vec<f64>,
    /// The argmax token per fed token.
    pub top1: Vec<u32>,
    /// Per layer, the attention outputs `[N, Hq·D]` (kept only when asked).
    pub attn: Option<Vec<Vec<f32>>>,
    /// Per layer, the mean over steps of `‖o − o_ref‖ / ‖o_ref‖` against `reference`.
    pub attn_rel_err: Vec<f64>,
    /// Seconds spent in the policy's attention steps (all layers, all steps).
    pub attn_secs: f64,
    /// Seconds of the whole decode.
    pub total_secs: f64,
}

/// Feeds `fed` at positions `pos0..` through `policy` and scores `targets` (one per fed token).
/// With `reference` (a full-cache run's [`Decoded::attn`]) the per-layer attention error is
/// measured against it; with `keep_attn` the outputs are returned.
pub fn decode(
    model: &Model,
    pos0: usize,
    fed: &[u32],
    targets: &[u32],
    policy: &mut dyn Policy,
    reference: Option<&[Vec<f32>]>,
    keep_attn: bool,
) -> Result<Decoded> {
    ensure!(fed.len() == targets.len() && !fed.is_empty(), "fed and targets must have the same, nonzero length");
    let start = Instant::now();
    let h = heads(model);
    let (qw, kw) = (h.hq * h.d, h.hkv * h.d);
    let n = fed.len();
    let mut x = model.embed(fed)?;
    let mut attn_secs = 0.0;
    let mut kept = Vec::new();
    let mut errs = Vec::new();
    for l in 0..model.cfg.layers {
        let (q, k, v) = model.qkv(l, &x, pos0)?;
        let mut o = Vec::with_capacity(n * qw);
        let t0 = Instant::now();
        for i in 0..n {
            o.extend(policy.step(l, &q[i * qw..(i + 1) * qw], &k[i * kw..(i + 1) * kw], &v[i * kw..(i + 1) * kw])?);
        }
        attn_secs += t0.elapsed().as_secs_f64();
        if let Some(r) = reference {
            let mut sum = 0.0;
            for (a, b) in o.chunks_exact(qw).zip(r[l].chunks_exact(qw)) {
                let num: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x - y).powi(2)).sum();
                let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
                sum += (num / den.max(f64::MIN_POSITIVE)).sqrt();
            }
            errs.push(sum / n as f64);
        }
        model.finish_layer(l, &mut x, &o)?;
        if keep_attn {
            kept.push(o);
        }
    }
    let logits = model.logits(&x)?;
    let vocab = model.cfg.vocab;
    let mut nll = Vec::with_capacity(n);
    let mut top1 = Vec::with_capacity(n);
    for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
        let (arg, m) =
            row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        let z: f64 = row.iter().map(|&v| f64::from(v - m).exp()).sum();
        nll.push(z.ln() - f64::from(row[t as usize] - m));
        top1.push(arg as u32);
    }
    Ok(Decoded {
        nll,
        top1,
        attn: keep_attn.then_some(kept),
        attn_rel_err: errs,
        attn_secs,
        total_secs: start.elapsed().as_secs_f64(),
    })
}
