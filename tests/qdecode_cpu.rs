//! Properties of the quantized-decode CPU reference and of the plan's split, with no GPU:
//! it agrees with the sparse-index decode reference on the same dense cache, lists select
//! exactly their tokens, empty and causal rows behave, the KIVI reconstruction is the
//! dequantized codes followed by the residual, and the split covers the capacity.

mod qdecode_support;

use half::{bf16, f16};
use ntkv::decode::{self, DecodeOptions, DecodeShape};
use ntkv::qdecode::{cpu, plan_split, QdecodeOptions, MAX_CHUNKS, MIN_CHUNK_TOKENS};
use ntkv::quant::cpu::{dequantize, MikvCacheCpu};
use ntkv::quant::{Axis, HiPrecision, QuantSpec};
use ntkv::rng::Rng;
use qdecode_support::*;

#[test]
fn reference_matches_sparse_decode_over_all_tokens() {
    let mut rng = Rng::new(1);
    for (b, tq, hq, hkv, d, t, causal) in
        [(1, 1, 4, 2, 64, 37, false), (2, 3, 6, 2, 128, 70, true), (1, 5, 8, 8, 64, 9, true)]
    {
        let s = shape(b, tq, hq, hkv, d, t);
        let q = q_vec::<f16>(&mut rng, &s);
        let k = f16_vec(&mut rng, b * hkv * t * d);
        let v = f16_vec(&mut rng, b * hkv * t * d);
        let opts = QdecodeOptions { causal, ..Default::default() };
        let got = cpu::reference(&s, &opts, &q, &k, &v, t, None).unwrap();
        let ds = DecodeShape { batch: b, q_tokens: tq, hq, hkv, head_dim: d, capacity: t };
        let indptr: Vec<u32> = (0..=b * hkv).map(|l| (l * t) as u32).collect();
        let indices: Vec<u32> = (0..b * hkv).flat_map(|_| 0..t as u32).collect();
        let want = decode::cpu::sparse_decode(
            &ds,
            &DecodeOptions { causal, ..Default::default() },
            &q,
            &k,
            &v,
            &vec![t as u32; b],
            &indptr,
            &indices,
        )
        .unwrap();
        for (g, w) in got.o.iter().zip(&want.o) {
            assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "o {g} vs {w}");
        }
        for (g, w) in got.lse.iter().zip(&want.lse) {
            assert!(g == w || (g - w).abs() <= 1e-12 * (1.0 + w.abs()), "lse {g} vs {w}");
        }
    }
}

#[test]
fn lists_select_exactly_their_tokens() {
    let mut rng = Rng::new(2);
    let s = shape(1, 2, 4, 2, 64, 50);
    let (t, d) = (40, 64);
    let q = q_vec::<bf16>(&mut rng, &s);
    let k = f16_vec(&mut rng, 2 * t * d);
    let v = f16_vec(&mut rng, 2 * t * d);
    let (indptr, indices) = random_lists(&mut rng, 2, t);
    let got = cpu::reference(&s, &QdecodeOptions::default(), &q, &k, &v, t, Some((&indptr, &indices))).unwrap();
    // Compact each head's listed tokens into a cache of its own and attend to all of it.
    for head in 0..2 {
        let list = &indices[indptr[head] as usize..indptr[head + 1] as usize];
        let n = list.len();
        let pick = |x: &[f16]| -> Vec<f16> {
            list.iter()
                .flat_map(|&i| x[(head * t + i as usize) * d..(head * t + i as usize + 1) * d].to_vec())
                .collect()
        };
        let (kc, vc) = (pick(&k), pick(&v));
        let s1 = shape(1, 2, 2, 1, 64, n.max(1));
        // The two query heads of this kv head.
        let q1: Vec<bf16> =
            (0..2).flat_map(|tq| q[(tq * 4 + head * 2) * d..(tq * 4 + head * 2 + 2) * d].to_vec()).collect();
        let want = cpu::reference(&s1, &QdecodeOptions::default(), &q1, &kc, &vc, n, None).unwrap();
        for tq in 0..2 {
            for g in 0..2 {
                let row = tq * 4 + head * 2 + g;
                let row1 = tq * 2 + g;
                if n == 0 {
                    assert_eq!(got.lse[row], f64::NEG_INFINITY);
                    assert!(got.o[row * d..(row + 1) * d].iter().all(|&x| x == 0.0));
                } else {
                    assert!((got.lse[row] - want.lse[row1]).abs() < 1e-12);
                    for c in 0..d {
                        assert!((got.o[row * d + c] - want.o[row1 * d + c]).abs() < 1e-12);
                    }
                }
            }
        }
    }
}

#[test]
fn causal_hides_future_tokens_and_empty_rows_are_zero() {
    let mut rng = Rng::new(3);
    let s = shape(1, 4, 1, 1, 64, 8);
    let q = q_vec::<f16>(&mut rng, &s);
    let k = f16_vec(&mut rng, 4 * 64);
    let v = f16_vec(&mut rng, 4 * 64);
    let opts = QdecodeOptions { causal: true, ..Default::default() };
    // T = 4, Tq = 4: query t sees tokens 0..=t; with lists [3] queries 0..2 see nothing.
    let r = cpu::reference(&s, &opts, &q, &k, &v, 4, Some((&[0, 1], &[3]))).unwrap();
    for t in 0..3 {
        assert_eq!(r.lse[t], f64::NEG_INFINITY);
        assert!(r.o[t * 64..(t + 1) * 64].iter().all(|&x| x == 0.0));
    }
    assert!(r.lse[3].is_finite());
    // Query 3 sees only token 3, so o is exactly v_3.
    for c in 0..64 {
        assert!((r.o[3 * 64 + c] - f64::from(v[3 * 64 + c].to_f32())).abs() < 1e-12);
    }
}

#[test]
fn kivi_dense_is_codes_then_residual() {
    let mut rng = Rng::new(4);
    let s = shape(1, 1, 2, 2, 64, 200);
    let kspec = QuantSpec::new(2, 64, Axis::PerChannel).unwrap();
    let vspec = QuantSpec::new(8, 32, Axis::PerToken).unwrap();
    let kivi = Kivi::random(&mut rng, &s, 128, kspec, vspec, 20, 13);
    let (k, v) = kivi.dense();
    let kd: Vec<f16> = dequantize(kspec, &kivi.dims, &kivi.k).unwrap();
    let vd: Vec<f16> = dequantize(vspec, &kivi.dims, &kivi.v).unwrap();
    let t = kivi.tokens();
    assert_eq!(t, 141);
    for h in 0..2 {
        for i in 0..t {
            for c in 0..64 {
                let (gk, gv) = (k[(h * t + i) * 64 + c], v[(h * t + i) * 64 + c]);
                let (wk, wv) = if i < 128 {
                    (kd[(h * 128 + i) * 64 + c], vd[(h * 128 + i) * 64 + c])
                } else {
                    (kivi.k_res[(h * 20 + i - 128) * 64 + c], kivi.v_res[(h * 20 + i - 128) * 64 + c])
                };
                assert_eq!(gk.to_bits(), wk.to_bits());
                assert_eq!(gv.to_bits(), wv.to_bits());
            }
        }
    }
    assert!(cpu::kivi_dense(kspec, kivi.dims, &kivi.k, &kivi.k_res, 20, 21).is_err());
}

#[test]
fn mikv_append_and_prefill_give_the_same_reference() {
    let mut rng = Rng::new(5);
    let (h, d, t0, n) = (2, 64, 70, 45);
    let kcfg = mikv_cfg(4, HiPrecision::F16, 32, Axis::PerChannel, 32, 256);
    let x = f16_vec(&mut rng, h * (t0 + n) * d);
    let imp = important_lists(&mut rng, h, t0, Important::Every(4));
    let prefix: Vec<f16> = (0..h).flat_map(|hh| x[hh * (t0 + n) * d..(hh * (t0 + n) + t0) * d].to_vec()).collect();
    let mut a = MikvCacheCpu::from_prefill(kcfg, &prefix, &[h, t0, d], &imp).unwrap();
    for i in t0..t0 + n {
        let tok: Vec<f16> =
            (0..h).flat_map(|hh| x[(hh * (t0 + n) + i) * d..(hh * (t0 + n) + i + 1) * d].to_vec()).collect();
        a.append(&tok).unwrap();
    }
    let b = MikvCacheCpu::from_prefill(kcfg, &x, &[h, t0 + n, d], &imp).unwrap();
    assert!(a.same_bits(&b));
    let (da, db) = (a.dequantize_dense().unwrap(), b.dequantize_dense().unwrap());
    assert!(da.iter().zip(&db).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn split_covers_the_capacity() {
    for (cap, heads, rows, sms) in
        [(131072, 32, 1, 132), (1, 1, 1, 1), (100, 8, 24, 132), (1 << 31, 1, 1, 1), (5000, 64, 16, 16)]
    {
        let s = shape(1, rows.min(16), heads * rows.div_ceil(16).max(1), heads, 128, cap);
        let sp = plan_split(&s, sms, None);
        assert_eq!(sp.chunk_tokens % ntkv::decode::TILE_TOKENS, 0);
        assert!(sp.chunk_tokens >= MIN_CHUNK_TOKENS);
        assert!(sp.max_chunks <= MAX_CHUNKS);
        assert!(sp.max_chunks * sp.chunk_tokens >= cap);
        assert_eq!(sp, plan_split(&s, sms, None), "deterministic");
    }
    let s = shape(1, 1, 32, 32, 128, 131072);
    let sp = plan_split(&s, 132, None);
    // About eight CTAs per SM at the bench shape.
    assert!(32 * sp.max_chunks >= 132 * 4, "{sp:?}");
    assert_eq!(plan_split(&s, 132, Some(64)).max_chunks, 2048);
}
