//! The CPU engine against the goldens recorded from the original HF remote code:
//! last-position logits (1e-4 relative L2, and per-logit), greedy tokens through the KV
//! cache, and the top-5 logits of every cached decode step (which covers InternLM2's
//! dynamic-NTK steps, where the cached and recomputed paths differ).

mod common;

use common::*;
use triton_llm::model::{self, LoadFormat};

fn check_family(folder: &str) {
    let model = model::load(&fixture(folder), LoadFormat::Safetensors).unwrap();
    let golden = golden(folder, "model_golden.json");
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = ids(&case["input_ids"]);
        let expected = floats(&case["last_logits"]);

        let mut cache = model.new_cache();
        let logits = model.forward(&input, &mut cache).unwrap();
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
                logits = model.forward(&[next], &mut cache).unwrap();
            }
        }
        assert_eq!(tokens, ids(&case["greedy_16"]), "{folder}/{name} greedy tokens");
    }
}

#[test]
fn chatglm2_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("chatglm2-tiny");
}

#[test]
fn internlm2_tiny_matches_original_logits_and_greedy_tokens() {
    check_family("internlm2-tiny");
}
