//! OpenAI-style messages and tools rendered as LMDeploy's `internlm2` chat template renders
//! them (the goldens of `tests/fixtures/internlm2-tiny/tokenizer_golden.json`, text and ids),
//! and an InternLM2 tool-call reply parsed as LMDeploy parses it.

mod common;

use common::fixture;
use triton_llm::chat::ChatFormat;
use triton_llm::chat::messages::{
    Conversation, Json, ToolCall, openai_tool_calls, parse_internlm2_reply,
};
use triton_llm::model::Family;
use triton_llm::pipeline::{ChatModel, ChatTurn, GenerationOptions, LoadOptions};
use triton_llm::sequence::FinishReason;
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

fn ids(json: &Json) -> Vec<u32> {
    items(json)
        .iter()
        .map(|id| match id {
            Json::Number(n) => n.as_u64().unwrap() as u32,
            other => panic!("{other:?}"),
        })
        .collect()
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
        let prompt = conversation.prompt(&ChatFormat::InternLm2).unwrap();
        assert_eq!(prompt, case.get("prompt").unwrap().as_str().unwrap(), "{name}");
        let ids = ids(case.get("input_ids_with_bos").unwrap());
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

/// The golden reply's ids, generated after a prompt with tools: the streamed answer is the
/// text before the call, `<|action_end|>` ends the answer, and the call comes back parsed.
#[test]
fn a_reply_with_a_tool_call_ends_at_action_end_and_carries_the_call() {
    let golden = golden();
    // The prompt with tools is 470 tokens, past the tiny model's 256.
    let options = LoadOptions { session_len: Some(1024), ..Default::default() };
    let chat = ChatModel::load(&fixture("internlm2-tiny"), &options).unwrap();
    let case = &items(golden.get("lmdeploy_internlm2_template").unwrap().get("cases").unwrap())[1];
    let messages = case.get("messages").unwrap().python_dumps();
    let tools = case.get("tools").unwrap().python_dumps();
    let conversation = Conversation::parse(&messages, Some(&tools)).unwrap();
    let short = ChatModel::load(&fixture("internlm2-tiny"), &LoadOptions::default()).unwrap();
    let prompt = short.prepare_messages(&conversation).unwrap();
    let message = short.start(prompt, &GenerationOptions::default()).err().unwrap().to_string();
    assert_eq!(message, "messages: 470 tokens do not fit the model's context of 256 tokens");
    let ids = ids(golden.get("tool_call_reply_example").unwrap().get("ids").unwrap());
    let action_end = chat.tokenizer.token_to_id("<|action_end|>").unwrap();
    assert_eq!(ids.last(), Some(&action_end));

    let run = |conversation: &Conversation| {
        let prompt = chat.prepare_messages(conversation).unwrap();
        let mut generating = chat.start(prompt, &GenerationOptions::default()).unwrap();
        let mut pieces = Vec::new();
        for &id in &ids {
            assert!(!generating.is_finished(), "finished before id {id}");
            let ran = generating.sequence.pending_tokens();
            pieces.push(generating.accept(ran, Some(id)));
        }
        let finished = generating.is_finished();
        let (rest, completion) = generating.finish().unwrap();
        pieces.push(rest);
        (pieces.concat(), completion, finished)
    };
    let (streamed, completion, finished) = run(&conversation);
    assert!(finished, "<|action_end|> ends the answer");
    assert_eq!(completion.finish_reason, FinishReason::Stop);
    assert_eq!(streamed, "I will check the weather.");
    assert_eq!(completion.response, streamed);
    assert_eq!(
        completion.tool_calls,
        vec![ToolCall {
            name: "get_current_weather".into(),
            arguments: r#"{"location": "Boston, MA"}"#.into()
        }]
    );

    // Without tools the marks are special tokens, skipped; nothing is parsed, and
    // `<|action_end|>` does not end the answer.
    let plain = Conversation::parse(&messages, None).unwrap();
    let (streamed, completion, finished) = run(&plain);
    assert!(!finished);
    assert!(completion.tool_calls.is_empty());
    assert_eq!(streamed, chat.tokenizer.decode(&ids));
    assert!(streamed.starts_with("I will check the weather.\n{\"name\""), "{streamed}");
}

/// A conversation's prompt is tokenized with the family's prefix, and one over the input
/// limit is refused by its size before any tokenizing.
#[test]
fn conversations_are_tokenized_and_limited() {
    let chat = ChatModel::load(
        &fixture("chatglm2-tiny"),
        &LoadOptions { max_input_bytes: Some(64), ..Default::default() },
    )
    .unwrap();
    let conversation = Conversation::parse(
        r#"[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"},
            {"role": "user", "content": "hello"}]"#,
        None,
    )
    .unwrap();
    let prompt = chat.prepare_messages(&conversation).unwrap();
    let history = vec![("你好".to_string(), "嗨".to_string())];
    let turn = ChatTurn { query: "hello".into(), history, history_len: 10, system_prompt: None };
    assert_eq!(prompt.ids, chat.chat_prompt_ids(&turn).unwrap());
    let long = format!(r#"[{{"role": "user", "content": "{}"}}]"#, "x".repeat(65));
    let message =
        chat.prepare_messages(&Conversation::parse(&long, None).unwrap()).unwrap_err().to_string();
    assert!(message.contains("messages: the conversation's text is 65 bytes"), "{message}");
}

/// Triton's OpenAI frontend sends the folder's chat template rendered, `{{ bos_token }}`
/// first: the prefix is not added a second time.
#[test]
fn raw_text_that_starts_with_the_prefix_gets_it_once() {
    let chat = ChatModel::load(&fixture("internlm2-tiny"), &LoadOptions::default()).unwrap();
    let plain = chat.prepare_raw("<|im_start|>user\nhi<|im_end|>\n").unwrap();
    let with_bos = chat.prepare_raw("<s><|im_start|>user\nhi<|im_end|>\n").unwrap();
    assert_eq!(plain.ids[0], chat.tokenizer.eos_id() - 1);
    assert_eq!(plain.ids, with_bos.ids);
    let twice = chat.prepare_raw("<s><s>x").unwrap();
    assert_eq!(&twice.ids[..2], &[1, 1]);
}
