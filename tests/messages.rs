//! OpenAI-style messages and tools rendered as LMDeploy's `internlm2` chat template renders
//! them (the goldens of `tests/fixtures/internlm2-tiny/tokenizer_golden.json`, text and ids),
//! and an InternLM2 tool-call reply parsed as LMDeploy parses it.

mod common;

use common::fixture;
use triton_llm::chat::messages::{Conversation, Json, openai_tool_calls, parse_internlm2_reply};
use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;

fn golden() -> Json {
    let path = fixture("internlm2-tiny").join("tokenizer_golden.json");
    Json::parse(&std::fs::read_to_string(path).unwrap(), "golden").unwrap()
}

fn items(json: &Json) -> &[Json] {
    match json {
        Json::Array(items) => items,
        other => panic!("not a list: {other:?}"),
    }
}

#[test]
fn internlm2_prompts_equal_lmdeploys_token_for_token() {
    let golden = golden();
    let tokenizer = Tokenizer::from_folder(&fixture("internlm2-tiny"), Family::InternLm2).unwrap();
    let cases = items(golden.get("lmdeploy_internlm2_template").unwrap().get("cases").unwrap());
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case.get("name").unwrap().as_str().unwrap();
        let messages = case.get("messages").unwrap().python_dumps();
        let tools = match case.get("tools").unwrap() {
            Json::Null => None,
            tools => Some(tools.python_dumps()),
        };
        let conversation = Conversation::parse(&messages, tools.as_deref()).unwrap();
        let prompt = conversation.prompt(Family::InternLm2).unwrap();
        assert_eq!(prompt, case.get("prompt").unwrap().as_str().unwrap(), "{name}");
        let ids: Vec<u32> = items(case.get("input_ids_with_bos").unwrap())
            .iter()
            .map(|id| match id {
                Json::Number(n) => n.as_u64().unwrap() as u32,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tokenizer.encode(&prompt, true).unwrap(), ids, "{name}");
    }
}

#[test]
fn the_reply_example_parses_to_its_tool_call() {
    let golden = golden();
    let text = golden.get("tool_call_reply_example").unwrap().get("text").unwrap();
    let (content, call) = parse_internlm2_reply(text.as_str().unwrap());
    let call = call.expect("a tool call");
    assert_eq!(content, "I will check the weather.");
    assert_eq!(call.name, "get_current_weather");
    assert_eq!(call.arguments, r#"{"location": "Boston, MA"}"#);
    assert_eq!(
        openai_tool_calls(&[call]),
        r#"[{"id": "0", "type": "function", "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Boston, MA\"}"}}]"#
    );
}
