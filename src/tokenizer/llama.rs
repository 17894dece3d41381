//! Llama's SentencePiece tokenizer as transformers 4.44.2's slow `LlamaTokenizer` (what
//! FastChat loads for Vicuna and Llama-2) behaves with a folder's `tokenizer_config.json`.
//!
//! Encode (`tokenize`, `_tokenize`): the added tokens (the config's `added_tokens_decoder`
//! and the special tokens `<s>`, `</s>`, `<unk>`, …) are split out of the text, honouring
//! their `lstrip`/`rstrip`. `legacy: true` (transformers' default when the key is unset)
//! encodes the text between them with the model as it is, dummy prefix included, so text
//! after a special token starts a new word (`"</s>USER"` → `</s> ▁US ER`). `legacy: false`
//! loads the model without the dummy prefix; a literal '▁' in the text becomes a space and
//! one '▁' is put in front (`add_prefix_space`); text that starts with a space is encoded
//! behind the unk token's text whose pieces are then dropped (sentencepiece would otherwise
//! treat the space as its own); a lone leading '▁' right before a special token is dropped
//! (`"</s>USER"` → `</s> USER`).
//!
//! Decode (`decode(ids, skip_special_tokens=True)`): special tokens vanish (byte runs join
//! across them); the first token loses a leading '▁' (`add_prefix_space`); the rest is
//! sentencepiece's `Decode` of the remaining pieces, which on a dummy-prefix model (legacy)
//! also drops the '▁' of its first piece; non-special added tokens are written as they are.

use std::collections::{HashMap, HashSet};

use super::config::{NAMED_SPECIALS, TokenSpec, TokenizerConfig};
use super::decode::{ByteRuns, LeadingSpace, SpDecoder, Surface};
use super::sentencepiece::{PieceKind, SPACE_SYMBOL, SpModel};
use super::{Segment, SpTokenizer, SplitToken, sort_split_tokens, text_surface};

/// The defaults of `LlamaTokenizer.__init__` for the tokens the config does not name.
const DEFAULT_SPECIALS: [(&str, &str); 3] =
    [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")];

/// sentencepiece's default `unk_surface`.
const UNK_SURFACE: &str = " \u{2047} ";

pub(super) struct Rules {
    legacy: bool,
    add_prefix_space: bool,
    /// The unk token's text and how many ids sentencepiece makes of it (non-legacy
    /// `_tokenize`).
    unk_text: String,
    unk_ids: usize,
    /// The "▁" piece.
    space_id: Option<u32>,
}

pub(super) fn build(
    mut model: SpModel,
    config: &TokenizerConfig,
) -> std::result::Result<SpTokenizer, String> {
    let legacy = config.legacy.unwrap_or_else(|| {
        tracing::info!(
            "tokenizer_config.json sets no `legacy`: Llama's legacy encoding, transformers' default"
        );
        true
    });
    if !legacy {
        // `get_spm_processor`: the model is loaded with `add_dummy_prefix = False`.
        model.add_dummy_prefix = false;
    }
    let add_prefix_space = config.add_prefix_space.unwrap_or(true);

    // `get_vocab`: the pieces (a later duplicate wins, as in the dict), then the added tokens.
    let mut vocab: HashMap<String, u32> =
        model.pieces.iter().enumerate().map(|(i, p)| (p.text.clone(), i as u32)).collect();
    let mut added: Vec<(TokenSpec, u32)> = Vec::new();
    for t in config.added_tokens.iter().flatten() {
        vocab.insert(t.token.content.clone(), t.id);
        added.push((t.token.clone(), t.id));
    }
    // The special tokens (`all_special_tokens_extended`); `_add_tokens` gives those not
    // yet added the id of their piece, or the next new id.
    let mut specials: Vec<TokenSpec> = Vec::new();
    for name in NAMED_SPECIALS {
        let default = DEFAULT_SPECIALS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| TokenSpec { content: text.to_string(), lstrip: false, rstrip: false });
        match config.named(name) {
            Some(spec) => specials.extend(spec.cloned()),
            None => specials.extend(default),
        }
    }
    specials.extend(config.additional_special_tokens.iter().cloned());
    specials.retain(|t| !t.content.is_empty());
    let mut next_id = vocab.len() as u32;
    for spec in &specials {
        if added.iter().any(|(t, _)| t.content == spec.content) {
            continue;
        }
        let id = *vocab.entry(spec.content.clone()).or_insert_with(|| {
            next_id += 1;
            next_id - 1
        });
        added.push((spec.clone(), id));
    }
    let special_texts: HashSet<&str> = specials.iter().map(|t| t.content.as_str()).collect();
    let id_of = |name: &str| {
        let default = DEFAULT_SPECIALS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text);
        config.named_or(name, default).and_then(|text| vocab.get(text).copied())
    };
    let bos = id_of("bos_token");
    let eos = id_of("eos_token")
        .or(model.eos_id)
        .ok_or("the model has no eos piece and tokenizer_config.json names no eos_token")?;

    let mut split_tokens: Vec<SplitToken> = added
        .iter()
        .filter(|(t, _)| !t.content.is_empty())
        .map(|(t, id)| SplitToken {
            text: t.content.clone(),
            id: *id,
            lstrip: t.lstrip,
            rstrip: t.rstrip,
            special: special_texts.contains(t.content.as_str()),
        })
        .collect();
    let split_first_bytes = sort_split_tokens(&mut split_tokens);

    let vocab_size =
        added.iter().map(|(_, id)| *id as usize + 1).fold(model.pieces.len(), usize::max);
    let mut surfaces: Vec<Surface> = model
        .pieces
        .iter()
        .map(|p| match p.kind {
            PieceKind::Byte(b) => Surface::Byte(b),
            PieceKind::Control => Surface::Text { text: String::new(), leading_space: false },
            PieceKind::Unknown => Surface::Text { text: UNK_SURFACE.into(), leading_space: false },
            _ => text_surface(&p.text),
        })
        .collect();
    // Ids between the pieces and the added tokens: the original raises; write nothing.
    surfaces.resize(vocab_size, Surface::Skip);
    for (t, id) in &added {
        surfaces[*id as usize] = if special_texts.contains(t.content.as_str()) {
            Surface::Skip
        } else {
            Surface::Added(t.content.clone())
        };
    }

    let decoder = SpDecoder {
        first_token_overrides: first_token_overrides(&model, &surfaces),
        surfaces,
        out_of_range: Surface::Skip,
        byte_runs: ByteRuns::PerByte,
        leading_space: if model.remove_extra_whitespaces {
            LeadingSpace::WhileEmpty
        } else if model.add_dummy_prefix {
            LeadingSpace::Once
        } else {
            LeadingSpace::Keep
        },
        strip_first_token: add_prefix_space,
    };

    let unk_text = config.named_or("unk_token", Some("<unk>")).unwrap_or_default().to_string();
    let mut unk_ids = Vec::new();
    model.encode(&unk_text, &mut unk_ids);
    let rules = Rules {
        legacy,
        add_prefix_space,
        unk_text,
        unk_ids: unk_ids.len(),
        space_id: model.piece_to_id(&SPACE_SYMBOL.to_string()),
    };
    Ok(SpTokenizer {
        prefix: bos.filter(|_| config.add_bos_token.unwrap_or(true)).into_iter().collect(),
        suffix: if config.add_eos_token.unwrap_or(false) { vec![eos] } else { Vec::new() },
        bos,
        eos,
        split_tokens,
        split_first_bytes,
        vocab,
        vocab_size,
        decoder,
        model,
        llama: Some(rules),
    })
}

/// Where sentencepiece decodes a first token without its '▁' otherwise than as the rest of
/// the piece: `convert_tokens_to_string` hands it the rest as a string, which it looks up
/// again; a rest that is no piece comes out as it is ('▁' included), a control piece as
/// nothing, the unk piece as its surface.
fn first_token_overrides(model: &SpModel, surfaces: &[Surface]) -> HashMap<u32, String> {
    let mut overrides = HashMap::new();
    for (id, piece) in model.pieces.iter().enumerate() {
        let Some(rest) = piece.text.strip_prefix(SPACE_SYMBOL) else { continue };
        if rest.is_empty() || !matches!(surfaces[id], Surface::Text { .. }) {
            continue;
        }
        let text = match model.piece_to_id(rest).map(|r| model.pieces[r as usize].kind) {
            Some(PieceKind::Control) => String::new(),
            Some(PieceKind::Unknown) => UNK_SURFACE.into(),
            None if rest.contains(SPACE_SYMBOL) => rest.to_string(),
            _ => continue,
        };
        overrides.insert(id as u32, text);
    }
    overrides
}

/// Appends the ids of `text` (`tokenize` + `convert_tokens_to_ids`, no bos/eos).
pub(super) fn encode(sp: &SpTokenizer, rules: &Rules, text: &str, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let prepared;
    let text = if rules.legacy {
        text
    } else {
        let mut s = String::with_capacity(text.len() + 3);
        if rules.add_prefix_space {
            s.push(SPACE_SYMBOL);
        }
        s.push_str(&text.replace(SPACE_SYMBOL, " "));
        prepared = s;
        &prepared
    };
    let mut segments = sp.split(text);
    for k in 0..segments.len() {
        let Segment::Token(t) = segments[k] else { continue };
        let token = &sp.split_tokens[t];
        if token.rstrip
            && let Some(Segment::Text(right)) = segments.get_mut(k + 1)
        {
            *right = right.trim_start_matches(is_python_space);
        }
        if token.lstrip
            && k > 0
            && let Some(Segment::Text(left)) = segments.get_mut(k - 1)
        {
            *left = left.trim_end_matches(is_python_space);
        }
    }

    let start = out.len();
    let mut special_second = false;
    for segment in segments {
        match segment {
            Segment::Text(chunk) => encode_chunk(sp, rules, chunk, out),
            Segment::Token(t) => {
                let token = &sp.split_tokens[t];
                special_second |= token.special && out.len() == start + 1;
                out.push(token.id);
            }
        }
    }
    // A '▁' alone before a special token: the one put in front, or a space before it.
    if !rules.legacy && special_second && rules.space_id == Some(out[start]) {
        out.remove(start);
    }
}

/// `_tokenize` of the text between two split tokens.
fn encode_chunk(sp: &SpTokenizer, rules: &Rules, chunk: &str, out: &mut Vec<u32>) {
    if rules.legacy || !chunk.starts_with([SPACE_SYMBOL, ' ']) {
        sp.model.encode(chunk, out);
        return;
    }
    // The unk token's pieces keep the leading '▁' a word start, then go.
    let mut ids = Vec::new();
    sp.model.encode(&format!("{}{chunk}", rules.unk_text), &mut ids);
    let drop = if ids.len() >= rules.unk_ids { rules.unk_ids } else { 0 };
    out.extend_from_slice(&ids[drop..]);
}

/// Python's `str.isspace` (what `lstrip`/`rstrip` strip): Unicode whitespace and the ASCII
/// separators U+001C–U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}
