//! Chat formats without code per model: FastChat's `vicuna_v1.1` and `llama-2` conversation
//! templates equal to the prompts FastChat renders (fixture goldens), and Hugging Face chat
//! templates rendered as transformers' `apply_chat_template` renders them: Llama-3's (the
//! llama3-tiny goldens) and InternLM2's own, which equals the built-in `model.chat` prompt.

mod common;

use std::collections::BTreeMap;

use common::{fixture, golden};
use triton_llm::chat::fastchat::ConvTemplate;
use triton_llm::chat::messages::Json;
use triton_llm::chat::template::ChatTemplate;
use triton_llm::chat::{ChatFormat, internlm2};

fn history(value: &serde_json::Value) -> Vec<(String, String)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| (pair[0].as_str().unwrap().into(), pair[1].as_str().unwrap().into()))
        .collect()
}

fn json(value: &serde_json::Value) -> Json {
    Json::parse(&value.to_string(), "golden").unwrap()
}

#[test]
fn fastchat_templates_render_fastchats_prompts() {
    let mut cases: Vec<serde_json::Value> =
        golden("llama2-tokenizer", "tokenizer_golden.json")["fastchat_prompts"]
            .as_array()
            .unwrap()
            .clone();
    cases.extend(golden("vicuna-tiny", "chat_golden.json")["cases"].as_array().unwrap().clone());
    assert!(cases.len() >= 15);
    for case in &cases {
        let template = ConvTemplate::from_name(case["template"].as_str().unwrap()).unwrap();
        let system = case["system_message"].as_str().unwrap();
        let prompt =
            template.prompt(system, &history(&case["history"]), case["query"].as_str().unwrap());
        assert_eq!(prompt, case["prompt"].as_str().unwrap(), "{case}");
    }
    assert_eq!(
        ConvTemplate::VicunaV11.default_system(),
        cases[0]["system_message"].as_str().unwrap()
    );
    assert_eq!(ConvTemplate::from_name("llama-2").map(ConvTemplate::name), Some("llama-2"));
    assert_eq!(ConvTemplate::from_name("alpaca"), None);
}

#[test]
fn llama3_template_renders_the_goldens_prompts() {
    let template =
        ChatTemplate::from_folder(&fixture("llama3-tiny")).unwrap().expect("a chat template");
    let golden = golden("llama3-tiny", "chat_golden.json");
    for case in golden["cases"].as_array().unwrap() {
        let prompt = template.render(&json(&case["messages"]), None, true).unwrap();
        assert_eq!(prompt, case["prompt_text"].as_str().unwrap(), "{}", case["messages"]);
    }
}

#[test]
fn internlm2s_own_template_equals_the_built_in_prompt() {
    let template =
        ChatTemplate::from_folder(&fixture("internlm2-tiny")).unwrap().expect("a chat template");
    let history = vec![("你好".to_string(), "你好！".to_string())];
    let messages = Json::parse(
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "What is RMSNorm?"}]"#,
        "messages",
    )
    .unwrap();
    let rendered = template.render(&messages, None, true).unwrap();
    // The template writes BOS as text; the built-in prompt leaves it to the tokenizer.
    let built_in =
        ChatFormat::InternLm2.prompt("What is RMSNorm?", &history, Some("Be brief.")).unwrap();
    assert_eq!(rendered, format!("<s>{built_in}"));
    assert!(internlm2::DEFAULT_META_INSTRUCTION.starts_with("You are an AI assistant"));
}

#[test]
fn templates_have_transformers_helpers() {
    let specials = BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]);
    let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}\
        {{ raise_exception('roles: user/assistant only') }}{% endif %}\
        {{ m['content'].strip() ~ '|' }}{% if loop.index0 == 1 %}{% break %}{% endif %}{% endfor %}\
        {{ tools | tojson }}|{{ tools | tojson(indent=2) }}";
    let template = ChatTemplate::new(source, specials).unwrap();
    let messages = Json::parse(
        r#"[{"role": "user", "content": "  a  "}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]"#,
        "m",
    )
    .unwrap();
    let tools =
        Json::parse(r#"[{"name": "f", "parameters": {"b": 1, "a": [1.5, "é"]}}]"#, "t").unwrap();
    let rendered = template.render(&messages, Some(&tools), false).unwrap();
    // Python's json.dumps: key order kept, ", " and ": ", non-ASCII as is; with an indent,
    // one item a line.
    assert_eq!(
        rendered,
        "<s>a|b|[{\"name\": \"f\", \"parameters\": {\"b\": 1, \"a\": [1.5, \"é\"]}}]|[\n  {\n    \
         \"name\": \"f\",\n    \"parameters\": {\n      \"b\": 1,\n      \"a\": [\n        1.5,\n        \
         \"é\"\n      ]\n    }\n  }\n]"
    );
    let system = Json::parse(r#"[{"role": "system", "content": "s"}]"#, "m").unwrap();
    let error = template.render(&system, None, true).unwrap_err().to_string();
    assert!(error.ends_with("roles: user/assistant only"), "{error}");
    assert!(ChatTemplate::new("{% for %}", BTreeMap::new()).is_err());
}
