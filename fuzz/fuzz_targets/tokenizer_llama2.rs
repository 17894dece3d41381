#![no_main]
//! The real Llama-2 (Vicuna v1.5) SentencePiece tokenizer on arbitrary text and ids (checks in `src/lib.rs`).

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;
use triton_llm_fuzz::{check_tokenizer, fixture_tokenizer};

static TOKENIZER: LazyLock<Tokenizer> =
    LazyLock::new(|| fixture_tokenizer("llama2-tokenizer", Family::Llama));

fuzz_target!(|data: &[u8]| check_tokenizer(&TOKENIZER, data));
