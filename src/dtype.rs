//! The element type a model computes and stores in on its device (the CPU path computes
//! in f32; the GPU path in any of these).

/// Element type of weights, activations and the KV cache on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    /// Host values in this type's bytes (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::BF16 => {
                values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()
            }
            DType::F16 => {
                values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()
            }
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            other => Err(format!("unknown dtype {other:?} (expected bf16, f16 or f32)")),
        }
    }
}

/// How the KV cache stores K and V: in the model's own element type, or quantised per token
/// and K/V head with an f16 scale and zero beside each head's values — to 8 or 4 bits
/// (LMDeploy's `quant_policy` 8 and 4) or to FP8 E4M3 (vLLM's `kv_cache_dtype` fp8);
/// `cpu::kv_quant` has the exact arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvFormat {
    /// The model's element type (f32 on the CPU path; the GPU path's dtype).
    #[default]
    Model,
    Int8,
    Int4,
    Fp8,
}

impl KvFormat {
    /// LMDeploy's `quant_policy`: 0 (the model's type), 8 (int8) or 4 (int4).
    pub fn from_quant_policy(policy: &str) -> Result<Self, String> {
        match policy.trim() {
            "0" => Ok(KvFormat::Model),
            "8" => Ok(KvFormat::Int8),
            "4" => Ok(KvFormat::Int4),
            other => Err(format!(
                "quant_policy {other:?} is not one of 0 (KV cache in the model's type), 8 (int8) \
                 or 4 (int4)"
            )),
        }
    }

    /// vLLM's `kv_cache_dtype`: auto (the model's type), fp8 or fp8_e4m3; int8 and int4
    /// name `quant_policy`'s formats.
    pub fn from_kv_cache_dtype(name: &str) -> Result<Self, String> {
        match name.trim() {
            "auto" => Ok(KvFormat::Model),
            "fp8" | "fp8_e4m3" => Ok(KvFormat::Fp8),
            "int8" => Ok(KvFormat::Int8),
            "int4" => Ok(KvFormat::Int4),
            other => Err(format!(
                "kv_cache_dtype {other:?} is not one of auto (the model's type), fp8 (E4M3), \
                 fp8_e4m3, int8 or int4"
            )),
        }
    }

    /// Bits per stored value (None: the model's element type).
    pub fn bits(self) -> Option<u32> {
        match self {
            KvFormat::Model => None,
            KvFormat::Int8 | KvFormat::Fp8 => Some(8),
            KvFormat::Int4 => Some(4),
        }
    }

    /// The kernels' name for the format (`KV_ELEM`, `KV_INT8`, `KV_INT4`, `KV_FP8` in
    /// kernels/common.cuh).
    pub fn kernel_code(self) -> i32 {
        match self {
            KvFormat::Model => 0,
            KvFormat::Int8 => 8,
            KvFormat::Int4 => 4,
            KvFormat::Fp8 => 1,
        }
    }

    /// Bytes one token's K (or V) takes in one layer: `kv_heads` heads of `head_dim`
    /// values, `elem` bytes each in the model's type; quantised, the packed values plus
    /// an f16 scale and zero per head.
    pub fn bytes_per_token(self, kv_heads: usize, head_dim: usize, elem: usize) -> usize {
        match self.bits() {
            None => kv_heads * head_dim * elem,
            Some(bits) => kv_heads * (head_dim * bits as usize / 8 + 4),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::Model => "model dtype",
            KvFormat::Int8 => "int8",
            KvFormat::Int4 => "int4",
            KvFormat::Fp8 => "fp8",
        }
    }
}
