//! ChatGLM2's `model.chat` prompt and answer clean-up (spec chatglm2.md §5–6).

/// `model.chat`'s `max_length` default: prompt plus generated tokens.
pub const DEFAULT_MAX_LENGTH: usize = 8192;

/// `[Round N]\n\n问：{q}\n\n答：{a}\n\n` per past round, rounds numbered from 1, then the
/// open round for `query`. The tokenizer adds `[gMASK] sop` in front.
pub fn build_prompt(query: &str, history: &[(String, String)]) -> String {
    let mut prompt = String::new();
    for (i, (q, a)) in history.iter().enumerate() {
        prompt.push_str(&format!("[Round {}]\n\n问：{q}\n\n答：{a}\n\n", i + 1));
    }
    prompt.push_str(&format!("[Round {}]\n\n问：{query}\n\n答：", history.len() + 1));
    prompt
}

/// The placeholder the original's post-processing replaces with "2023年".
pub const TRAINING_TIME_MARK: &str = "[[训练时间]]";

/// The original's post-processing: Python's `str.strip()` and the "[[训练时间]]" fix-up.
pub fn clean_response(text: &str) -> String {
    text.trim_matches(is_python_whitespace).replace(TRAINING_TIME_MARK, "2023年")
}

/// `str.isspace()`: Unicode White_Space plus the separators U+001C..U+001F.
pub(crate) fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_numbered_from_one() {
        let history = vec![("你好".to_string(), "你好！".to_string())];
        assert_eq!(
            build_prompt("hi", &history),
            "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：hi\n\n答："
        );
    }

    #[test]
    fn cleanup_strips_like_python() {
        assert_eq!(clean_response("\u{1f} a [[训练时间]] \n"), "a 2023年");
    }
}
