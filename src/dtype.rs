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
