//! NCCL as a [`Collective`] (feature `cuda`): one process per GPU, one
//! communicator per group. Rank 0 creates NCCL's unique id and sends it to
//! its peers over our own transport (a bootstrap [`Collective`], e.g. the
//! TCP ranks from the manifest's `root`), then every rank joins the
//! communicator on its GPU. A world of one works.
//!
//! The trait's operations take host buffers, so each copies to the GPU,
//! runs the NCCL operation on the rank's stream and copies back: the same
//! interface as the CPU transports (the model code does not change), at
//! the cost of two copies. Device-buffer operations are the next step for
//! the GPU model's tensor parallelism.
//!
//! Not yet: NCCL blocks when a peer dies; a watchdog that aborts the
//! communicator after the group's timeout (`ncclCommAbort` with
//! non-blocking communicators) is still to come, so this transport does not
//! yet keep the "error, never a hang" promise of the others.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError};

/// One rank of an NCCL group.
#[derive(Debug)]
pub struct NcclRank {
    rank: usize,
    world: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as its
// calls do not overlap; every use goes through `NcclRank::inner`'s mutex.
unsafe impl Send for Inner {}

impl NcclRank {
    /// Joins the NCCL group of `bootstrap`'s ranks on GPU `device`: rank 0
    /// makes the unique id, `bootstrap` carries it to the others.
    pub fn connect(device: usize, bootstrap: &dyn Collective) -> Result<Self, CollectiveError> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        let fail = |reason: String| CollectiveError::Peer {
            rank,
            world,
            reason,
        };
        // SAFETY: only tries to open the shared libraries.
        let present = unsafe {
            cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present()
        };
        if !present {
            return Err(fail(
                "NCCL needs the CUDA driver (libcuda.so) and libnccl.so, which are not installed"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(device).map_err(|e| fail(format!("GPU {device}: {e}")))?;
        let stream = ctx.default_stream();
        let mut bytes = if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|c| *c as u8).collect()
        } else {
            Vec::new()
        };
        bootstrap.broadcast_bytes(&mut bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(fail(format!(
                "rank 0 sent a {}-byte NCCL id, not 128",
                bytes.len()
            )));
        }
        for (i, b) in internal.iter_mut().zip(&bytes) {
            *i = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(Arc::clone(&stream), rank, world, Id::uninit(internal))
            .map_err(|e| fail(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self {
            rank,
            world,
            inner: Mutex::new(Inner { comm, stream }),
        })
    }

    fn error(&self, reason: String) -> CollectiveError {
        CollectiveError::Peer {
            rank: self.rank,
            world: self.world,
            reason,
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, NcclFailure>,
    ) -> Result<T, CollectiveError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| self.error("the NCCL communicator's lock is poisoned".into()))?;
        f(&inner).map_err(|e| self.error(e.to_string()))
    }
}

/// Why an NCCL operation failed.
#[derive(Debug, thiserror::Error)]
enum NcclFailure {
    /// Copying to or from the GPU failed.
    #[error(transparent)]
    Copy(#[from] cudarc::driver::DriverError),
    /// The NCCL call failed.
    #[error("{op}: {detail}")]
    Nccl { op: &'static str, detail: String },
}

impl NcclFailure {
    fn nccl(op: &'static str, e: impl std::fmt::Debug) -> Self {
        Self::Nccl {
            op,
            detail: format!("{e:?}"),
        }
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let out = self.with(|i| {
            let mut buf = i.stream.clone_htod(data).map_err(NcclFailure::Copy)?;
            i.comm
                .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
                .map_err(|e| NcclFailure::nccl("ncclAllReduce", e))?;
            i.stream.clone_dtoh(&buf).map_err(NcclFailure::Copy)
        })?;
        data.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        if out.len() != local.len() * self.world {
            return Err(self.error(format!(
                "all_gather: {} values out for {} in from {} ranks",
                out.len(),
                local.len(),
                self.world
            )));
        }
        let got = self.with(|i| {
            let send = i.stream.clone_htod(local).map_err(NcclFailure::Copy)?;
            let mut recv = i
                .stream
                .alloc_zeros::<f32>(local.len() * self.world)
                .map_err(NcclFailure::Copy)?;
            i.comm
                .all_gather(&send, &mut recv)
                .map_err(|e| NcclFailure::nccl("ncclAllGather", e))?;
            i.stream.clone_dtoh(&recv).map_err(NcclFailure::Copy)
        })?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let root = i32::try_from(root)
            .ok()
            .filter(|r| (*r as usize) < self.world)
            .ok_or_else(|| self.error(format!("broadcast from rank {root}: no such rank")))?;
        let got = self.with(|i| {
            let mut buf = i.stream.clone_htod(data).map_err(NcclFailure::Copy)?;
            i.comm
                .broadcast_in_place(&mut buf, root)
                .map_err(|e| NcclFailure::nccl("ncclBroadcast", e))?;
            i.stream.clone_dtoh(&buf).map_err(NcclFailure::Copy)
        })?;
        data.copy_from_slice(&got);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without CUDA and NCCL, joining is an error that says what is
    /// missing, not a panic.
    #[test]
    fn no_nccl_is_an_error_not_a_panic() {
        // SAFETY: only tries to open the shared libraries.
        if unsafe {
            cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present()
        } {
            return;
        }
        let e = NcclRank::connect(0, &super::super::SingleRank)
            .unwrap_err()
            .to_string();
        assert!(e.contains("libnccl.so") && e.contains("rank 0 of 1"), "{e}");
    }
}
