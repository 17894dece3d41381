#![no_main]
//! BYTES tensor decoding. Input: the declared element count (8 bytes, little-endian), then
//! the tensor's data. Never panics, and what it accepts re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use triton_llm::triton::interface::{decode_bytes, encode_bytes};

fuzz_target!(|input: &[u8]| {
    let Some((count, data)) = input.split_first_chunk::<8>() else { return };
    let count = u64::from_le_bytes(*count) as usize;
    if let Ok(elements) = decode_bytes("fuzz", data, count) {
        assert_eq!(elements.len(), count);
        assert_eq!(encode_bytes(elements.iter().copied()), data);
    }
});
