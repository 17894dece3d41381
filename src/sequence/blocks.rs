//! KV-cache block bookkeeping (pure; the device arena holding the data is elsewhere): a
//! free list, reference counts, a block table per sequence, and prefix reuse — full blocks
//! are registered under a hash of all tokens up to their end, so a later prompt with the
//! same prefix (a multi-round chat resending its history) shares them. Unreferenced cached
//! blocks stay reusable until space is needed, then the least recently used go first.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

pub type BlockId = u32;

/// Identifies a full block's content: its tokens and everything before them. A match is
/// trusted without comparing tokens, so it is 128 bits from two hashers keyed at random per
/// engine: an accidental collision is out of reach, and clients cannot craft one.
type BlockHash = u128;

#[derive(Debug)]
struct ChainHasher([RandomState; 2]);

impl ChainHasher {
    fn new() -> Self {
        ChainHasher([RandomState::new(), RandomState::new()])
    }

    fn hash(&self, previous: BlockHash, tokens: &[u32]) -> BlockHash {
        let half = |keys: &RandomState| {
            let mut hasher = keys.build_hasher();
            previous.hash(&mut hasher);
            tokens.hash(&mut hasher);
            hasher.finish() as u128
        };
        (half(&self.0[0]) << 64) | half(&self.0[1])
    }
}

/// Cached blocks nobody references, in the order they became so: a cache hit takes one out
/// from anywhere (a long chat history hits many of hundreds of thousands of blocks) and
/// eviction takes the oldest, both in O(log n).
#[derive(Debug)]
struct Evictable {
    by_age: BTreeMap<u64, BlockId>,
    /// Each block's key in `by_age`, while it is there.
    age: Vec<Option<u64>>,
    next_age: u64,
}

impl Evictable {
    fn new(num_blocks: usize) -> Self {
        Evictable { by_age: BTreeMap::new(), age: vec![None; num_blocks], next_age: 0 }
    }

    fn len(&self) -> usize {
        self.by_age.len()
    }

    fn push(&mut self, block: BlockId) {
        self.by_age.insert(self.next_age, block);
        self.age[block as usize] = Some(self.next_age);
        self.next_age += 1;
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(age) = self.age[block as usize].take() {
            self.by_age.remove(&age);
        }
    }

    fn pop_oldest(&mut self) -> Option<BlockId> {
        let (_, block) = self.by_age.pop_first()?;
        self.age[block as usize] = None;
        Some(block)
    }
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Never-used or invalidated blocks.
    free: Vec<BlockId>,
    /// Cached blocks nobody references, oldest first (evicted in this order).
    evictable: Evictable,
    cached: HashMap<BlockHash, BlockId>,
    /// The hash a block is registered under, if any.
    block_hash: Vec<Option<BlockHash>>,
    hasher: ChainHasher,
    enable_prefix_caching: bool,
    /// Prompt tokens served from cached blocks since the start.
    pub prefix_hit_tokens: u64,
}

/// A sequence's blocks and how many of its tokens are in them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
    /// Full blocks already registered for reuse (a prefix of `blocks`).
    registered: usize,
    /// Hash chain up to the last registered block.
    last_hash: BlockHash,
    /// Its K/V were computed in a way no other sequence's would be (past the rope limit):
    /// none of its blocks is offered for reuse.
    unshareable: bool,
}

impl BlockTable {
    pub fn mark_unshareable(&mut self) {
        self.unshareable = true;
    }
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: Evictable::new(num_blocks),
            cached: HashMap::new(),
            block_hash: vec![None; num_blocks],
            hasher: ChainHasher::new(),
            enable_prefix_caching,
            prefix_hit_tokens: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn used(&self) -> usize {
        self.num_blocks() - self.available()
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take_block(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let block = self.evictable.pop_oldest()?;
                if let Some(hash) = self.block_hash[block as usize].take() {
                    self.cached.remove(&hash);
                }
                block
            }
        };
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Blocks for a new prompt: cached full blocks of its prefix are shared, the rest are
    /// fresh. Returns the table and how many prompt tokens are already computed, or None
    /// (nothing taken) when there is not enough room. At least the last prompt token is
    /// always left to compute, since its logits start the answer.
    pub fn allocate_prompt(&mut self, prompt: &[u32], reuse: bool) -> Option<(BlockTable, usize)> {
        let mut table = BlockTable::default();
        let mut hits = Vec::new();
        if self.enable_prefix_caching && reuse {
            let reusable = prompt.len().saturating_sub(1) / self.block_size;
            let mut hash = 0;
            for chunk in prompt.chunks_exact(self.block_size).take(reusable) {
                hash = self.hasher.hash(hash, chunk);
                match self.cached.get(&hash) {
                    Some(&block) => hits.push((block, hash)),
                    None => break,
                }
            }
        }
        let needed = self.blocks_for(prompt.len()) - hits.len();
        let hits_evictable = hits.iter().filter(|(b, _)| self.ref_counts[*b as usize] == 0).count();
        if self.available() - hits_evictable < needed {
            return None;
        }
        for &(block, hash) in &hits {
            if self.ref_counts[block as usize] == 0 {
                self.evictable.remove(block);
            }
            self.ref_counts[block as usize] += 1;
            table.blocks.push(block);
            table.last_hash = hash;
        }
        table.registered = hits.len();
        for _ in 0..needed {
            table.blocks.push(self.take_block().expect("room was checked"));
        }
        let cached_tokens = hits.len() * self.block_size;
        self.prefix_hit_tokens += cached_tokens as u64;
        Some((table, cached_tokens))
    }

    /// Makes room for `len` tokens in `table`; false (nothing taken) when out of blocks.
    pub fn grow(&mut self, table: &mut BlockTable, len: usize) -> bool {
        let needed = self.blocks_for(len).saturating_sub(table.blocks.len());
        if needed > self.available() {
            return false;
        }
        for _ in 0..needed {
            table.blocks.push(self.take_block().expect("room was checked"));
        }
        true
    }

    /// Registers the blocks that `tokens` (all computed) fill completely, for reuse.
    pub fn register_full_blocks(&mut self, table: &mut BlockTable, tokens: &[u32]) {
        if !self.enable_prefix_caching || table.unshareable {
            return;
        }
        let full = (tokens.len() / self.block_size).min(table.blocks.len());
        while table.registered < full {
            let start = table.registered * self.block_size;
            let hash = self.hasher.hash(table.last_hash, &tokens[start..start + self.block_size]);
            let block = table.blocks[table.registered];
            // A block with the same content may already be cached (two identical prompts
            // computed at once); the first one stays the cached copy.
            if !self.cached.contains_key(&hash) && self.block_hash[block as usize].is_none() {
                self.cached.insert(hash, block);
                self.block_hash[block as usize] = Some(hash);
            }
            table.last_hash = hash;
            table.registered += 1;
        }
    }

    /// Returns a sequence's blocks. Cached ones stay reusable until evicted.
    pub fn free(&mut self, table: BlockTable) {
        for block in table.blocks {
            let count = &mut self.ref_counts[block as usize];
            *count -= 1;
            if *count == 0 {
                if self.block_hash[block as usize].is_some() {
                    self.evictable.push(block);
                } else {
                    self.free.push(block);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn blocks_are_allocated_grown_and_freed() {
        let mut m = BlockManager::new(4, 4, false);
        let (mut table, cached) = m.allocate_prompt(&tokens(6, 0), true).unwrap();
        assert_eq!((table.blocks.len(), cached, m.available()), (2, 0, 2));
        assert!(m.grow(&mut table, 8));
        assert_eq!(table.blocks.len(), 2);
        assert!(m.grow(&mut table, 9));
        assert_eq!((table.blocks.len(), m.available()), (3, 1));
        assert!(!m.grow(&mut table, 17)); // needs 2 more, has 1: nothing taken
        assert_eq!(m.available(), 1);
        m.free(table);
        assert_eq!(m.available(), 4);
    }

    #[test]
    fn a_prompt_that_does_not_fit_takes_nothing() {
        let mut m = BlockManager::new(2, 4, true);
        assert!(m.allocate_prompt(&tokens(9, 0), true).is_none());
        assert_eq!(m.available(), 2);
    }

    #[test]
    fn a_shared_prefix_reuses_full_blocks() {
        let mut m = BlockManager::new(8, 4, true);
        let first = tokens(10, 0); // blocks [0..4) [4..8) full, [8..10) partial
        let (mut table, cached) = m.allocate_prompt(&first, true).unwrap();
        assert_eq!(cached, 0);
        m.register_full_blocks(&mut table, &first);
        let shared = table.blocks[..2].to_vec();
        m.free(table);
        assert_eq!(m.available(), 8); // cached blocks stay available (evictable)

        // The next round resends the history and adds to it.
        let mut second = first.clone();
        second.extend([99, 98, 97, 96, 95]);
        let (table, cached) = m.allocate_prompt(&second, true).unwrap();
        assert_eq!(cached, 8);
        assert_eq!(&table.blocks[..2], &shared[..]);
        assert_eq!(m.prefix_hit_tokens, 8);

        // A different prompt shares nothing.
        let (other, cached) = m.allocate_prompt(&tokens(10, 1), true).unwrap();
        assert_eq!(cached, 0);
        assert!(other.blocks.iter().all(|b| !table.blocks.contains(b)));
    }

    #[test]
    fn the_last_prompt_token_is_always_computed() {
        let mut m = BlockManager::new(8, 4, true);
        let prompt = tokens(8, 0); // exactly two full blocks
        let (mut table, _) = m.allocate_prompt(&prompt, true).unwrap();
        m.register_full_blocks(&mut table, &prompt);
        m.free(table);
        let (_, cached) = m.allocate_prompt(&prompt, true).unwrap();
        assert_eq!(cached, 4); // the second block holds the last token: recomputed
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_used_first() {
        let mut m = BlockManager::new(3, 2, true);
        for salt in [0, 1] {
            let prompt = tokens(3, salt);
            let (mut table, _) = m.allocate_prompt(&prompt, true).unwrap();
            m.register_full_blocks(&mut table, &prompt);
            m.free(table);
        }
        // 2 cached blocks (salt 0 older), 1 plain free block. A 6-token prompt needs 3.
        let (table, cached) = m.allocate_prompt(&tokens(6, 5), true).unwrap();
        assert_eq!((cached, table.blocks.len(), m.available()), (0, 3, 0));
        m.free(table);
        // Both cached prefixes were evicted: nothing is reused.
        assert_eq!(m.allocate_prompt(&tokens(3, 1), true).unwrap().1, 0);
    }

    #[test]
    fn a_hit_refreshes_its_block_and_the_rest_keep_their_order() {
        // Blocks of 2: a 3-token prompt caches its first block, its second goes back free.
        let mut m = BlockManager::new(4, 2, true);
        let use_prompt = |m: &mut BlockManager, salt| {
            let prompt = tokens(3, salt);
            let (mut table, hit) = m.allocate_prompt(&prompt, true).unwrap();
            m.register_full_blocks(&mut table, &prompt);
            m.free(table);
            hit
        };
        for salt in [0, 1, 2] {
            assert_eq!(use_prompt(&mut m, salt), 0);
        }
        // The oldest (salt 0) is hit and let go again: now the newest.
        assert_eq!(use_prompt(&mut m, 0), 2);
        assert_eq!(m.available(), 4);
        // Two fresh blocks: the free one, then the oldest cached one (salt 1's).
        let (fresh, _) = m.allocate_prompt(&tokens(4, 9), false).unwrap();
        m.free(fresh);
        for (salt, reused) in [(0, 2), (1, 0), (2, 2)] {
            let (table, hit) = m.allocate_prompt(&tokens(3, salt), true).unwrap();
            assert_eq!(hit, reused, "salt {salt}");
            m.free(table);
        }
    }

    #[test]
    fn a_prompt_may_opt_out_of_reuse() {
        let mut m = BlockManager::new(8, 4, true);
        let prompt = tokens(12, 0);
        let (mut table, _) = m.allocate_prompt(&prompt, true).unwrap();
        m.register_full_blocks(&mut table, &prompt);
        m.free(table);
        assert_eq!(m.allocate_prompt(&prompt, false).unwrap().1, 0);
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared() {
        let mut m = BlockManager::new(8, 4, false);
        let prompt = tokens(12, 0);
        let (mut table, _) = m.allocate_prompt(&prompt, true).unwrap();
        m.register_full_blocks(&mut table, &prompt);
        m.free(table);
        assert_eq!(m.allocate_prompt(&prompt, true).unwrap().1, 0);
    }
}
