//! Checkpoints: `model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`; else PyTorch `pytorch_model.bin`, or the shards of
//! `pytorch_model.bin.index.json` (read by [`super::torch_bin`]). Only the headers (a
//! `.bin` file's zip directory and pickle) are read at open; a tensor is read
//! with positional reads and converted in small chunks when a family file asks for it by
//! name and shape, so nothing beyond what the engine keeps is ever held in memory
//! (positional reads rather than a memory map keep `unsafe` out of this layer).
//! Every tensor must be claimed: after loading, the family calls [`Checkpoint::finish`]
//! and a tensor it did not expect is an error that names it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::{bf16, f16};

use super::torch_bin::{self, Record};
use crate::{Error, Result};

/// Safetensors headers above this size are refused (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Bytes read per positional read while converting a tensor.
const READ_CHUNK_BYTES: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    /// Packed quantised weights (AWQ `qweight` / `qzeros`), read raw, never as values.
    I32,
}

impl StoredDtype {
    fn parse(tag: &str) -> Option<Self> {
        match tag {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            "I32" => Some(Self::I32),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I32 => "int32",
        }
    }
}

pub struct TensorEntry {
    shard: usize,
    dtype: StoredDtype,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the shard file.
    offset: u64,
    len: usize,
    /// The zip record of a `.bin` tensor: read whole, so that its CRC-32 is checked.
    record: Option<Record>,
}

pub struct Checkpoint {
    shards: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, TensorEntry>,
    claimed: Mutex<HashSet<String>>,
    /// `load_format dummy`: every requested tensor is filled with seeded random values.
    dummy: bool,
}

impl Checkpoint {
    /// Opens the checkpoint of a model folder and validates every shard header against
    /// its file size.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin_single = dir.join("pytorch_model.bin");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let (files, bin): (Vec<PathBuf>, bool) = if single.is_file() {
            (vec![single], false)
        } else if index.is_file() {
            (shard_files(&index)?, false)
        } else if bin_single.is_file() {
            (vec![bin_single], true)
        } else if bin_index.is_file() {
            (shard_files(&bin_index)?, true)
        } else {
            return Err(Error::Weights(format!(
                "{} has no checkpoint: none of model.safetensors, model.safetensors.index.json, \
                 pytorch_model.bin or pytorch_model.bin.index.json",
                dir.display()
            )));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (shard, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let entries = if bin {
                read_bin(&path, &file, shard)?
            } else {
                read_header(&path, &file, shard)?
            };
            for (name, entry) in entries {
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(Error::Weights(format!(
                        "tensor {name} appears in more than one shard"
                    )));
                }
            }
            shards.push((path, file));
        }
        Ok(Checkpoint { shards, tensors, claimed: Mutex::new(HashSet::new()), dummy: false })
    }

    /// A checkpoint without files whose tensors are random values of the requested shape
    /// (as vLLM's `--load-format dummy`): serves and benchmarks a folder that holds only
    /// `config.json` and a tokenizer. Norm scales are 1; other values are uniform in
    /// ±1/sqrt(last dim), which keeps activations of a deep random model finite.
    pub fn dummy() -> Self {
        Checkpoint {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            claimed: Mutex::new(HashSet::new()),
            dummy: true,
        }
    }

    pub fn is_dummy(&self) -> bool {
        self.dummy
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored dtype of the checkpoint's floating-point tensors (that of the first one).
    pub fn dtype(&self) -> Option<StoredDtype> {
        self.tensors.values().map(|t| t.dtype).find(|d| *d != StoredDtype::I32)
    }

    /// Reads tensor `name`, checks it has exactly `shape`, and converts it to f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if self.dummy {
            return Ok(dummy_values(name, shape));
        }
        let entry = self.entry(name, shape)?;
        if entry.dtype == StoredDtype::I32 {
            return Err(Error::Weights(format!(
                "tensor {name} is stored as int32 where floating-point values are expected"
            )));
        }
        let mut values = Vec::with_capacity(entry.len / entry.dtype.size());
        self.read_chunks(name, entry, |bytes| convert_into(entry.dtype, bytes, &mut values))?;
        Ok(values)
    }

    /// Reads tensor `name` of exactly `shape` and `dtype` as its raw little-endian elements
    /// (int32 words of packed weights, float16 scales), without conversion.
    pub fn raw<T: bytemuck::Pod>(
        &self,
        name: &str,
        shape: &[usize],
        dtype: StoredDtype,
    ) -> Result<Vec<T>> {
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let entry = self.entry(name, shape)?;
        if entry.dtype != dtype {
            return Err(Error::Weights(format!(
                "tensor {name} is stored as {}, expected {}",
                entry.dtype.name(),
                dtype.name()
            )));
        }
        let mut values: Vec<T> = Vec::with_capacity(entry.len / dtype.size());
        self.read_chunks(name, entry, |bytes| {
            values.extend(bytes.chunks_exact(dtype.size()).map(bytemuck::pod_read_unaligned::<T>))
        })?;
        Ok(values)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            Error::Weights(format!("missing tensor {name} (expected shape {shape:?})"))
        })?;
        if entry.shape != shape {
            return Err(Error::Weights(format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                entry.shape
            )));
        }
        Ok(entry)
    }

    /// Hands the tensor's bytes to `sink` in chunks (whole elements), then claims it.
    fn read_chunks(
        &self,
        name: &str,
        entry: &TensorEntry,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<()> {
        let (path, file) = &self.shards[entry.shard];
        if let Some(record) = &entry.record {
            torch_bin::read_range(path, file, record, entry.offset, entry.len as u64, sink)?;
            self.claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
            return Ok(());
        }
        let mut chunk = vec![0u8; READ_CHUNK_BYTES.min(entry.len)];
        let mut done = 0usize;
        while done < entry.len {
            let n = chunk.len().min(entry.len - done);
            file.read_exact_at(&mut chunk[..n], entry.offset + done as u64)
                .map_err(|e| Error::io(path, e))?;
            sink(&chunk[..n]);
            done += n;
        }
        self.claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(())
    }

    /// Claims a tensor the forward pass does not read but real checkpoints carry.
    pub fn ignore(&self, name: &str) {
        if self.contains(name) {
            self.claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        }
    }

    /// Fails on the first tensor no family code claimed.
    pub fn finish(&self) -> Result<()> {
        let claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        match self.tensors.iter().find(|(name, _)| !claimed.contains(*name)) {
            Some((name, entry)) => Err(Error::Weights(format!(
                "unexpected tensor {name} (shape {:?}) is not part of this model family and config",
                entry.shape
            ))),
            None => Ok(()),
        }
    }
}

fn dummy_values(name: &str, shape: &[usize]) -> Vec<f32> {
    use rand::{RngExt, SeedableRng};
    let numel = shape.iter().product();
    if name.contains("norm") {
        return vec![1.0; numel];
    }
    let seed = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
    (0..numel).map(|_| rng.random_range(-bound..bound)).collect()
}

fn convert_into(dtype: StoredDtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        StoredDtype::F32 => {
            out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        StoredDtype::F16 => {
            out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        StoredDtype::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        // Refused by `Checkpoint::f32` before any read.
        StoredDtype::I32 => {}
    }
}

/// Parses and validates one safetensors header: dtypes, shapes, and data offsets that
/// tile the data section exactly up to the end of the file (a truncated file fails here).
fn read_header(path: &Path, file: &File, shard: usize) -> Result<Vec<(String, TensorEntry)>> {
    let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    if file_len < 8 {
        return Err(bad(format!("file of {file_len} bytes is too short for a safetensors header")));
    }
    file.read_exact_at(&mut len_bytes, 0).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit in a file of {file_len} bytes \
             (truncated or not a safetensors file)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| Error::io(path, e))?;
    parse_header(path, &header, file_len, shard)
}

/// The tensors of a PyTorch `.bin` file (its zip directory and pickle).
fn read_bin(path: &Path, file: &File, shard: usize) -> Result<Vec<(String, TensorEntry)>> {
    let tensors = torch_bin::read_tensors(path, file)?;
    tensors
        .into_iter()
        .map(|t| {
            let len = usize::try_from(t.len).map_err(|_| {
                Error::Weights(format!("{}: tensor {} is too large", path.display(), t.name))
            })?;
            let entry = TensorEntry {
                shard,
                dtype: t.dtype,
                shape: t.shape,
                offset: t.offset,
                len,
                record: Some(t.record),
            };
            Ok((t.name, entry))
        })
        .collect()
}

/// The checks of [`read_header`] on the JSON `header` of a file of `file_len` bytes (pure,
/// so it can be fuzzed); `path` only names the file in errors.
pub fn parse_header(
    path: &Path,
    header: &[u8],
    file_len: u64,
    shard: usize,
) -> Result<Vec<(String, TensorEntry)>> {
    let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
    let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| bad(format!("header is not valid JSON ({e})")))?;

    #[derive(serde::Deserialize)]
    struct Info {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let data_start = 8 + header.len() as u64;
    let mut entries = Vec::with_capacity(parsed.len());
    for (name, value) in parsed {
        if name == "__metadata__" {
            continue;
        }
        let info: Info = serde_json::from_value(value)
            .map_err(|e| bad(format!("tensor {name}: malformed header entry ({e})")))?;
        let dtype = StoredDtype::parse(&info.dtype).ok_or_else(|| {
            bad(format!(
                "tensor {name} is stored as {}; only BF16, F16, F32 (and I32 for quantised weights) are supported",
                info.dtype
            ))
        })?;
        let numel = info.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let (begin, end) = info.data_offsets;
        let expected = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        if end < begin || Some(end - begin) != expected {
            return Err(bad(format!(
                "tensor {name}: data_offsets {begin}..{end} do not hold shape {:?} of {}",
                info.shape, info.dtype
            )));
        }
        // Past any file (a truncated one fails below, naming the sizes); checked before the
        // absolute offsets are computed, which would overflow.
        if data_start.checked_add(end).is_none() {
            return Err(bad(format!(
                "tensor {name}: data_offsets {begin}..{end} lie past the end of the file"
            )));
        }
        entries.push((
            name,
            TensorEntry {
                shard,
                dtype,
                shape: info.shape,
                offset: data_start + begin,
                len: (end - begin) as usize,
                record: None,
            },
        ));
    }
    // The data section must be covered exactly, without gaps or overlaps.
    let mut spans: Vec<(u64, u64)> =
        entries.iter().map(|(_, e)| (e.offset, e.offset + e.len as u64)).collect();
    spans.sort_unstable();
    let mut cursor = data_start;
    for (begin, end) in spans {
        if begin != cursor {
            return Err(bad("tensor data regions overlap or leave gaps".to_string()));
        }
        cursor = end;
    }
    if cursor != file_len {
        return Err(bad(format!(
            "header describes {} data bytes but the file holds {} (truncated or corrupt)",
            cursor - data_start,
            file_len.saturating_sub(data_start)
        )));
    }
    Ok(entries)
}

/// The distinct shard files of an index, in name order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Weights(format!("{}: weight_map is empty", index.display())));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
