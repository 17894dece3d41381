//! The decoder's weights on the device, loaded from a checkpoint or filled (dummy).

use std::sync::Arc;

use rand::{RngExt, SeedableRng};

use super::Shape;
use super::quant::{DeviceWeight, QuantRows};
use crate::cuda::{self, Buffer, Gpu};
use crate::model::quant::{Linears, WeightFormat, w4_group};
use crate::model::{Checkpoint, ModelInfo};
use crate::{Error, Result};

/// One layer's weights on the device, PyTorch layout (`[out, in]`, row-major); the
/// linears' in the model's weight format.
pub struct LayerWeights {
    pub attention_norm: Buffer,
    /// `[q heads | k heads | v heads]` rows.
    pub qkv: DeviceWeight,
    pub qkv_bias: Option<Buffer>,
    pub o: DeviceWeight,
    pub o_bias: Option<Buffer>,
    pub ffn_norm: Buffer,
    /// `[gate | up]` rows, `2·ffn`.
    pub gate_up: DeviceWeight,
    pub down: DeviceWeight,
}

pub struct Weights {
    pub embedding: Buffer,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Buffer,
    pub output: Buffer,
    /// Where a quantised linear is dequantised for a product of more rows than the
    /// quantised GEMV takes (the largest linear's elems); None with dense linears.
    pub dequantized: Option<Buffer>,
}

impl Weights {
    /// Gathers the weights, with the dequantisation buffer quantised linears need.
    pub fn new(
        gpu: &Gpu,
        shape: &Shape,
        embedding: Buffer,
        layers: Vec<LayerWeights>,
        final_norm: Buffer,
        output: Buffer,
    ) -> Result<Self> {
        let quantized = layers.first().is_some_and(|l| l.qkv.is_quantized());
        let dequantized = match quantized {
            true => Some(gpu.alloc(shape.largest_linear() * gpu.dtype.size())?),
            false => None,
        };
        Ok(Weights { embedding, layers, final_norm, output, dequantized })
    }

    /// Whether the decoder-layer linears are FP8 (their products need activation scratch).
    pub fn is_fp8(&self) -> bool {
        self.layers.first().is_some_and(|l| matches!(l.qkv, DeviceWeight::Fp8 { .. }))
    }

    /// Device bytes of every weight.
    pub fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let buffers = [Some(&l.attention_norm), l.qkv_bias.as_ref(), l.o_bias.as_ref()];
                buffers.into_iter().flatten().map(Buffer::bytes).sum::<usize>()
                    + l.ffn_norm.bytes()
                    + [&l.qkv, &l.o, &l.gate_up, &l.down].iter().map(|w| w.bytes()).sum::<usize>()
            })
            .sum();
        layers + self.embedding.bytes() + self.final_norm.bytes() + self.output.bytes()
    }
}

/// Puts weights on the device: from the checkpoint (converted to the GPU's dtype, the
/// decoder-layer linears in the model's weight format), or, for `load_format dummy`,
/// filled with random values (norm scales 1, other values uniform in ±1/sqrt(last dim), as
/// `Checkpoint::dummy` on the CPU; quantised linears random levels of that size).
pub struct WeightLoader<'a> {
    pub gpu: &'a Arc<Gpu>,
    pub checkpoint: &'a Checkpoint,
    pub dummy: bool,
    /// The linears' format, and the count of what was built.
    pub linears: &'a Linears<'a>,
}

impl WeightLoader<'_> {
    /// Decoder-layer linear `prefix` (`[out, inp]`, its `.weight`) in the model's format.
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<DeviceWeight> {
        self.linear_rows(prefix, out, inp, None)
    }

    /// Linear `prefix` with its rows taken in `order` (indices of the stored rows), as a
    /// family rearranges them; the stored order without one.
    pub fn linear_rows(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        order: Option<&[usize]>,
    ) -> Result<DeviceWeight> {
        let name = format!("{prefix}.weight");
        if self.linears.format == WeightFormat::Dense {
            return Ok(DeviceWeight::Dense(self.tensor_from(&name, &[out, inp], || {
                let stored = self.checkpoint.f32(&name, &[out, inp])?;
                Ok(match order {
                    Some(order) => order
                        .iter()
                        .flat_map(|&r| &stored[r * inp..(r + 1) * inp])
                        .copied()
                        .collect(),
                    None => stored,
                })
            })?));
        }
        let rows = self.quant_rows(prefix, out, inp)?;
        let rows = match order {
            Some(order) => rows.select_rows(order),
            None => rows,
        };
        self.upload(&rows)
    }

    /// The rows of linears `prefixes` (each `[out, inp]`) stacked, as `[gate | up]`.
    pub fn linear_stacked(
        &self,
        prefixes: [&str; 2],
        out: usize,
        inp: usize,
    ) -> Result<DeviceWeight> {
        let [top, bottom] = prefixes;
        self.linear_concat(&[(top, out), (bottom, out)], inp)
    }

    /// The rows of linears `parts` (each `(prefix, out)`, `[out, inp]`) one after another,
    /// as one product: Llama's `[q | k | v]`.
    pub fn linear_concat(&self, parts: &[(&str, usize)], inp: usize) -> Result<DeviceWeight> {
        if self.linears.format == WeightFormat::Dense {
            let names: Vec<String> = parts.iter().map(|(p, _)| format!("{p}.weight")).collect();
            let joined = parts.iter().map(|(p, _)| *p).collect::<Vec<_>>().join("+");
            let rows: usize = parts.iter().map(|(_, out)| out).sum();
            return Ok(DeviceWeight::Dense(self.tensor_from(&joined, &[rows, inp], || {
                let mut stacked = Vec::with_capacity(rows * inp);
                for (name, (_, out)) in names.iter().zip(parts) {
                    stacked.extend(self.checkpoint.f32(name, &[*out, inp])?);
                }
                Ok(stacked)
            })?));
        }
        let mut rows: Option<QuantRows> = None;
        for (prefix, out) in parts {
            let part = self.quant_rows(prefix, *out, inp)?;
            rows = Some(match rows {
                Some(above) => above.stack(part)?,
                None => part,
            });
        }
        let rows = rows.ok_or_else(|| Error::Internal("an empty linear concatenation".into()))?;
        self.upload(&rows)
    }

    fn upload(&self, rows: &QuantRows) -> Result<DeviceWeight> {
        let weight = rows.upload(self.gpu)?;
        self.linears.add_bytes(weight.bytes());
        Ok(weight)
    }

    /// A quantised linear in the GPU's layout: read or quantised as the CPU path does it
    /// (then re-laid), or random levels of a plausible size for dummy weights.
    fn quant_rows(&self, prefix: &str, out: usize, inp: usize) -> Result<QuantRows> {
        if self.dummy {
            return self.random_rows(prefix, out, inp);
        }
        match self.linears.quantized(prefix, out, inp)? {
            Some(quantized) => QuantRows::from_cpu(&quantized, out, inp),
            None => {
                Err(Error::Internal(format!("{prefix}: a dense linear asked for as quantised")))
            }
        }
    }

    /// Random levels with scales that give values of about ±1/sqrt(inp), as the dense dummy
    /// weights (a quantiser over those would give the same spread, much more slowly).
    fn random_rows(&self, prefix: &str, out: usize, inp: usize) -> Result<QuantRows> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed(prefix));
        let bound = 1.0 / (inp as f32).sqrt();
        Ok(match self.linears.format {
            WeightFormat::W8 => QuantRows::W8 {
                n: out,
                k: inp,
                levels: (0..out * inp).map(|_| rng.random_range(-127..=127i8)).collect(),
                scales: vec![bound / 127.0; out],
            },
            // Any E4M3 byte but NaN's (`S.1111.111`), read as up to ±448 times the scale.
            WeightFormat::Fp8 => QuantRows::Fp8 {
                n: out,
                k: inp,
                values: (0..out * inp)
                    .map(|_| rng.random::<u8>())
                    .map(|b| if b & 0x7f == 0x7f { b ^ 1 } else { b })
                    .collect(),
                scales: vec![bound / 448.0; out],
            },
            format => {
                let group = match format {
                    WeightFormat::Awq { group } => group,
                    _ => w4_group(inp).ok_or_else(|| {
                        Error::Config(format!("{prefix}: {inp} inputs are not a multiple of 32"))
                    })?,
                };
                self.linears.add_group(group);
                let scale = half::f16::from_f32(bound / 7.5).to_bits();
                let zero = half::f16::from_f32(8.0).to_bits();
                QuantRows::W4 {
                    n: out,
                    k: inp,
                    group,
                    packed: (0..out * inp / 8).map(|_| rng.random::<u32>()).collect(),
                    params: vec![u32::from(scale) | (u32::from(zero) << 16); out * (inp / group)],
                }
            }
        })
    }
    /// The tensor `name` of exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Buffer> {
        self.tensor_from(name, shape, || self.checkpoint.f32(name, shape))
    }

    /// A device tensor of `shape` whose values `read` assembles on the host from one or
    /// more checkpoint tensors (reordered or concatenated); `name` seeds dummy values.
    pub fn tensor_from(
        &self,
        name: &str,
        shape: &[usize],
        read: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Buffer> {
        let numel: usize = shape.iter().product();
        if !self.dummy {
            let values = read()?;
            debug_assert_eq!(values.len(), numel, "{name}");
            return self.gpu.upload_elems(&values);
        }
        if name.contains("norm") {
            return self.gpu.upload_elems(&vec![1.0; numel]);
        }
        let buffer = self.gpu.alloc(numel * self.gpu.dtype.size())?;
        let bound = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        self.gpu.fill_uniform(buffer.view(), numel, seed(name), bound)?;
        Ok(buffer)
    }
}

/// A dummy tensor's seed, from its name.
fn seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Fails early, with the sizes, when the weights cannot fit in the device's free memory
/// (or the heads are wider than the attention kernels take).
pub fn check_fits(gpu: &Gpu, shape: &Shape, format: WeightFormat) -> Result<()> {
    if shape.attention.head_dim > cuda::MAX_HEAD_DIM {
        return Err(Error::Config(format!(
            "head dim {} is over the {} the GPU attention kernels support",
            shape.attention.head_dim,
            cuda::MAX_HEAD_DIM
        )));
    }
    let needed = shape.weight_bytes(format, gpu.dtype.size());
    let (free, total) = gpu.memory()?;
    // Room for activations, cuBLAS and at least some KV blocks.
    let headroom = 512 << 20;
    if needed + headroom > free {
        return Err(Error::Device(format!(
            "the weights need {:.2} GiB in {} ({:?}) but GPU {} ({}) has {:.2} GiB free of \
             {:.2} GiB",
            needed as f64 / (1u64 << 30) as f64,
            gpu.dtype.name(),
            format,
            gpu.ordinal,
            gpu.name,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
        )));
    }
    Ok(())
}

/// `info` with the weight format and bytes of a model loaded onto `gpu`.
pub(super) fn gpu_info(
    mut info: ModelInfo,
    loader: &WeightLoader<'_>,
    weights: &Weights,
) -> ModelInfo {
    info.weight_format = match loader.linears.format {
        WeightFormat::Dense => loader.gpu.dtype.name().to_string(),
        _ => format!("{}, computed in {}", loader.linears.describe(), loader.gpu.dtype.name()),
    };
    info.weight_bytes = weights.bytes();
    info
}
