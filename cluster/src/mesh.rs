//! Connecting one timely process to its peers.
//!
//! Timely's own set-up retries refused connections once a second, waits for
//! peers forever and trusts whatever connects. We connect the mesh ourselves
//! and hand timely the sockets: process `j` connects to every process `i < j`
//! (retrying every few milliseconds) and accepts from every process after it;
//! each connection opens with a handshake that names the cluster, the number
//! of processes and the sender's index, so a stray client or a process of
//! another manifest is turned away with a reason; and the whole mesh must be
//! up within a deadline, or the error names the processes still missing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::manifest::Manifest;

const MAGIC: &[u8; 4] = b"DIMA";
const VERSION: u32 = 1;
const HELLO_LEN: usize = 4 + 4 + 8 + 4 + 4;

/// Why the mesh could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// This process cannot listen on its address.
    #[error("dataflow.processes[{process}].address {address}: cannot listen: {source}")]
    Listen {
        /// This process.
        process: usize,
        /// Its address.
        address: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// A peer turned the connection away.
    #[error("process {peer} at {address} refused the connection: {reason}")]
    Refused {
        /// The peer.
        peer: usize,
        /// Its address.
        address: SocketAddr,
        /// What it said.
        reason: String,
    },
    /// Some peers did not connect in time.
    #[error("peers not connected within {timeout:?}: {}", missing.iter().map(|(p, a)| format!("process {p} at {a}")).collect::<Vec<_>>().join(", "))]
    Timeout {
        /// The deadline.
        timeout: Duration,
        /// Processes still missing, with their addresses.
        missing: Vec<(usize, SocketAddr)>,
    },
    /// A stop signal arrived while waiting for peers.
    #[error("interrupted while waiting for peers")]
    Interrupted,
    /// The socket set-up failed.
    #[error("connecting peers: {0}")]
    Io(#[from] std::io::Error),
}

/// Who this process is in the mesh.
#[derive(Clone, Debug)]
pub struct MeshSpec {
    /// Every process address, in index order.
    pub addresses: Vec<SocketAddr>,
    /// This process's index.
    pub me: usize,
    /// A fingerprint of the cluster (name and layout): peers must agree on it.
    pub fingerprint: u64,
    /// How long the whole mesh may take to come up.
    pub timeout: Duration,
}

impl MeshSpec {
    /// The mesh of process `me` of `manifest`.
    pub fn new(manifest: &Manifest, me: usize) -> Self {
        let addresses: Vec<SocketAddr> = manifest
            .dataflow
            .processes
            .iter()
            .map(|p| p.address)
            .collect();
        let mut layout = format!(
            "{}|{}",
            manifest.cluster.name,
            manifest.dataflow.workers_per_process()
        );
        for address in &addresses {
            layout.push('|');
            layout.push_str(&address.to_string());
        }
        let fingerprint = dataflows::placement::fnv1a(layout.bytes());
        Self {
            addresses,
            me,
            fingerprint,
            timeout: manifest.dataflow.connect_timeout,
        }
    }

    fn hello(&self) -> [u8; HELLO_LEN] {
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(MAGIC);
        hello[4..8].copy_from_slice(&VERSION.to_le_bytes());
        hello[8..16].copy_from_slice(&self.fingerprint.to_le_bytes());
        hello[16..20].copy_from_slice(&(self.addresses.len() as u32).to_le_bytes());
        hello[20..24].copy_from_slice(&(self.me as u32).to_le_bytes());
        hello
    }

    /// Checks a peer's hello; returns its index or why it is refused.
    fn check(&self, hello: &[u8; HELLO_LEN]) -> Result<usize, Refusal> {
        let word = |at: usize| {
            u32::from_le_bytes([hello[at], hello[at + 1], hello[at + 2], hello[at + 3]])
        };
        if &hello[..4] != MAGIC {
            return Err(Refusal::Magic);
        }
        if word(4) != VERSION {
            return Err(Refusal::Version { theirs: word(4) });
        }
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&hello[8..16]);
        if u64::from_le_bytes(fingerprint) != self.fingerprint {
            return Err(Refusal::Manifest);
        }
        let (processes, from) = (word(16) as usize, word(20) as usize);
        if processes != self.addresses.len() || from <= self.me || from >= processes {
            return Err(Refusal::Index { from, processes });
        }
        Ok(from)
    }
}

/// Why a peer's connection is refused (the reason is sent back to it).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("not a Dima process (bad magic)")]
    Magic,
    #[error("handshake version {theirs} (this process speaks {VERSION})")]
    Version { theirs: u32 },
    #[error("it runs a different manifest (cluster name, workers or addresses differ)")]
    Manifest,
    #[error("unexpected peer index {from} of {processes}")]
    Index { from: usize, processes: usize },
    #[error("process {peer} is already connected")]
    Connected { peer: usize },
}

/// Connects process `spec.me` to every peer. The result has one socket per
/// process in index order, `None` at `spec.me`, as timely expects.
/// Gives up with [`MeshError::Interrupted`] as soon as `stop` is set.
pub fn connect(spec: &MeshSpec, stop: &AtomicBool) -> Result<Vec<Option<TcpStream>>, MeshError> {
    let deadline = Instant::now() + spec.timeout;
    let address = spec.addresses[spec.me];
    let listener = TcpListener::bind(address).map_err(|source| MeshError::Listen {
        process: spec.me,
        address,
        source,
    })?;
    let (higher, lower) = std::thread::scope(|scope| {
        let accepting = scope.spawn(|| accept_higher(spec, &listener, deadline, stop));
        let lower = connect_lower(spec, deadline, stop);
        let higher = accepting
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("accept thread panicked").into()));
        (higher, lower)
    });
    let (lower, higher) = match (lower, higher) {
        (Ok(lower), Ok(higher)) => (lower, higher),
        (
            Err(MeshError::Timeout {
                missing: mut a,
                timeout,
            }),
            Err(MeshError::Timeout { missing: b, .. }),
        ) => {
            a.extend(b);
            return Err(MeshError::Timeout {
                timeout,
                missing: a,
            });
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    let mut sockets: Vec<Option<TcpStream>> = lower.into_iter().map(Some).collect();
    sockets.push(None);
    sockets.extend(higher.into_iter().map(Some));
    Ok(sockets)
}

fn connect_lower(
    spec: &MeshSpec,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Vec<TcpStream>, MeshError> {
    let mut streams = Vec::with_capacity(spec.me);
    for (peer, &address) in spec.addresses.iter().enumerate().take(spec.me) {
        let mut backoff = Duration::from_millis(5);
        let stream = loop {
            if stop.load(Ordering::Relaxed) {
                return Err(MeshError::Interrupted);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let missing = (peer..spec.me).map(|p| (p, spec.addresses[p])).collect();
                return Err(MeshError::Timeout {
                    timeout: spec.timeout,
                    missing,
                });
            }
            match TcpStream::connect_timeout(&address, remaining.min(Duration::from_secs(2))) {
                Ok(mut stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    stream.write_all(&spec.hello())?;
                    let mut status = [0u8; 2];
                    match stream.read_exact(&mut status) {
                        Ok(()) if status == [1, 0] => break stream,
                        Ok(()) => {
                            let mut reason = vec![0u8; usize::from(status[1])];
                            let _ = stream.read_exact(&mut reason);
                            return Err(MeshError::Refused {
                                peer,
                                address,
                                reason: String::from_utf8_lossy(&reason).into_owned(),
                            });
                        }
                        // The peer went away mid-handshake: try again.
                        Err(_) => {}
                    }
                }
                Err(e) => tracing::trace!(peer, %address, error = %e, "peer not reachable yet"),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(100));
        };
        stream.set_read_timeout(None)?;
        tracing::debug!(peer, %address, "connected to peer");
        streams.push(stream);
    }
    Ok(streams)
}

fn accept_higher(
    spec: &MeshSpec,
    listener: &TcpListener,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Vec<TcpStream>, MeshError> {
    let expected = spec.addresses.len() - spec.me - 1;
    let mut slots: Vec<Option<TcpStream>> = (0..expected).map(|_| None).collect();
    listener.set_nonblocking(true)?;
    while slots.iter().any(Option::is_none) {
        if stop.load(Ordering::Relaxed) {
            return Err(MeshError::Interrupted);
        }
        if Instant::now() >= deadline {
            let missing = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none())
                .map(|(k, _)| (spec.me + 1 + k, spec.addresses[spec.me + 1 + k]))
                .collect();
            return Err(MeshError::Timeout {
                timeout: spec.timeout,
                missing,
            });
        }
        let (mut stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; HELLO_LEN];
        if let Err(e) = stream.read_exact(&mut hello) {
            tracing::warn!(%from, error = %e, "dropped a connection that sent no handshake");
            continue;
        }
        let verdict = spec
            .check(&hello)
            .and_then(|peer| match slots[peer - spec.me - 1] {
                Some(_) => Err(Refusal::Connected { peer }),
                None => Ok(peer),
            });
        match verdict {
            Ok(peer) => {
                stream.write_all(&[1, 0])?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(None)?;
                tracing::debug!(peer, %from, "accepted peer");
                slots[peer - spec.me - 1] = Some(stream);
            }
            Err(refusal) => {
                let reason = refusal.to_string();
                tracing::warn!(%from, %reason, "refused a connection");
                let reason = &reason.as_bytes()[..reason.len().min(255)];
                let mut reply = vec![0u8, reason.len() as u8];
                reply.extend_from_slice(reason);
                let _ = stream.write_all(&reply);
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}
