//! InstanceState: one per model instance. Maps each request of an Execute call to a chat
//! turn on the instance's engine and answers it; a bad request gets its own error
//! response and never affects the others.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;

use super::error::{TritonError, TritonResult, ffi, owned_string};
use super::interface::{self, OutputTensor};
use super::model::{Device, ModelHandle, ModelState};
use super::request::Request;
use super::response::Response;
use super::sys;
use crate::pipeline::{ChatModel, Completion};

pub struct InstanceState {
    pub name: String,
    model: Arc<ModelState>,
    engine: Arc<ChatModel>,
    raw: InstanceHandle,
}

/// The server's handle of an instance, valid between its Initialize and Finalize.
#[derive(Clone, Copy)]
pub(crate) struct InstanceHandle(pub(crate) *mut sys::TRITONBACKEND_ModelInstance);

// The handle is only used from the thread the server calls the instance on.
unsafe impl Send for InstanceHandle {}
unsafe impl Sync for InstanceHandle {}

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

/// CLOCK_MONOTONIC in nanoseconds, the clock of Triton's statistics.
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
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
                return Err(TritonError::unsupported(format!(
                    "instance {name}: KIND_GPU needs the GPU engine, which this build of the llm \
                     backend does not have yet; use KIND_CPU"
                )));
            }
            // AUTO and MODEL arrive as CPU on a machine without GPUs; serve them there.
            _ => Device::Cpu,
        };
        let engine = model.engine(device)?;
        tracing::info!("instance {name}: {device:?} (device id {device_id}) ready");
        Ok(InstanceState { name, model, engine, raw })
    }

    /// Answers every request and releases each exactly once.
    pub fn execute(&self, requests: Vec<Request>) {
        let exec_start = now_ns();
        let batch_size = requests.len() as u64;
        let mut compute_start = exec_start;
        let mut compute_end = exec_start;
        for (index, request) in requests.into_iter().enumerate() {
            let start = now_ns();
            let result =
                catch_unwind(AssertUnwindSafe(|| self.serve(&request))).unwrap_or_else(|p| {
                    Err(TritonError::internal(format!(
                        "the engine panicked: {}",
                        panic_message(&*p)
                    )))
                });
            let end = now_ns();
            if index == 0 {
                compute_start = start;
            }
            compute_end = end;
            let success = result.is_ok();
            if let Err(e) = &result {
                tracing::debug!("instance {}: request {:?} failed: {e}", self.name, request.id());
            }
            if let Err(e) = respond(&request, result) {
                tracing::error!("instance {}: sending a response failed: {e}", self.name);
            }
            let report = ffi!(sys::TRITONBACKEND_ModelInstanceReportStatistics(
                self.raw.0,
                request.as_raw(),
                success,
                start,
                start,
                end,
                now_ns()
            ));
            if let Err(e) = report {
                tracing::warn!("instance {}: reporting statistics failed: {e}", self.name);
            }
            drop(request); // released here, after its response
        }
        let report = ffi!(sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
            self.raw.0,
            batch_size,
            exec_start,
            compute_start,
            compute_end,
            now_ns()
        ));
        if let Err(e) = report {
            tracing::warn!("instance {}: reporting batch statistics failed: {e}", self.name);
        }
    }

    /// One request → its outputs and response parameters.
    fn serve(&self, request: &Request) -> TritonResult<Answer> {
        let inputs = request.inputs()?;
        let config = &self.model.config;
        let batched = config.max_batch_size > 0;
        let chat =
            interface::decode_request(&inputs, batched, self.model.family, &config.parameters)?;
        let completion = self.engine.chat(&chat.turn, &chat.options, |_| true)?;
        let outputs =
            interface::encode_outputs(&completion, batched, &request.requested_outputs()?);
        Ok(Answer { outputs, completion })
    }
}

struct Answer {
    outputs: Vec<OutputTensor>,
    completion: Completion,
}

/// Sends the request's single response: its outputs, or its error.
fn respond(request: &Request, result: TritonResult<Answer>) -> TritonResult<()> {
    let mut response = Response::new(request)?;
    let answer = match result {
        Ok(answer) => answer,
        Err(error) => return response.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, Some(error)),
    };
    let filled = (|| {
        for output in &answer.outputs {
            response.add_output(output)?;
        }
        let completion = &answer.completion;
        response.set_int_parameter("prompt_tokens", completion.prompt_tokens as i64)?;
        response.set_int_parameter("generated_tokens", completion.output_ids.len() as i64)?;
        response.set_string_parameter("finish_reason", completion.finish_reason.as_str())
    })();
    response.send(sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, filled.err())
}
