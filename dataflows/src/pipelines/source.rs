//! Sources: each worker reads its own disjoint share.
//!
//! - The generator: worker `w` of `W` runs shard `w` of the generator and
//!   produces `events / W` events (the first `events % W` workers one more).
//! - A JSONL file: worker `w` owns the lines whose first byte lies in
//!   `[w·len/W, (w+1)·len/W)`; a line that straddles a boundary belongs to the
//!   worker where it starts. Line numbers are exact (each worker counts the
//!   newlines before its range once at start-up).

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::GeneratorSpec;
use crate::events::{AdsGenerator, AdsTruth, DispatchGenerator, Event, Family, corrupt};
use crate::placement::mix64;

/// Where a record came from, for dead-letter reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Event `seq` (0-based) of generator shard `shard`.
    Generated {
        /// The shard (the worker that generated it).
        shard: u64,
        /// Position within the shard.
        seq: u64,
    },
    /// Line `line` (1-based) of a file.
    File {
        /// The file.
        path: String,
        /// The line.
        line: u64,
    },
    /// A Kafka message.
    Kafka {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The message's offset.
        offset: i64,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generated { shard, seq } => write!(f, "generator shard {shard} event {seq}"),
            Self::File { path, line } => write!(f, "{path}:{line}"),
            Self::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}/{partition}/{offset}"),
        }
    }
}

impl Origin {
    /// The source share it was read from: the Kafka partition; 0 for a
    /// generator shard or a file's byte range (one per worker).
    pub fn share(&self) -> u32 {
        match self {
            Self::Kafka { partition, .. } => *partition as u32,
            Self::Generated { shard, .. } => *shard as u32,
            Self::File { .. } => 0,
        }
    }
}

/// One record as read: its bytes and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The line, without its newline.
    pub payload: Vec<u8>,
    /// Its position in the source.
    pub origin: Origin,
    /// Where reading starts again to read it again: a file's byte offset of
    /// the line, a generator shard's sequence number, a Kafka offset.
    pub offset: u64,
}

/// Where a share is read again from after a restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// [`Record::offset`] of the first record to read again.
    pub offset: u64,
    /// Its line (files; 0 otherwise).
    pub line: u64,
}

impl Record {
    /// Where reading starts again to read this record again.
    pub fn resume(&self) -> Resume {
        Resume {
            offset: self.offset,
            line: match self.origin {
                Origin::File { line, .. } => line,
                _ => 0,
            },
        }
    }
}

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A restore asked for a position the source cannot go to.
    #[error("restoring a checkpoint: {reason}")]
    Resume {
        /// Why.
        reason: String,
    },
    /// A Kafka client could not be created or used.
    #[error("kafka {brokers} topic {topic}: {reason}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// What failed.
        reason: String,
    },
}

/// A worker's share of a source.
pub trait RecordSource {
    /// Appends up to `max` records to `out`; returns whether more remain.
    fn fill(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError>;

    /// Every record read so far belongs to `epoch` or earlier ones.
    fn epoch_closed(&mut self, _epoch: u64) {}

    /// The shares ([`Origin::share`]) this worker reads; empty while not yet
    /// known (a Kafka source still connecting). Each holds the event-time
    /// frontier back until it has read something or is finished.
    fn shares(&self) -> Vec<u32> {
        vec![0]
    }

    /// Whether `share` has been read to its end.
    fn share_finished(&self, _share: u32) -> bool {
        false
    }

    /// Whether the source follows a live stream (a share may then go idle).
    fn unbounded(&self) -> bool {
        false
    }

    /// The records left beyond what was read (Kafka: high watermark − next
    /// offset, summed over the shares, asked of the broker now); `None` for
    /// sources without such a notion.
    fn final_lag(&mut self) -> Option<u64> {
        None
    }

    /// Every epoch before `epoch` is complete at every output: a source with
    /// offsets commits them here.
    fn complete_below(&mut self, _epoch: u64) -> Result<(), SourceError> {
        Ok(())
    }

    /// Where `share` would read next (its next record's [`Resume`]).
    fn next_position(&self, _share: u32) -> Resume {
        Resume::default()
    }

    /// Reads `share` again from `at` (a restore); a source that cannot
    /// says why.
    fn seek(&mut self, share: u32, _at: Resume) -> Result<(), SourceError> {
        Err(SourceError::Resume {
            reason: format!("this source cannot resume share {share} at a position"),
        })
    }
}

/// A source with nothing in it.
#[derive(Debug)]
pub struct Empty;

impl RecordSource for Empty {
    fn fill(&mut self, _max: usize, _out: &mut Vec<Record>) -> Result<bool, SourceError> {
        Ok(false)
    }
}

/// Shard `shard` of `shards` of the generator, as JSON lines, with the
/// requested fraction corrupted.
pub struct GeneratedLines {
    events: Box<dyn Iterator<Item = Event> + Send>,
    corruption: ChaCha8Rng,
    malformed_fraction: f64,
    remaining: u64,
    shard: u64,
    seq: u64,
}

impl std::fmt::Debug for GeneratedLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedLines")
            .field("shard", &self.shard)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl GeneratedLines {
    /// The shard's lines.
    pub fn new(spec: &GeneratorSpec, shard: u64, shards: u64) -> Self {
        let shards = shards.max(1);
        let events: Box<dyn Iterator<Item = Event> + Send> = match spec.family {
            Family::Ads => {
                let horizon_hours =
                    spec.events as f64 / spec.simulated_rate.max(1e-9) / 3600.0 * 1.2 + 1.0;
                let truth = Arc::new(AdsTruth::with_drift(
                    spec.seed,
                    spec.campaigns.max(1) as usize,
                    crate::events::DEFAULT_START_MS,
                    crate::events::Drift {
                        horizon_hours,
                        ..spec.drift
                    },
                ));
                Box::new(AdsGenerator::new(
                    truth,
                    spec.members,
                    spec.simulated_rate,
                    shard,
                    shards,
                ))
            }
            Family::Dispatch => Box::new(DispatchGenerator::new(
                spec.seed,
                spec.drivers,
                spec.simulated_rate,
                shard,
                shards,
            )),
        };
        // Events arrive in event-time order, give or take the jitter.
        let events: Box<dyn Iterator<Item = Event> + Send> =
            Box::new(Arrival::new(events, spec, shard));
        Self {
            events,
            corruption: ChaCha8Rng::seed_from_u64(mix64(spec.seed ^ 0xBAD) ^ mix64(shard)),
            malformed_fraction: spec.malformed_fraction,
            remaining: spec.events / shards + u64::from(shard < spec.events % shards),
            shard,
            seq: 0,
        }
    }
}

/// Out-of-order arrival: each event arrives at its event time plus a
/// uniform jitter, or `late_by_ms` after it for a `late_fraction` of them.
/// Events leave in arrival order: the generators emit everything but clicks
/// in event-time order and a click after its impression, so an event can
/// leave once no event still to come can arrive before it.
struct Arrival {
    inner: Box<dyn Iterator<Item = Event> + Send>,
    rng: ChaCha8Rng,
    jitter_ms: u64,
    late_fraction: f64,
    late_by_ms: u64,
    /// (arrival, sequence) → event, earliest first.
    waiting: std::collections::BTreeMap<(i64, u64), Event>,
    sequence: u64,
    /// No event still to come has an earlier event time.
    floor: i64,
    done: bool,
}

impl Arrival {
    fn new(
        inner: Box<dyn Iterator<Item = Event> + Send>,
        spec: &GeneratorSpec,
        shard: u64,
    ) -> Self {
        Self {
            inner,
            rng: ChaCha8Rng::seed_from_u64(mix64(spec.seed ^ 0x0A77_17A1) ^ mix64(shard)),
            jitter_ms: spec.jitter_ms,
            late_fraction: spec.late_fraction,
            late_by_ms: spec.late_by_ms,
            waiting: std::collections::BTreeMap::new(),
            sequence: 0,
            floor: i64::MIN,
            done: false,
        }
    }
}

impl Iterator for Arrival {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(((arrival, _), _)) = self.waiting.first_key_value()
                && (self.done || *arrival <= self.floor)
            {
                return self.waiting.pop_first().map(|(_, e)| e);
            }
            if self.done {
                return None;
            }
            match self.inner.next() {
                None => self.done = true,
                Some(event) => {
                    let t = event.event_time();
                    // A click follows its impression; everything else comes
                    // in event-time order: no later event is before this.
                    if !matches!(event, Event::AdClick(_)) {
                        self.floor = self.floor.max(t);
                    }
                    let delay = if self.rng.random::<f64>() < self.late_fraction {
                        self.late_by_ms
                    } else if self.jitter_ms > 0 {
                        self.rng.random_range(0..=self.jitter_ms)
                    } else {
                        0
                    };
                    self.sequence += 1;
                    self.waiting
                        .insert((t + delay as i64, self.sequence), event);
                }
            }
        }
    }
}

impl Iterator for GeneratedLines {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.remaining == 0 {
            return None;
        }
        let line = self.events.next()?.to_line();
        self.remaining -= 1;
        self.seq += 1;
        Some(
            if self.corruption.random::<f64>() < self.malformed_fraction {
                corrupt(&line, self.corruption.random())
            } else {
                line
            },
        )
    }
}

impl RecordSource for GeneratedLines {
    fn fill(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError> {
        for _ in 0..max {
            let seq = self.seq;
            let Some(line) = self.next() else {
                return Ok(false);
            };
            out.push(Record {
                payload: line.into_bytes(),
                origin: Origin::Generated {
                    shard: self.shard,
                    seq,
                },
                offset: seq,
            });
        }
        Ok(self.remaining > 0)
    }
}

impl GeneratedLines {
    /// Generates and drops records until the next is number `seq` (the
    /// stream is a function of the seed and shard, so this is where a
    /// restored shard resumes).
    fn skip_to(&mut self, seq: u64) {
        while self.seq < seq && self.next().is_some() {}
    }
}

/// A worker's generator shards: worker `w` of `W` runs the shards `s` with
/// `s % W == w` (of the spec's `shards`), a batch from each in turn. The
/// cluster's stream is the same for any number of workers; each shard is a
/// source share with its own clock.
#[derive(Debug)]
pub struct GeneratorShards {
    shards: Vec<GeneratedLines>,
    next: usize,
}

impl GeneratorShards {
    /// Worker `worker`'s shards of `workers`.
    pub fn new(spec: &GeneratorSpec, worker: u64, workers: u64) -> Self {
        let total = spec.shards.max(1);
        let shards = (0..total)
            .filter(|s| s % workers.max(1) == worker)
            .map(|s| GeneratedLines::new(spec, s, total))
            .collect();
        Self { shards, next: 0 }
    }
}

impl RecordSource for GeneratorShards {
    fn fill(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError> {
        let live: Vec<usize> = (0..self.shards.len())
            .filter(|&i| self.shards[i].remaining > 0)
            .collect();
        if live.is_empty() {
            return Ok(false);
        }
        let i = live[self.next % live.len()];
        self.next = self.next.wrapping_add(1);
        self.shards[i].fill(max, out)?;
        Ok(self.shards.iter().any(|s| s.remaining > 0))
    }

    fn shares(&self) -> Vec<u32> {
        self.shards.iter().map(|s| s.shard as u32).collect()
    }

    fn share_finished(&self, share: u32) -> bool {
        self.shards
            .iter()
            .find(|s| s.shard as u32 == share)
            .is_none_or(|s| s.remaining == 0)
    }

    fn next_position(&self, share: u32) -> Resume {
        let seq = self
            .shards
            .iter()
            .find(|s| s.shard as u32 == share)
            .map_or(0, |s| s.seq);
        Resume {
            offset: seq,
            line: 0,
        }
    }

    fn seek(&mut self, share: u32, at: Resume) -> Result<(), SourceError> {
        let shard = self
            .shards
            .iter_mut()
            .find(|s| s.shard as u32 == share)
            .ok_or_else(|| SourceError::Resume {
                reason: format!("generator shard {share} is not this worker's"),
            })?;
        if shard.seq > at.offset {
            return Err(SourceError::Resume {
                reason: format!(
                    "generator shard {share} is already past event {} (at {})",
                    at.offset, shard.seq
                ),
            });
        }
        shard.skip_to(at.offset);
        Ok(())
    }
}

/// A worker's byte range of a JSONL file.
#[derive(Debug)]
pub struct JsonlSplit {
    path: PathBuf,
    display: String,
    reader: BufReader<File>,
    /// Offset of the next line's first byte.
    at: u64,
    end: u64,
    /// 1-based number of the next line.
    line: u64,
    buffer: Vec<u8>,
}

impl JsonlSplit {
    /// Opens worker `worker`'s range (of `workers`) of `path`.
    pub fn open(path: &Path, worker: usize, workers: usize) -> Result<Self, SourceError> {
        let io = |source| SourceError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let workers = workers.max(1) as u64;
        let share = |w: u64| ((u128::from(len) * u128::from(w)) / u128::from(workers)) as u64;
        let (mut start, end) = (share(worker as u64), share(worker as u64 + 1));
        // Count the lines before the range; find the first line that starts in it.
        let mut newlines = 0u64;
        let mut chunk = vec![0u8; 1 << 16];
        let mut read = 0u64;
        if start > 0 {
            let mut counted = 0u64;
            while counted < start - 1 {
                let want = ((start - 1 - counted) as usize).min(chunk.len());
                let n = file.read(&mut chunk[..want]).map_err(io)?;
                if n == 0 {
                    break;
                }
                newlines += chunk[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                counted += n as u64;
            }
            read = counted;
        }
        let mut reader = BufReader::with_capacity(1 << 16, file);
        if start > 0 {
            // The byte before the range: a newline means a line starts at `start`.
            let mut previous = [0u8; 1];
            let n = reader.read(&mut previous).map_err(io)?;
            read += n as u64;
            if n == 1 && previous[0] == b'\n' {
                newlines += 1;
            } else if n == 1 {
                // Mid-line: the line belongs to an earlier worker; skip it.
                let mut skipped = Vec::new();
                let n = reader.read_until(b'\n', &mut skipped).map_err(io)?;
                read += n as u64;
                if skipped.last() == Some(&b'\n') {
                    newlines += 1;
                }
            }
            start = read;
        } else {
            reader.seek(SeekFrom::Start(0)).map_err(io)?;
        }
        Ok(Self {
            display: path.display().to_string(),
            path: path.to_owned(),
            reader,
            at: start,
            end,
            line: newlines + 1,
            buffer: Vec::new(),
        })
    }
}

impl RecordSource for JsonlSplit {
    fn fill(&mut self, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError> {
        for _ in 0..max {
            if self.at >= self.end {
                return Ok(false);
            }
            self.buffer.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buffer)
                .map_err(|source| SourceError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(false);
            }
            let offset = self.at;
            self.at += n as u64;
            if self.buffer.last() == Some(&b'\n') {
                self.buffer.pop();
            }
            out.push(Record {
                payload: std::mem::take(&mut self.buffer),
                origin: Origin::File {
                    path: self.display.clone(),
                    line: self.line,
                },
                offset,
            });
            self.line += 1;
        }
        Ok(self.at < self.end)
    }

    fn next_position(&self, _share: u32) -> Resume {
        Resume {
            offset: self.at,
            line: self.line,
        }
    }

    fn seek(&mut self, _share: u32, at: Resume) -> Result<(), SourceError> {
        if at.offset < self.at || at.offset > self.end.max(self.at) {
            return Err(SourceError::Resume {
                reason: format!(
                    "{}: byte {} is outside this worker's range {}..{} (was the file changed?)",
                    self.display, at.offset, self.at, self.end
                ),
            });
        }
        self.reader
            .seek(SeekFrom::Start(at.offset))
            .map_err(|source| SourceError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.at = at.offset;
        self.line = at.line;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(source: &mut dyn RecordSource) -> Vec<Record> {
        let mut out = Vec::new();
        while source.fill(3, &mut out).unwrap() {}
        out
    }

    #[test]
    fn file_splits_cover_every_line_once_with_exact_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        let lines: Vec<String> = (0..57)
            .map(|i| format!("line {i} {}", "x".repeat(i % 13)))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        for workers in [1, 2, 3, 7, 64, 1000] {
            let mut seen: Vec<(u64, String)> = Vec::new();
            for w in 0..workers {
                let mut split = JsonlSplit::open(&path, w, workers).unwrap();
                for r in read_all(&mut split) {
                    let Origin::File { line, .. } = r.origin else {
                        unreachable!()
                    };
                    seen.push((line, String::from_utf8(r.payload).unwrap()));
                }
            }
            seen.sort();
            let expected: Vec<(u64, String)> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, l.clone()))
                .collect();
            assert_eq!(seen, expected, "{workers} workers");
        }
        // No trailing newline: the last line still counts.
        std::fs::write(&path, "a\nb").unwrap();
        let mut split = JsonlSplit::open(&path, 0, 1).unwrap();
        assert_eq!(read_all(&mut split).len(), 2);
    }

    #[test]
    fn generator_shards_add_up_and_corrupt_the_requested_fraction() {
        let spec = GeneratorSpec {
            events: 10_001,
            malformed_fraction: 0.02,
            ..GeneratorSpec::new(Family::Ads)
        };
        let mut total = 0;
        let mut bad = 0;
        for shard in 0..3 {
            for line in GeneratedLines::new(&spec, shard, 3) {
                total += 1;
                bad += usize::from(crate::events::parse_line(&line).is_err());
            }
        }
        assert_eq!(total, 10_001);
        assert!((120..280).contains(&bad), "{bad} malformed");
    }
}
