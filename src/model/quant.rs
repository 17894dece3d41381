//! Weight formats of the decoder-layer linears: as stored (16/32-bit), an AWQ W4A16
//! checkpoint (`quantization_config` in `config.json`), or quantised while loading
//! (`quantization` w8a16 / w4a16 / fp8). Embeddings, norms and the output layer always stay as
//! stored, as in AWQ checkpoints. Each linear is quantised right after it is read, so the
//! host never holds more than the quantised weights plus one tensor in f32.

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde_json::Value;

use super::Checkpoint;
use super::weights::StoredDtype;
use crate::cpu::Linear;
use crate::cpu::fp8::{self, Fp8};
use crate::cpu::quant::{self, W4};
use crate::{Error, Result};

/// The `quantization` a model asks for (model parameter / `--quantization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantization {
    /// The checkpoint's own format.
    #[default]
    None,
    /// Int8 weights per output channel, quantised at load.
    W8A16,
    /// 4-bit AWQ-layout weights (round to nearest), quantised at load; an AWQ
    /// checkpoint is already this.
    W4A16,
    /// The checkpoint must be AWQ (a name for its own format).
    Awq,
    /// FP8 E4M3 weights per output channel, quantised at load, and activations per token
    /// (`cpu::fp8`).
    Fp8,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(Quantization::None),
            "w8a16" => Ok(Quantization::W8A16),
            "w4a16" => Ok(Quantization::W4A16),
            "awq" => Ok(Quantization::Awq),
            "fp8" => Ok(Quantization::Fp8),
            other => Err(format!(
                "unknown quantization {other:?} (expected none, w8a16, w4a16, awq or fp8)"
            )),
        }
    }
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::W8A16 => "w8a16",
            Quantization::W4A16 => "w4a16",
            Quantization::Awq => "awq",
            Quantization::Fp8 => "fp8",
        }
    }
}

/// How the decoder-layer linears are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// As stored, computed in f32.
    Dense,
    /// An AWQ GEMM checkpoint with this group size.
    Awq { group: usize },
    /// Quantised at load to int8 per output channel.
    W8,
    /// Quantised at load to 4 bits (group 128, or the largest of 64/32 dividing `in`).
    W4,
    /// Quantised at load to FP8 E4M3 per output channel, activations per token.
    Fp8,
}

impl WeightFormat {
    pub fn is_quantized(self) -> bool {
        self != WeightFormat::Dense
    }
}

/// The AWQ group size of a `config.json` `quantization_config`, or None without one.
/// Anything but AWQ GEMM 4-bit with zero points is refused, naming the value.
pub fn awq_group(config: &Value) -> Result<Option<usize>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let bad = |what: String| {
        Err(Error::Config(format!(
            "config.json quantization_config: {what} (only AWQ W4A16 checkpoints are served: \
             quant_method \"awq\", version \"gemm\", bits 4, zero_point true)"
        )))
    };
    let text = |keys: &[&str]| keys.iter().find_map(|k| q.get(*k));
    match text(&["quant_method"]).and_then(Value::as_str) {
        Some(m) if m.eq_ignore_ascii_case("awq") => {}
        Some(m) => return bad(format!("quant_method {m:?} is not supported")),
        None => return bad("no quant_method".into()),
    }
    // AutoAWQ writes "gemm" or "GEMM"; other versions pack differently.
    if let Some(v) = text(&["version"]) {
        match v.as_str() {
            Some(v) if v.eq_ignore_ascii_case("gemm") => {}
            _ => return bad(format!("version {v} is not supported")),
        }
    }
    match text(&["bits", "w_bit"]) {
        Some(b) if b.as_u64() == Some(4) => {}
        Some(b) => return bad(format!("bits {b} is not supported")),
        None => return bad("no bits".into()),
    }
    if let Some(z) = text(&["zero_point"])
        && z.as_bool() != Some(true)
    {
        return bad(format!("zero_point {z} is not supported"));
    }
    match text(&["group_size", "q_group_size"]).map(|g| (g, g.as_u64())) {
        Some((_, Some(g))) if g > 0 => Ok(Some(g as usize)),
        Some((g, _)) => bad(format!("group_size {g} is not supported (per-group scales only)")),
        None => bad("no group_size".into()),
    }
}

/// The format of a model's linears from its `config.json` and the requested quantization.
pub fn resolve(config: &Value, requested: Quantization) -> Result<WeightFormat> {
    let conflict =
        |what: &str| Err(Error::Config(format!("quantization {}: {what}", requested.name())));
    match (awq_group(config)?, requested) {
        (Some(group), Quantization::None | Quantization::Awq | Quantization::W4A16) => {
            Ok(WeightFormat::Awq { group })
        }
        (Some(_), Quantization::W8A16 | Quantization::Fp8) => conflict(
            "the checkpoint is AWQ W4A16 (config.json quantization_config); its weights \
             cannot be requantised (use none or awq)",
        ),
        (None, Quantization::Awq) => {
            conflict("the checkpoint is not AWQ (config.json has no quantization_config)")
        }
        (None, Quantization::None) => Ok(WeightFormat::Dense),
        (None, Quantization::W8A16) => Ok(WeightFormat::W8),
        (None, Quantization::W4A16) => Ok(WeightFormat::W4),
        (None, Quantization::Fp8) => Ok(WeightFormat::Fp8),
    }
}

/// The group size quantise-at-load uses for `inp` inputs.
pub fn w4_group(inp: usize) -> Option<usize> {
    [128, 64, 32].into_iter().find(|g| inp.is_multiple_of(*g))
}

/// A quantised linear as the CPU path stores it.
pub enum Quantized {
    W8(quant::W8),
    W4(W4),
    Fp8(Fp8),
}

/// Reads the linears of a model in its weight format and keeps count of what it built.
pub struct Linears<'a> {
    pub ckpt: &'a Checkpoint,
    pub format: WeightFormat,
    groups: Mutex<BTreeSet<usize>>,
    bytes: Mutex<usize>,
}

impl<'a> Linears<'a> {
    pub fn new(ckpt: &'a Checkpoint, format: WeightFormat) -> Self {
        Linears { ckpt, format, groups: Mutex::new(BTreeSet::new()), bytes: Mutex::new(0) }
    }

    /// A linear kept as stored (the output layer).
    pub fn dense(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.ckpt.f32(&format!("{prefix}.weight"), &[out, inp])?;
        let linear = Linear::new(&weight, self.bias(prefix, out, bias)?, out, inp);
        Ok(self.count(linear))
    }

    /// A decoder-layer linear `prefix` of PyTorch shape `[out, inp]`, in the model's format.
    pub fn layer(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let linear = match self.quantized(prefix, out, inp)? {
            None => return self.dense(prefix, out, inp, bias),
            Some(Quantized::W8(w8)) => Linear::from_w8(w8, self.bias(prefix, out, bias)?, out, inp),
            Some(Quantized::W4(w4)) => Linear::from_w4(w4, self.bias(prefix, out, bias)?, out, inp),
            Some(Quantized::Fp8(w)) => Linear::from_fp8(w, self.bias(prefix, out, bias)?, out, inp),
        };
        Ok(self.count(linear))
    }

    /// The quantised weight of decoder-layer linear `prefix` (`[out, inp]`), read or
    /// quantised as the format says; None for a dense format (and nothing read).
    pub fn quantized(&self, prefix: &str, out: usize, inp: usize) -> Result<Option<Quantized>> {
        let group = match self.format {
            WeightFormat::Dense => return Ok(None),
            WeightFormat::W8 => {
                let weight = self.ckpt.f32(&format!("{prefix}.weight"), &[out, inp])?;
                return Ok(Some(Quantized::W8(quant::quantize_w8(&weight, out, inp))));
            }
            WeightFormat::Fp8 => {
                let weight = self.ckpt.f32(&format!("{prefix}.weight"), &[out, inp])?;
                return Ok(Some(Quantized::Fp8(fp8::quantize_fp8(&weight, out, inp))));
            }
            WeightFormat::W4 => w4_group(inp).ok_or_else(|| {
                Error::Config(format!(
                    "quantization w4a16: {prefix} has {inp} inputs, not a multiple of 32"
                ))
            })?,
            WeightFormat::Awq { group } => group,
        };
        if !out.is_multiple_of(8) || !inp.is_multiple_of(group) {
            return Err(Error::Weights(format!(
                "{prefix}: a 4-bit linear of {out} outputs and {inp} inputs does not fit group \
                 size {group} (outputs must be a multiple of 8, inputs of the group)"
            )));
        }
        let w4 = match self.format {
            // A dummy AWQ model: random weights quantised the same way.
            WeightFormat::Awq { .. } if !self.ckpt.is_dummy() => {
                self.read_awq(prefix, out, inp, group)?
            }
            _ => {
                let weight = self.ckpt.f32(&format!("{prefix}.weight"), &[out, inp])?;
                quant::quantize_w4(&weight, out, inp, group, false)
            }
        };
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
        Ok(Some(Quantized::W4(w4)))
    }

    /// Counts the bytes of a linear the caller holds in another form (the GPU path's).
    pub fn add_bytes(&self, bytes: usize) {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
    }

    /// Notes a 4-bit group size the caller used (for `describe`).
    pub fn add_group(&self, group: usize) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
    }

    /// `qweight` / `qzeros` (int32) and `scales` (float16) of an AWQ GEMM linear.
    pub fn read_awq(&self, prefix: &str, out: usize, inp: usize, group: usize) -> Result<W4> {
        let words = out / 8;
        let qweight: Vec<i32> =
            self.ckpt.raw(&format!("{prefix}.qweight"), &[inp, words], StoredDtype::I32)?;
        let qzeros: Vec<i32> =
            self.ckpt.raw(&format!("{prefix}.qzeros"), &[inp / group, words], StoredDtype::I32)?;
        let scales: Vec<u16> =
            self.ckpt.raw(&format!("{prefix}.scales"), &[inp / group, out], StoredDtype::F16)?;
        Ok(W4 {
            qweight: qweight.into_iter().map(|w| w as u32).collect(),
            qzeros: qzeros.into_iter().map(|w| w as u32).collect(),
            scales: scales.into_iter().map(half::f16::from_bits).collect(),
            group,
        })
    }

    fn bias(&self, prefix: &str, out: usize, bias: bool) -> Result<Option<Vec<f32>>> {
        bias.then(|| self.ckpt.f32(&format!("{prefix}.bias"), &[out])).transpose()
    }

    fn count(&self, linear: Linear) -> Linear {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) += linear.weight_bytes();
        linear
    }

    /// Bytes of every linear built so far.
    pub fn bytes(&self) -> usize {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the load log and `ModelInfo` say about the format: "awq w4a16 g32",
    /// "w4a16 g128 (quantised at load)", "w8a16 (quantised at load)" or the stored dtype.
    pub fn describe(&self) -> String {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let groups: Vec<String> = groups.iter().rev().map(|g| format!("g{g}")).collect();
        let stored = match self.ckpt.is_dummy() {
            true => "dummy".to_string(),
            false => self.ckpt.dtype().map_or("none", StoredDtype::name).to_string(),
        };
        match self.format {
            WeightFormat::Dense => format!("{stored} (computed in f32)"),
            WeightFormat::Awq { group } => format!("awq w4a16 g{group}, other tensors {stored}"),
            WeightFormat::W8 => format!("w8a16 (quantised at load from {stored})"),
            WeightFormat::Fp8 => {
                format!("fp8 e4m3, activations per token (quantised at load from {stored})")
            }
            WeightFormat::W4 => {
                format!("w4a16 {} (quantised at load from {stored})", groups.join("/"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with(q: Value) -> Value {
        json!({ "model_type": "chatglm", "quantization_config": q })
    }

    #[test]
    fn awq_gemm_4bit_is_read_and_everything_else_is_refused_by_name() {
        let ok = json!({"quant_method": "awq", "version": "GEMM", "bits": 4, "group_size": 32, "zero_point": true});
        assert_eq!(awq_group(&with(ok)).unwrap(), Some(32));
        assert_eq!(awq_group(&json!({})).unwrap(), None);
        for (q, named) in [
            (json!({"quant_method": "gptq", "bits": 4, "group_size": 128}), "\"gptq\""),
            (
                json!({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 128}),
                "\"gemv\"",
            ),
            (json!({"quant_method": "awq", "bits": 8, "group_size": 128}), "bits 8"),
            (json!({"quant_method": "awq", "bits": 4, "group_size": -1}), "group_size -1"),
            (
                json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false}),
                "zero_point false",
            ),
        ] {
            let error = awq_group(&with(q)).unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn requests_resolve_against_the_checkpoint() {
        let awq = with(json!({"quant_method": "awq", "bits": 4, "group_size": 64}));
        let plain = json!({});
        assert_eq!(resolve(&awq, Quantization::None).unwrap(), WeightFormat::Awq { group: 64 });
        assert_eq!(resolve(&awq, Quantization::Awq).unwrap(), WeightFormat::Awq { group: 64 });
        assert!(resolve(&awq, Quantization::W8A16).unwrap_err().to_string().contains("w8a16"));
        assert!(resolve(&plain, Quantization::Awq).unwrap_err().to_string().contains("not AWQ"));
        assert_eq!(resolve(&plain, Quantization::W4A16).unwrap(), WeightFormat::W4);
        assert_eq!(resolve(&plain, Quantization::W8A16).unwrap(), WeightFormat::W8);
        assert_eq!(resolve(&plain, Quantization::None).unwrap(), WeightFormat::Dense);
        assert_eq!("W4A16".parse::<Quantization>().unwrap(), Quantization::W4A16);
        assert!("int4".parse::<Quantization>().is_err());
    }

    #[test]
    fn the_group_is_the_largest_of_128_64_32_dividing_the_inputs() {
        assert_eq!(w4_group(4096), Some(128));
        assert_eq!(w4_group(13696), Some(128));
        assert_eq!(w4_group(64 * 3), Some(64));
        assert_eq!(w4_group(96), Some(32));
        assert_eq!(w4_group(100), None);
    }
}
