//! SentencePiece `tokenizer.model`: the `ModelProto` messages (hand-written prost structs,
//! only the fields this crate reads; prost skips the rest) and a BPE encoder that follows
//! sentencepiece's own `bpe_model.cc`, so ids equal those of the Python tokenizers (both
//! originals call `SentencePieceProcessor.encode`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// `sentencepiece_model.proto`, `ModelProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// `Type` enum: NORMAL=1 (the proto default), UNKNOWN=2, CONTROL=3, USER_DEFINED=4,
    /// UNUSED=5, BYTE=6.
    #[prost(int32, optional, tag = "3")]
    pub kind: Option<i32>,
}

/// `TrainerSpec` (the fields that matter for encoding and the fixed ids; `split_digits` and
/// the other pre-tokenization options only shape training).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    /// UNIGRAM=1 (the proto default), BPE=2, WORD=3, CHAR=4.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "24")]
    pub treat_whitespace_as_suffix: Option<bool>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    pub bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    pub eos_id: Option<i32>,
}

/// `NormalizerSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}

const MODEL_TYPE_BPE: i32 = 2;

/// What sentencepiece writes for a space (U+2581).
pub const SPACE_SYMBOL: char = '\u{2581}';

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    /// A byte-fallback piece `<0xXX>` and its byte.
    Byte(u8),
}

#[derive(Clone, Debug)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// A parsed, validated sentencepiece BPE model.
#[derive(Debug)]
pub struct SpModel {
    pub pieces: Vec<Piece>,
    /// sentencepiece's `pieces_`: NORMAL, USER_DEFINED and UNUSED pieces, the only ones BPE
    /// merges may produce.
    mergeable: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces (`reserved_id_map_`), looked up first by
    /// `PieceToId`.
    reserved: HashMap<String, u32>,
    /// USER_DEFINED pieces by first character, longest first: matched atomically in the
    /// normalized text before merging (sentencepiece's prefix matcher).
    user_defined: HashMap<char, Vec<u32>>,
    byte_ids: Option<[u32; 256]>,
    pub unk_id: u32,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl SpModel {
    /// Parses and checks a `tokenizer.model`; the error says what is wrong, the caller adds
    /// the path.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        use prost::Message;
        let proto = ModelProto::decode(bytes)
            .map_err(|e| format!("not a valid SentencePiece model (corrupt or truncated): {e}"))?;
        // Serialization writes the pieces first, so a file cut short still decodes but
        // lacks the specs.
        let trainer = proto
            .trainer_spec
            .ok_or("not a valid SentencePiece model (truncated?): no trainer_spec")?;
        let normalizer = proto
            .normalizer_spec
            .ok_or("not a valid SentencePiece model (truncated?): no normalizer_spec")?;
        if proto.pieces.is_empty() {
            return Err("not a valid SentencePiece model: no pieces".into());
        }
        if proto.pieces.len() >= u32::MAX as usize {
            return Err("not a valid SentencePiece model: too many pieces".into());
        }
        let model_type = trainer.model_type.unwrap_or(1);
        if model_type != MODEL_TYPE_BPE {
            return Err(format!(
                "unsupported SentencePiece model_type {model_type} (only BPE = 2 is implemented)"
            ));
        }
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err("unsupported SentencePiece option treat_whitespace_as_suffix".into());
        }
        // Rules other than `identity` ship as a precompiled character map; applying it is
        // not implemented, and ignoring it would silently change ids.
        if normalizer.precompiled_charsmap.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(format!(
                "unsupported SentencePiece normalizer {:?} (only `identity` is implemented)",
                normalizer.name.as_deref().unwrap_or("")
            ));
        }
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);

        let mut pieces = Vec::with_capacity(proto.pieces.len());
        let mut mergeable = HashMap::with_capacity(proto.pieces.len());
        let mut reserved = HashMap::new();
        let mut user_defined: HashMap<char, Vec<u32>> = HashMap::new();
        let mut bytes_seen: [Option<u32>; 256] = [None; 256];
        let mut unk = None;
        for (i, p) in proto.pieces.into_iter().enumerate() {
            let id = i as u32;
            let text = p.piece.unwrap_or_default();
            if text.is_empty() {
                return Err(format!("not a valid SentencePiece model: piece {id} is empty"));
            }
            let kind = match p.kind.unwrap_or(1) {
                1 => PieceKind::Normal,
                2 => PieceKind::Unknown,
                3 => PieceKind::Control,
                4 => PieceKind::UserDefined,
                5 => PieceKind::Unused,
                6 => PieceKind::Byte(parse_byte_piece(&text).ok_or_else(|| {
                    format!("not a valid SentencePiece model: byte piece {id} is {text:?}")
                })?),
                t => {
                    return Err(format!(
                        "not a valid SentencePiece model: piece {id} has type {t}"
                    ));
                }
            };
            let map = match kind {
                PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused => &mut mergeable,
                _ => &mut reserved,
            };
            if map.insert(text.clone(), id).is_some() {
                return Err(format!(
                    "not a valid SentencePiece model: piece {text:?} is defined twice"
                ));
            }
            match kind {
                PieceKind::Unknown => unk = Some(id),
                PieceKind::UserDefined => user_defined
                    .entry(text.chars().next().unwrap_or_default())
                    .or_default()
                    .push(id),
                PieceKind::Byte(b) => bytes_seen[b as usize] = Some(id),
                _ => {}
            }
            pieces.push(Piece { text, score: p.score.unwrap_or(0.0), kind });
        }
        for ids in user_defined.values_mut() {
            ids.sort_by_key(|&id| std::cmp::Reverse(pieces[id as usize].text.len()));
        }
        let unk_id = unk.ok_or("not a valid SentencePiece model: no <unk> piece")?;
        let byte_ids = if byte_fallback {
            let mut ids = [0u32; 256];
            for (b, id) in bytes_seen.iter().enumerate() {
                ids[b] = id.ok_or_else(|| {
                    format!("not a valid SentencePiece model: byte_fallback is set but piece <0x{b:02X}> is missing")
                })?;
            }
            Some(ids)
        } else {
            None
        };
        let n = pieces.len();
        let fixed = |v: Option<i32>, default: i32| -> Option<u32> {
            let v = v.unwrap_or(default);
            (v >= 0 && (v as usize) < n).then_some(v as u32)
        };
        Ok(SpModel {
            mergeable,
            reserved,
            user_defined,
            byte_ids,
            unk_id,
            bos_id: fixed(trainer.bos_id, 1),
            eos_id: fixed(trainer.eos_id, 2),
            add_dummy_prefix: normalizer.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: normalizer.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: normalizer.escape_whitespaces.unwrap_or(true),
            pieces,
        })
    }

    /// sentencepiece's `PieceToId` without the unk fallback.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.reserved.get(piece).or_else(|| self.mergeable.get(piece)).copied()
    }

    /// Takes a piece's text out of encoding (no longer matched or merged to), for a piece
    /// the HF tokenizer renamed (InternLM2's `[UNUSED_TOKEN_146]` is `<|im_start|>` there).
    pub fn hide_piece_text(&mut self, id: u32) {
        let text = &self.pieces[id as usize].text;
        if self.mergeable.get(text) == Some(&id) {
            self.mergeable.remove(text);
        }
        if self.reserved.get(text) == Some(&id) {
            self.reserved.remove(text);
        }
        if let Some(ids) = text.chars().next().and_then(|c| self.user_defined.get_mut(&c)) {
            ids.retain(|&x| x != id);
        }
    }

    /// sentencepiece's normalizer for the `identity` rule: optional whitespace clean-up,
    /// spaces → '▁', dummy '▁' in front of non-empty input.
    fn normalize(&self, text: &str) -> String {
        let input = if self.remove_extra_whitespaces { text.trim_start_matches(' ') } else { text };
        if input.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces { SPACE_SYMBOL } else { ' ' };
        let mut out = String::with_capacity(input.len() + 8);
        if self.add_dummy_prefix {
            out.push(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        for c in input.chars() {
            if c == ' ' {
                if prev_space {
                    continue;
                }
                out.push(space);
            } else {
                out.push(c);
            }
            prev_space = self.remove_extra_whitespaces && c == ' ';
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.pop();
            }
        }
        out
    }

    /// Appends the ids of `text` (`SentencePieceProcessor.encode`, no bos/eos).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let norm = self.normalize(text);
        if norm.is_empty() {
            return;
        }
        let s = norm.as_str();

        // Initial symbols: user-defined pieces (frozen) or single characters.
        let mut syms: Vec<Symbol> = Vec::with_capacity(s.len());
        let mut pos = 0;
        while pos < s.len() {
            let rest = &s[pos..];
            let c = rest.chars().next().unwrap_or_default();
            let matched = self.user_defined.get(&c).and_then(|ids| {
                ids.iter()
                    .map(|&id| self.pieces[id as usize].text.as_str())
                    .find(|t| rest.starts_with(t))
                    .map(str::len)
            });
            let (len, freeze) = match matched {
                Some(len) => (len, true),
                None => (c.len_utf8(), false),
            };
            let i = syms.len();
            syms.push(Symbol {
                start: pos,
                end: pos + len,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if pos + len == s.len() { NONE } else { i + 1 },
                freeze,
            });
            pos += len;
        }

        // Greedy merges: always the best-scoring adjacent pair whose concatenation is a
        // piece, leftmost on ties.
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (&str, &str)> = HashMap::new();
        let mut add_pair = |syms: &[Symbol],
                            agenda: &mut BinaryHeap<Candidate>,
                            left: usize,
                            right: usize| {
            if left == NONE || right == NONE || syms[left].freeze || syms[right].freeze {
                return;
            }
            let piece = &s[syms[left].start..syms[right].end];
            let Some(&id) = self.mergeable.get(piece) else { return };
            let p = &self.pieces[id as usize];
            agenda.push(Candidate { score: p.score, left, right, size: piece.len() });
            if p.kind == PieceKind::Unused {
                rev_merge.insert(
                    piece,
                    (&s[syms[left].start..syms[left].end], &s[syms[right].start..syms[right].end]),
                );
            }
        };
        for i in 1..syms.len() {
            add_pair(&syms, &mut agenda, i - 1, i);
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            let (llen, rlen) = (syms[l].end - syms[l].start, syms[r].end - syms[r].start);
            // Stale entry: one side was merged away or has grown since.
            if llen == 0 || rlen == 0 || llen + rlen != top.size {
                continue;
            }
            syms[l].end = syms[r].end;
            syms[l].next = syms[r].next;
            if syms[r].next != NONE {
                let nn = syms[r].next;
                syms[nn].prev = l;
            }
            syms[r].start = syms[r].end;
            add_pair(&syms, &mut agenda, syms[l].prev, l);
            add_pair(&syms, &mut agenda, l, syms[l].next);
        }

        let mut i = 0;
        while i != NONE {
            self.resegment(&s[syms[i].start..syms[i].end], &rev_merge, out);
            i = syms[i].next;
        }
    }

    /// Emits a final symbol: UNUSED pieces are split back into the pair that formed them;
    /// text that is no piece becomes byte pieces (byte fallback) or unk.
    fn resegment(&self, w: &str, rev_merge: &HashMap<&str, (&str, &str)>, out: &mut Vec<u32>) {
        match self.piece_to_id(w) {
            Some(id) => {
                if self.pieces[id as usize].kind == PieceKind::Unused
                    && let Some(&(a, b)) = rev_merge.get(w)
                {
                    self.resegment(a, rev_merge, out);
                    self.resegment(b, rev_merge, out);
                    return;
                }
                out.push(id);
            }
            None => match &self.byte_ids {
                Some(byte_ids) => out.extend(w.bytes().map(|b| byte_ids[b as usize])),
                None => out.push(self.unk_id),
            },
        }
    }
}

const NONE: usize = usize::MAX;

struct Symbol {
    /// Byte range in the normalized text; empty once merged into its left neighbour.
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
    freeze: bool,
}

struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Candidate {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// `<0xAB>` → 0xAB.
fn parse_byte_piece(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
