//! OpenAI-style `messages` (and, for InternLM2, `tools`) rendered into a family's prompt,
//! and an InternLM2 reply's tool call parsed back out.
//!
//! InternLM2 follows LMDeploy's `internlm2` chat template (`InternLM2Chat7B.messages2prompt`):
//! a system turn (the request's, or LMDeploy's default meta instruction), the tools as
//! `json.dumps(tools, ensure_ascii=False)` in a `system name=<|plugin|>` turn, user turns,
//! assistant turns with their calls as `<|action_start|><|plugin|>\n{"name": …,
//! "parameters": …}<|action_end|>`, tool results as `environment` turns, and an open
//! assistant turn. JSON is written as Python's `json.dumps` writes it (key order kept,
//! `", "` and `": "` separators), since the prompt must equal LMDeploy's token for token.
//! ChatGLM2 has user and assistant turns only: they become its `model.chat` history.

use std::fmt::Write as _;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

use super::format::ChatFormat;
use super::internlm2;
use crate::{Error, Result};

/// The marks around an InternLM2 tool call in the reply (and in the prompt's history).
pub const ACTION_START: &str = "<|action_start|><|plugin|>";
pub const ACTION_END: &str = "<|action_end|>";
/// The special tokens the marks are made of (`<|interpreter|>` in place of `<|plugin|>`
/// starts code, which is not a tool call).
pub const ACTION_START_TOKEN: &str = "<|action_start|>";
pub const PLUGIN_TOKEN: &str = "<|plugin|>";
pub const INTERPRETER_TOKEN: &str = "<|interpreter|>";

/// JSON as parsed, object keys in their order (serde_json's map sorts them).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct JsonVisitor;
        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Json, E> {
                Ok(Json::Number(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Json, E> {
                serde_json::Number::from_f64(v)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Json, E> {
                Ok(Json::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Json>()? {
                    entries.push(entry);
                }
                Ok(Json::Object(entries))
            }
        }
        deserializer.deserialize_any(JsonVisitor)
    }
}

impl Json {
    /// Parses JSON text, keeping object keys in order; `what` names it in the error.
    pub fn parse(text: &str, what: &str) -> Result<Json> {
        serde_json::from_str(text)
            .map_err(|e| Error::InvalidRequest(format!("{what}: not valid JSON ({e})")))
    }

    /// An object's value for `key`.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// As Python's `json.dumps(value, ensure_ascii=False)` writes it.
    pub fn python_dumps(&self) -> String {
        self.python_dumps_indented(None)
    }

    /// As `json.dumps(value, ensure_ascii=False, indent=indent)`: with an indent, each item
    /// on its own line and `,` between them (Python's separators then).
    pub fn python_dumps_indented(&self, indent: Option<usize>) -> String {
        let mut out = String::new();
        self.write_python(&mut out, indent, 0);
        out
    }

    fn write_python(&self, out: &mut String, indent: Option<usize>, level: usize) {
        let open = |out: &mut String, bracket: char, empty: bool| {
            out.push(bracket);
            if let (Some(width), false) = (indent, empty) {
                out.push('\n');
                out.push_str(&" ".repeat(width * (level + 1)));
            }
        };
        let between = |out: &mut String| match indent {
            Some(width) => {
                out.push_str(",\n");
                out.push_str(&" ".repeat(width * (level + 1)));
            }
            None => out.push_str(", "),
        };
        let close = |out: &mut String, bracket: char, empty: bool| {
            if let (Some(width), false) = (indent, empty) {
                out.push('\n');
                out.push_str(&" ".repeat(width * level));
            }
            out.push(bracket);
        };
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&python_number(n)),
            Json::String(s) => python_string(s, out),
            Json::Array(items) => {
                open(out, '[', items.is_empty());
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        between(out);
                    }
                    item.write_python(out, indent, level + 1);
                }
                close(out, ']', items.is_empty());
            }
            Json::Object(entries) => {
                open(out, '{', entries.is_empty());
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        between(out);
                    }
                    python_string(key, out);
                    out.push_str(": ");
                    value.write_python(out, indent, level + 1);
                }
                close(out, '}', entries.is_empty());
            }
        }
    }
}

impl serde::Serialize for Json {
    /// Object keys in their order (a chat template iterates and dumps them so).
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

/// A number as Python writes it: integers as they are, floats by `repr` (shortest round
/// trip, an exponent with a sign and at least two digits).
fn python_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let v = n.as_f64().unwrap_or(0.0);
    let abs = v.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let text = format!("{v:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exponent),
        };
        let mantissa = if mantissa.contains('.') { mantissa.to_string() } else { mantissa.into() };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let text = format!("{v}");
    if text.contains('.') { text } else { format!("{text}.0") }
}

/// A JSON string as Python escapes it with `ensure_ascii=False`.
fn python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One tool call of an assistant turn, or of a reply: a function's name and its
/// arguments as JSON text (OpenAI's `arguments`).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A conversation in OpenAI's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    messages: Vec<Message>,
    /// The function definitions (each `{name, description, parameters}`), in order.
    tools: Option<Vec<Json>>,
}

#[derive(Clone, Debug, PartialEq)]
struct Message {
    role: Role,
    content: String,
    tool_calls: Vec<ToolCall>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl Conversation {
    /// Parses the `messages` input (a JSON list of `{role, content, tool_calls?}`) and the
    /// optional `tools` input (a JSON list of functions, bare or as OpenAI's
    /// `{"type": "function", "function": {…}}`).
    pub fn parse(messages: &str, tools: Option<&str>) -> Result<Self> {
        let bad = |what: String| Error::InvalidRequest(format!("messages: {what}"));
        let Json::Array(items) = Json::parse(messages, "messages")? else {
            return Err(bad("must be a JSON list of {\"role\", \"content\"} objects".into()));
        };
        if items.is_empty() {
            return Err(bad("must not be empty".into()));
        }
        let mut parsed = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let role = match item.get("role").and_then(Json::as_str) {
                Some("system") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("tool") => Role::Tool,
                Some(other) => {
                    return Err(bad(format!(
                        "message {i} has role {other:?} (expected system, user, assistant or tool)"
                    )));
                }
                None => return Err(bad(format!("message {i} has no \"role\" string"))),
            };
            let content = match item.get("content") {
                Some(Json::String(s)) => s.clone(),
                None | Some(Json::Null) => String::new(),
                // OpenAI's list of parts: the text parts, joined.
                Some(Json::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match part.get("text").and_then(Json::as_str) {
                            Some(t) => text.push_str(t),
                            None => {
                                return Err(bad(format!(
                                    "message {i}: only text content parts are supported"
                                )));
                            }
                        }
                    }
                    text
                }
                Some(_) => return Err(bad(format!("message {i}: \"content\" must be a string"))),
            };
            let tool_calls = match item.get("tool_calls") {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::Array(calls)) => calls
                    .iter()
                    .map(|call| {
                        let function = call.get("function").unwrap_or(call);
                        let name = function.get("name").and_then(Json::as_str);
                        let arguments = match function.get("arguments") {
                            Some(Json::String(s)) => Some(s.clone()),
                            Some(object @ Json::Object(_)) => Some(object.python_dumps()),
                            _ => None,
                        };
                        match (name, arguments) {
                            (Some(name), Some(arguments)) => {
                                Ok(ToolCall { name: name.to_string(), arguments })
                            }
                            _ => Err(bad(format!(
                                "message {i}: each tool call needs a function \"name\" and \
                                 \"arguments\""
                            ))),
                        }
                    })
                    .collect::<Result<_>>()?,
                Some(_) => return Err(bad(format!("message {i}: \"tool_calls\" must be a list"))),
            };
            parsed.push(Message { role, content, tool_calls });
        }
        let tools = match tools {
            None => None,
            Some(text) => {
                let Json::Array(items) = Json::parse(text, "tools")? else {
                    return Err(Error::InvalidRequest("tools: must be a JSON list".into()));
                };
                let functions = items
                    .into_iter()
                    .map(|tool| match tool.get("function") {
                        Some(function @ Json::Object(_)) => function.clone(),
                        _ => tool,
                    })
                    .collect::<Vec<_>>();
                if functions.iter().any(|f| f.get("name").and_then(Json::as_str).is_none()) {
                    return Err(Error::InvalidRequest(
                        "tools: each tool must be a function with a \"name\"".into(),
                    ));
                }
                Some(functions)
            }
        };
        if parsed.last().map(|m| m.role) == Some(Role::Assistant) {
            return Err(bad(
                "the last message must not be the assistant's (it is the answer)".into()
            ));
        }
        Ok(Conversation { messages: parsed, tools })
    }

    /// The last message's text (what the request asks now).
    pub fn last_content(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }

    pub fn has_tools(&self) -> bool {
        self.tools.is_some()
    }

    /// Bytes of text the conversation brings (for the input limit).
    pub fn text_bytes(&self) -> usize {
        self.messages.iter().map(|m| m.content.len()).sum::<usize>()
            + self.tools.as_ref().map_or(0, |t| t.iter().map(|f| f.python_dumps().len()).sum())
    }

    /// The prompt text of this conversation in `format` (the tokenizer adds BOS, unless the
    /// format writes it).
    pub fn prompt(&self, format: &ChatFormat) -> Result<String> {
        if self.tools.is_some() && !matches!(format, ChatFormat::InternLm2) {
            return Err(Error::InvalidRequest(format!(
                "tools: the {} chat format has no tool calls here (only InternLM2's); send \
                 messages without tools",
                format.name()
            )));
        }
        match format {
            ChatFormat::InternLm2 => Ok(self.internlm2_prompt()),
            ChatFormat::ChatGlm2 => {
                let (system, query, history) = self.turns("ChatGLM2")?;
                if system.is_some() {
                    return Err(Error::InvalidRequest(
                        "messages: ChatGLM2 has no system prompt; send user and assistant turns"
                            .into(),
                    ));
                }
                Ok(super::chatglm2::build_prompt(&query, &history))
            }
            ChatFormat::FastChat(template) => {
                let (system, query, history) = self.turns(template.name())?;
                let system = system.as_deref().unwrap_or(template.default_system());
                Ok(template.prompt(system, &history, &query))
            }
            ChatFormat::Hf(template) => {
                let messages = self
                    .messages
                    .iter()
                    .map(|m| {
                        Json::Object(vec![
                            ("role".into(), Json::String(m.role.name().into())),
                            ("content".into(), Json::String(m.content.clone())),
                        ])
                    })
                    .collect();
                template.render(&Json::Array(messages), None, true)
            }
        }
    }

    fn internlm2_prompt(&self) -> String {
        let mut prompt = String::new();
        let mut rest = &self.messages[..];
        match rest.first() {
            Some(Message { role: Role::System, content, .. }) => {
                prompt.push_str(&format!("<|im_start|>system\n{content}<|im_end|>\n"));
                rest = &rest[1..];
            }
            // LMDeploy's meta instruction: the model's own, and a newline.
            _ => prompt.push_str(&format!(
                "<|im_start|>system\n{}\n<|im_end|>\n",
                internlm2::DEFAULT_META_INSTRUCTION
            )),
        }
        if let Some(tools) = &self.tools {
            let tools = Json::Array(tools.clone()).python_dumps();
            prompt.push_str(&format!("<|im_start|>system name=<|plugin|>\n{tools}<|im_end|>\n"));
        }
        for message in rest {
            match message.role {
                Role::System => {
                    prompt.push_str(&format!("<|im_start|>system\n{}<|im_end|>\n", message.content))
                }
                Role::User => {
                    prompt.push_str(&format!("<|im_start|>user\n{}<|im_end|>\n", message.content))
                }
                Role::Assistant => {
                    prompt.push_str(&format!("<|im_start|>assistant\n{}", message.content));
                    for call in &message.tool_calls {
                        prompt.push_str(ACTION_START);
                        prompt.push('\n');
                        prompt.push_str(&call.as_action());
                        prompt.push_str(ACTION_END);
                    }
                    prompt.push_str("<|im_end|>\n");
                }
                Role::Tool => prompt
                    .push_str(&format!("<|im_start|>environment\n{}<|im_end|>\n", message.content)),
            }
        }
        prompt.push_str("<|im_start|>assistant\n");
        prompt
    }

    /// An optional system message, then user and assistant turns in pairs, then a user
    /// turn: (system, query, history), for formats built from those (`format` names it).
    pub fn turns(&self, format: &str) -> Result<(Option<String>, String, super::History)> {
        let alternating = || {
            Error::InvalidRequest(format!(
                "messages: {format} takes an optional system message, then user and assistant \
                 turns alternating from a user turn"
            ))
        };
        let mut turns = self.messages.iter().peekable();
        let system = match turns.peek() {
            Some(Message { role: Role::System, content, .. }) => {
                let system = content.clone();
                turns.next();
                Some(system)
            }
            _ => None,
        };
        let mut history = Vec::new();
        loop {
            let query = match turns.next() {
                Some(Message { role: Role::User, content, .. }) => content.clone(),
                Some(_) => return Err(alternating()),
                None => {
                    return Err(Error::InvalidRequest(
                        "messages: the last message must be the user's".into(),
                    ));
                }
            };
            match turns.next() {
                None => return Ok((system, query, history)),
                Some(Message { role: Role::Assistant, content, tool_calls, .. })
                    if tool_calls.is_empty() =>
                {
                    history.push((query, content.clone()));
                }
                Some(_) => return Err(alternating()),
            }
        }
    }
}

impl ToolCall {
    /// The call as InternLM2 writes it: `{"name": …, "parameters": …}`.
    fn as_action(&self) -> String {
        let parameters = Json::parse(&self.arguments, "tool_calls arguments")
            .unwrap_or_else(|_| Json::String(self.arguments.clone()));
        Json::Object(vec![
            ("name".to_string(), Json::String(self.name.clone())),
            ("parameters".to_string(), parameters),
        ])
        .python_dumps()
    }
}

/// An InternLM2 reply (its text with the special tokens kept) split into the answer text
/// and the tool call it makes, as LMDeploy's `parse_tool_response` splits it. None for the
/// call when the reply has none or its JSON does not parse.
pub fn parse_internlm2_reply(text: &str) -> (String, Option<ToolCall>) {
    let Some((content, action)) = text.split_once(ACTION_START) else {
        return (text.to_string(), None);
    };
    let action = action.split(ACTION_END).next().unwrap_or_default();
    let action = &action[action.find('{').unwrap_or(action.len())..];
    let call = Json::parse(action, "tool call").ok().and_then(|json| {
        let name = json.get("name")?.as_str()?.to_string();
        let parameters = json.get("parameters").or(json.get("arguments")).cloned();
        let arguments = parameters.unwrap_or(Json::Object(Vec::new())).python_dumps();
        Some(ToolCall { name, arguments })
    });
    (content.to_string(), call)
}

/// Tool calls in OpenAI's shape, `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]` (ids as LMDeploy numbers them).
pub fn openai_tool_calls(calls: &[ToolCall]) -> String {
    Json::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                Json::Object(vec![
                    ("id".into(), Json::String(i.to_string())),
                    ("type".into(), Json::String("function".into())),
                    (
                        "function".into(),
                        Json::Object(vec![
                            ("name".into(), Json::String(call.name.clone())),
                            ("arguments".into(), Json::String(call.arguments.clone())),
                        ]),
                    ),
                ])
            })
            .collect(),
    )
    .python_dumps()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_written_as_python_writes_it() {
        let json = Json::parse(
            r#"{"b": [1, 2.5, -3e-7, 1e20, true, null], "a": "q\"\\\n\u0001é"}"#,
            "test",
        )
        .unwrap();
        assert_eq!(
            json.python_dumps(),
            r#"{"b": [1, 2.5, -3e-07, 1e+20, true, null], "a": "q\"\\\n\u0001é"}"#
        );
        assert_eq!(Json::parse("0.0001", "t").unwrap().python_dumps(), "0.0001");
        assert_eq!(Json::parse("1.0", "t").unwrap().python_dumps(), "1.0");
    }

    #[test]
    fn chatglm2_takes_alternating_turns_and_refuses_tools() {
        let conversation = Conversation::parse(
            r#"[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"},
                {"role": "user", "content": "hello"}]"#,
            None,
        )
        .unwrap();
        let (system, query, history) = conversation.turns("ChatGLM2").unwrap();
        assert_eq!(system, None);
        assert_eq!((query.as_str(), history), ("hello", vec![("你好".into(), "嗨".into())]));
        let with_tools = Conversation::parse(
            r#"[{"role": "user", "content": "x"}]"#,
            Some(r#"[{"name": "f"}]"#),
        )
        .unwrap();
        let error = with_tools.prompt(&ChatFormat::ChatGlm2).unwrap_err().to_string();
        assert!(error.contains("tools"), "{error}");
        let system = Conversation::parse(
            r#"[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]"#,
            None,
        )
        .unwrap();
        assert!(system.prompt(&ChatFormat::ChatGlm2).unwrap_err().to_string().contains("system"));
        let (system, query, _) = system.turns("vicuna_v1.1").unwrap();
        assert_eq!((system.as_deref(), query.as_str()), (Some("s"), "x"));
    }

    #[test]
    fn bad_messages_are_refused_naming_what_is_wrong() {
        for (messages, expected) in [
            ("{", "not valid JSON"),
            ("{}", "JSON list"),
            ("[]", "must not be empty"),
            (r#"[{"content": "x"}]"#, "no \"role\""),
            (r#"[{"role": "robot", "content": "x"}]"#, "robot"),
            (r#"[{"role": "user", "content": 3}]"#, "must be a string"),
            (
                r#"[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]"#,
                "last",
            ),
        ] {
            let message = Conversation::parse(messages, None).unwrap_err().to_string();
            assert!(message.contains(expected), "{messages}: {message}");
        }
        let message = Conversation::parse(r#"[{"role": "user", "content": "x"}]"#, Some("[{}]"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("tools"), "{message}");
    }

    #[test]
    fn a_reply_without_a_call_is_all_content() {
        assert_eq!(parse_internlm2_reply("just text"), ("just text".to_string(), None));
        let (content, call) = parse_internlm2_reply("x<|action_start|><|plugin|>\nnot json");
        assert_eq!((content.as_str(), call), ("x", None));
    }
}
