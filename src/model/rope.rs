//! Rotary angle tables shared by the families. The angles are formed in f32 exactly as
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

/// `rope_scaling` of `config.json`: `type` (older configs) or `rope_type`, and the llama3
/// type's own keys.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RopeScalingConfig {
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    pub factor: f32,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// The rotary variant a config asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scaling {
    None,
    /// Positions divided by the factor (inverse frequencies, equivalently).
    Linear(f32),
    /// Dynamic NTK: the base grows with the call's length past the trained context.
    Dynamic(f32),
    /// Llama-3.1's static per-frequency scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max: usize,
    },
}

impl Scaling {
    /// The scaling of `config` for `family` (named in errors); `types` are those the family
    /// takes.
    pub fn parse(
        config: Option<&RopeScalingConfig>,
        family: &str,
        types: &[&str],
    ) -> crate::Result<Scaling> {
        let Some(s) = config else { return Ok(Scaling::None) };
        let bad =
            |what: String| crate::Error::Config(format!("{family} config: rope_scaling {what}"));
        if !types.contains(&s.kind.as_str()) {
            return Err(bad(format!("type {:?} is not supported ({})", s.kind, types.join(", "))));
        }
        if s.factor.is_nan() || s.factor < 1.0 {
            return Err(bad(format!("factor {} must be at least 1", s.factor)));
        }
        Ok(match s.kind.as_str() {
            "linear" => Scaling::Linear(s.factor),
            "dynamic" => Scaling::Dynamic(s.factor),
            _ => {
                let missing = |key: &str| bad(format!("of type llama3 needs {key}"));
                let scaling = Scaling::Llama3 {
                    factor: s.factor,
                    low_freq_factor: s.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?,
                    high_freq_factor: s
                        .high_freq_factor
                        .ok_or_else(|| missing("high_freq_factor"))?,
                    original_max: s
                        .original_max_position_embeddings
                        .ok_or_else(|| missing("original_max_position_embeddings"))?,
                };
                if let Scaling::Llama3 { low_freq_factor, high_freq_factor, original_max, .. } =
                    scaling
                    && !(high_freq_factor > low_freq_factor
                        && low_freq_factor > 0.0
                        && original_max > 0)
                {
                    return Err(bad(format!(
                        "llama3 needs high_freq_factor > low_freq_factor > 0 and \
                         original_max_position_embeddings > 0 (got {high_freq_factor}, \
                         {low_freq_factor}, {original_max})"
                    )));
                }
                scaling
            }
        })
    }

    /// The longest context served: vLLM's rule, `max_position_embeddings` × factor for linear
    /// and dynamic scaling (llama3 configs already state the scaled context).
    pub fn max_context(self, max_position_embeddings: usize) -> usize {
        match self {
            Scaling::Dynamic(f) | Scaling::Linear(f) => {
                (max_position_embeddings as f32 * f) as usize
            }
            Scaling::None | Scaling::Llama3 { .. } => max_position_embeddings,
        }
    }

    /// Past how many positions a call's rotary (so every K it writes) depends on its length.
    pub fn length_dependent_after(self, max_position_embeddings: usize) -> Option<usize> {
        match self {
            Scaling::Dynamic(_) => Some(max_position_embeddings),
            _ => None,
        }
    }

    /// Inverse frequencies for a call whose sequence reaches `total_len` positions, in f32 as
    /// the originals compute them.
    pub fn inv_freq(
        self,
        theta: f32,
        head_dim: usize,
        max_position_embeddings: usize,
        total_len: usize,
    ) -> Vec<f32> {
        let base = match self {
            Scaling::Dynamic(factor) => {
                dynamic_ntk_base(theta, factor, total_len, max_position_embeddings, head_dim)
            }
            _ => theta,
        };
        let freqs = inv_freq(base, head_dim);
        match self {
            Scaling::Linear(factor) => freqs.into_iter().map(|f| f / factor).collect(),
            Scaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
                llama3_inv_freq(&freqs, factor, low_freq_factor, high_freq_factor, original_max)
            }
            Scaling::None | Scaling::Dynamic(_) => freqs,
        }
    }
}

/// transformers' `_compute_llama3_parameters`, operation for operation in f32 (the tensors'
/// type; Python scalars join as f32): high frequencies kept, low ones divided by `factor`,
/// those between blended.
fn llama3_inv_freq(
    freqs: &[f32],
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max: usize,
) -> Vec<f32> {
    let low_freq_wavelen = original_max as f64 / low_freq_factor as f64;
    let high_freq_wavelen = original_max as f64 / high_freq_factor as f64;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    freqs
        .iter()
        .map(|&f| {
            let wavelen = two_pi / f;
            let scaled = if (wavelen as f64) > low_freq_wavelen { f / factor } else { f };
            let wavelen64 = wavelen as f64;
            let medium = wavelen64 >= high_freq_wavelen && wavelen64 <= low_freq_wavelen;
            if !medium {
                return scaled;
            }
            let smooth = (original_max as f32 / wavelen - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            (1.0 - smooth) * scaled / factor + smooth * scaled
        })
        .collect()
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
