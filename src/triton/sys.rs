//! The Triton C API as bindgen generates it from `triton_headers/` (build.rs). Never
//! edited by hand; the safe wrappers in this folder are the only users.
#![allow(warnings, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/triton_bindings.rs"));
