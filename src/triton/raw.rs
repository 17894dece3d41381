//! The vLLM-backend and TensorRT-LLM-backend request contracts, next to the seed
//! interface: raw text in `text_input` (no chat template), out `text_output`. Pure logic
//! (no FFI), so it is tested without a server.
//!
//! vLLM's inputs: `text_input` STRING, `stream`, `exclude_input_in_output`,
//! `return_finish_reason`, `return_num_input_tokens`, `return_num_output_tokens` BOOL and
//! `sampling_parameters` STRING (a JSON object); outputs `text_output`, `finish_reason`
//! STRING and `num_input_tokens`, `num_output_tokens` UINT32. TensorRT-LLM's names that do
//! not clash with the seed interface: `max_tokens`, `min_length` INT32, `stop_words`
//! STRING [-1], `random_seed` UINT64. The sampling names both define (`temperature`,
//! `top_p`, `top_k`, `repetition_penalty`, `seed`) are read as text or as numbers, whichever
//! type the model config declares.
//!
//! In place of `text_input`, a request may carry a conversation: `messages` STRING (an
//! OpenAI-style JSON list) and optionally `tools` STRING (a JSON list of functions),
//! rendered in the family's chat format (`chat::messages`). Such a request answers as a
//! chat completion does: the answer alone in `text_output`, `finish_reason` and the token
//! counts unless their flags say false, the family's default length limit, and with tools
//! a `tool_calls` STRING output (OpenAI's JSON list) and finish reason `tool_calls` when
//! the answer calls one.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use serde_json::Value;

use super::interface::{
    self, ElementType, HISTORY, HISTORY_LEN, InputTensor, Inputs, MAX_NEW_TOKENS, MAX_TOKEN,
    OutputTensor, PROMPT, STOP, SYSTEM_PROMPT, invalid,
};
use crate::chat::messages::{Conversation, openai_tool_calls};
use crate::pipeline::{Completion, GenerationOptions};
use crate::sampling::SamplingParams;
use crate::sequence::FinishReason;
use crate::{Error, Result};

pub const TEXT_INPUT: &str = "text_input";
pub const STREAM: &str = "stream";
pub const SAMPLING_PARAMETERS: &str = "sampling_parameters";
pub const EXCLUDE_INPUT_IN_OUTPUT: &str = "exclude_input_in_output";
pub const RETURN_FINISH_REASON: &str = "return_finish_reason";
pub const RETURN_NUM_INPUT_TOKENS: &str = "return_num_input_tokens";
pub const RETURN_NUM_OUTPUT_TOKENS: &str = "return_num_output_tokens";
pub const RETURN_LOGPROBS: &str = "return_logprobs";
pub const MAX_TOKENS: &str = "max_tokens";
pub const MIN_LENGTH: &str = "min_length";
pub const STOP_WORDS: &str = "stop_words";
pub const RANDOM_SEED: &str = "random_seed";
pub const TEXT_OUTPUT: &str = "text_output";
pub const FINISH_REASON: &str = "finish_reason";
pub const NUM_INPUT_TOKENS: &str = "num_input_tokens";
pub const NUM_OUTPUT_TOKENS: &str = "num_output_tokens";
pub const MESSAGES: &str = "messages";
pub const TOOLS: &str = "tools";
pub const TOOL_CALLS: &str = "tool_calls";

/// Inputs only a `text_input` or `messages` request takes.
pub const RAW_ONLY: [&str; 12] = [
    TOOLS,
    RETURN_LOGPROBS,
    STREAM,
    SAMPLING_PARAMETERS,
    EXCLUDE_INPUT_IN_OUTPUT,
    RETURN_FINISH_REASON,
    RETURN_NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS,
    MAX_TOKENS,
    MIN_LENGTH,
    STOP_WORDS,
    RANDOM_SEED,
];

/// Inputs only a `prompt` request (a chat turn) takes.
pub const CHAT_ONLY: [&str; 5] = [HISTORY, HISTORY_LEN, SYSTEM_PROMPT, MAX_TOKEN, MAX_NEW_TOKENS];

/// vLLM's SamplingParams default `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// The additional outputs a request asked for with the `return_*` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOutputs {
    pub finish_reason: bool,
    pub num_input_tokens: bool,
    pub num_output_tokens: bool,
    /// Tools were offered: the final response carries `tool_calls`.
    pub tool_calls: bool,
}

/// What a raw-contract request is continued from.
#[derive(Clone, Debug)]
pub enum RawPrompt {
    /// `text_input`: the text as it is.
    Text(String),
    /// `messages` (and `tools`): a conversation in the family's chat format.
    Messages(Conversation),
}

#[derive(Clone, Debug)]
pub struct RawRequest {
    pub prompt: RawPrompt,
    pub options: GenerationOptions,
    /// Each response carries the new text (a decoupled model only); else one response.
    pub stream: bool,
    /// `exclude_input_in_output` false: the text is the prompt followed by the answer.
    pub prepend_input: bool,
    pub outputs: RawOutputs,
}

/// vLLM's SamplingParams defaults, where they differ from the chat turn's.
fn vllm_defaults() -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
        },
        max_new_tokens: Some(DEFAULT_MAX_TOKENS),
        ..GenerationOptions::default()
    }
}

/// Decodes a `text_input` or `messages` request (the caller checked that it has exactly
/// one of them, and no `prompt`).
pub fn decode_raw(
    tensors: &HashMap<String, InputTensor>,
    batched: bool,
    decoupled: bool,
) -> Result<RawRequest> {
    let inputs = Inputs { tensors, batched };
    let prompt = match (inputs.scalar(TEXT_INPUT)?, inputs.scalar(MESSAGES)?) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidRequest(format!(
                "{TEXT_INPUT}, {MESSAGES}: a request carries one of them, not both"
            )));
        }
        (Some(text), None) => {
            if text.is_empty() {
                return Err(invalid(TEXT_INPUT, "must not be empty".into()));
            }
            if inputs.has(TOOLS) {
                return Err(invalid(
                    TOOLS,
                    format!("go with {MESSAGES} (a conversation), not with {TEXT_INPUT}"),
                ));
            }
            RawPrompt::Text(text.to_string())
        }
        (None, Some(messages)) => {
            RawPrompt::Messages(Conversation::parse(messages, inputs.scalar(TOOLS)?)?)
        }
        (None, None) => return Err(invalid(TEXT_INPUT, "is required".into())),
    };
    let conversation = match &prompt {
        RawPrompt::Messages(conversation) => Some(conversation),
        RawPrompt::Text(_) => None,
    };
    if let Some(name) = CHAT_ONLY.iter().find(|name| inputs.has(name)) {
        return Err(invalid(
            name,
            format!(
                "belongs to the seed interface (a chat turn in {PROMPT}); a {TEXT_INPUT} or \
                 {MESSAGES} request takes {MAX_TOKENS} or {SAMPLING_PARAMETERS} instead"
            ),
        ));
    }

    let mut options = vllm_defaults();
    if conversation.is_some() {
        // A chat completion runs to the family's chat limit unless told otherwise.
        options.max_new_tokens = None;
    }
    if let Some(json) = inputs.scalar(SAMPLING_PARAMETERS)? {
        apply_sampling_parameters(json, &mut options)?;
    }
    // Typed inputs win over the same setting in sampling_parameters.
    interface::read_sampling(&inputs, &mut options.sampling)?;
    if let Some(seed) = inputs.number::<u64>(RANDOM_SEED, "an unsigned 64-bit integer")? {
        options.sampling.seed = Some(seed);
    }
    if let Some(max) = inputs.count(MAX_TOKENS, 1)? {
        options.max_new_tokens = Some(max);
    }
    if let Some(min) = inputs.count(MIN_LENGTH, 0)? {
        options.min_tokens = min;
    }
    let typed_stop = interface::read_stop(&inputs, &[STOP, STOP_WORDS])?;
    options.stop.extend(typed_stop);
    interface::check_stop(STOP, &options.stop)?;

    let stream = inputs.flag(STREAM)?.unwrap_or(false);
    if stream && !decoupled {
        return Err(invalid(
            STREAM,
            "true needs a decoupled model (model_transaction_policy { decoupled: true })".into(),
        ));
    }
    // vLLM: the prompt leads the text unless excluded, and by default when streaming. A
    // conversation's answer comes alone.
    let exclude = inputs.flag(EXCLUDE_INPUT_IN_OUTPUT)?;
    let prepend_input = match exclude {
        Some(exclude) => !exclude,
        None => !stream && conversation.is_none(),
    };
    if prepend_input && stream {
        return Err(invalid(EXCLUDE_INPUT_IN_OUTPUT, "false is not allowed when streaming".into()));
    }
    if prepend_input && conversation.is_some() {
        return Err(invalid(
            EXCLUDE_INPUT_IN_OUTPUT,
            format!("false is not allowed with {MESSAGES} (the answer comes alone)"),
        ));
    }
    // A chat completion reports why it ended and its usage unless asked not to.
    let chat_default = conversation.is_some();
    if inputs.flag(RETURN_LOGPROBS)? == Some(true) {
        return Err(invalid(
            RETURN_LOGPROBS,
            "true: this backend does not return log probabilities".into(),
        ));
    }
    let outputs = RawOutputs {
        finish_reason: inputs.flag(RETURN_FINISH_REASON)?.unwrap_or(chat_default),
        num_input_tokens: inputs.flag(RETURN_NUM_INPUT_TOKENS)?.unwrap_or(chat_default),
        num_output_tokens: inputs.flag(RETURN_NUM_OUTPUT_TOKENS)?.unwrap_or(chat_default),
        tool_calls: conversation.is_some_and(Conversation::has_tools),
    };
    Ok(RawRequest { prompt, options, stream, prepend_input, outputs })
}

/// Keys of sampling_parameters already logged as ignored (each once per process; bounded,
/// since clients choose them).
static IGNORED_KEYS: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

fn log_ignored(key: &str) {
    let mut logged = IGNORED_KEYS.lock().unwrap_or_else(|e| e.into_inner());
    if logged.len() < 256 && !logged.contains(key) {
        let key: String = key.chars().take(64).collect();
        tracing::warn!("{SAMPLING_PARAMETERS}: key {key:?} is not supported here and is ignored");
        logged.insert(key);
    }
}

fn bad_key(key: &str, problem: impl std::fmt::Display) -> Error {
    invalid(SAMPLING_PARAMETERS, format!("{key}: {problem}"))
}

/// A number, or a string holding one (vLLM converts with float()).
fn float_value(key: &str, value: &Value) -> Result<f32> {
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad_key(key, format!("expected a number or a numeric string, got {value}")))?
        as f32;
    if !number.is_finite() {
        return Err(bad_key(key, format!("must be finite, got {value}")));
    }
    Ok(number)
}

/// An integer, or a string holding one (vLLM converts with int()); a whole float is taken.
fn int_value(key: &str, value: &Value) -> Result<i128> {
    let whole = |f: f64| (f.fract() == 0.0 && f.abs() < 1e30).then_some(f as i128);
    match value {
        Value::Number(n) => {
            n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)).or(n.as_f64().and_then(whole))
        }
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad_key(key, format!("expected an integer or an integer string, got {value}")))
}

fn count_value(key: &str, value: &Value, min: i128) -> Result<usize> {
    let n = int_value(key, value)?;
    if n < min {
        return Err(bad_key(key, format!("must be at least {min}, got {n}")));
    }
    // -1 (top_k's "none") counts as 0.
    usize::try_from(n.max(0)).map_err(|_| bad_key(key, format!("{n} is too large")))
}

/// A setting this engine has no use for, accepted only at the value that changes nothing
/// (numbers compared by value: `0` and `0.0` alike).
fn neutral(key: &str, value: &Value, accepted: &[Value]) -> Result<()> {
    let same = |a: &Value| match (a.as_f64(), value.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => a == value,
    };
    if accepted.iter().any(same) {
        return Ok(());
    }
    let values: Vec<String> = accepted.iter().map(|v| v.to_string()).collect();
    Err(bad_key(key, format!("{value} is not supported here (only {})", values.join(" or "))))
}

fn bool_value(key: &str, value: &Value) -> Result<bool> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.trim() == "true" => Ok(true),
        Value::String(s) if s.trim() == "false" => Ok(false),
        _ => Err(bad_key(key, format!("expected true or false, got {value}"))),
    }
}

/// Applies vLLM's `sampling_parameters` JSON object to `options`; null means the default.
pub fn apply_sampling_parameters(json: &str, options: &mut GenerationOptions) -> Result<()> {
    let parsed: Value = serde_json::from_str(json)
        .map_err(|e| invalid(SAMPLING_PARAMETERS, format!("is not valid JSON ({e})")))?;
    let Value::Object(map) = parsed else {
        return Err(invalid(SAMPLING_PARAMETERS, "must be a JSON object".into()));
    };
    for (key, value) in &map {
        if value.is_null() {
            continue;
        }
        let sampling = &mut options.sampling;
        match key.as_str() {
            "temperature" => {
                let t = float_value(key, value)?;
                if t < 0.0 {
                    return Err(bad_key(key, format!("must be >= 0, got {t}")));
                }
                sampling.temperature = t;
            }
            "top_p" => {
                let p = float_value(key, value)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(bad_key(key, format!("must be in (0, 1], got {p}")));
                }
                sampling.top_p = p;
            }
            // vLLM takes -1 (and 0) for no top-k.
            "top_k" => sampling.top_k = count_value(key, value, -1)?,
            "repetition_penalty" => {
                let r = float_value(key, value)?;
                if r <= 0.0 {
                    return Err(bad_key(key, format!("must be > 0, got {r}")));
                }
                sampling.repetition_penalty = r;
            }
            "seed" => {
                let seed = int_value(key, value)?;
                sampling.seed = Some(u64::try_from(seed).map_err(|_| {
                    bad_key(key, format!("must be an unsigned 64-bit integer, got {seed}"))
                })?);
            }
            "max_tokens" => options.max_new_tokens = Some(count_value(key, value, 1)?),
            "min_tokens" => options.min_tokens = count_value(key, value, 0)?,
            "ignore_eos" => options.ignore_eos = bool_value(key, value)?,
            "stop" => {
                let stop: Vec<String> = match value {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .map(|item| item.as_str().map(str::to_string))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad_key(key, "expected a string or a list of strings"))?,
                    _ => return Err(bad_key(key, "expected a string or a list of strings")),
                };
                if stop.iter().any(String::is_empty) {
                    return Err(bad_key(key, "stop strings must not be empty"));
                }
                options.stop = stop;
            }
            // vLLM's settings this engine does not have: their neutral value is taken (Triton's
            // OpenAI frontend always sends some), any other refused rather than ignored.
            "n" | "best_of" => neutral(key, value, &[Value::from(1)])?,
            "presence_penalty" | "frequency_penalty" => neutral(key, value, &[Value::from(0)])?,
            "logprobs" | "prompt_logprobs" => {
                neutral(key, value, &[Value::from(0), Value::Bool(false)])?
            }
            "logit_bias" => neutral(key, value, &[Value::Object(Default::default())])?,
            _ => log_ignored(key),
        }
    }
    if let (Some(max), min) = (options.max_new_tokens, options.min_tokens)
        && min > max
    {
        return Err(invalid(
            SAMPLING_PARAMETERS,
            format!("min_tokens: {min} is more than max_tokens {max}"),
        ));
    }
    interface::check_stop(SAMPLING_PARAMETERS, &options.stop)
}

/// vLLM's names for why an answer ended (OpenAI's `tool_calls` when it calls a tool).
pub fn finish_reason_name(completion: &Completion) -> &'static str {
    if !completion.tool_calls.is_empty() {
        return "tool_calls";
    }
    match completion.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

fn uint32(name: &'static str, batched: bool, value: usize) -> OutputTensor {
    OutputTensor {
        name,
        datatype: ElementType::Uint32,
        shape: if batched { vec![1, 1] } else { vec![1] },
        data: u32::try_from(value).unwrap_or(u32::MAX).to_le_bytes().to_vec(),
    }
}

/// The token counts one response reports.
#[derive(Clone, Copy, Debug)]
pub struct TokenCounts {
    /// The prompt's tokens (`num_input_tokens`).
    pub prompt: usize,
    /// Tokens generated since the previous response (`num_output_tokens`: when streaming,
    /// each response counts its own, as vLLM's do; they add up to the answer's).
    pub new: usize,
}

/// One response's outputs, among those requested: `text` (a streamed piece, or the whole
/// text) and the counts when asked, and at the end (`completion`) the finish reason and
/// the tool calls.
pub fn encode_raw_outputs(
    text: &str,
    counts: TokenCounts,
    completion: Option<&Completion>,
    asked: RawOutputs,
    batched: bool,
    requested: &[String],
) -> Vec<OutputTensor> {
    let mut outputs = Vec::new();
    for name in requested {
        match name.as_str() {
            TEXT_OUTPUT => outputs.push(OutputTensor::text(TEXT_OUTPUT, batched, text)),
            NUM_INPUT_TOKENS if asked.num_input_tokens => {
                outputs.push(uint32(NUM_INPUT_TOKENS, batched, counts.prompt));
            }
            FINISH_REASON if asked.finish_reason => {
                if let Some(completion) = completion {
                    let reason = finish_reason_name(completion);
                    outputs.push(OutputTensor::text(FINISH_REASON, batched, reason));
                }
            }
            NUM_OUTPUT_TOKENS if asked.num_output_tokens => {
                outputs.push(uint32(NUM_OUTPUT_TOKENS, batched, counts.new));
            }
            TOOL_CALLS if asked.tool_calls => {
                if let Some(completion) = completion {
                    let calls = openai_tool_calls(&completion.tool_calls);
                    outputs.push(OutputTensor::text(TOOL_CALLS, batched, &calls));
                }
            }
            _ => {} // the seed interface's outputs, or not asked for
        }
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use crate::triton::config::ModelConfig;
    use crate::triton::interface::{AnyRequest, decode_any, encode_bytes};

    fn text(elements: &[&str]) -> InputTensor {
        InputTensor {
            datatype: ElementType::Bytes,
            shape: vec![elements.len() as i64],
            data: encode_bytes(elements.iter().map(|e| e.as_bytes())),
        }
    }

    fn typed(datatype: ElementType, bytes: &[u8]) -> InputTensor {
        InputTensor { datatype, shape: vec![1], data: bytes.to_vec() }
    }

    fn flag(value: bool) -> InputTensor {
        typed(ElementType::Bool, &[u8::from(value)])
    }

    fn decode(inputs: Vec<(&str, InputTensor)>, decoupled: bool) -> Result<AnyRequest> {
        let tensors = inputs.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        let config = ModelConfig::from_json(r#"{"name":"m"}"#, std::path::Path::new("/m")).unwrap();
        decode_any(&tensors, false, decoupled, Family::ChatGlm2, &config.parameters)
    }

    fn raw(inputs: Vec<(&str, InputTensor)>) -> RawRequest {
        match decode(inputs, true).unwrap() {
            AnyRequest::Raw(raw) => raw,
            AnyRequest::Chat(_) => panic!("decoded as a chat turn"),
        }
    }

    fn error(inputs: Vec<(&str, InputTensor)>) -> String {
        decode(inputs, true).unwrap_err().to_string()
    }

    fn options(json: &str) -> Result<GenerationOptions> {
        let mut options = vllm_defaults();
        apply_sampling_parameters(json, &mut options).map(|()| options)
    }

    #[test]
    fn defaults_follow_vllm() {
        let r = raw(vec![(TEXT_INPUT, text(&["Hello"]))]);
        assert!(matches!(&r.prompt, RawPrompt::Text(text) if text == "Hello"));
        assert!(!r.stream && r.prepend_input);
        assert_eq!(r.outputs, RawOutputs::default());
        assert_eq!(r.options.max_new_tokens, Some(DEFAULT_MAX_TOKENS));
        assert_eq!(r.options.sampling.temperature, 1.0);
        assert_eq!((r.options.sampling.top_k, r.options.sampling.top_p), (0, 1.0));
        // Streaming leaves the prompt out unless asked, and may not be asked to keep it.
        let r = raw(vec![(TEXT_INPUT, text(&["Hello"])), (STREAM, flag(true))]);
        assert!(r.stream && !r.prepend_input);
        let message = error(vec![
            (TEXT_INPUT, text(&["Hello"])),
            (STREAM, flag(true)),
            (EXCLUDE_INPUT_IN_OUTPUT, flag(false)),
        ]);
        assert!(message.starts_with("exclude_input_in_output: "), "{message}");
        let r = raw(vec![
            (TEXT_INPUT, text(&["Hello"])),
            (EXCLUDE_INPUT_IN_OUTPUT, flag(true)),
            (RETURN_FINISH_REASON, flag(true)),
            (RETURN_NUM_OUTPUT_TOKENS, flag(true)),
        ]);
        assert!(!r.prepend_input);
        assert!(r.outputs.finish_reason && r.outputs.num_output_tokens);
        assert!(!r.outputs.num_input_tokens);
    }

    #[test]
    fn sampling_parameters_take_numbers_and_numeric_strings() {
        let o = options(
            r#"{"temperature": 0, "top_p": "0.5", "top_k": "-1", "max_tokens": "7",
                "min_tokens": 2, "seed": "42", "repetition_penalty": 1.1, "ignore_eos": true,
                "stop": "\n\n"}"#,
        )
        .unwrap();
        assert!(o.sampling.is_greedy());
        assert_eq!((o.sampling.top_p, o.sampling.top_k), (0.5, 0));
        assert_eq!((o.max_new_tokens, o.min_tokens), (Some(7), 2));
        assert_eq!(o.sampling.seed, Some(42));
        assert_eq!(o.sampling.repetition_penalty, 1.1);
        assert!(o.ignore_eos);
        assert_eq!(o.stop, vec!["\n\n".to_string()]);
        let o = options(r#"{"stop": ["a", "b"], "top_k": 5.0, "max_tokens": null}"#).unwrap();
        assert_eq!(o.stop, vec!["a".to_string(), "b".into()]);
        assert_eq!(o.sampling.top_k, 5);
        assert_eq!(o.max_new_tokens, Some(DEFAULT_MAX_TOKENS));
        // Keys this engine does not have are ignored (and logged once).
        let o = options(r#"{"n": 1, "use_beam_search": false, "temperature": "0.25"}"#).unwrap();
        assert_eq!(o.sampling.temperature, 0.25);
    }

    /// What Triton's OpenAI frontend always sends (the neutral values of settings this
    /// engine does not have) is taken; another value of them is refused, never ignored.
    #[test]
    fn settings_without_an_engine_take_only_their_neutral_value() {
        let o = options(
            r#"{"frequency_penalty": 0, "ignore_eos": false, "n": 1, "presence_penalty": 0.0,
                "temperature": 0.7, "top_p": 1, "logprobs": false, "logit_bias": {}, "max_tokens": 16}"#,
        )
        .unwrap();
        assert_eq!((o.sampling.temperature, o.max_new_tokens), (0.7, Some(16)));
        for (json, key) in [
            (r#"{"n": 2}"#, "n"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -1}"#, "frequency_penalty"),
            (r#"{"logprobs": 3}"#, "logprobs"),
            (r#"{"logit_bias": {"5": 100}}"#, "logit_bias"),
        ] {
            let message = options(json).unwrap_err().to_string();
            assert!(message.starts_with(&format!("sampling_parameters: {key}: ")), "{message}");
            assert!(message.contains("not supported here"), "{message}");
        }
        assert!(
            raw(vec![(TEXT_INPUT, text(&["a"])), (RETURN_LOGPROBS, flag(false))]).stream.eq(&false)
        );
        let message = error(vec![(TEXT_INPUT, text(&["a"])), (RETURN_LOGPROBS, flag(true))]);
        assert!(message.starts_with("return_logprobs: true: "), "{message}");
    }

    #[test]
    fn wrong_sampling_parameters_name_the_key() {
        for (json, key) in [
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": [0.5]}"#, "top_p"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 2.5}"#, "max_tokens"),
            (r#"{"max_tokens": "many"}"#, "max_tokens"),
            (r#"{"min_tokens": -1}"#, "min_tokens"),
            (r#"{"min_tokens": 9, "max_tokens": 4}"#, "min_tokens"),
            (r#"{"seed": -5}"#, "seed"),
            (r#"{"repetition_penalty": "0"}"#, "repetition_penalty"),
            (r#"{"ignore_eos": "yes"}"#, "ignore_eos"),
            (r#"{"stop": 5}"#, "stop"),
            (r#"{"stop": ["a", 1]}"#, "stop"),
            (r#"{"stop": [""]}"#, "stop"),
        ] {
            let message = options(json).unwrap_err().to_string();
            assert!(message.starts_with(&format!("sampling_parameters: {key}: ")), "{message}");
        }
        for json in ["{", "[1, 2]", "\"temperature\""] {
            let message = options(json).unwrap_err().to_string();
            assert!(message.starts_with("sampling_parameters: "), "{message}");
        }
    }

    #[test]
    fn prompt_and_text_input_go_alone() {
        let both = error(vec![(PROMPT, text(&["a"])), (TEXT_INPUT, text(&["b"]))]);
        assert!(both.starts_with("prompt, text_input: ") && both.contains("not several"), "{both}");
        let neither = error(vec![(interface::TEMPERATURE, text(&["0"]))]);
        assert!(neither.starts_with("prompt, text_input, messages: ") && neither.contains("none"));
        assert!(!both.contains("  ") && !neither.contains("  "), "{both} / {neither}");
        // A seed request keeps its own message; a raw one names text_input.
        assert_eq!(error(vec![(HISTORY, text(&["q", "a"]))]), "prompt: is required");
        let message = error(vec![(SAMPLING_PARAMETERS, text(&["{}"]))]);
        assert!(message.starts_with("text_input: is required"), "{message}");
        // Each contract's own inputs stay with it.
        let message = error(vec![(PROMPT, text(&["a"])), (STREAM, flag(true))]);
        assert!(message.starts_with("stream: "), "{message}");
        let message = error(vec![(TEXT_INPUT, text(&["a"])), (HISTORY, text(&["q", "a"]))]);
        assert!(message.starts_with("history: "), "{message}");
        let message = error(vec![(TEXT_INPUT, text(&[""]))]);
        assert!(message.starts_with("text_input: must not be empty"), "{message}");
        assert!(matches!(decode(vec![(PROMPT, text(&["a"]))], true), Ok(AnyRequest::Chat(_))));
    }

    #[test]
    fn tensorrt_llm_inputs_are_read_typed_or_as_text() {
        let r = raw(vec![
            (TEXT_INPUT, text(&["a"])),
            (MAX_TOKENS, typed(ElementType::Int32, &9i32.to_le_bytes())),
            (MIN_LENGTH, typed(ElementType::Int32, &2i32.to_le_bytes())),
            (interface::TEMPERATURE, typed(ElementType::Fp32, &0.5f32.to_le_bytes())),
            (interface::TOP_K, typed(ElementType::Int32, &3i32.to_le_bytes())),
            (interface::TOP_P, text(&["0.9"])),
            (RANDOM_SEED, typed(ElementType::Uint64, &7u64.to_le_bytes())),
            (STOP_WORDS, text(&["x", "y"])),
            (SAMPLING_PARAMETERS, text(&[r#"{"max_tokens": 100, "stop": "z"}"#])),
        ]);
        // Typed tensors win over sampling_parameters; stop strings add up.
        assert_eq!((r.options.max_new_tokens, r.options.min_tokens), (Some(9), 2));
        assert_eq!(r.options.sampling.temperature, 0.5);
        assert_eq!((r.options.sampling.top_k, r.options.sampling.top_p), (3, 0.9));
        assert_eq!(r.options.sampling.seed, Some(7));
        assert_eq!(r.options.stop, vec!["z".to_string(), "x".into(), "y".into()]);
        let bad = |name, tensor| error(vec![(TEXT_INPUT, text(&["a"])), (name, tensor)]);
        let message = bad(MAX_TOKENS, typed(ElementType::Int32, &(-1i32).to_le_bytes()));
        assert!(message.starts_with("max_tokens: "), "{message}");
        let message = bad(interface::TEMPERATURE, typed(ElementType::Fp32, &[0, 0]));
        assert!(message.starts_with("temperature: "), "{message}");
        let message = bad(STREAM, typed(ElementType::Int32, &1i32.to_le_bytes()));
        assert!(message.starts_with("stream: must be TYPE_BOOL"), "{message}");
        let message = bad(SAMPLING_PARAMETERS, text(&["{bad"]));
        assert!(message.starts_with("sampling_parameters: is not valid JSON"), "{message}");
    }

    #[test]
    fn streaming_needs_a_decoupled_model() {
        let tensors = vec![(TEXT_INPUT, text(&["a"])), (STREAM, flag(true))];
        let message = decode(tensors, false).unwrap_err().to_string();
        assert!(message.starts_with("stream: true needs a decoupled model"), "{message}");
    }

    #[test]
    fn outputs_follow_the_flags_and_the_requested_list() {
        let completion = Completion {
            response: "answer".into(),
            history: vec![],
            output_ids: vec![5, 6, 2],
            prompt_tokens: 4,
            finish_reason: FinishReason::Stop,
            tool_calls: vec![],
        };
        let all: Vec<String> = [
            interface::RESPONSE,
            TEXT_OUTPUT,
            FINISH_REASON,
            NUM_INPUT_TOKENS,
            NUM_OUTPUT_TOKENS,
            TOOL_CALLS,
        ]
        .map(String::from)
        .to_vec();
        let whole = TokenCounts { prompt: 4, new: 3 };
        let none =
            encode_raw_outputs("t", whole, Some(&completion), RawOutputs::default(), false, &all);
        assert_eq!(none, vec![OutputTensor::text(TEXT_OUTPUT, false, "t")]);
        let asked = RawOutputs {
            finish_reason: true,
            num_input_tokens: true,
            num_output_tokens: true,
            tool_calls: false,
        };
        let every = encode_raw_outputs("t", whole, Some(&completion), asked, false, &all);
        let names: Vec<&str> = every.iter().map(|o| o.name).collect();
        assert_eq!(names, [TEXT_OUTPUT, FINISH_REASON, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS]);
        assert_eq!(every[1].data, encode_bytes([&b"stop"[..]]));
        assert_eq!(
            (every[2].datatype, every[2].data.as_slice()),
            (ElementType::Uint32, &[4, 0, 0, 0][..])
        );
        assert_eq!(every[3].data, 3u32.to_le_bytes());
        // A streamed piece carries no end yet, and counts its own tokens.
        let counts = TokenCounts { prompt: 4, new: 2 };
        let piece = encode_raw_outputs("p", counts, None, asked, true, &all);
        let names: Vec<&str> = piece.iter().map(|o| o.name).collect();
        assert_eq!(names, [TEXT_OUTPUT, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS]);
        assert_eq!(piece[0].shape, vec![1, 1]);
        assert_eq!(piece[2].data, 2u32.to_le_bytes());
    }

    const WEATHER: &str = r#"[{"name": "get_weather", "parameters": {"type": "object"}}]"#;

    #[test]
    fn a_tool_call_ends_with_its_own_finish_reason_and_output() {
        let call = crate::chat::messages::ToolCall {
            name: "get_weather".into(),
            arguments: r#"{"city": "Boston"}"#.into(),
        };
        let mut completion = Completion {
            response: "Checking.".into(),
            history: vec![],
            output_ids: vec![5, 6],
            prompt_tokens: 4,
            finish_reason: FinishReason::Stop,
            tool_calls: vec![call],
        };
        let asked = RawOutputs {
            finish_reason: true,
            num_input_tokens: false,
            num_output_tokens: false,
            tool_calls: true,
        };
        let requested = [TEXT_OUTPUT, FINISH_REASON, TOOL_CALLS].map(String::from);
        let counts = TokenCounts { prompt: 4, new: 2 };
        let outputs =
            encode_raw_outputs("Checking.", counts, Some(&completion), asked, false, &requested);
        assert_eq!(outputs[1].data, encode_bytes([&b"tool_calls"[..]]));
        let calls = r#"[{"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Boston\"}"}}]"#;
        assert_eq!(outputs[2], OutputTensor::text(TOOL_CALLS, false, calls));
        // No call: the finish reason is the sequence's, and tool_calls an empty list.
        completion.tool_calls.clear();
        let outputs = encode_raw_outputs("x", counts, Some(&completion), asked, false, &requested);
        assert_eq!(outputs[1].data, encode_bytes([&b"stop"[..]]));
        assert_eq!(outputs[2], OutputTensor::text(TOOL_CALLS, false, "[]"));
        // A streamed piece carries neither.
        assert_eq!(encode_raw_outputs("p", counts, None, asked, false, &requested).len(), 1);
    }

    #[test]
    fn a_messages_request_answers_as_a_chat_completion() {
        let messages = r#"[{"role": "user", "content": "hi"}]"#;
        let r = raw(vec![(MESSAGES, text(&[messages]))]);
        let RawPrompt::Messages(conversation) = &r.prompt else { panic!("not messages") };
        assert!(!conversation.has_tools());
        // The answer alone, the family's length limit, and the end and usage reported.
        assert!(!r.prepend_input && !r.stream);
        assert_eq!(r.options.max_new_tokens, None);
        let every = RawOutputs {
            finish_reason: true,
            num_input_tokens: true,
            num_output_tokens: true,
            tool_calls: false,
        };
        assert_eq!(r.outputs, every);
        let r = raw(vec![
            (MESSAGES, text(&[messages])),
            (TOOLS, text(&[WEATHER])),
            (STREAM, flag(true)),
            (RETURN_NUM_INPUT_TOKENS, flag(false)),
            (SAMPLING_PARAMETERS, text(&[r#"{"max_tokens": 8, "temperature": 0}"#])),
        ]);
        assert!(r.stream && r.outputs.tool_calls && !r.outputs.num_input_tokens);
        assert_eq!(r.options.max_new_tokens, Some(8));
        assert!(r.options.sampling.is_greedy());
    }

    #[test]
    fn messages_go_alone_and_tools_go_with_them() {
        let messages = r#"[{"role": "user", "content": "hi"}]"#;
        let message = error(vec![(PROMPT, text(&["a"])), (MESSAGES, text(&[messages]))]);
        assert!(message.starts_with("prompt, messages: ") && message.contains("not several"));
        let message = error(vec![(TEXT_INPUT, text(&["a"])), (MESSAGES, text(&[messages]))]);
        assert!(message.starts_with("text_input, messages: "), "{message}");
        let message = error(vec![(TEXT_INPUT, text(&["a"])), (TOOLS, text(&[WEATHER]))]);
        assert!(message.starts_with("tools: go with messages"), "{message}");
        let message = error(vec![(PROMPT, text(&["a"])), (TOOLS, text(&[WEATHER]))]);
        assert!(message.starts_with("tools: belongs to"), "{message}");
        let message = error(vec![(TOOLS, text(&[WEATHER]))]);
        assert!(message.starts_with("text_input: is required (or messages"), "{message}");
        let message = error(vec![(MESSAGES, text(&[messages])), (HISTORY, text(&["q", "a"]))]);
        assert!(message.starts_with("history: belongs to the seed interface"), "{message}");
        let message =
            error(vec![(MESSAGES, text(&[messages])), (EXCLUDE_INPUT_IN_OUTPUT, flag(false))]);
        assert!(message.starts_with("exclude_input_in_output: false is not allowed with messages"));
        let message = error(vec![(MESSAGES, text(&["[{\"role\": \"robot\"}]"]))]);
        assert!(message.starts_with("messages: message 0"), "{message}");
        let message = error(vec![(MESSAGES, text(&[messages])), (TOOLS, text(&["{}"]))]);
        assert!(message.starts_with("tools: "), "{message}");
        let neither = error(vec![(interface::TEMPERATURE, text(&["0"]))]);
        assert!(
            neither.starts_with("prompt, text_input, messages: ") && neither.contains("got none")
        );
    }
}
