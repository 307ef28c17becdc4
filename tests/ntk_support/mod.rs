//! Shared by the NTK and GEMM test files: random MLPs and dtype conversions.
#![allow(dead_code)]

use ntkv::ntk::{cpu, Activation, NtkMode};
use ntkv::rng::Rng;

/// Every contraction mode.
pub const MODES: [NtkMode; 5] = NtkMode::ALL;

pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Values rounded to bf16 and back.
pub fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// A host MLP with `1/√d_in`-scaled normal weights and uniform biases on the layers where
/// `bias(l)` holds.
pub fn random_mlp(rng: &mut Rng, widths: &[usize], act: Activation, bias: impl Fn(usize) -> bool) -> cpu::Mlp {
    let layers = widths.len() - 1;
    cpu::Mlp {
        widths: widths.to_vec(),
        weights: (0..layers)
            .map(|l| {
                let s = 1.0 / (widths[l] as f32).sqrt();
                rng.normal_vec(widths[l + 1] * widths[l]).into_iter().map(|v| v * s).collect()
            })
            .collect(),
        biases: (0..layers).map(|l| bias(l).then(|| rng.uniform_vec(widths[l + 1], -0.5, 0.5))).collect(),
        activation: act,
    }
}

/// The host factors `(A_l, G_l)` of an MLP pass, as f32, with the layer descriptors of
/// [`cpu::factored_ntk`].
pub struct HostFactors {
    pub a: Vec<Vec<f32>>,
    pub g: Vec<Vec<f32>>,
}

impl HostFactors {
    pub fn of(mlp: &cpu::Mlp, x: &[f32], n: usize) -> Self {
        let p = mlp.pass(x, n).unwrap();
        HostFactors { a: p.inputs.iter().map(|v| f32s(v)).collect(), g: p.cotangents.iter().map(|v| f32s(v)).collect() }
    }

    pub fn layers<'a>(&'a self, mlp: &cpu::Mlp) -> Vec<cpu::FactoredLayer<'a>> {
        (0..mlp.layers())
            .map(|l| cpu::FactoredLayer {
                a: &self.a[l],
                g: &self.g[l],
                d_in: mlp.widths[l],
                d_out: mlp.widths[l + 1],
                bias: mlp.biases[l].is_some(),
            })
            .collect()
    }
}
