//! The serving loop: one thread per engine that admits new requests at every step, runs the
//! prefill of new sequences (in chunks, so a long prompt does not stall running decodes)
//! together with the decode step of every running sequence in one batched forward pass,
//! streams each sequence's text to its sink and retires the finished ones.
//!
//! Each step: receive → admit → drop cancelled → plan (decodes first, then prefill chunks
//! within the token budget) → forward → sample and emit → retire.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::pipeline::{ChatModel, ChatTurn, Completion, Generating, GenerationOptions};
use crate::{Error, Result};

/// How much one engine does at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running at once; more wait in arrival order.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass (every decode is 1; prefill chunks share the rest).
    pub max_num_batched_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { max_num_seqs: 64, max_num_batched_tokens: 2048 }
    }
}

/// Where one request's answer goes. Called from the engine thread.
pub trait AnswerSink: Send {
    /// New answer text (never a broken character). Returns false to stop the sequence.
    fn on_text(&mut self, text: &str) -> bool;
    /// Polled once per step: true stops the sequence (the client cancelled).
    fn is_cancelled(&mut self) -> bool;
    /// The end: the completed turn, or why it failed.
    fn finish(self: Box<Self>, result: Result<Completion>);
}

pub struct ChatJob {
    pub turn: ChatTurn,
    pub options: GenerationOptions,
    pub sink: Box<dyn AnswerSink>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// What the engine reports as it runs (Prometheus metrics in the server). Called from the
/// engine thread.
pub trait EngineMetrics: Send {
    fn prompt_tokens(&mut self, count: usize);
    fn generated_tokens(&mut self, count: usize);
    fn queue(&mut self, running: usize, waiting: usize);
    fn time_to_first_token(&mut self, seconds: f64);
    fn inter_token_latency(&mut self, seconds: f64);
    fn cancelled(&mut self);
}

/// For engines nobody watches.
pub struct NoMetrics;

impl EngineMetrics for NoMetrics {
    fn prompt_tokens(&mut self, _: usize) {}
    fn generated_tokens(&mut self, _: usize) {}
    fn queue(&mut self, _: usize, _: usize) {}
    fn time_to_first_token(&mut self, _: f64) {}
    fn inter_token_latency(&mut self, _: f64) {}
    fn cancelled(&mut self) {}
}

/// A running engine. Dropping it stops the thread: queued and running requests end with an
/// error, and the thread is joined.
pub struct ServingEngine {
    jobs: Option<Sender<ChatJob>>,
    worker: Option<JoinHandle<()>>,
}

impl ServingEngine {
    pub fn start(
        model: Arc<ChatModel>,
        config: SchedulerConfig,
        name: &str,
        mut metrics: Box<dyn EngineMetrics>,
    ) -> Result<Self> {
        let (jobs, receiver) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name(format!("llm-{name}"))
            .spawn(move || serve(&model, config, receiver, metrics.as_mut()))
            .map_err(|e| Error::Config(format!("starting the engine thread: {e}")))?;
        Ok(ServingEngine { jobs: Some(jobs), worker: Some(worker) })
    }

    pub fn submit(&self, job: ChatJob) {
        let jobs = self.jobs.as_ref().expect("the sender lives until drop");
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            job.sink.finish(Err(Error::Unavailable("the model's engine has stopped".into())));
        }
    }
}

impl Drop for ServingEngine {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

struct Active<'m> {
    generating: Generating<'m>,
    sink: Box<dyn AnswerSink>,
    arrived: Instant,
    last_token: Option<Instant>,
}

fn serve(
    model: &ChatModel,
    config: SchedulerConfig,
    jobs: Receiver<ChatJob>,
    metrics: &mut dyn EngineMetrics,
) {
    let mut waiting: VecDeque<ChatJob> = VecDeque::new();
    let mut running: Vec<Active<'_>> = Vec::new();
    let mut open = true;
    while open || !running.is_empty() || !waiting.is_empty() {
        // Receive: block only when there is nothing to do.
        if open && running.is_empty() && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(RecvError) => open = false,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !open {
            // The engine is being dropped: nobody will read further answers.
            for job in waiting.drain(..) {
                job.sink.finish(Err(Error::Unavailable("the model is being unloaded".into())));
            }
            for active in running.drain(..) {
                active.sink.finish(Err(Error::Unavailable("the model is being unloaded".into())));
            }
            break;
        }

        // Admit.
        while running.len() < config.max_num_seqs {
            let Some(job) = waiting.pop_front() else { break };
            match model.start_chat(&job.turn, &job.options) {
                Ok(generating) => {
                    metrics.prompt_tokens(generating.sequence.prompt_len());
                    running.push(Active {
                        generating,
                        sink: job.sink,
                        arrived: job.arrived,
                        last_token: None,
                    });
                }
                Err(error) => job.sink.finish(Err(error)),
            }
        }
        for active in &mut running {
            if active.sink.is_cancelled() {
                tracing::info!(
                    "request cancelled by the client after {} generated tokens",
                    active.generating.sequence.output_ids().len()
                );
                active.generating.cancel();
                metrics.cancelled();
            }
        }
        retire(&mut running);
        metrics.queue(running.len(), waiting.len());
        if running.is_empty() {
            continue;
        }

        // Plan and run one step.
        let pending: Vec<usize> =
            running.iter().map(|a| a.generating.sequence.pending_tokens()).collect();
        let plan = plan_step(&pending, config.max_num_batched_tokens);
        let stepped: Vec<usize> = (0..running.len()).filter(|&i| plan[i] > 0).collect();
        let result = {
            let mut steps: Vec<_> = running
                .iter_mut()
                .zip(&plan)
                .filter(|(_, tokens)| **tokens > 0)
                .map(|(active, &tokens)| active.generating.sequence.step(tokens))
                .collect();
            model.model.forward_batch(&mut steps)
        };
        match result {
            Ok(rows) => {
                let now = Instant::now();
                for (&i, logits) in stepped.iter().zip(rows) {
                    let active = &mut running[i];
                    let before = active.generating.sequence.output_ids().len();
                    let text = active.generating.advance(logits);
                    if active.generating.sequence.output_ids().len() > before {
                        metrics.generated_tokens(1);
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
                    if !text.is_empty() && !active.sink.on_text(&text) {
                        active.generating.cancel();
                    }
                }
            }
            Err(error) => {
                // A failed pass leaves the stepped caches unusable: end those sequences.
                tracing::error!("forward pass failed: {error}");
                for &i in stepped.iter().rev() {
                    let active = running.remove(i);
                    active.sink.finish(Err(Error::Internal(format!("the engine failed: {error}"))));
                }
            }
        }
        retire(&mut running);
        metrics.queue(running.len(), waiting.len());
    }
}

/// Sends the finished sequences' completions and removes them.
fn retire(running: &mut Vec<Active<'_>>) {
    let mut i = 0;
    while i < running.len() {
        if running[i].generating.is_finished() {
            let Active { generating, mut sink, .. } = running.remove(i);
            let (rest, completion) = generating.finish();
            if !rest.is_empty() {
                sink.on_text(&rest);
            }
            sink.finish(Ok(completion));
        } else {
            i += 1;
        }
    }
}

/// Tokens each running sequence runs this step: every decode (1 pending token) runs; prefill
/// chunks take the rest of `max_tokens` in order. A step always makes progress.
pub fn plan_step(pending: &[usize], max_tokens: usize) -> Vec<usize> {
    let mut plan: Vec<usize> = pending.iter().map(|&p| usize::from(p == 1)).collect();
    let mut budget = max_tokens.saturating_sub(plan.iter().sum());
    for (tokens, &p) in plan.iter_mut().zip(pending) {
        if p > 1 && budget > 0 {
            *tokens = p.min(budget);
            budget -= *tokens;
        }
    }
    if plan.iter().all(|&t| t == 0) {
        if let Some(first) = pending.iter().position(|&p| p > 0) {
            plan[first] = pending[first].min(max_tokens.max(1));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::plan_step;

    #[test]
    fn decodes_run_first_and_prefills_share_the_rest() {
        assert_eq!(plan_step(&[1, 1, 100, 50], 64), vec![1, 1, 62, 0]);
        assert_eq!(plan_step(&[30, 1, 20], 64), vec![30, 1, 20]);
    }

    #[test]
    fn decodes_are_never_starved_and_a_step_always_progresses() {
        assert_eq!(plan_step(&[1, 1, 1, 9], 2), vec![1, 1, 1, 0]);
        assert_eq!(plan_step(&[500], 0), vec![1]);
    }
}
