//! The CUDA major version of the libraries the loader finds, checked against the one this
//! build's bindings were generated for before any of them is called.
//!
//! cudarc opens NVRTC and cuBLAS by trying a list of names in order, among them other
//! majors' (`libnvrtc.so.12` for a CUDA 13 build): a CUDA 12 library would be called through
//! CUDA 13 signatures. So each library is opened here by the same list, its version read
//! from the library itself, and one of another major refused, naming both; the driver must
//! run this major's PTX (a driver version of at least `major * 1000`).

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// The CUDA major version this build is for (cargo feature `cuda-12` or `cuda-13`).
pub const CUDA_MAJOR: i32 = if cfg!(feature = "cuda-12") { 12 } else { 13 };

#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!("choose one CUDA major version: `--no-default-features --features cuda-12`");
#[cfg(not(any(feature = "cuda-12", feature = "cuda-13")))]
compile_error!("a CUDA major version is needed: feature `cuda-13` (default) or `cuda-12`");

/// The libraries whose bindings depend on the CUDA version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLibrary {
    Nvrtc,
    Cublas,
    CublasLt,
}

impl CudaLibrary {
    fn stem(self) -> &'static str {
        match self {
            CudaLibrary::Nvrtc => "nvrtc",
            CudaLibrary::Cublas => "cublas",
            CudaLibrary::CublasLt => "cublasLt",
        }
    }
}

/// The library `cudarc` would open (the first of its candidate names that loads) and its
/// (major, minor) version, or why there is none.
fn probe(library: CudaLibrary) -> std::result::Result<(String, i32, i32), String> {
    let candidates = cudarc::get_lib_name_candidates(library.stem());
    for name in &candidates {
        // SAFETY: opening a CUDA library runs only its initialisers, as cudarc's own
        // loading of the same name would.
        let Ok(lib) = (unsafe { libloading::Library::new(name) }) else { continue };
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        let status = match library {
            CudaLibrary::Nvrtc => {
                // SAFETY: `nvrtcVersion(int *major, int *minor)` writes two ints, in every
                // NVRTC since CUDA 7.
                unsafe {
                    let version = lib
                        .get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(
                            b"nvrtcVersion\0",
                        )
                        .map_err(|e| format!("{name}: no nvrtcVersion ({e})"))?;
                    version(&mut major, &mut minor)
                }
            }
            CudaLibrary::Cublas | CudaLibrary::CublasLt => {
                let symbol: &[u8] = if library == CudaLibrary::Cublas {
                    b"cublasGetProperty\0"
                } else {
                    b"cublasLtGetProperty\0"
                };
                // SAFETY: `cublasGetProperty` and `cublasLtGetProperty(libraryPropertyType,
                // int *value)` write one int (MAJOR_VERSION = 0, MINOR_VERSION = 1), in every
                // cuBLAS(Lt) since CUDA 10.
                unsafe {
                    let property = lib
                        .get::<unsafe extern "C" fn(c_int, *mut c_int) -> c_int>(symbol)
                        .map_err(|e| format!("{name}: no version query ({e})"))?;
                    let status = property(0, &mut major);
                    if status == 0 { property(1, &mut minor) } else { status }
                }
            }
        };
        if status != 0 {
            return Err(format!("{name}: reading its version failed (status {status})"));
        }
        return Ok((name.clone(), major, minor));
    }
    Err(format!("none of {} loads", candidates.join(", ")))
}

/// What [`probe`] found for `library`, probed once per process.
fn probed(library: CudaLibrary) -> std::result::Result<(String, i32, i32), String> {
    type Found = std::result::Result<(String, i32, i32), String>;
    static FOUND: OnceLock<Mutex<HashMap<CudaLibrary, Found>>> = OnceLock::new();
    let mut found = FOUND.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    found.entry(library).or_insert_with(|| probe(library)).clone()
}

/// Ok when `library` loads and is of this build's CUDA major version; otherwise an error
/// naming what was found and what is needed.
pub fn check(library: CudaLibrary) -> Result<()> {
    verdict(library, probed(library)).map_err(Error::Device)
}

/// The (major, minor) version of `library`, where it loads.
pub fn version(library: CudaLibrary) -> Option<(i32, i32)> {
    probed(library).ok().map(|(_, major, minor)| (major, minor))
}

fn verdict(
    library: CudaLibrary,
    found: std::result::Result<(String, i32, i32), String>,
) -> std::result::Result<(), String> {
    let stem = library.stem();
    match found {
        Ok((_, major, _)) if major == CUDA_MAJOR => Ok(()),
        Ok((name, major, minor)) => Err(format!(
            "{name} is CUDA {major}.{minor}'s {stem}, but this libtriton_llm.so is built for CUDA \
             {CUDA_MAJOR}: {}",
            remedy()
        )),
        Err(why) => Err(format!("no {stem} library of CUDA {CUDA_MAJOR} ({why}): {}", remedy())),
    }
}

/// Ok when the driver runs this major's PTX: its version (`cuDriverGetVersion`, e.g. 12080
/// for CUDA 12.8) is at least `CUDA_MAJOR * 1000`.
pub fn check_driver(driver_version: i32) -> Result<()> {
    if driver_version >= CUDA_MAJOR * 1000 {
        return Ok(());
    }
    Err(Error::Device(format!(
        "the CUDA driver supports CUDA {}.{}, but this libtriton_llm.so is built for CUDA \
         {CUDA_MAJOR} (its kernels need a driver for CUDA {CUDA_MAJOR}.0 or later): {}",
        driver_version / 1000,
        driver_version % 1000 / 10,
        remedy()
    )))
}

fn remedy() -> String {
    let other = if CUDA_MAJOR == 13 { 12 } else { 13 };
    let build = if other == 12 {
        "cargo build --release --no-default-features --features cuda-12"
    } else {
        "cargo build --release"
    };
    format!(
        "put CUDA {CUDA_MAJOR}'s libraries first on the loader's path ({}), or serve with a \
         build for CUDA {other} (`{build}`)",
        if CUDA_MAJOR == 13 { "Triton 25.08 and later" } else { "Triton 24.10 to 25.07" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_major_is_refused_naming_both() {
        let other = if CUDA_MAJOR == 13 { 12 } else { 13 };
        let found = Ok((format!("libnvrtc.so.{other}"), other, 6));
        let message = verdict(CudaLibrary::Nvrtc, found).unwrap_err();
        assert!(message.starts_with(&format!("libnvrtc.so.{other} is CUDA {other}.6's nvrtc")));
        assert!(message.contains(&format!("built for CUDA {CUDA_MAJOR}")), "{message}");
        let same = Ok(("libcublas.so".to_string(), CUDA_MAJOR, 0));
        assert!(verdict(CudaLibrary::Cublas, same).is_ok());
        let missing = verdict(CudaLibrary::Cublas, Err("none of a, b loads".into())).unwrap_err();
        assert!(missing.starts_with(&format!("no cublas library of CUDA {CUDA_MAJOR}")));
    }

    #[test]
    fn the_driver_must_run_this_majors_ptx() {
        assert!(check_driver(CUDA_MAJOR * 1000).is_ok());
        assert!(check_driver(CUDA_MAJOR * 1000 + 20).is_ok());
        let message = check_driver((CUDA_MAJOR - 1) * 1000 + 80).unwrap_err().to_string();
        assert!(message.contains(&format!("supports CUDA {}.8", CUDA_MAJOR - 1)), "{message}");
    }
}
