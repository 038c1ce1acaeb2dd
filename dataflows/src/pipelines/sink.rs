//! Sinks: line writers for valid events and for dead letters.
//!
//! Files are opened for appending (an earlier run's lines are kept, never
//! truncated) and their directory is created. Writes go through a buffer
//! that is flushed at the end of every epoch the sink completes, so what a
//! finished epoch wrote is on disk before its completion is reported.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SinkSpec;
use super::source::Origin;

/// A malformed record, as the dead-letter sink writes it (one JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The pipeline that rejected it.
    pub pipeline: String,
    /// Where it came from: `file:line` or the generator shard and event.
    pub source: String,
    /// Why it was rejected.
    pub reason: String,
    /// The record's text (invalid UTF-8 replaced by U+FFFD).
    pub raw: String,
}

impl DeadLetter {
    /// The dead letter of `payload` read at `origin`.
    pub fn new(pipeline: &str, origin: &Origin, reason: String, payload: &[u8]) -> Self {
        Self {
            pipeline: pipeline.to_owned(),
            source: origin.to_string(),
            reason,
            raw: String::from_utf8_lossy(payload).into_owned(),
        }
    }
}

/// Why a sink failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct SinkError {
    /// The file (or `-` for standard output).
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// Buffers whole lines and hands them to `inner` in large writes that end
/// at a line boundary, so a crash leaves at worst the torn tail of one write,
/// never a half line in the middle of the file.
struct WholeLines<W: Write> {
    inner: W,
    buffer: Vec<u8>,
}

impl<W: Write> Write for WholeLines<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= 1 << 16 && self.buffer.last() == Some(&b'\n') {
            self.inner.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.write_all(&self.buffer)?;
        self.buffer.clear();
        self.inner.flush()
    }
}

/// Writes lines to standard output, a file, a Kafka topic or nowhere, and
/// counts them.
pub struct LineWriter {
    out: Option<Box<dyn Write>>,
    kafka: Option<super::kafka::KafkaProducer>,
    path: PathBuf,
    written: u64,
    /// A Kafka sink whose flush failed fails every later write and flush at
    /// once with the same reason (rather than waiting for each epoch's
    /// messages to time out in turn).
    failed: Option<String>,
    /// Whether it writes to a file at `path`.
    is_file: bool,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineWriter")
            .field("path", &self.path)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl LineWriter {
    /// A writer for a sink spec.
    pub fn open(spec: &SinkSpec) -> Result<Self, SinkError> {
        match spec {
            SinkSpec::None => Ok(Self {
                out: None,
                kafka: None,
                path: PathBuf::from("(none)"),
                written: 0,
                failed: None,
                is_file: false,
            }),
            SinkSpec::Stdout => Ok(Self {
                out: Some(Box::new(BufWriter::new(std::io::stdout()))),
                kafka: None,
                path: PathBuf::from("-"),
                written: 0,
                failed: None,
                is_file: false,
            }),
            SinkSpec::Jsonl { path } => Self::file(path),
            SinkSpec::Kafka(k) => {
                let path = PathBuf::from(format!("kafka:{}/{}", k.brokers, k.topic));
                let producer = super::kafka::KafkaProducer::new(k).map_err(|e| SinkError {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(Self {
                    out: None,
                    kafka: Some(producer),
                    path,
                    written: 0,
                    failed: None,
                    is_file: false,
                })
            }
        }
    }

    /// An appending writer for `path`, creating its directory.
    pub fn file(path: &Path) -> Result<Self, SinkError> {
        let error = |source| SinkError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(error)?;
        Ok(Self {
            out: Some(Box::new(WholeLines {
                inner: file,
                buffer: Vec::with_capacity(1 << 17),
            })),
            kafka: None,
            path: path.to_owned(),
            written: 0,
            failed: None,
            is_file: true,
        })
    }

    /// Writes one line (a newline is added; a Kafka message is keyed by
    /// `key`, 8 bytes big-endian, when there is one) and counts it.
    pub fn write_keyed(&mut self, key: Option<u64>, line: &str) -> Result<(), SinkError> {
        self.written += 1;
        if let Some(reason) = &self.failed {
            return Err(SinkError {
                path: self.path.clone(),
                source: std::io::Error::other(reason.clone()),
            });
        }
        if let Some(kafka) = &self.kafka {
            let key = key.map(u64::to_be_bytes);
            return kafka
                .send(key.as_ref().map_or(&[][..], |k| &k[..]), line.as_bytes())
                .map_err(|e| SinkError {
                    path: self.path.clone(),
                    source: std::io::Error::other(e.to_string()),
                });
        }
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        out.write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|source| SinkError {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes one line without a key (see [`write_keyed`](Self::write_keyed)).
    pub fn write_line(&mut self, line: &str) -> Result<(), SinkError> {
        self.write_keyed(None, line)
    }

    /// Flushes buffered lines.
    pub fn flush(&mut self) -> Result<(), SinkError> {
        if let Some(reason) = &self.failed {
            return Err(SinkError {
                path: self.path.clone(),
                source: std::io::Error::other(reason.clone()),
            });
        }
        if let Some(kafka) = &self.kafka {
            return kafka.flush().map_err(|e| {
                let reason = e.to_string();
                self.failed = Some(reason.clone());
                SinkError {
                    path: self.path.clone(),
                    source: std::io::Error::other(reason),
                }
            });
        }
        match self.out.as_mut() {
            Some(out) => out.flush().map_err(|source| SinkError {
                path: self.path.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A file sink's length on disk after a flush (`None` for other sinks).
    pub fn file_len(&mut self) -> Result<Option<u64>, SinkError> {
        if self.kafka.is_some() || !self.is_file {
            return Ok(None);
        }
        self.flush()?;
        std::fs::metadata(&self.path)
            .map(|m| Some(m.len()))
            .map_err(|source| SinkError {
                path: self.path.clone(),
                source,
            })
    }

    /// Continues from a checkpoint: a file sink is cut back to `bytes`
    /// (what it held when the checkpoint was taken: later lines are written
    /// again), and `written` lines are counted as written.
    pub fn resume(&mut self, bytes: Option<u64>, written: u64) -> Result<(), SinkError> {
        self.written = written;
        let (Some(bytes), true) = (bytes, self.is_file) else {
            return Ok(());
        };
        let error = |source| SinkError {
            path: self.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(error)?;
        let len = file.metadata().map_err(error)?.len();
        if len < bytes {
            return Err(error(std::io::Error::other(format!(
                "{len} bytes, shorter than the {bytes} the checkpoint recorded: it was changed or replaced since"
            ))));
        }
        file.set_len(bytes).map_err(error)?;
        file.sync_all().map_err(error)
    }
}
