//! `triton-llm`: use and check a model folder without a server. Every command but `chat`
//! prints one JSON object on stdout; errors go to stderr with a non-zero exit.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use triton_llm::chat::{self, DEFAULT_HISTORY_LEN};
use triton_llm::dtype::DType;
use triton_llm::model::{self, CausalLm, Checkpoint, Device, KvStore, LoadFormat, SeqStep};
use triton_llm::pipeline::{
    ChatModel, ChatTurn, GenerationOptions, LoadOptions, Prompt, load_tokenizer,
};
use triton_llm::sampling::{SampleRow, SamplingParams};
use triton_llm::serving;
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
        /// With --chat: InternLM2's system prompt ("" for none; default: the model's own).
        #[arg(long, requires = "chat")]
        system: Option<String>,
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
    /// Times prefill and greedy decode of a batch of sequences and holds them against the
    /// device's memory bandwidth and matrix throughput, measured in the same run.
    Bench {
        /// A model folder (config.json and weights).
        #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
        model: Option<PathBuf>,
        /// A real model's shape with random weights: chatglm2-6b or internlm2_5-7b.
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
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Clone, Copy)]
struct DeviceArgs {
    /// cpu, or cuda / cuda:N for the GPU engine.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// The GPU engine's element type: bf16, f16 or f32 (the CPU engine computes in f32).
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// With the GPU engine: choose each next token with the batched sampling kernel
    /// (`false`: the logits come back and the host samples).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    sample_on_device: bool,
    /// With the GPU engine: capture decode steps as CUDA graphs and replay them.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    cuda_graphs: bool,
}

impl ModelArgs {
    fn load(&self) -> Result<ChatModel> {
        let options = LoadOptions {
            load_format: self.load_format,
            session_len: self.session_len,
            device: self.device.device,
            dtype: self.device.dtype,
            sample_on_device: self.device.sample_on_device,
            cuda_graphs: self.device.cuda_graphs,
            max_input_bytes: None,
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
        Command::Tokenize { model, no_special, chat, system, text } => {
            let (family, tokenizer) = load_tokenizer(&model)?;
            let text = match chat {
                true => chat::build_prompt(family, &text, &[], system.as_deref()),
                false => text,
            };
            print_json(&json!({ "ids": tokenizer.encode(&text, !no_special)? }));
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
        Command::Bench { model, shape, load_format, device, batch, prompt, new } => {
            let (family, config, checkpoint) = match (model, shape) {
                (Some(dir), _) => {
                    let (family, config) = model::read_config(&dir)?;
                    let checkpoint = match load_format {
                        LoadFormat::Safetensors => Checkpoint::open(&dir)?,
                        LoadFormat::Dummy => Checkpoint::dummy(),
                    };
                    (family, config, checkpoint)
                }
                (None, Some(name)) => {
                    let text = shape_config(&name)?;
                    let (family, config) = model::parse_family_config(text, &name)?;
                    (family, config, Checkpoint::dummy())
                }
                (None, None) => unreachable!("clap requires --model or --shape"),
            };
            let lm = model::load_config(family, config, &checkpoint, device.device, device.dtype)?;
            checkpoint.finish()?;
            lm.set_sample_on_device(device.sample_on_device);
            lm.set_cuda_graphs(device.cuda_graphs);
            let on_gpu = device.device != Device::Cpu;
            let options = BenchOptions {
                sample_on_device: device.sample_on_device && on_gpu,
                cuda_graphs: device.cuda_graphs && on_gpu,
            };
            bench(lm.as_ref(), device, batch, prompt, new, options)?;
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

/// `config.json` of the real models whose shapes `bench --shape` takes.
fn shape_config(name: &str) -> Result<&'static str> {
    match name {
        "chatglm2-6b" => Ok(include_str!("../../bench/shapes/chatglm2-6b/config.json")),
        "internlm2_5-7b" | "internlm2_5-7b-chat" => {
            Ok(include_str!("../../bench/shapes/internlm2_5-7b/config.json"))
        }
        other => Err(Error::InvalidRequest(format!(
            "--shape {other:?} is not known (chatglm2-6b, internlm2_5-7b)"
        ))),
    }
}

/// Host memory bandwidth: bytes read plus written per second by a large copy.
fn measure_host_bandwidth() -> f64 {
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

/// One prefill of every prompt together, then greedy decode steps of the whole batch, each
/// token chosen as the serving engine does (`forward_sample`). Returns (prefill seconds,
/// decode seconds).
fn bench_run(
    lm: &dyn CausalLm,
    arena: &mut dyn KvStore,
    prompts: &[Vec<u32>],
    tables: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(f64, f64)> {
    let greedy = SampleRow {
        width: lm.info().logits_width,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        penalized: &[],
        uniform: 0.0,
        guard_invalid_scores: false,
    };
    let rows = vec![Some(greedy); prompts.len()];
    let steps: Vec<SeqStep<'_>> =
        prompts.iter().zip(tables).map(|(ids, blocks)| SeqStep { ids, start: 0, blocks }).collect();
    let start = Instant::now();
    let mut chosen = lm.forward_sample(arena, &steps, &rows)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let prompt_len = prompts[0].len();
    for step in 1..new_tokens {
        let next: Vec<[u32; 1]> = chosen.iter().map(|id| [id.unwrap_or(0)]).collect();
        let steps: Vec<SeqStep<'_>> = next
            .iter()
            .zip(tables)
            .map(|(ids, blocks)| SeqStep { ids, start: prompt_len + step - 1, blocks })
            .collect();
        chosen = lm.forward_sample(arena, &steps, &rows)?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

/// GPU engine settings a bench ran with (reported with its figures).
#[derive(Clone, Copy)]
struct BenchOptions {
    sample_on_device: bool,
    cuda_graphs: bool,
}

fn bench(
    lm: &dyn CausalLm,
    device: DeviceArgs,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    options: BenchOptions,
) -> Result<()> {
    let info = lm.info().clone();
    if batch == 0
        || prompt_len == 0
        || new_tokens == 0
        || prompt_len + new_tokens > info.max_context
    {
        return Err(Error::InvalidRequest(format!(
            "--batch {batch}, --prompt {prompt_len} and --new {new_tokens} must be positive and \
             fit the context of {}",
            info.max_context
        )));
    }
    // The ceilings, measured in this run on this device.
    let (bandwidth, matmul_flops, elem_bytes, device_name) = match device.device {
        Device::Cpu => (measure_host_bandwidth(), None, 4usize, "cpu".to_string()),
        Device::Cuda(ordinal) => {
            let gpu = triton_llm::cuda::Gpu::open(ordinal, device.dtype)?;
            gpu.bind()?;
            let bandwidth = gpu.measure_bandwidth(1 << 30)?;
            let flops = gpu.measure_matmul(8192)?;
            (bandwidth, Some(flops), device.dtype.size(), gpu.name.clone())
        }
    };
    let block_size = 16;
    let per_sequence = (prompt_len + new_tokens).div_ceil(block_size);
    let mut arena = lm.new_arena(block_size, batch * per_sequence)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * per_sequence) as u32..((b + 1) * per_sequence) as u32).collect())
        .collect();
    // Ordinary token ids (past the byte pieces), different for each sequence.
    // Ids spread over ordinary tokens: 300..2300, or the middle half of a tiny vocabulary.
    let vocab = info.logits_width as u32;
    let (base, span) = if vocab > 2300 { (300, 2000) } else { (vocab / 4, (vocab / 2).max(1)) };
    let prompts: Vec<Vec<u32>> = (0..batch as u32)
        .map(|b| (0..prompt_len as u32).map(|i| base + (i * 7919 + b * 104729) % span).collect())
        .collect();
    if device.device != Device::Cpu {
        // Warm-up: buffers, cuBLAS plans and module loading stay out of the figures.
        bench_run(lm, arena.as_mut(), &prompts, &tables, 3)?;
    }
    let (ttft, decode) = bench_run(lm, arena.as_mut(), &prompts, &tables, new_tokens)?;
    let decode_steps = new_tokens.saturating_sub(1).max(1) as f64;
    let step_s = decode / decode_steps;
    // Floor of one decode step: every weight read once (the embedding table only one row a
    // token) plus the K/V of each sequence at its mean length.
    let weight_bytes = info.decode_parameters as f64 * elem_bytes as f64;
    let mean_len = prompt_len as f64 + decode_steps / 2.0;
    let kv_bytes =
        batch as f64 * mean_len * (info.num_layers * 2 * info.kv_width * elem_bytes) as f64;
    let step_floor_s = (weight_bytes + kv_bytes) / bandwidth;
    // Prefill floor: 2 flops per parameter and token (attention, about 2% more at 1024
    // tokens for these shapes, is left out).
    let prefill_flops = 2.0 * info.decode_parameters as f64 * (batch * prompt_len) as f64;
    let mut report = json!({
        "device": device_name,
        "dtype": if device.device == Device::Cpu { "f32" } else { device.dtype.name() },
        "family": info.family.name(),
        "parameters": info.num_parameters,
        "batch": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "sample_on_device": options.sample_on_device,
        "cuda_graphs": options.cuda_graphs,
        "ttft_ms": ttft * 1e3,
        "prefill_tokens_per_s": (batch * prompt_len) as f64 / ttft,
        "decode_step_ms": step_s * 1e3,
        "decode_tokens_per_s": batch as f64 / step_s,
        "decode_tokens_per_s_per_sequence": 1.0 / step_s,
        "output_tokens_per_s": (batch * new_tokens) as f64 / (ttft + decode),
        "bandwidth_gb_s": bandwidth / 1e9,
        "decode_step_floor_ms": step_floor_s * 1e3,
        "decode_limit_tokens_per_s": batch as f64 / step_floor_s,
        "decode_percent_of_limit": 100.0 * step_floor_s / step_s,
        "threads": rayon::current_num_threads(),
    });
    if let Device::Cuda(ordinal) = device.device {
        // The decode step's products alone (a batch's rows against each weight shape of both
        // 6B/7B families, on the kernel the engine picks for those rows), as a share of the
        // copy bandwidth: what the end-to-end decode figure is built from. Up to the GEMV
        // kernel's rows, both kernels, to check the engine's pick.
        use triton_llm::cuda::{GEMV_MAX_ROWS, ProductKernel};
        let gpu = triton_llm::cuda::Gpu::open(ordinal, device.dtype)?;
        let measure = |kernel: ProductKernel| -> triton_llm::Result<serde_json::Value> {
            let mut shares = serde_json::Map::new();
            for (n, k) in [
                (4608, 4096),
                (4096, 4096),
                (27392, 4096),
                (4096, 13696),
                (65024, 4096),
                (6144, 4096),
                (28672, 4096),
                (4096, 14336),
            ] {
                let read = gpu.measure_matmul_bandwidth(kernel, batch, n, k)?;
                shares.insert(
                    format!("{n}x{k}"),
                    json!((100.0 * read / bandwidth * 10.0).round() / 10.0),
                );
            }
            Ok(serde_json::Value::Object(shares))
        };
        let chosen = ProductKernel::for_rows(batch);
        report["products_kernel"] = json!(chosen.name());
        report["products_percent_of_bandwidth"] = measure(chosen)?;
        if batch <= GEMV_MAX_ROWS {
            let mut kernels = serde_json::Map::new();
            for kernel in [ProductKernel::Gemv, ProductKernel::Cublas] {
                kernels.insert(kernel.name().into(), measure(kernel)?);
            }
            report["product_kernels_percent_of_bandwidth"] = serde_json::Value::Object(kernels);
        }
    }
    if let Some(flops) = matmul_flops {
        let floor = prefill_flops / flops;
        report["matmul_tflops"] = json!(flops / 1e12);
        report["prefill_floor_ms"] = json!(floor * 1e3);
        report["prefill_percent_of_limit"] = json!(100.0 * floor / ttft);
        // Short prompts are bound by reading the weights once, not by the products.
        report["prefill_weight_read_floor_ms"] = json!(weight_bytes / bandwidth * 1e3);
    }
    print_json(&report);
    Ok(())
}
