//! Chat conversations as the originals build them (`model.chat(tokenizer, query, history)`,
//! FastChat's conversations, Hugging Face chat templates): the chat format, the history
//! window, and the answer clean-up.

pub mod chatglm2;
pub mod fastchat;
pub mod format;
pub mod internlm2;
pub mod messages;
pub mod stream;
pub mod template;

use crate::model::Family;
pub use format::{ChatFormat, Cleanup, clean_response};

/// Past rounds, oldest first: (query, response).
pub type History = Vec<(String, String)>;

/// Rounds of history kept by default, as the deployments we replace do.
pub const DEFAULT_HISTORY_LEN: usize = 10;

/// The last `history_len` rounds (0 keeps none).
pub fn kept_history(history: &[(String, String)], history_len: usize) -> &[(String, String)] {
    &history[history.len().saturating_sub(history_len)..]
}

/// (max_token, max_new_tokens) defaults of the family's `model.chat`.
pub fn default_limits(family: Family) -> (Option<usize>, Option<usize>) {
    match family {
        Family::ChatGlm2 => (Some(chatglm2::DEFAULT_MAX_LENGTH), None),
        Family::InternLm2 => (None, Some(internlm2::DEFAULT_MAX_NEW_TOKENS)),
        Family::Llama => (None, Some(fastchat::DEFAULT_MAX_NEW_TOKENS)),
    }
}

/// transformers' `clean_up_tokenization`: the spaces English tokenizers put before
/// punctuation and contractions, removed, one pattern after the other.
pub fn clean_up_tokenization_spaces(text: &str) -> String {
    CLEAN_UP_TOKENIZATION.iter().fold(text.to_string(), |text, (from, to)| text.replace(from, to))
}

/// The replacements of `clean_up_tokenization`, in its order.
pub(crate) const CLEAN_UP_TOKENIZATION: [(&str, &str); 10] = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_removes_spaces_as_transformers_does() {
        assert_eq!(
            clean_up_tokenization_spaces("I do n't know . It 's ok , you ' re"),
            "I don't know. It's ok, you're"
        );
    }

    #[test]
    fn history_len_keeps_the_most_recent_rounds() {
        let history: History = (0..4).map(|i| (format!("q{i}"), format!("a{i}"))).collect();
        assert_eq!(kept_history(&history, 0), &[] as &[(String, String)]);
        assert_eq!(kept_history(&history, 2), &history[2..]);
        assert_eq!(kept_history(&history, 10), &history[..]);
    }
}
