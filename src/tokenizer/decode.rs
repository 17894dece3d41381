//! Ids → text, whole (`Tokenizer::decode`) or one id at a time (`StreamDecoder`), with one
//! state machine for both so that the streamed pieces always add up to the full decode.

use std::collections::HashMap;

use super::{Backend, Tokenizer};

/// What one id contributes to the text.
#[derive(Clone, Debug)]
pub(crate) enum Surface {
    /// Vanishes before byte runs are joined (skipped special tokens).
    Skip,
    /// Text ('▁' already turned into ' '); ends a byte run even when empty.
    /// `leading_space`: the piece starts with '▁', which the decode may drop at the start
    /// (`LeadingSpace`, `strip_first_token`).
    Text { text: String, leading_space: bool },
    /// A byte-fallback piece.
    Byte(u8),
    /// A non-special added token of transformers' slow tokenizers: written as is, and the
    /// pieces after it are decoded as a new text (the pieces on each side of one are
    /// decoded by separate sentencepiece calls).
    Added(String),
}

/// Which '▁' of the first pieces the sentencepiece decode drops (its `is_bos_ws`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeadingSpace {
    /// None: the model adds no dummy prefix.
    Keep,
    /// That of every piece decoded while nothing has been written (ChatGLM2).
    WhileEmpty,
    /// sentencepiece 0.2's `Decode` on a dummy-prefix model: that of the first piece that
    /// starts with one while nothing has been written, and no later one.
    Once,
}

/// How a run of consecutive byte pieces becomes text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ByteRuns {
    /// sentencepiece's `DecodePieces` (ChatGLM2's slow tokenizer): character by character,
    /// one U+FFFD per byte that does not start a valid character.
    PerByte,
    /// HF's `ByteFallback` decoder (InternLM2's fast tokenizer, what `model.chat` uses): the
    /// run as a whole if it is valid UTF-8, otherwise one U+FFFD per byte of the run.
    WholeRun,
}

/// Per-id surfaces and the rules of one sentencepiece-based tokenizer.
#[derive(Debug)]
pub(crate) struct SpDecoder {
    pub surfaces: Vec<Surface>,
    /// For ids past the table (e.g. ids of padded logits rows).
    pub out_of_range: Surface,
    pub byte_runs: ByteRuns,
    pub leading_space: LeadingSpace,
    /// transformers' Llama `convert_tokens_to_string` (`add_prefix_space`): the first
    /// token's '▁' goes before sentencepiece decodes, as the one the encoder put in front.
    pub strip_first_token: bool,
    /// What sentencepiece makes of a first token once that '▁' is gone, where it is not
    /// simply the rest of the piece (the rest is no piece, or a control or unknown one).
    pub first_token_overrides: HashMap<u32, String>,
}

impl SpDecoder {
    fn surface(&self, id: u32) -> &Surface {
        self.surfaces.get(id as usize).unwrap_or(&self.out_of_range)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut state = SpState::default();
        let mut out = String::new();
        for &id in ids {
            state.push(self, id, &mut out, false);
        }
        state.flush(self, &mut out);
        out
    }
}

#[derive(Debug)]
pub(crate) struct SpState {
    /// Bytes of the open byte run not yet written.
    bytes: Vec<u8>,
    /// Whether the current text (since the start or the last `Added`) has any characters.
    written: bool,
    /// Whether the current text has had a token (ends `strip_first_token`).
    started: bool,
    /// sentencepiece's `is_bos_ws` and `bos_ws_seen` (`LeadingSpace::Once`).
    is_bos_ws: bool,
    bos_ws_seen: bool,
}

impl Default for SpState {
    fn default() -> Self {
        SpState {
            bytes: Vec::new(),
            written: false,
            started: false,
            is_bos_ws: true,
            bos_ws_seen: false,
        }
    }
}

impl SpState {
    /// Appends what `id` makes final. `streaming`: in `PerByte` mode write the complete
    /// characters of an open byte run at once (their text cannot change any more).
    fn push(&mut self, dec: &SpDecoder, id: u32, out: &mut String, streaming: bool) {
        let start = out.len();
        match dec.surface(id) {
            Surface::Skip => {}
            Surface::Byte(b) => {
                self.started = true;
                self.bytes.push(*b);
                if streaming && dec.byte_runs == ByteRuns::PerByte {
                    let used = decode_bytes_per_byte(&self.bytes, out, false);
                    self.bytes.drain(..used);
                }
            }
            Surface::Added(text) => {
                self.flush(dec, out);
                out.push_str(text);
                *self = SpState::default();
                return;
            }
            Surface::Text { text, leading_space } => {
                self.flush(dec, out);
                self.written |= out.len() > start;
                let (mut text, mut leading) = (text.as_str(), *leading_space);
                if dec.strip_first_token && !self.started && leading {
                    if let Some(t) = dec.first_token_overrides.get(&id) {
                        (text, leading) = (t, false);
                    } else {
                        text = &text[1..];
                        leading = text.starts_with(' ');
                    }
                }
                self.started = true;
                let strip = match dec.leading_space {
                    LeadingSpace::Keep => false,
                    LeadingSpace::WhileEmpty => leading && !self.written,
                    LeadingSpace::Once => {
                        if self.bos_ws_seen || self.written {
                            self.is_bos_ws = false;
                        }
                        self.bos_ws_seen = self.is_bos_ws && leading;
                        self.bos_ws_seen
                    }
                };
                out.push_str(if strip { &text[1..] } else { text });
            }
        }
        self.written |= out.len() > start;
    }

    /// Closes the open byte run.
    fn flush(&mut self, dec: &SpDecoder, out: &mut String) {
        if self.bytes.is_empty() {
            return;
        }
        match dec.byte_runs {
            ByteRuns::PerByte => {
                decode_bytes_per_byte(&self.bytes, out, true);
            }
            ByteRuns::WholeRun => match std::str::from_utf8(&self.bytes) {
                Ok(s) => out.push_str(s),
                Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', self.bytes.len())),
            },
        }
        self.bytes.clear();
        self.written = true;
    }
}

/// sentencepiece's byte-run decoding: at each position one valid character, or one U+FFFD
/// for a byte that starts none. Unless `closed`, stops before a tail that later bytes could
/// still complete; returns the number of bytes consumed.
fn decode_bytes_per_byte(bytes: &[u8], out: &mut String, closed: bool) -> usize {
    let mut i = 0;
    while i < bytes.len() {
        let len = match bytes[i] {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 0,
        };
        if len > 0 && i + len <= bytes.len() {
            if let Ok(s) = std::str::from_utf8(&bytes[i..i + len]) {
                out.push_str(s);
                i += len;
                continue;
            }
        } else if len > 0 && !closed {
            // `error_len() == None`: a valid character so far, only cut short.
            if std::str::from_utf8(&bytes[i..]).is_err_and(|e| e.error_len().is_none()) {
                break;
            }
        }
        out.push('\u{FFFD}');
        i += 1;
    }
    i
}

/// Incremental detokenizer: feed generated ids one by one; the concatenation of everything
/// `push` and `finish` return equals `Tokenizer::decode` of all the ids.
pub struct StreamDecoder<'a> {
    inner: Stream<'a>,
    /// Special tokens written as their text instead of skipped (`show`).
    shown: Vec<(u32, String)>,
}

enum Stream<'a> {
    Sp {
        decoder: &'a SpDecoder,
        state: SpState,
    },
    /// tokenizer.json: re-decode a window of ids and emit what it adds once the window no
    /// longer ends in U+FFFD (an unfinished character). `prefix..read` is the part already
    /// emitted; keeping it in the window keeps context-dependent decoders (space
    /// stripping) consistent with the full decode.
    Hf {
        tokenizer: &'a tokenizers::Tokenizer,
        ids: Vec<u32>,
        prefix: usize,
        read: usize,
    },
}

impl<'a> StreamDecoder<'a> {
    pub(super) fn new(tokenizer: &'a Tokenizer) -> Self {
        let inner = match &tokenizer.backend {
            Backend::Sp(sp) => Stream::Sp { decoder: &sp.decoder, state: SpState::default() },
            Backend::Hf(hf) => {
                Stream::Hf { tokenizer: &hf.inner, ids: Vec::new(), prefix: 0, read: 0 }
            }
        };
        StreamDecoder { inner, shown: Vec::new() }
    }

    /// Writes these special tokens as their text (`decode(.., skip_special_tokens=False)`
    /// for them alone): the text before one is closed as the full decode would close it
    /// at that point, then the token's text follows.
    pub fn show(mut self, specials: Vec<(u32, String)>) -> Self {
        self.shown = specials;
        self
    }
}

impl StreamDecoder<'_> {
    /// Feeds one generated id; returns the text that became final (possibly empty). Never
    /// returns part of a character or of an unfinished byte-fallback run.
    pub fn push(&mut self, id: u32) -> String {
        if let Some((_, text)) = self.shown.iter().find(|(shown, _)| *shown == id) {
            let text = text.clone();
            let mut out = self.finish();
            out.push_str(&text);
            if let Stream::Sp { state, .. } = &mut self.inner {
                state.written = true;
            }
            return out;
        }
        match &mut self.inner {
            Stream::Sp { decoder, state } => {
                let mut out = String::new();
                state.push(decoder, id, &mut out, true);
                out
            }
            Stream::Hf { tokenizer, ids, prefix, read } => {
                ids.push(id);
                let before = super::hf_decode(tokenizer, &ids[*prefix..*read]);
                let now = super::hf_decode(tokenizer, &ids[*prefix..]);
                if now.len() > before.len()
                    && now.starts_with(&before)
                    && !now.ends_with('\u{FFFD}')
                {
                    *prefix = *read;
                    *read = ids.len();
                    now[before.len()..].to_string()
                } else {
                    String::new()
                }
            }
        }
    }

    /// Ends the stream: the text still held back (an unfinished byte run decodes as in the
    /// full decode, to U+FFFD).
    pub fn finish(&mut self) -> String {
        match &mut self.inner {
            Stream::Sp { decoder, state } => {
                let mut out = String::new();
                state.flush(decoder, &mut out);
                out
            }
            Stream::Hf { tokenizer, ids, prefix, read } => {
                let before = super::hf_decode(tokenizer, &ids[*prefix..*read]);
                let now = super::hf_decode(tokenizer, &ids[*prefix..]);
                *prefix = ids.len();
                *read = ids.len();
                match now.strip_prefix(before.as_str()) {
                    Some(rest) => rest.to_string(),
                    None => {
                        tracing::warn!(
                            "stream decode: the last window does not extend the emitted text"
                        );
                        String::new()
                    }
                }
            }
        }
    }
}
