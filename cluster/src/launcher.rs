//! `dima up FILE`: start every process the manifest places on this machine.
//!
//! Each process is a child `dima run FILE --process I`. The launcher prefixes
//! the children's log lines with `[pI]`, collects their result lines, forwards
//! SIGINT/SIGTERM to them, and when one child fails it stops the others and
//! reports which process failed and how.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, UdpSocket};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::manifest::{LogFormat, Manifest};
use crate::process::{Job, RunError, check_listen};

/// The exit status of a `dima run` process that stopped because a peer
/// process went away: a consequence of another failure, not its cause.
pub const EXIT_PEER_LOST: i32 = 3;

/// How long children get to stop after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(5);

/// How long a process that only lost its peer waits to be reported, so that
/// the peer's own failure, if it is on this host, is named instead.
const CAUSE_GRACE: Duration = Duration::from_secs(2);

/// What `dima up` should run.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The manifest file, passed on to the children.
    pub manifest: PathBuf,
    /// Which job.
    pub job: Job,
    /// Overrides the job's event count.
    pub events: Option<u64>,
    /// Overrides `telemetry.log_format` in the children.
    pub log_format: Option<LogFormat>,
    /// Overrides `telemetry.log_level` in the children.
    pub log_level: Option<String>,
    /// Leave out `[inference]`.
    pub no_inference: bool,
    /// Ignore existing checkpoints.
    pub fresh: bool,
}

/// Why `dima up` did not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// No process of the manifest has an address of this machine.
    #[error(
        "no process of the manifest is placed on this machine (none of its addresses is local)"
    )]
    NothingLocal,
    /// A process's address is already taken.
    #[error(transparent)]
    Listen(#[from] RunError),
    /// A child could not be started.
    #[error("cannot start process {process}: {source}")]
    Spawn {
        /// The process index.
        process: usize,
        /// The spawn error.
        source: std::io::Error,
    },
    /// A child exited unsuccessfully; the others were stopped.
    #[error("process {process} ({address}) failed: {status}")]
    ProcessFailed {
        /// The process index.
        process: usize,
        /// Its address.
        address: String,
        /// How it ended, e.g. `exit status 1` or `killed by signal 9 (SIGKILL)`.
        status: String,
    },
    /// A signal stopped the cluster.
    #[error("stopped by {signal}; all processes were stopped")]
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: &'static str,
    },
    /// The processes finished but process 0 reported no result.
    #[error("every process exited successfully but process 0 reported no result line")]
    NoResult,
}

impl UpError {
    /// The exit code `dima up` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Interrupted { signal: "SIGINT" } => 130,
            Self::Interrupted { .. } => 143,
            _ => 1,
        }
    }
}

/// Whether this machine can listen on `ip`: loopback, unspecified, or one of
/// its interface addresses.
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

/// Describes how a child ended.
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(signal) => format!("killed by signal {signal} ({})", signal_name(signal)),
        None => status.to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

enum Event {
    Stdout(usize, String),
    Stderr(usize, String),
}

struct Running {
    index: usize,
    address: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// Runs the cluster's local processes to completion and returns the result
/// lines they reported (the JSON objects with a `"job"` key).
pub fn up(
    manifest: &Manifest,
    options: &UpOptions,
    exe: &Path,
) -> Result<Vec<serde_json::Value>, UpError> {
    let local: Vec<_> = manifest
        .dataflow
        .processes
        .iter()
        .filter(|p| is_local(p.address.ip()))
        .collect();
    if local.is_empty() {
        return Err(UpError::NothingLocal);
    }
    // Fail before starting anything when an address is taken.
    for process in &local {
        let field = format!("dataflow.processes[{}]", process.index);
        if manifest.dataflow.processes.len() > 1 {
            check_listen(process.address, &format!("{field}.address"))?;
        }
        if let Some(metrics) = process.metrics_address {
            check_listen(metrics, &format!("{field}.metrics_address"))?;
        }
    }

    if let Some(inference) = manifest
        .inference
        .as_ref()
        .filter(|_| !options.no_inference)
    {
        let here = |process: usize| local.iter().any(|p| p.index == process);
        if inference.ranks.first().is_some_and(|p| here(*p)) {
            check_listen(inference.listen, "inference.listen")?;
            if let (false, Some(root)) = (inference.in_one_process(), inference.root) {
                check_listen(root, "inference.root")?;
            }
        }
    }

    let interrupt = Arc::new(AtomicBool::new(false));
    let terminate = Arc::new(AtomicBool::new(false));
    // Registration only fails for forbidden signals; SIGINT/SIGTERM are not.
    // A second signal while the children are being stopped exits at once
    // (the children then get SIGTERM from the kernel: see PR_SET_PDEATHSIG).
    for (signal, flag, code) in [
        (signal_hook::consts::SIGINT, &interrupt, 130),
        (signal_hook::consts::SIGTERM, &terminate, 143),
    ] {
        let _ = signal_hook::flag::register_conditional_shutdown(signal, code, Arc::clone(flag));
        let _ = signal_hook::flag::register(signal, Arc::clone(flag));
    }

    let (tx, rx) = mpsc::channel::<Event>();
    let mut running: Vec<Running> = Vec::new();
    let mut readers = Vec::new();
    for process in &local {
        let mut command = Command::new(exe);
        command
            .arg("run")
            .arg(&options.manifest)
            .args([
                "--process",
                &process.index.to_string(),
                "--job",
                options.job.name(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches the launcher only,
            // which then stops the children in order.
            .process_group(0);
        if let Some(events) = options.events {
            command.args(["--events", &events.to_string()]);
        }
        if let Some(format) = options.log_format {
            command.args(["--log-format", format.as_str()]);
        }
        if let Some(level) = &options.log_level {
            command.args(["--log-level", level]);
        }
        if options.no_inference {
            command.arg("--no-inference");
        }
        if options.fresh {
            command.arg("--fresh");
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        // It makes the kernel SIGTERM the child if the launcher dies.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(source) => {
                stop_all(&mut running);
                return Err(UpError::Spawn {
                    process: process.index,
                    source,
                });
            }
        };
        let index = process.index;
        if let Some(stdout) = child.stdout.take() {
            readers.push(forward_lines(stdout, tx.clone(), move |line| {
                Event::Stdout(index, line)
            }));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(forward_lines(stderr, tx.clone(), move |line| {
                Event::Stderr(index, line)
            }));
        }
        tracing::debug!(process = index, pid = child.id(), "started");
        running.push(Running {
            index,
            address: process.address.to_string(),
            child,
            status: None,
        });
    }
    drop(tx);

    let json_logs = options.log_format == Some(LogFormat::Json)
        || (options.log_format.is_none() && manifest.telemetry.log_format == LogFormat::Json);
    let mut results = Vec::new();
    let mut handle = |event: Event| match event {
        Event::Stdout(index, line) => match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(value) if value.get("job").is_some() => results.push(value),
            _ => eprintln!("[p{index}] {line}"),
        },
        Event::Stderr(_, line) if json_logs && line.starts_with('{') => eprintln!("{line}"),
        Event::Stderr(index, line) => eprintln!("[p{index}] {line}"),
    };

    let mut consequences = Vec::new();
    let mut first_consequence: Option<Instant> = None;
    let outcome = loop {
        if let Ok(event) = rx.recv_timeout(Duration::from_millis(50)) {
            handle(event);
        }
        while let Ok(event) = rx.try_recv() {
            handle(event);
        }
        if interrupt.load(Ordering::Relaxed) || terminate.load(Ordering::Relaxed) {
            let signal = if interrupt.load(Ordering::Relaxed) {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            tracing::warn!(signal, "stopping every process");
            stop_all(&mut running);
            break Err(UpError::Interrupted { signal });
        }
        // Of the failures seen in one sweep, name the cause: a process that
        // only lost its peer is reported when nothing else failed.
        let mut failures = Vec::new();
        for process in running.iter_mut().filter(|p| p.status.is_none()) {
            if let Ok(Some(status)) = process.child.try_wait() {
                process.status = Some(status);
                if !status.success() {
                    let consequence = status.code() == Some(EXIT_PEER_LOST);
                    failures.push((consequence, process.index, process.address.clone(), status));
                }
            }
        }
        // A process that lost its peer can exit before the peer's own death
        // is visible here (the socket closes before the kernel reaps the
        // peer), so such failures wait up to [`CAUSE_GRACE`] for the cause.
        failures.append(&mut consequences);
        failures.sort_by_key(|(consequence, index, ..)| (*consequence, *index));
        let only_consequences = failures.iter().all(|(consequence, ..)| *consequence);
        if only_consequences && !failures.is_empty() {
            let since = *first_consequence.get_or_insert_with(Instant::now);
            if since.elapsed() < CAUSE_GRACE && running.iter().any(|p| p.status.is_none()) {
                consequences = failures;
                continue;
            }
        }
        if let Some((_, process, address, status)) = failures.into_iter().next() {
            let status = describe_status(status);
            tracing::error!(process, %address, %status, "process failed; stopping the others");
            stop_all(&mut running);
            break Err(UpError::ProcessFailed {
                process,
                address,
                status,
            });
        }
        if running.iter().all(|p| p.status.is_some()) {
            break Ok(());
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    while let Ok(event) = rx.try_recv() {
        handle(event);
    }
    outcome?;
    // Process 0 reports the result; when it runs on another host, that
    // host's launcher prints it.
    if results.is_empty() && local.iter().any(|p| p.index == 0) {
        return Err(UpError::NoResult);
    }
    if results.is_empty() {
        tracing::info!("process 0 runs on another host; the result is printed there");
    }
    Ok(results)
}

fn forward_lines(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<Event>,
    wrap: impl Fn(String) -> Event + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(wrap(line)).is_err() {
                break;
            }
        }
    })
}

/// SIGTERM every child still running, wait up to [`GRACE`], then SIGKILL.
fn stop_all(running: &mut [Running]) {
    for process in running.iter_mut().filter(|p| p.status.is_none()) {
        if let Ok(pid) = i32::try_from(process.child.id()) {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && running.iter().any(|p| p.status.is_none()) {
        for process in running.iter_mut().filter(|p| p.status.is_none()) {
            if let Ok(Some(status)) = process.child.try_wait() {
                process.status = Some(status);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for process in running.iter_mut().filter(|p| p.status.is_none()) {
        tracing::warn!(
            process = process.index,
            "did not stop within {GRACE:?}; killing it"
        );
        let _ = process.child.kill();
        process.status = process.child.wait().ok();
    }
}
