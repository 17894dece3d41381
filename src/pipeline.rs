//! A served model: weights, tokenizer and chat format of one folder, and its prompts — a
//! chat turn (`model.chat` semantics) or a raw continuation of token ids — turned into
//! generations. The serving loop (`serving`) runs them, for the CLI and the backend alike.

use std::path::Path;

use crate::chat::messages::{ACTION_END, Conversation, ToolCall};
use crate::chat::stream::AnswerStream;
use crate::chat::{self, ChatFormat, Cleanup, History};
use crate::dtype::{DType, KvFormat};
use crate::model::{self, CausalLm, Device, Family, LoadFormat, Quantization};
use crate::sampling::SamplingParams;
use crate::sequence::{FinishReason, GenerateRequest, Sequence};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadOptions {
    pub load_format: LoadFormat,
    pub device: Device,
    /// The GPU path's element type (the CPU path computes in f32).
    pub dtype: DType,
    /// How the decoder-layer linears are held (`model::quant::resolve`).
    pub quantization: Quantization,
    /// The longest sequence served (`session_len`); default: the model's context.
    pub session_len: Option<usize>,
    /// Choose next tokens on the GPU (`CausalLm::set_sample_on_device`).
    pub sample_on_device: bool,
    /// Capture decode steps as CUDA graphs (`CausalLm::set_cuda_graphs`).
    pub cuda_graphs: bool,
    /// Launch kernels with programmatic dependent launch
    /// (`CausalLm::set_programmatic_launch`).
    pub programmatic_launch: bool,
    /// Run a single sequence's QKV product with the rotary and K/V write in its epilogue
    /// (`CausalLm::set_fused_qkv_rope`).
    pub fused_qkv_rope: bool,
    /// Longest chat input (prompt, kept history and system prompt) in bytes; default: what
    /// the context could hold at the tokenizer's longest piece.
    pub max_input_bytes: Option<usize>,
    /// How the KV cache stores K/V (`quant_policy`).
    pub kv_format: KvFormat,
    /// The chat format by name (`chat::FORMAT_NAMES`); None: the folder's
    /// (`ChatFormat::choose`).
    pub chat_format: Option<String>,
}

pub struct ChatModel {
    pub family: Family,
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// How chat turns and conversations become prompts.
    pub format: ChatFormat,
    /// How answers are cleaned (the format's rule, with the tokenizer's setting).
    cleanup: Cleanup,
    /// Ids that end an answer.
    stop_token_ids: Vec<u32>,
    max_context: usize,
    max_input_bytes: usize,
    kv_format: KvFormat,
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
    /// No end token or stop string ends the answer before this many tokens (vLLM's
    /// `min_tokens`); 0 = none.
    pub min_tokens: usize,
    /// Strings that end the answer; the answer stops before the first one found.
    pub stop: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ChatTurn {
    pub query: String,
    pub history: History,
    pub history_len: usize,
    /// The system message (InternLM2's meta instruction, FastChat's system message, a
    /// template's system turn): None = the format's default, "" = none.
    pub system_prompt: Option<String>,
}

/// A prompt's token ids, ready to start: a chat turn or a conversation tokenized and
/// checked against the input limits (where the request arrives, not on the engine's
/// thread), or raw ids.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The query and kept history of a chat turn, returned with the answer.
    chat: Option<(String, History)>,
    /// The answer is cleaned as the family's `model.chat` cleans it.
    clean: bool,
    /// Tools were offered: the answer may end in tool calls, and `<|action_end|>` ends it.
    tools: bool,
    /// The input the prompt came from, named in its errors.
    input: &'static str,
}

impl Prompt {
    /// Raw token ids, continued without a chat format.
    pub fn raw(ids: Vec<u32>) -> Self {
        Prompt { ids, chat: None, clean: false, tools: false, input: "prompt" }
    }
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub response: String,
    /// The kept history plus the new (query, response) pair; empty for raw ids.
    pub history: History,
    pub output_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// The tool calls the answer ends in (only when tools were offered).
    pub tool_calls: Vec<ToolCall>,
}

/// The ids that end an answer: `config.json`'s and `generation_config.json`'s
/// `eos_token_id`s, the tokenizer's end token, and InternLM2's `<|im_end|>`.
fn stop_token_ids(
    dir: &Path,
    family: Family,
    tokenizer: &Tokenizer,
    config_eos: &[u32],
) -> Result<Vec<u32>> {
    let mut ids = config_eos.to_vec();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not valid JSON ({e})", path.display())))?;
        if let Some(eos) = config.get("eos_token_id").filter(|v| !v.is_null()) {
            let eos: model::TokenIds = serde_json::from_value(eos.clone())
                .map_err(|e| Error::Config(format!("{}: eos_token_id: {e}", path.display())))?;
            ids.extend(eos.to_vec());
        }
    }
    match family {
        Family::InternLm2 => {
            ids.push(tokenizer.eos_id());
            ids.extend(tokenizer.token_to_id("<|im_end|>"));
        }
        Family::Llama => ids.push(tokenizer.eos_id()),
        Family::ChatGlm2 => {}
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A folder's family (from config.json) and tokenizer, without its weights.
pub fn load_tokenizer(dir: &Path) -> Result<(Family, Tokenizer)> {
    let (family, _) = model::read_config(dir)?;
    Ok((family, Tokenizer::from_folder(dir, family)?))
}

impl ChatModel {
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let (family, tokenizer) = load_tokenizer(dir)?;
        let model = model::load_with(
            dir,
            options.load_format,
            options.device,
            options.dtype,
            options.quantization,
        )?;
        model.set_sample_on_device(options.sample_on_device);
        model.set_cuda_graphs(options.cuda_graphs);
        model.set_programmatic_launch(options.programmatic_launch);
        model.set_fused_qkv_rope(options.fused_qkv_rope);
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
        // No text longer than this can tokenize into the context: each token covers at most
        // the tokenizer's longest piece. Longer inputs are refused before any encoding.
        let max_input_bytes = match options.max_input_bytes {
            Some(bytes) => bytes,
            None => max_context.saturating_mul(tokenizer.max_piece_bytes().max(1)),
        };
        let kv_format = options.kv_format;
        let (format, why) = ChatFormat::choose(family, dir, options.chat_format.as_deref())?;
        tracing::info!("chat format {} ({why})", format.name());
        let cleanup = format.cleanup(tokenizer.clean_up_tokenization_spaces());
        let stop_token_ids = stop_token_ids(dir, family, &tokenizer, &model.info().eos_token_ids)?;
        Ok(ChatModel {
            family,
            model,
            tokenizer,
            format,
            cleanup,
            stop_token_ids,
            max_context,
            max_input_bytes,
            kv_format,
        })
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// How the engines' KV caches store K/V.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// The longest chat input accepted, in bytes (`LoadOptions::max_input_bytes`).
    pub fn max_input_bytes(&self) -> usize {
        self.max_input_bytes
    }

    /// The ids that end an answer (`stop_token_ids`).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        self.stop_token_ids.clone()
    }

    /// How chat answers are cleaned.
    pub fn cleanup(&self) -> Cleanup {
        self.cleanup
    }

    fn request(&self, prompt_ids: Vec<u32>, options: &GenerationOptions) -> GenerateRequest {
        let (default_total, default_new) = chat::default_limits(self.family);
        GenerateRequest {
            prompt_ids,
            sampling: options.sampling.clone(),
            max_total_tokens: options.max_token.or(default_total),
            max_new_tokens: options.max_new_tokens.or(default_new),
            min_new_tokens: options.min_tokens,
            stop_token_ids: if options.ignore_eos { Vec::new() } else { self.stop_token_ids() },
            producible_ids: self.tokenizer.vocab_size(),
            guard_invalid_scores: self.family == Family::ChatGlm2,
            max_context: self.max_context,
        }
    }

    /// The token ids of a chat turn's prompt.
    pub fn chat_prompt_ids(&self, turn: &ChatTurn) -> Result<Vec<u32>> {
        Ok(self.prepare_chat(turn)?.ids)
    }

    /// Tokenizes a chat turn, refusing first, by its length in bytes, an input no context
    /// could hold (so a huge prompt costs no tokenizing).
    pub fn prepare_chat(&self, turn: &ChatTurn) -> Result<Prompt> {
        if turn.query.is_empty() {
            return Err(Error::InvalidRequest("prompt: must not be empty".into()));
        }
        let kept = chat::kept_history(&turn.history, turn.history_len);
        let bytes = turn.query.len()
            + kept.iter().map(|(q, r)| q.len() + r.len()).sum::<usize>()
            + turn.system_prompt.as_deref().map_or(0, str::len);
        if bytes > self.max_input_bytes {
            return Err(Error::InvalidRequest(format!(
                "prompt: the prompt, its {} kept history pairs and the system prompt are {bytes} \
                 bytes, over the {} bytes this model takes (its context is {} tokens; model \
                 parameter max_input_bytes)",
                kept.len(),
                self.max_input_bytes,
                self.max_context
            )));
        }
        let text = self.format.prompt(&turn.query, kept, turn.system_prompt.as_deref())?;
        let ids = self.tokenizer.encode(&text, !self.format.writes_prefix())?;
        let chat = Some((turn.query.clone(), kept.to_vec()));
        Ok(Prompt { ids, chat, clean: true, tools: false, input: "prompt" })
    }

    /// Tokenizes a conversation in the family's chat format (`chat::messages`), refusing
    /// first, by its length in bytes, one no context could hold.
    pub fn prepare_messages(&self, conversation: &Conversation) -> Result<Prompt> {
        let bytes = conversation.text_bytes();
        if bytes > self.max_input_bytes {
            return Err(Error::InvalidRequest(format!(
                "messages: the conversation's text is {bytes} bytes, over the {} bytes this \
                 model takes (its context is {} tokens; model parameter max_input_bytes)",
                self.max_input_bytes, self.max_context
            )));
        }
        let text = conversation.prompt(&self.format)?;
        let ids = self.tokenizer.encode(&text, !self.format.writes_prefix())?;
        let tools = conversation.has_tools();
        Ok(Prompt { ids, chat: None, clean: true, tools, input: "messages" })
    }

    /// Tokenizes raw text as the family's tokenizer does by default (its prefix tokens
    /// first, unless the text starts with them: `[gMASK] sop` for ChatGLM2, `<s>` for
    /// InternLM2), no chat template.
    pub fn prepare_raw(&self, text: &str) -> Result<Prompt> {
        if text.is_empty() {
            return Err(Error::InvalidRequest("text_input: must not be empty".into()));
        }
        if text.len() > self.max_input_bytes {
            return Err(Error::InvalidRequest(format!(
                "text_input: {} bytes, over the {} bytes this model takes (its context is {} \
                 tokens; model parameter max_input_bytes)",
                text.len(),
                self.max_input_bytes,
                self.max_context
            )));
        }
        // A text that already starts with the prefix (a chat template's `{{ bos_token }}`, as
        // Triton's OpenAI frontend renders it) does not get it twice.
        let mut ids = self.tokenizer.encode(text, true)?;
        let prefix = self.tokenizer.encode("", true)?;
        if !prefix.is_empty() && ids[prefix.len()..].starts_with(&prefix) {
            ids.drain(..prefix.len());
        }
        Ok(Prompt { input: "text_input", ..Prompt::raw(ids) })
    }

    /// Starts a prompt's generation: checked against the length limits, ready to step.
    pub fn start(&self, prompt: Prompt, options: &GenerationOptions) -> Result<Generating<'_>> {
        let pairs = prompt.chat.as_ref().map_or(0, |(_, kept)| kept.len());
        let mut request = self.request(prompt.ids, options);
        if prompt.tools && !options.ignore_eos {
            request.stop_token_ids.extend(self.tokenizer.token_to_id(ACTION_END));
        }
        let input = prompt.input;
        let sequence = Sequence::new(request).map_err(|e| match e {
            // Too long for the context: say the history counts too.
            Error::InvalidRequest(message) if pairs > 0 => Error::InvalidRequest(format!(
                "{message} (the prompt includes the {pairs} kept history pairs; a smaller \
                 history_len keeps fewer)"
            )),
            // Named by the input it came in.
            Error::InvalidRequest(message) => match message.strip_prefix("prompt: ") {
                Some(problem) => Error::InvalidRequest(format!("{input}: {problem}")),
                None => Error::InvalidRequest(message),
            },
            e => e,
        })?;
        let clean = prompt.clean.then_some(self.cleanup);
        let mut answer = AnswerStream::new(&self.tokenizer, clean, options.stop.clone());
        if prompt.tools {
            answer = answer.with_tool_calls(&self.tokenizer);
        }
        Ok(Generating { sequence, answer, chat: prompt.chat, error: None })
    }
}

/// A generation in progress: its sequence (tokens, cache, sampler) and its answer text.
pub struct Generating<'m> {
    pub sequence: Sequence,
    answer: AnswerStream<'m>,
    /// The query and kept history of a chat turn (None for a raw continuation).
    chat: Option<(String, History)>,
    /// Why it ended without an answer, if it did.
    error: Option<Error>,
}

impl Generating<'_> {
    /// Takes a step that ran `ran` tokens and the token chosen after it; returns the answer
    /// text it adds (maybe empty).
    pub fn accept(&mut self, ran: usize, chosen: Option<u32>) -> String {
        let Some(id) = self.sequence.accept(ran, chosen) else { return String::new() };
        let (text, stopped) = self.answer.push_checked(id, self.sequence.may_stop());
        if stopped {
            self.sequence.stop_on_stop_string();
        }
        text
    }

    pub fn is_finished(&self) -> bool {
        self.sequence.is_finished()
    }

    /// Stops early (the client went away).
    pub fn cancel(&mut self) {
        self.sequence.stop(FinishReason::Cancelled);
    }

    /// Ends it with an error instead of an answer.
    pub fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
        self.sequence.stop(FinishReason::Cancelled);
    }

    /// The last piece of answer text and the completion, or the error it failed with.
    pub fn finish(mut self) -> Result<(String, Completion)> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        let rest = self.answer.finish();
        // Text held back until the end (an open byte run) may complete a stop string: the
        // answer is cut there, and that is why it ended.
        if self.answer.is_stopped() {
            self.sequence.stop_on_stop_string();
        }
        let response = self.answer.answer();
        let prompt_tokens = self.sequence.prompt_len();
        let generation = self.sequence.into_generation();
        let history = match self.chat {
            Some((query, mut kept)) => {
                kept.push((query, response.clone()));
                kept
            }
            None => Vec::new(),
        };
        let completion = Completion {
            response,
            history,
            output_ids: generation.output_ids,
            prompt_tokens,
            finish_reason: generation.finish_reason,
            tool_calls: self.answer.tool_calls(),
        };
        Ok((rest, completion))
    }
}
