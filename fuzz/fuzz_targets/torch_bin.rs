#![no_main]
//! A PyTorch `.bin` file (torch.save's zip with a pickle): the zip directory, the restricted
//! unpickler, the tensor geometry checks and every storage record's CRC. Never panics, and
//! every tensor it accepts lies inside its storage record with the size its shape implies.
//!
//! An even first byte: the rest is the whole file. An odd one: the rest is the pickle,
//! wrapped here into a valid zip (CRCs right) with storage records `archive/data/0`, `1`
//! and `2` of 32, 4 and 12 bytes, so that mutations reach the unpickler.

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use triton_llm::model::torch_bin::{crc32, parse_bytes};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let wrapped;
    let file = if mode & 1 == 0 {
        rest
    } else {
        let storages = [[0x3c; 32].as_slice(), &[0x3f; 4], &[1; 12]];
        let mut records = vec![("archive/data.pkl".to_string(), rest)];
        records.extend(storages.iter().enumerate().map(|(k, s)| (format!("archive/data/{k}"), *s)));
        wrapped = stored_zip(&records);
        &wrapped
    };
    let Ok(tensors) = parse_bytes(Path::new("fuzz.bin"), file) else { return };
    for t in tensors {
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        assert_eq!(t.len, numel * t.dtype.size() as u64, "{}", t.name);
        assert!(t.offset >= t.record.offset, "{}", t.name);
        assert!(t.offset + t.len <= t.record.offset + t.record.len, "{}", t.name);
        assert!(t.record.offset + t.record.len <= file.len() as u64, "{}", t.name);
    }
});

/// A zip of uncompressed records, as torch.save writes it (less the alignment padding).
fn stored_zip(records: &[(String, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let local = out.len() as u32;
        let fields = |h: &mut Vec<u8>| {
            h.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
            h.extend_from_slice(&crc32(data).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&[0, 0]); // extra
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        fields(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0]);
        fields(&mut central);
        central.extend_from_slice(&[0; 10]); // comment, disk, attributes
        central.extend_from_slice(&local.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (offset, size) = (out.len() as u32, central.len() as u32);
    out.extend(central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}
