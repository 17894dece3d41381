//! Where K/V lives: the KV space of one engine (the device arena holding K/V and the block
//! bookkeeping that hands its blocks to sequences, kept in step), and a single sequence's
//! private cache over the same arena for direct forward calls (the CLI's logits, tests).

use super::Sequence;
use super::blocks::BlockManager;
use crate::Result;
use crate::dtype::KvFormat;
use crate::model::{CausalLm, KvStore, SeqStep};

pub struct KvSpace {
    pub arena: Box<dyn KvStore>,
    pub blocks: BlockManager,
    /// `ModelInfo::length_dependent_rope_after`.
    rope_limit: Option<usize>,
}

/// Whether a sequence got its blocks.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Not enough free blocks now: wait for others to finish.
    Later,
    /// More blocks than the whole cache holds.
    Never(String),
}

impl KvSpace {
    pub fn new(
        model: &dyn CausalLm,
        format: KvFormat,
        block_size: usize,
        num_blocks: usize,
        enable_prefix_caching: bool,
    ) -> Result<Self> {
        Ok(KvSpace {
            arena: model.new_arena(block_size, num_blocks, format)?,
            blocks: BlockManager::new(num_blocks, block_size, enable_prefix_caching),
            rope_limit: model.info().length_dependent_rope_after,
        })
    }

    /// Gives a sequence the blocks of its tokens so far, sharing a cached prefix.
    pub fn admit(&mut self, sequence: &mut Sequence) -> Admission {
        let tokens = sequence.tokens().len();
        let needed = self.blocks.blocks_for(tokens);
        if needed > self.blocks.num_blocks() {
            return Admission::Never(format!(
                "prompt: {tokens} tokens need {needed} KV-cache blocks of {} but the cache holds \
                 only {}",
                self.blocks.block_size(),
                self.blocks.num_blocks()
            ));
        }
        // Past the limit the prompt's K depends on its own length (computed in one call, see
        // `must_prefill_whole`): nothing cached fits it, and its blocks fit nothing else.
        // This holds for a preempted sequence recomputed past the limit too.
        let reuse = self.rope_limit.is_none_or(|limit| tokens <= limit);
        match self.blocks.allocate_prompt(sequence.tokens(), reuse) {
            Some((mut table, cached)) => {
                if !reuse {
                    table.mark_unshareable();
                }
                sequence.table = table;
                sequence.set_computed(cached);
                Admission::Admitted
            }
            None => Admission::Later,
        }
    }

    /// Room for the sequence's next `tokens` tokens; false (nothing taken) when out of blocks.
    pub fn ensure(&mut self, sequence: &mut Sequence, tokens: usize) -> bool {
        let len = sequence.computed() + tokens;
        self.blocks.grow(&mut sequence.table, len)
    }

    /// Whether the rest of this sequence's prompt must run in one call (see
    /// `ModelInfo::length_dependent_rope_after`).
    pub fn must_prefill_whole(&self, sequence: &Sequence) -> bool {
        self.rope_limit.is_some_and(|limit| sequence.tokens().len() > limit)
    }

    /// Offers the sequence's newly filled blocks for reuse: those computed in calls that
    /// did not reach past the rope limit, whose K is the same for every such call (a
    /// sequence admitted past it has its table marked unshareable).
    pub fn register(&mut self, sequence: &mut Sequence) {
        let limit = self.rope_limit.unwrap_or(usize::MAX);
        let (table, computed) = sequence.table_and_computed_tokens();
        let reusable = &computed[..computed.len().min(limit)];
        self.blocks.register_full_blocks(table, reusable);
    }

    /// Takes back the sequence's blocks (finished or preempted).
    pub fn release(&mut self, sequence: &mut Sequence) {
        self.blocks.free(sequence.take_blocks());
    }
}

/// One sequence's private K/V for direct forward calls: an arena of its own whose blocks,
/// in order, are the sequence's, growing by doubling.
pub struct KvCache {
    arena: Box<dyn KvStore>,
    blocks: Vec<u32>,
    /// Number of positions stored.
    len: usize,
}

impl KvCache {
    pub const BLOCK_SIZE: usize = 64;

    pub fn new(model: &dyn CausalLm) -> Result<Self> {
        Self::with_format(model, KvFormat::Model)
    }

    /// A cache that stores K/V as `format`.
    pub fn with_format(model: &dyn CausalLm, format: KvFormat) -> Result<Self> {
        let arena = model.new_arena(Self::BLOCK_SIZE, 0, format)?;
        Ok(KvCache { arena, blocks: Vec::new(), len: 0 })
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `ids` after what the cache holds (`forward_batch` of one) and keeps their K/V;
    /// returns the last position's logits.
    pub fn forward(&mut self, model: &dyn CausalLm, ids: &[u32]) -> Result<Vec<f32>> {
        let blocks = (self.len + ids.len()).div_ceil(Self::BLOCK_SIZE);
        if blocks > self.arena.num_blocks() {
            self.arena.grow_to(blocks.max(2 * self.arena.num_blocks()))?;
            self.blocks = (0..self.arena.num_blocks() as u32).collect();
        }
        let step = SeqStep { ids, start: self.len, blocks: &self.blocks };
        let mut logits = model.forward_batch(self.arena.as_mut(), &[step])?;
        self.len += ids.len();
        Ok(logits.pop().expect("one sequence in, one row of logits out"))
    }
}
