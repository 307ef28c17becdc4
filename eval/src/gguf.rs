//! The GGUF file: metadata, the llama hyper-parameters, and tensors dequantized to f32 by
//! candle-core's quantized loader (Q4_1, Q8_0, F32 as this file holds them).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

/// The llama hyper-parameters the forward needs, read from the `llama.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub embd: usize,
    /// Width of the SwiGLU hidden layer.
    pub ffn: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// `embd / hq`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base (θ).
    pub rope_base: f32,
    /// Trained context length.
    pub context: usize,
    /// Vocabulary size (rows of `token_embd`).
    pub vocab: usize,
}

/// An open GGUF file: the parsed header and a reader for tensor data.
pub struct Gguf {
    /// The header: metadata and tensor infos.
    pub content: Content,
    path: PathBuf,
}

impl Gguf {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut r = BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
        let content =
            Content::read(&mut r).with_context(|| format!("reading the GGUF header of {}", path.display()))?;
        Ok(Gguf { content, path: path.to_path_buf() })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).with_context(|| format!("GGUF metadata `{key}` is missing"))
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        Ok(self.meta(key)?.to_u32().with_context(|| format!("`{key}` is not a u32"))? as usize)
    }

    fn meta_f32(&self, key: &str) -> Result<f32> {
        self.meta(key)?.to_f32().with_context(|| format!("`{key}` is not an f32"))
    }

    /// The llama hyper-parameters.
    pub fn config(&self) -> Result<Config> {
        let arch = self.meta("general.architecture")?.to_string()?;
        if arch != "llama" {
            bail!("architecture `{arch}` is not llama");
        }
        let (embd, hq) = (self.meta_usize("llama.embedding_length")?, self.meta_usize("llama.attention.head_count")?);
        let vocab = self.tensor_dims("token_embd.weight")?[0];
        Ok(Config {
            layers: self.meta_usize("llama.block_count")?,
            embd,
            ffn: self.meta_usize("llama.feed_forward_length")?,
            hq,
            hkv: self.meta_usize("llama.attention.head_count_kv")?,
            head_dim: embd / hq,
            rms_eps: self.meta_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: self.meta_f32("llama.rope.freq_base")?,
            context: self.meta_usize("llama.context_length")?,
            vocab,
        })
    }

    /// The dims of a tensor, outermost first (`[rows, cols]` for a matrix).
    pub fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        let info = self.content.tensor_infos.get(name).with_context(|| format!("tensor `{name}` is missing"))?;
        Ok(info.shape.dims().to_vec())
    }

    /// The storage type of a tensor.
    pub fn tensor_dtype(&self, name: &str) -> Result<GgmlDType> {
        Ok(self.content.tensor_infos.get(name).with_context(|| format!("tensor `{name}` is missing"))?.ggml_dtype)
    }

    /// The first `n` bytes of a tensor's stored data (for checking a block by hand).
    pub fn raw_bytes(&self, name: &str, n: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let info = self.content.tensor_infos.get(name).with_context(|| format!("tensor `{name}` is missing"))?;
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// A tensor dequantized to f32 on the CPU, with its dims (outermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let mut r = BufReader::new(File::open(&self.path)?);
        let q = self.content.tensor(&mut r, name, &Device::Cpu).with_context(|| format!("reading `{name}`"))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }
}
