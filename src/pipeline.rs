//! A served model: weights, tokenizer and chat format of one folder, and the two ways to
//! use them — a chat turn (`model.chat` semantics) and a raw continuation of token ids.
//! The CLI and the Triton backend both go through here.

use std::path::Path;

use crate::chat::{self, History};
use crate::engine::{self, FinishReason, GenerateRequest, SamplingParams};
use crate::model::{self, CausalLm, Family, LoadFormat};
use crate::tokenizer::{Tokenizer, TokenizerFamily};
use crate::{Error, Result};

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub load_format: LoadFormat,
    /// The longest sequence served (`session_len`); default: the model's context.
    pub session_len: Option<usize>,
}

pub struct ChatModel {
    pub family: Family,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    max_context: usize,
}

/// Everything one generation may ask for beyond the prompt.
#[derive(Clone, Debug, Default)]
pub struct GenerationOptions {
    pub sampling: SamplingParams,
    /// Prompt + generated tokens (`max_token`); None = the family's default.
    pub max_token: Option<usize>,
    /// Generated tokens alone; None = the family's default.
    pub max_new_tokens: Option<usize>,
    /// Keep generating past the end tokens (benchmarks).
    pub ignore_eos: bool,
    /// Strings that end the answer; the answer stops before the first one found.
    pub stop: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ChatTurn {
    pub query: String,
    pub history: History,
    pub history_len: usize,
    /// InternLM2's meta instruction: None = the model's default, "" = none.
    pub system_prompt: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub response: String,
    /// The kept history plus the new (query, response) pair; empty for raw ids.
    pub history: History,
    pub output_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

impl ChatModel {
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let (family, _) = model::read_config(dir)?;
        let tokenizer_family = match family {
            Family::ChatGlm2 => TokenizerFamily::ChatGlm2,
            Family::InternLm2 => TokenizerFamily::InternLm2,
        };
        let tokenizer = Tokenizer::from_folder(dir, tokenizer_family)?;
        let model = model::load(dir, options.load_format)?;
        let info = model.info();
        if tokenizer.vocab_size() > info.logits_width {
            return Err(Error::Config(format!(
                "the tokenizer has {} ids but the model's vocabulary has only {}",
                tokenizer.vocab_size(),
                info.logits_width
            )));
        }
        let max_context = match options.session_len {
            Some(0) => return Err(Error::Config("session_len must be at least 1".into())),
            Some(n) => {
                if n > info.max_context {
                    // Allowed (rope extrapolates; InternLM2's dynamic NTK is made for it) but
                    // past what the checkpoint was trained for.
                    tracing::warn!(
                        session_len = n,
                        model_context = info.max_context,
                        "session_len exceeds the model's context; answers past it may degrade"
                    );
                }
                n
            }
            None => info.max_context,
        };
        Ok(ChatModel { family, model, tokenizer, max_context })
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The ids that end an answer: config eos, and for InternLM2 also `</s>` and `<|im_end|>`.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.info().eos_token_ids.clone();
        if self.family == Family::InternLm2 {
            ids.push(self.tokenizer.eos_id());
            ids.extend(self.tokenizer.token_to_id("<|im_end|>"));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn request(&self, prompt_ids: Vec<u32>, options: &GenerationOptions) -> GenerateRequest {
        let (default_total, default_new) = chat::default_limits(self.family);
        GenerateRequest {
            prompt_ids,
            sampling: options.sampling.clone(),
            max_total_tokens: options.max_token.or(default_total),
            max_new_tokens: options.max_new_tokens.or(default_new),
            stop_token_ids: if options.ignore_eos { Vec::new() } else { self.stop_token_ids() },
            producible_ids: self.tokenizer.vocab_size(),
            guard_invalid_scores: self.family == Family::ChatGlm2,
            max_context: self.max_context,
        }
    }

    /// The token ids of a chat turn's prompt.
    pub fn chat_prompt_ids(&self, turn: &ChatTurn) -> Result<Vec<u32>> {
        if turn.query.is_empty() {
            return Err(Error::InvalidRequest("prompt: must not be empty".into()));
        }
        let kept = chat::kept_history(&turn.history, turn.history_len);
        let text =
            chat::build_prompt(self.family, &turn.query, kept, turn.system_prompt.as_deref());
        self.tokenizer.encode(&text, true)
    }

    /// One `model.chat` turn. `on_text` receives the answer as it is generated (raw
    /// decoded pieces, never a broken character) and returns false to stop.
    pub fn chat(
        &self,
        turn: &ChatTurn,
        options: &GenerationOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let prompt_ids = self.chat_prompt_ids(turn)?;
        let mut completion = self.run(prompt_ids, options, on_text)?;
        completion.response = chat::clean_response(self.family, &completion.response);
        let kept = chat::kept_history(&turn.history, turn.history_len);
        completion.history = kept.to_vec();
        completion.history.push((turn.query.clone(), completion.response.clone()));
        Ok(completion)
    }

    /// Continues raw token ids without a chat format.
    pub fn continue_ids(
        &self,
        prompt_ids: Vec<u32>,
        options: &GenerationOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        self.run(prompt_ids, options, on_text)
    }

    fn run(
        &self,
        prompt_ids: Vec<u32>,
        options: &GenerationOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion> {
        let request = self.request(prompt_ids, options);
        let mut stream = self.tokenizer.stream_decoder();
        let mut stops = StopStrings::new(&options.stop);
        let generation = engine::generate(self.model.as_ref(), &request, |id| {
            let piece = stream.push(id);
            let (ready, stopped) = stops.push(&piece);
            (ready.is_empty() || on_text(ready)) && !stopped
        })?;
        let rest = stream.finish();
        let (ready, _) = stops.push(&rest);
        if !ready.is_empty() {
            on_text(ready);
        }
        let held = stops.finish();
        if !held.is_empty() {
            on_text(held);
        }
        let mut response = self.tokenizer.decode(&generation.output_ids);
        let mut finish_reason = generation.finish_reason;
        if let Some(at) = stops.stopped_at {
            response.truncate(at);
            finish_reason = FinishReason::Stop;
        }
        Ok(Completion {
            response,
            history: Vec::new(),
            output_ids: generation.output_ids,
            prompt_tokens: request.prompt_ids.len(),
            finish_reason,
        })
    }
}

/// Finds stop strings in streamed text. Text that could still turn out to be the start of
/// a stop string is held back, so the streamed pieces always add up to the final answer.
struct StopStrings<'a> {
    stops: &'a [String],
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where the first stop string starts, once one is found.
    stopped_at: Option<usize>,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopStrings { stops, text: String::new(), emitted: 0, stopped_at: None }
    }

    /// Adds a decoded piece; returns the text now safe to emit and whether a stop string ended it.
    fn push(&mut self, piece: &str) -> (&str, bool) {
        if self.stopped_at.is_some() {
            return ("", true);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A match may start in text held back from earlier pieces.
        let search_from = self.emitted;
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[search_from..].find(stop.as_str()).map(|i| search_from + i)
            })
            .min();
        let ready_end = match found {
            Some(at) => {
                self.stopped_at = Some(at);
                at
            }
            None => floor_char_boundary(
                &self.text,
                self.text.len().saturating_sub(longest.saturating_sub(1)),
            ),
        };
        let start = self.emitted;
        self.emitted = ready_end.max(start);
        (&self.text[start..self.emitted], found.is_some())
    }

    /// The held-back tail once generation has ended without a stop string.
    fn finish(&mut self) -> &str {
        let start = self.emitted;
        let end = self.stopped_at.unwrap_or(self.text.len()).max(start);
        self.emitted = end;
        &self.text[start..end]
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(&stops);
        let mut out = String::new();
        for piece in pieces {
            let (ready, stopped) = matcher.push(piece);
            out.push_str(ready);
            if stopped {
                break;
            }
        }
        out.push_str(matcher.finish());
        (out, matcher.stopped_at)
    }

    #[test]
    fn stop_strings_split_across_pieces_are_found() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".to_string(), Some(4)));
        assert_eq!(run(&["\n\n", "Ob"], &["x", "\n", "y O", "b"]), ("x\ny ".to_string(), Some(4)));
    }

    #[test]
    fn without_a_match_everything_comes_out_in_order() {
        assert_eq!(run(&["zz"], &["你", "好z", "!"]), ("你好z!".to_string(), None));
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), None));
    }
}
