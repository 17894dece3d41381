//! The served model's Triton configuration (config.pbtxt, which reaches the backend as
//! JSON), parsed and validated once at model load. Every `parameters` key the backend
//! understands is here; a bad value fails the load naming the key.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::DEFAULT_HISTORY_LEN;
use crate::dtype::KvFormat;
use crate::pipeline::LoadOptions;
use crate::serving::SchedulerConfig;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct ModelParameters {
    /// The Hugging Face model folder (default: the model's version directory).
    pub model_dir: PathBuf,
    /// The system message for requests that do not bring one (InternLM2's meta
    /// instruction, FastChat's system message, a template's system turn); None = the
    /// format's default, "" = none.
    pub system_prompt: Option<String>,
    /// Rounds of history kept when a request has no `history_len`.
    pub history_len_default: usize,
    /// `max_token` when a request has none; None = the family's `model.chat` default.
    pub max_token_default: Option<usize>,
    /// How each instance loads the model (`load_format`, `dtype`, `quantization`,
    /// `session_len`, `chat_format`, `max_input_bytes`, `quant_policy`/`kv_cache_dtype` and
    /// the KIND_GPU levers); its `device` is the instance's.
    pub load: LoadOptions,
    /// In-flight batching limits of each instance's engine.
    pub scheduler: SchedulerConfig,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    /// > 0: every tensor carries a leading batch dimension (dynamic batching).
    pub max_batch_size: u64,
    /// `model_transaction_policy { decoupled: true }`.
    pub decoupled: bool,
    pub parameters: ModelParameters,
    /// Parameter keys this backend does not know (logged as warnings by the caller).
    pub unknown_parameters: Vec<String>,
}

impl ModelConfig {
    /// Parses the model config JSON. Relative paths resolve against `version_dir`.
    pub fn from_json(json: &str, version_dir: &Path) -> Result<Self> {
        let config: Value = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("model configuration is not valid JSON: {e}")))?;
        let name = config.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let max_batch_size = config.get("max_batch_size").and_then(Value::as_u64).unwrap_or(0);
        let decoupled = config
            .pointer("/model_transaction_policy/decoupled")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        let mut parameters = ModelParameters {
            model_dir: version_dir.to_path_buf(),
            system_prompt: None,
            history_len_default: DEFAULT_HISTORY_LEN,
            max_token_default: None,
            // KIND_GPU instances sample on the device and replay CUDA graphs unless told not to.
            load: LoadOptions { sample_on_device: true, cuda_graphs: true, ..Default::default() },
            scheduler: SchedulerConfig::default(),
        };
        let mut unknown_parameters = Vec::new();
        // The KV format's two spellings (LMDeploy's and vLLM's), reconciled after the loop.
        let (mut quant_policy, mut kv_cache_dtype) = (None, None);
        let empty = serde_json::Map::new();
        let entries = config.get("parameters").and_then(Value::as_object).unwrap_or(&empty);
        for (key, entry) in entries {
            let value = entry
                .get("string_value")
                .and_then(Value::as_str)
                .ok_or_else(|| parameter_error(key, "has no string_value".to_string()))?;
            match key.as_str() {
                "model_dir" => {
                    if value.trim().is_empty() {
                        return Err(parameter_error(key, "must not be empty".into()));
                    }
                    parameters.model_dir = version_dir.join(value);
                }
                "system_prompt" => parameters.system_prompt = Some(value.to_string()),
                "chat_format" => {
                    crate::chat::format::check_name(value.trim())
                        .map_err(|e| parameter_error(key, e))?;
                    parameters.load.chat_format = Some(value.trim().to_string());
                }
                "history_len_default" => {
                    parameters.history_len_default = parse_count(key, value, 0)?;
                }
                "max_token_default" => {
                    parameters.max_token_default = Some(parse_count(key, value, 1)?);
                }
                "load_format" => {
                    parameters.load.load_format =
                        value.parse().map_err(|e: String| parameter_error(key, e))?;
                }
                "dtype" => {
                    parameters.load.dtype =
                        value.parse().map_err(|e: String| parameter_error(key, e))?;
                }
                "quantization" => {
                    parameters.load.quantization =
                        value.parse().map_err(|e: String| parameter_error(key, e))?;
                }
                "session_len" => parameters.load.session_len = Some(parse_count(key, value, 1)?),
                "max_num_seqs" => parameters.scheduler.max_num_seqs = parse_count(key, value, 1)?,
                "max_num_batched_tokens" => {
                    parameters.scheduler.max_num_batched_tokens = parse_count(key, value, 1)?;
                }
                "block_size" => parameters.scheduler.block_size = parse_count(key, value, 1)?,
                "cache_max_entry_count" => {
                    parameters.scheduler.cache_max_entry_count = match value.trim().parse::<f64>() {
                        Ok(v) if v > 0.0 && v.is_finite() && (v <= 1.0 || v.fract() == 0.0) => v,
                        _ => {
                            return Err(parameter_error(
                                key,
                                format!(
                                    "expected a fraction in (0, 1] or a whole number of blocks, \
                                     got {value:?}"
                                ),
                            ));
                        }
                    };
                }
                "enable_prefix_caching" => {
                    parameters.scheduler.enable_prefix_caching = parse_bool(key, value)?;
                }
                "sample_on_device" => parameters.load.sample_on_device = parse_bool(key, value)?,
                "cuda_graphs" => parameters.load.cuda_graphs = parse_bool(key, value)?,
                "programmatic_launch" => {
                    parameters.load.programmatic_launch = parse_bool(key, value)?;
                }
                "fused_qkv_rope" => parameters.load.fused_qkv_rope = parse_bool(key, value)?,
                "max_input_bytes" => {
                    parameters.load.max_input_bytes = Some(parse_count(key, value, 1)?)
                }
                "quant_policy" => {
                    quant_policy = Some(
                        KvFormat::from_quant_policy(value).map_err(|e| parameter_error(key, e))?,
                    );
                }
                "kv_cache_dtype" => {
                    kv_cache_dtype = Some(
                        KvFormat::from_kv_cache_dtype(value)
                            .map_err(|e| parameter_error(key, e))?,
                    );
                }
                "max_queued_requests" => {
                    parameters.scheduler.max_queued_requests = parse_count(key, value, 1)?;
                }
                _ => unknown_parameters.push(key.clone()),
            }
        }
        parameters.load.kv_format = match (quant_policy, kv_cache_dtype) {
            (Some(a), Some(b)) if a != b && a != KvFormat::Model && b != KvFormat::Model => {
                return Err(parameter_error(
                    "kv_cache_dtype",
                    format!(
                        "{} contradicts quant_policy's {}: give one of the two",
                        b.name(),
                        a.name()
                    ),
                ));
            }
            (a, b) => [a, b].into_iter().flatten().find(|f| *f != KvFormat::Model),
        }
        .unwrap_or_default();
        let scheduler = &parameters.scheduler;
        // Every running sequence decodes each step; with fewer tokens a step than seats,
        // prefills would wait behind decodes (vLLM refuses this too).
        if scheduler.max_num_batched_tokens < scheduler.max_num_seqs {
            return Err(parameter_error(
                "max_num_batched_tokens",
                format!(
                    "{} is below max_num_seqs {}: a step must have room for every sequence's \
                     decode",
                    scheduler.max_num_batched_tokens, scheduler.max_num_seqs
                ),
            ));
        }
        Ok(ModelConfig { name, max_batch_size, decoupled, parameters, unknown_parameters })
    }
}

fn parameter_error(key: &str, message: String) -> Error {
    Error::Config(format!("parameter {key}: {message}"))
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(parameter_error(key, format!("expected true or false, got {value:?}"))),
    }
}

fn parse_count(key: &str, value: &str, min: usize) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(parameter_error(key, format!("expected an integer >= {min}, got {value:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadFormat, Quantization};

    fn parse(parameters: &str) -> Result<ModelConfig> {
        let json = format!(r#"{{"name":"m","max_batch_size":0,"parameters":{{{parameters}}}}}"#);
        ModelConfig::from_json(&json, Path::new("/repo/m/1"))
    }

    #[test]
    fn defaults_apply_without_parameters() {
        let config = parse("").unwrap();
        assert_eq!(config.parameters.model_dir, Path::new("/repo/m/1"));
        assert_eq!(config.parameters.history_len_default, DEFAULT_HISTORY_LEN);
        assert_eq!(config.parameters.max_token_default, None);
        assert!(!config.decoupled);
        // Both checked on a device (BENCHMARKS.md), so on unless a model turns them off.
        assert!(config.parameters.load.sample_on_device && config.parameters.load.cuda_graphs);
        // Not yet checked on a device: off unless a model turns them on.
        assert!(
            !config.parameters.load.programmatic_launch && !config.parameters.load.fused_qkv_rope
        );
        let config = parse(
            r#""sample_on_device":{"string_value":"false"},"cuda_graphs":{"string_value":"false"},
               "programmatic_launch":{"string_value":"true"},
               "fused_qkv_rope":{"string_value":"true"}"#,
        )
        .unwrap();
        assert!(!config.parameters.load.sample_on_device && !config.parameters.load.cuda_graphs);
        assert!(
            config.parameters.load.programmatic_launch && config.parameters.load.fused_qkv_rope
        );
    }

    #[test]
    fn relative_model_dir_resolves_against_the_version_directory() {
        let config = parse(r#""model_dir":{"string_value":"../weights"}"#).unwrap();
        assert_eq!(config.parameters.model_dir, Path::new("/repo/m/1/../weights"));
        let config = parse(r#""model_dir":{"string_value":"/models/glm"}"#).unwrap();
        assert_eq!(config.parameters.model_dir, Path::new("/models/glm"));
    }

    #[test]
    fn values_parse_and_unknown_keys_are_collected() {
        let config = parse(
            r#""history_len_default":{"string_value":"3"},"max_token_default":{"string_value":"512"},
               "system_prompt":{"string_value":""},"load_format":{"string_value":"dummy"},
               "colour":{"string_value":"blue"},"quantization":{"string_value":"w8a16"}"#,
        )
        .unwrap();
        assert_eq!(config.parameters.load.quantization, Quantization::W8A16);
        assert_eq!(config.parameters.history_len_default, 3);
        assert_eq!(config.parameters.max_token_default, Some(512));
        assert_eq!(config.parameters.system_prompt.as_deref(), Some(""));
        assert_eq!(config.parameters.load.load_format, LoadFormat::Dummy);
        assert_eq!(config.unknown_parameters, vec!["colour".to_string()]);
        let config = parse(
            r#""max_input_bytes":{"string_value":"4096"},"max_queued_requests":{"string_value":"3"}"#,
        )
        .unwrap();
        assert_eq!(config.parameters.load.max_input_bytes, Some(4096));
        assert_eq!(config.parameters.scheduler.max_queued_requests, 3);
        assert_eq!(config.parameters.load.kv_format, KvFormat::Model);
        for (policy, format) in
            [("0", KvFormat::Model), ("8", KvFormat::Int8), ("4", KvFormat::Int4)]
        {
            let json = format!(r#""quant_policy":{{"string_value":"{policy}"}}"#);
            assert_eq!(parse(&json).unwrap().parameters.load.kv_format, format);
        }
        for (name, format) in [
            ("auto", KvFormat::Model),
            ("fp8", KvFormat::Fp8),
            ("fp8_e4m3", KvFormat::Fp8),
            ("int8", KvFormat::Int8),
            ("int4", KvFormat::Int4),
        ] {
            let json = format!(r#""kv_cache_dtype":{{"string_value":"{name}"}}"#);
            assert_eq!(parse(&json).unwrap().parameters.load.kv_format, format);
        }
        // Both spellings: the one that quantises wins over the other's default; agreeing
        // values are fine.
        for (policy, name, format) in [
            ("0", "fp8", KvFormat::Fp8),
            ("8", "auto", KvFormat::Int8),
            ("4", "int4", KvFormat::Int4),
        ] {
            let json = format!(
                r#""quant_policy":{{"string_value":"{policy}"}},"kv_cache_dtype":{{"string_value":"{name}"}}"#
            );
            assert_eq!(parse(&json).unwrap().parameters.load.kv_format, format, "{policy} {name}");
        }
    }

    #[test]
    fn a_bad_value_names_its_key() {
        for (params, key) in [
            (r#""history_len_default":{"string_value":"-1"}"#, "history_len_default"),
            (r#""max_token_default":{"string_value":"0"}"#, "max_token_default"),
            (r#""load_format":{"string_value":"pickle"}"#, "load_format"),
            (r#""session_len":{"string_value":"many"}"#, "session_len"),
            (r#""dtype":{"string_value":"int4"}"#, "dtype"),
            (r#""quantization":{"string_value":"int4"}"#, "quantization"),
            (r#""model_dir":{"string_value":" "}"#, "model_dir"),
            (r#""max_num_seqs":{"string_value":"0"}"#, "max_num_seqs"),
            (r#""max_num_batched_tokens":{"string_value":"x"}"#, "max_num_batched_tokens"),
            (r#""cache_max_entry_count":{"string_value":"2.5"}"#, "cache_max_entry_count"),
            (r#""cache_max_entry_count":{"string_value":"0"}"#, "cache_max_entry_count"),
            (r#""enable_prefix_caching":{"string_value":"maybe"}"#, "enable_prefix_caching"),
            (r#""sample_on_device":{"string_value":"yes"}"#, "sample_on_device"),
            (r#""cuda_graphs":{"string_value":"on"}"#, "cuda_graphs"),
            (r#""programmatic_launch":{"string_value":"y"}"#, "programmatic_launch"),
            (r#""fused_qkv_rope":{"string_value":"no"}"#, "fused_qkv_rope"),
            (r#""block_size":{"string_value":"0"}"#, "block_size"),
            (r#""max_input_bytes":{"string_value":"0"}"#, "max_input_bytes"),
            (r#""max_queued_requests":{"string_value":"-4"}"#, "max_queued_requests"),
            (r#""quant_policy":{"string_value":"16"}"#, "quant_policy"),
            (r#""kv_cache_dtype":{"string_value":"fp8_e5m2"}"#, "kv_cache_dtype"),
            (
                r#""quant_policy":{"string_value":"8"},"kv_cache_dtype":{"string_value":"fp8"}"#,
                "kv_cache_dtype",
            ),
            (r#""max_num_seqs":{"string_value":"4096"}"#, "max_num_batched_tokens"),
            (r#""chat_format":{"string_value":"alpaca"}"#, "chat_format"),
        ] {
            let message = parse(params).unwrap_err().to_string();
            assert!(message.contains(&format!("parameter {key}")), "{message}");
        }
    }

    #[test]
    fn decoupled_and_batching_are_read() {
        let json =
            r#"{"name":"m","max_batch_size":8,"model_transaction_policy":{"decoupled":true}}"#;
        let config = ModelConfig::from_json(json, Path::new("/r/m/1")).unwrap();
        assert_eq!(config.max_batch_size, 8);
        assert!(config.decoupled);
    }
}
