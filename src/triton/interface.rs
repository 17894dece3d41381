//! The seed interface: the tensors of the ChatGLM2 Python-backend deployments we replace,
//! decoded into a chat turn and encoded back into outputs. Pure logic (no FFI), so it is
//! tested without a server.
//!
//! Inputs (TYPE_STRING, numbers as decimal text): `prompt` [1]; optional `history` [-1]
//! (flattened query/response pairs), `temperature`, `max_token`, `history_len` [1]; extras
//! `top_p`, `top_k`, `repetition_penalty`, `seed`, `max_new_tokens`, `system_prompt` [1],
//! `stop` [-1]. Outputs: `response` [1], `history` [n, 2]. With `max_batch_size > 0`
//! every tensor has a leading batch dimension, which must be 1.

use std::collections::HashMap;

use super::config::ModelParameters;
use crate::chat::History;
use crate::model::Family;
use crate::pipeline::{ChatTurn, Completion, GenerationOptions};
use crate::sampling::SamplingParams;
use crate::{Error, Result};

pub const PROMPT: &str = "prompt";
pub const HISTORY: &str = "history";
pub const TEMPERATURE: &str = "temperature";
pub const MAX_TOKEN: &str = "max_token";
pub const HISTORY_LEN: &str = "history_len";
pub const TOP_P: &str = "top_p";
pub const TOP_K: &str = "top_k";
pub const REPETITION_PENALTY: &str = "repetition_penalty";
pub const SEED: &str = "seed";
pub const MAX_NEW_TOKENS: &str = "max_new_tokens";
pub const SYSTEM_PROMPT: &str = "system_prompt";
pub const STOP: &str = "stop";
pub const RESPONSE: &str = "response";

/// The element types the interfaces read or write (others are refused by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    Bytes,
    Bool,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Fp32,
    Fp64,
    Other,
}

impl ElementType {
    /// Bytes per element (BYTES and unknown types have none fixed).
    fn size(self) -> Option<usize> {
        match self {
            ElementType::Bool => Some(1),
            ElementType::Int32 | ElementType::Uint32 | ElementType::Fp32 => Some(4),
            ElementType::Int64 | ElementType::Uint64 | ElementType::Fp64 => Some(8),
            ElementType::Bytes | ElementType::Other => None,
        }
    }
}

/// One input as the request carries it (all buffers concatenated, CPU memory).
#[derive(Clone, Debug)]
pub struct InputTensor {
    pub datatype: ElementType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// One output ready to copy into a response.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputTensor {
    pub name: &'static str,
    pub datatype: ElementType,
    pub shape: Vec<i64>,
    /// BYTES elements length-prefixed, numbers little-endian.
    pub data: Vec<u8>,
}

impl OutputTensor {
    /// One BYTES element.
    pub fn text(name: &'static str, batched: bool, text: &str) -> Self {
        OutputTensor {
            name,
            datatype: ElementType::Bytes,
            shape: if batched { vec![1, 1] } else { vec![1] },
            data: encode_bytes([text.as_bytes()]),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub turn: ChatTurn,
    pub options: GenerationOptions,
}

/// The elements of a BYTES tensor: each a 4-byte little-endian length and that many bytes.
/// The server does not check that the last element's length fits, so every bound is checked.
pub fn decode_bytes<'a>(input: &str, mut data: &'a [u8], count: usize) -> Result<Vec<&'a [u8]>> {
    // Every element takes at least its prefix: a count the data cannot hold is refused
    // before anything is sized by it.
    if count > data.len() / 4 {
        return Err(invalid(
            input,
            format!("the shape declares {count} elements but the data holds {} bytes", data.len()),
        ));
    }
    let mut elements = Vec::with_capacity(count);
    for index in 0..count {
        let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
            return Err(invalid(input, format!("element {index} has no complete length prefix")));
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > rest.len() {
            return Err(invalid(
                input,
                format!("element {index} declares {len} bytes but only {} follow", rest.len()),
            ));
        }
        let (element, rest) = rest.split_at(len);
        elements.push(element);
        data = rest;
    }
    if !data.is_empty() {
        return Err(invalid(input, format!("{} bytes left after {count} elements", data.len())));
    }
    Ok(elements)
}

pub fn encode_bytes<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut data = Vec::new();
    for element in elements {
        let len = u32::try_from(element.len()).expect("a BYTES element is under 4 GiB");
        data.extend_from_slice(&len.to_le_bytes());
        data.extend_from_slice(element);
    }
    data
}

pub(crate) fn invalid(input: &str, problem: String) -> Error {
    Error::InvalidRequest(format!("{input}: {problem}"))
}

/// The request's inputs with the rules of the interface applied.
pub(crate) struct Inputs<'a> {
    pub(crate) tensors: &'a HashMap<String, InputTensor>,
    pub(crate) batched: bool,
}

impl<'a> Inputs<'a> {
    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The number of elements of an input's shape (past the batch dimension).
    fn element_count(&self, name: &str, tensor: &InputTensor) -> Result<usize> {
        let mut dims = tensor.shape.as_slice();
        if self.batched {
            match dims.split_first() {
                Some((1, rest)) => dims = rest,
                _ => {
                    return Err(invalid(
                        name,
                        format!(
                            "batch dimension must be 1 (one conversation per request), got shape {:?}",
                            tensor.shape
                        ),
                    ));
                }
            }
        }
        dims.iter()
            .try_fold(1usize, |count, &d| count.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| invalid(name, format!("invalid shape {:?}", tensor.shape)))
    }

    /// The UTF-8 elements of an input, or None when it is absent.
    pub(crate) fn strings(&self, name: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(tensor) = self.tensors.get(name) else { return Ok(None) };
        if tensor.datatype != ElementType::Bytes {
            return Err(invalid(name, "must be TYPE_STRING (BYTES)".into()));
        }
        let count = self.element_count(name, tensor)?;
        let elements = decode_bytes(name, &tensor.data, count)?;
        elements
            .into_iter()
            .enumerate()
            .map(|(index, bytes)| {
                std::str::from_utf8(bytes)
                    .map_err(|e| invalid(name, format!("element {index} is not valid UTF-8 ({e})")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A one-element input's text.
    pub(crate) fn scalar(&self, name: &str) -> Result<Option<&'a str>> {
        match self.strings(name)? {
            None => Ok(None),
            Some(values) if values.len() == 1 => Ok(Some(values[0])),
            Some(values) => Err(invalid(name, format!("expected 1 element, got {}", values.len()))),
        }
    }

    /// A one-element input as text: a STRING's text, or a number (or bool) written out, so
    /// that a model config may declare the same name as TYPE_STRING or as a numeric type.
    fn scalar_text(&self, name: &str) -> Result<Option<std::borrow::Cow<'a, str>>> {
        let Some(tensor) = self.tensors.get(name) else { return Ok(None) };
        let Some(size) = tensor.datatype.size() else {
            return match tensor.datatype {
                ElementType::Bytes => Ok(self.scalar(name)?.map(std::borrow::Cow::Borrowed)),
                _ => Err(invalid(name, "has an element type this backend does not read".into())),
            };
        };
        let count = self.element_count(name, tensor)?;
        if count != 1 {
            return Err(invalid(name, format!("expected 1 element, got {count}")));
        }
        let Some(bytes) = tensor.data.get(..size).filter(|_| tensor.data.len() == size) else {
            return Err(invalid(
                name,
                format!("holds {} bytes for one {size}-byte element", tensor.data.len()),
            ));
        };
        let le4 = || <[u8; 4]>::try_from(bytes).unwrap_or_default();
        let le8 = || <[u8; 8]>::try_from(bytes).unwrap_or_default();
        let text = match tensor.datatype {
            ElementType::Bool => (bytes[0] != 0).to_string(),
            ElementType::Int32 => i32::from_le_bytes(le4()).to_string(),
            ElementType::Uint32 => u32::from_le_bytes(le4()).to_string(),
            ElementType::Fp32 => f32::from_le_bytes(le4()).to_string(),
            ElementType::Int64 => i64::from_le_bytes(le8()).to_string(),
            ElementType::Uint64 => u64::from_le_bytes(le8()).to_string(),
            ElementType::Fp64 => f64::from_le_bytes(le8()).to_string(),
            ElementType::Bytes | ElementType::Other => unreachable!("no fixed size"),
        };
        Ok(Some(std::borrow::Cow::Owned(text)))
    }

    /// A one-element TYPE_BOOL input (or the text "true"/"false").
    pub(crate) fn flag(&self, name: &str) -> Result<Option<bool>> {
        let Some(tensor) = self.tensors.get(name) else { return Ok(None) };
        if !matches!(tensor.datatype, ElementType::Bool | ElementType::Bytes) {
            return Err(invalid(name, "must be TYPE_BOOL".into()));
        }
        match self.scalar_text(name)?.as_deref().map(str::trim) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(invalid(name, format!("{other:?} is not true or false"))),
        }
    }

    pub(crate) fn number<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>> {
        let Some(text) = self.scalar_text(name)? else { return Ok(None) };
        let digits = text.trim().trim_start_matches('+');
        text.trim().parse::<T>().map(Some).map_err(|_| {
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                invalid(name, format!("{text:?} is too large (at most {})", u64::MAX))
            } else {
                invalid(name, format!("{text:?} is not {what}"))
            }
        })
    }

    pub(crate) fn finite(&self, name: &str) -> Result<Option<f32>> {
        match self.number::<f32>(name, "a number")? {
            Some(v) if !v.is_finite() => Err(invalid(name, format!("must be finite, got {v}"))),
            v => Ok(v),
        }
    }

    pub(crate) fn count(&self, name: &str, min: usize) -> Result<Option<usize>> {
        let what = if min == 0 { "a non-negative integer" } else { "a positive integer" };
        match self.number::<usize>(name, what)? {
            Some(n) if n < min => Err(invalid(name, format!("must be at least {min}, got {n}"))),
            n => Ok(n),
        }
    }
}

/// Limits on a request's stop strings (the cost of matching them each token).
pub const MAX_STOP_STRINGS: usize = 256;
pub const MAX_STOP_BYTES: usize = 16 << 10;

/// A request of either contract.
#[derive(Clone, Debug)]
pub enum AnyRequest {
    /// The seed interface: a chat turn in `prompt`.
    Chat(ChatRequest),
    /// The vLLM/TensorRT-LLM contract: raw text in `text_input`, or a conversation in
    /// `messages`.
    Raw(super::raw::RawRequest),
}

/// Decodes a request of either contract: `prompt` (the seed interface), or `text_input` or
/// `messages` (the raw contract).
pub fn decode_any(
    tensors: &HashMap<String, InputTensor>,
    batched: bool,
    decoupled: bool,
    family: Family,
    defaults: &ModelParameters,
) -> Result<AnyRequest> {
    use super::raw::{self, CHAT_ONLY, MESSAGES, RAW_ONLY, TEXT_INPUT};
    let has = |name: &str| tensors.contains_key(name);
    let sources: Vec<&str> =
        [PROMPT, TEXT_INPUT, MESSAGES].into_iter().filter(|n| has(n)).collect();
    match sources[..] {
        [_, _, ..] => Err(Error::InvalidRequest(format!(
            "{}: a request carries one of {PROMPT} (a chat turn), {TEXT_INPUT} (raw text) or \
             {MESSAGES} (a conversation), not several",
            sources.join(", ")
        ))),
        [TEXT_INPUT] | [MESSAGES] => {
            raw::decode_raw(tensors, batched, decoupled).map(AnyRequest::Raw)
        }
        [] if RAW_ONLY.iter().any(|n| has(n)) => Err(invalid(
            TEXT_INPUT,
            format!("is required (or {MESSAGES} for a conversation, {PROMPT} for a chat turn)"),
        )),
        // A seed request without its prompt keeps the seed interface's message.
        [] if !CHAT_ONLY.iter().any(|n| has(n)) => Err(Error::InvalidRequest(format!(
            "{PROMPT}, {TEXT_INPUT}, {MESSAGES}: a request carries one of them (a chat turn in \
             {PROMPT}, raw text in {TEXT_INPUT}, a conversation in {MESSAGES}), got none"
        ))),
        _ => {
            if let Some(name) = RAW_ONLY.iter().find(|n| has(n)) {
                return Err(invalid(
                    name,
                    format!(
                        "belongs to the {TEXT_INPUT} and {MESSAGES} contract, not to a {PROMPT} \
                         request"
                    ),
                ));
            }
            decode_request(tensors, batched, family, defaults).map(AnyRequest::Chat)
        }
    }
}

/// Decodes one request's inputs into a chat turn with the model's defaults applied.
pub fn decode_request(
    tensors: &HashMap<String, InputTensor>,
    batched: bool,
    family: Family,
    defaults: &ModelParameters,
) -> Result<ChatRequest> {
    let inputs = Inputs { tensors, batched };
    // The server checks only the number of inputs, so a missing prompt can reach us.
    let query = inputs.scalar(PROMPT)?.ok_or_else(|| invalid(PROMPT, "is required".into()))?;
    if query.is_empty() {
        return Err(invalid(PROMPT, "must not be empty".into()));
    }

    let flat_history = inputs.strings(HISTORY)?.unwrap_or_default();
    if flat_history.len() % 2 != 0 {
        return Err(invalid(
            HISTORY,
            format!(
                "holds query/response pairs, so its length must be even, got {}",
                flat_history.len()
            ),
        ));
    }
    let history: History = flat_history
        .chunks_exact(2)
        .map(|pair| (pair[0].to_string(), pair[1].to_string()))
        .collect();

    let system_prompt = match inputs.scalar(SYSTEM_PROMPT)? {
        // "" asks for none, which is all ChatGLM2 has.
        Some("") if family == Family::ChatGlm2 => None,
        Some(_) if family == Family::ChatGlm2 => {
            return Err(invalid(SYSTEM_PROMPT, "ChatGLM2 has no system prompt".into()));
        }
        Some(text) => Some(text.to_string()),
        None => defaults.system_prompt.clone(),
    };

    let mut sampling = SamplingParams::default();
    read_sampling(&inputs, &mut sampling)?;
    let stop = read_stop(&inputs, &[STOP])?;

    Ok(ChatRequest {
        turn: ChatTurn {
            query: query.to_string(),
            history,
            history_len: inputs.count(HISTORY_LEN, 0)?.unwrap_or(defaults.history_len_default),
            system_prompt,
        },
        options: GenerationOptions {
            sampling,
            max_token: inputs.count(MAX_TOKEN, 1)?.or(defaults.max_token_default),
            max_new_tokens: inputs.count(MAX_NEW_TOKENS, 1)?,
            ignore_eos: false,
            min_tokens: 0,
            stop,
        },
    })
}

/// The sampling inputs both contracts share (`temperature`, `top_p`, `top_k`,
/// `repetition_penalty`, `seed`): text or, where a model config declares them so, numbers.
pub(crate) fn read_sampling(inputs: &Inputs<'_>, sampling: &mut SamplingParams) -> Result<()> {
    if let Some(t) = inputs.finite(TEMPERATURE)? {
        if t < 0.0 {
            return Err(invalid(TEMPERATURE, format!("must be >= 0, got {t}")));
        }
        sampling.temperature = t;
    }
    if let Some(p) = inputs.finite(TOP_P)? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid(TOP_P, format!("must be in (0, 1], got {p}")));
        }
        sampling.top_p = p;
    }
    if let Some(k) = inputs.count(TOP_K, 0)? {
        sampling.top_k = k;
    }
    if let Some(r) = inputs.finite(REPETITION_PENALTY)? {
        if r <= 0.0 {
            return Err(invalid(REPETITION_PENALTY, format!("must be > 0, got {r}")));
        }
        sampling.repetition_penalty = r;
    }
    if let Some(seed) = inputs.number::<u64>(SEED, "an unsigned 64-bit integer")? {
        sampling.seed = Some(seed);
    }
    Ok(())
}

/// The stop strings of the named inputs, together, within the limits.
pub(crate) fn read_stop(inputs: &Inputs<'_>, names: &[&str]) -> Result<Vec<String>> {
    let mut all = Vec::new();
    for &name in names {
        let stop = inputs.strings(name)?.unwrap_or_default();
        if stop.iter().any(|s| s.is_empty()) {
            return Err(invalid(name, "stop strings must not be empty".into()));
        }
        all.extend(stop.into_iter().map(str::to_string));
        check_stop(name, &all)?;
    }
    Ok(all)
}

/// Every generated token is searched for each stop string in the engine's shared step.
pub(crate) fn check_stop(name: &str, stop: &[String]) -> Result<()> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            name,
            format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len()),
        ));
    }
    let stop_bytes: usize = stop.iter().map(|s| s.len()).sum();
    if stop_bytes > MAX_STOP_BYTES {
        return Err(invalid(
            name,
            format!("stop strings of at most {MAX_STOP_BYTES} bytes in all, got {stop_bytes}"),
        ));
    }
    Ok(())
}

/// The requested outputs of a finished turn: `response` [1] and `history` [n, 2].
pub fn encode_outputs(
    completion: &Completion,
    batched: bool,
    requested: &[String],
) -> Vec<OutputTensor> {
    let batch = |mut shape: Vec<i64>| {
        if batched {
            shape.insert(0, 1);
        }
        shape
    };
    let mut outputs = Vec::new();
    for name in requested {
        match name.as_str() {
            RESPONSE => outputs.push(OutputTensor::text(RESPONSE, batched, &completion.response)),
            HISTORY => outputs.push(OutputTensor {
                name: HISTORY,
                datatype: ElementType::Bytes,
                shape: batch(vec![completion.history.len() as i64, 2]),
                data: encode_bytes(
                    completion.history.iter().flat_map(|(q, r)| [q.as_bytes(), r.as_bytes()]),
                ),
            }),
            _ => {} // the server only lets configured outputs through
        }
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::FinishReason;
    use std::path::PathBuf;

    fn defaults() -> ModelParameters {
        ModelParameters {
            model_dir: PathBuf::from("/m"),
            system_prompt: None,
            history_len_default: 10,
            max_token_default: None,
            load: Default::default(),
            scheduler: Default::default(),
        }
    }

    fn tensor(elements: &[&str]) -> InputTensor {
        InputTensor {
            datatype: ElementType::Bytes,
            shape: vec![elements.len() as i64],
            data: encode_bytes(elements.iter().map(|e| e.as_bytes())),
        }
    }

    fn request(inputs: &[(&str, &[&str])]) -> Result<ChatRequest> {
        let tensors = inputs.iter().map(|(n, e)| (n.to_string(), tensor(e))).collect();
        decode_request(&tensors, false, Family::ChatGlm2, &defaults())
    }

    fn error(inputs: &[(&str, &[&str])]) -> String {
        request(inputs).unwrap_err().to_string()
    }

    #[test]
    fn bytes_round_trip_and_bounds() {
        let data = encode_bytes(["hello wörld".as_bytes(), b"", b"x"]);
        assert_eq!(&data[..4], &[12, 0, 0, 0]);
        assert_eq!(
            decode_bytes("t", &data, 3).unwrap(),
            vec![&b"hello w\xc3\xb6rld"[..], b"", b"x"]
        );
        let overrun = [100u8, 0, 0, 0, b'a', b'b', b'c'];
        assert!(
            decode_bytes("prompt", &overrun, 1)
                .unwrap_err()
                .to_string()
                .contains("declares 100 bytes")
        );
        assert!(
            decode_bytes("prompt", &[3, 0, 0, 0, b'a', b'b', b'c', 1, 0], 2)
                .unwrap_err()
                .to_string()
                .contains("element 1 has no complete length prefix")
        );
        assert!(
            decode_bytes("prompt", &[1, 0], 1)
                .unwrap_err()
                .to_string()
                .contains("the shape declares 1 elements but the data holds 2 bytes")
        );
        assert!(decode_bytes("prompt", &data, 2).unwrap_err().to_string().contains("left after"));
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let r = request(&[(PROMPT, &["你好"])]).unwrap();
        assert_eq!(r.turn.query, "你好");
        assert!(r.turn.history.is_empty());
        assert_eq!(r.turn.history_len, 10);
        assert_eq!(r.options.sampling, SamplingParams::default());
        assert_eq!(r.options.max_token, None);
    }

    #[test]
    fn every_input_is_read() {
        let r = request(&[
            (PROMPT, &["q2"]),
            (HISTORY, &["q0", "a0", "q1", "a1"]),
            (TEMPERATURE, &[" 0 "]),
            (MAX_TOKEN, &["100"]),
            (HISTORY_LEN, &["1"]),
            (TOP_P, &["0.5"]),
            (TOP_K, &["3"]),
            (REPETITION_PENALTY, &["1.1"]),
            (SEED, &["42"]),
            (MAX_NEW_TOKENS, &["7"]),
            (STOP, &["\n\n", "Observation:"]),
        ])
        .unwrap();
        assert_eq!(r.turn.history, vec![("q0".into(), "a0".into()), ("q1".into(), "a1".into())]);
        assert_eq!(r.turn.history_len, 1);
        assert!(r.options.sampling.is_greedy());
        assert_eq!(r.options.sampling.top_p, 0.5);
        assert_eq!(r.options.sampling.top_k, 3);
        assert_eq!(r.options.sampling.repetition_penalty, 1.1);
        assert_eq!(r.options.sampling.seed, Some(42));
        assert_eq!((r.options.max_token, r.options.max_new_tokens), (Some(100), Some(7)));
        assert_eq!(r.options.stop, vec!["\n\n".to_string(), "Observation:".into()]);
    }

    #[test]
    fn bad_inputs_name_the_input() {
        assert!(error(&[(HISTORY, &["q", "a"])]).starts_with("prompt: is required"));
        assert!(error(&[(PROMPT, &[""])]).starts_with("prompt: must not be empty"));
        assert!(error(&[(PROMPT, &["q"]), (HISTORY, &["q0"])]).starts_with("history: "));
        for (name, value) in [
            (TEMPERATURE, "warm"),
            (TEMPERATURE, "NaN"),
            (TEMPERATURE, "-1"),
            (TEMPERATURE, "inf"),
            (MAX_TOKEN, "-5"),
            (MAX_TOKEN, "0"),
            (MAX_TOKEN, "1e3"),
            (HISTORY_LEN, "-1"),
            (TOP_P, "0"),
            (TOP_P, "1.5"),
            (TOP_K, "-2"),
            (REPETITION_PENALTY, "0"),
            (SEED, "-1"),
            (MAX_NEW_TOKENS, "0"),
            (STOP, ""),
        ] {
            let message = error(&[(PROMPT, &["q"]), (name, &[value])]);
            assert!(message.starts_with(&format!("{name}: ")), "{name}={value}: {message}");
        }
        let message = error(&[(PROMPT, &["q"]), (SYSTEM_PROMPT, &["be brief"])]);
        assert!(message.starts_with("system_prompt: "), "{message}");
        // "" means no system prompt, which ChatGLM2 takes.
        let r = request(&[(PROMPT, &["q"]), (SYSTEM_PROMPT, &[""])]).unwrap();
        assert_eq!(r.turn.system_prompt, None);
    }

    #[test]
    fn integers_past_64_bits_are_called_too_large() {
        for name in [MAX_TOKEN, MAX_NEW_TOKENS, TOP_K, HISTORY_LEN, SEED] {
            let message = error(&[(PROMPT, &["q"]), (name, &["18446744073709551616"])]);
            assert!(message.starts_with(&format!("{name}: ")), "{message}");
            assert!(message.contains("too large (at most 18446744073709551615)"), "{message}");
        }
        let r = request(&[(PROMPT, &["q"]), (MAX_TOKEN, &["18446744073709551615"])]).unwrap();
        assert_eq!(r.options.max_token, Some(usize::MAX));
        assert!(
            error(&[(PROMPT, &["q"]), (MAX_TOKEN, &["-18446744073709551616"])])
                .contains("not a positive integer")
        );
    }

    #[test]
    fn stop_strings_are_limited_in_number_and_length() {
        let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let message = error(&[(PROMPT, &["q"]), (STOP, &many)]);
        assert!(message.starts_with("stop: at most 256 stop strings, got 257"), "{message}");
        assert!(request(&[(PROMPT, &["q"]), (STOP, &many[..MAX_STOP_STRINGS])]).is_ok());
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        let message = error(&[(PROMPT, &["q"]), (STOP, &[&long])]);
        assert!(message.starts_with("stop: stop strings of at most 16384 bytes"), "{message}");
    }

    #[test]
    fn non_utf8_and_malformed_bytes_are_rejected() {
        let mut tensors = HashMap::new();
        tensors.insert(
            PROMPT.to_string(),
            InputTensor {
                datatype: ElementType::Bytes,
                shape: vec![1],
                data: encode_bytes([&b"\xff\xfe"[..]]),
            },
        );
        let message = decode_request(&tensors, false, Family::ChatGlm2, &defaults()).unwrap_err();
        assert!(message.to_string().starts_with("prompt: element 0 is not valid UTF-8"));
        tensors.insert(
            PROMPT.to_string(),
            InputTensor {
                datatype: ElementType::Bytes,
                shape: vec![1],
                data: vec![9, 0, 0, 0, b'h', b'i'],
            },
        );
        let message = decode_request(&tensors, false, Family::ChatGlm2, &defaults()).unwrap_err();
        assert!(message.to_string().starts_with("prompt: element 0 declares 9 bytes"));
    }

    #[test]
    fn absurd_declared_shapes_are_refused_before_any_allocation() {
        // Products past usize, negative dims and counts the data cannot hold: each an
        // error naming the input, never an overflow or a huge allocation.
        for shape in [
            vec![i64::MAX, i64::MAX],
            vec![1 << 32, 1 << 32],
            vec![-1],
            vec![1, -3],
            vec![1 << 40],
            vec![4_000_000_000],
        ] {
            let prompt = InputTensor {
                datatype: ElementType::Bytes,
                shape: shape.clone(),
                data: vec![0; 8],
            };
            let tensors = HashMap::from([(PROMPT.to_string(), prompt)]);
            let message = decode_request(&tensors, false, Family::ChatGlm2, &defaults())
                .unwrap_err()
                .to_string();
            assert!(message.starts_with("prompt: "), "{shape:?}: {message}");
        }
        assert!(decode_bytes("history", &[], usize::MAX).is_err());
    }

    #[test]
    fn batched_requests_carry_a_batch_dimension_of_one() {
        let mut prompt = tensor(&["q"]);
        prompt.shape = vec![1, 1];
        let tensors = HashMap::from([(PROMPT.to_string(), prompt.clone())]);
        assert!(decode_request(&tensors, true, Family::InternLm2, &defaults()).is_ok());
        prompt.shape = vec![2, 1];
        prompt.data = encode_bytes([&b"a"[..], b"b"]);
        let tensors = HashMap::from([(PROMPT.to_string(), prompt)]);
        let message = decode_request(&tensors, true, Family::InternLm2, &defaults()).unwrap_err();
        assert!(message.to_string().starts_with("prompt: batch dimension must be 1"));
    }

    #[test]
    fn outputs_follow_the_requested_list() {
        let completion = Completion {
            response: "a1".into(),
            history: vec![("q0".into(), "a0".into()), ("q1".into(), "a1".into())],
            output_ids: vec![],
            prompt_tokens: 3,
            finish_reason: FinishReason::Stop,
            tool_calls: vec![],
        };
        let all = [RESPONSE.to_string(), HISTORY.to_string()];
        let outputs = encode_outputs(&completion, false, &all);
        assert_eq!(outputs[0].shape, vec![1]);
        assert_eq!(outputs[0].data, encode_bytes([&b"a1"[..]]));
        assert_eq!(outputs[1].shape, vec![2, 2]);
        assert_eq!(
            decode_bytes("h", &outputs[1].data, 4).unwrap(),
            vec![&b"q0"[..], b"a0", b"q1", b"a1"]
        );
        let only_history = encode_outputs(&completion, true, &[HISTORY.to_string()]);
        assert_eq!(only_history.len(), 1);
        assert_eq!(only_history[0].shape, vec![1, 2, 2]);
    }
}
