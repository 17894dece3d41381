//! triton_llm — a Triton Inference Server backend that serves ChatGLM2 and InternLM2 chat
//! models with its own engine.
//!
//! Data flow: Triton request (`triton`: FFI fence, entry points, the model's config.pbtxt
//! parameters, the seed interface) → chat template (`chat`) → tokenizer (`tokenizer`) →
//! serving engine (`serving`: one per instance, in-flight batching) over each sequence's
//! generation and KV blocks (`sequence`) and next-token choice (`sampling`) → model graph
//! (`model`, one file per family, computing in a `dtype`) → device ops (`cpu`, `cuda` with
//! the kernels of `kernels/`). `pipeline` ties a model folder's parts together; the
//! `triton-llm` CLI runs the same path without a server. `faults` lets tests make a chosen
//! part fail; `probe` measures the GPU apart from a model (the CUDA layer is the crate's own).
//!
//! "Engine" means the serving engine alone; where the model runs is its device (the CPU
//! path, the GPU path).

// `unsafe` lives only in `triton` (the FFI fence) and `cuda` (device memory and launches),
// each of which allows it for itself with every block's SAFETY comment enforced.
#![deny(unsafe_code)]

pub mod chat;
pub mod cpu;
pub(crate) mod cuda;
pub mod dtype;
pub mod error;
pub mod faults;
pub mod model;
pub mod pipeline;
pub mod probe;
pub mod sampling;
pub mod sequence;
pub mod serving;
pub mod tokenizer;
pub mod triton;

pub use error::{Error, Result};
