//! Device memory bandwidth and matrix throughput, timed with CUDA events (only
//! `triton-llm bench` uses these).

use cudarc::driver::sys as driver_sys;

use super::{
    AttentionShape, Buffer, DecodeLayout, Gpu, ProductKernel, StepTables, WeightView, device_error,
};
use crate::dtype::KvFormat;
use crate::{Error, Result};

impl Gpu {
    /// Times `f` with CUDA events after one warm-up call; returns milliseconds per call.
    pub fn time_ms(&self, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        let flags = Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(device_error("creating an event"))?;
        let end = self.ctx.new_event(flags).map_err(device_error("creating an event"))?;
        start.record(&self.stream).map_err(device_error("recording an event"))?;
        for _ in 0..repeats {
            f()?;
        }
        end.record(&self.stream).map_err(device_error("recording an event"))?;
        end.synchronize().map_err(device_error("waiting for an event"))?;
        let ms = start.elapsed_ms(&end).map_err(device_error("reading an event"))?;
        Ok(ms as f64 / repeats as f64)
    }

    /// Device memory bandwidth in bytes/s: a device-to-device copy of `bytes`, counting
    /// bytes read plus bytes written (the figure decode speed is held against).
    pub fn measure_bandwidth(&self, bytes: usize) -> Result<f64> {
        let src = self.alloc(bytes)?;
        let mut dst = self.alloc(bytes)?;
        self.fill_uniform(src.view(), bytes / self.dtype.size(), 7, 1.0)?;
        let ms = self.time_ms(20, || self.copy(&src, &mut dst, bytes))?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    }

    /// Weight bytes per second the product of `m` rows against an `[n, k]` weight reads on
    /// `kernel`, cycling through enough copies of the weight that none is still in L2 when it
    /// comes round again.
    pub fn measure_matmul_bandwidth(
        &self,
        kernel: ProductKernel,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<f64> {
        let bytes = n * k * self.dtype.size();
        let copies = (256usize << 20).div_ceil(bytes).max(2);
        let weights = (0..copies).map(|_| self.alloc(bytes)).collect::<Result<Vec<Buffer>>>()?;
        for (i, w) in weights.iter().enumerate() {
            self.fill_uniform(w.view(), n * k, 10 + i as u64, 0.01)?;
        }
        let x = self.alloc(m * k * self.dtype.size())?;
        self.fill_uniform(x.view(), m * k, 3, 1.0)?;
        let y = self.alloc(m * n * self.dtype.size())?;
        let mut next = 0;
        let repeats = 8 * copies;
        let ms = self.time_ms(repeats, || {
            next = (next + 1) % copies;
            self.matmul_on(kernel, x.view(), weights[next].view(), None, y.view(), m, n, k, false)
        })?;
        Ok(bytes as f64 / (ms * 1e-3))
    }

    /// Bytes per second the quantised GEMV of `m` rows (at most GEMV_MAX_ROWS) reads from
    /// an `[n, k]` weight of `bits` (4: groups of 128 inputs; 8), levels and scales counted,
    /// cycling through copies as `measure_matmul_bandwidth` does.
    pub fn measure_quant_bandwidth(&self, bits: u32, m: usize, n: usize, k: usize) -> Result<f64> {
        let group = 128;
        let (levels, params) = match bits {
            4 => (n * k / 2, n * (k / group) * 4),
            8 => (n * k, n * 4),
            other => return Err(Error::Config(format!("no {other}-bit weights"))),
        };
        let bytes = levels + params;
        let copies = (256usize << 20).div_ceil(bytes).max(2);
        let weights = (0..copies)
            .map(|_| Ok((self.alloc(levels)?, self.alloc(params)?)))
            .collect::<Result<Vec<(Buffer, Buffer)>>>()?;
        let x = self.alloc(m * k * self.dtype.size())?;
        self.fill_uniform(x.view(), m * k, 3, 1.0)?;
        let y = self.alloc(m * n * self.dtype.size())?;
        let mut next = 0;
        let ms = self.time_ms(8 * copies, || {
            next = (next + 1) % copies;
            let (packed, params) = (weights[next].0.view(), weights[next].1.view());
            let w = match bits {
                4 => WeightView::W4 { packed, params, group },
                _ => WeightView::W8 { packed, scales: params },
            };
            self.product(x.view(), w, None, y.view(), m, n, k, None)
        })?;
        Ok(bytes as f64 / (ms * 1e-3))
    }

    /// Matrix throughput in flop/s of this dtype's cuBLAS product at `size`³ on random data
    /// (the figure prefill is held against).
    pub fn measure_matmul(&self, size: usize) -> Result<f64> {
        let elems = size * size;
        let bytes = elems * self.dtype.size();
        let (a, b) = (self.alloc(bytes)?, self.alloc(bytes)?);
        let c = self.alloc(bytes)?;
        self.fill_uniform(a.view(), elems, 1, 1.0)?;
        self.fill_uniform(b.view(), elems, 2, 1.0)?;
        let ms = self.time_ms(10, || {
            self.matmul(a.view(), b.view(), None, c.view(), size, size, size, false)
        })?;
        Ok(2.0 * (size as f64).powi(3) / (ms * 1e-3))
    }

    /// K/V bytes per second the decode attention reads for one query token of each of
    /// `seqs` sequences of `context` keys (paged in blocks of 16, K/V in `format`), laid out
    /// as `layout`, cycling through copies of the cache as `measure_matmul_bandwidth` does
    /// through weights.
    pub fn measure_decode_attention(
        &self,
        shape: &AttentionShape,
        format: KvFormat,
        seqs: usize,
        context: usize,
        layout: DecodeLayout,
    ) -> Result<f64> {
        let e = self.dtype.size();
        let block_size = 16;
        let blocks_per_seq = context.div_ceil(block_size);
        let row_bytes = format.bytes_per_token(shape.num_kv_heads, shape.head_dim, e);
        let cache_bytes = seqs * blocks_per_seq * block_size * row_bytes;
        let read_bytes = 2 * seqs * context * row_bytes;
        let copies = (256usize << 20).div_ceil(read_bytes).max(2);
        // Quantised caches get the same random elems as bytes: finite levels, scales and
        // zeros (values of at most 1 in f16's bits), which is all the timing needs.
        let cache_elems = cache_bytes / e;
        let caches = (0..copies)
            .map(|i| {
                let (k, v) = (self.alloc(cache_bytes)?, self.alloc(cache_bytes)?);
                self.fill_uniform(k.view(), cache_elems, 20 + 2 * i as u64, 1.0)?;
                self.fill_uniform(v.view(), cache_elems, 21 + 2 * i as u64, 1.0)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<(Buffer, Buffer)>>>()?;
        let q_elems = seqs * shape.num_heads * shape.head_dim;
        let q = self.alloc(q_elems * e)?;
        self.fill_uniform(q.view(), q_elems, 5, 1.0)?;
        let out = self.alloc(q_elems * e)?;
        let partial =
            self.alloc(seqs * shape.num_heads * layout.splits * (shape.head_dim + 2) * 4)?;
        let counters = self.alloc(seqs * shape.num_heads * 4)?;
        // Tables: positions, K/V slots (unused), token sequences, block tables, decode rows.
        let seq_ids: Vec<u32> = (0..seqs as u32).collect();
        let mut words: Vec<u32> = vec![context as u32 - 1; seqs];
        words.extend(vec![0; seqs]);
        words.extend(&seq_ids);
        words.extend(0..(seqs * blocks_per_seq) as u32);
        words.extend(&seq_ids);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let tables = self.upload_bytes(&bytes)?;
        let table = |first: usize, len: usize| tables.range(4 * first, 4 * len);
        let step = StepTables {
            tokens: seqs,
            seqs,
            positions: table(0, seqs)?,
            slots: table(seqs, seqs)?,
            token_seq: table(2 * seqs, seqs)?,
            cos_sin: table(0, 0)?,
            freq_len: 0,
            block_tables: table(3 * seqs, seqs * blocks_per_seq)?,
            max_blocks_per_seq: blocks_per_seq,
            block_size,
            decode_rows: table(3 * seqs + seqs * blocks_per_seq, seqs)?,
            num_decode: seqs,
            splits: layout.splits,
            partition: layout.partition,
            heads_per_block: layout.heads_per_block,
            decode_mma: layout.tensor_cores,
            tiles: table(0, 0)?,
            num_tiles: 0,
        };
        let mut next = 0;
        let ms = self.time_ms(8 * copies, || {
            next = (next + 1) % copies;
            let (k, v) = &caches[next];
            self.attention(
                q.view(),
                (k.view(), v.view()),
                format,
                out.view(),
                partial.view(),
                counters.view(),
                &step,
                shape,
            )
        })?;
        Ok(read_bytes as f64 / (ms * 1e-3))
    }
}
