//! `triton-llm`: use and check a model folder without a server. Every command but `chat`
//! prints one JSON object on stdout; errors go to stderr with a non-zero exit.

mod bench;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use triton_llm::chat::{ChatFormat, DEFAULT_HISTORY_LEN};
use triton_llm::dtype::{DType, KvFormat};
use triton_llm::model::{Device, LoadFormat, Quantization};
use triton_llm::pipeline::{
    ChatModel, ChatTurn, GenerationOptions, LoadOptions, Prompt, load_tokenizer,
};
use triton_llm::sampling::SamplingParams;
use triton_llm::sequence::kv_space::KvCache;
use triton_llm::serving;
use triton_llm::{Error, Result};

#[derive(Parser)]
#[command(
    name = "triton-llm",
    version,
    about = "Run ChatGLM2 / InternLM2 / Llama model folders with the triton_llm engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Token ids of a text: {"ids": [...]} (reads config.json and tokenizer.model only).
    Tokenize {
        /// A Hugging Face model folder (config.json, tokenizer.model).
        #[arg(long)]
        model: PathBuf,
        /// Leave out the family's special prefix ([gMASK] sop / BOS).
        #[arg(long, conflicts_with = "chat")]
        no_special: bool,
        /// The ids a chat's first round sends for TEXT: the family's chat template applied.
        #[arg(long)]
        chat: bool,
        /// With --chat: the system message ("" for none; default: the format's own).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// With --chat: the chat format (chatglm2, internlm2, vicuna_v1.1, llama-2, hf;
        /// default: the folder's).
        #[arg(long, requires = "chat")]
        chat_format: Option<String>,
        /// The text, or `-` to read it from standard input (any bytes a string may hold).
        text: String,
    },
    /// Last-position logits of a token sequence: {"logits": [...]} (full padded width).
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long, value_parser = parse_ids)]
        ids: Ids,
    },
    /// One answer: a chat turn (--prompt) or a raw continuation (--ids).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        input: GenerateInput,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// An interactive chat with streamed answers; `clear` resets the history, `exit` quits.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// The system message ("" for none; default: the chat format's own).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = DEFAULT_HISTORY_LEN)]
        history_len: usize,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Times prefill and greedy decode of a batch of sequences and holds them against the
    /// device's memory bandwidth and matrix throughput, measured in the same run.
    Bench {
        /// A model folder (config.json and weights).
        #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
        model: Option<PathBuf>,
        /// A real model's shape with random weights: chatglm2-6b, internlm2_5-7b,
        /// llama-3.1-8b or vicuna-7b.
        #[arg(long)]
        shape: Option<String>,
        #[arg(long, default_value = "safetensors")]
        load_format: LoadFormat,
        #[command(flatten)]
        device: DeviceArgs,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens to generate per sequence.
        #[arg(long, default_value_t = 64)]
        new: usize,
        /// Timed runs of the prefill and decode: the figures are their medians, the decode
        /// step's spread reported beside.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors or pytorch_model*.bin,
    /// tokenizer.model).
    #[arg(long)]
    model: PathBuf,
    /// `dummy` fills the weights with random values instead of reading files.
    #[arg(long, default_value = "safetensors")]
    load_format: LoadFormat,
    /// Longest prompt + answer served (default: the model's context).
    #[arg(long)]
    session_len: Option<usize>,
    /// The chat format: chatglm2, internlm2, vicuna_v1.1, llama-2 (FastChat's templates)
    /// or hf (the folder's chat_template); default: the folder's.
    #[arg(long)]
    chat_format: Option<String>,
    /// FastChat's `--load-8bit`: the decoder-layer linears in 8 bits (`--quantization
    /// w8a16`).
    #[arg(long, conflicts_with = "quantization")]
    load_8bit: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Clone, Copy)]
struct DeviceArgs {
    /// cpu, or cuda / cuda:N for the GPU path.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// The GPU path's element type: bf16, f16 or f32 (the CPU path computes in f32).
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// The decoder-layer linears: none (as stored), w8a16 or w4a16 (quantised at load),
    /// fp8 (E4M3 weights and activations, quantised at load), or awq
    /// (the folder must hold an AWQ checkpoint, which is used as such whatever this says,
    /// unless it conflicts).
    #[arg(long, default_value = "none")]
    quantization: Quantization,
    /// With the GPU path: choose each next token with the batched sampling kernel
    /// (`false`: the logits come back and the host samples).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    sample_on_device: bool,
    /// With the GPU path: capture decode steps as CUDA graphs and replay them.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    cuda_graphs: bool,
    /// With the GPU path on sm_90 and later: launch kernels with programmatic dependent
    /// launch, each kernel's blocks scheduled while the previous one drains.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    programmatic_launch: bool,
    /// With the GPU path: run a single sequence's QKV product with the rotary and K/V
    /// write in its epilogue (one kernel instead of two, the same results).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    fused_qkv_rope: bool,
    /// The KV cache's format, as LMDeploy's quant_policy: 0 (the model's type), 8 (int8)
    /// or 4 (int4; both per token and head, with an f16 scale and zero).
    #[arg(long = "quant-policy", default_value = "0", value_parser = KvFormat::from_quant_policy)]
    quant_policy: KvFormat,
    /// The KV cache's format, as vLLM's kv_cache_dtype: auto (the model's type), fp8 or
    /// fp8_e4m3 (E4M3 per token and head with an f16 scale), int8 or int4 (as
    /// --quant-policy 8 or 4). Replaces --quant-policy.
    #[arg(long = "kv-cache-dtype", value_parser = KvFormat::from_kv_cache_dtype,
          conflicts_with = "quant_policy")]
    kv_cache_dtype: Option<KvFormat>,
}

impl DeviceArgs {
    fn kv_format(&self) -> KvFormat {
        self.kv_cache_dtype.unwrap_or(self.quant_policy)
    }
}

impl ModelArgs {
    fn load(&self) -> Result<ChatModel> {
        let options = LoadOptions {
            load_format: self.load_format,
            session_len: self.session_len,
            device: self.device.device,
            dtype: self.device.dtype,
            quantization: match self.load_8bit {
                true => Quantization::W8A16,
                false => self.device.quantization,
            },
            sample_on_device: self.device.sample_on_device,
            cuda_graphs: self.device.cuda_graphs,
            programmatic_launch: self.device.programmatic_launch,
            fused_qkv_rope: self.device.fused_qkv_rope,
            max_input_bytes: None,
            kv_format: self.device.kv_format(),
            chat_format: self.chat_format.clone(),
        };
        ChatModel::load(&self.model, &options)
    }
}

#[derive(Args)]
#[group(skip)]
struct GenerateInput {
    /// A user message, formatted with the family's chat template.
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    prompt: Option<String>,
    /// Raw token ids to continue (comma-separated), no chat template.
    #[arg(long, value_parser = parse_ids)]
    ids: Option<Ids>,
    /// Past rounds as JSON: [["query", "response"], ...].
    #[arg(long, requires = "prompt")]
    history: Option<String>,
    #[arg(long, default_value_t = DEFAULT_HISTORY_LEN, requires = "prompt")]
    history_len: usize,
    /// The system message ("" for none; default: the chat format's own).
    #[arg(long, requires = "prompt")]
    system: Option<String>,
}

#[derive(Args, Clone)]
struct GenerationArgs {
    /// Prompt + generated tokens (ChatGLM2's max_length; default 8192 for ChatGLM2).
    #[arg(long)]
    max_token: Option<usize>,
    /// Generated tokens alone (default 1024 for InternLM2).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 (or below 1e-5) is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.8)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Generate past the end tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// No end token or stop string ends the answer before this many tokens.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// A string that ends the answer (repeatable); the answer stops before it.
    #[arg(long)]
    stop: Vec<String>,
}

impl GenerationArgs {
    fn options(&self) -> GenerationOptions {
        GenerationOptions {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            max_token: self.max_token,
            max_new_tokens: self.max_new_tokens,
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Clone)]
struct Ids(Vec<u32>);

fn parse_ids(text: &str) -> std::result::Result<Ids, String> {
    text.split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|e| format!("bad token id {s:?}: {e}")))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Ids)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Tokenize { model, no_special, chat, system, chat_format, text } => {
            let (family, tokenizer) = load_tokenizer(&model)?;
            let text = match text.as_str() {
                "-" => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Error::Config(format!("reading the text from stdin: {e}")))?,
                _ => text,
            };
            let ids = match chat {
                true => {
                    let (format, _) = ChatFormat::choose(family, &model, chat_format.as_deref())?;
                    let text = format.prompt(&text, &[], system.as_deref())?;
                    tokenizer.encode(&text, !format.writes_prefix())?
                }
                false => tokenizer.encode(&text, !no_special)?,
            };
            print_json(&json!({ "ids": ids }));
        }
        Command::Logits { model, ids } => {
            let chat = model.load()?;
            let mut cache = KvCache::new(chat.model.as_ref())?;
            if ids.0.len() > chat.max_context() {
                return Err(Error::InvalidRequest(format!(
                    "ids: {} tokens exceed the model's context of {}",
                    ids.0.len(),
                    chat.max_context()
                )));
            }
            print_json(&json!({ "logits": cache.forward(chat.model.as_ref(), &ids.0)? }));
        }
        Command::Generate { model, input, generation } => {
            let chat = model.load()?;
            let options = generation.options();
            let completion = match (input.prompt, input.ids) {
                (Some(query), _) => {
                    let history = match input.history {
                        Some(text) => serde_json::from_str(&text).map_err(|e| {
                            Error::InvalidRequest(format!(
                                "--history must be JSON pairs [[query, response], ...]: {e}"
                            ))
                        })?,
                        None => Vec::new(),
                    };
                    let turn = ChatTurn {
                        query,
                        history,
                        history_len: input.history_len,
                        system_prompt: input.system,
                    };
                    serving::generate(&chat, chat.prepare_chat(&turn)?, &options, |_| true)?
                }
                (None, Some(ids)) => {
                    serving::generate(&chat, Prompt::raw(ids.0), &options, |_| true)?
                }
                (None, None) => unreachable!("clap requires --prompt or --ids"),
            };
            print_json(&json!({
                "response": completion.response,
                "history": completion.history,
                "output_ids": completion.output_ids,
                "prompt_tokens": completion.prompt_tokens,
                "generated_tokens": completion.output_ids.len(),
                "finish_reason": completion.finish_reason.as_str(),
            }));
        }
        Command::Chat { model, system, history_len, generation } => {
            interactive_chat(&model.load()?, system, history_len, &generation.options())?;
        }
        Command::Bench { model, shape, load_format, device, batch, prompt, new, runs } => {
            let workload = bench::Workload { batch, prompt, new, runs };
            bench::run(model, shape, load_format, device, workload)?;
        }
    }
    Ok(())
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn interactive_chat(
    chat: &ChatModel,
    system_prompt: Option<String>,
    history_len: usize,
    options: &GenerationOptions,
) -> Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut history = Vec::new();
    let io = |e| Error::io("<terminal>", e);
    println!(
        "triton-llm chat ({}, chat format {}): type a message; `clear` resets the history, \
         `exit` quits.",
        chat.family.name(),
        chat.format.name()
    );
    loop {
        print!("\nUser: ");
        stdout.flush().map_err(io)?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(io)? == 0 {
            return Ok(());
        }
        let query = line.trim_end_matches(['\n', '\r']).to_string();
        match query.trim() {
            "" => continue,
            "exit" | "quit" => return Ok(()),
            "clear" => {
                history.clear();
                println!("(history cleared)");
                continue;
            }
            _ => {}
        }
        let turn = ChatTurn {
            query,
            history: history.clone(),
            history_len,
            system_prompt: system_prompt.clone(),
        };
        print!("\nAssistant: ");
        stdout.flush().map_err(io)?;
        let result = chat.prepare_chat(&turn).and_then(|prompt| {
            serving::generate(chat, prompt, options, |piece| {
                print!("{piece}");
                std::io::stdout().flush().is_ok()
            })
        });
        println!();
        match result {
            Ok(completion) => history = completion.history,
            Err(e) => eprintln!("error: {e}"),
        }
    }
}
