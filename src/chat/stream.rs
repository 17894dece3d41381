//! Generated ids → the answer text a client sees, piece by piece: detokenized without broken
//! characters, cut before the first stop string, and (for a chat turn) cleaned as the
//! original `model.chat` cleans its answer, so the streamed pieces always add up to the
//! final answer.

use super::chatglm2::is_python_whitespace;
use super::format::{Cleanup, clean_response};
use super::messages::{
    ACTION_END, ACTION_START, ACTION_START_TOKEN, INTERPRETER_TOKEN, PLUGIN_TOKEN, ToolCall,
    parse_internlm2_reply,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};

pub struct AnswerStream<'t> {
    decoder: StreamDecoder<'t>,
    stops: StopStrings,
    /// The chat format's clean-up (None: raw continuation).
    clean: Option<Cleanup>,
    /// Tools were offered: the answer is the text before the first tool call
    /// (`with_tool_calls`).
    tools: bool,
    /// Raw text that passed the stop-string check.
    raw: String,
    /// Bytes of the cleaned answer already handed out.
    emitted: usize,
    /// transformers' clean-up of `raw[..spaces_done]`, a cut no pattern reaches over, kept
    /// so that each step cleans only the text since (the whole answer's clean-up at every
    /// token would cost its length each time).
    spaces_clean: String,
    spaces_done: usize,
}

impl<'t> AnswerStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, clean: Option<Cleanup>, stop: Vec<String>) -> Self {
        AnswerStream {
            decoder: tokenizer.stream_decoder(),
            stops: StopStrings::new(stop),
            clean,
            tools: false,
            raw: String::new(),
            emitted: 0,
            spaces_clean: String::new(),
            spaces_done: 0,
        }
    }

    /// An answer that may end in InternLM2 tool calls: the action marks are decoded as
    /// text, the answer handed out stops before the first call, and `tool_calls` parses
    /// them.
    pub fn with_tool_calls(mut self, tokenizer: &'t Tokenizer) -> Self {
        let marks = [ACTION_START_TOKEN, PLUGIN_TOKEN, INTERPRETER_TOKEN, ACTION_END];
        self.decoder = tokenizer.stream_decoder().show(tokenizer.known_tokens(&marks));
        self.tools = true;
        self
    }

    /// The tool calls the answer ends in (none unless `with_tool_calls`), as LMDeploy
    /// parses them.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        if !self.tools {
            return Vec::new();
        }
        parse_internlm2_reply(&self.raw).1.into_iter().collect()
    }

    /// Feeds one generated id. Returns the new text that is final, and whether a stop
    /// string has ended the answer.
    pub fn push(&mut self, id: u32) -> (String, bool) {
        self.push_checked(id, true)
    }

    /// `push`, looking for stop strings only when `check_stops` (vLLM's `min_tokens`: no
    /// stop string ends an answer before it). Of text passed unchecked only the tail a stop
    /// string could still end in is searched later, as vLLM looks back from the new text.
    pub fn push_checked(&mut self, id: u32, check_stops: bool) -> (String, bool) {
        let piece = self.decoder.push(id);
        let stopped = if check_stops { self.stops.push(&piece) } else { self.stops.pass(&piece) };
        self.raw.push_str(self.stops.take_ready());
        (self.take_stable(false), stopped)
    }

    /// After the last id: the rest of the answer.
    pub fn finish(&mut self) -> String {
        if !self.stops.is_stopped() {
            let rest = self.decoder.finish();
            self.stops.push(&rest);
        }
        self.stops.finish();
        self.raw.push_str(self.stops.take_ready());
        self.take_stable(true)
    }

    /// The whole answer: what every `push` and `finish` returned, concatenated.
    pub fn answer(&self) -> String {
        self.cleaned()
    }

    pub fn is_stopped(&self) -> bool {
        self.stops.is_stopped()
    }

    fn cleaned(&self) -> String {
        self.cleaned_up_to(self.raw.len())
    }

    /// The clean-up of the raw text's first `end` bytes.
    fn cleaned_up_to(&self, end: usize) -> String {
        let raw = &self.raw[..end];
        let raw = match self.tools {
            true => raw.split(ACTION_START).next().unwrap_or_default(),
            false => raw,
        };
        match self.clean {
            Some(cleanup) => clean_response(cleanup, raw),
            None => raw.to_string(),
        }
    }

    /// The clean-up of the raw text up to where no pattern can still change it, cleaning
    /// only what came since the last cut (the clean-up of text cut there is the clean-up of
    /// its parts, joined).
    fn advance_spaces_clean(&mut self) {
        let cut = clean_up_stable_end(&self.raw);
        if cut < self.spaces_done {
            // Never expected (the cut only moves forward); the whole text then.
            self.spaces_clean = super::clean_up_tokenization_spaces(&self.raw[..cut]);
        } else {
            let since = super::clean_up_tokenization_spaces(&self.raw[self.spaces_done..cut]);
            self.spaces_clean.push_str(&since);
        }
        self.spaces_done = cut;
    }

    /// The cleaned text past what was emitted, minus a tail that more text could still change.
    fn take_stable(&mut self, is_final: bool) -> String {
        let whole;
        let cleaned: &str = match (is_final, self.clean) {
            (false, Some(Cleanup::Decode { spaces: true, strip })) if !self.tools => {
                self.advance_spaces_clean();
                match strip {
                    // The trailing whitespace str.strip() drops is held back by `unstable_tail`.
                    true => self.spaces_clean.trim_start_matches(is_python_whitespace),
                    false => &self.spaces_clean,
                }
            }
            _ => {
                whole = self.cleaned();
                &whole
            }
        };
        let end =
            if is_final { cleaned.len() } else { cleaned.len() - self.unstable_tail(cleaned) };
        if end <= self.emitted || !cleaned.is_char_boundary(self.emitted) {
            return String::new();
        }
        let piece = cleaned[self.emitted..end].to_string();
        self.emitted = end;
        piece
    }

    /// Bytes at the end of `cleaned` that later text may strip or replace.
    fn unstable_tail(&self, cleaned: &str) -> usize {
        let call = if self.tools { partial_suffix(cleaned, ACTION_START) } else { 0 };
        call.max(self.family_unstable_tail(cleaned))
    }

    fn family_unstable_tail(&self, cleaned: &str) -> usize {
        match self.clean {
            None => 0,
            Some(Cleanup::ChatGlm2) => {
                // str.strip() may drop trailing whitespace; "[[训练时间]]" may still complete.
                let trimmed = cleaned.trim_end_matches(is_python_whitespace);
                let whitespace = cleaned.len() - trimmed.len();
                whitespace.max(partial_suffix(cleaned, super::chatglm2::TRAINING_TIME_MARK))
            }
            Some(Cleanup::InternLm2) => partial_suffix(cleaned, super::internlm2::END_MARK),
            // str.strip() may drop trailing whitespace (a clean-up pattern that may still
            // complete was left out of `cleaned`).
            Some(Cleanup::Decode { strip: true, .. }) => {
                cleaned.len() - cleaned.trim_end_matches(is_python_whitespace).len()
            }
            Some(Cleanup::Decode { strip: false, .. }) => 0,
        }
    }
}

/// Where to cut raw text so that transformers' clean-up of the part before is a prefix of
/// the clean-up of any continuation: before a tail that may start a pattern, and before
/// every match that reaches over the cut (the clean-up replaces one pattern after the other
/// over the whole text, so a later pattern may take a space an earlier one matched).
fn clean_up_stable_end(raw: &str) -> usize {
    let patterns = super::CLEAN_UP_TOKENIZATION.map(|(from, _)| from);
    let partial = patterns.iter().map(|from| partial_suffix(raw, from)).max().unwrap_or(0);
    let mut cut = raw.len() - partial;
    loop {
        let over = patterns
            .iter()
            .flat_map(|from| {
                (1..from.len())
                    .filter_map(move |back| cut.checked_sub(back))
                    .filter(move |&start| raw.get(start..).is_some_and(|t| t.starts_with(from)))
            })
            .min();
        match over {
            Some(start) => cut = start,
            None => return cut,
        }
    }
}

/// The length of the longest proper prefix of `pattern` that `text` ends with.
fn partial_suffix(text: &str, pattern: &str) -> usize {
    (1..pattern.len())
        .rev()
        .filter(|&n| pattern.is_char_boundary(n))
        .find(|&n| text.ends_with(&pattern[..n]))
        .unwrap_or(0)
}

/// Finds stop strings in streamed text. Text that could still turn out to be the start of
/// a stop string is held back.
struct StopStrings {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` handed out by `take_ready`.
    taken: usize,
    /// Bytes of `text` that are final.
    ready: usize,
    /// Where the first stop string starts, once one is found.
    stopped_at: Option<usize>,
    /// Bytes of the longest stop string.
    longest: usize,
}

impl StopStrings {
    fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopStrings { stops, text: String::new(), taken: 0, ready: 0, stopped_at: None, longest }
    }

    fn is_stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// Adds a piece; returns whether a stop string has now been found.
    fn push(&mut self, piece: &str) -> bool {
        if self.is_stopped() {
            return true;
        }
        // A match can only start in text not yet final (earlier starts were ruled out).
        let search_from = self.ready;
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[search_from..].find(stop.as_str()).map(|i| search_from + i)
            })
            .min();
        let longest = self.longest;
        self.ready = match found {
            Some(at) => {
                self.stopped_at = Some(at);
                at
            }
            None => floor_char_boundary(
                &self.text,
                self.text.len() - longest.saturating_sub(1).min(self.text.len()),
            ),
        }
        .max(self.ready);
        found.is_some()
    }

    /// Adds a piece without searching it: final at once, but for the tail a stop string
    /// completed by later text could start in.
    fn pass(&mut self, piece: &str) -> bool {
        if self.is_stopped() {
            return true;
        }
        self.text.push_str(piece);
        let tail = self.longest.saturating_sub(1).min(self.text.len());
        self.ready = floor_char_boundary(&self.text, self.text.len() - tail).max(self.ready);
        false
    }

    /// Generation has ended: everything before a stop string is final.
    fn finish(&mut self) {
        self.ready = self.stopped_at.unwrap_or(self.text.len()).max(self.ready);
    }

    fn take_ready(&mut self) -> &str {
        let start = self.taken;
        self.taken = self.ready;
        &self.text[start..self.ready]
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop_run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let mut matcher = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let stopped = matcher.push(piece);
            out.push_str(matcher.take_ready());
            if stopped {
                break;
            }
        }
        matcher.finish();
        out.push_str(matcher.take_ready());
        (out, matcher.stopped_at)
    }

    #[test]
    fn unchecked_text_is_never_searched() {
        let mut matcher = StopStrings::new(vec!["END".into()]);
        assert!(!matcher.pass("x END y"));
        assert!(!matcher.push(" E"));
        assert!(matcher.push("ND"));
        matcher.finish();
        assert_eq!(matcher.take_ready(), "x END y ");
    }

    /// A stop string that starts in text passed unchecked and ends in checked text ends the
    /// answer there, as vLLM's look-back finds it once min_tokens is reached.
    #[test]
    fn a_stop_string_straddling_the_checked_boundary_is_found() {
        let mut matcher = StopStrings::new(vec!["END".into()]);
        assert!(!matcher.pass("ab E"));
        assert_eq!(matcher.take_ready(), "ab");
        assert!(matcher.push("ND tail"));
        matcher.finish();
        assert_eq!(matcher.take_ready(), " ");
    }

    #[test]
    fn stop_strings_split_across_pieces_are_found() {
        assert_eq!(stop_run(&["END"], &["abc E", "N", "D tail"]), ("abc ".to_string(), Some(4)));
        assert_eq!(
            stop_run(&["\n\n", "Ob"], &["x", "\n", "y O", "b"]),
            ("x\ny ".to_string(), Some(4))
        );
    }

    #[test]
    fn without_a_match_everything_comes_out_in_order() {
        assert_eq!(stop_run(&["zz"], &["你", "好z", "!"]), ("你好z!".to_string(), None));
        assert_eq!(stop_run(&[], &["a", "b"]), ("ab".to_string(), None));
    }

    #[test]
    fn partial_suffixes_are_held() {
        assert_eq!(partial_suffix("ab[[训", "[[训练时间]]"), "[[训".len());
        assert_eq!(partial_suffix("ab", "[[训练时间]]"), 0);
        assert_eq!(partial_suffix("x<|im_e", "<|im_end|>"), 6);
    }
}
