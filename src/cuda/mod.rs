//! The CUDA device ops behind KIND_GPU instances: a context per device, the kernels of
//! `kernels/*.cu` compiled with NVRTC for the device (once per device and dtype, shared by
//! every model and instance on it), cuBLAS for prefill products, and device buffers.
//! CUDA is loaded at run time (cudarc's dynamic loading), so the crate builds and its tests
//! pass on machines without it; [`available`] says whether this one can run the engine.
//!
//! This module and `src/triton` are the only places with `unsafe`. Addresses never leave
//! it: kernels get [`View`]s of live buffers, and each launch wrapper checks them against
//! the extent its shape reaches before it launches.

#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod arena;
/// cuBLAS and GEMV matrix products, and the cuBLAS handle's stream and workspace.
mod blas;
mod blaslt;
/// Kernel sources, NVRTC compilation and the per-device, per-dtype module.
mod compile;
/// The `Gpu` (context, streams, memory), device buffers and copies.
mod device;
/// CUDA graph capture and replay.
mod graph;
/// Compiled kernels kept on disk between processes.
mod kernel_cache;
/// The kernel launch wrappers.
mod launch;
/// The CUDA major version of the libraries found, checked against the build's.
mod libs;
/// Bandwidth and throughput probes (`triton-llm bench`).
mod probe;
/// Kernel parameters as the PTX declares them; launches checked against them.
mod signature;

use std::sync::OnceLock;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaContext, sys as driver_sys};

pub use arena::KvArena;
pub use blas::{GEMV_MAX_ROWS, ProductKernel, WeightView};
pub use compile::compile;
pub use device::{Buffer, Gpu, HostBuffer, View};
pub use graph::Graph;
pub use launch::{
    AttentionShape, DecodeLayout, MAX_HEAD_DIM, Rope, SAMPLE_WORDS, StepTables,
    decode_shared_bytes, prefill_shared_bytes,
};
pub use libs::CUDA_MAJOR;
pub(crate) use signature::{Param, entry_params};

use crate::Error;

fn device_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| {
        if is_sticky(&e) {
            Error::DeviceLost(format!("{what}: {e}"))
        } else {
            Error::Device(format!("{what}: {e}"))
        }
    }
}

/// Errors that leave the context unusable: every later call fails with them, so the only
/// way on is a new context (the driver API's "sticky" errors).
fn is_sticky(error: &cudarc::driver::DriverError) -> bool {
    use cudarc::driver::sys::CUresult as R;
    matches!(
        error.0,
        R::CUDA_ERROR_ILLEGAL_ADDRESS
            | R::CUDA_ERROR_LAUNCH_TIMEOUT
            | R::CUDA_ERROR_LAUNCH_FAILED
            | R::CUDA_ERROR_ASSERT
            | R::CUDA_ERROR_HARDWARE_STACK_ERROR
            | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | R::CUDA_ERROR_MISALIGNED_ADDRESS
            | R::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | R::CUDA_ERROR_INVALID_PC
            | R::CUDA_ERROR_ECC_UNCORRECTABLE
            | R::CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

fn blas_error(what: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// Whether the CUDA driver, NVRTC and cuBLAS libraries load and at least one device is
/// present. Never panics (cudarc panics on a missing library; that is caught here).
pub fn available() -> bool {
    device_count() > 0
}

pub fn device_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::panic::catch_unwind(|| {
            // SAFETY: these only try to open the libraries.
            let present = unsafe {
                driver_sys::is_culib_present()
                    && cudarc::nvrtc::sys::is_culib_present()
                    && blas_sys::is_culib_present()
            };
            if !present {
                return 0;
            }
            CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
        })
        .unwrap_or(0)
    })
}

/// Whether NVRTC alone loads (kernels can be compiled without a device).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::DriverError;
    use cudarc::driver::sys::CUresult as R;

    #[test]
    fn sticky_driver_errors_lose_the_device_and_others_do_not() {
        // (Formatting a DriverError asks libcuda for its text, so only the codes are tested.)
        for code in
            [R::CUDA_ERROR_ILLEGAL_ADDRESS, R::CUDA_ERROR_LAUNCH_FAILED, R::CUDA_ERROR_ASSERT]
        {
            assert!(is_sticky(&DriverError(code)), "{code:?}");
        }
        for code in [R::CUDA_ERROR_OUT_OF_MEMORY, R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES] {
            assert!(!is_sticky(&DriverError(code)), "{code:?}");
        }
        assert!(Error::DeviceLost("x".into()).is_fatal() && !Error::Device("x".into()).is_fatal());
    }

    #[test]
    fn launch_extents_saturate_instead_of_wrapping() {
        assert_eq!(launch::bytes(&[3, 5, 2]), 30);
        assert_eq!(launch::bytes(&[]), 1);
        // An overflowing shape asks for more than any view holds, so the check refuses it.
        assert_eq!(launch::bytes(&[usize::MAX / 2, 3, 4]), usize::MAX);
    }
}
