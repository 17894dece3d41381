//! `triton-llm`: use and check a model folder without a server. Every command but `chat`
//! prints one JSON object on stdout; errors go to stderr with a non-zero exit.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use triton_llm::chat::DEFAULT_HISTORY_LEN;
use triton_llm::engine::SamplingParams;
use triton_llm::model::LoadFormat;
use triton_llm::pipeline::{ChatModel, ChatTurn, GenerationOptions, LoadOptions};
use triton_llm::{Error, Result};

#[derive(Parser)]
#[command(
    name = "triton-llm",
    version,
    about = "Run ChatGLM2 / InternLM2 model folders with the triton_llm engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Token ids of a text: {"ids": [...]}.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Leave out the family's special prefix ([gMASK] sop / BOS).
        #[arg(long)]
        no_special: bool,
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
        /// InternLM2's system prompt ("" for none).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = DEFAULT_HISTORY_LEN)]
        history_len: usize,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Times prefill and decode of one sequence and relates decode to memory bandwidth.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        new: usize,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.model).
    #[arg(long)]
    model: PathBuf,
    /// `dummy` fills the weights with random values instead of reading files.
    #[arg(long, default_value = "safetensors")]
    load_format: LoadFormat,
    /// Longest prompt + answer served (default: the model's context).
    #[arg(long)]
    session_len: Option<usize>,
}

impl ModelArgs {
    fn load(&self) -> Result<ChatModel> {
        let options = LoadOptions { load_format: self.load_format, session_len: self.session_len };
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
    /// InternLM2's system prompt ("" for none; default: the model's own).
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
        Command::Tokenize { model, no_special, text } => {
            let chat = model.load()?;
            print_json(&json!({ "ids": chat.tokenizer.encode(&text, !no_special)? }));
        }
        Command::Logits { model, ids } => {
            let chat = model.load()?;
            let mut cache = chat.model.new_cache();
            if ids.0.len() > chat.max_context() {
                return Err(Error::InvalidRequest(format!(
                    "ids: {} tokens exceed the model's context of {}",
                    ids.0.len(),
                    chat.max_context()
                )));
            }
            print_json(&json!({ "logits": chat.model.forward(&ids.0, &mut cache)? }));
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
                    chat.chat(&turn, &options, |_| true)?
                }
                (None, Some(ids)) => chat.continue_ids(ids.0, &options, |_| true)?,
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
        Command::Bench { model, prompt, new } => bench(&model, prompt, new)?,
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
        "triton-llm chat ({}): type a message; `clear` resets the history, `exit` quits.",
        chat.family.name()
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
        let result = chat.chat(&turn, options, |piece| {
            print!("{piece}");
            std::io::stdout().flush().is_ok()
        });
        println!();
        match result {
            Ok(completion) => history = completion.history,
            Err(e) => eprintln!("error: {e}"),
        }
    }
}

/// Host memory bandwidth: bytes read plus written per second by a large copy.
fn measure_copy_bandwidth() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * len as f64 / best
}

fn bench(args: &ModelArgs, prompt_len: usize, new_tokens: usize) -> Result<()> {
    let chat = args.load()?;
    let info = chat.model.info().clone();
    if prompt_len == 0 || new_tokens == 0 || prompt_len + new_tokens > chat.max_context() {
        return Err(Error::InvalidRequest(format!(
            "--prompt {prompt_len} and --new {new_tokens} must be positive and fit the context of {}",
            chat.max_context()
        )));
    }
    let bandwidth = measure_copy_bandwidth();
    // Ordinary token ids (past the byte pieces), the same for every run.
    let ids: Vec<u32> = (0..prompt_len as u32).map(|i| 300 + (i * 7919) % 500).collect();
    let mut cache = chat.model.new_cache();
    let start = Instant::now();
    let mut logits = chat.model.forward(&ids, &mut cache)?;
    let ttft = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 1..new_tokens {
        let next = triton_llm::engine::sampler::argmax(&logits);
        logits = chat.model.forward(&[next], &mut cache)?;
    }
    let decode = start.elapsed().as_secs_f64();
    let decode_tokens = new_tokens.saturating_sub(1).max(1) as f64;
    let tokens_per_s = decode_tokens / decode;
    // The floor of one decode step: the weights in f32 as the CPU engine keeps them.
    let bytes_per_step = (info.decode_parameters as f64) * 4.0;
    let limit_tokens_per_s = bandwidth / bytes_per_step;
    print_json(&json!({
        "device": "cpu",
        "family": info.family.name(),
        "parameters": info.num_parameters,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt_len as f64 / ttft,
        "decode_tokens_per_s": tokens_per_s,
        "output_tokens_per_s": new_tokens as f64 / (ttft + decode),
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "decode_bandwidth_limit_tokens_per_s": limit_tokens_per_s,
        "decode_percent_of_bandwidth_limit": 100.0 * tokens_per_s / limit_tokens_per_s,
        "threads": rayon::current_num_threads(),
    }));
    Ok(())
}
