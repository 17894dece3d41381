//! The tokenizers against the goldens of the original Python tokenizers (real ChatGLM2 and
//! InternLM2 models and the tiny self-trained ones): encode, decode, chat prompts,
//! streaming, and broken tokenizer files.

mod common;

use common::{fixture, golden, ids};
use serde_json::Value;
use triton_llm::Error;
use triton_llm::model::Family;
use triton_llm::tokenizer::Tokenizer;

const CHATGLM2: [&str; 2] = ["chatglm2", "chatglm2-tiny"];
const INTERNLM2: [&str; 2] = ["internlm2", "internlm2-tiny"];
const ALL: [(&str, Family); 4] = [
    ("chatglm2", Family::ChatGlm2),
    ("chatglm2-tiny", Family::ChatGlm2),
    ("internlm2", Family::InternLm2),
    ("internlm2-tiny", Family::InternLm2),
];

fn load(folder: &str, family: Family) -> Tokenizer {
    Tokenizer::from_folder(&fixture(folder), family).unwrap()
}

fn tok_golden(folder: &str) -> Value {
    golden(folder, "tokenizer_golden.json")
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap()
}

/// Feeds `ids` one by one and returns what the stream wrote.
fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut s = tok.stream_decoder();
    let mut out: String = ids.iter().map(|&id| s.push(id)).collect();
    out.push_str(&s.finish());
    out
}

// ---------------------------------------------------------------- encode

#[test]
fn chatglm2_encode_cases() {
    for folder in CHATGLM2 {
        let tok = load(folder, Family::ChatGlm2);
        let g = tok_golden(folder);
        let cases = g["encode_cases"].as_array().unwrap();
        assert_eq!(cases.len(), 32);
        for case in cases {
            let t = text(&case["text"]);
            assert_eq!(tok.encode(t, true).unwrap(), ids(&case["ids"]), "{folder}: encode({t:?})");
            assert_eq!(
                tok.encode(t, false).unwrap(),
                ids(&case["ids_no_special"]),
                "{folder}: {t:?} no specials"
            );
            assert_eq!(
                tok.decode(&ids(&case["ids"])),
                text(&case["decoded"]),
                "{folder}: decode of {t:?}"
            );
        }
    }
}

/// Where the fast tokenizer (what `model.chat` uses) encodes differently from the slow one
/// (only literal `[UNUSED_TOKEN_146]` text: the slow one matches the user-defined piece,
/// the fast one knows that id only as `<|im_start|>`), the fast ids are expected.
#[test]
fn internlm2_encode_cases() {
    for folder in INTERNLM2 {
        let tok = load(folder, Family::InternLm2);
        let g = tok_golden(folder);
        let cases = g["encode_cases"].as_array().unwrap();
        assert_eq!(cases.len(), 38);
        let mut fast_cases = 0;
        for case in cases {
            let t = text(&case["text"]);
            let (with, without) = match case.get("fast_ids_DIFFER") {
                Some(fast) => {
                    fast_cases += 1;
                    let fast = ids(fast);
                    assert_eq!(fast[0], 1);
                    (fast.clone(), fast[1..].to_vec())
                }
                None => (ids(&case["ids"]), ids(&case["ids_no_special"])),
            };
            assert_eq!(tok.encode(t, true).unwrap(), with, "{folder}: encode({t:?})");
            assert_eq!(tok.encode(t, false).unwrap(), without, "{folder}: {t:?} no specials");
            assert_eq!(
                tok.decode(&ids(&case["ids"])),
                text(&case["decoded_skip_special"]),
                "{folder}: decode of {t:?}"
            );
        }
        assert_eq!(fast_cases, 1, "{folder}: only `[UNUSED_TOKEN_146]user` differs");
    }
}

#[test]
fn internlm2_special_text_is_split_out_literally() {
    let tok = load("internlm2", Family::InternLm2);
    // Text right against the specials stays as it is (no stripping).
    assert_eq!(
        tok.encode("a<|im_end|> b<s>", false).unwrap(),
        [tok.encode("a", false).unwrap(), vec![92542], tok.encode(" b", false).unwrap(), vec![1]]
            .concat()
    );
    // An unfinished special is plain text.
    assert!(!tok.encode("<|im_end|", false).unwrap().contains(&92542));
}

#[test]
fn chatglm2_special_text_is_not_recognised() {
    let tok = load("chatglm2", Family::ChatGlm2);
    for t in ["[gMASK]", "sop", "eop", "[MASK]", "<s>", "</s>", "<unk>"] {
        let got = tok.encode(t, false).unwrap();
        assert!(got.iter().all(|&id| id > 2 && id < 64789), "{t:?} → {got:?}");
    }
}

// ---------------------------------------------------------------- decode

#[test]
fn chatglm2_decode_cases() {
    for folder in CHATGLM2 {
        let tok = load(folder, Family::ChatGlm2);
        let g = tok_golden(folder);
        for case in g["decode_cases"].as_array().unwrap() {
            let i = ids(&case["ids"]);
            assert_eq!(tok.decode(&i), text(&case["text"]), "{folder}: decode({i:?})");
        }
    }
}

/// InternLM2 decodes as the fast tokenizer with `skip_special_tokens=True` (slow and fast
/// differ on invalid byte runs; `model.chat` uses the fast one).
#[test]
fn internlm2_decode_cases() {
    for folder in INTERNLM2 {
        let tok = load(folder, Family::InternLm2);
        let g = tok_golden(folder);
        for case in g["decode_cases"].as_array().unwrap() {
            let i = ids(&case["ids"]);
            assert_eq!(
                tok.decode(&i),
                text(&case["fast_decode_skip_special"]),
                "{folder}: decode({i:?})"
            );
        }
    }
}

#[test]
fn invalid_byte_runs() {
    // ChatGLM2 (sentencepiece): one U+FFFD per byte that starts no character; valid
    // characters inside the run survive.
    let glm = load("chatglm2", Family::ChatGlm2);
    let byte = |b: u32| b + 3;
    assert_eq!(
        glm.decode(&[byte(0xF0), byte(0x41), byte(0xE4), byte(0xB9), byte(0x9D)]),
        "\u{FFFD}A九"
    );
    // A special between bytes ends the run (it is an empty piece, not removed).
    assert_eq!(
        glm.decode(&[byte(0xE4), 64790, byte(0xB9), byte(0x9D)]),
        "\u{FFFD}\u{FFFD}\u{FFFD}"
    );
    // InternLM2 (HF ByteFallback): an invalid run is U+FFFD for every byte; skipped
    // specials do not end the run.
    let ilm = load("internlm2", Family::InternLm2);
    assert_eq!(
        ilm.decode(&[byte(0xF0), byte(0x41), byte(0xE4), byte(0xB9), byte(0x9D)]),
        "\u{FFFD}".repeat(5)
    );
    assert_eq!(ilm.decode(&[byte(0xE4), 92542, byte(0xB9), byte(0x9D)]), "九");
    assert_eq!(ilm.decode(&[byte(0xE4), 9843, byte(0xB9)]), "\u{FFFD}Hello\u{FFFD}");
}

#[test]
fn chatglm2_leading_space_is_stripped_once() {
    let tok = load("chatglm2", Family::ChatGlm2);
    // "▁Hello" "▁world": only the first piece loses its space, also after specials.
    assert_eq!(tok.decode(&[13755, 993]), "Hello world");
    assert_eq!(tok.decode(&[64790, 64792, 13755, 993]), "Hello world");
    // sentencepiece strips while nothing is written: "▁" then "▁Hello".
    assert_eq!(tok.decode(&[30910, 13755]), "Hello");
    // Not after a byte piece.
    assert_eq!(tok.decode(&[13, 13755]), "\n Hello");
}

#[test]
fn out_of_range_ids_decode_to_nothing() {
    for (folder, family) in ALL {
        let tok = load(folder, family);
        let past = tok.vocab_size() as u32 + 5;
        assert_eq!(tok.decode(&[past, u32::MAX]), "", "{folder}");
        assert_eq!(stream(&tok, &[past, u32::MAX]), "", "{folder}");
    }
}

// ---------------------------------------------------------------- chat prompts

#[test]
fn chatglm2_chat_prompt_ids() {
    for folder in CHATGLM2 {
        let tok = load(folder, Family::ChatGlm2);
        let g = tok_golden(folder);
        let prompts = g["chat_prompts"].as_array().unwrap();
        assert_eq!(prompts.len(), 3);
        for p in prompts {
            assert_eq!(
                tok.encode(text(&p["prompt"]), true).unwrap(),
                ids(&p["input_ids"]),
                "{folder}"
            );
            if let Some(cont) = p.get("stream_continuation") {
                let raw = tok.encode(text(&cont["text"]), false).unwrap();
                assert_eq!(raw, ids(&cont["raw_ids"]), "{folder}");
                assert_eq!(raw[1..], ids(&cont["ids_after_dropping_first"]), "{folder}");
            }
        }
        // The padded batch: each row is the plain encoding after its left padding.
        let batch = &g["batch_left_padding"];
        for (t, row) in
            batch["texts"].as_array().unwrap().iter().zip(batch["input_ids"].as_array().unwrap())
        {
            let row = ids(row);
            let first = row.iter().position(|&id| id != 0).unwrap();
            assert_eq!(tok.encode(text(t), true).unwrap(), row[first..], "{folder}");
        }
        // The tiny model's chat runs.
        if folder == "chatglm2-tiny" {
            let chat = golden(folder, "chat_golden.json");
            for case in chat["cases"].as_array().unwrap() {
                assert_eq!(
                    tok.encode(text(&case["prompt"]), true).unwrap(),
                    ids(&case["prompt_ids"])
                );
                let generated = ids(&case["generated_ids"]);
                assert_eq!(tok.decode(&generated), text(&case["raw_decoded"]));
                assert_eq!(stream(&tok, &generated), text(&case["raw_decoded"]));
            }
        }
    }
}

/// `build_inputs` of the original modeling code (spec internlm2.md §6.1), without BOS.
fn internlm2_prompt(query: &str, history: &Value, meta: &str) -> String {
    let mut prompt = String::new();
    if !meta.is_empty() {
        prompt += &format!("<|im_start|>system\n{meta}<|im_end|>\n");
    }
    for pair in history.as_array().unwrap() {
        let (q, a) = (text(&pair[0]), text(&pair[1]));
        prompt +=
            &format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n");
    }
    prompt + &format!("<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
}

#[test]
fn internlm2_chat_prompt_ids() {
    for folder in INTERNLM2 {
        let tok = load(folder, Family::InternLm2);
        let g = tok_golden(folder);
        let prompts = g["chat_prompts_hf"].as_array().unwrap();
        assert_eq!(prompts.len(), 4);
        for p in prompts {
            let prompt = text(&p["prompt"]);
            let built =
                internlm2_prompt(text(&p["query"]), &p["history"], text(&p["meta_instruction"]));
            assert_eq!(built, prompt, "{folder}: prompt format");
            assert_eq!(
                tok.encode(prompt, true).unwrap(),
                ids(&p["input_ids"]),
                "{folder}: {}",
                p["name"]
            );
            assert_eq!(
                tok.encode(text(&p["hf_chat_template_text"]), false).unwrap(),
                ids(&p["hf_chat_template_ids"]),
                "{folder}: chat template {}",
                p["name"]
            );
        }
        for case in g["lmdeploy_internlm2_template"]["cases"].as_array().unwrap() {
            assert_eq!(
                tok.encode(text(&case["prompt"]), true).unwrap(),
                ids(&case["input_ids_with_bos"]),
                "{folder}: lmdeploy {}",
                case["name"]
            );
        }
        let reply = &g["tool_call_reply_example"];
        assert_eq!(
            tok.encode(text(&reply["text"]), false).unwrap(),
            ids(&reply["ids"]),
            "{folder}: tool call"
        );

        if folder == "internlm2-tiny" {
            let chat = golden(folder, "chat_golden.json");
            for case in chat["cases"].as_array().unwrap() {
                let prompt = internlm2_prompt(
                    text(&case["query"]),
                    &case["history_in"],
                    text(&case["meta_instruction"]),
                );
                assert_eq!(
                    tok.encode(&prompt, true).unwrap(),
                    ids(&case["prompt_ids"]),
                    "{}",
                    case["query"]
                );
                // `chat` returns the skip-specials decode cut at the first <|im_end|>, which
                // skipping already removed.
                let generated = ids(&case["generated_ids"]);
                assert_eq!(tok.decode(&generated), text(&case["response"]));
                assert_eq!(stream(&tok, &generated), text(&case["response"]));
            }
        }
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn round_trip_where_the_original_does() {
    for (folder, family) in ALL {
        let tok = load(folder, family);
        let g = tok_golden(folder);
        let decoded_key =
            if family == Family::ChatGlm2 { "decoded" } else { "decoded_skip_special" };
        let mut n = 0;
        for case in g["encode_cases"].as_array().unwrap() {
            let t = text(&case["text"]);
            if text(&case[decoded_key]) != t {
                continue; // e.g. a literal '▁', or special-token text for InternLM2
            }
            n += 1;
            assert_eq!(tok.decode(&tok.encode(t, true).unwrap()), t, "{folder}: {t:?}");
            assert_eq!(tok.decode(&tok.encode(t, false).unwrap()), t, "{folder}: {t:?}");
        }
        assert!(n >= 28, "{folder}: only {n} round-trip cases");

        // A long text: the 16 KB training corpus of the tiny tokenizers.
        let corpus =
            std::fs::read_to_string(fixture("chatglm2-tiny").join("tokenizer_training_corpus.txt"))
                .unwrap();
        let encoded = tok.encode(&corpus, false).unwrap();
        assert_eq!(tok.decode(&encoded), corpus, "{folder}: corpus");
        assert_eq!(stream(&tok, &encoded), corpus, "{folder}: corpus streamed");
    }
}

// ---------------------------------------------------------------- streaming

/// Every id list of the goldens, the tokenizer's specials and byte pieces included.
fn golden_id_lists(folder: &str) -> Vec<Vec<u32>> {
    let g = tok_golden(folder);
    let mut lists = Vec::new();
    for case in g["encode_cases"].as_array().unwrap() {
        for key in ["ids", "ids_no_special", "sentencepiece_ids", "fast_ids_DIFFER"] {
            if let Some(v) = case.get(key) {
                lists.push(ids(v));
            }
        }
    }
    for case in g["decode_cases"].as_array().unwrap() {
        lists.push(ids(&case["ids"]));
    }
    for key in ["chat_prompts", "chat_prompts_hf"] {
        for p in g.get(key).and_then(Value::as_array).into_iter().flatten() {
            lists.push(ids(&p["input_ids"]));
        }
    }
    if fixture(folder).join("chat_golden.json").exists() {
        let chat = golden(folder, "chat_golden.json");
        for case in chat["cases"].as_array().unwrap() {
            lists.push(ids(&case["generated_ids"]));
            lists.push(ids(&case["prompt_ids"]));
        }
    }
    lists
}

#[test]
fn stream_equals_decode_on_golden_ids() {
    for (folder, family) in ALL {
        let tok = load(folder, family);
        let lists = golden_id_lists(folder);
        assert!(lists.len() > 40, "{folder}");
        for list in &lists {
            assert_eq!(stream(&tok, list), tok.decode(list), "{folder}: {list:?}");
            // Every suffix too: streams that start mid-text (e.g. after a prompt).
            for start in 1..list.len().min(6) {
                assert_eq!(
                    stream(&tok, &list[start..]),
                    tok.decode(&list[start..]),
                    "{folder}: {list:?}[{start}..]"
                );
            }
        }
    }
}

/// Random id sequences weighted towards the hard cases: byte pieces (valid and broken
/// UTF-8), specials, space pieces, and ids past the vocabulary.
#[test]
fn stream_equals_decode_on_random_ids() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (folder, family) in ALL {
        let tok = load(folder, family);
        let vocab = tok.vocab_size() as u64;
        let utf8 = "九😀é 👨‍👩‍👧 a".as_bytes();
        for _ in 0..400 {
            let len = 1 + next() % 40;
            let mut list = Vec::new();
            while (list.len() as u64) < len {
                match next() % 10 {
                    0..=2 => list.push(3 + (next() % 256) as u32), // any byte
                    3..=4 => {
                        // the bytes of a valid character run
                        let start = (next() % utf8.len() as u64) as usize;
                        let end = (start + 1 + (next() % 6) as usize).min(utf8.len());
                        list.extend(utf8[start..end].iter().map(|&b| b as u32 + 3));
                    }
                    5 => list.push((vocab - 1 - next() % 8) as u32), // specials at the end
                    6 => list.push((next() % 3) as u32),             // unk, bos, eos
                    7 => list.push(vocab as u32 + (next() % 3) as u32), // out of range
                    _ => list.push((next() % vocab) as u32),
                }
            }
            let full = tok.decode(&list);
            let mut s = tok.stream_decoder();
            let mut streamed = String::new();
            for &id in &list {
                streamed.push_str(&s.push(id));
                // What was emitted is final.
                assert!(full.starts_with(&streamed), "{folder}: {list:?}");
            }
            streamed.push_str(&s.finish());
            assert_eq!(streamed, full, "{folder}: {list:?}");
        }
    }
}

#[test]
fn stream_holds_back_unfinished_characters() {
    // ChatGLM2: "▁" + the 4 bytes of 𠀀: nothing until the character is complete.
    let glm = load("chatglm2", Family::ChatGlm2);
    let mut s = glm.stream_decoder();
    let out: Vec<String> = [30910, 243, 163, 131, 131, 4815].iter().map(|&id| s.push(id)).collect();
    assert_eq!(out, ["", "", "", "", "𠀀", " rare"]);
    assert_eq!(s.finish(), "");
    // A run cut short comes out as U+FFFD at the end, as in the full decode.
    let mut s = glm.stream_decoder();
    assert_eq!(s.push(243), "");
    assert_eq!(s.push(163), "");
    assert_eq!(s.finish(), "\u{FFFD}\u{FFFD}");
    // First-piece space strip and later spaces.
    let mut s = glm.stream_decoder();
    assert_eq!([13755, 993].map(|id| s.push(id)), ["Hello", " world"]);

    // InternLM2: a byte run stays open until a non-byte piece (or the end) closes it,
    // because one bad byte turns the whole run into U+FFFD; skipped specials keep it open.
    let ilm = load("internlm2", Family::InternLm2);
    let mut s = ilm.stream_decoder();
    let out: Vec<String> = [243, 162, 155, 131, 92542, 9843].iter().map(|&id| s.push(id)).collect();
    assert_eq!(out, ["", "", "", "", "", "😀Hello"]);
    let mut s = ilm.stream_decoder();
    for id in [243, 162, 155, 131] {
        assert_eq!(s.push(id), "");
    }
    assert_eq!(s.finish(), "😀");
    let mut s = ilm.stream_decoder();
    assert_eq!([9843, 346].map(|id| s.push(id)), ["Hello", "!"]);
}

// ---------------------------------------------------------------- vocabulary facts

#[test]
fn vocabulary_and_special_ids() {
    for (folder, family) in ALL {
        let tok = load(folder, family);
        let g = tok_golden(folder);
        let size = g.get("tokenizer_vocab_size").or(g.get("vocab_size")).unwrap().as_u64().unwrap()
            as usize;
        assert_eq!(tok.vocab_size(), size, "{folder}");
        assert_eq!(tok.eos_id(), g["eos_id"].as_u64().unwrap() as u32, "{folder}");
        assert_eq!(tok.eos_id(), 2);
        for (name, id) in g["special_tokens"].as_object().unwrap() {
            assert_eq!(
                tok.token_to_id(name),
                Some(id.as_u64().unwrap() as u32),
                "{folder}: {name}"
            );
        }
        assert_eq!(tok.token_to_id("</s>"), Some(2), "{folder}");
        assert_eq!(tok.token_to_id("no such token"), None, "{folder}");
    }
    assert_eq!(load("chatglm2", Family::ChatGlm2).vocab_size(), 64794);
    assert_eq!(load("internlm2", Family::InternLm2).vocab_size(), 92544);
    assert_eq!(load("internlm2", Family::InternLm2).token_to_id("<|im_end|>"), Some(92542));
    assert_eq!(load("internlm2-tiny", Family::InternLm2).token_to_id("<|im_end|>"), Some(1022));
    assert_eq!(load("chatglm2", Family::ChatGlm2).token_to_id("[gMASK]"), Some(64790));
    assert_eq!(load("chatglm2", Family::ChatGlm2).token_to_id("▁Hello"), Some(13755));
}

/// Without `tokenizer_config.json` (the real-model fixture folders) InternLM2's specials
/// come from the built-in names; with one they come from its `added_tokens_decoder`.
#[test]
fn internlm2_specials_without_tokenizer_config() {
    let dir = common::copy_fixture("internlm2-tiny");
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let without = Tokenizer::from_folder(dir.path(), Family::InternLm2).unwrap();
    let with = load("internlm2-tiny", Family::InternLm2);
    let prompt =
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|action_start|><|plugin|>";
    assert_eq!(without.encode(prompt, true).unwrap(), with.encode(prompt, true).unwrap());
    assert_eq!(without.token_to_id("<|im_end|>"), Some(1022));
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
}

// ---------------------------------------------------------------- broken files

fn load_err(dir: &std::path::Path, family: Family) -> Error {
    match Tokenizer::from_folder(dir, family) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_folder_or_file_names_the_path() {
    let missing = fixture("no-such-model");
    let err = load_err(&missing, Family::ChatGlm2);
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-model"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path(), Family::InternLm2);
    assert!(err.to_string().contains("tokenizer.model"), "{err}");
}

#[test]
fn corrupt_tokenizer_model_is_a_clear_error() {
    let good = std::fs::read(fixture("chatglm2-tiny").join("tokenizer.model")).unwrap();
    let mut random = vec![0u8; 5000];
    let mut x = 12345u32;
    for b in random.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    let mut bad_files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("random bytes", random),
        ("text", b"this is not a protobuf".to_vec()),
        ("zeros", vec![0u8; 100]),
    ];
    for cut in [1, 7, 100, good.len() / 3, good.len() / 2, good.len() - 300, good.len() - 1] {
        bad_files.push(("truncated", good[..cut].to_vec()));
    }
    for (family, folder) in
        [(Family::ChatGlm2, "chatglm2-tiny"), (Family::InternLm2, "internlm2-tiny")]
    {
        for (what, bytes) in &bad_files {
            let dir = common::copy_fixture(folder);
            std::fs::write(dir.path().join("tokenizer.model"), bytes).unwrap();
            let err = load_err(dir.path(), family);
            let msg = err.to_string();
            assert!(matches!(err, Error::Tokenizer(_)), "{what}: {err:?}");
            assert!(msg.contains("tokenizer.model"), "{what}: {msg}");
        }
    }
    // Every cut in the first pieces and in the last 2 KB (the specs): some end on a piece
    // boundary, where the bytes still parse as a message.
    for cut in (0..2000).chain(good.len() - 2000..good.len()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.model"), &good[..cut]).unwrap();
        let err = load_err(dir.path(), Family::ChatGlm2);
        assert!(matches!(err, Error::Tokenizer(_)), "cut {cut}: {err:?}");
    }
}

// ---------------------------------------------------------------- tokenizer.json

#[test]
fn tokenizer_json_is_preferred() {
    let dir = tempfile::tempdir().unwrap();
    // A broken tokenizer.model next to it must not be read.
    std::fs::write(dir.path().join("tokenizer.model"), b"garbage").unwrap();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "</s>": 2, "world": 3}, "unk_token": "<unk>"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = Tokenizer::from_folder(dir.path(), Family::InternLm2).unwrap();
    assert_eq!(tok.encode("hello world", false).unwrap(), [1, 3]);
    assert_eq!(tok.decode(&[1, 3, 2]), "hello world");
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.token_to_id("world"), Some(3));
    let mut s = tok.stream_decoder();
    assert_eq!([1, 3, 2].map(|id| s.push(id)).concat() + &s.finish(), "hello world");

    std::fs::write(dir.path().join("tokenizer.json"), b"{ not json").unwrap();
    let err = load_err(dir.path(), Family::InternLm2);
    assert!(
        matches!(err, Error::Tokenizer(_)) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );
}
