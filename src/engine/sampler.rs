//! Logits → next token, in the order transformers applies its processors: repetition
//! penalty, then (when sampling) temperature, top-k, top-p, then a draw from the softmax.
//! A temperature of 0 (or below 1e-5) is greedy: argmax after the repetition penalty, as
//! `do_sample=False` does. Draws come from a seeded ChaCha8 stream, so a seed reproduces
//! a sampled answer exactly (not torch's random stream, which no engine reproduces).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Below this temperature sampling is greedy.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 1 disables the penalty.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// The originals' `model.chat` defaults: temperature 0.8, top_p 0.8, and the top_k 50
    /// that transformers' GenerationConfig adds implicitly; no repetition penalty.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.8,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Checks every value, naming the input that is out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidRequest(what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler { params, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Picks the next token from `logits` (only the ids that may be produced), given every
    /// token of the sequence so far (prompt and generated) for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, context, p.repetition_penalty);
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        if p.temperature != 1.0 {
            logits.iter_mut().for_each(|l| *l /= p.temperature);
        }
        // Candidates by descending logit; ties keep the lower id first.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
        });
        if p.top_k > 0 && p.top_k < order.len() {
            // transformers keeps every token scoring at least the k-th best (ties survive).
            let threshold = logits[order[p.top_k - 1] as usize];
            let keep = order.iter().take_while(|&&id| logits[id as usize] >= threshold).count();
            order.truncate(keep);
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f32> =
            order.iter().map(|&id| (logits[id as usize] - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // transformers removes a token when the tokens strictly above it already hold
            // top_p of the mass; the best token always stays.
            let mut above = 0f32;
            let keep = probs
                .iter()
                .take_while(|&&q| {
                    let kept = above < p.top_p;
                    above += q;
                    kept
                })
                .count()
                .max(1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (&id, &q) in order.iter().zip(&probs) {
            if draw < q {
                return id;
            }
            draw -= q;
        }
        *order.last().expect("at least one candidate")
    }
}

/// transformers' RepetitionPenaltyLogitsProcessor: each distinct seen token's logit is
/// divided by the penalty when positive and multiplied by it when negative.
fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let id = id as usize;
        if id < logits.len() && !seen[id] {
            seen[id] = true;
            let l = &mut logits[id];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// First index of the largest value (torch.argmax's tie rule).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: Some(seed) }
    }

    #[test]
    fn greedy_is_argmax_after_the_penalty() {
        let mut s =
            Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        // id 0 is best but was seen: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0], &[0, 0]), 1);
        let mut logits = [-1.0, -2.0];
        apply_repetition_penalty(&mut logits, &[0], 2.0);
        assert_eq!(logits, [-2.0, -2.0]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_deterministic() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        for seed in 0..20 {
            assert_eq!(Sampler::new(params(1.0, 1, 1.0, seed)).sample(&mut logits.clone(), &[]), 1);
            assert_eq!(
                Sampler::new(params(1.0, 0, 0.01, seed)).sample(&mut logits.clone(), &[]),
                1
            );
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // probabilities ≈ [0.5, 0.3, 0.2]: top_p 0.6 keeps ids 0 and 1, never 2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut seen = [0usize; 3];
        let mut s = Sampler::new(params(1.0, 0, 0.6, 7));
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        let ratio = seen[0] as f64 / 2000.0;
        assert!((ratio - 0.625).abs() < 0.05, "{seen:?}");
    }

    #[test]
    fn a_seed_reproduces_the_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0.8, 50, 0.8, seed));
            (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        for (p, name) in [
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (
                SamplingParams { repetition_penalty: 0.0, ..Default::default() },
                "repetition_penalty",
            ),
        ] {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
