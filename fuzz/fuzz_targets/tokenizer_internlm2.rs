#![no_main]
//! The real InternLM2 tokenizer on arbitrary text and ids (checks in `src/lib.rs`).

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;
use triton_llm_fuzz::{check_tokenizer, fixture_tokenizer};

static TOKENIZER: LazyLock<Tokenizer> =
    LazyLock::new(|| fixture_tokenizer("internlm2", Family::InternLm2));

fuzz_target!(|data: &[u8]| check_tokenizer(&TOKENIZER, data));
