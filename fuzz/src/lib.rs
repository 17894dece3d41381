//! What the tokenizer targets share: the checks one input gets against one tokenizer.

use std::path::PathBuf;

use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;

/// A fixture tokenizer of the main crate (the real ChatGLM2 / InternLM2 ones).
pub fn fixture_tokenizer(folder: &str, family: Family) -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(folder);
    Tokenizer::from_folder(&dir, family).expect("the fixture tokenizer loads")
}

/// An odd first byte: the rest is ids to decode; even: the rest is text to encode.
pub fn check_tokenizer(tok: &Tokenizer, data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => check_decode(tok, &ids_of(tok, rest)),
        Some((_, rest)) => check_encode(tok, &String::from_utf8_lossy(rest)),
        None => {}
    }
}

/// Three bytes per id, weighted towards the ids that decode specially: byte pieces
/// (3..=258 in both families), unk/bos/eos, the specials at the end, ids past the table.
fn ids_of(tok: &Tokenizer, bytes: &[u8]) -> Vec<u32> {
    let vocab = tok.vocab_size() as u32;
    bytes
        .chunks_exact(3)
        .map(|c| {
            let (class, a, b) = (c[0] % 8, c[1] as u32, c[2] as u32);
            match class {
                0 | 1 => 3 + a,
                2 => a % 3,
                3 => vocab - 1 - a % 8,
                4 => vocab + a % 4,
                _ => (((c[0] as u32) << 16) | (a << 8) | b) % vocab,
            }
        })
        .collect()
}

/// Decoding never panics, and the stream decoder adds up to the whole decode, emitting
/// only text that is final.
fn check_decode(tok: &Tokenizer, ids: &[u32]) {
    let full = tok.decode(ids);
    let mut stream = tok.stream_decoder();
    let mut streamed = String::new();
    for &id in ids {
        streamed.push_str(&stream.push(id));
        assert!(full.starts_with(&streamed), "{ids:?}: streamed {streamed:?}, full {full:?}");
    }
    streamed.push_str(&stream.finish());
    assert_eq!(streamed, full, "{ids:?}");
}

fn check_encode(tok: &Tokenizer, text: &str) {
    let plain = tok.encode(text, false).expect("encode");
    let special = tok.encode(text, true).expect("encode");
    let vocab = tok.vocab_size() as u32;
    assert!(plain.iter().all(|&id| id < vocab), "{text:?} → {plain:?}");
    // The special tokens go in front and change nothing else.
    let prefix = match tok.family() {
        Family::ChatGlm2 => 2,
        Family::InternLm2 | Family::Llama => 1,
    };
    assert_eq!(special.len(), plain.len() + prefix, "{text:?}");
    assert_eq!(special[prefix..], plain[..], "{text:?}");
    check_decode(tok, &special);
    if round_trips(tok.family(), text) {
        assert_eq!(tok.decode(&plain), text, "{text:?} → {plain:?}");
        assert_eq!(tok.decode(&special), text, "{text:?} → {special:?}");
    }
}

/// Whether the original tokenizer gives `text` back from its ids (tests/tokenizer.rs and
/// tests/tokenizer_llama.rs check the cases against it): not where '▁' stands for a space,
/// nor ChatGLM2's and Llama's leading spaces (their decode drops one with the dummy
/// prefix), nor special-token text (decoded with the specials skipped).
fn round_trips(family: Family, text: &str) -> bool {
    const INTERNLM2_SPECIAL: [&str; 5] = ["<s>", "</s>", "<unk>", "<|", "[UNUSED_TOKEN_"];
    const LLAMA_SPECIAL: [&str; 3] = ["<s>", "</s>", "<unk>"];
    !text.contains('▁')
        && match family {
            Family::ChatGlm2 => !text.starts_with(' '),
            Family::InternLm2 => !INTERNLM2_SPECIAL.iter().any(|s| text.contains(s)),
            Family::Llama => {
                !text.starts_with(' ') && !LLAMA_SPECIAL.iter().any(|s| text.contains(s))
            }
        }
}
