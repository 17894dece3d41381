//! A served model's chat format, decided once at load: the family's built-in prompt
//! (ChatGLM2's, InternLM2's), one of FastChat's conversation templates, or the folder's own
//! Hugging Face chat template. The `chat_format` model parameter (`--chat-format`) names one
//! with FastChat's names; otherwise the folder decides.

use std::path::Path;

use super::fastchat::ConvTemplate;
use super::messages::Json;
use super::template::ChatTemplate;
use super::{chatglm2, internlm2};
use crate::model::Family;
use crate::{Error, Result};

pub enum ChatFormat {
    /// ChatGLM2's `model.chat` prompt.
    ChatGlm2,
    /// InternLM2's `model.chat` prompt (and LMDeploy's `internlm2` template for messages).
    InternLm2,
    FastChat(ConvTemplate),
    /// The folder's `chat_template`, rendered as transformers' `apply_chat_template`.
    Hf(Box<ChatTemplate>),
}

/// How an answer's decoded text becomes the answer a chat client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    ChatGlm2,
    InternLm2,
    /// transformers' `clean_up_tokenization` when `spaces`, then Python's `str.strip()` when
    /// `strip`.
    Decode {
        spaces: bool,
        strip: bool,
    },
}

/// The names `chat_format` takes.
pub const FORMAT_NAMES: &str = "chatglm2, internlm2, vicuna_v1.1, llama-2, hf";

/// Refuses a `chat_format` that names no format (before any folder is read).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    match FORMAT_NAMES.split(", ").any(|known| known == name) {
        true => Ok(()),
        false => Err(format!("{name:?} is not one of {FORMAT_NAMES}")),
    }
}

impl ChatFormat {
    /// The format `requested` names, or the folder's: ChatGLM2 and InternLM2 their built-in
    /// prompt; a Llama folder its own chat template when it ships one, else FastChat's
    /// template for its path as FastChat's adapters match it (`llama-2` but not `vicuna`
    /// in the path: `llama-2`; otherwise `vicuna_v1.1`, FastChat's for Vicuna). Returns why it was chosen.
    pub fn choose(family: Family, dir: &Path, requested: Option<&str>) -> Result<(Self, String)> {
        let template = || {
            ChatTemplate::from_folder(dir)?.map(Box::new).ok_or_else(|| {
                Error::Config(format!(
                    "chat_format hf: {} has no chat_template in tokenizer_config.json",
                    dir.display()
                ))
            })
        };
        if let Some(name) = requested {
            let format = match name {
                "hf" => ChatFormat::Hf(template()?),
                "chatglm2" if family == Family::ChatGlm2 => ChatFormat::ChatGlm2,
                "internlm2" if family == Family::InternLm2 => ChatFormat::InternLm2,
                "chatglm2" | "internlm2" => {
                    return Err(Error::Config(format!(
                        "chat_format {name}: that prompt is {name}'s own; this model is {}",
                        family.name()
                    )));
                }
                other => match ConvTemplate::from_name(other) {
                    Some(template) => ChatFormat::FastChat(template),
                    None => {
                        let why = check_name(other).err().unwrap_or_else(|| "unknown".into());
                        return Err(Error::Config(format!("chat_format {why}")));
                    }
                },
            };
            return Ok((format, "the chat_format parameter".into()));
        }
        Ok(match family {
            Family::ChatGlm2 => (ChatFormat::ChatGlm2, "the family's own".into()),
            Family::InternLm2 => (ChatFormat::InternLm2, "the family's own".into()),
            Family::Llama => match ChatTemplate::from_folder(dir)? {
                Some(template) => (
                    ChatFormat::Hf(Box::new(template)),
                    "the folder's tokenizer_config.json has a chat_template".into(),
                ),
                None => {
                    let path = dir.to_string_lossy().to_lowercase();
                    // FastChat tries its Vicuna adapter before its Llama-2 one.
                    let template = match !path.contains("vicuna") && path.contains("llama-2") {
                        true => ConvTemplate::Llama2,
                        false => ConvTemplate::VicunaV11,
                    };
                    (
                        ChatFormat::FastChat(template),
                        "no chat_template in the folder: FastChat's template for its path".into(),
                    )
                }
            },
        })
    }

    /// The name `chat_format` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            ChatFormat::ChatGlm2 => "chatglm2",
            ChatFormat::InternLm2 => "internlm2",
            ChatFormat::FastChat(template) => template.name(),
            ChatFormat::Hf(_) => "hf",
        }
    }

    /// Whether the prompt text carries the tokenizer's prefix itself (a Hugging Face
    /// template writes `bos_token`; `apply_chat_template` tokenizes without adding it).
    pub fn writes_prefix(&self) -> bool {
        matches!(self, ChatFormat::Hf(_))
    }

    /// How answers are cleaned; `spaces`: the tokenizer's `clean_up_tokenization_spaces`.
    pub fn cleanup(&self, spaces: bool) -> Cleanup {
        match self {
            ChatFormat::ChatGlm2 => Cleanup::ChatGlm2,
            ChatFormat::InternLm2 => Cleanup::InternLm2,
            // FastChat decodes with clean_up_tokenization_spaces=True; its CLI strips.
            ChatFormat::FastChat(_) => Cleanup::Decode { spaces: true, strip: true },
            ChatFormat::Hf(_) => Cleanup::Decode { spaces, strip: false },
        }
    }

    /// The prompt text for `query` after `history`. `system`: the system message (None =
    /// the format's default; ChatGLM2 has none, so it ignores it).
    pub fn prompt(
        &self,
        query: &str,
        history: &[(String, String)],
        system: Option<&str>,
    ) -> Result<String> {
        match self {
            ChatFormat::ChatGlm2 => Ok(chatglm2::build_prompt(query, history)),
            ChatFormat::InternLm2 => Ok(internlm2::build_prompt(
                query,
                history,
                system.unwrap_or(internlm2::DEFAULT_META_INSTRUCTION),
            )),
            ChatFormat::FastChat(template) => {
                Ok(template.prompt(system.unwrap_or(template.default_system()), history, query))
            }
            ChatFormat::Hf(template) => {
                let message = |role: &str, content: &str| {
                    Json::Object(vec![
                        ("role".into(), Json::String(role.into())),
                        ("content".into(), Json::String(content.into())),
                    ])
                };
                let mut messages: Vec<Json> =
                    system.map(|s| message("system", s)).into_iter().collect();
                for (q, a) in history {
                    messages.push(message("user", q));
                    messages.push(message("assistant", a));
                }
                messages.push(message("user", query));
                template.render(&Json::Array(messages), None, true)
            }
        }
    }
}

/// The answer text as the format's chat returns it.
pub fn clean_response(cleanup: Cleanup, decoded: &str) -> String {
    match cleanup {
        Cleanup::ChatGlm2 => chatglm2::clean_response(decoded),
        Cleanup::InternLm2 => internlm2::clean_response(decoded),
        Cleanup::Decode { spaces, strip } => {
            let text = match spaces {
                true => super::clean_up_tokenization_spaces(decoded),
                false => decoded.to_string(),
            };
            match strip {
                true => text.trim_matches(chatglm2::is_python_whitespace).to_string(),
                false => text,
            }
        }
    }
}
