//! InternLM2 / InternLM2.5 (internlm/internlm2_5-7b-chat, HF remote code
//! `modeling_internlm2.py`), on the CPU. Facts: `shared/spec/internlm2.md` §1–4. Quirks
//! this file owns: `wqkv` is packed per K/V group as `[K, G+2, D]` rows (G query heads,
//! then the group's key, then its value), rotary is "rotate half" over the whole head, and
//! dynamic NTK scaling is decided per forward call from that call's longest position, so
//! keys already cached keep the rotation they were written with (§4.3).

use serde::Deserialize;

use super::{
    CausalLm, Family, KvStore, ModelInfo, SeqStep, TokenIds, batch_offsets, cpu_arena, embed_batch,
    last_token_logits, parse_config, quant, rope,
};
use rope::Scaling;

use super::gpu;
use crate::cpu::{self, AttentionShape, Linear};
use crate::cuda;
use crate::{Error, Result};

/// `config.json` of an InternLM2 checkpoint; field names as in the file.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<rope::RopeScalingConfig>,
    pub rms_norm_eps: f32,
    #[serde(default)]
    pub bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub eos_token_id: TokenIds,
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn scaling(&self) -> Result<Scaling> {
        Scaling::parse(self.rope_scaling.as_ref(), "InternLM2", &["linear", "dynamic"])
    }

    fn model_info(&self, scaling: Scaling) -> ModelInfo {
        let (h, d) = (self.hidden_size, self.head_dim());
        let q_width = self.num_attention_heads * d;
        let qkv_width = q_width + 2 * self.num_key_value_heads * d;
        let (ffn, vocab, bias) = (self.intermediate_size, self.vocab_size, self.bias);
        let num_parameters = vocab * h * 2
            + h
            + self.num_hidden_layers
                * (2 * h
                    + qkv_width * h
                    + q_width * h
                    + 3 * ffn * h
                    + if bias { qkv_width + h } else { 0 });
        let max_context = scaling.max_context(self.max_position_embeddings);
        ModelInfo {
            family: Family::InternLm2,
            logits_width: vocab,
            max_context,
            eos_token_ids: self.eos_token_id.to_vec(),
            num_layers: self.num_hidden_layers,
            num_parameters,
            decode_parameters: num_parameters - vocab * h,
            kv_width: self.num_key_value_heads * d,
            kv_heads: self.num_key_value_heads,
            num_heads: self.num_attention_heads,
            weight_format: String::new(),
            weight_bytes: 0,
            length_dependent_rope_after: scaling
                .length_dependent_after(self.max_position_embeddings),
        }
    }

    /// Inverse frequencies for a call whose sequence reaches `total_len` positions.
    fn inv_freq_for(&self, scaling: Scaling, total_len: usize) -> Vec<f32> {
        scaling.inv_freq(self.rope_theta, self.head_dim(), self.max_position_embeddings, total_len)
    }

    fn check_supported(&self) -> Result<()> {
        let (heads, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if heads == 0 || kv == 0 || heads % kv != 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "InternLM2 config: hidden_size {}, num_attention_heads {heads} and \
                 num_key_value_heads {kv} do not divide evenly",
                self.hidden_size
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::Config("InternLM2 config: head dim must be even".into()));
        }
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "InternLM2 config: hidden_act {:?} is not supported (silu)",
                self.hidden_act
            )));
        }
        if self.tie_word_embeddings {
            return Err(Error::Config(
                "InternLM2 config: tie_word_embeddings=true is not supported".into(),
            ));
        }
        self.scaling().map(|_| ())
    }
}

struct Block {
    attention_norm: Vec<f32>,
    wqkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w1: Linear,
    w3: Linear,
    w2: Linear,
}

pub struct Model {
    config: Config,
    info: ModelInfo,
    scaling: Scaling,
    tok_embeddings: Vec<f32>,
    layers: Vec<Block>,
    norm: Vec<f32>,
    output: Linear,
}

impl Model {
    pub fn load(value: serde_json::Value, linears: &quant::Linears<'_>) -> Result<Self> {
        let ckpt = linears.ckpt;
        let config: Config = parse_config(value)?;
        config.check_supported()?;
        let scaling = config.scaling()?;
        let (h, d) = (config.hidden_size, config.head_dim());
        let q_width = config.num_attention_heads * d;
        let qkv_width = q_width + 2 * config.num_key_value_heads * d;
        let (ffn, vocab, bias) = (config.intermediate_size, config.vocab_size, config.bias);

        let tok_embeddings = ckpt.f32("model.tok_embeddings.weight", &[vocab, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    attention_norm: ckpt.f32(&format!("{p}.attention_norm.weight"), &[h])?,
                    wqkv: linears.layer(&format!("{p}.attention.wqkv"), qkv_width, h, bias)?,
                    wo: linears.layer(&format!("{p}.attention.wo"), h, q_width, bias)?,
                    ffn_norm: ckpt.f32(&format!("{p}.ffn_norm.weight"), &[h])?,
                    w1: linears.layer(&format!("{p}.feed_forward.w1"), ffn, h, false)?,
                    w3: linears.layer(&format!("{p}.feed_forward.w3"), ffn, h, false)?,
                    w2: linears.layer(&format!("{p}.feed_forward.w2"), h, ffn, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = ckpt.f32("model.norm.weight", &[h])?;
        let output = linears.dense("output", vocab, h, false)?;

        let mut info = config.model_info(scaling);
        let norms = layers.iter().map(|l| l.attention_norm.len() + l.ffn_norm.len());
        let floats = tok_embeddings.len() + norm.len() + norms.sum::<usize>();
        info.weight_format = linears.describe();
        info.weight_bytes = linears.bytes() + 4 * floats;
        Ok(Model { config, info, scaling, tok_embeddings, layers, norm, output })
    }

    fn inv_freq_for(&self, total_len: usize) -> Vec<f32> {
        self.config.inv_freq_for(self.scaling, total_len)
    }
}

/// `wqkv` rows from the checkpoint's per-group `[K, G+2, D]` packing to the GPU decoder's
/// `[q heads | k heads | v heads]` (query head k·G + g, as the CPU path orders them).
/// Works for the weight (`width` columns) and the bias (`width` 1).
fn unpack_wqkv(packed: &[f32], kv_heads: usize, group: usize, d: usize, width: usize) -> Vec<f32> {
    let row = |k: usize, slot: usize| {
        let start = ((k * (group + 2) + slot) * d) * width;
        &packed[start..start + d * width]
    };
    let mut out = Vec::with_capacity(packed.len());
    for k in 0..kv_heads {
        for g in 0..group {
            out.extend_from_slice(row(k, g));
        }
    }
    for slot in [group, group + 1] {
        for k in 0..kv_heads {
            out.extend_from_slice(row(k, slot));
        }
    }
    out
}

/// Loads an InternLM2 checkpoint onto the GPU (the shared decoder of `gpu/`), with
/// `wqkv` unpacked and `w1` (gate) / `w3` (up) stacked into one `[gate | up]` product.
pub fn load_gpu(value: serde_json::Value, loader: &gpu::WeightLoader<'_>) -> Result<gpu::GpuModel> {
    let config: Config = parse_config(value)?;
    config.check_supported()?;
    let scaling = config.scaling()?;
    let (h, d) = (config.hidden_size, config.head_dim());
    let (kv_heads, group) =
        (config.num_key_value_heads, config.num_attention_heads / config.num_key_value_heads);
    let q_width = config.num_attention_heads * d;
    let qkv_width = q_width + 2 * kv_heads * d;
    let (ffn, vocab, bias) = (config.intermediate_size, config.vocab_size, config.bias);
    let shape = gpu::Shape {
        hidden: h,
        num_layers: config.num_hidden_layers,
        attention: cuda::AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        },
        ffn,
        vocab,
        eps: config.rms_norm_eps,
        rope: cuda::Rope::RotateHalf,
        qkv_bias: bias,
        o_bias: bias,
    };
    gpu::check_fits(loader.gpu, &shape, loader.linears.format)?;
    let ckpt = loader.checkpoint;
    // The stored row of each row of [q | k | v] (the checkpoint packs them per K/V group).
    let indices: Vec<f32> = (0..qkv_width).map(|i| i as f32).collect();
    let qkv_order: Vec<usize> =
        unpack_wqkv(&indices, kv_heads, group, d, 1).into_iter().map(|i| i as usize).collect();
    let layers = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let wqkv = format!("{p}.attention.wqkv");
            let (w1, w3) = (format!("{p}.feed_forward.w1"), format!("{p}.feed_forward.w3"));
            Ok(gpu::LayerWeights {
                attention_norm: loader.tensor(&format!("{p}.attention_norm.weight"), &[h])?,
                qkv: loader.linear_rows(&wqkv, qkv_width, h, Some(&qkv_order))?,
                qkv_bias: match bias {
                    true => {
                        Some(loader.tensor_from(&format!("{wqkv}.bias"), &[qkv_width], || {
                            let packed = ckpt.f32(&format!("{wqkv}.bias"), &[qkv_width])?;
                            Ok(unpack_wqkv(&packed, kv_heads, group, d, 1))
                        })?)
                    }
                    false => None,
                },
                o: loader.linear(&format!("{p}.attention.wo"), h, q_width)?,
                o_bias: match bias {
                    true => Some(loader.tensor(&format!("{p}.attention.wo.bias"), &[h])?),
                    false => None,
                },
                ffn_norm: loader.tensor(&format!("{p}.ffn_norm.weight"), &[h])?,
                gate_up: loader.linear_stacked([&w1, &w3], ffn, h)?,
                down: loader.linear(&format!("{p}.feed_forward.w2"), h, ffn)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let names = ["model.tok_embeddings.weight", "model.norm.weight", "output.weight"];
    let freq_config = config.clone();
    let inv_freq = Box::new(move |total_len| freq_config.inv_freq_for(scaling, total_len));
    gpu::GpuModel::from_layers(loader, shape, layers, names, config.model_info(scaling), inv_freq)
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
        let (h, d) = (c.hidden_size, c.head_dim());
        let (kv_heads, group) =
            (c.num_key_value_heads, c.num_attention_heads / c.num_key_value_heads);
        let (offsets, total) = batch_offsets(steps)?;
        let shape = AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        };
        let qkv_width = (group + 2) * kv_heads * d;
        // Rotary tables per sequence: dynamic NTK scaling depends on each one's length.
        let tables: Vec<Vec<(Vec<f32>, Vec<f32>)>> = steps
            .iter()
            .map(|step| {
                let (t, start) = (step.ids.len(), step.start);
                let inv_freq = self.inv_freq_for(start + t);
                (start..start + t).map(|p| rope::cos_sin(&inv_freq, p)).collect()
            })
            .collect();

        let mut x = embed_batch(&self.tok_embeddings, h, steps)?; // [total, h]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = cpu::rms_norm(&x, &layer.attention_norm, c.rms_norm_eps);
            // [total, K, G+2, D]: per group G query heads, then its key, then its value.
            let qkv = layer.wqkv.forward(&normed);
            let mut context = Vec::with_capacity(total * c.num_attention_heads * d);
            for ((step, &offset), tables) in steps.iter().zip(&offsets).zip(&tables) {
                let (t, start) = (step.ids.len(), step.start);
                let rows = &qkv[offset * qkv_width..(offset + t) * qkv_width];
                let mut q = Vec::with_capacity(t * c.num_attention_heads * d);
                let (mut k, mut v) =
                    (Vec::with_capacity(kv_heads * d), Vec::with_capacity(kv_heads * d));
                for (i, (row, (cos, sin))) in rows.chunks_exact(qkv_width).zip(tables).enumerate() {
                    k.clear();
                    v.clear();
                    for slots in row.chunks_exact((group + 2) * d) {
                        let mut heads = slots.to_vec();
                        for head in heads[..(group + 1) * d].chunks_exact_mut(d) {
                            cpu::rope_rotate_half(head, cos, sin);
                        }
                        q.extend_from_slice(&heads[..group * d]);
                        k.extend_from_slice(&heads[group * d..(group + 1) * d]);
                        v.extend_from_slice(&heads[(group + 1) * d..]);
                    }
                    arena.write(l, step.blocks, start + i, &k, &v);
                }
                let (k_cache, v_cache) = arena.gather(l, step.blocks, start + t);
                context.extend(cpu::causal_attention(&q, &k_cache, &v_cache, start, shape));
            }
            cpu::add_in_place(&mut x, &layer.wo.forward(&context));

            let normed = cpu::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps);
            let act = cpu::silu_mul(&layer.w1.forward(&normed), &layer.w3.forward(&normed));
            cpu::add_in_place(&mut x, &layer.w2.forward(&act));
        }
        Ok(last_token_logits(&x, h, steps, &offsets, &self.norm, c.rms_norm_eps, &self.output))
    }
}

#[cfg(test)]
mod tests {
    use super::unpack_wqkv;

    #[test]
    fn wqkv_unpacks_to_q_then_k_then_v_in_the_cpu_paths_head_order() {
        // 2 K/V groups of 2 query heads, head dim 1, 2 columns: rows are named by value.
        let (q, k, v) = (0.0, 10.0, 20.0);
        let packed: Vec<f32> = [
            [q, q + 0.5],
            [q + 1.0, q + 1.5],
            [k, k + 0.5],
            [v, v + 0.5], // group 0
            [q + 2.0, q + 2.5],
            [q + 3.0, q + 3.5],
            [k + 1.0, k + 1.5],
            [v + 1.0, v + 1.5],
        ]
        .concat();
        let unpacked = unpack_wqkv(&packed, 2, 2, 1, 2);
        let rows: Vec<f32> = unpacked.chunks(2).map(|r| r[0]).collect();
        assert_eq!(rows, [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(unpacked[1], 0.5);
        // The bias (width 1) takes the same order.
        let bias: Vec<f32> = packed.chunks(2).map(|r| r[0]).collect();
        assert_eq!(unpack_wqkv(&bias, 2, 2, 1, 1), rows);
    }
}
