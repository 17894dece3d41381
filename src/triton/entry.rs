//! The TRITONBACKEND_* entry points tritonserver calls. Each is a trampoline: it runs the
//! work inside `catch_unwind` (a panic unwinding into the server would abort it) and turns
//! the outcome into the C error channel (null = success).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;

use super::error::{TritonError, TritonResult, ffi, owned_string};
use super::handle::InstanceHandle;
use super::instance::InstanceState;
use super::model::{ModelHandle, ModelState};
use super::request::Request;
use super::{log, sys};

fn guard(entry: &str, work: impl FnOnce() -> TritonResult<()>) -> *mut sys::TRITONSERVER_Error {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(error)) => {
            tracing::error!("{entry}: {error}");
            error.into_raw()
        }
        Err(panic) => {
            let message = crate::serving::panic_text(panic);
            TritonError::internal(format!("{entry} panicked: {message}")).into_raw()
        }
    }
}

/// Called once when the server loads the library: checks that the server speaks the
/// backend API this library was built against and routes logs to the server.
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_Initialize(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_Initialize", || {
        log::install();
        let mut name = ptr::null();
        ffi!(sys::TRITONBACKEND_BackendName(backend, &mut name))?;
        // SAFETY: the name lives as long as the backend.
        let name = unsafe { owned_string(name) };
        let (mut major, mut minor) = (0u32, 0u32);
        ffi!(sys::TRITONBACKEND_ApiVersion(&mut major, &mut minor))?;
        let (want_major, want_minor) =
            (sys::TRITONBACKEND_API_VERSION_MAJOR, sys::TRITONBACKEND_API_VERSION_MINOR);
        if major != want_major || minor < want_minor {
            return Err(TritonError::unsupported(format!(
                "backend {name}: the server's backend API is {major}.{minor}, but this library \
                 needs {want_major}.{want_minor} or a later {want_major}.x (Triton 2.51 or newer)"
            )));
        }
        tracing::info!(
            "backend {name} {}: server backend API {major}.{minor}",
            env!("CARGO_PKG_VERSION")
        );
        Ok(())
    })
}

/// Called once when the server unloads the library, after every model is finalized.
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_Finalize(
    _backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_Finalize", || Ok(()))
}

/// Called when a model loads, before its instances: validates the configuration. An
/// error makes the model UNAVAILABLE with that message.
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_ModelInitialize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInitialize", || {
        let handle = ModelHandle(model);
        handle.set_state(Arc::new(ModelState::load(handle)?))
    })
}

/// Called when a model unloads, after all its instances are finalized.
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_ModelFinalize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelFinalize", || {
        drop(ModelHandle(model).take_state()?);
        Ok(())
    })
}

/// Called once per instance of `instance_group`: gets the engine for its kind and device
/// (loading the weights if no other instance on that device has).
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_ModelInstanceInitialize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceInitialize", || {
        let handle = InstanceHandle(instance);
        handle.set_state(InstanceState::new(handle)?)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_ModelInstanceFinalize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceFinalize", || {
        drop(InstanceHandle(instance).take_state()?);
        Ok(())
    })
}

/// Serves a batch of requests. Triton never calls this concurrently for one instance.
/// Returning success hands every request to the backend, which answers and releases each
/// exactly once; so after the state lookup this never fails, even if something panics
/// (an error return would make the server release the requests a second time), and
/// per-request problems go out as that request's error response.
#[unsafe(no_mangle)]
pub extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceExecute", || {
        InstanceHandle(instance).with_state(|state| {
            let raw: &[*mut sys::TRITONBACKEND_Request] =
                if request_count == 0 || requests.is_null() {
                    &[]
                } else {
                    // SAFETY: the server passes `request_count` request pointers, valid for this call.
                    unsafe { std::slice::from_raw_parts(requests, request_count as usize) }
                };
            // SAFETY: each pointer is a live request, wrapped once; this closure cannot fail
            // after this point, so ownership has passed to us.
            let owned = raw.iter().map(|&r| unsafe { Request::from_raw(r) }).collect();
            // `execute` answers each request even when taking it in panics; this only
            // keeps a panic elsewhere from turning into an error return.
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| state.execute(owned))) {
                tracing::error!(
                    "instance {}: execute panicked: {}",
                    state.name,
                    crate::serving::panic_text(panic)
                );
            }
        })
    })
}
