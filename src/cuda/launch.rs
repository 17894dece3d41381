//! The kernel launch wrappers, one method of `Gpu` each (the products' are in blas.rs).

use std::ffi::c_void;

use cudarc::driver::sys as driver_sys;

use super::compile::Kernel;
use super::signature::{self, Param};
use super::{Gpu, View, device_error};
use crate::dtype::KvFormat;
use crate::{Error, Result};

/// Threads of a sampling block (SAMPLE_THREADS in kernels/sampling.cu).
const SAMPLE_THREADS: u32 = 512;
/// Words of one row's sampling parameters (SAMPLE_WORDS in kernels/sampling.cu).
pub const SAMPLE_WORDS: usize = 10;

/// Tokens from which `rope_write_kv` takes a block per token instead of per head and token.
const ROPE_BLOCK_PER_TOKEN_FROM: usize = 256;

impl Gpu {
    pub(super) fn launch(
        &self,
        kernel: &Kernel,
        grid: (u32, u32),
        block: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        self.launch_3d(kernel, (grid.0, grid.1, 1), block, 0, args)
    }

    fn launch_3d(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        shared_mem_bytes: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        signature::check_args(&kernel.name, &kernel.params, args.iter().map(|arg| arg.kind()))?;
        let mut params: Vec<*mut c_void> = args.iter().map(|arg| arg.param()).collect();
        // Programmatic dependent launch (kernels/common.cuh, kernel_entry): the kernel may be
        // scheduled while the previous one drains; it waits for it before touching memory.
        // SAFETY: a plain-data union, zeroed, then the one field the id names is set.
        let mut attribute: driver_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id =
            driver_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let programmatic = self.programmatic_launch();
        let config = driver_sys::CUlaunchConfig {
            gridDimX: grid.0.max(1),
            gridDimY: grid.1.max(1),
            gridDimZ: grid.2.max(1),
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_mem_bytes,
            hStream: self.launch_stream().cu_stream(),
            attrs: if programmatic { &mut attribute } else { std::ptr::null_mut() },
            numAttrs: u32::from(programmatic),
        };
        self.bind()?;
        // SAFETY: the arguments match the kernel's parameters in count, width and kind
        // (checked above against its PTX), each `params` entry pointing at one argument's
        // bytes in `args`, alive for the call; every address is a `View` of a live buffer, checked to hold what the
        // launch's shape reaches, and indices the kernels follow (ids, slots, block tables,
        // rows) are checked against their buffers where the host lays them out. The stream
        // and function belong to this Gpu's context, bound above; `attribute` outlives the
        // call.
        unsafe {
            driver_sys::cuLaunchKernelEx(
                &config,
                kernel.function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(device_error(&kernel.name))
    }

    /// Chooses the next token of `rows` rows of f32 logits (`stride` apart) on the device,
    /// each as `sampling::choose` does, from `SAMPLE_WORDS` parameter words per row
    /// and the rows' distinct penalized ids; writes one id per row to `chosen`. The logits
    /// are changed in place (guard, penalty). `penalized` holds the ids the words point
    /// into (the words come from `model::gpu::sampling_words`, which checks those offsets).
    pub fn sample_rows(
        &self,
        logits: View<'_>,
        stride: usize,
        params: View<'_>,
        penalized: View<'_>,
        chosen: View<'_>,
        rows: usize,
    ) -> Result<()> {
        logits.check("sample_rows logits", bytes(&[rows, stride, 4]))?;
        params.check("sample_rows parameters", bytes(&[rows, SAMPLE_WORDS, 4]))?;
        chosen.check("sample_rows chosen ids", bytes(&[rows, 4]))?;
        let stride = stride as u64;
        self.launch(
            &self.kernels().sample_rows,
            (rows as u32, 1),
            SAMPLE_THREADS,
            &[&logits, &stride, &params, &penalized, &chosen],
        )
    }

    /// Fills `n` elements of `out` with uniform values in ±bound (dummy weights).
    pub fn fill_uniform(&self, out: View<'_>, n: usize, seed: u64, bound: f32) -> Result<()> {
        out.check("fill_uniform", bytes(&[n, self.dtype.size()]))?;
        let blocks = n.div_ceil(256).min(65_536) as u32;
        let n = n as u64;
        self.launch(&self.kernels().fill_uniform, (blocks, 1), 256, &[&out, &n, &seed, &bound])
    }

    /// The f32 rows of `table` (elems, `width` wide) at `tokens` ids, into `out`. The ids
    /// are checked against the table's rows on the host (`model::gpu` tables).
    pub fn embedding(
        &self,
        ids: View<'_>,
        table: View<'_>,
        out: View<'_>,
        tokens: usize,
        width: usize,
    ) -> Result<()> {
        ids.check("embedding ids", bytes(&[tokens, 4]))?;
        table.check("embedding table", bytes(&[width, self.dtype.size()]))?;
        out.check("embedding out", bytes(&[tokens, width, 4]))?;
        let width = width as i32;
        self.launch(
            &self.kernels().embedding,
            (tokens as u32, 1),
            1024,
            &[&ids, &table, &out, &width],
        )
    }

    /// `residual += delta` (if there is one) then RMSNorm into `out`, over `rows` rows (or
    /// the residual and delta rows listed in `row_index`). The residual is f32, the rest
    /// elems.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        residual: View<'_>,
        delta: Option<View<'_>>,
        row_index: Option<View<'_>>,
        weight: View<'_>,
        out: View<'_>,
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
        let e = self.dtype.size();
        match row_index {
            // Listed rows: indices into buffers the caller sized for every row they name.
            Some(index) => index.check("add_rms_norm row index", bytes(&[rows, 4]))?,
            None => {
                residual.check("add_rms_norm residual", bytes(&[rows, width, 4]))?;
                if let Some(delta) = delta {
                    delta.check("add_rms_norm delta", bytes(&[rows, width, e]))?;
                }
            }
        }
        weight.check("add_rms_norm weight", bytes(&[width, e]))?;
        out.check("add_rms_norm out", bytes(&[rows, width, e]))?;
        let width = width as i32;
        self.launch(
            &self.kernels().add_rms_norm,
            (rows as u32, 1),
            threads as u32,
            &[&residual, &delta, &row_index, &weight, &out, &width, &eps],
        )
    }

    /// SwiGLU of `rows` packed `[gate | up]` rows (kernels/silu_mul.cu).
    pub fn silu_mul(
        &self,
        gate_up: View<'_>,
        out: View<'_>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let e = self.dtype.size();
        gate_up.check("silu_mul input", bytes(&[rows, 2 * width, e]))?;
        out.check("silu_mul out", bytes(&[rows, width, e]))?;
        let chunks = width.div_ceil(16 / e);
        let grid = (chunks.div_ceil(256) as u32, rows.min(65_535) as u32);
        let (width, rows) = (width as i32, rows as i32);
        self.launch(&self.kernels().silu_mul, grid, 256, &[&gate_up, &out, &width, &rows])
    }

    /// Bias, rotary and the K/V cache write after the QKV product (kernels/rope_kv.cu),
    /// the caches' rows in `format`. The slots in `step` are checked against the caches on
    /// the host (`model::gpu` tables take them from block tables the KV space hands out).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_write_kv(
        &self,
        qkv: View<'_>,
        bias: Option<View<'_>>,
        q_out: View<'_>,
        (k_cache, v_cache): (View<'_>, View<'_>),
        format: KvFormat,
        step: &StepTables<'_>,
        shape: &AttentionShape,
        rope: Rope,
    ) -> Result<()> {
        let e = self.dtype.size();
        let (q_width, kv_width) =
            (shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim);
        let qkv_width = q_width + 2 * kv_width;
        qkv.check("rope_write_kv input", bytes(&[step.tokens, qkv_width, e]))?;
        if let Some(bias) = bias {
            bias.check("rope_write_kv bias", bytes(&[qkv_width, e]))?;
        }
        q_out.check("rope_write_kv queries", bytes(&[step.tokens, q_width, e]))?;
        let kv_block = bytes(&[step.block_size, kv_row_bytes(format, shape, e)]);
        k_cache.check("rope_write_kv K cache", kv_block)?;
        v_cache.check("rope_write_kv V cache", kv_block)?;
        step.check()?;
        // The quantised write stages a head in shared memory, ROPE_MAX_HEAD_DIM values.
        if format.bits().is_some() && shape.head_dim > MAX_HEAD_DIM {
            return Err(Error::Config(format!(
                "a quantised KV cache takes heads of up to {MAX_HEAD_DIM} values, not {}",
                shape.head_dim
            )));
        }
        let kv_format = format.kernel_code();
        let (freq_len, heads, kv_heads, head_dim) = (
            step.freq_len as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (mode, rot_dim) = rope.kernel_args(shape.head_dim);
        // Decode steps: a block per head and token, for latency. Prompts: a block per token,
        // so that the chip is not left scheduling tens of thousands of 64-thread blocks.
        // Whole warps (a quantised K/V head is a warp's), at most ROPE_MAX_WARPS.
        let all_heads = shape.num_heads + 2 * shape.num_kv_heads;
        let (groups, threads) =
            if step.tokens >= ROPE_BLOCK_PER_TOKEN_FROM { (1, 256) } else { (all_heads, 64) };
        self.launch(
            &self.kernels().rope_write_kv,
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
                &kv_format,
            ],
        )
    }

    /// Causal attention of every new token over its sequence's cached K/V in `format`
    /// (kernels/attention.cu): decode tokens by key splits, prefill tokens by tiles.
    /// `partial` holds the decode splits' results; `split_counters` one zeroed int per
    /// (decode token, head).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: View<'_>,
        (k_cache, v_cache): (View<'_>, View<'_>),
        format: KvFormat,
        out: View<'_>,
        partial: View<'_>,
        split_counters: View<'_>,
        step: &StepTables<'_>,
        shape: &AttentionShape,
    ) -> Result<()> {
        let e = self.dtype.size();
        let q_width = shape.num_heads * shape.head_dim;
        q.check("attention queries", bytes(&[step.tokens, q_width, e]))?;
        out.check("attention out", bytes(&[step.tokens, q_width, e]))?;
        step.check()?;
        let kv_block = bytes(&[step.block_size, kv_row_bytes(format, shape, e)]);
        k_cache.check("attention K cache", kv_block)?;
        v_cache.check("attention V cache", kv_block)?;
        if step.num_decode > 0 && step.splits > 1 {
            partial.check(
                "attention partial results",
                bytes(&[step.num_decode, shape.num_heads, step.splits, shape.head_dim + 2, 4]),
            )?;
            split_counters
                .check("attention split counters", bytes(&[step.num_decode, shape.num_heads, 4]))?;
        }
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let (max_blocks, block_size, heads, kv_heads, head_dim) = (
            step.max_blocks_per_seq as i32,
            step.block_size as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        if step.num_decode > 0 {
            let (partition, splits) = (step.partition as i32, step.splits as i32);
            let (function, shared) = if step.decode_mma {
                let function =
                    self.mma_decode(shape, step.heads_per_block, format).ok_or_else(|| {
                        Error::Internal(format!(
                            "no tensor-core decode attention for {} heads of {} a block",
                            step.heads_per_block, shape.head_dim
                        ))
                    })?;
                (function, 0)
            } else {
                let kernel = match step.heads_per_block {
                    1 => 0,
                    2 => 1,
                    4 => 2,
                    8 => 3,
                    other => {
                        return Err(Error::Internal(format!(
                            "no decode attention for {other} heads"
                        )));
                    }
                };
                let shared = decode_shared_bytes(shape.head_dim, self.dtype.size()) as u32;
                (&self.kernels().attention_decode[kv_format_index(format)][kernel], shared)
            };
            let head_groups = shape.num_heads / step.heads_per_block;
            let grid = (step.num_decode as u32, head_groups as u32, step.splits as u32);
            self.launch_3d(
                function,
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
            match self.mma_prefill(shape.head_dim, format) {
                Some(function) => {
                    self.launch_3d(function, grid, 128, 0, &args)?;
                }
                None => {
                    let shared = prefill_shared_bytes(shape.head_dim) as u32;
                    let function = &self.kernels().attention_prefill[kv_format_index(format)];
                    self.launch_3d(function, grid, 128, shared, &args)?;
                }
            }
        }
        Ok(())
    }

    /// Launches the embedding kernel over a null table: an illegal address, which loses
    /// the context for good (the tests of a lost device).
    #[cfg(feature = "fault-injection")]
    pub fn read_through_null(&self) -> Result<()> {
        let ids = self.upload_bytes(&0u32.to_le_bytes())?;
        let out = self.alloc(4096)?;
        let (table, width) = (None::<View<'_>>, 256i32);
        self.launch(
            &self.kernels().embedding,
            (1, 1),
            1024,
            &[&ids.view(), &table, &out.view(), &width],
        )
    }

    /// The tensor-core prefill kernel, where it applies (16-bit dtypes, heads a multiple
    /// of 16 wide, K/V in the model's dtype: it reads no quantised cache).
    fn mma_prefill(&self, head_dim: usize, format: KvFormat) -> Option<&Kernel> {
        self.kernels()
            .attention_prefill_mma
            .as_ref()
            .filter(|_| head_dim.is_multiple_of(16) && format == KvFormat::Model)
    }

    /// The tensor-core decode kernel for blocks of `heads` query heads over a cache in
    /// `format`, where it applies (16-bit dtypes, heads a multiple of 16 wide and at most
    /// MAX_HEAD_DIM, 4 to 16 heads dividing the group).
    fn mma_decode(
        &self,
        shape: &AttentionShape,
        heads: usize,
        format: KvFormat,
    ) -> Option<&Kernel> {
        let group = shape.num_heads / shape.num_kv_heads;
        let applies = shape.head_dim.is_multiple_of(16)
            && shape.head_dim <= MAX_HEAD_DIM
            && (MMA_DECODE_MIN_HEADS..=MMA_DECODE_MAX_HEADS).contains(&heads)
            && group.is_multiple_of(heads);
        let kernels = self.kernels().attention_decode_mma.as_ref().filter(|_| applies)?;
        Some(&kernels[kv_format_index(format)])
    }

    /// Query heads a block of the tensor-core decode takes for `shape` over a cache in
    /// `format`, where that kernel applies: the most, up to 16, that divide the group.
    pub fn mma_decode_heads(&self, shape: &AttentionShape, format: KvFormat) -> Option<usize> {
        let group = shape.num_heads / shape.num_kv_heads;
        (MMA_DECODE_MIN_HEADS..=MMA_DECODE_MAX_HEADS.min(group))
            .rev()
            .find(|&heads| self.mma_decode(shape, heads, format).is_some())
    }

    /// Query tokens per prefill attention block for heads of `head_dim` over a cache in
    /// `format` (MMA_TILE / PREFILL_TILE in kernels/attention*.cu).
    pub fn prefill_tile(&self, head_dim: usize, format: KvFormat) -> usize {
        if self.mma_prefill(head_dim, format).is_some() { MMA_TILE } else { PREFILL_TILE }
    }
}

/// Bytes of one position's K (or V) row of one layer in `format`, `elem` bytes a value in
/// the model's dtype.
fn kv_row_bytes(format: KvFormat, shape: &AttentionShape, elem: usize) -> usize {
    format.bytes_per_token(shape.num_kv_heads, shape.head_dim, elem)
}

/// The kernels' index of a KV format (`Kernels::attention_decode`, `attention_prefill`).
fn kv_format_index(format: KvFormat) -> usize {
    match format {
        KvFormat::Model => 0,
        KvFormat::Int8 => 1,
        KvFormat::Int4 => 2,
        KvFormat::Fp8 => 3,
    }
}

/// Anything passed to a kernel by value: where the driver reads its bytes from (a device
/// address for a view, the value itself for a scalar), valid while `self` lives.
pub(super) trait Arg {
    fn param(&self) -> *mut c_void;
    /// What the kernel's parameter in its place must be.
    fn kind(&self) -> Param;
}

impl Arg for View<'_> {
    fn param(&self) -> *mut c_void {
        (self.ptr_ref() as *const u64).cast_mut().cast()
    }
    fn kind(&self) -> Param {
        Param::Word64
    }
}

/// An absent optional pointer argument (the kernels test for null).
static NULL: u64 = 0;

impl Arg for Option<View<'_>> {
    fn param(&self) -> *mut c_void {
        match self {
            Some(view) => view.param(),
            None => (&NULL as *const u64).cast_mut().cast(),
        }
    }
    fn kind(&self) -> Param {
        Param::Word64
    }
}

/// Bytes of a launch's extent: the product of `factors`, saturating, so that an overflowing
/// shape fails the size checks instead of wrapping around.
pub(super) fn bytes(factors: &[usize]) -> usize {
    factors.iter().fold(1usize, |acc, &f| acc.saturating_mul(f))
}

macro_rules! kernel_arg {
    ($($t:ty => $kind:ident),*) => {$(
        impl Arg for $t {
            fn param(&self) -> *mut c_void {
                (self as *const $t).cast_mut().cast()
            }
            fn kind(&self) -> Param {
                Param::$kind
            }
        }
    )*};
}
kernel_arg!(u64 => Word64, i64 => Word64, i32 => Word32, f32 => F32);

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

impl Rope {
    /// The kernels' `rope_mode` and `rot_dim` for heads of `head_dim`.
    pub(super) fn kernel_args(self, head_dim: usize) -> (i32, i32) {
        match self {
            Rope::Glm { rotary_dim } => (0, rotary_dim as i32),
            Rope::RotateHalf => (1, head_dim as i32),
        }
    }
}

/// Dynamic shared memory attention_decode may ask for: 4 warps · 32 keys · 128 dims · f32.
pub(super) const DECODE_MAX_SHARED: usize = 4 * 32 * MAX_HEAD_DIM * 4;

/// Dynamic shared memory the CUDA-core decode attention is launched with for heads of
/// `head_dim` values of `elem` bytes: its V staging, 4 warps · 32 keys.
pub fn decode_shared_bytes(head_dim: usize, elem: usize) -> usize {
    4 * 32 * head_dim * elem
}

/// Dynamic shared memory the CUDA-core prefill attention is launched with: a chunk of 32
/// keys (K padded a column, V) and the tile's PREFILL_TILE queries, in f32.
pub fn prefill_shared_bytes(head_dim: usize) -> usize {
    (32 * (head_dim + 1) + 32 * head_dim + PREFILL_TILE * head_dim) * 4
}
/// Query tokens per block of the CUDA-core prefill attention kernel (PREFILL_TILE).
const PREFILL_TILE: usize = 16;
/// Query tokens per block of the tensor-core prefill attention kernel (MMA_TILE).
const MMA_TILE: usize = 64;
/// Query heads a tensor-core decode block takes: the rows of mma.m16n8k16, of which fewer
/// than 4 would leave the tensor cores mostly idle for what the CUDA-core kernels do.
const MMA_DECODE_MIN_HEADS: usize = 4;
const MMA_DECODE_MAX_HEADS: usize = 16;
/// The widest head the attention kernels take (decode: 256; prefill: 128).
pub const MAX_HEAD_DIM: usize = 128;

/// How a decode attention launch lays out its blocks (src/model/gpu/tables.rs chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLayout {
    /// Query heads (of one K/V head) a block takes, and whether on the tensor cores.
    pub heads_per_block: usize,
    pub tensor_cores: bool,
    /// Key splits and the keys each covers (0: each sequence divides its own).
    pub splits: usize,
    pub partition: usize,
}

/// Views of one forward call's per-token tables (all within one upload).
pub struct StepTables<'a> {
    pub tokens: usize,
    /// Sequences (rows of the block tables).
    pub seqs: usize,
    pub positions: View<'a>,
    pub slots: View<'a>,
    pub token_seq: View<'a>,
    /// Per token: cos of each rotary frequency, then sin (`freq_len` each).
    pub cos_sin: View<'a>,
    pub freq_len: usize,
    pub block_tables: View<'a>,
    pub max_blocks_per_seq: usize,
    /// Positions per K/V block.
    pub block_size: usize,
    /// Rows of the tokens that are a sequence's only token in this call (decode).
    pub decode_rows: View<'a>,
    pub num_decode: usize,
    /// Key splits of the decode attention and the keys each covers.
    pub splits: usize,
    pub partition: usize,
    /// Query heads (of one K/V head) a decode attention block takes, and whether on the
    /// tensor cores (attention_decode_mma) or the CUDA cores (attention_decode_h*).
    pub heads_per_block: usize,
    pub decode_mma: bool,
    /// (first row, count) pairs of the prefill tiles.
    pub tiles: View<'a>,
    pub num_tiles: usize,
}

impl StepTables<'_> {
    /// The tables hold what the call's counts say. Their values (slots and block ids within
    /// the K/V arena, rows within the call) are checked where they are laid out.
    pub(super) fn check(&self) -> Result<()> {
        let per_token = bytes(&[self.tokens, 4]);
        self.positions.check("positions", per_token)?;
        self.slots.check("K/V slots", per_token)?;
        self.token_seq.check("token sequences", per_token)?;
        self.cos_sin.check("rotary table", bytes(&[self.tokens, 2 * self.freq_len, 4]))?;
        self.block_tables.check("block tables", bytes(&[self.seqs, self.max_blocks_per_seq, 4]))?;
        self.decode_rows.check("decode rows", bytes(&[self.num_decode, 4]))?;
        self.tiles.check("prefill tiles", bytes(&[self.num_tiles, 2, 4]))
    }
}
