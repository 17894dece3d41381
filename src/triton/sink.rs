//! Where the engine thread delivers one request's answer: streamed pieces as decoupled
//! responses, then the final response (or error), the request's statistics and its release.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::error::{TritonError, TritonResult, ffi};
use super::handle::InstanceHandle;
use super::interface::{self, OutputTensor};
use super::raw::{self, RawOutputs};
use super::request::Request;
use super::response::{Response, ResponseFactory};
use super::sys;
use crate::faults::Fault;
use crate::pipeline::Completion;
use crate::sequence::FinishReason;
use crate::serving::AnswerSink;

/// CLOCK_MONOTONIC in nanoseconds, the clock of Triton's statistics.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which contract a request came in by, and what its responses carry.
pub(crate) enum Contract {
    /// The seed interface: `response` pieces when decoupled, then `response` and `history`.
    Seed,
    /// `text_input`: `text_output` and the outputs its `return_*` flags ask for.
    Raw {
        /// Pieces as they come (decoupled models only); else one response.
        stream: bool,
        /// The prompt text, when it leads the output (`exclude_input_in_output` false).
        prefix: Option<String>,
        outputs: RawOutputs,
        prompt_tokens: usize,
    },
}

pub(crate) struct TritonSink {
    instance: InstanceHandle,
    /// None once answered and released.
    request: Option<Request>,
    /// Decoupled models stream through a factory; the others answer once.
    factory: Option<ResponseFactory>,
    requested: Vec<String>,
    batched: bool,
    received_ns: u64,
    cancelled: bool,
    fault: Option<Fault>,
    contract: Contract,
    /// Generated tokens already counted in a streamed response's `num_output_tokens`.
    counted: usize,
}

impl TritonSink {
    /// On failure the request comes back, still unanswered.
    // Each is one fact of the request the sink answers; a struct for them would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        instance: InstanceHandle,
        request: Request,
        requested: Vec<String>,
        batched: bool,
        decoupled: bool,
        received_ns: u64,
        fault: Option<Fault>,
        contract: Contract,
    ) -> Result<Self, (Request, TritonError)> {
        let factory = match decoupled.then(|| ResponseFactory::new(&request)).transpose() {
            Ok(factory) => factory,
            Err(error) => return Err((request, error)),
        };
        Ok(TritonSink {
            instance,
            request: Some(request),
            factory,
            requested,
            batched,
            received_ns,
            cancelled: false,
            fault,
            contract,
            counted: 0,
        })
    }

    fn response_piece(&self, text: &str) -> OutputTensor {
        OutputTensor::text(interface::RESPONSE, self.batched, text)
    }

    fn stream(&mut self, text: &str, generated: usize) -> TritonResult<()> {
        let Some(factory) = &self.factory else { return Ok(()) };
        let outputs = match &self.contract {
            Contract::Seed => {
                if !self.requested.iter().any(|name| name == interface::RESPONSE) {
                    return Ok(());
                }
                vec![self.response_piece(text)]
            }
            Contract::Raw { stream: false, .. } => return Ok(()),
            Contract::Raw { stream: true, outputs, prompt_tokens, .. } => {
                // vLLM's count: the tokens since the previous response.
                let new_tokens = generated.saturating_sub(self.counted);
                self.counted = generated.max(self.counted);
                let counts = raw::TokenCounts { prompt: *prompt_tokens, new: new_tokens };
                raw::encode_raw_outputs(text, counts, None, *outputs, self.batched, &self.requested)
            }
        };
        let mut response = Response::from_factory(factory)?;
        for output in &outputs {
            response.add_output(output)?;
        }
        response.send(0, None)
    }

    fn new_response(&self, request: &Request) -> TritonResult<Response> {
        match &self.factory {
            Some(factory) => Response::from_factory(factory),
            None => Response::new(request),
        }
    }

    fn send_final(&self, request: &Request, result: TritonResult<Completion>) -> TritonResult<()> {
        if self.fault == Some(Fault::FinalSendFails) {
            return Err(TritonError::internal("injected fault: the final response fails"));
        }
        let mut response = self.new_response(request)?;
        let completion = match result {
            Ok(completion) => completion,
            Err(error) => {
                return response.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, Some(error));
            }
        };
        let outputs = match &self.contract {
            Contract::Seed => {
                let mut outputs =
                    interface::encode_outputs(&completion, self.batched, &self.requested);
                if self.factory.is_some() {
                    // The text went out piece by piece; the last response closes it with the
                    // history.
                    for output in outputs.iter_mut().filter(|o| o.name == interface::RESPONSE) {
                        *output = self.response_piece("");
                    }
                }
                outputs
            }
            Contract::Raw { stream, prefix, outputs, prompt_tokens } => {
                // Streamed: the text went out piece by piece; the last response ends it.
                let text = match (stream, prefix) {
                    (true, _) => String::new(),
                    (false, Some(prefix)) => format!("{prefix}{}", completion.response),
                    (false, None) => completion.response.clone(),
                };
                let new = completion.output_ids.len().saturating_sub(self.counted);
                let counts = raw::TokenCounts { prompt: *prompt_tokens, new };
                raw::encode_raw_outputs(
                    &text,
                    counts,
                    Some(&completion),
                    *outputs,
                    self.batched,
                    &self.requested,
                )
            }
        };
        let filled = (|| {
            for output in &outputs {
                response.add_output(output)?;
            }
            response.set_int_parameter("prompt_tokens", completion.prompt_tokens as i64)?;
            response.set_int_parameter("generated_tokens", completion.output_ids.len() as i64)?;
            response.set_string_parameter("finish_reason", completion.finish_reason.as_str())
        })();
        response.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, filled.err())
    }

    /// After a failed final send: an error response in its place, or at least the FINAL flag
    /// (a decoupled client waits for it).
    fn send_fallback_final(&self, request: &Request, failure: TritonError) {
        let error =
            TritonError::internal(format!("the final response could not be sent: {failure}"));
        let sent = self.new_response(request).and_then(|response| {
            response.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, Some(error))
        });
        let sent = match (sent, &self.factory) {
            (Err(e), Some(factory)) => {
                tracing::error!("sending an error in place of a final response failed: {e}");
                factory.send_flags(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            }
            (sent, _) => sent,
        };
        if let Err(e) = sent {
            tracing::error!("the request's final response could not be sent at all: {e}");
        }
    }

    /// Sends the final answer once, reports the request's statistics and releases it.
    fn answer(&mut self, result: TritonResult<Completion>) {
        let Some(request) = self.request.take() else { return };
        let success = result.is_ok();
        // Runs on the engine's threads: a panic here must not take them down.
        let sent = catch_unwind(AssertUnwindSafe(|| self.send_final(&request, result)))
            .unwrap_or_else(|_| Err(TritonError::internal("sending the final response panicked")));
        if let Err(error) = sent {
            tracing::error!("sending a final response failed: {error}");
            let fallback =
                catch_unwind(AssertUnwindSafe(|| self.send_fallback_final(&request, error)));
            if fallback.is_err() {
                tracing::error!("sending a fallback final response panicked");
            }
        }
        report_and_release(self.instance, request, success, self.received_ns);
    }
}

impl AnswerSink for TritonSink {
    fn on_text(&mut self, text: &str, generated: usize) -> bool {
        match self.stream(text, generated) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!("streaming a response failed, stopping the request: {error}");
                false
            }
        }
    }

    fn is_cancelled(&mut self) -> bool {
        let cancelled = match (&self.factory, &self.request) {
            (Some(factory), _) => factory.is_cancelled(),
            (None, Some(request)) => request.is_cancelled(),
            (None, None) => false,
        };
        self.cancelled |= cancelled;
        cancelled
    }

    fn finish(mut self: Box<Self>, result: crate::Result<Completion>) {
        let result = match result {
            Ok(completion)
                if self.cancelled && completion.finish_reason == FinishReason::Cancelled =>
            {
                Err(TritonError::cancelled("the request was cancelled"))
            }
            other => other.map_err(TritonError::from),
        };
        self.answer(result);
    }
}

impl Drop for TritonSink {
    /// A sink dropped unanswered (its engine died, a queue holding it was dropped) still
    /// answers, so that no client waits forever.
    fn drop(&mut self) {
        if self.request.is_some() {
            tracing::error!("a request was dropped unanswered; answering it with an error");
            self.answer(Err(TritonError::internal(
                "the request was dropped before it was answered (the engine stopped)",
            )));
        }
    }
}

/// Answers a request that never reached the engine (bad inputs) and releases it.
pub(crate) fn answer_now(
    instance: InstanceHandle,
    request: Request,
    received_ns: u64,
    error: TritonError,
) {
    let sent = Response::new(&request)
        .and_then(|r| r.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, Some(error)));
    if let Err(e) = sent {
        tracing::error!("sending an error response failed: {e}");
    }
    report_and_release(instance, request, false, received_ns);
}

fn report_and_release(instance: InstanceHandle, request: Request, success: bool, received_ns: u64) {
    let end = now_ns();
    let report = ffi!(sys::TRITONBACKEND_ModelInstanceReportStatistics(
        instance.0,
        request.as_raw(),
        success,
        received_ns,
        received_ns,
        end,
        end
    ));
    if let Err(e) = report {
        tracing::warn!("reporting request statistics failed: {e}");
    }
    drop(request); // released after its last response and its statistics
}
