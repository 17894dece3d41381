//! Text ↔ token ids for the two families, reproducing the original Python tokenizers
//! (spec chatglm2.md §4, internlm2.md §5).
//!
//! A folder's `tokenizer.json` (HF tokenizers format) wins if present; otherwise its
//! SentencePiece `tokenizer.model` is read and the family's wrapper rules are applied:
//! - ChatGLM2: five specials appended after the pieces (`[MASK] [gMASK] [sMASK] sop eop`),
//!   never recognised in text; `encode` prepends `[gMASK] sop`; decode as sentencepiece's
//!   `DecodePieces` (slow tokenizer, what `model.chat` uses).
//! - InternLM2: added tokens (`<s>`, `<|im_end|>`, …) are split out of the text literally
//!   before sentencepiece; `encode` prepends `<s>`; decode as the HF fast tokenizer with
//!   `skip_special_tokens=True` (what `model.chat` uses).

mod decode;
mod sentencepiece;

use std::collections::HashMap;
use std::path::Path;

pub use decode::StreamDecoder;
use decode::{ByteRuns, SpDecoder, Surface};
use sentencepiece::{PieceKind, SPACE_SYMBOL, SpModel};

use crate::model::Family;
use crate::{Error, Result};

/// ChatGLM2's wrapper tokens, ids `piece count + k` in this order.
const CHATGLM2_SPECIALS: [&str; 5] = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"];

/// InternLM2's `tokenizer_config.json` exposes these user-defined pieces under new names;
/// used when the folder has no `added_tokens_decoder` to read them from.
const INTERNLM2_RENAMED: [(&str, &str); 6] = [
    ("[UNUSED_TOKEN_141]", "<|plugin|>"),
    ("[UNUSED_TOKEN_142]", "<|interpreter|>"),
    ("[UNUSED_TOKEN_143]", "<|action_end|>"),
    ("[UNUSED_TOKEN_144]", "<|action_start|>"),
    ("[UNUSED_TOKEN_145]", "<|im_end|>"),
    ("[UNUSED_TOKEN_146]", "<|im_start|>"),
];

pub struct Tokenizer {
    family: Family,
    backend: Backend,
}

enum Backend {
    Sp(SpTokenizer),
    Hf(HfTokenizer),
}

struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
}

struct SpTokenizer {
    model: SpModel,
    /// Token strings cut out of the text before sentencepiece runs, longest first
    /// (InternLM2's added tokens; empty for ChatGLM2).
    split_tokens: Vec<(String, u32)>,
    /// First bytes of `split_tokens`, to skip most positions quickly.
    split_first_bytes: [bool; 256],
    vocab: HashMap<String, u32>,
    vocab_size: usize,
    /// What `encode(.., add_special = true)` puts in front.
    prefix: Vec<u32>,
    eos: u32,
    decoder: SpDecoder,
}

/// One `added_tokens_decoder` entry of `tokenizer_config.json`.
struct AddedToken {
    id: u32,
    content: String,
    special: bool,
}

impl Tokenizer {
    /// Reads `tokenizer.json` if the folder has one (HF tokenizers format, loaded by the
    /// `tokenizers` crate), else `tokenizer.model`.
    pub fn from_folder(dir: &Path, family: Family) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let backend = if json.is_file() {
            let bytes = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
            let inner = tokenizers::Tokenizer::from_bytes(&bytes)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
            let eos = inner.token_to_id("</s>").unwrap_or(2);
            tracing::debug!(path = %json.display(), "loaded tokenizer.json");
            Backend::Hf(HfTokenizer { inner, eos })
        } else {
            let path = dir.join("tokenizer.model");
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let named = |e: String| Error::Tokenizer(format!("{}: {e}", path.display()));
            let model = SpModel::parse(&bytes).map_err(named)?;
            let sp = match family {
                Family::ChatGlm2 => SpTokenizer::chatglm2(model),
                Family::InternLm2 => SpTokenizer::internlm2(model, read_added_tokens(dir)?),
                Family::Llama => Err("the Llama SentencePiece tokenizer is not built yet".into()),
            }
            .map_err(named)?;
            tracing::debug!(path = %path.display(), pieces = sp.model.pieces.len(), "loaded tokenizer.model");
            Backend::Sp(sp)
        };
        Ok(Tokenizer { family, backend })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Token ids of `text`. `add_special`: ChatGLM2 prepends `[gMASK] sop`, InternLM2
    /// prepends `<s>` (for tokenizer.json: its own post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Sp(sp) => {
                let mut ids = if add_special { sp.prefix.clone() } else { Vec::new() };
                sp.encode_into(text, &mut ids);
                Ok(ids)
            }
            Backend::Hf(hf) => hf
                .inner
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(format!("encode: {e}"))),
        }
    }

    /// The text of `ids` as the original chat code decodes it: ChatGLM2 as its
    /// `tokenizer.decode(ids)`, InternLM2 as the fast tokenizer's
    /// `decode(ids, skip_special_tokens=True)`; tokenizer.json with specials skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.backend {
            Backend::Sp(sp) => sp.decoder.decode(ids),
            Backend::Hf(hf) => hf_decode(&hf.inner, ids),
        }
    }

    /// Number of ids the tokenizer can produce (ChatGLM2: pieces + 5 specials).
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Sp(sp) => sp.vocab_size,
            Backend::Hf(hf) => hf.inner.get_vocab_size(true),
        }
    }

    /// The most bytes of text one token stands for (its longest piece): an input of N
    /// tokens is at most N times this long.
    pub fn max_piece_bytes(&self) -> usize {
        match &self.backend {
            Backend::Sp(sp) => sp.model.pieces.iter().map(|p| p.text.len()).max().unwrap_or(1),
            Backend::Hf(hf) => hf.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1),
        }
    }

    /// Id of a token string: a piece, or a special token name (`[gMASK]`, `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Sp(sp) => sp.vocab.get(token).copied(),
            Backend::Hf(hf) => hf.inner.token_to_id(token),
        }
    }

    /// `</s>`.
    pub fn eos_id(&self) -> u32 {
        match &self.backend {
            Backend::Sp(sp) => sp.eos,
            Backend::Hf(hf) => hf.eos,
        }
    }

    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The ids of those of `tokens` this tokenizer knows, each with its text.
    pub fn known_tokens(&self, tokens: &[&str]) -> Vec<(u32, String)> {
        tokens.iter().filter_map(|t| Some((self.token_to_id(t)?, t.to_string()))).collect()
    }
}

impl SpTokenizer {
    fn chatglm2(model: SpModel) -> std::result::Result<Self, String> {
        let n = model.pieces.len() as u32;
        let eos = model.eos_id.ok_or("the model has no eos piece")?;
        // The wrapper maps these to "" (and the specials, which the model lacks).
        let empty_ids = [Some(model.unk_id), model.bos_id, Some(eos)];

        let mut vocab: HashMap<String, u32> =
            model.pieces.iter().enumerate().map(|(i, p)| (p.text.clone(), i as u32)).collect();
        for (k, name) in CHATGLM2_SPECIALS.iter().enumerate() {
            vocab.insert(name.to_string(), n + k as u32);
        }

        let empty = || Surface::Text { text: String::new(), leading_space: false };
        let mut surfaces: Vec<Surface> = model
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| match p.kind {
                _ if empty_ids.contains(&Some(i as u32)) => empty(),
                PieceKind::Byte(b) => Surface::Byte(b),
                PieceKind::Control | PieceKind::Unknown => empty(),
                _ => text_surface(&p.text),
            })
            .collect();
        surfaces.extend(CHATGLM2_SPECIALS.iter().map(|_| empty()));

        let decoder = SpDecoder {
            surfaces,
            // The original raises on such ids; writing nothing is the harmless equivalent.
            out_of_range: empty(),
            byte_runs: ByteRuns::PerByte,
            strip_leading_space: model.add_dummy_prefix || model.remove_extra_whitespaces,
        };
        Ok(SpTokenizer {
            split_tokens: Vec::new(),
            split_first_bytes: [false; 256],
            vocab,
            vocab_size: n as usize + CHATGLM2_SPECIALS.len(),
            prefix: vec![n + 1, n + 3], // [gMASK], sop
            eos,
            decoder,
            model,
        })
    }

    fn internlm2(
        mut model: SpModel,
        added: Option<Vec<AddedToken>>,
    ) -> std::result::Result<Self, String> {
        let bos = model.bos_id.ok_or("the model has no bos piece")?;
        let eos = model.eos_id.ok_or("the model has no eos piece")?;
        let added = added.unwrap_or_else(|| default_internlm2_added(&model));

        let mut vocab: HashMap<String, u32> =
            model.pieces.iter().enumerate().map(|(i, p)| (p.text.clone(), i as u32)).collect();
        let mut surfaces: Vec<Surface> = model
            .pieces
            .iter()
            .map(|p| match p.kind {
                PieceKind::Byte(b) => Surface::Byte(b),
                PieceKind::Control | PieceKind::Unknown => Surface::Skip,
                _ => text_surface(&p.text),
            })
            .collect();
        let mut split_tokens = Vec::new();
        for t in added {
            let id = t.id as usize;
            if id >= model.pieces.len() {
                // InternLM2's added tokens all name pieces of the model.
                tracing::warn!(id, content = %t.content, "ignoring an added token past the SentencePiece vocabulary");
                continue;
            }
            if model.pieces[id].text != t.content {
                // Renamed: the HF tokenizer knows only the new name.
                if vocab.get(&model.pieces[id].text) == Some(&t.id) {
                    vocab.remove(&model.pieces[id].text);
                }
                model.hide_piece_text(t.id);
            }
            surfaces[id] = if t.special {
                Surface::Skip
            } else {
                Surface::Text { text: t.content.clone(), leading_space: false }
            };
            vocab.insert(t.content.clone(), t.id);
            if !t.content.is_empty() {
                split_tokens.push((t.content, t.id));
            }
        }
        split_tokens.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let mut split_first_bytes = [false; 256];
        for (s, _) in &split_tokens {
            split_first_bytes[s.as_bytes()[0] as usize] = true;
        }

        let decoder = SpDecoder {
            surfaces,
            out_of_range: Surface::Skip,
            byte_runs: ByteRuns::WholeRun,
            strip_leading_space: false,
        };
        Ok(SpTokenizer {
            split_tokens,
            split_first_bytes,
            vocab,
            vocab_size: decoder.surfaces.len(),
            prefix: vec![bos],
            eos,
            decoder,
            model,
        })
    }

    /// Appends the ids of `text`: sentencepiece on the text between split tokens.
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut chunk_start = 0;
        let mut i = 0;
        while i < text.len() {
            if self.split_first_bytes[bytes[i] as usize]
                && text.is_char_boundary(i)
                && let Some((tok, id)) =
                    self.split_tokens.iter().find(|(t, _)| text[i..].starts_with(t.as_str()))
            {
                self.model.encode(&text[chunk_start..i], out);
                out.push(*id);
                i += tok.len();
                chunk_start = i;
                continue;
            }
            i += 1;
        }
        self.model.encode(&text[chunk_start..], out);
    }
}

/// A piece as text: '▁' → ' '.
fn text_surface(piece: &str) -> Surface {
    Surface::Text {
        text: piece.replace(SPACE_SYMBOL, " "),
        leading_space: piece.starts_with(SPACE_SYMBOL),
    }
}

/// InternLM2's added tokens when the folder does not list them: the model's control and
/// unknown pieces plus the six renamed user-defined pieces, all special.
fn default_internlm2_added(model: &SpModel) -> Vec<AddedToken> {
    let mut added = Vec::new();
    for (i, p) in model.pieces.iter().enumerate() {
        let renamed = INTERNLM2_RENAMED.iter().find(|(old, _)| *old == p.text).map(|(_, new)| *new);
        if let Some(new) = renamed {
            added.push(AddedToken { id: i as u32, content: new.to_string(), special: true });
        } else if matches!(p.kind, PieceKind::Control | PieceKind::Unknown) {
            added.push(AddedToken { id: i as u32, content: p.text.clone(), special: true });
        }
    }
    added
}

/// `added_tokens_decoder` of the folder's `tokenizer_config.json`, if it has one.
fn read_added_tokens(dir: &Path) -> Result<Option<Vec<AddedToken>>> {
    let path = dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let bad = |what: String| Error::Tokenizer(format!("{}: {what}", path.display()));
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Some(entries) = config.get("added_tokens_decoder").and_then(|v| v.as_object()) else {
        return Ok(None);
    };
    let mut added = Vec::with_capacity(entries.len());
    for (key, entry) in entries {
        let id = key
            .parse::<u32>()
            .map_err(|_| bad(format!("added_tokens_decoder key {key:?} is not an id")))?;
        let content = entry
            .get("content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad(format!("added_tokens_decoder[{key}] has no content")))?;
        let special = entry.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        added.push(AddedToken { id, content: content.to_string(), special });
    }
    Ok(Some(added))
}

fn hf_decode(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap_or_else(|e| {
        tracing::warn!("tokenizer.json decode failed: {e}");
        String::new()
    })
}
