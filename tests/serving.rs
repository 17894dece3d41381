//! The serving engine's bookkeeping under preemption and a full cache, on the CPU path
//! with the tiny InternLM2 fixture (its dynamic-NTK rope changes past 128 positions).

mod common;

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::fixture;
use triton_llm::Result;
use triton_llm::dtype::KvFormat;
use triton_llm::faults::Fault;
use triton_llm::model::CausalLm;
use triton_llm::pipeline::{ChatModel, ChatTurn, Completion, GenerationOptions, LoadOptions};
use triton_llm::sampling::SamplingParams;
use triton_llm::sequence::kv_space::{Admission, KvSpace};
use triton_llm::sequence::{FinishReason, GenerateRequest, Sequence};
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
        min_new_tokens: 0,
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
    let mut space = KvSpace::new(model, KvFormat::Model, 16, 12, true).unwrap();
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 1000 + 3).collect();
    let mut first = greedy_sequence(prompt, 60);
    assert_eq!(space.admit(&mut first), Admission::Admitted);
    run(model, &mut space, &mut first, 140);

    // A prompt sharing the first 120 tokens, all within the limit.
    let mut next_prompt = first.tokens()[..120].to_vec();
    next_prompt.extend([5, 6, 7]);
    let fresh = {
        let mut uncached = KvSpace::new(model, KvFormat::Model, 16, 12, false).unwrap();
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
    fn preempted(&mut self) {
        self.0.lock().unwrap().preempted += 1;
    }
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
    fn on_text(&mut self, _: &str, _: usize) -> bool {
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

fn job(
    chat: &ChatModel,
    query: &str,
    max_new: usize,
    answers: &mpsc::Sender<Result<Completion>>,
) -> ChatJob {
    ChatJob {
        prompt: chat.prepare_chat(&turn(query)).unwrap(),
        options: GenerationOptions {
            sampling: SamplingParams::greedy(),
            max_new_tokens: Some(max_new),
            ignore_eos: true,
            ..Default::default()
        },
        sink: Box::new(Collect(answers.clone())),
        arrived: Instant::now(),
        fault: None,
    }
}

/// An engine of `blocks` blocks of 4 tokens, 8 tokens a step (prompts prefill in chunks).
fn small_engine(
    chat: &Arc<ChatModel>,
    blocks: usize,
    prefix_caching: bool,
) -> (ServingEngine, Arc<Mutex<Counts>>) {
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 8,
        block_size: 4,
        cache_max_entry_count: blocks as f64,
        enable_prefix_caching: prefix_caching,
        ..SchedulerConfig::default()
    };
    let counts = Arc::new(Mutex::new(Counts::default()));
    let engine =
        ServingEngine::start(Arc::clone(chat), config, "test", Box::new(Recorder(counts.clone())))
            .unwrap();
    (engine, counts)
}

/// A sequence preempted during its chunked prefill is recomputed later: its prompt counts
/// once in the prompt-token metric, and its hits on its own blocks are no prefix reuse.
#[test]
fn a_preempted_prompt_is_counted_once() {
    for prefix_caching in [false, true] {
        let chat = Arc::new(internlm2_tiny());
        let short = chat.chat_prompt_ids(&turn("hi")).unwrap().len();
        let mut query = String::from("tell me");
        while chat.chat_prompt_ids(&turn(&query)).unwrap().len() < 95 {
            query.push_str(" more words");
        }
        let long = chat.chat_prompt_ids(&turn(&query)).unwrap().len();
        let blocks = short.div_ceil(4) + long.div_ceil(4) + 1;
        let (engine, counts) = small_engine(&chat, blocks, prefix_caching);
        let (answers, completions) = mpsc::channel();
        engine.submit(job(&chat, "hi", 20, &answers));
        engine.submit(job(&chat, &query, 3, &answers));
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
    let chat = Arc::new(internlm2_tiny());
    let prompt = chat.chat_prompt_ids(&turn("hi")).unwrap().len();
    let (engine, counts) = small_engine(&chat, prompt.div_ceil(4) + 1, false);
    let (answers, completions) = mpsc::channel();
    engine.submit(job(&chat, "hi", 40, &answers));
    let completion = completions.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    drop(engine);
    assert_eq!(completion.finish_reason, FinishReason::Length);
    assert!(completion.output_ids.len() < 40);
    assert_eq!(counts.lock().unwrap().empty_steps, 0);
}

/// What reached a request's sink: text, its end, or its drop without an end.
#[derive(Debug)]
enum Event {
    Text,
    End(Result<Completion>),
    DroppedUnanswered,
}

struct Probe {
    events: mpsc::Sender<Event>,
    answered: bool,
    seen_text: bool,
    /// (held, release): once running (its first text seen), the engine's next cancellation
    /// poll of this request says `held` and waits for `release`, so the engine stands still
    /// with the request running while a test arranges the rest.
    hold: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
}

impl AnswerSink for Probe {
    fn on_text(&mut self, _: &str, _: usize) -> bool {
        self.seen_text = true;
        let _ = self.events.send(Event::Text);
        true
    }
    fn is_cancelled(&mut self) -> bool {
        if self.seen_text
            && let Some((held, release)) = self.hold.take()
        {
            held.send(()).unwrap();
            release.recv().unwrap();
        }
        false
    }
    fn finish(mut self: Box<Self>, result: Result<Completion>) {
        self.answered = true;
        let _ = self.events.send(Event::End(result));
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.events.send(Event::DroppedUnanswered);
        }
    }
}

fn probe_job(
    chat: &ChatModel,
    max_new: usize,
    fault: Option<Fault>,
) -> (ChatJob, mpsc::Receiver<Event>) {
    let (events, received) = mpsc::channel();
    let mut job = job(chat, "hi", max_new, &mpsc::channel().0);
    job.sink = Box::new(Probe { events, answered: false, seen_text: false, hold: None });
    job.fault = fault;
    (job, received)
}

/// A job that, once running, holds the engine still (`Probe::hold`): the engine has
/// stopped when the first receiver gets `()`, and goes on when the sender sends one.
fn held_job(
    chat: &ChatModel,
    max_new: usize,
) -> (ChatJob, mpsc::Receiver<Event>, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (events, received) = mpsc::channel();
    let (held, is_held) = mpsc::channel();
    let (release, released) = mpsc::channel();
    let mut job = job(chat, "hi", max_new, &mpsc::channel().0);
    let hold = Some((held, released));
    job.sink = Box::new(Probe { events, answered: false, seen_text: false, hold });
    (job, received, is_held, release)
}

/// The request's last event (its end, or its drop), skipping text.
fn outcome(events: &mpsc::Receiver<Event>) -> Event {
    loop {
        match events.recv_timeout(Duration::from_secs(60)).expect("the request was answered") {
            Event::Text => continue,
            end => return end,
        }
    }
}

fn error_of(event: Event) -> triton_llm::Error {
    match event {
        Event::End(Err(error)) => error,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[derive(Default)]
struct Health(Arc<Mutex<bool>>);

impl EngineMetrics for Health {
    fn failed(&mut self) {
        *self.0.lock().unwrap() = true;
    }
}

fn engine_with(
    chat: &Arc<ChatModel>,
    config: SchedulerConfig,
) -> (ServingEngine, Arc<Mutex<bool>>) {
    let failed = Arc::new(Mutex::new(false));
    let engine =
        ServingEngine::start(Arc::clone(chat), config, "test", Box::new(Health(failed.clone())))
            .unwrap();
    (engine, failed)
}

fn small_config() -> SchedulerConfig {
    SchedulerConfig { cache_max_entry_count: 64.0, ..SchedulerConfig::default() }
}

/// A failed forward pass ends the requests it ran with INTERNAL; the engine serves on.
#[test]
fn a_failed_step_ends_its_requests_and_the_engine_goes_on() {
    let chat = Arc::new(internlm2_tiny());
    let (engine, failed) = engine_with(&chat, small_config());
    let (faulty, faulty_events) = probe_job(&chat, 8, Some(Fault::StepError));
    engine.submit(faulty);
    let error = error_of(outcome(&faulty_events));
    assert!(matches!(error, triton_llm::Error::Internal(_)), "{error}");
    let (next, next_events) = probe_job(&chat, 8, None);
    engine.submit(next);
    assert!(matches!(outcome(&next_events), Event::End(Ok(_))));
    assert!(engine.failure().is_none() && !*failed.lock().unwrap());
}

/// A lost device and a panicking engine thread stop the engine for good: what it held is
/// answered, and every later request gets UNAVAILABLE at once, with the reason logged and
/// reported to the metrics.
#[test]
fn a_lost_device_or_a_dead_engine_thread_answers_unavailable_from_then_on() {
    let chat = Arc::new(internlm2_tiny());
    for fault in [Fault::DeviceLost, Fault::EnginePanic] {
        let (engine, failed) = engine_with(&chat, small_config());
        // Still running when the fault comes: the engine waits in its poll meanwhile.
        let (running, running_events, is_held, release) = held_job(&chat, 10_000);
        engine.submit(running);
        is_held.recv_timeout(Duration::from_secs(60)).unwrap();
        let (faulty, faulty_events) = probe_job(&chat, 8, Some(fault));
        engine.submit(faulty);
        release.send(()).unwrap();
        match fault {
            Fault::DeviceLost => {
                let error = error_of(outcome(&faulty_events));
                assert!(error.to_string().contains("the engine failed"), "{error}");
            }
            // The thread died holding the job: only its drop is left to answer it (the
            // Triton sink does so; tests/e2e/test_faults.py).
            _ => assert!(matches!(outcome(&faulty_events), Event::DroppedUnanswered)),
        }
        // The sequence that was running is answered too.
        assert!(matches!(outcome(&running_events), Event::End(Err(_))), "{fault:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine.failure().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let reason = engine.failure().expect("the engine reports its failure").to_string();
        assert!(reason.contains("injected fault"), "{reason}");
        assert!(*failed.lock().unwrap(), "{fault:?}: the metrics were told");
        let (later, later_events) = probe_job(&chat, 8, None);
        engine.submit(later);
        let error = error_of(outcome(&later_events));
        assert!(matches!(error, triton_llm::Error::Unavailable(_)), "{error}");
        assert!(error.to_string().contains("reload the model"), "{error}");
    }
}

/// Past `max_queued_requests` waiting, a request is answered UNAVAILABLE at once; the ones
/// already taken are served.
#[test]
fn a_full_queue_answers_unavailable_at_once() {
    let chat = Arc::new(internlm2_tiny());
    let config = SchedulerConfig {
        max_num_seqs: 1,
        max_num_batched_tokens: 64,
        max_queued_requests: 1,
        ..small_config()
    };
    let (engine, _) = engine_with(&chat, config);
    let (running, running_events, is_held, release) = held_job(&chat, 60);
    engine.submit(running);
    // Running now (it no longer counts against the queue), and the engine stands still.
    is_held.recv_timeout(Duration::from_secs(60)).unwrap();
    let (queued, queued_events) = probe_job(&chat, 4, None);
    engine.submit(queued);
    let (refused, refused_events) = probe_job(&chat, 4, None);
    let submitted = Instant::now();
    engine.submit(refused);
    let error = error_of(outcome(&refused_events));
    assert!(submitted.elapsed() < Duration::from_secs(1));
    release.send(()).unwrap();
    assert!(matches!(error, triton_llm::Error::Unavailable(_)), "{error}");
    assert!(error.to_string().contains("max_queued_requests"), "{error}");
    assert!(matches!(outcome(&running_events), Event::End(Ok(_))));
    assert!(matches!(outcome(&queued_events), Event::End(Ok(_))));
    // Both slots are free again.
    let (after, after_events) = probe_job(&chat, 4, None);
    engine.submit(after);
    assert!(matches!(outcome(&after_events), Event::End(Ok(_))));
}

/// An input no context could hold is refused by its byte length before it is tokenized,
/// with the limit derived from the context or set by the model.
#[test]
fn inputs_over_the_byte_limit_are_refused_before_tokenizing() {
    let chat = internlm2_tiny();
    let limit = chat.max_input_bytes();
    assert!(limit >= chat.max_context(), "{limit}");
    let huge = "字".repeat(limit / 3 + 1);
    let started = Instant::now();
    let error = chat.prepare_chat(&turn(&huge)).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_millis(50), "{:?}", started.elapsed());
    assert!(error.starts_with("prompt: ") && error.contains("max_input_bytes"), "{error}");
    // History counts as what it is: kept pairs only.
    let mut with_history = turn("hi");
    with_history.history = vec![(huge.clone(), "a".into())];
    with_history.history_len = 1;
    let error = chat.prepare_chat(&with_history).unwrap_err().to_string();
    assert!(error.contains("1 kept history pairs"), "{error}");
    with_history.history_len = 0;
    assert!(chat.prepare_chat(&with_history).is_ok());
    let options = LoadOptions { max_input_bytes: Some(8), ..LoadOptions::default() };
    let strict = ChatModel::load(&fixture("internlm2-tiny"), &options).unwrap();
    assert_eq!(strict.max_input_bytes(), 8);
    assert!(strict.prepare_chat(&turn("12345678")).is_ok());
    assert!(strict.prepare_chat(&turn("123456789")).is_err());
}

/// Several CPU engines in one process (instances, models) size their KV caches against the
/// host memory the others have not yet touched: each takes its fraction of what is left,
/// not of the same memory again. A stopped engine gives its share back.
#[test]
fn kv_caches_are_sized_against_what_other_engines_were_promised() {
    let options = LoadOptions { session_len: Some(512), ..LoadOptions::default() };
    let chat = ChatModel::load(&fixture("internlm2-tiny"), &options).unwrap();
    // Many seats and a long context, so that the fraction binds, not the cap. (Sizing
    // allocates nothing.)
    let config = SchedulerConfig {
        max_num_seqs: 1 << 16,
        max_num_batched_tokens: 1 << 16,
        cache_max_entry_count: 0.2,
        ..SchedulerConfig::default()
    };
    let (first, first_promise) = config.num_blocks(&chat).unwrap();
    let (second, second_promise) = config.num_blocks(&chat).unwrap();
    assert!(first_promise.is_some() && second_promise.is_some(), "host memory is promised");
    // The second sees the first's 20% gone (give or take what other tests hold meanwhile).
    let expected = first as f64 * 0.8;
    assert!((second as f64) < first as f64 * 0.9, "{first} then {second}");
    assert!((second as f64 - expected).abs() < first as f64 * 0.05, "{first} then {second}");
    drop((first_promise, second_promise));
    let (again, _) = config.num_blocks(&chat).unwrap();
    assert!((again as f64 - first as f64).abs() < first as f64 * 0.05, "{first}, later {again}");
}

/// An int8, int4 or fp8 KV cache (`quant_policy` 8, 4, `kv_cache_dtype` fp8) holds as many
/// more blocks in the same memory as its blocks are smaller, and the engine serves from it.
#[test]
fn a_quantised_kv_cache_holds_more_blocks_in_the_same_memory_and_serves() {
    let load = |kv_format| {
        let options = LoadOptions { session_len: Some(512), kv_format, ..LoadOptions::default() };
        ChatModel::load(&fixture("chatglm2-tiny"), &options).unwrap()
    };
    let config = SchedulerConfig {
        max_num_seqs: 1 << 16,
        max_num_batched_tokens: 1 << 16,
        cache_max_entry_count: 0.05,
        ..SchedulerConfig::default()
    };
    let full = load(KvFormat::Model);
    let (full_blocks, promise) = config.num_blocks(&full).unwrap();
    drop(promise);
    let full_bytes = full.model.kv_bytes_per_block(16, KvFormat::Model) as f64;
    for format in [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8] {
        let chat = load(format);
        let (blocks, promise) = config.num_blocks(&chat).unwrap();
        drop(promise);
        let saved = full_bytes / chat.model.kv_bytes_per_block(16, format) as f64;
        let gained = blocks as f64 / full_blocks as f64;
        // (Other tests' memory moves the available figure a little between the two.)
        assert!(
            (gained / saved - 1.0).abs() < 0.1,
            "{format:?}: {gained:.2}× the blocks, {saved:.2}× smaller"
        );
        assert!(saved > 2.0, "{format:?}: blocks only {saved:.2}× smaller");
        let options = GenerationOptions { max_new_tokens: Some(8), ..GenerationOptions::default() };
        let prompt = triton_llm::pipeline::Prompt::raw(vec![5, 17, 300, 42, 7]);
        let answer = triton_llm::serving::generate(&chat, prompt, &options, |_| true).unwrap();
        assert_eq!(answer.output_ids.len(), 8, "{format:?}");
    }
}
