//! What a process tree costs: resident memory (sampled, for the peak) and CPU time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `pid` and its children (the gateway and its workers). Each thread has its own list of
/// the children it started (a worker is started by whichever runtime thread supervises
/// it), so every thread's list is read.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    for task in tasks {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU time of `pid` so far, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// CPU seconds used so far by the processes of `pids`.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() as f64 / 100.0
}

/// Waits (up to `limit`) until the processes of `pids` use under a tenth of a core over a
/// 300 ms window: a server that is still working off requests cut short at the end of
/// one cell (LiteLLM keeps going for a minute after an overload) must not eat into the next.
pub fn wait_idle(pids: &[u32], limit: Duration) {
    let started = std::time::Instant::now();
    let window = Duration::from_millis(300);
    while started.elapsed() < limit {
        let before = cpu_seconds(pids);
        std::thread::sleep(window);
        if cpu_seconds(pids) - before < 0.1 * window.as_secs_f64() {
            return;
        }
    }
}

/// Samples the summed RSS of a process tree every 20 ms until dropped; keeps the peak.
#[derive(Debug)]
pub struct PeakRss {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    pub fn start(root: u32) -> PeakRss {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut pids = tree(root);
            let mut n = 0u32;
            while !s.load(Ordering::Relaxed) {
                if n.is_multiple_of(50) {
                    pids = tree(root);
                }
                n += 1;
                let total: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
                p.fetch_max(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss {
            peak_kib,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak in MiB.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}
