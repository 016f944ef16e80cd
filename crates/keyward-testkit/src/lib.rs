//! Test support for keyward: runs the REAL `keyward` binary on a temp data directory and
//! talks to it over loopback.
//!
//! - [`Keyward`] spawns `keyward serve` (port 0, `KEYWARD_LOG=trace` unless told otherwise),
//!   captures everything it writes on stdout and stderr, waits for its `listening` line, reads
//!   the one-time owner token, and stops it on drop (SIGTERM, then SIGKILL after a grace
//!   period). [`Keyward::cli`] runs admin commands against the same data directory.
//! - [`http::Http`]: a small JSON client (no proxy, no redirects) answering [`http::Resp`].
//! - [`canary`]: random canary keys and every encoded form a leak could take.
//! - [`files`]: every byte under a directory, for canary searches.
//! - [`db`]: direct SQLite access to the database file, to read blobs and to tamper.
//! - [`users`]: two OS users; with `KEYWARD_TEST_TWO_USERS=1` (as root) every instance runs
//!   `serve` as root dropping to them. Otherwise instances set `KEYWARD_ALLOW_SAME_USER=1`.
//!
//! This crate is test support only: when the server cannot be started or a helper meets
//! something it cannot work with, it panics with what it saw (the process output), because
//! the test it serves must stop loudly. That is why the panic-family lints are allowed here.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test harness: a failure must stop the calling test loudly, with context"
)]

pub mod canary;
pub mod db;
pub mod files;
pub mod http;
pub mod pg;
pub mod users;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use http::{Http, Resp};
pub use {reqwest, sqlx};

/// The stdout line that says the server is up.
pub const LISTENING_PREFIX: &str = "keyward: listening on ";
/// The first-start stdout line carrying the owner's one-time token.
pub const OWNER_TOKEN_PREFIX: &str = "keyward: owner token (shown once): ";
/// The first-start stdout line carrying the owner's account id.
pub const OWNER_ACCOUNT_PREFIX: &str = "keyward: owner account: ";

/// How to start a [`Keyward`].
#[derive(Debug, Clone)]
pub struct Options {
    /// `KEYWARD_LOG` for the server and the CLI.
    pub log: String,
    /// Extra environment, applied last (so it may override anything the harness sets).
    pub env: Vec<(String, String)>,
    /// How long to wait for the `listening` line (and, on a first start, the owner lines).
    pub ready_timeout: Duration,
    /// How long to wait after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Whether the first start must print the owner token and account lines.
    pub expect_owner: bool,
    /// Files written into the data dir before the first start (path relative to it,
    /// bytes, Unix mode): e.g. another node's KEK and audit-chain key.
    pub seed: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            log: "trace".to_owned(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(10),
            expect_owner: true,
            seed: Vec::new(),
        }
    }
}

impl Options {
    /// Copies the KEK and audit-chain key files of `other` into this instance's data dir
    /// before it starts, as the README tells operators of several nodes to do.
    pub fn same_keys_as(mut self, other: &Keyward) -> Self {
        for rel in ["kek/local-1.pub", "kek/local-1.key", "audit-chain.key"] {
            let bytes = std::fs::read(other.data_dir().join(rel)).expect("read key file of the first node");
            let mode = if rel.ends_with(".pub") { 0o644 } else { 0o600 };
            self.seed.push((PathBuf::from(rel), bytes, mode));
        }
        self.expect_owner = false;
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets `KEYWARD_LOG`.
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.to_owned();
        self
    }
}

/// Everything a process wrote, kept across restarts.
#[derive(Debug, Default)]
struct Capture {
    stdout: Mutex<Vec<u8>>,
    stderr: Mutex<Vec<u8>>,
    /// stdout and stderr interleaved line by line, as they arrived.
    combined: Mutex<Vec<u8>>,
    /// What every CLI run printed (stdout and stderr).
    cli: Mutex<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
struct Running {
    child: Child,
    readers: Vec<JoinHandle<()>>,
}

/// The output of one CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics (showing the whole run) unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "`keyward {}` failed: {self}", self.args.join(" "));
        self
    }

    /// Stdout parsed as one JSON value; panics with the whole run when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`keyward {}` stdout is not one JSON value ({e}): {self}",
                self.args.join(" ")
            )
        })
    }

    /// Stdout parsed as JSON lines (empty lines skipped).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "`keyward {}` printed a line that is not JSON ({e}): {l:?}",
                        self.args.join(" ")
                    )
                })
            })
            .collect()
    }

    /// Exit code (None when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A running `keyward serve` on its own temp data directory.
#[derive(Debug)]
pub struct Keyward {
    bin: PathBuf,
    opts: Options,
    dir: tempfile::TempDir,
    capture: Arc<Capture>,
    running: Option<Running>,
    base_url: String,
    http: Http,
    owner_token: Option<String>,
    owner_account: Option<String>,
    starts: u32,
}

impl Keyward {
    /// Creates a temp data dir and starts `bin serve` on it; returns once it listens.
    pub fn start(bin: &Path, opts: Options) -> Keyward {
        let dir = tempfile::Builder::new()
            .prefix("keyward-e2e-")
            .tempdir()
            .expect("create temp data dir");
        for (rel, bytes, mode) in &opts.seed {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create seed dir");
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700)).expect("chmod seed dir");
            }
            std::fs::write(&path, bytes).expect("write seed file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).expect("chmod seed file");
        }
        let mut kw = Keyward {
            bin: bin.to_owned(),
            opts,
            dir,
            capture: Arc::new(Capture::default()),
            running: None,
            base_url: String::new(),
            http: Http::new(""),
            owner_token: None,
            owner_account: None,
            starts: 0,
        };
        kw.spawn();
        kw
    }

    /// `start` with default options.
    pub fn start_default(bin: &Path) -> Keyward {
        Keyward::start(bin, Options::default())
    }

    /// The environment every process of this instance gets (server and CLI).
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        // Nothing from the environment of the test runner may steer the server.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYWARD_") {
                cmd.env_remove(&name);
            }
        }
        cmd.env("KEYWARD_DATA_DIR", self.dir.path())
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .env("KEYWARD_LOG", &self.opts.log)
            // Providers point at a closed loopback port: no test ever reaches the internet.
            .env("KEYWARD_ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
            .env("KEYWARD_OPENAI_BASE_URL", "http://127.0.0.1:9")
            .env("KEYWARD_GOOGLE_BASE_URL", "http://127.0.0.1:9")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1");
        match users::two_users_mode() {
            Some((gateway, worker)) => {
                cmd.env("KEYWARD_USER", gateway).env("KEYWARD_WORKER_USER", worker);
            }
            // The tests run the workers as their own user; `serve` refuses that unless told.
            None => {
                cmd.env("KEYWARD_ALLOW_SAME_USER", "1");
            }
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        assert!(self.running.is_none(), "keyward is already running");
        let first = self.starts == 0;
        self.starts += 1;
        let mark = lock(&self.capture.stdout).len();
        let mut cmd = self.command();
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} serve: {e}", self.bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            pump(stdout, Arc::clone(&self.capture), Stream::Stdout),
            pump(stderr, Arc::clone(&self.capture), Stream::Stderr),
        ];
        self.running = Some(Running { child, readers });

        let need_owner = first && self.opts.expect_owner;
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            let out = String::from_utf8_lossy(lock(&self.capture.stdout).get(mark..).unwrap_or_default()).into_owned();
            let listening = line_value(&out, LISTENING_PREFIX);
            let token = line_value(&out, OWNER_TOKEN_PREFIX);
            let account = line_value(&out, OWNER_ACCOUNT_PREFIX);
            if let Some(url) = listening {
                if !need_owner || (token.is_some() && account.is_some()) {
                    assert!(
                        url.starts_with("http://127.0.0.1:"),
                        "unexpected listening URL {url:?}\n{}",
                        self.output()
                    );
                    self.base_url = url.trim_end_matches('/').to_owned();
                    self.http = Http::new(&self.base_url);
                    if let Some(t) = token {
                        self.owner_token = Some(t);
                    }
                    if let Some(a) = account {
                        self.owner_account = Some(a);
                    }
                    return;
                }
            }
            let exited = self.running.as_mut().and_then(|r| r.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.join_readers(Duration::from_secs(2));
                panic!("keyward serve exited ({status}) before it was ready\n{}", self.output());
            }
            if Instant::now() > deadline {
                self.kill_now();
                panic!(
                    "keyward serve was not ready within {:?} (need listening line{})\n{}",
                    self.opts.ready_timeout,
                    if need_owner { " and owner lines" } else { "" },
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT` of the current run.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The HTTP client of the current run (the port changes on restart).
    pub fn http(&self) -> &Http {
        &self.http
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<data_dir>/keyward.db`.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("keyward.db")
    }

    /// The owner token printed on the first start.
    pub fn owner_token(&self) -> &str {
        self.owner_token.as_deref().expect("no owner token was printed")
    }

    /// The owner account id printed on the first start.
    pub fn owner_account(&self) -> &str {
        self.owner_account.as_deref().expect("no owner account was printed")
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// Everything the server wrote so far (all runs), stdout and stderr interleaved by line.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output_bytes()).into_owned()
    }

    pub fn output_bytes(&self) -> Vec<u8> {
        lock(&self.capture.combined).clone()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&lock(&self.capture.stdout)).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&lock(&self.capture.stderr)).into_owned()
    }

    /// Everything every CLI run of this instance printed (stdout and stderr).
    pub fn cli_output_bytes(&self) -> Vec<u8> {
        lock(&self.capture.cli).clone()
    }

    /// A `keyward` command on this data directory (the environment `cli` uses), for a test
    /// that must start a CLI run and stop it halfway.
    pub fn cli_command(&self) -> Command {
        self.command()
    }

    /// Runs `keyward <args>` on this data directory.
    pub fn cli<S: AsRef<str>>(&self, args: &[S]) -> CliOutput {
        self.cli_with_stdin(args, None)
    }

    /// Runs `keyward <args>` on this data directory, feeding `stdin` (or /dev/null).
    pub fn cli_with_stdin<S: AsRef<str>>(&self, args: &[S], stdin: Option<&[u8]>) -> CliOutput {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = self.command();
        cmd.args(args.iter().map(OsString::from))
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn keyward {}: {e}", args.join(" ")));
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            let bytes = bytes.to_vec();
            // A writer thread, so a child that does not read cannot deadlock us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let out = wait_with_timeout(child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("keyward {} did not finish within 60 s", args.join(" ")));
        {
            let mut log = lock(&self.capture.cli);
            log.extend_from_slice(&out.stdout);
            log.extend_from_slice(&out.stderr);
        }
        CliOutput {
            args,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stops the server (SIGTERM, SIGKILL after the grace period) and keeps the data dir.
    /// Returns how it exited (None if it was not running).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut running = self.running.take()?;
        let pid = running.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + self.opts.stop_grace;
        let status = loop {
            match running.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = running.child.kill();
                    break running.child.wait().ok();
                }
            }
        };
        self.running = Some(running);
        self.join_readers(Duration::from_secs(3));
        status
    }

    /// Kills the server at once (SIGKILL: no shutdown, no final checkpoint), keeping the
    /// data dir, as a crash or power cut would.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut running = self.running.take()?;
        let _ = running.child.kill();
        let status = running.child.wait().ok();
        self.running = Some(running);
        self.join_readers(Duration::from_secs(3));
        status
    }

    /// Stops and starts the server again on the same data dir; returns once it listens.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts a stopped server again.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    fn kill_now(&mut self) {
        if let Some(r) = self.running.as_mut() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.join_readers(Duration::from_secs(2));
    }

    /// Waits (bounded) for the output pumps to reach EOF so no output is lost, then forgets
    /// the run.
    fn join_readers(&mut self, max: Duration) {
        let Some(running) = self.running.take() else { return };
        let deadline = Instant::now() + max;
        while running.readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in running.readers {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Every regular file under the data dir, with its bytes.
    pub fn data_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        files::read_tree(self.dir.path())
    }

    /// A connection pool on the database file (busy timeout 10 s), for reads and tampering.
    pub async fn db(&self) -> sqlx::SqlitePool {
        db::connect(&self.db_path()).await
    }
}

impl Drop for Keyward {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.opts.stop_grace = self.opts.stop_grace.min(Duration::from_secs(5));
            self.stop();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// A thread copying one pipe into the capture buffers, line by line, until EOF.
fn pump(pipe: impl Read + Send + 'static, capture: Arc<Capture>, stream: Stream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let own = match stream {
                        Stream::Stdout => &capture.stdout,
                        Stream::Stderr => &capture.stderr,
                    };
                    lock(own).extend_from_slice(&line);
                    let mut all = lock(&capture.combined);
                    all.extend_from_slice(&line);
                    if !line.ends_with(b"\n") {
                        all.push(b'\n');
                    }
                }
            }
        }
    })
}

/// The rest of the first line of `out` that starts with `prefix`, trimmed.
fn line_value(out: &str, prefix: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `wait_with_output` with a deadline (the child is killed past it).
fn wait_with_timeout(mut child: Child, max: Duration) -> Option<std::process::Output> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = read_all(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_t = read_all(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + max;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    Some(std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_value_finds_prefixed_lines() {
        let out = "noise\nkeyward: listening on http://127.0.0.1:4242\nkeyward: owner token (shown once): kw_abc\n";
        assert_eq!(
            line_value(out, LISTENING_PREFIX).as_deref(),
            Some("http://127.0.0.1:4242")
        );
        assert_eq!(line_value(out, OWNER_TOKEN_PREFIX).as_deref(), Some("kw_abc"));
        assert_eq!(line_value(out, OWNER_ACCOUNT_PREFIX), None);
    }
}
