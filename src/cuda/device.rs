//! A device's context, a model's streams on it, device and pinned host memory, copies.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use super::blas::{BLAS_WORKSPACE, SPLIT_K_BYTES};
use super::blaslt::BlasLt;
use super::compile::{Compiled, Kernels};
use super::{blas_error, device_error};
use crate::dtype::DType;
use crate::{Error, Result};

/// A device buffer of raw bytes. Kernels see it only through [`View`]s, which carry its
/// size, so every launch wrapper can check that what it writes and reads lies inside.
pub struct Buffer {
    slice: CudaSlice<u8>,
    ptr: u64,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.slice.len()
    }

    /// The whole buffer.
    pub fn view(&self) -> View<'_> {
        View { ptr: self.ptr, bytes: self.slice.len(), _buffer: PhantomData }
    }

    /// `bytes` bytes from `offset` on; an error when they run past the end.
    pub fn range(&self, offset: usize, bytes: usize) -> Result<View<'_>> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.slice.len() => {
                Ok(View { ptr: self.ptr + offset as u64, bytes, _buffer: PhantomData })
            }
            _ => Err(Error::Internal(format!(
                "bytes {offset}..+{bytes} lie outside a device buffer of {}",
                self.slice.len()
            ))),
        }
    }
}

/// A span of device memory inside a live [`Buffer`]: the only form in which an address
/// reaches a kernel. It borrows the buffer, so it cannot outlive it, and it knows its
/// length, which each launch wrapper checks against what the launch's shape reaches.
/// (Device memory is written through shared views: it is not Rust memory, and the one
/// stream a model queues on orders every access.)
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    ptr: u64,
    bytes: usize,
    _buffer: PhantomData<&'a Buffer>,
}

impl View<'_> {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The device address, for a kernel argument (only this module launches).
    pub(super) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The address where a launch's argument list can borrow it.
    pub(super) fn ptr_ref(&self) -> &u64 {
        &self.ptr
    }

    /// Fails unless the view holds at least `bytes` bytes; `what` names it in the error.
    pub(super) fn check(&self, what: &str, bytes: usize) -> Result<()> {
        if self.bytes < bytes {
            return Err(Error::Internal(format!(
                "{what}: the launch reaches {bytes} bytes of a device view of {}",
                self.bytes
            )));
        }
        Ok(())
    }
}

/// Page-locked host memory (`Gpu::alloc_host`).
pub struct HostBuffer(cudarc::driver::PinnedHostSlice<u8>);

impl HostBuffer {
    pub fn bytes(&self) -> usize {
        self.0.len()
    }
}

/// One loaded model on a device (its instances share it): the shared context and kernels,
/// a stream of its own and a cuBLAS handle on it. Its work is queued in order on that
/// stream. Graphs are captured on a second stream nothing else uses (another instance's
/// allocations or frees on the first must not land in a capture), then replayed on the
/// first.
pub struct Gpu {
    pub(super) ctx: Arc<CudaContext>,
    compiled: Arc<Compiled>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) capture_stream: Arc<CudaStream>,
    /// cuBLAS handles are not to be used by two threads at once.
    pub(super) blas: Mutex<CudaBlas>,
    /// cuBLAS's workspace, set explicitly so that graph captures do not allocate their own.
    pub(super) blas_workspace: CudaSlice<u8>,
    /// The split-K GEMV's partial sums and per-column counters (blas.rs), used by one
    /// product at a time in stream order; the counters are zero between products.
    pub(super) split_k: Buffer,
    /// Whether kernels launch with programmatic dependent launch (where the device has it).
    programmatic: AtomicBool,
    /// cuBLASLt for FP8 products, made at the first (None where it cannot be).
    blaslt: OnceLock<Option<Mutex<BlasLt>>>,
    pub dtype: DType,
    pub ordinal: usize,
    pub name: String,
}

impl Gpu {
    /// The device `ordinal` with kernels for `dtype` and a stream of its own; a second call
    /// for the same device and dtype shares the compiled module.
    pub fn open(ordinal: usize, dtype: DType) -> Result<Arc<Gpu>> {
        type Opened = HashMap<(usize, DType), std::sync::Weak<Compiled>>;
        static OPEN: OnceLock<Mutex<Opened>> = OnceLock::new();
        let compiled = {
            let mut open =
                OPEN.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
            match open.get(&(ordinal, dtype)).and_then(std::sync::Weak::upgrade) {
                Some(compiled) => compiled,
                None => {
                    let compiled = Arc::new(Compiled::create(ordinal, dtype)?);
                    open.insert((ordinal, dtype), Arc::downgrade(&compiled));
                    compiled
                }
            }
        };
        let ctx = Arc::clone(&compiled.ctx);
        ctx.bind_to_thread().map_err(device_error("binding the CUDA context"))?;
        let stream = ctx.new_stream().map_err(device_error("creating a stream"))?;
        let capture_stream = ctx.new_stream().map_err(device_error("creating a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error("creating a cuBLAS handle"))?;
        let blas_workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(device_error("allocating the cuBLAS workspace"))?;
        let split_k = {
            let slice = stream
                .alloc_zeros::<u8>(SPLIT_K_BYTES)
                .map_err(device_error("allocating the split-K scratch"))?;
            let ptr = slice.device_ptr(&stream).0;
            Buffer { slice, ptr }
        };
        let gpu = Gpu {
            split_k,
            ctx,
            name: compiled.name.clone(),
            programmatic: AtomicBool::new(compiled.programmatic_launch),
            compiled,
            stream,
            capture_stream,
            blas: Mutex::new(blas),
            blas_workspace,
            blaslt: OnceLock::new(),
            dtype,
            ordinal,
        };
        if let Err(e) = gpu.set_blas_workspace(&gpu.blas.lock().unwrap_or_else(|p| p.into_inner()))
        {
            // cuBLAS keeps its own workspace: products still run; graph captures of them may
            // allocate (or fail, and decode steps then run without graphs).
            tracing::warn!("cuBLAS kept its default workspace: {e}");
        }
        Ok(Arc::new(gpu))
    }

    /// Whether kernels launch with programmatic dependent launch (kernels/common.cuh).
    pub(super) fn programmatic_launch(&self) -> bool {
        self.programmatic.load(Ordering::Relaxed)
    }

    /// Turns programmatic dependent launch on (where the device and driver have it: sm_90
    /// and CUDA 12.3 on) or off, for launches and graph captures from now on; returns
    /// whether it is on.
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        let on = on && self.compiled.programmatic_launch;
        self.programmatic.store(on, Ordering::Relaxed);
        on
    }

    /// cuBLASLt's handle for FP8 products, made at the first call; None (said once in the
    /// log) where this dtype or the libraries have none, and FP8 products take cuBLAS over
    /// the weight's E4M3 values instead.
    pub(super) fn blaslt(&self) -> Option<&Mutex<BlasLt>> {
        self.blaslt
            .get_or_init(|| match BlasLt::new(self.dtype) {
                Ok(blaslt) => Some(Mutex::new(blaslt)),
                Err(e) => {
                    tracing::warn!(
                        "FP8 products of many rows take cuBLAS over E4M3 values, not cuBLASLt: {e}"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// cuBLAS's workspace as a view (cuBLASLt shares it: both queue in stream order).
    pub(super) fn workspace_view(&self) -> View<'_> {
        let ptr = self.blas_workspace.device_ptr(&self.stream).0;
        View { ptr, bytes: BLAS_WORKSPACE, _buffer: PhantomData }
    }

    pub(super) fn kernels(&self) -> &Kernels {
        &self.compiled.kernels
    }

    /// Makes this device current on the calling thread (engine threads call it first).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(device_error("binding the CUDA context"))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(device_error("reading free device memory"))
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| {
            Error::Device(format!("allocating {bytes} bytes of device memory: {e}"))
        })?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buffer { slice, ptr })
    }

    /// A buffer holding `values` converted to this GPU's dtype.
    pub fn upload_elems(&self, values: &[f32]) -> Result<Buffer> {
        self.upload_bytes(&self.dtype.encode(values))
    }

    pub fn upload_bytes(&self, bytes: &[u8]) -> Result<Buffer> {
        let mut buffer = self.alloc(bytes.len())?;
        self.write_bytes(&mut buffer, 0, bytes)?;
        Ok(buffer)
    }

    /// Copies host bytes to `offset` in `buffer` (returns once the host memory is read).
    pub fn write_bytes(&self, buffer: &mut Buffer, offset: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut view = buffer.slice.slice_mut(offset..offset + bytes.len());
        self.stream.memcpy_htod(bytes, &mut view).map_err(device_error("copying to the device"))
    }

    /// Page-locked host memory for `bytes` bytes: device-to-host copies into it run at full
    /// bus speed (the logits of every step come back through one).
    pub fn alloc_host(&self, bytes: usize) -> Result<HostBuffer> {
        // SAFETY: plain page-locked memory (flags 0: cached, readable at full speed by the
        // CPU); cudarc zeroes nothing, but it is only read after a copy has filled it.
        let pinned =
            unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }.map_err(|e| {
                Error::Device(format!("allocating {bytes} bytes of pinned memory: {e}"))
            })?;
        Ok(HostBuffer(pinned))
    }

    /// Waits for the queued work and returns the first `len` f32 values of `buffer`,
    /// copied through `host`.
    pub fn read_f32_pinned<'h>(
        &self,
        buffer: &Buffer,
        len: usize,
        host: &'h mut HostBuffer,
    ) -> Result<&'h [f32]> {
        let bytes = len * 4;
        if bytes > host.0.len() {
            return Err(Error::Internal("the pinned buffer is smaller than the copy".into()));
        }
        let view = buffer.slice.slice(..bytes);
        self.stream
            .memcpy_dtoh(&view, &mut host.0)
            .map_err(device_error("copying from the device"))?;
        self.synchronize()?;
        let all = host.0.as_slice().map_err(device_error("reading pinned memory"))?;
        Ok(bytemuck::cast_slice(&all[..bytes]))
    }

    /// Waits for the queued work and returns the first `len` u32 values of `buffer`.
    pub fn read_u32(&self, buffer: &Buffer, len: usize) -> Result<Vec<u32>> {
        let mut host = vec![0u32; len];
        let view = buffer.slice.slice(..len * 4);
        self.stream
            .memcpy_dtoh(&view, bytemuck::cast_slice_mut::<u32, u8>(&mut host))
            .map_err(device_error("copying from the device"))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Copies `bytes` bytes between device buffers, in stream order.
    pub fn copy(&self, src: &Buffer, dst: &mut Buffer, bytes: usize) -> Result<()> {
        let from = src.slice.slice(..bytes);
        let mut to = dst.slice.slice_mut(..bytes);
        self.stream.memcpy_dtod(&from, &mut to).map_err(device_error("copying on the device"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(device_error("running queued work"))
    }
}
