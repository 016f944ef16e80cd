//! Two OS users (README, Deployment): a gateway taken over still cannot open a key.
//!
//! As root, with two users the tests create: `serve` started as root runs as the gateway
//! user and its workers as the worker user; a process of the gateway's uid can neither read
//! a private KEK file nor ptrace a worker. A worker run as its own service answers a gateway
//! of the configured uid and refuses any other. And without either setup, `serve` refuses
//! to run its workers as its own user.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::users::{ensure_user, ids, is_root, workers_of, GATEWAY_USER, NEEDS_ROOT, WORKER_USER};
use keyward_testkit::Keyward;

use crate::ai_support::*;
use crate::common::*;

/// What a probe found: the errno of the attempt, or `SUCCEEDED`.
const SUCCEEDED: i32 = 9999;

/// Runs `probe` in a child process that has become `uid`/`gid` (no supplementary groups),
/// before it would exec `/bin/true`: the errno the probe's syscall failed with, or
/// [`SUCCEEDED`]. The probe runs between fork and exec, so it may not allocate.
#[allow(unsafe_code)]
fn errno_as(uid: u32, gid: u32, probe: fn(&ProbeArgs) -> i32, args: ProbeArgs) -> i32 {
    let mut cmd = Command::new("/bin/true");
    cmd.uid(uid).gid(gid).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: the closure calls only async-signal-safe syscalls (open, ptrace) on data
    // prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || Err(std::io::Error::from_raw_os_error(probe(&args))));
    }
    match cmd.spawn() {
        Ok(mut child) => {
            let _ = child.wait();
            panic!("the probe did not report");
        }
        Err(e) => e.raw_os_error().expect("the probe's errno"),
    }
}

struct ProbeArgs {
    path: std::ffi::CString,
    pid: i32,
}

#[allow(unsafe_code)]
fn probe_open(args: &ProbeArgs) -> i32 {
    // SAFETY: a NUL-terminated path; the descriptor, if any, dies with the child.
    let fd = unsafe { libc::open(args.path.as_ptr(), libc::O_RDONLY) };
    if fd >= 0 {
        SUCCEEDED
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[allow(unsafe_code)]
fn probe_ptrace(args: &ProbeArgs) -> i32 {
    // SAFETY: PTRACE_ATTACH takes a pid and ignores the address and data arguments.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            args.pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if rc == 0 {
        SUCCEEDED
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Waits until the gateway `pid` has `n` worker processes; returns them.
fn wait_for_workers(kw: &Keyward, n: usize) -> Vec<u32> {
    let pid = kw.pid().expect("running");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = workers_of(pid);
        if w.len() == n {
            return w;
        }
        assert!(Instant::now() < deadline, "workers of {pid}: {w:?}\n{}", kw.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An own key for `p` registered at the fake, saved, used: the reply's text.
async fn one_own_call(fake: &FakeProviders, kw: &Keyward, p: &str) -> keyward_testkit::Resp {
    let (user, account) = pro_owner(kw, &format!("{p}-users@example.com"));
    let k = key_for(p);
    fake.set_key(provider(p), &k, Behaviour::Ok);
    save_key(kw, &user.token, &account, p, &k).await;
    set_source(kw, &user.token, &account, p, "own").await;
    ai_call(kw, &user.token, &account, &chat_body(p, false, 20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_as_root_the_gateway_and_its_workers_run_as_two_users_and_the_gateway_cannot_open_a_key() {
    if !is_root() {
        keyward_testenv::skip(NEEDS_ROOT);
        return;
    }
    let (gw_uid, gw_gid) = ensure_user(GATEWAY_USER);
    let (wk_uid, wk_gid) = ensure_user(WORKER_USER);
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_with(fake_options(
        &fake,
        &[
            ("KEYWARD_USER", GATEWAY_USER),
            ("KEYWARD_WORKER_USER", WORKER_USER),
            ("KEYWARD_ALLOW_SAME_USER", ""),
        ],
    ));
    let gateway = kw.pid().expect("running");
    assert_eq!(ids(gateway, "Uid:"), [gw_uid; 4], "gateway uids\n{}", kw.output());
    assert_eq!(ids(gateway, "Gid:"), [gw_gid; 4], "gateway gids");
    let groups = std::fs::read_to_string(format!("/proc/{gateway}/status")).unwrap();
    let groups = groups.lines().find(|l| l.starts_with("Groups:")).unwrap_or_default();
    assert_eq!(groups.trim(), "Groups:", "the gateway keeps no supplementary group");
    let workers = wait_for_workers(&kw, 2);
    for w in &workers {
        assert_eq!(ids(*w, "Uid:"), [wk_uid; 4], "worker {w} uids");
        assert_eq!(ids(*w, "Gid:"), [wk_gid; 4], "worker {w} gids");
    }

    // The files, as the README's Deployment section lays them out.
    let dir = kw.data_dir();
    let meta = |rel: &str| std::fs::metadata(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let private = meta("kek/local-1.key");
    assert_eq!((private.uid(), private.mode() & 0o777), (wk_uid, 0o400), "private half");
    assert_eq!(meta("kek/local-1.pub").uid(), gw_uid, "public half");
    assert_eq!(meta("keyward.db").uid(), gw_uid, "database");
    assert_eq!(meta("audit-chain.key").uid(), gw_uid, "audit-chain key");

    // Calls go through the workers.
    let r = one_own_call(&fake, &kw, "anthropic").await;
    assert_eq!(r.status, 200, "{r}\n{}", kw.output());
    assert!(r.text.contains(&fake_reply("anthropic")), "{r}");

    // A process of the gateway's uid: no private half, no ptrace of a worker.
    let key = std::ffi::CString::new(dir.join("kek/local-1.key").display().to_string()).unwrap();
    let open = errno_as(
        gw_uid,
        gw_gid,
        probe_open,
        ProbeArgs {
            path: key.clone(),
            pid: 0,
        },
    );
    assert_eq!(open, libc::EACCES, "opening the private KEK file as the gateway's uid");
    let attach = errno_as(
        gw_uid,
        gw_gid,
        probe_ptrace,
        ProbeArgs {
            path: key.clone(),
            pid: i32::try_from(workers[0]).unwrap(),
        },
    );
    assert_eq!(attach, libc::EPERM, "ptrace of a worker as the gateway's uid");
    // The probe itself can succeed: as the worker's uid the file opens.
    let open = errno_as(wk_uid, wk_gid, probe_open, ProbeArgs { path: key, pid: 0 });
    assert_eq!(open, SUCCEEDED, "the worker's uid reads its key");

    // A worker killed -9 is started again by the supervisor and used by the gateway.
    let _ = Command::new("kill").args(["-KILL", &workers[0].to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = workers_of(gateway);
        if now.len() == 2 && !now.contains(&workers[0]) && workers_ready(&kw).await == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed worker did not come back: {now:?}\n{}",
            kw.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = one_own_call(&fake, &kw, "openai").await;
    assert_eq!(r.status, 200, "after a worker restart: {r}");
}

/// A process's stderr, collected as it runs.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("piped stderr");
    let sink = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

struct Service {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keyward worker --listen SOCKET` as the worker user, on its own data dir and settings.
fn worker_service(dir: &Path, socket: &Path, fake: &FakeProviders, gateway_user: Option<&str>) -> Service {
    let (wk_uid, wk_gid) = ensure_user(WORKER_USER);
    let url = fake.base_url();
    let mut cmd = Command::new(bin());
    cmd.args(["worker", "--listen"])
        .arg(socket)
        .env_clear()
        .env("KEYWARD_DATA_DIR", dir)
        .env("KEYWARD_LOG", "debug")
        .env("KEYWARD_ANTHROPIC_BASE_URL", &url)
        .env("KEYWARD_OPENAI_BASE_URL", &url)
        .env("KEYWARD_GOOGLE_BASE_URL", &url)
        .uid(wk_uid)
        .gid(wk_gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(user) = gateway_user {
        cmd.env("KEYWARD_WORKER_GATEWAY_USER", user);
    }
    let mut child = cmd.spawn().expect("start the worker service");
    let log = collect_stderr(&mut child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the worker did not bind {}: {}",
            socket.display(),
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Service { child, log }
}

/// The worker's own data dir: a KEK pair made by `keyward kek status --init`, then given to
/// the worker user (0711, so the gateway reaches the socket in `run/`).
fn worker_data_dir() -> (tempfile::TempDir, PathBuf) {
    let (wk_uid, wk_gid) = ensure_user(WORKER_USER);
    let dir = tempfile::Builder::new().prefix("keyward-worker-").tempdir().unwrap();
    let out = Command::new(bin())
        .args(["--init", "kek", "status"])
        .env_clear()
        .env("KEYWARD_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "kek status --init: {out:?}");
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let status = Command::new("chown")
        .args(["-R", &format!("{wk_uid}:{wk_gid}")])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for d in [dir.path().to_path_buf(), dir.path().join("run")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let socket = dir.path().join("run/w.sock");
    (dir, socket)
}

/// A gateway started as root with KEYWARD_USER and the worker service's socket, holding
/// only the public half of the worker's KEK.
fn gateway_for(fake: &FakeProviders, worker_dir: &Path, socket: &Path) -> Keyward {
    let public = std::fs::read(worker_dir.join("kek/local-1.pub")).unwrap();
    let mut opts = fake_options(
        fake,
        &[
            ("KEYWARD_USER", GATEWAY_USER),
            ("KEYWARD_WORKER_USER", ""),
            ("KEYWARD_WORKER_SOCKETS", &socket.display().to_string()),
            ("KEYWARD_WORKERS", "1"),
            ("KEYWARD_ALLOW_SAME_USER", ""),
        ],
    );
    opts.seed.push((PathBuf::from("kek/local-1.pub"), public, 0o644));
    start_with(opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_run_as_its_own_service_answers_the_configured_gateway_and_refuses_any_other_uid() {
    if !is_root() {
        keyward_testenv::skip(NEEDS_ROOT);
        return;
    }
    let (gw_uid, _) = ensure_user(GATEWAY_USER);
    let fake = FakeProviders::start().expect("start fakes");
    let (wdir, socket) = worker_data_dir();

    // Configured with the gateway's user: it answers.
    let service = worker_service(wdir.path(), &socket, &fake, Some(GATEWAY_USER));
    let kw = gateway_for(&fake, wdir.path(), &socket);
    assert_eq!(ids(kw.pid().unwrap(), "Uid:"), [gw_uid; 4], "the gateway dropped root");
    assert!(
        !kw.data_dir().join("kek/local-1.key").exists(),
        "the gateway's data dir holds no private half"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers_ready(&kw).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the worker service never became ready\n{}\n--- worker ---\n{}",
            kw.output(),
            service.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for p in PROVIDERS {
        let r = one_own_call(&fake, &kw, p).await;
        assert_eq!(
            r.status,
            200,
            "{p}: {r}\n--- worker ---\n{}",
            service.log.lock().unwrap()
        );
        assert!(r.text.contains(&fake_reply(p)), "{p}: {r}");
    }
    drop(kw);
    drop(service);

    // Started without the gateway's user: it accepts only its own, so the gateway is refused.
    let other = wdir.path().join("run/x.sock");
    let service = worker_service(wdir.path(), &other, &fake, None);
    let kw = gateway_for(&fake, wdir.path(), &other);
    let r = one_own_call(&fake, &kw, "google").await;
    assert_eq!(code(&r), "worker_unavailable", "a refused gateway: {r}");
    assert!(r.status >= 500, "{r}");
    assert_eq!(workers_ready(&kw).await, 0);
    let log = service.log.lock().unwrap().clone();
    assert!(
        log.contains("refused a connection") && log.contains(&format!("peer_uid=Some({gw_uid})")),
        "the worker logs the refusal, naming the gateway's uid: {log}"
    );
    drop(kw);
    drop(service);
}

#[test]
fn serve_refuses_to_run_its_workers_as_its_own_user_unless_allowed() {
    let dir = tempfile::Builder::new().prefix("keyward-same-user-").tempdir().unwrap();
    let run = |allow: Option<&str>| {
        let mut cmd = Command::new(bin());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYWARD_") {
                cmd.env_remove(&name);
            }
        }
        cmd.arg("serve")
            .env("KEYWARD_DATA_DIR", dir.path())
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(v) = allow {
            cmd.env("KEYWARD_ALLOW_SAME_USER", v);
        }
        cmd
    };
    let out = run(None).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("refusing to start")
            && stderr.contains("KEYWARD_ALLOW_SAME_USER=1")
            && stderr.contains("KEYWARD_WORKER_SOCKETS")
            && stderr.contains("KEYWARD_USER"),
        "the refusal says why and what to do: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));

    // Allowed: it starts (and says it runs one user).
    let mut child = run(Some("1")).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1024];
    while !seen.contains("listening on") && Instant::now() < deadline {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("listening on"), "with KEYWARD_ALLOW_SAME_USER=1: {seen}");
}
