//! Text ↔ token ids for the three families, reproducing the original Python tokenizers
//! (spec chatglm2.md §4, internlm2.md §5; Llama: transformers 4.44.2).
//!
//! A folder's `tokenizer.json` (HF tokenizers format) wins if present: its post-processor
//! adds what `encode` adds, decode skips its special tokens, and bos/eos are the
//! `bos_token`/`eos_token` of `tokenizer_config.json` (Llama-3: `<|begin_of_text|>`,
//! `<|eot_id|>`). Otherwise its SentencePiece `tokenizer.model` is read and the family's
//! wrapper rules are applied:
//! - ChatGLM2: five specials appended after the pieces (`[MASK] [gMASK] [sMASK] sop eop`),
//!   never recognised in text; `encode` prepends `[gMASK] sop`; decode as sentencepiece's
//!   `DecodePieces` (slow tokenizer, what `model.chat` uses).
//! - InternLM2: added tokens (`<s>`, `<|im_end|>`, …) are split out of the text literally
//!   before sentencepiece; `encode` prepends `<s>`; decode as the HF fast tokenizer with
//!   `skip_special_tokens=True` (what `model.chat` uses).
//! - Llama (Llama-2, Vicuna v1.5): the slow `LlamaTokenizer` (what FastChat uses) with the
//!   folder's `tokenizer_config.json` (rules in `llama.rs`): special and added tokens are
//!   split out of the text; `legacy: false` (Vicuna v1.5) puts one '▁' in front of the
//!   text and encodes the text between them without sentencepiece's dummy prefix, so text
//!   right after a special token starts no word (`"</s>USER"` → `</s> USER`); `legacy:
//!   true` (the default when unset) encodes it with the dummy prefix (`</s> ▁US ER`);
//!   `encode` adds `<s>` / `</s>` as `add_bos_token` / `add_eos_token` say; decode as
//!   `decode(ids, skip_special_tokens=True)`: specials vanish, the first token's '▁' goes,
//!   byte runs as sentencepiece.
//!
//! `decode` never applies transformers' `clean_up_tokenization`; whether the original does
//! is `clean_up_tokenization_spaces()`.

mod config;
mod decode;
mod llama;
mod sentencepiece;

use std::collections::HashMap;
use std::path::Path;

use config::{AddedToken, TokenSpec, TokenizerConfig};
pub use decode::StreamDecoder;
use decode::{ByteRuns, LeadingSpace, SpDecoder, Surface};
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
    clean_up_tokenization_spaces: bool,
}

/// Both boxed: large, and of different sizes.
enum Backend {
    Sp(Box<SpTokenizer>),
    Hf(Box<HfTokenizer>),
}

struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: u32,
}

struct SpTokenizer {
    model: SpModel,
    /// Token strings cut out of the text before sentencepiece runs, longest first
    /// (InternLM2's and Llama's added tokens; empty for ChatGLM2).
    split_tokens: Vec<SplitToken>,
    /// First bytes of `split_tokens`, to skip most positions quickly.
    split_first_bytes: [bool; 256],
    vocab: HashMap<String, u32>,
    vocab_size: usize,
    /// What `encode(.., add_special = true)` puts in front and after.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    bos: Option<u32>,
    eos: u32,
    decoder: SpDecoder,
    /// Llama's encoding rules; None: sentencepiece on the text between split tokens.
    llama: Option<llama::Rules>,
}

struct SplitToken {
    text: String,
    id: u32,
    /// Eats the whitespace on its left / right (Llama only).
    lstrip: bool,
    rstrip: bool,
    /// One of transformers' special tokens (Llama only: drops a lone '▁' before it).
    special: bool,
}

/// A stretch of text between split tokens, or a split token (index into `split_tokens`).
#[derive(Clone, Copy, Debug)]
enum Segment<'t> {
    Text(&'t str),
    Token(usize),
}

impl Tokenizer {
    /// Reads `tokenizer.json` if the folder has one (HF tokenizers format, loaded by the
    /// `tokenizers` crate), else `tokenizer.model`; both with `tokenizer_config.json`.
    pub fn from_folder(dir: &Path, family: Family) -> Result<Self> {
        let config = TokenizerConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let backend = if json.is_file() {
            let bytes = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
            let inner = tokenizers::Tokenizer::from_bytes(&bytes)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?;
            // The config's token, else the conventional name.
            let token = |name: &str, fallback: &str| match config.named(name).flatten() {
                Some(spec) => inner.token_to_id(&spec.content).map(Some).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{}: has no token {:?}, the {name} of tokenizer_config.json",
                        json.display(),
                        spec.content
                    ))
                }),
                None => Ok(inner.token_to_id(fallback)),
            };
            let bos = token("bos_token", "<s>")?;
            let eos = token("eos_token", "</s>")?.unwrap_or(2);
            tracing::debug!(path = %json.display(), ?bos, eos, "loaded tokenizer.json");
            Backend::Hf(Box::new(HfTokenizer { inner, bos, eos }))
        } else {
            let path = dir.join("tokenizer.model");
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let named = |e: String| Error::Tokenizer(format!("{}: {e}", path.display()));
            let model = SpModel::parse(&bytes).map_err(named)?;
            let sp = match family {
                Family::ChatGlm2 => SpTokenizer::chatglm2(model),
                Family::InternLm2 => SpTokenizer::internlm2(model, config.added_tokens.clone()),
                Family::Llama => llama::build(model, &config),
            }
            .map_err(named)?;
            tracing::debug!(path = %path.display(), pieces = sp.model.pieces.len(), "loaded tokenizer.model");
            Backend::Sp(Box::new(sp))
        };
        let clean_up_tokenization_spaces = config.clean_up_tokenization_spaces();
        Ok(Tokenizer { family, backend, clean_up_tokenization_spaces })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Token ids of `text`. `add_special`: ChatGLM2 prepends `[gMASK] sop`, InternLM2
    /// prepends `<s>`, Llama adds `<s>` / `</s>` as its config says (for tokenizer.json:
    /// its own post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Sp(sp) => {
                let mut ids = if add_special { sp.prefix.clone() } else { Vec::new() };
                sp.encode_into(text, &mut ids);
                if add_special {
                    ids.extend_from_slice(&sp.suffix);
                }
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
    /// `tokenizer.decode(ids)`, InternLM2 as the fast tokenizer's and Llama as the slow
    /// tokenizer's `decode(ids, skip_special_tokens=True)`; tokenizer.json with specials
    /// skipped. Never with `clean_up_tokenization` (see `clean_up_tokenization_spaces`).
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
            Backend::Sp(sp) => {
                let pieces = sp.model.pieces.iter().map(|p| p.text.len());
                pieces.chain(sp.split_tokens.iter().map(|t| t.text.len())).max().unwrap_or(1)
            }
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

    /// The end-of-sequence token: `</s>`, or tokenizer_config.json's `eos_token`
    /// (Llama-3: `<|eot_id|>`).
    pub fn eos_id(&self) -> u32 {
        match &self.backend {
            Backend::Sp(sp) => sp.eos,
            Backend::Hf(hf) => hf.eos,
        }
    }

    /// The beginning-of-sequence token (`<s>`, Llama-3's `<|begin_of_text|>`); None for
    /// ChatGLM2, whose prompts start with `[gMASK] sop` instead.
    pub fn bos_id(&self) -> Option<u32> {
        match &self.backend {
            Backend::Sp(sp) => sp.bos,
            Backend::Hf(hf) => hf.bos,
        }
    }

    /// Whether the original's `decode` applies transformers' `clean_up_tokenization`
    /// (`" ."` → `"."`, `" n't"` → `"n't"`, …): tokenizer_config.json's
    /// `clean_up_tokenization_spaces`, by default transformers 4.44.2's for the tokenizer
    /// class (false for these families' own classes, true for `PreTrainedTokenizerFast`).
    pub fn clean_up_tokenization_spaces(&self) -> bool {
        self.clean_up_tokenization_spaces
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
            leading_space: if model.add_dummy_prefix || model.remove_extra_whitespaces {
                LeadingSpace::WhileEmpty
            } else {
                LeadingSpace::Keep
            },
            strip_first_token: false,
            first_token_overrides: HashMap::new(),
        };
        Ok(SpTokenizer {
            split_tokens: Vec::new(),
            split_first_bytes: [false; 256],
            vocab,
            vocab_size: n as usize + CHATGLM2_SPECIALS.len(),
            prefix: vec![n + 1, n + 3], // [gMASK], sop
            suffix: Vec::new(),
            // The model's <s> is never used.
            bos: None,
            eos,
            decoder,
            model,
            llama: None,
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
        for AddedToken { id, token, special } in added {
            let content = token.content;
            let id = id as usize;
            if id >= model.pieces.len() {
                // InternLM2's added tokens all name pieces of the model.
                tracing::warn!(id, %content, "ignoring an added token past the SentencePiece vocabulary");
                continue;
            }
            if model.pieces[id].text != content {
                // Renamed: the HF tokenizer knows only the new name.
                if vocab.get(&model.pieces[id].text) == Some(&(id as u32)) {
                    vocab.remove(&model.pieces[id].text);
                }
                model.hide_piece_text(id as u32);
            }
            surfaces[id] = if special {
                Surface::Skip
            } else {
                Surface::Text { text: content.clone(), leading_space: false }
            };
            vocab.insert(content.clone(), id as u32);
            if !content.is_empty() {
                split_tokens.push(SplitToken {
                    text: content,
                    id: id as u32,
                    lstrip: false,
                    rstrip: false,
                    special,
                });
            }
        }
        let split_first_bytes = sort_split_tokens(&mut split_tokens);

        let decoder = SpDecoder {
            surfaces,
            out_of_range: Surface::Skip,
            byte_runs: ByteRuns::WholeRun,
            leading_space: LeadingSpace::Keep,
            strip_first_token: false,
            first_token_overrides: HashMap::new(),
        };
        Ok(SpTokenizer {
            split_tokens,
            split_first_bytes,
            vocab,
            vocab_size: decoder.surfaces.len(),
            prefix: vec![bos],
            suffix: Vec::new(),
            bos: Some(bos),
            eos,
            decoder,
            model,
            llama: None,
        })
    }

    /// Appends the ids of `text`: sentencepiece on the text between split tokens (Llama:
    /// `llama::encode`).
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        if let Some(rules) = &self.llama {
            return llama::encode(self, rules, text, out);
        }
        for segment in self.split(text) {
            match segment {
                Segment::Text(text) => self.model.encode(text, out),
                Segment::Token(k) => out.push(self.split_tokens[k].id),
            }
        }
    }

    /// `text` cut at the split tokens, the longest at the leftmost position first
    /// (transformers' trie); no empty text segments.
    fn split<'t>(&self, text: &'t str) -> Vec<Segment<'t>> {
        let mut segments = Vec::new();
        let bytes = text.as_bytes();
        let mut chunk_start = 0;
        let mut i = 0;
        while i < text.len() {
            if self.split_first_bytes[bytes[i] as usize]
                && text.is_char_boundary(i)
                && let Some(k) =
                    self.split_tokens.iter().position(|t| text[i..].starts_with(t.text.as_str()))
            {
                if chunk_start < i {
                    segments.push(Segment::Text(&text[chunk_start..i]));
                }
                segments.push(Segment::Token(k));
                i += self.split_tokens[k].text.len();
                chunk_start = i;
                continue;
            }
            i += 1;
        }
        if chunk_start < text.len() {
            segments.push(Segment::Text(&text[chunk_start..]));
        }
        segments
    }
}

/// Orders split tokens longest first (the longest match wins) and returns their first
/// bytes.
fn sort_split_tokens(tokens: &mut [SplitToken]) -> [bool; 256] {
    tokens.sort_by_key(|t| std::cmp::Reverse(t.text.len()));
    let mut first_bytes = [false; 256];
    for t in tokens.iter() {
        first_bytes[t.text.as_bytes()[0] as usize] = true;
    }
    first_bytes
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
    let added = |id: usize, content: &str| AddedToken {
        id: id as u32,
        token: TokenSpec { content: content.to_string(), lstrip: false, rstrip: false },
        special: true,
    };
    let mut tokens = Vec::new();
    for (i, p) in model.pieces.iter().enumerate() {
        let renamed = INTERNLM2_RENAMED.iter().find(|(old, _)| *old == p.text).map(|(_, new)| *new);
        if let Some(new) = renamed {
            tokens.push(added(i, new));
        } else if matches!(p.kind, PieceKind::Control | PieceKind::Unknown) {
            tokens.push(added(i, &p.text));
        }
    }
    tokens
}

fn hf_decode(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap_or_else(|e| {
        tracing::warn!("tokenizer.json decode failed: {e}");
        String::new()
    })
}
