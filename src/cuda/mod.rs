//! The CUDA device ops behind KIND_GPU instances: a context per device, the kernels of
//! `kernels/*.cu` compiled with NVRTC for the device (once per device and dtype, shared by
//! every model and instance on it), cuBLAS for prefill products, and device buffers.
//! CUDA is loaded at run time (cudarc's dynamic loading), so the crate builds and its tests
//! pass on machines without it; [`available`] says whether this one can run the engine.
//!
//! This module and `src/triton` are the only places with `unsafe`: kernel launches take raw
//! device pointers, and every launch here passes pointers of buffers the caller sized.

#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod arena;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg, sys as driver_sys,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

pub use arena::KvArena;

use crate::dtype::DType;
use crate::{Error, Result};

/// The kernels' element type, as the preprocessor define kernels/common.cuh reads.
fn dtype_define(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "-DELEM_BF16",
        DType::F16 => "-DELEM_F16",
        DType::F32 => "-DELEM_F32",
    }
}

fn cuda_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
    }
}

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

/// The kernel sources, in the order they are concatenated into one module.
const SOURCES: [(&str, &str); 10] = [
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("embedding.cu", include_str!("../../kernels/embedding.cu")),
    ("rms_norm.cu", include_str!("../../kernels/rms_norm.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("rope_kv.cu", include_str!("../../kernels/rope_kv.cu")),
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    ("attention_mma.cu", include_str!("../../kernels/attention_mma.cu")),
    ("silu_mul.cu", include_str!("../../kernels/silu_mul.cu")),
    ("fill.cu", include_str!("../../kernels/fill.cu")),
    ("sampling.cu", include_str!("../../kernels/sampling.cu")),
];

fn module_source() -> String {
    let mut source = String::new();
    for (name, text) in SOURCES {
        source.push_str(&format!("// ---- kernels/{name}\n#line 1 \"{name}\"\n{text}\n"));
    }
    source
}

/// Compiles every kernel for `dtype` to PTX for a virtual architecture such as
/// `compute_90` (the driver finishes it for the exact device at module load).
pub fn compile(dtype: DType, arch: &'static str) -> Result<Ptx> {
    let options = CompileOptions {
        arch: Some(arch),
        options: vec![dtype_define(dtype).to_string(), "--std=c++17".into()],
        use_fast_math: Some(false),
        ..Default::default()
    };
    std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(module_source(), options))
        .map_err(|_| Error::Device("NVRTC (libnvrtc) could not be loaded".into()))?
        .map_err(|e| Error::Device(format!("compiling kernels/*.cu for {arch}: {e}")))
}

fn virtual_arch(major: i32, minor: i32) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    names
        .entry((major, minor))
        .or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

/// The kernels of one module.
struct Kernels {
    embedding: CudaFunction,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    fill_uniform: CudaFunction,
    gemv_elem: CudaFunction,
    gemv_f32: CudaFunction,
    gemv_swiglu: CudaFunction,
    add_bias: CudaFunction,
    rope_write_kv: CudaFunction,
    /// attention_decode_h1, _h2, _h4, _h8: query heads a block takes.
    attention_decode: [CudaFunction; 4],
    attention_prefill: CudaFunction,
    /// The tensor-core prefill (bf16 and f16 modules only).
    attention_prefill_mma: Option<CudaFunction>,
    sample_rows: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>, dtype: DType) -> Result<Self> {
        let f = |name: &str| module.load_function(name).map_err(device_error(name));
        let decode = |heads: usize| -> Result<CudaFunction> {
            let name = format!("attention_decode_h{heads}");
            let function = f(&name)?;
            // Its V staging takes up to 4 warps · 32 keys · 128 dims · 4 bytes (f32): over
            // the 48 KiB a kernel gets without asking.
            function
                .set_attribute(
                    driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    DECODE_MAX_SHARED as i32,
                )
                .map_err(device_error(&format!("{name} shared memory")))?;
            Ok(function)
        };
        let attention_decode = [decode(1)?, decode(2)?, decode(4)?, decode(8)?];
        Ok(Kernels {
            embedding: f("embedding")?,
            add_rms_norm: f("add_rms_norm")?,
            silu_mul: f("silu_mul")?,
            fill_uniform: f("fill_uniform")?,
            gemv_elem: f("gemv_elem")?,
            gemv_f32: f("gemv_f32")?,
            gemv_swiglu: f("gemv_swiglu")?,
            add_bias: f("add_bias")?,
            rope_write_kv: f("rope_write_kv")?,
            attention_decode,
            attention_prefill: f("attention_prefill")?,
            attention_prefill_mma: match dtype {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some(f("attention_prefill_mma")?),
            },
            sample_rows: f("sample_rows")?,
        })
    }
}

impl Compiled {
    fn create(ordinal: usize, dtype: DType) -> Result<Compiled> {
        let count = device_count();
        if ordinal >= count {
            return Err(Error::Device(if count == 0 {
                "no CUDA device (or no CUDA driver, NVRTC and cuBLAS libraries) on this machine"
                    .into()
            } else {
                format!("device {ordinal} does not exist ({count} CUDA devices)")
            }));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_error("creating the CUDA context"))?;
        // Each buffer is used on the stream of the Gpu that made it only: cudarc's
        // per-buffer event tracking (for buffers shared across streams) would only add two
        // event calls per kernel argument.
        // SAFETY: as above; buffers never cross from one Gpu to another.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) =
            ctx.compute_capability().map_err(device_error("reading the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let started = std::time::Instant::now();
        let ptx = compile(dtype, virtual_arch(major, minor))?;
        let module = ctx.load_module(ptx).map_err(device_error("loading the kernel module"))?;
        let kernels = Kernels::load(&module, dtype)?;
        tracing::info!(
            "GPU {ordinal} ({name}, sm_{major}{minor}): kernels compiled for {} in {:.2} s",
            dtype.name(),
            started.elapsed().as_secs_f64()
        );
        Ok(Compiled { ctx, kernels, name })
    }
}

/// Threads of a sampling block (SAMPLE_THREADS in kernels/sampling.cu).
const SAMPLE_THREADS: u32 = 512;
/// Words of one row's sampling parameters (SAMPLE_WORDS in kernels/sampling.cu).
pub const SAMPLE_WORDS: usize = 10;

/// Rows the GEMV kernels take at most (GEMV_MAX_ROWS in kernels/gemv.cu).
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows up to which the engine's products run on the GEMV kernel; above, cuBLAS, which reads
/// the weights faster from two rows on (`triton-llm bench` times both; BENCHMARKS.md, "Small
/// batches").
pub const GEMV_UP_TO_ROWS: usize = 1;
/// Threads of a GEMV block (GEMV_THREADS in kernels/gemv.cu).
const GEMV_THREADS: u32 = 128;
/// Tokens from which `rope_write_kv` takes a block per token instead of per head and token.
const ROPE_BLOCK_PER_TOKEN_FROM: usize = 256;

/// `m` as the GEMV kernel's row count, which is at most GEMV_MAX_ROWS.
fn gemv_rows(m: usize) -> Result<i32> {
    if m > GEMV_MAX_ROWS {
        return Err(Error::Internal(format!(
            "the GEMV kernel takes at most {GEMV_MAX_ROWS} rows, not {m}"
        )));
    }
    Ok(m as i32)
}

/// The kernel that runs a product `x[m, k] · W[n, k]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKernel {
    /// Ours, a block per row of W (up to GEMV_MAX_ROWS rows of x).
    Gemv,
    Cublas,
}

impl ProductKernel {
    /// The kernel the engine runs a product of `m` rows on.
    pub fn for_rows(m: usize) -> ProductKernel {
        if m <= GEMV_UP_TO_ROWS { ProductKernel::Gemv } else { ProductKernel::Cublas }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProductKernel::Gemv => "gemv",
            ProductKernel::Cublas => "cublas",
        }
    }
}

/// A device buffer of raw elements; its pointer is what kernels receive.
pub struct Buffer {
    slice: CudaSlice<u8>,
    ptr: u64,
}

impl Buffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.slice.len()
    }

    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.slice.len());
        self.ptr + offset as u64
    }
}

/// Page-locked host memory (`Gpu::alloc_host`).
pub struct HostBuffer(cudarc::driver::PinnedHostSlice<u8>);

impl HostBuffer {
    pub fn bytes(&self) -> usize {
        self.0.len()
    }
}

/// A device's context and the kernels compiled for it in one dtype, shared by every
/// [`Gpu`] opened on that device and dtype.
struct Compiled {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    name: String,
}

/// One loaded model on a device (its instances share it): the shared context and kernels,
/// a stream of its own and a cuBLAS handle on it. Its work is queued in order on that
/// stream. Graphs are captured on a second stream nothing else uses (another instance's
/// allocations or frees on the first must not land in a capture), then replayed on the
/// first.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    compiled: Arc<Compiled>,
    stream: Arc<CudaStream>,
    capture_stream: Arc<CudaStream>,
    /// cuBLAS handles are not to be used by two threads at once.
    blas: Mutex<CudaBlas>,
    /// cuBLAS's workspace, set explicitly so that graph captures do not allocate their own.
    blas_workspace: CudaSlice<u8>,
    pub dtype: DType,
    pub ordinal: usize,
    pub name: String,
}

thread_local! {
    /// The address of the Gpu whose `capture` runs on this thread (0: none): only that
    /// thread's launches go to its capture stream.
    static CAPTURING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Bytes of cuBLAS workspace per handle (its default on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

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
        let gpu = Gpu {
            ctx,
            name: compiled.name.clone(),
            compiled,
            stream,
            capture_stream,
            blas: Mutex::new(blas),
            blas_workspace,
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

    /// Gives the handle this Gpu's workspace (again after each stream change, which resets
    /// it to cuBLAS's own pool).
    fn set_blas_workspace(&self, blas: &CudaBlas) -> Result<()> {
        let workspace = self.blas_workspace.device_ptr(&self.stream).0;
        // SAFETY: the workspace lives as long as the handle (both fields of this Gpu); its
        // users (products on the stream, or replayed on it) run one after another.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace as *mut std::ffi::c_void,
                BLAS_WORKSPACE,
            )
            .result()
        }
        .map_err(blas_error("setting the cuBLAS workspace"))
    }

    /// Points cuBLAS at `stream` (with this Gpu's workspace).
    fn bind_blas(&self, blas: &mut CudaBlas, stream: &Arc<CudaStream>) -> Result<()> {
        // SAFETY: the handle is used under its lock; both streams belong to this context.
        unsafe { blas.set_stream(Arc::clone(stream)) }
            .map_err(blas_error("setting the cuBLAS stream"))?;
        self.set_blas_workspace(blas)
    }

    /// Where kernel launches go now.
    fn launch_stream(&self) -> &Arc<CudaStream> {
        let capturing = CAPTURING.with(|gpu| gpu.get() == self as *const Gpu as usize);
        if capturing { &self.capture_stream } else { &self.stream }
    }

    fn kernels(&self) -> &Kernels {
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

    fn launch(
        &self,
        function: &CudaFunction,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        self.launch_3d(function, name, (grid.0, grid.1, 1), block, 0, args)
    }

    fn launch_3d(
        &self,
        function: &CudaFunction,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared_mem_bytes: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        let mut builder = self.launch_stream().launch_builder(function);
        for arg in args {
            arg.push(&mut builder);
        }
        let config = LaunchConfig {
            grid_dim: (grid.0.max(1), grid.1.max(1), grid.2.max(1)),
            block_dim: (block, 1, 1),
            shared_mem_bytes,
        };
        // SAFETY: each wrapper below passes arguments matching its kernel's signature, and
        // pointers into buffers its caller sized for the launch's shape.
        unsafe { builder.launch(config) }.map(|_| ()).map_err(device_error(name))
    }

    /// Chooses the next token of `rows` rows of f32 logits (`stride` apart) on the device,
    /// each as `sampling::choose` does, from `SAMPLE_WORDS` parameter words per row
    /// and the rows' distinct penalized ids; writes one id per row to `chosen`. The logits
    /// are changed in place (guard, penalty).
    pub fn sample_rows(
        &self,
        logits: u64,
        stride: usize,
        params: u64,
        penalized: u64,
        chosen: u64,
        rows: usize,
    ) -> Result<()> {
        let stride = stride as u64;
        self.launch(
            &self.kernels().sample_rows,
            "sample_rows",
            (rows as u32, 1),
            SAMPLE_THREADS,
            &[&logits, &stride, &params, &penalized, &chosen],
        )
    }

    /// Fills `n` elements at `out` with uniform values in ±bound (dummy weights).
    pub fn fill_uniform(&self, out: u64, n: usize, seed: u64, bound: f32) -> Result<()> {
        let blocks = n.div_ceil(256).min(65_536) as u32;
        let n = n as u64;
        self.launch(
            &self.kernels().fill_uniform,
            "fill_uniform",
            (blocks, 1),
            256,
            &[&out, &n, &seed, &bound],
        )
    }

    pub fn embedding(
        &self,
        ids: u64,
        table: u64,
        out: u64,
        tokens: usize,
        width: usize,
    ) -> Result<()> {
        let width = width as i32;
        self.launch(
            &self.kernels().embedding,
            "embedding",
            (tokens as u32, 1),
            1024,
            &[&ids, &table, &out, &width],
        )
    }

    /// `residual += delta` (if delta ≠ 0) then RMSNorm into `out`, over `rows` rows (or the
    /// residual rows listed at `row_index`).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        residual: u64,
        delta: u64,
        row_index: u64,
        weight: u64,
        out: u64,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        // About 8 values per thread, at most NORM_PER_THREAD (16) of 512 threads
        // (kernels/rms_norm.cu).
        let threads = (width.div_ceil(8).div_ceil(32) * 32).clamp(32, 512);
        if width > 16 * threads {
            return Err(Error::Config(format!(
                "hidden size {width} is over the 8192 RMSNorm takes"
            )));
        }
        let width = width as i32;
        self.launch(
            &self.kernels().add_rms_norm,
            "add_rms_norm",
            (rows as u32, 1),
            threads as u32,
            &[&residual, &delta, &row_index, &weight, &out, &width, &eps],
        )
    }

    /// SwiGLU of `rows` packed `[gate | up]` rows (kernels/silu_mul.cu).
    pub fn silu_mul(&self, gate_up: u64, out: u64, rows: usize, width: usize) -> Result<()> {
        let chunks = width.div_ceil(16 / self.dtype.size());
        let grid = (chunks.div_ceil(256) as u32, rows.min(65_535) as u32);
        let (width, rows) = (width as i32, rows as i32);
        self.launch(
            &self.kernels().silu_mul,
            "silu_mul",
            grid,
            256,
            &[&gate_up, &out, &width, &rows],
        )
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)` on [`ProductKernel::for_rows`]`(m)`.
    /// `y` is f32 when `f32_out`, else elems.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        x: u64,
        w: u64,
        bias: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        f32_out: bool,
    ) -> Result<()> {
        self.matmul_on(ProductKernel::for_rows(m), x, w, bias, y, m, n, k, f32_out)
    }

    /// [`Gpu::matmul`] on a given kernel (the GEMV ones take at most GEMV_MAX_ROWS rows).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_on(
        &self,
        kernel: ProductKernel,
        x: u64,
        w: u64,
        bias: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        f32_out: bool,
    ) -> Result<()> {
        if kernel == ProductKernel::Gemv {
            let m = gemv_rows(m)?;
            let (function, name) = if f32_out {
                (&self.kernels().gemv_f32, "gemv_f32")
            } else {
                (&self.kernels().gemv_elem, "gemv_elem")
            };
            let grid = (n as u32, 1);
            let (n, k) = (n as i32, k as i32);
            return self.launch(
                function,
                name,
                grid,
                GEMV_THREADS,
                &[&x, &w, &bias, &y, &m, &n, &k],
            );
        }
        // Row-major Y[m, n] is column-major Yᵀ[n, m] = W[n, k] · Xᵀ[k, m], with row-major W
        // read as column-major Wᵀ (transposed back) and row-major X as column-major Xᵀ.
        let (alpha, beta) = (1.0f32, 0.0f32);
        let out_type =
            if f32_out { blas_sys::cudaDataType::CUDA_R_32F } else { cuda_type(self.dtype) };
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: W holds n·k, X m·k and Y m·n elements of the stated types.
        unsafe {
            blas_result::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                cuda_type(self.dtype),
                k as i32,
                x as *const std::ffi::c_void,
                cuda_type(self.dtype),
                k as i32,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                out_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_error("cublasGemmEx"))?;
        if bias != 0 {
            if f32_out {
                return Err(Error::Internal("a bias on an f32 product is not supported".into()));
            }
            let total = (m * n) as i32;
            let n = n as i32;
            let grid = ((total as usize).div_ceil(256) as u32, 1);
            self.launch(&self.kernels().add_bias, "add_bias", grid, 256, &[&y, &bias, &n, &total])?;
        }
        Ok(())
    }

    /// `act[m, width] = silu(x · W_gateᵀ) ⊙ (x · W_upᵀ)` for a `[gate | up]` weight of
    /// `2·width` rows: one fused GEMV kernel for a single sequence, else cuBLAS's product into
    /// `gate_up` (`m · 2·width` elements) and then SwiGLU.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_product(
        &self,
        x: u64,
        w: u64,
        gate_up: u64,
        act: u64,
        m: usize,
        width: usize,
        k: usize,
    ) -> Result<()> {
        if ProductKernel::for_rows(m) == ProductKernel::Gemv {
            let m = gemv_rows(m)?;
            let (width_i, k) = (width as i32, k as i32);
            return self.launch(
                &self.kernels().gemv_swiglu,
                "gemv_swiglu",
                (width as u32, 1),
                GEMV_THREADS,
                &[&x, &w, &act, &m, &width_i, &k],
            );
        }
        self.matmul_on(ProductKernel::Cublas, x, w, 0, gate_up, m, 2 * width, k, false)?;
        self.silu_mul(gate_up, act, m, width)
    }

    /// Bias, rotary and the K/V cache write after the QKV product (kernels/rope_kv.cu).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_write_kv(
        &self,
        qkv: u64,
        bias: u64,
        q_out: u64,
        k_cache: u64,
        v_cache: u64,
        step: &StepTables,
        shape: &AttentionShape,
        rope: Rope,
    ) -> Result<()> {
        let (freq_len, heads, kv_heads, head_dim) = (
            step.freq_len as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (mode, rot_dim) = match rope {
            Rope::Glm { rotary_dim } => (0i32, rotary_dim as i32),
            Rope::RotateHalf => (1i32, shape.head_dim as i32),
        };
        // Decode steps: a block per head and token, for latency. Prompts: a block per token,
        // so that the chip is not left scheduling tens of thousands of 64-thread blocks.
        let all_heads = shape.num_heads + 2 * shape.num_kv_heads;
        let (groups, threads) =
            if step.tokens >= ROPE_BLOCK_PER_TOKEN_FROM { (1, 256) } else { (all_heads, 64) };
        self.launch(
            &self.kernels().rope_write_kv,
            "rope_write_kv",
            (step.tokens as u32, groups as u32),
            threads,
            &[
                &qkv,
                &bias,
                &q_out,
                &k_cache,
                &v_cache,
                &step.slots,
                &step.cos_sin,
                &freq_len,
                &heads,
                &kv_heads,
                &head_dim,
                &mode,
                &rot_dim,
            ],
        )
    }

    /// Causal attention of every new token over its sequence's cached K/V
    /// (kernels/attention.cu): decode tokens by key splits, prefill tokens by tiles.
    /// `partial` holds the decode splits' results; `split_counters` one zeroed int per
    /// (decode token, head).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: u64,
        k_cache: u64,
        v_cache: u64,
        out: u64,
        partial: u64,
        split_counters: u64,
        step: &StepTables,
        shape: &AttentionShape,
        block_size: usize,
    ) -> Result<()> {
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let (max_blocks, block_size, heads, kv_heads, head_dim) = (
            step.max_blocks_per_seq as i32,
            block_size as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        if step.num_decode > 0 {
            let (partition, splits) = (step.partition as i32, step.splits as i32);
            let kernel = match step.heads_per_block {
                1 => 0,
                2 => 1,
                4 => 2,
                8 => 3,
                other => {
                    return Err(Error::Internal(format!("no decode attention for {other} heads")));
                }
            };
            let head_groups = shape.num_heads / step.heads_per_block;
            let grid = (step.num_decode as u32, head_groups as u32, step.splits as u32);
            let shared = (4 * 32 * shape.head_dim * self.dtype.size()) as u32;
            self.launch_3d(
                &self.kernels().attention_decode[kernel],
                "attention_decode",
                grid,
                128,
                shared,
                &[
                    &q,
                    &k_cache,
                    &v_cache,
                    &out,
                    &partial,
                    &split_counters,
                    &step.decode_rows,
                    &step.token_seq,
                    &step.positions,
                    &step.block_tables,
                    &max_blocks,
                    &block_size,
                    &heads,
                    &kv_heads,
                    &head_dim,
                    &scale,
                    &partition,
                    &splits,
                ],
            )?;
        }
        if step.num_tiles > 0 {
            let grid = (step.num_tiles as u32, shape.num_heads as u32, 1);
            let args: [&dyn Arg; 14] = [
                &q,
                &k_cache,
                &v_cache,
                &out,
                &step.tiles,
                &step.token_seq,
                &step.positions,
                &step.block_tables,
                &max_blocks,
                &block_size,
                &heads,
                &kv_heads,
                &head_dim,
                &scale,
            ];
            match self.mma_prefill(shape.head_dim) {
                Some(function) => {
                    self.launch_3d(function, "attention_prefill_mma", grid, 128, 0, &args)?;
                }
                None => {
                    let d = shape.head_dim;
                    let shared = ((32 * (d + 1) + 32 * d + PREFILL_TILE * d) * 4) as u32;
                    let function = &self.kernels().attention_prefill;
                    self.launch_3d(function, "attention_prefill", grid, 128, shared, &args)?;
                }
            }
        }
        Ok(())
    }

    /// The tensor-core prefill kernel, where it applies (16-bit dtypes, heads a multiple
    /// of 16 wide).
    fn mma_prefill(&self, head_dim: usize) -> Option<&CudaFunction> {
        self.kernels().attention_prefill_mma.as_ref().filter(|_| head_dim.is_multiple_of(16))
    }

    /// Query tokens per prefill attention block for heads of `head_dim`
    /// (MMA_TILE / PREFILL_TILE in kernels/attention*.cu).
    pub fn prefill_tile(&self, head_dim: usize) -> usize {
        if self.mma_prefill(head_dim).is_some() { MMA_TILE } else { PREFILL_TILE }
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

    /// Times `f` with CUDA events after one warm-up call; returns milliseconds per call.
    pub fn time_ms(&self, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let flags = Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(device_error("creating an event"))?;
        let end = self.ctx.new_event(flags).map_err(device_error("creating an event"))?;
        start.record(&self.stream).map_err(device_error("recording an event"))?;
        for _ in 0..repeats {
            f()?;
        }
        end.record(&self.stream).map_err(device_error("recording an event"))?;
        end.synchronize().map_err(device_error("waiting for an event"))?;
        let ms = start.elapsed_ms(&end).map_err(device_error("reading an event"))?;
        Ok(ms as f64 / repeats as f64)
    }

    /// Device memory bandwidth in bytes/s: a device-to-device copy of `bytes`, counting
    /// bytes read plus bytes written (the figure decode speed is held against).
    pub fn measure_bandwidth(&self, bytes: usize) -> Result<f64> {
        let src = self.alloc(bytes)?;
        let mut dst = self.alloc(bytes)?;
        self.fill_uniform(src.ptr(), bytes / self.dtype.size(), 7, 1.0)?;
        let ms = self.time_ms(20, || self.copy(&src, &mut dst, bytes))?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    }

    /// Weight bytes per second the product of `m` rows against an `[n, k]` weight reads on
    /// `kernel`, cycling through enough copies of the weight that none is still in L2 when it
    /// comes round again.
    pub fn measure_matmul_bandwidth(
        &self,
        kernel: ProductKernel,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<f64> {
        let bytes = n * k * self.dtype.size();
        let copies = (256usize << 20).div_ceil(bytes).max(2);
        let weights = (0..copies).map(|_| self.alloc(bytes)).collect::<Result<Vec<Buffer>>>()?;
        for (i, w) in weights.iter().enumerate() {
            self.fill_uniform(w.ptr(), n * k, 10 + i as u64, 0.01)?;
        }
        let x = self.alloc(m * k * self.dtype.size())?;
        self.fill_uniform(x.ptr(), m * k, 3, 1.0)?;
        let y = self.alloc(m * n * self.dtype.size())?;
        let mut next = 0;
        let repeats = 8 * copies;
        let ms = self.time_ms(repeats, || {
            next = (next + 1) % copies;
            self.matmul_on(kernel, x.ptr(), weights[next].ptr(), 0, y.ptr(), m, n, k, false)
        })?;
        Ok(bytes as f64 / (ms * 1e-3))
    }

    /// Matrix throughput in flop/s of this dtype's cuBLAS product at `size`³ on random data
    /// (the figure prefill is held against).
    pub fn measure_matmul(&self, size: usize) -> Result<f64> {
        let elems = size * size;
        let bytes = elems * self.dtype.size();
        let (a, b) = (self.alloc(bytes)?, self.alloc(bytes)?);
        let c = self.alloc(bytes)?;
        self.fill_uniform(a.ptr(), elems, 1, 1.0)?;
        self.fill_uniform(b.ptr(), elems, 2, 1.0)?;
        let ms = self
            .time_ms(10, || self.matmul(a.ptr(), b.ptr(), 0, c.ptr(), size, size, size, false))?;
        Ok(2.0 * (size as f64).powi(3) / (ms * 1e-3))
    }
}

/// A captured sequence of launches (`Gpu::capture`), replayed with one launch. It holds the
/// device addresses it was captured with: its owner drops it when those buffers go.
pub struct Graph(cudarc::driver::CudaGraph);

// SAFETY: CUDA only asks that no two calls on one graph run at once; a Graph is launched
// and dropped through `&`/ownership by the one thread holding its owner's lock.
unsafe impl Send for Graph {}

/// Anything passed to a kernel by value.
trait Arg {
    fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>);
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, builder: &mut cudarc::driver::LaunchArgs<'a>) {
                builder.arg(self);
            }
        }
    )*};
}
kernel_arg!(u64, i64, i32, f32);

/// Attention head counts of a model.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The rotary layouts of the two families (kernels/rope_kv.cu).
#[derive(Clone, Copy, Debug)]
pub enum Rope {
    /// ChatGLM2: interleaved pairs over the first `rotary_dim` dims of each head.
    Glm { rotary_dim: usize },
    /// InternLM2: pairs (i, i + d/2) over the whole head.
    RotateHalf,
}

/// Dynamic shared memory attention_decode may ask for: 4 warps · 32 keys · 128 dims · f32.
const DECODE_MAX_SHARED: usize = 4 * 32 * MAX_HEAD_DIM * 4;
/// Query tokens per block of the CUDA-core prefill attention kernel (PREFILL_TILE).
const PREFILL_TILE: usize = 16;
/// Query tokens per block of the tensor-core prefill attention kernel (MMA_TILE).
const MMA_TILE: usize = 64;
/// The widest head the attention kernels take (decode: 256; prefill: 128).
pub const MAX_HEAD_DIM: usize = 128;

/// Device pointers of one forward call's per-token tables (all within one upload).
pub struct StepTables {
    pub tokens: usize,
    pub positions: u64,
    pub slots: u64,
    pub token_seq: u64,
    /// Per token: cos of each rotary frequency, then sin (`freq_len` each).
    pub cos_sin: u64,
    pub freq_len: usize,
    pub block_tables: u64,
    pub max_blocks_per_seq: usize,
    /// Rows of the tokens that are a sequence's only token in this call (decode).
    pub decode_rows: u64,
    pub num_decode: usize,
    /// Key splits of the decode attention and the keys each covers.
    pub splits: usize,
    pub partition: usize,
    /// Query heads (of one K/V head) a decode attention block takes.
    pub heads_per_block: usize,
    /// (first row, count) pairs of the prefill tiles.
    pub tiles: u64,
    pub num_tiles: usize,
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
}
