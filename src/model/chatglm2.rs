//! ChatGLM2-6B (THUDM/chatglm2-6b, HF remote code `modeling_chatglm.py`), on the CPU.
//! Facts: `shared/spec/chatglm2.md` §1–3. Layout quirks this file owns: the fused QKV is
//! `[all q | all k | all v]`, rotary covers only the first half of each head in
//! interleaved pairs with θ over the rotated width, K/V groups are contiguous blocks of
//! query heads, the SwiGLU gate is the first half of `dense_h_to_4h`, and the output layer
//! is `padded_vocab_size` wide.

use serde::Deserialize;

use super::{
    CausalLm, Family, KvStore, ModelInfo, SeqStep, TokenIds, batch_offsets, cpu_arena, embed_batch,
    last_token_logits, parse_config, quant, rope,
};

use super::gpu;
use crate::cpu::{self, AttentionShape, Linear};
use crate::cuda;
use crate::{Error, Result};

/// `config.json` of a ChatGLM2 checkpoint; field names as in the file.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub kv_channels: usize,
    #[serde(default)]
    pub multi_query_attention: bool,
    #[serde(default = "one")]
    pub multi_query_group_num: usize,
    pub ffn_hidden_size: usize,
    pub padded_vocab_size: usize,
    pub seq_length: usize,
    pub layernorm_epsilon: f32,
    #[serde(default = "yes")]
    pub rmsnorm: bool,
    #[serde(default = "yes")]
    pub post_layer_norm: bool,
    #[serde(default)]
    pub add_bias_linear: bool,
    #[serde(default)]
    pub add_qkv_bias: bool,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default)]
    pub rope_ratio: Option<f32>,
    #[serde(default)]
    pub quantization_bit: Option<u32>,
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub eos_token_id: TokenIds,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl Config {
    fn num_kv_heads(&self) -> usize {
        if self.multi_query_attention {
            self.multi_query_group_num
        } else {
            self.num_attention_heads
        }
    }

    fn model_info(&self) -> ModelInfo {
        let (h, d) = (self.hidden_size, self.kv_channels);
        let q_width = self.num_attention_heads * d;
        let qkv_width = q_width + 2 * self.num_kv_heads() * d;
        let (ffn, vocab) = (self.ffn_hidden_size, self.padded_vocab_size);
        let num_parameters = vocab * h * 2
            + h
            + self.num_layers
                * (2 * h
                    + qkv_width * (h + usize::from(self.add_qkv_bias))
                    + q_width * h
                    + 3 * ffn * h);
        ModelInfo {
            family: Family::ChatGlm2,
            logits_width: vocab,
            max_context: self.seq_length,
            eos_token_ids: self.eos_token_id.to_vec(),
            num_layers: self.num_layers,
            num_parameters,
            decode_parameters: num_parameters - vocab * h,
            kv_width: self.num_kv_heads() * d,
            kv_heads: self.num_kv_heads(),
            num_heads: self.num_attention_heads,
            weight_format: String::new(),
            weight_bytes: 0,
            length_dependent_rope_after: None,
        }
    }

    /// Refuses the variants this engine does not implement rather than computing them wrong.
    fn check_supported(&self) -> Result<()> {
        let unsupported =
            |what: &str| Err(Error::Config(format!("ChatGLM2 config: {what} is not supported")));
        if !self.rmsnorm {
            return unsupported("rmsnorm=false (LayerNorm)");
        }
        if !self.post_layer_norm {
            return unsupported("post_layer_norm=false");
        }
        if self.add_bias_linear {
            return unsupported("add_bias_linear=true");
        }
        if self.apply_residual_connection_post_layernorm {
            return unsupported("apply_residual_connection_post_layernorm=true");
        }
        if self.tie_word_embeddings {
            return unsupported("tie_word_embeddings=true");
        }
        if self.rope_ratio.is_some_and(|r| r != 1.0) {
            return unsupported("rope_ratio other than 1 (ChatGLM2-32k / ChatGLM3-32k variants)");
        }
        if self.quantization_bit.is_some_and(|b| b != 0) {
            return unsupported("quantization_bit (int4/int8 checkpoints)");
        }
        if self.pre_seq_len.is_some() {
            return unsupported("pre_seq_len (P-tuning v2 prefixes)");
        }
        let heads = self.num_attention_heads;
        if heads == 0 || self.num_kv_heads() == 0 || !heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::Config(format!(
                "ChatGLM2 config: num_attention_heads {heads} is not a multiple of \
                 multi_query_group_num {}",
                self.num_kv_heads()
            )));
        }
        if !self.kv_channels.is_multiple_of(4) {
            return Err(Error::Config(format!(
                "ChatGLM2 config: kv_channels {} must be a multiple of 4 (half of each head \
                 is rotated in pairs)",
                self.kv_channels
            )));
        }
        Ok(())
    }
}

struct Block {
    input_layernorm: Vec<f32>,
    query_key_value: Linear,
    dense: Linear,
    post_attention_layernorm: Vec<f32>,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

pub struct Model {
    config: Config,
    info: ModelInfo,
    word_embeddings: Vec<f32>,
    layers: Vec<Block>,
    final_layernorm: Vec<f32>,
    output_layer: Linear,
    /// Inverse frequencies over the rotated width `kv_channels / 2`, base 10000.
    inv_freq: Vec<f32>,
}

impl Model {
    pub fn load(value: serde_json::Value, linears: &quant::Linears<'_>) -> Result<Self> {
        let ckpt = linears.ckpt;
        let config: Config = parse_config(value)?;
        config.check_supported()?;
        let (h, d) = (config.hidden_size, config.kv_channels);
        let q_width = config.num_attention_heads * d;
        let qkv_width = q_width + 2 * config.num_kv_heads() * d;
        let ffn = config.ffn_hidden_size;
        let vocab = config.padded_vocab_size;

        let word_embeddings =
            ckpt.f32("transformer.embedding.word_embeddings.weight", &[vocab, h])?;
        let layers = (0..config.num_layers)
            .map(|i| {
                let p = format!("transformer.encoder.layers.{i}");
                Ok(Block {
                    input_layernorm: ckpt.f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                    query_key_value: linears.layer(
                        &format!("{p}.self_attention.query_key_value"),
                        qkv_width,
                        h,
                        config.add_qkv_bias,
                    )?,
                    dense: linears.layer(
                        &format!("{p}.self_attention.dense"),
                        h,
                        q_width,
                        false,
                    )?,
                    post_attention_layernorm: ckpt
                        .f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    dense_h_to_4h: linears.layer(
                        &format!("{p}.mlp.dense_h_to_4h"),
                        2 * ffn,
                        h,
                        false,
                    )?,
                    dense_4h_to_h: linears.layer(
                        &format!("{p}.mlp.dense_4h_to_h"),
                        h,
                        ffn,
                        false,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layernorm = ckpt.f32("transformer.encoder.final_layernorm.weight", &[h])?;
        let output_layer = linears.dense("transformer.output_layer", vocab, h, false)?;
        // A buffer the forward pass never reads (spec §2).
        ckpt.ignore("transformer.rotary_pos_emb.inv_freq");

        let mut info = config.model_info();
        let norms =
            layers.iter().map(|l| l.input_layernorm.len() + l.post_attention_layernorm.len());
        let floats = word_embeddings.len() + final_layernorm.len() + norms.sum::<usize>();
        info.weight_format = linears.describe();
        info.weight_bytes = linears.bytes() + 4 * floats;
        Ok(Model {
            inv_freq: rope::inv_freq(10000.0, d / 2),
            config,
            info,
            word_embeddings,
            layers,
            final_layernorm,
            output_layer,
        })
    }

    /// Rotates q (all heads) and k (all groups) of every new token in place.
    fn apply_rope(&self, qkv: &mut [f32], start: usize) {
        let d = self.config.kv_channels;
        let heads = self.config.num_attention_heads + self.config.num_kv_heads();
        let width = self.query_key_value_width();
        for (t, row) in qkv.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = rope::cos_sin(&self.inv_freq, start + t);
            // q heads then k groups are contiguous at the front of the row.
            for head in row[..heads * d].chunks_exact_mut(d) {
                cpu::rope_interleaved(head, &cos, &sin);
            }
        }
    }

    fn query_key_value_width(&self) -> usize {
        (self.config.num_attention_heads + 2 * self.config.num_kv_heads()) * self.config.kv_channels
    }
}

/// Loads a ChatGLM2 checkpoint onto the GPU (the shared decoder of `gpu/`). The fused
/// QKV is already `[q | k | v]` and `dense_h_to_4h` already `[gate | up]`.
pub fn load_gpu(value: serde_json::Value, loader: &gpu::WeightLoader<'_>) -> Result<gpu::GpuModel> {
    let config: Config = parse_config(value)?;
    config.check_supported()?;
    let (h, d) = (config.hidden_size, config.kv_channels);
    let shape = gpu::Shape {
        hidden: h,
        num_layers: config.num_layers,
        attention: cuda::AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_kv_heads(),
            head_dim: d,
        },
        ffn: config.ffn_hidden_size,
        vocab: config.padded_vocab_size,
        eps: config.layernorm_epsilon,
        rope: cuda::Rope::Glm { rotary_dim: d / 2 },
        qkv_bias: config.add_qkv_bias,
        o_bias: false,
    };
    gpu::check_fits(loader.gpu, &shape, loader.linears.format)?;
    let q_width = config.num_attention_heads * d;
    let qkv_width = q_width + 2 * config.num_kv_heads() * d;
    let ffn = config.ffn_hidden_size;
    let layers = (0..config.num_layers)
        .map(|i| {
            let p = format!("transformer.encoder.layers.{i}");
            let qkv = format!("{p}.self_attention.query_key_value");
            Ok(gpu::LayerWeights {
                attention_norm: loader.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: loader.linear(&qkv, qkv_width, h)?,
                qkv_bias: match config.add_qkv_bias {
                    true => Some(loader.tensor(&format!("{qkv}.bias"), &[qkv_width])?),
                    false => None,
                },
                o: loader.linear(&format!("{p}.self_attention.dense"), h, q_width)?,
                o_bias: None,
                ffn_norm: loader.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: loader.linear(&format!("{p}.mlp.dense_h_to_4h"), 2 * ffn, h)?,
                down: loader.linear(&format!("{p}.mlp.dense_4h_to_h"), h, ffn)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    loader.checkpoint.ignore("transformer.rotary_pos_emb.inv_freq");
    let inv_freq = rope::inv_freq(10000.0, d / 2);
    let names = [
        "transformer.embedding.word_embeddings.weight",
        "transformer.encoder.final_layernorm.weight",
        "transformer.output_layer.weight",
    ];
    let info = config.model_info();
    gpu::GpuModel::from_layers(
        loader,
        shape,
        layers,
        names,
        info,
        Box::new(move |_| inv_freq.clone()),
    )
}

impl CausalLm for Model {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_batch(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let arena = cpu_arena(arena)?;
        let c = &self.config;
        let (h, d, n_kv) = (c.hidden_size, c.kv_channels, c.num_kv_heads());
        let (offsets, total) = batch_offsets(steps)?;
        let shape =
            AttentionShape { num_heads: c.num_attention_heads, num_kv_heads: n_kv, head_dim: d };
        let q_width = c.num_attention_heads * d;
        let kv_width = n_kv * d;
        let qkv_width = self.query_key_value_width();

        let mut x = embed_batch(&self.word_embeddings, h, steps)?; // [total, h]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = cpu::rms_norm(&x, &layer.input_layernorm, c.layernorm_epsilon);
            let mut qkv = layer.query_key_value.forward(&normed); // [total, q | k | v]
            let mut context = Vec::with_capacity(total * q_width);
            for (step, &offset) in steps.iter().zip(&offsets) {
                let (t, start) = (step.ids.len(), step.start);
                let rows = &mut qkv[offset * qkv_width..(offset + t) * qkv_width];
                self.apply_rope(rows, start);
                let mut q = Vec::with_capacity(t * q_width);
                for (i, row) in rows.chunks_exact(qkv_width).enumerate() {
                    q.extend_from_slice(&row[..q_width]);
                    let (k, v) = row[q_width..].split_at(kv_width);
                    arena.write(l, step.blocks, start + i, k, v);
                }
                let (k_cache, v_cache) = arena.gather(l, step.blocks, start + t);
                context.extend(cpu::causal_attention(&q, &k_cache, &v_cache, start, shape));
            }
            cpu::add_in_place(&mut x, &layer.dense.forward(&context));

            let normed = cpu::rms_norm(&x, &layer.post_attention_layernorm, c.layernorm_epsilon);
            let gate_up = layer.dense_h_to_4h.forward(&normed); // [total, gate | up]
            let act = cpu::silu_mul_packed(&gate_up, c.ffn_hidden_size);
            cpu::add_in_place(&mut x, &layer.dense_4h_to_h.forward(&act));
        }
        Ok(last_token_logits(
            &x,
            h,
            steps,
            &offsets,
            &self.final_layernorm,
            c.layernorm_epsilon,
            &self.output_layer,
        ))
    }
}
