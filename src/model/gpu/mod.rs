//! The decoder graph both families run on the GPU. The families differ only in facts
//! their own files own and hand over here: how checkpoint tensors map onto these slots
//! (InternLM2's per-group QKV packing and separate w1/w3 are rearranged at load), the
//! rotary layout, and the rotary frequencies of a call. Per token, every layer runs
//! RMSNorm (fused with the residual add) → QKV product → bias + rotary + paged K/V write →
//! paged attention → output product → RMSNorm → [gate | up] product → SwiGLU → down
//! product; the residual stream stays f32. Products of up to `cuda::GEMV_UP_TO_ROWS` tokens
//! (a single sequence's decode step) run on our GEMV kernel, larger ones on cuBLAS.

/// Decode steps captured as CUDA graphs: the shapes they are captured at, capture, replay.
mod graphs;
/// The forward pass: the tables uploaded, the launches of every layer queued.
mod pass;
/// Quantised linears in the GPU's layouts.
pub mod quant;
/// Activation buffers of a call.
mod scratch;
/// Per-call tables (ids, positions, slots, block tables, rotary, attention work) and the
/// sampling kernel's words, laid out on the host for one upload.
mod tables;
/// Weights on the device and their loading.
mod weights;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{KvStore, ModelInfo, SeqStep};
use crate::Result;
use crate::cuda::{self, AttentionShape, Gpu, Rope};
use crate::dtype::{DType, KvFormat};
use crate::model::quant::{WeightFormat, w4_group};
use crate::sampling::SampleRow;

use graphs::{GRAPH_MIN_BLOCKS, graph_batch};
use scratch::Scratch;
use tables::RopeCache;

pub use tables::sampling_words;
pub(crate) use tables::{decode_layout, decode_layout_with};
use weights::gpu_info;
pub use weights::{LayerWeights, WeightLoader, Weights, check_fits};

/// Sizes of the decoder.
#[derive(Clone, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub num_layers: usize,
    pub attention: AttentionShape,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope: Rope,
    pub qkv_bias: bool,
    pub o_bias: bool,
}

impl Shape {
    /// Rotary frequencies of a head (cos and sin tables of this many values per token).
    fn freq_len(&self) -> usize {
        match self.rope {
            Rope::Glm { rotary_dim } => rotary_dim / 2,
            Rope::RotateHalf => self.attention.head_dim / 2,
        }
    }

    fn q_width(&self) -> usize {
        self.attention.num_heads * self.attention.head_dim
    }

    fn kv_width(&self) -> usize {
        self.attention.num_kv_heads * self.attention.head_dim
    }

    fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }

    /// The decoder-layer linears, `(out, in)`.
    fn linears(&self) -> [(usize, usize); 4] {
        let h = self.hidden;
        [(self.qkv_width(), h), (h, self.q_width()), (2 * self.ffn, h), (h, self.ffn)]
    }

    /// Elements of the largest decoder-layer linear.
    fn largest_linear(&self) -> usize {
        self.linears().iter().map(|(n, k)| n * k).max().unwrap_or(0)
    }

    /// Bytes of every weight with the linears in `format` and the rest `elem` bytes a value
    /// (for the memory check before loading).
    fn weight_bytes(&self, format: WeightFormat, elem: usize) -> usize {
        let h = self.hidden;
        let linear_bytes = |(n, k): (usize, usize)| match format {
            WeightFormat::Dense => n * k * elem,
            WeightFormat::W8 | WeightFormat::Fp8 => n * k + 4 * n,
            WeightFormat::Awq { group } => n * k / 2 + 4 * n * (k / group.max(1)),
            WeightFormat::W4 => n * k / 2 + 4 * n * (k / w4_group(k).unwrap_or(32)),
        };
        let per_layer = (2 * h
            + if self.qkv_bias { self.qkv_width() } else { 0 }
            + if self.o_bias { h } else { 0 })
            * elem
            + self.linears().into_iter().map(linear_bytes).sum::<usize>();
        (2 * self.vocab * h + h) * elem + self.num_layers * per_layer
    }
}

/// Rotary inverse frequencies for a call whose sequence reaches `total_len` positions.
pub type InvFreq = Box<dyn Fn(usize) -> Vec<f32> + Send + Sync>;

pub struct GpuModel {
    shape: Shape,
    weights: Weights,
    info: ModelInfo,
    inv_freq: InvFreq,
    /// Activations of one forward call; one call at a time per model.
    scratch: Mutex<Option<Scratch>>,
    rope_cache: Mutex<RopeCache>,
    /// `forward_sample` chooses with the sampling kernel (kernels/sampling.cu).
    sample_on_device: AtomicBool,
    /// Decode steps are captured as CUDA graphs and replayed (`Scratch::graphs`).
    cuda_graphs: AtomicBool,
    /// A single sequence's QKV product carries the rotary and K/V write
    /// (`Gpu::qkv_rope_product`) where it applies.
    fused_qkv_rope: AtomicBool,
    /// Captures that failed; graphs are turned off at `MAX_CAPTURE_FAILURES` (one failure
    /// may be an error left over from earlier work, reported by the next driver call).
    capture_failures: AtomicUsize,
    /// Last: fields drop in order, and the graphs in `scratch` must go before the module
    /// and cuBLAS handle they launch (freed with the last `Arc<Gpu>`).
    gpu: Arc<Gpu>,
}

impl GpuModel {
    pub fn new(
        gpu: Arc<Gpu>,
        shape: Shape,
        weights: Weights,
        info: ModelInfo,
        inv_freq: InvFreq,
    ) -> Self {
        // A one-token call: the frequencies of every call within the trained context.
        let rope_cache = RopeCache::new(inv_freq(1));
        GpuModel {
            gpu,
            shape,
            weights,
            info,
            inv_freq,
            scratch: Mutex::new(None),
            rope_cache: Mutex::new(rope_cache),
            sample_on_device: AtomicBool::new(false),
            cuda_graphs: AtomicBool::new(false),
            fused_qkv_rope: AtomicBool::new(false),
            capture_failures: AtomicUsize::new(0),
        }
    }

    /// The model of a checkpoint's decoder `layers` on the loader's device, with the tensors
    /// it names `[embedding, final_norm, output]` (`[vocab, hidden]`, `[hidden]`,
    /// `[vocab, hidden]`) and `info` given the weights' format and bytes.
    pub fn from_layers(
        loader: &WeightLoader<'_>,
        shape: Shape,
        layers: Vec<LayerWeights>,
        [embedding, final_norm, output]: [&str; 3],
        info: ModelInfo,
        inv_freq: InvFreq,
    ) -> Result<Self> {
        let (vocab, h) = (shape.vocab, shape.hidden);
        let weights = Weights::new(
            loader.gpu,
            &shape,
            loader.tensor(embedding, &[vocab, h])?,
            layers,
            loader.tensor(final_norm, &[h])?,
            loader.tensor(output, &[vocab, h])?,
        )?;
        let info = gpu_info(info, loader, &weights);
        Ok(GpuModel::new(Arc::clone(loader.gpu), shape, weights, info, inv_freq))
    }

    pub fn dtype(&self) -> DType {
        self.gpu.dtype
    }

    /// K/V heads and their width.
    fn kv_heads_dim(&self) -> (usize, usize) {
        (self.shape.attention.num_kv_heads, self.shape.attention.head_dim)
    }
}

impl super::CausalLm for GpuModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_arena(
        &self,
        block_size: usize,
        num_blocks: usize,
        format: KvFormat,
    ) -> Result<Box<dyn KvStore>> {
        Ok(Box::new(cuda::KvArena::new(
            Arc::clone(&self.gpu),
            self.shape.num_layers,
            self.kv_heads_dim(),
            format,
            block_size,
            num_blocks,
        )?))
    }

    fn kv_bytes_per_block(&self, block_size: usize, format: KvFormat) -> usize {
        cuda::KvArena::block_bytes(
            self.shape.num_layers,
            self.kv_heads_dim(),
            format,
            block_size,
            self.gpu.dtype.size(),
        )
    }

    fn device_free_memory(&self) -> Result<Option<usize>> {
        self.gpu.bind()?;
        Ok(Some(self.gpu.memory()?.0))
    }

    fn check_device(&self) -> Result<()> {
        self.gpu.bind()?;
        self.gpu.synchronize()
    }

    fn reserve_activations(
        &self,
        max_tokens: usize,
        max_seqs: usize,
        max_blocks_per_seq: usize,
    ) -> Result<usize> {
        // Decode batches run padded to the next captured size, their block tables to the
        // next power of two.
        let seqs = graph_batch(max_seqs).unwrap_or(max_seqs).max(max_seqs);
        let tokens = max_tokens.max(seqs);
        let max_blocks = max_blocks_per_seq.next_power_of_two().max(GRAPH_MIN_BLOCKS);
        let table_bytes = self.shape.max_table_words(tokens, seqs, max_blocks) * 4;
        let partial_bytes = self.shape.max_partial_floats(seqs) * 4;
        self.gpu.bind()?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        self.fit_scratch(&mut guard, tokens, seqs, table_bytes, partial_bytes)?;
        Ok(guard.as_ref().map_or(0, Scratch::device_bytes))
    }

    fn set_sample_on_device(&self, on: bool) {
        self.sample_on_device.store(on, Ordering::Relaxed);
    }

    fn set_cuda_graphs(&self, on: bool) {
        self.cuda_graphs.store(on, Ordering::Relaxed);
    }

    fn set_programmatic_launch(&self, on: bool) -> bool {
        self.gpu.set_programmatic_launch(on)
    }

    fn set_fused_qkv_rope(&self, on: bool) {
        self.fused_qkv_rope.store(on, Ordering::Relaxed);
    }

    fn forward_batch(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let vocab = self.shape.vocab;
        self.forward_on_device(arena, steps, &[], |gpu, s, _| {
            let logits = gpu.read_f32_pinned(&s.logits, steps.len() * vocab, &mut s.host_logits)?;
            // Rows of 65k-92k floats for up to hundreds of sequences: copied out on all cores.
            Ok(logits.par_chunks_exact(vocab).map(<[f32]>::to_vec).collect())
        })
    }

    fn forward_sample(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
        rows: &[Option<SampleRow<'_>>],
    ) -> Result<Vec<Option<u32>>> {
        // The kernel knows no banned ids (a request's `min_tokens`): such steps choose on the host.
        let banning = rows.iter().flatten().any(|row| !row.banned.is_empty());
        if !self.sample_on_device.load(Ordering::Relaxed) || banning {
            return Ok(super::choose_on_host(self.forward_batch(arena, steps)?, rows));
        }
        let words = sampling_words(rows, self.shape.vocab);
        self.forward_on_device(arena, steps, &words, |gpu, s, uploaded| {
            let params = rows.len() * cuda::SAMPLE_WORDS * 4;
            let penalized = s.extra.range(params, uploaded - params)?;
            gpu.sample_rows(
                s.logits.view(),
                self.shape.vocab,
                s.extra.range(0, params)?,
                penalized,
                s.chosen.view(),
                rows.len(),
            )?;
            let chosen = gpu.read_u32(&s.chosen, rows.len())?;
            Ok(rows.iter().zip(chosen).map(|(row, id)| row.as_ref().map(|_| id)).collect())
        })
    }
}
