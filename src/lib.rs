//! triton_llm — a Triton Inference Server backend that serves ChatGLM2 and InternLM2 chat
//! models with its own engine.
//!
//! Data flow: Triton request (`triton`: FFI fence, entry points, the seed interface;
//! `config`: the model's config.pbtxt parameters) → chat template (`chat`) → tokenizer (`tokenizer`) → engine
//! (`engine`: generation loop, sampler) → model graph (`model`, one file per family) →
//! device ops (`cpu`, `cuda` with the kernels of `kernels/`). The `triton-llm` CLI runs the same path without a server.

pub mod chat;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod faults;
pub mod model;
pub mod pipeline;
pub mod serving;
pub mod tokenizer;
pub mod triton;

pub use error::{Error, Result};
