//! FastChat's conversation templates for the Llama family (`fastchat.conversation`):
//! `vicuna_v1.1` (Vicuna v1.1 to v1.5, separator style `ADD_COLON_TWO`) and `llama-2`
//! (Llama-2-chat, style `LLAMA2`), rendered as `Conversation.get_prompt()` renders them after
//! `append_message` of each past (query, answer) pair, the query, and an open answer.

/// `fastchat.serve.cli`'s `--max-new-tokens` default.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 512;

/// A FastChat conversation template, by its FastChat name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvTemplate {
    VicunaV11,
    Llama2,
}

/// `vicuna_v1.1`'s system message.
pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence \
assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

impl ConvTemplate {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "vicuna_v1.1" => Some(ConvTemplate::VicunaV11),
            "llama-2" => Some(ConvTemplate::Llama2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConvTemplate::VicunaV11 => "vicuna_v1.1",
            ConvTemplate::Llama2 => "llama-2",
        }
    }

    /// The system message the template has when none is set (`llama-2` has none).
    pub fn default_system(self) -> &'static str {
        match self {
            ConvTemplate::VicunaV11 => VICUNA_SYSTEM,
            ConvTemplate::Llama2 => "",
        }
    }

    /// The prompt text (the tokenizer adds BOS). An empty message counts as none, as in
    /// FastChat, where `""` is falsy: an empty query renders as `USER:ASSISTANT:`.
    pub fn prompt(self, system: &str, history: &[(String, String)], query: &str) -> String {
        let messages = history
            .iter()
            .flat_map(|(q, a)| [Some(q.as_str()), Some(a.as_str())])
            .chain([Some(query), None])
            .map(|m| m.filter(|m| !m.is_empty()));
        let mut prompt = String::new();
        match self {
            ConvTemplate::VicunaV11 => {
                // ADD_COLON_TWO: sep " " after the system and user turns, sep2 "</s>" after
                // the assistant's.
                prompt.push_str(system);
                prompt.push(' ');
                for (i, message) in messages.enumerate() {
                    let role = if i % 2 == 0 { "USER" } else { "ASSISTANT" };
                    match message {
                        Some(text) => {
                            let sep = if i % 2 == 0 { " " } else { "</s>" };
                            prompt.push_str(&format!("{role}: {text}{sep}"));
                        }
                        None => prompt.push_str(&format!("{role}:")),
                    }
                }
            }
            ConvTemplate::Llama2 => {
                // LLAMA2: the system block opens the first [INST]; the first message follows
                // it bare; answers end with " </s><s>".
                if system.is_empty() {
                    prompt.push_str("[INST] ");
                } else {
                    prompt.push_str(&format!("[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"));
                }
                for (i, message) in messages.enumerate() {
                    let tag = if i % 2 == 0 { "[INST]" } else { "[/INST]" };
                    match message {
                        Some(text) if i == 0 => prompt.push_str(&format!("{text} ")),
                        Some(text) => {
                            let sep = if i % 2 == 0 { " " } else { " </s><s>" };
                            prompt.push_str(&format!("{tag} {text}{sep}"));
                        }
                        None => prompt.push_str(tag),
                    }
                }
            }
        }
        prompt
    }
}
