//! The serving engine's bookkeeping under preemption and a full cache, on the CPU engine
//! with the tiny InternLM2 fixture (its dynamic-NTK rope changes past 128 positions).

mod common;

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::fixture;
use triton_llm::Result;
use triton_llm::engine::kv_space::{Admission, KvSpace};
use triton_llm::engine::{FinishReason, GenerateRequest, SamplingParams, Sequence};
use triton_llm::model::CausalLm;
use triton_llm::pipeline::{ChatModel, ChatTurn, Completion, GenerationOptions, LoadOptions};
use triton_llm::serving::{
    AnswerSink, ChatJob, EngineMetrics, SchedulerConfig, ServingEngine, StepTimes,
};

fn internlm2_tiny() -> ChatModel {
    ChatModel::load(&fixture("internlm2-tiny"), &LoadOptions::default()).unwrap()
}

fn greedy_sequence(prompt: Vec<u32>, max_new: usize) -> Sequence {
    Sequence::new(GenerateRequest {
        prompt_ids: prompt,
        sampling: SamplingParams::greedy(),
        max_total_tokens: None,
        max_new_tokens: Some(max_new),
        stop_token_ids: vec![],
        producible_ids: 1024,
        guard_invalid_scores: false,
        max_context: 256,
    })
    .unwrap()
}

/// Runs the sequence alone, one call per step, until it holds `until` tokens.
fn run(model: &dyn CausalLm, space: &mut KvSpace, sequence: &mut Sequence, until: usize) {
    while sequence.tokens().len() < until && !sequence.is_finished() {
        let tokens = sequence.pending_tokens();
        assert!(space.ensure(sequence, tokens));
        sequence.prepare_step(tokens);
        let chosen = model
            .forward_sample(
                space.arena.as_mut(),
                &[sequence.step(tokens)],
                &[sequence.sample_row()],
            )
            .unwrap();
        sequence.accept(tokens, chosen[0]);
        space.register(sequence);
    }
}

fn last_logits(model: &dyn CausalLm, space: &mut KvSpace, sequence: &mut Sequence) -> Vec<f32> {
    let tokens = sequence.pending_tokens();
    assert!(space.ensure(sequence, tokens));
    model.forward_batch(space.arena.as_mut(), &[sequence.step(tokens)]).unwrap().pop().unwrap()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A sequence preempted after decoding past the rope limit is recomputed in one call whose
/// rotary base is scaled for its whole length: those blocks must not be offered to a later
/// prompt sharing its prefix (the next round of the chat), whose K is computed unscaled.
#[test]
fn blocks_recomputed_past_the_rope_limit_are_not_reused() {
    let chat = internlm2_tiny();
    let model = chat.model.as_ref();
    assert_eq!(model.info().length_dependent_rope_after, Some(128));
    let mut space = KvSpace::new(model, 16, 12, true).unwrap();
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 1000 + 3).collect();
    let mut first = greedy_sequence(prompt, 60);
    assert_eq!(space.admit(&mut first), Admission::Admitted);
    run(model, &mut space, &mut first, 140);

    // A prompt sharing the first 120 tokens, all within the limit.
    let mut next_prompt = first.tokens()[..120].to_vec();
    next_prompt.extend([5, 6, 7]);
    let fresh = {
        let mut uncached = KvSpace::new(model, 16, 12, false).unwrap();
        let mut next = greedy_sequence(next_prompt.clone(), 5);
        assert_eq!(uncached.admit(&mut next), Admission::Admitted);
        last_logits(model, &mut uncached, &mut next)
    };
    let reused = {
        let mut next = greedy_sequence(next_prompt.clone(), 5);
        assert_eq!(space.admit(&mut next), Admission::Admitted);
        assert_eq!(next.computed(), 112, "7 blocks computed within the limit are reused");
        let logits = last_logits(model, &mut space, &mut next);
        space.release(&mut next);
        logits
    };
    assert!(max_difference(&fresh, &reused) < 1e-3);

    // Preempted, its cached blocks evicted (another prompt takes the whole cache), then
    // readmitted: recomputed in one call of 140 tokens.
    space.release(&mut first);
    let (all, _) = space.blocks.allocate_prompt(&[1; 12 * 16], false).unwrap();
    space.blocks.free(all);
    assert_eq!(space.admit(&mut first), Admission::Admitted);
    assert_eq!(first.computed(), 0);
    assert!(space.must_prefill_whole(&first));
    run(model, &mut space, &mut first, 141);
    space.release(&mut first);

    let mut next = greedy_sequence(next_prompt, 5);
    assert_eq!(space.admit(&mut next), Admission::Admitted);
    assert_eq!(next.computed(), 0, "blocks recomputed past the limit were offered for reuse");
    let recomputed = last_logits(model, &mut space, &mut next);
    assert!(max_difference(&fresh, &recomputed) < 1e-3);
}

#[derive(Default)]
struct Counts {
    prompt_tokens: usize,
    prefix_hit_tokens: usize,
    preempted: usize,
    empty_steps: usize,
}

struct Recorder(Arc<Mutex<Counts>>);

impl EngineMetrics for Recorder {
    fn prompt_tokens(&mut self, count: usize) {
        self.0.lock().unwrap().prompt_tokens += count;
    }
    fn generated_tokens(&mut self, _: usize) {}
    fn queue(&mut self, _: usize, _: usize) {}
    fn time_to_first_token(&mut self, _: f64) {}
    fn inter_token_latency(&mut self, _: f64) {}
    fn cancelled(&mut self) {}
    fn preempted(&mut self) {
        self.0.lock().unwrap().preempted += 1;
    }
    fn kv_blocks(&mut self, _: usize, _: usize) {}
    fn prefix_hit_tokens(&mut self, count: usize) {
        self.0.lock().unwrap().prefix_hit_tokens += count;
    }
    fn step(&mut self, sequences: usize, _: &StepTimes) {
        if sequences == 0 {
            self.0.lock().unwrap().empty_steps += 1;
        }
    }
}

struct Collect(mpsc::Sender<Result<Completion>>);

impl AnswerSink for Collect {
    fn on_text(&mut self, _: &str) -> bool {
        true
    }
    fn is_cancelled(&mut self) -> bool {
        false
    }
    fn finish(self: Box<Self>, result: Result<Completion>) {
        let _ = self.0.send(result);
    }
}

fn turn(query: &str) -> ChatTurn {
    ChatTurn {
        query: query.into(),
        history: vec![],
        history_len: 0,
        system_prompt: Some(String::new()),
    }
}

fn job(query: &str, max_new: usize, answers: &mpsc::Sender<Result<Completion>>) -> ChatJob {
    ChatJob {
        turn: turn(query),
        options: GenerationOptions {
            sampling: SamplingParams::greedy(),
            max_new_tokens: Some(max_new),
            ignore_eos: true,
            ..Default::default()
        },
        sink: Box::new(Collect(answers.clone())),
        arrived: Instant::now(),
    }
}

/// An engine of `blocks` blocks of 4 tokens, 8 tokens a step (prompts prefill in chunks).
fn small_engine(
    chat: ChatModel,
    blocks: usize,
    prefix_caching: bool,
) -> (ServingEngine, Arc<Mutex<Counts>>) {
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 8,
        block_size: 4,
        cache_max_entry_count: blocks as f64,
        enable_prefix_caching: prefix_caching,
    };
    let counts = Arc::new(Mutex::new(Counts::default()));
    let engine =
        ServingEngine::start(Arc::new(chat), config, "test", Box::new(Recorder(counts.clone())))
            .unwrap();
    (engine, counts)
}

/// A sequence preempted during its chunked prefill is recomputed later: its prompt counts
/// once in the prompt-token metric, and its hits on its own blocks are no prefix reuse.
#[test]
fn a_preempted_prompt_is_counted_once() {
    for prefix_caching in [false, true] {
        let chat = internlm2_tiny();
        let short = chat.chat_prompt_ids(&turn("hi")).unwrap().len();
        let mut query = String::from("tell me");
        while chat.chat_prompt_ids(&turn(&query)).unwrap().len() < 95 {
            query.push_str(" more words");
        }
        let long = chat.chat_prompt_ids(&turn(&query)).unwrap().len();
        let blocks = short.div_ceil(4) + long.div_ceil(4) + 1;
        let (engine, counts) = small_engine(chat, blocks, prefix_caching);
        let (answers, completions) = mpsc::channel();
        engine.submit(job("hi", 20, &answers));
        engine.submit(job(&query, 3, &answers));
        let mut served = 0;
        for _ in 0..2 {
            let completion = completions.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
            served += completion.prompt_tokens;
        }
        drop(engine);
        let counts = counts.lock().unwrap();
        assert!(counts.preempted > 0, "the test needs a preemption");
        assert_eq!(counts.prompt_tokens, served);
        assert_eq!(counts.prefix_hit_tokens, 0, "prefix caching {prefix_caching}");
    }
}

/// A lone sequence that outgrows the whole cache ends with `length` and no forward pass of
/// nothing after it.
#[test]
fn a_sequence_that_fills_the_cache_ends_without_an_empty_step() {
    let chat = internlm2_tiny();
    let prompt = chat.chat_prompt_ids(&turn("hi")).unwrap().len();
    let (engine, counts) = small_engine(chat, prompt.div_ceil(4) + 1, false);
    let (answers, completions) = mpsc::channel();
    engine.submit(job("hi", 40, &answers));
    let completion = completions.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    drop(engine);
    assert_eq!(completion.finish_reason, FinishReason::Length);
    assert!(completion.output_ids.len() < 40);
    assert_eq!(counts.lock().unwrap().empty_steps, 0);
}
