//! PyTorch `.bin` checkpoints (torch.save zips): the fixture reads exactly like its
//! safetensors twin, and bad files (truncated, corrupt, compressed, hostile pickles, bad
//! tensor geometry) are refused with an error naming the problem. The hostile files are
//! written here by hand: a stored-zip writer and a pickle writer that emits the opcodes
//! torch.save does.

mod common;

use std::path::Path;

use common::*;
use triton_llm::Error;
use triton_llm::model::Checkpoint;
use triton_llm::model::torch_bin::{self, crc32};

// ---- writers ------------------------------------------------------------------------

/// An uncompressed zip of `records` (name, bytes); `method` is written into both headers
/// of the record named `compressed` (its bytes stay as given). `zip64` writes every size
/// and offset in zip64 form (saturated 32-bit fields, zip64 extra fields and end records),
/// as a writer must past 4 GiB.
fn write_zip(records: &[(&str, &[u8])], compressed: Option<(&str, u16)>, zip64: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let method = match compressed {
            Some((n, m)) if n == *name => m,
            _ => 0,
        };
        let local = out.len() as u64;
        let crc = crc32(data);
        let header = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend_from_slice(&45u16.to_le_bytes()); // version made by
            }
            h.extend_from_slice(&45u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&[0; 4]); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            let size = if zip64 { u32::MAX } else { data.len() as u32 };
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            let mut extra = Vec::new();
            if zip64 {
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&(if central { 24u16 } else { 16 }).to_le_bytes());
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                if central {
                    extra.extend_from_slice(&local.to_le_bytes());
                }
            }
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            if central {
                h.extend_from_slice(&[0; 10]); // comment len, disk, internal, external attrs
                let offset = if zip64 { u32::MAX } else { local as u32 };
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h.extend(extra);
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let (dir_offset, dir_size, count) = (out.len() as u64, central.len() as u64, records.len());
    out.extend(central);
    if zip64 {
        let end64 = out.len() as u64;
        out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of the record
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // disks
        out.extend_from_slice(&(count as u64).to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
        out.extend_from_slice(&dir_size.to_le_bytes());
        out.extend_from_slice(&dir_offset.to_le_bytes());
        out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&end64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
    }
    let (count, dir_size, dir_offset) = if zip64 {
        (u16::MAX, u32::MAX, u32::MAX)
    } else {
        (count as u16, dir_size as u32, dir_offset as u32)
    };
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&dir_size.to_le_bytes());
    out.extend_from_slice(&dir_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn stored_zip(records: &[(&str, &[u8])]) -> Vec<u8> {
    write_zip(records, None, false)
}

/// One tensor as torch.save pickles it.
struct Tensor<'a> {
    name: &'a str,
    storage: &'a str,
    key: &'a str,
    numel: u32,
    offset: u32,
    size: &'a [u32],
    stride: &'a [u32],
}

/// Pickle opcodes, named as in Python's pickletools.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const EMPTY_DICT: u8 = b'}';
    pub const MARK: u8 = b'(';
    pub const BINUNICODE: u8 = b'X';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const EMPTY_TUPLE: u8 = b')';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT: u8 = b'J';
    pub const NEWFALSE: u8 = 0x89;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const SETITEMS: u8 = b'u';
    pub const SETITEM: u8 = b's';
    pub const BINPUT: u8 = b'q';
    pub const BINGET: u8 = b'h';
    pub const STOP: u8 = b'.';
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(op::BINUNICODE);
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: u32) {
    p.push(op::BININT);
    p.extend_from_slice(&v.to_le_bytes());
}

fn global(p: &mut Vec<u8>, module: &str, name: &str) {
    p.push(op::GLOBAL);
    p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
}

fn tensor_value(p: &mut Vec<u8>, t: &Tensor) {
    global(p, "torch._utils", "_rebuild_tensor_v2");
    p.push(op::MARK);
    p.push(op::MARK);
    unicode(p, "storage");
    global(p, "torch", t.storage);
    unicode(p, t.key);
    unicode(p, "cpu");
    int(p, t.numel);
    p.push(op::TUPLE);
    p.push(op::BINPERSID);
    int(p, t.offset);
    for dims in [t.size, t.stride] {
        p.push(op::MARK);
        for &d in dims {
            int(p, d);
        }
        p.push(op::TUPLE);
    }
    p.push(op::NEWFALSE);
    global(p, "collections", "OrderedDict");
    p.push(op::EMPTY_TUPLE);
    p.push(op::REDUCE);
    p.push(op::TUPLE);
    p.push(op::REDUCE);
}

/// `torch.save({name: tensor, …})`'s pickle.
fn tensors_pickle(tensors: &[Tensor]) -> Vec<u8> {
    let mut p = vec![op::PROTO, 2, op::EMPTY_DICT, op::BINPUT, 0, op::MARK];
    for t in tensors {
        unicode(&mut p, t.name);
        tensor_value(&mut p, t);
    }
    p.extend_from_slice(&[op::SETITEMS, op::STOP]);
    p
}

/// A whole `.bin` file: `archive/data.pkl`, the storages, `archive/version`.
fn bin_file(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<String> = storages.iter().map(|(k, _)| format!("archive/data/{k}")).collect();
    let mut records: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pickle)];
    records.extend(names.iter().zip(storages).map(|(n, (_, b))| (n.as_str(), *b)));
    records.push(("archive/version", b"3\n"));
    stored_zip(&records)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A folder holding one `pytorch_model.bin`.
fn bin_folder(file: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), file).unwrap();
    dir
}

fn open_error(dir: &Path) -> Error {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened but should not", dir.display()),
        Err(e) => e,
    }
}

fn assert_weights_error(err: &Error, parts: &[&str]) {
    assert!(matches!(err, Error::Weights(_)), "not a weights error: {err:?}");
    let message = err.to_string();
    for part in parts {
        assert!(message.contains(part), "{message:?} should mention {part:?}");
    }
}

fn one_tensor(name: &str, size: &[u32], stride: &[u32], offset: u32, numel: u32) -> Vec<u8> {
    let t = Tensor { name, storage: "FloatStorage", key: "0", numel, offset, size, stride };
    tensors_pickle(&[t])
}

// ---- the fixture --------------------------------------------------------------------

#[test]
fn fixture_tensors_equal_the_safetensors_ones_bit_for_bit() {
    let bin = Checkpoint::open(&fixture("chatglm2-tiny-bin")).unwrap();
    let reference = read_safetensors(&fixture("chatglm2-tiny").join("model.safetensors"));
    assert_eq!(reference.len(), 18);
    for (name, dtype, shape, data) in &reference {
        assert_eq!(dtype, "F32");
        let got = bin.f32(name, shape).unwrap();
        let want: Vec<u32> =
            data.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "{name}");
    }
    // Every tensor of the .bin shards was one of the safetensors ones.
    bin.finish().unwrap();
}

#[test]
fn fixture_shards_parse_in_memory_with_every_crc_checked() {
    let dir = fixture("chatglm2-tiny-bin");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("pytorch_model.bin.index.json")).unwrap(),
    )
    .unwrap();
    let mut total = 0;
    for (shard, count) in
        [("pytorch_model-00001-of-00002.bin", 12), ("pytorch_model-00002-of-00002.bin", 6)]
    {
        let path = dir.join(shard);
        let tensors = torch_bin::parse_bytes(&path, &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(tensors.len(), count, "{shard}");
        for t in &tensors {
            assert_eq!(index["weight_map"][&t.name], shard, "{} is routed to {shard}", t.name);
            assert!(t.record.name.starts_with("pytorch_model-0000"), "{}", t.record.name);
            assert!(t.record.verified.load(std::sync::atomic::Ordering::SeqCst), "{}", t.name);
            total += t.len;
        }
    }
    assert_eq!(total, index["metadata"]["total_size"].as_u64().unwrap());
}

#[test]
fn safetensors_are_preferred_over_bin() {
    let dir = copy_fixture("chatglm2-tiny");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not a zip").unwrap();
    Checkpoint::open(dir.path()).unwrap();
}

/// A single `pytorch_model.bin` as `torch.save(model.state_dict())` writes it: the root is
/// an OrderedDict carrying `_metadata` state, tensors are parameters, and storages are
/// shared between tensors at different offsets and in different dtypes.
#[test]
fn single_file_with_shared_storages_parameters_and_an_ordered_dict_root() {
    let floats: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
    let halves: Vec<u8> =
        [1.5f32, -2.0, 0.25].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let tensors = [
        Tensor {
            name: "a",
            storage: "FloatStorage",
            key: "0",
            numel: 10,
            offset: 0,
            size: &[2, 3],
            stride: &[3, 1],
        },
        Tensor {
            name: "b",
            storage: "FloatStorage",
            key: "0",
            numel: 10,
            offset: 6,
            size: &[4],
            stride: &[1],
        },
        // A dimension of one element may carry any stride (torch still calls it contiguous).
        Tensor {
            name: "c",
            storage: "HalfStorage",
            key: "1",
            numel: 3,
            offset: 1,
            size: &[2, 1],
            stride: &[1, 7],
        },
        Tensor {
            name: "d",
            storage: "FloatStorage",
            key: "0",
            numel: 10,
            offset: 9,
            size: &[],
            stride: &[],
        },
    ];
    let mut p = vec![op::PROTO, 2];
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE, op::BINPUT, 0, op::MARK]);
    for (i, t) in tensors.iter().enumerate() {
        unicode(&mut p, t.name);
        if i % 2 == 0 {
            // As an nn.Parameter: _rebuild_parameter(tensor, requires_grad, hooks).
            global(&mut p, "torch._utils", "_rebuild_parameter");
            p.push(op::MARK);
            tensor_value(&mut p, t);
            p.push(0x88); // NEWTRUE
            global(&mut p, "collections", "OrderedDict");
            p.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE]);
        } else {
            tensor_value(&mut p, t);
        }
    }
    p.push(op::SETITEMS);
    // BUILD with {"_metadata": OrderedDict{"": {"version": 1}}}: data only, dropped.
    p.extend_from_slice(&[op::EMPTY_DICT, op::MARK]);
    unicode(&mut p, "_metadata");
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
    unicode(&mut p, "");
    p.push(op::EMPTY_DICT);
    unicode(&mut p, "version");
    p.extend_from_slice(&[0x4b, 1, op::SETITEM, op::SETITEM, op::SETITEMS, op::BUILD, op::STOP]);

    let file = bin_file(&p, &[("0", &f32_bytes(&floats)), ("1", &halves)]);
    let dir = bin_folder(&file);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.f32("a", &[2, 3]).unwrap(), floats[..6]);
    assert_eq!(ckpt.f32("b", &[4]).unwrap(), floats[6..]);
    assert_eq!(ckpt.f32("c", &[2, 1]).unwrap(), [-2.0, 0.25]);
    assert_eq!(ckpt.f32("d", &[]).unwrap(), [floats[9]]);
    ckpt.finish().unwrap();
}

#[test]
fn zip64_directories_are_read() {
    let storage = f32_bytes(&[1.0, -2.0, 3.5]);
    let pickle = one_tensor("w", &[3], &[1], 0, 3);
    let records: [(&str, &[u8]); 2] = [("archive/data.pkl", &pickle), ("archive/data/0", &storage)];
    let file = write_zip(&records, None, true);
    let dir = bin_folder(&file);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.f32("w", &[3]).unwrap(), [1.0, -2.0, 3.5]);

    // Saturated fields without the zip64 end records are refused, not misread.
    let end64 = file.len() - 22 - 20 - 56;
    let mut broken = file[..end64].to_vec();
    broken.extend_from_slice(&file[file.len() - 22..]);
    let err = open_error(bin_folder(&broken).path());
    assert_weights_error(&err, &["zip64"]);
}

// ---- bad files ----------------------------------------------------------------------

/// The fixture's first shard as a single-file checkpoint, with `edit` applied to its bytes.
fn edited_fixture_shard(
    edit: impl FnOnce(&mut Vec<u8>, &[torch_bin::BinTensor]),
) -> tempfile::TempDir {
    let path = fixture("chatglm2-tiny-bin").join("pytorch_model-00001-of-00002.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let tensors = torch_bin::read_tensors(&path, bytes.as_slice()).unwrap();
    edit(&mut bytes, &tensors);
    bin_folder(&bytes)
}

#[test]
fn truncated_zip_is_refused() {
    for keep in [0, 21, 200_000, 449_000] {
        let dir = edited_fixture_shard(|b, _| b.truncate(keep));
        let err = open_error(dir.path());
        assert_weights_error(&err, &["pytorch_model.bin", "truncated"]);
    }
}

#[test]
fn legacy_torch_save_format_is_named() {
    // torch < 1.6: pickled magic number 0x1950a86a20f9469cfc6c, then the pickles.
    let file = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.";
    assert_weights_error(&open_error(bin_folder(file).path()), &["legacy", "torch before 1.6"]);
}

#[test]
fn corrupt_storage_record_fails_its_crc_when_read() {
    let name = "transformer.encoder.layers.0.self_attention.query_key_value.weight";
    let dir = edited_fixture_shard(|b, tensors| {
        let t = tensors.iter().find(|t| t.name == name).unwrap();
        b[(t.offset + t.len / 2) as usize] ^= 0x01;
    });
    // Only the pickle's CRC is checked at open; the tensor's when it is read.
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt.f32(name, &[128, 64]).unwrap_err();
    assert_weights_error(&err, &["pytorch_model.bin", "/data/3", "CRC-32", "corrupt"]);
    assert!(ckpt.f32("transformer.encoder.layers.0.input_layernorm.weight", &[64]).is_ok());
}

#[test]
fn corrupt_byte_outside_a_tensor_but_inside_its_storage_is_caught() {
    // Tensor "a" covers the first half of its storage; the flipped byte is in the rest.
    let floats: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let pickle = one_tensor("a", &[4], &[1], 0, 8);
    let mut file = bin_file(&pickle, &[("0", &f32_bytes(&floats))]);
    let at = file.windows(4).position(|w| w == 7.0f32.to_le_bytes()).unwrap();
    file[at] ^= 0x40;
    let dir = bin_folder(&file);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_weights_error(&ckpt.f32("a", &[4]).unwrap_err(), &["archive/data/0", "CRC-32"]);
    // A failed record stays unverified: the next read checks it again.
    assert_weights_error(&ckpt.f32("a", &[4]).unwrap_err(), &["archive/data/0", "CRC-32"]);
}

#[test]
fn corrupt_pickle_fails_its_crc_at_open() {
    let dir = edited_fixture_shard(|b, _| {
        let name = b"transformer.rotary_pos_emb.inv_freq";
        let at = b.windows(name.len()).position(|w| w == name).unwrap();
        b[at] = b'X';
    });
    let err = open_error(dir.path());
    assert_weights_error(&err, &["pytorch_model-00001-of-00002/data.pkl", "CRC-32"]);
}

#[test]
fn missing_storage_record_is_named() {
    let pickle = one_tensor("w", &[2], &[1], 0, 2);
    let file = stored_zip(&[("archive/data.pkl", &pickle), ("archive/version", b"3\n")]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["tensor w", "archive/data/0", "missing"]);
}

#[test]
fn missing_pickle_is_refused() {
    let file = stored_zip(&[("archive/data/0", &[0; 8]), ("archive/version", b"3\n")]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["data.pkl"]);
}

#[test]
fn compressed_record_is_refused_by_method() {
    let pickle = one_tensor("w", &[2], &[1], 0, 2);
    let storage = f32_bytes(&[1.0, 2.0]);
    let file = write_zip(
        &[("archive/data.pkl", &pickle), ("archive/data/0", &storage)],
        Some(("archive/data/0", 8)),
        false,
    );
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["archive/data/0", "compressed", "deflate"]);
}

#[test]
fn big_endian_checkpoint_is_refused() {
    let pickle = one_tensor("w", &[2], &[1], 0, 2);
    let storage = f32_bytes(&[1.0, 2.0]);
    let file = stored_zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/byteorder", b"big"),
        ("archive/data/0", &storage),
    ]);
    assert_weights_error(&open_error(bin_folder(&file).path()), &["big-endian"]);
}

/// `os.system("touch <marker>")` (GLOBAL) or `builtins.eval(...)` (STACK_GLOBAL): refused
/// by name, and the marker file is never created.
#[test]
fn pickles_naming_code_are_refused_and_nothing_runs() {
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let cases: [(&str, &str, bool); 4] = [
        ("os", "system", false),
        ("posix", "system", false),
        ("builtins", "eval", true),
        ("__builtin__", "getattr", true),
    ];
    for (module, name, stack_global) in cases {
        let mut p = vec![op::PROTO, 2];
        if stack_global {
            p.extend_from_slice(&[0x8c, module.len() as u8]); // SHORT_BINUNICODE
            p.extend_from_slice(module.as_bytes());
            p.extend_from_slice(&[0x8c, name.len() as u8]);
            p.extend_from_slice(name.as_bytes());
            p.push(op::STACK_GLOBAL);
        } else {
            global(&mut p, module, name);
        }
        unicode(&mut p, &command);
        p.extend_from_slice(&[op::TUPLE1, op::REDUCE, op::STOP]);
        let file = bin_file(&p, &[]);
        let err = open_error(bin_folder(&file).path());
        assert_weights_error(&err, &[&format!("{module}.{name}"), "not allowed"]);
        assert!(!marker.exists(), "{module}.{name} ran");
    }
}

#[test]
fn unsupported_opcodes_and_storage_types_are_named() {
    // INST (protocol 0's "i" opcode: instantiate a class).
    let mut p = vec![op::PROTO, 2, op::MARK];
    p.extend_from_slice(b"ios\nsystem\n.");
    let err = open_error(bin_folder(&bin_file(&p, &[])).path());
    assert_weights_error(&err, &["opcode INST (0x69)"]);

    let t = Tensor {
        name: "w",
        storage: "DoubleStorage",
        key: "0",
        numel: 1,
        offset: 0,
        size: &[1],
        stride: &[1],
    };
    let file = bin_file(&tensors_pickle(&[t]), &[("0", &[0; 8])]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["torch.DoubleStorage", "not supported"]);
}

#[test]
fn index_naming_a_missing_shard_is_named() {
    let dir = copy_fixture("chatglm2-tiny-bin");
    std::fs::remove_file(dir.path().join("pytorch_model-00002-of-00002.bin")).unwrap();
    let err = open_error(dir.path());
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("pytorch_model-00002-of-00002.bin"), "{err}");
}

#[test]
fn tensor_past_its_storage_is_refused() {
    let storage = f32_bytes(&[0.0; 6]);
    let file = bin_file(&one_tensor("w", &[2, 3], &[3, 1], 1, 6), &[("0", &storage)]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["tensor w", "exceed its storage of 6 elements"]);

    // The pickle's numel must match the record's length too.
    let file = bin_file(&one_tensor("w", &[2, 3], &[3, 1], 0, 6), &[("0", &storage[..20])]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["tensor w", "20 bytes"]);
}

#[test]
fn non_contiguous_tensor_is_refused() {
    // A transposed view: size (3, 2), stride (1, 3).
    let storage = f32_bytes(&[0.0; 6]);
    let file = bin_file(&one_tensor("w.T", &[3, 2], &[1, 3], 0, 6), &[("0", &storage)]);
    let err = open_error(bin_folder(&file).path());
    assert_weights_error(&err, &["tensor w.T", "not contiguous"]);
}

#[test]
fn memo_gets_share_storages_like_torch_writes_them() {
    // The second tensor fetches the first one's persistent id from the memo (BINGET).
    let storage = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let mut p = vec![op::PROTO, 2, op::EMPTY_DICT, op::MARK];
    unicode(&mut p, "x");
    global(&mut p, "torch._utils", "_rebuild_tensor_v2");
    p.extend_from_slice(&[op::BINPUT, 1, op::MARK, op::MARK]);
    unicode(&mut p, "storage");
    global(&mut p, "torch", "FloatStorage");
    unicode(&mut p, "0");
    unicode(&mut p, "cpu");
    int(&mut p, 4);
    p.extend_from_slice(&[op::TUPLE, op::BINPUT, 2, op::BINPERSID]);
    int(&mut p, 0);
    int(&mut p, 2);
    p.push(op::TUPLE1);
    int(&mut p, 1);
    p.extend_from_slice(&[
        op::TUPLE1,
        op::BINPUT,
        3,
        op::NEWFALSE,
        op::EMPTY_DICT,
        op::TUPLE,
        op::REDUCE,
    ]);
    unicode(&mut p, "y");
    p.extend_from_slice(&[op::BINGET, 1, op::MARK, op::BINGET, 2, op::BINPERSID]);
    int(&mut p, 2);
    int(&mut p, 2);
    p.push(op::TUPLE1);
    p.extend_from_slice(&[op::BINGET, 3, op::NEWFALSE, op::EMPTY_DICT, op::TUPLE, op::REDUCE]);
    p.extend_from_slice(&[op::SETITEMS, op::STOP]);
    let dir = bin_folder(&bin_file(&p, &[("0", &storage)]));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.f32("x", &[2]).unwrap(), [1.0, 2.0]);
    assert_eq!(ckpt.f32("y", &[2]).unwrap(), [3.0, 4.0]);
}

/// The fuzz seeds were written by Python's own zipfile and pickle modules (torch's globals
/// faked): a second writer besides this file's, the OrderedDict root with `_metadata`
/// state, parameters, BFloat16 and Int storages and protocol 4's FRAME/MEMOIZE included.
#[test]
fn python_written_files_parse() {
    let corpus = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/torch_bin");
    let parse = |name: &str| {
        let bytes = std::fs::read(corpus.join(name)).unwrap();
        let mut tensors = torch_bin::parse_bytes(Path::new(name), &bytes[1..]).unwrap();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        tensors.into_iter().map(|t| (t.name, t.dtype.name(), t.shape, t.len)).collect::<Vec<_>>()
    };
    assert_eq!(
        parse("file_dict_shared_storage"),
        [("a".into(), "float32", vec![2, 2], 16), ("b".into(), "float32", vec![4], 16)]
    );
    assert_eq!(
        parse("file_ordered_dict_params"),
        [
            ("b".into(), "bfloat16", vec![], 2),
            ("h".into(), "float16", vec![2, 1], 4),
            ("i".into(), "int32", vec![3], 12)
        ]
    );
    assert_eq!(parse("file_protocol4_frames"), [("a".into(), "float32", vec![3], 12)]);
}

#[test]
fn half_and_int_storages_through_the_checkpoint() {
    let corpus = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/torch_bin");
    let bytes = std::fs::read(corpus.join("file_ordered_dict_params")).unwrap();
    let dir = bin_folder(&bytes[1..]);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.f32("h", &[2, 1]).unwrap(), [1.0, 1.0]);
    assert_eq!(ckpt.f32("b", &[]).unwrap(), [1.0]);
    // int32 tensors (AWQ's packed weights) are not floats to convert.
    assert_weights_error(&ckpt.f32("i", &[3]).unwrap_err(), &["tensor i", "int32"]);
}
