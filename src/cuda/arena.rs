//! K/V of the sequences a GPU path serves, in fixed-size blocks on the device: per layer,
//! K and V each `[blocks, block_size, kv_width]` elements of the model's dtype, post-rope.
//! Kernels reach positions through block tables, as on the CPU (`cpu::KvArena`).

use std::sync::Arc;

use super::{Buffer, Gpu, View};
use crate::{Error, Result};

pub struct KvArena {
    gpu: Arc<Gpu>,
    block_size: usize,
    kv_width: usize,
    num_blocks: usize,
    num_layers: usize,
    /// Per layer (K, V); empty while the arena has no blocks.
    layers: Vec<(Buffer, Buffer)>,
    /// New whenever the layers move (CUDA graphs hold their addresses).
    generation: u64,
}

/// Source of `KvArena::generation`s, unique in the process.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl KvArena {
    pub fn new(
        gpu: Arc<Gpu>,
        num_layers: usize,
        kv_width: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        let mut arena = KvArena {
            gpu,
            block_size,
            kv_width,
            num_blocks: 0,
            num_layers,
            layers: Vec::new(),
            generation: 0,
        };
        arena.grow_to(num_blocks)?;
        Ok(arena)
    }

    /// Bytes of K/V one block holds across all layers.
    pub fn block_bytes(
        num_layers: usize,
        kv_width: usize,
        block_size: usize,
        elem: usize,
    ) -> usize {
        num_layers * 2 * block_size * kv_width * elem
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Changes whenever the layers' device addresses change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Layer `layer`'s K and V.
    pub fn layer(&self, layer: usize) -> Result<(View<'_>, View<'_>)> {
        match self.layers.get(layer) {
            Some((k, v)) => Ok((k.view(), v.view())),
            None => Err(Error::Internal(format!(
                "layer {layer} of a K/V arena of {} layers with {} blocks",
                self.num_layers, self.num_blocks
            ))),
        }
    }

    /// Adds blocks at the end, keeping what the old ones hold.
    pub fn grow_to(&mut self, num_blocks: usize) -> Result<()> {
        if num_blocks <= self.num_blocks {
            return Ok(());
        }
        let bytes = num_blocks * self.block_size * self.kv_width * self.gpu.dtype.size();
        let old_bytes = self.num_blocks * self.block_size * self.kv_width * self.gpu.dtype.size();
        let mut layers = Vec::with_capacity(self.num_layers);
        for l in 0..self.num_layers {
            let (mut k, mut v) = (self.gpu.alloc(bytes)?, self.gpu.alloc(bytes)?);
            if let Some((old_k, old_v)) = self.layers.get(l) {
                self.gpu.copy(old_k, &mut k, old_bytes)?;
                self.gpu.copy(old_v, &mut v, old_bytes)?;
            }
            layers.push((k, v));
        }
        self.layers = layers;
        self.num_blocks = num_blocks;
        self.generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
