//! The FFI fence around the Triton C API: generated declarations (`sys`), safe wrappers
//! for errors, requests and responses, the lifecycle states (model, instance) and the
//! `extern "C"` entry points. `interface` (the seed tensors) is pure logic.
//!
//! Nothing here links against libtritonserver: the entry points' calls resolve when
//! tritonserver dlopens the library. Code outside this module never calls into it, so
//! tests and the CLI link without a server.

#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
mod entry;
pub mod error;
mod handle;
mod instance;
pub mod interface;
mod log;
mod metrics;
mod model;
pub mod raw;
mod request;
mod response;
mod sink;
pub(crate) mod sys;
