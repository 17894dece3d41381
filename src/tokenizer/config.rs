//! What the tokenizers read of a folder's `tokenizer_config.json`, and of
//! `special_tokens_map.json` where transformers 4.44 reads it (only when the config has no
//! `added_tokens_decoder`; its entries then override the config's).

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES` without `additional_special_tokens`, in its
/// order (the order in which missing special tokens get new ids).
pub(crate) const NAMED_SPECIALS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A token string with transformers' `AddedToken` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenSpec {
    pub content: String,
    /// Eat the whitespace on the token's left / right when splitting it out of text.
    pub lstrip: bool,
    pub rstrip: bool,
}

/// One `added_tokens_decoder` entry.
#[derive(Clone, Debug)]
pub(crate) struct AddedToken {
    pub id: u32,
    pub token: TokenSpec,
    pub special: bool,
}

#[derive(Debug, Default)]
pub(crate) struct TokenizerConfig {
    /// The named special tokens the files set, `None` for an explicit `null`; a name they
    /// do not mention is absent (the tokenizer class's default applies).
    named: Vec<(&'static str, Option<TokenSpec>)>,
    pub additional_special_tokens: Vec<TokenSpec>,
    pub added_tokens: Option<Vec<AddedToken>>,
    pub legacy: Option<bool>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_prefix_space: Option<bool>,
    pub clean_up_tokenization_spaces: Option<bool>,
    pub tokenizer_class: Option<String>,
}

impl TokenizerConfig {
    /// Reads the folder's files; both are optional, a broken one is an error naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut config = match read_json(&path)? {
            Some(json) => Self::parse(&json).map_err(|e| named(&path, e))?,
            None => Self::default(),
        };
        if config.added_tokens.is_none() {
            let path = dir.join("special_tokens_map.json");
            if let Some(json) = read_json(&path)? {
                config.merge_special_tokens_map(&json).map_err(|e| named(&path, e))?;
            }
        }
        Ok(config)
    }

    fn parse(json: &Value) -> std::result::Result<Self, String> {
        let object = json.as_object().ok_or("not a JSON object")?;
        let mut config = TokenizerConfig {
            legacy: bool_key(json, "legacy")?,
            add_bos_token: bool_key(json, "add_bos_token")?,
            add_eos_token: bool_key(json, "add_eos_token")?,
            add_prefix_space: bool_key(json, "add_prefix_space")?,
            clean_up_tokenization_spaces: bool_key(json, "clean_up_tokenization_spaces")?,
            ..Self::default()
        };
        config.tokenizer_class = match json.get("tokenizer_class") {
            None | Some(Value::Null) => None,
            Some(Value::String(class)) => Some(class.clone()),
            Some(_) => return Err("tokenizer_class must be a string".into()),
        };
        for name in NAMED_SPECIALS {
            if let Some(value) = object.get(name) {
                config.named.push((name, token_spec(value, name)?));
            }
        }
        if let Some(list) = object.get("additional_special_tokens") {
            config.additional_special_tokens = token_list(list)?;
        }
        if let Some(entries) = object.get("added_tokens_decoder") {
            let entries = entries.as_object().ok_or("added_tokens_decoder must be an object")?;
            let mut added = Vec::with_capacity(entries.len());
            for (key, entry) in entries {
                let id = key
                    .parse::<u32>()
                    .map_err(|_| format!("added_tokens_decoder key {key:?} is not an id"))?;
                let what = format!("added_tokens_decoder[{key}]");
                let token = token_spec(entry, &what)?
                    .filter(|_| entry.is_object())
                    .ok_or_else(|| format!("{what} has no content"))?;
                let special = match entry.get("special") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(format!("{what}.special must be true or false")),
                };
                added.push(AddedToken { id, token, special });
            }
            config.added_tokens = Some(added);
        }
        Ok(config)
    }

    /// transformers' legacy loading path: each key of the map replaces the config's;
    /// additional special tokens are joined.
    fn merge_special_tokens_map(&mut self, json: &Value) -> std::result::Result<(), String> {
        let object = json.as_object().ok_or("not a JSON object")?;
        for name in NAMED_SPECIALS {
            if let Some(value) = object.get(name) {
                let spec = token_spec(value, name)?;
                self.named.retain(|(n, _)| *n != name);
                self.named.push((name, spec));
            }
        }
        if let Some(list) = object.get("additional_special_tokens") {
            for token in token_list(list)? {
                if !self.additional_special_tokens.iter().any(|t| t.content == token.content) {
                    self.additional_special_tokens.push(token);
                }
            }
        }
        Ok(())
    }

    /// A named special token: `None` when the files do not mention it, `Some(None)` for an
    /// explicit `null`.
    pub fn named(&self, name: &str) -> Option<Option<&TokenSpec>> {
        self.named.iter().find(|(n, _)| *n == name).map(|(_, spec)| spec.as_ref())
    }

    /// A named special token's text, with `default` when the files do not mention it.
    pub fn named_or<'a>(&'a self, name: &str, default: Option<&'a str>) -> Option<&'a str> {
        match self.named(name) {
            Some(spec) => spec.map(|s| s.content.as_str()),
            None => default,
        }
    }

    /// transformers 4.44's default when the config does not set the key: `True` in
    /// `PreTrainedTokenizerBase`, but these families' own classes (slow and fast) pass
    /// `False`. Without a class, AutoTokenizer picks the family's own.
    pub fn clean_up_tokenization_spaces(&self) -> bool {
        self.clean_up_tokenization_spaces.unwrap_or_else(|| {
            match self.tokenizer_class.as_deref().map(|c| c.strip_suffix("Fast").unwrap_or(c)) {
                None
                | Some(
                    "LlamaTokenizer" | "CodeLlamaTokenizer" | "InternLM2Tokenizer"
                    | "ChatGLMTokenizer",
                ) => false,
                Some(_) => true,
            }
        })
    }
}

fn named(path: &Path, what: String) -> Error {
    Error::Tokenizer(format!("{}: {what}", path.display()))
}

/// The file's JSON, or None when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| named(path, format!("not valid JSON: {e}")))
}

fn bool_key(json: &Value, key: &str) -> std::result::Result<Option<bool>, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!("{key} must be true or false, not {other}")),
    }
}

/// A token as the files write it: its text, or an AddedToken object with a `content`;
/// `None` for `null`.
fn token_spec(value: &Value, what: &str) -> std::result::Result<Option<TokenSpec>, String> {
    let flag = |key: &str| value.get(key).and_then(Value::as_bool).unwrap_or(false);
    match value {
        Value::Null => Ok(None),
        Value::String(content) => {
            Ok(Some(TokenSpec { content: content.clone(), lstrip: false, rstrip: false }))
        }
        Value::Object(object) => match object.get("content") {
            Some(Value::String(content)) => Ok(Some(TokenSpec {
                content: content.clone(),
                lstrip: flag("lstrip"),
                rstrip: flag("rstrip"),
            })),
            _ => Err(format!("{what} has no content")),
        },
        _ => Err(format!("{what} must be a string or an object with a content")),
    }
}

fn token_list(value: &Value) -> std::result::Result<Vec<TokenSpec>, String> {
    let what = "additional_special_tokens";
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            items.iter().filter_map(|item| token_spec(item, what).transpose()).collect()
        }
        _ => Err(format!("{what} must be a list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_strings_or_added_token_objects() {
        let json = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"__type": "AddedToken", "content": "</s>", "rstrip": true},
            "pad_token": null,
            "additional_special_tokens": ["<a>", {"content": "<b>", "lstrip": true}],
            "added_tokens_decoder": {"7": {"content": "<x>", "special": true}},
            "legacy": false,
        });
        let config = TokenizerConfig::parse(&json).unwrap();
        assert_eq!(config.named_or("bos_token", None), Some("<s>"));
        assert!(config.named("eos_token").unwrap().unwrap().rstrip);
        assert_eq!(config.named("pad_token"), Some(None));
        assert_eq!(config.named("unk_token"), None);
        assert_eq!(config.named_or("unk_token", Some("<unk>")), Some("<unk>"));
        assert_eq!(config.additional_special_tokens.len(), 2);
        assert!(config.additional_special_tokens[1].lstrip);
        let added = config.added_tokens.as_ref().unwrap();
        assert_eq!(
            (added[0].id, added[0].token.content.as_str(), added[0].special),
            (7, "<x>", true)
        );
        assert_eq!(config.legacy, Some(false));
        assert_eq!(config.add_bos_token, None);
    }

    #[test]
    fn bad_values_are_named() {
        for (json, what) in [
            (serde_json::json!([1]), "not a JSON object"),
            (serde_json::json!({"legacy": "yes"}), "legacy"),
            (serde_json::json!({"eos_token": 2}), "eos_token"),
            (serde_json::json!({"eos_token": {"id": 2}}), "eos_token has no content"),
            (serde_json::json!({"added_tokens_decoder": {"x": {"content": "a"}}}), "\"x\""),
            (serde_json::json!({"added_tokens_decoder": {"3": "a"}}), "[3] has no content"),
        ] {
            let err = TokenizerConfig::parse(&json).unwrap_err();
            assert!(err.contains(what), "{json}: {err}");
        }
    }

    #[test]
    fn special_tokens_map_overrides_without_added_tokens_decoder() {
        let mut config =
            TokenizerConfig::parse(&serde_json::json!({"pad_token": null, "eos_token": "</s>"}))
                .unwrap();
        config
            .merge_special_tokens_map(
                &serde_json::json!({"pad_token": "<unk>", "additional_special_tokens": ["<a>"]}),
            )
            .unwrap();
        assert_eq!(config.named_or("pad_token", None), Some("<unk>"));
        assert_eq!(config.named_or("eos_token", None), Some("</s>"));
        assert_eq!(config.additional_special_tokens[0].content, "<a>");
    }

    #[test]
    fn clean_up_default_follows_the_class() {
        let class = |c: Option<&str>| TokenizerConfig {
            tokenizer_class: c.map(str::to_string),
            ..TokenizerConfig::default()
        };
        assert!(class(Some("PreTrainedTokenizerFast")).clean_up_tokenization_spaces());
        assert!(class(Some("GPT2Tokenizer")).clean_up_tokenization_spaces());
        assert!(!class(Some("LlamaTokenizer")).clean_up_tokenization_spaces());
        assert!(!class(Some("LlamaTokenizerFast")).clean_up_tokenization_spaces());
        assert!(!class(None).clean_up_tokenization_spaces());
        let set = TokenizerConfig {
            clean_up_tokenization_spaces: Some(true),
            ..class(Some("LlamaTokenizer"))
        };
        assert!(set.clean_up_tokenization_spaces());
    }
}
