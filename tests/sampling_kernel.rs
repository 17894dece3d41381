//! The GPU's batched sampling kernel (kernels/sampling.cu) against its definition,
//! `sampling::choose`, without a GPU: the kernel's source runs on CPU threads, one
//! per CUDA thread (tests/kernel_host/), so its block-wide logic (radix selects, scans, the
//! draw) is checked on every machine. tests/gpu.rs runs the same comparison on a device.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use triton_llm::sampling::SampleRow;
use triton_llm::sampling::choose;

/// Words of a row's parameters (SAMPLE_WORDS in the kernel).
const WORDS: usize = 10;

struct Row {
    logits: Vec<f32>,
    width: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    penalty: f32,
    penalized: Vec<u32>,
    uniform: f32,
    guard: bool,
    active: bool,
}

impl Row {
    fn sample_row(&self) -> SampleRow<'_> {
        SampleRow {
            width: self.width,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.penalty,
            penalized: &self.penalized,
            uniform: self.uniform,
            guard_invalid_scores: self.guard,
            banned: &[],
        }
    }
}

/// The harness, compiled once for the tests of this file.
fn harness() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(compile_harness).clone()
}

/// With KERNELS_ON_CPU_SANITIZE set: AddressSanitizer and UBSan, every report fatal (a
/// kernel reading past a buffer or its shared memory fails the test, as compute-sanitizer's
/// memcheck would fail it on a device).
const SANITIZE: [&str; 4] =
    ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"];

fn compile_harness() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run_sampling");
    let mut command = Command::new("c++");
    command.args(["-std=c++20", "-O2", "-pthread", "-o"]).arg(&binary);
    command.arg(root.join("tests/kernel_host/run_sampling.cpp"));
    if std::env::var_os("KERNELS_ON_CPU_SANITIZE").is_some() {
        command.args(SANITIZE);
    }
    let status = command.status().expect("a C++ compiler `c++` (scripts/setup.sh installs g++)");
    assert!(status.success(), "compiling tests/kernel_host/run_sampling.cpp");
    binary
}

/// Runs the kernel over `rows` with blocks of `threads` threads; one id per row.
fn run_kernel(binary: &Path, rows: &[Row], threads: u32) -> Vec<u32> {
    let stride = rows.iter().map(|r| r.logits.len()).max().unwrap();
    let mut params = Vec::new();
    let mut penalized = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let flags = u32::from(row.active) | (u32::from(row.guard) << 1);
        let words: [u32; WORDS] = [
            i as u32,
            row.width as u32,
            flags,
            row.top_k as u32,
            row.sample_row().inv_temperature().to_bits(),
            row.top_p.to_bits(),
            row.penalty.to_bits(),
            row.uniform.to_bits(),
            penalized.len() as u32,
            row.penalized.len() as u32,
        ];
        params.extend(words);
        penalized.extend(&row.penalized);
    }
    let mut input = Vec::new();
    for word in [rows.len() as u32, stride as u32, threads, penalized.len() as u32]
        .iter()
        .chain(&params)
        .chain(&penalized)
    {
        input.extend(word.to_le_bytes());
    }
    for row in rows {
        let mut padded = row.logits.clone();
        padded.resize(stride, 1e30); // never produced: past every row's width
        input.extend(padded.iter().flat_map(|v| v.to_le_bytes()));
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sampling-{threads}.bin"));
    std::fs::write(&path, input).unwrap();
    // As kernels_on_cpu's harness: no leak checking (it needs ptrace).
    let output =
        Command::new(binary).env("ASAN_OPTIONS", "detect_leaks=0").arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect()
}

/// Rows covering every branch: greedy, top-k, top-p, both, neither, the penalty, ties at
/// the top-k and top-p boundaries, the guard, NaN and infinities, draws at 0 and near 1.
fn cases(rng: &mut ChaCha8Rng) -> Vec<Row> {
    let settings: [(f32, usize, f32, f32); 9] = [
        (0.0, 50, 0.8, 1.0),
        (0.8, 50, 0.8, 1.0),
        (1.0, 0, 0.9, 1.0),
        (0.7, 0, 1.0, 1.0),
        (1.3, 5, 1.0, 1.0),
        (0.8, 1, 0.5, 1.0),
        (0.8, 40, 0.95, 1.3),
        (0.0, 0, 1.0, 1.7),
        (0.5, 100_000, 0.3, 0.8),
    ];
    let mut rows = Vec::new();
    for &width in &[1usize, 6, 300, 4099] {
        for &(temperature, top_k, top_p, penalty) in &settings {
            for shape in 0..4 {
                let mut logits: Vec<f32> =
                    (0..width + 3).map(|_| rng.random::<f32>() * 12.0 - 6.0).collect();
                if shape == 1 {
                    // Coarse values: many ties, at the k-th best and at the top-p cut.
                    logits.iter_mut().for_each(|l| *l = (*l * 0.5).round());
                }
                if shape == 2 {
                    logits.iter_mut().for_each(|l| *l = (*l).round() * 0.25);
                }
                let uniform = match shape {
                    1 => 0.0,
                    3 => 0.999_999_9,
                    _ => rng.random::<f32>(),
                };
                let penalized: Vec<u32> = {
                    let mut ids: Vec<u32> =
                        (0..20).map(|_| rng.random_range(0..width as u32 + 8)).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                };
                rows.push(Row {
                    logits,
                    width,
                    temperature,
                    top_k,
                    top_p,
                    penalty,
                    penalized,
                    uniform,
                    guard: false,
                    active: true,
                });
            }
        }
    }
    let base = |logits: Vec<f32>, guard: bool| Row {
        width: logits.len(),
        logits,
        temperature: 0.8,
        top_k: 50,
        top_p: 0.8,
        penalty: 1.0,
        penalized: vec![],
        uniform: 0.5,
        guard,
        active: true,
    };
    let mut nan_row: Vec<f32> = (0..500).map(|i| (i as f32 * 0.1).sin()).collect();
    nan_row[77] = f32::NAN;
    rows.push(base(nan_row.clone(), true)); // the guard: id 5
    rows.push(base(nan_row.clone(), false)); // NaN ranks lowest
    rows.push(Row { temperature: 0.0, ..base(nan_row, true) });
    let mut infinite: Vec<f32> = (0..300).map(|i| (i as f32).cos()).collect();
    infinite[10] = f32::NEG_INFINITY;
    infinite[200] = f32::INFINITY;
    rows.push(base(infinite.clone(), false)); // no finite weight: the best
    infinite[200] = 2.0;
    rows.push(Row { top_k: 0, top_p: 1.0, ..base(infinite, false) });
    rows.push(Row { active: false, ..base(vec![1.0; 10], false) });
    // More tokens tied at the k-th key than the kernel gathers (SAMPLE_CANDIDATES, 1,024):
    // the whole row is weighed instead.
    let two_levels: Vec<f32> = (0..3000).map(|i| if i % 3 == 0 { 0.5 } else { 1.0 }).collect();
    rows.push(Row { top_k: 5, top_p: 0.9, uniform: 0.37, ..base(two_levels.clone(), false) });
    rows.push(Row { top_k: 5, top_p: 1.0, uniform: 0.999, ..base(two_levels, false) });
    rows
}

#[test]
fn the_sampling_kernel_chooses_as_the_host_sampler() {
    let binary = harness();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let rows = cases(&mut rng);
    let want: Vec<u32> =
        rows.iter()
            .map(|row| {
                if row.active {
                    choose(&mut row.logits.clone(), &row.sample_row())
                } else {
                    u32::MAX
                }
            })
            .collect();
    for threads in [32, 128] {
        let got = run_kernel(&binary, &rows, threads);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let r = &rows[i];
            assert_eq!(
                g, w,
                "{threads} threads, row {i}: width {} temperature {} top_k {} top_p {} \
                 penalty {} uniform {}",
                r.width, r.temperature, r.top_k, r.top_p, r.penalty, r.uniform
            );
        }
    }
}

#[test]
fn a_full_block_samples_a_real_vocabulary() {
    // The engine's launch: 512 threads over ChatGLM2's 65,024 producible ids of 65,024.
    let binary = harness();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let rows: Vec<Row> = [(0.0, 50, 0.8), (0.8, 50, 0.8), (1.0, 0, 0.95)]
        .iter()
        .map(|&(temperature, top_k, top_p)| Row {
            logits: (0..65024).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect(),
            width: 65024,
            temperature,
            top_k,
            top_p,
            penalty: 1.1,
            penalized: (0..300).map(|i| i * 211).collect(),
            uniform: rng.random(),
            guard: true,
            active: true,
        })
        .collect();
    let want: Vec<u32> =
        rows.iter().map(|row| choose(&mut row.logits.clone(), &row.sample_row())).collect();
    assert_eq!(run_kernel(&binary, &rows, 512), want);
}
