//! The `triton-llm` command line on the fixtures: one JSON object per command, errors on
//! stderr with a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::*;

fn triton_llm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_triton-llm")).args(args).output().unwrap()
}

fn json_of(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(stdout.trim_end().lines().count(), 1, "one JSON object on one line: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

fn dir(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

fn csv(v: &[u32]) -> String {
    v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn tokenize_with_and_without_specials() {
    let golden = golden("chatglm2-tiny", "tokenizer_golden.json");
    let case =
        golden["encode_cases"].as_array().unwrap().iter().find(|c| c["text"] == "你好").unwrap();
    let out = json_of(&triton_llm(&["tokenize", "--model", &dir("chatglm2-tiny"), "你好"]));
    assert_eq!(out["ids"], case["ids"]);
    let out = json_of(&triton_llm(&[
        "tokenize",
        "--model",
        &dir("chatglm2-tiny"),
        "--no-special",
        "你好",
    ]));
    assert_eq!(out["ids"], case["ids_no_special"]);
}

/// `-` reads the text from stdin, where a text may hold what an argument cannot (NUL).
#[test]
fn tokenize_reads_stdin() {
    use std::io::Write;
    let model = dir("internlm2-tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_triton-llm"))
        .args(["tokenize", "--model", &model, "--no-special", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all("a\0b 你好".as_bytes()).unwrap();
    let out = json_of(&child.wait_with_output().unwrap());
    let tokenizer = triton_llm::tokenizer::Tokenizer::from_folder(
        &fixture("internlm2-tiny"),
        triton_llm::model::Family::InternLm2,
    )
    .unwrap();
    assert_eq!(out["ids"], serde_json::json!(tokenizer.encode("a\0b 你好", false).unwrap()));
    assert!(out["ids"].as_array().unwrap().len() > 3);
}

#[test]
fn tokenize_reads_no_weights_and_applies_the_chat_template() {
    for folder in ["chatglm2-tiny", "internlm2-tiny"] {
        let golden = golden(folder, "chat_golden.json");
        let case = golden["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["history_in"] == serde_json::json!([])
                    && c["meta_instruction_is_default"] != false
            })
            .unwrap();
        let expected = ids(&case["prompt_ids"]);
        let query = case["query"].as_str().unwrap();
        let folder_copy = copy_fixture(folder);
        std::fs::remove_file(folder_copy.path().join("model.safetensors")).unwrap();
        let model = folder_copy.path().to_str().unwrap();
        let out = json_of(&triton_llm(&["tokenize", "--model", model, "--chat", query]));
        assert_eq!(ids(&out["ids"]), expected, "{folder}");
        let out =
            json_of(&triton_llm(&["tokenize", "--model", model, "--chat", "--system", "", query]));
        let ids = ids(&out["ids"]);
        match folder {
            "chatglm2-tiny" => assert_eq!(ids, expected, "ChatGLM2 has no system prompt"),
            _ => assert!(ids.len() < expected.len(), "no system block: {ids:?}"),
        }
    }
}

#[test]
fn logits_match_the_golden() {
    for folder in ["chatglm2-tiny", "chatglm2-tiny-bin", "internlm2-tiny"] {
        let golden = golden(folder, "model_golden.json");
        let case = &golden["cases"][0];
        let out = json_of(&triton_llm(&[
            "logits",
            "--model",
            &dir(folder),
            "--ids",
            &csv(&ids(&case["input_ids"])),
        ]));
        let logits = floats(&out["logits"]);
        assert_eq!(logits.len(), 1024);
        assert!(relative_l2(&logits, &floats(&case["last_logits"])) < 1e-4, "{folder}");
    }
}

#[test]
fn generate_chat_turn_matches_the_original_chat() {
    let golden = golden("chatglm2-tiny", "chat_golden.json");
    let case = &golden["cases"][1];
    let history = serde_json::to_string(&case["history_in"]).unwrap();
    let max_length = case["max_length"].to_string();
    let out = json_of(&triton_llm(&[
        "generate",
        "--model",
        &dir("chatglm2-tiny"),
        "--prompt",
        case["query"].as_str().unwrap(),
        "--history",
        &history,
        "--max-token",
        &max_length,
        "--temperature",
        "0",
    ]));
    assert_eq!(out["response"], case["response"]);
    assert_eq!(out["history"], case["history_out"]);
    assert_eq!(out["output_ids"], case["generated_ids"]);
    assert_eq!(out["prompt_tokens"], case["prompt_ids"].as_array().unwrap().len());
    assert_eq!(out["generated_tokens"], case["generated_ids"].as_array().unwrap().len());
    assert_eq!(out["finish_reason"], "stop");
}

#[test]
fn generate_with_system_prompt_and_raw_ids() {
    let chat_golden = golden("internlm2-tiny", "chat_golden.json");
    let case = &chat_golden["cases"][2];
    let history = serde_json::to_string(&case["history_in"]).unwrap();
    let out = json_of(&triton_llm(&[
        "generate",
        "--model",
        &dir("internlm2-tiny"),
        "--prompt",
        case["query"].as_str().unwrap(),
        "--history",
        &history,
        "--system",
        case["meta_instruction"].as_str().unwrap(),
        "--max-new-tokens",
        "32",
        "--temperature",
        "0",
    ]));
    assert_eq!(out["response"], case["response"]);
    assert_eq!(out["finish_reason"], "length");

    // --ids continues raw ids: the golden's greedy tokens, with the stop token ignored.
    let model_golden = golden("internlm2-tiny", "model_golden.json");
    let mcase = &model_golden["cases"][2];
    let out = json_of(&triton_llm(&[
        "generate",
        "--model",
        &dir("internlm2-tiny"),
        "--ids",
        &csv(&ids(&mcase["input_ids"])),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
    ]));
    assert_eq!(out["output_ids"], mcase["greedy_16"]);
    assert_eq!(out["history"], serde_json::json!([]));
}

#[test]
fn seeded_generate_is_reproducible() {
    let run = |seed: &str| {
        json_of(&triton_llm(&[
            "generate",
            "--model",
            &dir("chatglm2-tiny"),
            "--prompt",
            "hello",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--temperature",
            "1.0",
            "--top-k",
            "0",
        ]))["output_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn errors_go_to_stderr_with_a_failing_exit() {
    let out = triton_llm(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/model") && stderr.contains("does not exist"), "{stderr}");

    let out = triton_llm(&[
        "generate",
        "--model",
        &dir("chatglm2-tiny"),
        "--prompt",
        "hi",
        "--max-token",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_token"));

    let out = triton_llm(&[
        "generate",
        "--model",
        &dir("chatglm2-tiny"),
        "--prompt",
        "hi",
        "--top-p",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));

    // The KV cache's format is given once: LMDeploy's spelling or vLLM's.
    let model = dir("chatglm2-tiny");
    let both = ["generate", "--model", &model, "--prompt", "hi", "--quant-policy", "8"];
    let out = triton_llm(&[&both[..], &["--kv-cache-dtype", "fp8"]].concat());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kv-cache-dtype") && stderr.contains("--quant-policy"), "{stderr}");
    let out =
        triton_llm(&["generate", "--model", &model, "--prompt", "hi", "--kv-cache-dtype", "e5m2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("kv_cache_dtype \"e5m2\""));
}

#[test]
fn interactive_chat_streams_keeps_history_and_clears() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_triton-llm"))
        .args([
            "chat",
            "--model",
            &dir("chatglm2-tiny"),
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all("你好\nhello\nclear\nexit\n".as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("Assistant: ").count(), 2, "{text}");
    assert!(text.contains("(history cleared)"), "{text}");
}

#[test]
fn bench_runs_on_each_tiny_model() {
    for model in ["chatglm2-tiny", "internlm2-tiny", "vicuna-tiny", "llama3-tiny"] {
        let args =
            ["bench", "--model", &dir(model), "--batch", "3", "--prompt", "12", "--new", "5"];
        let out = json_of(&triton_llm(&args));
        assert_eq!(out["batch"], 3, "{model}");
        assert_eq!(out["sample_on_device"], false, "{model}");
        assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{model}: {out}");
        assert!(out["decode_percent_of_limit"].as_f64().unwrap() > 0.0, "{model}: {out}");
        assert_eq!(out["runs"], 1, "{model}");
    }
}

/// `--runs`: the figures are the medians of the runs, the decode step's spread beside them.
#[test]
fn bench_reports_the_median_of_its_runs_and_their_spread() {
    let args = ["bench", "--model", &dir("chatglm2-tiny"), "--batch", "2", "--prompt", "8"];
    let out = json_of(&triton_llm(&[&args[..], &["--new", "6", "--runs", "5"]].concat()));
    assert_eq!(out["runs"], 5);
    let step = |key: &str| out[key].as_f64().unwrap();
    let (min, median, max) =
        (step("decode_step_ms_min"), step("decode_step_ms"), step("decode_step_ms_max"));
    assert!(0.0 < min && min <= median && median <= max, "{out}");
    let rate = step("decode_tokens_per_s");
    assert!((rate - 2.0 / (median / 1e3)).abs() < 1e-6 * rate, "{out}");
    let refused = triton_llm(&[&args[..], &["--runs", "0"]].concat());
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--runs must be at least 1"), "{stderr}");
}

/// `triton-llm chat` on a Vicuna folder chats as `fastchat.serve.cli`: FastChat's template
/// and clean-up, the answer streamed; `clear` starts over.
#[test]
fn vicuna_chat_streams_fastchats_answers() {
    use std::io::Write;
    let golden = golden("vicuna-tiny", "chat_golden.json");
    let cases = golden["cases"].as_array().unwrap();
    let (first, fresh) = (&cases[0], &cases[2]);
    assert!(first["history"].as_array().unwrap().is_empty());
    assert!(fresh["history"].as_array().unwrap().is_empty());
    let mut child = Command::new(env!("CARGO_BIN_EXE_triton-llm"))
        .args([
            "chat",
            "--model",
            &dir("vicuna-tiny"),
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!(
        "{}\nclear\n{}\nexit\n",
        first["query"].as_str().unwrap(),
        fresh["query"].as_str().unwrap()
    );
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chat format vicuna_v1.1"), "{text}");
    let answers: Vec<&str> = text
        .split("Assistant: ")
        .skip(1)
        .map(|a| a.split("\n\nUser: ").next().unwrap().split("\n(history").next().unwrap())
        .map(|a| a.trim_end_matches('\n'))
        .collect();
    assert_eq!(
        answers,
        [
            first["response_stripped"].as_str().unwrap(),
            fresh["response_stripped"].as_str().unwrap()
        ],
        "{text}"
    );
}

#[test]
fn generate_llama_turns_match_the_goldens() {
    let pairs = |v: &serde_json::Value| v.to_string();
    // Vicuna with history (vicuna_v1.1), and llama-2 with a system message by --chat-format.
    let vicuna = golden("vicuna-tiny", "chat_golden.json");
    // FastChat's CLI never sends an empty query (tests/golden_chat.rs checks its prompt).
    let sent = vicuna["cases"].as_array().unwrap().iter().filter(|c| c["query"] != "");
    for case in sent {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            dir("vicuna-tiny"),
            "--prompt".into(),
            case["query"].as_str().unwrap().into(),
            "--history".into(),
            pairs(&case["history"]),
            "--temperature".into(),
            "0".into(),
            "--max-new-tokens".into(),
            "24".into(),
            "--chat-format".into(),
            case["template"].as_str().unwrap().into(),
        ];
        if !case["system_message_is_default"].as_bool().unwrap() {
            args.extend(["--system".into(), case["system_message"].as_str().unwrap_or("").into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = json_of(&triton_llm(&args));
        assert_eq!(out["output_ids"], case["output_ids"], "{}", case["query"]);
        assert_eq!(out["response"], case["response_stripped"], "{}", case["query"]);
        assert_eq!(out["prompt_tokens"], case["prompt_len"], "{}", case["query"]);
    }
    // Llama-3 with a system message and history, through its own template.
    let llama3 = golden("llama3-tiny", "chat_golden.json");
    let case = &llama3["cases"][2];
    let messages = case["messages"].as_array().unwrap();
    let text = |i: usize| messages[i]["content"].as_str().unwrap().to_string();
    let history = serde_json::json!([[text(1), text(2)], [text(3), text(4)]]).to_string();
    let model = dir("llama3-tiny");
    let (system, query) = (text(0), text(5));
    let out = json_of(&triton_llm(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        &query,
        "--history",
        &history,
        "--system",
        &system,
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ]));
    assert_eq!(out["output_ids"], case["generated_ids"]);
    assert_eq!(out["response"], case["response"]);
    assert_eq!(out["finish_reason"], "stop");
    // The same prompt's ids from `tokenize --chat`, without loading weights.
    let golden_first = &llama3["cases"][1];
    let messages = golden_first["messages"].as_array().unwrap();
    let out = json_of(&triton_llm(&[
        "tokenize",
        "--model",
        &model,
        "--chat",
        "--system",
        messages[0]["content"].as_str().unwrap(),
        messages[1]["content"].as_str().unwrap(),
    ]));
    assert_eq!(out["ids"], golden_first["prompt_ids"]);
}

/// FastChat's `--load-8bit` is `--quantization w8a16`.
#[test]
fn load_8bit_is_w8a16() {
    let model = dir("vicuna-tiny");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &model, "--prompt", "Hello!", "--temperature"];
        args.extend(["0", "--max-new-tokens", "12"]);
        args.extend(extra);
        json_of(&triton_llm(&args))
    };
    assert_eq!(run(&["--load-8bit"]), run(&["--quantization", "w8a16"]));
    let both = triton_llm(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "x",
        "--load-8bit",
        "--quantization",
        "w4a16",
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--quantization"));
}
