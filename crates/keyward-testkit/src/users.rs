//! Two OS users for the tests of the two-user setup (README, Deployment): created with
//! `useradd` when missing (idempotent), only ever as root.
//!
//! With `KEYWARD_TEST_TWO_USERS=1` (and root), every [`crate::Keyward`] starts `serve` as
//! root with `KEYWARD_USER=keyward-gw` and `KEYWARD_WORKER_USER=keyward-wk`, so the whole
//! end-to-end suite runs in that mode. Without root the mode records a skip and the tests
//! run with one user.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The gateway user the tests create.
pub const GATEWAY_USER: &str = "keyward-gw";
/// The worker user the tests create.
pub const WORKER_USER: &str = "keyward-wk";

/// The skip reason when a test needs root.
pub const NEEDS_ROOT: &str = "two OS users: the test must run as root (it creates users and starts serve as root)";

/// Whether this test process runs as root.
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// A user's uid and gid, creating the user (system account, no home, no login shell) when
/// missing. Panics unless root.
pub fn ensure_user(name: &str) -> (u32, u32) {
    if let Some(ids) = ids_of(name) {
        return ids;
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run useradd");
    // Another test may have created it meanwhile (exit 9: already exists).
    assert!(status.success() || status.code() == Some(9), "useradd {name}: {status}");
    ids_of(name).unwrap_or_else(|| panic!("user {name} missing after useradd"))
}

fn ids_of(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .flatten()
    };
    Some((id("-u")?, id("-g")?))
}

/// The (gateway, worker) users every `Keyward` runs with: `Some` under
/// `KEYWARD_TEST_TWO_USERS=1` as root (users created once); `None` otherwise (recording a
/// skip when the mode was asked for without root).
pub fn two_users_mode() -> Option<(&'static str, &'static str)> {
    static MODE: OnceLock<bool> = OnceLock::new();
    let on = *MODE.get_or_init(|| {
        if keyward_testenv::setting("KEYWARD_TEST_TWO_USERS").as_deref() != Some("1") {
            return false;
        }
        if !is_root() {
            keyward_testenv::skip_named("KEYWARD_TEST_TWO_USERS", NEEDS_ROOT);
            return false;
        }
        ensure_user(GATEWAY_USER);
        ensure_user(WORKER_USER);
        true
    });
    on.then_some((GATEWAY_USER, WORKER_USER))
}

/// The direct children of `pid` (every thread's `children` file).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(text.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether `pid` is the worker supervisor of a root-started `serve`.
pub fn is_supervisor(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|arg| arg == b"worker-supervisor"))
        .unwrap_or(false)
}

/// The worker processes of the gateway `pid`: its children, or, when it started them
/// through the supervisor (two users), the supervisor's children.
pub fn workers_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for child in children(pid) {
        if is_supervisor(child) {
            out.extend(children(child));
        } else {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// The real, effective, saved and filesystem uids (or gids, with `"Gid:"`) of `pid`, from
/// `/proc/<pid>/status`.
pub fn ids(pid: u32, field: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|ids| ids.split_whitespace().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default()
}
