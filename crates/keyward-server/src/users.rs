//! Two OS users: a gateway that is taken over still cannot open a key.
//!
//! The gateway (`serve`) and the workers that open keys run as different OS users, so the
//! gateway cannot read a KEK's private half, the PKCS#11 PIN or the worker's KMS credentials,
//! and cannot attach to a worker (ptrace needs the same uid). Two ways to get there:
//!
//! - **Started as root** (`KEYWARD_USER` and `KEYWARD_WORKER_USER`): `serve`, still root and
//!   still one thread (before the async runtime starts), prepares the data dir and gives
//!   its files to their owners ([`apply_ownership`]), starts a *worker supervisor* as the
//!   worker user ([`start_supervisor`]), then drops itself to the gateway user
//!   ([`drop_to`]: setgroups, setgid, setuid through the C library, which applies them to
//!   every thread; then checked with getresuid/getresgid, and `setuid(0)` must fail). The
//!   supervisor (`keyward worker-supervisor`, [`run_supervisor`]) starts the
//!   `keyward worker --listen SOCKET` processes and restarts any that dies; it dies with the
//!   gateway (parent-death signal) and its workers die with it. The gateway only connects
//!   to the workers' sockets and checks them with pings, exactly as in the next setup; to
//!   make workers load a new KEK version it writes `r` to the supervisor's stdin (the
//!   gateway may not signal processes of another user).
//! - **Run separately**: `keyward worker --listen SOCKET` is its own service with its own
//!   configuration; `serve` gets `KEYWARD_WORKER_SOCKETS`. The worker accepts only
//!   `KEYWARD_WORKER_GATEWAY_USER` (SO_PEERCRED).
//!
//! Anything else runs the workers as the gateway's own user, which `serve` refuses without
//! `KEYWARD_ALLOW_SAME_USER=1` ([`same_user_refusal`]).
//!
//! Ownership in the data dir of a root-started install ([`apply_ownership`]):
//!
//! ```text
//! <data_dir>/            gateway user, 0711 (the worker passes through to kek/ and run/)
//! <data_dir>/kek/        root, 0755: both list it, neither can write it (rotations run as root)
//! <data_dir>/kek/*.key   worker user, 0400 (private halves)
//! <data_dir>/kek/*.pub   gateway user, 0644 (public halves)
//! <data_dir>/kek/other   root, 0644 (`primary`, markers, pins); `.lock` root 0600
//! <data_dir>/run/        worker user, 0711 (the worker sockets, 0666, guarded by SO_PEERCRED)
//! everything else        gateway user (database and its -wal/-shm, audit-chain key, …)
//! PIN file, worker's KMS credentials (named in KEYWARD_KEK)   worker user, 0400
//! ```
//!
//! CLI commands run as root on such a data dir give the files back to these owners when they
//! finish (a SQLite -wal they created as root would otherwise lock the gateway out).
//!
//! Must never: leave the gateway able to read a private KEK file, or start a worker as root.

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{var}: no such OS user {name:?}")]
    NoSuchUser { var: &'static str, name: String },
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("dropping privileges to {user}: {reason}")]
    Drop { user: String, reason: String },
}

/// A resolved OS user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Resolves a user name or a numeric uid (through the C library, so NSS users work too).
#[allow(unsafe_code)]
pub fn resolve(var: &'static str, spec: &str) -> Result<OsUser, UsersError> {
    let missing = || UsersError::NoSuchUser {
        var,
        name: spec.to_owned(),
    };
    let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = if let Ok(uid) = spec.parse::<u32>() {
        // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`.
        unsafe { libc::getpwuid_r(uid, pwd.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut result) }
    } else {
        let name = std::ffi::CString::new(spec).map_err(|_| missing())?;
        // SAFETY: as above; `name` is NUL-terminated.
        unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        }
    };
    if rc != 0 || result.is_null() {
        return Err(missing());
    }
    // SAFETY: `result` is non-null, so getpw*_r filled `pwd` (its strings point into `buf`).
    let pwd = unsafe { pwd.assume_init() };
    // SAFETY: `pw_name` is a NUL-terminated string inside `buf`, still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(OsUser {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// This process's real uid.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// What a root-started process does about users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootPlan {
    /// `KEYWARD_USER` and `KEYWARD_WORKER_USER`: `serve` starts the workers (through the
    /// supervisor) as the worker user, then drops to the gateway user.
    TwoUsers { gateway: OsUser, worker: OsUser },
    /// `KEYWARD_USER` with `KEYWARD_WORKER_SOCKETS`: the workers are a service of their own;
    /// `serve` only gives the data dir to the gateway user and drops to it.
    GatewayOnly { gateway: OsUser },
}

impl RootPlan {
    /// Root gives the data dir's files to their owners (`serve` before the drop, CLI
    /// commands after they ran).
    pub fn apply_ownership(&self, config: &Config) -> Result<(), UsersError> {
        match self {
            RootPlan::TwoUsers { gateway, worker } => apply_ownership(config, gateway, worker),
            RootPlan::GatewayOnly { gateway } => {
                own(&config.data_dir, gateway.uid, gateway.gid, Some(0o700))?;
                own_tree(&config.data_dir, gateway)
            }
        }
    }

    pub fn gateway(&self) -> &OsUser {
        match self {
            RootPlan::TwoUsers { gateway, .. } | RootPlan::GatewayOnly { gateway } => gateway,
        }
    }
}

/// The users a root-started process works with (`None`: no user is configured, or this
/// process already is the gateway user). Errors on a configuration that cannot be honoured.
pub fn root_plan(config: &Config) -> Result<Option<RootPlan>, UsersError> {
    let (gateway, worker) = match (&config.user, &config.worker.user) {
        (None, None) => return Ok(None),
        (Some(g), None) => {
            let gateway = resolve("KEYWARD_USER", g)?;
            if config.worker.sockets.is_empty() {
                return Err(UsersError::Setup(
                    "KEYWARD_USER needs KEYWARD_WORKER_USER (serve starts the workers as that user) or \
                     KEYWARD_WORKER_SOCKETS (the workers run as a service of their own)"
                        .to_owned(),
                ));
            }
            if gateway.uid == 0 {
                return Err(UsersError::Setup("KEYWARD_USER must not be root".to_owned()));
            }
            if !is_root() {
                if current_uid() == gateway.uid {
                    return Ok(None);
                }
                return Err(UsersError::Setup(format!(
                    "KEYWARD_USER is {}, but keyward runs as uid {}, not root: start it as root or as that user",
                    gateway.name,
                    current_uid()
                )));
            }
            return Ok(Some(RootPlan::GatewayOnly { gateway }));
        }
        (Some(g), Some(w)) => (resolve("KEYWARD_USER", g)?, resolve("KEYWARD_WORKER_USER", w)?),
        (None, Some(_)) => {
            return Err(UsersError::Setup(
                "KEYWARD_WORKER_USER needs KEYWARD_USER (the gateway's OS user, which serve drops to)".to_owned(),
            ))
        }
    };
    if gateway.uid == worker.uid {
        return Err(UsersError::Setup(format!(
            "KEYWARD_USER and KEYWARD_WORKER_USER are the same user ({}): the gateway could read the KEK's private half",
            gateway.name
        )));
    }
    if gateway.uid == 0 || worker.uid == 0 {
        return Err(UsersError::Setup(
            "KEYWARD_USER and KEYWARD_WORKER_USER must not be root".to_owned(),
        ));
    }
    if !config.worker.sockets.is_empty() {
        return Err(UsersError::Setup(
            "KEYWARD_WORKER_SOCKETS (workers run as their own service) and KEYWARD_WORKER_USER (serve starts them as root) exclude each other"
                .to_owned(),
        ));
    }
    if !is_root() {
        return Err(UsersError::Setup(format!(
            "KEYWARD_USER and KEYWARD_WORKER_USER are set, but keyward runs as uid {}, not root: start it as root (it drops to {} itself)",
            rustix::process::getuid().as_raw(),
            gateway.name
        )));
    }
    Ok(Some(RootPlan::TwoUsers { gateway, worker }))
}

/// The message `serve` refuses to start with when its workers would run as its own user.
pub fn same_user_refusal() -> String {
    format!(
        "refusing to start: the workers that open keys would run as the gateway's own OS user (uid {}), so a \
         gateway that is taken over could read the KEK's private half. Either start keyward as root with \
         KEYWARD_USER and KEYWARD_WORKER_USER (two users), or run `keyward worker --listen SOCKET` as its own \
         service and set KEYWARD_WORKER_SOCKETS (README, Deployment). To accept one user (trying keyward, \
         development), set KEYWARD_ALLOW_SAME_USER=1.",
        rustix::process::getuid().as_raw()
    )
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> UsersError {
    UsersError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn set_owner(path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn own(path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), UsersError> {
    set_owner(path, uid, gid, mode).map_err(|e| file_err(path, e))
}

/// [`own`] for a file found by listing a directory: one that is gone by now needs no owner.
fn own_listed(path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), UsersError> {
    unless_gone(path, set_owner(path, uid, gid, mode)).map(drop)
}

/// `None` for a file that is gone: one a directory listing named may vanish before it is
/// reached (SQLite removes its -wal and -shm when the last connection closes, and `serve`
/// may be running while a CLI command fixes owners).
fn unless_gone<T>(path: &Path, r: std::io::Result<T>) -> Result<Option<T>, UsersError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

/// Gives the data dir's files (and the KEK backend's secret files) to their owners, as the
/// module doc lays out. Run as root, by `serve` before it drops and by CLI commands after
/// they ran.
pub fn apply_ownership(config: &Config, gateway: &OsUser, worker: &OsUser) -> Result<(), UsersError> {
    let dir = &config.data_dir;
    own(dir, gateway.uid, gateway.gid, Some(0o711))?;
    let entries = std::fs::read_dir(dir).map_err(|e| file_err(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| file_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(file_type) = unless_gone(&path, entry.file_type())? else {
            continue;
        };
        let is_dir = file_type.is_dir();
        match name.to_str() {
            Some("kek") if is_dir => own_kek_dir(&path, gateway, worker)?,
            // The live sockets stay as they are (a CLI run fixes owners while serve runs);
            // a worker replaces a stale one itself, the directory being its own.
            Some("run") if is_dir => own_listed(&path, worker.uid, worker.gid, Some(0o711))?,
            _ => own_tree(&path, gateway)?,
        }
    }
    for file in config.kek.worker_secret_files() {
        own(&file, worker.uid, worker.gid, Some(0o400))?;
    }
    for file in config.kek.gateway_secret_files() {
        own(&file, gateway.uid, gateway.gid, Some(0o400))?;
    }
    Ok(())
}

fn own_kek_dir(kek: &Path, gateway: &OsUser, worker: &OsUser) -> Result<(), UsersError> {
    own(kek, 0, 0, Some(0o755))?;
    for entry in std::fs::read_dir(kek).map_err(|e| file_err(kek, e))? {
        let entry = entry.map_err(|e| file_err(kek, e))?;
        let path = entry.path();
        let Some(file_type) = unless_gone(&path, entry.file_type())? else {
            continue;
        };
        let is_dir = file_type.is_dir();
        if is_dir {
            own_listed(&path, 0, 0, Some(0o755))?;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".key") {
            own_listed(&path, worker.uid, worker.gid, Some(0o400))?;
        } else if name.ends_with(".pub") {
            own_listed(&path, gateway.uid, gateway.gid, Some(0o644))?;
        } else if name == ".lock" || name.starts_with('.') {
            own_listed(&path, 0, 0, Some(0o600))?;
        } else {
            own_listed(&path, 0, 0, Some(0o644))?;
        }
    }
    Ok(())
}

fn own_tree(path: &Path, user: &OsUser) -> Result<(), UsersError> {
    own_listed(path, user.uid, user.gid, None)?;
    let Some(meta) = unless_gone(path, std::fs::symlink_metadata(path))? else {
        return Ok(());
    };
    if meta.is_dir() {
        let Some(entries) = unless_gone(path, std::fs::read_dir(path))? else {
            return Ok(());
        };
        for entry in entries.flatten() {
            own_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Becomes `user` for good: supplementary groups cleared, then gid, then uid (through the C
/// library, which changes every thread of the process, not only the calling one). Then
/// checks that real, effective and saved ids are all the target's and that root cannot be
/// regained.
#[allow(unsafe_code)]
pub fn drop_to(user: &OsUser) -> Result<(), UsersError> {
    let fail = |what: &str| UsersError::Drop {
        user: user.name.clone(),
        reason: format!("{what}: {}", std::io::Error::last_os_error()),
    };
    // SAFETY: plain syscalls (glibc broadcasts set*id to every thread); no memory is passed
    // but a null list of length 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setgid(user.gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(user.uid) != 0 {
            return Err(fail("setuid"));
        }
    }
    check_dropped(user)
}

#[allow(unsafe_code)]
fn check_dropped(user: &OsUser) -> Result<(), UsersError> {
    let bad = |reason: String| UsersError::Drop {
        user: user.name.clone(),
        reason,
    };
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: the pointers are to live locals.
    let ok = unsafe { libc::getresuid(&mut r, &mut e, &mut s) == 0 && libc::getresgid(&mut rg, &mut eg, &mut sg) == 0 };
    if !ok {
        return Err(bad(format!("getresuid: {}", std::io::Error::last_os_error())));
    }
    if [r, e, s] != [user.uid; 3] || [rg, eg, sg] != [user.gid; 3] {
        return Err(bad(format!("ids after the drop: uid {r}/{e}/{s}, gid {rg}/{eg}/{sg}")));
    }
    // SAFETY: a plain syscall; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(bad("setuid(0) still succeeds".to_owned()));
    }
    let groups = rustix::process::getgroups().map_err(|e| bad(format!("getgroups: {e}")))?;
    if groups.iter().any(|g| g.as_raw() != user.gid) {
        return Err(bad("supplementary groups remain".to_owned()));
    }
    Ok(())
}

/// How the supervisor and its workers are executed: this very binary, reached through
/// `/proc`, so the worker user need not be able to walk the directories it was installed in
/// (a build under `/root`, say).
pub const SELF_EXE: &str = "/proc/self/exe";

/// The supervisor's variables (besides the workers' own settings).
pub const SUPERVISOR_PARENT_VAR: &str = "KEYWARD_SUPERVISOR_PARENT";

/// The worker sockets of a root-started `serve`: `<data_dir>/run/worker-N.sock`.
pub fn supervised_sockets(config: &Config) -> Vec<PathBuf> {
    let run = config.data_dir.join("run");
    (0..config.workers)
        .map(|i| run.join(format!("worker-{i}.sock")))
        .collect()
}

/// Starts `keyward worker-supervisor` as `worker`, with the workers' settings `env` and the
/// sockets to serve. Its stdin is the gateway's control pipe (`r`: restart every worker, one
/// after the other; end of file: the gateway is gone). Call as root, from the main thread
/// (the supervisor dies with the thread that started it).
pub fn start_supervisor(
    exe: &Path,
    env: &[(String, String)],
    sockets: &[PathBuf],
    worker: &OsUser,
    gateway: &OsUser,
) -> Result<Child, UsersError> {
    use std::os::unix::process::CommandExt;
    let run = sockets
        .first()
        .and_then(|s| s.parent())
        .ok_or_else(|| UsersError::Setup("no worker socket".to_owned()))?;
    std::fs::create_dir_all(run).map_err(|e| file_err(run, e))?;
    own(run, worker.uid, worker.gid, Some(0o711))?;
    let list = sockets
        .iter()
        .map(|s| s.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    Command::new(exe)
        .arg("worker-supervisor")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("KEYWARD_WORKER_SOCKETS", list)
        .env("KEYWARD_WORKER_GATEWAY_USER", gateway.uid.to_string())
        .env(SUPERVISOR_PARENT_VAR, std::process::id().to_string())
        .current_dir("/")
        // std clears the supplementary groups when root sets a uid.
        .gid(worker.gid)
        .uid(worker.uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| UsersError::Setup(format!("starting the worker supervisor as {}: {e}", worker.name)))
}

/// What the supervisor hears from the gateway.
enum Control {
    Recycle,
    GatewayGone,
}

/// `keyward worker-supervisor`: keeps one `keyward worker --listen` per socket running,
/// restarting any that exits (with backoff), until the gateway goes away.
pub fn run_supervisor(exe: &Path, sockets: &[PathBuf], parent: u32) -> Result<(), UsersError> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| UsersError::Setup(format!("parent-death signal: {e}")))?;
    let parent_alive =
        rustix::process::getppid().is_some_and(|p| u32::try_from(p.as_raw_nonzero().get()).ok() == Some(parent));
    if !parent_alive {
        return Err(UsersError::Setup(
            "the gateway that started the supervisor is gone".to_owned(),
        ));
    }
    if is_root() || rustix::process::getuid().is_root() {
        return Err(UsersError::Setup(
            "the worker supervisor must not run as root".to_owned(),
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Control::GatewayGone);
                    return;
                }
                Ok(_) if line.trim() == "r" => {
                    let _ = tx.send(Control::Recycle);
                }
                Ok(_) => {}
            }
        }
    });
    let me = std::process::id().to_string();
    let spawn = |socket: &Path| {
        Command::new(exe)
            .arg("worker")
            .arg("--listen")
            .arg(socket)
            .env(crate::config::WorkerProcess::PARENT_VAR, &me)
            .env_remove("KEYWARD_WORKER_SOCKETS")
            .env_remove(SUPERVISOR_PARENT_VAR)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
    };
    struct Slot {
        child: Option<Child>,
        next_start: Instant,
        backoff: Duration,
        started: Instant,
    }
    let now = Instant::now();
    let mut slots: Vec<Slot> = sockets
        .iter()
        .map(|_| Slot {
            child: None,
            next_start: now,
            backoff: Duration::from_millis(50),
            started: now,
        })
        .collect();
    tracing::info!(
        workers = sockets.len(),
        uid = rustix::process::getuid().as_raw(),
        "worker supervisor started"
    );
    loop {
        for (i, (slot, socket)) in slots.iter_mut().zip(sockets).enumerate() {
            if let Some(child) = slot.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    tracing::warn!(worker = i, %status, "worker exited; restarting");
                    slot.child = None;
                    if slot.started.elapsed() > Duration::from_secs(10) {
                        slot.backoff = Duration::from_millis(50);
                    }
                    slot.next_start = Instant::now() + slot.backoff;
                    slot.backoff = (slot.backoff * 2).min(Duration::from_secs(5));
                }
            }
            if slot.child.is_none() && Instant::now() >= slot.next_start {
                match spawn(socket) {
                    Ok(c) => {
                        slot.child = Some(c);
                        slot.started = Instant::now();
                    }
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "could not start worker");
                        slot.next_start = Instant::now() + slot.backoff;
                        slot.backoff = (slot.backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Control::Recycle) => {
                // One at a time, each new one bound before the next goes: the pool keeps serving.
                for (i, (slot, socket)) in slots.iter_mut().zip(sockets).enumerate() {
                    if let Some(mut old) = slot.child.take() {
                        let _ = rustix::process::kill_process(
                            rustix::process::Pid::from_child(&old),
                            rustix::process::Signal::TERM,
                        );
                        let _ = old.wait();
                    }
                    match spawn(socket) {
                        Ok(c) => {
                            slot.child = Some(c);
                            slot.started = Instant::now();
                        }
                        Err(e) => tracing::error!(worker = i, error = %e, "could not start worker"),
                    }
                    // The old worker is gone (waited for), so a socket listening at the
                    // path is the new one. (Not its socket file's inode: a new file may get
                    // the old number back. Not a test connection: the worker would log the
                    // supervisor's uid as a refused peer.)
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < deadline && !listening_at(socket) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            Ok(Control::GatewayGone) => {
                for slot in &mut slots {
                    if let Some(mut c) = slot.child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

/// Whether a Unix socket listens at `path` (the kernel's table, `/proc/net/unix`: the
/// flags column holds `__SO_ACCEPTCON`, 0x10000, for a listening socket).
fn listening_at(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let flags = f.get(3).and_then(|x| u32::from_str_radix(x, 16).ok()).unwrap_or(0);
        flags & 0x1_0000 != 0 && f.get(7).is_some_and(|p| *p == want)
    })
}

/// Asks the supervisor behind `control` to restart its workers one by one.
pub fn request_recycle(control: &mut impl Write) -> std::io::Result<()> {
    control.write_all(b"r\n")?;
    control.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_listed_file_gone_before_its_owner_is_set_is_skipped_and_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = std::fs::metadata(dir.path()).expect("stat");
        let (uid, gid) = (meta.uid(), meta.gid());
        // As a SQLite -wal is, after a directory listing named it and before its lchown.
        let wal = dir.path().join("keyward.db-wal");
        assert!(own_listed(&wal, uid, gid, Some(0o600)).is_ok());
        assert!(
            own(&wal, uid, gid, Some(0o600)).is_err(),
            "a configured file that is missing stays an error"
        );
        let tree = dir.path().join("gone");
        assert!(own_tree(
            &tree,
            &OsUser {
                name: "test".into(),
                uid,
                gid
            }
        )
        .is_ok());
        // A present one still gets its mode.
        std::fs::write(&wal, b"").expect("write");
        own_listed(&wal, uid, gid, Some(0o600)).expect("own a present file");
        assert_eq!(std::fs::metadata(&wal).expect("stat").mode() & 0o777, 0o600);
    }
}
