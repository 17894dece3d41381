//! The CPU device ops: the f32 reference the golden fixtures are checked against and
//! the engine behind KIND_CPU instances. Activations are row-major `[tokens, width]`
//! slices; matrix products go through `faer` (SIMD, multi-threaded on rayon's pool).

/// The K/V blocks of the CPU path, in the model's f32 or quantised.
mod kv_arena;
/// The 8- and 4-bit KV formats' exact arithmetic.
pub mod kv_quant;

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// FP8 E4M3: the conversions the GPU's kernels make, and the `fp8` weight format.
pub mod fp8;
pub mod quant;

use fp8::Fp8;
use quant::{W4, W8};

pub use kv_arena::KvArena;

/// A linear layer, `y = x · Wᵀ (+ b)` with PyTorch's `W: [out_features, in_features]`.
///
/// The weight is kept transposed (`[in, out]` row-major, i.e. W column-major). As the
/// left operand of `yᵀ = W · xᵀ` faer then streams it without packing it first, for one row
/// as for many: a decode step reads the weights once at full bandwidth, and each row's
/// result is bit-identical whatever other rows share the product — so a sequence's answer
/// never depends on its batch. Quantised weights keep the same orientation and are
/// dequantised a tile at a time into the same layout (see [`Linear::forward`]).
pub struct Linear {
    weights: Weights,
    bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

enum Weights {
    F32(Vec<f32>),
    W8(W8),
    W4(W4),
    /// With every E4M3 value by its bits (the products read values, not bits).
    Fp8(Fp8, Box<[f32; 256]>),
}

/// Input rows dequantised per tile: with the column blocks below a tile stays within L2.
const TILE_FLOATS: usize = 1 << 14;
/// Output columns per parallel task of a large quantised product (a multiple of 8).
const COLUMN_BLOCK: usize = 256;
/// Weights of at least this many elements are multiplied on all cores.
const PARALLEL_WEIGHTS: usize = 1 << 20;

impl Linear {
    /// `weight` as PyTorch stores it, `[out_features, in_features]` row-major.
    pub fn new(
        weight: &[f32],
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        assert_eq!(weight.len(), out_features * in_features, "weight shape");
        let mut weight_t = vec![0f32; weight.len()];
        for (o, row) in weight.chunks_exact(in_features).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                weight_t[i * out_features + o] = w;
            }
        }
        Linear { weights: Weights::F32(weight_t), bias, out_features, in_features }
    }

    /// 8-bit weights of `[out_features, in_features]` (`q` stored `[in, out]`).
    pub fn from_w8(
        weights: W8,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        assert_eq!(weights.q.len(), out_features * in_features, "w8 shape");
        assert_eq!(weights.scales.len(), out_features, "w8 scales");
        Linear { weights: Weights::W8(weights), bias, out_features, in_features }
    }

    /// FP8 weights of `[out_features, in_features]` (`q` stored `[in, out]`); activations
    /// are quantised per token in `forward`.
    pub fn from_fp8(
        weights: Fp8,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        assert_eq!(weights.q.len(), out_features * in_features, "fp8 shape");
        assert_eq!(weights.scales.len(), out_features, "fp8 scales");
        let table = Box::new(fp8::e4m3_table());
        Linear { weights: Weights::Fp8(weights, table), bias, out_features, in_features }
    }

    /// 4-bit AWQ-layout weights; the caller has checked the shapes against the group.
    pub fn from_w4(
        weights: W4,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        let (n, k, g) = (out_features, in_features, weights.group);
        assert!(n.is_multiple_of(8) && g > 0 && k.is_multiple_of(g), "w4 shape");
        assert_eq!(weights.qweight.len(), k * n / 8, "w4 qweight");
        assert_eq!(weights.qzeros.len(), k / g * n / 8, "w4 qzeros");
        assert_eq!(weights.scales.len(), k / g * n, "w4 scales");
        Linear { weights: Weights::W4(weights), bias, out_features, in_features }
    }

    /// Bytes the weight (and bias) take in memory.
    pub fn weight_bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| 4 * b.len());
        bias + match &self.weights {
            Weights::F32(w) => 4 * w.len(),
            Weights::W8(w) => w.bytes(),
            Weights::W4(w) => w.bytes(),
            Weights::Fp8(w, _) => w.bytes(),
        }
    }

    /// The weight as f32, `[out_features, in_features]` (for checks against a reference).
    pub fn dequantized(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let mut weight_t = vec![0f32; n * k];
        self.dequantize_tile((0, k), (0, n), &mut weight_t, &mut Vec::new());
        if let Weights::Fp8(w, _) = &self.weights {
            for row in weight_t.chunks_exact_mut(n) {
                row.iter_mut().zip(&w.scales).for_each(|(v, s)| *v *= s);
            }
        }
        let mut weight = vec![0f32; n * k];
        for (i, row) in weight_t.chunks_exact(n).enumerate() {
            for (o, &w) in row.iter().enumerate() {
                weight[o * k + i] = w;
            }
        }
        weight
    }

    /// `W[n0..n1, k0..k1]` into `tile` as `[k1 − k0, n1 − n0]` row-major.
    fn dequantize_tile(
        &self,
        ks: (usize, usize),
        ns: (usize, usize),
        tile: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let n = self.out_features;
        match &self.weights {
            Weights::F32(w) => {
                let width = ns.1 - ns.0;
                for (k, row) in (ks.0..ks.1).zip(tile.chunks_exact_mut(width)) {
                    row.copy_from_slice(&w[k * n + ns.0..k * n + ns.1]);
                }
            }
            Weights::W8(w) => w.dequantize(n, ks, ns, tile),
            Weights::W4(w) => w.dequantize(n, ks, ns, tile, scratch),
            // The E4M3 values alone: their scales apply to the product.
            Weights::Fp8(w, table) => w.values(n, ks, ns, tile, table),
        }
    }

    /// `y[m, out] = x[m, in] · Wᵀ (+ b)`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let m = x.len() / k;
        debug_assert_eq!(x.len(), m * k);
        let mut y = match &self.weights {
            Weights::F32(weight_t) => {
                let mut y = vec![0f32; m * n];
                // yᵀ [n, m] = W [n, k] · xᵀ [k, m], all column-major views of row-major buffers.
                let lhs = MatRef::from_column_major_slice(weight_t, n, k);
                let rhs = MatRef::from_column_major_slice(x, k, m);
                let dst = MatMut::from_column_major_slice_mut(&mut y, n, m);
                // Threads pay off only on large weights; decided per layer, never per batch.
                let par = if n * k >= PARALLEL_WEIGHTS { Par::rayon(0) } else { Par::Seq };
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par);
                y
            }
            // Activations per token to E4M3 too; the sum over E4M3 values in f32 (their
            // products are exact), then both scales, as the FP8 products on the GPU.
            Weights::Fp8(w, table) => {
                let (values, row_scales) = fp8::quantize_rows(x, k, table);
                let mut y = self.forward_quantized(&values, m);
                for (row, row_scale) in y.chunks_exact_mut(n).zip(&row_scales) {
                    row.iter_mut().zip(&w.scales).for_each(|(v, s)| *v *= row_scale * s);
                }
                y
            }
            _ => self.forward_quantized(x, m),
        };
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        y
    }

    /// The product with quantised weights, never materialising the f32 weight: per block
    /// of output columns (one task each on a large weight), tiles of input rows are
    /// dequantised into a small scratch and multiplied into the block's result. The
    /// blocking depends on the layer only, so a row's result does not depend on its batch.
    fn forward_quantized(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        if m == 0 {
            return Vec::new();
        }
        let block = if n * k >= PARALLEL_WEIGHTS { COLUMN_BLOCK.min(n) } else { n };
        let rows = (TILE_FLOATS / block).clamp(8, k.max(8));
        let x_t = MatRef::from_column_major_slice(x, k, m);
        let run = |n0: usize| {
            let n1 = (n0 + block).min(n);
            let width = n1 - n0;
            // yᵀ[n0..n1, :] as a column-major [width, m] block.
            let mut acc = vec![0f32; width * m];
            let mut part = vec![0f32; width * m];
            let mut tile = vec![0f32; rows.min(k) * width];
            let mut scratch = Vec::new();
            for k0 in (0..k).step_by(rows) {
                let k1 = (k0 + rows).min(k);
                let tile = &mut tile[..(k1 - k0) * width];
                self.dequantize_tile((k0, k1), (n0, n1), tile, &mut scratch);
                let lhs = MatRef::from_column_major_slice(tile, width, k1 - k0);
                let rhs = x_t.submatrix(k0, 0, k1 - k0, m);
                // Each tile's product is a fresh one, summed here: faer accumulating into
                // `acc` would round differently for one row than for several.
                let target = if k0 == 0 { &mut acc } else { &mut part };
                let dst = MatMut::from_column_major_slice_mut(target, width, m);
                faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
                if k0 > 0 {
                    acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
                }
            }
            acc
        };
        if block == n {
            return run(0);
        }
        let blocks: Vec<Vec<f32>> =
            (0..n).step_by(block).collect::<Vec<_>>().into_par_iter().map(run).collect();
        let mut y = vec![0f32; m * n];
        for (b, acc) in blocks.iter().enumerate() {
            let n0 = b * block;
            let width = acc.len() / m;
            for (r, part) in acc.chunks_exact(width).enumerate() {
                y[r * n + n0..r * n + n0 + width].copy_from_slice(part);
            }
        }
        y
    }
}

/// RMSNorm over each row: `w ⊙ x / sqrt(mean(x²) + eps)`, statistics in f32.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(o, row)| {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * scale);
        }
    });
    out
}

/// `x += y`, element-wise (the residual connection).
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// SwiGLU: `silu(gate) ⊙ up` for rows laid out as `[gate | up]` of `2·width`.
pub fn silu_mul_packed(gate_up: &[f32], width: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * width);
    let mut out = vec![0f32; rows * width];
    for (o, row) in out.chunks_exact_mut(width).zip(gate_up.chunks_exact(2 * width)) {
        let (gate, up) = row.split_at(width);
        silu_mul_into(o, gate, up);
    }
    out
}

/// SwiGLU from separate gate and up projections of equal shape.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    silu_mul_into(&mut out, gate, up);
    out
}

fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// GLM rotary: rotates the first `2·cos.len()` dims of a head in interleaved pairs
/// `(x[2i], x[2i+1])`; the rest of the head passes through (spec chatglm2.md §3.5).
pub fn rope_interleaved(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[2 * i], head[2 * i + 1]);
        head[2 * i] = a * c - b * s;
        head[2 * i + 1] = b * c + a * s;
    }
}

/// NeoX / Llama "rotate half" rotary over a whole head: dim i pairs with i + d/2.
pub fn rope_rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * c - b * s;
        head[i + half] = b * c + a * s;
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Causal attention for one sequence. `q`: `[t, num_heads, head_dim]` for the positions
/// `start..start+t`; `k_cache`/`v_cache`: `[start+t, num_kv_heads, head_dim]`, already
/// holding these positions. Query head h reads K/V head `h / (num_heads / num_kv_heads)`.
/// Softmax in f32; returns `[t, num_heads · head_dim]`.
pub fn causal_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    start: usize,
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape { num_heads, num_kv_heads, head_dim } = shape;
    let group = num_heads / num_kv_heads;
    let kv_stride = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim).enumerate().for_each_init(Vec::new, |scores, (row, o)| {
        let (t, h) = (row / num_heads, row % num_heads);
        let q_head = &q[row * head_dim..(row + 1) * head_dim];
        let kv_offset = (h / group) * head_dim;
        let visible = start + t + 1;
        scores.clear();
        scores.extend((0..visible).map(|p| {
            let k = &k_cache[p * kv_stride + kv_offset..][..head_dim];
            q_head.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
        }));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        scores.iter_mut().for_each(|s| {
            *s = (*s - max).exp();
            total += *s;
        });
        o.fill(0.0);
        for (p, w) in scores.iter().enumerate() {
            let v = &v_cache[p * kv_stride + kv_offset..][..head_dim];
            let w = w / total;
            o.iter_mut().zip(v).for_each(|(acc, x)| *acc += w * x);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_row_dot_products() {
        let layer = Linear::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Some(vec![0.5, -0.5]), 2, 3);
        let y = layer.forward(&[1.0, 0.0, -1.0, 2.0, 1.0, 0.0]);
        assert_eq!(y, vec![-2.0 + 0.5, -2.0 - 0.5, 4.0 + 0.5, 13.0 - 0.5]);
    }

    #[test]
    fn a_row_gets_the_same_result_in_any_batch() {
        let (n, k) = (1024, 256);
        let mut state = 1u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let weight: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let layer = Linear::new(&weight, None, n, k);
        let rows: Vec<f32> = (0..64 * k).map(|_| next()).collect();
        let alone: Vec<Vec<f32>> = rows.chunks_exact(k).map(|row| layer.forward(row)).collect();
        for m in [1usize, 2, 3, 8, 33, 64] {
            let y = layer.forward(&rows[..m * k]);
            for (i, row) in y.chunks_exact(n).enumerate() {
                assert_eq!(row, &alone[i][..], "row {i} of a batch of {m}");
            }
        }
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let shape = AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 2 };
        let out = causal_attention(&[1.0, 2.0, 3.0, 4.0], &[0.3, 0.1], &[7.0, 8.0], 0, shape);
        assert_eq!(out, vec![7.0, 8.0, 7.0, 8.0]);
    }

    #[test]
    fn rotations_preserve_norm_and_rotate_the_right_pairs() {
        let (c, s) = (0.6f32, 0.8f32);
        let mut glm = [1.0, 0.0, 5.0, 6.0];
        rope_interleaved(&mut glm, &[c], &[s]);
        assert_eq!(glm, [0.6, 0.8, 5.0, 6.0]);
        let mut neox = [1.0, 0.0, 0.0, 1.0];
        rope_rotate_half(&mut neox, &[c, 1.0], &[s, 0.0]);
        assert_eq!(neox, [0.6, 0.0, 0.8, 1.0]);
    }
}
