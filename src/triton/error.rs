//! Errors crossing the FFI boundary: one function builds a `TRITONSERVER_Error*` going
//! out (`into_raw`), one reads and frees the server's errors coming in (`check`).

use std::ffi::{CStr, CString};
use std::fmt;

use super::sys;

/// A Triton error code and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TritonError {
    pub code: sys::TRITONSERVER_Error_Code,
    pub message: String,
}

pub type TritonResult<T> = Result<T, TritonError>;

impl TritonError {
    pub fn new(code: sys::TRITONSERVER_Error_Code, message: impl Into<String>) -> Self {
        TritonError { code, message: message.into() }
    }

    pub fn invalid_arg(message: impl Into<String>) -> Self {
        Self::new(sys::TRITONSERVER_ERROR_INVALID_ARG, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(sys::TRITONSERVER_ERROR_INTERNAL, message)
    }

    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(sys::TRITONSERVER_ERROR_CANCELLED, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(sys::TRITONSERVER_ERROR_UNSUPPORTED, message)
    }

    /// Prefixes the message with where it happened.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// A new server error object; whoever receives it owns it.
    pub fn into_raw(self) -> *mut sys::TRITONSERVER_Error {
        let message =
            CString::new(self.message.replace('\0', "\\0")).expect("interior NULs were replaced");
        // SAFETY: ErrorNew copies the NUL-terminated message; the code is a valid enum value.
        unsafe { sys::TRITONSERVER_ErrorNew(self.code, message.as_ptr()) }
    }
}

impl fmt::Display for TritonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The crate's errors as the server reports them: a bad request or configuration is the
/// caller's (INVALID_ARG); files that cannot be read or built are INTERNAL.
impl From<crate::Error> for TritonError {
    fn from(error: crate::Error) -> Self {
        let message = error.to_string();
        match error {
            crate::Error::InvalidRequest(_) | crate::Error::Config(_) => Self::invalid_arg(message),
            crate::Error::Unavailable(_) => Self::new(sys::TRITONSERVER_ERROR_UNAVAILABLE, message),
            crate::Error::Io { .. }
            | crate::Error::Weights(_)
            | crate::Error::Tokenizer(_)
            | crate::Error::Device(_)
            | crate::Error::DeviceLost(_)
            | crate::Error::Internal(_) => Self::internal(message),
        }
    }
}

/// Turns the result of a server call into a `Result`, freeing the server's error object.
///
/// # Safety
/// `error` is null or an error object a TRITON* call has just returned (and nobody freed).
pub(crate) unsafe fn check(error: *mut sys::TRITONSERVER_Error) -> TritonResult<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: the caller guarantees a live error object; its message lives until ErrorDelete.
    unsafe {
        let code = sys::TRITONSERVER_ErrorCode(error);
        let text = sys::TRITONSERVER_ErrorMessage(error);
        let message = if text.is_null() {
            String::from("(no message)")
        } else {
            CStr::from_ptr(text).to_string_lossy().into_owned()
        };
        sys::TRITONSERVER_ErrorDelete(error);
        Err(TritonError { code, message })
    }
}

/// Calls a TRITON* function and checks its returned error.
///
/// Every use passes handles that a wrapper type keeps alive for the call (the server's
/// objects outlive the wrapper) and out-pointers to locals of the right type.
macro_rules! ffi {
    ($call:expr) => {
        // SAFETY: see the macro's contract above; the returned error is checked once.
        unsafe { $crate::triton::error::check($call) }
    };
}
pub(crate) use ffi;

/// A borrowed C string from the server as an owned Rust string.
///
/// # Safety
/// `text` is null or points to a NUL-terminated string that is alive for this call.
pub(crate) unsafe fn owned_string(text: *const std::os::raw::c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}
