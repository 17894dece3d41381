//! The GPU path against the CPU path on the tiny fixtures: last-position logits within
//! 1e-2 relative L2 in bf16 and 1e-4 in f32, the same 16 greedy tokens, and a batched
//! paged pass equal to each sequence alone. In f32 the greedy tokens must be identical. In
//! bf16 the GPU is fed the CPU's tokens and must pick the same one at every step unless the
//! CPU's own top two are within `BF16_TIE` of each other: these random models have steps
//! whose top two logits differ by 0.01, below bf16's resolution, where either answer is right. The tests that need a CUDA device are ignored
//! (CI has none, and reports them as not run); `scripts/gpu/check.sh` runs this binary with
//! `--include-ignored` on the GPU machine and collects the `GPUCHECK {json}` lines it
//! prints into its table.

mod common;

use common::*;
use serde_json::json;
use triton_llm::dtype::{DType, KvFormat};
use triton_llm::model::{self, CausalLm, Device, LoadFormat, Quantization, SeqStep};
use triton_llm::probe;
use triton_llm::sequence::kv_space::KvCache;

/// The GPU tests are `#[ignore]`d, so a machine without a GPU reports them as not run,
/// never as passed; asked for anyway (scripts/gpu/check.sh passes --include-ignored), one
/// without a device fails here.
fn require_gpu(test: &str) {
    assert!(probe::cuda_available(), "{test}: needs a CUDA device, driver, NVRTC and cuBLAS");
}

fn report(value: serde_json::Value) {
    println!("GPUCHECK {value}");
}

#[test]
fn kernels_compile_for_every_dtype() {
    if !probe::nvrtc_available() {
        eprintln!("kernels_compile_for_every_dtype: skipped (no NVRTC library here)");
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let ptx = probe::compile_kernels(dtype, arch).unwrap();
            assert!(ptx.contains("attention_prefill"), "{arch} {dtype:?}");
            // Every kernel's parameters are of the kinds the launches' check knows, and the
            // check reads each kernel's list whole (counts as the wrappers pass them).
            let counts = probe::kernel_parameter_counts(&ptx).unwrap();
            let count = |name: &str| counts.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
            assert!(counts.len() >= 40, "{arch} {dtype:?}: {} kernels", counts.len());
            assert_eq!(count("gemv_qkv_rope"), Some(16), "{arch} {dtype:?}");
            assert_eq!(count("attention_decode_fp8_h4"), Some(18), "{arch} {dtype:?}");
            assert_eq!(count("attention_prefill"), Some(14), "{arch} {dtype:?}");
            assert_eq!(count("fill_uniform"), Some(4), "{arch} {dtype:?}");
            // For reading the compiler's output (ptxas -v, local memory) without a GPU.
            if let Some(dir) = std::env::var_os("TRITON_LLM_DUMP_PTX") {
                let path = std::path::Path::new(&dir).join(format!("{arch}-{}.ptx", dtype.name()));
                std::fs::write(path, ptx).unwrap();
            }
        }
    }
}

/// Top-two logit gap under which bf16 may pick either token (its logits differ from f32 by
/// about 0.7% of their norm, some 0.02 on these models).
const BF16_TIE: f32 = 0.05;

/// Logits of every step of `forced` fed after `prompt`.
fn teacher_forced(model: &dyn CausalLm, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model).unwrap();
    let mut all = vec![cache.forward(model, prompt).unwrap()];
    for &token in &forced[..forced.len() - 1] {
        all.push(cache.forward(model, &[token]).unwrap());
    }
    all
}

/// ptxas assembles every kernel for sm_80 and sm_90 with no spills or stack (a kernel over
/// a limit, e.g. of shared memory, would fail to load on the device). Runs where
/// `TRITON_LLM_PTXAS` names ptxas (scripts/setup.sh installs it from PyPI) and NVRTC loads.
#[test]
fn kernels_assemble_without_spills() {
    let Some(ptxas) = std::env::var_os("TRITON_LLM_PTXAS") else {
        eprintln!("kernels_assemble_without_spills: skipped (TRITON_LLM_PTXAS not set)");
        return;
    };
    if !probe::nvrtc_available() {
        eprintln!("kernels_assemble_without_spills: skipped (no NVRTC library here)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let ptx = probe::compile_kernels(dtype, arch).unwrap();
            let path = dir.path().join(format!("{arch}-{}.ptx", dtype.name()));
            std::fs::write(&path, ptx).unwrap();
            let output = std::process::Command::new(&ptxas)
                .args(["-v", &format!("-arch={sm}"), "-o"])
                .arg(dir.path().join("out.cubin"))
                .arg(&path)
                .output()
                .expect("running ptxas");
            let report = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "ptxas {sm} {dtype:?}: {report}");
            let frames: Vec<&str> =
                report.lines().filter(|l| l.contains("bytes stack frame")).collect();
            assert!(frames.len() >= 10, "{sm} {dtype:?}: no kernel reports in {report}");
            for frame in frames {
                assert!(
                    frame.trim()
                        == "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                    "{sm} {dtype:?}: {frame}\n{report}"
                );
            }
        }
    }
}

fn greedy(model: &dyn CausalLm, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let mut cache = KvCache::new(model).unwrap();
    let first = cache.forward(model, prompt).unwrap();
    let mut logits = first.clone();
    let mut tokens = Vec::new();
    for step in 0..steps {
        let next = argmax(&logits);
        tokens.push(next);
        if step + 1 < steps {
            logits = cache.forward(model, &[next]).unwrap();
        }
    }
    (first, tokens)
}

fn check_against_cpu(folder: &str, dtype: DType, limit: f64) {
    check_quantized_against_cpu(folder, dtype, limit, Quantization::None);
}

/// As `check_against_cpu`, both paths with the linears in `quantization` (an AWQ folder's
/// own format with `None`): the GPU forms the same weights as the CPU (exact in f32).
fn check_quantized_against_cpu(folder: &str, dtype: DType, limit: f64, quantization: Quantization) {
    require_gpu(folder);
    let dir = fixture(folder);
    let cpu = model::load_quantized(&dir, LoadFormat::Safetensors, quantization).unwrap();
    let gpu = model::load_with(&dir, LoadFormat::Safetensors, Device::Cuda(0), dtype, quantization)
        .unwrap();
    let golden = golden(folder, "model_golden.json");
    let mut failures = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = ids(&case["input_ids"]);
        let (cpu_logits, cpu_tokens) = greedy(cpu.as_ref(), &input, 16);
        let (gpu_logits, gpu_tokens) = greedy(gpu.as_ref(), &input, 16);
        let rel = relative_l2(&gpu_logits, &cpu_logits);
        let logits_pass = rel < limit && gpu_logits.iter().all(|v| v.is_finite());
        let agree = cpu_tokens.iter().zip(&gpu_tokens).take_while(|(a, b)| a == b).count();
        report(json!({"check": "logits", "model": folder, "quantization": quantization.name(),
            "case": name, "dtype": dtype.name(),
            "prompt": input.len(), "rel_l2": rel, "limit": limit, "pass": logits_pass}));
        if !logits_pass {
            failures.push(format!("{name}: relative L2 {rel:e} over {limit:e}"));
        }
        // Dynamic NTK gives K of a call past the trained context a call-length-dependent
        // rotation, so such prompts are never split (KvSpace::must_prefill_whole).
        let whole_only = gpu.info().length_dependent_rope_after.is_some_and(|l| input.len() > l);
        if input.len() >= 8 && !whole_only {
            // The prompt in two calls, the second starting mid-sequence over cached keys (the
            // serving engine's chunked prefill).
            let split = input.len() * 2 / 3;
            let mut cache = KvCache::new(gpu.as_ref()).unwrap();
            cache.forward(gpu.as_ref(), &input[..split]).unwrap();
            let chunked = cache.forward(gpu.as_ref(), &input[split..]).unwrap();
            let rel = relative_l2(&chunked, &cpu_logits);
            let pass = rel < limit;
            report(json!({"check": "chunked_prefill", "model": folder, "case": name,
                "dtype": dtype.name(), "split": split, "rel_l2": rel, "limit": limit, "pass": pass}));
            if !pass {
                failures.push(format!("{name}: chunked prefill relative L2 {rel:e}"));
            }
        }
        if dtype == DType::F32 {
            report(json!({"check": "greedy16", "model": folder, "case": name, "dtype": "f32",
                "agree": agree, "of": 16, "pass": agree == 16}));
            if agree != 16 {
                failures.push(format!("{name}: greedy {gpu_tokens:?} vs CPU {cpu_tokens:?}"));
            }
            continue;
        }
        let cpu_steps = teacher_forced(cpu.as_ref(), &input, &cpu_tokens);
        let gpu_steps = teacher_forced(gpu.as_ref(), &input, &cpu_tokens);
        let (mut same, mut ties, mut wrong) = (0, 0, Vec::new());
        for (step, (cpu_row, gpu_row)) in cpu_steps.iter().zip(&gpu_steps).enumerate() {
            let (want, got) = (argmax(cpu_row), argmax(gpu_row));
            if want == got {
                same += 1;
            } else if cpu_row[want as usize] - cpu_row[got as usize] < BF16_TIE {
                ties += 1;
            } else {
                wrong.push(step);
            }
        }
        report(json!({"check": "greedy16", "model": folder, "case": name, "dtype": dtype.name(),
            "free_running_agree": agree, "forced_same": same, "near_ties": ties, "of": 16,
            "pass": wrong.is_empty()}));
        if !wrong.is_empty() {
            failures.push(format!("{name}: bf16 picks another token at steps {wrong:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{folder} {} {}: {failures:#?}",
        quantization.name(),
        dtype.name()
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn chatglm2_tiny_bf16_matches_the_cpu_engine() {
    check_against_cpu("chatglm2-tiny", DType::BF16, 1e-2);
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn chatglm2_tiny_f32_matches_the_cpu_engine() {
    check_against_cpu("chatglm2-tiny", DType::F32, 1e-4);
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn internlm2_tiny_bf16_matches_the_cpu_engine() {
    check_against_cpu("internlm2-tiny", DType::BF16, 1e-2);
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn internlm2_tiny_f32_matches_the_cpu_engine() {
    check_against_cpu("internlm2-tiny", DType::F32, 1e-4);
}

/// Llama: q/k/v and gate/up stacked at load; MHA (Vicuna) and GQA with llama3 rope scaling.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn llama_tiny_models_match_the_cpu_engine() {
    for folder in ["vicuna-tiny", "llama3-tiny"] {
        check_against_cpu(folder, DType::F32, 1e-4);
        check_against_cpu(folder, DType::BF16, 1e-2);
    }
}

/// AWQ checkpoints and weights quantised at load: the quantised GEMV (a single sequence)
/// and the dequantise-then-cuBLAS products against the CPU path's quantised linears.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn quantized_weights_match_the_cpu_engine() {
    for folder in ["chatglm2-tiny-awq", "internlm2-tiny-awq"] {
        check_quantized_against_cpu(folder, DType::F32, 1e-4, Quantization::None);
        check_quantized_against_cpu(folder, DType::BF16, 1e-2, Quantization::None);
    }
    for quantization in [Quantization::W8A16, Quantization::W4A16] {
        check_quantized_against_cpu("chatglm2-tiny", DType::F32, 1e-4, quantization);
        check_quantized_against_cpu("internlm2-tiny", DType::BF16, 1e-2, quantization);
        check_quantized_against_cpu("llama3-tiny", DType::F32, 1e-4, quantization);
    }
    // FP8 (E4M3 weights and activations): the GEMV for a few rows; for more, cuBLASLt's FP8
    // product in bf16 and cuBLAS over the E4M3 values in f32, the scales after (the chunked
    // prefill's second call included).
    check_quantized_against_cpu("llama3-tiny", DType::F32, 1e-4, Quantization::Fp8);
    for folder in ["internlm2-tiny", "chatglm2-tiny", "llama3-tiny"] {
        check_quantized_against_cpu(folder, DType::BF16, 1e-2, Quantization::Fp8);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn awq_batched_paged_pass_matches_single_sequences() {
    check_batched("chatglm2-tiny-awq", 4, true);
    check_batched("internlm2-tiny-awq", 4, false);
}

/// Prefills of different lengths in one pass over scattered blocks, then decode steps of
/// all of them together, give each sequence the logits it gets alone. The three prompts run
/// `copies` times over (more sequences than the GEMV kernel's rows make cuBLAS products);
/// with `cuda_graphs` the decode steps are captured once and replayed, padded to the next
/// captured batch, and a sequence alone decodes through a one-sequence graph. Two arenas
/// take turns, as two instances sharing the model's weights do (each has its graphs).
#[allow(clippy::needless_range_loop)] // steps index each sequence's logits
fn check_batched(folder: &str, copies: usize, cuda_graphs: bool) {
    check_batched_kv(folder, copies, cuda_graphs, KvFormat::Model);
}

/// As `check_batched`, every arena (alone and batched) storing K/V as `format`.
fn check_batched_kv(folder: &str, copies: usize, cuda_graphs: bool, format: KvFormat) {
    let batched = Batched {
        dtype: DType::F32,
        copies,
        cuda_graphs,
        format,
        limit: 1e-4,
        programmatic_launch: false,
    };
    check_batched_on(&fixture(folder), folder, batched);
}

/// How `check_batched_on` runs a model.
struct Batched {
    dtype: DType,
    /// Copies of the prompts decoded side by side.
    copies: usize,
    cuda_graphs: bool,
    format: KvFormat,
    /// Largest relative L2 distance of a batched step's logits from the same sequence's alone.
    limit: f64,
    /// The batched (and graphed) passes with programmatic dependent launch, each sequence
    /// alone without it.
    programmatic_launch: bool,
}

/// The model in `dir` (named `folder` in the report, its prompts those of fixture `prompts`'s
/// golden cases) decoded in batches and alone.
#[allow(clippy::needless_range_loop)] // steps index each sequence's logits
fn check_batched_on(dir: &std::path::Path, prompts_of: &str, batched: Batched) {
    let Batched { dtype, copies, cuda_graphs, format, limit, programmatic_launch } = batched;
    let folder = dir.file_name().unwrap().to_string_lossy().into_owned();
    let folder = if dir == fixture(prompts_of) { prompts_of.to_string() } else { folder };
    require_gpu(&folder);
    let gpu = model::load_on(dir, LoadFormat::Safetensors, Device::Cuda(0), dtype).unwrap();
    let golden = golden(prompts_of, "model_golden.json");
    let cases: Vec<Vec<u32>> =
        golden["cases"].as_array().unwrap().iter().take(3).map(|c| ids(&c["input_ids"])).collect();
    let steps = 8;
    let decode_alone = |graphs: bool| -> Vec<Vec<Vec<f32>>> {
        gpu.set_cuda_graphs(graphs);
        cases
            .iter()
            .map(|prompt| {
                let mut cache = KvCache::with_format(gpu.as_ref(), format).unwrap();
                let mut logits = vec![cache.forward(gpu.as_ref(), prompt).unwrap()];
                for _ in 1..steps {
                    let next = argmax(logits.last().unwrap());
                    logits.push(cache.forward(gpu.as_ref(), &[next]).unwrap());
                }
                logits
            })
            .collect()
    };
    gpu.set_programmatic_launch(false);
    let alone = decode_alone(false);
    if programmatic_launch {
        assert!(gpu.set_programmatic_launch(true), "{folder}: no programmatic launch here");
    }
    let mut worst = 0f64;
    if cuda_graphs {
        for (graphed, launched) in decode_alone(true).iter().zip(&alone) {
            for (a, b) in graphed.iter().zip(launched) {
                worst = worst.max(relative_l2(a, b));
            }
        }
    }
    gpu.set_cuda_graphs(cuda_graphs);

    let prompts: Vec<&Vec<u32>> = cases.iter().cycle().take(cases.len() * copies).collect();
    let block_size = 16;
    let per_sequence = 8;
    let mut arenas: Vec<_> = (0..2)
        .map(|_| gpu.new_arena(block_size, per_sequence * prompts.len(), format).unwrap())
        .collect();
    // Interleaved, descending block ids: no sequence owns a contiguous range.
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| {
            (0..per_sequence).map(|i| ((per_sequence - 1 - i) * prompts.len() + s) as u32).collect()
        })
        .collect();
    let mut lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let first: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(ids, blocks)| SeqStep { ids, start: 0, blocks })
        .collect();
    let mut logits: Vec<Vec<Vec<f32>>> =
        arenas.iter_mut().map(|arena| gpu.forward_batch(arena.as_mut(), &first).unwrap()).collect();
    for step in 0..steps {
        for (s, row) in logits.iter().flatten().enumerate() {
            worst = worst.max(relative_l2(row, &alone[s % prompts.len() % cases.len()][step]));
        }
        if step + 1 == steps {
            break;
        }
        let next: Vec<[u32; 1]> =
            (0..prompts.len()).map(|s| [argmax(&alone[s % cases.len()][step])]).collect();
        let batch: Vec<SeqStep<'_>> = next
            .iter()
            .zip(&tables)
            .zip(&lens)
            .map(|((ids, blocks), &start)| SeqStep { ids, start, blocks })
            .collect();
        logits = arenas
            .iter_mut()
            .map(|arena| gpu.forward_batch(arena.as_mut(), &batch).unwrap())
            .collect();
        lens.iter_mut().for_each(|l| *l += 1);
    }
    let pass = worst < limit;
    report(json!({"check": "batched_paged", "model": folder, "dtype": dtype.name(),
        "kv": format.name(), "sequences": prompts.len(), "cuda_graphs": cuda_graphs,
        "programmatic_launch": programmatic_launch,
        "worst_rel_l2": worst, "limit": limit, "pass": pass}));
    assert!(
        pass,
        "{folder} ({} sequences, graphs {cuda_graphs}, KV {}): batched logits differ from \
         single-sequence ones by {worst:e}",
        format.name(),
        prompts.len()
    );
}

/// Logits of `prompt` (in two calls from `split`, the second over the cached prefix) and
/// then of each of `forced` after it, through a cache that stores K/V as `format`.
fn logits_with_kv(
    model: &dyn CausalLm,
    format: KvFormat,
    prompt: &[u32],
    split: usize,
    forced: &[u32],
) -> Vec<Vec<f32>> {
    let mut cache = KvCache::with_format(model, format).unwrap();
    if split > 0 {
        cache.forward(model, &prompt[..split]).unwrap();
    }
    let mut all = vec![cache.forward(model, &prompt[split..]).unwrap()];
    for &token in forced {
        all.push(cache.forward(model, &[token]).unwrap());
    }
    all
}

/// The GPU path with an int8 or int4 KV cache against the CPU path with the same format,
/// teacher-forced along the goldens' greedy tokens (prefill, chunked prefill over a
/// quantised prefix, decode steps): both store the same bytes for the same K/V, so the
/// logits are as close as with the model's dtype. In f32 a K/V value within rounding of a
/// level boundary could still land on the other level (the products differ in their last
/// bits); the worst distance is reported.
fn check_kv_format_against_cpu(folder: &str, dtype: DType, format: KvFormat, limit: f64) {
    require_gpu(folder);
    let dir = fixture(folder);
    let cpu = model::load(&dir, LoadFormat::Safetensors).unwrap();
    let gpu = model::load_on(&dir, LoadFormat::Safetensors, Device::Cuda(0), dtype).unwrap();
    let golden = golden(folder, "model_golden.json");
    let mut failures = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["input_ids"]);
        let forced = ids(&case["greedy_16"]);
        let whole_only = gpu.info().length_dependent_rope_after.is_some_and(|l| prompt.len() > l);
        let splits: &[usize] =
            if prompt.len() >= 8 && !whole_only { &[0, prompt.len() * 2 / 3] } else { &[0] };
        let want = logits_with_kv(cpu.as_ref(), format, &prompt, 0, &forced);
        for &split in splits {
            let got = logits_with_kv(gpu.as_ref(), format, &prompt, split, &forced);
            let worst = got.iter().zip(&want).map(|(g, w)| relative_l2(g, w)).fold(0f64, f64::max);
            let pass = worst < limit && got.iter().flatten().all(|v| v.is_finite());
            report(json!({"check": "kv_format", "model": folder, "case": name,
                "dtype": dtype.name(), "kv": format.name(), "split": split,
                "steps": got.len(), "worst_rel_l2": worst, "limit": limit, "pass": pass}));
            if !pass {
                failures.push(format!("{name} (split {split}): relative L2 {worst:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{folder} {} KV {}: {failures:#?}", dtype.name(), format.name());
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn quantised_kv_caches_match_the_cpu_engine() {
    for folder in ["chatglm2-tiny", "internlm2-tiny"] {
        for format in [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8] {
            check_kv_format_against_cpu(folder, DType::F32, format, 1e-4);
            check_kv_format_against_cpu(folder, DType::BF16, format, 1e-2);
        }
    }
}

/// Batched paged passes over quantised caches, launched and replayed as CUDA graphs (the
/// format is fixed per arena, so a captured graph stays valid), equal each sequence alone.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn quantised_kv_batched_and_graphed_passes_match_single_sequences() {
    for format in [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8] {
        check_batched_kv("chatglm2-tiny", 4, false, format);
        check_batched_kv("chatglm2-tiny", 4, true, format);
        check_batched_kv("internlm2-tiny", SEQUENCES_FOR_HEAD_GROUPS, true, format);
    }
}

// 129 sequences: enough that a decode attention block takes both query heads of a K/V
// head (decode_heads_per_block in src/model/gpu/tables.rs).
const SEQUENCES_FOR_HEAD_GROUPS: usize = 43;

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn chatglm2_tiny_batched_paged_pass_matches_single_sequences() {
    check_batched("chatglm2-tiny", 1, false);
    check_batched("chatglm2-tiny", 4, false);
    check_batched("chatglm2-tiny", SEQUENCES_FOR_HEAD_GROUPS, false);
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn internlm2_tiny_batched_paged_pass_matches_single_sequences() {
    check_batched("internlm2-tiny", 1, false);
    check_batched("internlm2-tiny", SEQUENCES_FOR_HEAD_GROUPS, false);
    check_batched("llama3-tiny", 1, false);
    check_batched("llama3-tiny", SEQUENCES_FOR_HEAD_GROUPS, false);
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn decode_steps_replayed_as_cuda_graphs_match_launched_ones() {
    for folder in ["chatglm2-tiny", "internlm2-tiny", "llama3-tiny"] {
        check_batched(folder, 1, true); // 3 sequences as a graph of 4 (GEMV products)
        check_batched(folder, 4, true); // 12 as a graph of 16 (cuBLAS products)
        check_batched(folder, SEQUENCES_FOR_HEAD_GROUPS, true); // two heads a block
    }
}

/// chatglm2-tiny with ChatGLM2-6B's grouping, 16 query heads per K/V head (32 heads of 16
/// dims over 2 K/V heads; new random attention weights), so that a decode attention block
/// takes a whole group: on the tensor cores in bf16 (attention_decode_mma).
fn grouped_chatglm2() -> tempfile::TempDir {
    use rand::{RngExt, SeedableRng};
    let dir = copy_fixture("chatglm2-tiny");
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let (heads, groups, head_dim, hidden) = (32usize, 2usize, 16usize, 64usize);
    config["num_attention_heads"] = json!(heads);
    config["multi_query_group_num"] = json!(groups);
    config["kv_channels"] = json!(head_dim);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let mut random = |shape: Vec<usize>, scale: f32| -> (Vec<usize>, Vec<u8>) {
        let n: usize = shape.iter().product();
        let bytes = (0..n).flat_map(|_| ((rng.random::<f32>() * 2.0 - 1.0) * scale).to_le_bytes());
        (shape, bytes.collect())
    };
    let qkv = (heads + 2 * groups) * head_dim;
    let path = dir.path().join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    for (name, _, shape, data) in &mut tensors {
        let replaced = if name.ends_with("self_attention.query_key_value.weight") {
            Some(random(vec![qkv, hidden], 0.2))
        } else if name.ends_with("self_attention.query_key_value.bias") {
            Some(random(vec![qkv], 0.1))
        } else if name.ends_with("self_attention.dense.weight") {
            Some(random(vec![hidden, heads * head_dim], 0.1))
        } else {
            None
        };
        if let Some((new_shape, bytes)) = replaced {
            (*shape, *data) = (new_shape, bytes);
        }
    }
    write_safetensors(&path, &tensors);
    dir
}

/// The grouped model is a valid checkpoint: it loads on the CPU and gives finite logits.
#[test]
fn the_grouped_test_model_runs_on_the_cpu() {
    let dir = grouped_chatglm2();
    let cpu = model::load_on(dir.path(), LoadFormat::Safetensors, Device::Cpu, DType::F32).unwrap();
    let mut cache = KvCache::new(cpu.as_ref()).unwrap();
    let logits = cache.forward(cpu.as_ref(), &[5, 9, 33, 2]).unwrap();
    assert!(logits.len() == 1024 && logits.iter().all(|x| x.is_finite()));
    let next = cache.forward(cpu.as_ref(), &[argmax(&logits)]).unwrap();
    assert!(next.iter().all(|x| x.is_finite()) && relative_l2(&next, &logits) > 1e-3);
}

/// Decode attention on the tensor cores (bf16, 16 heads a block once 64 sequences decode)
/// equals the CUDA-core kernel a sequence alone takes (one head a block), launched and
/// replayed as a graph; so do the f16 module's and, over int8 and fp8 caches, the kernels
/// that dequantise K/V as they stage them.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn decode_attention_on_tensor_cores_matches_the_cuda_core_kernel() {
    let dir = grouped_chatglm2();
    for (dtype, cuda_graphs, format) in [
        (DType::BF16, false, KvFormat::Model),
        (DType::BF16, true, KvFormat::Model),
        (DType::F16, false, KvFormat::Model),
        (DType::BF16, false, KvFormat::Int8),
        (DType::BF16, true, KvFormat::Fp8),
    ] {
        // 64 copies of the 3 prompts: 192 sequences, 16 heads a decode block.
        let batched = Batched {
            dtype,
            copies: 64,
            cuda_graphs,
            format,
            limit: 2e-2,
            programmatic_launch: false,
        };
        check_batched_on(dir.path(), "chatglm2-tiny", batched);
    }
}

/// Kernels launched with programmatic dependent launch (each may be scheduled while the
/// previous drains, and waits for it in kernel_entry) give what kernels launched in order
/// give: batched passes, launched and replayed as graphs, against each sequence alone
/// without it, for each family, a quantised cache, and the tensor-core decode. Where the
/// device has none (before sm_90), it reports so and checks nothing.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn programmatic_dependent_launch_changes_no_result() {
    require_gpu("programmatic dependent launch");
    let probe = model::load_on(
        &fixture("chatglm2-tiny"),
        LoadFormat::Safetensors,
        Device::Cuda(0),
        DType::F32,
    )
    .unwrap();
    if !probe.set_programmatic_launch(true) {
        report(
            json!({"check": "programmatic_launch", "pass": true, "skipped": "not on this device"}),
        );
        return;
    }
    // Each family, launched and as graphs (two heads a decode block at 129 sequences), and
    // one quantised cache (`probe` keeps the f32 kernels compiled for all of them).
    let configs = [
        ("chatglm2-tiny", 4, false, KvFormat::Model),
        ("chatglm2-tiny", SEQUENCES_FOR_HEAD_GROUPS, true, KvFormat::Model),
        ("internlm2-tiny", SEQUENCES_FOR_HEAD_GROUPS, true, KvFormat::Model),
        ("llama3-tiny", 4, true, KvFormat::Model),
        ("internlm2-tiny", 4, true, KvFormat::Int8),
    ];
    for (folder, copies, cuda_graphs, format) in configs {
        let batched = Batched {
            dtype: DType::F32,
            copies,
            cuda_graphs,
            format,
            limit: 1e-4,
            programmatic_launch: true,
        };
        check_batched_on(&fixture(folder), folder, batched);
    }
    let dir = grouped_chatglm2();
    for cuda_graphs in [false, true] {
        let batched = Batched {
            dtype: DType::BF16,
            copies: 64,
            cuda_graphs,
            format: KvFormat::Model,
            limit: 2e-2,
            programmatic_launch: true,
        };
        check_batched_on(dir.path(), "chatglm2-tiny", batched);
    }
}

/// A single sequence's QKV product with the rotary and K/V write in its epilogue
/// (`gemv_qkv_rope`) gives the bits of the product then `rope_write_kv`: every family's
/// teacher-forced logits (GLM's and rotate-half rotary, biases or none), f32 and bf16,
/// launched and replayed as graphs, equal with the fusion off and on. A fresh model for
/// each, as graphs keep the launches they were captured with.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn the_fused_qkv_rope_product_changes_no_bit() {
    require_gpu("fused QKV product");
    for dtype in [DType::F32, DType::BF16] {
        // Keeps the dtype's kernels compiled across the loads below.
        let _kernels = model::load_on(
            &fixture("chatglm2-tiny"),
            LoadFormat::Safetensors,
            Device::Cuda(0),
            dtype,
        )
        .unwrap();
        for folder in ["chatglm2-tiny", "internlm2-tiny", "llama3-tiny"] {
            let golden = golden(folder, "model_golden.json");
            let case = &golden["cases"][0];
            let (prompt, forced) = (ids(&case["input_ids"]), ids(&case["greedy_16"]));
            for cuda_graphs in [false, true] {
                let run = |fused: bool| {
                    let gpu = model::load_on(
                        &fixture(folder),
                        LoadFormat::Safetensors,
                        Device::Cuda(0),
                        dtype,
                    )
                    .unwrap();
                    gpu.set_cuda_graphs(cuda_graphs);
                    gpu.set_fused_qkv_rope(fused);
                    teacher_forced(gpu.as_ref(), &prompt, &forced)
                };
                let (apart, fused) = (run(false), run(true));
                let same = apart.len() == fused.len()
                    && apart.iter().zip(&fused).all(|(a, f)| {
                        a.len() == f.len()
                            && a.iter().zip(f).all(|(x, y)| x.to_bits() == y.to_bits())
                    });
                report(json!({
                    "check": "fused_qkv_rope", "model": folder, "dtype": dtype.name(),
                    "cuda_graphs": cuda_graphs, "steps": fused.len(), "pass": same,
                }));
                assert!(same, "{folder} {} graphs {cuda_graphs}: logits differ", dtype.name());
            }
        }
    }
}

/// A model that does not fit fails its load with the sizes, not an out-of-memory crash.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn a_model_larger_than_the_gpu_fails_its_load_clearly() {
    require_gpu("oversized model");
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(fixture("internlm2-tiny").join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["hidden_size"] = json!(16384);
    config["intermediate_size"] = json!(65536);
    config["num_hidden_layers"] = json!(200);
    config["num_attention_heads"] = json!(128);
    config["num_key_value_heads"] = json!(8);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let error = model::load_on(dir.path(), LoadFormat::Dummy, Device::Cuda(0), DType::BF16)
        .err()
        .expect("a 700 GB model cannot load");
    let message = error.to_string();
    report(
        json!({"check": "oversized_load", "message": message, "pass": message.contains("free")}),
    );
    assert!(message.contains("GiB free"), "{message}");
}

/// The serving engine reserves the activations of its largest call before it sizes the KV
/// cache: the scratch is sized then (a second reservation and a long call within it leave it
/// as it is), and answers stay the same.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn activations_are_reserved_before_the_kv_cache() {
    require_gpu("reserve activations");
    let dir = fixture("chatglm2-tiny");
    let gpu = model::load_on(&dir, LoadFormat::Safetensors, Device::Cuda(0), DType::F32).unwrap();
    let prompt = ids(&golden("chatglm2-tiny", "model_golden.json")["cases"][0]["input_ids"]);
    let (first, tokens) = greedy(gpu.as_ref(), &prompt, 8);
    let free = || gpu.device_free_memory().unwrap().expect("a device's free memory");
    let before = free();
    let reserved = gpu.reserve_activations(4096, 60, 64).unwrap(); // 60 sequences run as a graph batch of 64
    let reserved_free = free();
    // At least the K/V rows of 4,096 tokens (f32, inside the fused QKV product) and the
    // logits rows of 64 sequences.
    let least = 4096 * gpu.info().kv_width * 4 + 64 * gpu.info().logits_width * 4;
    let again = gpu.reserve_activations(4096, 60, 64).unwrap();
    let (first_after, tokens_after) = greedy(gpu.as_ref(), &prompt, 8);
    // The longest sequence (512 tokens, 32 blocks of 16) in one call: its step tables (cos
    // and sin of every token) fit in what was reserved.
    let long: Vec<u32> = (0..512).map(|i| (i * 7 % 1000) as u32).collect();
    let blocks: Vec<u32> = (0..32).collect();
    let mut arena = gpu.new_arena(16, 32, KvFormat::Model).unwrap();
    gpu.forward_batch(arena.as_mut(), &[SeqStep { ids: &long, start: 0, blocks: &blocks }])
        .unwrap();
    let after_long = gpu.reserve_activations(1, 1, 1).unwrap();
    let pass = reserved >= least
        && again == reserved
        && after_long == reserved
        && tokens_after == tokens
        && first_after == first;
    // The driver's free memory is reported, not checked: its pool grows in chunks.
    report(json!({"check": "reserve_activations", "reserved_mib": reserved >> 20,
        "least_mib": least >> 20, "again_mib": again >> 20, "after_long_mib": after_long >> 20,
        "driver_free_drop_mib": (before as i64 - reserved_free as i64) >> 20, "pass": pass}));
    assert!(reserved >= least, "{reserved} bytes reserved, at least {least} expected");
    assert_eq!(again, reserved, "a second reservation of the same size changed the scratch");
    assert_eq!(after_long, reserved, "a call within the reservation grew the scratch");
    assert_eq!(tokens_after, tokens);
    assert_eq!(first_after, first);
}

/// The batched sampling kernel on the device against `sampling::choose`, over rows
/// as wide as ChatGLM2's vocabulary with the engine's own parameter words; then its time
/// for 64 rows (the logits of a 64-sequence decode step).
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn the_sampling_kernel_chooses_as_the_host_sampler_on_the_device() {
    use rand::{RngExt, SeedableRng};
    use triton_llm::sampling::SampleRow;
    require_gpu("sampling kernel");
    let gpu = probe::DeviceProbe::open(0, DType::F32).unwrap();
    let vocab = 65024;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let settings = [
        (0.0, 50, 0.8, 1.0),
        (0.8, 50, 0.8, 1.0),
        (0.8, 50, 0.8, 1.2),
        (1.0, 0, 0.9, 1.0),
        (0.7, 0, 1.0, 1.0),
        (0.6, 1, 1.0, 1.1),
        (1.2, 200, 0.95, 1.0),
    ];
    let penalized: Vec<u32> = (0..400).map(|i| i * 157).collect();
    let mut logits = Vec::new();
    let mut params = Vec::new();
    for i in 0..64 {
        let coarse = i % 3 == 0; // many ties at the boundaries
        logits.extend((0..vocab).map(|_| {
            let l = rng.random::<f32>() * 16.0 - 8.0;
            if coarse { l.round() } else { l }
        }));
        let (temperature, top_k, top_p, repetition_penalty) = settings[i % settings.len()];
        params.push((temperature, top_k, top_p, repetition_penalty, rng.random::<f32>()));
    }
    let rows: Vec<Option<SampleRow>> = params
        .iter()
        .map(|&(temperature, top_k, top_p, repetition_penalty, uniform)| {
            Some(SampleRow {
                width: vocab - 3,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                penalized: &penalized,
                uniform,
                guard_invalid_scores: true,
                banned: &[],
            })
        })
        .collect();
    let kernel = gpu.sampling(&logits, vocab, &rows).unwrap();
    let got = kernel.choose().unwrap();
    let want: Vec<u32> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut row_logits = logits[i * vocab..(i + 1) * vocab].to_vec();
            triton_llm::sampling::choose(&mut row_logits, row.as_ref().unwrap())
        })
        .collect();
    let differing: Vec<usize> = (0..rows.len()).filter(|&i| got[i] != want[i]).collect();
    // Penalised again at every launch: the timing runs on rows it keeps changing, which
    // costs the same.
    let ms = kernel.time_ms(20).unwrap();
    report(json!({
        "check": "sampling_kernel", "rows": rows.len(), "vocab": vocab,
        "differing_rows": differing, "ms_per_step": ms, "pass": differing.is_empty(),
    }));
    assert!(differing.is_empty(), "rows {differing:?}: device {got:?} host {want:?}");
}

/// A seeded, penalised sampled answer is the same whether the GPU path chooses each token
/// on the device or the host samples its logits (f32: the logits are the same bits).
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn sampling_on_the_device_answers_as_sampling_on_the_host() {
    use triton_llm::pipeline::{ChatModel, GenerationOptions, LoadOptions};
    use triton_llm::sampling::SamplingParams;
    require_gpu("sampling on the device");
    for folder in ["chatglm2-tiny", "internlm2-tiny"] {
        let answer = |sample_on_device: bool, sampling: SamplingParams| {
            let options = LoadOptions {
                device: Device::Cuda(0),
                dtype: DType::F32,
                sample_on_device,
                ..Default::default()
            };
            let chat = ChatModel::load(&fixture(folder), &options).unwrap();
            let generation =
                GenerationOptions { sampling, max_new_tokens: Some(48), ..Default::default() };
            triton_llm::serving::generate(
                &chat,
                triton_llm::pipeline::Prompt::raw(vec![5, 17, 300, 42, 7]),
                &generation,
                |_| true,
            )
            .unwrap()
            .output_ids
        };
        let sampled = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.15,
            seed: Some(3),
        };
        for sampling in [SamplingParams::greedy(), sampled] {
            let (device, host) = (answer(true, sampling.clone()), answer(false, sampling.clone()));
            report(json!({
                "check": "sampling_on_device", "model": folder, "greedy": sampling.is_greedy(),
                "tokens": device.len(), "pass": device == host,
            }));
            assert_eq!(device, host, "{folder} {sampling:?}");
        }
    }
}

/// Two engines on one device (two KIND_GPU instances, or two models) size their KV caches
/// one after the other, each from the memory the other left: the second takes its fraction
/// of what is free after the first, and together they never take more than was free.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn engines_sharing_a_device_size_their_caches_from_what_is_left() {
    use std::sync::Arc;
    use triton_llm::pipeline::{ChatModel, LoadOptions};
    use triton_llm::serving::{NoMetrics, SchedulerConfig, ServingEngine};
    require_gpu("two engines on one device");
    let options = LoadOptions { device: Device::Cuda(0), dtype: DType::F32, ..Default::default() };
    let chat = Arc::new(ChatModel::load(&fixture("chatglm2-tiny"), &options).unwrap());
    let free = || chat.model.device_free_memory().unwrap().unwrap() as f64;
    // Many seats, so that the fraction binds and not the cap of what they could use.
    let config = SchedulerConfig {
        cache_max_entry_count: 0.25,
        max_num_seqs: 1 << 14,
        ..SchedulerConfig::default()
    };
    let before = free();
    let first =
        ServingEngine::start(Arc::clone(&chat), config, "first", Box::new(NoMetrics)).unwrap();
    let between = free();
    let second =
        ServingEngine::start(Arc::clone(&chat), config, "second", Box::new(NoMetrics)).unwrap();
    let after = free();
    let (took_first, took_second) = ((before - between) / before, (between - after) / between);
    let pass = (0.2..0.3).contains(&took_first) && (0.2..0.3).contains(&took_second);
    report(json!({
        "check": "two_engines_share_a_device", "free_gib_before": before / 1073741824.0,
        "first_took_of_free": took_first, "second_took_of_free": took_second,
        "pass": pass,
    }));
    // Each took about its quarter (activations and the pool's rounding aside) of what was
    // free when it started, so the second's cache is smaller: nothing taken twice.
    assert!(pass, "first took {took_first:.3} of the free memory, the second {took_second:.3}");
    assert!(after > 0.5 * before);
    drop((first, second));
}

/// Set in the child process of `a_sticky_cuda_error_stops_the_engine_for_good`.
#[cfg(feature = "fault-injection")]
const STICKY_CHILD: &str = "TRITON_LLM_STICKY_CHILD";

/// A sticky CUDA error (an illegal address: the embedding kernel reading through a null
/// table) stops the serving engine for good: its next pass fails with `DeviceLost`, that
/// request gets an error and every later one UNAVAILABLE at once. The error poisons the
/// process's CUDA context for every later test, so it happens in a child process. Built
/// with the `fault-injection` feature, which makes the fault (scripts/test.sh and the GPU
/// pack build the tests with it).
#[cfg(feature = "fault-injection")]
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/gpu/check.sh runs it)"]
fn a_sticky_cuda_error_stops_the_engine_for_good() {
    require_gpu("sticky CUDA error");
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args(["--exact", "sticky_cuda_error_in_this_process", "--include-ignored", "--nocapture"])
        .env(STICKY_CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let pass = output.status.success() && text.contains("1 passed");
    report(json!({"check": "sticky_cuda_error_stops_the_engine", "pass": pass}));
    assert!(pass, "{text}");
}

/// The child of `a_sticky_cuda_error_stops_the_engine_for_good`. Run any other way it fails
/// at once rather than poison the CUDA context of the tests after it (the device scripts
/// pass `--skip sticky_cuda_error_in_this_process` with `--include-ignored`).
#[cfg(feature = "fault-injection")]
#[test]
#[ignore = "runs in a child process of a_sticky_cuda_error_stops_the_engine_for_good"]
fn sticky_cuda_error_in_this_process() {
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};
    use triton_llm::Error;
    use triton_llm::pipeline::{ChatModel, ChatTurn, Completion, GenerationOptions, LoadOptions};
    use triton_llm::serving::{AnswerSink, ChatJob, NoMetrics, SchedulerConfig, ServingEngine};

    assert!(
        std::env::var_os(STICKY_CHILD).is_some(),
        "runs only as the child of a_sticky_cuda_error_stops_the_engine_for_good"
    );
    struct Reply(mpsc::Sender<triton_llm::Result<Completion>>);
    impl AnswerSink for Reply {
        fn on_text(&mut self, _: &str, _: usize) -> bool {
            true
        }
        fn is_cancelled(&mut self) -> bool {
            false
        }
        fn finish(self: Box<Self>, result: triton_llm::Result<Completion>) {
            let _ = self.0.send(result);
        }
    }
    let options = LoadOptions { device: Device::Cuda(0), dtype: DType::F32, ..Default::default() };
    let chat = Arc::new(ChatModel::load(&fixture("chatglm2-tiny"), &options).unwrap());
    let config = SchedulerConfig { cache_max_entry_count: 64.0, ..SchedulerConfig::default() };
    let engine =
        ServingEngine::start(Arc::clone(&chat), config, "sticky", Box::new(NoMetrics)).unwrap();
    let ask = || {
        let turn =
            ChatTurn {
                query: "你好".into(), history: vec![], history_len: 0, system_prompt: None
            };
        let (answers, answer) = mpsc::channel();
        engine.submit(ChatJob {
            prompt: chat.prepare_chat(&turn).unwrap(),
            options: GenerationOptions { max_new_tokens: Some(4), ..Default::default() },
            sink: Box::new(Reply(answers)),
            arrived: Instant::now(),
            fault: None,
        });
        answer.recv_timeout(Duration::from_secs(60)).expect("an answer")
    };
    assert!(ask().is_ok());
    let poisoned = probe::DeviceProbe::open(0, DType::F32).unwrap().lose_device();
    assert!(matches!(poisoned, Err(Error::DeviceLost(_))), "{poisoned:?}");
    let failed = ask().unwrap_err();
    assert!(failed.to_string().contains("the engine failed"), "{failed}");
    let later = ask().unwrap_err();
    assert!(matches!(later, Error::Unavailable(_)), "{later}");
    assert!(engine.failure().is_some());
}
