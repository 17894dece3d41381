//! CUDA graphs: a run of launches captured once and replayed with one launch.

use std::sync::Arc;

use cudarc::driver::{CudaStream, sys as driver_sys};

use super::{Gpu, device_error};
use crate::{Error, Result};

thread_local! {
    /// The address of the Gpu whose `capture` runs on this thread (0: none): only that
    /// thread's launches go to its capture stream.
    static CAPTURING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Gpu {
    /// Where kernel launches go now.
    pub(super) fn launch_stream(&self) -> &Arc<CudaStream> {
        let capturing = CAPTURING.with(|gpu| gpu.get() == self as *const Gpu as usize);
        if capturing { &self.capture_stream } else { &self.stream }
    }

    /// Records the launches `queue` makes (kernels and cuBLAS products) as a graph instead
    /// of running them (nothing runs until [`Gpu::replay`]). They are captured on a stream of
    /// their own, so work other threads queue on this Gpu's stream meanwhile stays out.
    /// The caller keeps every other thread's launches on this Gpu out for the duration
    /// (the model's scratch lock), and `queue` must not copy, allocate or wait.
    pub fn capture(&self, queue: impl FnOnce() -> Result<()>) -> Result<Graph> {
        {
            let mut blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
            self.bind_blas(&mut blas, &self.capture_stream)?;
        }
        let begun = self
            .capture_stream
            .begin_capture(driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(device_error("starting a graph capture"));
        let recorded = begun.and_then(|()| {
            struct Capturing;
            impl Drop for Capturing {
                // Also when `queue` panics: later launches on this thread must not go astray.
                fn drop(&mut self) {
                    CAPTURING.with(|gpu| gpu.set(0));
                }
            }
            CAPTURING.with(|gpu| gpu.set(self as *const Gpu as usize));
            let capturing = Capturing;
            let queued = queue();
            drop(capturing);
            // Always ended, so that the stream leaves capture mode whatever happened.
            let ended = self.capture_stream.end_capture(driver_sys::CUgraphInstantiate_flags(0));
            queued?;
            ended
                .map_err(device_error("ending a graph capture"))?
                .ok_or_else(|| Error::Device("a graph capture recorded no work".into()))
        });
        {
            let mut blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
            self.bind_blas(&mut blas, &self.stream)?;
        }
        let graph = Graph(recorded?);
        // SAFETY: the graph's executable is alive (owned by `graph`) and this Gpu's stream
        // belongs to the context it was captured in.
        unsafe {
            cudarc::driver::result::graph::upload(graph.0.cu_graph_exec(), self.stream.cu_stream())
        }
        .map_err(device_error("uploading a graph"))?;
        Ok(graph)
    }

    /// Queues a captured graph's work on this Gpu's stream, in order with the rest.
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        self.bind()?;
        // SAFETY: as in `capture`.
        unsafe {
            cudarc::driver::result::graph::launch(graph.0.cu_graph_exec(), self.stream.cu_stream())
        }
        .map_err(device_error("launching a graph"))
    }
}

/// A captured sequence of launches (`Gpu::capture`), replayed with one launch. It holds the
/// device addresses it was captured with: its owner drops it when those buffers go.
pub struct Graph(cudarc::driver::CudaGraph);

// SAFETY: CUDA only asks that no two calls on one graph run at once; a Graph is launched
// and dropped through `&`/ownership by the one thread holding its owner's lock.
unsafe impl Send for Graph {}
