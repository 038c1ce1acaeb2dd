//! Serving: a [`Deployment`] (a model, where its tensor-parallel ranks run,
//! the backend, the engine's limits and the HTTP settings) started with one
//! [`Deployment::start`], used by `dima serve` and by `[inference]` under
//! `dima up` alike. Rank 0 serves the OpenAI-compatible API ([`Running`]);
//! the other ranks follow its engine ([`Deployed::Following`]).
//!
//! Also here: [`load_ranks`] (the ranks this process holds), the load
//! client that `dima bench serve` and `[inference.load]` send through
//! ([`client`]), and [`ServeError`], whose variants carry a stable
//! `error_type()` and HTTP status.

mod answer;
mod body;
mod choice;
pub mod client;
mod error;
#[cfg(feature = "cuda")]
mod gpu;
mod http;
mod placement;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use error::{ServeError, Status};
#[cfg(feature = "cuda")]
pub use gpu::{gpu_shards, upload_rank};
pub use http::{Running, ServeConfig, bind, start, start_engine};
pub use placement::{Placement, describe_ranks, load_ranks, load_ranks_with_progress};

use crate::gemma::Gemma;

/// Where the model runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The CPU kernels.
    Cpu,
    /// NVIDIA GPUs (builds with `--features cuda`): one rank on each of
    /// `devices`, every rank in this process, joined by NCCL.
    Cuda {
        /// CUDA device ordinals, one per rank.
        devices: Vec<usize>,
        /// Positions each request's cache holds (prompt plus generation).
        max_context: usize,
    },
}

/// A model served: what `dima serve` and `[inference]` start.
#[derive(Clone, Debug)]
pub struct Deployment {
    /// The model file or checkpoint directory.
    pub model: PathBuf,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Where this process's ranks run.
    pub placement: Placement,
    /// CPU or GPUs.
    pub backend: Backend,
    /// How long a rank waits for its peers.
    pub collective_timeout: Duration,
    /// The server and engine settings.
    pub http: ServeConfig,
}

/// A rank this process holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankHeld {
    /// Its rank.
    pub rank: usize,
    /// Bytes of its weight slices (CPU ranks).
    pub weight_bytes: Option<usize>,
    /// Its GPU (CUDA ranks).
    pub device: Option<usize>,
}

/// A started deployment.
#[derive(Debug)]
pub enum Deployed {
    /// Rank 0: the API is being served.
    Serving {
        /// The server.
        server: Running,
        /// The ranks this process holds.
        ranks: Vec<RankHeld>,
        /// One line per CPU rank loaded ([`describe_ranks`]).
        description: String,
        /// Seconds spent loading.
        load_s: f64,
    },
    /// Another rank: it follows rank 0's engine ([`Deployed::follow`]).
    Following {
        /// Its rank.
        rank: usize,
        /// The rank's model.
        gemma: Box<Gemma>,
        /// One line: what it holds.
        description: String,
        /// Seconds spent loading.
        load_s: f64,
    },
}

impl Deployed {
    /// A following rank takes part in rank 0's steps until rank 0 stops
    /// it; `Serving` waits until the server stops.
    pub fn follow(self) -> Result<(), ServeError> {
        match self {
            Self::Serving { server, .. } => server.wait(),
            Self::Following { rank, gemma, .. } => crate::gemma::engine::follow(*gemma)
                .map_err(|source| ServeError::Follower { rank, source }),
        }
    }
}

impl Deployment {
    /// Loads this process's ranks and, on rank 0, starts the engine and
    /// the HTTP server; returns once the server listens (or the rank is
    /// ready to follow).
    pub fn start(&self) -> Result<Deployed, ServeError> {
        self.start_with_progress(|_, _| {})
    }

    /// [`start`](Self::start), calling `progress(layers done, layers)`
    /// while a CPU rank loads alone (see [`load_ranks_with_progress`]).
    pub fn start_with_progress(
        &self,
        progress: impl FnMut(usize, usize),
    ) -> Result<Deployed, ServeError> {
        match &self.backend {
            Backend::Cpu => self.start_cpu(progress),
            Backend::Cuda {
                devices,
                max_context,
            } => self.start_gpu(devices, *max_context),
        }
    }

    fn start_cpu(&self, progress: impl FnMut(usize, usize)) -> Result<Deployed, ServeError> {
        let started = Instant::now();
        let ranks = load_ranks_with_progress(
            &self.model,
            self.tp,
            self.placement,
            self.collective_timeout,
            progress,
        )?;
        let load_s = started.elapsed().as_secs_f64();
        let description = describe_ranks(&ranks);
        if let Placement::Tcp { rank, .. } = self.placement
            && rank != 0
        {
            let gemma = ranks.into_iter().next().ok_or(ServeError::NoRank)?;
            return Ok(Deployed::Following {
                rank,
                gemma: Box::new(gemma),
                description,
                load_s,
            });
        }
        let held = ranks
            .iter()
            .map(|g| RankHeld {
                rank: g.shard().rank,
                weight_bytes: Some(g.weight_bytes()),
                device: None,
            })
            .collect();
        let server = start(ranks, &self.http)?;
        Ok(Deployed::Serving {
            server,
            ranks: held,
            description,
            load_s,
        })
    }

    #[cfg(feature = "cuda")]
    fn start_gpu(&self, devices: &[usize], max_context: usize) -> Result<Deployed, ServeError> {
        let started = Instant::now();
        let listener = bind(self.http.listen)?;
        let (shards, tokenizer) = gpu_shards(
            &self.model,
            devices,
            (self.http.engine.max_batch, max_context),
            self.collective_timeout,
        )?;
        let load_s = started.elapsed().as_secs_f64();
        let held = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| RankHeld {
                rank,
                weight_bytes: None,
                device: Some(*device),
            })
            .collect();
        let engine = crate::gemma::engine::Engine::start_shards(shards, self.http.engine)?;
        let server = start_engine(engine, tokenizer, listener, &self.http)?;
        Ok(Deployed::Serving {
            server,
            ranks: held,
            description: String::new(),
            load_s,
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn start_gpu(&self, _devices: &[usize], _max_context: usize) -> Result<Deployed, ServeError> {
        Err(ServeError::NoCuda)
    }
}
