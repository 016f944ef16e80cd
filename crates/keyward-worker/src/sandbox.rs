//! The worker's sandbox, applied once at start, after it has read the KEK private key and
//! bound its socket and before it touches any request.
//!
//! What each layer stops:
//! - **Environment**: the gateway starts the worker with an empty environment plus the
//!   few settings a worker uses, so nothing else the gateway's environment held (database
//!   URLs, cloud credentials) ever reaches the worker; the worker then clears even those.
//! - **`PR_SET_NO_NEW_PRIVS`**: no privilege gain through setuid binaries (and seccomp
//!   can be installed without privileges).
//! - **`PR_SET_DUMPABLE` 0**: no core dumps, and other processes of the same user cannot
//!   `ptrace` the worker or read its `/proc/<pid>/mem` (root still can).
//! - **`RLIMIT_CORE` 0**: no core file even if dumpability were restored.
//! - **seccomp**, an allow-list ([`ALLOWED`], each call with its reason): any system call
//!   not on it kills the process (`SECCOMP_RET_KILL_PROCESS`): `execve`/`execveat` (no
//!   shell, no helper programs), `ptrace` and `process_vm_readv/writev` (no reading other
//!   processes), mounts, namespaces, module loading, `bpf`, uid changes, and everything no
//!   one thought of. Arguments are checked where they decide what a call does: `clone` only
//!   with `CLONE_THREAD` (a fork is killed; `clone3`, whose flags a filter cannot read, is
//!   answered `ENOSYS` so glibc falls back to `clone`), `socket` only for the families and
//!   types in [`SOCKETS`] (a raw or packet socket is killed), `prctl` and `ioctl` only for
//!   the few operations listed; opening a file for writing is refused (`EPERM`, [`REFUSED`]).
//!   The list was found by tracing workers through the whole test suite; a call it misses is
//!   an outage (the worker dies, the gateway's supervisor starts another and the call fails
//!   `worker_unavailable`), which the suite running under the filter guards against.
//! - **Landlock**: every filesystem write is refused; reads only under the paths the
//!   worker needs (`/etc` for DNS and CA data, `/usr`, `/lib`, `/proc/self`).
//!
//! Best effort, and why: the key is opened into a locked, non-dumpable page and written
//! to the socket from there, but the kernel's socket buffers, TLS record buffers inside
//! rustls and the CPU's registers hold copies for a moment; a root user on the host can
//! read any process's memory. The sandbox narrows who can get at a key and for how long;
//! it does not make root harmless.

use std::collections::BTreeMap;

use landlock::{path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("prctl/rlimit: {0}")]
    Process(std::io::Error),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// Where the worker may read (DNS and CA data, libraries, its own /proc entry); nowhere may it write.
pub const READ_ONLY: &[&str] = &["/etc", "/usr", "/lib", "/lib64", "/proc/self"];

/// What the sandbox achieved, for the worker's start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    pub landlock: &'static str,
}

/// Asks the kernel to kill this process when its parent exits.
pub fn die_with_parent() -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).map_err(Into::into)
}

/// Whether our parent is still process `pid` (after `die_with_parent`, a check that
/// closes the window where the parent died before the death signal was armed).
pub fn parent_is(pid: u32) -> bool {
    rustix::process::getppid().is_some_and(|p| u32::try_from(p.as_raw_nonzero().get()).ok() == Some(pid))
}

/// Clears the process environment. Call before any thread is started.
pub fn clear_env() {
    let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in names {
        // Single-threaded at this point: nothing else reads the environment concurrently.
        std::env::remove_var(k);
    }
}

/// A panic hook that says where, never what: a panic message could hold request data.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        use std::io::Write;
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "keyward worker: internal error at {at}; exiting");
    }));
}

/// Applies every layer, in order. Call before starting threads: seccomp filters and
/// Landlock domains are inherited by threads created afterwards.
pub fn apply(read_only: &[&str]) -> Result<SandboxStatus, SandboxError> {
    // A worker must not outlive the gateway that started it.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| SandboxError::Process(e.into()))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::Process(e.into()))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| SandboxError::Process(e.into()))?;
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| SandboxError::Process(e.into()))?;
    let landlock = restrict_filesystem(read_only)?;
    install_seccomp()?;
    Ok(SandboxStatus { landlock })
}

fn restrict_filesystem(read_only: &[&str]) -> Result<&'static str, SandboxError> {
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let existing: Vec<&str> = read_only
        .iter()
        .copied()
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(existing, AccessFs::from_read(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        RulesetStatus::NotEnforced => "not enforced (kernel without Landlock)",
    })
}

/// What a system call's arguments must be for the allow-list to let it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// `clone` whose flags hold `CLONE_THREAD`: a new thread of this process. A new process
    /// (`fork`, which glibc makes through `clone` without it) is killed.
    Thread,
    /// `socket` of the families and types the worker uses (see [`SOCKETS`]).
    Socket,
    /// `socketpair` of `AF_UNIX` only.
    UnixPair,
    /// `prctl` with one of [`PRCTL_OPTIONS`] (naming a thread, reading state); never
    /// `PR_SET_DUMPABLE`, `PR_SET_SECCOMP` or anything else that could undo the sandbox.
    Prctl,
    /// `ioctl` with one of [`IOCTL_REQUESTS`] (non-blocking mode, close-on-exec, bytes readable).
    Ioctl,
}

/// One entry of the allow-list.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub nr: libc::c_long,
    pub name: &'static str,
    pub args: Args,
    /// Who makes it, and why it is needed.
    pub why: &'static str,
}

const fn allow(nr: libc::c_long, name: &'static str, args: Args, why: &'static str) -> Allowed {
    Allowed { nr, name, args, why }
}

/// Every system call the worker may make once sandboxed; anything else kills the process
/// (`SECCOMP_RET_KILL_PROCESS`). Found by tracing workers (`strace -f` from before the
/// sandbox, every thread) through the end-to-end suite, the Python SDK suite, the
/// `pkcs11` and `awskms` builds' tests, `kek rotate` (rewrap) and the worker's restarts;
/// the few calls no trace showed but that the kernel or libc make on paths the tests do not
/// reach are marked "(not traced)".
#[rustfmt::skip]
pub const ALLOWED: &[Allowed] = &[
    // Memory.
    allow(libc::SYS_brk, "brk", Args::Any, "malloc grows the heap"),
    allow(libc::SYS_mmap, "mmap", Args::Any, "malloc, thread stacks, locked key pages"),
    allow(libc::SYS_munmap, "munmap", Args::Any, "freeing what mmap mapped"),
    allow(libc::SYS_mremap, "mremap", Args::Any, "realloc of large buffers"),
    allow(libc::SYS_mprotect, "mprotect", Args::Any, "thread stack guard pages; malloc arenas"),
    allow(libc::SYS_madvise, "madvise", Args::Any, "malloc returning memory; MADV_DONTDUMP on key pages"),
    allow(libc::SYS_mlock, "mlock", Args::Any, "locking a page that holds a key (locked.rs)"),
    allow(libc::SYS_munlock, "munlock", Args::Any, "unlocking a wiped key page"),
    // Threads and waiting.
    allow(libc::SYS_clone, "clone", Args::Thread, "new runtime and blocking-pool threads (CLONE_THREAD only)"),
    allow(libc::SYS_clone3, "clone3", Args::Any, "let through here, answered ENOSYS by REFUSED (glibc then uses clone)"),
    allow(libc::SYS_futex, "futex", Args::Any, "locks and condition variables"),
    allow(libc::SYS_set_robust_list, "set_robust_list", Args::Any, "glibc, in each new thread"),
    allow(libc::SYS_rseq, "rseq", Args::Any, "glibc, in each new thread"),
    allow(libc::SYS_sched_yield, "sched_yield", Args::Any, "spin locks backing off"),
    allow(libc::SYS_sched_getaffinity, "sched_getaffinity", Args::Any, "counting CPUs for the runtime"),
    allow(libc::SYS_gettid, "gettid", Args::Any, "thread ids (tracing, locks)"),
    allow(libc::SYS_getpid, "getpid", Args::Any, "the worker's own pid (logs, SoftHSM2)"),
    allow(libc::SYS_getppid, "getppid", Args::Any, "the gateway's pid, to check a connecting peer"),
    allow(libc::SYS_getuid, "getuid", Args::Any, "the uid a connecting peer must have"),
    allow(libc::SYS_exit, "exit", Args::Any, "a thread ends"),
    allow(libc::SYS_exit_group, "exit_group", Args::Any, "the worker ends"),
    allow(libc::SYS_nanosleep, "nanosleep", Args::Any, "std::thread::sleep (not traced on every libc)"),
    allow(libc::SYS_clock_nanosleep, "clock_nanosleep", Args::Any, "std::thread::sleep"),
    allow(libc::SYS_clock_gettime, "clock_gettime", Args::Any, "clocks, where the vDSO falls back to the kernel (not traced)"),
    allow(libc::SYS_clock_getres, "clock_getres", Args::Any, "clock resolution, vDSO fallback (not traced)"),
    allow(libc::SYS_gettimeofday, "gettimeofday", Args::Any, "wall clock, vDSO fallback (not traced)"),
    allow(libc::SYS_restart_syscall, "restart_syscall", Args::Any, "the kernel resuming a wait a signal interrupted (not traced)"),
    // Signals.
    allow(libc::SYS_rt_sigaction, "rt_sigaction", Args::Any, "Rust's stack-overflow handler, per thread"),
    allow(libc::SYS_rt_sigprocmask, "rt_sigprocmask", Args::Any, "glibc, around thread creation"),
    allow(libc::SYS_rt_sigreturn, "rt_sigreturn", Args::Any, "returning from a signal handler (not traced)"),
    allow(libc::SYS_sigaltstack, "sigaltstack", Args::Any, "Rust's stack-overflow handler, per thread"),
    // The event loop.
    allow(libc::SYS_epoll_create1, "epoll_create1", Args::Any, "the tokio runtime's poller"),
    allow(libc::SYS_epoll_ctl, "epoll_ctl", Args::Any, "registering sockets with the poller"),
    allow(libc::SYS_epoll_pwait, "epoll_pwait", Args::Any, "waiting for sockets (aarch64 has no epoll_wait)"),
    allow(libc::SYS_eventfd2, "eventfd2", Args::Any, "waking the poller from another thread"),
    allow(libc::SYS_ppoll, "ppoll", Args::Any, "glibc's DNS resolver waiting for an answer"),
    // Files: reading only (write opens are refused, see REFUSED; Landlock bounds where).
    allow(libc::SYS_openat, "openat", Args::Any, "DNS configuration (/etc), SoftHSM2 token files; write opens answered EPERM by REFUSED"),
    allow(libc::SYS_read, "read", Args::Any, "sockets, the eventfd, files"),
    allow(libc::SYS_pread64, "pread64", Args::Any, "reading files at an offset (dynamic loader, SoftHSM2)"),
    allow(libc::SYS_readv, "readv", Args::Any, "vectored socket reads"),
    allow(libc::SYS_write, "write", Args::Any, "sockets, the eventfd, stderr (logs); no file is open for writing"),
    allow(libc::SYS_writev, "writev", Args::Any, "vectored socket writes (head and body in one)"),
    allow(libc::SYS_close, "close", Args::Any, "closing sockets and files"),
    allow(libc::SYS_fstat, "fstat", Args::Any, "stat of an open file"),
    allow(libc::SYS_newfstatat, "newfstatat", Args::Any, "stat by path or descriptor (glibc's fstat, SoftHSM2)"),
    allow(libc::SYS_statx, "statx", Args::Any, "Rust's std::fs::metadata"),
    allow(libc::SYS_lseek, "lseek", Args::Any, "SoftHSM2 reading its token files"),
    allow(libc::SYS_fcntl, "fcntl", Args::Any, "descriptor flags (non-blocking, close-on-exec); SoftHSM2's file locks"),
    allow(libc::SYS_flock, "flock", Args::Any, "SoftHSM2 locking a token file while reading it"),
    allow(libc::SYS_getdents64, "getdents64", Args::Any, "SoftHSM2 listing its token directory"),
    allow(libc::SYS_ioctl, "ioctl", Args::Ioctl, "FIONBIO, FIOCLEX, FIONREAD on sockets"),
    allow(libc::SYS_prctl, "prctl", Args::Prctl, "naming threads (tokio), reading a thread's name"),
    allow(libc::SYS_getrandom, "getrandom", Args::Any, "randomness for TLS and the KEK backends"),
    allow(libc::SYS_uname, "uname", Args::Any, "the AWS SDK's user agent"),
    // Sockets.
    allow(libc::SYS_socket, "socket", Args::Socket, "provider and KMS connections, DNS"),
    allow(libc::SYS_socketpair, "socketpair", Args::UnixPair, "the tokio runtime's signal pipe (AF_UNIX only)"),
    allow(libc::SYS_connect, "connect", Args::Any, "providers, KMS, the DNS server"),
    allow(libc::SYS_bind, "bind", Args::Any, "the worker's own socket (`keyward worker --listen`); glibc's DNS"),
    allow(libc::SYS_listen, "listen", Args::Any, "the worker's own socket (`keyward worker --listen`)"),
    allow(libc::SYS_accept4, "accept4", Args::Any, "the gateway's connections"),
    allow(libc::SYS_getsockopt, "getsockopt", Args::Any, "SO_PEERCRED (the gateway's pid and uid), SO_ERROR after connect"),
    allow(libc::SYS_setsockopt, "setsockopt", Args::Any, "TCP_NODELAY, keep-alive"),
    allow(libc::SYS_getsockname, "getsockname", Args::Any, "local addresses (tokio, glibc's DNS)"),
    allow(libc::SYS_getpeername, "getpeername", Args::Any, "peer addresses (tokio)"),
    allow(libc::SYS_sendto, "sendto", Args::Any, "socket writes; DNS queries"),
    allow(libc::SYS_recvfrom, "recvfrom", Args::Any, "socket reads; DNS answers"),
    allow(libc::SYS_sendmsg, "sendmsg", Args::Any, "socket writes"),
    allow(libc::SYS_recvmsg, "recvmsg", Args::Any, "socket reads; netlink answers to glibc's address check"),
    allow(libc::SYS_sendmmsg, "sendmmsg", Args::Any, "glibc's DNS resolver sends the A and AAAA queries together"),
    allow(libc::SYS_shutdown, "shutdown", Args::Any, "closing a connection's write side"),
    // x86_64's older forms of the calls above, which some code still makes.
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_open, "open", Args::Any, "older form of openat; write opens answered EPERM by REFUSED"),
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_stat, "stat", Args::Any, "older form of newfstatat"),
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_poll, "poll", Args::Any, "glibc's DNS resolver waiting for an answer"),
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_epoll_wait, "epoll_wait", Args::Any, "waiting for sockets"),
    #[cfg(target_arch = "x86_64")]
    allow(libc::SYS_time, "time", Args::Any, "wall clock, vDSO fallback (not traced)"),
];

/// System calls that are answered with an error instead of running: let through by the
/// allow-list (so they do not kill) and refused by a filter of their own.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub nr: libc::c_long,
    pub name: &'static str,
    /// The argument index of `open`/`openat`'s flags, for a refusal of write opens only;
    /// `None` refuses every call.
    pub open_flags_arg: Option<u8>,
    pub errno: i32,
    pub why: &'static str,
}

pub const REFUSED: &[Refused] = &[
    Refused {
        nr: libc::SYS_clone3,
        name: "clone3",
        open_flags_arg: None,
        errno: libc::ENOSYS,
        why: "its flags are in memory a filter cannot read, so CLONE_THREAD cannot be checked; on ENOSYS glibc creates threads with clone",
    },
    Refused {
        nr: libc::SYS_openat,
        name: "openat",
        open_flags_arg: Some(2),
        errno: libc::EPERM,
        why: "opening a file for writing (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC): refused before Landlock sees it",
    },
    #[cfg(target_arch = "x86_64")]
    Refused {
        nr: libc::SYS_open,
        name: "open",
        open_flags_arg: Some(1),
        errno: libc::EPERM,
        why: "as openat",
    },
];

/// The families and types `socket` may create (the type without SOCK_NONBLOCK and
/// SOCK_CLOEXEC), and the protocol where it matters. A raw IP socket, a packet socket or
/// any other family kills the worker.
pub const SOCKETS: &[(i32, i32, Option<i32>, &str)] = &[
    (
        libc::AF_UNIX,
        libc::SOCK_STREAM,
        None,
        "the gateway's connections; nscd and other local name services",
    ),
    (
        libc::AF_UNIX,
        libc::SOCK_DGRAM,
        None,
        "glibc's log and name-service sockets",
    ),
    (
        libc::AF_INET,
        libc::SOCK_STREAM,
        None,
        "providers and KMS over IPv4; DNS over TCP",
    ),
    (
        libc::AF_INET,
        libc::SOCK_DGRAM,
        None,
        "DNS over UDP; glibc's address sorting",
    ),
    (
        libc::AF_INET6,
        libc::SOCK_STREAM,
        None,
        "providers and KMS over IPv6; DNS over TCP",
    ),
    (
        libc::AF_INET6,
        libc::SOCK_DGRAM,
        None,
        "DNS over UDP; glibc's address sorting",
    ),
    (
        libc::AF_NETLINK,
        libc::SOCK_RAW,
        Some(libc::NETLINK_ROUTE),
        "glibc's getaddrinfo asks which address families are configured",
    ),
];

/// `prctl` options the worker's threads use.
pub const PRCTL_OPTIONS: &[(i32, &str)] = &[
    (libc::PR_SET_NAME, "naming a thread (tokio's workers)"),
    (libc::PR_GET_NAME, "reading a thread's name"),
];

/// `ioctl` requests on the worker's descriptors.
#[allow(
    clippy::unnecessary_cast,
    reason = "the request constants' type differs between libc targets (c_ulong or c_int)"
)]
pub const IOCTL_REQUESTS: &[(u64, &str)] = &[
    (libc::FIONBIO as u64, "non-blocking mode (std's set_nonblocking)"),
    (libc::FIOCLEX as u64, "close-on-exec"),
    (libc::FIONREAD as u64, "bytes waiting on a socket (glibc's DNS)"),
];

/// How many system calls the allow-list names (the worker's start-up log says it).
pub fn allow_list_size() -> usize {
    ALLOWED.len()
}

fn arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

fn seccomp_err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Seccomp(e.to_string())
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(seccomp_err)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(seccomp_err)
}

/// The rules (alternatives) an entry's arguments must match; empty means any arguments.
fn arg_rules(args: Args) -> Result<Vec<SeccompRule>, SandboxError> {
    const TYPE_MASK: u64 = 0xf; // SOCK_TYPE_MASK: the type without its flags
    match args {
        Args::Any => Ok(Vec::new()),
        Args::Thread => {
            let thread = libc::CLONE_THREAD as u64;
            Ok(vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?])
        }
        Args::Socket => SOCKETS
            .iter()
            .map(|(family, ty, protocol, _)| {
                let mut c = vec![
                    cond(0, SeccompCmpOp::Eq, *family as u64)?,
                    cond(1, SeccompCmpOp::MaskedEq(TYPE_MASK), *ty as u64)?,
                ];
                if let Some(p) = protocol {
                    c.push(cond(2, SeccompCmpOp::Eq, *p as u64)?);
                }
                rule(c)
            })
            .collect(),
        Args::UnixPair => Ok(vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?]),
        Args::Prctl => PRCTL_OPTIONS
            .iter()
            .map(|(option, _)| rule(vec![cond(0, SeccompCmpOp::Eq, *option as u64)?]))
            .collect(),
        Args::Ioctl => IOCTL_REQUESTS
            .iter()
            .map(|(request, _)| rule(vec![cond(1, SeccompCmpOp::Eq, *request)?]))
            .collect(),
    }
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch()).map_err(seccomp_err)?;
    filter.try_into().map_err(|e: seccompiler::BackendError| seccomp_err(e))
}

/// The filters, in the order they are installed: one per errno of [`REFUSED`] (matching
/// calls get the errno, everything else passes), then the allow-list (listed calls pass,
/// everything else kills). The kernel runs every filter on each call and takes the
/// strictest answer: kill, then errno, then allow.
fn programs() -> Result<Vec<BpfProgram>, SandboxError> {
    let mut out = Vec::new();
    let mut errnos: Vec<i32> = REFUSED.iter().map(|r| r.errno).collect();
    errnos.sort_unstable();
    errnos.dedup();
    for errno in errnos {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for r in REFUSED.iter().filter(|r| r.errno == errno) {
            let alternatives = match r.open_flags_arg {
                None => Vec::new(),
                Some(arg) => [libc::O_WRONLY, libc::O_RDWR, libc::O_CREAT, libc::O_TRUNC]
                    .iter()
                    .map(|flag| {
                        let flag = *flag as u64;
                        rule(vec![cond(arg, SeccompCmpOp::MaskedEq(flag), flag)?])
                    })
                    .collect::<Result<_, _>>()?,
            };
            rules.insert(r.nr, alternatives);
        }
        out.push(compile(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
        )?);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in ALLOWED {
        rules.insert(a.nr, arg_rules(a.args)?);
    }
    out.push(compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)?);
    Ok(out)
}

fn install_seccomp() -> Result<(), SandboxError> {
    // All built first, then installed one after another: the refusal filters before the
    // allow-list, which does not allow `seccomp` itself.
    for program in programs()? {
        seccompiler::apply_filter(&program).map_err(seccomp_err)?;
    }
    Ok(())
}

/// What `keyward worker-selftest` tries once sandboxed (used by the tests that check the
/// sandbox from inside). Each is stopped in one of two ways, chosen per call:
/// - **killed**: the kernel ends the process with `SIGSYS` (`Exec`, `Fork`, `Ptrace`,
///   `ProcessVmReadv`, `RawSocket`): calls with no legitimate use in a worker;
/// - **refused** with an errno, the process goes on: `Write` (`EPERM` from seccomp, before
///   Landlock's `EACCES`), so a library probing for a writable file fails instead of taking
///   the worker down.
///
/// `Thread` and `Resolve` must work inside the sandbox (a new thread through glibc's
/// `clone3` → `ENOSYS` → `clone` fallback; a name lookup through glibc's resolver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Create a file in `/tmp`: must be refused (`EPERM`).
    Write,
    /// `execve("/bin/true")`: killed.
    Exec,
    /// `fork()` (glibc: `clone` without `CLONE_THREAD`): killed.
    Fork,
    /// `ptrace(PTRACE_ATTACH, parent)`: killed.
    Ptrace,
    /// `process_vm_readv` of the parent: killed.
    ProcessVmReadv,
    /// `socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)`: killed.
    RawSocket,
    /// A new thread that runs and is joined: must work.
    Thread,
    /// Look up `localhost` and a DNS name (the answer may be an error without a network;
    /// the process must not be killed): must work.
    Resolve,
}

impl Probe {
    pub const NAMES: [&'static str; 8] = [
        "write",
        "exec",
        "fork",
        "ptrace",
        "process_vm_readv",
        "raw_socket",
        "thread",
        "resolve",
    ];

    pub fn parse(name: &str) -> Option<Probe> {
        Some(match name {
            "write" => Probe::Write,
            "exec" => Probe::Exec,
            "fork" => Probe::Fork,
            "ptrace" => Probe::Ptrace,
            "process_vm_readv" => Probe::ProcessVmReadv,
            "raw_socket" => Probe::RawSocket,
            "thread" => Probe::Thread,
            "resolve" => Probe::Resolve,
            _ => return None,
        })
    }
}

/// Applies the sandbox, then tries `probe`. Returns the process exit code: 0 when the
/// sandbox stopped the attempt (or, for `Thread` and `Resolve`, when it worked), 1 when it
/// did not. A probe that is killed never returns.
pub fn selftest(probe: Probe) -> i32 {
    use std::io::Write;
    if let Err(e) = apply(READ_ONLY) {
        let _ = writeln!(std::io::stderr(), "sandbox: {e}");
        return 2;
    }
    let say = |ok: bool, what: String| {
        if ok {
            let _ = writeln!(std::io::stdout(), "{what}");
            0
        } else {
            let _ = writeln!(std::io::stderr(), "{what}");
            1
        }
    };
    match probe {
        Probe::Write => {
            let path = format!("/tmp/keyward-selftest-{}", std::process::id());
            match std::fs::write(&path, b"x") {
                Ok(()) => say(false, format!("write to {path} was allowed")),
                Err(e) => say(true, format!("write refused: {e} (errno {:?})", e.raw_os_error())),
            }
        }
        Probe::Thread => match std::thread::spawn(|| 7).join() {
            Ok(7) => say(true, "thread ran".to_owned()),
            _ => say(false, "thread failed".to_owned()),
        },
        Probe::Resolve => {
            use std::net::ToSocketAddrs;
            let local = ("localhost", 443).to_socket_addrs().map(|a| a.count());
            let remote = ("api.openai.com", 443).to_socket_addrs().map(|a| a.count());
            say(
                true,
                format!("resolved: localhost {local:?}, api.openai.com {remote:?}"),
            )
        }
        Probe::Exec | Probe::Fork | Probe::Ptrace | Probe::ProcessVmReadv | Probe::RawSocket => {
            let r = forbidden(probe);
            say(false, format!("{probe:?} returned {r} instead of killing the process"))
        }
    }
}

/// Makes the forbidden call; returns its result if the kernel lets it return.
#[allow(unsafe_code)]
fn forbidden(probe: Probe) -> i64 {
    let parent = rustix::process::getppid().map_or(1, |p| p.as_raw_nonzero().get());
    match probe {
        Probe::Exec => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: execve with a NUL-terminated path, and argv and envp arrays that end
            // in NULL and outlive the call; on success it does not return.
            i64::from(unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
        }
        Probe::Fork => {
            // SAFETY: fork in a single-threaded process; a child that did come into being
            // leaves at once with _exit, touching nothing.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(0) };
            }
            i64::from(pid)
        }
        // SAFETY: PTRACE_ATTACH takes no pointers (addr and data are 0).
        Probe::Ptrace => unsafe { libc::ptrace(libc::PTRACE_ATTACH, parent, 0usize, 0usize) },
        Probe::ProcessVmReadv => {
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: 8,
            };
            // SAFETY: one local iovec over `buf`, which outlives the call; the remote
            // address is only read by the kernel in the other process.
            unsafe { libc::process_vm_readv(parent, &local, 1, &remote, 1, 0) as i64 }
        }
        // SAFETY: socket takes no pointers; a descriptor it returns is never used.
        Probe::RawSocket => i64::from(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) }),
        Probe::Write | Probe::Thread | Probe::Resolve => 0,
    }
}
