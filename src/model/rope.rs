//! Rotary angle tables shared by both families. The angles are formed in f32 exactly as
//! the originals' f32 code forms them (f32 inverse frequencies times an f32 position),
//! and only cos/sin are evaluated in f64 and rounded, so f32 goldens match to ~1e-7.

/// `1 / base^(2i / rotary_dim)` for i in `0..rotary_dim/2`, in f32.
pub fn inv_freq(base: f32, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            1.0 / ((base as f64).powf(exponent as f64) as f32)
        })
        .collect()
}

/// cos and sin of `position · inv_freq[i]` for every frequency.
pub fn cos_sin(inv_freq: &[f32], position: usize) -> (Vec<f32>, Vec<f32>) {
    let p = position as f32;
    inv_freq
        .iter()
        .map(|f| {
            let angle = (p * f) as f64;
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip()
}

/// Dynamic NTK scaling (spec internlm2.md §4.3): for a call whose longest position is
/// `total_len - 1`, the base grows once `total_len` exceeds `max_position_embeddings`.
/// Computed in f32 as the original does (its length is a tensor).
pub fn dynamic_ntk_base(
    base: f32,
    factor: f32,
    total_len: usize,
    max_position_embeddings: usize,
    head_dim: usize,
) -> f32 {
    if total_len <= max_position_embeddings {
        return base;
    }
    let ratio = factor * total_len as f32 / max_position_embeddings as f32 - (factor - 1.0);
    let exponent = head_dim as f64 / (head_dim as f64 - 2.0);
    base * ((ratio as f64).powf(exponent) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntk_base_matches_the_published_values() {
        // fixtures/internlm2/rope_ntk_golden.json: L = 40000 → ≈1.4498e6 for the 7B.
        let b = dynamic_ntk_base(1e6, 2.0, 40000, 32768, 128);
        assert!((b / 1.4498e6 - 1.0).abs() < 1e-4, "{b}");
        assert_eq!(dynamic_ntk_base(1e6, 2.0, 32768, 32768, 128), 1e6);
    }
}
