//! The KV cache's 8- and 4-bit formats, exactly: what the CPU path stores and what the GPU
//! kernels must store bit for bit. Per token and K/V head, asymmetric:
//!
//! - `scale = f16((max − min) / (2^bits − 1))`, `zero = f16(min)` (both clamped to f16's
//!   finite range first), and from here on `s = f32(scale)`, `z = f32(zero)`;
//! - `q = clamp(round_half_even((x − z) / s), 0, 2^bits − 1)`, or 0 where `s` is 0;
//! - `x' = q · s + z`, a rounded product then a rounded sum (no fused multiply-add).
//!
//! Values are bytes (int8) or nibbles (int4: value `2i` in the low nibble of byte `i`,
//! `2i + 1` in the high one); each head's scale then zero follow as two little-endian f16.

use half::f16;

/// Largest finite f16, the range scales and zeros are clamped to.
const F16_MAX: f32 = 65504.0;

/// The f16-rounded scale and zero of one head's values, as f32.
pub fn scale_zero(values: &[f32], bits: u32) -> (f16, f16) {
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if !(min.is_finite() && max.is_finite()) {
        return (f16::ZERO, f16::ZERO);
    }
    let levels = ((1u32 << bits) - 1) as f32;
    let scale = ((max - min) / levels).clamp(0.0, F16_MAX);
    (f16::from_f32(scale), f16::from_f32(min.clamp(-F16_MAX, F16_MAX)))
}

/// One value's level under `s` and `z` (f32 of the stored f16).
pub fn level(x: f32, s: f32, z: f32, bits: u32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    let top = ((1u32 << bits) - 1) as f32;
    ((x - z) / s).round_ties_even().clamp(0.0, top) as u8
}

/// A level back to its value.
pub fn value(q: u8, s: f32, z: f32) -> f32 {
    q as f32 * s + z
}

/// Bytes of one quantised head of `head_dim` values (values, then scale and zero).
pub fn head_bytes(head_dim: usize, bits: u32) -> usize {
    head_dim * bits as usize / 8 + 4
}

/// Quantises one head's values into `out` (`head_bytes` long).
pub fn quantize_head(values: &[f32], bits: u32, out: &mut [u8]) {
    let (scale, zero) = scale_zero(values, bits);
    let (s, z) = (scale.to_f32(), zero.to_f32());
    let packed = values.len() * bits as usize / 8;
    match bits {
        8 => {
            for (o, &x) in out[..packed].iter_mut().zip(values) {
                *o = level(x, s, z, 8);
            }
        }
        4 => {
            for (o, pair) in out[..packed].iter_mut().zip(values.chunks_exact(2)) {
                *o = level(pair[0], s, z, 4) | (level(pair[1], s, z, 4) << 4);
            }
        }
        _ => unreachable!("KV caches are quantised to 8 or 4 bits"),
    }
    out[packed..packed + 2].copy_from_slice(&scale.to_le_bytes());
    out[packed + 2..packed + 4].copy_from_slice(&zero.to_le_bytes());
}

/// The values of one quantised head (`head_bytes` of `head_dim` values), appended to `out`.
pub fn dequantize_head(bytes: &[u8], head_dim: usize, bits: u32, out: &mut Vec<f32>) {
    let packed = head_dim * bits as usize / 8;
    let s = f16::from_le_bytes([bytes[packed], bytes[packed + 1]]).to_f32();
    let z = f16::from_le_bytes([bytes[packed + 2], bytes[packed + 3]]).to_f32();
    match bits {
        8 => out.extend(bytes[..packed].iter().map(|&q| value(q, s, z))),
        4 => {
            for &b in &bytes[..packed] {
                out.push(value(b & 0xf, s, z));
                out.push(value(b >> 4, s, z));
            }
        }
        _ => unreachable!("KV caches are quantised to 8 or 4 bits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(values: &[f32], bits: u32) -> Vec<f32> {
        let mut bytes = vec![0u8; head_bytes(values.len(), bits)];
        quantize_head(values, bits, &mut bytes);
        let mut out = Vec::new();
        dequantize_head(&bytes, values.len(), bits, &mut out);
        out
    }

    #[test]
    fn levels_follow_the_stated_formula() {
        // min −1, max 2: int8 scale 3/255, zero −1.
        let values = [-1.0, 0.0, 0.5, 2.0];
        let mut bytes = vec![0u8; head_bytes(4, 8)];
        quantize_head(&values, 8, &mut bytes);
        let s = f16::from_f32(3.0 / 255.0).to_f32();
        let z = -1.0f32;
        let expected: Vec<u8> = values
            .iter()
            .map(|&x| ((x - z) / s).round_ties_even().clamp(0.0, 255.0) as u8)
            .collect();
        assert_eq!(bytes[..4], expected[..]);
        assert_eq!((bytes[0], bytes[3]), (0, 255));
        assert_eq!(bytes[4..6], f16::from_f32(3.0 / 255.0).to_le_bytes());
        assert_eq!(bytes[6..8], f16::from_f32(-1.0).to_le_bytes());
        // int4 packs value 2i low, 2i + 1 high: levels 0, 5, 8 (7.5 rounds to even), 15.
        let mut nibbles = vec![0u8; head_bytes(4, 4)];
        quantize_head(&values, 4, &mut nibbles);
        let s4 = f16::from_f32(3.0 / 15.0).to_f32();
        let l = |x: f32| ((x - z) / s4).round_ties_even() as u8;
        assert_eq!(nibbles[..2], [l(-1.0) | (l(0.0) << 4), l(0.5) | (l(2.0) << 4)]);
        assert_eq!(nibbles[1] >> 4, 15);
    }

    #[test]
    fn a_constant_head_comes_back_exactly() {
        for bits in [8, 4] {
            assert_eq!(round_trip(&[0.75; 16], bits), vec![0.75; 16]);
            assert_eq!(round_trip(&[0.0; 16], bits), vec![0.0; 16]);
        }
    }

    #[test]
    fn values_come_back_within_half_a_step() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
        };
        for bits in [8u32, 4] {
            for _ in 0..200 {
                let values: Vec<f32> = (0..128).map(|_| next()).collect();
                let back = round_trip(&values, bits);
                let (scale, _) = scale_zero(&values, bits);
                // Half a step, plus what rounding the scale and zero to f16 moves the ends.
                let bound = 0.5 * scale.to_f32() + 4e-3;
                for (x, y) in values.iter().zip(&back) {
                    assert!((x - y).abs() <= bound, "{bits} bits: {x} came back as {y}");
                }
            }
        }
    }

    #[test]
    fn values_outside_f16_or_not_finite_do_not_poison_the_head() {
        let back = round_trip(&[1e6, -1e6, 0.0, 1.0], 8);
        assert!(back.iter().all(|v| v.is_finite()));
        let back = round_trip(&[f32::NAN, 1.0], 8);
        assert!(back.iter().all(|v| v.is_finite()));
    }
}
