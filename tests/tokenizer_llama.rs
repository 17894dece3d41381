//! The Llama tokenizers against the goldens of the original Python tokenizers: the real
//! Llama-2 / Vicuna v1.5 SentencePiece model and the tiny self-trained one (transformers
//! 4.44.2's slow `LlamaTokenizer`, as FastChat loads it), and Llama-3's byte-level BPE
//! `tokenizer.json` (`PreTrainedTokenizerFast` and its chat template). Encode, decode,
//! FastChat's prompts and decode calls, the `legacy` flag, streaming, and broken configs.

mod common;

use common::{copy_fixture, fixture, golden, ids};
use serde_json::Value;
use triton_llm::Error;
use triton_llm::chat::clean_up_tokenization_spaces as clean_up;
use triton_llm::chat::messages::Json;
use triton_llm::chat::template::ChatTemplate;
use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;

/// The SentencePiece folders (the same golden layout).
const SP: [(&str, usize, usize, usize); 2] = [
    // folder, encode cases, decode cases, FastChat prompts
    ("llama2-tokenizer", 35, 15, 8),
    ("vicuna-tiny", 26, 9, 7),
];

fn load(folder: &str) -> Tokenizer {
    Tokenizer::from_folder(&fixture(folder), Family::Llama).unwrap()
}

fn tok_golden(folder: &str) -> Value {
    golden(folder, "tokenizer_golden.json")
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn cases<'a>(g: &'a Value, key: &str) -> &'a Vec<Value> {
    g[key].as_array().unwrap_or_else(|| panic!("no {key}"))
}

/// Feeds `ids` one by one and returns what the stream wrote, checking that each piece is
/// final (a prefix of the full decode).
fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let full = tok.decode(ids);
    let mut s = tok.stream_decoder();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&s.push(id));
        assert!(full.starts_with(&out), "{ids:?}: streamed {out:?} is not a prefix of {full:?}");
    }
    out.push_str(&s.finish());
    out
}

/// `tokenizer_config.json` of a copy of `folder`, edited.
fn with_config(
    folder: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> tempfile::TempDir {
    let dir = copy_fixture(folder);
    let path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

fn load_dir(dir: &tempfile::TempDir) -> Tokenizer {
    Tokenizer::from_folder(dir.path(), Family::Llama).unwrap()
}

fn load_err(dir: &std::path::Path) -> Error {
    match Tokenizer::from_folder(dir, Family::Llama) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- SentencePiece: encode

#[test]
fn sp_encode_cases() {
    for (folder, n_encode, _, _) in SP {
        let tok = load(folder);
        let g = tok_golden(folder);
        let cases = cases(&g, "encode_cases");
        assert_eq!(cases.len(), n_encode, "{folder}");
        for case in cases {
            let t = text(&case["text"]);
            let with = ids(&case["ids"]);
            let without = ids(&case["ids_no_special"]);
            assert_eq!(tok.encode(t, true).unwrap(), with, "{folder}: encode({t:?})");
            assert_eq!(tok.encode(t, false).unwrap(), without, "{folder}: {t:?} no specials");
            // The token strings name those ids.
            let tokens: Vec<Option<u32>> = case["slow_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| tok.token_to_id(text(s)))
                .collect();
            let expected: Vec<Option<u32>> = without.iter().map(|&id| Some(id)).collect();
            assert_eq!(tokens, expected, "{folder}: tokens of {t:?}");
            assert_eq!(
                tok.decode(&with),
                text(&case["decoded_skip_special"]),
                "{folder}: decode of {t:?}"
            );
            assert_eq!(
                clean_up(&tok.decode(&without)),
                text(&case["fastchat_decoded_no_special"]),
                "{folder}: FastChat's decode of {t:?}"
            );
        }
    }
}

#[test]
fn sp_fastchat_prompt_ids() {
    for (folder, _, _, n_prompts) in SP {
        let tok = load(folder);
        let g = tok_golden(folder);
        let prompts = cases(&g, "fastchat_prompts");
        assert_eq!(prompts.len(), n_prompts, "{folder}");
        for p in prompts {
            let prompt = text(&p["prompt"]);
            let expected = ids(&p["input_ids"]);
            assert_eq!(expected.len() as u64, p["n"].as_u64().unwrap(), "{folder}: {prompt:?}");
            assert_eq!(tok.encode(prompt, true).unwrap(), expected, "{folder}: {prompt:?}");
        }
    }
    // The tiny model's chat runs (FastChat's `generate_stream` prompts).
    let tok = load("vicuna-tiny");
    for case in cases(&golden("vicuna-tiny", "chat_golden.json"), "cases") {
        let prompt = text(&case["prompt"]);
        assert_eq!(tok.encode(prompt, true).unwrap(), ids(&case["prompt_ids"]), "{prompt:?}");
    }
}

/// `"</s>USER"`: non-legacy drops the '▁' after a special token, legacy starts a word.
#[test]
fn sp_text_after_special_tokens() {
    let tok = load("llama2-tokenizer");
    assert_eq!(tok.encode("</s>USER", false).unwrap(), [2, 11889]);
    assert_eq!(tok.encode("", true).unwrap(), [1]);
    assert_eq!(tok.encode("", false).unwrap(), Vec::<u32>::new());
    let legacy = load_dir(&with_config("llama2-tokenizer", |c| {
        c.insert("legacy".into(), Value::Bool(true));
    }));
    assert_eq!(legacy.encode("</s>USER", false).unwrap(), [2, 3148, 1001]);
    assert_eq!(legacy.encode("", true).unwrap(), [1]);
}

/// `legacy: true` (what a config without the key gives): the recorded differences, and the
/// non-legacy ids everywhere else.
#[test]
fn sp_legacy_true_ids() {
    for (folder, ..) in SP {
        let g = tok_golden(folder);
        let set = with_config(folder, |c| {
            c.insert("legacy".into(), Value::Bool(true));
        });
        // transformers 4.44: `legacy=None` means legacy.
        let unset = with_config(folder, |c| {
            c.remove("legacy");
        });
        for (what, dir) in [("legacy: true", &set), ("no legacy key", &unset)] {
            let tok = load_dir(dir);
            let mut differ = 0;
            for case in cases(&g, "encode_cases") {
                let t = text(&case["text"]);
                let expected = match case.get("legacy_true_ids_DIFFER") {
                    Some(v) => {
                        differ += 1;
                        ids(v)
                    }
                    None => ids(&case["ids"]),
                };
                assert_eq!(expected[0], 1);
                assert_eq!(tok.encode(t, true).unwrap(), expected, "{folder} {what}: {t:?}");
                assert_eq!(tok.encode(t, false).unwrap(), expected[1..], "{folder} {what}: {t:?}");
            }
            assert_eq!(
                differ,
                g["diff_counts"]["legacy_true_ids_differ"].as_u64().unwrap(),
                "{folder}"
            );
            for p in cases(&g, "fastchat_prompts") {
                let prompt = text(&p["prompt"]);
                let expected =
                    ids(p.get("legacy_true_input_ids_DIFFER").unwrap_or(&p["input_ids"]));
                assert_eq!(
                    tok.encode(prompt, true).unwrap(),
                    expected,
                    "{folder} {what}: {prompt:?}"
                );
            }
            // `legacy_true_decode` keeps the specials; where there are none it is also the
            // decode with them skipped (sentencepiece strips the dummy prefix once more).
            let mut checked = 0;
            for case in cases(&g, "decode_cases") {
                let i = ids(&case["ids"]);
                if i.iter().any(|&id| id < 3) {
                    continue;
                }
                checked += 1;
                assert_eq!(
                    tok.decode(&i),
                    text(&case["legacy_true_decode"]),
                    "{folder} {what}: {i:?}"
                );
                assert_eq!(stream(&tok, &i), tok.decode(&i), "{folder} {what}: {i:?}");
            }
            assert!(checked >= 5, "{folder}: {checked}");
        }
    }
}

// ---------------------------------------------------------------- SentencePiece: decode

#[test]
fn sp_decode_cases() {
    for (folder, _, n_decode, _) in SP {
        let tok = load(folder);
        let g = tok_golden(folder);
        let decode_cases = cases(&g, "decode_cases");
        assert_eq!(decode_cases.len(), n_decode, "{folder}");
        for case in decode_cases {
            let i = ids(&case["ids"]);
            let decoded = tok.decode(&i);
            assert_eq!(decoded, text(&case["decode_skip_special"]), "{folder}: decode({i:?})");
            assert_eq!(clean_up(&decoded), text(&case["fastchat_decode"]), "{folder}: {i:?}");
        }
    }
}

#[test]
fn sp_leading_space_and_specials() {
    let tok = load("llama2-tokenizer");
    // Only the first kept token loses its '▁', also after skipped specials.
    assert_eq!(tok.decode(&[1, 15043, 3186, 2]), "Hello world");
    assert_eq!(tok.decode(&[29871, 15043]), " Hello");
    assert_eq!(tok.decode(&[1, 29871, 15043]), " Hello");
    // Skipped specials add no space and do not end a byte run: 九 = E4 B9 9D.
    assert_eq!(tok.decode(&[15043, 2, 11526]), "Helloworld");
    assert_eq!(tok.decode(&[0xE4 + 3, 2, 0xB9 + 3, 0x9D + 3]), "九");
    // One U+FFFD per byte that starts no character.
    assert_eq!(tok.decode(&[0xF0 + 3, 0x41 + 3, 0xE4 + 3, 0xB9 + 3, 0x9D + 3]), "\u{FFFD}A九");
    assert_eq!(tok.decode(&[32000, u32::MAX]), "");
    assert_eq!(stream(&tok, &[32000, u32::MAX]), "");
}

#[test]
fn sp_stream_equals_decode() {
    for (folder, ..) in SP {
        let tok = load(folder);
        let g = tok_golden(folder);
        let mut lists: Vec<Vec<u32>> =
            cases(&g, "decode_cases").iter().map(|c| ids(&c["ids"])).collect();
        for case in cases(&g, "encode_cases") {
            lists.push(ids(&case["ids"]));
            lists.push(ids(&case["ids_no_special"]));
        }
        lists.extend(cases(&g, "fastchat_prompts").iter().map(|p| ids(&p["input_ids"])));
        for list in &lists {
            assert_eq!(stream(&tok, list), tok.decode(list), "{folder}: {list:?}");
            for start in 1..list.len().min(6) {
                let rest = &list[start..];
                assert_eq!(stream(&tok, rest), tok.decode(rest), "{folder}: {list:?}[{start}..]");
            }
        }
    }
}

/// The tiny model's FastChat runs: the response is FastChat's decode of the generated ids.
#[test]
fn vicuna_tiny_chat_responses() {
    let tok = load("vicuna-tiny");
    let chat = golden("vicuna-tiny", "chat_golden.json");
    for case in cases(&chat, "cases") {
        let out = ids(&case["output_ids"]);
        let decoded = tok.decode(&out);
        assert_eq!(clean_up(&decoded), text(&case["response"]), "{out:?}");
        assert_eq!(stream(&tok, &out), decoded, "{out:?}");
    }
}

/// Random ids weighted towards byte pieces, specials, '▁' pieces and ids past the
/// vocabulary: the stream adds up to the decode, legacy or not.
#[test]
fn sp_stream_equals_decode_on_random_ids() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let legacy = with_config("vicuna-tiny", |c| {
        c.insert("legacy".into(), Value::Bool(true));
    });
    for tok in [load("llama2-tokenizer"), load("vicuna-tiny"), load_dir(&legacy)] {
        let vocab = tok.vocab_size() as u64;
        let space = tok.token_to_id("▁").unwrap();
        let utf8 = "九😀é 👨‍👩‍👧 a".as_bytes();
        for _ in 0..300 {
            let len = 1 + next() % 30;
            let mut list = Vec::new();
            while (list.len() as u64) < len {
                match next() % 10 {
                    0..=2 => list.push(3 + (next() % 256) as u32),
                    3..=4 => {
                        let start = (next() % utf8.len() as u64) as usize;
                        let end = (start + 1 + (next() % 6) as usize).min(utf8.len());
                        list.extend(utf8[start..end].iter().map(|&b| b as u32 + 3));
                    }
                    5 => list.push(space),
                    6 => list.push((next() % 3) as u32),
                    7 => list.push(vocab as u32 + (next() % 3) as u32),
                    _ => list.push((next() % vocab) as u32),
                }
            }
            assert_eq!(stream(&tok, &list), tok.decode(&list), "{list:?}");
        }
    }
}

// ---------------------------------------------------------------- SentencePiece: config

#[test]
fn sp_special_ids_and_config_flags() {
    for (folder, ..) in SP {
        let tok = load(folder);
        let g = tok_golden(folder);
        assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap(), "{folder}");
        assert_eq!(tok.eos_id() as u64, g["eos_id"].as_u64().unwrap(), "{folder}");
        assert_eq!(tok.bos_id().map(u64::from), g["bos_id"].as_u64(), "{folder}");
        for (name, id) in [("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<0x0A>", 13)] {
            assert_eq!(tok.token_to_id(name), Some(id), "{folder}: {name}");
        }
        assert!(!tok.clean_up_tokenization_spaces(), "{folder}");
    }
    assert_eq!(load("llama2-tokenizer").token_to_id("▁Hello"), Some(15043));

    // add_bos_token / add_eos_token decide what `encode` adds.
    let eos = load_dir(&with_config("llama2-tokenizer", |c| {
        c.insert("add_eos_token".into(), Value::Bool(true));
        c.insert("add_bos_token".into(), Value::Bool(false));
    }));
    assert_eq!(eos.encode("Hello world", true).unwrap(), [15043, 3186, 2]);
    assert_eq!(eos.encode("Hello world", false).unwrap(), [15043, 3186]);
    assert_eq!(eos.bos_id(), Some(1));
    // Without the key, LlamaTokenizer's own default: no clean-up.
    let unset = load_dir(&with_config("llama2-tokenizer", |c| {
        c.remove("clean_up_tokenization_spaces");
    }));
    assert!(!unset.clean_up_tokenization_spaces());
    let set = load_dir(&with_config("llama2-tokenizer", |c| {
        c.insert("clean_up_tokenization_spaces".into(), Value::Bool(true));
    }));
    assert!(set.clean_up_tokenization_spaces());
}

/// Added tokens of `added_tokens_decoder` are split out of the text with their `lstrip` /
/// `rstrip`; a non-special one decodes as its text between separately decoded pieces, a
/// special one (named in `additional_special_tokens`) vanishes. Derived from transformers'
/// `PreTrainedTokenizer.tokenize` / `_decode`, not recorded.
#[test]
fn sp_added_tokens() {
    let dir = with_config("llama2-tokenizer", |c| {
        c.insert(
            "added_tokens_decoder".into(),
            serde_json::json!({
                "0": {"content": "<unk>", "special": true},
                "1": {"content": "<s>", "special": true},
                "2": {"content": "</s>", "special": true},
                "32000": {"content": "<pad>", "lstrip": true, "rstrip": true, "special": true},
                "32001": {"content": "<|im_end|>", "special": true},
            }),
        );
        c.insert("additional_special_tokens".into(), serde_json::json!(["<|im_end|>"]));
    });
    let tok = load_dir(&dir);
    assert_eq!(tok.vocab_size(), 32002);
    assert_eq!(tok.token_to_id("<pad>"), Some(32000));
    // "▁a <pad> b": the spaces beside <pad> go; "b" after it starts no word.
    assert_eq!(tok.encode("a <pad> b", false).unwrap(), [263, 32000, 29890]);
    assert_eq!(tok.decode(&[263, 32000, 29890]), "a<pad>b");
    // After the added token, the first piece loses its '▁' again.
    assert_eq!(tok.decode(&[263, 32000, 3186]), "a<pad>world");
    // A special one: the lone '▁' before it goes.
    assert_eq!(tok.encode("<|im_end|>Hi", false).unwrap(), [32001, 18567]);
    assert_eq!(tok.decode(&[15043, 32001, 3186]), "Hello world");
    for list in [[263, 32000, 29890], [243, 32000, 162], [29871, 32000, 29871]] {
        assert_eq!(stream(&tok, &list), tok.decode(&list), "{list:?}");
    }
    // A special token the vocabulary lacks gets the next id, as transformers adds it.
    let new = load_dir(&with_config("llama2-tokenizer", |c| {
        c.insert("additional_special_tokens".into(), serde_json::json!(["<pad>"]));
    }));
    assert_eq!(new.token_to_id("<pad>"), Some(32000));
    assert_eq!(new.encode("a<pad>", false).unwrap(), [263, 32000]);
    assert_eq!(new.decode(&[263, 32000, 3186]), "a world");
    // Without added_tokens_decoder, special_tokens_map.json's pad_token (`<unk>`) replaces
    // the config's.
    let pad = load_dir(&with_config("llama2-tokenizer", |c| {
        c.insert("pad_token".into(), Value::String("<pad>".into()));
    }));
    assert_eq!(pad.token_to_id("<pad>"), None);
    assert_eq!(
        pad.encode("a<pad>", false).unwrap(),
        load("llama2-tokenizer").encode("a<pad>", false).unwrap()
    );
}

// ---------------------------------------------------------------- Llama-3 tokenizer.json

#[test]
fn llama3_encode_cases() {
    let tok = load("llama3-tiny");
    let g = tok_golden("llama3-tiny");
    assert!(tok.clean_up_tokenization_spaces());
    let specials: Vec<&str> =
        g["special_tokens"].as_object().unwrap().keys().map(String::as_str).collect();
    let cases = cases(&g, "encode_cases");
    assert_eq!(cases.len(), 31);
    for case in cases {
        let t = text(&case["text"]);
        let with = ids(&case["ids"]);
        assert_eq!(tok.encode(t, true).unwrap(), with, "encode({t:?})");
        assert_eq!(
            tok.encode(t, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{t:?} no specials"
        );
        let decoded = tok.decode(&with);
        assert_eq!(clean_up(&decoded), text(&case["decoded_skip_special"]), "decode of {t:?}");
        // Raw: the decode with the specials, and no clean-up, without the specials' text.
        let raw = specials
            .iter()
            .fold(text(&case["decoded_no_cleanup"]).to_string(), |s, name| s.replace(name, ""));
        assert_eq!(decoded, raw, "raw decode of {t:?}");
    }
}

#[test]
fn llama3_decode_cases() {
    let tok = load("llama3-tiny");
    let g = tok_golden("llama3-tiny");
    let cases = cases(&g, "decode_cases");
    assert_eq!(cases.len(), 9);
    for case in cases {
        let i = ids(&case["ids"]);
        let decoded = tok.decode(&i);
        assert_eq!(decoded, text(&case["decode_skip_special_no_cleanup"]), "decode({i:?})");
        assert_eq!(clean_up(&decoded), text(&case["decode_skip_special"]), "decode({i:?})");
        assert_eq!(stream(&tok, &i), decoded, "stream({i:?})");
    }
}

#[test]
fn llama3_special_ids() {
    let tok = load("llama3-tiny");
    let g = tok_golden("llama3-tiny");
    assert_eq!(tok.bos_id().map(u64::from), g["bos_id"].as_u64());
    assert_eq!(tok.eos_id() as u64, g["eos_id_tokenizer"].as_u64().unwrap());
    assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    for (name, id) in g["special_tokens"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(name).map(u64::from), id.as_u64(), "{name}");
    }
    for id in ids(&g["generation_eos_ids"]) {
        assert!(tok.decode(&[id]).is_empty(), "{id}");
    }
}

#[test]
fn llama3_chat_template_cases() {
    let tok = load("llama3-tiny");
    let template = ChatTemplate::from_folder(&fixture("llama3-tiny")).unwrap().expect("a template");
    let g = tok_golden("llama3-tiny");
    let cases = cases(&g, "chat_template_cases");
    assert_eq!(cases.len(), 14);
    for case in cases {
        let messages = Json::parse(&case["messages"].to_string(), "golden").unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages, None, add).unwrap();
        assert_eq!(rendered, text(&case["text"]), "{} ({add})", case["messages"]);
        assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&case["ids"]), "{rendered:?}");
    }
}

/// The tiny model's runs: prompt ids of the template's text, responses as
/// `decode(generated, skip_special_tokens=True)` with the config's clean-up.
#[test]
fn llama3_chat_runs() {
    let tok = load("llama3-tiny");
    let chat = golden("llama3-tiny", "chat_golden.json");
    assert_eq!(tok.bos_id().map(u64::from), chat["bos_token_id"].as_u64());
    for case in cases(&chat, "cases") {
        let prompt = text(&case["prompt_text"]);
        assert_eq!(tok.encode(prompt, false).unwrap(), ids(&case["prompt_ids"]), "{prompt:?}");
        let generated = ids(&case["generated_ids"]);
        let decoded = tok.decode(&generated);
        assert_eq!(decoded, text(&case["response_no_cleanup"]), "{generated:?}");
        assert_eq!(clean_up(&decoded), text(&case["response"]), "{generated:?}");
        assert_eq!(stream(&tok, &generated), decoded, "{generated:?}");
    }
}

#[test]
fn llama3_stream_equals_decode() {
    let tok = load("llama3-tiny");
    let g = tok_golden("llama3-tiny");
    let mut lists: Vec<Vec<u32>> =
        cases(&g, "encode_cases").iter().map(|c| ids(&c["ids"])).collect();
    lists.extend(cases(&g, "chat_template_cases").iter().map(|c| ids(&c["ids"])));
    for list in &lists {
        for start in 0..list.len().min(6) {
            let rest = &list[start..];
            assert_eq!(stream(&tok, rest), tok.decode(rest), "{list:?}[{start}..]");
        }
    }
}

/// bos/eos come from tokenizer_config.json; without them the conventional names, and
/// without the file special_tokens_map.json (transformers reads it when the config has no
/// `added_tokens_decoder`).
#[test]
fn llama3_bos_eos_sources() {
    let none = load_dir(&with_config("llama3-tiny", |c| {
        c.remove("bos_token");
        c.remove("eos_token");
        c.remove("clean_up_tokenization_spaces");
    }));
    assert_eq!(none.bos_id(), None);
    assert_eq!(none.eos_id(), 2); // no `</s>` either: the old fallback
    // PreTrainedTokenizerFast: transformers 4.44's default clean-up is on.
    assert!(none.clean_up_tokenization_spaces());

    let dir = copy_fixture("llama3-tiny");
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let map_only = load_dir(&dir);
    assert_eq!((map_only.bos_id(), map_only.eos_id()), (Some(1256), 1265));
    // No class: AutoTokenizer would pick LlamaTokenizerFast, which cleans nothing up.
    assert!(!map_only.clean_up_tokenization_spaces());

    let unknown = with_config("llama3-tiny", |c| {
        c.insert("eos_token".into(), Value::String("<|no_such_token|>".into()));
    });
    let err = load_err(unknown.path()).to_string();
    assert!(err.contains("<|no_such_token|>") && err.contains("eos_token"), "{err}");
}

// ---------------------------------------------------------------- broken configs

#[test]
fn broken_tokenizer_config_names_the_file() {
    for folder in ["llama2-tokenizer", "vicuna-tiny", "llama3-tiny"] {
        for (what, content) in [
            ("not JSON", "{ \"legacy\": fal"),
            ("a list", "[]"),
            ("bad legacy", "{\"legacy\": \"no\"}"),
            ("bad eos", "{\"eos_token\": 2}"),
            ("bad added token", "{\"added_tokens_decoder\": {\"x\": {\"content\": \"a\"}}}"),
        ] {
            let dir = copy_fixture(folder);
            std::fs::write(dir.path().join("tokenizer_config.json"), content).unwrap();
            let err = load_err(dir.path());
            assert!(matches!(err, Error::Tokenizer(_)), "{folder} {what}: {err:?}");
            assert!(err.to_string().contains("tokenizer_config.json"), "{folder} {what}: {err}");
        }
    }
    // Read when the config has no added_tokens_decoder, as transformers reads it.
    let dir = copy_fixture("llama2-tokenizer");
    std::fs::write(dir.path().join("special_tokens_map.json"), "{ nope").unwrap();
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("special_tokens_map.json"), "{err}");
}
