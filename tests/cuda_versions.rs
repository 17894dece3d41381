//! This build's CUDA major version against the NVRTC the loader finds: one of the other
//! major is refused by name and never called (tests/gpu.rs compiles and assembles every
//! kernel with this major's). `TRITON_LLM_NVRTC_OTHER_LIB` names a folder holding the other
//! major's NVRTC (scripts/test.sh sets it; scripts/setup.sh installs both from PyPI).

use std::process::Command;

use triton_llm::dtype::DType;
use triton_llm::probe;

const CHILD: &str = "CUDA_VERSIONS_CHILD";

#[test]
fn nvrtc_of_another_major_is_refused() {
    if std::env::var_os(CHILD).is_some() {
        // The child: its loader path holds only the other major's NVRTC.
        match probe::compile_kernels(DType::F32, "compute_80") {
            Ok(_) => println!("COMPILED"),
            Err(error) => println!("REFUSED {error}"),
        }
        return;
    }
    let Some(other) = std::env::var_os("TRITON_LLM_NVRTC_OTHER_LIB") else {
        eprintln!(
            "nvrtc_of_another_major_is_refused: skipped (TRITON_LLM_NVRTC_OTHER_LIB not set)"
        );
        return;
    };
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "nvrtc_of_another_major_is_refused", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", other)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The harness prints the child's line after the test's name.
    let refusal = stdout
        .split_once("REFUSED ")
        .and_then(|(_, rest)| rest.lines().next())
        .unwrap_or_else(|| panic!("the other major's NVRTC was not refused: {stdout}"));
    let major = probe::CUDA_MAJOR;
    let other_major = if major == 13 { 12 } else { 13 };
    // Found and named (a build for 13 would otherwise load libnvrtc.so.12), or not found at
    // all (a build for 12 never looks for .13).
    let named = format!("is CUDA {other_major}.");
    let absent = format!("no nvrtc library of CUDA {major}");
    assert!(refusal.contains(&named) || refusal.contains(&absent), "{refusal}");
    assert!(refusal.contains(&format!("CUDA {major}")), "{refusal}");
}
