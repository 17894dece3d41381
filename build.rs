//! Generates the Rust declarations of the Triton C API from our own headers in
//! `triton_headers/` (bindgen, parsed as C++: in C mode clang rejects the headers'
//! struct-less type names). Nothing is linked: the symbols resolve at dlopen time against
//! the libtritonserver the tritonserver process has already loaded.

use std::env;
use std::path::PathBuf;

fn main() {
    let header = "triton_headers/triton_backend_api.h";
    println!("cargo:rerun-if-changed={header}");
    let bindings = bindgen::Builder::default()
        .header(header)
        .clang_args(["-x", "c++", "-std=c++11"])
        .allowlist_function("TRITON(BACKEND|SERVER)_.*")
        .allowlist_type("TRITON(BACKEND|SERVER)_.*")
        .allowlist_var("TRITON(BACKEND|SERVER)_.*")
        // The entry points are ours to define (src/triton/entry.rs), not to import.
        .blocklist_function(
            "TRITONBACKEND_(Initialize|Finalize|ModelInitialize|ModelFinalize|\
             ModelInstanceInitialize|ModelInstanceFinalize|ModelInstanceExecute)",
        )
        .prepend_enum_name(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {header} (is libclang-dev installed?): {e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings.write_to_file(out.join("triton_bindings.rs")).expect("writing the generated bindings");
}
