//! Device memory bandwidth and matrix throughput, timed with CUDA events (only
//! `triton-llm bench` uses these).

use cudarc::driver::sys as driver_sys;

use super::{Buffer, Gpu, ProductKernel, WeightView, device_error};
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
}
