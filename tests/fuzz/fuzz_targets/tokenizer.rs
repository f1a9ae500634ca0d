//! Clinical descriptions into the shipped tokenizer, configured as the device configures it:
//! never more tokens than the text encoder takes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

static TOK: OnceLock<(sgps::encoders::text::Tokenizer, usize)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (tok, max) = TOK.get_or_init(|| {
        let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let m = sgps::manifest::Manifest::load(&models).expect("models/manifest.json");
        let spec = &m.text_encoder;
        let path = models.join(&spec.tokenizer.file);
        let tok = sgps::encoders::text::load_tokenizer(&path, spec.max_tokens).expect("tokenizer");
        (tok, spec.max_tokens)
    });
    let text = String::from_utf8_lossy(data);
    if let Ok(b) = sgps::encoders::text::tokenize_with(tok, &[&text]) {
        assert!(b.seq <= *max, "{} tokens > {max}", b.seq);
    }
});
