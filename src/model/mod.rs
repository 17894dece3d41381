//! Model graphs, one file per family, loaded from a Hugging Face model folder.
//! `config.json`'s `model_type` decides the family; the family file parses its own config
//! (fields named exactly as in `config.json`), checks every tensor and owns its forward pass.

pub mod chatglm2;
pub(crate) mod gpu;
pub mod internlm2;
pub mod llama;
pub mod quant;
pub mod rope;
pub mod torch_bin;
pub mod weights;

use std::any::Any;
use std::path::Path;

use rayon::prelude::*;

use crate::dtype::KvFormat;
use crate::sampling::{self, SampleRow};
use crate::{Error, Result, cpu, cuda};
pub use quant::Quantization;
pub use weights::Checkpoint;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    ChatGlm2,
    InternLm2,
    /// `LlamaForCausalLM`: Llama-2/3.x, Vicuna.
    Llama,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::ChatGlm2 => "chatglm2",
            Family::InternLm2 => "internlm2",
            Family::Llama => "llama",
        }
    }
}

/// Where the weights come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadFormat {
    /// The folder's checkpoint files (safetensors, else PyTorch `.bin`).
    #[default]
    Safetensors,
    /// Random values of the right shapes (benchmarking without a checkpoint).
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "safetensors" => Ok(LoadFormat::Safetensors),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("unknown load format {other:?} (expected safetensors or dummy)")),
        }
    }
}

/// What the engine needs to know about a loaded model, whatever its family.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub family: Family,
    /// Width of the logits row (ChatGLM2's padded vocabulary included).
    pub logits_width: usize,
    /// Longest sequence (prompt + generated) the model serves.
    pub max_context: usize,
    /// End-of-sequence ids from `config.json`.
    pub eos_token_ids: Vec<u32>,
    pub num_layers: usize,
    pub num_parameters: usize,
    /// Parameters read by one decode step: all but the embedding table, of which a step
    /// reads one row (the figure bandwidth limits are computed from).
    pub decode_parameters: usize,
    /// Values of K (and of V) one token stores per layer: `kv_heads` heads.
    pub kv_width: usize,
    pub kv_heads: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub num_heads: usize,
    /// Dynamic NTK: once a forward call reaches past this many positions, the rotary base
    /// (so every K it writes) depends on the call's length, as in the original. K computed
    /// in such calls is only valid for that exact call: not reusable as a cached prefix,
    /// and a prompt that long must be prefilled in one call.
    pub length_dependent_rope_after: Option<usize>,
    /// How the weights are held, e.g. "awq w4a16 g32, other tensors float16" (load log).
    pub weight_format: String,
    /// Bytes of weights on the model's device.
    pub weight_bytes: usize,
}

/// Each row's choice from its logits, on all cores.
pub fn choose_on_host(logits: Vec<Vec<f32>>, rows: &[Option<SampleRow<'_>>]) -> Vec<Option<u32>> {
    logits
        .into_par_iter()
        .zip(rows)
        .map(|(mut logits, row)| row.as_ref().map(|row| sampling::choose(&mut logits, row)))
        .collect()
}

/// A causal LM whose KV state lives outside the weights, so one model serves many sequences.
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// A K/V arena of `num_blocks` blocks for this model, on its device, storing `format`.
    fn new_arena(
        &self,
        block_size: usize,
        num_blocks: usize,
        format: KvFormat,
    ) -> Result<Box<dyn KvStore>> {
        let info = self.info();
        Ok(Box::new(cpu::KvArena::new(
            info.num_layers,
            info.kv_heads,
            info.kv_width / info.kv_heads,
            format,
            block_size,
            num_blocks,
        )?))
    }

    /// Bytes one block of `block_size` positions takes in this model's arena.
    fn kv_bytes_per_block(&self, block_size: usize, format: KvFormat) -> usize {
        let info = self.info();
        cpu::KvArena::bytes_per_block(
            info.num_layers,
            info.kv_heads,
            info.kv_width / info.kv_heads,
            format,
            block_size,
        )
    }

    /// Free memory of the model's device, when it is not the host's (the GPU after the
    /// weights): what `cache_max_entry_count` takes its share of.
    fn device_free_memory(&self) -> Result<Option<usize>> {
        Ok(None)
    }

    /// After a failed pass: whether the device can still run anything (an error such as a
    /// failed cuBLAS call may hide a sticky one, which only the next call would show).
    /// `Error::DeviceLost` when it cannot.
    fn check_device(&self) -> Result<()> {
        Ok(())
    }

    /// Allocates up front what a call of up to `max_tokens` tokens and `max_seqs` sequences
    /// of up to `max_blocks_per_seq` KV blocks needs besides the KV cache (the GPU path's
    /// activations and step tables), so that the cache is sized from the memory left and
    /// serving does not allocate (engines that allocate per call need nothing). Returns the
    /// device bytes the activations then hold (0 where nothing is reserved).
    fn reserve_activations(
        &self,
        _max_tokens: usize,
        _max_seqs: usize,
        _max_blocks_per_seq: usize,
    ) -> Result<usize> {
        Ok(0)
    }

    /// Runs the new tokens of several sequences in one pass: the matrix products see all
    /// tokens at once (vLLM's flat layout), attention runs per sequence over its own blocks.
    /// Each step's `ids` take positions `start..`, their K/V go into its blocks of `arena`.
    /// Returns each sequence's last-position logits (`logits_width` values).
    fn forward_batch(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>>;

    /// Whether `forward_sample` chooses on the model's device (engines whose logits are on
    /// the host already ignore it).
    fn set_sample_on_device(&self, _on: bool) {}

    /// Whether decode steps are captured as CUDA graphs and replayed (the GPU path).
    fn set_cuda_graphs(&self, _on: bool) {}

    /// Whether the GPU path launches kernels with programmatic dependent launch, each
    /// kernel's blocks scheduled while the previous kernel drains (sm_90 on, CUDA 12.3 on);
    /// returns whether it is on.
    fn set_programmatic_launch(&self, _on: bool) -> bool {
        false
    }

    /// Whether the GPU path runs a single sequence's QKV product with the rotary and K/V
    /// write in its epilogue (one kernel instead of two; the same results). Set before the
    /// first pass: captured graphs keep the launches they were captured with.
    fn set_fused_qkv_rope(&self, _on: bool) {}

    /// `forward_batch`, then the next token of each row that asks for one, chosen as
    /// `sampling::choose` defines. Engines that can choose on their device override
    /// this so that only the chosen ids come back.
    fn forward_sample(
        &self,
        arena: &mut dyn KvStore,
        steps: &[SeqStep<'_>],
        rows: &[Option<SampleRow<'_>>],
    ) -> Result<Vec<Option<u32>>> {
        Ok(choose_on_host(self.forward_batch(arena, steps)?, rows))
    }
}

/// The K/V blocks of one engine, on the model's device (`cpu::KvArena`, `cuda::KvArena`).
pub trait KvStore: Send {
    fn block_size(&self) -> usize;
    fn num_blocks(&self) -> usize;
    /// Adds blocks at the end, keeping what the old ones hold.
    fn grow_to(&mut self, num_blocks: usize) -> Result<()>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl KvStore for cpu::KvArena {
    fn block_size(&self) -> usize {
        cpu::KvArena::block_size(self)
    }
    fn num_blocks(&self) -> usize {
        cpu::KvArena::num_blocks(self)
    }
    fn grow_to(&mut self, num_blocks: usize) -> Result<()> {
        cpu::KvArena::grow_to(self, num_blocks)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl KvStore for cuda::KvArena {
    fn block_size(&self) -> usize {
        cuda::KvArena::block_size(self)
    }
    fn num_blocks(&self) -> usize {
        cuda::KvArena::num_blocks(self)
    }
    fn grow_to(&mut self, num_blocks: usize) -> Result<()> {
        cuda::KvArena::grow_to(self, num_blocks)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The arena a CPU model was handed (it made it in `new_arena`).
pub(crate) fn cpu_arena(store: &mut dyn KvStore) -> Result<&mut cpu::KvArena> {
    store
        .as_any_mut()
        .downcast_mut()
        .ok_or_else(|| Error::Internal("a CPU model was given another device's KV arena".into()))
}

/// One sequence's share of a batched forward pass.
pub struct SeqStep<'a> {
    pub ids: &'a [u32],
    /// Position of the first id (tokens before it are in the arena).
    pub start: usize,
    /// The sequence's block table, covering positions up to `start + ids.len()`.
    pub blocks: &'a [u32],
}

/// Checks a batch and returns each step's row offset into the flat token list, plus the total.
pub(crate) fn batch_offsets(steps: &[SeqStep<'_>]) -> Result<(Vec<usize>, usize)> {
    if steps.is_empty() || steps.iter().any(|s| s.ids.is_empty()) {
        return Err(Error::InvalidRequest("forward called with no tokens".into()));
    }
    let mut offsets = Vec::with_capacity(steps.len());
    let mut total = 0;
    for step in steps {
        offsets.push(total);
        total += step.ids.len();
    }
    Ok((offsets, total))
}

/// The flat embeddings of every step's tokens, `[total, width]`.
pub(crate) fn embed_batch(table: &[f32], width: usize, steps: &[SeqStep<'_>]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for step in steps {
        out.extend(embed(table, width, step.ids)?);
    }
    Ok(out)
}

/// The final norm and output projection of each step's last token, as one product.
pub(crate) fn last_token_logits(
    x: &[f32],
    width: usize,
    steps: &[SeqStep<'_>],
    offsets: &[usize],
    norm: &[f32],
    eps: f32,
    output: &crate::cpu::Linear,
) -> Vec<Vec<f32>> {
    let mut last = Vec::with_capacity(steps.len() * width);
    for (step, &offset) in steps.iter().zip(offsets) {
        let row = offset + step.ids.len() - 1;
        last.extend_from_slice(&x[row * width..(row + 1) * width]);
    }
    let normed = crate::cpu::rms_norm(&last, norm, eps);
    let logits = output.forward(&normed);
    logits.chunks_exact(output.out_features).map(<[f32]>::to_vec).collect()
}

/// Reads `config.json` and returns the family it names with the parsed JSON.
pub fn read_config(dir: &Path) -> Result<(Family, serde_json::Value)> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(Error::Config(format!("model folder {} does not exist", dir.display())));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_family_config(&text, &path.display().to_string())
}

/// Parses `config.json` text (`origin` names it in errors) and the family it names.
pub fn parse_family_config(text: &str, origin: &str) -> Result<(Family, serde_json::Value)> {
    let config: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("{origin}: not valid JSON ({e})")))?;
    family_of(config, origin)
}

fn family_of(config: serde_json::Value, origin: &str) -> Result<(Family, serde_json::Value)> {
    let path = origin;
    let family = match config.get("model_type").and_then(|v| v.as_str()) {
        Some("chatglm") => Family::ChatGlm2,
        Some("internlm2") => Family::InternLm2,
        Some("llama") => Family::Llama,
        Some(other) => {
            return Err(Error::Config(format!(
                "{}: model_type {other:?} is not supported (supported: \"chatglm\" for \
                 ChatGLM2, \"internlm2\" for InternLM2/2.5, \"llama\" for Llama-2/3.x and \
                 Vicuna)",
                path
            )));
        }
        None => {
            return Err(Error::Config(format!("{path}: no \"model_type\" key")));
        }
    };
    Ok((family, config))
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
                _ => Err(format!("unknown device {other:?} (expected cpu, cuda or cuda:N)")),
            },
        }
    }
}

/// Loads the model of a folder onto the CPU path (f32).
pub fn load(dir: &Path, format: LoadFormat) -> Result<Box<dyn CausalLm>> {
    load_on(dir, format, Device::Cpu, crate::dtype::DType::F32)
}

/// Loads the model of a folder onto the CPU path with its linears in `quantization`.
pub fn load_quantized(
    dir: &Path,
    format: LoadFormat,
    quantization: Quantization,
) -> Result<Box<dyn CausalLm>> {
    load_with(dir, format, Device::Cpu, crate::dtype::DType::F32, quantization)
}

/// Loads the model of a folder onto `device`; `dtype` is the GPU path's (the CPU path
/// computes in f32).
pub fn load_on(
    dir: &Path,
    format: LoadFormat,
    device: Device,
    dtype: crate::dtype::DType,
) -> Result<Box<dyn CausalLm>> {
    load_with(dir, format, device, dtype, Quantization::None)
}

/// [`load_on`] with the linears in `quantization` (see [`quant::resolve`]).
pub fn load_with(
    dir: &Path,
    format: LoadFormat,
    device: Device,
    dtype: crate::dtype::DType,
    quantization: Quantization,
) -> Result<Box<dyn CausalLm>> {
    let (family, config) = read_config(dir)?;
    let checkpoint = match format {
        LoadFormat::Safetensors => Checkpoint::open(dir)?,
        LoadFormat::Dummy => Checkpoint::dummy(),
    };
    load_config(family, config, &checkpoint, device, dtype, quantization)
}

/// Builds a model of `family` from its parsed `config.json` and a checkpoint (or
/// `Checkpoint::dummy()` for random weights).
pub fn load_config(
    family: Family,
    config: serde_json::Value,
    checkpoint: &Checkpoint,
    device: Device,
    dtype: crate::dtype::DType,
    quantization: Quantization,
) -> Result<Box<dyn CausalLm>> {
    let dummy = checkpoint.is_dummy();
    let format = quant::resolve(&config, quantization)?;
    let model: Box<dyn CausalLm> = match device {
        Device::Cpu => {
            let linears = quant::Linears::new(checkpoint, format);
            match family {
                Family::ChatGlm2 => Box::new(chatglm2::Model::load(config, &linears)?),
                Family::InternLm2 => Box::new(internlm2::Model::load(config, &linears)?),
                Family::Llama => Box::new(llama::Model::load(config, &linears)?),
            }
        }
        Device::Cuda(ordinal) => {
            let gpu = cuda::Gpu::open(ordinal, dtype)?;
            gpu.bind()?;
            let linears = quant::Linears::new(checkpoint, format);
            let loader = gpu::WeightLoader { gpu: &gpu, checkpoint, dummy, linears: &linears };
            match family {
                Family::ChatGlm2 => Box::new(chatglm2::load_gpu(config, &loader)?),
                Family::InternLm2 => Box::new(internlm2::load_gpu(config, &loader)?),
                Family::Llama => Box::new(llama::load_gpu(config, &loader)?),
            }
        }
    };
    checkpoint.finish()?;
    let info = model.info();
    tracing::info!(
        "{} on {device:?}: weights {}, {:.1} MiB",
        family.name(),
        info.weight_format,
        info.weight_bytes as f64 / (1u64 << 20) as f64
    );
    Ok(model)
}

/// Deserialises a family config from `config.json`'s value, naming the bad key on error.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Config(format!("config.json: {e}")))
}

/// Looks up embedding rows, refusing ids outside the table.
pub(crate) fn embed(table: &[f32], width: usize, ids: &[u32]) -> Result<Vec<f32>> {
    let rows = table.len() / width;
    let mut out = Vec::with_capacity(ids.len() * width);
    for &id in ids {
        let id = id as usize;
        if id >= rows {
            return Err(Error::InvalidRequest(format!(
                "token id {id} is outside the model's vocabulary of {rows}"
            )));
        }
        out.extend_from_slice(&table[id * width..(id + 1) * width]);
    }
    Ok(out)
}

/// `eos_token_id` may be a number or a list in `config.json`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}
