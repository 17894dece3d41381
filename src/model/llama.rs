//! `LlamaForCausalLM` (transformers `modeling_llama.py`): Llama-2 and Vicuna v1.5 (MHA),
//! Llama-3.x (GQA, `llama3` rope scaling). Quirks this file owns: q/k/v and gate/up are
//! separate tensors (the GPU path stacks them into one product each at load), rotary is
//! "rotate half" over the whole head, and `tie_word_embeddings` makes the output layer the
//! embedding table.

use serde::Deserialize;

use super::{
    CausalLm, Family, KvStore, ModelInfo, SeqStep, TokenIds, batch_offsets, cpu_arena, embed_batch,
    gpu, last_token_logits, parse_config, quant, rope,
};
use crate::cpu::{self, AttentionShape, Linear};
use crate::cuda;
use crate::{Error, Result};
use rope::Scaling;

/// `config.json` of a Llama checkpoint; field names as in the file.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in early Llama configs: MHA.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Set where heads are not `hidden_size / num_attention_heads` wide.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Absent in configs written before transformers 4.33 (Vicuna v1.5's): 10000.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<rope::RopeScalingConfig>,
    pub rms_norm_eps: f32,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    /// The config of `config.json`'s value, checked, and its rotary scaling.
    fn parse(value: serde_json::Value) -> Result<(Config, Scaling)> {
        let config: Config = parse_config(value)?;
        config.check_supported()?;
        let scaling = config.scaling()?;
        Ok((config, scaling))
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    fn kv_width(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    fn scaling(&self) -> Result<Scaling> {
        Scaling::parse(self.rope_scaling.as_ref(), "Llama", &["linear", "dynamic", "llama3"])
    }

    fn model_info(&self, scaling: Scaling) -> ModelInfo {
        let h = self.hidden_size;
        let (q, kv, ffn, vocab) =
            (self.q_width(), self.kv_width(), self.intermediate_size, self.vocab_size);
        let attention_bias = if self.attention_bias { q + 2 * kv + h } else { 0 };
        let per_layer = 2 * h + (q + 2 * kv) * h + q * h + 3 * ffn * h + attention_bias;
        let output = if self.tie_word_embeddings { 0 } else { vocab * h };
        let num_parameters = vocab * h + output + h + self.num_hidden_layers * per_layer;
        ModelInfo {
            family: Family::Llama,
            logits_width: vocab,
            max_context: scaling.max_context(self.max_position_embeddings),
            eos_token_ids: self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            num_layers: self.num_hidden_layers,
            num_parameters,
            // A step reads one embedding row, and the whole table when it is also the output.
            decode_parameters: num_parameters
                - if self.tie_word_embeddings { 0 } else { vocab * h },
            kv_width: kv,
            kv_heads: self.kv_heads(),
            num_heads: self.num_attention_heads,
            weight_format: String::new(),
            weight_bytes: 0,
            length_dependent_rope_after: scaling
                .length_dependent_after(self.max_position_embeddings),
        }
    }

    fn inv_freq_for(&self, scaling: Scaling, total_len: usize) -> Vec<f32> {
        scaling.inv_freq(self.rope_theta, self.head_dim(), self.max_position_embeddings, total_len)
    }

    fn check_supported(&self) -> Result<()> {
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(Error::Config(format!(
                "Llama config: num_attention_heads {heads} is not a multiple of \
                 num_key_value_heads {kv}"
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "Llama config: hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::Config("Llama config: the head dim must be even".into()));
        }
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "Llama config: hidden_act {:?} is not supported (silu)",
                self.hidden_act
            )));
        }
        if self.mlp_bias {
            return Err(Error::Config("Llama config: mlp_bias=true is not supported".into()));
        }
        self.scaling().map(|_| ())
    }
}

/// Claims what real checkpoints carry besides the weights: the rotary tables older
/// transformers saved per layer, and the output layer of a tied model.
fn ignore_extras(ckpt: &super::Checkpoint, config: &Config) {
    for i in 0..config.num_hidden_layers {
        ckpt.ignore(&format!("model.layers.{i}.self_attn.rotary_emb.inv_freq"));
    }
    if config.tie_word_embeddings {
        ckpt.ignore("lm_head.weight");
    }
}

/// Where the output layer is read from.
fn output_name(config: &Config) -> &'static str {
    match config.tie_word_embeddings {
        true => "model.embed_tokens",
        false => "lm_head",
    }
}

struct Block {
    input_layernorm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_attention_layernorm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Model {
    config: Config,
    info: ModelInfo,
    scaling: Scaling,
    embed_tokens: Vec<f32>,
    layers: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Linear,
}

impl Model {
    pub fn load(value: serde_json::Value, linears: &quant::Linears<'_>) -> Result<Self> {
        let ckpt = linears.ckpt;
        let (config, scaling) = Config::parse(value)?;
        let h = config.hidden_size;
        let (q, kv, ffn, vocab) =
            (config.q_width(), config.kv_width(), config.intermediate_size, config.vocab_size);
        let bias = config.attention_bias;
        ignore_extras(ckpt, &config);

        let embed_tokens = ckpt.f32("model.embed_tokens.weight", &[vocab, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let (attn, mlp) = (format!("{p}.self_attn"), format!("{p}.mlp"));
                Ok(Block {
                    input_layernorm: ckpt.f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                    q: linears.layer(&format!("{attn}.q_proj"), q, h, bias)?,
                    k: linears.layer(&format!("{attn}.k_proj"), kv, h, bias)?,
                    v: linears.layer(&format!("{attn}.v_proj"), kv, h, bias)?,
                    o: linears.layer(&format!("{attn}.o_proj"), h, q, bias)?,
                    post_attention_layernorm: ckpt
                        .f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    gate: linears.layer(&format!("{mlp}.gate_proj"), ffn, h, false)?,
                    up: linears.layer(&format!("{mlp}.up_proj"), ffn, h, false)?,
                    down: linears.layer(&format!("{mlp}.down_proj"), h, ffn, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = ckpt.f32("model.norm.weight", &[h])?;
        let lm_head = linears.dense(output_name(&config), vocab, h, false)?;

        let mut info = config.model_info(scaling);
        let norms =
            layers.iter().map(|l| l.input_layernorm.len() + l.post_attention_layernorm.len());
        let floats = embed_tokens.len() + norm.len() + norms.sum::<usize>();
        info.weight_format = linears.describe();
        info.weight_bytes = linears.bytes() + 4 * floats;
        Ok(Model { config, info, scaling, embed_tokens, layers, norm, lm_head })
    }
}

/// Loads a Llama checkpoint onto the GPU (the shared decoder of `gpu/`), with q/k/v stacked
/// into one `[q | k | v]` product and gate/up into one `[gate | up]` product.
pub fn load_gpu(value: serde_json::Value, loader: &gpu::WeightLoader<'_>) -> Result<gpu::GpuModel> {
    let (config, scaling) = Config::parse(value)?;
    let h = config.hidden_size;
    let (q, kv, ffn, vocab) =
        (config.q_width(), config.kv_width(), config.intermediate_size, config.vocab_size);
    let bias = config.attention_bias;
    let shape = gpu::Shape {
        hidden: h,
        num_layers: config.num_hidden_layers,
        attention: cuda::AttentionShape {
            num_heads: config.num_attention_heads,
            num_kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
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
    ignore_extras(ckpt, &config);
    let layers = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let [wq, wk, wv, wo] =
                ["q_proj", "k_proj", "v_proj", "o_proj"].map(|n| format!("{p}.self_attn.{n}"));
            let [gate, up, down] =
                ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.mlp.{n}"));
            let qkv_parts = [(wq.as_str(), q), (wk.as_str(), kv), (wv.as_str(), kv)];
            Ok(gpu::LayerWeights {
                attention_norm: loader.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: loader.linear_concat(&qkv_parts, h)?,
                qkv_bias: match bias {
                    true => {
                        Some(loader.tensor_from(&format!("{p}.qkv.bias"), &[q + 2 * kv], || {
                            let mut joined = Vec::with_capacity(q + 2 * kv);
                            for (prefix, out) in qkv_parts {
                                joined.extend(ckpt.f32(&format!("{prefix}.bias"), &[out])?);
                            }
                            Ok(joined)
                        })?)
                    }
                    false => None,
                },
                o: loader.linear(&wo, h, q)?,
                o_bias: match bias {
                    true => Some(loader.tensor(&format!("{wo}.bias"), &[h])?),
                    false => None,
                },
                ffn_norm: loader.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: loader.linear_stacked([&gate, &up], ffn, h)?,
                down: loader.linear(&down, h, ffn)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let output = format!("{}.weight", output_name(&config));
    let names = ["model.embed_tokens.weight", "model.norm.weight", output.as_str()];
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
        let (q_width, kv_width) = (c.q_width(), c.kv_width());
        let (offsets, total) = batch_offsets(steps)?;
        let shape = AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.kv_heads(),
            head_dim: d,
        };
        // Rotary tables per sequence (dynamic scaling depends on each one's length).
        let tables: Vec<Vec<(Vec<f32>, Vec<f32>)>> = steps
            .iter()
            .map(|step| {
                let (t, start) = (step.ids.len(), step.start);
                let inv_freq = self.config.inv_freq_for(self.scaling, start + t);
                (start..start + t).map(|p| rope::cos_sin(&inv_freq, p)).collect()
            })
            .collect();

        let mut x = embed_batch(&self.embed_tokens, h, steps)?; // [total, h]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = cpu::rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps);
            let (mut q, mut k) = (layer.q.forward(&normed), layer.k.forward(&normed));
            let v = layer.v.forward(&normed);
            let mut context = Vec::with_capacity(total * q_width);
            for ((step, &offset), tables) in steps.iter().zip(&offsets).zip(&tables) {
                let (t, start) = (step.ids.len(), step.start);
                let q_rows = &mut q[offset * q_width..(offset + t) * q_width];
                let k_rows = &mut k[offset * kv_width..(offset + t) * kv_width];
                let v_rows = &v[offset * kv_width..(offset + t) * kv_width];
                for (i, (cos, sin)) in tables.iter().enumerate() {
                    let heads = q_rows[i * q_width..(i + 1) * q_width]
                        .chunks_exact_mut(d)
                        .chain(k_rows[i * kv_width..(i + 1) * kv_width].chunks_exact_mut(d));
                    for head in heads {
                        cpu::rope_rotate_half(head, cos, sin);
                    }
                    let (k_row, v_row) = (
                        &k_rows[i * kv_width..(i + 1) * kv_width],
                        &v_rows[i * kv_width..(i + 1) * kv_width],
                    );
                    arena.write(l, step.blocks, start + i, k_row, v_row);
                }
                let (k_cache, v_cache) = arena.gather(l, step.blocks, start + t);
                context.extend(cpu::causal_attention(q_rows, &k_cache, &v_cache, start, shape));
            }
            cpu::add_in_place(&mut x, &layer.o.forward(&context));

            let normed = cpu::rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps);
            let act = cpu::silu_mul(&layer.gate.forward(&normed), &layer.up.forward(&normed));
            cpu::add_in_place(&mut x, &layer.down.forward(&act));
        }
        Ok(last_token_logits(&x, h, steps, &offsets, &self.norm, c.rms_norm_eps, &self.lm_head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Config {
        let mut value = serde_json::json!({
            "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
        });
        value.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn defaults_are_those_of_llama_2_era_configs() {
        let c = config(serde_json::json!({}));
        assert_eq!((c.kv_heads(), c.head_dim(), c.rope_theta), (4, 16, 10000.0));
        assert_eq!(c.scaling().unwrap(), Scaling::None);
        assert_eq!(c.model_info(Scaling::None).max_context, 256);
    }

    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let cases = [
            (serde_json::json!({"num_key_value_heads": 3}), "num_key_value_heads 3"),
            (serde_json::json!({"hidden_act": "gelu"}), "gelu"),
            (serde_json::json!({"mlp_bias": true}), "mlp_bias"),
            (serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "yarn"),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "low_freq_factor",
            ),
        ];
        for (extra, named) in cases {
            let error = config(extra).check_supported().unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn tied_embeddings_are_counted_once() {
        let tied = config(serde_json::json!({"tie_word_embeddings": true}));
        let untied = config(serde_json::json!({}));
        let (a, b) = (tied.model_info(Scaling::None), untied.model_info(Scaling::None));
        assert_eq!(b.num_parameters - a.num_parameters, 100 * 64);
        assert_eq!(a.decode_parameters, a.num_parameters);
    }

    #[test]
    fn the_bench_shapes_count_the_published_parameters() {
        let shape = |text: &str| -> Config { serde_json::from_str(text).unwrap() };
        let llama3 = shape(include_str!("../../bench/shapes/llama-3.1-8b/config.json"));
        let info = llama3.model_info(llama3.scaling().unwrap());
        assert_eq!(
            (info.num_parameters, info.max_context, info.kv_heads),
            (8_030_261_248, 131072, 8)
        );
        let vicuna = shape(include_str!("../../bench/shapes/vicuna-7b/config.json"));
        let info = vicuna.model_info(vicuna.scaling().unwrap());
        assert_eq!(
            (info.num_parameters, info.max_context, info.kv_heads),
            (6_738_415_616, 4096, 32)
        );
    }
}
