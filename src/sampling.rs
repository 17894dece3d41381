//! Logits → next token, in the order transformers applies its processors: repetition
//! penalty, then (when sampling) temperature, top-k, top-p, then a draw from the softmax.
//! A temperature of 0 (or below 1e-5) is greedy: argmax after the repetition penalty, as
//! `do_sample=False` does. Draws come from a seeded ChaCha8 stream, so a seed reproduces
//! a sampled answer exactly (not torch's random stream, which no engine reproduces).
//!
//! `choose` is the definition that the GPU's batched sampling kernel (kernels/sampling.cu)
//! follows step for step, so both engines pick the same token from the same logits and
//! draw: values are ranked by an integer key (NaN lowest; ties by lower id), probabilities
//! are fixed-point integers (sums independent of their order, so a parallel sum gives the
//! same bits), and the draw walks the kept tokens in id order (any fixed order draws from
//! the same distribution; id order is the one a block of threads can scan).

use std::collections::HashSet;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Below this temperature sampling is greedy.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Fixed-point scale of a token's unnormalised probability exp(x - max) ∈ [0, 1]: 2^40 leaves
/// 2^23 tokens of headroom in a u64 sum.
pub const MASS_SCALE: f32 = 1_099_511_627_776.0;

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

/// Everything one row's choice depends on besides its logits.
#[derive(Clone, Copy, Debug)]
pub struct SampleRow<'a> {
    /// Only ids below this may be produced; the rest of the row is ignored.
    pub width: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// The distinct ids the penalty applies to (every token of the sequence so far).
    pub penalized: &'a [u32],
    /// A uniform draw in [0, 1) from the sequence's seeded stream (unused when greedy).
    pub uniform: f32,
    /// ChatGLM2's guard: a row with NaN/Inf becomes zeros with 5e4 at id 5 (spec §6).
    pub guard_invalid_scores: bool,
    /// Ids that may not be chosen this step (the end tokens before `min_tokens`); the
    /// device's kernel has no such list, so rows with any are chosen on the host.
    pub banned: &'a [u32],
}

impl SampleRow<'_> {
    /// 1 / temperature, or 0 when greedy.
    pub fn inv_temperature(&self) -> f32 {
        if self.temperature < GREEDY_TEMPERATURE { 0.0 } else { 1.0 / self.temperature }
    }
}

/// A sequence's sampling state: its parameters, seeded stream and the distinct tokens it
/// has seen (for the repetition penalty).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    penalized: Vec<u32>,
    seen: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            penalized: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// Notes tokens of the sequence (the prompt, then each generated one).
    pub fn observe(&mut self, tokens: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            for &id in tokens {
                if self.seen.insert(id) {
                    self.penalized.push(id);
                }
            }
        }
    }

    /// The next uniform draw: one per sampled token (none when greedy).
    pub fn draw(&mut self) -> f32 {
        if self.params.is_greedy() { 0.0 } else { self.rng.random::<f32>() }
    }

    /// The row for a choice with draw `uniform` among the first `width` ids.
    pub fn row<'a>(
        &'a self,
        width: usize,
        uniform: f32,
        guard_invalid_scores: bool,
        banned: &'a [u32],
    ) -> SampleRow<'a> {
        let p = &self.params;
        SampleRow {
            width,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            penalized: &self.penalized,
            uniform,
            guard_invalid_scores,
            banned,
        }
    }
}

/// Ranks f32 values as unsigned integers: larger value, larger key; NaN is lowest (0).
pub fn order_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 }
}

/// A token's unnormalised probability exp(x - max) in fixed point (0 for NaN).
pub fn fixed_mass(x: f32, max: f32) -> u64 {
    // `as` truncates, and gives 0 for NaN, as the kernel's conversion does.
    ((x - max).exp() * MASS_SCALE) as u64
}

/// Picks the next token of one row of logits (changed in place by the guard and the
/// penalty). The reference of kernels/sampling.cu.
pub fn choose(logits: &mut [f32], row: &SampleRow<'_>) -> u32 {
    let width = row.width.min(logits.len());
    let logits = &mut logits[..width];
    if row.guard_invalid_scores && logits.iter().any(|l| !l.is_finite()) {
        logits.fill(0.0);
        if let Some(score) = logits.get_mut(5) {
            *score = 5e4;
        }
    }
    // After the guard, which would otherwise take these for invalid scores.
    for &id in row.banned {
        if let Some(score) = logits.get_mut(id as usize) {
            *score = f32::NEG_INFINITY;
        }
    }
    if row.repetition_penalty != 1.0 {
        apply_repetition_penalty(logits, row.penalized, row.repetition_penalty);
    }
    if row.temperature < GREEDY_TEMPERATURE {
        return argmax(logits);
    }
    // Times the reciprocal (the kernel's multiply), within an ulp of transformers' division.
    let inv_temperature = row.inv_temperature();
    let scaled: Vec<f32> = logits.iter().map(|&l| l * inv_temperature).collect();
    let keys: Vec<u32> = scaled.iter().map(|&x| order_key(x)).collect();
    let top = argmax(&scaled) as usize;
    // transformers' top-k keeps every token scoring at least the k-th best (ties survive).
    let threshold = if row.top_k > 0 && row.top_k < keys.len() {
        let mut sorted = keys.clone();
        *sorted.select_nth_unstable_by(row.top_k - 1, |a, b| b.cmp(a)).1
    } else {
        0
    };
    let max = scaled[top];
    let masses: Vec<u64> = scaled
        .iter()
        .zip(&keys)
        .map(|(&x, &key)| if key >= threshold { fixed_mass(x, max) } else { 0 })
        .collect();
    let total: u64 = masses.iter().sum();
    if total == 0 {
        return top as u32; // an infinite or NaN best: nothing to weigh
    }
    // transformers' top-p removes a token when the tokens ranked above it already hold
    // top_p of the mass; the best token always stays. Kept tokens are a prefix of the rank.
    let mut kept = vec![true; width];
    if row.top_p < 1.0 {
        let limit = f64::from(row.top_p) * total as f64;
        let mut ranked: Vec<u32> = (0..width as u32).filter(|&i| masses[i as usize] > 0).collect();
        ranked.sort_unstable_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
        kept.fill(false);
        let mut before = 0u64;
        for &id in &ranked {
            if before as f64 >= limit {
                break;
            }
            kept[id as usize] = true;
            before += masses[id as usize];
        }
    }
    let kept_total: u64 = masses.iter().zip(&kept).filter(|(_, k)| **k).map(|(m, _)| m).sum();
    let target = ((f64::from(row.uniform) * kept_total as f64) as u64).min(kept_total - 1);
    let mut cumulative = 0u64;
    for (id, (&mass, &keep)) in masses.iter().zip(&kept).enumerate() {
        if keep {
            cumulative += mass;
            if cumulative > target {
                return id as u32;
            }
        }
    }
    unreachable!("the draw is below the kept mass")
}

/// transformers' RepetitionPenaltyLogitsProcessor: each distinct seen token's logit is
/// divided by the penalty when positive and multiplied by it when negative.
fn apply_repetition_penalty(logits: &mut [f32], distinct: &[u32], penalty: f32) {
    for &id in distinct {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// First index of the largest value (torch.argmax's tie rule), ranking NaN lowest.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        let key = order_key(l);
        if key > best.1 || i == 0 {
            best = (i, key);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: Some(seed) }
    }

    /// One choice with the sampler's next draw, the way a sequence makes it.
    fn pick(sampler: &mut Sampler, logits: &[f32]) -> u32 {
        let uniform = sampler.draw();
        choose(&mut logits.to_vec(), &sampler.row(logits.len(), uniform, false, &[]))
    }

    #[test]
    fn greedy_is_argmax_after_the_penalty() {
        let mut s =
            Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        s.observe(&[0, 0]);
        // id 0 is best but was seen: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(pick(&mut s, &[3.0, 2.0, -1.0]), 1);
        let mut logits = [-1.0, -2.0];
        apply_repetition_penalty(&mut logits, &[0], 2.0);
        assert_eq!(logits, [-2.0, -2.0]);
    }

    #[test]
    fn the_order_key_ranks_like_the_values_with_nan_lowest() {
        let values = [f32::NEG_INFINITY, -1e30, -2.5, -1e-30, 0.0, 1e-30, 0.5, 3.0, f32::INFINITY];
        for pair in values.windows(2) {
            assert!(order_key(pair[0]) < order_key(pair[1]), "{pair:?}");
        }
        assert_eq!(order_key(f32::NAN), 0);
        assert!(order_key(f32::NEG_INFINITY) > 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_deterministic() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        for seed in 0..20 {
            assert_eq!(pick(&mut Sampler::new(params(1.0, 1, 1.0, seed)), &logits), 1);
            assert_eq!(pick(&mut Sampler::new(params(1.0, 0, 0.01, seed)), &logits), 1);
        }
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth_best() {
        // top_k 2 over [3, 1, 1, 0]: ids 1 and 2 tie for second, both stay; id 3 never comes.
        let logits = [3.0f32.ln(), 0.0, 0.0, -30.0];
        let mut seen = [0usize; 4];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3));
        for _ in 0..4000 {
            seen[pick(&mut s, &logits) as usize] += 1;
        }
        assert_eq!(seen[3], 0, "{seen:?}");
        for (id, want) in [(0, 0.6), (1, 0.2), (2, 0.2)] {
            let got = seen[id] as f64 / 4000.0;
            assert!((got - want).abs() < 0.03, "{seen:?}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // probabilities ≈ [0.5, 0.3, 0.2]: top_p 0.6 keeps ids 0 and 1, never 2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut seen = [0usize; 3];
        let mut s = Sampler::new(params(1.0, 0, 0.6, 7));
        for _ in 0..2000 {
            seen[pick(&mut s, &logits) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        let ratio = seen[0] as f64 / 2000.0;
        assert!((ratio - 0.625).abs() < 0.05, "{seen:?}");
    }

    #[test]
    fn draws_follow_the_softmax_at_the_temperature() {
        let logits = [1.0f32, 0.0, -1.0, 0.5];
        let temperature = 0.7f32;
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l / temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut seen = [0usize; 4];
        let mut s = Sampler::new(params(temperature, 0, 1.0, 11));
        let draws = 20000;
        for _ in 0..draws {
            seen[pick(&mut s, &logits) as usize] += 1;
        }
        for (count, weight) in seen.iter().zip(&weights) {
            let (got, want) = (*count as f64 / draws as f64, weight / total);
            assert!((got - want).abs() < 0.015, "{seen:?} vs {weights:?}");
        }
    }

    #[test]
    fn the_guard_and_a_row_without_weight_still_choose() {
        let mut logits = vec![0.3f32; 12];
        logits[2] = f32::NAN;
        let mut s = Sampler::new(params(0.8, 50, 0.8, 1));
        let uniform = s.draw();
        assert_eq!(choose(&mut logits.clone(), &s.row(12, uniform, true, &[])), 5);
        // Unguarded, an infinite best leaves no finite weight: the best is chosen.
        logits[2] = 1.0;
        logits[9] = f32::INFINITY;
        assert_eq!(choose(&mut logits, &s.row(12, uniform, false, &[])), 9);
    }

    #[test]
    fn banned_ids_are_never_chosen() {
        let logits = [0.0f32, 1.0, 50.0, 49.0];
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (0.7, 3)] {
            let mut s = Sampler::new(params(temperature, 0, 1.0, seed));
            let uniform = s.draw();
            let chosen = choose(&mut logits.to_vec(), &s.row(4, uniform, true, &[2]));
            assert_ne!(chosen, 2);
            assert!(chosen < 4);
        }
        let s = Sampler::new(params(0.0, 0, 1.0, 0));
        assert_eq!(choose(&mut logits.to_vec(), &s.row(4, 0.0, true, &[2])), 3);
    }

    #[test]
    fn only_producible_ids_are_chosen() {
        let logits = [0.0f32, 0.0, 50.0];
        for seed in 0..10 {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            let uniform = s.draw();
            assert!(choose(&mut logits.to_vec(), &s.row(2, uniform, false, &[])) < 2);
        }
    }

    #[test]
    fn a_seed_reproduces_the_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0.8, 50, 0.8, seed));
            (0..50).map(|_| pick(&mut s, &logits)).collect::<Vec<_>>()
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
