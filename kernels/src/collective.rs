//! Collectives: how tensor-parallel ranks combine partial results.
//!
//! The model code calls a [`Collective`] after every row-parallel projection
//! (attention output, MLP down) and around the vocabulary-parallel embedding
//! and LM head, whatever the world size. With one rank ([`SingleRank`])
//! every operation is the identity, so the single-rank forward pass and the
//! sharded one are the same code. The in-process, TCP and NCCL
//! implementations come with tensor-parallel serving; the trait is shaped
//! like NCCL's (one communicator per group, ops over whole buffers).

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
}
