//! A Hugging Face chat template (the Jinja `chat_template` of a folder's
//! `tokenizer_config.json`), rendered as transformers' `apply_chat_template(messages,
//! tokenize=False, add_generation_prompt=…)` renders it, so that a new model's chat format
//! needs no code.
//!
//! transformers renders with a sandboxed Jinja environment: `trim_blocks` and
//! `lstrip_blocks`, loop controls, `raise_exception(message)`, a `tojson` filter that is
//! Python's `json.dumps(value, ensure_ascii=False, indent=…)`, and the tokenizer's special
//! tokens (`bos_token`, `eos_token`, …) as variables beside `messages`, `tools` and
//! `add_generation_prompt`. Python's string methods (`.strip()`, `.startswith(…)`) come from
//! minijinja-contrib's compatibility layer.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use super::messages::Json;
use crate::{Error, Result};

/// The special-token names of `tokenizer_config.json` a template sees as variables.
const SPECIAL_TOKENS: [&str; 6] =
    ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token"];

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special-token variables (`bos_token` → `<s>`, …).
    specials: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// The template of a folder's `tokenizer_config.json`, or None when it has none.
    pub fn from_folder(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config = Json::parse(&text, &path.display().to_string())
            .map_err(|e| Error::Config(e.to_string()))?;
        let source = match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(source)) => source.clone(),
            // A list of named templates: the one named "default".
            Some(Json::Array(named)) => {
                let default =
                    named.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                    Some(source) => source.to_string(),
                    None => {
                        return Err(Error::Config(format!(
                            "{}: chat_template lists templates but none named \"default\"",
                            path.display()
                        )));
                    }
                }
            }
            Some(_) => {
                return Err(Error::Config(format!(
                    "{}: chat_template must be a string",
                    path.display()
                )));
            }
        };
        let mut specials = BTreeMap::new();
        for name in SPECIAL_TOKENS {
            // A token is its text, or an AddedToken object with a "content".
            let value = config.get(name);
            let text = value
                .and_then(Json::as_str)
                .or(value.and_then(|v| v.get("content")).and_then(Json::as_str));
            if let Some(text) = text {
                specials.insert(name.to_string(), text.to_string());
            }
        }
        Self::new(&source, specials)
            .map(Some)
            .map_err(|e| Error::Config(format!("{}: chat_template: {e}", path.display())))
    }

    /// A template from its source and the special-token variables.
    pub fn new(source: &str, specials: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| Error::Config(format!("the template does not compile: {e}")))?;
        Ok(ChatTemplate { env, specials })
    }

    /// The prompt for `messages` (a JSON list of `{role, content, …}`) and `tools` (None:
    /// the variable is undefined, as transformers passes `tools=None`).
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| Error::Internal(format!("chat template: {e}")))?;
        let mut context: BTreeMap<String, Value> = self
            .specials
            .iter()
            .map(|(name, token)| (name.clone(), Value::from(token.as_str())))
            .collect();
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        context.insert("tools".into(), tools.map_or(Value::from(()), Value::from_serialize));
        template.render(context).map_err(|e| {
            let message = match e.kind() {
                // The template's own refusal (`raise_exception`): its message alone.
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => e.to_string(),
            };
            Error::InvalidRequest(format!("messages: the chat template refused them: {message}"))
        })
    }
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    Ok(to_json(value)?.python_dumps_indented(indent))
}

/// A template value as JSON, maps in their order.
fn to_json(value: &Value) -> std::result::Result<Json, minijinja::Error> {
    let unsupported = || {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot write {value}"))
    };
    Ok(match value.kind() {
        ValueKind::Undefined | ValueKind::None => Json::Null,
        ValueKind::Bool => Json::Bool(value.is_true()),
        ValueKind::Number if value.is_integer() => match value.as_i64() {
            Some(n) => Json::Number(n.into()),
            None => return Err(unsupported()),
        },
        ValueKind::Number => {
            let float = f64::try_from(value.clone()).map_err(|_| unsupported())?;
            Json::Number(serde_json::Number::from_f64(float).ok_or_else(unsupported)?)
        }
        ValueKind::String => Json::String(value.as_str().unwrap_or_default().to_string()),
        ValueKind::Seq | ValueKind::Iterable => Json::Array(
            value.try_iter()?.map(|item| to_json(&item)).collect::<std::result::Result<_, _>>()?,
        ),
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((
                    key.as_str().map_or_else(|| key.to_string(), str::to_string),
                    to_json(&item)?,
                ));
            }
            Json::Object(entries)
        }
        _ => return Err(unsupported()),
    })
}
