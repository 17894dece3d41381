//! A response under construction: BYTES outputs copied into server buffers, parameters,
//! then sent (or deleted on drop if never sent).

use std::ffi::CString;
use std::ptr;

use super::error::{TritonError, TritonResult, ffi};
use super::interface::{ElementType, OutputTensor};
use super::request::Request;
use super::sys;

pub struct Response {
    raw: *mut sys::TRITONBACKEND_Response,
}

fn c_string(text: &str) -> TritonResult<CString> {
    CString::new(text).map_err(|_| TritonError::internal(format!("NUL inside {text:?}")))
}

impl Response {
    pub fn new(request: &Request) -> TritonResult<Self> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ResponseNew(&mut raw, request.as_raw()))?;
        Ok(Response { raw })
    }

    pub fn from_factory(factory: &ResponseFactory) -> TritonResult<Self> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ResponseNewFromFactory(&mut raw, factory.raw))?;
        Ok(Response { raw })
    }

    /// Adds one BYTES or UINT32 output (one output at a time, as the server requires).
    pub fn add_output(&mut self, tensor: &OutputTensor) -> TritonResult<()> {
        let name = c_string(tensor.name)?;
        let datatype = match tensor.datatype {
            ElementType::Bytes => sys::TRITONSERVER_TYPE_BYTES,
            ElementType::Uint32 => sys::TRITONSERVER_TYPE_UINT32,
            other => {
                return Err(TritonError::internal(format!(
                    "output {}: no outputs of type {other:?}",
                    tensor.name
                )));
            }
        };
        let mut output = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ResponseOutput(
            self.raw,
            &mut output,
            name.as_ptr(),
            datatype,
            tensor.shape.as_ptr(),
            tensor.shape.len() as u32
        ))?;
        let mut buffer: *mut std::ffi::c_void = ptr::null_mut();
        let mut memory_type = sys::TRITONSERVER_MEMORY_CPU;
        let mut memory_type_id = 0i64;
        ffi!(sys::TRITONBACKEND_OutputBuffer(
            output,
            &mut buffer,
            tensor.data.len() as u64,
            &mut memory_type,
            &mut memory_type_id
        ))?;
        if tensor.data.is_empty() {
            return Ok(());
        }
        if memory_type == sys::TRITONSERVER_MEMORY_GPU || buffer.is_null() {
            return Err(TritonError::internal(format!(
                "output {}: the server gave no host buffer",
                tensor.name
            )));
        }
        // SAFETY: the server allocated `data.len()` writable host bytes for this output.
        unsafe {
            ptr::copy_nonoverlapping(tensor.data.as_ptr(), buffer as *mut u8, tensor.data.len());
        }
        Ok(())
    }

    pub fn set_int_parameter(&mut self, name: &str, value: i64) -> TritonResult<()> {
        let name = c_string(name)?;
        ffi!(sys::TRITONBACKEND_ResponseSetIntParameter(self.raw, name.as_ptr(), value))
    }

    pub fn set_string_parameter(&mut self, name: &str, value: &str) -> TritonResult<()> {
        let (name, value) = (c_string(name)?, c_string(value)?);
        ffi!(sys::TRITONBACKEND_ResponseSetStringParameter(self.raw, name.as_ptr(), value.as_ptr()))
    }

    /// Sends the response with `flags`, as an error response when `error` is given.
    pub fn send(self, flags: u32, error: Option<TritonError>) -> TritonResult<()> {
        let raw = self.raw;
        // Once sent (even if the send reports an error) the server owns the response.
        std::mem::forget(self);
        let error = error.map(TritonError::into_raw).unwrap_or(ptr::null_mut());
        let result = ffi!(sys::TRITONBACKEND_ResponseSend(raw, flags, error));
        if !error.is_null() {
            // SAFETY: ResponseSend leaves the error with the caller, who frees it once.
            unsafe { sys::TRITONSERVER_ErrorDelete(error) };
        }
        result
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        if let Err(e) = ffi!(sys::TRITONBACKEND_ResponseDelete(self.raw)) {
            tracing::error!("deleting an unsent response failed: {e}");
        }
    }
}

/// The source of a decoupled request's responses; it outlives the request. Deleted on drop.
pub struct ResponseFactory {
    raw: *mut sys::TRITONBACKEND_ResponseFactory,
}

// SAFETY: a factory's responses may be created and sent from any thread; it is owned, so
// one thread at a time uses it, and it is deleted once, on drop.
unsafe impl Send for ResponseFactory {}

impl ResponseFactory {
    pub fn new(request: &Request) -> TritonResult<Self> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ResponseFactoryNew(&mut raw, request.as_raw()))?;
        Ok(ResponseFactory { raw })
    }

    /// Sends no response, only `flags` (FINAL: the stream ends).
    pub fn send_flags(&self, flags: u32) -> TritonResult<()> {
        ffi!(sys::TRITONBACKEND_ResponseFactorySendFlags(self.raw, flags))
    }

    /// Whether the client cancelled the stream or dropped the connection.
    pub fn is_cancelled(&self) -> bool {
        let mut cancelled = false;
        ffi!(sys::TRITONBACKEND_ResponseFactoryIsCancelled(self.raw, &mut cancelled)).is_ok()
            && cancelled
    }
}

impl Drop for ResponseFactory {
    fn drop(&mut self) {
        if let Err(e) = ffi!(sys::TRITONBACKEND_ResponseFactoryDelete(self.raw)) {
            tracing::error!("deleting a response factory failed: {e}");
        }
    }
}
