//! K/V of the sequences a CPU engine serves, in fixed-size blocks: per layer, K and V each
//! `[blocks, block_size, kv_heads, head]`, post-rope, where a head is `head_dim` f32 values
//! or, in the quantised formats, its packed levels with their scale and zero
//! (`kv_quant`). Sequences reach their positions through block tables (`sequence::blocks`).

use super::kv_quant;
use crate::dtype::KvFormat;

/// Zeroed memory mapped straight from the OS: pages are committed only once written and
/// returned whole when dropped, so a large, mostly idle KV arena costs what it holds (heap
/// memory of that size would be zeroed up front and kept by the allocator).
struct Mapped(Option<memmap2::MmapMut>);

impl Mapped {
    fn zeroed(bytes: usize) -> crate::Result<Self> {
        if bytes == 0 {
            return Ok(Mapped(None));
        }
        let map = memmap2::MmapOptions::new().len(bytes).map_anon().map_err(|e| {
            crate::Error::Unavailable(format!("mapping {bytes} bytes for the KV cache: {e}"))
        })?;
        Ok(Mapped(Some(map)))
    }

    fn get(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }

    fn get_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

pub struct KvArena {
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    format: KvFormat,
    num_blocks: usize,
    layers: Vec<(Mapped, Mapped)>,
}

impl KvArena {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        format: KvFormat,
        block_size: usize,
        num_blocks: usize,
    ) -> crate::Result<Self> {
        if format == KvFormat::Int4 && !head_dim.is_multiple_of(2) {
            return Err(crate::Error::Config(format!(
                "an int4 KV cache packs two values a byte; heads of {head_dim} values do not pair"
            )));
        }
        let mut arena =
            KvArena { block_size, kv_heads, head_dim, format, num_blocks: 0, layers: Vec::new() };
        arena.layers = (0..num_layers)
            .map(|_| Ok((Mapped::zeroed(0)?, Mapped::zeroed(0)?)))
            .collect::<crate::Result<_>>()?;
        arena.grow_to(num_blocks)?;
        Ok(arena)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Bytes of K/V one block holds across all layers.
    pub fn bytes_per_block(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        format: KvFormat,
        block_size: usize,
    ) -> usize {
        num_layers * 2 * block_size * format.bytes_per_token(kv_heads, head_dim, 4)
    }

    /// Bytes one position takes in one layer's K (or V).
    fn row_bytes(&self) -> usize {
        self.format.bytes_per_token(self.kv_heads, self.head_dim, 4)
    }

    /// Adds blocks at the end (a single sequence's private arena grows as it goes).
    pub fn grow_to(&mut self, num_blocks: usize) -> crate::Result<()> {
        if num_blocks <= self.num_blocks {
            return Ok(());
        }
        let bytes = num_blocks * self.block_size * self.row_bytes();
        for (k, v) in &mut self.layers {
            for store in [k, v] {
                let mut grown = Mapped::zeroed(bytes)?;
                let old = store.get();
                grown.get_mut()[..old.len()].copy_from_slice(old);
                *store = grown;
            }
        }
        self.num_blocks = num_blocks;
        Ok(())
    }

    /// Byte offset of `position`'s row.
    fn offset(&self, blocks: &[u32], position: usize) -> usize {
        let block = blocks[position / self.block_size] as usize;
        (block * self.block_size + position % self.block_size) * self.row_bytes()
    }

    /// Stores the K and V rows of `position` (`kv_heads · head_dim` values each).
    pub fn write(&mut self, layer: usize, blocks: &[u32], position: usize, k: &[f32], v: &[f32]) {
        let at = self.offset(blocks, position);
        let row = self.row_bytes();
        let (format, head_dim) = (self.format, self.head_dim);
        let (k_store, v_store) = &mut self.layers[layer];
        for (store, values) in [(k_store, k), (v_store, v)] {
            let out = &mut store.get_mut()[at..at + row];
            match format {
                KvFormat::Model => out.copy_from_slice(bytemuck::cast_slice(values)),
                _ => {
                    let head = kv_quant::head_bytes(head_dim, format);
                    for (o, x) in out.chunks_exact_mut(head).zip(values.chunks_exact(head_dim)) {
                        kv_quant::quantize_head(x, format, o);
                    }
                }
            }
        }
    }

    /// K and V of positions `0..len` as contiguous f32 `[len, kv_heads · head_dim]` rows.
    pub fn gather(&self, layer: usize, blocks: &[u32], len: usize) -> (Vec<f32>, Vec<f32>) {
        let row = self.row_bytes();
        let width = self.kv_heads * self.head_dim;
        let mut gathered = [Vec::with_capacity(len * width), Vec::with_capacity(len * width)];
        let stores = [self.layers[layer].0.get(), self.layers[layer].1.get()];
        let mut position = 0;
        while position < len {
            let run = (self.block_size - position % self.block_size).min(len - position);
            let at = self.offset(blocks, position);
            for (out, store) in gathered.iter_mut().zip(stores) {
                let bytes = &store[at..at + run * row];
                match self.format {
                    // Rows are whole f32s at 4-byte offsets of a page-aligned map.
                    KvFormat::Model => out.extend_from_slice(bytemuck::cast_slice(bytes)),
                    format => {
                        let head = kv_quant::head_bytes(self.head_dim, format);
                        for h in bytes.chunks_exact(head) {
                            kv_quant::dequantize_head(h, self.head_dim, format, out);
                        }
                    }
                }
            }
            position += run;
        }
        let [k, v] = gathered;
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_stores_rows_through_block_tables() {
        let mut arena = KvArena::new(1, 1, 2, KvFormat::Model, 2, 4).unwrap();
        let blocks = [3, 1, 0];
        for p in 0..5 {
            let x = p as f32;
            arena.write(0, &blocks, p, &[x, x + 0.5], &[-x, -x - 0.5]);
        }
        let (k, v) = arena.gather(0, &blocks, 5);
        assert_eq!(k, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]);
        assert_eq!(v[8..], [-4.0, -4.5]);
        assert_eq!(arena.gather(0, &[1], 1).0, vec![2.0, 2.5]); // block 1 holds positions 2, 3
    }

    /// Quantised, each head of each row holds exactly what `kv_quant` makes of it, through
    /// the block tables and across growth.
    #[test]
    fn quantised_rows_are_the_reference_quantisation_of_each_head() {
        for format in [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8] {
            let (kv_heads, head_dim) = (2, 8);
            let mut arena = KvArena::new(2, kv_heads, head_dim, format, 4, 2).unwrap();
            let blocks = [2, 0, 1];
            let row = |p: usize, sign: f32| -> Vec<f32> {
                (0..kv_heads * head_dim)
                    .map(|i| sign * ((p * 31 + i * 7) % 13) as f32 / 3.0)
                    .collect()
            };
            arena.grow_to(3).unwrap();
            for p in 0..10 {
                arena.write(1, &blocks, p, &row(p, 1.0), &row(p, -1.0));
            }
            arena.grow_to(5).unwrap();
            let (k, v) = arena.gather(1, &blocks, 10);
            let reference = |values: &[f32]| {
                let mut out = Vec::new();
                for head in values.chunks_exact(head_dim) {
                    let mut bytes = vec![0u8; kv_quant::head_bytes(head_dim, format)];
                    kv_quant::quantize_head(head, format, &mut bytes);
                    kv_quant::dequantize_head(&bytes, head_dim, format, &mut out);
                }
                out
            };
            for p in 0..10 {
                let width = kv_heads * head_dim;
                assert_eq!(
                    k[p * width..(p + 1) * width],
                    reference(&row(p, 1.0))[..],
                    "{format:?}"
                );
                assert_eq!(
                    v[p * width..(p + 1) * width],
                    reference(&row(p, -1.0))[..],
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn quantised_blocks_take_the_bytes_the_format_saves() {
        let bytes = |format| KvArena::bytes_per_block(28, 2, 128, format, 16);
        assert_eq!(bytes(KvFormat::Model), 28 * 2 * 16 * 2 * 128 * 4);
        assert_eq!(bytes(KvFormat::Int8), 28 * 2 * 16 * 2 * (128 + 4));
        assert_eq!(bytes(KvFormat::Int4), 28 * 2 * 16 * 2 * (64 + 4));
        assert_eq!(bytes(KvFormat::Fp8), bytes(KvFormat::Int8));
        assert!(KvArena::new(1, 1, 3, KvFormat::Int4, 16, 1).is_err());
    }
}
