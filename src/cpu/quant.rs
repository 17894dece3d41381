//! Quantised weight storage for `Linear` and the quantisers that fill it at load.
//!
//! W4 is the AWQ GEMM layout as checkpoints store it (`lmdeploy lite auto_awq`, AutoAWQ):
//! `qweight [in, out/8]` and `qzeros [in/G, out/8]` pack eight 4-bit values per word,
//! nibble i holding output column `8c + AWQ_ORDER[i]`, with f16 `scales [in/G, out]`; the
//! weight is `W[n, k] = (q[k, n] − z[k/G, n]) · s[k/G, n]`. Rows are input features, as in
//! the f32 path's transposed weight, so a tile of input rows dequantises to the same
//! layout the f32 product reads. W8 is int8 per output channel, symmetric.

use half::f16;

/// Nibble i of a packed word holds output column `8c + AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// 4-bit weights with per-group zero points and f16 scales, AWQ GEMM layout.
#[derive(Clone, Debug, PartialEq)]
pub struct W4 {
    pub qweight: Vec<u32>,
    pub qzeros: Vec<u32>,
    pub scales: Vec<f16>,
    pub group: usize,
}

/// 8-bit symmetric weights, one f32 scale per output channel; `q` is `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct W8 {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Packs `values [rows, out]` (each 0..=15, `out` a multiple of 8) into AWQ words
/// `[rows, out/8]`.
pub fn pack_awq(values: &[u8]) -> Vec<u32> {
    values
        .chunks_exact(8)
        .map(|cols| {
            AWQ_ORDER
                .iter()
                .enumerate()
                .fold(0u32, |word, (i, &col)| word | u32::from(cols[col] & 15) << (4 * i))
        })
        .collect()
}

/// Unpacks AWQ words `[rows, out/8]` into values `[rows, out]`.
pub fn unpack_awq(words: &[u32]) -> Vec<u8> {
    let mut values = vec![0u8; words.len() * 8];
    for (word, cols) in words.iter().zip(values.chunks_exact_mut(8)) {
        for (i, &col) in AWQ_ORDER.iter().enumerate() {
            cols[col] = ((word >> (4 * i)) & 15) as u8;
        }
    }
    values
}

impl W4 {
    /// Bytes held (packed weights, zeros and scales).
    pub fn bytes(&self) -> usize {
        4 * (self.qweight.len() + self.qzeros.len()) + 2 * self.scales.len()
    }

    /// Writes `W[n0..n1, k0..k1]` transposed into `tile` (`[k1 − k0, n1 − n0]` row-major);
    /// `n0` and `n1` are multiples of 8. `zs` is scratch for one group's zeros and scales.
    pub(super) fn dequantize(
        &self,
        n: usize,
        (k0, k1): (usize, usize),
        (n0, n1): (usize, usize),
        tile: &mut [f32],
        zs: &mut Vec<f32>,
    ) {
        let (words, width) = (n / 8, n1 - n0);
        let (c0, c1) = (n0 / 8, n1 / 8);
        let mut cached = usize::MAX;
        for k in k0..k1 {
            let g = k / self.group;
            if g != cached {
                // The group's zeros then scales, each in nibble order (entry 8c + i belongs
                // to nibble i of word c), so the loop below reads them in step with the bits.
                cached = g;
                zs.clear();
                zs.resize(2 * width, 0.0);
                let (zeros, scales) = zs.split_at_mut(width);
                let qzeros = &self.qzeros[g * words + c0..g * words + c1];
                let row_scales = &self.scales[g * n + n0..g * n + n1];
                for (c, word) in qzeros.iter().enumerate() {
                    for (i, &col) in AWQ_ORDER.iter().enumerate() {
                        zeros[8 * c + i] = ((word >> (4 * i)) & 15) as f32;
                        scales[8 * c + i] = row_scales[8 * c + col].to_f32();
                    }
                }
            }
            let (zeros, scales) = zs.split_at(width);
            let row = &mut tile[(k - k0) * width..(k - k0 + 1) * width];
            let packed = &self.qweight[k * words + c0..k * words + c1];
            for (c, (word, out)) in packed.iter().zip(row.chunks_exact_mut(8)).enumerate() {
                let (z, s) = (&zeros[8 * c..8 * c + 8], &scales[8 * c..8 * c + 8]);
                let mut values = [0f32; 8];
                for i in 0..8 {
                    // (q − z) · s in f32: exact up to one rounding, as the reference computes.
                    values[i] = (((word >> (4 * i)) & 15) as f32 - z[i]) * s[i];
                }
                for (i, &col) in AWQ_ORDER.iter().enumerate() {
                    out[col] = values[i];
                }
            }
        }
    }
}

impl W8 {
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// As [`W4::dequantize`], for any column range.
    pub(super) fn dequantize(
        &self,
        n: usize,
        (k0, k1): (usize, usize),
        (n0, n1): (usize, usize),
        tile: &mut [f32],
    ) {
        let width = n1 - n0;
        let scales = &self.scales[n0..n1];
        for k in k0..k1 {
            let q = &self.q[k * n + n0..k * n + n1];
            let row = &mut tile[(k - k0) * width..(k - k0 + 1) * width];
            for ((o, &q), s) in row.iter_mut().zip(q).zip(scales) {
                *o = f32::from(q) * s;
            }
        }
    }
}

/// Int8 per output row, symmetric (FastChat's `--load-8bit`): `scale = max|w| / 127`,
/// `q = round(w / scale)` clamped to ±127. `weight` is `[out, in]` row-major.
pub fn quantize_w8(weight: &[f32], out: usize, inp: usize) -> W8 {
    let mut q = vec![0i8; out * inp];
    let mut scales = Vec::with_capacity(out);
    for (o, row) in weight.chunks_exact(inp).enumerate() {
        let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        if scale == 0.0 {
            continue; // an all-zero row stays zero
        }
        for (k, w) in row.iter().enumerate() {
            q[k * out + o] = (w / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    W8 { q, scales }
}

/// 4-bit asymmetric round-to-nearest as lmdeploy's `pseudo_quantize_tensor` (per output
/// row and group of `group` inputs: `scale = (max − min).clamp(min=1e-5) / 15`,
/// `zero = clamp(−round(min / scale), 0, 15)`, `q = clamp(round(w / scale) + zero, 0, 15)`,
/// ties to even), packed in the AWQ layout. The scale is stored as f16 and q and zero are
/// computed with that stored scale. With `f16_math` every intermediate is rounded to f16
/// as PyTorch's float16 ops do, which reproduces the tool run on an f16 model bit for bit
/// (given f16 weights). `weight` is `[out, in]`; `in` must be a multiple of `group` and
/// `out` of 8.
pub fn quantize_w4(weight: &[f32], out: usize, inp: usize, group: usize, f16_math: bool) -> W4 {
    let round16 = |x: f32| if f16_math { f16::from_f32(x).to_f32() } else { x };
    let groups = inp / group;
    let mut q = vec![0u8; inp * out];
    let mut zeros = vec![0u8; groups * out];
    let mut scales = vec![f16::ZERO; groups * out];
    for (o, row) in weight.chunks_exact(inp).enumerate() {
        for (g, values) in row.chunks_exact(group).enumerate() {
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let min = values.iter().copied().fold(f32::INFINITY, f32::min);
            let range = round16(max - min).max(round16(1e-5));
            let scale = f16::from_f32(range / 15.0);
            let s = scale.to_f32();
            let zero = (-round16(min / s).round_ties_even()).clamp(0.0, 15.0);
            scales[g * out + o] = scale;
            zeros[g * out + o] = zero as u8;
            for (i, w) in values.iter().enumerate() {
                let k = g * group + i;
                q[k * out + o] = (round16(w / s).round_ties_even() + zero).clamp(0.0, 15.0) as u8;
            }
        }
    }
    W4 { qweight: pack_awq(&q), qzeros: pack_awq(&zeros), scales, group }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_follows_the_awq_nibble_order() {
        // Column j holds value j: nibble i must then hold AWQ_ORDER[i].
        let values: Vec<u8> = (0..8).collect();
        let word = pack_awq(&values)[0];
        assert_eq!(word, 0x7531_6420);
        assert_eq!(unpack_awq(&[word]), values);
    }

    /// `rows` of 4 inputs (one group), each repeated over 8 output channels.
    fn w4_of(rows: &[[f32; 4]]) -> Vec<(Vec<u8>, u8, f32)> {
        let weight: Vec<f32> =
            rows.iter().flat_map(|r| std::iter::repeat_n(r, 8).flatten()).copied().collect();
        let out = 8 * rows.len();
        let w4 = quantize_w4(&weight, out, 4, 4, false);
        let (q, z) = (unpack_awq(&w4.qweight), unpack_awq(&w4.qzeros));
        (0..out)
            .step_by(8)
            .map(|o| ((0..4).map(|k| q[k * out + o]).collect(), z[o], w4.scales[o].to_f32()))
            .collect()
    }

    #[test]
    fn w4_quantises_hand_computed_groups() {
        let got = w4_of(&[[-1.0, 0.0, 0.5, 2.0], [0.0, 15.0, 2.5, 3.5], [1.0, 2.5, 4.0, 16.0]]);
        // Range 3: scale f16(0.2) = 0.19995…, zero −round(−5.0012) = 5; 0.5 → round(2.5006) + 5.
        assert_eq!(got[0], (vec![0, 5, 8, 15], 5, f16::from_f32(0.2).to_f32()));
        // Scale 1: ties go to even (2.5 → 2, 3.5 → 4).
        assert_eq!(got[1], (vec![0, 15, 2, 4], 0, 1.0));
        // A positive minimum clamps the zero to 0 and the top value clamps at 15.
        assert_eq!(got[2], (vec![1, 2, 4, 15], 0, 1.0));
    }

    #[test]
    fn w4_constant_groups_use_the_smallest_range() {
        let got = w4_of(&[[0.0; 4]]);
        assert_eq!(got[0].2, f16::from_f32(1e-5 / 15.0).to_f32());
        assert_eq!(got[0].0, vec![got[0].1; 4]);
    }

    #[test]
    fn w8_is_symmetric_per_output_row() {
        let w8 = quantize_w8(&[0.5, -1.27, 0.01, 0.0, 0.0, 0.0], 2, 3);
        assert_eq!(w8.scales, vec![1.27 / 127.0, 0.0]);
        // [in, out] layout: row 0's values at q[k * 2].
        assert_eq!(w8.q, vec![50, 0, -127, 0, 1, 0]);
    }
}
