//! Collectives: how tensor-parallel ranks combine partial results.
//!
//! The model code calls a [`Collective`] after every row-parallel projection
//! (attention output, MLP down) and around the vocabulary-parallel embedding
//! and LM head, whatever the world size. With one rank ([`SingleRank`])
//! every operation is the identity, so the single-rank forward pass and the
//! sharded one are the same code. [`local_group`] makes ranks that are
//! threads of one process ([`LocalRank`], shared memory, a timeout instead
//! of a hang when a rank goes away). The TCP and NCCL implementations come
//! with the rest of tensor-parallel serving; the trait is shaped like
//! NCCL's (one communicator per group, ops over whole buffers). bf16 buffers
//! go through f32 (summed in f32, rounded once).

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CollectiveError {
    /// A peer rank went away or did not answer in time.
    #[error("rank {rank} of {world}: {reason}")]
    Peer {
        /// This rank.
        rank: usize,
        /// World size.
        world: usize,
        /// What happened.
        reason: String,
    },
}

#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
pub use nccl::NcclRank;
mod tcp;
pub use tcp::TcpRank;

/// The operations tensor-parallel ranks need.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world(&self) -> usize;
    /// Replaces `data` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Concatenates every rank's `local` (equal lengths) into `out`, in rank order.
    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError>;
    /// Copies `root`'s `data` to every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// Copies `root`'s bytes to every rank; the other ranks' `data` is
    /// replaced whatever its length (a control message, such as the
    /// engine's step schedule). The default sends the length, then the
    /// bytes packed four to a value, through [`broadcast`](Self::broadcast),
    /// which copies values bit for bit.
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let is_root = self.rank() == root;
        let len = data.len() as u64;
        let mut head = [
            f32::from_bits(len as u32),
            f32::from_bits((len >> 32) as u32),
        ];
        self.broadcast(&mut head, root)?;
        let len = u64::from(head[0].to_bits()) | (u64::from(head[1].to_bits()) << 32);
        let len = usize::try_from(len).map_err(|_| CollectiveError::Peer {
            rank: self.rank(),
            world: self.world(),
            reason: format!("broadcast_bytes: rank {root} announced {len} bytes"),
        })?;
        let mut body: Vec<f32> = if is_root {
            data.chunks(4)
                .map(|c| {
                    let mut word = [0u8; 4];
                    word[..c.len()].copy_from_slice(c);
                    f32::from_bits(u32::from_le_bytes(word))
                })
                .collect()
        } else {
            vec![0.0; len.div_ceil(4)]
        };
        self.broadcast(&mut body, root)?;
        if !is_root {
            data.clear();
            data.extend(body.iter().flat_map(|w| w.to_bits().to_le_bytes()));
            data.truncate(len);
        }
        Ok(())
    }

    /// [`all_reduce_sum`](Self::all_reduce_sum) of bf16 values, summed in f32
    /// and rounded once.
    fn all_reduce_sum_bf16(&self, data: &mut [half::bf16]) -> Result<(), CollectiveError> {
        let mut wide: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        self.all_reduce_sum(&mut wide)?;
        for (d, w) in data.iter_mut().zip(&wide) {
            *d = half::bf16::from_f32(*w);
        }
        Ok(())
    }

    /// [`all_gather`](Self::all_gather) of bf16 values.
    fn all_gather_bf16(
        &self,
        local: &[half::bf16],
        out: &mut [half::bf16],
    ) -> Result<(), CollectiveError> {
        let wide: Vec<f32> = local.iter().map(|v| v.to_f32()).collect();
        let mut gathered = vec![0f32; out.len()];
        self.all_gather(&wide, &mut gathered)?;
        for (o, g) in out.iter_mut().zip(&gathered) {
            // Exact: every value was a bf16.
            *o = half::bf16::from_f32(*g);
        }
        Ok(())
    }
}

/// The group of one: every operation is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        out.copy_from_slice(local);
        Ok(())
    }

    fn broadcast(&self, _data: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Ranks of one process (threads) sharing memory: every operation is one
/// exchange round in which each rank deposits its buffer and, once all have,
/// reads all of them. Sums are taken in rank order on every rank, so all
/// ranks get bit-identical results. A rank that does not arrive within the
/// group's timeout breaks the group: the waiting ranks, and every later
/// call on any rank, get an error naming the missing ranks.
#[derive(Debug)]
pub struct LocalRank {
    rank: usize,
    shared: std::sync::Arc<LocalShared>,
}

#[derive(Debug)]
struct LocalShared {
    world: usize,
    timeout: std::time::Duration,
    state: std::sync::Mutex<LocalState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct LocalState {
    /// Rounds completed.
    round: u64,
    /// This round's deposits, by rank.
    slots: Vec<Option<Vec<f32>>>,
    /// The last completed round's deposits.
    result: std::sync::Arc<Vec<Vec<f32>>>,
    /// Why the group is unusable, once it is.
    broken: Option<String>,
}

/// Makes an in-process group of `world` ranks (hand one to each thread).
/// `timeout` bounds how long a rank waits for the others in one operation.
pub fn local_group(world: usize, timeout: std::time::Duration) -> Vec<LocalRank> {
    let world = world.max(1);
    let shared = std::sync::Arc::new(LocalShared {
        world,
        timeout,
        state: std::sync::Mutex::new(LocalState {
            slots: vec![None; world],
            ..LocalState::default()
        }),
        changed: std::sync::Condvar::new(),
    });
    (0..world)
        .map(|rank| LocalRank {
            rank,
            shared: std::sync::Arc::clone(&shared),
        })
        .collect()
}

impl LocalRank {
    /// One round: deposits `mine`, returns every rank's deposit.
    fn exchange(&self, mine: Vec<f32>) -> Result<std::sync::Arc<Vec<Vec<f32>>>, CollectiveError> {
        let shared = &self.shared;
        let mut state = shared
            .state
            .lock()
            .map_err(|_| self.error("a rank panicked during a collective".into()))?;
        if let Some(reason) = &state.broken {
            return Err(self.error(reason.clone()));
        }
        let round = state.round;
        state.slots[self.rank] = Some(mine);
        if state.slots.iter().all(Option::is_some) {
            let deposits = state.slots.iter_mut().filter_map(Option::take).collect();
            state.result = std::sync::Arc::new(deposits);
            state.round += 1;
            shared.changed.notify_all();
            return Ok(std::sync::Arc::clone(&state.result));
        }
        let started = std::time::Instant::now();
        loop {
            let left = shared.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                let missing: Vec<usize> = (0..shared.world)
                    .filter(|&r| state.slots[r].is_none())
                    .collect();
                let reason = format!(
                    "ranks {missing:?} did not reach collective round {round} within {:?}",
                    shared.timeout
                );
                state.broken = Some(reason.clone());
                shared.changed.notify_all();
                return Err(self.error(reason));
            }
            state = shared
                .changed
                .wait_timeout(state, left)
                .map_err(|_| self.error("a rank panicked during a collective".into()))?
                .0;
            if state.round > round {
                // A later round cannot complete without this rank, so the
                // result is still this round's.
                return Ok(std::sync::Arc::clone(&state.result));
            }
            if let Some(reason) = &state.broken {
                return Err(self.error(reason.clone()));
            }
        }
    }
}

impl Exchange for LocalRank {
    fn ids(&self) -> (usize, usize) {
        (self.rank, self.shared.world)
    }

    fn exchange(&self, mine: Vec<f32>) -> Result<std::sync::Arc<Vec<Vec<f32>>>, CollectiveError> {
        LocalRank::exchange(self, mine)
    }
}

/// Implements [`Collective`] for a type through its [`Exchange`] round.
macro_rules! collective_by_exchange {
    ($t:ty) => {
        impl $crate::collective::Collective for $t {
            fn rank(&self) -> usize {
                $crate::collective::Exchange::ids(self).0
            }

            fn world(&self) -> usize {
                $crate::collective::Exchange::ids(self).1
            }

            fn all_reduce_sum(
                &self,
                data: &mut [f32],
            ) -> Result<(), $crate::collective::CollectiveError> {
                $crate::collective::all_reduce_sum_by(self, data)
            }

            fn all_gather(
                &self,
                local: &[f32],
                out: &mut [f32],
            ) -> Result<(), $crate::collective::CollectiveError> {
                $crate::collective::all_gather_by(self, local, out)
            }

            fn broadcast(
                &self,
                data: &mut [f32],
                root: usize,
            ) -> Result<(), $crate::collective::CollectiveError> {
                $crate::collective::broadcast_by(self, data, root)
            }

            fn barrier(&self) -> Result<(), $crate::collective::CollectiveError> {
                $crate::collective::Exchange::exchange(self, Vec::new()).map(|_| ())
            }
        }
    };
}
pub(crate) use collective_by_exchange;

collective_by_exchange!(LocalRank);

/// A transport for one exchange round: every rank deposits a buffer and
/// gets every rank's, in rank order. The operations are built on it, so
/// every transport combines in the same order and all ranks get
/// bit-identical results.
pub(crate) trait Exchange {
    /// (rank, world).
    fn ids(&self) -> (usize, usize);
    fn exchange(&self, mine: Vec<f32>) -> Result<std::sync::Arc<Vec<Vec<f32>>>, CollectiveError>;
    fn error(&self, reason: String) -> CollectiveError {
        let (rank, world) = self.ids();
        CollectiveError::Peer {
            rank,
            world,
            reason,
        }
    }
}

pub(crate) fn all_reduce_sum_by(
    x: &impl Exchange,
    data: &mut [f32],
) -> Result<(), CollectiveError> {
    let all = x.exchange(data.to_vec())?;
    if let Some(bad) = all.iter().position(|d| d.len() != data.len()) {
        return Err(x.error(format!(
            "all_reduce_sum: rank {bad} sent {} values, this rank {}",
            all[bad].len(),
            data.len()
        )));
    }
    data.fill(0.0);
    for contribution in all.iter() {
        for (d, c) in data.iter_mut().zip(contribution) {
            *d += c;
        }
    }
    Ok(())
}

pub(crate) fn all_gather_by(
    x: &impl Exchange,
    local: &[f32],
    out: &mut [f32],
) -> Result<(), CollectiveError> {
    let all = x.exchange(local.to_vec())?;
    let total: usize = all.iter().map(Vec::len).sum();
    if total != out.len() || all.iter().any(|d| d.len() != local.len()) {
        return Err(x.error(format!(
            "all_gather: ranks sent {:?} values for an output of {}",
            all.iter().map(Vec::len).collect::<Vec<_>>(),
            out.len()
        )));
    }
    for (chunk, part) in out.chunks_mut(local.len().max(1)).zip(all.iter()) {
        chunk.copy_from_slice(part);
    }
    Ok(())
}

pub(crate) fn broadcast_by(
    x: &impl Exchange,
    data: &mut [f32],
    root: usize,
) -> Result<(), CollectiveError> {
    let (rank, world) = x.ids();
    if root >= world {
        return Err(x.error(format!("broadcast from rank {root}: no such rank")));
    }
    let mine = if rank == root {
        data.to_vec()
    } else {
        Vec::new()
    };
    let all = x.exchange(mine)?;
    if all[root].len() != data.len() {
        return Err(x.error(format!(
            "broadcast: rank {root} sent {} values, this rank expects {}",
            all[root].len(),
            data.len()
        )));
    }
    data.copy_from_slice(&all[root]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_rank_group_is_the_identity() {
        let c = SingleRank;
        assert_eq!((c.rank(), c.world()), (0, 1));
        let mut data = [1.0f32, -2.0];
        c.all_reduce_sum(&mut data).unwrap();
        c.broadcast(&mut data, 0).unwrap();
        assert_eq!(data, [1.0, -2.0]);
        let mut out = [0f32; 2];
        c.all_gather(&data, &mut out).unwrap();
        assert_eq!(out, data);
        c.barrier().unwrap();
    }

    fn run_ranks<T: Send + 'static>(
        world: usize,
        timeout_ms: u64,
        body: impl Fn(LocalRank) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let body = std::sync::Arc::new(body);
        let handles: Vec<_> = local_group(world, std::time::Duration::from_millis(timeout_ms))
            .into_iter()
            .map(|rank| {
                let body = std::sync::Arc::clone(&body);
                std::thread::spawn(move || body(rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn in_process_ranks_reduce_gather_and_broadcast() {
        for world in [1, 2, 4] {
            let results = run_ranks(world, 5_000, |c| {
                let r = c.rank() as f32;
                let mut outs = Vec::new();
                for step in 0..50 {
                    // Sum: every rank adds (rank + 1) · (step + i).
                    let mut data: Vec<f32> =
                        (0..7).map(|i| (r + 1.0) * (step + i) as f32).collect();
                    c.all_reduce_sum(&mut data).unwrap();
                    let mut gathered = vec![0f32; 3 * c.world()];
                    c.all_gather(&[r, r * 10.0, step as f32], &mut gathered)
                        .unwrap();
                    let mut b = if c.rank() == c.world() - 1 {
                        vec![step as f32, -1.0]
                    } else {
                        vec![0.0; 2]
                    };
                    c.broadcast(&mut b, c.world() - 1).unwrap();
                    c.barrier().unwrap();
                    outs.push((data, gathered, b));
                }
                outs
            });
            let scale: f32 = (1..=world).map(|r| r as f32).sum();
            for outs in &results {
                assert_eq!(outs, &results[0], "every rank sees the same results");
                for (step, (data, gathered, b)) in outs.iter().enumerate() {
                    let want: Vec<f32> = (0..7).map(|i| scale * (step + i) as f32).collect();
                    assert_eq!(data, &want);
                    let g: Vec<f32> = (0..world)
                        .flat_map(|r| [r as f32, r as f32 * 10.0, step as f32])
                        .collect();
                    assert_eq!(gathered, &g);
                    assert_eq!(b, &vec![step as f32, -1.0]);
                }
            }
        }
    }

    #[test]
    fn bytes_broadcast_bit_for_bit_in_process() {
        let results = run_ranks(2, 5_000, |c| {
            let mut data: Vec<u8> = if c.rank() == 0 {
                // 0xff 0xff 0xff 0x7f and friends are NaN patterns as f32.
                (0..=255u8).rev().chain([0x7f, 0xff, 0xc0]).collect()
            } else {
                Vec::new()
            };
            c.broadcast_bytes(&mut data, 0).unwrap();
            data
        });
        let want: Vec<u8> = (0..=255u8).rev().chain([0x7f, 0xff, 0xc0]).collect();
        assert_eq!(results, vec![want.clone(), want]);
        let mut one = vec![1u8, 2, 3];
        SingleRank.broadcast_bytes(&mut one, 0).unwrap();
        assert_eq!(one, [1, 2, 3]);
    }

    #[test]
    fn bf16_reduce_and_gather() {
        let results = run_ranks(2, 5_000, |c| {
            let mut data = vec![half::bf16::from_f32(1.5), half::bf16::from_f32(-2.0)];
            c.all_reduce_sum_bf16(&mut data).unwrap();
            let mut out = vec![half::bf16::ZERO; 2];
            c.all_gather_bf16(&[half::bf16::from_f32(c.rank() as f32 + 0.5)], &mut out)
                .unwrap();
            (data, out)
        });
        for (data, out) in results {
            assert_eq!(
                data,
                [half::bf16::from_f32(3.0), half::bf16::from_f32(-4.0)]
            );
            assert_eq!(out, [half::bf16::from_f32(0.5), half::bf16::from_f32(1.5)]);
        }
    }

    /// A rank that stops taking part: the others get an error naming it
    /// within the timeout, and so does every later call. Nothing hangs.
    #[test]
    fn a_missing_rank_is_an_error_within_the_timeout_not_a_hang() {
        let started = std::time::Instant::now();
        let results = run_ranks(3, 1_000, |c| {
            let mut data = [1.0f32];
            c.all_reduce_sum(&mut data).unwrap();
            if c.rank() == 1 {
                return None; // rank 1 goes away after the first round
            }
            let err = c.all_reduce_sum(&mut data).unwrap_err();
            let again = c.barrier().unwrap_err();
            Some((err.to_string(), again.to_string()))
        });
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        for (rank, result) in results.iter().enumerate() {
            if rank == 1 {
                assert!(result.is_none());
                continue;
            }
            let (err, again) = result.as_ref().unwrap();
            assert!(
                err.contains(&format!("rank {rank} of 3"))
                    && err.contains("ranks [1] did not reach collective round 1"),
                "{err}"
            );
            assert!(again.contains("ranks [1] did not reach"), "{again}");
        }
        // Mismatched lengths are an error, not a panic.
        let results = run_ranks(2, 1_000, |c| {
            let mut data = vec![0f32; 2 + c.rank()];
            c.all_reduce_sum(&mut data).map_err(|e| e.to_string())
        });
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("sent"))),
            "{results:?}"
        );
    }
}
