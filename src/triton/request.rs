//! A request handed to the backend by Execute: its inputs copied out of the server's
//! buffers, its requested outputs, and its release (exactly once, on drop).

use std::collections::HashMap;
use std::ffi::CString;
use std::ptr;

use super::error::{TritonError, TritonResult, ffi, owned_string};
use super::interface::{ElementType, InputTensor};
use super::sys;

/// A request the backend owns: dropping it releases it back to the server.
pub struct Request {
    raw: *mut sys::TRITONBACKEND_Request,
}

// SAFETY: the server lets a backend answer and release a request from any thread (responses
// of in-flight requests are sent from the engine's threads); a Request is owned, so one
// thread at a time uses it.
unsafe impl Send for Request {}

impl Request {
    /// Takes ownership of a request Execute received.
    ///
    /// # Safety
    /// `raw` is a live request from Execute's array, and Execute will return success (so
    /// the server hands ownership over); each request is wrapped once.
    pub(crate) unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Request) -> Self {
        Request { raw }
    }

    pub(crate) fn as_raw(&self) -> *mut sys::TRITONBACKEND_Request {
        self.raw
    }

    /// The client's request id ("" when none).
    pub fn id(&self) -> String {
        let mut id = ptr::null();
        match ffi!(sys::TRITONBACKEND_RequestId(self.raw, &mut id)) {
            // SAFETY: the id string lives as long as the request.
            Ok(()) => unsafe { owned_string(id) },
            Err(_) => String::new(),
        }
    }

    /// Every input, with its buffers concatenated into host memory.
    pub fn inputs(&self) -> TritonResult<HashMap<String, InputTensor>> {
        let mut count = 0u32;
        ffi!(sys::TRITONBACKEND_RequestInputCount(self.raw, &mut count))?;
        let mut inputs = HashMap::with_capacity(count as usize);
        for index in 0..count {
            let mut name = ptr::null();
            ffi!(sys::TRITONBACKEND_RequestInputName(self.raw, index, &mut name))?;
            // SAFETY: names live as long as the request.
            let name = unsafe { owned_string(name) };
            let tensor = self.read_input(&name).map_err(|e| e.context(&name))?;
            inputs.insert(name, tensor);
        }
        Ok(inputs)
    }

    fn read_input(&self, name: &str) -> TritonResult<InputTensor> {
        let c_name =
            CString::new(name).map_err(|_| TritonError::invalid_arg("NUL in input name"))?;
        let mut input = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_RequestInput(self.raw, c_name.as_ptr(), &mut input))?;
        let mut datatype = sys::TRITONSERVER_TYPE_INVALID;
        let mut shape: *const i64 = ptr::null();
        let (mut dims, mut byte_size, mut buffer_count) = (0u32, 0u64, 0u32);
        ffi!(sys::TRITONBACKEND_InputProperties(
            input,
            ptr::null_mut(),
            &mut datatype,
            &mut shape,
            &mut dims,
            &mut byte_size,
            &mut buffer_count
        ))?;
        let shape = if dims == 0 || shape.is_null() {
            Vec::new()
        } else {
            // SAFETY: the server's shape array has `dims` entries and lives with the request.
            unsafe { std::slice::from_raw_parts(shape, dims as usize) }.to_vec()
        };
        let mut data = Vec::with_capacity(byte_size as usize);
        for index in 0..buffer_count {
            let mut buffer: *const std::ffi::c_void = ptr::null();
            let mut size = 0u64;
            let mut memory_type = sys::TRITONSERVER_MEMORY_CPU;
            let mut memory_type_id = 0i64;
            ffi!(sys::TRITONBACKEND_InputBuffer(
                input,
                index,
                &mut buffer,
                &mut size,
                &mut memory_type,
                &mut memory_type_id
            ))?;
            if memory_type == sys::TRITONSERVER_MEMORY_GPU {
                return Err(TritonError::invalid_arg(
                    "arrived in GPU memory; send it from the host",
                ));
            }
            if size > 0 && !buffer.is_null() {
                // SAFETY: a host buffer of `size` bytes, alive as long as the request.
                data.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(buffer as *const u8, size as usize)
                });
            }
        }
        let datatype = match datatype {
            sys::TRITONSERVER_TYPE_BYTES => ElementType::Bytes,
            sys::TRITONSERVER_TYPE_BOOL => ElementType::Bool,
            sys::TRITONSERVER_TYPE_INT32 => ElementType::Int32,
            sys::TRITONSERVER_TYPE_INT64 => ElementType::Int64,
            sys::TRITONSERVER_TYPE_UINT32 => ElementType::Uint32,
            sys::TRITONSERVER_TYPE_UINT64 => ElementType::Uint64,
            sys::TRITONSERVER_TYPE_FP32 => ElementType::Fp32,
            sys::TRITONSERVER_TYPE_FP64 => ElementType::Fp64,
            _ => ElementType::Other,
        };
        Ok(InputTensor { datatype, shape, data })
    }

    /// Whether the client cancelled (gRPC cancel; HTTP disconnects are not reported).
    pub fn is_cancelled(&self) -> bool {
        let mut cancelled = false;
        ffi!(sys::TRITONBACKEND_RequestIsCancelled(self.raw, &mut cancelled)).is_ok() && cancelled
    }

    /// The outputs the client asked for (all configured outputs when it named none).
    pub fn requested_outputs(&self) -> TritonResult<Vec<String>> {
        let mut count = 0u32;
        ffi!(sys::TRITONBACKEND_RequestOutputCount(self.raw, &mut count))?;
        (0..count)
            .map(|index| {
                let mut name = ptr::null();
                ffi!(sys::TRITONBACKEND_RequestOutputName(self.raw, index, &mut name))?;
                // SAFETY: names live as long as the request.
                Ok(unsafe { owned_string(name) })
            })
            .collect()
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Err(e) =
            ffi!(sys::TRITONBACKEND_RequestRelease(self.raw, sys::TRITONSERVER_REQUEST_RELEASE_ALL))
        {
            tracing::error!("releasing a request failed: {e}");
        }
    }
}
