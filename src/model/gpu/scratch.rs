//! The activation buffers of a forward call, grown to the largest call seen.

use std::collections::{HashMap, HashSet};

use super::graphs::GraphShape;
use super::{GpuModel, Shape};
use crate::Result;
use crate::cuda::{self, Buffer, Gpu};

/// Device buffers for the activations of a call of up to `tokens` tokens and `seqs`
/// sequences; grown (never shrunk) when a larger call comes.
pub(super) struct Scratch {
    pub(super) tokens: usize,
    pub(super) seqs: usize,
    pub(super) x: Buffer,
    pub(super) normed: Buffer,
    pub(super) qkv: Buffer,
    pub(super) q: Buffer,
    pub(super) context: Buffer,
    pub(super) attn_out: Buffer,
    pub(super) gate_up: Buffer,
    pub(super) act: Buffer,
    pub(super) mlp_out: Buffer,
    pub(super) last_normed: Buffer,
    pub(super) logits: Buffer,
    pub(super) tables: Buffer,
    /// Words a call's `finish` reads (the sampling kernel's), apart from the tables so that
    /// their growth (penalized ids) does not reallocate the rest and drop the graphs.
    pub(super) extra: Buffer,
    pub(super) attention_partial: Buffer,
    /// One int per (sequence, head), zero between calls (kernels/attention.cu).
    pub(super) split_counters: Buffer,
    /// Where the logits come back to the host.
    pub(super) host_logits: cuda::HostBuffer,
    /// One chosen id per sequence (sampling on the device).
    pub(super) chosen: Buffer,
    /// With FP8 weights: a product's activations quantised per token (elems, `[tokens,
    /// widest input]`) and their scales (an f32 a token).
    pub(super) fp8: Option<(Buffer, Buffer)>,
    /// Decode steps captured over these buffers; dropped with them.
    pub(super) graphs: Graphs,
}

/// The decode steps captured over one scratch's buffers.
#[derive(Default)]
pub(super) struct Graphs {
    /// By the generation of the KV arena they write (the instances sharing this model have
    /// one each) and their shape.
    pub(super) captured: HashMap<(u64, GraphShape), cuda::Graph>,
    /// Shapes run once without a graph: lazily loaded kernels and cuBLAS's first use of a
    /// size happen outside any capture (as PyTorch warms up before capturing).
    pub(super) warmed_up: HashSet<GraphShape>,
}

/// The extra-words buffer's first size: 256 rows of sampling words and many ids.
const EXTRA_MIN_BYTES: usize = 64 << 10;

impl Scratch {
    fn new(
        gpu: &Gpu,
        shape: &Shape,
        tokens: usize,
        seqs: usize,
        table_bytes: usize,
        partial_bytes: usize,
        fp8: bool,
    ) -> Result<Self> {
        let e = gpu.dtype.size();
        let h = shape.hidden;
        let widest_input = h.max(shape.q_width()).max(shape.ffn);
        let fp8 = match fp8 {
            true => Some((gpu.alloc(tokens * widest_input * e)?, gpu.alloc(tokens * 4)?)),
            false => None,
        };
        Ok(Scratch {
            tokens,
            seqs,
            x: gpu.alloc(tokens * h * 4)?,
            normed: gpu.alloc(tokens * h * e)?,
            qkv: gpu.alloc(tokens * shape.qkv_width() * e)?,
            q: gpu.alloc(tokens * shape.q_width() * e)?,
            context: gpu.alloc(tokens * shape.q_width() * e)?,
            attn_out: gpu.alloc(tokens * h * e)?,
            gate_up: gpu.alloc(tokens * 2 * shape.ffn * e)?,
            act: gpu.alloc(tokens * shape.ffn * e)?,
            mlp_out: gpu.alloc(tokens * h * e)?,
            last_normed: gpu.alloc(seqs * h * e)?,
            logits: gpu.alloc(seqs * shape.vocab * 4)?,
            tables: gpu.alloc(table_bytes)?,
            extra: gpu.alloc(EXTRA_MIN_BYTES)?,
            attention_partial: gpu.alloc(partial_bytes)?,
            split_counters: gpu.alloc(seqs * shape.attention.num_heads * 4)?,
            host_logits: gpu.alloc_host(seqs * shape.vocab * 4)?,
            chosen: gpu.alloc(seqs * 4)?,
            fp8,
            graphs: Graphs::default(),
        })
    }

    /// Device memory held, counted buffer by buffer (the driver's free memory moves in its
    /// pool's chunks, too coarse to show a small model's scratch).
    pub(super) fn device_bytes(&self) -> usize {
        [
            &self.x,
            &self.normed,
            &self.qkv,
            &self.q,
            &self.context,
            &self.attn_out,
            &self.gate_up,
            &self.act,
            &self.mlp_out,
            &self.last_normed,
            &self.logits,
            &self.tables,
            &self.extra,
            &self.attention_partial,
            &self.split_counters,
            &self.chosen,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum::<usize>()
            + self.fp8.as_ref().map_or(0, |(rows, scales)| rows.bytes() + scales.bytes())
    }
}

impl GpuModel {
    /// Grows the scratch (if it is smaller) to hold a call of `tokens` tokens and `seqs`
    /// sequences with its tables and attention partials. Growth frees the old buffers and
    /// the graphs captured over them.
    pub(super) fn fit_scratch(
        &self,
        guard: &mut Option<Scratch>,
        tokens: usize,
        seqs: usize,
        table_bytes: usize,
        partial_bytes: usize,
    ) -> Result<()> {
        let fits = guard.as_ref().is_some_and(|s| {
            s.tokens >= tokens
                && s.seqs >= seqs
                && s.tables.bytes() >= table_bytes
                && s.attention_partial.bytes() >= partial_bytes
        });
        if fits {
            return Ok(());
        }
        let (tokens, seqs) = match guard.as_ref() {
            Some(s) => (s.tokens.max(tokens), s.seqs.max(seqs)),
            None => (tokens.max(16), seqs.max(16)),
        };
        let table_capacity =
            guard.as_ref().map_or(0, |s| s.tables.bytes()).max(table_bytes).max(64 << 10);
        let partial_capacity = guard
            .as_ref()
            .map_or(0, |s| s.attention_partial.bytes())
            .max(partial_bytes)
            .max(1 << 20);
        *guard = None; // free the old buffers (and the graphs over them) first
        *guard = Some(Scratch::new(
            &self.gpu,
            &self.shape,
            tokens,
            seqs,
            2 * table_capacity,
            2 * partial_capacity,
            self.weights.is_fp8(),
        )?);
        Ok(())
    }
}
