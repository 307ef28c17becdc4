//! SmolLM2-135M in the loop: a llama forward on the CPU whose attention, at every layer
//! and every decode step, goes through ntkv's KV-cache policies (their CPU references), and
//! the measurements of what each policy costs in accuracy.
//!
//! - [`gguf`]: the GGUF file, tensors dequantized by candle-core;
//! - [`tokenizer`]: the byte-level BPE from the GGUF metadata;
//! - [`model`]: the forward (f32), without attention;
//! - [`attn`]: the full causal prefill attention;
//! - [`policy`]: full, StreamingLLM, H2O, SnapKV, WindowKV, LazyEviction, PrefixKV, Quest,
//!   ClusterKV, ShadowKV's landmarks and low-rank keys, KIVI and MiKV, over ntkv;
//! - [`run`]: the shared prefill and the teacher-forced decode of one policy;
//! - [`passkey`]: the passkey prompts;
//! - [`report`]: JSON, markdown and the PNG plot.

pub mod attn;
pub mod gguf;
pub mod model;
pub mod passkey;
pub mod policy;
pub mod report;
pub mod run;
pub mod tokenizer;

use std::path::PathBuf;

/// The model file `tools/fetch-model.sh` writes, relative to the repository root.
pub const MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The text `tools/fetch-text.sh` writes, relative to the repository root.
pub const TEXT_FILE: &str = "models/pride-and-prejudice.txt";

/// The repository root (the parent of this crate's folder).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
