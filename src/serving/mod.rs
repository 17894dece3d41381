//! The serving loop: one thread per engine that admits new requests at every step, runs the
//! prefill of new sequences (in chunks, so a long prompt does not stall running decodes)
//! together with the decode step of every running sequence in one batched forward pass,
//! streams each sequence's text to its sink (sent from a thread of its own, `emitter`, while
//! the next step runs) and retires the finished ones.
//!
//! Each step: receive → admit → drop cancelled → plan (decodes first, then prefill chunks
//! within the token budget) → forward and choose next tokens → detokenise and emit → retire.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

mod emitter;

use crate::faults::Fault;
use crate::pipeline::{ChatModel, Completion, Generating, GenerationOptions, Prompt};
use crate::sequence::FinishReason;
use crate::sequence::kv_space::{Admission, KvCache, KvSpace};
use crate::{Error, Result};
use emitter::{Emission, Emitter, SharedSink};

/// How much one engine does at once, and its KV cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Sequences running at once; more wait in arrival order.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass (every decode is 1; prefill chunks share the rest).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// LMDeploy's rule: above 1, a number of blocks; otherwise the fraction of the memory
    /// available when the engine starts (host memory for the CPU path, free device memory
    /// after the weights and reserved activations for the GPU path).
    pub cache_max_entry_count: f64,
    /// Share the KV blocks of identical prompt prefixes between requests.
    pub enable_prefix_caching: bool,
    /// Requests submitted and not yet running; past this a new one is answered UNAVAILABLE
    /// at once (like Triton's `max_queue_size`), so a flood cannot grow memory without end.
    pub max_queued_requests: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            block_size: 16,
            cache_max_entry_count: 0.8,
            enable_prefix_caching: true,
            max_queued_requests: 1024,
        }
    }
}

/// Engines size and allocate their caches one at a time: two reading the same free memory
/// at once would each take their share of all of it.
static SIZING: Mutex<()> = Mutex::new(());

/// Host memory promised to the KV caches of this process's CPU engines. Their pages are
/// mapped lazily, so MemAvailable does not show them taken until they fill: without this
/// ledger every instance (of every model) would take its fraction of the same memory.
static HOST_KV_PROMISED: Mutex<usize> = Mutex::new(0);

/// A CPU path's entry in `HOST_KV_PROMISED`, given back when the engine stops.
pub struct HostKvPromise(usize);

impl Drop for HostKvPromise {
    fn drop(&mut self) {
        let mut promised = HOST_KV_PROMISED.lock().unwrap_or_else(|p| p.into_inner());
        *promised = promised.saturating_sub(self.0);
    }
}

impl SchedulerConfig {
    /// The number of KV blocks for `model`: what `cache_max_entry_count` asks for, never
    /// more than every running sequence at full length needs twice over (the spare half
    /// keeps finished prefixes for reuse). Host memory it takes is promised until the
    /// returned guard drops; call it while holding `SIZING` and allocate before letting go.
    pub fn num_blocks(&self, model: &ChatModel) -> Result<(usize, Option<HostKvPromise>)> {
        let bytes_per_block = model.model.kv_bytes_per_block(self.block_size, model.kv_format());
        let enough = 2 * self.max_num_seqs * model.max_context().div_ceil(self.block_size);
        let device_free = model.model.device_free_memory()?;
        let mut promised = HOST_KV_PROMISED.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = if self.cache_max_entry_count > 1.0 {
            self.cache_max_entry_count as usize
        } else {
            let available = match device_free {
                Some(device_free) => device_free,
                None => available_host_memory()?.saturating_sub(*promised),
            };
            let blocks = (self.cache_max_entry_count * available as f64) as usize / bytes_per_block;
            if blocks == 0 {
                return Err(Error::Config(format!(
                    "cache_max_entry_count {} of {available} available bytes holds no KV block \
                     of {bytes_per_block} bytes",
                    self.cache_max_entry_count
                )));
            }
            blocks.min(enough)
        };
        let promise = device_free.is_none().then(|| {
            let bytes = blocks.saturating_mul(bytes_per_block);
            *promised = promised.saturating_add(bytes);
            HostKvPromise(bytes)
        });
        Ok((blocks, promise))
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_host_memory() -> Result<usize> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::io("/proc/meminfo", e))?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| Error::Config("no MemAvailable in /proc/meminfo".into()))
}

/// Where one request's answer goes. Called from the engine's threads: the engine thread
/// polls `is_cancelled`, the response thread sends text and the end, one call at a time.
pub trait AnswerSink: Send {
    /// New answer text (never a broken character), with the number of tokens generated so
    /// far. Returns false to stop the sequence.
    fn on_text(&mut self, text: &str, generated: usize) -> bool;
    /// Polled once per step: true stops the sequence (the client cancelled).
    fn is_cancelled(&mut self) -> bool;
    /// The end: the completed turn, or why it failed.
    fn finish(self: Box<Self>, result: Result<Completion>);
}

pub struct ChatJob {
    /// The prompt, tokenized where the request arrived (`ChatModel::prepare_chat`).
    pub prompt: Prompt,
    pub options: GenerationOptions,
    pub sink: Box<dyn AnswerSink>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
    /// A failure to inject (tests only; see `faults`).
    pub fault: Option<Fault>,
}

/// A submitted job and its place in the queue bound, given back when it starts running or
/// ends (or is dropped with the engine).
struct Queued {
    job: ChatJob,
    slot: QueueSlot,
}

struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the engine reports as it runs (Prometheus metrics in the server). Called from the
/// engine thread.
pub trait EngineMetrics: Send {
    // Each defaults to nothing, so that an implementation states only what it watches.
    fn prompt_tokens(&mut self, _count: usize) {}
    fn generated_tokens(&mut self, _count: usize) {}
    fn queue(&mut self, _running: usize, _waiting: usize) {}
    fn time_to_first_token(&mut self, _seconds: f64) {}
    fn inter_token_latency(&mut self, _seconds: f64) {}
    fn cancelled(&mut self) {}
    /// A running sequence gave its KV blocks back to make room; it is recomputed later.
    fn preempted(&mut self) {}
    fn kv_blocks(&mut self, _used: usize, _free: usize) {}
    fn prefix_hit_tokens(&mut self, _count: usize) {}
    /// One step that ran a forward pass: how many sequences it ran, and where its time went.
    fn step(&mut self, _sequences: usize, _times: &StepTimes) {}
    /// The engine has stopped for good (its thread panicked or the device was lost); it
    /// answers UNAVAILABLE until the model is reloaded.
    fn failed(&mut self) {}
    /// Once, at the start: the model's weight bytes and a token's K/V bytes in the cache.
    fn memory(&mut self, _weight_bytes: usize, _kv_bytes_per_token: usize) {}
}

/// Where one engine step's time goes, on the host's clock: what decides whether serving is
/// bound by the device (forward) or by the host (the rest).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Receiving, admitting and cancelling requests, planning the step and making room.
    pub schedule: Duration,
    /// The batched forward pass and the choice of each next token (on the device when the
    /// engine samples there, else on the host after the logits came back).
    pub forward: Duration,
    /// Detokenising every stepped sequence's new token.
    pub detokenize: Duration,
    /// Queueing text for the sinks (the response thread sends it), metrics, retiring
    /// finished sequences.
    pub emit: Duration,
}

impl StepTimes {
    pub const PHASES: [&'static str; 4] = ["schedule", "forward", "detokenize", "emit"];

    /// The phases in the order of `PHASES`.
    pub fn phases(&self) -> [Duration; 4] {
        [self.schedule, self.forward, self.detokenize, self.emit]
    }

    fn add(&mut self, other: &StepTimes) {
        self.schedule += other.schedule;
        self.forward += other.forward;
        self.detokenize += other.detokenize;
        self.emit += other.emit;
    }
}

/// Sums steps and logs their mean phases now and then, so a log shows where time goes.
struct StepLog {
    since: Instant,
    steps: u32,
    sequences: usize,
    total: StepTimes,
}

impl StepLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        StepLog { since: Instant::now(), steps: 0, sequences: 0, total: StepTimes::default() }
    }

    fn record(&mut self, name: &str, sequences: usize, times: &StepTimes) {
        self.steps += 1;
        self.sequences += sequences;
        self.total.add(times);
        if self.since.elapsed() < Self::EVERY {
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(self.steps);
        let [schedule, forward, detokenize, emit] = self.total.phases().map(ms);
        tracing::info!(
            "engine {name}: {} steps of {:.1} sequences on average, per step {:.2} ms: \
             schedule {schedule:.2}, forward {forward:.2}, detokenize {detokenize:.2}, \
             emit {emit:.2}",
            self.steps,
            self.sequences as f64 / f64::from(self.steps),
            schedule + forward + detokenize + emit,
        );
        *self = StepLog::new();
    }
}

/// For engines nobody watches.
pub struct NoMetrics;

impl EngineMetrics for NoMetrics {}

/// A running engine. Dropping it stops the thread: queued and running requests end with an
/// error, and the thread is joined.
pub struct ServingEngine {
    jobs: Option<Sender<Queued>>,
    worker: Option<JoinHandle<()>>,
    /// Jobs submitted and not yet running (`SchedulerConfig::max_queued_requests`).
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// Why the engine stopped for good, once it has.
    failure: Arc<OnceLock<String>>,
}

impl ServingEngine {
    pub fn start(
        model: Arc<ChatModel>,
        config: SchedulerConfig,
        name: &str,
        mut metrics: Box<dyn EngineMetrics>,
    ) -> Result<Self> {
        // Activations first: the KV cache takes its share of the memory left after them.
        // A prompt past the rope limit runs whole, next to the other sequences' decodes.
        let whole_prefill = match model.model.info().length_dependent_rope_after {
            Some(limit) if model.max_context() > limit => model.max_context() + config.max_num_seqs,
            _ => 0,
        };
        let max_tokens = config.max_num_batched_tokens.max(config.max_num_seqs).max(whole_prefill);
        let max_blocks_per_seq = model.max_context().div_ceil(config.block_size);
        let sizing = SIZING.lock().unwrap_or_else(|p| p.into_inner());
        let activation_bytes =
            model.model.reserve_activations(max_tokens, config.max_num_seqs, max_blocks_per_seq)?;
        let (num_blocks, promise) = config.num_blocks(&model)?;
        let block_bytes = model.model.kv_bytes_per_block(config.block_size, model.kv_format());
        tracing::info!(
            "engine {name}: {num_blocks} KV blocks of {} tokens ({} MiB; K/V stored as {}, {} \
             bytes a token), activations {} MiB",
            config.block_size,
            (num_blocks * block_bytes) >> 20,
            model.kv_format().name(),
            block_bytes / config.block_size,
            activation_bytes >> 20
        );
        metrics.memory(model.model.info().weight_bytes, block_bytes / config.block_size);
        let mut space = KvSpace::new(
            model.model.as_ref(),
            model.kv_format(),
            config.block_size,
            num_blocks,
            config.enable_prefix_caching,
        )?;
        drop(sizing);
        let (jobs, receiver) = mpsc::channel();
        let failure = Arc::new(OnceLock::new());
        let worker = std::thread::Builder::new()
            .name(format!("llm-{name}"))
            .spawn({
                let name = name.to_string();
                let failure = Arc::clone(&failure);
                move || {
                    // Given back with the cache, when the thread ends.
                    let _promise = promise;
                    let served = catch_unwind(AssertUnwindSafe(|| {
                        serve(&model, &name, config, &mut space, &receiver, metrics.as_mut())
                    }));
                    let reason = match served {
                        Ok(Ok(())) => return,
                        Ok(Err(error)) => format!("the engine failed: {error}"),
                        Err(panic) => format!("the engine thread panicked: {}", panic_text(panic)),
                    };
                    tracing::error!(
                        "engine {name}: {reason}; it answers UNAVAILABLE until the model is reloaded"
                    );
                    metrics.failed();
                    let _ = failure.set(reason);
                    // Whatever was queued meanwhile, and whatever comes until the instance goes.
                    for queued in receiver.iter() {
                        queued.job.sink.finish(Err(stopped(&failure)));
                    }
                }
            })
            .map_err(|e| Error::Config(format!("starting the engine thread: {e}")))?;
        Ok(ServingEngine {
            jobs: Some(jobs),
            worker: Some(worker),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued: config.max_queued_requests,
            failure,
        })
    }

    /// Queues a job, or answers it at once when the engine has stopped or its queue is full.
    pub fn submit(&self, job: ChatJob) {
        if self.failure.get().is_some() {
            return job.sink.finish(Err(stopped(&self.failure)));
        }
        let taken = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            (queued < self.max_queued).then_some(queued + 1)
        });
        if let Err(queued) = taken {
            return job.sink.finish(Err(Error::Unavailable(format!(
                "the model is busy: {queued} requests are waiting (max_queued_requests); try \
                 again later"
            ))));
        }
        let slot = QueueSlot(Arc::clone(&self.queued));
        let jobs = self.jobs.as_ref().expect("the sender lives until drop");
        if let Err(mpsc::SendError(queued)) = jobs.send(Queued { job, slot }) {
            queued.job.sink.finish(Err(stopped(&self.failure)));
        }
    }

    /// Why the engine has stopped serving, if it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// Runs one generation to its end through the serving loop, with a KV space of its own, and
/// hands its text to `on_text` on this thread as it comes (pieces that add up to the
/// response; false stops it). The CLI and the tests generate this way, so that every
/// answer comes from the one loop the backend serves with.
pub fn generate(
    model: &ChatModel,
    prompt: Prompt,
    options: &GenerationOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Completion> {
    // Room for this sequence at its longest, and its whole prompt in one pass.
    let max_len = model.start(prompt.clone(), options)?.sequence.max_len();
    let block_size = KvCache::BLOCK_SIZE;
    let config = SchedulerConfig {
        max_num_seqs: 1,
        max_num_batched_tokens: max_len,
        block_size,
        enable_prefix_caching: false,
        max_queued_requests: 1,
        ..SchedulerConfig::default()
    };
    let mut space = KvSpace::new(
        model.model.as_ref(),
        model.kv_format(),
        block_size,
        max_len.div_ceil(block_size),
        false,
    )?;
    std::thread::scope(|scope| {
        let (jobs, receiver) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("llm-generate".into())
            .spawn_scoped(scope, move || {
                serve(model, "generate", config, &mut space, &receiver, &mut NoMetrics)
            })
            .map_err(|e| Error::Internal(format!("starting the engine thread: {e}")))?;
        let (events, answers) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let job = ChatJob {
            prompt,
            options: options.clone(),
            sink: Box::new(Relay { events, stop: Arc::clone(&stop) }),
            arrived: Instant::now(),
            fault: None,
        };
        let slot = QueueSlot(Arc::new(AtomicUsize::new(1)));
        // The loop holds the receiver until this sender goes.
        let _ = jobs.send(Queued { job, slot });
        let mut streamed = String::new();
        let answer = loop {
            match answers.recv() {
                Ok(Relayed::Text(text)) => {
                    streamed.push_str(&text);
                    if !on_text(&text) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Relayed::End(answer)) => break answer,
                // The sink went unanswered: the loop died (its join says why).
                Err(_) => break Err(Error::Internal("the engine stopped before answering".into())),
            }
        };
        drop(jobs);
        match worker.join() {
            Err(panic) => {
                return Err(Error::Internal(format!(
                    "the engine thread panicked: {}",
                    panic_text(panic)
                )));
            }
            Ok(Err(error)) if answer.is_ok() => return Err(error),
            Ok(_) => {}
        }
        let completion = answer?;
        // A stopped answer's last piece goes only to the end (a client that stops is
        // usually gone); this caller is still here, so it gets it too.
        if let Some(rest) = completion.response.strip_prefix(streamed.as_str())
            && !rest.is_empty()
        {
            on_text(rest);
        }
        Ok(completion)
    })
}

enum Relayed {
    Text(String),
    End(Result<Completion>),
}

/// `generate`'s sink: passes the answer to the calling thread, and its stop back.
struct Relay {
    events: Sender<Relayed>,
    stop: Arc<AtomicBool>,
}

impl AnswerSink for Relay {
    fn on_text(&mut self, text: &str, _generated: usize) -> bool {
        self.events.send(Relayed::Text(text.to_string())).is_ok()
    }

    fn is_cancelled(&mut self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn finish(self: Box<Self>, result: Result<Completion>) {
        let _ = self.events.send(Relayed::End(result));
    }
}

fn stopped(failure: &OnceLock<String>) -> Error {
    Error::Unavailable(match failure.get() {
        Some(reason) => format!("the model's engine has stopped ({reason}); reload the model"),
        None => "the model's engine has stopped".into(),
    })
}

/// The message a panic carried.
pub fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Drop for ServingEngine {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

struct Active<'m> {
    generating: Generating<'m>,
    sink: Arc<SharedSink>,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Admitted before (and preempted since): its prompt and prefix hits are counted.
    admitted_before: bool,
    /// Held until first admitted: the job still counts against the queue bound.
    slot: Option<QueueSlot>,
    fault: Option<Fault>,
}

/// Runs the engine until its job channel closes (Ok), or until an error leaves it unable to
/// serve (Err, after every request it held has been answered).
fn serve<'m>(
    model: &'m ChatModel,
    name: &str,
    config: SchedulerConfig,
    space: &mut KvSpace,
    jobs: &Receiver<Queued>,
    metrics: &mut dyn EngineMetrics,
) -> Result<()> {
    // Started generations waiting for KV blocks (preempted ones go back to the front).
    let mut waiting: VecDeque<Active<'m>> = VecDeque::new();
    let mut running: Vec<Active<'m>> = Vec::new();
    let mut open = true;
    let mut step_log = StepLog::new();
    // The gauges read the cache's size from the start, not from the first request on.
    metrics.kv_blocks(space.blocks.used(), space.blocks.available());
    metrics.queue(0, 0);
    let emitter = Emitter::start(name)?;
    let start = |Queued { job, slot }: Queued| -> Option<Active<'m>> {
        match job.fault {
            Some(Fault::EnginePanic) => panic!("injected fault: the engine thread panics"),
            Some(Fault::SinkDropped) => {
                drop(job.sink);
                return None;
            }
            _ => {}
        }
        match model.start(job.prompt, &job.options) {
            Ok(generating) => {
                let sink = SharedSink::new(job.sink);
                Some(Active {
                    generating,
                    sink,
                    arrived: job.arrived,
                    last_token: None,
                    admitted_before: false,
                    slot: Some(slot),
                    fault: job.fault,
                })
            }
            Err(error) => {
                job.sink.finish(Err(error));
                None
            }
        }
    };
    while open || !running.is_empty() || !waiting.is_empty() {
        // Receive: block only when there is nothing to do.
        if open && running.is_empty() && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.extend(start(job)),
                Err(RecvError) => open = false,
            }
        }
        let step_start = Instant::now();
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.extend(start(job)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !open {
            // The engine is being dropped: nobody will read further answers.
            let unloading = || Err(Error::Unavailable("the model is being unloaded".into()));
            emitter.send(
                waiting
                    .drain(..)
                    .chain(running.drain(..))
                    .map(|active| Emission::Finish(active.sink, unloading()))
                    .collect(),
            );
            return Ok(());
        }

        // Cancellations, also of requests still waiting.
        for active in waiting.iter_mut().chain(running.iter_mut()) {
            if !active.generating.is_finished() && active.sink.is_cancelled() {
                tracing::info!(
                    "request cancelled by the client after {} generated tokens",
                    active.generating.sequence.output_ids().len()
                );
                active.generating.cancel();
                metrics.cancelled();
            }
        }
        retire(&mut waiting, space, &emitter);
        retire(&mut running, space, &emitter);

        // Admit in order while there are seats and blocks.
        while running.len() < config.max_num_seqs {
            let Some(mut active) = waiting.pop_front() else { break };
            let hits_before = space.blocks.prefix_hit_tokens;
            match space.admit(&mut active.generating.sequence) {
                Admission::Admitted => {
                    // Counted once: a preempted sequence's recompute is not a new prompt,
                    // nor are its hits on its own blocks prefix reuse.
                    if !active.admitted_before {
                        metrics.prompt_tokens(active.generating.sequence.prompt_len());
                        let hits = space.blocks.prefix_hit_tokens - hits_before;
                        metrics.prefix_hit_tokens(hits as usize);
                        active.admitted_before = true;
                        active.slot = None;
                    }
                    running.push(active);
                }
                Admission::Later => {
                    waiting.push_front(active);
                    break;
                }
                Admission::Never(message) => {
                    active.generating.fail(Error::InvalidRequest(message));
                    waiting.push_front(active);
                    retire(&mut waiting, space, &emitter);
                }
            }
        }
        if running.is_empty() {
            metrics.queue(0, waiting.len());
            metrics.kv_blocks(space.blocks.used(), space.blocks.available());
            continue;
        }

        // Plan the step, then make room for it: when blocks run out, the newest running
        // sequence gives its blocks back and waits to be recomputed.
        let mut plan;
        loop {
            let pending: Vec<(usize, bool)> = running
                .iter()
                .map(|a| {
                    let sequence = &a.generating.sequence;
                    (sequence.pending_tokens(), space.must_prefill_whole(sequence))
                })
                .collect();
            plan = plan_step(&pending, config.max_num_batched_tokens);
            let short = running.iter_mut().zip(&plan).position(|(a, &tokens)| {
                tokens > 0 && !space.ensure(&mut a.generating.sequence, tokens)
            });
            let Some(short) = short else { break };
            if running.len() == 1 {
                // Alone and still out of room: the cache cannot hold this sequence.
                let active = &mut running[short];
                tracing::warn!("a sequence filled the whole KV cache; ending it");
                active.generating.sequence.stop(FinishReason::Length);
                break;
            }
            let mut newest = running.pop().expect("more than one running");
            space.release(&mut newest.generating.sequence);
            tracing::debug!("out of KV blocks: preempting a sequence to recompute it later");
            metrics.preempted();
            waiting.push_front(newest);
        }
        metrics.queue(running.len(), waiting.len());

        let stepped: Vec<usize> = (0..running.len())
            .filter(|&i| plan[i] > 0 && !running[i].generating.is_finished())
            .collect();
        if stepped.is_empty() {
            // Nothing to run: the lone sequence that filled the cache was ended above.
            retire(&mut running, space, &emitter);
            metrics.queue(running.len(), waiting.len());
            metrics.kv_blocks(space.blocks.used(), space.blocks.available());
            continue;
        }
        for &i in &stepped {
            running[i].generating.sequence.prepare_step(plan[i]);
        }
        let steps: Vec<_> =
            stepped.iter().map(|&i| running[i].generating.sequence.step(plan[i])).collect();
        let rows: Vec<_> =
            stepped.iter().map(|&i| running[i].generating.sequence.sample_row()).collect();
        let forward_start = Instant::now();
        let injected = stepped.iter().find_map(|&i| match running[i].fault {
            Some(Fault::StepError) => Some(Error::Internal("injected fault: a step error".into())),
            Some(Fault::DeviceLost) => Some(Error::DeviceLost("injected fault".into())),
            _ => None,
        });
        let result = match injected {
            Some(error) => Err(error),
            None => model.model.forward_sample(space.arena.as_mut(), &steps, &rows),
        }
        .map_err(|error| match model.model.check_device() {
            Err(lost) if lost.is_fatal() && !error.is_fatal() => {
                tracing::error!("forward pass failed: {error}");
                lost
            }
            _ => error,
        });
        drop((steps, rows));
        let mut times = StepTimes {
            schedule: forward_start - step_start,
            forward: forward_start.elapsed(),
            ..StepTimes::default()
        };
        match result {
            Ok(chosen) => {
                let now = Instant::now();
                let before: Vec<usize> = stepped
                    .iter()
                    .map(|&i| running[i].generating.sequence.output_ids().len())
                    .collect();
                // Detokenising is per sequence: spread it over the cores (with many sequences
                // a step's host work otherwise rivals the GPU's).
                let mut work: Vec<(&mut Generating<'m>, usize, Option<u32>)> = running
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| stepped.binary_search(i).is_ok())
                    .zip(chosen)
                    .map(|((i, active), chosen)| (&mut active.generating, plan[i], chosen))
                    .collect();
                let texts: Vec<String> = work
                    .par_iter_mut()
                    .map(|(generating, ran, chosen)| generating.accept(*ran, *chosen))
                    .collect();
                drop(work);
                times.detokenize = now.elapsed();
                let mut generated = 0;
                let mut pieces = Vec::with_capacity(stepped.len());
                for ((&i, text), before) in stepped.iter().zip(texts).zip(before) {
                    let active = &mut running[i];
                    space.register(&mut active.generating.sequence);
                    if active.generating.sequence.output_ids().len() > before {
                        generated += 1;
                        match active.last_token {
                            None => metrics.time_to_first_token(
                                now.duration_since(active.arrived).as_secs_f64(),
                            ),
                            Some(last) => {
                                metrics.inter_token_latency(now.duration_since(last).as_secs_f64())
                            }
                        }
                        active.last_token = Some(now);
                    }
                    if !text.is_empty() {
                        let count = active.generating.sequence.output_ids().len();
                        pieces.push(Emission::Text(Arc::clone(&active.sink), text, count));
                    }
                }
                emitter.send(pieces);
                metrics.generated_tokens(generated);
            }
            Err(error) if error.is_fatal() => {
                // Nothing more can run: answer everything held, then stop.
                for active in running.iter_mut() {
                    active.generating.fail(Error::Internal(format!("the engine failed: {error}")));
                }
                for active in waiting.iter_mut() {
                    active.generating.fail(Error::Unavailable(format!(
                        "the model's engine has stopped ({error}); reload the model"
                    )));
                }
                retire(&mut running, space, &emitter);
                retire(&mut waiting, space, &emitter);
                metrics.queue(0, 0);
                return Err(error);
            }
            Err(error) => {
                // A failed pass leaves the stepped sequences' K/V unusable: end them.
                tracing::error!("forward pass failed: {error}");
                for &i in &stepped {
                    running[i]
                        .generating
                        .fail(Error::Internal(format!("the engine failed: {error}")));
                }
            }
        }
        retire(&mut running, space, &emitter);
        metrics.queue(running.len(), waiting.len());
        metrics.kv_blocks(space.blocks.used(), space.blocks.available());
        times.emit =
            step_start.elapsed().saturating_sub(times.schedule + times.forward + times.detokenize);
        metrics.step(stepped.len(), &times);
        step_log.record(name, stepped.len(), &times);
    }
    Ok(())
}

/// Queues the finished sequences' completions (or errors), frees their blocks and removes
/// them, keeping the others in order.
fn retire<'m, Q>(queue: &mut Q, space: &mut KvSpace, emitter: &Emitter)
where
    Q: Extend<Active<'m>> + IntoIterator<Item = Active<'m>> + Default,
{
    let mut kept = Q::default();
    let mut ends = Vec::new();
    for mut active in std::mem::take(queue) {
        if !active.generating.is_finished() {
            kept.extend([active]);
            continue;
        }
        space.release(&mut active.generating.sequence);
        let Active { generating, sink, .. } = active;
        match generating.finish() {
            Ok((rest, completion)) => {
                // A cancelled request's client is gone: only its end is sent.
                if !rest.is_empty() && completion.finish_reason != FinishReason::Cancelled {
                    let count = completion.output_ids.len();
                    ends.push(Emission::Text(Arc::clone(&sink), rest, count));
                }
                ends.push(Emission::Finish(sink, Ok(completion)));
            }
            Err(error) => ends.push(Emission::Finish(sink, Err(error))),
        }
    }
    emitter.send(ends);
    *queue = kept;
}

/// Tokens each running sequence runs this step, from (pending tokens, must run them in one
/// call): every decode (1 pending token) runs; prefill chunks take the rest of `max_tokens`
/// in order, and a whole-only prefill whose turn it is runs whole even past the budget (so
/// it is never starved). A step always makes progress.
pub fn plan_step(pending: &[(usize, bool)], max_tokens: usize) -> Vec<usize> {
    let mut plan: Vec<usize> = pending.iter().map(|&(p, _)| usize::from(p == 1)).collect();
    let mut budget = max_tokens.saturating_sub(plan.iter().sum());
    for (tokens, &(p, whole)) in plan.iter_mut().zip(pending) {
        if p > 1 && budget > 0 {
            *tokens = if whole { p } else { p.min(budget) };
            budget = budget.saturating_sub(*tokens);
        }
    }
    if plan.iter().all(|&t| t == 0)
        && let Some(first) = pending.iter().position(|&(p, _)| p > 0)
    {
        let (p, whole) = pending[first];
        plan[first] = if whole { p } else { p.min(max_tokens.max(1)) };
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::plan_step;

    fn chunkable(pending: &[usize]) -> Vec<(usize, bool)> {
        pending.iter().map(|&p| (p, false)).collect()
    }

    #[test]
    fn decodes_run_first_and_prefills_share_the_rest() {
        assert_eq!(plan_step(&chunkable(&[1, 1, 100, 50]), 64), vec![1, 1, 62, 0]);
        assert_eq!(plan_step(&chunkable(&[30, 1, 20]), 64), vec![30, 1, 20]);
    }

    #[test]
    fn decodes_are_never_starved_and_a_step_always_progresses() {
        assert_eq!(plan_step(&chunkable(&[1, 1, 1, 9]), 2), vec![1, 1, 1, 0]);
        assert_eq!(plan_step(&chunkable(&[500]), 0), vec![1]);
    }

    #[test]
    fn whole_only_prefills_run_whole_in_their_turn() {
        assert_eq!(plan_step(&[(1, false), (100, true), (10, false)], 64), vec![1, 100, 0]);
        assert_eq!(plan_step(&[(100, true)], 64), vec![100]);
    }
}
