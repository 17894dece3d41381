//! InternLM2's `model.chat` prompt (`build_inputs`) and answer clean-up
//! (spec internlm2.md §6).

/// `model.chat`'s `max_new_tokens` default.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 1024;

/// `model.chat`'s default `meta_instruction` (three lines, no trailing newline).
pub const DEFAULT_META_INSTRUCTION: &str = "You are an AI assistant whose name is InternLM (书生·浦语).\n\
- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n\
- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as English and 中文.";

/// The ChatML-style prompt; an empty `meta_instruction` leaves out the system block. The
/// tokenizer prepends BOS.
pub fn build_prompt(query: &str, history: &[(String, String)], meta_instruction: &str) -> String {
    let mut prompt = String::new();
    if !meta_instruction.is_empty() {
        prompt.push_str(&format!("<|im_start|>system\n{meta_instruction}<|im_end|>\n"));
    }
    for (q, a) in history {
        prompt.push_str(&format!(
            "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        ));
    }
    prompt.push_str(&format!("<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"));
    prompt
}

/// The end of a turn in the chat format.
pub const END_MARK: &str = "<|im_end|>";

/// The text before the first `<|im_end|>` (decoding already skips specials, so this only
/// matters for a tokenizer.json that keeps them); no stripping, as the original.
pub fn clean_response(text: &str) -> String {
    text.split(END_MARK).next().unwrap_or_default().to_string()
}
