//! The KV cache's quantised formats, exactly: what the CPU path stores and what the GPU
//! kernels must store bit for bit. Per token and K/V head:
//!
//! - int8 and int4, asymmetric: `scale = f16((max − min) / (2^bits − 1))`, `zero = f16(min)`
//!   (both clamped to f16's finite range first), and from here on `s = f32(scale)`,
//!   `z = f32(zero)`; `q = clamp(round_half_even((x − z) / s), 0, 2^bits − 1)`, or 0 where
//!   `s` is 0; `x' = q · s + z`, a rounded product then a rounded sum (no fused multiply-add);
//! - fp8, symmetric: `scale = f16(max|x| / 448)` (clamped likewise; 0 where the largest
//!   magnitude is not finite), `zero = 0`; `q = e4m3(x / s)` (`cpu::fp8`: nearest even,
//!   saturating), or 0 where `s` is 0; `x' = e4m3_value(q) · s + z` as above.
//!
//! Values are bytes (int8, fp8) or nibbles (int4: value `2i` in the low nibble of byte `i`,
//! `2i + 1` in the high one); each head's scale then zero follow as two little-endian f16.

use half::f16;

use super::fp8::{E4M3_MAX, e4m3_from_f32, e4m3_to_f32};
use crate::dtype::KvFormat;

/// Largest finite f16, the range scales and zeros are clamped to.
const F16_MAX: f32 = 65504.0;

/// The smallest and largest of `values`, passing over NaN.
fn min_max(values: &[f32]) -> (f32, f32) {
    values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The f16-rounded scale and zero of one head's values in an integer format of `bits`.
pub fn scale_zero(values: &[f32], bits: u32) -> (f16, f16) {
    let (min, max) = min_max(values);
    if !(min.is_finite() && max.is_finite()) {
        return (f16::ZERO, f16::ZERO);
    }
    let levels = ((1u32 << bits) - 1) as f32;
    let scale = ((max - min) / levels).clamp(0.0, F16_MAX);
    (f16::from_f32(scale), f16::from_f32(min.clamp(-F16_MAX, F16_MAX)))
}

/// The f16-rounded scale of one head's values in fp8.
pub fn fp8_scale(values: &[f32]) -> f16 {
    let (min, max) = min_max(values);
    let amax = min.abs().max(max.abs());
    if !amax.is_finite() {
        return f16::ZERO;
    }
    f16::from_f32((amax / E4M3_MAX).min(F16_MAX))
}

/// One value's level under `s` and `z` (f32 of the stored f16).
pub fn level(x: f32, s: f32, z: f32, bits: u32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    let top = ((1u32 << bits) - 1) as f32;
    ((x - z) / s).round_ties_even().clamp(0.0, top) as u8
}

/// One value's E4M3 bits under the fp8 scale `s`.
pub fn fp8_level(x: f32, s: f32) -> u8 {
    if s == 0.0 { 0 } else { e4m3_from_f32(x / s) }
}

/// A level's value (an integer level, or the E4M3 value of fp8's bits) back to the head's.
pub fn value(level: f32, s: f32, z: f32) -> f32 {
    level * s + z
}

/// Bytes of one quantised head of `head_dim` values (values, then scale and zero).
pub fn head_bytes(head_dim: usize, format: KvFormat) -> usize {
    head_dim * bits(format) as usize / 8 + 4
}

fn bits(format: KvFormat) -> u32 {
    format.bits().expect("only quantised KV formats have heads of levels")
}

/// Quantises one head's values into `out` (`head_bytes` long).
pub fn quantize_head(values: &[f32], format: KvFormat, out: &mut [u8]) {
    let packed = values.len() * bits(format) as usize / 8;
    let (scale, zero) = match format {
        KvFormat::Fp8 => (fp8_scale(values), f16::ZERO),
        _ => scale_zero(values, bits(format)),
    };
    let (s, z) = (scale.to_f32(), zero.to_f32());
    match format {
        KvFormat::Int8 => {
            for (o, &x) in out[..packed].iter_mut().zip(values) {
                *o = level(x, s, z, 8);
            }
        }
        KvFormat::Int4 => {
            for (o, pair) in out[..packed].iter_mut().zip(values.chunks_exact(2)) {
                *o = level(pair[0], s, z, 4) | (level(pair[1], s, z, 4) << 4);
            }
        }
        KvFormat::Fp8 => {
            for (o, &x) in out[..packed].iter_mut().zip(values) {
                *o = fp8_level(x, s);
            }
        }
        KvFormat::Model => unreachable!("{}", "the model's type is not quantised"),
    }
    out[packed..packed + 2].copy_from_slice(&scale.to_le_bytes());
    out[packed + 2..packed + 4].copy_from_slice(&zero.to_le_bytes());
}

/// The values of one quantised head (`head_bytes` of `head_dim` values), appended to `out`.
pub fn dequantize_head(bytes: &[u8], head_dim: usize, format: KvFormat, out: &mut Vec<f32>) {
    let packed = head_dim * bits(format) as usize / 8;
    let s = f16::from_le_bytes([bytes[packed], bytes[packed + 1]]).to_f32();
    let z = f16::from_le_bytes([bytes[packed + 2], bytes[packed + 3]]).to_f32();
    let levels = &bytes[..packed];
    match format {
        KvFormat::Int8 => out.extend(levels.iter().map(|&q| value(f32::from(q), s, z))),
        KvFormat::Int4 => {
            for &b in levels {
                out.push(value(f32::from(b & 0xf), s, z));
                out.push(value(f32::from(b >> 4), s, z));
            }
        }
        KvFormat::Fp8 => out.extend(levels.iter().map(|&q| value(e4m3_to_f32(q), s, z))),
        KvFormat::Model => unreachable!("{}", "the model's type is not quantised"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INT: [KvFormat; 2] = [KvFormat::Int8, KvFormat::Int4];

    fn round_trip(values: &[f32], format: KvFormat) -> Vec<f32> {
        let mut bytes = vec![0u8; head_bytes(values.len(), format)];
        quantize_head(values, format, &mut bytes);
        let mut out = Vec::new();
        dequantize_head(&bytes, values.len(), format, &mut out);
        out
    }

    #[test]
    fn levels_follow_the_stated_formula() {
        // min −1, max 2: int8 scale 3/255, zero −1.
        let values = [-1.0, 0.0, 0.5, 2.0];
        let mut bytes = vec![0u8; head_bytes(4, KvFormat::Int8)];
        quantize_head(&values, KvFormat::Int8, &mut bytes);
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
        let mut nibbles = vec![0u8; head_bytes(4, KvFormat::Int4)];
        quantize_head(&values, KvFormat::Int4, &mut nibbles);
        let s4 = f16::from_f32(3.0 / 15.0).to_f32();
        let l = |x: f32| ((x - z) / s4).round_ties_even() as u8;
        assert_eq!(nibbles[..2], [l(-1.0) | (l(0.0) << 4), l(0.5) | (l(2.0) << 4)]);
        assert_eq!(nibbles[1] >> 4, 15);
    }

    #[test]
    fn a_constant_head_comes_back_exactly() {
        for format in INT {
            assert_eq!(round_trip(&[0.75; 16], format), vec![0.75; 16], "{format:?}");
            assert_eq!(round_trip(&[0.0; 16], format), vec![0.0; 16], "{format:?}");
        }
        // fp8's scale is an f16 (0.75 / 448 rounds down; 0.75 saturates at 448 steps): a
        // constant comes back within f16's precision, zeros exactly.
        for &x in &round_trip(&[0.75; 16], KvFormat::Fp8) {
            assert!((x - 0.75).abs() <= 0.75 / 2048.0, "{x}");
        }
        assert_eq!(round_trip(&[0.0; 16], KvFormat::Fp8), vec![0.0; 16]);
    }

    #[test]
    fn values_come_back_within_half_a_step() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
        };
        for format in INT {
            let bits = format.bits().unwrap();
            for _ in 0..200 {
                let values: Vec<f32> = (0..128).map(|_| next()).collect();
                let back = round_trip(&values, format);
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
        for format in [KvFormat::Int8, KvFormat::Fp8] {
            let back = round_trip(&[1e6, -1e6, 0.0, 1.0], format);
            assert!(back.iter().all(|v| v.is_finite()), "{format:?}");
        }
        let back = round_trip(&[f32::NAN, 1.0], KvFormat::Int8);
        assert!(back.iter().all(|v| v.is_finite()));
        // fp8 keeps a NaN where it was (as E4M3's NaN), and only there.
        let back = round_trip(&[f32::NAN, 1.0, -0.5], KvFormat::Fp8);
        assert!(back[0].is_nan());
        let s = fp8_scale(&[1.0, -0.5]).to_f32();
        let want = |x: f32| e4m3_to_f32(e4m3_from_f32(x / s)) * s;
        assert_eq!(back[1..], [want(1.0), want(-0.5)]);
        // An infinity leaves no finite scale: the head reads back as zeros.
        assert_eq!(round_trip(&[f32::INFINITY, 1.0], KvFormat::Fp8), [0.0, 0.0]);
    }

    #[test]
    fn fp8_heads_follow_the_stated_formula() {
        // max|x| 3.5: scale f16(3.5 / 448), zero 0, each value e4m3(x / s).
        let values = [-3.5, 0.0, 0.1, 1.0, 2.9];
        let mut bytes = vec![0u8; head_bytes(5, KvFormat::Fp8)];
        quantize_head(&values, KvFormat::Fp8, &mut bytes);
        let scale = f16::from_f32(3.5 / 448.0);
        let s = scale.to_f32();
        for (&b, &x) in bytes.iter().zip(&values) {
            assert_eq!(b, e4m3_from_f32(x / s), "{x}");
        }
        // The largest magnitude lands at the top of E4M3's range (448, or 416 below it where
        // the f16 scale rounded up), negative here.
        assert!(e4m3_to_f32(bytes[0]) <= -416.0, "{}", e4m3_to_f32(bytes[0]));
        assert_eq!(bytes[5..7], scale.to_le_bytes());
        assert_eq!(bytes[7..9], [0, 0]);
        let mut back = Vec::new();
        dequantize_head(&bytes, 5, KvFormat::Fp8, &mut back);
        let expected: Vec<f32> = bytes[..5].iter().map(|&q| e4m3_to_f32(q) * s).collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn fp8_values_come_back_within_e4m3s_relative_step() {
        let mut state = 11u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
        };
        for _ in 0..200 {
            let values: Vec<f32> = (0..128).map(|_| next()).collect();
            let back = round_trip(&values, KvFormat::Fp8);
            let s = fp8_scale(&values).to_f32();
            for (x, y) in values.iter().zip(&back) {
                // Half of a 3-bit mantissa's step (1/16 relative), or half of the smallest
                // subnormal step (2^-10 · s), plus the f16 scale's rounding.
                let bound = (x.abs() / 16.0).max(s / 1024.0) * 1.01;
                assert!((x - y).abs() <= bound, "{x} came back as {y}");
            }
        }
    }
}
