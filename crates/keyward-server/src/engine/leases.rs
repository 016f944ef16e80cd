//! Shared-pool reservations held as leases (see `keyward_store::lease`): this node's
//! identity, the leases its calls hold, and the task that renews them and releases the
//! leases of holders that died.
//!
//! - **Who holds a lease.** A node has a stable id, kept in `<data_dir>/node-id` and
//!   `flock`ed for as long as `serve` runs, and each run of it has an id of its own. A lease
//!   names both. At start a node releases at once the leases of its earlier runs (they died
//!   with the process); those of other nodes (other data dirs on one PostgreSQL) it leaves
//!   alone while they are renewed. Should the file be locked by another live process on the
//!   same data dir, this run takes a fresh id and releases nothing at start.
//! - **Renewal.** A call holds its lease through a [`HeldLease`] in its [`super::calls::CallContext`];
//!   every third of the lease's length one statement renews every lease still held here. A
//!   call whose task ended without settling (dropped, panicked) stops being renewed, so its
//!   lease expires and is released like a dead node's.
//! - **Release.** Any node sweeps expired leases at the same pace; the store releases each
//!   once (credits back, one `error:abandoned` event on the account's chain).
//!
//! Node clocks must agree to well within a lease's length: a node whose clock runs ahead
//! by more than that would release leases that are still renewed.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyward_core::UnixMillis;
use keyward_store::{LeaseId, LeaseRelease, ReleasedLease, Store, StoreResult};

use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// The file holding the node's stable id, in the data dir.
pub const NODE_ID_FILE: &str = "node-id";

/// Leases released per store call; a sweep repeats until fewer come back.
const RELEASE_BATCH: u32 = 256;

/// Why this node's id could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct NodeIdError {
    path: String,
    reason: String,
}

/// This node's leases: who it is, how long a lease lasts, and which leases its calls hold.
#[derive(Debug)]
pub struct Leases {
    node: String,
    run: String,
    length: Duration,
    /// Whether `node` is this process's alone (its file is locked here): only then may
    /// leases of its earlier runs be released at start.
    owns_node: bool,
    held: Mutex<BTreeSet<LeaseId>>,
    /// The locked node-id file, kept open (and so locked) while the process runs.
    _lock: Option<std::fs::File>,
}

impl Leases {
    /// A node `node` in run `run`, owning its id (tests and callers that manage ids).
    pub fn new(node: &str, run: &str, length: Duration) -> Arc<Leases> {
        Arc::new(Leases {
            node: node.to_owned(),
            run: run.to_owned(),
            length,
            owns_node: true,
            held: Mutex::default(),
            _lock: None,
        })
    }

    /// The node whose id is in `<data_dir>/node-id` (made on first use), in a new run.
    pub fn for_data_dir(data_dir: &Path, length: Duration) -> Result<Arc<Leases>, NodeIdError> {
        let path = data_dir.join(NODE_ID_FILE);
        let err = |reason: String| NodeIdError {
            path: path.display().to_string(),
            reason,
        };
        let (file, node) = open_node_id(&path).map_err(|e| err(e.to_string()))?;
        let run = random_hex("run_");
        let (node, owns_node, lock) = match file.try_lock() {
            Ok(()) => (node, true, Some(file)),
            Err(_) => {
                let fresh = random_hex("node_");
                tracing::warn!(
                    path = %path.display(),
                    node = %fresh,
                    "another running keyward holds this data dir's node id; this run uses a fresh one and leaves the leases of earlier runs to expire"
                );
                (fresh, false, None)
            }
        };
        Ok(Arc::new(Leases {
            node,
            run,
            length,
            owns_node,
            held: Mutex::default(),
            _lock: lock,
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    /// This run's name where it holds something other than a lease (a webhook claim):
    /// `<node>/<run>`.
    pub fn holder(&self) -> String {
        format!("{}/{}", self.node, self.run)
    }

    /// The start of every name [`Leases::holder`] gave this node's runs, when the node is
    /// this process's alone (see [`release_earlier_runs`]); `None` otherwise.
    pub fn earlier_runs_prefix(&self) -> Option<String> {
        self.owns_node.then(|| format!("{}/", self.node))
    }

    /// When a lease taken or renewed at `now` expires.
    pub fn expiry(&self, now: UnixMillis) -> UnixMillis {
        let ms = i64::try_from(self.length.as_millis()).unwrap_or(i64::MAX);
        UnixMillis(now.as_i64().saturating_add(ms))
    }

    /// How often held leases are renewed and expired ones swept: a third of the length, so
    /// a lease outlives one failed renewal.
    pub fn renew_every(&self) -> Duration {
        (self.length / 3).max(Duration::from_millis(100))
    }

    /// Marks lease `id` as held by a call of this run until the returned guard drops.
    pub fn hold(self: &Arc<Self>, id: LeaseId) -> HeldLease {
        self.locked().insert(id);
        HeldLease {
            id,
            leases: Arc::clone(self),
        }
    }

    /// The leases held now.
    pub fn held(&self) -> Vec<LeaseId> {
        self.locked().iter().copied().collect()
    }

    fn locked(&self) -> MutexGuard<'_, BTreeSet<LeaseId>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A lease a call holds: renewed while this lives, no longer once it drops (after the call
/// is settled, or if its task ends without settling: then the lease expires and is released).
#[derive(Debug)]
pub struct HeldLease {
    pub id: LeaseId,
    leases: Arc<Leases>,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.leases.locked().remove(&self.id);
    }
}

/// Reads the node id from `path`, or makes one (mode 0600); returns the open file with it.
fn open_node_id(path: &Path) -> std::io::Result<(std::fs::File, String)> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let id = text.trim();
    if is_node_id(id) {
        return Ok((file, id.to_owned()));
    }
    if !id.is_empty() {
        return Err(std::io::Error::other(
            "does not hold a node id (node_ and 32 hex digits); remove it to make a new one",
        ));
    }
    // A new node (or a file that an earlier first start left empty).
    let id = random_hex("node_");
    file.rewind()?;
    file.write_all(format!("{id}\n").as_bytes())?;
    file.sync_all()?;
    Ok((file, id))
}

fn is_node_id(s: &str) -> bool {
    s.strip_prefix("node_")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn random_hex(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(super::identity::random_id_bytes()))
}

/// Releases, at start, the leases this node's earlier runs held: their calls died with the
/// process. Returns how many.
pub async fn release_earlier_runs(
    store: &dyn Store,
    leases: &Leases,
    clock: &SharedClock,
    metrics: &Metrics,
) -> StoreResult<usize> {
    if !leases.owns_node {
        return Ok(0);
    }
    let which = LeaseRelease::EarlierRuns {
        node: &leases.node,
        current: &leases.run,
    };
    release_all(store, which, clock, metrics).await
}

/// Releases every lease `which` picks, a batch at a time.
async fn release_all(
    store: &dyn Store,
    which: LeaseRelease<'_>,
    clock: &SharedClock,
    metrics: &Metrics,
) -> StoreResult<usize> {
    let mut total = 0;
    loop {
        let released = store.release_leases(which, clock.now(), RELEASE_BATCH).await?;
        total += released.len();
        note_released(&released, which, metrics);
        if released.len() < RELEASE_BATCH as usize {
            return Ok(total);
        }
    }
}

fn note_released(released: &[ReleasedLease], which: LeaseRelease<'_>, metrics: &Metrics) {
    for l in released {
        metrics.record_ai_call(l.provider, l.key_source, keyward_store::lease::ABANDONED);
        tracing::warn!(
            lease = l.id,
            account = %l.account_id,
            provider = %l.provider,
            credits = l.amount,
            holder = %l.node,
            why = ?which,
            "released the reservation of a call that was never settled; audited as error:abandoned"
        );
    }
}

/// Runs for as long as the node does: renews the leases its calls hold, then releases the
/// expired ones of any node, every [`Leases::renew_every`].
pub async fn keep(store: Arc<dyn Store>, leases: Arc<Leases>, clock: SharedClock, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(leases.renew_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let held = leases.held();
        if !held.is_empty() {
            match store.renew_leases(&leases.run, &held, leases.expiry(clock.now())).await {
                Ok(renewed) if renewed.len() < held.len() => {
                    // A call settled meanwhile has no lease row any more, and no guard.
                    // One still held but not renewed was released under a live call (this
                    // node could not renew for a whole lease): that call is on record as
                    // abandoned, and its settlement will be refused.
                    let still = leases.held();
                    let lost: Vec<LeaseId> = held
                        .into_iter()
                        .filter(|id| !renewed.contains(id) && still.contains(id))
                        .collect();
                    if !lost.is_empty() {
                        tracing::warn!(
                            ?lost,
                            "reservation leases of calls in flight were released by another node"
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, held = held.len(), "could not renew reservation leases"),
            }
        }
        if let Err(e) = release_all(store.as_ref(), LeaseRelease::Expired, &clock, &metrics).await {
            tracing::warn!(error = %e, "could not release expired reservation leases");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_id_across_runs_and_a_second_process_gets_another() {
        let dir = tempfile::tempdir().unwrap();
        let length = Duration::from_secs(30);
        let first = Leases::for_data_dir(dir.path(), length).unwrap();
        assert!(is_node_id(first.node()) && first.owns_node);
        // A second holder while the first runs: not the same node.
        let second = Leases::for_data_dir(dir.path(), length).unwrap();
        assert_ne!(second.node(), first.node());
        assert!(!second.owns_node);
        let node = first.node().to_owned();
        let run = first.run().to_owned();
        drop(first);
        let again = Leases::for_data_dir(dir.path(), length).unwrap();
        assert_eq!(again.node(), node, "a restarted node is the same node");
        assert_ne!(again.run(), run, "in a new run");
        assert!(again.owns_node);
    }

    #[test]
    fn held_leases_are_renewed_until_their_guard_drops() {
        let leases = Leases::new("node_a", "run_a", Duration::from_secs(9));
        assert_eq!(leases.renew_every(), Duration::from_secs(3));
        assert_eq!(leases.expiry(UnixMillis(1_000)), UnixMillis(10_000));
        let a = leases.hold(7);
        let b = leases.hold(9);
        assert_eq!(leases.held(), vec![7, 9]);
        drop(a);
        assert_eq!(leases.held(), vec![9]);
        drop(b);
        assert!(leases.held().is_empty());
    }

    #[test]
    fn a_node_id_file_holding_something_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "not an id\n").unwrap();
        let err = Leases::for_data_dir(dir.path(), Duration::from_secs(30)).unwrap_err();
        assert!(err.to_string().contains("does not hold a node id"), "{err}");
    }
}
