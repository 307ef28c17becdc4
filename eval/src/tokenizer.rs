//! The SmolLM2 tokenizer, built from the GGUF metadata (`tokenizer.ggml.*`: 49152 tokens and
//! their merges) with the `tokenizers` crate's byte-level BPE.
//!
//! candle-core builds the vocabulary, merges and decoder; its default pre-tokenizer for an
//! unknown `tokenizer.ggml.pre` is plain GPT-2 with a prefix space. This file's pre-type is
//! `smollm`, which llama.cpp (and the model's own tokenizer.json) runs as two steps: every
//! digit on its own, then GPT-2's byte-level split with no prefix space. That is set here.

use anyhow::{bail, Result};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

use crate::gguf::Gguf;

/// Byte-level BPE from the GGUF metadata.
pub struct Bpe {
    inner: Tokenizer,
}

impl Bpe {
    /// Builds the tokenizer; refuses a pre-type other than `smollm` or `gpt2`.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let pre = g.meta("tokenizer.ggml.pre")?.to_string()?.clone();
        let mut inner = Tokenizer::from_gguf(&g.content)?;
        let byte_level = ByteLevel::new(false, true, true);
        match pre.as_str() {
            "smollm" => {
                let seq = Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(byte_level),
                ]);
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
            }
            "gpt2" => {
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)));
            }
            other => bail!("tokenizer.ggml.pre `{other}` is not supported"),
        }
        Ok(Bpe { inner })
    }

    /// Token ids of `text`, no BOS/EOS (this file sets `add_bos_token = false`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(anyhow::Error::msg)
    }
}
