#![no_main]
//! A request's input tensors decoded into a chat turn. Never panics, and a turn it accepts
//! keeps the interface's rules.
//!
//! Input: a flags byte (1: batched, 2: InternLM2), then tensors, each
//! `name kind dims… len:u16le payload`: `name` indexes `NAMES`; `kind` bit 0 is BYTES,
//! bit 1 makes the payload elements split at NUL and length-prefixed (else it is the raw
//! data), bit 2 reads each dim as an i64 (else an i8), bit 3 sets the shape to the element
//! count, and bits 4-5 give the number of dims.

use std::collections::HashMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use triton_llm::triton::config::ModelConfig;
use triton_llm::model::Family;
use triton_llm::triton::interface::{
    self as seed, ElementType, InputTensor, MAX_STOP_BYTES, MAX_STOP_STRINGS, decode_request,
    encode_bytes,
};

const NAMES: [&str; 13] = [
    seed::PROMPT,
    seed::HISTORY,
    seed::TEMPERATURE,
    seed::MAX_TOKEN,
    seed::HISTORY_LEN,
    seed::TOP_P,
    seed::TOP_K,
    seed::REPETITION_PENALTY,
    seed::SEED,
    seed::MAX_NEW_TOKENS,
    seed::SYSTEM_PROMPT,
    seed::STOP,
    "unknown",
];

/// Reads from the front; past the end it yields zeros (short inputs still decode).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }
}

fn tensors(r: &mut Reader, batched: bool) -> HashMap<String, InputTensor> {
    let mut tensors = HashMap::new();
    while !r.0.is_empty() {
        let name = NAMES[r.byte() as usize % NAMES.len()];
        let kind = r.byte();
        let mut shape: Vec<i64> =
            (0..(kind >> 4) & 3)
                .map(|_| {
                    if kind & 4 != 0 {
                        i64::from_le_bytes(r.array())
                    } else {
                        r.byte() as i8 as i64
                    }
                })
                .collect();
        let len = u16::from_le_bytes(r.array()) as usize;
        let payload = r.take(len);
        let data = if kind & 2 != 0 {
            let elements: Vec<&[u8]> = payload.split(|&b| b == 0).collect();
            if kind & 8 != 0 {
                shape = if batched { vec![1] } else { vec![] };
                shape.push(elements.len() as i64);
            }
            encode_bytes(elements)
        } else {
            payload.to_vec()
        };
        let datatype = if kind & 1 != 0 { ElementType::Bytes } else { ElementType::Fp32 };
        tensors.insert(name.to_string(), InputTensor { datatype, shape, data });
    }
    tensors
}

fuzz_target!(|input: &[u8]| {
    let mut r = Reader(input);
    let flags = r.byte();
    let batched = flags & 1 != 0;
    let family = if flags & 2 != 0 { Family::InternLm2 } else { Family::ChatGlm2 };
    let tensors = tensors(&mut r, batched);
    let defaults = ModelConfig::from_json("{}", Path::new("/m/1")).unwrap().parameters;
    let Ok(request) = decode_request(&tensors, batched, family, &defaults) else { return };

    let (turn, options) = (&request.turn, &request.options);
    assert!(!turn.query.is_empty());
    if family == Family::ChatGlm2 {
        assert_eq!(turn.system_prompt, None);
    }
    let s = &options.sampling;
    assert!(s.temperature >= 0.0 && s.temperature.is_finite());
    assert!(s.top_p > 0.0 && s.top_p <= 1.0);
    assert!(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite());
    assert!(options.max_token.is_none_or(|n| n >= 1));
    assert!(options.max_new_tokens.is_none_or(|n| n >= 1));
    assert!(options.stop.len() <= MAX_STOP_STRINGS);
    assert!(options.stop.iter().all(|s| !s.is_empty()));
    assert!(options.stop.iter().map(String::len).sum::<usize>() <= MAX_STOP_BYTES);
});
