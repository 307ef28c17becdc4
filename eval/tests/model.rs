//! Pipeline checks on the real model: tokenizer round trip, a GGUF block dequantized by hand,
//! layer 0's attention against ntkv's references, and the layer-major decode against the
//! prefill. Each prints SKIP when the model is not fetched (NTKV_REQUIRE_MODEL=1: fail).

mod common;

use half::f16;
use ntkv::decode::cpu::sparse_decode;
use ntkv::decode::{DecodeOptions, DecodeShape};
use ntkv::topk::cpu::attention_mass;
use ntkv::topk::{AttnShape, GqaReduce};
use ntkv_eval::attn::{causal, head_major};
use ntkv_eval::policy::{self, Spec};
use ntkv_eval::run::{decode, prefill};

const SAMPLE: &str = "It is a truth universally acknowledged, that a single man in possession\nof a good fortune, \
                      must be in want of a wife. In 1813, 42 copies cost £3 — “quite dear”, said Mrs. Bennet.";

#[test]
fn tokenizer_round_trip_and_digits() {
    let Some(m) = common::model("tokenizer_round_trip_and_digits") else { return };
    let ids = m.tok.encode(SAMPLE).unwrap();
    assert!(ids.len() > 20 && ids.len() < SAMPLE.len());
    assert_eq!(m.tok.decode(&ids).unwrap(), SAMPLE);
    // smollm's pre-tokenizer puts every digit in its own token.
    let digits = m.tok.encode("2026").unwrap();
    assert_eq!(digits.len(), 4);
    let each: Vec<String> = digits.iter().map(|&t| m.tok.decode(&[t]).unwrap()).collect();
    assert_eq!(each, ["2", "0", "2", "6"]);
    // No prefix space is added: " the" and "the" differ.
    assert_ne!(m.tok.encode("the").unwrap(), m.tok.encode(" the").unwrap());
    assert_eq!(m.tok.encode(" the").unwrap().len(), 1);
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[test]
fn gguf_blocks_dequantize_to_the_format_values() {
    let Some(m) = common::model("gguf_blocks_dequantize_to_the_format_values") else { return };
    // Q8_0: a block of 32 is an f16 scale then 32 i8 codes, x = d·q.
    assert_eq!(format!("{:?}", m.gguf.tensor_dtype("token_embd.weight").unwrap()), "Q8_0");
    let raw = m.gguf.raw_bytes("token_embd.weight", 34 * 2).unwrap();
    let got = m.gguf.tensor_f32("token_embd.weight").unwrap().flatten_all().unwrap().narrow(0, 0, 64).unwrap();
    let got = got.to_vec1::<f32>().unwrap();
    for blk in 0..2 {
        let b = &raw[blk * 34..(blk + 1) * 34];
        let d = f16_at(b, 0);
        for i in 0..32 {
            assert_eq!(got[blk * 32 + i], d * f32::from(b[2 + i] as i8), "Q8_0 block {blk} element {i}");
        }
    }
    // Q4_1: f16 scale d, f16 min m, 16 bytes of nibbles (low nibbles are elements 0..16,
    // high nibbles 16..32), x = d·q + m.
    let name = "blk.0.attn_q.weight";
    assert_eq!(format!("{:?}", m.gguf.tensor_dtype(name).unwrap()), "Q4_1");
    let raw = m.gguf.raw_bytes(name, 20 * 2).unwrap();
    let got = m.gguf.tensor_f32(name).unwrap().flatten_all().unwrap().narrow(0, 0, 64).unwrap();
    let got = got.to_vec1::<f32>().unwrap();
    let mut nonzero = 0;
    for blk in 0..2 {
        let b = &raw[blk * 20..(blk + 1) * 20];
        let (d, mn) = (f16_at(b, 0), f16_at(b, 2));
        for j in 0..16 {
            let lo = d * f32::from(b[4 + j] & 15) + mn;
            let hi = d * f32::from(b[4 + j] >> 4) + mn;
            for (x, want) in [(got[blk * 32 + j], lo), (got[blk * 32 + 16 + j], hi)] {
                assert!((x - want).abs() <= 1e-6 * want.abs().max(1e-3), "Q4_1 block {blk}: {x} vs {want}");
                nonzero += usize::from(want != 0.0);
            }
        }
    }
    assert!(nonzero > 32, "the checked blocks are not all zero");
}

#[test]
fn layer0_attention_matches_ntkv_references() {
    let Some(m) = common::model("layer0_attention_matches_ntkv_references") else { return };
    let cfg = &m.model.cfg;
    let (hq, hkv, d) = (cfg.hq, cfg.hkv, cfg.head_dim);
    let ids = m.tok.encode(SAMPLE).unwrap();
    let n = ids.len();
    let x = m.model.embed(&ids).unwrap();
    let (q, k, v) = m.model.qkv(0, &x, 0).unwrap();
    let (o, mass) = causal(&q, &k, &v, hq, hkv, d).unwrap();
    let (kh, vh) = (head_major(&k, hkv, d), head_major(&v, hkv, d));
    let shape = DecodeShape { batch: 1, q_tokens: 1, hq, hkv, head_dim: d, capacity: n };
    for t in [0, n / 2, n - 1] {
        let list: Vec<u32> = (0..=t as u32).collect();
        let indices: Vec<u32> = (0..hkv).flat_map(|_| list.iter().copied()).collect();
        let indptr: Vec<u32> = (0..=hkv as u32).map(|h| h * list.len() as u32).collect();
        let qrow = &q[t * hq * d..(t + 1) * hq * d];
        let r =
            sparse_decode(&shape, &DecodeOptions::default(), qrow, &kh, &vh, &[n as u32], &indptr, &indices).unwrap();
        let ours = &o[t * hq * d..(t + 1) * hq * d];
        let num: f64 = ours.iter().zip(&r.o).map(|(&a, &b)| (f64::from(a) - b).powi(2)).sum();
        let den: f64 = r.o.iter().map(|b| b * b).sum();
        assert!((num / den).sqrt() < 1e-5, "row {t}: relative error {}", (num / den).sqrt());
    }
    let want =
        attention_mass(&head_major(&q, hq, d), &kh, AttnShape { hq, hkv, tq: n, t: n, d }, GqaReduce::Sum).unwrap();
    for (i, (&a, &b)) in mass.iter().zip(&want).enumerate() {
        assert!((f64::from(a) - b).abs() <= 1e-4 * b.max(1.0), "mass {i}: {a} vs {b}");
    }
}

#[test]
fn layer_major_decode_equals_the_prefill() {
    let Some(m) = common::model("layer_major_decode_equals_the_prefill") else { return };
    let ids = m.tok.encode(SAMPLE).unwrap();
    let (p, n) = (ids.len() - 9, 8);
    let (_, logits) = prefill(&m.model, &ids[..p + n], 4, true).unwrap();
    let logits = logits.unwrap();
    let (pre, _) = prefill(&m.model, &ids[..p], 4, false).unwrap();
    let mut full = policy::build(Spec::Full, &pre, p + n).unwrap();
    let d = decode(&m.model, p, &ids[p..p + n], &ids[p + 1..p + n + 1], full.as_mut(), None, false).unwrap();
    let vocab = m.model.cfg.vocab;
    for i in 0..n {
        let row = &logits[(p + i) * vocab..(p + i + 1) * vocab];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = row.iter().map(|&v| f64::from(v - mx).exp()).sum();
        let nll = z.ln() - f64::from(row[ids[p + 1 + i] as usize] - mx);
        assert!((nll - d.nll[i]).abs() < 2e-3, "step {i}: decode nll {} vs prefill {nll}", d.nll[i]);
        let arg = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (j, &v)| if v > a.1 { (j, v) } else { a }).0;
        assert_eq!(d.top1[i], arg as u32, "step {i}");
    }
}
