//! The generation loop of one sequence: prefill the prompt, then sample and feed one
//! token per step until a stop token, a length limit or the caller says stop. The
//! serving engine (in-flight batching over many sequences) builds on the same pieces.

pub mod sampler;

use crate::model::CausalLm;
use crate::{Error, Result};
pub use sampler::{Sampler, SamplingParams};

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Limit on prompt + generated tokens (`max_token`, ChatGLM2's `max_length`).
    pub max_total_tokens: Option<usize>,
    /// Limit on generated tokens alone (`max_new_tokens`).
    pub max_new_tokens: Option<usize>,
    /// Tokens that end the answer (kept as the last output id, like transformers).
    pub stop_token_ids: Vec<u32>,
    /// Only ids below this may be produced (ChatGLM2's padded logits rows never are).
    pub producible_ids: usize,
    /// ChatGLM2's guard: a row with NaN/Inf becomes zeros with 5e4 at id 5 (spec §6).
    pub guard_invalid_scores: bool,
    /// Longest sequence the engine serves for this model.
    pub max_context: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    /// The caller's callback asked to stop (a cancelled request, a stop word).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids, including the stop token when one ended the answer.
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

impl GenerateRequest {
    /// How many tokens may be generated, or an error when the prompt leaves no room.
    pub fn new_token_budget(&self) -> Result<usize> {
        let prompt = self.prompt_ids.len();
        if prompt == 0 {
            return Err(Error::InvalidRequest("the prompt has no tokens".into()));
        }
        if prompt >= self.max_context {
            return Err(Error::InvalidRequest(format!(
                "prompt: {prompt} tokens do not fit the model's context of {} tokens",
                self.max_context
            )));
        }
        let mut budget = self.max_context - prompt;
        if let Some(max_total) = self.max_total_tokens {
            if prompt >= max_total {
                return Err(Error::InvalidRequest(format!(
                    "max_token: {max_total} counts the prompt and generated tokens, but the \
                     prompt alone is {prompt} tokens"
                )));
            }
            budget = budget.min(max_total - prompt);
        }
        if let Some(max_new) = self.max_new_tokens {
            if max_new == 0 {
                return Err(Error::InvalidRequest("max_new_tokens must be at least 1".into()));
            }
            budget = budget.min(max_new);
        }
        Ok(budget)
    }
}

/// Runs one sequence to completion. `on_token` sees every generated id as it is chosen
/// and returns false to stop early (the id it saw is kept).
pub fn generate(
    model: &dyn CausalLm,
    request: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    request.sampling.validate()?;
    let budget = request.new_token_budget()?;
    let mut sampler = Sampler::new(request.sampling.clone());
    let mut cache = model.new_cache();
    let mut context = request.prompt_ids.clone();
    let mut logits = model.forward(&request.prompt_ids, &mut cache)?;
    let mut output_ids = Vec::new();
    loop {
        let producible = &mut logits[..request.producible_ids.min(model.info().logits_width)];
        if request.guard_invalid_scores && producible.iter().any(|l| !l.is_finite()) {
            producible.fill(0.0);
            if let Some(score) = producible.get_mut(5) {
                *score = 5e4;
            }
        }
        let next = sampler.sample(producible, &context);
        output_ids.push(next);
        context.push(next);
        let keep_going = on_token(next);
        let finish_reason = if request.stop_token_ids.contains(&next) {
            Some(FinishReason::Stop)
        } else if !keep_going {
            Some(FinishReason::Cancelled)
        } else if output_ids.len() >= budget {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(finish_reason) = finish_reason {
            return Ok(Generation { output_ids, finish_reason });
        }
        logits = model.forward(&[next], &mut cache)?;
    }
}
