//! Collective ranks in different processes (or hosts), joined over TCP.
//!
//! A star through rank 0: every other rank keeps one connection to rank 0.
//! In each round every rank sends its buffer to rank 0, which answers every
//! rank with all the buffers in rank order; each rank then combines them
//! itself, in rank order, exactly as the in-process ranks do (so results are
//! bit-identical across ranks and across transports). Tensor-parallel
//! activations are small (hidden × tokens), so the star's extra copies cost
//! less than a ring's extra round trips at these sizes.
//!
//! Every read and write has the group's timeout. A rank that goes away or
//! stops answering makes rank 0 send the others an abort frame naming it;
//! every rank then returns an error, and every later call does too. Nothing
//! waits forever.
//!
//! Frames: kind (1 byte: 0 data, 1 abort), round (u64 LE), payload length
//! (u64 LE), payload. A rank's data payload is its f32 values (LE); rank
//! 0's answer is a count (u32 LE) and, per rank, a length (u64 LE) and the
//! values. An abort's payload is the reason, UTF-8.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CollectiveError, Exchange};

const DATA: u8 = 0;
const ABORT: u8 = 1;
/// Largest payload accepted (a corrupt length must not allocate the machine).
const MAX_PAYLOAD: u64 = 1 << 34;

/// One rank of a TCP group.
#[derive(Debug)]
pub struct TcpRank {
    rank: usize,
    world: usize,
    state: Mutex<TcpState>,
}

#[derive(Debug)]
struct TcpState {
    /// Rank 0: the connection to each peer (index = rank; 0 unused).
    /// Others: the connection to rank 0 at index 0.
    links: Vec<Option<TcpStream>>,
    round: u64,
    broken: Option<String>,
}

fn peer_error(rank: usize, world: usize, reason: String) -> CollectiveError {
    CollectiveError::Peer {
        rank,
        world,
        reason,
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nonblocking(false)
}

impl TcpRank {
    /// Joins a group of `world` ranks whose rank 0 listens on `root`. Rank
    /// 0 binds `root` and waits for the others; the others connect to it,
    /// retrying until `timeout`. Every later operation waits at most
    /// `timeout` for a peer.
    pub fn connect(
        rank: usize,
        world: usize,
        root: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if rank == 0 {
            let listener = TcpListener::bind(root)
                .map_err(|e| peer_error(0, world, format!("cannot listen on {root}: {e}")))?;
            Self::root(listener, world, timeout)
        } else {
            Self::join(rank, world, root, timeout)
        }
    }

    /// Rank 0 on an already bound listener: accepts the other `world - 1`
    /// ranks (each says its rank and the world size it expects).
    pub fn root(
        listener: TcpListener,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let fail = |reason: String| peer_error(0, world, reason);
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<TcpStream>> = (0..world.max(1)).map(|_| None).collect();
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("listener: {e}")))?;
        while links.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, from)) => {
                    configure(&stream, timeout).map_err(|e| fail(format!("{from}: {e}")))?;
                    let mut hello = [0u8; 16];
                    stream
                        .read_exact(&mut hello)
                        .map_err(|e| fail(format!("{from} did not say its rank: {e}")))?;
                    let (peer, their_world) = split_hello(hello);
                    if their_world != world || peer == 0 || peer >= world {
                        return Err(fail(format!(
                            "{from} says it is rank {peer} of {their_world}, this group has {world} ranks"
                        )));
                    }
                    if links[peer].is_some() {
                        return Err(fail(format!(
                            "rank {peer} connected twice (again from {from})"
                        )));
                    }
                    links[peer] = Some(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| links[r].is_none()).collect();
                        return Err(fail(format!(
                            "ranks {missing:?} did not connect within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(fail(format!("accepting: {e}"))),
            }
        }
        Ok(Self {
            rank: 0,
            world: world.max(1),
            state: Mutex::new(TcpState {
                links,
                round: 0,
                broken: None,
            }),
        })
    }

    /// A rank other than 0: connects to rank 0 at `root`, retrying until
    /// `timeout` (rank 0 may not be listening yet).
    pub fn join(
        rank: usize,
        world: usize,
        root: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let fail = |reason: String| peer_error(rank, world, reason);
        if rank == 0 || rank >= world {
            return Err(fail(format!(
                "rank {rank} cannot join a group of {world} as a peer"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&root, Duration::from_millis(200)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(format!(
                        "rank 0 at {root} not reachable within {timeout:?}: {e}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        configure(&stream, timeout).map_err(|e| fail(format!("{root}: {e}")))?;
        let mut hello = [0u8; 16];
        hello[..8].copy_from_slice(&(rank as u64).to_le_bytes());
        hello[8..].copy_from_slice(&(world as u64).to_le_bytes());
        stream
            .write_all(&hello)
            .map_err(|e| fail(format!("{root}: {e}")))?;
        Ok(Self {
            rank,
            world,
            state: Mutex::new(TcpState {
                links: vec![Some(stream)],
                round: 0,
                broken: None,
            }),
        })
    }
}

fn split_hello(hello: [u8; 16]) -> (usize, usize) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&hello[..8]);
    b.copy_from_slice(&hello[8..]);
    (
        u64::from_le_bytes(a) as usize,
        u64::from_le_bytes(b) as usize,
    )
}

fn write_frame(
    stream: &mut TcpStream,
    kind: u8,
    round: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut header = [0u8; 17];
    header[0] = kind;
    header[1..9].copy_from_slice(&round.to_le_bytes());
    header[9..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, u64, Vec<u8>)> {
    let mut header = [0u8; 17];
    stream.read_exact(&mut header)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[1..9]);
    let round = u64::from_le_bytes(word);
    word.copy_from_slice(&header[9..]);
    let len = u64::from_le_bytes(word);
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((header[0], round, payload))
}

fn floats_to_bytes(values: &[f32], out: &mut Vec<u8>) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn bytes_to_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Rank 0's answer: every deposit, in rank order.
fn encode_all(all: &[Vec<f32>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + all.iter().map(|d| 8 + 4 * d.len()).sum::<usize>());
    out.extend_from_slice(&(all.len() as u32).to_le_bytes());
    for d in all {
        out.extend_from_slice(&(d.len() as u64).to_le_bytes());
        floats_to_bytes(d, &mut out);
    }
    out
}

fn decode_all(bytes: &[u8], world: usize) -> Option<Vec<Vec<f32>>> {
    let count = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if count != world {
        return None;
    }
    let mut at = 4;
    let mut all = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?) as usize;
        at += 8;
        let end = at.checked_add(len.checked_mul(4)?)?;
        all.push(bytes_to_floats(bytes.get(at..end)?));
        at = end;
    }
    (at == bytes.len()).then_some(all)
}

/// Why a round of the exchange failed (the text reaches every rank: rank
/// 0 sends it to the others in its abort frame).
#[derive(Debug, thiserror::Error)]
enum RoundFailure {
    #[error("no connection to rank 0")]
    NoRoot,
    #[error("rank 0 went away (sending round {round}): {source}")]
    RootGone { round: u64, source: std::io::Error },
    #[error("rank 0 did not answer round {round}: {source}")]
    RootSilent { round: u64, source: std::io::Error },
    #[error("{0}")]
    Aborted(String),
    #[error("rank 0 answered round {theirs}, this rank is at round {round}")]
    RootRound { theirs: u64, round: u64 },
    #[error("rank 0 sent a malformed answer to round {round}")]
    Malformed { round: u64 },
    #[error("rank {peer} is not connected")]
    PeerMissing { peer: usize },
    #[error("rank {peer} sent round {theirs} while the group is at round {round}")]
    PeerRound {
        peer: usize,
        theirs: u64,
        round: u64,
    },
    #[error("rank {peer} went away or stopped answering in round {round}: {source}")]
    PeerGone {
        peer: usize,
        round: u64,
        source: std::io::Error,
    },
    #[error("rank {peer} went away (answering round {round}): {source}")]
    PeerAnswer {
        peer: usize,
        round: u64,
        source: std::io::Error,
    },
}

impl TcpRank {
    fn round(
        &self,
        state: &mut TcpState,
        mine: Vec<f32>,
    ) -> Result<Arc<Vec<Vec<f32>>>, RoundFailure> {
        let round = state.round;
        state.round += 1;
        if self.rank != 0 {
            let Some(stream) = state.links[0].as_mut() else {
                return Err(RoundFailure::NoRoot);
            };
            let mut payload = Vec::with_capacity(4 * mine.len());
            floats_to_bytes(&mine, &mut payload);
            write_frame(stream, DATA, round, &payload)
                .map_err(|source| RoundFailure::RootGone { round, source })?;
            let (kind, their_round, payload) =
                read_frame(stream).map_err(|source| RoundFailure::RootSilent { round, source })?;
            if kind == ABORT {
                return Err(RoundFailure::Aborted(
                    String::from_utf8_lossy(&payload).into_owned(),
                ));
            }
            if their_round != round {
                return Err(RoundFailure::RootRound {
                    theirs: their_round,
                    round,
                });
            }
            return decode_all(&payload, self.world)
                .map(Arc::new)
                .ok_or(RoundFailure::Malformed { round });
        }
        // Rank 0: gather every deposit, then answer everyone.
        let mut all = Vec::with_capacity(self.world);
        all.push(mine);
        let mut failure = None;
        for peer in 1..self.world {
            let Some(stream) = state.links[peer].as_mut() else {
                failure = Some(RoundFailure::PeerMissing { peer });
                break;
            };
            match read_frame(stream) {
                Ok((DATA, r, payload)) if r == round => all.push(bytes_to_floats(&payload)),
                Ok((_, r, _)) => {
                    failure = Some(RoundFailure::PeerRound {
                        peer,
                        theirs: r,
                        round,
                    });
                    break;
                }
                Err(source) => {
                    failure = Some(RoundFailure::PeerGone {
                        peer,
                        round,
                        source,
                    });
                    break;
                }
            }
        }
        let (kind, payload) = match &failure {
            Some(reason) => (ABORT, reason.to_string().into_bytes()),
            None => (DATA, encode_all(&all)),
        };
        for peer in 1..self.world {
            if let Some(stream) = state.links[peer].as_mut()
                && let Err(source) = write_frame(stream, kind, round, &payload)
                && failure.is_none()
            {
                failure = Some(RoundFailure::PeerAnswer {
                    peer,
                    round,
                    source,
                });
            }
        }
        match failure {
            Some(reason) => Err(reason),
            None => Ok(Arc::new(all)),
        }
    }
}

impl Exchange for TcpRank {
    fn ids(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    fn exchange(&self, mine: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, CollectiveError> {
        if self.world == 1 {
            return Ok(Arc::new(vec![mine]));
        }
        let mut state = self
            .state
            .lock()
            .map_err(|_| self.error("a thread panicked during a collective".into()))?;
        if let Some(reason) = &state.broken {
            return Err(self.error(reason.clone()));
        }
        match self.round(&mut state, mine) {
            Ok(all) => Ok(all),
            Err(failure) => {
                let reason = failure.to_string();
                // Closing the links tells the peers at once.
                state.links.iter_mut().for_each(|l| *l = None);
                state.broken = Some(reason.clone());
                Err(self.error(reason))
            }
        }
    }
}

super::collective_by_exchange!(TcpRank);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Collective;

    /// A group of `world` TCP ranks on loopback, each on its own thread.
    fn run_tcp<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        body: impl Fn(TcpRank) -> T + Send + Sync + 'static,
    ) -> Vec<Result<T, CollectiveError>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let body = Arc::new(body);
        let mut listener = Some(listener);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let body = Arc::clone(&body);
                let listener = if rank == 0 { listener.take() } else { None };
                std::thread::spawn(move || {
                    let me = match listener {
                        Some(l) => TcpRank::root(l, world, timeout),
                        None => TcpRank::join(rank, world, root, timeout),
                    }?;
                    Ok(body(me))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn tcp_ranks_reduce_gather_and_broadcast_like_local_ones() {
        for world in [1, 2, 3] {
            let results = run_tcp(world, Duration::from_secs(10), |c| {
                let r = c.rank() as f32;
                let mut outs = Vec::new();
                for step in 0..20 {
                    let mut data: Vec<f32> = (0..5)
                        .map(|i| (r + 1.0) * 0.1 * (step + i) as f32)
                        .collect();
                    c.all_reduce_sum(&mut data).unwrap();
                    let mut gathered = vec![0f32; 2 * c.world()];
                    c.all_gather(&[r, step as f32], &mut gathered).unwrap();
                    let mut b = if c.rank() == 0 {
                        vec![-(step as f32)]
                    } else {
                        vec![0.0]
                    };
                    c.broadcast(&mut b, 0).unwrap();
                    c.barrier().unwrap();
                    outs.push((data, gathered, b));
                }
                outs
            });
            let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
            for outs in &results {
                assert!(outs == &results[0], "world {world}: ranks disagree");
            }
            // The same sums, bit for bit, as the in-process ranks give.
            let local = {
                let ranks = crate::collective::local_group(world, Duration::from_secs(10));
                let handles: Vec<_> = ranks
                    .into_iter()
                    .map(|c| {
                        std::thread::spawn(move || {
                            let r = c.rank() as f32;
                            (0..20)
                                .map(|step| {
                                    let mut data: Vec<f32> = (0..5)
                                        .map(|i| (r + 1.0) * 0.1 * (step + i) as f32)
                                        .collect();
                                    c.all_reduce_sum(&mut data).unwrap();
                                    data
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            };
            for (step, (data, gathered, b)) in results[0].iter().enumerate() {
                assert_eq!(data, &local[0][step], "world {world} step {step}");
                let want: Vec<f32> = (0..world).flat_map(|r| [r as f32, step as f32]).collect();
                assert_eq!(gathered, &want);
                assert_eq!(b, &vec![-(step as f32)]);
            }
        }
    }

    /// Byte messages of every length, with every byte value (including the
    /// patterns of NaNs), arrive unchanged on every rank.
    #[test]
    fn bytes_broadcast_bit_for_bit_over_tcp() {
        let results = run_tcp(3, Duration::from_secs(10), |c| {
            (0..10usize)
                .chain([255, 256, 1001])
                .map(|len| {
                    let mut data: Vec<u8> = if c.rank() == 1 {
                        (0..len).map(|i| (i * 37 + 255) as u8).collect()
                    } else {
                        vec![7; 3]
                    };
                    c.broadcast_bytes(&mut data, 1).unwrap();
                    data
                })
                .collect::<Vec<_>>()
        });
        for r in results {
            let got = r.unwrap();
            for (data, len) in got.iter().zip((0..10usize).chain([255, 256, 1001])) {
                let want: Vec<u8> = (0..len).map(|i| (i * 37 + 255) as u8).collect();
                assert_eq!(data, &want);
            }
        }
    }

    /// A rank that goes away: the others get an error naming it, quickly,
    /// and every later call fails too.
    #[test]
    fn a_rank_that_goes_away_is_an_error_on_every_other_rank() {
        let started = Instant::now();
        let results = run_tcp(3, Duration::from_secs(2), |c| {
            let mut data = [1.0f32];
            c.all_reduce_sum(&mut data).unwrap();
            if c.rank() == 2 {
                drop(c); // the process dies: its socket closes
                return None;
            }
            let err = c.all_reduce_sum(&mut data).unwrap_err().to_string();
            let again = c.barrier().unwrap_err().to_string();
            Some((err, again))
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        for (rank, result) in results.into_iter().enumerate() {
            let result = result.unwrap();
            if rank == 2 {
                continue;
            }
            let (err, again) = result.unwrap();
            assert!(err.contains(&format!("rank {rank} of 3")), "{err}");
            assert!(
                err.contains("rank 2 went away or stopped answering in round 1"),
                "{err}"
            );
            assert!(again.contains("rank 2 went away"), "{again}");
        }
    }

    /// Rank 0 goes away: every other rank gets an error within the timeout.
    #[test]
    fn losing_rank_0_is_an_error_not_a_hang() {
        let started = Instant::now();
        let results = run_tcp(2, Duration::from_millis(800), |c| {
            if c.rank() == 0 {
                // Alive (socket open) but never answering.
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            let mut data = [1.0f32];
            Some(c.all_reduce_sum(&mut data).unwrap_err().to_string())
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = results[1].as_ref().unwrap().clone().unwrap();
        assert!(err.contains("rank 0 did not answer round 0"), "{err}");
    }

    #[test]
    fn a_rank_that_never_connects_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = TcpRank::root(listener, 3, Duration::from_millis(300)).unwrap_err();
        assert!(
            err.to_string()
                .contains("ranks [1, 2] did not connect within 300ms"),
            "{err}"
        );
        let nobody = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = TcpRank::join(1, 2, nobody, Duration::from_millis(300)).unwrap_err();
        assert!(
            err.to_string().contains("not reachable within 300ms"),
            "{err}"
        );
    }
}
