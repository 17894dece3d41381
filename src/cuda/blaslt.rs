//! FP8 products on cuBLASLt, Hopper's E4M3 tensor cores (cuBLAS's own API has no FP8
//! product): `y[m, n] = xq[m, k] · q[n, k]ᵀ` over E4M3 bytes, summed in f32 and written as
//! 16-bit elems; the activations' and the weight's scales apply after (fp8_scale in
//! kernels/gemv_quant.cu), as on the other FP8 paths. A plan (descriptors and the
//! heuristic's algorithm) is made once per shape.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::null_mut;

use cudarc::cublaslt::sys as lt;

use super::View;
use super::launch::bytes;
use super::libs::{self, CudaLibrary};
use crate::dtype::DType;
use crate::{Error, Result};

/// Plans kept before they are made afresh.
const MAX_PLANS: usize = 1024;

/// One handle and its plans; used under the Gpu's lock.
pub(super) struct BlasLt {
    handle: lt::cublasLtHandle_t,
    out_type: lt::cudaDataType,
    plans: HashMap<PlanKey, Plan>,
}

/// A product's (m, n, k) and the alignments of W, X and Y's addresses.
type PlanKey = ((usize, usize, usize), [u32; 3]);

/// The largest power of two up to 256 that divides `address`: the alignment cuBLASLt's
/// heuristic may count on (it assumes 256 bytes unless told).
fn alignment(address: u64) -> u32 {
    1 << address.trailing_zeros().min(8)
}

// SAFETY: a cuBLASLt handle and its descriptors are host objects any thread may use, one
// thread at a time: BlasLt is only reached through the Gpu's Mutex.
unsafe impl Send for BlasLt {}

fn lt_result(status: lt::cublasStatus_t, what: &str) -> Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("{what}: {status:?}")))
    }
}

/// The descriptors of one product shape and the algorithm cuBLASLt's heuristic chose.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    /// W (E4M3, column-major k × n, transposed), X (E4M3, k × m), Y (elems, n × m).
    layouts: [lt::cublasLtMatrixLayout_t; 3],
    algo: Option<lt::cublasLtMatmulAlgo_t>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was made by its create call (null ones never were) and is
        // destroyed once; no product using them is still being queued (the plan is dropped
        // with its handle, under the lock).
        unsafe {
            for layout in self.layouts {
                if !layout.is_null() {
                    lt::cublasLtMatrixLayoutDestroy(layout);
                }
            }
            if !self.desc.is_null() {
                lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and its plans are destroyed above.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

impl BlasLt {
    /// A handle for products written in `dtype` (bf16 or f16), where cuBLASLt of this
    /// build's CUDA major loads.
    pub(super) fn new(dtype: DType) -> Result<Self> {
        let out_type = match dtype {
            DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
            DType::F16 => lt::cudaDataType::CUDA_R_16F,
            DType::F32 => {
                return Err(Error::Config("FP8 products on cuBLASLt write 16-bit elems".into()));
            }
        };
        libs::check(CudaLibrary::CublasLt)?;
        let mut handle = null_mut();
        // SAFETY: writes one handle (the library was found to load, of this major, above).
        lt_result(unsafe { lt::cublasLtCreate(&mut handle) }, "creating a cuBLASLt handle")?;
        Ok(BlasLt { handle, out_type, plans: HashMap::new() })
    }

    /// The plan of an `m × n × k` product with a workspace of `workspace_bytes`; its `algo`
    /// is None where cuBLASLt has none for the shape on this device, or refused to plan it
    /// (said in the log; the product then takes another path).
    fn plan(&mut self, key: PlanKey, workspace_bytes: usize) -> &mut Plan {
        // Prefill steps come in many row counts: the plans are bounded, not one per count
        // ever seen.
        if self.plans.len() >= MAX_PLANS && !self.plans.contains_key(&key) {
            self.plans.clear();
        }
        let ((m, n, k), _) = key;
        self.plans.entry(key).or_insert_with(|| {
            match make_plan(self.handle, self.out_type, key, workspace_bytes) {
                Ok(plan) => {
                    if plan.algo.is_none() {
                        tracing::debug!("cuBLASLt has no FP8 algorithm for {m}×{n}×{k}");
                    }
                    plan
                }
                Err(e) => {
                    tracing::warn!("cuBLASLt cannot plan the FP8 product {m}×{n}×{k}: {e}");
                    Plan { desc: null_mut(), layouts: [null_mut(); 3], algo: None }
                }
            }
        })
    }

    /// Queues `y = xq · qᵀ` on `stream` for E4M3 bytes `q` (`[n, k]`) and `xq` (`[m, k]`),
    /// `y` `[m, n]` elems, with cuBLAS's `workspace`. Ok(false), queuing nothing, where
    /// cuBLASLt has no FP8 algorithm for the shape and alignments here, or refused the call
    /// (said in the log once; that plan is not tried again).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fp8_matmul(
        &mut self,
        q: View<'_>,
        xq: View<'_>,
        y: View<'_>,
        (m, n, k): (usize, usize, usize),
        workspace: View<'_>,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<bool> {
        q.check("FP8 weight", bytes(&[n, k]))?;
        xq.check("FP8 activations", bytes(&[m, k]))?;
        y.check("FP8 product out", bytes(&[m, n, 2]))?;
        if !k.is_multiple_of(16) {
            return Err(Error::Config(format!(
                "FP8 products need a multiple of 16 inputs, not {k}"
            )));
        }
        let (handle, workspace_bytes) = (self.handle, workspace.bytes());
        let aligned = [q.ptr(), xq.ptr(), y.ptr()].map(alignment);
        let plan = self.plan(((m, n, k), aligned), workspace_bytes);
        let Some(algo) = plan.algo else { return Ok(false) };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the views were checked above to hold W's n·k and X's m·k bytes and Y's
        // m·n 16-bit elems, the layouts of this plan; the workspace is the view's bytes,
        // used by nothing else while queued work runs on `stream` (cuBLAS shares it on the
        // same stream, in order); `stream` belongs to the context these were allocated in.
        let status = unsafe {
            lt::cublasLtMatmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                q.ptr() as *const c_void,
                plan.layouts[0],
                xq.ptr() as *const c_void,
                plan.layouts[1],
                (&beta as *const f32).cast(),
                y.ptr() as *const c_void,
                plan.layouts[2],
                y.ptr() as *mut c_void,
                plan.layouts[2],
                &algo,
                workspace.ptr() as *mut c_void,
                workspace_bytes,
                stream as lt::cudaStream_t,
            )
        };
        if let Err(e) = lt_result(status, "cublasLtMatmul (FP8)") {
            tracing::warn!("FP8 product {m}×{n}×{k} on cuBLAS instead: {e}");
            plan.algo = None;
            return Ok(false);
        }
        Ok(true)
    }
}

/// The descriptors of an `m × n × k` FP8 product written as `out_type`, and the algorithm
/// cuBLASLt's heuristic gives it with a workspace of `workspace_bytes` (None: it has none).
fn make_plan(
    handle: lt::cublasLtHandle_t,
    out_type: lt::cudaDataType,
    ((m, n, k), [align_w, align_x, align_y]): PlanKey,
    workspace_bytes: usize,
) -> Result<Plan> {
    let mut plan = Plan { desc: null_mut(), layouts: [null_mut(); 3], algo: None };
    let e4m3 = lt::cudaDataType::CUDA_R_8F_E4M3;
    let (m, n, k) = (m as u64, n as u64, k as u64);
    // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (int32 attributes).
    let (op_t, op_n) = (1i32, 0i32);
    let int_size = std::mem::size_of::<i32>();
    // SAFETY: each call writes or reads the one object its arguments name; attribute
    // buffers are i32 / usize of the sizes given, as cuBLASLt documents them. Whatever
    // was created is destroyed by Plan's Drop, also on an early return.
    unsafe {
        lt_result(
            lt::cublasLtMatmulDescCreate(
                &mut plan.desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType::CUDA_R_32F,
            ),
            "creating a cuBLASLt product",
        )?;
        let transpose = [
            (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op_t),
            (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op_n),
        ];
        for (attribute, value) in transpose {
            lt_result(
                lt::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    attribute,
                    (value as *const i32).cast(),
                    int_size,
                ),
                "setting a cuBLASLt product's transposes",
            )?;
        }
        // Row-major W[n, k] is column-major k × n (read transposed: FP8 products take
        // A transposed and B not), row-major X[m, k] column-major k × m, and row-major
        // Y[m, n] column-major n × m: Yᵀ = W · Xᵀ.
        let shapes = [(e4m3, k, n, k), (e4m3, k, m, k), (out_type, n, m, n)];
        for (layout, (ty, rows, cols, ld)) in plan.layouts.iter_mut().zip(shapes) {
            lt_result(
                lt::cublasLtMatrixLayoutCreate(layout, ty, rows, cols, ld as i64),
                "creating a cuBLASLt matrix layout",
            )?;
        }
        let mut preference = null_mut();
        lt_result(
            lt::cublasLtMatmulPreferenceCreate(&mut preference),
            "creating a cuBLASLt preference",
        )?;
        use lt::cublasLtMatmulPreferenceAttributes_t as Pref;
        let mut set = lt::cublasLtMatmulPreferenceSetAttribute(
            preference,
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_bytes as *const usize).cast(),
            std::mem::size_of::<usize>(),
        );
        let alignments = [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_y),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y),
        ];
        for (attribute, bytes) in alignments {
            if set == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                set = lt::cublasLtMatmulPreferenceSetAttribute(
                    preference,
                    attribute,
                    (&bytes as *const u32).cast(),
                    std::mem::size_of::<u32>(),
                );
            }
        }
        let mut result: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
        let mut found = 0;
        let heuristic = if set == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            lt::cublasLtMatmulAlgoGetHeuristic(
                handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                preference,
                1,
                &mut result,
                &mut found,
            )
        } else {
            set
        };
        lt::cublasLtMatmulPreferenceDestroy(preference);
        match heuristic {
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS if found > 0 => plan.algo = Some(result.algo),
            // No algorithm for the shape (or FP8 on this device): the caller falls back.
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            | lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => {}
            status => lt_result(status, "cuBLASLt's heuristic")?,
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_the_address_up_to_256() {
        assert_eq!([0x10000, 0x1100, 0x1010, 0x1002, 0x1001].map(alignment), [256, 256, 16, 2, 1]);
        assert_eq!(alignment(0), 256);
    }
}
