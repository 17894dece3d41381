//! FP8 E4M3 (OCP `e4m3fn`, NVIDIA's `__nv_fp8_e4m3`): 1 sign, 4 exponent bits (bias 7),
//! 3 mantissa bits; no infinities, `S.1111.111` is NaN, so the largest finite value is 448.
//! Conversions round to nearest, ties to even, and saturate to ±448 as CUDA's
//! `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` does, so that the CPU path forms
//! exactly the values the GPU's kernels form.
//!
//! The `fp8` weight format: weights quantised at load per output channel
//! (`scale = max|w| / 448`), activations per token (the same rule over the row), the
//! product summed in f32 over the E4M3 values and scaled by both scales after.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The NaN encoding (sign bit clear).
const NAN: u8 = 0x7F;

/// `x` as E4M3 bits: round to nearest even, saturating; NaN stays NaN.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return NAN;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    // f64 holds every f32 and every scaling by a power of two below exactly.
    let a = f64::from(x.abs());
    if a >= f64::from(E4M3_MAX) {
        return sign | 0x7E;
    }
    // Below 2^-6 the format is subnormal: steps of 2^-9 (a count of 8 is the smallest
    // normal, which the encoding below continues into).
    if a < 2f64.powi(-6) {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let exponent = a.log2().floor() as i32;
    // `log2` may land one off at exact powers of two: bring the significand into [1, 2).
    let (mut exponent, mut significand) = (exponent, a / 2f64.powi(exponent));
    if significand >= 2.0 {
        exponent += 1;
        significand /= 2.0;
    } else if significand < 1.0 {
        exponent -= 1;
        significand *= 2.0;
    }
    let mut mantissa = ((significand - 1.0) * 8.0).round_ties_even() as i32;
    if mantissa == 8 {
        exponent += 1;
        mantissa = 0;
    }
    let field = exponent + 7;
    if field > 15 || (field == 15 && mantissa == 7) {
        return sign | 0x7E;
    }
    sign | ((field as u8) << 3) | mantissa as u8
}

/// The value of E4M3 bits.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let (field, mantissa) = ((bits >> 3) & 15, bits & 7);
    if field == 15 && mantissa == 7 {
        return f32::NAN;
    }
    let magnitude = match field {
        0 => f32::from(mantissa) / 512.0,
        _ => (1.0 + f32::from(mantissa) / 8.0) * 2f32.powi(i32::from(field) - 7),
    };
    sign * magnitude
}

/// Every E4M3 value by its bits.
pub fn e4m3_table() -> [f32; 256] {
    std::array::from_fn(|bits| e4m3_to_f32(bits as u8))
}

/// The scale and its inverse for a row whose largest magnitude is `amax`: values are
/// stored as `e4m3(x · inverse)` and read as `e4m3 · scale`. An all-zero row takes scale 1.
pub fn row_scale(amax: f32) -> (f32, f32) {
    if amax > 0.0 && amax.is_finite() { (amax / E4M3_MAX, E4M3_MAX / amax) } else { (1.0, 1.0) }
}

/// FP8 weights, one f32 scale per output channel; `q` is `[in, out]` (as the other formats,
/// input features as rows).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8 {
    pub q: Vec<u8>,
    pub scales: Vec<f32>,
}

impl Fp8 {
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// The E4M3 values of `W[n0..n1, k0..k1]` transposed into `tile` (`[k1 − k0, n1 − n0]`
    /// row-major), without the scales (applied after the product).
    pub(super) fn values(
        &self,
        n: usize,
        (k0, k1): (usize, usize),
        (n0, n1): (usize, usize),
        tile: &mut [f32],
        table: &[f32; 256],
    ) {
        let width = n1 - n0;
        for k in k0..k1 {
            let q = &self.q[k * n + n0..k * n + n1];
            let row = &mut tile[(k - k0) * width..(k - k0 + 1) * width];
            for (o, &q) in row.iter_mut().zip(q) {
                *o = table[usize::from(q)];
            }
        }
    }
}

/// FP8 per output row: `scale = max|w| / 448`, `q = e4m3(w · 448 / max|w|)`. `weight` is
/// `[out, in]` row-major.
pub fn quantize_fp8(weight: &[f32], out: usize, inp: usize) -> Fp8 {
    let mut q = vec![0u8; out * inp];
    let mut scales = Vec::with_capacity(out);
    for (o, row) in weight.chunks_exact(inp).enumerate() {
        let (scale, inverse) = row_scale(row.iter().fold(0f32, |m, w| m.max(w.abs())));
        for (i, &w) in row.iter().enumerate() {
            q[i * out + o] = e4m3_from_f32(w * inverse);
        }
        scales.push(scale);
    }
    Fp8 { q, scales }
}

/// Activations per token (row of `width`): the E4M3 values as f32 and each row's scale.
pub fn quantize_rows(x: &[f32], width: usize, table: &[f32; 256]) -> (Vec<f32>, Vec<f32>) {
    let mut values = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / width.max(1));
    for row in x.chunks_exact(width) {
        let (scale, inverse) = row_scale(row.iter().fold(0f32, |m, v| m.max(v.abs())));
        values.extend(row.iter().map(|&v| table[usize::from(e4m3_from_f32(v * inverse))]));
        scales.push(scale);
    }
    (values, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_encode_as_the_format_defines() {
        for (value, bits) in [
            (0.0, 0x00),
            (1.0, 0x38),
            (-2.0, 0xC0),
            (448.0, 0x7E),
            (1.75, 0x3E),
            (2f32.powi(-6), 0x08),
            (2f32.powi(-9), 0x01),
            (7.0 * 2f32.powi(-9), 0x07),
            (240.0, 0x77),
        ] {
            assert_eq!(e4m3_from_f32(value), bits, "{value}");
            assert_eq!(e4m3_to_f32(bits), value, "{bits:#x}");
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(e4m3_from_f32(f32::NAN), 0x7F);
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // Between 1 (0x38) and 1.125 (0x39): the tie goes to the even mantissa.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.0626), 0x39);
        assert_eq!(e4m3_from_f32(1.1875), 0x3A); // tie between 1.125 and 1.25
        // Subnormal ties: 1.5 and 2.5 steps of 2^-9.
        assert_eq!(e4m3_from_f32(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(e4m3_from_f32(2.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(e4m3_from_f32(0.25 * 2f32.powi(-9)), 0x00);
        // Past the largest finite value, and infinity: ±448.
        for big in [449.0, 464.0, 1e9, f32::INFINITY] {
            assert_eq!(e4m3_from_f32(big), 0x7E);
            assert_eq!(e4m3_from_f32(-big), 0xFE);
        }
        // The top mantissa of the top exponent is NaN, not a value: 416 ≤ x < 448 rounds to
        // 416 or 448.
        assert_eq!(e4m3_from_f32(430.0), 0x7D);
        assert_eq!(e4m3_from_f32(440.0), 0x7E);
    }

    #[test]
    fn every_value_round_trips_and_every_f32_goes_to_its_nearest() {
        let table = e4m3_table();
        for bits in 0u8..=255 {
            if !table[usize::from(bits)].is_nan() {
                let back = e4m3_from_f32(table[usize::from(bits)]);
                // ±0 both decode to 0.
                assert!(back == bits || (bits == 0x80 && back == 0x80), "{bits:#x} → {back:#x}");
            }
        }
        let finite: Vec<f32> = table.iter().copied().filter(|v| v.is_finite()).collect();
        let mut x = -460.0f32;
        while x < 460.0 {
            let got = e4m3_to_f32(e4m3_from_f32(x));
            let nearest = finite.iter().map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            assert!((got - x).abs() <= nearest || x.abs() > 448.0, "{x}: {got}");
            x += 0.0137;
        }
    }

    #[test]
    fn rows_take_their_own_scales() {
        let weight = [1.0, -4.0, 0.5, 0.0, 0.0, 0.0];
        let fp8 = quantize_fp8(&weight, 2, 3);
        assert_eq!(fp8.scales, [4.0 / 448.0, 1.0]);
        // [in, out]: input 1 of output 0 is -448.
        assert_eq!(e4m3_to_f32(fp8.q[2]), -448.0);
        let table = e4m3_table();
        let (values, scales) = quantize_rows(&[2.0, -1.0, 0.0, 0.0], 2, &table);
        assert_eq!(values, [448.0, -224.0, 0.0, 0.0]);
        assert_eq!(scales, [2.0 / 448.0, 1.0]);
    }
}
