#![no_main]
//! The model configuration as Triton hands it over (config.pbtxt as JSON). Input: the JSON
//! text. Never panics, and a configuration it accepts holds what the engine relies on.

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use triton_llm::triton::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else { return };
    let version_dir = Path::new("/models/m/1");
    let Ok(config) = ModelConfig::from_json(json, version_dir) else { return };
    let p = &config.parameters;
    let s = &p.scheduler;
    assert!(s.max_num_seqs >= 1 && s.block_size >= 1);
    assert!(s.max_num_batched_tokens >= s.max_num_seqs);
    let c = s.cache_max_entry_count;
    assert!(c > 0.0 && c.is_finite() && (c <= 1.0 || c.fract() == 0.0), "{c}");
    assert!(p.max_token_default.is_none_or(|n| n >= 1));
    assert!(p.load.session_len.is_none_or(|n| n >= 1));
    assert!(p.load.max_input_bytes.is_none_or(|n| n >= 1));
    assert!(p.model_dir.starts_with(version_dir) || p.model_dir.is_absolute());
});
