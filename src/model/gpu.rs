//! The decoder graph both families run on the GPU. The families differ only in facts
//! their own files own and hand over here: how checkpoint tensors map onto these slots
//! (InternLM2's per-group QKV packing and separate w1/w3 are rearranged at load), the
//! rotary layout, and the rotary frequencies of a call. Per token, every layer runs
//! RMSNorm (fused with the residual add) → QKV product → bias + rotary + paged K/V write →
//! paged attention → output product → RMSNorm → [gate | up] product → SwiGLU → down
//! product; the residual stream stays f32. Products of up to `GEMV_UP_TO_ROWS` tokens
//! (a single sequence's decode step) run on our GEMV kernel, larger ones on cuBLAS.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{Checkpoint, KvStore, ModelInfo, SeqStep, batch_offsets, rope};
use crate::cuda::{self, AttentionShape, Buffer, Gpu, Rope, StepTables};
use crate::dtype::DType;
use crate::sampling::SampleRow;
use crate::{Error, Result};

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

    /// The most table words a call of `tokens` tokens (graph padding included) and `seqs`
    /// sequences with block tables `max_blocks` wide lays out (`lay_out_tables`): ids,
    /// positions, slots, token → sequence, tiles of at least one token (two words each) and
    /// cos/sin per token; last rows, decode rows and the block table per sequence.
    fn max_table_words(&self, tokens: usize, seqs: usize, max_blocks: usize) -> usize {
        tokens * (6 + 2 * self.freq_len()) + seqs * (2 + max_blocks)
    }

    /// The most floats the decode attention's split results take for `seqs` sequences:
    /// blocks × splits stays within DECODE_ATTENTION_BLOCKS plus one split per block
    /// (`decode_splits`, `graph_splits`), and a block takes at most MAX_BLOCK_HEADS heads.
    fn max_partial_floats(&self, seqs: usize) -> usize {
        let a = &self.attention;
        (DECODE_ATTENTION_BLOCKS * MAX_BLOCK_HEADS + seqs * a.num_heads) * (a.head_dim + 2)
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

    /// Elements of every weight, in load order (for the memory check before loading).
    fn num_weights(&self) -> usize {
        let h = self.hidden;
        let per_layer = 2 * h
            + self.qkv_width() * h
            + if self.qkv_bias { self.qkv_width() } else { 0 }
            + self.q_width() * h
            + if self.o_bias { h } else { 0 }
            + 3 * self.ffn * h;
        2 * self.vocab * h + h + self.num_layers * per_layer
    }
}

/// One layer's weights on the device, PyTorch layout (`[out, in]`, row-major).
pub struct LayerWeights {
    pub attention_norm: Buffer,
    /// `[q heads | k heads | v heads]` rows.
    pub qkv: Buffer,
    pub qkv_bias: Option<Buffer>,
    pub o: Buffer,
    pub o_bias: Option<Buffer>,
    pub ffn_norm: Buffer,
    /// `[gate | up]` rows, `2·ffn`.
    pub gate_up: Buffer,
    pub down: Buffer,
}

pub struct Weights {
    pub embedding: Buffer,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Buffer,
    pub output: Buffer,
}

/// Puts weights on the device: from the checkpoint (converted to the GPU's dtype), or, for
/// `load_format dummy`, filled on the device (norm scales 1, other values uniform in
/// ±1/sqrt(last dim), as `Checkpoint::dummy` on the CPU).
pub struct WeightLoader<'a> {
    pub gpu: &'a Arc<Gpu>,
    pub checkpoint: &'a Checkpoint,
    pub dummy: bool,
}

impl WeightLoader<'_> {
    /// The tensor `name` of exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Buffer> {
        self.tensor_from(name, shape, || self.checkpoint.f32(name, shape))
    }

    /// A device tensor of `shape` whose values `read` assembles on the host from one or
    /// more checkpoint tensors (reordered or concatenated); `name` seeds dummy values.
    pub fn tensor_from(
        &self,
        name: &str,
        shape: &[usize],
        read: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Buffer> {
        let numel: usize = shape.iter().product();
        if !self.dummy {
            let values = read()?;
            debug_assert_eq!(values.len(), numel, "{name}");
            return self.gpu.upload_elems(&values);
        }
        if name.contains("norm") {
            return self.gpu.upload_elems(&vec![1.0; numel]);
        }
        let buffer = self.gpu.alloc(numel * self.gpu.dtype.size())?;
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let bound = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        self.gpu.fill_uniform(buffer.ptr(), numel, seed, bound)?;
        Ok(buffer)
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
    /// Captures that failed; graphs are turned off at `MAX_CAPTURE_FAILURES` (one failure
    /// may be an error left over from earlier work, reported by the next driver call).
    capture_failures: AtomicUsize,
    /// Last: fields drop in order, and the graphs in `scratch` must go before the module
    /// and cuBLAS handle they launch (freed with the last `Arc<Gpu>`).
    gpu: Arc<Gpu>,
}

const MAX_CAPTURE_FAILURES: usize = 3;

/// cos/sin rows of the positions seen so far for the model's own inverse frequencies.
/// Others (InternLM2's dynamic NTK past its trained context, different at each length)
/// get just the rows asked for, computed afresh.
struct RopeCache {
    inv_freq: Vec<f32>,
    /// Per position: cos of each frequency, then sin.
    rows: Vec<f32>,
    /// The rows last computed for other frequencies.
    uncached: Vec<f32>,
}

impl RopeCache {
    fn new(inv_freq: Vec<f32>) -> Self {
        RopeCache { inv_freq, rows: Vec::new(), uncached: Vec::new() }
    }

    fn rows(&mut self, inv_freq: &[f32], start: usize, end: usize) -> &[f32] {
        let width = 2 * inv_freq.len();
        if self.inv_freq != inv_freq {
            self.uncached.clear();
            for position in start..end {
                let (cos, sin) = rope::cos_sin(inv_freq, position);
                self.uncached.extend(cos.iter().chain(&sin));
            }
            return &self.uncached;
        }
        for position in self.rows.len() / width..end {
            let (cos, sin) = rope::cos_sin(inv_freq, position);
            self.rows.extend(cos.iter().chain(&sin));
        }
        &self.rows[start * width..end * width]
    }
}

/// Fails early, with the sizes, when the weights cannot fit in the device's free memory
/// (or the heads are wider than the attention kernels take).
pub fn check_fits(gpu: &Gpu, shape: &Shape) -> Result<()> {
    if shape.attention.head_dim > cuda::MAX_HEAD_DIM {
        return Err(Error::Config(format!(
            "head dim {} is over the {} the GPU attention kernels support",
            shape.attention.head_dim,
            cuda::MAX_HEAD_DIM
        )));
    }
    let needed = shape.num_weights() * gpu.dtype.size();
    let (free, total) = gpu.memory()?;
    // Room for activations, cuBLAS and at least some KV blocks.
    let headroom = 512 << 20;
    if needed + headroom > free {
        return Err(Error::Device(format!(
            "the weights need {:.2} GiB in {} but GPU {} ({}) has {:.2} GiB free of {:.2} GiB",
            needed as f64 / (1u64 << 30) as f64,
            gpu.dtype.name(),
            gpu.ordinal,
            gpu.name,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
        )));
    }
    Ok(())
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
            capture_failures: AtomicUsize::new(0),
        }
    }

    pub fn dtype(&self) -> DType {
        self.gpu.dtype
    }

    /// Lays out one call's per-token tables as u32 words (one upload).
    fn tables(
        &self,
        steps: &[SeqStep<'_>],
        block_size: usize,
        graph: Option<GraphShape>,
    ) -> Result<TableWords> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|p| p.into_inner());
        let tile = self.gpu.prefill_tile(self.shape.attention.head_dim);
        lay_out_tables(&self.shape, &self.inv_freq, &mut cache, tile, steps, block_size, graph)
    }

    /// The graph a call replays: every sequence decodes one token, graphs are on, and the
    /// batch fits a captured size.
    fn graph_shape(&self, steps: &[SeqStep<'_>], block_size: usize) -> Option<GraphShape> {
        if !self.cuda_graphs.load(Ordering::Relaxed) || steps.iter().any(|s| s.ids.len() != 1) {
            return None;
        }
        let batch = graph_batch(steps.len())?;
        let blocks = steps.iter().map(|s| (s.start + 1).div_ceil(block_size)).max()?;
        Some(GraphShape { batch, max_blocks: blocks.next_power_of_two().max(GRAPH_MIN_BLOCKS) })
    }
}

/// What fixes a captured decode step: its batch (sequences past the real ones are padding)
/// and the width of its block tables. Lengths, tokens and blocks vary between replays; they
/// are read from the tables the step uploads first, at offsets these two fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GraphShape {
    batch: usize,
    max_blocks: usize,
}

/// Batch sizes decode steps are captured at (a batch runs as the next size up, as vLLM's
/// capture sizes): up to the GEMV kernel's 8 rows in powers of two, then steps of 16 and 32.
const GRAPH_BATCHES: [usize; 17] =
    [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256];
/// Narrowest block table of a graph; wider ones double (one graph per doubling).
const GRAPH_MIN_BLOCKS: usize = 8;
/// Graphs kept per model before they are all dropped and captured again as needed: every
/// batch size with a few block-table widths, for a few instances.
const MAX_GRAPHS: usize = 256;

/// The captured batch size `sequences` run as; None past the largest (run without a graph).
fn graph_batch(sequences: usize) -> Option<usize> {
    GRAPH_BATCHES.iter().copied().find(|&b| b >= sequences.max(1))
}

/// Lays out one call's per-token tables as u32 words and each table's word offset. With a
/// `graph` shape the tables are padded to its batch and block-table width, so that every
/// call of that shape puts each table at the same offset: padding tokens have id 0, position
/// 0, no K/V slot (-1), an all-zero block table and the identity rotation; the decode
/// attention divides each sequence's own keys (partition 0) over splits fixed by the batch.
fn lay_out_tables(
    shape: &Shape,
    inv_freq: &InvFreq,
    cache: &mut RopeCache,
    tile: usize,
    steps: &[SeqStep<'_>],
    block_size: usize,
    graph: Option<GraphShape>,
) -> Result<TableWords> {
    let freq_len = shape.freq_len();
    let needed_blocks =
        steps.iter().map(|s| (s.start + s.ids.len()).div_ceil(block_size)).max().unwrap_or(1);
    let max_blocks = graph.map_or(needed_blocks, |g| g.max_blocks);
    if needed_blocks > max_blocks || graph.is_some_and(|g| g.batch < steps.len()) {
        return Err(Error::Internal("a decode graph is too small for its step".into()));
    }
    let padding = graph.map_or(0, |g| g.batch - steps.len());
    let mut words = TableWords {
        words: Vec::new(),
        offsets: [0; TABLES],
        freq_len,
        max_blocks,
        num_decode: 0,
        num_tiles: 0,
        splits: 1,
        partition: 0,
        heads_per_block: 1,
    };
    let vocab = shape.vocab;
    for step in steps {
        if step.blocks.len() < (step.start + step.ids.len()).div_ceil(block_size) {
            return Err(Error::Internal("a block table does not cover its sequence".into()));
        }
    }
    // ids
    words.begin(0);
    for step in steps {
        for &id in step.ids {
            if id as usize >= vocab {
                return Err(Error::InvalidRequest(format!(
                    "token id {id} is outside the model's vocabulary of {vocab}"
                )));
            }
            words.words.push(id);
        }
    }
    words.words.extend(std::iter::repeat_n(0, padding));
    words.begin(1); // positions
    for step in steps {
        words.words.extend((step.start..step.start + step.ids.len()).map(|p| p as u32));
    }
    words.words.extend(std::iter::repeat_n(0, padding));
    words.begin(2); // slots
    for step in steps {
        for p in step.start..step.start + step.ids.len() {
            let block = step.blocks[p / block_size] as usize;
            words.words.push((block * block_size + p % block_size) as u32);
        }
    }
    words.words.extend(std::iter::repeat_n(NO_SLOT, padding));
    words.begin(3); // token → sequence
    for (s, step) in steps.iter().enumerate() {
        words.words.extend(std::iter::repeat_n(s as u32, step.ids.len()));
    }
    words.words.extend((steps.len()..steps.len() + padding).map(|s| s as u32));
    words.begin(5); // last token of each sequence, as a row of the flat batch
    let mut row = 0;
    for step in steps {
        row += step.ids.len();
        words.words.push((row - 1) as u32);
    }
    words.words.extend((row..row + padding).map(|r| r as u32));
    words.begin(6); // block tables, padded to the widest
    for step in steps {
        let needed = (step.start + step.ids.len()).div_ceil(block_size);
        words.words.extend_from_slice(&step.blocks[..needed]);
        words.words.extend(std::iter::repeat_n(0, max_blocks - needed));
    }
    words.words.extend(std::iter::repeat_n(0, padding * max_blocks));
    words.begin(7); // per token: cos then sin of each rotary frequency (f32 bits)
    for step in steps {
        let inv_freq = inv_freq(step.start + step.ids.len());
        debug_assert_eq!(inv_freq.len(), freq_len);
        let end = step.start + step.ids.len();
        words.words.extend(cache.rows(&inv_freq, step.start, end).iter().map(|v| v.to_bits()));
    }
    for _ in 0..padding {
        words.words.extend(std::iter::repeat_n(1f32.to_bits(), freq_len));
        words.words.extend(std::iter::repeat_n(0f32.to_bits(), freq_len));
    }
    // Attention work: sequences with one new token go to the decode kernel, longer runs
    // to the prefill kernel in tiles of consecutive tokens.
    words.begin(8);
    let (mut row, mut longest_decode) = (0usize, 0usize);
    for step in steps {
        if step.ids.len() == 1 {
            words.words.push(row as u32);
            longest_decode = longest_decode.max(step.start + 1);
        }
        row += step.ids.len();
    }
    words.words.extend((row..row + padding).map(|r| r as u32));
    words.num_decode = words.words.len() - words.offsets[8];
    words.begin(9);
    let mut row = 0usize;
    for step in steps {
        if step.ids.len() > 1 {
            for first in (0..step.ids.len()).step_by(tile) {
                let count = tile.min(step.ids.len() - first);
                words.words.extend([(row + first) as u32, count as u32]);
                words.num_tiles += 1;
            }
        }
        row += step.ids.len();
    }
    if words.num_decode > 0 {
        words.heads_per_block = decode_heads_per_block(words.num_decode, &shape.attention);
        let blocks = words.num_decode * shape.attention.num_heads / words.heads_per_block;
        (words.splits, words.partition) = match graph {
            Some(_) => (graph_splits(blocks), 0),
            None => decode_splits(blocks, longest_decode),
        };
    }
    Ok(words)
}

/// The slot of a token whose K/V are not kept (kernels/rope_kv.cu reads it as -1).
const NO_SLOT: u32 = u32::MAX;

/// Blocks the decode attention aims for (a few per SM).
const DECODE_ATTENTION_BLOCKS: usize = 512;

/// Query heads sharing a K/V head that one decode attention block takes (kernels/attention.cu
/// has kernels for 1, 2, 4 and 8): the most, dividing the group, that still leaves
/// DECODE_ATTENTION_BLOCKS / 2 blocks for the decode tokens. Many sequences then read each
/// K/V head once per block of heads instead of once per query head; few keep a block per
/// head, and as many blocks as before.
fn decode_heads_per_block(num_decode: usize, attention: &AttentionShape) -> usize {
    let group = attention.num_heads / attention.num_kv_heads;
    [MAX_BLOCK_HEADS, 4, 2]
        .into_iter()
        .find(|&h| {
            group.is_multiple_of(h)
                && num_decode * attention.num_heads / h >= DECODE_ATTENTION_BLOCKS / 2
        })
        .unwrap_or(1)
}

/// The most query heads a decode attention block takes (attention_decode_h8).
const MAX_BLOCK_HEADS: usize = 8;

/// Fewest keys a decode split covers: four warps of 32 (DECODE_MIN_PARTITION in
/// kernels/attention.cu).
const DECODE_MIN_PARTITION: usize = 128;

/// How the decode attention splits the keys of its longest sequence: (splits, keys per
/// split). Enough splits that `blocks` (decode tokens × heads) times them fill the chip when
/// few sequences decode (flash-decoding), but at least DECODE_MIN_PARTITION keys each and a
/// multiple of 32.
fn decode_splits(blocks: usize, longest: usize) -> (usize, usize) {
    let most = (longest / DECODE_MIN_PARTITION).max(1);
    let splits = DECODE_ATTENTION_BLOCKS.div_ceil(blocks).clamp(1, most);
    let partition = longest.div_ceil(splits).div_ceil(32) * 32;
    (longest.div_ceil(partition), partition)
}

/// Decode attention splits of a graph, whose launch cannot depend on lengths: as many as
/// fill the chip; each sequence uses those its keys need (partition 0).
fn graph_splits(blocks: usize) -> usize {
    DECODE_ATTENTION_BLOCKS.div_ceil(blocks).clamp(1, GRAPH_MAX_SPLITS)
}

/// Splits of a one-sequence graph (enough for 2,048 keys in splits of 128).
const GRAPH_MAX_SPLITS: usize = 16;
const TABLES: usize = 10;

struct TableWords {
    words: Vec<u32>,
    offsets: [usize; TABLES],
    freq_len: usize,
    max_blocks: usize,
    num_decode: usize,
    num_tiles: usize,
    splits: usize,
    partition: usize,
    heads_per_block: usize,
}

impl TableWords {
    /// Floats of the decode attention's split results.
    fn partial_floats(&self, shape: &Shape) -> usize {
        if self.splits > 1 {
            self.num_decode
                * shape.attention.num_heads
                * self.splits
                * (shape.attention.head_dim + 2)
        } else {
            0
        }
    }
}

impl TableWords {
    fn begin(&mut self, table: usize) {
        self.offsets[table] = self.words.len();
    }
}

/// Device buffers for the activations of a call of up to `tokens` tokens and `seqs`
/// sequences; grown (never shrunk) when a larger call comes.
struct Scratch {
    tokens: usize,
    seqs: usize,
    x: Buffer,
    normed: Buffer,
    qkv: Buffer,
    q: Buffer,
    context: Buffer,
    attn_out: Buffer,
    gate_up: Buffer,
    act: Buffer,
    mlp_out: Buffer,
    last_normed: Buffer,
    logits: Buffer,
    tables: Buffer,
    /// Words a call's `finish` reads (the sampling kernel's), apart from the tables so that
    /// their growth (penalized ids) does not reallocate the rest and drop the graphs.
    extra: Buffer,
    attention_partial: Buffer,
    /// One int per (sequence, head), zero between calls (kernels/attention.cu).
    split_counters: Buffer,
    /// Where the logits come back to the host.
    host_logits: cuda::HostBuffer,
    /// One chosen id per sequence (sampling on the device).
    chosen: Buffer,
    /// Decode steps captured over these buffers, by the generation of the KV arena they
    /// write (the instances sharing this model have one each); dropped with the buffers.
    graphs: HashMap<(u64, GraphShape), cuda::Graph>,
    /// Shapes run once without a graph: lazily loaded kernels and cuBLAS's first use of a
    /// size happen outside any capture (as PyTorch warms up before capturing).
    warmed_up: HashSet<GraphShape>,
}

/// The extra-words buffer's first size: 256 rows of sampling words and many ids.
const EXTRA_MIN_BYTES: usize = 64 << 10;

impl Scratch {
    fn new(
        gpu: &Gpu,
        shape: &Shape,
        tokens: usize,
        seqs: usize,
        table_bytes: usize,
        partial_bytes: usize,
    ) -> Result<Self> {
        let e = gpu.dtype.size();
        let h = shape.hidden;
        Ok(Scratch {
            tokens,
            seqs,
            x: gpu.alloc(tokens * h * 4)?,
            normed: gpu.alloc(tokens * h * e)?,
            qkv: gpu.alloc(tokens * shape.qkv_width() * e)?,
            q: gpu.alloc(tokens * shape.q_width() * e)?,
            context: gpu.alloc(tokens * shape.q_width() * e)?,
            attn_out: gpu.alloc(tokens * h * e)?,
            gate_up: gpu.alloc(tokens * 2 * shape.ffn * e)?,
            act: gpu.alloc(tokens * shape.ffn * e)?,
            mlp_out: gpu.alloc(tokens * h * e)?,
            last_normed: gpu.alloc(seqs * h * e)?,
            logits: gpu.alloc(seqs * shape.vocab * 4)?,
            tables: gpu.alloc(table_bytes)?,
            extra: gpu.alloc(EXTRA_MIN_BYTES)?,
            attention_partial: gpu.alloc(partial_bytes)?,
            split_counters: gpu.alloc(seqs * shape.attention.num_heads * 4)?,
            host_logits: gpu.alloc_host(seqs * shape.vocab * 4)?,
            chosen: gpu.alloc(seqs * 4)?,
            graphs: HashMap::new(),
            warmed_up: HashSet::new(),
        })
    }

    /// Device memory held, counted buffer by buffer (the driver's free memory moves in its
    /// pool's chunks, too coarse to show a small model's scratch).
    fn device_bytes(&self) -> usize {
        [
            &self.x,
            &self.normed,
            &self.qkv,
            &self.q,
            &self.context,
            &self.attn_out,
            &self.gate_up,
            &self.act,
            &self.mlp_out,
            &self.last_normed,
            &self.logits,
            &self.tables,
            &self.extra,
            &self.attention_partial,
            &self.split_counters,
            &self.chosen,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }
}

impl super::CausalLm for GpuModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_arena(&self, block_size: usize, num_blocks: usize) -> Result<Box<dyn KvStore>> {
        Ok(Box::new(cuda::KvArena::new(
            Arc::clone(&self.gpu),
            self.shape.num_layers,
            self.shape.kv_width(),
            block_size,
            num_blocks,
        )?))
    }

    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        cuda::KvArena::block_bytes(
            self.shape.num_layers,
            self.shape.kv_width(),
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
        if !self.sample_on_device.load(Ordering::Relaxed) {
            return Ok(super::choose_on_host(self.forward_batch(arena, steps)?, rows));
        }
        let words = sampling_words(rows, self.shape.vocab);
        self.forward_on_device(arena, steps, &words, |gpu, s, words_at| {
            let penalized = words_at + (rows.len() * cuda::SAMPLE_WORDS * 4) as u64;
            let stride = self.shape.vocab;
            gpu.sample_rows(
                s.logits.ptr(),
                stride,
                words_at,
                penalized,
                s.chosen.ptr(),
                rows.len(),
            )?;
            let chosen = gpu.read_u32(&s.chosen, rows.len())?;
            Ok(rows.iter().zip(chosen).map(|(row, id)| row.as_ref().map(|_| id)).collect())
        })
    }
}

/// The sampling kernel's words for `rows` (kernels/sampling.cu): SAMPLE_WORDS parameters
/// per row, then every row's distinct penalized ids.
pub fn sampling_words(rows: &[Option<SampleRow<'_>>], vocab: usize) -> Vec<u32> {
    let mut words = Vec::with_capacity(rows.len() * cuda::SAMPLE_WORDS);
    let mut penalized = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let Some(row) = row else {
            words.extend([i as u32, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            continue;
        };
        let flags = 1 | (u32::from(row.guard_invalid_scores) << 1);
        let (first, count) = if row.repetition_penalty != 1.0 {
            penalized.extend_from_slice(row.penalized);
            (penalized.len() - row.penalized.len(), row.penalized.len())
        } else {
            (0, 0)
        };
        words.extend([
            i as u32,
            row.width.min(vocab) as u32,
            flags,
            row.top_k.min(u32::MAX as usize) as u32,
            row.inv_temperature().to_bits(),
            row.top_p.to_bits(),
            row.repetition_penalty.to_bits(),
            row.uniform.to_bits(),
            first as u32,
            count as u32,
        ]);
    }
    words.extend(penalized);
    words
}

impl GpuModel {
    /// Runs the pass up to the logits (left on the device in the scratch), with `extra`
    /// words uploaded after the step's tables, then `finish` (given the device address of
    /// the extra words) while the scratch is held.
    fn forward_on_device<R>(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
        extra: &[u32],
        finish: impl FnOnce(&Gpu, &mut Scratch, u64) -> Result<R>,
    ) -> Result<R> {
        let arena: &mut cuda::KvArena = arena.as_any_mut().downcast_mut().ok_or_else(|| {
            Error::Internal("a GPU model was given another device's KV arena".into())
        })?;
        let (_, real_tokens) = batch_offsets(steps)?;
        let block_size = arena.block_size();
        let graph = if arena.num_blocks() > 0 { self.graph_shape(steps, block_size) } else { None };
        let (total, seqs) = graph.map_or((real_tokens, steps.len()), |g| (g.batch, g.batch));
        let tables = self.tables(steps, block_size, graph)?;
        let gpu = &self.gpu;
        gpu.bind()?;

        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let table_bytes = tables.words.len() * 4;
        let partial_bytes = tables.partial_floats(&self.shape) * 4;
        self.fit_scratch(&mut guard, total, seqs, table_bytes, partial_bytes)?;
        let s = guard.as_mut().expect("allocated above");
        if s.extra.bytes() < extra.len() * 4 {
            s.extra = gpu.alloc(2 * extra.len() * 4)?;
        }
        gpu.write_bytes(&mut s.tables, 0, bytemuck::cast_slice(&tables.words))?;
        gpu.write_bytes(&mut s.extra, 0, bytemuck::cast_slice(extra))?;
        let word = |table: usize| s.tables.at(tables.offsets[table] * 4);
        let step = StepTables {
            tokens: total,
            positions: word(1),
            slots: word(2),
            token_seq: word(3),
            cos_sin: word(7),
            freq_len: tables.freq_len,
            block_tables: word(6),
            max_blocks_per_seq: tables.max_blocks,
            decode_rows: word(8),
            num_decode: tables.num_decode,
            splits: tables.splits,
            partition: tables.partition,
            heads_per_block: tables.heads_per_block,
            tiles: word(9),
            num_tiles: tables.num_tiles,
        };
        let pass = Pass { step, ids: word(0), last_rows: word(5), seqs };
        match graph {
            Some(shape) => {
                let key = (arena.generation(), shape);
                if !s.graphs.contains_key(&key) && !s.warmed_up.insert(shape) {
                    match gpu.capture(|| self.queue_pass(s, arena, &pass)) {
                        Ok(captured) => {
                            if s.graphs.len() >= MAX_GRAPHS {
                                // Mostly graphs of arenas since grown or dropped.
                                s.graphs.clear();
                            }
                            // A few dozen a model at most: serving logs show graphs in use.
                            tracing::info!(
                                batch = shape.batch,
                                block_table = shape.max_blocks,
                                graphs = s.graphs.len() + 1,
                                "captured a decode step as a CUDA graph"
                            );
                            s.graphs.insert(key, captured);
                        }
                        Err(e) => {
                            let failures =
                                self.capture_failures.fetch_add(1, Ordering::Relaxed) + 1;
                            if failures >= MAX_CAPTURE_FAILURES {
                                tracing::warn!(
                                    "CUDA graphs turned off: capturing a decode step: {e}"
                                );
                                self.cuda_graphs.store(false, Ordering::Relaxed);
                            } else {
                                // Tried again the next time this shape runs.
                                tracing::warn!("capturing a decode step failed (will retry): {e}");
                                s.warmed_up.remove(&shape);
                            }
                        }
                    }
                }
                match s.graphs.get(&key) {
                    Some(captured) => gpu.replay(captured)?,
                    None => self.queue_pass(s, arena, &pass)?,
                }
            }
            None => self.queue_pass(s, arena, &pass)?,
        }
        let extra_ptr = s.extra.ptr();
        finish(gpu, s, extra_ptr)
    }

    /// Grows the scratch (if it is smaller) to hold a call of `tokens` tokens and `seqs`
    /// sequences with its tables and attention partials. Growth frees the old buffers and
    /// the graphs captured over them.
    fn fit_scratch(
        &self,
        guard: &mut Option<Scratch>,
        tokens: usize,
        seqs: usize,
        table_bytes: usize,
        partial_bytes: usize,
    ) -> Result<()> {
        let fits = guard.as_ref().is_some_and(|s| {
            s.tokens >= tokens
                && s.seqs >= seqs
                && s.tables.bytes() >= table_bytes
                && s.attention_partial.bytes() >= partial_bytes
        });
        if fits {
            return Ok(());
        }
        let (tokens, seqs) = match guard.as_ref() {
            Some(s) => (s.tokens.max(tokens), s.seqs.max(seqs)),
            None => (tokens.max(16), seqs.max(16)),
        };
        let table_capacity =
            guard.as_ref().map_or(0, |s| s.tables.bytes()).max(table_bytes).max(64 << 10);
        let partial_capacity = guard
            .as_ref()
            .map_or(0, |s| s.attention_partial.bytes())
            .max(partial_bytes)
            .max(1 << 20);
        *guard = None; // free the old buffers (and the graphs over them) first
        *guard = Some(Scratch::new(
            &self.gpu,
            &self.shape,
            tokens,
            seqs,
            2 * table_capacity,
            2 * partial_capacity,
        )?);
        Ok(())
    }

    /// Queues the pass up to the logits: the same launches whether they run now or are
    /// captured into a graph (device addresses only; nothing read back, nothing allocated).
    fn queue_pass(&self, s: &Scratch, arena: &cuda::KvArena, pass: &Pass) -> Result<()> {
        let gpu = &self.gpu;
        let (step, total) = (&pass.step, pass.step.tokens);
        let block_size = arena.block_size();
        let shape = &self.shape;
        let (h, ffn) = (shape.hidden, shape.ffn);
        let w = &self.weights;
        let bias = |b: &Option<Buffer>| b.as_ref().map_or(0, Buffer::ptr);
        gpu.embedding(pass.ids, w.embedding.ptr(), s.x.ptr(), total, h)?;
        for (l, layer) in w.layers.iter().enumerate() {
            let delta = if l == 0 { 0 } else { s.mlp_out.ptr() };
            let normed = s.normed.ptr();
            gpu.add_rms_norm(
                s.x.ptr(),
                delta,
                0,
                layer.attention_norm.ptr(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            gpu.matmul(
                normed,
                layer.qkv.ptr(),
                0,
                s.qkv.ptr(),
                total,
                shape.qkv_width(),
                h,
                false,
            )?;
            let (k_cache, v_cache) = arena.layer(l);
            gpu.rope_write_kv(
                s.qkv.ptr(),
                bias(&layer.qkv_bias),
                s.q.ptr(),
                k_cache,
                v_cache,
                step,
                &shape.attention,
                shape.rope,
            )?;
            gpu.attention(
                s.q.ptr(),
                k_cache,
                v_cache,
                s.context.ptr(),
                s.attention_partial.ptr(),
                s.split_counters.ptr(),
                step,
                &shape.attention,
                block_size,
            )?;
            gpu.matmul(
                s.context.ptr(),
                layer.o.ptr(),
                bias(&layer.o_bias),
                s.attn_out.ptr(),
                total,
                h,
                shape.q_width(),
                false,
            )?;
            gpu.add_rms_norm(
                s.x.ptr(),
                s.attn_out.ptr(),
                0,
                layer.ffn_norm.ptr(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            gpu.swiglu_product(
                normed,
                layer.gate_up.ptr(),
                s.gate_up.ptr(),
                s.act.ptr(),
                total,
                ffn,
                h,
            )?;
            gpu.matmul(s.act.ptr(), layer.down.ptr(), 0, s.mlp_out.ptr(), total, h, ffn, false)?;
        }
        gpu.add_rms_norm(
            s.x.ptr(),
            s.mlp_out.ptr(),
            pass.last_rows,
            w.final_norm.ptr(),
            s.last_normed.ptr(),
            pass.seqs,
            h,
            shape.eps,
        )?;
        gpu.matmul(
            s.last_normed.ptr(),
            w.output.ptr(),
            0,
            s.logits.ptr(),
            pass.seqs,
            shape.vocab,
            h,
            true,
        )
    }
}

/// One pass's device tables: what `queue_pass` launches over.
struct Pass {
    step: StepTables,
    ids: u64,
    last_rows: u64,
    /// Sequences (rows of logits), padding included.
    seqs: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_cover_every_key_in_whole_warps() {
        for blocks in [1, 32, 64, 512, 2048] {
            for longest in [1, 31, 32, 129, 1000, 4096, 32768] {
                let (splits, partition) = decode_splits(blocks, longest);
                assert!(splits >= 1 && partition % 32 == 0, "{blocks} {longest}");
                assert!(splits * partition >= longest, "{blocks} {longest}: keys left over");
                assert!((splits - 1) * partition < longest, "{blocks} {longest}: an empty split");
                if splits > 1 {
                    assert!(partition >= 128, "{blocks} {longest}: {partition} keys a split");
                }
            }
        }
        assert_eq!(decode_splits(32, 1024), (8, 128)); // one sequence of ChatGLM2-6B
        assert_eq!(decode_splits(2048, 1024).0, 1); // 64 sequences fill the chip alone
    }

    #[test]
    fn decode_blocks_group_the_heads_of_a_kv_head_once_sequences_fill_the_chip() {
        let chatglm2 = AttentionShape { num_heads: 32, num_kv_heads: 2, head_dim: 128 };
        let internlm2 = AttentionShape { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
        let llama = AttentionShape { num_heads: 32, num_kv_heads: 32, head_dim: 128 };
        let per_block = |n, shape: &AttentionShape| decode_heads_per_block(n, shape);
        assert_eq!([1, 8, 16, 64, 256].map(|n| per_block(n, &chatglm2)), [1, 1, 2, 8, 8]);
        assert_eq!([1, 8, 16, 64, 256].map(|n| per_block(n, &internlm2)), [1, 1, 2, 4, 4]);
        assert_eq!([1, 256].map(|n| per_block(n, &llama)), [1, 1]);
        // Divisors of the group only: 2 of a group of 6, 4 (not 8) of a group of 12.
        let six = AttentionShape { num_heads: 12, num_kv_heads: 2, head_dim: 64 };
        assert_eq!(per_block(256, &six), 2);
        let twelve = AttentionShape { num_heads: 24, num_kv_heads: 2, head_dim: 64 };
        assert_eq!(per_block(256, &twelve), 4);
    }

    fn test_shape() -> Shape {
        Shape {
            hidden: 64,
            num_layers: 2,
            attention: AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 16 },
            ffn: 128,
            vocab: 1000,
            eps: 1e-5,
            rope: Rope::RotateHalf,
            qkv_bias: false,
            o_bias: false,
        }
    }

    #[test]
    fn decode_batches_run_as_the_next_captured_size() {
        assert_eq!(graph_batch(0), Some(1));
        assert_eq!(graph_batch(1), Some(1));
        assert_eq!(graph_batch(3), Some(4));
        assert_eq!(graph_batch(9), Some(16));
        assert_eq!(graph_batch(64), Some(64));
        assert_eq!(graph_batch(65), Some(80));
        assert_eq!(graph_batch(256), Some(256));
        assert_eq!(graph_batch(257), None);
        assert!(GRAPH_BATCHES.windows(2).all(|w| w[0] < w[1]));
    }

    /// Every decode step of one graph shape puts each table at the same offset (the graph
    /// was captured with those addresses), whatever its real batch and lengths.
    #[test]
    fn graph_tables_keep_their_offsets_and_pad_with_tokens_that_write_nowhere() {
        let shape = test_shape();
        let inv_freq: InvFreq = Box::new(|_| rope::inv_freq(10000.0, 16));
        let mut cache = RopeCache::new(inv_freq(1));
        let block_size = 16;
        let blocks: Vec<Vec<u32>> = (0..4).map(|s| (0..8).map(|b| b * 4 + s).collect()).collect();
        let graph = Some(GraphShape { batch: 4, max_blocks: 8 });
        let ids = [[5u32], [6], [7], [8]];
        let lay_out = |cache: &mut RopeCache, starts: &[usize]| {
            let steps: Vec<SeqStep<'_>> = starts
                .iter()
                .enumerate()
                .map(|(s, &start)| SeqStep { ids: &ids[s], start, blocks: &blocks[s] })
                .collect();
            lay_out_tables(&shape, &inv_freq, cache, 64, &steps, block_size, graph).unwrap()
        };
        let three = lay_out(&mut cache, &[3, 40, 100]);
        let four = lay_out(&mut cache, &[120, 1, 17, 64]);
        assert_eq!(three.offsets, four.offsets);
        assert_eq!(three.words.len(), four.words.len());
        for words in [&three, &four] {
            assert_eq!((words.num_decode, words.num_tiles, words.max_blocks), (4, 0, 8));
            assert_eq!((words.splits, words.partition), (graph_splits(16), 0));
        }
        let table = |w: &TableWords, t: usize, len: usize| {
            w.words[w.offsets[t]..w.offsets[t] + len].to_vec()
        };
        // The padding sequence (the fourth of `three`): id 0, position 0, no slot, its own
        // row, a zero block table, cos 1 and sin 0.
        assert_eq!(table(&three, 0, 4), [5, 6, 7, 0]);
        assert_eq!(table(&three, 1, 4), [3, 40, 100, 0]);
        // Block b of sequence s is 4·b + s: positions 3, 40 and 100 are in blocks 0, 9 and 26.
        assert_eq!(table(&three, 2, 4), [3, 9 * 16 + 8, 26 * 16 + 4, NO_SLOT]);
        assert_eq!(table(&three, 3, 4), [0, 1, 2, 3]);
        assert_eq!(table(&three, 5, 4), [0, 1, 2, 3]);
        assert_eq!(table(&three, 8, 4), [0, 1, 2, 3]);
        let tables = table(&three, 6, 32);
        assert_eq!(tables[..8], [0, 0, 0, 0, 0, 0, 0, 0]); // sequence 0: block 0 of 8
        assert_eq!(tables[8..11], [1, 5, 9]); // sequence 1: 41 keys, 3 blocks, then zeros
        assert_eq!(tables[24..], [0; 8]);
        let freq_len = three.freq_len;
        let cos_sin = table(&three, 7, 4 * 2 * freq_len);
        let padding = &cos_sin[3 * 2 * freq_len..];
        assert!(padding[..freq_len].iter().all(|&c| f32::from_bits(c) == 1.0));
        assert!(padding[freq_len..].iter().all(|&s| f32::from_bits(s) == 0.0));
        // More sequences than the graph's batch, or a sequence beyond its block table, are
        // refused, not overrun.
        let five: Vec<SeqStep<'_>> =
            (0..5).map(|s| SeqStep { ids: &ids[0], start: s, blocks: &blocks[0] }).collect();
        assert!(lay_out_tables(&shape, &inv_freq, &mut cache, 64, &five, 16, graph).is_err());
        let steps = [SeqStep { ids: &ids[0], start: 8 * 16, blocks: &blocks[0] }];
        assert!(lay_out_tables(&shape, &inv_freq, &mut cache, 64, &steps, 16, graph).is_err());
    }

    /// What `reserve_activations` sets aside covers the tables and split results of every
    /// call within its limits: prompts in the smallest tiles, decodes with and without a
    /// graph, long and short sequences, mixed.
    #[test]
    fn reserved_tables_and_split_results_cover_every_call_within_the_limits() {
        let shape = test_shape();
        let inv_freq: InvFreq = Box::new(|_| rope::inv_freq(10000.0, 16));
        let mut cache = RopeCache::new(inv_freq(1));
        let (block_size, max_tokens, max_seqs, max_blocks_per_seq) = (16, 256, 60, 20usize);
        let seqs = graph_batch(max_seqs).unwrap();
        let table_words = shape.max_table_words(
            max_tokens.max(seqs),
            seqs,
            max_blocks_per_seq.next_power_of_two().max(GRAPH_MIN_BLOCKS),
        );
        let partial_floats = shape.max_partial_floats(seqs);
        let blocks: Vec<Vec<u32>> = (0..max_seqs)
            .map(|s| (0..max_blocks_per_seq).map(|b| (b * max_seqs + s) as u32).collect())
            .collect();
        let prompt: Vec<u32> = (0..max_tokens as u32).collect();
        let one = [7u32];
        let longest = max_blocks_per_seq * block_size;
        // (new tokens of each sequence, its start)
        let calls: Vec<Vec<(usize, usize)>> = vec![
            vec![(max_tokens, 0)],
            vec![(max_tokens - max_seqs + 1, longest - max_tokens)],
            (0..max_seqs).map(|s| (1, longest - 1 - s)).collect(),
            (0..max_seqs).map(|s| (1, s)).collect(),
            (0..3).map(|s| (1, s * 100)).collect(),
            (0..max_seqs - 2).map(|s| (1, s + 40)).chain([(100, 0), (90, 200)]).collect(),
        ];
        for (i, call) in calls.iter().enumerate() {
            let steps: Vec<SeqStep<'_>> = call
                .iter()
                .enumerate()
                .map(|(s, &(new, start))| SeqStep {
                    ids: if new == 1 { &one } else { &prompt[..new] },
                    start,
                    blocks: &blocks[s],
                })
                .collect();
            let decode_only = call.iter().all(|&(new, _)| new == 1);
            let graph = decode_only.then(|| {
                let widest = call.iter().map(|&(_, start)| (start + 1).div_ceil(block_size));
                let max_blocks = widest.max().unwrap().next_power_of_two().max(GRAPH_MIN_BLOCKS);
                GraphShape { batch: graph_batch(call.len()).unwrap(), max_blocks }
            });
            for graph in [None, graph] {
                for tile in [1, 64] {
                    let words =
                        lay_out_tables(&shape, &inv_freq, &mut cache, tile, &steps, 16, graph)
                            .unwrap();
                    assert!(words.words.len() <= table_words, "call {i}: {}", words.words.len());
                    let partial = words.partial_floats(&shape);
                    assert!(partial <= partial_floats, "call {i}: {partial} split floats");
                }
            }
        }
    }

    #[test]
    fn calls_without_a_graph_keep_their_own_shape() {
        let shape = test_shape();
        let inv_freq: InvFreq = Box::new(|_| rope::inv_freq(10000.0, 16));
        let mut cache = RopeCache::new(inv_freq(1));
        let blocks: Vec<u32> = (0..8).collect();
        let (prompt, next) = ([1u32, 2, 3], [4u32]);
        let steps = [
            SeqStep { ids: &prompt, start: 0, blocks: &blocks },
            SeqStep { ids: &next, start: 200, blocks: &blocks },
        ];
        let words = lay_out_tables(&shape, &inv_freq, &mut cache, 2, &steps, 32, None).unwrap();
        assert_eq!((words.num_decode, words.num_tiles, words.max_blocks), (1, 2, 7));
        assert_eq!((words.splits, words.partition), decode_splits(4, 201));
        assert!(words.partition > 0);
    }

    #[test]
    fn sampling_words_lay_out_each_row_and_the_penalized_ids_after_them() {
        const FIRST: &[u32] = &[3, 9];
        const SECOND: &[u32] = &[4];
        let row = |penalized: &'static [u32], repetition_penalty| SampleRow {
            width: 100,
            temperature: 0.5,
            top_k: 7,
            top_p: 0.9,
            repetition_penalty,
            penalized,
            uniform: 0.25,
            guard_invalid_scores: true,
        };
        let rows = [Some(row(FIRST, 1.2)), None, Some(row(SECOND, 1.0)), Some(row(SECOND, 2.0))];
        let words = sampling_words(&rows, 64);
        let w = cuda::SAMPLE_WORDS;
        assert_eq!(words.len(), 4 * w + 3);
        assert_eq!(words[..4], [0, 64, 3, 7]); // width capped at the logits row; active, guard
        assert_eq!(words[4..8], [2f32, 0.9, 1.2, 0.25].map(f32::to_bits));
        assert_eq!(words[8..10], [0, 2]);
        assert_eq!(words[w..2 * w], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // inactive
        assert_eq!(words[2 * w + 8..3 * w], [0, 0]); // no penalty: no ids
        assert_eq!(words[3 * w + 8..4 * w], [2, 1]);
        assert_eq!(words[4 * w..], [3, 9, 4]);
    }

    #[test]
    fn the_rope_cache_gives_the_cpu_engines_angles() {
        let inv_freq = rope::inv_freq(10000.0, 8);
        let mut cache = RopeCache::new(inv_freq.clone());
        let rows = cache.rows(&inv_freq, 3, 6).to_vec();
        for (i, position) in (3..6).enumerate() {
            let (cos, sin) = rope::cos_sin(&inv_freq, position);
            assert_eq!(rows[i * 8..i * 8 + 4], cos[..]);
            assert_eq!(rows[i * 8 + 4..i * 8 + 8], sin[..]);
        }
        // Other frequencies (dynamic NTK) get only the rows asked for, and leave the cache.
        let scaled = rope::inv_freq(20000.0, 8);
        let scaled_rows = cache.rows(&scaled, 7, 9).to_vec();
        assert_eq!(scaled_rows.len(), 2 * 8);
        assert_eq!(scaled_rows[8..12], rope::cos_sin(&scaled, 8).0[..]);
        assert_eq!(cache.rows.len(), 6 * 8);
        assert_eq!(cache.rows(&inv_freq, 5, 6), &rows[16..24]);
    }
}
