//! The crate's error type. Each variant is one kind of failure a user can act on; the
//! Triton layer maps each to one error code (`triton::error`).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the model folder could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing a key, has a bad value or names an unsupported family.
    #[error("model config: {0}")]
    Config(String),
    /// The weight files do not match the config (missing, unknown or mis-shaped tensor,
    /// corrupt or truncated file, unsupported dtype).
    #[error("model weights: {0}")]
    Weights(String),
    /// `tokenizer.model` / `tokenizer.json` could not be read or built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request the model cannot serve as asked: names the input and the problem.
    #[error("{0}")]
    InvalidRequest(String),
    /// The engine cannot take or finish work right now (the model is unloading).
    #[error("{0}")]
    Unavailable(String),
    /// The GPU could not be used: no driver or device, too little memory, a failed
    /// kernel compile or launch.
    #[error("GPU: {0}")]
    Device(String),
    /// The GPU context is unusable (a sticky error such as an illegal address): every later
    /// call on it fails the same way, so the engine stops serving until the model reloads.
    #[error("GPU fault, the device context is lost: {0}")]
    DeviceLost(String),
    /// A fault of the engine itself, not of the request.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Whether the engine that met this error can serve no more requests.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::DeviceLost(_))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
