//! Quantization cases (ANCHORS: int4 group-32 over 4M tokens x 128).
use crate::harness::Bench;

pub fn run(_b: &mut Bench) -> ntkv::Result<()> {
    Ok(())
}
