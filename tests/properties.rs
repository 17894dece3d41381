//! Properties over random inputs (proptest): the KV block manager under random sequences of
//! operations, the step planner, and streamed answer pieces that add up to the whole answer
//! (the answer stream alone, a chat turn, and the serving engine).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use common::fixture;
use proptest::prelude::*;
use triton_llm::Result;
use triton_llm::chat::clean_response;
use triton_llm::chat::messages::ACTION_START;
use triton_llm::chat::stream::AnswerStream;
use triton_llm::pipeline::{
    ChatModel, ChatTurn, Completion, GenerationOptions, LoadOptions, Prompt,
};
use triton_llm::sampling::SamplingParams;
use triton_llm::sequence::BlockTable;
use triton_llm::sequence::FinishReason;
use triton_llm::sequence::blocks::{BlockId, BlockManager};
use triton_llm::serving::{
    AnswerSink, ChatJob, NoMetrics, SchedulerConfig, ServingEngine, plan_step,
};

// ---------------------------------------------------------------- block manager

/// Prompts are cut from a few shared texts so that prefixes repeat and hit the cache.
const BASES: usize = 3;
const BASE_LEN: usize = 40;

fn base(index: usize) -> Vec<u32> {
    (0..BASE_LEN as u32).map(|i| if i < 8 { i } else { i * 3 + index as u32 }).collect()
}

#[derive(Clone, Debug)]
enum Op {
    /// A new sequence: `len` tokens of a base text, then `tail`.
    Admit { base: usize, len: usize, tail: Vec<u32>, reuse: bool },
    /// Room for `tokens` more tokens of a live sequence, which then holds them.
    Extend { seq: usize, tokens: Vec<u32> },
    /// Offers a live sequence's full blocks for reuse.
    Register { seq: usize },
    /// A live sequence finishes or is preempted.
    Release { seq: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let tail = prop::collection::vec(100u32..104, 0..6);
    prop_oneof![
        3 => (0..BASES, 0..=BASE_LEN, tail.clone(), prop::bool::weighted(0.8))
            .prop_map(|(base, len, tail, reuse)| Op::Admit { base, len, tail, reuse }),
        3 => (any::<usize>(), tail).prop_map(|(seq, tokens)| Op::Extend { seq, tokens }),
        2 => any::<usize>().prop_map(|seq| Op::Register { seq }),
        2 => any::<usize>().prop_map(|seq| Op::Release { seq }),
    ]
}

struct Live {
    table: BlockTable,
    /// Every token of the sequence, all computed.
    tokens: Vec<u32>,
    /// Admitted without reuse (as the engine does past the rope limit): offered to nobody.
    shareable: bool,
}

/// What the manager must keep true, checked against a model of the sequences it serves.
struct Model {
    m: BlockManager,
    live: Vec<Live>,
    /// The tokens up to the end of each full block a sequence registered: what a prefix hit
    /// on that block must match.
    content: HashMap<BlockId, Vec<u32>>,
    hit_tokens: u64,
}

impl Model {
    /// A live sequence other than `except` whose table lists `block`.
    fn holder_other_than(&self, block: BlockId, except: usize) -> Option<usize> {
        (0..self.live.len()).find(|&s| s != except && self.live[s].table.blocks.contains(&block))
    }

    fn apply(&mut self, op: Op) {
        let bs = self.m.block_size();
        match op {
            Op::Admit { base: b, len, tail, reuse } => {
                let mut prompt = base(b)[..len].to_vec();
                prompt.extend(tail);
                if prompt.is_empty() {
                    return; // a sequence has at least one token
                }
                let available = self.m.available();
                let Some((mut table, cached)) = self.m.allocate_prompt(&prompt, reuse) else {
                    assert_eq!(self.m.available(), available, "a refused prompt took blocks");
                    assert!(available < self.m.blocks_for(prompt.len()), "refused with room");
                    return;
                };
                assert_eq!(table.blocks.len(), self.m.blocks_for(prompt.len()));
                assert_eq!(cached % bs, 0);
                assert!(cached < prompt.len(), "the last prompt token must be computed");
                let hits = cached / bs;
                for (i, &block) in table.blocks.iter().enumerate() {
                    if i < hits {
                        let held = self.content.get(&block);
                        assert_eq!(held.map(Vec::as_slice), Some(&prompt[..(i + 1) * bs]));
                    } else {
                        let owner = self.holder_other_than(block, usize::MAX);
                        assert_eq!(owner, None, "fresh block {block} is still held");
                        self.content.remove(&block);
                    }
                }
                self.hit_tokens += cached as u64;
                if !reuse {
                    table.mark_unshareable();
                }
                self.live.push(Live { table, tokens: prompt, shareable: reuse });
            }
            Op::Extend { seq, tokens } if !self.live.is_empty() => {
                let seq = seq % self.live.len();
                let len = self.live[seq].tokens.len() + tokens.len();
                let before = self.live[seq].table.clone();
                let available = self.m.available();
                if !self.m.grow(&mut self.live[seq].table, len) {
                    assert_eq!(self.live[seq].table, before, "a refused grow changed the table");
                    assert_eq!(self.m.available(), available);
                    assert!(available < self.m.blocks_for(len) - before.blocks.len());
                    return;
                }
                let table = &self.live[seq].table;
                assert_eq!(table.blocks.len(), before.blocks.len().max(self.m.blocks_for(len)));
                assert_eq!(table.blocks[..before.blocks.len()], before.blocks[..]);
                for &block in table.blocks[before.blocks.len()..].to_vec().iter() {
                    assert_eq!(self.holder_other_than(block, seq), None, "{block} is held");
                    self.content.remove(&block);
                }
                self.live[seq].tokens.extend(tokens);
            }
            Op::Register { seq } if !self.live.is_empty() => {
                let seq = seq % self.live.len();
                let live = &mut self.live[seq];
                self.m.register_full_blocks(&mut live.table, &live.tokens);
                if !live.shareable {
                    return;
                }
                let full = (live.tokens.len() / bs).min(live.table.blocks.len());
                for (i, &block) in live.table.blocks[..full].iter().enumerate() {
                    let prefix = &live.tokens[..(i + 1) * bs];
                    let held = self.content.entry(block).or_insert_with(|| prefix.to_vec());
                    assert_eq!(held, prefix, "block {block} holds two contents");
                }
            }
            Op::Release { seq } if !self.live.is_empty() => {
                let live = self.live.swap_remove(seq % self.live.len());
                self.m.free(live.table);
            }
            _ => {}
        }
    }

    fn check(&self) {
        let bs = self.m.block_size();
        let mut held: HashMap<BlockId, (usize, usize)> = HashMap::new();
        for (s, live) in self.live.iter().enumerate() {
            let distinct: HashSet<_> = live.table.blocks.iter().collect();
            assert_eq!(distinct.len(), live.table.blocks.len(), "a table lists a block twice");
            assert!(live.table.blocks.len() >= self.m.blocks_for(live.tokens.len()));
            for (i, &block) in live.table.blocks.iter().enumerate() {
                assert!((block as usize) < self.m.num_blocks());
                // Shared only as the same full block of the same prefix.
                if let Some(&(other, j)) = held.get(&block) {
                    let end = (i + 1) * bs;
                    assert_eq!(i, j, "block {block} sits at two positions");
                    assert!(end <= live.tokens.len() && end <= self.live[other].tokens.len());
                    assert_eq!(live.tokens[..end], self.live[other].tokens[..end]);
                }
                held.insert(block, (s, i));
            }
        }
        assert_eq!(self.m.used(), held.len(), "used blocks are exactly the held ones");
        assert_eq!(self.m.available() + self.m.used(), self.m.num_blocks());
        assert_eq!(self.m.prefix_hit_tokens, self.hit_tokens);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn block_manager_keeps_its_invariants(
        num_blocks in 1usize..24,
        block_size in 1usize..6,
        prefix_caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut model = Model {
            m: BlockManager::new(num_blocks, block_size, prefix_caching),
            live: Vec::new(),
            content: HashMap::new(),
            hit_tokens: 0,
        };
        for op in ops {
            model.apply(op);
            model.check();
        }
        if !prefix_caching {
            prop_assert_eq!(model.hit_tokens, 0);
        }
        for live in std::mem::take(&mut model.live) {
            model.m.free(live.table);
        }
        prop_assert_eq!(model.m.used(), 0);
        prop_assert_eq!(model.m.available(), num_blocks);
    }
}

// ---------------------------------------------------------------- step planner

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn step_plans_keep_the_budget_and_progress(
        pending in prop::collection::vec(
            (prop_oneof![Just(0usize), Just(1), 2usize..300], prop::bool::weighted(0.2)),
            0..12,
        ),
        max_tokens in prop_oneof![Just(0usize), 1usize..600],
    ) {
        let plan = plan_step(&pending, max_tokens);
        prop_assert_eq!(plan.len(), pending.len());
        let decodes = pending.iter().filter(|&&(p, _)| p == 1).count();
        let mut cut_short = false;
        let mut whole_run = None;
        for (i, (&t, &(p, whole))) in plan.iter().zip(&pending).enumerate() {
            prop_assert!(t <= p, "{} tokens for {} pending", t, p);
            if p == 1 {
                prop_assert_eq!(t, 1, "every decode runs");
            }
            if whole {
                prop_assert!(t == 0 || t == p, "a whole-only prefill ran {} of {}", t, p);
            }
            if p > 1 && t > 0 {
                // Prefills are served in order: none runs after one that was cut short.
                prop_assert!(!cut_short, "prefill {} ran after one was cut short", i);
                if whole && t > 1 {
                    whole_run = Some(t);
                }
            }
            cut_short |= p > 1 && t < p;
        }
        let total: usize = plan.iter().sum();
        if pending.iter().any(|&(p, _)| p > 0) {
            prop_assert!(total > 0, "the step makes no progress");
        }
        // The budget holds, except that every decode runs and a whole-only prefill that
        // starts inside the budget runs to its end.
        let allowed = max_tokens.max(decodes).max(1) + whole_run.unwrap_or(0);
        prop_assert!(total <= allowed, "{} tokens for a budget of {}", total, max_tokens);
        // No budget is left unused while a prefill waits.
        if total < max_tokens {
            prop_assert!(plan.iter().zip(&pending).all(|(&t, &(p, _))| t == p));
        }
    }
}

// ---------------------------------------------------------------- streamed answers

fn chat_model(folder: &str) -> &'static ChatModel {
    static MODELS: OnceLock<Mutex<HashMap<String, &'static ChatModel>>> = OnceLock::new();
    let mut models = MODELS.get_or_init(Default::default).lock().unwrap();
    models.entry(folder.to_string()).or_insert_with(|| {
        Box::leak(Box::new(ChatModel::load(&fixture(folder), &LoadOptions::default()).unwrap()))
    })
}

// vicuna-tiny: FastChat's clean-up (spaces before punctuation, strip); llama3-tiny: a
// tokenizer.json and transformers' clean-up of spaces.
const FOLDERS: [&str; 4] = ["chatglm2-tiny", "internlm2-tiny", "vicuna-tiny", "llama3-tiny"];

/// Text from pieces that exercise the decoders and the clean-ups: spaces, newlines,
/// several scripts, and ChatGLM2's "[[训练时间]]" mark.
fn text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "a",
        "b",
        " ",
        "  ",
        "\n",
        "\t",
        "你",
        "好",
        "训练",
        "[[训练时间]]",
        "<|im_end|>",
        "😀",
        "é",
        "the",
        "。",
        "1",
        " .",
        " n't",
        " '",
        " 's",
        "?",
        ",",
    ]);
    prop::collection::vec(piece, 1..8).prop_map(|p| p.concat())
}

fn stops() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..3)
}

/// Ids as (class, value), weighted towards byte pieces (3..=258 in both families) and the
/// specials at the end of the vocabulary; see `pick_id`.
fn ids() -> impl Strategy<Value = Vec<(u8, u32)>> {
    prop::collection::vec((0u8..8, any::<u32>()), 0..40)
}

fn pick_id(vocab: u32, (class, value): (u8, u32)) -> u32 {
    match class {
        0..=2 => 3 + value % 256,
        3 => vocab - 1 - value % 8,
        _ => value % vocab,
    }
}

/// Feeds `ids` as a generation does (up to a stop string) and returns the pieces, the
/// answer, and whether a stop string ended it (found by a push, or in the text the end
/// released).
fn run_stream(stream: &mut AnswerStream, ids: &[u32]) -> (Vec<String>, String, bool) {
    let mut pieces = Vec::new();
    for &id in ids {
        let (piece, stop) = stream.push(id);
        pieces.push(piece);
        if stop {
            break;
        }
    }
    pieces.push(stream.finish());
    (pieces, stream.answer(), stream.is_stopped())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn answer_stream_pieces_add_up_to_the_answer(
        folder in prop::sample::select(FOLDERS.to_vec()),
        ids in ids(),
        stop in stops(),
    ) {
        let chat = chat_model(folder);
        let tok = &chat.tokenizer;
        let ids: Vec<u32> = ids.into_iter().map(|id| pick_id(tok.vocab_size() as u32, id)).collect();
        // Without the clean-up: the decoded text up to the first stop string.
        let mut raw = AnswerStream::new(tok, None, stop.clone());
        let (pieces, answer, stopped) = run_stream(&mut raw, &ids);
        prop_assert_eq!(pieces.concat(), answer.clone());
        let full = tok.decode(&ids);
        prop_assert!(full.starts_with(&answer), "{:?} is not a prefix of {:?}", answer, full);
        prop_assert!(stop.iter().all(|s| !answer.contains(s.as_str())), "{:?}", answer);
        if stopped {
            let rest = &full[answer.len()..];
            prop_assert!(stop.iter().any(|s| rest.starts_with(s.as_str())), "{:?}", rest);
        } else {
            prop_assert_eq!(&answer, &full);
        }
        // With the family's clean-up: the cleaned text of the same answer.
        let mut cleaned = AnswerStream::new(tok, Some(chat.cleanup()), stop);
        let (pieces, clean_answer, _) = run_stream(&mut cleaned, &ids);
        prop_assert_eq!(pieces.concat(), clean_answer.clone());
        prop_assert_eq!(clean_answer, clean_response(chat.cleanup(), &answer));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// With tools offered, the streamed pieces add up to the answer, which is the text
    /// before the first tool call; the action marks among the ids decode as their text.
    #[test]
    fn tool_call_answers_stream_the_text_before_the_call(ids in ids()) {
        let chat = chat_model("internlm2-tiny");
        let tok = &chat.tokenizer;
        let ids: Vec<u32> = ids.into_iter().map(|id| pick_id(tok.vocab_size() as u32, id)).collect();
        let mut stream = AnswerStream::new(tok, Some(chat.cleanup()), Vec::new()).with_tool_calls(tok);
        let (pieces, answer, _) = run_stream(&mut stream, &ids);
        prop_assert_eq!(pieces.concat(), answer.clone());
        let marks = ["<|action_start|>", "<|plugin|>", "<|interpreter|>", "<|action_end|>"];
        let mut decoder = tok.stream_decoder().show(tok.known_tokens(&marks));
        let mut full: String = ids.iter().map(|&id| decoder.push(id)).collect();
        full.push_str(&decoder.finish());
        let before_call = full.split(ACTION_START).next().unwrap();
        prop_assert_eq!(&answer, &clean_response(chat.cleanup(), before_call));
        if !stream.tool_calls().is_empty() {
            prop_assert!(full.contains(ACTION_START), "{:?}", full);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Answers whose text has the patterns the clean-ups change (spaces before punctuation
    /// and contractions, whitespace at the ends): the cleaned pieces still add up to the
    /// cleaned answer, token by token.
    #[test]
    fn cleaned_pieces_of_real_text_add_up(
        folder in prop::sample::select(FOLDERS.to_vec()),
        parts in prop::collection::vec(text(), 1..4),
    ) {
        let chat = chat_model(folder);
        let tok = &chat.tokenizer;
        let ids = tok.encode(&parts.join(" "), false).unwrap();
        let mut stream = AnswerStream::new(tok, Some(chat.cleanup()), Vec::new());
        let (pieces, answer, _) = run_stream(&mut stream, &ids);
        prop_assert_eq!(pieces.concat(), answer.clone());
        prop_assert_eq!(answer, clean_response(chat.cleanup(), &tok.decode(&ids)));
    }
}

fn options(seed: u64, temperature: f32, max_new: usize, stop: Vec<String>) -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingParams { temperature, seed: Some(seed), ..Default::default() },
        max_new_tokens: Some(max_new),
        stop,
        ..Default::default()
    }
}

/// InternLM2's tokenizer holds a byte run back until it closes (a later byte can still turn
/// it into U+FFFD), so a stop string made of the answer's last byte tokens is only found when
/// the generation ends: the answer is cut before it, and a stop string is why it ended.
#[test]
fn a_stop_string_the_end_releases_cuts_the_answer_and_ends_it() {
    let chat = chat_model("internlm2-tiny");
    let tok = &chat.tokenizer;
    let mut ids = tok.encode("ok", false).unwrap();
    ids.push(tok.token_to_id("<0x09>").unwrap());
    let prompt = Prompt::raw(tok.encode("hello", true).unwrap());
    let options = options(0, 0.0, ids.len(), vec!["\t".into()]);
    let mut generating = chat.start(prompt, &options).unwrap();
    let mut streamed = String::new();
    for &id in &ids {
        let ran = generating.sequence.pending_tokens();
        streamed.push_str(&generating.accept(ran, Some(id)));
    }
    assert!(generating.is_finished(), "the length ends it");
    let (rest, completion) = generating.finish().unwrap();
    streamed.push_str(&rest);
    assert_eq!(tok.decode(&ids), "ok\t");
    assert_eq!((streamed.as_str(), completion.response.as_str()), ("ok", "ok"));
    assert_eq!(completion.finish_reason, FinishReason::Stop);
}

fn turn(query: String, history: Vec<(String, String)>, system_prompt: Option<&str>) -> ChatTurn {
    ChatTurn { query, history, history_len: 10, system_prompt: system_prompt.map(str::to_string) }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn chat_pieces_add_up_to_the_response(
        folder in prop::sample::select(FOLDERS.to_vec()),
        query in text(),
        history in prop::collection::vec((text(), text()), 0..2),
        stop in stops(),
        seed in any::<u64>(),
        temperature in prop_oneof![Just(0.0f32), 0.5f32..1.5],
        max_new in 1usize..24,
        cancel_after in prop::option::weighted(0.2, 0usize..4),
    ) {
        let chat = chat_model(folder);
        let mut streamed = String::new();
        let mut count = 0;
        let completion = common::chat(chat, &turn(query, history, Some("")), &options(seed, temperature, max_new, stop), |piece| {
                assert!(!piece.is_empty(), "an empty piece was sent");
                streamed.push_str(piece);
                count += 1;
                cancel_after.is_none_or(|n| count <= n)
            })
            .unwrap();
        prop_assert_eq!(streamed, completion.response);
    }
}

/// Collects one job's pieces and sends them with its completion.
struct Collect {
    pieces: String,
    done: mpsc::Sender<(String, Result<Completion>)>,
}

impl AnswerSink for Collect {
    fn on_text(&mut self, text: &str, _: usize) -> bool {
        self.pieces.push_str(text);
        true
    }
    fn is_cancelled(&mut self) -> bool {
        false
    }
    fn finish(self: Box<Self>, result: Result<Completion>) {
        let _ = self.done.send((self.pieces, result));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Several turns at once in a small cache (chunked prefills, preemption, prefix reuse).
    #[test]
    fn served_pieces_add_up_to_each_response(
        folder in prop::sample::select(FOLDERS.to_vec()),
        jobs in prop::collection::vec((text(), stops(), any::<u64>(), 1usize..16), 1..5),
        max_num_batched_tokens in 8usize..64,
        num_blocks in 12u32..40,
    ) {
        let chat = Arc::new(ChatModel::load(&fixture(folder), &LoadOptions::default()).unwrap());
        let config = SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens,
            block_size: 8,
            cache_max_entry_count: num_blocks as f64,
            enable_prefix_caching: true,
            ..SchedulerConfig::default()
        };
        let engine =
            ServingEngine::start(Arc::clone(&chat), config, "properties", Box::new(NoMetrics))
                .unwrap();
        let (done, results) = mpsc::channel();
        for (query, stop, seed, max_new) in &jobs {
            // No InternLM2 meta instruction (250 tiny-tokenizer tokens): prompts fit the cache.
            let prompt = chat.prepare_chat(&turn(query.clone(), vec![], Some(""))).unwrap();
            engine.submit(ChatJob {
                prompt,
                options: options(*seed, 0.8, *max_new, stop.clone()),
                sink: Box::new(Collect { pieces: String::new(), done: done.clone() }),
                arrived: std::time::Instant::now(),
                fault: None,
            });
        }
        for _ in &jobs {
            let (pieces, result) = results.recv().unwrap();
            let completion = result.unwrap();
            prop_assert_eq!(pieces, completion.response);
        }
    }
}
