//! K/V of the sequences a GPU path serves, in fixed-size blocks on the device: per layer,
//! K and V each `[blocks, block_size]` rows, post-rope, of `kv_heads · head_dim` elements of
//! the model's dtype or, quantised, `kv_heads` heads of packed levels with their f16 scale
//! and zero, byte for byte the rows `cpu::KvArena` stores (kernels/common.cuh). Kernels
//! reach positions through block tables, as on the CPU.

use std::sync::Arc;

use super::{Buffer, Gpu, View};
use crate::dtype::KvFormat;
use crate::{Error, Result};

pub struct KvArena {
    gpu: Arc<Gpu>,
    block_size: usize,
    /// Bytes of one position in one layer's K (or V).
    row_bytes: usize,
    format: KvFormat,
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
        (kv_heads, head_dim): (usize, usize),
        format: KvFormat,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        if format == KvFormat::Int4 && !head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "an int4 KV cache packs two values a byte; heads of {head_dim} values do not pair"
            )));
        }
        let row_bytes = format.bytes_per_token(kv_heads, head_dim, gpu.dtype.size());
        let mut arena = KvArena {
            gpu,
            block_size,
            row_bytes,
            format,
            num_blocks: 0,
            num_layers,
            layers: Vec::new(),
            generation: 0,
        };
        arena.grow_to(num_blocks)?;
        Ok(arena)
    }

    /// Bytes of K/V one block holds across all layers, `elem` bytes a value in the model's
    /// dtype.
    pub fn block_bytes(
        num_layers: usize,
        (kv_heads, head_dim): (usize, usize),
        format: KvFormat,
        block_size: usize,
        elem: usize,
    ) -> usize {
        num_layers * 2 * block_size * format.bytes_per_token(kv_heads, head_dim, elem)
    }

    /// How K and V are stored (fixed for the arena's life, so captured graphs stay valid).
    pub fn format(&self) -> KvFormat {
        self.format
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
        let bytes = num_blocks * self.block_size * self.row_bytes;
        let old_bytes = self.num_blocks * self.block_size * self.row_bytes;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_take_the_bytes_of_the_format_as_the_cpu_arena_lays_them_out() {
        let bytes = |format| KvArena::block_bytes(28, (2, 128), format, 16, 2);
        assert_eq!(bytes(KvFormat::Model), 28 * 2 * 16 * 2 * 128 * 2);
        for format in [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8] {
            // Quantised rows do not depend on the dtype: the CPU arena's, byte for byte.
            assert_eq!(bytes(format), crate::cpu::KvArena::bytes_per_block(28, 2, 128, format, 16));
        }
        // bf16 → int8 and int4: 256 → 132 and 68 bytes a head.
        assert!(bytes(KvFormat::Model) as f64 / bytes(KvFormat::Int8) as f64 >= 1.9);
        assert!(bytes(KvFormat::Model) as f64 / bytes(KvFormat::Int4) as f64 >= 3.6);
    }
}
