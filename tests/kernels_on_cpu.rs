//! The GPU path's kernels (kernels/*.cu) run on CPU threads, one per CUDA thread
//! (tests/kernel_host/shim.h), against the CPU path's ops (src/cpu) or plain sums: their
//! logic — indexing, reductions, the split-key merge of decode attention, paged lookups — is
//! checked in CI, where there is no GPU. tests/gpu.rs checks them on a device through the
//! whole model. The tensor cores' mma.m16n8k16 runs as the shim's emulation (bf16).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use triton_llm::cpu::{self, AttentionShape, kv_quant};
use triton_llm::dtype::{DType, KvFormat};
use triton_llm::probe;

/// The kernel files the harness includes, in the engine's order.
const KERNEL_FILES: [&str; 9] = [
    "common.cuh",
    "embedding.cu",
    "rms_norm.cu",
    "gemv.cu",
    "gemv_quant.cu",
    "rope_kv.cu",
    "attention.cu",
    "attention_mma.cu",
    "silu_mul.cu",
];

/// With KERNELS_ON_CPU_SANITIZE set: AddressSanitizer and UBSan, every report fatal (a
/// kernel reading past a buffer or its shared memory fails the test, as compute-sanitizer's
/// memcheck would fail it on a device).
const SANITIZE: [&str; 4] =
    ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"];

/// The harness for one element type, compiled once.
fn harness(dtype: DType) -> PathBuf {
    static F32: OnceLock<PathBuf> = OnceLock::new();
    static BF16: OnceLock<PathBuf> = OnceLock::new();
    let cell = match dtype {
        DType::F32 => &F32,
        DType::BF16 => &BF16,
        DType::F16 => panic!("f16 conversions are PTX; not emulated"),
    };
    cell.get_or_init(|| compile(dtype)).clone()
}

fn compile(dtype: DType) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut source = format!("#include \"{}\"\n", root.join("tests/kernel_host/shim.h").display());
    for name in KERNEL_FILES {
        let text = std::fs::read_to_string(root.join("kernels").join(name)).unwrap();
        source.push_str(&format!("// ---- kernels/{name}\n"));
        for line in text.lines() {
            source.push_str(&dynamic_shared_as_pointer(line));
            source.push('\n');
        }
    }
    let driver = root.join("tests/kernel_host/run_kernel.cpp");
    source.push_str(&format!("#include \"{}\"\n", driver.display()));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join(format!("kernels-{}.cpp", dtype.name()));
    std::fs::write(&file, source).unwrap();
    let binary = dir.join(format!("run_kernel-{}", dtype.name()));
    let mut command = Command::new("c++");
    // CUDA code reads vectors through pointers of other types (an int4 as 16-bit values).
    command
        .args(["-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", "-w", "-o"])
        .arg(&binary)
        .arg(&file);
    if dtype == DType::BF16 {
        command.arg("-DELEM_BF16");
    }
    if std::env::var_os("KERNELS_ON_CPU_SANITIZE").is_some() {
        command.args(SANITIZE);
    }
    let output = command.output().expect("a C++ compiler `c++` (scripts/setup.sh installs g++)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    binary
}

/// `extern __shared__ [__align__(n)] T name[];` → a pointer to the emulator's buffer.
fn dynamic_shared_as_pointer(line: &str) -> String {
    let Some(at) = line.find("extern __shared__ ") else { return line.to_string() };
    let mut rest = &line[at + "extern __shared__ ".len()..];
    if rest.starts_with("__align__(") {
        rest = &rest[rest.find(") ").unwrap() + 2..];
    }
    let declaration = rest.trim_end().trim_end_matches("[];");
    let (ty, name) = declaration.rsplit_once(' ').unwrap();
    format!("{}{ty}* {name} = reinterpret_cast<{ty}*>(emu_dynamic_shared);", &line[..at])
}

#[derive(Clone, Copy)]
enum Arg {
    Buffer(usize),
    Null,
    I32(i32),
    F32(f32),
}

/// Arguments: buffers 0..count in order, then `scalars`.
fn with_buffers<const N: usize>(count: usize, scalars: [Arg; N]) -> Vec<Arg> {
    (0..count).map(Arg::Buffer).chain(scalars).collect()
}

/// Runs `kernel` over `grid` with `block` threads; returns the buffers as it left them.
fn launch(
    dtype: DType,
    kernel: &str,
    grid: [u32; 3],
    block: u32,
    buffers: Vec<Vec<u8>>,
    args: &[Arg],
) -> Vec<Vec<u8>> {
    launch_with_shared(dtype, kernel, (grid, block, u32::MAX), buffers, args)
}

/// [`launch`] with the dynamic shared memory the engine's launch gives the kernel, in bytes
/// (u32::MAX: not stated): under KERNELS_ON_CPU_SANITIZE a read past it fails the test.
fn launch_with_shared(
    dtype: DType,
    kernel: &str,
    (grid, block, shared): ([u32; 3], u32, u32),
    buffers: Vec<Vec<u8>>,
    args: &[Arg],
) -> Vec<Vec<u8>> {
    let mut input = Vec::new();
    input.extend((kernel.len() as u32).to_le_bytes());
    input.extend(kernel.as_bytes());
    for v in grid.iter().chain([&block, &shared]) {
        input.extend(v.to_le_bytes());
    }
    input.extend((buffers.len() as u32).to_le_bytes());
    for buffer in &buffers {
        input.extend((buffer.len() as u64).to_le_bytes());
        input.extend(buffer);
    }
    input.extend((args.len() as u32).to_le_bytes());
    for arg in args {
        let (kind, value): (u8, u64) = match *arg {
            Arg::Buffer(i) => (0, i as u64),
            Arg::Null => (0, -1i64 as u64),
            Arg::I32(v) => (1, v as i64 as u64),
            Arg::F32(v) => (4, u64::from(v.to_bits())),
        };
        input.push(kind);
        input.extend(value.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let (input_path, output_path) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&input_path, input).unwrap();
    // Leak checking needs ptrace, which containers may refuse; the harness's leaks are moot.
    let output = Command::new(harness(dtype))
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .arg(&input_path)
        .arg(&output_path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{kernel}: {}", String::from_utf8_lossy(&output.stderr));
    let bytes = std::fs::read(&output_path).unwrap();
    let mut at = 0;
    buffers
        .iter()
        .map(|b| {
            at += b.len();
            bytes[at - b.len()..at].to_vec()
        })
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Elements of `dtype` back to f32.
fn elems(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => f32s(bytes),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        DType::F16 => unreachable!(),
    }
}

/// `values` as `dtype` holds them (rounded for bf16).
fn rounded(dtype: DType, values: &[f32]) -> Vec<f32> {
    elems(dtype, &dtype.encode(values))
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

fn assert_close(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * (1.0 + w.abs()),
            "{what}: element {i}: kernel {g}, reference {w}"
        );
    }
}

#[test]
fn add_rms_norm_adds_the_residual_and_normalises() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Width 200 takes the kernel's runs of four; 198 its element-by-element path.
    for (dtype, tolerance, width) in [
        (DType::F32, 1e-5, 200),
        (DType::BF16, 8e-3, 200),
        (DType::F32, 1e-5, 198),
        (DType::BF16, 8e-3, 198),
    ] {
        let (rows, eps) = (3, 1e-5);
        let x = random(&mut rng, rows * width, 2.0);
        let delta = rounded(dtype, &random(&mut rng, rows * width, 1.0));
        let weight = rounded(dtype, &random(&mut rng, width, 1.5));
        let out = launch(
            dtype,
            "add_rms_norm",
            [rows as u32, 1, 1],
            64,
            vec![
                f32_bytes(&x),
                dtype.encode(&delta),
                dtype.encode(&weight),
                vec![0; rows * width * dtype.size()],
            ],
            // rows: none (every row in order)
            &[
                Arg::Buffer(0),
                Arg::Buffer(1),
                Arg::Null,
                Arg::Buffer(2),
                Arg::Buffer(3),
                Arg::I32(width as i32),
                Arg::F32(eps),
            ],
        );
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_close(&f32s(&out[0]), &summed, 0.0, "residual");
        let normed: Vec<f32> =
            summed.chunks(width).flat_map(|row| cpu::rms_norm(row, &weight, eps)).collect();
        assert_close(&elems(dtype, &out[3]), &normed, tolerance, dtype.name());

        // `rows` picks residual rows (2, 0) into output rows (0, 1); no delta.
        let picked = launch(
            dtype,
            "add_rms_norm",
            [2, 1, 1],
            64,
            vec![
                f32_bytes(&x),
                i32_bytes(&[2, 0]),
                dtype.encode(&weight),
                vec![0; 2 * width * dtype.size()],
            ],
            // delta: none
            &[
                Arg::Buffer(0),
                Arg::Null,
                Arg::Buffer(1),
                Arg::Buffer(2),
                Arg::Buffer(3),
                Arg::I32(width as i32),
                Arg::F32(eps),
            ],
        );
        let want: Vec<f32> = [2, 0]
            .iter()
            .flat_map(|&r| cpu::rms_norm(&x[r * width..(r + 1) * width], &weight, eps))
            .collect();
        assert_close(&elems(dtype, &picked[3]), &want, tolerance, "picked rows");
    }
}

#[test]
fn gemv_products_match_plain_sums() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // k = 8192 runs the loads-in-flight loop more than once, 264 its tail, 130 the unaligned
    // path.
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
        for (m, n, k) in [(1, 5, 8192), (3, 37, 264), (8, 9, 130), (2, 5, 8192)] {
            let x = rounded(dtype, &random(&mut rng, m * k, 1.0));
            let w = rounded(dtype, &random(&mut rng, n * k, 1.0));
            let bias = rounded(dtype, &random(&mut rng, n, 1.0));
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    let dot: f64 =
                        (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[c * k + j])).sum();
                    (dot + f64::from(bias[c])) as f32
                })
                .collect();
            let run = |name: &str, rows: usize, out_bytes: usize| {
                let buffers = vec![
                    dtype.encode(&x[..rows * k]),
                    dtype.encode(&w),
                    dtype.encode(&bias),
                    vec![0; rows * n * 4],
                ];
                let args = [
                    Arg::Buffer(0),
                    Arg::Buffer(1),
                    Arg::Buffer(2),
                    Arg::Buffer(3),
                    Arg::I32(rows as i32),
                    Arg::I32(n as i32),
                    Arg::I32(k as i32),
                ];
                let out = launch(dtype, name, [n as u32, 1, 1], 128, buffers, &args);
                out[3][..rows * n * out_bytes].to_vec()
            };
            let e = dtype.size();
            for (name, out_bytes) in [("gemv_f32", 4), ("gemv_elem", e)] {
                let out = run(name, m, out_bytes);
                let what = format!("{name} {} {m}x{n}x{k}", dtype.name());
                if out_bytes == 4 {
                    assert_close(&f32s(&out), &want, 1e-4, &what);
                } else {
                    assert_close(&elems(dtype, &out), &want, tolerance, &what);
                }
                // A sequence's outputs do not depend on its batch: the first row alone,
                // bit for bit.
                assert_eq!(out[..n * out_bytes], run(name, 1, out_bytes), "{what}: row 0");
            }
            // Split-K (rows whose 16-byte chunks divide among the splits, some unevenly):
            // the same sums, the counters zero again after.
            if (k * e) % 16 == 0 {
                for splits in [2, 3, 4] {
                    let buffers = vec![
                        dtype.encode(&x),
                        dtype.encode(&w),
                        dtype.encode(&bias),
                        vec![0; m * n * e],
                        vec![0; splits * m * n * 4],
                        vec![0; n * 4],
                    ];
                    let args = with_buffers(
                        6,
                        [Arg::I32(m as i32), Arg::I32(n as i32), Arg::I32(k as i32)],
                    );
                    let grid = [n as u32, splits as u32, 1];
                    let out = launch(dtype, "gemv_split_k", grid, 128, buffers, &args);
                    let what = format!("gemv_split_k {} {m}x{n}x{k} in {splits}", dtype.name());
                    assert_close(&elems(dtype, &out[3]), &want, tolerance, &what);
                    assert!(out[5].iter().all(|&b| b == 0), "{what}: counters left set");
                }
            }
        }
    }
}

#[test]
fn gemv_swiglu_is_silu_of_gate_times_up() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 1.6e-2)] {
        for (m, width, k) in [(1, 24, 512), (2, 24, 512), (5, 23, 264)] {
            let x = rounded(dtype, &random(&mut rng, m * k, 1.0));
            let w = rounded(dtype, &random(&mut rng, 2 * width * k, 0.2));
            let product = |r: usize, c: usize| -> f32 {
                (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[c * k + j])).sum::<f64>()
                    as f32
            };
            // Gate and up are rounded to the element type before SwiGLU, as the unfused path
            // does.
            let gate_up: Vec<f32> = (0..m)
                .flat_map(|r| (0..2 * width).map(move |c| (r, c)))
                .map(|(r, c)| product(r, c))
                .collect();
            let want = cpu::silu_mul_packed(&rounded(dtype, &gate_up), width);
            let run = |rows: usize| {
                let out = launch(
                    dtype,
                    "gemv_swiglu",
                    [width as u32, 1, 1],
                    128,
                    vec![
                        dtype.encode(&x[..rows * k]),
                        dtype.encode(&w),
                        vec![0; rows * width * dtype.size()],
                    ],
                    &with_buffers(
                        3,
                        [Arg::I32(rows as i32), Arg::I32(width as i32), Arg::I32(k as i32)],
                    ),
                );
                out[2].clone()
            };
            let out = run(m);
            let what = format!("gemv_swiglu {} {m}x{width}x{k}", dtype.name());
            assert_close(&elems(dtype, &out), &want, tolerance, &what);
            assert_eq!(out[..width * dtype.size()], run(1)[..], "{what}: row 0");
        }
    }
}

/// A random weight in the GPU's W4 layout (kernels/gemv_quant.cu): 4-bit levels 8 to a
/// word in k order, an (f16 scale, f16 zero) word per row and group; and its values
/// `(q − zero) · scale` in f32. One group's scale is an f16 subnormal, one zero is not a
/// whole number.
struct QuantCase {
    packed: Vec<u8>,
    params: Vec<u8>,
    dense: Vec<f32>,
}

fn w4_case(rng: &mut ChaCha8Rng, n: usize, k: usize, group: usize) -> QuantCase {
    use half::f16;
    let groups = k / group;
    let levels: Vec<u32> = (0..n * k).map(|_| rng.random_range(0..16u32)).collect();
    let mut scale_zero: Vec<(f16, f16)> = (0..n * groups)
        .map(|_| {
            let scale = f16::from_f32(rng.random_range(0.002f32..0.05));
            (scale, f16::from_f32(rng.random_range(0..16u32) as f32))
        })
        .collect();
    scale_zero[0].0 = f16::from_bits(0x0203);
    scale_zero[n * groups - 1].1 = f16::from_f32(7.5);
    let mut packed = Vec::new();
    for row in levels.chunks_exact(k) {
        for word in row.chunks_exact(8) {
            let bits = word.iter().enumerate().fold(0u32, |acc, (i, &q)| acc | (q << (4 * i)));
            packed.extend(bits.to_le_bytes());
        }
    }
    let params = scale_zero
        .iter()
        .flat_map(|(s, z)| (u32::from(s.to_bits()) | (u32::from(z.to_bits()) << 16)).to_le_bytes())
        .collect();
    let dense = (0..n * k)
        .map(|i| {
            let (s, z) = scale_zero[(i / k) * groups + (i % k) / group];
            (levels[i] as f32 - z.to_f32()) * s.to_f32()
        })
        .collect();
    QuantCase { packed, params, dense }
}

/// A random weight in the GPU's W8 layout: int8 levels in k order and an f32 scale per row.
fn w8_case(rng: &mut ChaCha8Rng, n: usize, k: usize) -> QuantCase {
    let levels: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127i8)).collect();
    let scales: Vec<f32> = (0..n).map(|_| rng.random_range(0.001f32..0.02)).collect();
    QuantCase {
        packed: levels.iter().map(|&q| q as u8).collect(),
        params: f32_bytes(&scales),
        dense: (0..n * k).map(|i| f32::from(levels[i]) * scales[i / k]).collect(),
    }
}

/// The quantised decode products against plain sums over the dequantised weight, with and
/// without bias, and a row alone equal to it in a batch; the dequantising kernels give
/// exactly the weight the CPU path computes with, in the element type.
#[test]
fn quantised_products_match_plain_sums_over_the_dequantised_weight() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
        // k = 8192 takes the loads-in-flight loop more than once; group 32 and 128.
        for (bits, m, n, k, group) in
            [(4, 1, 5, 8192, 128), (4, 3, 7, 256, 32), (8, 8, 6, 4096, 0), (8, 2, 5, 272, 0)]
        {
            let case =
                if bits == 4 { w4_case(&mut rng, n, k, group) } else { w8_case(&mut rng, n, k) };
            let x = rounded(dtype, &random(&mut rng, m * k, 1.0));
            let bias = rounded(dtype, &random(&mut rng, n, 1.0));
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    let dot: f64 = (0..k)
                        .map(|j| f64::from(x[r * k + j]) * f64::from(case.dense[c * k + j]))
                        .sum();
                    (dot + f64::from(bias[c])) as f32
                })
                .collect();
            let name = if bits == 4 { "gemv_w4" } else { "gemv_w8" };
            let run = |rows: usize| {
                let mut args = with_buffers(
                    5,
                    [Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32(k as i32)],
                );
                if bits == 4 {
                    args.push(Arg::I32(group as i32));
                }
                let buffers = vec![
                    case.packed.clone(),
                    case.params.clone(),
                    dtype.encode(&x[..rows * k]),
                    dtype.encode(&bias),
                    vec![0; rows * n * dtype.size()],
                ];
                launch(dtype, name, [n as u32, 1, 1], 128, buffers, &args)[4].clone()
            };
            let out = run(m);
            let what = format!("{name} {} {m}x{n}x{k}", dtype.name());
            assert_close(&elems(dtype, &out), &want, tolerance, &what);
            assert_eq!(out[..n * dtype.size()], run(1)[..], "{what}: row 0");

            let (kernel, args) = if bits == 4 {
                ("dequant_w4", with_buffers(3, [Arg::I32(k as i32), Arg::I32(group as i32)]))
            } else {
                ("dequant_w8", with_buffers(3, [Arg::I32(k as i32)]))
            };
            let chunks = k / if bits == 4 { 32 } else { 16 };
            let out = launch(
                dtype,
                kernel,
                [chunks.div_ceil(128) as u32, n as u32, 1],
                128,
                vec![case.packed.clone(), case.params.clone(), vec![0; n * k * dtype.size()]],
                &args,
            );
            assert_eq!(
                elems(dtype, &out[2]),
                rounded(dtype, &case.dense),
                "{kernel} {}",
                dtype.name()
            );
        }
    }
}

#[test]
fn quantised_swiglu_is_silu_of_gate_times_up() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 1.6e-2)] {
        for (bits, m, width, k) in [(4, 1, 12, 512), (4, 5, 7, 256), (8, 3, 9, 512)] {
            let case = if bits == 4 {
                w4_case(&mut rng, 2 * width, k, 128)
            } else {
                w8_case(&mut rng, 2 * width, k)
            };
            let x = rounded(dtype, &random(&mut rng, m * k, 1.0));
            let product = |r: usize, c: usize| -> f32 {
                (0..k)
                    .map(|j| f64::from(x[r * k + j]) * f64::from(case.dense[c * k + j]))
                    .sum::<f64>() as f32
            };
            let gate_up: Vec<f32> = (0..m)
                .flat_map(|r| (0..2 * width).map(move |c| (r, c)))
                .map(|(r, c)| product(r, c))
                .collect();
            let want = cpu::silu_mul_packed(&rounded(dtype, &gate_up), width);
            let name = if bits == 4 { "gemv_w4_swiglu" } else { "gemv_w8_swiglu" };
            let run = |rows: usize| {
                let mut args = with_buffers(
                    4,
                    [Arg::I32(rows as i32), Arg::I32(width as i32), Arg::I32(k as i32)],
                );
                if bits == 4 {
                    args.push(Arg::I32(128));
                }
                let buffers = vec![
                    case.packed.clone(),
                    case.params.clone(),
                    dtype.encode(&x[..rows * k]),
                    vec![0; rows * width * dtype.size()],
                ];
                launch(dtype, name, [width as u32, 1, 1], 128, buffers, &args)[3].clone()
            };
            let out = run(m);
            let what = format!("{name} {} {m}x{width}x{k}", dtype.name());
            assert_close(&elems(dtype, &out), &want, tolerance, &what);
            assert_eq!(out[..width * dtype.size()], run(1)[..], "{what}: row 0");
        }
    }
}

#[test]
fn embedding_copies_the_rows_of_the_ids() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let dtype = DType::BF16;
    let (vocab, width) = (10, 72);
    let table = rounded(dtype, &random(&mut rng, vocab * width, 1.0));
    let ids = [3, 0, 9, 3];
    let out = launch(
        dtype,
        "embedding",
        [ids.len() as u32, 1, 1],
        32,
        vec![i32_bytes(&ids), dtype.encode(&table), vec![0; ids.len() * width * 4]],
        &with_buffers(3, [Arg::I32(width as i32)]),
    );
    let want: Vec<f32> =
        ids.iter().flat_map(|&i| table[i as usize * width..][..width].to_vec()).collect();
    assert_close(&f32s(&out[2]), &want, 0.0, "embedding");
}

#[test]
fn silu_mul_in_chunks_and_element_by_element() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // Widths of whole 16-byte chunks (vector accesses) and not (the element path, with a
    // partial last chunk); fewer grid rows than rows, so that rows loop.
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 8e-3)] {
        for (rows, width, grid_rows) in [(3, 40, 3), (5, 40, 2), (3, 36, 2), (2, 7, 1)] {
            let gate_up = rounded(dtype, &random(&mut rng, rows * 2 * width, 3.0));
            let chunk = 16 / dtype.size();
            let blocks = width.div_ceil(chunk).div_ceil(2) as u32;
            let out = launch(
                dtype,
                "silu_mul",
                [blocks, grid_rows, 1],
                2,
                vec![dtype.encode(&gate_up), vec![0; rows * width * dtype.size()]],
                &with_buffers(2, [Arg::I32(width as i32), Arg::I32(rows as i32)]),
            );
            assert_close(
                &elems(dtype, &out[1]),
                &cpu::silu_mul_packed(&gate_up, width),
                tolerance,
                &format!("silu_mul {} rows {rows} width {width}", dtype.name()),
            );
        }
    }
}

/// Runs prefill attention kernel `name` for the tokens of one sequence from position
/// `start` on (one query row each in `q`), in tiles of `tile`, over `kv` (the cache's K and
/// V bytes in the kernel's format); returns the buffers (the output is the fourth).
#[allow(clippy::too_many_arguments)]
fn launch_prefill(
    dtype: DType,
    (name, tile): (&str, usize),
    q: &[f32],
    kv: (Vec<u8>, Vec<u8>),
    shape: AttentionShape,
    (cache, block_size): (&PagedCache, usize),
    start: usize,
) -> Vec<Vec<u8>> {
    let tokens = q.len() / (shape.num_heads * shape.head_dim);
    let len = start + tokens;
    let mut tiles = Vec::new();
    for first in (0..tokens).step_by(tile) {
        tiles.extend([first as i32, (tokens - first).min(tile) as i32]);
    }
    // As the engine launches them: the tensor-core kernel with static shared memory only.
    let shared =
        if name.contains("_mma") { 0 } else { probe::prefill_shared_bytes(shape.head_dim) };
    launch_with_shared(
        dtype,
        name,
        ([(tiles.len() / 2) as u32, shape.num_heads as u32, 1], 128, shared as u32),
        vec![
            dtype.encode(q),
            kv.0,
            kv.1,
            vec![0; q.len() * dtype.size()],
            i32_bytes(&tiles),
            i32_bytes(&vec![0; tokens]),
            i32_bytes(&(start as i32..len as i32).collect::<Vec<_>>()),
            i32_bytes(&cache.block_tables),
        ],
        &with_buffers(
            8,
            [
                Arg::I32(cache.max_blocks as i32),
                Arg::I32(block_size as i32),
                Arg::I32(shape.num_heads as i32),
                Arg::I32(shape.num_kv_heads as i32),
                Arg::I32(shape.head_dim as i32),
                Arg::F32(1.0 / (shape.head_dim as f32).sqrt()),
            ],
        ),
    )
}

/// Runs decode attention kernel `name` for one query token of each of `lens` sequences
/// (3) over `kv` (the cache's K and V bytes, in the kernel's format) with (splits,
/// partition); returns the buffers as the kernel left them (the output is the fourth).
#[allow(clippy::too_many_arguments)]
fn launch_decode(
    dtype: DType,
    name: &str,
    q: &[f32],
    kv: (Vec<u8>, Vec<u8>),
    lens: &[usize; 3],
    shape: AttentionShape,
    heads_per_block: usize,
    (cache, block_size): (&PagedCache, usize),
    (splits, partition): (usize, i32),
) -> Vec<Vec<u8>> {
    let heads = shape.num_heads;
    // As the engine launches them: the tensor-core kernel with static shared memory only.
    let shared = if name.contains("_mma") {
        0
    } else {
        probe::decode_shared_bytes(shape.head_dim, dtype.size())
    };
    launch_with_shared(
        dtype,
        name,
        ([lens.len() as u32, (heads / heads_per_block) as u32, splits as u32], 128, shared as u32),
        vec![
            dtype.encode(q),
            kv.0,
            kv.1,
            vec![0; q.len() * dtype.size()],
            vec![0; lens.len() * heads * splits * (shape.head_dim + 2) * 4],
            vec![0; lens.len() * heads * 4],
            i32_bytes(&[0, 1, 2]),
            i32_bytes(&[0, 1, 2]),
            i32_bytes(&lens.map(|l| l as i32 - 1)),
            i32_bytes(&cache.block_tables),
        ],
        &with_buffers(
            10,
            [
                Arg::I32(cache.max_blocks as i32),
                Arg::I32(block_size as i32),
                Arg::I32(heads as i32),
                Arg::I32(shape.num_kv_heads as i32),
                Arg::I32(shape.head_dim as i32),
                Arg::F32(1.0 / (shape.head_dim as f32).sqrt()),
                Arg::I32(partition),
                Arg::I32(splits as i32),
            ],
        ),
    )
}

/// K/V of `len` positions per sequence scattered over the blocks of a paged cache.
struct PagedCache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Per sequence, its contiguous K and V ([len, kv_width]) for the CPU reference.
    contiguous: Vec<(Vec<f32>, Vec<f32>)>,
    block_tables: Vec<i32>,
    max_blocks: usize,
}

fn paged_cache(
    rng: &mut ChaCha8Rng,
    dtype: DType,
    lens: &[usize],
    kv_width: usize,
    block_size: usize,
) -> PagedCache {
    let max_blocks = lens.iter().map(|l| l.div_ceil(block_size)).max().unwrap();
    let total_blocks = lens.len() * max_blocks + 3;
    // Blocks handed out in a shuffled order, so no table is contiguous.
    let mut order: Vec<usize> = (0..total_blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut k = vec![0f32; total_blocks * block_size * kv_width];
    let mut v = k.clone();
    let mut block_tables = vec![0i32; lens.len() * max_blocks];
    let mut contiguous = Vec::new();
    let mut next = 0;
    for (s, &len) in lens.iter().enumerate() {
        let seq_k = rounded(dtype, &random(rng, len * kv_width, 1.0));
        let seq_v = rounded(dtype, &random(rng, len * kv_width, 1.0));
        for b in 0..len.div_ceil(block_size) {
            block_tables[s * max_blocks + b] = order[next] as i32;
            next += 1;
        }
        for p in 0..len {
            let block = block_tables[s * max_blocks + p / block_size] as usize;
            let row = block * block_size + p % block_size;
            k[row * kv_width..][..kv_width].copy_from_slice(&seq_k[p * kv_width..][..kv_width]);
            v[row * kv_width..][..kv_width].copy_from_slice(&seq_v[p * kv_width..][..kv_width]);
        }
        contiguous.push((seq_k, seq_v));
    }
    PagedCache { k, v, contiguous, block_tables, max_blocks }
}

/// The CUDA-core decode's cases, (shape, query heads a block takes): a head a block; a block
/// per K/V head; the most a block takes (8 of a group of 16); and head sizes whose rows are
/// not whole 16-byte chunks in bf16 (element by element).
const DECODE_CASES: [(AttentionShape, usize); 5] = [
    (AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 64 }, 1),
    (AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 64 }, 2),
    (AttentionShape { num_heads: 16, num_kv_heads: 1, head_dim: 128 }, 8),
    (AttentionShape { num_heads: 8, num_kv_heads: 2, head_dim: 36 }, 4),
    (AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 18 }, 2),
];
/// Their sequences' lengths in keys (over several blocks of 16, and a split's worth).
const DECODE_LENS: [usize; 3] = [300, 45, 129];

#[test]
fn decode_attention_over_paged_blocks_with_and_without_key_splits() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (cases, lens, block_size) = (DECODE_CASES, DECODE_LENS, 16);
    for (shape, heads_per_block) in cases {
        let kv_width = shape.num_kv_heads * shape.head_dim;
        for dtype in [DType::F32, DType::BF16] {
            let cache = paged_cache(&mut rng, dtype, &lens, kv_width, block_size);
            let q_width = shape.num_heads * shape.head_dim;
            let q = rounded(dtype, &random(&mut rng, lens.len() * q_width, 1.0));
            let mut want = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                let (k, v) = &cache.contiguous[s];
                want.extend(cpu::causal_attention(
                    &q[s * q_width..][..q_width],
                    k,
                    v,
                    len - 1,
                    shape,
                ));
            }
            // One split; splits of 128 keys (the longest sequence needs three); then
            // partition 0, as CUDA graphs launch it: each sequence divides its own keys into
            // at most one split per 128 (300 keys: 2 of 160 and an empty one; 45 and 129:
            // one split and empty ones; with 4 splits, 300 keys still take 2).
            for (splits, partition) in [(1, 320), (3, 128), (3, 0), (4, 0), (1, 0)] {
                let heads = shape.num_heads;
                let name = format!("attention_decode_h{heads_per_block}");
                let kv = (dtype.encode(&cache.k), dtype.encode(&cache.v));
                let (blocks, split) = ((&cache, block_size), (splits, partition));
                let out = launch_decode(
                    dtype,
                    &name,
                    &q,
                    kv,
                    &lens,
                    shape,
                    heads_per_block,
                    blocks,
                    split,
                );
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
                let what = format!(
                    "{} heads / {} K/V heads of {}, {heads_per_block} a block, {} with {splits} \
                     splits of {partition}",
                    heads,
                    shape.num_kv_heads,
                    shape.head_dim,
                    dtype.name()
                );
                assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), tolerance, &what);
                // The split counters are zero again for the next call.
                assert!(out[5].iter().all(|&b| b == 0), "{what}: counters left set");
            }
        }
    }
}

#[test]
fn prefill_attention_over_tiles_of_a_chunk() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let shape = AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 32 };
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let q_width = shape.num_heads * shape.head_dim;
    let block_size = 16;
    // One sequence of 70 positions whose last 37 are this call's tokens (a chunk after a
    // cached prefix of 33): tiles of up to 16 consecutive tokens.
    let (len, start) = (70usize, 33usize);
    for dtype in [DType::F32, DType::BF16] {
        let cache = paged_cache(&mut rng, dtype, &[len], kv_width, block_size);
        let tokens = len - start;
        let q = rounded(dtype, &random(&mut rng, tokens * q_width, 1.0));
        let (k, v) = &cache.contiguous[0];
        let want = cpu::causal_attention(&q, k, v, start, shape);
        let kv = (dtype.encode(&cache.k), dtype.encode(&cache.v));
        let out = launch_prefill(
            dtype,
            ("attention_prefill", 16),
            &q,
            kv,
            shape,
            (&cache, block_size),
            start,
        );
        let tolerance = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
        assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), tolerance, dtype.name());
    }
}

/// The tensor-core prefill (bf16, the MMA emulated): tiles of up to 64 tokens, four warps of
/// 16 queries each, over a cached prefix and a chunk, heads of 64 and 128 dims, with the
/// heads of a group sharing their K/V head.
#[test]
fn prefill_attention_on_tensor_cores() {
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let dtype = DType::BF16;
    let block_size = 16;
    // 150 positions, the last 117 this call's (tiles of 64 and 53); then a chunk of 9.
    for (shape, len, start) in [
        (AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 64 }, 150usize, 33usize),
        (AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 128 }, 75, 66),
    ] {
        let kv_width = shape.num_kv_heads * shape.head_dim;
        let q_width = shape.num_heads * shape.head_dim;
        let cache = paged_cache(&mut rng, dtype, &[len], kv_width, block_size);
        let q = rounded(dtype, &random(&mut rng, (len - start) * q_width, 1.0));
        let (k, v) = &cache.contiguous[0];
        let want = attention_f64(&q, k, v, start, shape);
        let kv = (dtype.encode(&cache.k), dtype.encode(&cache.v));
        let blocks = (&cache, block_size);
        let out =
            launch_prefill(dtype, ("attention_prefill_mma", 64), &q, kv, shape, blocks, start);
        let what = format!("attention_prefill_mma, heads of {}", shape.head_dim);
        assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), 8e-3, &what);
    }
}

/// The tensor-core decode (bf16, the MMA emulated): a block per K/V head with all the
/// heads of its group as the MMA's rows (16 of ChatGLM2's layout, 4 of InternLM2.5's, 6 of
/// a group that fills no power of two, 8 of a group of 16), over paged blocks, with one
/// split, splits of 128 and of 64 keys and each sequence's own splits (partition 0, as graphs
/// launch, here as fine as one chunk of 64 keys). Queries near zero over V far from zero give near-uniform weights and outputs far from
/// zero, where one key counted wrongly shows.
#[test]
fn decode_attention_on_tensor_cores() {
    let mut rng = ChaCha8Rng::seed_from_u64(62);
    let dtype = DType::BF16;
    let cases = [
        (AttentionShape { num_heads: 32, num_kv_heads: 2, head_dim: 128 }, 16),
        (AttentionShape { num_heads: 8, num_kv_heads: 2, head_dim: 128 }, 4),
        (AttentionShape { num_heads: 12, num_kv_heads: 2, head_dim: 64 }, 6),
        (AttentionShape { num_heads: 16, num_kv_heads: 1, head_dim: 64 }, 8),
    ];
    let (lens, block_size) = ([300usize, 45, 129], 16);
    for ((shape, heads_per_block), q_scale) in cases.into_iter().zip([1.0, 0.05, 1.0, 0.05]) {
        let kv_width = shape.num_kv_heads * shape.head_dim;
        let mut cache = paged_cache(&mut rng, dtype, &lens, kv_width, block_size);
        if q_scale < 1.0 {
            let shift = |v: &[f32]| rounded(dtype, &v.iter().map(|x| x + 2.0).collect::<Vec<_>>());
            cache.v = shift(&cache.v);
            for (_, v) in &mut cache.contiguous {
                *v = shift(v);
            }
        }
        let q_width = shape.num_heads * shape.head_dim;
        let q = rounded(dtype, &random(&mut rng, lens.len() * q_width, q_scale));
        let mut want = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let (k, v) = &cache.contiguous[s];
            want.extend(attention_f64(&q[s * q_width..][..q_width], k, v, len - 1, shape));
        }
        // Also splits of one chunk (64 keys) and each sequence's own down to one chunk.
        for (splits, partition) in [(1, 320), (3, 128), (3, 0), (5, 64), (8, 0)] {
            let kv = (dtype.encode(&cache.k), dtype.encode(&cache.v));
            let (blocks, split) = ((&cache, block_size), (splits, partition));
            let out = launch_decode(
                dtype,
                "attention_decode_mma",
                &q,
                kv,
                &lens,
                shape,
                heads_per_block,
                blocks,
                split,
            );
            let what = format!(
                "{} heads / {} K/V heads of {}, {heads_per_block} a block, {splits} splits of \
                 {partition}",
                shape.num_heads, shape.num_kv_heads, shape.head_dim
            );
            assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), 8e-3, &what);
            assert!(out[5].iter().all(|&b| b == 0), "{what}: counters left set");
        }
    }
}

/// The tensor-core decode over int8, int4 and fp8 caches: each key's heads dequantised as
/// the CUDA-core kernels do, then rounded to bf16 as they are staged, against the f64
/// reference over the dequantised K/V (group of 16 and of 4; one split, splits of one
/// chunk, and each sequence's own).
#[test]
fn decode_attention_on_tensor_cores_over_quantised_caches() {
    let mut rng = ChaCha8Rng::seed_from_u64(63);
    let dtype = DType::BF16;
    let cases = [
        (AttentionShape { num_heads: 32, num_kv_heads: 2, head_dim: 128 }, 16),
        (AttentionShape { num_heads: 8, num_kv_heads: 2, head_dim: 64 }, 4),
    ];
    let (lens, block_size) = ([300usize, 45, 129], 16);
    for format in QUANTISED_KV {
        for (shape, heads_per_block) in cases {
            let (cache, k_bytes, v_bytes) =
                quantised_paged_cache(&mut rng, dtype, format, &lens, shape, block_size);
            let q_width = shape.num_heads * shape.head_dim;
            let q = rounded(dtype, &random(&mut rng, lens.len() * q_width, 1.0));
            let mut want = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                let (k, v) = &cache.contiguous[s];
                want.extend(attention_f64(&q[s * q_width..][..q_width], k, v, len - 1, shape));
            }
            let name = format!("attention_decode_mma{}", kernel_suffix(format));
            for (splits, partition) in [(1, 320), (5, 64), (3, 0)] {
                let kv = (k_bytes.clone(), v_bytes.clone());
                let (blocks, split) = ((&cache, block_size), (splits, partition));
                let out = launch_decode(
                    dtype,
                    &name,
                    &q,
                    kv,
                    &lens,
                    shape,
                    heads_per_block,
                    blocks,
                    split,
                );
                let what = format!(
                    "{name}: {} heads / {} K/V heads of {}, {splits} splits of {partition}",
                    shape.num_heads, shape.num_kv_heads, shape.head_dim
                );
                assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), 8e-3, &what);
                assert!(out[5].iter().all(|&b| b == 0), "{what}: counters left set");
            }
        }
    }
}

/// The QKV product fused with the rotary and K/V write (a single sequence's decode) writes
/// exactly the bits of gemv_elem followed by rope_write_kv: q, and K and V in their slots
/// (none for a padding token), for both rotary modes, with and without a bias, rows read
/// 16 bytes at a time and not.
/// What `rope_write_kv` must leave for `qkv` rows (`bias` added) at `positions`, filed in
/// `slots` (-1: padding, whose K/V go nowhere): the cos/sin table the launch reads, q
/// rotated, the K and V cache rows (`cache_rows` of them, zeros where none was filed) and
/// which rows were filed.
struct RopeReference {
    freq_len: usize,
    cos_sin: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    written: Vec<bool>,
}

/// Heads of a case: (query heads, K/V heads, head_dim).
type Heads = (usize, usize, usize);

fn rope_reference(
    qkv: &[f32],
    bias: &[f32],
    positions: &[usize],
    slots: &[i32],
    (heads, kv_heads, head_dim): Heads,
    (mode, rot_dim): (i32, usize),
    cache_rows: usize,
) -> RopeReference {
    use triton_llm::model::rope;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let row_width = q_width + 2 * kv_width;
    let inv_freq = rope::inv_freq(10000.0, rot_dim);
    let mut want = RopeReference {
        freq_len: inv_freq.len(),
        cos_sin: Vec::new(),
        q: Vec::new(),
        k: vec![0f32; cache_rows * kv_width],
        v: vec![0f32; cache_rows * kv_width],
        written: vec![false; cache_rows],
    };
    for (t, &position) in positions.iter().enumerate() {
        let (cos, sin) = rope::cos_sin(&inv_freq, position);
        want.cos_sin.extend(&cos);
        want.cos_sin.extend(&sin);
        let mut row: Vec<f32> =
            qkv[t * row_width..][..row_width].iter().zip(bias).map(|(x, b)| x + b).collect();
        for head in row[..q_width + kv_width].chunks_mut(head_dim) {
            match mode {
                0 => cpu::rope_interleaved(head, &cos, &sin),
                _ => cpu::rope_rotate_half(head, &cos, &sin),
            }
        }
        want.q.extend(&row[..q_width]);
        let Ok(slot) = usize::try_from(slots[t]) else { continue };
        want.written[slot] = true;
        want.k[slot * kv_width..][..kv_width].copy_from_slice(&row[q_width..][..kv_width]);
        want.v[slot * kv_width..][..kv_width]
            .copy_from_slice(&row[q_width + kv_width..][..kv_width]);
    }
    want
}

/// `rope_write_kv`'s scalar arguments after its freq_len, up to its KV format.
fn rope_args((heads, kv_heads, head_dim): Heads, (mode, rot_dim): (i32, usize)) -> [Arg; 5] {
    [
        Arg::I32(heads as i32),
        Arg::I32(kv_heads as i32),
        Arg::I32(head_dim as i32),
        Arg::I32(mode),
        Arg::I32(rot_dim as i32),
    ]
}

/// `rope_write_kv` over `qkv` (elem bytes, `tokens` rows) with `bias` (or none) into caches
/// of `cache` bytes each (filled with `fill`), in `groups` blocks a token of `threads`;
/// returns its buffers: 2 is q, 3 and 4 the K and V caches.
#[allow(clippy::too_many_arguments)]
fn launch_rope_write_kv(
    dtype: DType,
    (qkv, bias): (Vec<u8>, Option<Vec<u8>>),
    want: &RopeReference,
    slots: &[i32],
    shape: Heads,
    rope: (i32, usize),
    (format, cache, fill): (KvFormat, usize, u8),
    (groups, threads): (usize, u32),
) -> Vec<Vec<u8>> {
    let tokens = slots.len();
    let q_bytes = tokens * shape.0 * shape.2 * dtype.size();
    let mut args = vec![Arg::Buffer(0), if bias.is_some() { Arg::Buffer(1) } else { Arg::Null }];
    args.extend((2..7).map(Arg::Buffer));
    args.push(Arg::I32(want.freq_len as i32));
    args.extend(rope_args(shape, rope));
    args.push(Arg::I32(format.kernel_code()));
    launch(
        dtype,
        "rope_write_kv",
        [tokens as u32, groups as u32, 1],
        threads,
        vec![
            qkv,
            bias.unwrap_or_default(),
            vec![0; q_bytes],
            vec![fill; cache],
            vec![fill; cache],
            i32_bytes(slots),
            f32_bytes(&want.cos_sin),
        ],
        &args,
    )
}

#[test]
fn gemv_qkv_rope_writes_what_the_product_then_rope_write_kv_write() {
    let mut rng = ChaCha8Rng::seed_from_u64(64);
    let cache_rows = 6;
    for (heads, kv_heads, head_dim, k) in [(4, 2, 16, 64), (2, 1, 32, 70), (6, 2, 16, 128)] {
        let shape = (heads, kv_heads, head_dim);
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let n = q_width + 2 * kv_width;
        for (m, positions, slots) in
            [(1usize, vec![9usize], vec![4i32]), (3, vec![3, 130, 0], vec![1, 5, -1])]
        {
            for rope in [(0, head_dim / 2), (1, head_dim)] {
                for (dtype, with_bias) in
                    [(DType::F32, true), (DType::BF16, true), (DType::BF16, false)]
                {
                    let x = rounded(dtype, &random(&mut rng, m * k, 1.0));
                    let w = rounded(dtype, &random(&mut rng, n * k, 0.2));
                    let bias = rounded(dtype, &random(&mut rng, n, 0.5));
                    // Only its cos/sin table is used here.
                    let table = rope_reference(
                        &vec![0.0; m * n],
                        &bias,
                        &positions,
                        &slots,
                        shape,
                        rope,
                        cache_rows,
                    );
                    let e = dtype.size();
                    let cache = cache_rows * kv_width * e;
                    // The two kernels: the product (no bias: rope_write_kv adds it), then
                    // the rotary and K/V write.
                    let qkv = launch(
                        dtype,
                        "gemv_elem",
                        [n as u32, 1, 1],
                        128,
                        vec![dtype.encode(&x), dtype.encode(&w), vec![], vec![0; m * n * e]],
                        &[
                            Arg::Buffer(0),
                            Arg::Buffer(1),
                            Arg::Null,
                            Arg::Buffer(3),
                            Arg::I32(m as i32),
                            Arg::I32(n as i32),
                            Arg::I32(k as i32),
                        ],
                    )
                    .swap_remove(3);
                    let apart = launch_rope_write_kv(
                        dtype,
                        (qkv, with_bias.then(|| dtype.encode(&bias))),
                        &table,
                        &slots,
                        shape,
                        rope,
                        (KvFormat::Model, cache, 0xee),
                        (heads + 2 * kv_heads, 64),
                    );
                    // Fused: the bias is buffer 2, or absent.
                    let mut args = vec![
                        Arg::Buffer(0),
                        Arg::Buffer(1),
                        if with_bias { Arg::Buffer(2) } else { Arg::Null },
                    ];
                    args.extend((3..8).map(Arg::Buffer));
                    args.push(Arg::I32(table.freq_len as i32));
                    args.push(Arg::I32(m as i32));
                    args.extend(rope_args(shape, rope));
                    args.push(Arg::I32(k as i32));
                    let fused = launch(
                        dtype,
                        "gemv_qkv_rope",
                        [(n / 2) as u32, 1, 1],
                        128,
                        vec![
                            dtype.encode(&x),
                            dtype.encode(&w),
                            dtype.encode(&bias),
                            vec![0; m * q_width * e],
                            vec![0xee; cache],
                            vec![0xee; cache],
                            i32_bytes(&slots),
                            f32_bytes(&table.cos_sin),
                        ],
                        &args,
                    );
                    let what = format!(
                        "{heads} heads / {kv_heads} of {head_dim}, k {k}, {m} tokens, rotary \
                         {rope:?} {}, bias {with_bias}",
                        dtype.name()
                    );
                    assert!(fused[3] == apart[2], "{what}: q differs");
                    assert!(fused[4] == apart[3], "{what}: K cache differs");
                    assert!(fused[5] == apart[4], "{what}: V cache differs");
                    // Written where the slots say, and nowhere else.
                    let row = kv_width * e;
                    for (r, kv_row) in fused[4].chunks_exact(row).enumerate() {
                        let filed = slots.contains(&(r as i32));
                        assert_eq!(kv_row.iter().all(|&b| b == 0xee), !filed, "{what}: row {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn rope_write_kv_rotates_q_and_k_and_files_k_and_v_in_their_slots() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shape @ (heads, kv_heads, head_dim) = (2, 1, 16);
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let row_width = q_width + 2 * kv_width;
    // The last token is padding (slot -1): its q is rotated, its K/V go nowhere.
    let positions = [7usize, 0, 130, 0];
    let slots = [5i32, 0, 9, -1];
    let cache_rows = 12;
    // Mode 0: GLM's interleaved pairs over the first half of a head; mode 1: rotate half.
    for rope in [(0, head_dim / 2), (1, head_dim)] {
        for dtype in [DType::F32, DType::BF16] {
            let qkv = rounded(dtype, &random(&mut rng, positions.len() * row_width, 1.0));
            let bias = rounded(dtype, &random(&mut rng, row_width, 0.5));
            let want = rope_reference(&qkv, &bias, &positions, &slots, shape, rope, cache_rows);
            // A block per head and token (decode), per token (prompts; 32 threads walk the
            // token's 4 heads × 8 pairs in turns), and heads in uneven groups (3 of 2, 2, 0).
            for launch_shape in [(heads + 2 * kv_heads, 64), (1, 32), (3, 16)] {
                let out = launch_rope_write_kv(
                    dtype,
                    (dtype.encode(&qkv), Some(dtype.encode(&bias))),
                    &want,
                    &slots,
                    shape,
                    rope,
                    (KvFormat::Model, cache_rows * kv_width * dtype.size(), 0),
                    launch_shape,
                );
                let tolerance = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
                let what = format!("rotary {rope:?} {}, blocks {launch_shape:?}", dtype.name());
                assert_close(&elems(dtype, &out[2]), &rounded(dtype, &want.q), tolerance, &what);
                assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want.k), tolerance, &what);
                assert_close(&elems(dtype, &out[4]), &rounded(dtype, &want.v), 0.0, &what);
            }
        }
    }
}

/// `rows` rows of `kv_heads` heads of `head_dim` f32 values each, as a cache in `format`
/// stores them: the model's type (`dtype`), or each head quantised by `kv_quant` (the CPU
/// path's cache rows, byte for byte).
fn cache_bytes(dtype: DType, format: KvFormat, values: &[f32], head_dim: usize) -> Vec<u8> {
    if format == KvFormat::Model {
        return dtype.encode(values);
    }
    let head = kv_quant::head_bytes(head_dim, format);
    let mut out = vec![0u8; values.len() / head_dim * head];
    for (o, x) in out.chunks_exact_mut(head).zip(values.chunks_exact(head_dim)) {
        kv_quant::quantize_head(x, format, o);
    }
    out
}

/// What a cache in `format` gives back for `values` (quantised: the dequantised heads).
fn cache_values(format: KvFormat, values: &[f32], head_dim: usize) -> Vec<f32> {
    if format == KvFormat::Model {
        return values.to_vec();
    }
    let bytes = cache_bytes(DType::F32, format, values, head_dim);
    let mut out = Vec::with_capacity(values.len());
    for head in bytes.chunks_exact(kv_quant::head_bytes(head_dim, format)) {
        kv_quant::dequantize_head(head, head_dim, format, &mut out);
    }
    out
}

/// The KV cache's quantised formats.
const QUANTISED_KV: [KvFormat; 3] = [KvFormat::Int8, KvFormat::Int4, KvFormat::Fp8];

fn kernel_suffix(format: KvFormat) -> &'static str {
    match format {
        KvFormat::Model => "",
        KvFormat::Int8 => "_int8",
        KvFormat::Int4 => "_int4",
        KvFormat::Fp8 => "_fp8",
    }
}

/// The scales and zeros of quantised heads round to f16 exactly as `half` does (the CPU
/// path's): nearest even, subnormals, the largest finite value and overflow to infinity.
#[test]
fn f32_to_half_bits_rounds_as_the_half_crate() {
    use half::f16;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        -65504.0,
        65519.996,
        65520.0,
        1e6,
        -1e30,
        6.1035156e-5,
        6.097555e-5,
        5.9604645e-8,
        2.9802322e-8,
        2.9802326e-8,
        8.940697e-8,
        1e-10,
        -3.0e-6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        f32::MAX,
    ];
    // Halfway cases between neighbouring f16 values, normal and subnormal, both ways.
    for bits in [0x0001u16, 0x0002, 0x03ff, 0x0400, 0x3c00, 0x3c01, 0x7bfe, 0x8001, 0xbc01] {
        let a = f64::from(f16::from_bits(bits).to_f32());
        let b = f64::from(f16::from_bits(bits + 1).to_f32());
        values.push(((a + b) / 2.0) as f32);
    }
    // Any bit pattern (NaNs included), and values around f16's range.
    values.extend((0..20_000).map(|_| f32::from_bits(rng.random::<u32>())));
    values.extend((0..20_000).map(|_| {
        let exponent = rng.random_range(-30..18);
        (rng.random::<f32>() * 2.0 - 1.0) * 2f32.powi(exponent)
    }));
    let n = values.len();
    let out = launch(
        DType::F32,
        "f32_to_half_bits",
        [1, 1, 1],
        32,
        vec![f32_bytes(&values), vec![0; n * 2], vec![0; n * 4]],
        &with_buffers(3, [Arg::I32(n as i32)]),
    );
    let back = f32s(&out[2]);
    for (i, (&x, bits)) in values.iter().zip(out[1].chunks_exact(2)).enumerate() {
        let got = u16::from_le_bytes([bits[0], bits[1]]);
        let want = f16::from_f32(x);
        if x.is_nan() {
            assert!(f16::from_bits(got).is_nan() && back[i].is_nan(), "{x}: {got:#06x}");
            continue;
        }
        assert_eq!(got, want.to_bits(), "{x:e} ({:#010x})", x.to_bits());
        assert_eq!(back[i].to_bits(), want.to_f32().to_bits(), "{x:e} back");
    }
}

/// A quantised cache gets, per token and K/V head, exactly the bytes the CPU path stores
/// (`kv_quant::quantize_head` of the f32 values after bias and rotation, never rounded to
/// the model's type first), whichever warps and blocks take the heads; q is as with an
/// elem cache.
#[test]
fn rope_write_kv_quantises_each_k_and_v_head_as_the_cpu_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // The last token is padding (slot -1): its q is rotated, its K/V go nowhere.
    let positions = [7usize, 0, 130, 3];
    let slots = [5i32, 0, 9, -1];
    let cache_rows = 12;
    // Heads of 16 (a lane a pair, most lanes idle), 128 (two pairs a lane) and 36.
    for shape @ (heads, kv_heads, head_dim) in [(2, 1, 16), (4, 2, 128), (4, 2, 36)] {
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let row_width = q_width + 2 * kv_width;
        for rope in [(0, head_dim / 2), (1, head_dim)] {
            for dtype in [DType::F32, DType::BF16] {
                let mut qkv = random(&mut rng, positions.len() * row_width, 1.0);
                let mut bias = random(&mut rng, row_width, 0.5);
                // Token 0's last V head is all zeros (scale 0, levels 0); token 2's first
                // V head reaches below f16's range (its zero is clamped to -65504).
                let last_v = q_width + kv_width + (kv_heads - 1) * head_dim;
                bias[last_v..last_v + head_dim].fill(0.0);
                qkv[last_v..last_v + head_dim].fill(0.0);
                qkv[2 * row_width + q_width + kv_width + 3] = -1e5;
                let (qkv, bias) = (rounded(dtype, &qkv), rounded(dtype, &bias));
                let want = rope_reference(&qkv, &bias, &positions, &slots, shape, rope, cache_rows);
                let all_heads = heads + 2 * kv_heads;
                for format in QUANTISED_KV {
                    let row_bytes = format.bytes_per_token(kv_heads, head_dim, dtype.size());
                    // Rows never written stay as they were (0xee).
                    let cache_want = |values: &[f32]| {
                        let mut bytes = cache_bytes(dtype, format, values, head_dim);
                        for (row, &w) in bytes.chunks_exact_mut(row_bytes).zip(&want.written) {
                            if !w {
                                row.fill(0xee);
                            }
                        }
                        bytes
                    };
                    let (k_bytes, v_bytes) = (cache_want(&want.k), cache_want(&want.v));
                    // A block per head and token (decode), per token (prompts; 8 warps for
                    // all heads), and heads in uneven groups of one warp.
                    for launch_shape in [(all_heads, 64), (1, 256), (3, 32)] {
                        let out = launch_rope_write_kv(
                            dtype,
                            (dtype.encode(&qkv), Some(dtype.encode(&bias))),
                            &want,
                            &slots,
                            shape,
                            rope,
                            (format, cache_rows * row_bytes, 0xee),
                            launch_shape,
                        );
                        let what = format!(
                            "{format:?} heads of {head_dim}, rotary {rope:?} {}, blocks \
                             {launch_shape:?}",
                            dtype.name()
                        );
                        let tolerance = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
                        assert_close(
                            &elems(dtype, &out[2]),
                            &rounded(dtype, &want.q),
                            tolerance,
                            &what,
                        );
                        assert!(out[3] == k_bytes, "{what}: K rows differ from the CPU's");
                        assert!(out[4] == v_bytes, "{what}: V rows differ from the CPU's");
                    }
                }
            }
        }
    }
}

/// K/V of `len` positions per sequence in a paged cache of `format`, and per sequence the
/// values it gives back (dequantised) for the reference.
fn quantised_paged_cache(
    rng: &mut ChaCha8Rng,
    dtype: DType,
    format: KvFormat,
    lens: &[usize],
    shape: AttentionShape,
    block_size: usize,
) -> (PagedCache, Vec<u8>, Vec<u8>) {
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let mut cache = paged_cache(rng, dtype, lens, kv_width, block_size);
    for (k, v) in &mut cache.contiguous {
        *k = cache_values(format, k, shape.head_dim);
        *v = cache_values(format, v, shape.head_dim);
    }
    let k = cache_bytes(dtype, format, &cache.k, shape.head_dim);
    let v = cache_bytes(dtype, format, &cache.v, shape.head_dim);
    (cache, k, v)
}

/// Decode attention over int8, int4 and fp8 caches: every head-group kernel, rows read a
/// word at a time (heads of 64 and 128) and a byte at a time (36: int4 heads of 22 bytes;
/// 18: heads of 13 and 22 bytes), with and without key splits, against the reference over
/// the dequantised K/V.
#[test]
fn decode_attention_over_quantised_caches() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (cases, lens, block_size) = (DECODE_CASES, DECODE_LENS, 16);
    for format in QUANTISED_KV {
        for (shape, heads_per_block) in cases {
            for dtype in [DType::F32, DType::BF16] {
                let (cache, k_bytes, v_bytes) =
                    quantised_paged_cache(&mut rng, dtype, format, &lens, shape, block_size);
                let q_width = shape.num_heads * shape.head_dim;
                let q = rounded(dtype, &random(&mut rng, lens.len() * q_width, 1.0));
                let mut want = Vec::new();
                for (s, &len) in lens.iter().enumerate() {
                    let (k, v) = &cache.contiguous[s];
                    want.extend(attention_f64(&q[s * q_width..][..q_width], k, v, len - 1, shape));
                }
                for (splits, partition) in [(1, 320), (3, 128), (3, 0)] {
                    let heads = shape.num_heads;
                    let name =
                        format!("attention_decode{}_h{heads_per_block}", kernel_suffix(format));
                    let kv = (k_bytes.clone(), v_bytes.clone());
                    let (blocks, split) = ((&cache, block_size), (splits, partition));
                    let out = launch_decode(
                        dtype,
                        &name,
                        &q,
                        kv,
                        &lens,
                        shape,
                        heads_per_block,
                        blocks,
                        split,
                    );
                    let tolerance = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
                    let what = format!(
                        "{name} {heads} heads / {} K/V heads of {}, {} with {splits} splits of \
                         {partition}",
                        shape.num_kv_heads,
                        shape.head_dim,
                        dtype.name()
                    );
                    assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), tolerance, &what);
                    assert!(out[5].iter().all(|&b| b == 0), "{what}: counters left set");
                }
            }
        }
    }
}

/// Causal attention in f64 of queries at positions `start..` over contiguous K/V
/// (`[len, kv_heads · head_dim]`), as f32.
fn attention_f64(q: &[f32], k: &[f32], v: &[f32], start: usize, shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { num_heads, num_kv_heads, head_dim } = shape;
    let (q_width, kv_width) = (num_heads * head_dim, num_kv_heads * head_dim);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = Vec::with_capacity(q.len());
    for (t, q_row) in q.chunks_exact(q_width).enumerate() {
        let visible = start + t + 1;
        for h in 0..num_heads {
            let kv_h = h / (num_heads / num_kv_heads);
            let qh = &q_row[h * head_dim..][..head_dim];
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let kj = &k[j * kv_width + kv_h * head_dim..][..head_dim];
                    qh.iter().zip(kj).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..head_dim {
                let sum: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * f64::from(v[j * kv_width + kv_h * head_dim + d]))
                    .sum();
                out.push((sum / total) as f32);
            }
        }
    }
    out
}

/// Prefill attention (the CUDA-core kernel, which quantised caches always take) over int8
/// and int4 caches, a chunk after a cached prefix, against the reference over the
/// dequantised K/V.
#[test]
fn prefill_attention_over_quantised_caches() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let block_size = 16;
    let (len, start) = (70usize, 33usize);
    // Heads of 32 and 18 (int4 heads of 13 bytes: every head at an odd offset).
    for shape in [
        AttentionShape { num_heads: 2, num_kv_heads: 1, head_dim: 32 },
        AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 18 },
    ] {
        let q_width = shape.num_heads * shape.head_dim;
        for format in QUANTISED_KV {
            for dtype in [DType::F32, DType::BF16] {
                let (cache, k_bytes, v_bytes) =
                    quantised_paged_cache(&mut rng, dtype, format, &[len], shape, block_size);
                let tokens = len - start;
                let q = rounded(dtype, &random(&mut rng, tokens * q_width, 1.0));
                let (k, v) = &cache.contiguous[0];
                let want = attention_f64(&q, k, v, start, shape);
                let name = format!("attention_prefill{}", kernel_suffix(format));
                let kv = (k_bytes, v_bytes);
                let out =
                    launch_prefill(dtype, (&name, 16), &q, kv, shape, (&cache, block_size), start);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
                let what = format!("{name} heads of {} {}", shape.head_dim, dtype.name());
                assert_close(&elems(dtype, &out[3]), &rounded(dtype, &want), tolerance, &what);
            }
        }
    }
}

/// FP8: the activation-quantising kernel forms exactly the CPU path's E4M3 values and row
/// scales (`cpu::fp8`, CUDA's conversion: ties, subnormals, saturation), the E4M3 GEMV equals
/// the CPU path's `fp8` product (the same values summed in another order), dequant_fp8
/// gives the weight's E4M3 values exactly, and the E4M3 bytes for cuBLASLt are those values.
#[test]
fn fp8_kernels_form_the_cpu_paths_values() {
    use triton_llm::cpu::{Linear, fp8};
    let table = fp8::e4m3_table();
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let quantize = |dtype: DType, x: &[f32], k: usize| {
        let m = x.len() / k;
        let out = launch(
            dtype,
            "quantize_rows_e4m3",
            [m as u32, 1, 1],
            256,
            vec![dtype.encode(x), vec![0; m * k * dtype.size()], vec![0; 4 * m]],
            &with_buffers(3, [Arg::I32(k as i32)]),
        );
        (elems(dtype, &out[1]), f32s(&out[2]))
    };
    // The conversion itself: a row whose largest magnitude is 448 is converted as it is.
    let step = 2f32.powi(-9);
    let mut specials = vec![448.0, -0.0, 1.0625, 1.0626, 1.1875, -1.1875, 430.0, 440.0, 447.9];
    specials.extend([1.5 * step, 2.5 * step, 0.25 * step, 7.6 * step, 2f32.powi(-6) * 0.999]);
    specials.extend((0..240).map(|i| (i as f32 - 120.0) * 3.7 + 0.01 * i as f32));
    let k = specials.len();
    let (values, scales) = quantize(DType::F32, &specials, k);
    assert_eq!(scales, [1.0]);
    let want: Vec<f32> =
        specials.iter().map(|&v| table[usize::from(fp8::e4m3_from_f32(v))]).collect();
    for (i, (g, w)) in values.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{}: kernel {g}, CPU path {w}", specials[i]);
    }
    for dtype in [DType::F32, DType::BF16] {
        // Rows of random values, an all-zero row, and one spanning many magnitudes.
        let k = 300;
        let mut x = random(&mut rng, 3 * k, 5.0);
        x[k..2 * k].fill(0.0);
        for (i, v) in x[2 * k..].iter_mut().enumerate() {
            *v = (i as f32 - 150.0) * 1e-3 * (i % 7) as f32;
        }
        let x = rounded(dtype, &x);
        let (values, scales) = quantize(dtype, &x, k);
        let want = fp8::quantize_rows(&x, k, &table);
        assert_eq!((&values, &scales), (&want.0, &want.1), "{}", dtype.name());
        // The bytes cuBLASLt takes: those very values, with the same scales.
        let out = launch(
            dtype,
            "quantize_rows_e4m3_bytes",
            [3, 1, 1],
            256,
            vec![dtype.encode(&x), vec![0; 3 * k], vec![0; 4 * 3]],
            &with_buffers(3, [Arg::I32(k as i32)]),
        );
        let decoded: Vec<f32> = out[1].iter().map(|&b| table[usize::from(b)]).collect();
        assert_eq!(decoded, values, "{} bytes", dtype.name());
        assert_eq!(f32s(&out[2]), scales, "{} byte scales", dtype.name());
    }
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        for (m, n, k) in [(1, 5, 4096), (3, 7, 272), (8, 4, 1024), (3, 37, 320), (8, 20, 1024)] {
            let weight = random(&mut rng, n * k, 0.3);
            let w = fp8::quantize_fp8(&weight, n, k);
            // The GPU's layout: each output row's bytes in k order.
            let packed: Vec<u8> = (0..n * k).map(|i| w.q[(i % k) * n + i / k]).collect();
            let bias = rounded(dtype, &random(&mut rng, n, 1.0));
            let x = rounded(dtype, &random(&mut rng, m * k, 2.0));
            let want = Linear::from_fp8(w.clone(), Some(bias.clone()), n, k).forward(&x);
            let (xq, xscales) = quantize(dtype, &x, k);
            let run = |rows: usize| {
                let buffers = vec![
                    packed.clone(),
                    f32_bytes(&w.scales),
                    dtype.encode(&xq[..rows * k]),
                    f32_bytes(&xscales[..rows]),
                    dtype.encode(&bias),
                    vec![0; rows * n * dtype.size()],
                ];
                let args = with_buffers(
                    6,
                    [Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32(k as i32)],
                );
                launch(dtype, "gemv_fp8", [n as u32, 1, 1], 128, buffers, &args)[5].clone()
            };
            let out = run(m);
            let what = format!("gemv_fp8 {} {m}x{n}x{k}", dtype.name());
            assert_close(&elems(dtype, &out), &want, tolerance, &what);
            assert_eq!(out[..n * dtype.size()], run(1)[..], "{what}: row 0");

            // On the tensor cores (mma.m16n8k32 over E4M3, emulated): blocks of 16 rows of W,
            // the last one partial where n is not a multiple of 16; k a multiple of 64.
            if k % 64 == 0 {
                let bytes = launch(
                    dtype,
                    "quantize_rows_e4m3_bytes",
                    [m as u32, 1, 1],
                    256,
                    vec![dtype.encode(&x), vec![0; m * k], vec![0; 4 * m]],
                    &with_buffers(3, [Arg::I32(k as i32)]),
                );
                let buffers = vec![
                    packed.clone(),
                    f32_bytes(&w.scales),
                    bytes[1].clone(),
                    bytes[2].clone(),
                    dtype.encode(&bias),
                    vec![0; m * n * dtype.size()],
                ];
                let args =
                    with_buffers(6, [Arg::I32(m as i32), Arg::I32(n as i32), Arg::I32(k as i32)]);
                let grid = [n.div_ceil(16) as u32, 1, 1];
                let out = launch(dtype, "gemv_fp8_mma", grid, 256, buffers, &args);
                let what = format!("gemv_fp8_mma {} {m}x{n}x{k}", dtype.name());
                assert_close(&elems(dtype, &out[5]), &want, tolerance, &what);
            }

            let out = launch(
                dtype,
                "dequant_fp8",
                [(k / 16).div_ceil(128) as u32, n as u32, 1],
                128,
                vec![packed.clone(), vec![0; n * k * dtype.size()]],
                &with_buffers(2, [Arg::I32(k as i32)]),
            );
            let values: Vec<f32> = packed.iter().map(|&q| table[usize::from(q)]).collect();
            assert_eq!(elems(dtype, &out[1]), values, "dequant_fp8 {}", dtype.name());

            // The many-row path: the plain sums over the E4M3 values (as cuBLAS leaves them,
            // in elems), then both scales and the bias.
            let sums: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k)
                        .map(|j| f64::from(xq[r * k + j]) * f64::from(values[c * k + j]))
                        .sum::<f64>() as f32
                })
                .collect();
            let sums = rounded(dtype, &sums);
            let out = launch(
                dtype,
                "fp8_scale",
                [n.div_ceil(256) as u32, m as u32, 1],
                256,
                vec![
                    dtype.encode(&sums),
                    f32_bytes(&xscales),
                    f32_bytes(&w.scales),
                    dtype.encode(&bias),
                ],
                &with_buffers(4, [Arg::I32(n as i32)]),
            );
            let want: Vec<f32> = (0..m * n)
                .map(|i| sums[i] * (xscales[i / n] * w.scales[i % n]) + bias[i % n])
                .collect();
            assert_eq!(elems(dtype, &out[0]), rounded(dtype, &want), "fp8_scale {}", dtype.name());
            let cpu = Linear::from_fp8(w.clone(), Some(bias.clone()), n, k).forward(&x);
            assert_close(&elems(dtype, &out[0]), &cpu, tolerance, "fp8_scale against the CPU path");
        }
    }
}
