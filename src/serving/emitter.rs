//! Delivers answers off the engine thread: a response send costs tens of microseconds (the
//! server serialises it for its client there), one per running sequence per step, so sends
//! run on this thread while the engine runs its next step. One queue keeps each request's
//! pieces and its end in order. When sends fall behind the steps (hundreds of streams), the
//! steps queued meanwhile go out together with up to `MAX_JOINED` consecutive pieces of a
//! request joined into one response: sends per second fall by as much, and answers still
//! stream in small pieces.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
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

impl Drop for SharedSink {
    /// A request whose engine or response thread died before its end still gets one, so
    /// that its client is not left waiting (normally the end has taken the sink already).
    fn drop(&mut self) {
        let unfinished = self.sink.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sink) = unfinished {
            let error = Error::Internal("the engine stopped before answering".into());
            // Maybe during a panic's unwinding: a second panic would abort the server.
            let finished =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.finish(Err(error))));
            if finished.is_err() {
                tracing::error!("ending an unanswered request panicked");
            }
        }
    }
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
    /// Answer text and the number of tokens generated when it was made.
    Text(Arc<SharedSink>, String, usize),
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
            .spawn(move || run(batches))
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
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the response thread panicked");
        }
    }
}

/// Sends each step's emissions as they come; a backlog of steps goes out as one batch.
fn run(batches: Receiver<Vec<Emission>>) {
    while let Ok(mut pending) = batches.recv() {
        let mut steps = 1;
        while let Ok(more) = batches.try_recv() {
            pending.extend(more);
            steps += 1;
        }
        deliver(if steps > 1 { coalesce(pending) } else { pending });
    }
}

/// Pieces of one request a backlog joins into one response at most.
const MAX_JOINED: usize = 4;

/// Joins each request's consecutive text pieces, `MAX_JOINED` at most into one (its end
/// stays after them). Only the order within a request matters; requests may pass one
/// another.
fn coalesce(emissions: Vec<Emission>) -> Vec<Emission> {
    let mut joined: Vec<Emission> = Vec::with_capacity(emissions.len());
    // Per request: where in `joined` its latest text since its last end is, and how many
    // pieces it holds.
    let mut open_text: HashMap<*const SharedSink, (usize, usize)> = HashMap::new();
    for emission in emissions {
        match emission {
            Emission::Text(shared, text, generated) => {
                let key = Arc::as_ptr(&shared);
                if let Some((at, pieces)) = open_text.get_mut(&key)
                    && *pieces < MAX_JOINED
                    && let Emission::Text(_, so_far, count) = &mut joined[*at]
                {
                    so_far.push_str(&text);
                    *count = generated;
                    *pieces += 1;
                    continue;
                }
                open_text.insert(key, (joined.len(), 1));
                joined.push(Emission::Text(shared, text, generated));
            }
            Emission::Finish(shared, result) => {
                open_text.remove(&Arc::as_ptr(&shared));
                joined.push(Emission::Finish(shared, result));
            }
        }
    }
    joined
}

/// Sends each emission. A sink that panics takes no more text (its sequence stops) and
/// gets its end from `SharedSink`'s drop if `finish` itself panicked; the others go on.
fn deliver(batch: Vec<Emission>) {
    for emission in batch {
        match emission {
            Emission::Text(shared, text, generated) => {
                let sent = catch_unwind(AssertUnwindSafe(|| {
                    shared.lock().as_mut().is_none_or(|sink| sink.on_text(&text, generated))
                }));
                if !matches!(sent, Ok(true)) {
                    shared.refused.store(true, Ordering::Relaxed);
                }
                if let Err(panic) = sent {
                    tracing::error!("sending text panicked: {}", super::panic_text(panic));
                }
            }
            Emission::Finish(shared, result) => {
                let sink = shared.lock().take();
                if let Some(sink) = sink
                    && let Err(panic) = catch_unwind(AssertUnwindSafe(|| sink.finish(result)))
                {
                    tracing::error!("ending a request panicked: {}", super::panic_text(panic));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::FinishReason;

    /// Records what reaches it; refuses text after `accept` pieces.
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        accept: usize,
    }

    impl AnswerSink for Recorder {
        fn on_text(&mut self, text: &str, _generated: usize) -> bool {
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
            tool_calls: Vec::new(),
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
            emitter.send(vec![Emission::Text(Arc::clone(&sink), format!("{step} "), step)]);
        }
        emitter.send(vec![Emission::Finish(Arc::clone(&sink), Ok(completion("done")))]);
        // Sent after the end: the sink is finished and takes nothing more.
        emitter.send(vec![Emission::Text(Arc::clone(&sink), "late".into(), 0)]);
        drop(emitter); // delivers everything queued
        // However the pieces were joined (steps queued faster than sent go out together).
        let mut log = log.lock().unwrap().clone();
        assert_eq!(log.pop().as_deref(), Some("end done"));
        let want: String = (0..50).map(|step| format!("{step} ")).collect();
        assert_eq!(log.concat(), want);
        assert!(!sink.is_cancelled());
    }

    /// A sink whose first send waits until `release` is sent (a slow client).
    struct Gated {
        log: Arc<Mutex<Vec<String>>>,
        gate: Option<mpsc::Receiver<()>>,
    }

    impl AnswerSink for Gated {
        fn on_text(&mut self, text: &str, _generated: usize) -> bool {
            if let Some(gate) = self.gate.take() {
                gate.recv().unwrap();
            }
            self.log.lock().unwrap().push(text.to_string());
            true
        }
        fn is_cancelled(&mut self) -> bool {
            false
        }
        fn finish(self: Box<Self>, _result: Result<Completion>) {
            self.log.lock().unwrap().push("end".into());
        }
    }

    #[test]
    fn steps_queued_behind_a_slow_send_go_out_with_each_request_joined() {
        let (release, gate) = mpsc::channel();
        let slow_log = Arc::new(Mutex::new(Vec::new()));
        let slow =
            SharedSink::new(Box::new(Gated { log: Arc::clone(&slow_log), gate: Some(gate) }));
        let (other, other_log) = recorder(usize::MAX);
        let emitter = Emitter::start("test").unwrap();
        // The first step's send blocks; three more steps queue behind it.
        emitter.send(vec![Emission::Text(Arc::clone(&slow), "a".into(), 1)]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        for (step, piece) in ["b", "c", "d"].into_iter().enumerate() {
            let mut batch = vec![
                Emission::Text(Arc::clone(&slow), piece.into(), step),
                Emission::Text(Arc::clone(&other), format!("{step}"), step),
            ];
            if step == 1 {
                batch.push(Emission::Finish(Arc::clone(&other), Ok(completion("x"))));
            }
            emitter.send(batch);
        }
        emitter.send(vec![Emission::Finish(Arc::clone(&slow), Ok(completion("abcd")))]);
        release.send(()).unwrap();
        drop(emitter);
        assert_eq!(*slow_log.lock().unwrap(), ["a", "bcd", "end"]);
        // The other request's pieces before its end are joined; the one after it is dropped.
        assert_eq!(*other_log.lock().unwrap(), ["01", "end x"]);
    }

    #[test]
    fn coalescing_keeps_each_requests_order() {
        let (first, _) = recorder(usize::MAX);
        let (second, _) = recorder(usize::MAX);
        let text =
            |sink: &Arc<SharedSink>, t: &str| Emission::Text(Arc::clone(sink), t.into(), t.len());
        let joined = coalesce(vec![
            text(&first, "a"),
            text(&second, "x"),
            text(&first, "b"),
            Emission::Finish(Arc::clone(&first), Ok(completion("ab"))),
            text(&first, "c"),
            text(&second, "y"),
        ]);
        let shape: Vec<String> = joined
            .iter()
            .map(|e| match e {
                Emission::Text(sink, t, _) => format!("{}:{t}", Arc::ptr_eq(sink, &first) as u8),
                Emission::Finish(sink, _) => format!("{}:end", Arc::ptr_eq(sink, &first) as u8),
            })
            .collect();
        assert_eq!(shape, ["1:ab", "0:xy", "1:end", "1:c"]);
    }

    #[test]
    fn a_backlog_joins_a_requests_pieces_a_few_at_a_time() {
        let (sink, _) = recorder(usize::MAX);
        let pieces = (0..10).map(|i| Emission::Text(Arc::clone(&sink), i.to_string(), i)).collect();
        let texts: Vec<(String, usize)> = coalesce(pieces)
            .into_iter()
            .map(|e| match e {
                Emission::Text(_, text, generated) => (text, generated),
                Emission::Finish(..) => unreachable!(),
            })
            .collect();
        // A joined piece counts the tokens generated by its last part.
        let expected = [("0123", 3), ("4567", 7), ("89", 9)].map(|(t, n)| (t.to_string(), n));
        assert_eq!(texts, expected);
    }

    #[test]
    fn a_refused_piece_cancels_the_sequence() {
        let (sink, log) = recorder(1);
        let emitter = Emitter::start("test").unwrap();
        emitter.send(vec![
            Emission::Text(Arc::clone(&sink), "a".into(), 1),
            Emission::Text(Arc::clone(&sink), "b".into(), 2),
        ]);
        drop(emitter);
        assert_eq!(*log.lock().unwrap(), ["a", "b"]);
        assert!(sink.is_cancelled());
    }
}
