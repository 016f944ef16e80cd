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
//! - **seccomp** (kill the process on match): `execve`/`execveat` (no shell, no helper
//!   programs), `fork`/`vfork`, `ptrace` and `process_vm_readv/writev` (no reading other
//!   processes), mounts, namespaces, module loading, `bpf`, `perf_event_open`, `keyctl`,
//!   `userfaultfd`, uid/gid changes, reboot/kexec/swap. The filter is a deny list: the
//!   async runtime and TLS need a wide set of ordinary calls, and a kill on an unforeseen
//!   one would be an outage, so an allow list is future work.
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
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

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

/// System calls the worker never makes; any of them kills the process.
const DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    // (fork/vfork exist only on some architectures, and glibc's fork() goes through clone:
    // these two stop direct calls only.)
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    libc::SYS_io_uring_setup,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_personality,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

fn install_seccomp() -> Result<(), SandboxError> {
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|n| (*n, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::KillProcess, arch)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// What `keyward worker-selftest` tries once sandboxed (used by the tests that check the
/// sandbox from inside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Create a file in `/tmp`: Landlock must refuse it.
    Write,
    /// `execve("/bin/true")`: seccomp must kill the process (SIGSYS).
    Exec,
}

/// Applies the sandbox, then tries `probe`. Returns the process exit code: 0 when the
/// sandbox stopped the attempt, 1 when it did not. An `Exec` that is stopped never
/// returns: the kernel kills the process.
pub fn selftest(probe: Probe) -> i32 {
    use std::io::Write;
    if let Err(e) = apply(READ_ONLY) {
        let _ = writeln!(std::io::stderr(), "sandbox: {e}");
        return 2;
    }
    match probe {
        Probe::Write => {
            let path = format!("/tmp/keyward-selftest-{}", std::process::id());
            match std::fs::write(&path, b"x") {
                Ok(()) => {
                    let _ = writeln!(std::io::stderr(), "write to {path} was allowed");
                    1
                }
                Err(e) => {
                    let _ = writeln!(std::io::stdout(), "write refused: {e}");
                    0
                }
            }
        }
        Probe::Exec => exec_true(),
    }
}

#[allow(unsafe_code)]
fn exec_true() -> i32 {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: execve with NUL-terminated path, argv and envp arrays that end in NULL and
    // outlive the call; on success it does not return.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"execve returned instead of killing the process\n",
    );
    1
}
