//! Compiled kernels kept on disk between processes, so that a server restart or a second
//! process on the machine skips NVRTC (seconds for the whole module). An entry is the PTX
//! for one source, NVRTC version, architecture and dtype; its first line names all of them,
//! and an entry whose line differs from what is asked is not used. Reading or writing the
//! cache never fails a load: anything amiss is a miss, said in the log.
//!
//! Where: `TRITON_LLM_KERNEL_CACHE` (empty or `off`: no cache), else
//! `$XDG_CACHE_HOME/triton_llm/kernels`, else `$HOME/.cache/triton_llm/kernels`.

use std::path::{Path, PathBuf};

/// The cache's folder, or None where there is none.
pub(super) fn folder() -> Option<PathBuf> {
    let home = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    match std::env::var("TRITON_LLM_KERNEL_CACHE") {
        Ok(v) if v.is_empty() || v == "off" => None,
        Ok(v) => Some(PathBuf::from(v)),
        Err(_) => home("XDG_CACHE_HOME")
            .or_else(|| home("HOME").map(|h| h.join(".cache")))
            .map(|base| base.join("triton_llm").join("kernels")),
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// An entry: its file and the line that must head it.
pub(super) struct Entry {
    path: PathBuf,
    header: String,
}

impl Entry {
    /// The entry of `source` compiled with `options` (architecture, dtype, NVRTC version and
    /// flags, as one text) in `folder`.
    pub(super) fn new(folder: &Path, source: &str, options: &str) -> Entry {
        let header = format!(
            "// triton_llm {} kernels: {options}; source {} bytes, fnv1a {:016x}",
            env!("CARGO_PKG_VERSION"),
            source.len(),
            fnv1a(source.as_bytes()),
        );
        let name = format!("{:016x}.ptx", fnv1a(header.as_bytes()));
        Entry { path: folder.join(name), header }
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    /// The PTX kept for this entry, if there is one whole and for exactly this entry.
    pub(super) fn read(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let (header, ptx) = text.split_once('\n')?;
        // PTX ends with a newline; a shorter file was cut off.
        (header == self.header && ptx.ends_with('\n')).then(|| ptx.to_string())
    }

    /// Keeps `ptx` for this entry: written beside and renamed into place, so that a reader
    /// (another process loading at the same time) sees all of an entry or none of it.
    pub(super) fn write(&self, ptx: &str) {
        let written = (|| -> std::io::Result<()> {
            let folder = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(folder)?;
            let partial = self.path.with_extension(format!("{}.partial", std::process::id()));
            std::fs::write(&partial, format!("{}\n{ptx}", self.header))?;
            std::fs::rename(&partial, &self.path).inspect_err(|_| {
                let _ = std::fs::remove_file(&partial);
            })
        })();
        if let Err(e) = written {
            tracing::info!("kernel cache: not kept at {} ({e})", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = ".version 8.5\n.target sm_90\n.visible .entry k()\n{\n\tret;\n}\n";

    #[test]
    fn an_entry_is_read_back_only_for_the_same_source_and_options() {
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry::new(dir.path(), "source", "compute_90 bf16 nvrtc 13.0");
        assert_eq!(entry.read(), None);
        entry.write(PTX);
        assert_eq!(entry.read().as_deref(), Some(PTX));
        // Another source, options or dtype: another entry, a miss.
        for (source, options) in [
            ("source ", "compute_90 bf16 nvrtc 13.0"),
            ("source", "compute_90 f16 nvrtc 13.0"),
            ("source", "compute_90 bf16 nvrtc 13.1"),
        ] {
            let other = Entry::new(dir.path(), source, options);
            assert_ne!(other.path(), entry.path());
            assert_eq!(other.read(), None, "{source} {options}");
        }
        // No partial files are left beside.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_damaged_or_foreign_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry::new(dir.path(), "source", "compute_90 bf16");
        entry.write(PTX);
        let text = std::fs::read_to_string(entry.path()).unwrap();
        // Cut off.
        std::fs::write(entry.path(), &text[..text.len() - 3]).unwrap();
        assert_eq!(entry.read(), None);
        // Another entry's header under this name.
        std::fs::write(entry.path(), format!("// something else\n{PTX}")).unwrap();
        assert_eq!(entry.read(), None);
        // Not text.
        std::fs::write(entry.path(), [0xff, 0xfe, b'\n']).unwrap();
        assert_eq!(entry.read(), None);
        // Written again, read again.
        entry.write(PTX);
        assert_eq!(entry.read().as_deref(), Some(PTX));
    }

    #[test]
    fn a_folder_that_cannot_be_written_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a file");
        std::fs::write(&file, "").unwrap();
        // Its folder is a file: nothing is kept, nothing fails.
        let entry = Entry::new(&file.join("kernels"), "source", "compute_90 bf16");
        entry.write(PTX);
        assert_eq!(entry.read(), None);
    }
}
