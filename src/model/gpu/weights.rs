//! The decoder's weights on the device, loaded from a checkpoint or filled (dummy).

use std::sync::Arc;

use super::Shape;
use crate::cuda::{self, Buffer, Gpu};
use crate::model::{Checkpoint, ModelInfo};
use crate::{Error, Result};

/// One layer's weights on the device, PyTorch layout (`[out, in]`, row-major).
pub struct LayerWeights {
    pub attention_norm: Buffer,
    /// `[q heads | k heads | v heads]` rows.
    pub qkv: Buffer,
    pub qkv_bias: Option<Buffer>,
    pub o: Buffer,
    pub o_bias: Option<Buffer>,
    pub ffn_norm: Buffer,
    /// `[gate | up]` rows, `2·ffn`.
    pub gate_up: Buffer,
    pub down: Buffer,
}

pub struct Weights {
    pub embedding: Buffer,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Buffer,
    pub output: Buffer,
}

/// Puts weights on the device: from the checkpoint (converted to the GPU's dtype), or, for
/// `load_format dummy`, filled on the device (norm scales 1, other values uniform in
/// ±1/sqrt(last dim), as `Checkpoint::dummy` on the CPU).
pub struct WeightLoader<'a> {
    pub gpu: &'a Arc<Gpu>,
    pub checkpoint: &'a Checkpoint,
    pub dummy: bool,
}

impl WeightLoader<'_> {
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
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let bound = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        self.gpu.fill_uniform(buffer.view(), numel, seed, bound)?;
        Ok(buffer)
    }
}

/// Fails early, with the sizes, when the weights cannot fit in the device's free memory
/// (or the heads are wider than the attention kernels take).
pub fn check_fits(gpu: &Gpu, shape: &Shape) -> Result<()> {
    if shape.attention.head_dim > cuda::MAX_HEAD_DIM {
        return Err(Error::Config(format!(
            "head dim {} is over the {} the GPU attention kernels support",
            shape.attention.head_dim,
            cuda::MAX_HEAD_DIM
        )));
    }
    let needed = shape.num_weights() * gpu.dtype.size();
    let (free, total) = gpu.memory()?;
    // Room for activations, cuBLAS and at least some KV blocks.
    let headroom = 512 << 20;
    if needed + headroom > free {
        return Err(Error::Device(format!(
            "the weights need {:.2} GiB in {} but GPU {} ({}) has {:.2} GiB free of {:.2} GiB",
            needed as f64 / (1u64 << 30) as f64,
            gpu.dtype.name(),
            gpu.ordinal,
            gpu.name,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
        )));
    }
    Ok(())
}

/// `info` with the weight format and bytes of a model loaded onto `gpu`.
pub fn gpu_info(mut info: ModelInfo, gpu: &Gpu, shape: &Shape) -> ModelInfo {
    info.weight_format = gpu.dtype.name().to_string();
    info.weight_bytes = shape.num_weights() * gpu.dtype.size();
    info
}
