//! Matrix products: our GEMV kernel for a few rows, cuBLAS above; the cuBLAS handle's
//! stream and workspace.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaStream, DevicePtr};

use super::launch::{Arg, AttentionShape, Rope, StepTables, bytes};
use super::{Gpu, View, blas_error};
use crate::dtype::{DType, KvFormat};
use crate::{Error, Result};

fn cuda_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
    }
}

/// Rows the GEMV kernels take at most (GEMV_MAX_ROWS in kernels/gemv.cu).
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows up to which the engine's products run on the GEMV kernel; above, cuBLAS, which reads
/// the weights faster from two rows on (`triton-llm bench` times both; BENCHMARKS.md, "Small
/// batches").
pub const GEMV_UP_TO_ROWS: usize = 1;
/// Threads of a GEMV block (GEMV_THREADS in kernels/gemv.cu).
const GEMV_THREADS: u32 = 128;
/// Warps of a tensor-core E4M3 GEMV block (FP8_MMA_WARPS in kernels/gemv_quant.cu).
const FP8_MMA_WARPS: u32 = 8;

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
    /// Ours, a block per row of W (up to GEMV_MAX_ROWS rows of x), rows much longer than
    /// GEMV_SPLIT_LENGTH split over several blocks (`gemv_splits`).
    Gemv,
    /// The GEMV with every row in one block (for `triton-llm bench` to hold the split
    /// against; the engine never picks it).
    GemvWhole,
    Cublas,
}

/// Elems of a row a GEMV block takes at most before the row is split over blocks: the
/// length of most decode products' rows (hidden sizes of 4,096), whose blocks drain in step.
const GEMV_SPLIT_LENGTH: usize = 4096;
/// Most splits of a row.
const GEMV_MAX_SPLITS: usize = 4;
/// Widest product the split-K GEMV takes (its counters).
const SPLIT_K_COLUMNS: usize = 16384;
/// Partial sums the split-K scratch holds: every split of GEMV_MAX_ROWS rows at the widest.
const SPLIT_K_FLOATS: usize = GEMV_MAX_SPLITS * GEMV_MAX_ROWS * SPLIT_K_COLUMNS;
/// Bytes of the split-K scratch: the partial sums, then the counters.
pub(super) const SPLIT_K_BYTES: usize = (SPLIT_K_FLOATS + SPLIT_K_COLUMNS) * 4;

/// Splits of each row for the GEMV of `m` rows into `n` elem columns over `k` inputs of
/// `elem` bytes: rows past GEMV_SPLIT_LENGTH go in that many splits of whole 16-byte chunks,
/// where the scratch holds them; others in one.
fn gemv_splits(m: usize, n: usize, k: usize, elem: usize) -> usize {
    let splits = k.div_ceil(GEMV_SPLIT_LENGTH).min(GEMV_MAX_SPLITS);
    let fits = n <= SPLIT_K_COLUMNS && splits * m * n <= SPLIT_K_FLOATS;
    if splits > 1 && fits && (k * elem).is_multiple_of(16) { splits } else { 1 }
}

impl ProductKernel {
    /// The kernel the engine runs a product of `m` rows on.
    pub fn for_rows(m: usize) -> ProductKernel {
        if m <= GEMV_UP_TO_ROWS { ProductKernel::Gemv } else { ProductKernel::Cublas }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProductKernel::Gemv => "gemv",
            ProductKernel::GemvWhole => "gemv_whole_rows",
            ProductKernel::Cublas => "cublas",
        }
    }
}

/// A weight `[n, k]` as the products take it: elems, or quantised in one of
/// kernels/gemv_quant.cu's layouts.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    Dense(View<'a>),
    /// 4-bit levels 8 to a word in k order, an (f16 scale, f16 zero) word per row and group.
    W4 {
        packed: View<'a>,
        params: View<'a>,
        group: usize,
    },
    /// int8 levels in k order, an f32 scale per row.
    W8 {
        packed: View<'a>,
        scales: View<'a>,
    },
    /// E4M3 bytes in k order and an f32 scale per row, with where the product puts the
    /// activations quantised per token (elems, and an f32 scale each), from the call's
    /// scratch.
    Fp8 {
        packed: View<'a>,
        scales: View<'a>,
        activations: Option<(View<'a>, View<'a>)>,
    },
}

impl WeightView<'_> {
    /// Checks the views hold an `[n, k]` weight of this kind (the kernels' layout limits
    /// included).
    fn check(&self, n: usize, k: usize, elem: usize) -> Result<()> {
        match *self {
            WeightView::Dense(w) => w.check("product weight", bytes(&[n, k, elem])),
            WeightView::W4 { packed, params, group } => {
                if group == 0 || !group.is_multiple_of(32) || !k.is_multiple_of(group) {
                    return Err(Error::Config(format!(
                        "4-bit weights on the GPU need groups of a multiple of 32 inputs that \
                         divide the {k} inputs (group {group})"
                    )));
                }
                packed.check("4-bit weight", bytes(&[n, k / 2]))?;
                params.check("4-bit scales and zeros", bytes(&[n, k / group, 4]))
            }
            WeightView::W8 { packed, scales } | WeightView::Fp8 { packed, scales, .. } => {
                if !k.is_multiple_of(16) {
                    return Err(Error::Config(format!(
                        "8-bit weights on the GPU need a multiple of 16 inputs, not {k}"
                    )));
                }
                packed.check("8-bit weight", bytes(&[n, k]))?;
                scales.check("8-bit scales", bytes(&[n, 4]))
            }
        }
    }
}

/// Bytes of cuBLAS workspace per handle (its default on Hopper).
pub(super) const BLAS_WORKSPACE: usize = 32 << 20;

impl Gpu {
    /// Gives the handle this Gpu's workspace (again after each stream change, which resets
    /// it to cuBLAS's own pool).
    pub(super) fn set_blas_workspace(&self, blas: &CudaBlas) -> Result<()> {
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
    pub(super) fn bind_blas(&self, blas: &mut CudaBlas, stream: &Arc<CudaStream>) -> Result<()> {
        // SAFETY: the handle is used under its lock; both streams belong to this context.
        unsafe { blas.set_stream(Arc::clone(stream)) }
            .map_err(blas_error("setting the cuBLAS stream"))?;
        self.set_blas_workspace(blas)
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)` on [`ProductKernel::for_rows`]`(m)`.
    /// `y` is f32 when `f32_out`, else elems.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        x: View<'_>,
        w: View<'_>,
        bias: Option<View<'_>>,
        y: View<'_>,
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
        x: View<'_>,
        w: View<'_>,
        bias: Option<View<'_>>,
        y: View<'_>,
        m: usize,
        n: usize,
        k: usize,
        f32_out: bool,
    ) -> Result<()> {
        let e = self.dtype.size();
        x.check("product input", bytes(&[m, k, e]))?;
        w.check("product weight", bytes(&[n, k, e]))?;
        y.check("product out", bytes(&[m, n, if f32_out { 4 } else { e }]))?;
        if let Some(bias) = bias {
            bias.check("product bias", bytes(&[n, e]))?;
        }
        let splits = match kernel {
            ProductKernel::Gemv if !f32_out => gemv_splits(m, n, k, e),
            _ => 1,
        };
        if splits > 1 {
            let m_i = gemv_rows(m)?;
            let partials = self.split_k.range(0, SPLIT_K_FLOATS * 4)?;
            let counters = self.split_k.range(SPLIT_K_FLOATS * 4, SPLIT_K_COLUMNS * 4)?;
            let grid = (n as u32, splits as u32);
            let (n, k) = (n as i32, k as i32);
            let args: [&dyn Arg; 9] = [&x, &w, &bias, &y, &partials, &counters, &m_i, &n, &k];
            return self.launch(&self.kernels().gemv_split_k, grid, GEMV_THREADS, &args);
        }
        if matches!(kernel, ProductKernel::Gemv | ProductKernel::GemvWhole) {
            let m = gemv_rows(m)?;
            let function =
                if f32_out { &self.kernels().gemv_f32 } else { &self.kernels().gemv_elem };
            let grid = (n as u32, 1);
            let (n, k) = (n as i32, k as i32);
            return self.launch(function, grid, GEMV_THREADS, &[&x, &w, &bias, &y, &m, &n, &k]);
        }
        // Row-major Y[m, n] is column-major Yᵀ[n, m] = W[n, k] · Xᵀ[k, m], with row-major W
        // read as column-major Wᵀ (transposed back) and row-major X as column-major Xᵀ.
        let (alpha, beta) = (1.0f32, 0.0f32);
        let out_type =
            if f32_out { blas_sys::cudaDataType::CUDA_R_32F } else { cuda_type(self.dtype) };
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the views were checked above to hold W's n·k, X's m·k and Y's m·n
        // elements of the stated types; cuBLAS queues on this Gpu's stream, in order with
        // the launches that fill and read them.
        unsafe {
            blas_result::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w.ptr() as *const std::ffi::c_void,
                cuda_type(self.dtype),
                k as i32,
                x.ptr() as *const std::ffi::c_void,
                cuda_type(self.dtype),
                k as i32,
                (&beta as *const f32).cast(),
                y.ptr() as *mut std::ffi::c_void,
                out_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_error("cublasGemmEx"))?;
        if let Some(bias) = bias {
            if f32_out {
                return Err(Error::Internal("a bias on an f32 product is not supported".into()));
            }
            let total = (m * n) as i32;
            let n = n as i32;
            let grid = ((total as usize).div_ceil(256) as u32, 1);
            self.launch(&self.kernels().add_bias, grid, 256, &[&y, &bias, &n, &total])?;
        }
        Ok(())
    }

    /// `act[m, width] = silu(x · W_gateᵀ) ⊙ (x · W_upᵀ)` for a `[gate | up]` weight of
    /// `2·width` rows: one fused GEMV kernel for a single sequence, else cuBLAS's product into
    /// `gate_up` (`m · 2·width` elements) and then SwiGLU.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_product(
        &self,
        x: View<'_>,
        w: View<'_>,
        gate_up: View<'_>,
        act: View<'_>,
        m: usize,
        width: usize,
        k: usize,
    ) -> Result<()> {
        if ProductKernel::for_rows(m) == ProductKernel::Gemv {
            let e = self.dtype.size();
            x.check("SwiGLU product input", bytes(&[m, k, e]))?;
            w.check("SwiGLU product weight", bytes(&[2 * width, k, e]))?;
            act.check("SwiGLU product out", bytes(&[m, width, e]))?;
            let m = gemv_rows(m)?;
            let (width_i, k) = (width as i32, k as i32);
            return self.launch(
                &self.kernels().gemv_swiglu,
                (width as u32, 1),
                GEMV_THREADS,
                &[&x, &w, &act, &m, &width_i, &k],
            );
        }
        self.matmul_on(ProductKernel::Cublas, x, w, None, gate_up, m, 2 * width, k, false)?;
        self.silu_mul(gate_up, act, m, width)
    }

    /// Whether `qkv_rope_product` takes the QKV product of `m` rows of a `w` over a cache in
    /// `format`: a single sequence's dense product (the GEMV's rows) over K/V in the
    /// model's dtype, heads of pairs.
    pub fn qkv_rope_applies(
        &self,
        m: usize,
        w: WeightView<'_>,
        format: KvFormat,
        shape: &AttentionShape,
    ) -> bool {
        ProductKernel::for_rows(m) == ProductKernel::Gemv
            && matches!(w, WeightView::Dense(_))
            && format == KvFormat::Model
            && shape.head_dim.is_multiple_of(2)
    }

    /// The QKV product of a single sequence's decode step with `rope_write_kv`'s work in its
    /// epilogue (kernels/rope_kv.cu, `gemv_qkv_rope`): the same q, K and V bits as
    /// `product` then `rope_write_kv`, one launch fewer. Only where `qkv_rope_applies`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_product(
        &self,
        x: View<'_>,
        w: View<'_>,
        bias: Option<View<'_>>,
        q_out: View<'_>,
        (k_cache, v_cache): (View<'_>, View<'_>),
        step: &StepTables<'_>,
        shape: &AttentionShape,
        (rope, k): (Rope, usize),
    ) -> Result<()> {
        let e = self.dtype.size();
        let (m, d) = (step.tokens, shape.head_dim);
        let (q_width, kv_width) = (shape.num_heads * d, shape.num_kv_heads * d);
        let n = q_width + 2 * kv_width;
        if !self.qkv_rope_applies(m, WeightView::Dense(w), KvFormat::Model, shape) {
            return Err(Error::Internal(format!(
                "the fused QKV product takes a single sequence's dense product, not {m} rows"
            )));
        }
        x.check("QKV product input", bytes(&[m, k, e]))?;
        w.check("QKV product weight", bytes(&[n, k, e]))?;
        if let Some(bias) = bias {
            bias.check("QKV product bias", bytes(&[n, e]))?;
        }
        q_out.check("QKV product queries", bytes(&[m, q_width, e]))?;
        let kv_block = bytes(&[step.block_size, kv_width, e]);
        k_cache.check("QKV product K cache", kv_block)?;
        v_cache.check("QKV product V cache", kv_block)?;
        step.check()?;
        let (mode, rot_dim) = rope.kernel_args(d);
        let rows = gemv_rows(m)?;
        let (freq_len, heads, kv_heads, head_dim, k) = (
            step.freq_len as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            d as i32,
            k as i32,
        );
        self.launch(
            &self.kernels().gemv_qkv_rope,
            ((n / 2) as u32, 1),
            GEMV_THREADS,
            &[
                &x,
                &w,
                &bias,
                &q_out,
                &k_cache,
                &v_cache,
                &step.slots,
                &step.cos_sin,
                &freq_len,
                &rows,
                &heads,
                &kv_heads,
                &head_dim,
                &mode,
                &rot_dim,
                &k,
            ],
        )
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)` (elems) for a dense or quantised `w`. Up
    /// to GEMV_MAX_ROWS rows a quantised weight is read once by the quantised GEMV;
    /// more dequantise it into `scratch` (`n · k` elems) for cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        x: View<'_>,
        w: WeightView<'_>,
        bias: Option<View<'_>>,
        y: View<'_>,
        m: usize,
        n: usize,
        k: usize,
        scratch: Option<View<'_>>,
    ) -> Result<()> {
        let dense = match w {
            WeightView::Dense(w) => return self.matmul(x, w, bias, y, m, n, k, false),
            WeightView::Fp8 { .. } => return self.fp8_product(x, w, bias, y, m, n, k, scratch),
            _ if m <= GEMV_MAX_ROWS => return self.quant_gemv(x, w, bias, y, m, n, k),
            _ => self.dequantize(w, n, k, scratch)?,
        };
        self.matmul_on(ProductKernel::Cublas, x, dense, bias, y, m, n, k, false)
    }

    /// The FP8 product (`cpu::fp8`): the rows of `x` quantised per token, then the E4M3 GEMV
    /// up to GEMV_MAX_ROWS rows (on the tensor cores from sm_89, in 16-bit dtypes, k a
    /// multiple of 64); for more, cuBLASLt's FP8 product over the E4M3 bytes (16-bit
    /// dtypes, where it loads and has an algorithm), else cuBLAS over the weight's E4M3
    /// values (dequantised into `scratch`); then the scales.
    #[allow(clippy::too_many_arguments)]
    fn fp8_product(
        &self,
        x: View<'_>,
        w: WeightView<'_>,
        bias: Option<View<'_>>,
        y: View<'_>,
        m: usize,
        n: usize,
        k: usize,
        scratch: Option<View<'_>>,
    ) -> Result<()> {
        let WeightView::Fp8 { packed, scales, activations } = w else {
            return Err(Error::Internal("fp8_product of another weight".into()));
        };
        let (rows, row_scales) = activations.ok_or_else(|| {
            Error::Internal("an FP8 product needs scratch for its quantised activations".into())
        })?;
        let e = self.dtype.size();
        w.check(n, k, e)?;
        y.check("product out", bytes(&[m, n, e]))?;
        if let Some(bias) = bias {
            bias.check("product bias", bytes(&[n, e]))?;
        }
        let (n_i, k_i) = (n as i32, k as i32);
        let scale_args: [&dyn Arg; 5] = [&y, &row_scales, &scales, &bias, &n_i];
        let scale_grid = (n.div_ceil(256) as u32, m as u32);
        if m > GEMV_MAX_ROWS
            && let Some(blaslt) = self.blaslt()
        {
            // The rows as E4M3 bytes (in the first m·k bytes of their scratch) for cuBLASLt.
            self.quantize_rows(x, rows, row_scales, m, k, true)?;
            let stream = self.launch_stream().cu_stream();
            let workspace = self.workspace_view();
            let mut blaslt = blaslt.lock().unwrap_or_else(|p| p.into_inner());
            if blaslt.fp8_matmul(packed, rows, y, (m, n, k), workspace, stream)? {
                let function = &self.kernels().fp8_scale;
                return self.launch(function, scale_grid, 256, &scale_args);
            }
        }
        if m <= GEMV_MAX_ROWS
            && self.dtype != DType::F32
            && k.is_multiple_of(64)
            && let Some(function) = &self.kernels().gemv_fp8_mma
        {
            // The E4M3 GEMV on the tensor cores, over the activations' E4M3 bytes.
            self.quantize_rows(x, rows, row_scales, m, k, true)?;
            let m_i = gemv_rows(m)?;
            let args: [&dyn Arg; 9] =
                [&packed, &scales, &rows, &row_scales, &bias, &y, &m_i, &n_i, &k_i];
            let grid = (n.div_ceil(16) as u32, 1);
            return self.launch(function, grid, 32 * FP8_MMA_WARPS, &args);
        }
        self.quantize_rows(x, rows, row_scales, m, k, false)?;
        if m <= GEMV_MAX_ROWS {
            let m_i = gemv_rows(m)?;
            let args: [&dyn Arg; 9] =
                [&packed, &scales, &rows, &row_scales, &bias, &y, &m_i, &n_i, &k_i];
            return self.launch(&self.kernels().gemv_fp8, (n as u32, 1), GEMV_THREADS, &args);
        }
        let values = self.dequantize(w, n, k, scratch)?;
        self.matmul_on(ProductKernel::Cublas, rows, values, None, y, m, n, k, false)?;
        self.launch(&self.kernels().fp8_scale, scale_grid, 256, &scale_args)
    }

    /// Activations per token to E4M3 values in `rows` (as elems, or as the E4M3 bytes
    /// themselves when `as_bytes`) and each row's scale.
    fn quantize_rows(
        &self,
        x: View<'_>,
        rows: View<'_>,
        row_scales: View<'_>,
        m: usize,
        k: usize,
        as_bytes: bool,
    ) -> Result<()> {
        let e = self.dtype.size();
        x.check("fp8 product input", bytes(&[m, k, e]))?;
        rows.check("fp8 activations", bytes(&[m, k, e]))?;
        row_scales.check("fp8 activation scales", bytes(&[m, 4]))?;
        if m > 65_535 {
            return Err(Error::Internal(format!("{m} rows exceed one launch's grid")));
        }
        let k_i = k as i32;
        let args: [&dyn Arg; 4] = [&x, &rows, &row_scales, &k_i];
        let function = if as_bytes {
            &self.kernels().quantize_rows_e4m3_bytes
        } else {
            &self.kernels().quantize_rows_e4m3
        };
        self.launch(function, (m as u32, 1), 256, &args)
    }

    /// [`Gpu::swiglu_product`] for a dense or quantised `[gate | up]` weight (`scratch` as
    /// in [`Gpu::product`], `2·width · k` elems).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_product_any(
        &self,
        x: View<'_>,
        w: WeightView<'_>,
        gate_up: View<'_>,
        act: View<'_>,
        m: usize,
        width: usize,
        k: usize,
        scratch: Option<View<'_>>,
    ) -> Result<()> {
        let dense = match w {
            WeightView::Dense(w) => return self.swiglu_product(x, w, gate_up, act, m, width, k),
            WeightView::Fp8 { .. } => {
                // `[gate | up]` as one FP8 product (each rounded to elem), then SwiGLU, as the
                // unfused path does.
                self.fp8_product(x, w, None, gate_up, m, 2 * width, k, scratch)?;
                return self.silu_mul(gate_up, act, m, width);
            }
            _ if m <= GEMV_MAX_ROWS => return self.quant_gemv_swiglu(x, w, act, m, width, k),
            _ => self.dequantize(w, 2 * width, k, scratch)?,
        };
        self.matmul_on(ProductKernel::Cublas, x, dense, None, gate_up, m, 2 * width, k, false)?;
        self.silu_mul(gate_up, act, m, width)
    }

    #[allow(clippy::too_many_arguments)]
    fn quant_gemv(
        &self,
        x: View<'_>,
        w: WeightView<'_>,
        bias: Option<View<'_>>,
        y: View<'_>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let e = self.dtype.size();
        w.check(n, k, e)?;
        x.check("product input", bytes(&[m, k, e]))?;
        y.check("product out", bytes(&[m, n, e]))?;
        if let Some(bias) = bias {
            bias.check("product bias", bytes(&[n, e]))?;
        }
        let m = gemv_rows(m)?;
        let grid = (n as u32, 1);
        let (n, k) = (n as i32, k as i32);
        match w {
            WeightView::W4 { packed, params, group } => {
                let group = group as i32;
                let args: [&dyn Arg; 9] = [&packed, &params, &x, &bias, &y, &m, &n, &k, &group];
                self.launch(&self.kernels().gemv_w4, grid, GEMV_THREADS, &args)
            }
            WeightView::W8 { packed, scales } => {
                let args: [&dyn Arg; 8] = [&packed, &scales, &x, &bias, &y, &m, &n, &k];
                self.launch(&self.kernels().gemv_w8, grid, GEMV_THREADS, &args)
            }
            WeightView::Dense(_) | WeightView::Fp8 { .. } => {
                Err(Error::Internal("a dense or FP8 weight in quant_gemv".into()))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn quant_gemv_swiglu(
        &self,
        x: View<'_>,
        w: WeightView<'_>,
        act: View<'_>,
        m: usize,
        width: usize,
        k: usize,
    ) -> Result<()> {
        let e = self.dtype.size();
        w.check(2 * width, k, e)?;
        x.check("SwiGLU product input", bytes(&[m, k, e]))?;
        act.check("SwiGLU product out", bytes(&[m, width, e]))?;
        let m = gemv_rows(m)?;
        let grid = (width as u32, 1);
        let (width, k) = (width as i32, k as i32);
        match w {
            WeightView::W4 { packed, params, group } => {
                let group = group as i32;
                let args: [&dyn Arg; 8] = [&packed, &params, &x, &act, &m, &width, &k, &group];
                let function = &self.kernels().gemv_w4_swiglu;
                self.launch(function, grid, GEMV_THREADS, &args)
            }
            WeightView::W8 { packed, scales } => {
                let args: [&dyn Arg; 7] = [&packed, &scales, &x, &act, &m, &width, &k];
                let function = &self.kernels().gemv_w8_swiglu;
                self.launch(function, grid, GEMV_THREADS, &args)
            }
            WeightView::Dense(_) | WeightView::Fp8 { .. } => {
                Err(Error::Internal("a dense or FP8 weight in quant_gemv_swiglu".into()))
            }
        }
    }

    /// A quantised `[n, k]` weight as elems in `scratch` (returned as the view to read).
    fn dequantize<'s>(
        &self,
        w: WeightView<'_>,
        n: usize,
        k: usize,
        scratch: Option<View<'s>>,
    ) -> Result<View<'s>> {
        let e = self.dtype.size();
        w.check(n, k, e)?;
        let out = scratch.ok_or_else(|| {
            Error::Internal("a quantised product of many rows needs a dequantisation buffer".into())
        })?;
        out.check("dequantised weight", bytes(&[n, k, e]))?;
        let k_i = k as i32;
        match w {
            WeightView::W4 { packed, params, group } => {
                let grid = ((k / 32).div_ceil(128) as u32, n as u32);
                let group = group as i32;
                let args: [&dyn Arg; 5] = [&packed, &params, &out, &k_i, &group];
                self.launch(&self.kernels().dequant_w4, grid, 128, &args)?;
            }
            WeightView::W8 { packed, scales } => {
                let grid = ((k / 16).div_ceil(128) as u32, n as u32);
                let args: [&dyn Arg; 4] = [&packed, &scales, &out, &k_i];
                self.launch(&self.kernels().dequant_w8, grid, 128, &args)?;
            }
            WeightView::Fp8 { packed, .. } => {
                let grid = ((k / 16).div_ceil(128) as u32, n as u32);
                let args: [&dyn Arg; 3] = [&packed, &out, &k_i];
                self.launch(&self.kernels().dequant_fp8, grid, 128, &args)?;
            }
            WeightView::Dense(_) => {
                return Err(Error::Internal("dequantising a dense weight".into()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rows_much_longer_than_4096_are_split_where_the_scratch_holds_them() {
        let bf16 = 2;
        // ChatGLM2-6B's down product in 4, Vicuna-7B's in 3; its QKV and gate/up whole.
        assert_eq!(gemv_splits(1, 4096, 13696, bf16), 4);
        assert_eq!(gemv_splits(1, 4096, 11008, bf16), 3);
        assert_eq!(gemv_splits(1, 4608, 4096, bf16), 1);
        assert_eq!(gemv_splits(1, 27392, 4096, bf16), 1);
        // At most 4 splits; the widest product the scratch holds at 8 rows, none wider.
        assert_eq!(gemv_splits(1, 4096, 65536, bf16), GEMV_MAX_SPLITS);
        assert_eq!(gemv_splits(GEMV_MAX_ROWS, SPLIT_K_COLUMNS, 16384, bf16), 4);
        assert_eq!(gemv_splits(1, SPLIT_K_COLUMNS + 1, 16384, bf16), 1);
        // Rows that are not whole 16-byte chunks stay in one block.
        assert_eq!(gemv_splits(1, 4096, 13697, bf16), 1);
        assert_eq!(gemv_splits(1, 4096, 13698, 4), 1);
    }
}
