//! Problems shared by the lowrank tests: matrices with a prescribed spectrum and random
//! sorted position lists.
#![allow(dead_code)]

use ntkv::lowrank::cpu;
use ntkv::rng::Rng;
use ntkv::Float;

/// The spectra of the quality tests.
#[derive(Clone, Copy, Debug)]
pub enum Spectrum {
    /// `σᵢ = 0.8^i`.
    Fast,
    /// `σᵢ = (i + 1)^(-1/2)`.
    Slow,
    /// Key-like: a few dominant directions (outlier channels), a power-law body and a noise
    /// floor, plus a per-channel mean offset.
    KeyLike,
}

impl Spectrum {
    pub fn value(self, i: usize) -> f64 {
        match self {
            Spectrum::Fast => 0.8f64.powi(i as i32),
            Spectrum::Slow => 1.0 / ((i + 1) as f64).sqrt(),
            Spectrum::KeyLike => {
                let lead = if i < 4 { 20.0 / (i + 1) as f64 } else { 0.0 };
                lead + 3.0 * ((i + 1) as f64).powf(-0.9) + 0.02
            }
        }
    }
}

/// `A = U·diag(σ)·Vᵀ` (`m × n`, row-major f64) with Haar-like random orthonormal factors.
pub fn with_spectrum(rng: &mut Rng, m: usize, n: usize, spectrum: Spectrum) -> Vec<f64> {
    let k = m.min(n);
    let g = |rng: &mut Rng, rows: usize| -> Vec<f64> {
        let x: Vec<f64> = rng.normal_vec(rows * k).into_iter().map(f64::from).collect();
        cpu::householder_q(&x, rows, k)
    };
    let u = g(rng, m);
    let v = g(rng, n);
    let mut us = u.clone();
    for i in 0..m {
        for j in 0..k {
            us[i * k + j] *= spectrum.value(j);
        }
    }
    // A = (U diag(s)) Vᵀ: Vᵀ is V read transposed.
    let vt: Vec<f64> = (0..k).flat_map(|j| (0..n).map(move |c| (j, c))).map(|(j, c)| v[c * k + j]).collect();
    let mut a = cpu::matmul(&us, false, &vt, m, k, n);
    if let Spectrum::KeyLike = spectrum {
        let offs: Vec<f64> = (0..n).map(|c| if c % 16 == 3 { 0.5 } else { 0.0 }).collect();
        for i in 0..m {
            for c in 0..n {
                a[i * n + c] += offs[c];
            }
        }
    }
    a
}

pub fn to_storage<T: Float>(a: &[f64]) -> Vec<T> {
    a.iter().map(|&x| T::from_f32(x as f32)).collect()
}

pub fn widen<T: Float>(a: &[T]) -> Vec<f64> {
    a.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// Random strictly ascending lists per (b, h) over `0..seq_lens[b]`, each of length up to
/// `max_len` (`full`: exactly min(max_len, len)); `extra` adds the positions given to every
/// list that can hold them.
pub fn random_lists(
    rng: &mut Rng,
    seq_lens: &[u32],
    hkv: usize,
    max_len: usize,
    full: bool,
    extra: &[u32],
) -> (Vec<u32>, Vec<u32>) {
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    for &len in seq_lens {
        let n = len as usize;
        for _ in 0..hkv {
            let want = if full { max_len.min(n) } else { rng.below(max_len.min(n) + 1) };
            let mut list: Vec<u32> = Vec::new();
            let mut need = want;
            for i in 0..n {
                if need > 0 && rng.below(n - i) < need {
                    list.push(i as u32);
                    need -= 1;
                }
            }
            for &e in extra {
                if (e as usize) < n && !list.contains(&e) {
                    list.push(e);
                }
            }
            list.sort_unstable();
            indices.extend(&list);
            indptr.push(indices.len() as u32);
        }
    }
    (indptr, indices)
}

/// Exactly `n` sorted positions below `t` for each of `heads` lists of one sequence, as CSR
/// (the bench cases' selections).
pub fn fixed_lists(rng: &mut Rng, t: usize, heads: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    random_lists(rng, &[t as u32], heads, n, true, &[])
}

/// Relative L2 error of `got` against `want`.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}
