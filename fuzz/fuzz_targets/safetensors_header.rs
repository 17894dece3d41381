#![no_main]
//! A safetensors shard's header. Input: the length of the data section (8 bytes,
//! little-endian; it may be far larger than the input), then the header JSON. Never panics.

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use triton_llm::model::weights::parse_header;

fuzz_target!(|input: &[u8]| {
    let Some((data_len, header)) = input.split_first_chunk::<8>() else { return };
    let file_len = (8 + header.len() as u64).saturating_add(u64::from_le_bytes(*data_len));
    let _ = parse_header(Path::new("fuzz.safetensors"), header, file_len, 0);
});
