//! The forward pass: one call's tables uploaded, then every layer's launches queued (or a
//! captured decode graph replayed).

use std::sync::atomic::Ordering;

use super::GpuModel;
use super::scratch::{Graphs, Scratch};
use crate::cuda::{self, Buffer, Gpu, StepTables, View, WeightView};
use crate::model::{KvStore, SeqStep, batch_offsets};
use crate::{Error, Result};

impl GpuModel {
    /// Runs the pass up to the logits (left on the device in the scratch), with `extra`
    /// words uploaded to the scratch's `extra` buffer, then `finish` (given the bytes of
    /// extra words uploaded) while the scratch is held.
    pub(super) fn forward_on_device<R>(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
        extra: &[u32],
        finish: impl FnOnce(&Gpu, &mut Scratch, usize) -> Result<R>,
    ) -> Result<R> {
        let arena: &mut cuda::KvArena = arena.as_any_mut().downcast_mut().ok_or_else(|| {
            Error::Internal("a GPU model was given another device's KV arena".into())
        })?;
        let (_, real_tokens) = batch_offsets(steps)?;
        let block_size = arena.block_size();
        let graph = if arena.num_blocks() > 0 { self.graph_shape(steps, block_size) } else { None };
        let (total, seqs) = graph.map_or((real_tokens, steps.len()), |g| (g.batch, g.batch));
        let tables = self.tables(steps, (block_size, arena.num_blocks()), arena.format(), graph)?;
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
        // The graphs leave the scratch while its buffers are lent to the pass as views.
        let mut graphs = std::mem::take(&mut s.graphs);
        let run = |s: &Scratch, graphs: &mut Graphs| -> Result<()> {
            let word = |table: usize| {
                let (offset, bytes) = tables.span(table);
                s.tables.range(offset, bytes)
            };
            let step = StepTables {
                tokens: total,
                seqs,
                positions: word(1)?,
                slots: word(2)?,
                token_seq: word(3)?,
                cos_sin: word(7)?,
                freq_len: tables.freq_len,
                block_tables: word(6)?,
                max_blocks_per_seq: tables.max_blocks,
                block_size,
                decode_rows: word(8)?,
                num_decode: tables.num_decode,
                splits: tables.splits,
                partition: tables.partition,
                heads_per_block: tables.heads_per_block,
                decode_mma: tables.decode_mma,
                tiles: word(9)?,
                num_tiles: tables.num_tiles,
            };
            let pass = Pass { step, ids: word(0)?, last_rows: word(5)?, seqs };
            match graph {
                Some(shape) => self.run_graph(s, graphs, arena, &pass, shape),
                None => self.queue_pass(s, arena, &pass),
            }
        };
        let ran = run(s, &mut graphs);
        s.graphs = graphs;
        ran?;
        finish(gpu, s, extra.len() * 4)
    }

    /// Queues the pass up to the logits: the same launches whether they run now or are
    /// captured into a graph (device addresses only; nothing read back, nothing allocated).
    pub(super) fn queue_pass(
        &self,
        s: &Scratch,
        arena: &cuda::KvArena,
        pass: &Pass<'_>,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let (step, total) = (&pass.step, pass.step.tokens);
        let shape = &self.shape;
        let (h, ffn) = (shape.hidden, shape.ffn);
        let w = &self.weights;
        fn view(b: &Option<Buffer>) -> Option<View<'_>> {
            b.as_ref().map(Buffer::view)
        }
        let dequantized = w.dequantized.as_ref().map(Buffer::view);
        let fp8 = s.fp8.as_ref().map(|(rows, scales)| (rows.view(), scales.view()));
        let fused_qkv_rope = self.fused_qkv_rope.load(Ordering::Relaxed);
        gpu.embedding(pass.ids, w.embedding.view(), s.x.view(), total, h)?;
        for (l, layer) in w.layers.iter().enumerate() {
            let delta = if l == 0 { None } else { Some(s.mlp_out.view()) };
            let normed = s.normed.view();
            gpu.add_rms_norm(
                s.x.view(),
                delta,
                None,
                layer.attention_norm.view(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            let (k_cache, v_cache) = arena.layer(l)?;
            let qkv = layer.qkv.view_with(fp8);
            match qkv {
                WeightView::Dense(w_qkv)
                    if fused_qkv_rope
                        && gpu.qkv_rope_applies(total, qkv, arena.format(), &shape.attention) =>
                {
                    gpu.qkv_rope_product(
                        normed,
                        w_qkv,
                        view(&layer.qkv_bias),
                        s.q.view(),
                        (k_cache, v_cache),
                        step,
                        &shape.attention,
                        (shape.rope, h),
                    )?;
                }
                _ => {
                    gpu.product(
                        normed,
                        qkv,
                        None,
                        s.qkv.view(),
                        total,
                        shape.qkv_width(),
                        h,
                        dequantized,
                    )?;
                    gpu.rope_write_kv(
                        s.qkv.view(),
                        view(&layer.qkv_bias),
                        s.q.view(),
                        (k_cache, v_cache),
                        arena.format(),
                        step,
                        &shape.attention,
                        shape.rope,
                    )?;
                }
            }
            gpu.attention(
                s.q.view(),
                (k_cache, v_cache),
                arena.format(),
                s.context.view(),
                s.attention_partial.view(),
                s.split_counters.view(),
                step,
                &shape.attention,
            )?;
            gpu.product(
                s.context.view(),
                layer.o.view_with(fp8),
                view(&layer.o_bias),
                s.attn_out.view(),
                total,
                h,
                shape.q_width(),
                dequantized,
            )?;
            gpu.add_rms_norm(
                s.x.view(),
                Some(s.attn_out.view()),
                None,
                layer.ffn_norm.view(),
                normed,
                total,
                h,
                shape.eps,
            )?;
            gpu.swiglu_product_any(
                normed,
                layer.gate_up.view_with(fp8),
                s.gate_up.view(),
                s.act.view(),
                total,
                ffn,
                h,
                dequantized,
            )?;
            gpu.product(
                s.act.view(),
                layer.down.view_with(fp8),
                None,
                s.mlp_out.view(),
                total,
                h,
                ffn,
                dequantized,
            )?;
        }
        gpu.add_rms_norm(
            s.x.view(),
            Some(s.mlp_out.view()),
            Some(pass.last_rows),
            w.final_norm.view(),
            s.last_normed.view(),
            pass.seqs,
            h,
            shape.eps,
        )?;
        gpu.matmul(
            s.last_normed.view(),
            w.output.view(),
            None,
            s.logits.view(),
            pass.seqs,
            shape.vocab,
            h,
            true,
        )
    }
}

/// One pass's device tables: what `queue_pass` launches over.
pub(super) struct Pass<'a> {
    step: StepTables<'a>,
    ids: View<'a>,
    last_rows: View<'a>,
    /// Sequences (rows of logits), padding included.
    seqs: usize,
}
