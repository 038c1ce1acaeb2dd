//! `ServeError`: everything that can go wrong in serving, from a bad request
//! body to a rank that did not load, each with a stable [`error_type`] (the
//! OpenAI error `type` of HTTP bodies, and the metric label) and an HTTP
//! status.
//!
//! [`error_type`]: ServeError::error_type

use std::net::SocketAddr;

use crate::gemma::LoadError;
use crate::gemma::engine::Rejected;
use kernels::collective::CollectiveError;

/// An HTTP status code (kept as a number so this type needs no web crate).
pub type Status = u16;

/// What went wrong while serving, or while starting to.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed or asks for something invalid.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, naming the field.
        message: String,
        /// The request field at fault (OpenAI's `param`), when one is.
        param: Option<String>,
    },
    /// The bearer token is missing or wrong.
    #[error("missing or wrong bearer token (Authorization: Bearer …)")]
    Unauthorized,
    /// The request names a model this server does not serve.
    #[error("the model `{requested}` does not exist; this server serves `{served}`")]
    ModelNotFound {
        /// The model asked for.
        requested: String,
        /// The model served.
        served: String,
    },
    /// The body is larger than the server takes.
    #[error("the body is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client took too long to send the body.
    #[error("the request body did not arrive within {seconds} s")]
    BodyTimeout {
        /// The limit.
        seconds: f64,
    },
    /// The client took too long to send a request's headers.
    #[error("the request headers did not arrive within {seconds} s")]
    HeaderTimeout {
        /// The limit.
        seconds: f64,
    },
    /// One client address has as many generation requests in progress as
    /// the server allows it.
    #[error(
        "{client} already has {limit} requests in progress, the most this server allows one client (--max-streams-per-client); try again when one ends"
    )]
    TooManyStreams {
        /// The client's address.
        client: std::net::IpAddr,
        /// The limit.
        limit: usize,
    },
    /// The body could not be read.
    #[error("cannot read the body: {reason}")]
    Body {
        /// Why.
        reason: String,
    },
    /// A route that exists, asked with another method.
    #[error("{path} takes {allowed} only")]
    MethodNotAllowed {
        /// The route.
        path: &'static str,
        /// The method it takes.
        allowed: &'static str,
    },
    /// No route at this path.
    #[error("no such endpoint (try /v1/completions, /v1/chat/completions, /v1/models, /health)")]
    NoSuchEndpoint,
    /// The engine did not take the request.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The client closed its connection before its answer was ready (the
    /// request was stopped; nothing is sent).
    #[error("the client closed the connection before the answer")]
    ClientGone,
    /// The engine failed the request after taking it.
    #[error("{reason}")]
    Failed {
        /// Why.
        reason: String,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server could not start.
    #[error("cannot start the HTTP server: {0}")]
    Start(std::io::Error),
    /// The HTTP server stopped before it listened.
    #[error("the HTTP server stopped while starting")]
    StoppedWhileStarting,
    /// The HTTP server failed while running.
    #[error("the HTTP server failed: {0}")]
    Server(std::io::Error),
    /// The HTTP server's thread panicked.
    #[error("the HTTP server panicked")]
    ServerPanicked,
    /// The server's Prometheus metrics could not be registered.
    #[error("cannot set up the server's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The engine could not start, or a step failed.
    #[error(transparent)]
    Engine(#[from] crate::gemma::engine::EngineError),
    /// A rank that followed rank 0's engine stopped with an error.
    #[error("rank {rank} stopped: {source}")]
    Follower {
        /// The rank.
        rank: usize,
        /// Why.
        source: crate::gemma::engine::EngineError,
    },
    /// There is no rank to serve.
    #[error("no rank to serve")]
    NoRank,
    /// A tensor-parallel size of 0.
    #[error("the tensor-parallel size must be at least 1")]
    NoRanks,
    /// A rank at or above the group's size.
    #[error("rank {rank} is not below the tensor-parallel size {tp}")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The group's size.
        tp: usize,
    },
    /// Loading a rank panicked.
    #[error("loading rank {rank} panicked")]
    RankPanicked {
        /// The rank.
        rank: usize,
    },
    /// A rank's model did not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The ranks could not meet.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The device model failed.
    #[error(transparent)]
    DeviceModel(#[from] crate::gemma::device::DeviceModelError),
    /// A GPU deployment names no device.
    #[error("no GPU to run on")]
    NoGpu,
    /// The GPU failed.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] kernels::cuda::GpuError),
    /// A rank's weights do not fit its GPU.
    #[error(
        "the model needs {need_gib:.2} GiB of bf16 weights on {gpu} but only {free_gib:.2} GiB are free: refusing"
    )]
    GpuTooSmall {
        /// GiB of bf16 weights the rank needs.
        need_gib: f64,
        /// The GPU's name.
        gpu: String,
        /// GiB free on it.
        free_gib: f64,
    },
    /// This build has no CUDA backend.
    #[error(
        "this dima was built without CUDA: build it with `cargo build --release -p cluster --features cuda`"
    )]
    NoCuda,
}

impl ServeError {
    /// A 400 naming what is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A 400 about the request field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The request field at fault, when one is (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::BadRequest { param, .. } => param.as_deref(),
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// OpenAI's `code` for this error, when it has one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::BadRequest { .. } => Some("invalid_value"),
            _ => None,
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> Status {
        match self {
            Self::BadRequest { .. } | Self::Body { .. } | Self::Rejected(Rejected::Invalid(_)) => {
                400
            }
            Self::MethodNotAllowed { .. } => 405,
            Self::BodyTimeout { .. } | Self::HeaderTimeout { .. } => 408,
            // nginx's "client closed request": only the metrics see it.
            Self::ClientGone => 499,
            Self::TooLarge { .. } => 413,
            Self::Unauthorized => 401,
            Self::ModelNotFound { .. } | Self::NoSuchEndpoint => 404,
            Self::Rejected(Rejected::Busy { .. }) | Self::TooManyStreams { .. } => 429,
            Self::Rejected(Rejected::Stopped | Rejected::Unavailable(_)) | Self::Failed { .. } => {
                503
            }
            _ => 500,
        }
    }

    /// The stable kind of this error: the OpenAI error `type` of its HTTP
    /// body, and its label in metrics.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            400 | 401 | 404 | 405 | 408 | 413 | 499 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "server_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_and_type() {
        let busy = ServeError::Rejected(Rejected::Busy {
            waiting: 3,
            limit: 3,
        });
        assert_eq!(
            (busy.status(), busy.error_type()),
            (429, "rate_limit_error")
        );
        let bad = ServeError::bad_request("`prompt` must be a string");
        assert_eq!(
            (bad.status(), bad.error_type()),
            (400, "invalid_request_error")
        );
        assert_eq!(ServeError::Unauthorized.status(), 401);
        assert_eq!(ServeError::NoSuchEndpoint.status(), 404);
        let gone = ServeError::Rejected(Rejected::Stopped);
        assert_eq!((gone.status(), gone.error_type()), (503, "server_error"));
        assert_eq!(ServeError::NoRank.status(), 500);
        let big = ServeError::TooLarge { limit: 10 };
        assert_eq!(
            (big.status(), big.error_type()),
            (413, "invalid_request_error")
        );
        let get = ServeError::MethodNotAllowed {
            path: "/v1/completions",
            allowed: "POST",
        };
        assert_eq!(get.status(), 405);
    }
}
