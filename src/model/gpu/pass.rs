//! The forward pass: one call's tables uploaded, then every layer's launches queued (or a
//! captured decode graph replayed).

use super::GpuModel;
use super::scratch::Scratch;
use crate::cuda::{self, Buffer, Gpu, StepTables};
use crate::model::{KvStore, SeqStep, batch_offsets};
use crate::{Error, Result};

impl GpuModel {
    /// Runs the pass up to the logits (left on the device in the scratch), with `extra`
    /// words uploaded after the step's tables, then `finish` (given the device address of
    /// the extra words) while the scratch is held.
    pub(super) fn forward_on_device<R>(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
        extra: &[u32],
        finish: impl FnOnce(&Gpu, &mut Scratch, u64) -> Result<R>,
    ) -> Result<R> {
        let arena: &mut cuda::KvArena = arena.as_any_mut().downcast_mut().ok_or_else(|| {
            Error::Internal("a GPU model was given another device's KV arena".into())
        })?;
        let (_, real_tokens) = batch_offsets(steps)?;
        let block_size = arena.block_size();
        let graph = if arena.num_blocks() > 0 { self.graph_shape(steps, block_size) } else { None };
        let (total, seqs) = graph.map_or((real_tokens, steps.len()), |g| (g.batch, g.batch));
        let tables = self.tables(steps, block_size, graph)?;
        let gpu = &self.gpu;
        gpu.bind()?;

        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let table_bytes = tables.words.len() * 4;
        let partial_bytes = tables.partial_floats(&self.shape) * 4;
        self.fit_scratch(&mut guard, total, seqs, table_bytes, partial_bytes)?;
        let s = guard.as_mut().expect("allocated above");
        if s.extra.bytes() < extra.len() * 4 {
            s.extra = gpu.alloc(2 * extra.len() * 4)?;
        }
        gpu.write_bytes(&mut s.tables, 0, bytemuck::cast_slice(&tables.words))?;
        gpu.write_bytes(&mut s.extra, 0, bytemuck::cast_slice(extra))?;
        let word = |table: usize| s.tables.at(tables.offsets[table] * 4);
        let step = StepTables {
            tokens: total,
            positions: word(1),
            slots: word(2),
            token_seq: word(3),
            cos_sin: word(7),
            freq_len: tables.freq_len,
            block_tables: word(6),
            max_blocks_per_seq: tables.max_blocks,
            decode_rows: word(8),
            num_decode: tables.num_decode,
            splits: tables.splits,
            partition: tables.partition,
            heads_per_block: tables.heads_per_block,
            tiles: word(9),
            num_tiles: tables.num_tiles,
        };
        let pass = Pass { step, ids: word(0), last_rows: word(5), seqs };
        match graph {
            Some(shape) => self.run_graph(s, arena, &pass, shape)?,
            None => self.queue_pass(s, arena, &pass)?,
        }
        let extra_ptr = s.extra.ptr();
        finish(gpu, s, extra_ptr)
    }

    /// Queues the pass up to the logits: the same launches whether they run now or are
    /// captured into a graph (device addresses only; nothing read back, nothing allocated).
    pub(super) fn queue_pass(&self, s: &Scratch, arena: &cuda::KvArena, pass: &Pass) -> Result<()> {
        let gpu = &self.gpu;
        let (step, total) = (&pass.step, pass.step.tokens);
        let block_size = arena.block_size();
        let shape = &self.shape;
        let (h, ffn) = (shape.hidden, shape.ffn);
        let w = &self.weights;
        let bias = |b: &Option<Buffer>| b.as_ref().map_or(0, Buffer::ptr);
        gpu.embedding(pass.ids, w.embedding.ptr(), s.x.ptr(), total, h)?;
        for (l, layer) in w.layers.iter().enumerate() {
            let delta = if l == 0 { 0 } else { s.mlp_out.ptr() };
            let normed = s.normed.ptr();
            gpu.add_rms_norm(
                s.x.ptr(),
                delta,
                0,
                layer.attention_norm.ptr(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            gpu.matmul(
                normed,
                layer.qkv.ptr(),
                0,
                s.qkv.ptr(),
                total,
                shape.qkv_width(),
                h,
                false,
            )?;
            let (k_cache, v_cache) = arena.layer(l);
            gpu.rope_write_kv(
                s.qkv.ptr(),
                bias(&layer.qkv_bias),
                s.q.ptr(),
                k_cache,
                v_cache,
                step,
                &shape.attention,
                shape.rope,
            )?;
            gpu.attention(
                s.q.ptr(),
                k_cache,
                v_cache,
                s.context.ptr(),
                s.attention_partial.ptr(),
                s.split_counters.ptr(),
                step,
                &shape.attention,
                block_size,
            )?;
            gpu.matmul(
                s.context.ptr(),
                layer.o.ptr(),
                bias(&layer.o_bias),
                s.attn_out.ptr(),
                total,
                h,
                shape.q_width(),
                false,
            )?;
            gpu.add_rms_norm(
                s.x.ptr(),
                s.attn_out.ptr(),
                0,
                layer.ffn_norm.ptr(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            gpu.swiglu_product(
                normed,
                layer.gate_up.ptr(),
                s.gate_up.ptr(),
                s.act.ptr(),
                total,
                ffn,
                h,
            )?;
            gpu.matmul(s.act.ptr(), layer.down.ptr(), 0, s.mlp_out.ptr(), total, h, ffn, false)?;
        }
        gpu.add_rms_norm(
            s.x.ptr(),
            s.mlp_out.ptr(),
            pass.last_rows,
            w.final_norm.ptr(),
            s.last_normed.ptr(),
            pass.seqs,
            h,
            shape.eps,
        )?;
        gpu.matmul(
            s.last_normed.ptr(),
            w.output.ptr(),
            0,
            s.logits.ptr(),
            pass.seqs,
            shape.vocab,
            h,
            true,
        )
    }
}

/// One pass's device tables: what `queue_pass` launches over.
pub(super) struct Pass {
    step: StepTables,
    ids: u64,
    last_rows: u64,
    /// Sequences (rows of logits), padding included.
    seqs: usize,
}
