//! Helpers for Dima's end-to-end tests: locate the `dima` binary, pick free
//! loopback ports, write manifests, and run commands with a deadline.
//!
//! The tests start real `dima` processes, so the binary must be built first
//! (`scripts/test.sh` does it): `cargo build -p cluster --bin dima`. Set
//! `DIMA_BIN` to test another build.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `dima` executable under test.
pub fn dima_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DIMA_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/e2e-<hash> → target/<profile>/dima
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let dima = profile_dir.join("dima");
    assert!(
        dima.exists(),
        "{} does not exist: build it first with `cargo build -p cluster --bin dima` (same profile), or set DIMA_BIN",
        dima.display()
    );
    dima
}

/// The repository root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A loopback port that was free a moment ago, never handed out before in
/// this test binary (tests run in parallel: two of them must not be given
/// the same port when the kernel reuses a released one).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A manifest for `processes` × `workers` on loopback, with free ports.
/// `extra` is appended verbatim (more sections).
pub fn layout_manifest(processes: usize, workers: usize, extra: &str) -> String {
    let mut text = String::from("[cluster]\nname = \"e2e\"\n\n");
    for _ in 0..processes {
        text.push_str(&format!(
            "[[dataflow.processes]]\naddress = \"127.0.0.1:{}\"\nworkers = {workers}\n\n",
            free_port()
        ));
    }
    text.push_str(extra);
    text
}

/// Writes `text` as `name` in `dir` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Finished {
    /// Every stdout line parsed as JSON (panics on a line that is not).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    /// The last line of stdout.
    pub fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or_default()
    }

    /// Panics with everything printed unless the command succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "dima failed: {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts nothing panicked in any process.
    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "a panic was printed:\n{}",
            self.stderr
        );
        self
    }

    /// Asserts exit status `code`, every needle on stderr, and no panic.
    pub fn assert_rejected(&self, code: i32, needles: &[&str]) -> &Self {
        assert_eq!(self.status.code(), Some(code), "stderr:\n{}", self.stderr);
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "missing {needle:?} in:\n{}",
                self.stderr
            );
        }
        self.assert_no_panic()
    }
}

/// `dima events check PATH --format json`: the run and its JSON report.
pub fn check_events(path: &Path) -> (Finished, serde_json::Value) {
    let done = run_dima(
        &[
            "events",
            "check",
            path.to_str().unwrap(),
            "--format",
            "json",
        ],
        Duration::from_secs(300),
    );
    let report = serde_json::from_str(done.last_line()).unwrap();
    (done, report)
}

/// Starts `dima ARGS` with piped output.
pub fn spawn_dima(args: &[&str]) -> Child {
    Command::new(dima_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`, killing it (and failing) past that.
pub fn wait(mut child: Child, limit: Duration) -> Finished {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "dima did not finish within {limit:?}; stderr:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `dima ARGS` to completion within `limit`.
pub fn run_dima(args: &[&str], limit: Duration) -> Finished {
    wait(spawn_dima(args), limit)
}

/// PIDs of live processes whose command line contains every one of `needles`.
pub fn pids_with_args(needles: &[&str]) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let joined = args.join(" ");
        if needles.iter().all(|n| joined.contains(n)) {
            // Zombies keep their cmdline only until reaped; skip those already dead.
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !state.contains(") Z ") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Polls `check` every 20 ms until it returns `Some` or `limit` passes.
pub fn eventually<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET http://ADDRESS/PATH` over a plain TCP socket; the body, if 200.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The tansu broker binary: `DIMA_TANSU`, or where `scripts/tansu.sh`
/// installs it.
pub fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DIMA_TANSU") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("DIMA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/dima"));
    let bin = cache.join("tools/tansu-0.6.0/bin/tansu");
    assert!(
        bin.exists(),
        "{} does not exist: install the Kafka test broker with scripts/tansu.sh (scripts/test.sh does), or set DIMA_TANSU",
        bin.display()
    );
    bin
}

/// A Kafka-compatible broker (tansu, sqlite storage) on a loopback port,
/// stopped when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port, storing its data in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port())
    }

    /// Starts a broker on `port`, storing its data in `dir` (reusing what an
    /// earlier broker on the same `dir` stored).
    pub fn start_on(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, &[])
    }

    /// [`start_on`](Self::start_on) with more of tansu's broker flags
    /// (`--authentication`: SASL SCRAM for the users created before).
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Self {
        Self::start_advertising(dir, port, port, extra)
    }

    /// [`start_with`](Self::start_with), telling clients that the broker is
    /// at `advertised` (a proxy in front of it).
    pub fn start_advertising(dir: &Path, port: u16, advertised: u16, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let broker = Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        };
        let ready = eventually(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(
            ready.is_some(),
            "tansu did not listen on {port}: see {}",
            dir.join("tansu.log").display()
        );
        broker
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where its data lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a SCRAM-SHA-512 user with tansu's own tool (on a broker
    /// started without `--authentication`: the tool cannot sign in).
    pub fn create_user(&self, name: &str, password: &str) {
        let status = Command::new(tansu_bin())
            .args([
                "user",
                "create",
                name,
                password,
                "--mechanism",
                "scram512",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu user create {name}");
    }

    /// Stops the broker (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
