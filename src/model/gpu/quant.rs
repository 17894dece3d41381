//! Quantised linears in the GPU's layouts (kernels/gemv_quant.cu), laid out on the host
//! from the CPU path's storage (`cpu::quant`: AWQ's `[in, out/8]` words, or int8 `[in,
//! out]`) and put on the device. The GPU's are row-major (a row of W is an output), so a
//! family's row reordering (InternLM2's grouped QKV) and stacking ([gate | up]) move whole
//! rows, and a decode product reads each row's bytes in order.

use half::f16;

use crate::cpu::quant::{W4, W8, unpack_awq};
use crate::cuda::{Buffer, Gpu, View, WeightView};
use crate::model::quant::Quantized;
use crate::{Error, Result};

/// A quantised `[n, k]` weight in the GPU's layout, on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantRows {
    /// Per row: `k / 8` words of 4-bit levels in k order, then per group one word of
    /// (f16 scale, f16 zero).
    W4 { n: usize, k: usize, group: usize, packed: Vec<u32>, params: Vec<u32> },
    /// Per row: `k` int8 levels, and one f32 scale.
    W8 { n: usize, k: usize, levels: Vec<i8>, scales: Vec<f32> },
    /// Per row: `k` E4M3 bytes, and one f32 scale (`cpu::fp8`).
    Fp8 { n: usize, k: usize, values: Vec<u8>, scales: Vec<f32> },
}

impl QuantRows {
    /// The CPU path's storage of an `[n, k]` weight in the GPU's layout.
    pub fn from_cpu(quantized: &Quantized, n: usize, k: usize) -> Result<Self> {
        match quantized {
            Quantized::W4(w4) => Self::from_w4(w4, n, k),
            Quantized::W8(w8) => Ok(Self::from_w8(w8, n, k)),
            Quantized::Fp8(w) => {
                // The CPU path's `[in, out]` bytes as rows in k order.
                let values = (0..n * k).map(|i| w.q[(i % k) * n + i / k]).collect();
                Ok(QuantRows::Fp8 { n, k, values, scales: w.scales.clone() })
            }
        }
    }

    fn from_w4(w4: &W4, n: usize, k: usize) -> Result<Self> {
        let group = w4.group;
        if !n.is_multiple_of(8) || !k.is_multiple_of(32) || !group.is_multiple_of(32) {
            return Err(Error::Config(format!(
                "4-bit weights of {n} outputs and {k} inputs in groups of {group}: the GPU path \
                 needs outputs in eights and inputs and groups in multiples of 32"
            )));
        }
        let levels = unpack_awq(&w4.qweight); // [k, n]
        let zeros = unpack_awq(&w4.qzeros); // [k / group, n]
        let groups = k / group;
        let mut packed = Vec::with_capacity(n * k / 8);
        let mut params = Vec::with_capacity(n * groups);
        for row in 0..n {
            for word in 0..k / 8 {
                packed.push((0..8).fold(0u32, |acc, i| {
                    acc | (u32::from(levels[(8 * word + i) * n + row]) << (4 * i))
                }));
            }
            for g in 0..groups {
                let scale = w4.scales[g * n + row].to_bits();
                let zero = f16::from_f32(f32::from(zeros[g * n + row])).to_bits();
                params.push(u32::from(scale) | (u32::from(zero) << 16));
            }
        }
        Ok(QuantRows::W4 { n, k, group, packed, params })
    }

    fn from_w8(w8: &W8, n: usize, k: usize) -> Self {
        let mut levels = Vec::with_capacity(n * k);
        for row in 0..n {
            levels.extend((0..k).map(|i| w8.q[i * n + row]));
        }
        QuantRows::W8 { n, k, levels, scales: w8.scales.clone() }
    }

    #[cfg(test)]
    pub fn rows(&self) -> usize {
        match self {
            QuantRows::W4 { n, .. } | QuantRows::W8 { n, .. } | QuantRows::Fp8 { n, .. } => *n,
        }
    }

    /// The weight with rows `order` (each an index of this weight's rows), in that order.
    pub fn select_rows(&self, order: &[usize]) -> Self {
        match self {
            QuantRows::W4 { k, group, packed, params, .. } => {
                let (words, groups) = (k / 8, k / group);
                QuantRows::W4 {
                    n: order.len(),
                    k: *k,
                    group: *group,
                    packed: order
                        .iter()
                        .flat_map(|&r| &packed[r * words..][..words])
                        .copied()
                        .collect(),
                    params: order
                        .iter()
                        .flat_map(|&r| &params[r * groups..][..groups])
                        .copied()
                        .collect(),
                }
            }
            QuantRows::W8 { k, levels, scales, .. } => QuantRows::W8 {
                n: order.len(),
                k: *k,
                levels: order.iter().flat_map(|&r| &levels[r * k..][..*k]).copied().collect(),
                scales: order.iter().map(|&r| scales[r]).collect(),
            },
            QuantRows::Fp8 { k, values, scales, .. } => QuantRows::Fp8 {
                n: order.len(),
                k: *k,
                values: order.iter().flat_map(|&r| &values[r * k..][..*k]).copied().collect(),
                scales: order.iter().map(|&r| scales[r]).collect(),
            },
        }
    }

    /// The rows of `self` then those of `below` (the same kind, inputs and groups).
    pub fn stack(self, below: QuantRows) -> Result<Self> {
        match (self, below) {
            (
                QuantRows::W4 { n, k, group, mut packed, mut params },
                QuantRows::W4 { n: n2, k: k2, group: g2, packed: p2, params: q2 },
            ) if k == k2 && group == g2 => {
                packed.extend(p2);
                params.extend(q2);
                Ok(QuantRows::W4 { n: n + n2, k, group, packed, params })
            }
            (
                QuantRows::W8 { n, k, mut levels, mut scales },
                QuantRows::W8 { n: n2, k: k2, levels: l2, scales: s2 },
            ) if k == k2 => {
                levels.extend(l2);
                scales.extend(s2);
                Ok(QuantRows::W8 { n: n + n2, k, levels, scales })
            }
            (
                QuantRows::Fp8 { n, k, mut values, mut scales },
                QuantRows::Fp8 { n: n2, k: k2, values: v2, scales: s2 },
            ) if k == k2 => {
                values.extend(v2);
                scales.extend(s2);
                Ok(QuantRows::Fp8 { n: n + n2, k, values, scales })
            }
            _ => Err(Error::Internal("stacking weights of different layouts".into())),
        }
    }

    /// The weight as f32 `[n, k]`, as the kernels form each value.
    #[cfg(test)]
    pub fn dequantized(&self) -> Vec<f32> {
        match self {
            QuantRows::W4 { n, k, group, packed, params } => {
                let mut out = Vec::with_capacity(n * k);
                for row in 0..*n {
                    for i in 0..*k {
                        let q = (packed[row * (k / 8) + i / 8] >> (4 * (i % 8))) & 15;
                        let p = params[row * (k / group) + i / group];
                        let scale = f16::from_bits(p as u16).to_f32();
                        let zero = f16::from_bits((p >> 16) as u16).to_f32();
                        out.push((q as f32 - zero) * scale);
                    }
                }
                out
            }
            QuantRows::W8 { k, levels, scales, .. } => {
                levels.iter().enumerate().map(|(i, &q)| f32::from(q) * scales[i / k]).collect()
            }
            QuantRows::Fp8 { k, values, scales, .. } => values
                .iter()
                .enumerate()
                .map(|(i, &q)| crate::cpu::fp8::e4m3_to_f32(q) * scales[i / k])
                .collect(),
        }
    }

    /// Puts the weight on `gpu`.
    pub fn upload(&self, gpu: &Gpu) -> Result<DeviceWeight> {
        Ok(match self {
            QuantRows::W4 { group, packed, params, .. } => DeviceWeight::W4 {
                packed: gpu.upload_bytes(bytemuck::cast_slice(packed))?,
                params: gpu.upload_bytes(bytemuck::cast_slice(params))?,
                group: *group,
            },
            QuantRows::W8 { levels, scales, .. } => DeviceWeight::W8 {
                packed: gpu.upload_bytes(bytemuck::cast_slice(levels))?,
                scales: gpu.upload_bytes(bytemuck::cast_slice(scales))?,
            },
            QuantRows::Fp8 { values, scales, .. } => DeviceWeight::Fp8 {
                packed: gpu.upload_bytes(values)?,
                scales: gpu.upload_bytes(bytemuck::cast_slice(scales))?,
            },
        })
    }
}

/// A linear's weight on the device: elems, or quantised.
pub enum DeviceWeight {
    Dense(Buffer),
    W4 { packed: Buffer, params: Buffer, group: usize },
    W8 { packed: Buffer, scales: Buffer },
    Fp8 { packed: Buffer, scales: Buffer },
}

impl DeviceWeight {
    /// The weight as the products take it (an FP8 weight without scratch for its
    /// activations: see [`DeviceWeight::view_with`]).
    pub fn view(&self) -> WeightView<'_> {
        self.view_with(None)
    }

    /// [`DeviceWeight::view`], an FP8 weight's products quantising their activations into
    /// `fp8` (elems `[rows, k]` and an f32 scale a row).
    pub fn view_with<'a>(&'a self, fp8: Option<(View<'a>, View<'a>)>) -> WeightView<'a> {
        match self {
            DeviceWeight::Fp8 { packed, scales } => {
                WeightView::Fp8 { packed: packed.view(), scales: scales.view(), activations: fp8 }
            }
            DeviceWeight::Dense(w) => WeightView::Dense(w.view()),
            DeviceWeight::W4 { packed, params, group } => {
                WeightView::W4 { packed: packed.view(), params: params.view(), group: *group }
            }
            DeviceWeight::W8 { packed, scales } => {
                WeightView::W8 { packed: packed.view(), scales: scales.view() }
            }
        }
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self, DeviceWeight::Dense(_))
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            DeviceWeight::Dense(w) => w.bytes(),
            DeviceWeight::W4 { packed, params, .. } => packed.bytes() + params.bytes(),
            DeviceWeight::W8 { packed, scales } | DeviceWeight::Fp8 { packed, scales } => {
                packed.bytes() + scales.bytes()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::{quantize_w4, quantize_w8};

    fn weight(n: usize, k: usize) -> Vec<f32> {
        (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect()
    }

    /// The GPU layout holds exactly the weight the CPU path computes with.
    #[test]
    fn the_gpu_layouts_hold_the_cpu_paths_weights() {
        let (n, k) = (24, 256);
        let w = weight(n, k);
        for group in [32, 128] {
            let w4 = quantize_w4(&w, n, k, group, false);
            let cpu = crate::cpu::Linear::from_w4(w4.clone(), None, n, k).dequantized();
            let rows = QuantRows::from_cpu(&Quantized::W4(w4), n, k).unwrap();
            assert_eq!(rows.dequantized(), cpu, "group {group}");
        }
        let w8 = quantize_w8(&w, n, k);
        let cpu = crate::cpu::Linear::from_w8(w8.clone(), None, n, k).dequantized();
        let rows = QuantRows::from_cpu(&Quantized::W8(w8), n, k).unwrap();
        assert_eq!(rows.dequantized(), cpu);
        let fp8 = crate::cpu::fp8::quantize_fp8(&w, n, k);
        let cpu = crate::cpu::Linear::from_fp8(fp8.clone(), None, n, k).dequantized();
        let rows = QuantRows::from_cpu(&Quantized::Fp8(fp8), n, k).unwrap();
        assert_eq!(rows.dequantized(), cpu);
    }

    #[test]
    fn rows_reorder_and_stack_as_whole_rows() {
        let (n, k) = (16, 64);
        let w = weight(n, k);
        for quantized in [
            Quantized::W4(quantize_w4(&w, n, k, 32, false)),
            Quantized::W8(quantize_w8(&w, n, k)),
            Quantized::Fp8(crate::cpu::fp8::quantize_fp8(&w, n, k)),
        ] {
            let rows = QuantRows::from_cpu(&quantized, n, k).unwrap();
            let dense = rows.dequantized();
            let order: Vec<usize> = (0..n).rev().collect();
            let reversed = rows.select_rows(&order).dequantized();
            for (i, &r) in order.iter().enumerate() {
                assert_eq!(reversed[i * k..(i + 1) * k], dense[r * k..(r + 1) * k]);
            }
            let stacked = rows.clone().stack(rows.select_rows(&[3])).unwrap();
            assert_eq!(stacked.rows(), n + 1);
            assert_eq!(stacked.dequantized()[n * k..], dense[3 * k..4 * k]);
        }
        let w4 = QuantRows::from_cpu(&Quantized::W4(quantize_w4(&w, n, k, 32, false)), n, k);
        let w8 = QuantRows::from_cpu(&Quantized::W8(quantize_w8(&w, n, k)), n, k);
        assert!(w4.unwrap().stack(w8.unwrap()).is_err());
    }
}
