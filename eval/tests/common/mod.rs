//! The model, loaded once per test binary, or a visible SKIP when it is not fetched.

use std::sync::OnceLock;

use ntkv_eval::gguf::Gguf;
use ntkv_eval::model::Model;
use ntkv_eval::tokenizer::Bpe;
use ntkv_eval::{repo_root, MODEL_FILE};

pub struct Loaded {
    pub gguf: Gguf,
    pub model: Model,
    pub tok: Bpe,
}

static MODEL: OnceLock<Option<Loaded>> = OnceLock::new();

/// The model, or `None` after printing `SKIP` (a failure with `NTKV_REQUIRE_MODEL=1`).
pub fn model(test: &str) -> Option<&'static Loaded> {
    let loaded = MODEL.get_or_init(|| {
        let path = repo_root().join(MODEL_FILE);
        if !path.exists() {
            return None;
        }
        let gguf = Gguf::open(&path).expect("the model file parses");
        let model = Model::load(&gguf).expect("the model loads");
        let tok = Bpe::from_gguf(&gguf).expect("the tokenizer builds");
        Some(Loaded { gguf, model, tok })
    });
    if loaded.is_none() {
        assert!(
            std::env::var("NTKV_REQUIRE_MODEL").as_deref() != Ok("1"),
            "{test}: {MODEL_FILE} is missing and NTKV_REQUIRE_MODEL=1 (run tools/fetch-model.sh)"
        );
        // Straight to stderr, past libtest's capture, so a plain `cargo test` shows the skip.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP: {test}: {MODEL_FILE} not fetched (tools/fetch-model.sh)");
    }
    loaded.as_ref()
}
