//! Delivers answers off the engine thread: a response send costs tens of microseconds (the
//! server serialises it for its client there), one per running sequence per step, so sends
//! run on this thread while the engine runs its next step. One queue keeps each request's
//! pieces and its end in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;

use super::AnswerSink;
use crate::pipeline::Completion;
use crate::{Error, Result};

/// A request's sink, shared by the engine (cancellation polls) and the emitter (sends).
pub(super) struct SharedSink {
    /// None once finished.
    sink: Mutex<Option<Box<dyn AnswerSink>>>,
    /// A send failed: the sink takes no more text, and the sequence should stop.
    refused: AtomicBool,
}

impl SharedSink {
    pub(super) fn new(sink: Box<dyn AnswerSink>) -> Arc<Self> {
        Arc::new(SharedSink { sink: Mutex::new(Some(sink)), refused: AtomicBool::new(false) })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<dyn AnswerSink>>> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client cancelled, or the sink refused a piece of text. A sink the response
    /// thread is sending to right now is asked at the next step instead of waited for.
    pub(super) fn is_cancelled(&self) -> bool {
        if self.refused.load(Ordering::Relaxed) {
            return true;
        }
        match self.sink.try_lock() {
            Ok(mut sink) => sink.as_mut().is_some_and(|s| s.is_cancelled()),
            Err(TryLockError::Poisoned(poisoned)) => {
                poisoned.into_inner().as_mut().is_some_and(|s| s.is_cancelled())
            }
            Err(TryLockError::WouldBlock) => false,
        }
    }
}

pub(super) enum Emission {
    Text(Arc<SharedSink>, String),
    Finish(Arc<SharedSink>, Result<Completion>),
}

pub(super) struct Emitter {
    queue: Option<Sender<Vec<Emission>>>,
    worker: Option<JoinHandle<()>>,
}

impl Emitter {
    pub(super) fn start(name: &str) -> Result<Self> {
        let (queue, batches) = mpsc::channel::<Vec<Emission>>();
        let worker = std::thread::Builder::new()
            .name(format!("llm-{name}-send"))
            .spawn(move || batches.into_iter().for_each(deliver))
            .map_err(|e| Error::Config(format!("starting the response thread: {e}")))?;
        Ok(Emitter { queue: Some(queue), worker: Some(worker) })
    }

    /// Queues one step's emissions, in order.
    pub(super) fn send(&self, batch: Vec<Emission>) {
        if batch.is_empty() {
            return;
        }
        let queue = self.queue.as_ref().expect("the queue lives until drop");
        if let Err(mpsc::SendError(batch)) = queue.send(batch) {
            tracing::error!("the response thread has stopped; answering on the engine thread");
            deliver(batch);
        }
    }
}

impl Drop for Emitter {
    /// Delivers everything queued, then stops the thread.
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the response thread panicked");
            }
        }
    }
}

fn deliver(batch: Vec<Emission>) {
    for emission in batch {
        match emission {
            Emission::Text(shared, text) => {
                if let Some(sink) = shared.lock().as_mut() {
                    if !sink.on_text(&text) {
                        shared.refused.store(true, Ordering::Relaxed);
                    }
                }
            }
            Emission::Finish(shared, result) => {
                let sink = shared.lock().take();
                if let Some(sink) = sink {
                    sink.finish(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FinishReason;

    /// Records what reaches it; refuses text after `accept` pieces.
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        accept: usize,
    }

    impl AnswerSink for Recorder {
        fn on_text(&mut self, text: &str) -> bool {
            let mut log = self.log.lock().unwrap();
            log.push(text.to_string());
            log.len() <= self.accept
        }
        fn is_cancelled(&mut self) -> bool {
            false
        }
        fn finish(self: Box<Self>, result: Result<Completion>) {
            let end = match result {
                Ok(completion) => format!("end {}", completion.response),
                Err(error) => format!("error {error}"),
            };
            self.log.lock().unwrap().push(end);
        }
    }

    fn completion(response: &str) -> Completion {
        Completion {
            response: response.into(),
            history: Vec::new(),
            output_ids: Vec::new(),
            prompt_tokens: 1,
            finish_reason: FinishReason::Stop,
        }
    }

    fn recorder(accept: usize) -> (Arc<SharedSink>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (SharedSink::new(Box::new(Recorder { log: Arc::clone(&log), accept })), log)
    }

    #[test]
    fn pieces_and_the_end_arrive_in_order_before_the_emitter_is_gone() {
        let (sink, log) = recorder(usize::MAX);
        let emitter = Emitter::start("test").unwrap();
        for step in 0..50 {
            emitter.send(vec![Emission::Text(Arc::clone(&sink), format!("{step} "))]);
        }
        emitter.send(vec![Emission::Finish(Arc::clone(&sink), Ok(completion("done")))]);
        // Sent after the end: the sink is finished and takes nothing more.
        emitter.send(vec![Emission::Text(Arc::clone(&sink), "late".into())]);
        drop(emitter); // delivers everything queued
        let log = log.lock().unwrap();
        let mut want: Vec<String> = (0..50).map(|step| format!("{step} ")).collect();
        want.push("end done".into());
        assert_eq!(*log, want);
        assert!(!sink.is_cancelled());
    }

    #[test]
    fn a_refused_piece_cancels_the_sequence() {
        let (sink, log) = recorder(1);
        let emitter = Emitter::start("test").unwrap();
        emitter.send(vec![
            Emission::Text(Arc::clone(&sink), "a".into()),
            Emission::Text(Arc::clone(&sink), "b".into()),
        ]);
        drop(emitter);
        assert_eq!(*log.lock().unwrap(), ["a", "b"]);
        assert!(sink.is_cancelled());
    }
}
