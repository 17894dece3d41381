//! A bad model folder or an impossible request gives a clear error naming the problem.

mod common;

use common::*;
use triton_llm::model::{self, LoadFormat};
use triton_llm::pipeline::{ChatModel, ChatTurn, GenerationOptions, LoadOptions};
use triton_llm::sampling::SamplingParams;
use triton_llm::sequence::kv_space::KvCache;

fn load_error(dir: &std::path::Path) -> String {
    match ChatModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} should mention {part:?}");
    }
}

#[test]
fn missing_folder() {
    let msg = load_error(std::path::Path::new("/nonexistent/model/folder"));
    assert_mentions(&msg, &["/nonexistent/model/folder", "does not exist"]);
}

#[test]
fn unknown_family_names_the_type() {
    let dir = copy_fixture("internlm2-tiny");
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), config.replace("\"internlm2\"", "\"gpt2\""))
        .unwrap();
    assert_mentions(&load_error(dir.path()), &["model_type", "\"gpt2\"", "not supported", "llama"]);
}

#[test]
fn config_missing_a_key_names_it() {
    let dir = copy_fixture("chatglm2-tiny");
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"kv_channels\"", "\"kv_channelz\""),
    )
    .unwrap();
    assert_mentions(&load_error(dir.path()), &["kv_channels"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("chatglm2-tiny");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors", "truncated"]);
    std::fs::write(&path, &bytes[..4]).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors", "too short"]);
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_fixture("internlm2-tiny");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(&load_error(dir.path()), &["model.safetensors", "not valid JSON"]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("internlm2-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    tensors.retain(|t| t.0 != "model.layers.1.feed_forward.w3.weight");
    write_safetensors(&path, &tensors);
    assert_mentions(
        &load_error(dir.path()),
        &["missing tensor model.layers.1.feed_forward.w3.weight"],
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let dir = copy_fixture("chatglm2-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    let qkv = tensors
        .iter_mut()
        .find(|t| t.0.ends_with("0.self_attention.query_key_value.weight"))
        .unwrap();
    qkv.2 = vec![64, 128];
    write_safetensors(&path, &tensors);
    assert_mentions(
        &load_error(dir.path()),
        &[
            "transformer.encoder.layers.0.self_attention.query_key_value.weight",
            "[64, 128]",
            "[128, 64]",
        ],
    );
}

#[test]
fn unknown_extra_tensor_is_named() {
    let dir = copy_fixture("chatglm2-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = read_safetensors(&path);
    tensors.push((
        "transformer.prefix_encoder.embedding.weight".into(),
        "F32".into(),
        vec![2],
        vec![0; 8],
    ));
    write_safetensors(&path, &tensors);
    assert_mentions(
        &load_error(dir.path()),
        &["unexpected tensor transformer.prefix_encoder.embedding.weight"],
    );
}

#[test]
fn no_weights_at_all() {
    let dir = copy_fixture("chatglm2-tiny");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["no checkpoint", "model.safetensors", "pytorch_model.bin.index.json"],
    );
    // …but the dummy load format serves the folder at its real shapes.
    let model = model::load(dir.path(), LoadFormat::Dummy).unwrap();
    let mut cache = KvCache::new(model.as_ref()).unwrap();
    assert_eq!(cache.forward(model.as_ref(), &[1001, 1003, 5]).unwrap().len(), 1024);
}

#[test]
fn corrupt_tokenizer_model() {
    let dir = copy_fixture("chatglm2-tiny");
    std::fs::write(dir.path().join("tokenizer.model"), b"\xff\xfe this is not a protobuf \x00\x01")
        .unwrap();
    assert_mentions(&load_error(dir.path()), &["tokenizer"]);
    std::fs::remove_file(dir.path().join("tokenizer.model")).unwrap();
    assert_mentions(&load_error(dir.path()), &["tokenizer.model"]);
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = copy_fixture("internlm2-tiny");
    let path = dir.path().join("model.safetensors");
    let tensors = read_safetensors(&path);
    std::fs::remove_file(&path).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|t| (t.0.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = model::load(dir.path(), LoadFormat::Safetensors).unwrap();
    let single = model::load(&fixture("internlm2-tiny"), LoadFormat::Safetensors).unwrap();
    let ids = [1, 320, 400, 500];
    assert_eq!(
        KvCache::new(sharded.as_ref()).unwrap().forward(sharded.as_ref(), &ids).unwrap(),
        KvCache::new(single.as_ref()).unwrap().forward(single.as_ref(), &ids).unwrap()
    );
}

#[test]
fn half_precision_checkpoints_load() {
    use half::{bf16, f16};
    for (tag, convert) in [
        ("BF16", (|x: f32| bf16::from_f32(x).to_le_bytes()) as fn(f32) -> [u8; 2]),
        ("F16", |x: f32| f16::from_f32(x).to_le_bytes()),
    ] {
        let dir = copy_fixture("chatglm2-tiny");
        let path = dir.path().join("model.safetensors");
        let tensors: Vec<RawTensor> = read_safetensors(&path)
            .into_iter()
            .map(|(name, _, shape, data)| {
                let halves = data
                    .chunks_exact(4)
                    .flat_map(|b| convert(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect();
                (name, tag.to_string(), shape, halves)
            })
            .collect();
        write_safetensors(&path, &tensors);
        let half_model = model::load(dir.path(), LoadFormat::Safetensors).unwrap();
        let full = model::load(&fixture("chatglm2-tiny"), LoadFormat::Safetensors).unwrap();
        let ids = [1001, 1003, 676, 330];
        let a =
            KvCache::new(half_model.as_ref()).unwrap().forward(half_model.as_ref(), &ids).unwrap();
        let b = KvCache::new(full.as_ref()).unwrap().forward(full.as_ref(), &ids).unwrap();
        let rel = relative_l2(&a, &b);
        assert!(rel < 2e-2, "{tag}: relative L2 {rel}");
    }
}

fn greedy(max_token: Option<usize>) -> GenerationOptions {
    GenerationOptions { sampling: SamplingParams::greedy(), max_token, ..Default::default() }
}

#[test]
fn prompt_over_the_context_is_refused() {
    let chat = ChatModel::load(&fixture("chatglm2-tiny"), &LoadOptions::default()).unwrap();
    let turn = ChatTurn {
        query: "hello world ".repeat(300),
        history: vec![],
        history_len: 10,
        system_prompt: None,
    };
    let msg = common::chat(&chat, &turn, &greedy(Some(100_000)), |_| true).unwrap_err().to_string();
    assert_mentions(&msg, &["prompt", "context of 512 tokens"]);
}

#[test]
fn max_token_below_the_prompt_is_refused() {
    let chat = ChatModel::load(&fixture("chatglm2-tiny"), &LoadOptions::default()).unwrap();
    let turn =
        ChatTurn { query: "你好".into(), history: vec![], history_len: 10, system_prompt: None };
    let msg = common::chat(&chat, &turn, &greedy(Some(10)), |_| true).unwrap_err().to_string();
    assert_mentions(&msg, &["max_token", "10", "16 tokens"]);
}

#[test]
fn empty_prompt_is_refused() {
    let chat = ChatModel::load(&fixture("internlm2-tiny"), &LoadOptions::default()).unwrap();
    let turn =
        ChatTurn { query: String::new(), history: vec![], history_len: 10, system_prompt: None };
    let msg = common::chat(&chat, &turn, &greedy(None), |_| true).unwrap_err().to_string();
    assert_mentions(&msg, &["prompt", "empty"]);
}
