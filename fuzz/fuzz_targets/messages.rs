#![no_main]
//! A request's `messages` and `tools` rendered into each chat format's prompt (the built-in
//! ones, FastChat's Vicuna template, Llama-3's Hugging Face template), and a reply parsed for
//! its tool call. Never panics; JSON written as Python writes it reads back the same; a
//! rendered prompt opens the assistant's turn; a parsed call's content is the reply's text
//! before the call.
//!
//! Input: up to three NUL-separated parts: messages, tools (absent when empty), a reply.

use libfuzzer_sys::fuzz_target;
use triton_llm::chat::messages::{
    ACTION_START, Conversation, Json, openai_tool_calls, parse_internlm2_reply,
};
use std::path::PathBuf;
use std::sync::LazyLock;

use triton_llm::chat::ChatFormat;
use triton_llm::chat::fastchat::ConvTemplate;
use triton_llm::chat::template::ChatTemplate;

static LLAMA3: LazyLock<ChatFormat> = LazyLock::new(|| {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama3-tiny");
    let template = ChatTemplate::from_folder(&dir).expect("it parses").expect("it has one");
    ChatFormat::Hf(Box::new(template))
});

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    let mut parts = text.splitn(3, '\0');
    let messages = parts.next().unwrap_or_default();
    let tools = parts.next().filter(|t| !t.is_empty());
    let reply = parts.next().unwrap_or_default();

    if let Ok(json) = Json::parse(messages, "messages") {
        let dumped = json.python_dumps();
        assert_eq!(Json::parse(&dumped, "again").ok(), Some(json), "{dumped}");
    }
    if let Ok(conversation) = Conversation::parse(messages, tools) {
        let prompt = conversation.prompt(&ChatFormat::InternLm2).expect("InternLM2 takes any turns");
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
        assert!(prompt.contains(conversation.last_content()));
        if let Ok(prompt) = conversation.prompt(&ChatFormat::ChatGlm2) {
            assert!(!conversation.has_tools());
            assert!(prompt.ends_with("\n\n答："));
        }
        if let Ok(prompt) = conversation.prompt(&ChatFormat::FastChat(ConvTemplate::VicunaV11)) {
            assert!(!conversation.has_tools());
            assert!(prompt.ends_with("ASSISTANT:"));
        }
        if let Ok(prompt) = conversation.prompt(&LLAMA3) {
            assert!(!conversation.has_tools());
            assert!(prompt.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        }
    }

    let (content, call) = parse_internlm2_reply(reply);
    match call {
        Some(call) => {
            assert_eq!(reply.split_once(ACTION_START).map(|(c, _)| c), Some(content.as_str()));
            let listed = openai_tool_calls(std::slice::from_ref(&call));
            assert!(Json::parse(&listed, "tool_calls").is_ok(), "{listed}");
            assert!(Json::parse(&call.arguments, "arguments").is_ok(), "{}", call.arguments);
        }
        None => assert!(content == reply || reply.contains(ACTION_START)),
    }
});
