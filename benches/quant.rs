//! Criterion benches for the quantization family.
use criterion::{criterion_group, criterion_main, Criterion};

fn benches(_c: &mut Criterion) {}

criterion_group!(quant, benches);
criterion_main!(quant);
