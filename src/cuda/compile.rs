//! The kernels of `kernels/*.cu`, compiled with NVRTC into one module per device and dtype.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, sys as driver_sys};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::kernel_cache;
use super::launch::DECODE_MAX_SHARED;
use super::libs::{self, CudaLibrary};
use super::signature::{self, Param};
use super::{device_count, device_error};
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

/// The kernel sources, in the order they are concatenated into one module.
const SOURCES: [(&str, &str); 11] = [
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("embedding.cu", include_str!("../../kernels/embedding.cu")),
    ("rms_norm.cu", include_str!("../../kernels/rms_norm.cu")),
    ("gemv.cu", include_str!("../../kernels/gemv.cu")),
    ("gemv_quant.cu", include_str!("../../kernels/gemv_quant.cu")),
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

/// NVRTC's flags besides the architecture: all that decides the PTX with the source (the
/// kernel cache's key). No fast math (NVRTC's default).
fn nvrtc_flags(dtype: DType) -> [&'static str; 2] {
    [dtype_define(dtype), "--std=c++17"]
}

/// Compiles every kernel for `dtype` to PTX for a virtual architecture such as
/// `compute_90` (the driver finishes it for the exact device at module load).
pub fn compile(dtype: DType, arch: &'static str) -> Result<Ptx> {
    let options = CompileOptions {
        arch: Some(arch),
        options: nvrtc_flags(dtype).map(String::from).to_vec(),
        ..Default::default()
    };
    libs::check(CudaLibrary::Nvrtc)?;
    std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(module_source(), options))
        .map_err(|_| Error::Device("NVRTC (libnvrtc) could not be loaded".into()))?
        .map_err(|e| Error::Device(format!("compiling kernels/*.cu for {arch}: {e}")))
}

/// [`compile`] through the kernel cache in `folder` (`kernel_cache`): the PTX an earlier
/// process kept for the same source, NVRTC, architecture and dtype, else compiled and kept.
/// Also says whether it came from the cache.
fn compile_cached(dtype: DType, arch: &'static str, folder: Option<&Path>) -> Result<(Ptx, bool)> {
    libs::check(CudaLibrary::Nvrtc)?;
    let Some(folder) = folder else { return Ok((compile(dtype, arch)?, false)) };
    let (major, minor) = libs::version(CudaLibrary::Nvrtc).unwrap_or_default();
    let options = format!("{arch} nvrtc {major}.{minor} {}", nvrtc_flags(dtype).join(" "));
    let entry = kernel_cache::Entry::new(folder, &module_source(), &options);
    if let Some(ptx) = entry.read() {
        return Ok((Ptx::from_src(ptx), true));
    }
    let ptx = compile(dtype, arch)?;
    entry.write(&ptx.to_src());
    Ok((ptx, false))
}

fn virtual_arch(major: i32, minor: i32) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    names
        .entry((major, minor))
        .or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

/// A kernel of the module: its function, and its name and parameters for the launches'
/// errors and checks.
pub(super) struct Kernel {
    pub(super) function: CudaFunction,
    pub(super) name: String,
    pub(super) params: Vec<Param>,
}

/// The kernels of one module.
pub(super) struct Kernels {
    pub(super) embedding: Kernel,
    pub(super) add_rms_norm: Kernel,
    pub(super) silu_mul: Kernel,
    pub(super) fill_uniform: Kernel,
    pub(super) gemv_elem: Kernel,
    pub(super) gemv_f32: Kernel,
    pub(super) gemv_swiglu: Kernel,
    pub(super) gemv_qkv_rope: Kernel,
    pub(super) gemv_split_k: Kernel,
    /// Products with W4 and W8 weights (kernels/gemv_quant.cu), fused SwiGLU, dequantisation.
    pub(super) gemv_w4: Kernel,
    pub(super) gemv_w8: Kernel,
    pub(super) gemv_w4_swiglu: Kernel,
    pub(super) gemv_w8_swiglu: Kernel,
    pub(super) dequant_w4: Kernel,
    pub(super) dequant_w8: Kernel,
    /// FP8: activations per token to E4M3, the E4M3 GEMV, the weight's E4M3 values for
    /// cuBLAS, and the scales after it.
    pub(super) quantize_rows_e4m3: Kernel,
    pub(super) quantize_rows_e4m3_bytes: Kernel,
    pub(super) gemv_fp8: Kernel,
    /// The E4M3 GEMV on the tensor cores (modules for sm_89 and later only).
    pub(super) gemv_fp8_mma: Option<Kernel>,
    pub(super) dequant_fp8: Kernel,
    pub(super) fp8_scale: Kernel,
    pub(super) add_bias: Kernel,
    pub(super) rope_write_kv: Kernel,
    /// By KV format (`kv_format_index`: elems, int8, int4, fp8),
    /// attention_decode[_int8|_int4|_fp8]_h1, _h2, _h4, _h8: query heads a block takes.
    pub(super) attention_decode: [[Kernel; 4]; 4],
    /// By KV format: attention_prefill[_int8|_int4|_fp8].
    pub(super) attention_prefill: [Kernel; 4],
    /// The tensor-core prefill and decode (bf16 and f16 modules only); the decode by KV
    /// format, attention_decode_mma[_int8|_int4|_fp8].
    pub(super) attention_prefill_mma: Option<Kernel>,
    pub(super) attention_decode_mma: Option<[Kernel; 4]>,
    pub(super) sample_rows: Kernel,
}

impl Kernels {
    fn load(
        module: &Arc<CudaModule>,
        ptx: &str,
        dtype: DType,
        (major, minor): (i32, i32),
    ) -> Result<Self> {
        let mut params = signature::entry_params(ptx);
        let mut f = |name: &str| -> Result<Kernel> {
            let function = module.load_function(name).map_err(device_error(name))?;
            let params = params.remove(name).ok_or_else(|| {
                Error::Device(format!("{name}: no such entry in the compiled kernels' PTX"))
            })?;
            Ok(Kernel { function, name: name.to_string(), params })
        };
        let mut decode = |format: &str, heads: usize| -> Result<Kernel> {
            let name = format!("attention_decode{format}_h{heads}");
            let kernel = f(&name)?;
            // Its V staging takes up to 4 warps · 32 keys · 128 dims · 4 bytes (f32): over
            // the 48 KiB a kernel gets without asking.
            kernel
                .function
                .set_attribute(
                    driver_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    DECODE_MAX_SHARED as i32,
                )
                .map_err(device_error(&format!("{name} shared memory")))?;
            Ok(kernel)
        };
        let mut decode_all = |format: &str| -> Result<[Kernel; 4]> {
            Ok([decode(format, 1)?, decode(format, 2)?, decode(format, 4)?, decode(format, 8)?])
        };
        let attention_decode =
            [decode_all("")?, decode_all("_int8")?, decode_all("_int4")?, decode_all("_fp8")?];
        Ok(Kernels {
            embedding: f("embedding")?,
            add_rms_norm: f("add_rms_norm")?,
            silu_mul: f("silu_mul")?,
            fill_uniform: f("fill_uniform")?,
            gemv_elem: f("gemv_elem")?,
            gemv_f32: f("gemv_f32")?,
            gemv_swiglu: f("gemv_swiglu")?,
            gemv_qkv_rope: f("gemv_qkv_rope")?,
            gemv_split_k: f("gemv_split_k")?,
            gemv_w4: f("gemv_w4")?,
            gemv_w8: f("gemv_w8")?,
            gemv_w4_swiglu: f("gemv_w4_swiglu")?,
            gemv_w8_swiglu: f("gemv_w8_swiglu")?,
            dequant_w4: f("dequant_w4")?,
            dequant_w8: f("dequant_w8")?,
            quantize_rows_e4m3: f("quantize_rows_e4m3")?,
            quantize_rows_e4m3_bytes: f("quantize_rows_e4m3_bytes")?,
            gemv_fp8: f("gemv_fp8")?,
            gemv_fp8_mma: if (major, minor) >= (8, 9) { Some(f("gemv_fp8_mma")?) } else { None },
            dequant_fp8: f("dequant_fp8")?,
            fp8_scale: f("fp8_scale")?,
            add_bias: f("add_bias")?,
            rope_write_kv: f("rope_write_kv")?,
            attention_decode,
            attention_prefill: [
                f("attention_prefill")?,
                f("attention_prefill_int8")?,
                f("attention_prefill_int4")?,
                f("attention_prefill_fp8")?,
            ],
            attention_prefill_mma: match dtype {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some(f("attention_prefill_mma")?),
            },
            attention_decode_mma: match dtype {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some([
                    f("attention_decode_mma")?,
                    f("attention_decode_mma_int8")?,
                    f("attention_decode_mma_int4")?,
                    f("attention_decode_mma_fp8")?,
                ]),
            },
            sample_rows: f("sample_rows")?,
        })
    }
}

/// A device's context and the kernels compiled for it in one dtype, shared by every
/// [`Gpu`](super::Gpu) opened on that device and dtype.
pub(super) struct Compiled {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) kernels: Kernels,
    pub(super) name: String,
    /// Programmatic dependent launch: sm_90 on (kernel_entry in kernels/common.cuh) and a
    /// driver that keeps it in graphs (CUDA 12.3 on).
    pub(super) programmatic_launch: bool,
}

impl Compiled {
    pub(super) fn create(ordinal: usize, dtype: DType) -> Result<Compiled> {
        // Before anything calls them through bindings of one CUDA major version.
        libs::check(CudaLibrary::Nvrtc)?;
        libs::check(CudaLibrary::Cublas)?;
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
        let mut driver_version = 0;
        // SAFETY: writes one int; the driver is loaded (a context was just created).
        unsafe { driver_sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(device_error("reading the driver version"))?;
        libs::check_driver(driver_version)?;
        // Each buffer is used on the stream of the Gpu that made it only: cudarc's
        // per-buffer event tracking (for buffers shared across streams) would only add two
        // event calls per kernel argument.
        // SAFETY: as above; buffers never cross from one Gpu to another.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) =
            ctx.compute_capability().map_err(device_error("reading the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let started = std::time::Instant::now();
        let cache = kernel_cache::folder();
        let (ptx, cached) = compile_cached(dtype, virtual_arch(major, minor), cache.as_deref())?;
        let source = ptx.to_src();
        let module = ctx.load_module(ptx).map_err(device_error("loading the kernel module"))?;
        let kernels = Kernels::load(&module, &source, dtype, (major, minor))?;
        tracing::info!(
            "GPU {ordinal} ({name}, sm_{major}{minor}): kernels for {} {} in {:.2} s",
            dtype.name(),
            match (&cache, cached) {
                (Some(folder), true) => format!("read from the cache in {}", folder.display()),
                (Some(folder), false) => format!("compiled (kept in {})", folder.display()),
                (None, _) => "compiled (no kernel cache)".to_string(),
            },
            started.elapsed().as_secs_f64()
        );
        let programmatic_launch = major >= 9 && driver_version >= 12030;
        Ok(Compiled { ctx, kernels, name, programmatic_launch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_kept_in_the_cache_are_read_back_as_compiled() {
        if !super::super::nvrtc_available() {
            eprintln!("kernels_kept_in_the_cache_are_read_back_as_compiled: skipped (no NVRTC)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (compiled, cached) =
            compile_cached(DType::F32, "compute_80", Some(dir.path())).unwrap();
        assert!(!cached);
        let started = std::time::Instant::now();
        let (read, cached) = compile_cached(DType::F32, "compute_80", Some(dir.path())).unwrap();
        assert!(cached, "a second load reads the kept PTX");
        assert_eq!(read.to_src(), compiled.to_src());
        assert!(started.elapsed().as_secs_f64() < 1.0, "{:?}", started.elapsed());
        // Another dtype or architecture is another entry.
        let (_, cached) = compile_cached(DType::F32, "compute_90", Some(dir.path())).unwrap();
        assert!(!cached);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // No folder: compiled each time.
        assert!(!compile_cached(DType::F32, "compute_80", None).unwrap().1);
    }
}
