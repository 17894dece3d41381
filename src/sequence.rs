//! Generation of one sequence: prefill the prompt (in chunks if asked), then sample and
//! feed one token per step until a stop token, a length limit or the caller says stop.
//! The caller runs the forward passes, so one sequence or many share the same state machine.

pub mod blocks;
pub mod kv_space;

use crate::model::SeqStep;
use crate::sampling::{SampleRow, Sampler, SamplingParams};
use crate::{Error, Result};
pub use blocks::BlockTable;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Limit on prompt + generated tokens (`max_token`, ChatGLM2's `max_length`).
    pub max_total_tokens: Option<usize>,
    /// Limit on generated tokens alone (`max_new_tokens`).
    pub max_new_tokens: Option<usize>,
    /// Until this many tokens are generated the stop tokens cannot be chosen (vLLM's
    /// `min_tokens`); 0 = none.
    pub min_new_tokens: usize,
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

/// One sequence being generated: its tokens, sampler, limits and KV blocks. A caller
/// steps one alone or many together through `CausalLm::forward_batch`.
pub struct Sequence {
    request: GenerateRequest,
    budget: usize,
    sampler: Sampler,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the arena.
    computed: usize,
    pub table: BlockTable,
    pub finish_reason: Option<FinishReason>,
    /// The uniform draw of the choice the current step ends with, if it makes one.
    pending_draw: Option<f32>,
}

impl Sequence {
    /// Checks the request (sampling values, prompt against the limits) and sets up its state.
    pub fn new(request: GenerateRequest) -> Result<Self> {
        request.sampling.validate()?;
        let budget = request.new_token_budget()?;
        let mut sampler = Sampler::new(request.sampling.clone());
        sampler.observe(&request.prompt_ids);
        Ok(Sequence {
            budget,
            sampler,
            pending_draw: None,
            tokens: request.prompt_ids.clone(),
            computed: 0,
            table: BlockTable::default(),
            finish_reason: None,
            request,
        })
    }

    pub fn prompt_len(&self) -> usize {
        self.request.prompt_ids.len()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The most tokens this sequence can reach (prompt + its whole budget).
    pub fn max_len(&self) -> usize {
        self.prompt_len() + self.budget
    }

    pub fn output_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len()..]
    }

    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// Tokens still to run before the next sample: the rest of the prompt, or 1.
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn computed(&self) -> usize {
        self.computed
    }

    /// The next `tokens` tokens to run (a prompt is prefilled in chunks when asked); the
    /// block table must already cover them.
    pub fn step(&self, tokens: usize) -> SeqStep<'_> {
        let end = self.tokens.len().min(self.computed + tokens.max(1));
        SeqStep {
            ids: &self.tokens[self.computed..end],
            start: self.computed,
            blocks: &self.table.blocks,
        }
    }

    /// Marks `tokens` leading tokens as already in the arena (a reused prefix).
    pub fn set_computed(&mut self, tokens: usize) {
        self.computed = tokens.min(self.tokens.len() - 1);
    }

    /// The block table and the tokens whose K/V are in it.
    pub fn table_and_computed_tokens(&mut self) -> (&mut BlockTable, &[u32]) {
        (&mut self.table, &self.tokens[..self.computed])
    }

    /// Forgets the K/V (preempted: recomputed from the tokens when readmitted) and hands
    /// back the blocks.
    pub fn take_blocks(&mut self) -> BlockTable {
        self.computed = 0;
        std::mem::take(&mut self.table)
    }

    /// Whether a step running `ran` more tokens ends with the choice of a next token (the
    /// whole prompt is then in the arena).
    pub fn samples_after(&self, ran: usize) -> bool {
        !self.is_finished() && self.computed + ran >= self.tokens.len()
    }

    /// Before a step of `ran` tokens: draws the uniform of the choice it ends with, if any
    /// (one draw per sampled token, so a seed gives the same answer on every engine).
    pub fn prepare_step(&mut self, ran: usize) {
        self.pending_draw = self.samples_after(ran).then(|| self.sampler.draw());
    }

    /// The choice the prepared step ends with: what the sampler needs besides the logits.
    pub fn sample_row(&self) -> Option<SampleRow<'_>> {
        let uniform = self.pending_draw?;
        let request = &self.request;
        let banned: &[u32] = if self.output_ids().len() < request.min_new_tokens {
            &request.stop_token_ids
        } else {
            &[]
        };
        Some(self.sampler.row(
            request.producible_ids,
            uniform,
            request.guard_invalid_scores,
            banned,
        ))
    }

    /// Takes a step that ran `ran` tokens and the token chosen after it (None after a
    /// prefill chunk short of the prompt's end); decides whether it ends the sequence.
    pub fn accept(&mut self, ran: usize, chosen: Option<u32>) -> Option<u32> {
        self.computed += ran;
        self.pending_draw = None;
        let next = chosen.filter(|_| self.computed >= self.tokens.len() && !self.is_finished())?;
        self.tokens.push(next);
        self.sampler.observe(&[next]);
        // A banned stop token is only chosen when every other id is banned too (no weight
        // left); it still does not end the sequence before `min_new_tokens`.
        let too_early = self.output_ids().len() < self.request.min_new_tokens;
        if self.request.stop_token_ids.contains(&next) && !too_early {
            self.finish_reason = Some(FinishReason::Stop);
        } else if self.output_ids().len() >= self.budget {
            self.finish_reason = Some(FinishReason::Length);
        }
        Some(next)
    }

    /// Ends the sequence early (a cancelled request, a stop string) unless it has ended.
    pub fn stop(&mut self, reason: FinishReason) {
        self.finish_reason.get_or_insert(reason);
    }

    /// Whether stop strings may end the answer yet (`min_new_tokens` generated).
    pub fn may_stop(&self) -> bool {
        self.output_ids().len() >= self.request.min_new_tokens
    }

    /// A stop string ended the answer: that is why it ended, even when the token that
    /// completed it also used up the budget.
    pub fn stop_on_stop_string(&mut self) {
        if matches!(self.finish_reason, None | Some(FinishReason::Length)) {
            self.finish_reason = Some(FinishReason::Stop);
        }
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            output_ids: self.output_ids().to_vec(),
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Cancelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(min_new_tokens: usize) -> Sequence {
        Sequence::new(GenerateRequest {
            prompt_ids: vec![1, 2],
            sampling: SamplingParams::greedy(),
            max_total_tokens: None,
            max_new_tokens: Some(8),
            min_new_tokens,
            stop_token_ids: vec![7],
            producible_ids: 16,
            guard_invalid_scores: false,
            max_context: 64,
        })
        .unwrap()
    }

    /// Runs the prompt's step, then one step per chosen id.
    fn feed(sequence: &mut Sequence, ids: &[u32]) -> Vec<Vec<u32>> {
        let mut banned = Vec::new();
        for &id in ids {
            let ran = sequence.pending_tokens();
            sequence.prepare_step(ran);
            banned.push(sequence.sample_row().unwrap().banned.to_vec());
            sequence.accept(ran, Some(id));
        }
        banned
    }

    #[test]
    fn min_tokens_bans_the_stop_tokens_until_reached() {
        let mut s = sequence(3);
        let banned = feed(&mut s, &[4, 7, 5, 6]);
        // Banned for the first three choices; a stop token chosen anyway ends nothing.
        assert_eq!(banned, vec![vec![7], vec![7], vec![7], vec![]]);
        assert!(!s.is_finished());
        assert!(s.may_stop());
        feed(&mut s, &[7]);
        assert_eq!(s.finish_reason, Some(FinishReason::Stop));
        assert_eq!(s.output_ids(), &[4, 7, 5, 6, 7]);

        let mut s = sequence(0);
        assert_eq!(feed(&mut s, &[7]), vec![Vec::<u32>::new()]);
        assert_eq!(s.finish_reason, Some(FinishReason::Stop));
    }
}
