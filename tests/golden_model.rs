//! The CPU path against the goldens recorded from the original HF remote code:
//! last-position logits (1e-4 relative L2, and per-logit), greedy tokens through the KV
//! cache, and the top-5 logits of every cached decode step (which covers InternLM2's
//! dynamic-NTK steps, where the cached and recomputed paths differ).

mod common;

use common::*;
use triton_llm::dtype::KvFormat;
use triton_llm::model::{self, CausalLm, LoadFormat, SeqStep};
use triton_llm::sequence::kv_space::KvCache;

fn check_family(folder: &str) {
    let model = model::load(&fixture(folder), LoadFormat::Safetensors).unwrap();
    let golden = golden(folder, "model_golden.json");
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = ids(&case["input_ids"]);
        let expected = floats(&case["last_logits"]);

        let mut cache = KvCache::new(model.as_ref()).unwrap();
        let logits = cache.forward(model.as_ref(), &input).unwrap();
        let rel = relative_l2(&logits, &expected);
        let max = max_abs_diff(&logits, &expected);
        assert!(rel < 1e-4 && max < 1e-4, "{folder}/{name}: relative L2 {rel:e}, max |Δ| {max:e}");
        assert_eq!(
            argmax(&logits),
            case["last_argmax"].as_u64().unwrap() as u32,
            "{folder}/{name}"
        );

        // Greedy decoding one token at a time through the cache.
        let steps = case["greedy_16_steps_top5"].as_array().unwrap();
        let mut logits = logits;
        let mut tokens = Vec::new();
        for (step, top5) in steps.iter().enumerate() {
            let top_ids = ids(top5.get("top5_ids").or(top5.get("ids")).unwrap());
            let top_logits = floats(top5.get("top5_logits").or(top5.get("logits")).unwrap());
            for (id, want) in top_ids.iter().zip(&top_logits) {
                let got = logits[*id as usize];
                assert!(
                    (got - want).abs() < 1e-4,
                    "{folder}/{name} step {step} id {id}: {got} vs {want}"
                );
            }
            let next = argmax(&logits);
            tokens.push(next);
            if step + 1 < steps.len() {
                logits = cache.forward(model.as_ref(), &[next]).unwrap();
            }
        }
        assert_eq!(tokens, ids(&case["greedy_16"]), "{folder}/{name} greedy tokens");
    }
}

#[test]
fn chatglm2_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("chatglm2-tiny");
}

/// The same model as PyTorch `.bin` shards (a layer split across them): the same goldens.
#[test]
fn chatglm2_tiny_bin_matches_original_logits_and_greedy_tokens() {
    check_family("chatglm2-tiny-bin");
}

#[test]
fn internlm2_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("internlm2-tiny");
}

#[test]
fn vicuna_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("vicuna-tiny");
}

/// GQA and Llama-3.1's `llama3` rope scaling.
#[test]
fn llama3_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("llama3-tiny");
}

// AWQ W4A16 checkpoints of the same models, computed with the 4-bit weights kept packed;
// the goldens are the original code in f32 on the dequantised weights.
#[test]
fn chatglm2_tiny_awq_matches_original_logits_and_greedy_tokens() {
    check_family("chatglm2-tiny-awq");
}

#[test]
fn internlm2_tiny_awq_matches_original_logits_and_greedy_tokens() {
    check_family("internlm2-tiny-awq");
}

/// Several sequences in one batched pass (prefills of different lengths, then decode steps
/// of all of them together, then a prefill joining running decodes) give each sequence
/// exactly the logits it gets alone.
fn check_batched(folder: &str) {
    let model = model::load(&fixture(folder), LoadFormat::Safetensors).unwrap();
    let golden = golden(folder, "model_golden.json");
    let prompts: Vec<Vec<u32>> =
        golden["cases"].as_array().unwrap().iter().map(|c| ids(&c["input_ids"])).collect();
    assert!(prompts.len() >= 2);

    // Alone: prompt, then 6 greedy steps; the logits of every step.
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|prompt| {
            let mut cache = KvCache::new(model.as_ref()).unwrap();
            let mut logits = vec![cache.forward(model.as_ref(), prompt).unwrap()];
            for _ in 0..6 {
                let next = argmax(logits.last().unwrap());
                logits.push(cache.forward(model.as_ref(), &[next]).unwrap());
            }
            logits
        })
        .collect();

    // Together in one arena, each sequence on its own blocks (interleaved, block size 4):
    // the first sequence starts alone and decodes while the others prefill.
    let block_size = 4;
    let per_sequence = 64;
    let mut arena =
        model.new_arena(block_size, per_sequence * prompts.len(), KvFormat::Model).unwrap();
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|i| (0..per_sequence).map(|b| (b * prompts.len() + i) as u32).collect())
        .collect();
    let mut lengths = vec![0usize; prompts.len()];
    let mut produced: Vec<Vec<Vec<f32>>> = prompts.iter().map(|_| Vec::new()).collect();
    for round in 0..8 {
        let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            if produced[i].is_empty() && (i == 0 || round >= 1) {
                inputs.push((i, prompt.clone()));
            } else if !produced[i].is_empty() && produced[i].len() < 7 {
                inputs.push((i, vec![argmax(produced[i].last().unwrap())]));
            }
        }
        if inputs.is_empty() {
            break;
        }
        let steps: Vec<SeqStep> = inputs
            .iter()
            .map(|(i, ids)| SeqStep { ids, start: lengths[*i], blocks: &tables[*i] })
            .collect();
        let logits = model.forward_batch(arena.as_mut(), &steps).unwrap();
        for ((i, ids), row) in inputs.iter().zip(logits) {
            lengths[*i] += ids.len();
            produced[*i].push(row);
        }
    }
    for (i, (batched, single)) in produced.iter().zip(&alone).enumerate() {
        assert_eq!(batched.len(), single.len(), "{folder}: sequence {i}");
        for (step, (b, s)) in batched.iter().zip(single).enumerate() {
            // Bit for bit: a sequence's answer must not depend on who shares its batch.
            assert!(
                b == s,
                "{folder}: sequence {i} step {step}: relative L2 {:e}",
                relative_l2(b, s)
            );
        }
    }
}

#[test]
fn chatglm2_tiny_batched_forward_equals_one_at_a_time() {
    check_batched("chatglm2-tiny");
}

#[test]
fn internlm2_tiny_batched_forward_equals_one_at_a_time() {
    check_batched("internlm2-tiny");
}

#[test]
fn llama3_tiny_batched_forward_equals_one_at_a_time() {
    check_batched("llama3-tiny");
}

/// Logits of the prompt and then of each `forced` token after it, through an arena that
/// stores K/V as `format`.
fn logits_through(
    model: &dyn CausalLm,
    format: KvFormat,
    prompt: &[u32],
    forced: &[u32],
) -> Vec<Vec<f32>> {
    let block_size = 16;
    let blocks: Vec<u32> = (0..(prompt.len() + forced.len()).div_ceil(block_size) as u32).collect();
    let mut arena = model.new_arena(block_size, blocks.len(), format).unwrap();
    let step = |ids: &[u32], start: usize, arena: &mut dyn triton_llm::model::KvStore| {
        let steps = [SeqStep { ids, start, blocks: &blocks }];
        model.forward_batch(arena, &steps).unwrap().remove(0)
    };
    let mut all = vec![step(prompt, 0, arena.as_mut())];
    for (i, &token) in forced.iter().enumerate() {
        all.push(step(&[token], prompt.len() + i, arena.as_mut()));
    }
    all
}

/// An int8, int4 or fp8 KV cache (`quant_policy` 8, 4, `kv_cache_dtype` fp8) moves the logits of the tiny fixtures by
/// little against the f32 cache, teacher-forced along the goldens' greedy tokens; the
/// distances are printed (BENCHMARKS.md, "KV cache formats") and bounded here.
fn check_quantised_kv(folder: &str) {
    let model = model::load(&fixture(folder), LoadFormat::Safetensors).unwrap();
    let golden = golden(folder, "model_golden.json");
    for (format, bound) in [(KvFormat::Int8, 0.01), (KvFormat::Int4, 0.15), (KvFormat::Fp8, 0.05)] {
        let (mut worst_rel, mut worst_abs, mut same_argmax, mut steps) = (0f64, 0f32, 0, 0);
        for case in golden["cases"].as_array().unwrap() {
            let prompt = ids(&case["input_ids"]);
            let forced = ids(&case["greedy_16"]);
            let full = logits_through(model.as_ref(), KvFormat::Model, &prompt, &forced);
            let quantised = logits_through(model.as_ref(), format, &prompt, &forced);
            for (f, q) in full.iter().zip(&quantised) {
                worst_rel = worst_rel.max(relative_l2(q, f));
                worst_abs = worst_abs.max(max_abs_diff(q, f));
                same_argmax += usize::from(argmax(q) == argmax(f));
                steps += 1;
            }
        }
        eprintln!(
            "KV {format:?} on {folder}: logits relative L2 ≤ {worst_rel:.2e}, max |Δ| \
             {worst_abs:.2e}, same argmax at {same_argmax}/{steps} steps"
        );
        assert!(worst_rel < bound, "{folder} {format:?}: relative L2 {worst_rel:e}");
        assert!(worst_rel > 0.0, "{folder} {format:?}: the cache was not quantised");
    }
}

#[test]
fn chatglm2_tiny_logits_move_little_under_a_quantised_kv_cache() {
    check_quantised_kv("chatglm2-tiny");
}

#[test]
fn internlm2_tiny_logits_move_little_under_a_quantised_kv_cache() {
    check_quantised_kv("internlm2-tiny");
}

#[test]
fn awq_batched_forward_equals_one_at_a_time() {
    check_batched("chatglm2-tiny-awq");
    check_batched("internlm2-tiny-awq");
}

/// Llama-3.1's `llama3` rope scaling gives transformers' inverse frequencies, bit for bit.
#[test]
fn llama3_rope_scaling_matches_the_original_tables() {
    use triton_llm::model::rope::{RopeScalingConfig, Scaling};
    let golden = golden("llama3-tiny", "model_golden.json");
    let config: RopeScalingConfig = serde_json::from_value(golden["rope_scaling"].clone()).unwrap();
    let scaling = Scaling::parse(Some(&config), "Llama", &["llama3"]).unwrap();
    let theta = golden["rope_theta"].as_f64().unwrap() as f32;
    let head_dim = golden["head_dim"].as_u64().unwrap() as usize;
    let unscaled = Scaling::None.inv_freq(theta, head_dim, 512, 1);
    assert_eq!(unscaled, floats(&golden["rope_inv_freq_unscaled"]));
    for total_len in [1, 512, 4096] {
        assert_eq!(
            scaling.inv_freq(theta, head_dim, 512, total_len),
            floats(&golden["rope_inv_freq"])
        );
    }
}
