//! The checkpoint directory: writing parts and manifests atomically,
//! listing, verifying and choosing the checkpoint to restore.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{
    CheckpointError, CheckpointSpec, FORMAT_VERSION, MANIFEST, Manifest, PartInfo, WorkerPart,
};

/// The first bytes of a part file.
const MAGIC: &[u8; 8] = b"DIMACKPT";

/// A checkpoint directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// One entry of a checkpoint directory, as `dima checkpoints list` shows it.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The checkpoint's id.
    pub id: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Its manifest, when it has one that parses.
    pub manifest: Option<Manifest>,
    /// Whether it is complete: a manifest, and every part of the size and
    /// checksum the manifest gives.
    pub complete: bool,
    /// The bytes of its files.
    pub bytes: u64,
    /// Why it is not complete.
    pub problem: Option<String>,
}

/// The checkpoint chosen for a restore.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Its directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

fn io(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(path, e)
    })
}

impl Store {
    /// The store at `dir`, created if needed; refused when it cannot be
    /// written.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, format!("cannot create it: {e}")))?;
        let probe = dir.join(format!(".write-test-{}", std::process::id()));
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"dima").and_then(|()| f.sync_all()))
            .map_err(|e| io(dir, format!("cannot write in it: {e}")))?;
        let _ = fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The store at `dir`, for reading only.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checkpoint `id`'s directory.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:010}"))
    }

    /// The ids of the checkpoint directories present, oldest first.
    fn ids(&self) -> Result<Vec<u64>, CheckpointError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir, e)),
        };
        let mut ids: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The id the next checkpoint gets.
    pub fn next_id(&self) -> Result<u64, CheckpointError> {
        Ok(self.ids()?.last().map_or(1, |id| id + 1))
    }

    /// Writes worker `part.worker`'s part of checkpoint `id`.
    pub fn write_part(&self, id: u64, part: &WorkerPart) -> Result<PartInfo, CheckpointError> {
        let dir = self.path(id);
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let file = format!("worker-{}.part", part.worker);
        let path = dir.join(&file);
        let mut bytes = Vec::with_capacity(1 << 16);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bincode::serialize_into(&mut bytes, part).map_err(|e| io(&path, e))?;
        write_atomically(&path, &bytes)?;
        Ok(PartInfo {
            worker: part.worker,
            file,
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
        })
    }

    /// Makes checkpoint `manifest.id` visible (its manifest, written last),
    /// then removes all but the newest `keep` complete checkpoints and any
    /// older incomplete ones.
    pub fn commit(&self, manifest: &Manifest, keep: usize) -> Result<(), CheckpointError> {
        let path = self.path(manifest.id).join(MANIFEST);
        let text = serde_json::to_vec_pretty(manifest).map_err(|e| io(&path, e))?;
        write_atomically(&path, &text)?;
        let ids = self.ids()?;
        let complete: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|&id| id <= manifest.id && self.path(id).join(MANIFEST).is_file())
            .collect();
        let oldest_kept = complete
            .len()
            .checked_sub(keep.max(1))
            .map_or(0, |i| complete[i]);
        for id in ids.into_iter().filter(|&id| id < oldest_kept) {
            let _ = fs::remove_dir_all(self.path(id));
        }
        Ok(())
    }

    /// Reads and checks the manifest of checkpoint `id`.
    fn read_manifest(&self, id: u64) -> Result<Manifest, String> {
        let path = self.path(id).join(MANIFEST);
        let text = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not a checkpoint manifest: {e}", path.display()))?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(format!(
                "{}: written by format version {}; this dima reads up to version {FORMAT_VERSION}",
                path.display(),
                manifest.format_version
            ));
        }
        if manifest.id != id {
            return Err(format!(
                "{}: names checkpoint {} but lies in directory {id}",
                path.display(),
                manifest.id
            ));
        }
        Ok(manifest)
    }

    /// Checks every part of `manifest` against its size and checksum.
    fn verify(&self, manifest: &Manifest) -> Result<u64, String> {
        let dir = self.path(manifest.id);
        let mut total = 0;
        for part in &manifest.parts {
            let path = dir.join(&part.file);
            let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if bytes.len() as u64 != part.bytes {
                return Err(format!(
                    "{}: {} bytes, the manifest says {} (truncated or changed)",
                    path.display(),
                    bytes.len(),
                    part.bytes
                ));
            }
            if crc32fast::hash(&bytes) != part.crc32 {
                return Err(format!(
                    "{}: its CRC-32 does not match the manifest's (the file was changed)",
                    path.display()
                ));
            }
            total += part.bytes;
        }
        Ok(total)
    }

    /// Every checkpoint directory, oldest first, checked.
    pub fn list(&self) -> Result<Vec<Listing>, CheckpointError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            let path = self.path(id);
            let bytes = fs::read_dir(&path)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            let (manifest, problem) = match self.read_manifest(id) {
                Ok(m) => {
                    let problem = self.verify(&m).err();
                    (Some(m), problem)
                }
                Err(e) => (None, Some(e)),
            };
            out.push(Listing {
                id,
                path,
                complete: manifest.is_some() && problem.is_none(),
                manifest,
                bytes,
                problem,
            });
        }
        Ok(out)
    }

    /// The newest complete checkpoint that fits `spec`; a newer one that is
    /// incomplete or corrupt is reported (warning) and passed over. One that
    /// belongs to other pipelines or another layout is refused (error).
    pub fn newest(&self, spec: &CheckpointSpec) -> Result<Option<Loaded>, CheckpointError> {
        for id in self.ids()?.into_iter().rev() {
            let path = self.path(id);
            if !path.join(MANIFEST).exists() {
                tracing::warn!(checkpoint = %path.display(), "an incomplete checkpoint (no manifest): passed over");
                continue;
            }
            let manifest = match self.read_manifest(id) {
                Ok(m) => m,
                Err(reason) if reason.contains("format version") => {
                    return Err(CheckpointError::Refused { path, reason });
                }
                Err(reason) => {
                    tracing::warn!(checkpoint = %path.display(), %reason, "a corrupt checkpoint: using the one before it");
                    continue;
                }
            };
            if manifest.fingerprint != spec.fingerprint {
                return Err(CheckpointError::Refused {
                    path,
                    reason: format!(
                        "it was written for other pipelines (fingerprint {}; this manifest's is {}): use another [checkpoints] dir, or --fresh to ignore it",
                        manifest.fingerprint, spec.fingerprint
                    ),
                });
            }
            if (manifest.processes, manifest.workers_per_process) != (spec.processes, spec.workers)
            {
                return Err(CheckpointError::Refused {
                    path,
                    reason: format!(
                        "it was written by {} process(es) × {} worker(s); this run has {} × {}: restoring onto another layout is not supported yet (run with the checkpoint's layout, or --fresh)",
                        manifest.processes,
                        manifest.workers_per_process,
                        spec.processes,
                        spec.workers
                    ),
                });
            }
            match self.verify(&manifest) {
                Ok(_) => return Ok(Some(Loaded { path, manifest })),
                Err(reason) => {
                    tracing::warn!(checkpoint = %path.display(), %reason, "a corrupt checkpoint: using the one before it");
                }
            }
        }
        Ok(None)
    }
}

impl Loaded {
    /// Worker `worker`'s part.
    pub fn part(&self, worker: usize) -> Result<WorkerPart, CheckpointError> {
        let info = self
            .manifest
            .parts
            .iter()
            .find(|p| p.worker == worker)
            .ok_or_else(|| CheckpointError::Refused {
                path: self.path.clone(),
                reason: format!("it has no part for worker {worker}"),
            })?;
        let path = self.path.join(&info.file);
        let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
        read_part(&path, &bytes)
    }
}

/// Decodes a part file's bytes.
pub(super) fn read_part(path: &Path, bytes: &[u8]) -> Result<WorkerPart, CheckpointError> {
    let refused = |reason: String| CheckpointError::Refused {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(refused("not a checkpoint part (no DIMACKPT header)".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version > FORMAT_VERSION {
        return Err(refused(format!(
            "written by format version {version}; this dima reads up to version {FORMAT_VERSION}"
        )));
    }
    bincode::deserialize(&bytes[12..]).map_err(|e| refused(format!("cannot be decoded: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{PipelineState, PipelineTime};

    fn spec(dir: &Path) -> CheckpointSpec {
        CheckpointSpec {
            dir: dir.to_owned(),
            every: std::time::Duration::from_secs(1),
            keep: 2,
            fingerprint: "abc".into(),
            processes: 1,
            workers: 2,
        }
    }

    fn write(store: &Store, spec: &CheckpointSpec, time: u64) -> u64 {
        let id = store.next_id().unwrap();
        let parts = (0..2)
            .map(|worker| {
                let mut part = WorkerPart {
                    worker,
                    ..WorkerPart::default()
                };
                part.pipelines.insert(
                    "ads".into(),
                    PipelineState {
                        time,
                        ..PipelineState::default()
                    },
                );
                store.write_part(id, &part).unwrap()
            })
            .collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            id,
            created_unix_ms: 0,
            fingerprint: spec.fingerprint.clone(),
            processes: 1,
            workers_per_process: 2,
            pipelines: vec![PipelineTime {
                name: "ads".into(),
                time,
            }],
            parts,
        };
        store.commit(&manifest, spec.keep).unwrap();
        id
    }

    #[test]
    fn the_newest_complete_checkpoint_is_chosen_and_a_corrupt_one_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let store = Store::open(dir.path()).unwrap();
        assert!(store.newest(&spec).unwrap().is_none());
        let ids: Vec<u64> = (1..=4).map(|t| write(&store, &spec, t * 1000)).collect();
        // keep = 2: the two newest remain.
        let listed: Vec<u64> = store.list().unwrap().iter().map(|l| l.id).collect();
        assert_eq!(listed, ids[2..]);
        let newest = store.newest(&spec).unwrap().unwrap();
        assert_eq!(newest.manifest.id, ids[3]);
        assert_eq!(newest.part(1).unwrap().pipelines["ads"].time, 4000);
        // Truncate a part of the newest: the one before it is used.
        let part = store.path(ids[3]).join("worker-1.part");
        let bytes = fs::read(&part).unwrap();
        fs::write(&part, &bytes[..bytes.len() - 3]).unwrap();
        let listing = store.list().unwrap();
        assert!(!listing[1].complete);
        assert!(listing[1].problem.as_deref().unwrap().contains("truncated"));
        assert_eq!(store.newest(&spec).unwrap().unwrap().manifest.id, ids[2]);
        // A directory without a manifest (a checkpoint cut short) is not one.
        fs::create_dir_all(store.path(ids[3] + 1)).unwrap();
        assert_eq!(store.newest(&spec).unwrap().unwrap().manifest.id, ids[2]);
    }

    #[test]
    fn other_pipelines_layouts_and_newer_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let store = Store::open(dir.path()).unwrap();
        let id = write(&store, &spec, 1000);
        let other = CheckpointSpec {
            fingerprint: "xyz".into(),
            ..spec.clone()
        };
        let e = store.newest(&other).unwrap_err().to_string();
        assert!(e.contains("other pipelines") && e.contains("xyz"), "{e}");
        let layout = CheckpointSpec {
            workers: 1,
            ..spec.clone()
        };
        let e = store.newest(&layout).unwrap_err().to_string();
        assert!(
            e.contains("1 process(es) × 2 worker(s)") && e.contains("1 × 1"),
            "{e}"
        );
        let path = store.path(id).join(MANIFEST);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(
            &path,
            text.replace("\"format_version\": 1", "\"format_version\": 9"),
        )
        .unwrap();
        let e = store.newest(&spec).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        // A part from a newer format.
        let mut bytes = fs::read(store.path(id).join("worker-0.part")).unwrap();
        bytes[8] = 9;
        let e = read_part(Path::new("p"), &bytes).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, "x").unwrap();
        let e = Store::open(&file.join("sub")).unwrap_err().to_string();
        assert!(e.contains("cannot create it"), "{e}");
    }
}
