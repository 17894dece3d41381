//! InstanceState: one per model instance, with its own serving engine (a thread doing
//! in-flight batching). Execute decodes each request into a chat turn and queues it; a bad
//! request gets its own error response at once and never affects the others.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;

use super::error::{TritonError, TritonResult, ffi, owned_string};
use super::handle::InstanceHandle;
use super::interface::{self, AnyRequest};
use super::metrics::InstanceMetrics;
use super::model::{ModelHandle, ModelState};
use super::raw::{RawPrompt, RawRequest};
use super::request::Request;
use super::sink::{self, Contract, TritonSink, now_ns};
use super::sys;
use crate::faults::{self, Fault};
use crate::model::Device;
use crate::pipeline::ChatModel;
use crate::serving::{ChatJob, EngineMetrics, NoMetrics, ServingEngine, panic_text};

pub struct InstanceState {
    pub name: String,
    model: Arc<ModelState>,
    /// The weights and tokenizer the engine runs; requests are tokenized with it here.
    chat: Arc<ChatModel>,
    /// Dropped at finalize: its thread answers what is still queued and is joined.
    engine: ServingEngine,
    raw: InstanceHandle,
}

impl InstanceHandle {
    fn name(self) -> TritonResult<String> {
        let mut name = ptr::null();
        ffi!(sys::TRITONBACKEND_ModelInstanceName(self.0, &mut name))?;
        // SAFETY: the name lives as long as the instance.
        Ok(unsafe { owned_string(name) })
    }

    pub(crate) fn set_state(self, state: InstanceState) -> TritonResult<()> {
        let raw = Box::into_raw(Box::new(state));
        let result = ffi!(sys::TRITONBACKEND_ModelInstanceSetState(self.0, raw as *mut c_void));
        if result.is_err() {
            // SAFETY: the server did not take the pointer; reclaim it once.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// The state set by `set_state`, borrowed for one Execute call.
    pub(crate) fn with_state<T>(self, f: impl FnOnce(&InstanceState) -> T) -> TritonResult<T> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelInstanceState(self.0, &mut raw))?;
        if raw.is_null() {
            return Err(TritonError::internal("the instance has no state"));
        }
        // SAFETY: a Box<InstanceState> from set_state, alive until take_state (Finalize,
        // which the server never runs during Execute).
        Ok(f(unsafe { &*(raw as *const InstanceState) }))
    }

    pub(crate) fn take_state(self) -> TritonResult<Option<InstanceState>> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelInstanceState(self.0, &mut raw))?;
        if raw.is_null() {
            return Ok(None);
        }
        ffi!(sys::TRITONBACKEND_ModelInstanceSetState(self.0, ptr::null_mut()))?;
        // SAFETY: the pointer came from Box::into_raw in set_state and is taken once.
        Ok(Some(*unsafe { Box::from_raw(raw as *mut InstanceState) }))
    }
}

impl InstanceState {
    pub(crate) fn new(raw: InstanceHandle) -> TritonResult<Self> {
        let name = raw.name()?;
        let mut kind = sys::TRITONSERVER_INSTANCEGROUPKIND_AUTO;
        ffi!(sys::TRITONBACKEND_ModelInstanceKind(raw.0, &mut kind))?;
        let mut device_id = 0i32;
        ffi!(sys::TRITONBACKEND_ModelInstanceDeviceId(raw.0, &mut device_id))?;
        let mut model = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelInstanceModel(raw.0, &mut model))?;
        let model = ModelHandle(model).state()?;
        let device = match kind {
            sys::TRITONSERVER_INSTANCEGROUPKIND_GPU => {
                Device::Cuda(usize::try_from(device_id).map_err(|_| {
                    TritonError::invalid_arg(format!("instance {name}: GPU device id {device_id}"))
                })?)
            }
            // AUTO and MODEL arrive as CPU on a machine without GPUs; serve them there.
            _ => Device::Cpu,
        };
        let chat = model.engine(device)?;
        let metrics: Box<dyn EngineMetrics> = match &model.metrics {
            Some(families) => match InstanceMetrics::new(families, &model.name, &name) {
                Ok(metrics) => Box::new(metrics),
                Err(e) => {
                    tracing::warn!("instance {name}: no metrics: {e}");
                    Box::new(NoMetrics)
                }
            },
            None => Box::new(NoMetrics),
        };
        let engine = ServingEngine::start(
            Arc::clone(&chat),
            model.config.parameters.scheduler,
            &name,
            metrics,
        )?;
        tracing::info!("instance {name}: {device:?} (device id {device_id}) ready");
        Ok(InstanceState { name, model, chat, engine, raw })
    }

    /// Hands every request to the engine (or answers it at once when its inputs are bad).
    /// Returns before the answers: the engine thread sends them and releases the requests.
    /// Never unwinds: the requests are ours now, and each gets exactly one final answer even
    /// if taking it in panics.
    pub fn execute(&self, requests: Vec<Request>) {
        let received = now_ns();
        let arrived = std::time::Instant::now();
        let batch_size = requests.len() as u64;
        for request in requests {
            // The request stays out here while its inputs are read: a panic there leaves it
            // to answer. Past `admit` it belongs to a sink, which answers it if dropped.
            match catch_unwind(AssertUnwindSafe(|| self.decode(&request))) {
                Ok(Ok(decoded)) => {
                    let admitted = catch_unwind(AssertUnwindSafe(|| {
                        self.admit(request, decoded, received, arrived)
                    }));
                    if let Err(panic) = admitted {
                        tracing::error!(
                            "instance {}: submitting a request panicked: {}",
                            self.name,
                            panic_text(panic)
                        );
                    }
                }
                Ok(Err(error)) => {
                    tracing::debug!("instance {}: request {:?}: {error}", self.name, request.id());
                    sink::answer_now(self.raw, request, received, error);
                }
                Err(panic) => {
                    let message = format!("taking the request in panicked: {}", panic_text(panic));
                    tracing::error!("instance {}: {message}", self.name);
                    sink::answer_now(self.raw, request, received, TritonError::internal(message));
                }
            }
        }
        let report = ffi!(sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
            self.raw.0,
            batch_size,
            received,
            received,
            now_ns(),
            now_ns()
        ));
        if let Err(e) = report {
            tracing::warn!("instance {}: reporting batch statistics failed: {e}", self.name);
        }
    }

    /// Reads, checks and tokenizes one request's inputs (here, not on the engine's thread,
    /// so a long prompt holds up no running sequence).
    fn decode(&self, request: &Request) -> TritonResult<Decoded> {
        let config = &self.model.config;
        let inputs = request.inputs()?;
        let decoded = interface::decode_any(
            &inputs,
            config.max_batch_size > 0,
            config.decoupled,
            self.model.family,
            &config.parameters,
        )?;
        let text = match &decoded {
            AnyRequest::Chat(chat) => &chat.turn.query,
            AnyRequest::Raw(RawRequest { prompt: RawPrompt::Text(text), .. }) => text,
            AnyRequest::Raw(RawRequest { prompt: RawPrompt::Messages(conversation), .. }) => {
                conversation.last_content()
            }
        };
        let fault = faults::requested(text);
        if fault == Some(Fault::ExecutePanic) {
            panic!("injected fault: execute panics");
        }
        let (prompt, options, contract) = match decoded {
            AnyRequest::Chat(chat) => {
                (self.chat.prepare_chat(&chat.turn)?, chat.options, Contract::Seed)
            }
            AnyRequest::Raw(raw) => {
                let (prompt, text) = match raw.prompt {
                    RawPrompt::Text(text) => (self.chat.prepare_raw(&text)?, Some(text)),
                    RawPrompt::Messages(conversation) => {
                        (self.chat.prepare_messages(&conversation)?, None)
                    }
                };
                let contract = Contract::Raw {
                    stream: raw.stream,
                    prompt_tokens: prompt.ids.len(),
                    prefix: text.filter(|_| raw.prepend_input),
                    outputs: raw.outputs,
                };
                (prompt, raw.options, contract)
            }
        };
        Ok(Decoded { prompt, options, requested: request.requested_outputs()?, fault, contract })
    }

    fn admit(
        &self,
        request: Request,
        decoded: Decoded,
        received: u64,
        arrived: std::time::Instant,
    ) {
        let config = &self.model.config;
        let sink = TritonSink::new(
            self.raw,
            request,
            decoded.requested,
            config.max_batch_size > 0,
            config.decoupled,
            received,
            decoded.fault,
            decoded.contract,
        );
        match sink {
            Ok(sink) => self.engine.submit(ChatJob {
                prompt: decoded.prompt,
                options: decoded.options,
                sink: Box::new(sink),
                arrived,
                fault: decoded.fault,
            }),
            Err((request, error)) => sink::answer_now(self.raw, request, received, error),
        }
    }
}

struct Decoded {
    prompt: crate::pipeline::Prompt,
    options: crate::pipeline::GenerationOptions,
    requested: Vec<String>,
    fault: Option<Fault>,
    contract: Contract,
}
