//! The gateway process's own guard: no core dumps, and no reading of its memory by other
//! processes of its user, as the worker does for itself (keyward-worker's sandbox).
//!
//! Why: keys pasted into the gateway pass through its memory on their way to being sealed,
//! and it holds users' session and bearer-token material. A core file would write all of it
//! to disk, and any process running as the gateway's user could otherwise `ptrace` it or
//! read `/proc/<pid>/mem`.
//!
//! Call [`forbid_core_dumps_and_ptrace`] at start, and again after any change of user id:
//! the kernel resets dumpability when the credentials change (to `fs.suid_dumpable`, which
//! may allow dumps).

use crate::runtime::RuntimeError;

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0: no core dump, and only a process
/// with `CAP_SYS_PTRACE` may `ptrace` it or open its `/proc/<pid>/mem`) and sets its
/// core-file size limit to 0, soft and hard, so no core file is written even if
/// dumpability came back. Both hold for the life of the process; children reset
/// dumpability when they exec (the worker sets its own).
pub fn forbid_core_dumps_and_ptrace() -> Result<(), RuntimeError> {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| RuntimeError::Other(format!("prctl(PR_SET_DUMPABLE, 0): {e}")))?;
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| RuntimeError::Other(format!("setrlimit(RLIMIT_CORE, 0): {e}")))
}

#[cfg(test)]
mod tests {
    use rustix::process::{dumpable_behavior, getrlimit, DumpableBehavior, Resource};

    use super::*;

    /// Run in the unit-test process itself: it becomes non-dumpable, which no other test
    /// depends on.
    #[test]
    fn the_process_is_not_dumpable_and_writes_no_core() {
        forbid_core_dumps_and_ptrace().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
        let core = getrlimit(Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
        // Again (as after a change of user): still fine.
        forbid_core_dumps_and_ptrace().unwrap();
    }
}
