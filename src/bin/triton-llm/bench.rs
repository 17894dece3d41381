//! `triton-llm bench`: prefill and greedy decode of a batch timed against the device's
//! memory bandwidth and matrix throughput, measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use triton_llm::dtype::KvFormat;
use triton_llm::model::{
    self, CausalLm, Checkpoint, Device, KvStore, LoadFormat, ModelInfo, SeqStep,
};
use triton_llm::probe::{AttentionShape, DeviceProbe};
use triton_llm::sampling::SampleRow;
use triton_llm::{Error, Result};

use super::{DeviceArgs, print_json};

/// What a bench times: `batch` sequences of `prompt` tokens each generating `new`, `runs`
/// times.
pub struct Workload {
    pub batch: usize,
    pub prompt: usize,
    pub new: usize,
    pub runs: usize,
}

/// The `bench` command: loads a model folder, or a real model's shape with random weights,
/// and runs [`bench`] on it.
pub fn run(
    model: Option<PathBuf>,
    shape: Option<String>,
    load_format: LoadFormat,
    device: DeviceArgs,
    workload: Workload,
) -> Result<()> {
    let Workload { batch, prompt, new, runs } = workload;
    // Named in the report: the shape, or the model folder's name.
    let name = match (&model, &shape) {
        (Some(dir), _) => dir.file_name().unwrap_or(dir.as_os_str()).to_string_lossy().into_owned(),
        (None, Some(name)) => name.clone(),
        (None, None) => String::new(),
    };
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
    let quant_bits = match model::quant::resolve(&config, device.quantization)? {
        model::quant::WeightFormat::Dense => None,
        model::quant::WeightFormat::W8 => Some(8),
        // The probes time int8 and 4-bit products only.
        model::quant::WeightFormat::Fp8 => None,
        model::quant::WeightFormat::W4 | model::quant::WeightFormat::Awq { .. } => Some(4),
    };
    let lm = model::load_config(
        family,
        config,
        &checkpoint,
        device.device,
        device.dtype,
        device.quantization,
    )?;
    checkpoint.finish()?;
    lm.set_sample_on_device(device.sample_on_device);
    lm.set_cuda_graphs(device.cuda_graphs);
    let programmatic_launch = lm.set_programmatic_launch(device.programmatic_launch);
    lm.set_fused_qkv_rope(device.fused_qkv_rope);
    let on_gpu = device.device != Device::Cpu;
    let options = BenchOptions {
        sample_on_device: device.sample_on_device && on_gpu,
        cuda_graphs: device.cuda_graphs && on_gpu,
        programmatic_launch,
        fused_qkv_rope: device.fused_qkv_rope && on_gpu,
        quant_bits,
        runs,
    };
    bench(lm.as_ref(), &name, device, batch, prompt, new, options)
}

/// `config.json` of the real models whose shapes `bench --shape` takes.
fn shape_config(name: &str) -> Result<&'static str> {
    match name {
        "chatglm2-6b" => Ok(include_str!("../../../bench/shapes/chatglm2-6b/config.json")),
        "internlm2_5-7b" | "internlm2_5-7b-chat" => {
            Ok(include_str!("../../../bench/shapes/internlm2_5-7b/config.json"))
        }
        "llama-3.1-8b" | "llama-3.1-8b-instruct" => {
            Ok(include_str!("../../../bench/shapes/llama-3.1-8b/config.json"))
        }
        "vicuna-7b" | "vicuna-7b-v1.5" => {
            Ok(include_str!("../../../bench/shapes/vicuna-7b/config.json"))
        }
        other => Err(Error::InvalidRequest(format!(
            "--shape {other:?} is not known (chatglm2-6b, internlm2_5-7b, llama-3.1-8b, \
             vicuna-7b)"
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
        banned: &[],
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

/// GPU path settings a bench ran with (reported with its figures).
#[derive(Clone, Copy)]
struct BenchOptions {
    sample_on_device: bool,
    cuda_graphs: bool,
    programmatic_launch: bool,
    fused_qkv_rope: bool,
    /// Bits of the decoder-layer linears when quantised (their products are timed apart).
    quant_bits: Option<u32>,
    /// Timed runs (prefill and decode), the figures their medians.
    runs: usize,
}

/// The median of `values` (not empty): the middle one, or the mean of the middle two.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

fn bench(
    lm: &dyn CausalLm,
    name: &str,
    device: DeviceArgs,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    options: BenchOptions,
) -> Result<()> {
    let info = lm.info().clone();
    if options.runs == 0 {
        return Err(Error::InvalidRequest("--runs must be at least 1".into()));
    }
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
            let gpu = DeviceProbe::open(ordinal, device.dtype)?;
            let bandwidth = gpu.bandwidth(1 << 30)?;
            let flops = gpu.matmul_flops(8192)?;
            (bandwidth, Some(flops), device.dtype.size(), gpu.name().to_string())
        }
    };
    let block_size = 16;
    let per_sequence = (prompt_len + new_tokens).div_ceil(block_size);
    let mut arena = lm.new_arena(block_size, batch * per_sequence, device.kv_format())?;
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
    // The figures are the medians of `runs` runs, each run's step kept for the spread.
    let mut timings = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        timings.push(bench_run(lm, arena.as_mut(), &prompts, &tables, new_tokens)?);
    }
    let decode_steps = new_tokens.saturating_sub(1).max(1) as f64;
    let steps_s: Vec<f64> = timings.iter().map(|&(_, decode)| decode / decode_steps).collect();
    let ttft = median(timings.iter().map(|&(ttft, _)| ttft).collect());
    let decode = median(timings.iter().map(|&(_, decode)| decode).collect());
    let step_s = median(steps_s.clone());
    // Floor of one decode step: every weight read once (the embedding table only one row a
    // token) plus the K/V of each sequence at its mean length. The weights' bytes are as
    // held (quantised linears included), less the embedding table's.
    let embedding_bytes = (info.num_parameters - info.decode_parameters) * elem_bytes;
    let weight_bytes = info.weight_bytes.saturating_sub(embedding_bytes) as f64;
    let mean_len = prompt_len as f64 + decode_steps / 2.0;
    let kv_token_bytes = info.num_layers
        * 2
        * device.kv_format().bytes_per_token(
            info.kv_heads,
            info.kv_width / info.kv_heads,
            elem_bytes,
        );
    let kv_bytes = batch as f64 * mean_len * kv_token_bytes as f64;
    let step_floor_s = (weight_bytes + kv_bytes) / bandwidth;
    // Prefill floor: 2 flops per parameter and token (attention, about 2% more at 1024
    // tokens for these shapes, is left out).
    let prefill_flops = 2.0 * info.decode_parameters as f64 * (batch * prompt_len) as f64;
    let mut report = json!({
        "model": name,
        "device": device_name,
        "dtype": if device.device == Device::Cpu { "f32" } else { device.dtype.name() },
        "weights": info.weight_format,
        "family": info.family.name(),
        "parameters": info.num_parameters,
        "batch": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "kv_format": device.kv_format().name(),
        "kv_bytes_per_token": kv_token_bytes,
        "sample_on_device": options.sample_on_device,
        "cuda_graphs": options.cuda_graphs,
        "programmatic_launch": options.programmatic_launch,
        "fused_qkv_rope": options.fused_qkv_rope,
        "ttft_ms": ttft * 1e3,
        "prefill_tokens_per_s": (batch * prompt_len) as f64 / ttft,
        "decode_step_ms": step_s * 1e3,
        "runs": options.runs,
        "decode_step_ms_min": steps_s.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        "decode_step_ms_max": steps_s.iter().copied().fold(0.0, f64::max) * 1e3,
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
        use triton_llm::probe::{GEMV_MAX_ROWS, ProductKernel};
        let gpu = DeviceProbe::open(ordinal, device.dtype)?;
        // Each weight shape of the 6B–8B models' decoder layers: ChatGLM2-6B, then
        // InternLM2.5-7B and Llama-3.1-8B (the same), then Vicuna-7B.
        const LAYER_SHAPES: [(usize, usize); 10] = [
            (4608, 4096),
            (4096, 4096),
            (27392, 4096),
            (4096, 13696),
            (6144, 4096),
            (28672, 4096),
            (4096, 14336),
            (12288, 4096),
            (22016, 4096),
            (4096, 11008),
        ];
        // Each shape's read rate as a share of the copy bandwidth, in percent.
        let shares = |shapes: &[(usize, usize)],
                      read: &dyn Fn(usize, usize) -> triton_llm::Result<f64>|
         -> triton_llm::Result<serde_json::Value> {
            let mut shares = serde_json::Map::new();
            for &(n, k) in shapes {
                let share = (100.0 * read(n, k)? / bandwidth * 10.0).round() / 10.0;
                shares.insert(format!("{n}x{k}"), json!(share));
            }
            Ok(serde_json::Value::Object(shares))
        };
        // The dense products also at the output layers (ChatGLM2's, Llama-3's).
        let mut dense_shapes = LAYER_SHAPES.to_vec();
        dense_shapes.extend([(65024, 4096), (128256, 4096)]);
        let measure = |kernel: ProductKernel| {
            shares(&dense_shapes, &|n, k| gpu.product_bandwidth(kernel, batch, n, k))
        };
        if let Some(bits) = options.quant_bits.filter(|_| batch <= GEMV_MAX_ROWS) {
            // The quantised GEMV on the decoder-layer shapes (the output layer stays dense),
            // its packed bytes and scales against the copy bandwidth.
            report["quantized_products_percent_of_bandwidth"] =
                shares(&LAYER_SHAPES, &|n, k| gpu.quantized_product_bandwidth(bits, batch, n, k))?;
        }
        report["decode_attention_percent_of_bandwidth"] =
            decode_attention_shares(&gpu, &info, device.kv_format(), batch, elem_bytes, bandwidth)?;
        let chosen = ProductKernel::for_rows(batch);
        report["products_kernel"] = json!(chosen.name());
        report["products_percent_of_bandwidth"] = measure(chosen)?;
        if batch <= GEMV_MAX_ROWS {
            let mut kernels = serde_json::Map::new();
            for kernel in [ProductKernel::Gemv, ProductKernel::GemvWhole, ProductKernel::Cublas] {
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

/// The decode attention alone at this batch and contexts of 256 to 8,192 keys over a
/// cache in `format`, on each kernel: its K/V read rate (the format's bytes) as a share of
/// the copy bandwidth, in percent, and the kernel the engine picks. Contexts past the
/// model's, or whose K/V at this batch passes 8 GiB (the measurement cycles through copies
/// of it), are left out.
fn decode_attention_shares(
    gpu: &DeviceProbe,
    info: &ModelInfo,
    format: KvFormat,
    batch: usize,
    elem_bytes: usize,
    bandwidth: f64,
) -> Result<serde_json::Value> {
    let shape = AttentionShape {
        num_heads: info.num_heads,
        num_kv_heads: info.kv_heads,
        head_dim: info.kv_width / info.kv_heads,
    };
    let share = |rate: f64| (1000.0 * rate / bandwidth).round() / 10.0;
    let mut shares = serde_json::Map::new();
    for context in [256usize, 1024, 4096, 8192] {
        let kv_bytes =
            2 * batch * context * format.bytes_per_token(info.kv_heads, shape.head_dim, elem_bytes);
        if context > info.max_context || kv_bytes > 8 << 30 {
            continue;
        }
        let rates = gpu.decode_attention_bandwidth(&shape, format, batch, context)?;
        shares.insert(
            context.to_string(),
            json!({
                "tensor_cores": rates.tensor_cores.map(share),
                "cuda_cores": share(rates.cuda_cores),
                "engine": format!("{} ({} heads a block)", rates.engine_kernel, rates.engine_heads_per_block),
            }),
        );
    }
    Ok(serde_json::Value::Object(shares))
}
