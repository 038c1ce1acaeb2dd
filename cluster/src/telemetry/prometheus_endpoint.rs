//! `GET /metrics`: the process's registry as Prometheus text.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use prometheus::{Encoder, Registry, TextEncoder};

/// A running metrics endpoint on its own thread.
#[derive(Debug)]
pub struct MetricsEndpoint {
    address: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

async fn metrics(registry: web::Data<Registry>) -> HttpResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => HttpResponse::Ok()
            .content_type(encoder.format_type())
            .body(body),
        Err(e) => HttpResponse::InternalServerError().body(format!("cannot encode metrics: {e}\n")),
    }
}

impl MetricsEndpoint {
    /// Binds `address` (failing at once if it is taken) and serves from a thread.
    pub fn start(address: SocketAddr, registry: Registry) -> std::io::Result<Self> {
        // Bind here, on the caller's thread, so "address in use" is an error
        // the caller sees rather than a log line from a background thread.
        let listener = std::net::TcpListener::bind(address)?;
        let bound = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("metrics-endpoint".into())
            .spawn(move || {
                let system = actix_web::rt::System::new();
                let failed = tx.clone();
                let served = system.block_on(async move {
                    let registry = web::Data::new(registry);
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(registry.clone())
                            .route("/metrics", web::get().to(metrics))
                    })
                    .workers(1)
                    .disable_signals()
                    .listen(listener)?
                    .run();
                    let _ = tx.send(Ok(server.handle()));
                    server.await
                });
                if let Err(e) = served {
                    let _ = failed.send(Err(e));
                }
            })?;
        let handle = rx
            .recv()
            .map_err(|_| std::io::Error::other("metrics endpoint thread ended before serving"))??;
        Ok(Self {
            address: bound,
            handle,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving and joins the thread.
    pub fn stop(mut self) {
        let handle = self.handle.clone();
        // `stop` is a future; a tiny runtime drives it to completion.
        actix_web::rt::System::new().block_on(handle.stop(true));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
