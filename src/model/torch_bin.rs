//! PyTorch `.bin` checkpoints, as `torch.save` writes them: an uncompressed zip whose
//! records sit under one top folder, `<top>/data.pkl` (a pickle of name → tensor) and
//! `<top>/data/<key>` (the raw little-endian bytes of each storage).
//!
//! Only the zip directory and the pickle are read at open. The pickle is never executed:
//! a small interpreter knows the opcodes `torch.save` emits and an allow-list of globals
//! (the tensor rebuild functions, the typed storage classes, `OrderedDict`), builds plain
//! values from them and refuses anything else by name. Each tensor becomes a byte range of
//! its storage record, read later with positional reads; the record's CRC-32 is checked
//! while it is read (data.pkl's at open).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::weights::StoredDtype;
use crate::{Error, Result};

/// A pickle above this size is refused (real ones are a few hundred kB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// A central directory above this size is refused (a 7B shard's is a few kB).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Deepest nesting of pickle containers (torch.save's state dicts need about 5).
const MAX_DEPTH: u32 = 64;

/// One zip record's stored bytes: where they are in the file and their CRC-32.
#[derive(Clone, Debug)]
pub struct Record {
    pub name: String,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    /// Set once the whole record has passed its CRC (shared by the tensors of one
    /// storage), after which a tensor covering part of it reads only its own bytes.
    pub verified: Arc<AtomicBool>,
}

/// One tensor of a `.bin` file: a contiguous byte range of its storage record.
#[derive(Clone, Debug)]
pub struct BinTensor {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's first element in the file.
    pub offset: u64,
    pub len: u64,
    /// The storage record holding it, whose CRC covers the whole record.
    pub record: Record,
}

/// Positional reads from a file or, for fuzzing and tests, from bytes in memory.
pub trait Source {
    fn size(&self) -> std::io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Source for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// The tensor table of a `.bin` file held in memory, every storage record's CRC checked
/// too (pure: what the fuzz target runs); `path` only names the file in errors.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<BinTensor>> {
    let tensors = read_tensors(path, bytes)?;
    for t in &tensors {
        read_range(path, bytes, &t.record, t.offset, t.len, |_| {})?;
    }
    Ok(tensors)
}

/// Reads the zip directory and the pickle of a `.bin` file: its tensors, not their data.
pub fn read_tensors<S: Source + ?Sized>(path: &Path, src: &S) -> Result<Vec<BinTensor>> {
    let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
    let records = read_directory(path, src)?;

    // torch.save puts every record under one folder; data.pkl names it.
    let mut pickles = records.keys().filter(|n| {
        n.strip_suffix("/data.pkl").is_some_and(|top| !top.is_empty() && !top.contains('/'))
    });
    let pickle_name = match (pickles.next(), pickles.next()) {
        (Some(name), None) => name.clone(),
        (None, _) => {
            return Err(bad(
                "no <folder>/data.pkl record: not a torch.save checkpoint (or truncated)".into(),
            ));
        }
        (Some(_), Some(_)) => return Err(bad("more than one <folder>/data.pkl record".into())),
    };
    let top = &pickle_name[..pickle_name.len() - "data.pkl".len()];

    if let Some(order) = records.get(&format!("{top}byteorder")) {
        let bytes = read_record(path, src, order, 16)?;
        match bytes.as_slice() {
            b"little" => {}
            b"big" => {
                return Err(bad("the checkpoint is big-endian (byteorder record); only \
                     little-endian checkpoints are supported"
                    .into()));
            }
            other => {
                return Err(bad(format!(
                    "unknown byteorder record {:?}",
                    String::from_utf8_lossy(other)
                )));
            }
        }
    }

    let pickle = read_record(path, src, &records[&pickle_name], MAX_PICKLE_BYTES)?;
    let root = unpickle(&pickle).map_err(|e| bad(format!("{pickle_name}: {e}")))?;

    let mut tensors = Vec::with_capacity(root.len());
    for (name, t) in root {
        let record_name = format!("{top}data/{}", t.storage.key);
        let record = records.get(&record_name).ok_or_else(|| {
            bad(format!("tensor {name}: its storage record {record_name} is missing"))
        })?;
        tensors.push(locate(path, name, &t, record)?);
    }
    Ok(tensors)
}

/// Checks a tensor against its storage and record and turns it into a byte range.
fn locate(path: &Path, name: String, t: &TensorDesc, record: &Record) -> Result<BinTensor> {
    let bad = |what: String| Error::Weights(format!("{}: tensor {name}: {what}", path.display()));
    let size = t.storage.dtype.size() as u64;
    let storage_bytes = t.storage.numel.checked_mul(size);
    if storage_bytes != Some(record.len) {
        return Err(bad(format!(
            "its storage holds {} {} elements but record {} has {} bytes",
            t.storage.numel,
            t.storage.dtype.name(),
            record.name,
            record.len
        )));
    }
    if t.stride.len() != t.shape.len() {
        return Err(bad(format!("size {:?} and stride {:?} differ in rank", t.shape, t.stride)));
    }
    let numel = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let end = numel.and_then(|n| n.checked_add(t.offset));
    let Some(numel) = numel.filter(|_| end.is_some_and(|e| e <= t.storage.numel)) else {
        return Err(bad(format!(
            "storage offset {} + size {:?} exceed its storage of {} elements",
            t.offset, t.shape, t.storage.numel
        )));
    };
    // Contiguous as torch means it: row-major strides, except where a dimension of one
    // element (or an empty tensor) makes the stride irrelevant.
    if numel > 0 {
        let mut expected = 1u64;
        for (&dim, &stride) in t.shape.iter().zip(&t.stride).rev() {
            if dim != 1 && stride as u64 != expected {
                return Err(bad(format!(
                    "is not contiguous (size {:?}, stride {:?}); only contiguous tensors \
                     are supported",
                    t.shape, t.stride
                )));
            }
            expected *= dim as u64;
        }
    }
    Ok(BinTensor {
        dtype: t.storage.dtype,
        shape: t.shape.clone(),
        offset: record.offset + t.offset * size,
        len: numel * size,
        record: record.clone(),
        name,
    })
}

/// Reads the `len` bytes at absolute `offset` of `record` in chunks, passing them to
/// `sink` in order. Until the record has passed its CRC-32, the whole record is read so
/// that it is checked; a mismatch is an error after the last chunk (the caller drops what
/// it built).
pub fn read_range<S: Source + ?Sized>(
    path: &Path,
    src: &S,
    record: &Record,
    offset: u64,
    len: u64,
    mut sink: impl FnMut(&[u8]),
) -> Result<()> {
    const CHUNK: u64 = 4 << 20;
    let verified = record.verified.load(Ordering::Acquire);
    let (begin, end) = (offset, offset + len);
    let (mut at, stop) =
        if verified { (begin, end) } else { (record.offset, record.offset + record.len) };
    let mut buf = vec![0u8; CHUNK.min(stop - at) as usize];
    let mut crc = Crc32::new();
    while at < stop {
        let n = CHUNK.min(stop - at) as usize;
        let chunk = &mut buf[..n];
        src.read_exact_at(chunk, at).map_err(|e| Error::io(path, e))?;
        if !verified {
            crc.update(chunk);
        }
        let (lo, hi) = (begin.max(at), end.min(at + n as u64));
        if lo < hi {
            sink(&chunk[(lo - at) as usize..(hi - at) as usize]);
        }
        at += n as u64;
    }
    if !verified {
        check_crc(path, record, crc.finish())?;
        record.verified.store(true, Ordering::Release);
    }
    Ok(())
}

fn check_crc(path: &Path, record: &Record, computed: u32) -> Result<()> {
    if computed == record.crc {
        return Ok(());
    }
    Err(Error::Weights(format!(
        "{}: record {} fails its CRC-32 check (stored {:08x}, computed {computed:08x}): \
         the file is corrupt",
        path.display(),
        record.name,
        record.crc
    )))
}

/// A whole small record, its CRC checked.
fn read_record<S: Source + ?Sized>(
    path: &Path,
    src: &S,
    record: &Record,
    cap: u64,
) -> Result<Vec<u8>> {
    if record.len > cap {
        return Err(Error::Weights(format!(
            "{}: record {} of {} bytes is larger than the {cap} bytes allowed",
            path.display(),
            record.name,
            record.len
        )));
    }
    let mut bytes = vec![0u8; record.len as usize];
    src.read_exact_at(&mut bytes, record.offset).map_err(|e| Error::io(path, e))?;
    check_crc(path, record, crc32(&bytes))?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------
// Zip

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// The records of the zip, by name: the end-of-central-directory (zip64 if it says so),
/// every central entry, and every local header (whose data must lie before the directory).
fn read_directory<S: Source + ?Sized>(path: &Path, src: &S) -> Result<HashMap<String, Record>> {
    let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
    let io = |e| Error::io(path, e);
    let file_len = src.size().map_err(io)?;
    let not_zip = |why: &str| {
        bad(format!("not a torch.save zip file of {file_len} bytes ({why}; truncated or corrupt)"))
    };

    // The end record is the last 22 bytes plus a comment of at most 64 KiB.
    let tail_len = file_len.min(22 + 0xffff);
    let mut tail = vec![0u8; tail_len as usize];
    src.read_exact_at(&mut tail, file_len - tail_len).map_err(io)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| {
            u32_at(&tail, i) == EOCD_SIG && i + 22 + u16_at(&tail, i + 20) as usize == tail.len()
        })
        .ok_or_else(|| {
            // torch.save before 1.6 wrote a bare pickle stream starting with this magic.
            let mut head = [0u8; 3];
            if src.read_exact_at(&mut head, 0).is_ok() && head == [0x80, 0x02, 0x8a] {
                bad("the legacy torch.save format (torch before 1.6) is not supported; \
                     re-save the checkpoint with a recent torch"
                    .into())
            } else {
                not_zip("no end-of-central-directory record")
            }
        })?;
    let eocd_pos = file_len - tail_len + eocd as u64;
    let e = &tail[eocd..];
    if u16_at(e, 4) != 0 || u16_at(e, 6) != 0 || u16_at(e, 8) != u16_at(e, 10) {
        return Err(bad("multi-disk zip files are not supported".into()));
    }
    let (mut entries, mut dir_size, mut dir_offset) =
        (u16_at(e, 10) as u64, u32_at(e, 12) as u64, u32_at(e, 16) as u64);
    let mut dir_limit = eocd_pos;

    // Zip64: a locator just before the end record points at the zip64 end record.
    let mut locator = [0u8; 20];
    if eocd_pos >= 20
        && src.read_exact_at(&mut locator, eocd_pos - 20).is_ok()
        && u32_at(&locator, 0) == EOCD64_LOCATOR_SIG
    {
        let at = u64_at(&locator, 8);
        if at.checked_add(56).is_none_or(|end| end > eocd_pos - 20) {
            return Err(not_zip("zip64 end record out of place"));
        }
        let mut e64 = [0u8; 56];
        src.read_exact_at(&mut e64, at).map_err(io)?;
        if u32_at(&e64, 0) != EOCD64_SIG {
            return Err(not_zip("bad zip64 end record signature"));
        }
        if u32_at(&e64, 16) != 0 || u32_at(&e64, 20) != 0 || u64_at(&e64, 24) != u64_at(&e64, 32) {
            return Err(bad("multi-disk zip files are not supported".into()));
        }
        (entries, dir_size, dir_offset) = (u64_at(&e64, 32), u64_at(&e64, 40), u64_at(&e64, 48));
        dir_limit = at;
    } else if entries == 0xffff || dir_size == 0xffff_ffff || dir_offset == 0xffff_ffff {
        return Err(not_zip("zip64 sizes without a zip64 end record"));
    }
    if dir_size > MAX_DIRECTORY_BYTES {
        return Err(bad(format!("central directory of {dir_size} bytes is implausibly large")));
    }
    if dir_offset.checked_add(dir_size).is_none_or(|end| end > dir_limit) {
        return Err(not_zip("central directory out of bounds"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    src.read_exact_at(&mut dir, dir_offset).map_err(io)?;

    let mut records = HashMap::new();
    let mut at = 0usize;
    for _ in 0..entries {
        if dir.len() - at < 46 || u32_at(&dir, at) != CENTRAL_SIG {
            return Err(not_zip("bad central directory entry"));
        }
        let c = &dir[at..];
        let (flags, method) = (u16_at(c, 8), u16_at(c, 10));
        let crc = u32_at(c, 16);
        let mut compressed = u32_at(c, 20) as u64;
        let mut size = u32_at(c, 24) as u64;
        let (name_len, extra_len, comment_len) =
            (u16_at(c, 28) as usize, u16_at(c, 30) as usize, u16_at(c, 32) as usize);
        let mut local = u32_at(c, 42) as u64;
        let total = 46 + name_len + extra_len + comment_len;
        if c.len() < total {
            return Err(not_zip("central directory entry past its end"));
        }
        let name = String::from_utf8_lossy(&c[46..46 + name_len]).into_owned();
        // Zip64 extra field: the 8-byte values of the saturated fields, in this order.
        let mut extra = &c[46 + name_len..46 + name_len + extra_len];
        while extra.len() >= 4 {
            let (id, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
            let Some(body) = extra.get(4..4 + len) else { break };
            if id == 1 {
                let mut fields = body.chunks_exact(8).map(|f| u64_at(f, 0));
                let mut take = |v: &mut u64| -> Result<()> {
                    if *v == 0xffff_ffff {
                        *v = fields.next().ok_or_else(|| not_zip("short zip64 extra field"))?;
                    }
                    Ok(())
                };
                take(&mut size)?;
                take(&mut compressed)?;
                take(&mut local)?;
            }
            extra = &extra[4 + len..];
        }
        at += total;

        if flags & 1 != 0 {
            return Err(bad(format!("record {name} is encrypted")));
        }
        if method != 0 {
            let how = match method {
                8 => "deflate",
                9 => "deflate64",
                12 => "bzip2",
                14 => "lzma",
                93 => "zstd",
                _ => "unknown",
            };
            return Err(bad(format!(
                "record {name} is compressed (method {method}, {how}); torch.save writes \
                 uncompressed records and only those are supported"
            )));
        }
        if compressed != size {
            return Err(not_zip(&format!("stored record {name} has two different sizes")));
        }

        // The local header: its own name and extra field lengths place the data.
        let mut header = [0u8; 30];
        if local.checked_add(30).is_none_or(|end| end > dir_offset) {
            return Err(not_zip(&format!("record {name}'s local header is out of bounds")));
        }
        src.read_exact_at(&mut header, local).map_err(io)?;
        if u32_at(&header, 0) != LOCAL_SIG {
            return Err(not_zip(&format!("record {name} has no local header")));
        }
        if u16_at(&header, 8) != 0 {
            return Err(bad(format!("record {name} is compressed (local header)")));
        }
        let data = local + 30 + u16_at(&header, 26) as u64 + u16_at(&header, 28) as u64;
        let local_name_len = u16_at(&header, 26) as usize;
        let mut local_name = vec![0u8; local_name_len];
        if data.checked_add(size).is_none_or(|end| end > dir_offset) {
            return Err(not_zip(&format!("record {name}'s data is out of bounds")));
        }
        src.read_exact_at(&mut local_name, local + 30).map_err(io)?;
        if local_name != name.as_bytes() {
            return Err(not_zip(&format!("record {name}'s local header names another record")));
        }
        let record =
            Record { name: name.clone(), offset: data, len: size, crc, verified: Arc::default() };
        if records.insert(name.clone(), record).is_some() {
            return Err(bad(format!("record {name} appears twice")));
        }
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------
// CRC-32 (IEEE, reflected, as zip uses it), eight bytes a step ("slicing by 8"): every
// byte of a checkpoint goes through it, so it must keep up with the reads.

const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    // t[k][i]: the CRC of byte i followed by k zero bytes.
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// A running CRC-32.
pub struct Crc32(u32);

impl Crc32 {
    pub fn new() -> Self {
        Crc32(0xffff_ffff)
    }
    pub fn update(&mut self, bytes: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = self.0;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in words.remainder() {
            c = t[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }
    pub fn finish(&self) -> u32 {
        !self.0
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

// ---------------------------------------------------------------------------------------
// Pickle

/// The globals a torch.save pickle may name; anything else is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(StoredDtype),
}

fn resolve_global(module: &str, name: &str) -> std::result::Result<Global, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(StoredDtype::F32),
        ("torch", "HalfStorage") => Global::Storage(StoredDtype::F16),
        ("torch", "BFloat16Storage") => Global::Storage(StoredDtype::BF16),
        ("torch", "IntStorage") => Global::Storage(StoredDtype::I32),
        ("torch", storage) if storage.ends_with("Storage") => {
            return Err(format!(
                "storage type torch.{storage} is not supported (only Float, Half, BFloat16 \
                 and Int storages are)"
            ));
        }
        _ => {
            return Err(format!(
                "pickle names the global {module}.{name}, which is not allowed in a \
                 checkpoint (nothing was run)"
            ));
        }
    })
}

#[derive(Clone, Debug)]
struct StorageRef {
    key: String,
    dtype: StoredDtype,
    numel: u64,
}

#[derive(Clone, Debug)]
struct TensorDesc {
    storage: StorageRef,
    offset: u64,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Pickle values. Containers are shared (`Rc`) so that memo gets are cheap; a mutation
/// copies a shared list or dict (Python would alias it, which torch.save never relies on).
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Vec<Value>>, u32),
    List(Rc<Vec<Value>>, u32),
    /// A dict or, when `ordered`, a `collections.OrderedDict`.
    Dict {
        items: Rc<Vec<(Value, Value)>>,
        depth: u32,
        ordered: bool,
    },
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorDesc>),
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(_, d) | Value::List(_, d) | Value::Dict { depth: d, .. } => *d,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Tuple(..) => "tuple",
            Value::List(..) => "list",
            Value::Dict { ordered: false, .. } => "dict",
            Value::Dict { ordered: true, .. } => "OrderedDict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

type PResult<T> = std::result::Result<T, String>;

fn tuple(items: Vec<Value>) -> PResult<Value> {
    let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    if depth > MAX_DEPTH {
        return Err(format!("containers nested deeper than {MAX_DEPTH}"));
    }
    Ok(Value::Tuple(Rc::new(items), depth))
}

/// The name of a pickle opcode, for errors about the ones torch.save never emits.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x42 => "BINBYTES",
        0x43 => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "not a pickle opcode",
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("pickle ends inside an opcode at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        Ok(u16_at(self.take(2)?, 0))
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn str(&mut self, n: usize) -> PResult<Value> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| "a pickle string is not UTF-8")?;
        Ok(Value::Str(s.into()))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.bytes[self.at..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("GLOBAL without a newline")?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| "a GLOBAL name is not UTF-8".into())
    }
}

/// Runs the restricted interpreter: the root must be a dict (or OrderedDict) of tensor
/// name → tensor. Errors are plain text; the caller adds the file and record.
fn unpickle(bytes: &[u8]) -> PResult<Vec<(String, TensorDesc)>> {
    let mut r = Reader { bytes, at: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    // Elements copied by mutating a shared container: bounded, so a pickle that memoizes
    // a growing dict at every step cannot take quadratic time or memory.
    let mut budget = 4 * bytes.len() + (1 << 20);
    fn charge_copy(shared: usize, len: usize, budget: &mut usize) -> PResult<()> {
        if shared > 1 {
            *budget = budget
                .checked_sub(len)
                .ok_or("pickle copies shared containers too often (malformed)")?;
        }
        Ok(())
    }

    fn pop(stack: &mut Vec<Value>, marks: &[usize], op: &str) -> PResult<Value> {
        if marks.last().is_some_and(|&m| stack.len() <= m) {
            return Err(format!("{op} reaches past a MARK"));
        }
        stack.pop().ok_or_else(|| format!("{op} on an empty stack"))
    }
    fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>, op: &str) -> PResult<Vec<Value>> {
        let mark = marks.pop().ok_or_else(|| format!("{op} without a MARK"))?;
        Ok(stack.split_off(mark))
    }
    fn top<'s>(stack: &'s mut [Value], marks: &[usize], op: &str) -> PResult<&'s mut Value> {
        let floor = marks.last().copied().unwrap_or(0);
        if stack.len() <= floor {
            return Err(format!("{op} has no object to act on"));
        }
        Ok(stack.last_mut().expect("checked above"))
    }
    fn add_pairs(
        target: &mut Value,
        pairs: Vec<Value>,
        budget: &mut usize,
        op: &str,
    ) -> PResult<()> {
        let Value::Dict { items, depth, .. } = target else {
            return Err(format!("{op} on a {}", target.kind()));
        };
        charge_copy(Rc::strong_count(items), items.len(), budget)?;
        if !pairs.len().is_multiple_of(2) {
            return Err(format!("{op} with an odd number of items"));
        }
        let mut it = pairs.into_iter();
        let items = Rc::make_mut(items);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            *depth = (*depth).max(k.depth().max(v.depth()) + 1);
            items.push((k, v));
        }
        if *depth > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }
    fn add_items(
        target: &mut Value,
        values: Vec<Value>,
        budget: &mut usize,
        op: &str,
    ) -> PResult<()> {
        let Value::List(items, depth) = target else {
            return Err(format!("{op} on a {}", target.kind()));
        };
        charge_copy(Rc::strong_count(items), items.len(), budget)?;
        let items = Rc::make_mut(items);
        for v in values {
            *depth = (*depth).max(v.depth() + 1);
            items.push(v);
        }
        if *depth > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    loop {
        let at = r.at;
        let op = r.u8().map_err(|_| "pickle ends without STOP".to_string())?;
        let name = opcode_name(op);
        match op {
            0x80 => {
                let proto = r.u8()?;
                if !(2..=5).contains(&proto) {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                r.take(8)?;
            }
            b'.' => break,
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict { items: Rc::default(), depth: 1, ordered: false }),
            b']' => stack.push(Value::List(Rc::default(), 1)),
            b')' => stack.push(tuple(Vec::new())?),
            b't' => {
                let items = pop_mark(&mut stack, &mut marks, name)?;
                stack.push(tuple(items)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(&mut stack, &marks, name)?);
                }
                items.reverse();
                stack.push(tuple(items)?);
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(r.str(n)?);
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(r.str(n)?);
            }
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes does not fit 64 bits"));
                }
                stack.push(Value::Int(long1(r.take(n)?)));
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool),
            0x89 => stack.push(Value::Bool),
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let v = top(&mut stack, &marks, name)?.clone();
                memo.insert(key, v);
            }
            b'h' | b'j' => {
                let key = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo.get(&key).ok_or_else(|| format!("{name} of unset memo {key}"))?;
                stack.push(v.clone());
            }
            b'c' => {
                let module = r.line()?;
                let gname = r.line()?;
                stack.push(Value::Global(resolve_global(module, gname)?));
            }
            0x93 => {
                let gname = pop(&mut stack, &marks, name)?;
                let module = pop(&mut stack, &marks, name)?;
                let (Value::Str(module), Value::Str(gname)) = (&module, &gname) else {
                    return Err("STACK_GLOBAL on values that are not strings".into());
                };
                stack.push(Value::Global(resolve_global(module, gname)?));
            }
            b'Q' => {
                let pid = pop(&mut stack, &marks, name)?;
                stack.push(persistent_load(&pid)?);
            }
            b'R' => {
                let args = pop(&mut stack, &marks, name)?;
                let callable = pop(&mut stack, &marks, name)?;
                stack.push(reduce(&callable, &args)?);
            }
            b'b' => {
                // OrderedDict's state (a state_dict's `_metadata`) is data; it is dropped.
                let _state = pop(&mut stack, &marks, name)?;
                let target = top(&mut stack, &marks, name)?;
                if !matches!(target, Value::Dict { ordered: true, .. }) {
                    return Err(format!("BUILD on a {}", target.kind()));
                }
            }
            b's' => {
                let v = pop(&mut stack, &marks, name)?;
                let k = pop(&mut stack, &marks, name)?;
                add_pairs(top(&mut stack, &marks, name)?, vec![k, v], &mut budget, name)?;
            }
            b'u' => {
                let pairs = pop_mark(&mut stack, &mut marks, name)?;
                add_pairs(top(&mut stack, &marks, name)?, pairs, &mut budget, name)?;
            }
            b'a' => {
                let v = pop(&mut stack, &marks, name)?;
                add_items(top(&mut stack, &marks, name)?, vec![v], &mut budget, name)?;
            }
            b'e' => {
                let values = pop_mark(&mut stack, &mut marks, name)?;
                add_items(top(&mut stack, &marks, name)?, values, &mut budget, name)?;
            }
            _ => {
                return Err(format!(
                    "opcode {name} (0x{op:02x}) at byte {at} is not one torch.save writes"
                ));
            }
        }
    }
    if !marks.is_empty() || stack.len() != 1 {
        return Err("STOP with leftover values on the stack".into());
    }
    let root = stack.pop().expect("one value");
    let Value::Dict { items, .. } = root else {
        return Err(format!("the root object is a {}, not a dict of tensors", root.kind()));
    };
    let items = Rc::try_unwrap(items).unwrap_or_else(|shared| (*shared).clone());
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(format!("the root dict has a {} key", k.kind()));
        };
        let Value::Tensor(t) = v else {
            return Err(format!("{name} is a {}, not a tensor", v.kind()));
        };
        if !seen.insert(name.clone()) {
            return Err(format!("tensor {name} appears twice"));
        }
        out.push((name.to_string(), Rc::unwrap_or_clone(t)));
    }
    Ok(out)
}

/// LONG1's payload: little-endian two's complement of at most 8 bytes.
fn long1(bytes: &[u8]) -> i64 {
    let mut v: i64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        v |= (b as i64) << (8 * i);
    }
    let n = bytes.len();
    if (1..8).contains(&n) && bytes[n - 1] & 0x80 != 0 {
        v -= 1i64 << (8 * n);
    }
    v
}

/// `("storage", <StorageClass>, key, location, numel)`: a reference to a storage record.
fn persistent_load(pid: &Value) -> PResult<Value> {
    let Value::Tuple(items, _) = pid else {
        return Err(format!("persistent id is a {}, not a tuple", pid.kind()));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _, numel]
            if &**tag == "storage" =>
        {
            let numel = int(numel, "storage numel")?;
            Ok(Value::Storage(Rc::new(StorageRef { key: key.to_string(), dtype: *dtype, numel })))
        }
        _ => Err("persistent id is not (\"storage\", <storage type>, key, location, numel)".into()),
    }
}

fn int(v: &Value, what: &str) -> PResult<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(format!("{what} is not a non-negative int ({})", other.kind())),
    }
}

fn dims(v: &Value, what: &str) -> PResult<Vec<usize>> {
    let Value::Tuple(items, _) = v else {
        return Err(format!("{what} is a {}, not a tuple", v.kind()));
    };
    items
        .iter()
        .map(|d| {
            int(d, what).and_then(|d| usize::try_from(d).map_err(|_| format!("{what} overflows")))
        })
        .collect()
}

/// REDUCE on an allowed callable: builds the value; nothing is called.
fn reduce(callable: &Value, args: &Value) -> PResult<Value> {
    let Value::Tuple(args, _) = args else {
        return Err(format!("REDUCE with {} arguments", args.kind()));
    };
    let Value::Global(global) = callable else {
        return Err(format!("REDUCE on a {}", callable.kind()));
    };
    match (global, args.as_slice()) {
        (Global::OrderedDict, []) => {
            Ok(Value::Dict { items: Rc::default(), depth: 1, ordered: true })
        }
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        (
            Global::RebuildTensor,
            [storage, offset, size, stride, _, _] | [storage, offset, size, stride, _, _, _],
        ) => {
            let Value::Storage(storage) = storage else {
                return Err(format!("_rebuild_tensor_v2 on a {}, not a storage", storage.kind()));
            };
            Ok(Value::Tensor(Rc::new(TensorDesc {
                storage: (**storage).clone(),
                offset: int(offset, "storage offset")?,
                shape: dims(size, "size")?,
                stride: dims(stride, "stride")?,
            })))
        }
        // (data, requires_grad, backward_hooks[, state]): the tensor itself.
        (Global::RebuildParameter, [Value::Tensor(t), _, _] | [Value::Tensor(t), _, _, _]) => {
            Ok(Value::Tensor(t.clone()))
        }
        (global, args) => {
            Err(format!("REDUCE of {global:?} with {} unexpected arguments", args.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414f_a339);
    }

    /// Eight bytes a step agrees with the bit-at-a-time definition at every length and
    /// split point.
    #[test]
    fn crc32_slicing_matches_the_bitwise_definition() {
        fn bitwise(bytes: &[u8]) -> u32 {
            let mut c = 0xffff_ffffu32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        let data: Vec<u8> =
            (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(crc32(&data[..len]), bitwise(&data[..len]), "length {len}");
        }
        for split in 0..40 {
            let mut c = Crc32::new();
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.finish(), bitwise(&data), "split {split}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 10_000));
        p.extend(std::iter::repeat_n(b'a', 9_999));
        p.push(b'.');
        let err = unpickle(&p).unwrap_err();
        assert!(err.contains("nested deeper than 64"), "{err}");
    }

    #[test]
    fn copying_a_memoized_dict_at_every_step_is_bounded() {
        // {k: None} grown one key at a time, memoized (shared) before each SETITEM.
        let mut p = vec![0x80, 2, b'}'];
        for k in 0..20_000u32 {
            p.extend_from_slice(&[b'q', 0, b'J']);
            p.extend_from_slice(&k.to_le_bytes());
            p.extend_from_slice(b"Ns");
        }
        p.push(b'.');
        let err = unpickle(&p).unwrap_err();
        assert!(err.contains("copies shared containers"), "{err}");
    }

    #[test]
    fn stack_underflow_and_marks_are_errors() {
        for (pickle, expected) in [
            (&b"\x80\x02R."[..], "empty stack"),
            (b"\x80\x02N(R.", "past a MARK"),
            (b"\x80\x02t.", "without a MARK"),
            (b"\x80\x02NN.", "leftover"),
            (b"\x80\x02N", "without STOP"),
            (b"\x80\x02h\x05.", "unset memo 5"),
            (b"\x80\x02X\xff\xff\xff\xff.", "ends inside an opcode"),
            (b"\x80\x02N.", "root object is a None"),
        ] {
            let err = unpickle(pickle).unwrap_err();
            assert!(err.contains(expected), "{pickle:?}: {err}");
        }
    }

    #[test]
    fn long1_is_little_endian_twos_complement() {
        assert_eq!(long1(&[]), 0);
        assert_eq!(long1(&[0xff]), -1);
        assert_eq!(long1(&[0xff, 0x00]), 255);
        assert_eq!(long1(&[0x00, 0x80]), -32768);
        assert_eq!(long1(&[0, 0, 0, 0, 1]), 1 << 32);
        assert_eq!(long1(&[0xff; 8]), -1);
    }
}
