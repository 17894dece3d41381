//! Inputs that crashed a fuzz target (fuzz/, scripts/fuzz.sh), each kept as a test.

use std::path::Path;

use triton_llm::model::Checkpoint;
use triton_llm::model::weights::parse_header;

/// A shard file: the 8-byte header length, the header, then `data`.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(data);
    file
}

/// data_offsets near u64::MAX overflowed the absolute offset (a panic with overflow
/// checks, a misleading "overlap or leave gaps" without).
#[test]
fn safetensors_offsets_past_any_file_are_refused() {
    let header = r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551610,18446744073709551614]}}"#;
    let file = safetensors(header, &[0; 4]);
    let err = parse_header(Path::new("m.safetensors"), header.as_bytes(), u64::MAX, 0)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("past the end"), "{err}");

    // The same through a file on disk.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &file).unwrap();
    let err = Checkpoint::open(dir.path()).err().expect("refused").to_string();
    assert!(err.contains("model.safetensors") && err.contains("past the end"), "{err}");
}

/// A long integer literal parsed one ulp off (serde_json's fast float path) and was written
/// back into the prompt unlike Python's `json.dumps(json.loads(…))`.
#[test]
fn numbers_in_messages_read_back_as_python_reads_them() {
    use triton_llm::chat::messages::Json;
    let json = Json::parse("555555555555555555555555555555555555555555", "t").unwrap();
    assert_eq!(json.python_dumps(), "5.555555555555556e+41");
    assert_eq!(Json::parse(&json.python_dumps(), "t").unwrap(), json);
}
