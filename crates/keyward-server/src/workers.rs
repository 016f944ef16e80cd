//! The worker pool: `serve` starts `KEYWARD_WORKERS` isolated `keyward worker` processes,
//! restarts any that dies (with backoff), and lends out connections to them.
//!
//! Each worker listens on its own socket under `<data_dir>/run/` and accepts only its
//! parent. A connection carries one exchange at a time and is reused; the connections of
//! a worker that died are dropped with it (each is tagged with the worker's generation).
//!
//! With `KEYWARD_WORKER_SOCKETS` (workers run as their own service, or by the supervisor a
//! root-started `serve` leaves behind as the worker user: see `users.rs`), the pool starts
//! nothing: it connects to those sockets, pings each worker, and counts a new worker pid
//! behind a socket (SO_PEERCRED) as a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_crypto::SealedKey;
use keyward_worker_protocol::protocol::{CallRequest, FailKind, RewrapRequest};
use keyward_worker_protocol::{WorkerConn, WorkerError};
use tokio::process::Command;

use crate::config::{Config, WorkerProcess};
use crate::metrics::Metrics;

#[derive(Debug)]
struct Slot {
    index: usize,
    socket: PathBuf,
    up: AtomicBool,
    generation: AtomicU64,
    pid: AtomicU64,
    /// Connections not on loan, oldest release at the bottom: (generation, released, conn).
    idle: Mutex<Vec<IdleConn>>,
}

type IdleConn = (u64, Instant, WorkerConn);

/// How long a connection to a worker may sit unused before it is closed. A burst of
/// concurrent calls opens one connection per call in flight, each with buffers on both
/// sides and a descriptor in each process; kept forever, 256 connections from one burst
/// held ~2 x 256 descriptors and about 10 MiB of gateway and worker memory long after.
/// Opening one again costs a Unix-socket connect and the worker's peer check.
const IDLE_CONN_LIMIT: Duration = Duration::from_secs(10);

/// At most this many idle connections per worker.
const MAX_IDLE_PER_WORKER: usize = 256;

/// Takes out of `idle` the entries released more than `limit` before `now`. Entries are
/// pushed in release order and reused from the top, so the stale ones are a prefix.
fn take_stale<T>(idle: &mut Vec<(u64, Instant, T)>, now: Instant, limit: Duration) -> Vec<(u64, Instant, T)> {
    let stale = idle.partition_point(|(_, released, _)| now.saturating_duration_since(*released) > limit);
    idle.drain(..stale).collect()
}

/// How `serve` starts a worker: this same binary, `worker` subcommand, with an
/// environment holding only the settings a worker uses (never the gateway's own
/// environment: it may hold database credentials or cloud secrets).
#[derive(Clone)]
pub struct WorkerCommand {
    pub exe: PathBuf,
    pub env: Vec<(String, String)>,
    /// Workers started by someone else (`KEYWARD_WORKER_SOCKETS`): connect, never spawn.
    pub sockets: Vec<PathBuf>,
    /// The root-started supervisor's stdin (`users.rs`): how the gateway asks it to restart
    /// its workers, which it may not signal itself.
    pub control: Option<Arc<Mutex<std::process::ChildStdin>>>,
    /// `KEYWARD_ALLOW_SAME_USER`: a worker behind a socket may run as the gateway's own uid.
    pub allow_same_user: bool,
}

impl std::fmt::Debug for WorkerCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCommand")
            .field("exe", &self.exe)
            .finish_non_exhaustive()
    }
}

impl WorkerCommand {
    /// The worker's settings, taken from the gateway's configuration.
    pub fn new(exe: PathBuf, config: &Config) -> WorkerCommand {
        let mut env = vec![
            ("KEYWARD_DATA_DIR".to_owned(), config.data_dir.display().to_string()),
            // Without what only the gateway may know (AWS KMS: its credentials file).
            ("KEYWARD_KEK".to_owned(), config.kek.worker_value()),
            (
                "KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS".to_owned(),
                config.provider.connect_timeout_ms.to_string(),
            ),
            ("KEYWARD_WORKER_THREADS".to_owned(), config.worker.threads.to_string()),
            ("KEYWARD_LOG".to_owned(), config.log.clone()),
            ("KEYWARD_LOG_FORMAT".to_owned(), config.log_format.as_str().to_owned()),
        ];
        for provider in keyward_core::Provider::ALL {
            env.push((Config::base_url_var(provider), config.base_url(provider).to_owned()));
        }
        // What the backend's own library needs (PKCS#11: the module's setting, e.g.
        // SOFTHSM2_CONF, named in KEYWARD_KEK).
        env.extend(config.kek.worker_env());
        WorkerCommand {
            exe,
            env,
            sockets: config.worker.sockets.clone(),
            control: None,
            allow_same_user: config.allow_same_user,
        }
    }

    /// Starts one worker listening on `socket`, as a child of this process (the only
    /// process it will accept), killed when the handle drops. For `keyward kek rewrap`.
    pub fn spawn_worker(&self, socket: &std::path::Path) -> std::io::Result<tokio::process::Child> {
        Command::new(&self.exe)
            .arg("worker")
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(WorkerProcess::SOCKET_VAR, socket)
            .env(WorkerProcess::PARENT_VAR, std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
    }
}

/// A worker started by (and so accepting only) this process, for the CLI commands that need
/// one: `keyward kek rewrap` and `keyward catalogue check`. Killed when dropped.
pub struct SoloWorker {
    conn: WorkerConn,
    socket: PathBuf,
    /// `None`: a worker of `KEYWARD_WORKER_SOCKETS`, not ours to stop.
    child: Option<tokio::process::Child>,
}

impl std::fmt::Debug for SoloWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoloWorker")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// How long a one-off job (a re-wrap, a KEK check) waits for a worker it did not start
/// to answer on one of `KEYWARD_WORKER_SOCKETS`.
const SOLO_WAIT_FOR_A_WORKER: Duration = Duration::from_secs(15);

/// A provider's whole answer, as a worker relayed it.
#[derive(Debug)]
pub struct SoloAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A connection to the worker at `socket` that has answered a ping.
async fn answering(socket: &std::path::Path) -> Result<WorkerConn, String> {
    let mut conn = WorkerConn::connect(socket).await.map_err(|e| e.to_string())?;
    conn.ping().await.map_err(|e| e.to_string())?;
    Ok(conn)
}

impl SoloWorker {
    /// Starts a worker on `<data_dir>/run/<purpose>-<pid>-<n>.sock` and waits for its pong.
    pub async fn start(
        command: &WorkerCommand,
        data_dir: &std::path::Path,
        purpose: &str,
    ) -> Result<SoloWorker, String> {
        if !command.sockets.is_empty() {
            // Workers run by someone else: borrow one that answers. At start (the start-up
            // re-wrap) they may still be coming up, as after a restart of their service.
            let deadline = Instant::now() + SOLO_WAIT_FOR_A_WORKER;
            loop {
                for socket in &command.sockets {
                    if let Ok(conn) = answering(socket).await {
                        return Ok(SoloWorker {
                            conn,
                            socket: socket.clone(),
                            child: None,
                        });
                    }
                }
                if Instant::now() >= deadline {
                    return Err(format!("no worker answers on KEYWARD_WORKER_SOCKETS ({purpose})"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let run = data_dir.join("run");
        let err = |e: std::io::Error| e.to_string();
        std::fs::create_dir_all(&run).map_err(err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        // Unique per start: an earlier one's worker may still be going away.
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let socket = run.join(format!("{purpose}-{}-{n}.sock", std::process::id()));
        let mut child = command.spawn_worker(&socket).map_err(err)?;
        for _ in 0..500 {
            if let Ok(conn) = answering(&socket).await {
                return Ok(SoloWorker {
                    conn,
                    socket,
                    child: Some(child),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the worker exited during start-up ({status}); see its log above"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the worker did not become ready".to_owned())
    }

    /// `Ok(Ok(blob))`, `Ok(Err(why))` when the worker refused this blob, `Err` when the
    /// worker is gone.
    pub async fn rewrap(&mut self, request: &RewrapRequest) -> Result<Result<SealedKey, String>, String> {
        match self.conn.rewrap(request).await {
            Ok(b) => Ok(Ok(SealedKey::from_bytes(b))),
            Err(WorkerError::Refused { message, .. }) => Ok(Err(message)),
            Err(gone) => Err(gone.to_string()),
        }
    }

    /// One provider call with a sealed key: the whole answer (at most `limit` body bytes),
    /// `Ok(Err((kind, why)))` when the worker could not make it, `Err` when the worker is gone.
    pub async fn call(
        &mut self,
        request: &CallRequest,
        limit: usize,
    ) -> Result<Result<SoloAnswer, (FailKind, String)>, String> {
        let refused_or_gone = |e: WorkerError| match e {
            WorkerError::Refused { kind, message } => Ok(Err((kind, message))),
            gone => Err(gone.to_string()),
        };
        let head = match self.conn.call(request).await {
            Ok(head) => head,
            Err(e) => return refused_or_gone(e),
        };
        let mut body = Vec::new();
        loop {
            match self.conn.next_chunk().await {
                Ok(Some(c)) => {
                    if body.len() + c.len() > limit {
                        return Err("the provider's answer is larger than keyward accepts".to_owned());
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => {
                    return Ok(Ok(SoloAnswer {
                        status: head.status,
                        headers: head.headers,
                        body,
                    }))
                }
                Err(e) => return refused_or_gone(e),
            }
        }
    }
}

impl Drop for SoloWorker {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

#[derive(Debug)]
pub struct WorkerPool {
    slots: Vec<Arc<Slot>>,
    /// Workers behind `KEYWARD_WORKER_SOCKETS` (not started by this pool).
    external: bool,
    control: Option<Arc<Mutex<std::process::ChildStdin>>>,
    next: AtomicUsize,
    /// Signalled whenever a worker comes up.
    came_up: Arc<tokio::sync::Notify>,
}

/// How long a call waits for a worker when none is up (at start-up, before the first has
/// answered its ping, or while the only one restarts) before it fails `worker_unavailable`.
/// A worker comes up in tens of milliseconds.
const WAIT_FOR_A_WORKER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("no worker is available")]
pub struct Unavailable;

/// What one pass over the slots found.
enum Attempt {
    Leased(Lease),
    /// Workers are up, but none took a connection.
    NoneAnswered,
    /// No worker is up at all.
    NoneUp,
}

/// A connection on loan; give it back with [`Lease::release`] after a complete exchange.
#[derive(Debug)]
pub struct Lease {
    conn: WorkerConn,
    slot: Arc<Slot>,
    generation: u64,
}

/// A lease is used as the connection it lends (its typed exchanges).
impl std::ops::Deref for Lease {
    type Target = WorkerConn;
    fn deref(&self) -> &WorkerConn {
        &self.conn
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut WorkerConn {
        &mut self.conn
    }
}

impl Lease {
    /// Returns the connection for reuse (only after a complete, clean exchange).
    pub fn release(self) {
        if self.slot.up.load(Ordering::Acquire) && self.slot.generation.load(Ordering::Acquire) == self.generation {
            if let Ok(mut idle) = self.slot.idle.lock() {
                if idle.len() < MAX_IDLE_PER_WORKER {
                    // Read under the lock, so the stack stays in release order.
                    idle.push((self.generation, Instant::now(), self.conn));
                }
            }
        }
    }
}

impl WorkerPool {
    /// Starts `count` supervised workers. Their sockets live in `run_dir` (created 0700).
    pub fn start(
        count: u16,
        run_dir: PathBuf,
        command: WorkerCommand,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<WorkerPool>> {
        if !command.sockets.is_empty() {
            return Ok(WorkerPool::connect(command, metrics));
        }
        std::fs::create_dir_all(&run_dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let slots: Vec<Arc<Slot>> = (0..usize::from(count))
            .map(|index| {
                Arc::new(Slot {
                    index,
                    socket: run_dir.join(format!("worker-{index}.sock")),
                    up: AtomicBool::new(false),
                    generation: AtomicU64::new(0),
                    pid: AtomicU64::new(0),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let came_up = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(close_idle_connections(slots.clone()));
        for slot in &slots {
            tokio::spawn(supervise(
                slot.clone(),
                command.clone(),
                metrics.clone(),
                Arc::clone(&came_up),
            ));
        }
        Ok(Arc::new(WorkerPool {
            slots,
            external: false,
            control: None,
            next: AtomicUsize::new(0),
            came_up,
        }))
    }

    /// A pool of the workers behind `command.sockets`, watched but never started.
    fn connect(command: WorkerCommand, metrics: Arc<Metrics>) -> Arc<WorkerPool> {
        let slots: Vec<Arc<Slot>> = command
            .sockets
            .iter()
            .enumerate()
            .map(|(index, socket)| {
                Arc::new(Slot {
                    index,
                    socket: socket.clone(),
                    up: AtomicBool::new(false),
                    generation: AtomicU64::new(0),
                    pid: AtomicU64::new(0),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let came_up = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(close_idle_connections(slots.clone()));
        for slot in &slots {
            tokio::spawn(watch_external(
                slot.clone(),
                metrics.clone(),
                Arc::clone(&came_up),
                command.allow_same_user,
            ));
        }
        Arc::new(WorkerPool {
            slots,
            external: true,
            control: command.control,
            next: AtomicUsize::new(0),
            came_up,
        })
    }

    pub fn ready(&self) -> usize {
        self.slots.iter().filter(|s| s.up.load(Ordering::Acquire)).count()
    }

    /// A connection to a live worker, round robin. With no worker up, waits up to
    /// [`WAIT_FOR_A_WORKER`] for one.
    pub async fn lease(&self) -> Result<Lease, Unavailable> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_A_WORKER;
        loop {
            // Registered before the slots are looked at, so a worker coming up in between
            // is not missed.
            let came_up = self.came_up.notified();
            tokio::pin!(came_up);
            came_up.as_mut().enable();
            match self.try_lease().await {
                Attempt::Leased(lease) => return Ok(lease),
                Attempt::NoneUp if tokio::time::Instant::now() < deadline => {
                    if tokio::time::timeout_at(deadline, came_up).await.is_err() {
                        return Err(Unavailable);
                    }
                }
                Attempt::NoneUp | Attempt::NoneAnswered => return Err(Unavailable),
            }
        }
    }

    /// An idle connection to a live worker, trying first the worker whose turn it is in the
    /// round robin; a new connection only when no worker has one idle. (Opening one whenever
    /// the worker whose turn it was had none idle let each worker's connections grow to the
    /// peak concurrency: after 10 s at 256 client connections the gateway held ~480 worker
    /// connections for at most 256 calls in flight.)
    async fn try_lease(&self) -> Attempt {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let in_turn = || {
            (0..n)
                .filter_map(move |i| self.slots.get((start + i) % n))
                .filter(|slot| slot.up.load(Ordering::Acquire))
        };
        let mut any_up = false;
        for slot in in_turn() {
            any_up = true;
            let generation = slot.generation.load(Ordering::Acquire);
            let reused = slot.idle.lock().ok().and_then(|mut idle| {
                while let Some((g, _, c)) = idle.pop() {
                    if g == generation {
                        return Some(c);
                    }
                }
                None
            });
            if let Some(conn) = reused {
                return Attempt::Leased(Lease {
                    conn,
                    slot: slot.clone(),
                    generation,
                });
            }
        }
        for slot in in_turn() {
            let generation = slot.generation.load(Ordering::Acquire);
            match WorkerConn::connect(&slot.socket).await {
                Ok(conn) => {
                    return Attempt::Leased(Lease {
                        conn,
                        slot: slot.clone(),
                        generation,
                    })
                }
                Err(e) => tracing::debug!(worker = slot.index, error = %e, "worker connect failed"),
            }
        }
        if any_up {
            Attempt::NoneAnswered
        } else {
            Attempt::NoneUp
        }
    }
}

impl WorkerPool {
    /// Restarts every worker, one at a time, each only once the one before is back up, so
    /// the pool keeps serving (a call in flight on the worker being restarted fails). A
    /// restarted worker loads the KEK versions present now: this is how a rotation or a
    /// retirement reaches running workers. Waits at most `timeout` per worker; returns whether
    /// every worker that was up came back (a worker that was down loads them when it starts).
    pub async fn recycle(&self, timeout: Duration) -> bool {
        if self.external {
            return self.recycle_external(timeout).await;
        }
        let mut all_back = true;
        for slot in &self.slots {
            let deadline = Instant::now() + timeout;
            // A worker still starting may have read the old versions: wait for it, then restart it too.
            while !slot.up.load(Ordering::Acquire) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let generation = slot.generation.load(Ordering::Acquire);
            let pid = slot.pid.load(Ordering::Acquire);
            let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
                continue;
            };
            if !slot.up.load(Ordering::Acquire) {
                tracing::warn!(
                    worker = slot.index,
                    "worker not up; it loads the current KEK versions when it starts"
                );
                continue;
            }
            slot.up.store(false, Ordering::Release);
            if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
                tracing::warn!(worker = slot.index, error = %e, "could not stop worker");
                continue;
            }
            all_back &= slot.back_after(generation, deadline).await;
        }
        all_back
    }
}

impl Slot {
    /// Waits until this worker is up again in a generation after `generation`, at most
    /// until `deadline`; says so when it is not.
    async fn back_after(&self, generation: u64, deadline: Instant) -> bool {
        let back = || self.up.load(Ordering::Acquire) && self.generation.load(Ordering::Acquire) > generation;
        while !back() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !back() {
            tracing::warn!(
                worker = self.index,
                "worker did not come back within the recycle timeout"
            );
        }
        back()
    }
}

impl WorkerPool {
    /// [`WorkerPool::recycle`] for workers this process did not start: the root-started
    /// supervisor restarts them when asked on its control pipe; a separate worker service
    /// must be restarted by its operator.
    async fn recycle_external(&self, timeout: Duration) -> bool {
        let Some(control) = &self.control else {
            tracing::error!(
                "the workers run as their own service (KEYWARD_WORKER_SOCKETS): restart it so they load the current KEK versions"
            );
            return false;
        };
        let before: Vec<u64> = self
            .slots
            .iter()
            .map(|s| s.generation.load(Ordering::Acquire))
            .collect();
        let asked = control
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))
            .and_then(|mut pipe| crate::users::request_recycle(&mut *pipe));
        if let Err(e) = asked {
            tracing::error!(error = %e, "could not ask the worker supervisor to restart the workers");
            return false;
        }
        let mut all_back = true;
        for (slot, generation) in self.slots.iter().zip(before) {
            all_back &= slot.back_after(generation, Instant::now() + timeout).await;
        }
        all_back
    }
}

/// How often a worker behind a socket is pinged: a dead one is noticed within this.
const EXTERNAL_PING_EVERY: Duration = Duration::from_millis(100);

/// Watches the worker behind `slot.socket`: up once it answers a ping, down when a ping
/// fails; a new pid behind the socket is a new generation (a restart).
async fn watch_external(
    slot: Arc<Slot>,
    metrics: Arc<Metrics>,
    came_up: Arc<tokio::sync::Notify>,
    allow_same_user: bool,
) {
    let me = rustix::process::getuid().as_raw();
    let mut refused_pid = None;
    let mut missing_logged = false;
    loop {
        let mut conn = match tokio::time::timeout(Duration::from_secs(2), answering(&slot.socket)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                if !missing_logged {
                    tracing::info!(worker = slot.index, socket = %slot.socket.display(), error = %e, "waiting for the worker");
                    missing_logged = true;
                }
                tokio::time::sleep(EXTERNAL_PING_EVERY).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(EXTERNAL_PING_EVERY).await;
                continue;
            }
        };
        missing_logged = false;
        let (uid, pid) = conn.peer().unwrap_or((u32::MAX, 0));
        if uid == me && !allow_same_user {
            if refused_pid != Some(pid) {
                tracing::error!(
                    worker = slot.index,
                    pid,
                    uid,
                    "NOT USING this worker: it runs as the gateway's own OS user, so a gateway that is taken over could read the KEK's private half; run it as its own user (or set KEYWARD_ALLOW_SAME_USER=1)"
                );
                refused_pid = Some(pid);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        slot.pid.store(u64::try_from(pid).unwrap_or(0), Ordering::Release);
        slot.generation.fetch_add(1, Ordering::AcqRel);
        slot.up.store(true, Ordering::Release);
        came_up.notify_waiters();
        tracing::info!(worker = slot.index, pid, uid, "worker ready");
        loop {
            tokio::time::sleep(EXTERNAL_PING_EVERY).await;
            match tokio::time::timeout(Duration::from_secs(5), conn.ping()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        slot.up.store(false, Ordering::Release);
        if let Ok(mut idle) = slot.idle.lock() {
            idle.clear();
        }
        metrics.record_worker_restart();
        tracing::warn!(worker = slot.index, pid, "worker gone; waiting for it to come back");
    }
}

/// How often idle connections are looked at: one past [`IDLE_CONN_LIMIT`] is closed within
/// this much more. The sweep, not the release on every call's path, does the closing.
const IDLE_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Closes connections left idle past [`IDLE_CONN_LIMIT`].
async fn close_idle_connections(slots: Vec<Arc<Slot>>) {
    let mut every = tokio::time::interval(IDLE_SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for slot in &slots {
            let _stale = slot
                .idle
                .lock()
                .ok()
                .map(|mut idle| take_stale(&mut idle, Instant::now(), IDLE_CONN_LIMIT));
        }
    }
}

async fn supervise(slot: Arc<Slot>, command: WorkerCommand, metrics: Arc<Metrics>, came_up: Arc<tokio::sync::Notify>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut cmd = Command::new(&command.exe);
        cmd.arg("worker")
            .env_clear()
            .envs(command.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(WorkerProcess::SOCKET_VAR, &slot.socket)
            .env(WorkerProcess::PARENT_VAR, std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(worker = slot.index, error = %e, "could not start worker");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        slot.pid.store(u64::from(child.id().unwrap_or(0)), Ordering::Release);
        // Up once it answers a ping on its socket.
        let ready = async {
            for _ in 0..500 {
                if answering(&slot.socket).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        };
        tokio::select! {
            ok = ready => {
                if ok {
                    slot.generation.fetch_add(1, Ordering::AcqRel);
                    slot.up.store(true, Ordering::Release);
                    came_up.notify_waiters();
                    tracing::info!(worker = slot.index, pid = slot.pid.load(Ordering::Acquire), "worker ready");
                } else {
                    tracing::error!(worker = slot.index, "worker did not become ready; restarting it");
                    let _ = child.start_kill();
                }
            }
            status = child.wait() => {
                tracing::error!(worker = slot.index, ?status, "worker exited during start-up");
            }
        }
        let status = child.wait().await;
        slot.up.store(false, Ordering::Release);
        if let Ok(mut idle) = slot.idle.lock() {
            idle.clear();
        }
        metrics.record_worker_restart();
        tracing::warn!(worker = slot.index, ?status, "worker exited; restarting");
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_stale_takes_out_only_the_connections_idle_past_the_limit() {
        let now = Instant::now();
        let limit = Duration::from_secs(10);
        let ago = |s: u64| {
            now.checked_sub(Duration::from_secs(s))
                .expect("clock far enough from its start")
        };
        // Bottom (oldest release) to top, as the pool keeps them.
        let mut idle = vec![(1, ago(30), 'a'), (1, ago(11), 'b'), (1, ago(9), 'c'), (2, ago(0), 'd')];
        let stale = take_stale(&mut idle, now, limit);
        assert_eq!(stale.iter().map(|e| e.2).collect::<String>(), "ab");
        assert_eq!(idle.iter().map(|e| e.2).collect::<String>(), "cd");
        // Nothing past the limit: nothing taken, order kept.
        assert!(take_stale(&mut idle, now, limit).is_empty());
        assert_eq!(idle.iter().map(|e| e.2).collect::<String>(), "cd");
        // All past it: all taken.
        assert_eq!(take_stale(&mut idle, now + limit * 2, limit).len(), 2);
        assert!(idle.is_empty());
    }
}
