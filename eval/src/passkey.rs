//! Passkey retrieval prompts: a 5-digit number hidden at a depth of repetitive filler, then
//! the question. The answer tokens are teacher-forced; a trial succeeds when every answer
//! token is the argmax.

use anyhow::{ensure, Result};

use crate::tokenizer::Bpe;

const INTRO: &str =
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.";
const FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = " What is the pass key? The pass key is";

/// One passkey prompt.
#[derive(Clone, Debug)]
pub struct Trial {
    /// The number.
    pub key: u32,
    /// Prompt tokens (intro, filler, needle, filler, question).
    pub prompt: Vec<u32>,
    /// Answer tokens (the number).
    pub answer: Vec<u32>,
}

/// The deterministic key of trial `(len, depth index)`.
fn key_for(len: usize, i: usize) -> u32 {
    let mut x = (len as u64) << 8 | i as u64;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    10_000 + (x % 90_000) as u32
}

fn text(repeats: usize, at: usize, key: u32) -> String {
    let mut s = INTRO.to_string();
    for r in 0..repeats {
        if r == at {
            s += &format!(" The pass key is {key}. Remember it. {key} is the pass key.");
        }
        s += FILLER;
    }
    s + QUESTION
}

/// A prompt of at most `len` tokens (answer included) with the needle after `depth` of the
/// filler.
pub fn trial(tok: &Bpe, len: usize, depth: f64, index: usize) -> Result<Trial> {
    let key = key_for(len, index);
    let answer = tok.encode(&format!(" {key}"))?;
    let per = tok.encode(FILLER)?.len();
    let mut repeats = len / per;
    loop {
        let at = ((repeats as f64) * depth).round() as usize;
        let prompt = tok.encode(&text(repeats, at, key))?;
        if prompt.len() + answer.len() <= len {
            return Ok(Trial { key, prompt, answer });
        }
        ensure!(repeats > 1, "no passkey prompt fits in {len} tokens");
        repeats -= 1;
    }
}
