//! The GPU measured and checked apart from any model: the ceilings `triton-llm bench` holds
//! its figures against (copy bandwidth, product throughput, the rate products read their
//! weights at) and the sampling kernel on its own, for the GPU tests. The CUDA layer itself
//! (`cuda`) is private to the crate; this is the little of it others may use.

use std::sync::Arc;

use crate::Result;
use crate::cuda::{self, Buffer, Gpu};
use crate::dtype::{DType, KvFormat};
use crate::model::gpu::{decode_layout, decode_layout_with};
use crate::sampling::SampleRow;

pub use crate::cuda::{
    AttentionShape, CUDA_MAJOR, GEMV_MAX_ROWS, ProductKernel, SAMPLE_WORDS, decode_shared_bytes,
    prefill_shared_bytes,
};

/// Whether the CUDA driver, NVRTC and cuBLAS load and a device is present.
pub fn cuda_available() -> bool {
    cuda::available()
}

/// Whether NVRTC alone loads (the kernels compile without a device).
pub fn nvrtc_available() -> bool {
    cuda::nvrtc_available()
}

/// The PTX of every kernel for `dtype` on the virtual architecture `arch`
/// (e.g. `compute_90`).
pub fn compile_kernels(dtype: DType, arch: &'static str) -> Result<String> {
    Ok(cuda::compile(dtype, arch)?.to_src())
}

/// Each kernel of `ptx` (from [`compile_kernels`]) with its number of parameters, or an
/// error naming a kernel with a parameter that no launch can pass: the launches' argument
/// check knows 32- and 64-bit words and f32s only.
pub fn kernel_parameter_counts(ptx: &str) -> Result<Vec<(String, usize)>> {
    let mut kernels = Vec::new();
    for (name, params) in cuda::entry_params(ptx) {
        if let Some(index) = params.iter().position(|&p| p == cuda::Param::Other) {
            return Err(crate::Error::Internal(format!(
                "{name}: parameter {index} is {}",
                cuda::Param::Other.describe()
            )));
        }
        kernels.push((name, params.len()));
    }
    kernels.sort();
    Ok(kernels)
}

/// Decode attention's K/V read rates in bytes/s (`DeviceProbe::decode_attention_bandwidth`).
#[derive(Clone, Debug)]
pub struct DecodeAttentionRates {
    pub tensor_cores: Option<f64>,
    pub cuda_cores: f64,
    pub engine_kernel: &'static str,
    pub engine_heads_per_block: usize,
}

/// A device with the kernels of one dtype.
pub struct DeviceProbe {
    gpu: Arc<Gpu>,
}

impl DeviceProbe {
    pub fn open(ordinal: usize, dtype: DType) -> Result<Self> {
        let gpu = Gpu::open(ordinal, dtype)?;
        gpu.bind()?;
        Ok(DeviceProbe { gpu })
    }

    /// The device's name, as the driver gives it.
    pub fn name(&self) -> &str {
        &self.gpu.name
    }

    /// Copy bandwidth in bytes/s (read plus written) over a buffer of `bytes`.
    pub fn bandwidth(&self, bytes: usize) -> Result<f64> {
        self.gpu.measure_bandwidth(bytes)
    }

    /// Flop/s of this dtype's cuBLAS product at `size`³.
    pub fn matmul_flops(&self, size: usize) -> Result<f64> {
        self.gpu.measure_matmul(size)
    }

    /// Weight bytes/s a product of `m` rows against an `[n, k]` weight reads on `kernel`.
    pub fn product_bandwidth(
        &self,
        kernel: ProductKernel,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<f64> {
        self.gpu.measure_matmul_bandwidth(kernel, m, n, k)
    }

    /// K/V bytes/s the decode attention reads for one token of each of `seqs` sequences of
    /// `context` keys of a model with attention `shape`, K/V in `format`: on the tensor
    /// cores (None where that kernel does not apply), on the CUDA cores (the heads a block
    /// the engine gives them), and on the kernel the engine picks, named.
    pub fn decode_attention_bandwidth(
        &self,
        shape: &AttentionShape,
        format: KvFormat,
        seqs: usize,
        context: usize,
    ) -> Result<DecodeAttentionRates> {
        let mma_heads = self.gpu.mma_decode_heads(shape, format);
        let longest = Some(context);
        let measure =
            |layout| self.gpu.measure_decode_attention(shape, format, seqs, context, layout);
        let tensor_cores = match mma_heads {
            Some(heads) => Some(measure(decode_layout_with(seqs, shape, (heads, true), longest))?),
            None => None,
        };
        let cuda_cores = measure(decode_layout(seqs, shape, None, longest))?;
        let engine = decode_layout(seqs, shape, mma_heads, longest);
        Ok(DecodeAttentionRates {
            tensor_cores,
            cuda_cores,
            engine_kernel: if engine.tensor_cores { "tensor_cores" } else { "cuda_cores" },
            engine_heads_per_block: engine.heads_per_block,
        })
    }

    /// Weight bytes/s the quantised GEMV of `m` rows (≤ GEMV_MAX_ROWS) reads from an
    /// `[n, k]` weight of `bits` (4, groups of 128; or 8), scales included.
    pub fn quantized_product_bandwidth(
        &self,
        bits: u32,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<f64> {
        self.gpu.measure_quant_bandwidth(bits, m, n, k)
    }

    /// The sampling kernel set up as the engine's step sets it up, over one row of f32
    /// `logits` (`stride` wide) for each of `rows`.
    pub fn sampling(
        &self,
        logits: &[f32],
        stride: usize,
        rows: &[Option<SampleRow<'_>>],
    ) -> Result<SamplingProbe<'_>> {
        let words = crate::model::gpu::sampling_words(rows, stride);
        let rows = rows.len();
        Ok(SamplingProbe {
            gpu: &self.gpu,
            logits: self.gpu.upload_bytes(bytemuck::cast_slice(logits))?,
            words: self.gpu.upload_bytes(bytemuck::cast_slice(&words))?,
            chosen: self.gpu.alloc(rows * 4)?,
            stride,
            rows,
        })
    }

    /// Makes the device fail as a kernel fault would (an illegal address: a launch that
    /// reads through a null pointer), for tests of what a lost device does.
    #[cfg(feature = "fault-injection")]
    pub fn lose_device(&self) -> Result<()> {
        self.gpu.read_through_null()?;
        self.gpu.synchronize()
    }
}

/// The sampling kernel over uploaded logits (`DeviceProbe::sampling`).
pub struct SamplingProbe<'a> {
    gpu: &'a Gpu,
    logits: Buffer,
    words: Buffer,
    chosen: Buffer,
    stride: usize,
    rows: usize,
}

impl SamplingProbe<'_> {
    fn launch(&self) -> Result<()> {
        let params = self.rows * SAMPLE_WORDS * 4;
        let penalized = self.words.range(params, self.words.bytes().saturating_sub(params))?;
        self.gpu.sample_rows(
            self.logits.view(),
            self.stride,
            self.words.range(0, params)?,
            penalized,
            self.chosen.view(),
            self.rows,
        )
    }

    /// Each row's chosen id. The kernel changes the logits in place (guard, penalty), as
    /// the engine's step does.
    pub fn choose(&self) -> Result<Vec<u32>> {
        self.launch()?;
        self.gpu.read_u32(&self.chosen, self.rows)
    }

    /// Milliseconds per launch over `repeats` launches.
    pub fn time_ms(&self, repeats: usize) -> Result<f64> {
        self.gpu.time_ms(repeats, || self.launch())
    }
}
