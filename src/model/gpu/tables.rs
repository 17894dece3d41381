//! One call's tables, laid out on the host as u32 words for a single upload: ids, positions,
//! K/V slots, token → sequence, block tables, rotary cos/sin and the attention's work
//! (decode rows and splits, prefill tiles); and the sampling kernel's words.

use super::graphs::GraphShape;
use super::{GpuModel, InvFreq, Shape};
use crate::cuda::{self, AttentionShape, DecodeLayout};
use crate::dtype::KvFormat;
use crate::model::{SeqStep, rope};
use crate::sampling::SampleRow;
use crate::{Error, Result};

impl Shape {
    /// The most table words a call of `tokens` tokens (graph padding included) and `seqs`
    /// sequences with block tables `max_blocks` wide lays out (`lay_out_tables`): ids,
    /// positions, slots, token → sequence, tiles of at least one token (two words each) and
    /// cos/sin per token; last rows, decode rows and the block table per sequence.
    pub(super) fn max_table_words(&self, tokens: usize, seqs: usize, max_blocks: usize) -> usize {
        tokens * (6 + 2 * self.freq_len()) + seqs * (2 + max_blocks)
    }

    /// The most floats the decode attention's split results take for `seqs` sequences:
    /// blocks × splits stays within DECODE_ATTENTION_BLOCKS plus one split per block
    /// (`decode_splits`, `graph_splits`), and a block takes at most MAX_DECODE_BLOCK_HEADS heads.
    pub(super) fn max_partial_floats(&self, seqs: usize) -> usize {
        let a = &self.attention;
        (DECODE_ATTENTION_BLOCKS * MAX_DECODE_BLOCK_HEADS + seqs * a.num_heads) * (a.head_dim + 2)
    }
}

/// cos/sin rows of the positions seen so far for the model's own inverse frequencies.
/// Others (InternLM2's dynamic NTK past its trained context, different at each length)
/// get just the rows asked for, computed afresh.
pub(super) struct RopeCache {
    inv_freq: Vec<f32>,
    /// Per position: cos of each frequency, then sin.
    rows: Vec<f32>,
    /// The rows last computed for other frequencies.
    uncached: Vec<f32>,
}

impl RopeCache {
    pub(super) fn new(inv_freq: Vec<f32>) -> Self {
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

impl GpuModel {
    /// Lays out one call's per-token tables as u32 words (one upload) for an arena of
    /// (block size, blocks) in `format`.
    pub(super) fn tables(
        &self,
        steps: &[SeqStep<'_>],
        arena: (usize, usize),
        format: KvFormat,
        graph: Option<GraphShape>,
    ) -> Result<TableWords> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|p| p.into_inner());
        let kernels = AttentionKernels {
            prefill_tile: self.gpu.prefill_tile(self.shape.attention.head_dim, format),
            mma_decode_heads: self.gpu.mma_decode_heads(&self.shape.attention, format),
        };
        lay_out_tables(&self.shape, &self.inv_freq, &mut cache, kernels, steps, arena, graph)
    }
}

/// What the attention kernels of a model's device, dtype and KV format take.
#[derive(Clone, Copy, Debug)]
pub(super) struct AttentionKernels {
    /// Query tokens a prefill block takes.
    pub(super) prefill_tile: usize,
    /// Query heads a tensor-core decode block takes, where that kernel applies.
    pub(super) mma_decode_heads: Option<usize>,
}

impl AttentionKernels {
    /// The CUDA-core kernels alone (the tests' layouts).
    #[cfg(test)]
    fn cuda_cores(prefill_tile: usize) -> Self {
        AttentionKernels { prefill_tile, mma_decode_heads: None }
    }
}

/// Lays out one call's per-token tables as u32 words and each table's word offset. With a
/// `graph` shape the tables are padded to its batch and block-table width, so that every
/// call of that shape puts each table at the same offset: padding tokens have id 0, position
/// 0, no K/V slot (-1), an all-zero block table and the identity rotation; the decode
/// attention divides each sequence's own keys (partition 0) over splits fixed by the batch.
/// `arena` is the K/V arena's (block size, blocks): every block a step names must be in it,
/// since the kernels write and read the slots these tables give without bounds of their own.
fn lay_out_tables(
    shape: &Shape,
    inv_freq: &InvFreq,
    cache: &mut RopeCache,
    kernels: AttentionKernels,
    steps: &[SeqStep<'_>],
    arena: (usize, usize),
    graph: Option<GraphShape>,
) -> Result<TableWords> {
    let (block_size, num_blocks) = arena;
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
        begun: [false; TABLES],
        freq_len,
        max_blocks,
        num_decode: 0,
        num_tiles: 0,
        splits: 1,
        partition: 0,
        heads_per_block: 1,
        decode_mma: false,
    };
    let vocab = shape.vocab;
    for step in steps {
        let needed = (step.start + step.ids.len()).div_ceil(block_size);
        if step.blocks.len() < needed {
            return Err(Error::Internal("a block table does not cover its sequence".into()));
        }
        if let Some(&block) = step.blocks[..needed].iter().find(|&&b| b as usize >= num_blocks) {
            return Err(Error::Internal(format!(
                "block {block} is outside the K/V arena's {num_blocks} blocks"
            )));
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
            for first in (0..step.ids.len()).step_by(kernels.prefill_tile) {
                let count = kernels.prefill_tile.min(step.ids.len() - first);
                words.words.extend([(row + first) as u32, count as u32]);
                words.num_tiles += 1;
            }
        }
        row += step.ids.len();
    }
    if words.num_decode > 0 {
        let longest = graph.is_none().then_some(longest_decode);
        let layout =
            decode_layout(words.num_decode, &shape.attention, kernels.mma_decode_heads, longest);
        words.heads_per_block = layout.heads_per_block;
        words.decode_mma = layout.tensor_cores;
        (words.splits, words.partition) = (layout.splits, layout.partition);
    }
    Ok(words)
}

/// The slot of a token whose K/V are not kept (kernels/rope_kv.cu reads it as -1).
const NO_SLOT: u32 = u32::MAX;

/// Blocks the decode attention aims for (a few per SM).
const DECODE_ATTENTION_BLOCKS: usize = 512;

/// The decode attention's layout for `num_decode` tokens whose longest sequence has
/// `longest` keys, or for a graph (None), which divides each sequence's own keys over splits
/// fixed by the batch; `mma_heads` as `AttentionKernels`.
pub(crate) fn decode_layout(
    num_decode: usize,
    attention: &AttentionShape,
    mma_heads: Option<usize>,
    longest: Option<usize>,
) -> DecodeLayout {
    let heads = decode_heads_per_block(num_decode, attention, mma_heads);
    decode_layout_with(num_decode, attention, heads, longest)
}

/// As `decode_layout`, with (heads a block, on the tensor cores) given.
pub(crate) fn decode_layout_with(
    num_decode: usize,
    attention: &AttentionShape,
    (heads_per_block, tensor_cores): (usize, bool),
    longest: Option<usize>,
) -> DecodeLayout {
    let blocks = num_decode * attention.num_heads / heads_per_block;
    let min_partition = if tensor_cores { MMA_DECODE_MIN_PARTITION } else { DECODE_MIN_PARTITION };
    let (splits, partition) = match longest {
        None => (graph_splits(blocks), 0),
        Some(longest) => decode_splits(blocks, longest, min_partition),
    };
    DecodeLayout { heads_per_block, tensor_cores, splits, partition }
}

/// Query heads sharing a K/V head that one decode attention block takes, and whether on the
/// tensor cores. The CUDA-core kernels (kernels/attention.cu, for 1, 2, 4 and 8 heads) take
/// the most, dividing the group, that still leaves DECODE_ATTENTION_BLOCKS / 2 blocks for
/// the decode tokens: many sequences then read each K/V head once per block of heads
/// instead of once per query head; few keep a block per head, and as many blocks as before.
/// Where that is 4 heads or more and the tensor-core kernel applies (`mma_heads`, up to 16
/// of the group), it takes those instead: K/V read once for up to 16 heads, their dot
/// products on the tensor cores, the splits filling the chip.
fn decode_heads_per_block(
    num_decode: usize,
    attention: &AttentionShape,
    mma_heads: Option<usize>,
) -> (usize, bool) {
    let group = attention.num_heads / attention.num_kv_heads;
    let cuda_cores = [MAX_BLOCK_HEADS, 4, 2]
        .into_iter()
        .find(|&h| {
            group.is_multiple_of(h)
                && num_decode * attention.num_heads / h >= DECODE_ATTENTION_BLOCKS / 2
        })
        .unwrap_or(1);
    match mma_heads {
        Some(heads) if cuda_cores >= 4 => (heads, true),
        _ => (cuda_cores, false),
    }
}

/// The most query heads a CUDA-core decode attention block takes (attention_decode_h8).
const MAX_BLOCK_HEADS: usize = 8;
/// The most any decode attention block takes (attention_decode_mma: the MMA's 16 rows).
const MAX_DECODE_BLOCK_HEADS: usize = 16;

/// Fewest keys a split of the tensor-core decode covers: one chunk, a warp's 16 keys four
/// times (MMA_DECODE_KEYS in kernels/attention_mma.cu).
const MMA_DECODE_MIN_PARTITION: usize = 64;

/// Fewest keys a decode split covers: four warps of 32 (DECODE_MIN_PARTITION in
/// kernels/attention.cu).
const DECODE_MIN_PARTITION: usize = 128;

/// How the decode attention splits the keys of its longest sequence: (splits, keys per
/// split). Enough splits that `blocks` (decode tokens × heads) times them fill the chip when
/// few sequences decode (flash-decoding), but at least `min_partition` keys each and a
/// multiple of 32.
fn decode_splits(blocks: usize, longest: usize, min_partition: usize) -> (usize, usize) {
    let most = (longest / min_partition).max(1);
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

pub(super) struct TableWords {
    pub(super) words: Vec<u32>,
    pub(super) offsets: [usize; TABLES],
    /// Tables laid out (the others are empty at offset 0).
    begun: [bool; TABLES],
    pub(super) freq_len: usize,
    pub(super) max_blocks: usize,
    pub(super) num_decode: usize,
    pub(super) num_tiles: usize,
    pub(super) splits: usize,
    pub(super) partition: usize,
    pub(super) heads_per_block: usize,
    pub(super) decode_mma: bool,
}

impl TableWords {
    /// Floats of the decode attention's split results.
    pub(super) fn partial_floats(&self, shape: &Shape) -> usize {
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
        self.begun[table] = true;
    }

    /// Where table `table` lies in the upload, as (first byte, bytes): up to the next
    /// table's start, the last one to the end of the words.
    pub(super) fn span(&self, table: usize) -> (usize, usize) {
        let begin = self.offsets[table];
        let end = (table + 1..TABLES)
            .find(|&next| self.begun[next])
            .map_or(self.words.len(), |next| self.offsets[next]);
        (begin * 4, (end - begin) * 4)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::Rope;
    use crate::model::gpu::graphs::{GRAPH_MIN_BLOCKS, graph_batch};

    #[test]
    fn decode_splits_cover_every_key_in_whole_warps() {
        for min_partition in [DECODE_MIN_PARTITION, MMA_DECODE_MIN_PARTITION] {
            for blocks in [1, 32, 64, 512, 2048] {
                for longest in [1, 31, 32, 129, 1000, 4096, 32768] {
                    let (splits, partition) = decode_splits(blocks, longest, min_partition);
                    let what = format!("{blocks} {longest} {min_partition}");
                    assert!(splits >= 1 && partition % 32 == 0, "{what}");
                    assert!(splits * partition >= longest, "{what}: keys left over");
                    assert!((splits - 1) * partition < longest, "{what}: an empty split");
                    if splits > 1 {
                        assert!(partition >= min_partition, "{what}: {partition} keys a split");
                    }
                }
            }
        }
        let cuda_cores = |blocks, longest| decode_splits(blocks, longest, DECODE_MIN_PARTITION);
        assert_eq!(cuda_cores(32, 1024), (8, 128)); // one sequence of ChatGLM2-6B
        assert_eq!(cuda_cores(2048, 1024).0, 1); // 64 sequences fill the chip alone
        // 64 ChatGLM2-6B sequences on the tensor cores (128 blocks of 16 heads) at 192 keys:
        // three splits of 64 where the CUDA-core rule would allow one.
        assert_eq!(decode_splits(128, 192, MMA_DECODE_MIN_PARTITION), (3, 64));
        assert_eq!(cuda_cores(128, 192).0, 1);
    }

    #[test]
    fn decode_blocks_group_the_heads_of_a_kv_head_once_sequences_fill_the_chip() {
        let chatglm2 = AttentionShape { num_heads: 32, num_kv_heads: 2, head_dim: 128 };
        let internlm2 = AttentionShape { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
        let llama = AttentionShape { num_heads: 32, num_kv_heads: 32, head_dim: 128 };
        let per_block = |n, shape: &AttentionShape| decode_heads_per_block(n, shape, None).0;
        assert_eq!([1, 8, 16, 64, 256].map(|n| per_block(n, &chatglm2)), [1, 1, 2, 8, 8]);
        assert_eq!([1, 8, 16, 64, 256].map(|n| per_block(n, &internlm2)), [1, 1, 2, 4, 4]);
        assert_eq!([1, 256].map(|n| per_block(n, &llama)), [1, 1]);
        // Divisors of the group only: 2 of a group of 6, 4 (not 8) of a group of 12.
        let six = AttentionShape { num_heads: 12, num_kv_heads: 2, head_dim: 64 };
        assert_eq!(per_block(256, &six), 2);
        let twelve = AttentionShape { num_heads: 24, num_kv_heads: 2, head_dim: 64 };
        assert_eq!(per_block(256, &twelve), 4);
        // The tensor cores take over where the CUDA cores would take 4 heads or more.
        let on_mma =
            |n, shape: &AttentionShape, heads| decode_heads_per_block(n, shape, Some(heads));
        assert_eq!(
            [1, 16, 64, 256].map(|n| on_mma(n, &chatglm2, 16)),
            [(1, false), (2, false), (16, true), (16, true)]
        );
        assert_eq!([16, 64].map(|n| on_mma(n, &internlm2, 4)), [(2, false), (4, true)]);
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
            lay_out_tables(
                &shape,
                &inv_freq,
                cache,
                AttentionKernels::cuda_cores(64),
                &steps,
                (block_size, 64),
                graph,
            )
            .unwrap()
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
        assert!(
            lay_out_tables(
                &shape,
                &inv_freq,
                &mut cache,
                AttentionKernels::cuda_cores(64),
                &five,
                (16, 64),
                graph
            )
            .is_err()
        );
        let steps = [SeqStep { ids: &ids[0], start: 8 * 16, blocks: &blocks[0] }];
        assert!(
            lay_out_tables(
                &shape,
                &inv_freq,
                &mut cache,
                AttentionKernels::cuda_cores(64),
                &steps,
                (16, 64),
                graph
            )
            .is_err()
        );
        // A block past the arena's end is refused: the kernels would write outside it.
        let steps = [SeqStep { ids: &ids[0], start: 40, blocks: &blocks[1] }];
        let (fits, short) = ((16, 10), (16, 9)); // the step reaches block 4·2 + 1 = 9
        assert!(
            lay_out_tables(
                &shape,
                &inv_freq,
                &mut cache,
                AttentionKernels::cuda_cores(64),
                &steps,
                fits,
                None
            )
            .is_ok()
        );
        let refused = lay_out_tables(
            &shape,
            &inv_freq,
            &mut cache,
            AttentionKernels::cuda_cores(64),
            &steps,
            short,
            None,
        );
        assert!(refused.is_err_and(|e| e.to_string().contains("block 9")));
    }

    /// What `reserve_activations` sets aside covers the tables and split results of every
    /// call within its limits: prompts in the smallest tiles, decodes with and without a
    /// graph, long and short sequences, mixed; for the CUDA-core kernels and for a group of
    /// 16 heads on the tensor cores (16 heads a decode block).
    #[test]
    fn reserved_tables_and_split_results_cover_every_call_within_the_limits() {
        check_reservations(test_shape(), None);
        let mut grouped = test_shape();
        grouped.attention = AttentionShape { num_heads: 32, num_kv_heads: 2, head_dim: 16 };
        check_reservations(grouped, Some(16));
    }

    fn check_reservations(shape: Shape, mma_decode_heads: Option<usize>) {
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
                for prefill_tile in [1, 64] {
                    let kernels = AttentionKernels { prefill_tile, mma_decode_heads };
                    let words = lay_out_tables(
                        &shape,
                        &inv_freq,
                        &mut cache,
                        kernels,
                        &steps,
                        (16, 1 << 20),
                        graph,
                    )
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
        let words = lay_out_tables(
            &shape,
            &inv_freq,
            &mut cache,
            AttentionKernels::cuda_cores(2),
            &steps,
            (32, 1 << 20),
            None,
        )
        .unwrap();
        assert_eq!((words.num_decode, words.num_tiles, words.max_blocks), (1, 2, 7));
        assert_eq!((words.splits, words.partition), decode_splits(4, 201, DECODE_MIN_PARTITION));
        assert!(words.partition > 0);
        // Each table's span runs to the next laid-out table (the never-used table 4 aside),
        // so the views the kernels get hold exactly what each table holds.
        let tokens = 4 * 4;
        assert_eq!(words.span(0), (0, tokens)); // ids
        assert_eq!(words.span(1), (tokens, tokens)); // positions
        assert_eq!(words.span(2).1, tokens); // slots
        assert_eq!(words.span(3).1, tokens); // token → sequence
        assert_eq!(words.span(5).1, 2 * 4); // last rows
        assert_eq!(words.span(6).1, 2 * words.max_blocks * 4); // block tables
        assert_eq!(words.span(7).1, 4 * 2 * words.freq_len * 4); // cos/sin
        assert_eq!(words.span(8).1, words.num_decode * 4);
        let (offset, bytes) = words.span(9);
        assert_eq!((offset + bytes, bytes), (words.words.len() * 4, words.num_tiles * 2 * 4));
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
            banned: &[],
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
