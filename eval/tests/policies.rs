//! The policies on a synthetic prefill (no model needed): shapes, determinism, and the
//! quantized caches' error ordering.

use ntkv_eval::policy::{self, Heads, Prefill, PrefillLayer, Spec, WindowVotes};
use ntkv_eval::report::png_rgb;

const H: Heads = Heads { hq: 9, hkv: 3, d: 64 };
const P: usize = 192;
const STEPS: usize = 40;

fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn synthetic() -> Prefill {
    let layer = |l: u64| PrefillLayer {
        k: noise(10 + l, H.hkv * P * H.d),
        v: noise(20 + l, H.hkv * P * H.d),
        mass: noise(30 + l, H.hkv * P).iter().map(|x| x.abs()).collect(),
        window: WindowVotes {
            pooled: noise(40 + l, H.hkv * (P - 16)).iter().map(|x| x.abs()).collect(),
            raw: noise(50 + l, H.hkv * (P - 16)).iter().map(|x| x.abs()).collect(),
        },
        k_pre: noise(60 + l, P * H.hkv * H.d),
    };
    Prefill {
        layers: vec![layer(0), layer(1)],
        len: P,
        window: 16,
        heads: H,
        rope_base: 100000.0,
        clusters: Default::default(),
    }
}

/// Runs `STEPS` steps on both layers; the outputs of every step, concatenated.
fn outputs(spec: Spec) -> Vec<f32> {
    let pre = synthetic();
    let mut pol = policy::build(spec, &pre, P + STEPS).unwrap();
    let mut out = Vec::new();
    for s in 0..STEPS as u64 {
        for l in 0..2 {
            let q = noise(1000 + s * 2 + l as u64, H.hq * H.d);
            let k = noise(2000 + s, H.hkv * H.d);
            let v = noise(3000 + s, H.hkv * H.d);
            let o = pol.step(l, &q, &k, &v).unwrap();
            assert_eq!(o.len(), H.hq * H.d);
            out.extend(o);
        }
    }
    out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn every_policy_is_finite_and_deterministic() {
    let specs = [
        Spec::Full,
        Spec::Streaming { budget: 48 },
        Spec::H2o { budget: 48 },
        Spec::SnapKv { budget: 48 },
        Spec::Quest { budget: 48 },
        Spec::Cluster { budget: 48 },
        Spec::ShadowKv { budget: 48 },
        Spec::WindowKv { budget: 48 },
        Spec::Lazy { budget: 48 },
        Spec::PrefixKv { budget: 48 },
        Spec::LowRank { rank: 24 },
        Spec::Kivi { bits: 2 },
        Spec::Mikv { budget: 48, lo_bits: 2 },
    ];
    let full = outputs(Spec::Full);
    for s in specs {
        let a = outputs(s);
        assert!(a.iter().all(|x| x.is_finite()), "{s}");
        assert_eq!(a, outputs(s), "{s} is not deterministic");
        if s != Spec::Full {
            assert!(rel(&a, &full) > 0.0, "{s} changed nothing");
        }
    }
}

#[test]
fn quantized_error_shrinks_with_bits() {
    let full = outputs(Spec::Full);
    let e: Vec<f64> = [2, 4, 8].iter().map(|&bits| rel(&outputs(Spec::Kivi { bits }), &full)).collect();
    assert!(e[0] > e[1] && e[1] > e[2], "KIVI errors by bits 2/4/8: {e:?}");
    assert!(e[2] < 1e-2, "int8 KIVI error {}", e[2]);
    // MiKV with (almost) every prompt token important is f16 almost everywhere.
    let m = rel(&outputs(Spec::Mikv { budget: P - 1, lo_bits: 2 }), &full);
    assert!(m < e[0] / 4.0, "MiKV with all tokens in f16: {m} vs int2 KIVI {}", e[0]);
}

#[test]
fn larger_budgets_err_less() {
    let full = outputs(Spec::Full);
    for (small, large) in [
        (Spec::Streaming { budget: 24 }, Spec::Streaming { budget: 160 }),
        (Spec::SnapKv { budget: 24 }, Spec::SnapKv { budget: 160 }),
        (Spec::Quest { budget: 32 }, Spec::Quest { budget: 176 }),
        (Spec::Cluster { budget: 32 }, Spec::Cluster { budget: 176 }),
        (Spec::ShadowKv { budget: 32 }, Spec::ShadowKv { budget: 176 }),
        (Spec::WindowKv { budget: 24 }, Spec::WindowKv { budget: 160 }),
        (Spec::Lazy { budget: 24 }, Spec::Lazy { budget: 160 }),
        (Spec::PrefixKv { budget: 24 }, Spec::PrefixKv { budget: 160 }),
    ] {
        let (a, b) = (rel(&outputs(small), &full), rel(&outputs(large), &full));
        assert!(b < a, "{large} ({b}) should err less than {small} ({a})");
    }
}

#[test]
fn budgets_outside_the_prompt_are_refused() {
    let pre = synthetic();
    for s in [
        Spec::H2o { budget: P },
        Spec::Streaming { budget: 4 },
        Spec::SnapKv { budget: 16 },
        Spec::Cluster { budget: 20 },
        Spec::ShadowKv { budget: 15 },
    ] {
        assert!(policy::build(s, &pre, P + 1).is_err(), "{s}");
    }
    assert!(policy::build(Spec::Full, &pre, P - 1).is_err());
}

#[test]
fn png_has_signature_chunks_and_size() {
    let (w, h) = (3u32, 2u32);
    let png = png_rgb(w, h, &[7u8; 18]);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), w);
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
    // IDAT inflates to 2 rows of a filter byte (0) and 9 data bytes.
    let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
    assert_eq!(&png[37..41], b"IDAT");
    let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&png[41..41 + idat_len]).unwrap();
    let row: Vec<u8> = std::iter::once(0).chain([7u8; 9]).collect();
    assert_eq!(raw, [row.clone(), row].concat());
}
