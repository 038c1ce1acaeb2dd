//! Where the ranks of a tensor-parallel group run, and loading the ones
//! this process holds.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::ServeError;
use crate::gemma::Gemma;

/// Where the ranks of a tensor-parallel group run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Every rank in this process, as threads sharing memory.
    InProcess,
    /// This process runs `rank` only; the group meets over TCP at rank 0's
    /// `root` address.
    Tcp {
        /// This process's rank.
        rank: usize,
        /// Rank 0's address.
        root: SocketAddr,
    },
}

/// Loads the ranks of a `tp`-way group that this process runs: every rank
/// ([`Placement::InProcess`], in rank order, loaded in parallel) or one.
/// Each rank reads only its own slices; a peer that does not answer within
/// `timeout` is an error, never a hang.
pub fn load_ranks(
    path: &Path,
    tp: usize,
    placement: Placement,
    timeout: Duration,
) -> Result<Vec<Gemma>, ServeError> {
    load_ranks_with_progress(path, tp, placement, timeout, |_, _| {})
}

/// [`load_ranks`], calling `progress(layers done, layers)` while the one
/// rank of a one-rank group or of a TCP placement loads (ranks loaded in
/// parallel report nothing).
pub fn load_ranks_with_progress(
    path: &Path,
    tp: usize,
    placement: Placement,
    timeout: Duration,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Gemma>, ServeError> {
    if tp == 0 {
        return Err(ServeError::NoRanks);
    }
    match placement {
        Placement::InProcess if tp == 1 => Ok(vec![Gemma::load_with_progress(path, progress)?]),
        Placement::InProcess => {
            let loads: Vec<_> = kernels::collective::local_group(tp, timeout)
                .into_iter()
                .map(|link| {
                    let path = path.to_path_buf();
                    std::thread::spawn(move || {
                        Gemma::load_rank(&path, tp, Box::new(link), |_, _| {})
                    })
                })
                .collect();
            let mut ranks = Vec::with_capacity(tp);
            for (rank, load) in loads.into_iter().enumerate() {
                let gemma = load
                    .join()
                    .map_err(|_| ServeError::RankPanicked { rank })??;
                ranks.push(gemma);
            }
            Ok(ranks)
        }
        Placement::Tcp { rank, root } => {
            if rank >= tp {
                return Err(ServeError::RankOutOfRange { rank, tp });
            }
            let link = kernels::collective::TcpRank::connect(rank, tp, root, timeout)?;
            Ok(vec![Gemma::load_rank(path, tp, Box::new(link), progress)?])
        }
    }
}

/// One line per rank: its slices' weight bytes.
pub fn describe_ranks(ranks: &[Gemma]) -> String {
    ranks
        .iter()
        .map(|g| {
            format!(
                "rank {} of {}: {:.1} MiB of weights",
                g.shard().rank,
                g.collective().world(),
                g.weight_bytes() as f64 / (1 << 20) as f64
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
