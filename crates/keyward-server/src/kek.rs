//! KEK versions in the gateway: which version it seals to, noticing a rotation or a
//! retirement while serving, and the `keyward kek` operations (status, rotate, promote,
//! rewrap, retire).
//!
//! Every per-backend difference (local files, a PKCS#11 token, AWS KMS) is behind
//! [`KekBackend`] (keyward-crypto), built from the configuration by
//! [`crate::runtime::kek_backend`]; this module holds the parts that need the database, the
//! workers or the log.
//!
//! # Who holds what
//! - The gateway seals to the *primary* version with its public half only ([`SealerCell`]).
//!   It lists `<data_dir>/kek/` and reads `kek/primary`; it never reads a private key file.
//! - Workers load every live version's private half before sandboxing themselves and pick
//!   the opener by the kek id a blob names. After the sandbox they cannot read the data dir,
//!   so they learn of a new or retired version by being restarted.
//!
//! # How a running node learns of a rotation
//! [`watch`] looks at the kek directory once a second (a `readdir` and a 2-byte read).
//! When the set of versions or the primary changes it restarts the workers one at a time
//! (each comes back holding the new set; a retired key leaves their memory), and only then
//! switches the sealer to the new primary, so nothing is ever sealed to a version the
//! workers cannot open. A call in flight on the worker being restarted fails (`503`/`502`
//! as for any worker crash); a rotation is an operator's action, not a hot path.
//!
//! # Retire never races a save
//! Each gateway reports in `kek_sealers` the versions it may seal to ([`SealerReporter`]):
//! after a switch it keeps naming the old one until no save holding the old sealer is left,
//! and [`retire`] refuses a version named by any report younger than [`SEALER_LIVE`] before
//! it counts blobs.
//!
//! # Re-wrap
//! `serve` runs it in the background ([`BackgroundRewrap`]) after each switch and at start,
//! unless `KEYWARD_KEK_REWRAP=manual`; `keyward kek rewrap` runs the same function.
//! [`rewrap`] starts its own worker (the worker accepts only its parent), walks every sealed
//! blob in pages, sends each blob not yet under the primary to the worker (`Rewrap`), and
//! swaps the answer in with a compare-and-swap on the old bytes. It can be killed at any
//! point (kill -9 included) and run again: every blob is, at every instant, under exactly
//! one version, and a second run skips blobs already moved. The gateway side never sees a
//! plaintext key: the worker opens, re-seals and wipes.
//!
//! # Audit
//! KEK actions are platform-level: no account's HMAC chain is theirs. `keyward kek rotate`,
//! `promote` and `retire` append `kek.rotated`, `kek.promoted` and `kek.retired` to the
//! platform's audit chain ([`audit`]) once done; they are also logged (`tracing`, target
//! `keyward::kek`) and printed as JSON by the CLI. A re-wrap moves no key between owners
//! and is logged only.

use std::collections::BTreeMap;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use keyward_core::{KeyBinding, KeyId, KeyOwner};
use keyward_crypto::{local, CryptoError, KekBackend, KekSealer, VersionFact};
use keyward_store::kek::{count_by_kek, kek_id_of, BlobCursor, KekStore};
use keyward_store::{Store, StoreError};
use keyward_worker_protocol::protocol::RewrapRequest;

use crate::config::Config;
use crate::workers::{SoloWorker, WorkerCommand, WorkerPool};

/// What a `keyward kek` operation can fail with. Messages name versions, counts and paths,
/// never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("KEK {kek_id} is the primary version; rotate to a new version first")]
    RetirePrimary { kek_id: String },
    #[error("KEK {kek_id} still wraps {count} saved key(s); run `keyward kek rewrap` first")]
    StillInUse { kek_id: String, count: u64 },
    #[error(
        "KEK {kek_id} may still be sealed to by running gateway(s) {nodes}; each switches within \
         seconds of a rotation (and reports it within {report_every_s} s): try again shortly"
    )]
    StillSealing {
        kek_id: String,
        nodes: String,
        report_every_s: u64,
    },
    #[error("re-wrap worker: {0}")]
    Worker(String),
    #[error("{0}")]
    Runtime(#[from] crate::RuntimeError),
}

/// The gateway's sealer for the primary KEK version, swapped when the primary changes.
#[derive(Debug)]
pub struct SealerCell(RwLock<Arc<KekSealer>>);

impl SealerCell {
    pub fn new(sealer: KekSealer) -> SealerCell {
        SealerCell(RwLock::new(Arc::new(sealer)))
    }

    /// The sealer to use now.
    pub fn current(&self) -> Arc<KekSealer> {
        match self.0.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in `sealer` and hands back the one it replaces: saves that took the old one
    /// may still be sealing or storing with it (see [`SealerReporter`]).
    fn set(&self, sealer: KekSealer) -> Arc<KekSealer> {
        let new = Arc::new(sealer);
        match self.0.write() {
            Ok(mut s) => std::mem::replace(&mut *s, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }
}

/// Opens the database as both [`Store`] and [`KekStore`] (one set of connections).
pub async fn open_stores(config: &Config) -> Result<(Arc<dyn Store>, Arc<dyn KekStore>), KekError> {
    Ok(crate::runtime::open_stores(config).await?)
}

/// Rows per page when walking the sealed blobs.
pub const PAGE: u32 = 500;

/// `keyward kek status`: versions, the primary, blobs per version, re-wrap progress.
pub async fn status(backend: &KekBackend, kek: &dyn KekStore) -> Result<serde_json::Value, KekError> {
    let counts = count_by_kek(kek, PAGE).await?;
    let primary_version = backend.primary()?;
    let primary = backend.kek_id(primary_version);
    let total: u64 = counts.values().sum();
    let on_primary = counts.get(&primary).copied().unwrap_or(0);
    let mut out = serde_json::json!({
        "backend": backend.name(),
        "primary": primary,
        "blobs_by_kek": counts,
        "blobs_total": total,
        "blobs_on_primary": on_primary,
        "rewrap_remaining": total - on_primary,
    });
    // A backend whose versions live elsewhere (PKCS#11: in the token) lists none.
    if let Some(list) = backend.versions()? {
        let listed: Vec<serde_json::Value> = list
            .versions
            .iter()
            .map(|v| {
                let mut entry = serde_json::json!({
                    "kek_id": v.kek_id,
                    "version": v.version,
                    "primary": v.version == primary_version,
                    "retired": v.retired,
                    "blobs": counts.get(&v.kek_id).copied().unwrap_or(0),
                });
                for (name, fact) in &v.facts {
                    entry[*name] = match fact {
                        VersionFact::Flag(b) => serde_json::json!(b),
                        VersionFact::Text(t) => serde_json::json!(t),
                    };
                }
                entry
            })
            .collect();
        if list.exhaustive {
            // Blobs naming a kek id with no files here (another backend, garbage).
            let unknown: BTreeMap<&String, &u64> = counts
                .iter()
                .filter(|(id, _)| !list.versions.iter().any(|v| &&v.kek_id == id))
                .collect();
            out["blobs_under_unknown_kek"] = serde_json::json!(unknown);
        }
        out["versions"] = serde_json::json!(listed);
    }
    Ok(out)
}

/// `keyward kek rotate`: a new version; primary unless `staged`.
pub async fn rotate(backend: &KekBackend, staged: bool) -> Result<serde_json::Value, KekError> {
    if staged && !backend.supports_staged() {
        return Err(KekError::Worker("--staged is for the local backend".to_owned()));
    }
    let rotated = backend.rotate(staged).await?;
    if let Some(key_id) = &rotated.created_key_id {
        tracing::info!(target: "keyward::kek", kms_key_id = %key_id, version = rotated.version, "kek.kms_key_created");
    }
    let created = backend.kek_id(rotated.version);
    tracing::info!(target: "keyward::kek", kek_id = %created, staged, "kek.rotated");
    Ok(serde_json::json!({ "created": created, "primary": backend.kek_id(backend.primary()?) }))
}

/// `keyward kek promote --version N`: makes a staged version primary.
pub fn promote(backend: &KekBackend, version: u32) -> Result<serde_json::Value, KekError> {
    backend.promote(version)?;
    tracing::info!(target: "keyward::kek", kek_id = %backend.kek_id(version), "kek.promoted");
    Ok(serde_json::json!({ "primary": backend.kek_id(version) }))
}

/// `keyward kek retire --version N`: refuses the primary, any version a running gateway
/// reported (within [`SEALER_LIVE`] before `now`) it may still seal to, and any version a
/// saved key still uses; otherwise destroys it ([`KekBackend::retire`]: local, the key file
/// shredded; PKCS#11, both objects destroyed in the token; AWS KMS, the key disabled at once
/// and its deletion scheduled).
pub async fn retire(
    backend: &KekBackend,
    kek: &dyn KekStore,
    version: u32,
    now: keyward_core::UnixMillis,
) -> Result<serde_json::Value, KekError> {
    let id = backend.kek_id(version);
    if version == backend.primary()? {
        return Err(KekError::RetirePrimary { kek_id: id });
    }
    // First the gateways, then the blobs: a gateway names a new version only once every
    // save sealed to the old one is stored, so after this check the count below sees them.
    let since = keyward_core::UnixMillis(
        now.as_i64()
            .saturating_sub(i64::try_from(SEALER_LIVE.as_millis()).unwrap_or(i64::MAX)),
    );
    let sealing: Vec<String> = kek
        .sealers_since(since)
        .await?
        .into_iter()
        .filter(|r| r.kek_ids.contains(&id))
        .map(|r| r.node_id)
        .collect();
    if !sealing.is_empty() {
        return Err(KekError::StillSealing {
            kek_id: id,
            nodes: sealing.join(", "),
            report_every_s: REPORT_EVERY.as_secs(),
        });
    }
    let count = count_by_kek(kek, PAGE).await?.get(&id).copied().unwrap_or(0);
    if count > 0 {
        return Err(KekError::StillInUse { kek_id: id, count });
    }
    let retired = backend.retire(version).await?;
    if let Some(d) = &retired.scheduled_deletion {
        tracing::info!(target: "keyward::kek", kek_id = %id, kms_key_id = ?d.key_id, deletion_date = ?d.deletion_date, "kek.kms_key_disabled_and_scheduled_for_deletion");
    }
    let destroyed = retired.destroyed;
    tracing::info!(target: "keyward::kek", kek_id = %id, destroyed, "kek.retired");
    Ok(serde_json::json!({ "retired": id, "destroyed": destroyed }))
}

/// Appends the platform event for a `keyward kek` action that `out` (its JSON answer)
/// reports as done: `rotate` (`created`), `promote` (`primary`), `retire` (`retired`).
pub async fn audit(store: &dyn Store, out: &serde_json::Value, now: keyward_core::UnixMillis) -> Result<(), KekError> {
    use keyward_store::{NewPlatformEvent, PlatformAction};
    let text = |k: &str| out[k].as_str().map(str::to_owned);
    let (action, kek_id, detail) = if let Some(created) = text("created") {
        let primary = text("primary");
        let detail = if primary.as_deref() == Some(created.as_str()) {
            "primary"
        } else {
            "staged"
        };
        (PlatformAction::KekRotated, created, Some(detail.to_owned()))
    } else if let Some(retired) = text("retired") {
        let detail = out["destroyed"]
            .as_bool()
            .map(|d| if d { "destroyed" } else { "retired" }.to_owned());
        (PlatformAction::KekRetired, retired, detail)
    } else if let Some(primary) = text("primary") {
        (PlatformAction::KekPromoted, primary, None)
    } else {
        return Ok(());
    };
    let mut event = NewPlatformEvent::new(now, &crate::admin::cli_actor(), action);
    event.kek_id = Some(kek_id);
    event.detail = detail;
    crate::admin::audit_platform(store, &event).await?;
    Ok(())
}

/// Tuning for [`rewrap`].
#[derive(Debug, Clone)]
pub struct RewrapOptions {
    /// Blobs per page (one progress line each).
    pub batch: u32,
    /// A pause after each page (tests use it to stop a re-wrap halfway).
    pub pause: Duration,
}

/// Where a re-wrap stands, after each page and at the end.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RewrapProgress {
    pub target: String,
    /// Blobs not under the target when the run started.
    pub to_move: u64,
    /// Moved by this run.
    pub rewrapped: u64,
    /// Changed by someone else between read and swap (rotated, removed): left as they are.
    pub changed_meanwhile: u64,
    /// The worker could not re-wrap them (e.g. sealed to a version not held here).
    pub failed: u64,
    pub seconds: f64,
}

/// `keyward kek rewrap`: moves every blob to the primary version. See the module doc.
pub async fn rewrap(
    backend: &KekBackend,
    store: &dyn Store,
    kek: &dyn KekStore,
    worker: &WorkerCommand,
    opts: &RewrapOptions,
    mut progress: impl FnMut(&RewrapProgress),
) -> Result<RewrapProgress, KekError> {
    let started = Instant::now();
    let target = backend.kek_id(backend.primary()?);
    let counts = count_by_kek(kek, PAGE).await?;
    let mut p = RewrapProgress {
        to_move: counts.iter().filter(|(id, _)| **id != target).map(|(_, n)| *n).sum(),
        target: target.clone(),
        ..RewrapProgress::default()
    };
    if p.to_move == 0 {
        return Ok(p);
    }
    tracing::info!(target: "keyward::kek", kek_id = %target, to_move = p.to_move, "kek.rewrap_started");
    let mut conn = SoloWorker::start(worker, backend.data_dir(), "rewrap")
        .await
        .map_err(KekError::Worker)?;
    let mut after: Option<BlobCursor> = None;
    let mut request_id = 0u64;
    loop {
        let rows = kek.sealed_blobs(after.as_ref(), opts.batch.max(1)).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.cursor());
        for row in &rows {
            if kek_id_of(&row.sealed) == target {
                continue;
            }
            request_id += 1;
            let binding = KeyBinding {
                owner: KeyOwner::parse(&row.account_id)
                    .map_err(|_| KekError::Worker(format!("a stored key's owner is malformed: {}", row.account_id)))?,
                provider: row.provider,
                key_id: KeyId::parse(&row.key_id)
                    .map_err(|_| KekError::Worker(format!("a stored key id is malformed: {}", row.key_id)))?,
            };
            let request = RewrapRequest {
                request_id,
                binding,
                blob: row.sealed.as_bytes().to_vec(),
                target_kek_id: target.clone(),
            };
            match conn.rewrap(&request).await.map_err(KekError::Worker)? {
                Ok(new) => {
                    if kek
                        .replace_sealed_blob(row.owner, &row.key_id, &row.sealed, &new)
                        .await?
                    {
                        p.rewrapped += 1;
                    } else {
                        p.changed_meanwhile += 1;
                    }
                }
                Err(message) => {
                    tracing::warn!(target: "keyward::kek", key_id = %row.key_id, from = %kek_id_of(&row.sealed), %message, "re-wrap refused");
                    p.failed += 1;
                }
            }
        }
        p.seconds = started.elapsed().as_secs_f64();
        progress(&p);
        if !opts.pause.is_zero() {
            tokio::time::sleep(opts.pause).await;
        }
    }
    drop(conn);
    // SQLite: old blobs were overwritten with secure_delete on; empty the WAL as well.
    if let Err(e) = store.purge_removed().await {
        tracing::warn!(error = %e, "checkpoint after re-wrap failed");
    }
    p.seconds = started.elapsed().as_secs_f64();
    tracing::info!(target: "keyward::kek", kek_id = %target, rewrapped = p.rewrapped, failed = p.failed, "kek.rewrap_finished");
    Ok(p)
}

/// How often [`watch`] looks at the kek directory.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How often a gateway renews its `kek_sealers` row when nothing changed.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// A report younger than this is a live gateway. Reports older are gateways that went away
/// without saying so (killed, partitioned); the margin over [`REPORT_EVERY`] absorbs a slow
/// database and clock skew between nodes of a few seconds.
pub const SEALER_LIVE: Duration = Duration::from_secs(30);

/// Tells the database which KEK versions this gateway may seal to (`kek_sealers`), so that
/// `keyward kek retire` never destroys a version a key is still being sealed to.
///
/// A save takes the sealer's `Arc` and holds it until its blob is stored. After a switch the
/// replaced sealer is kept here and still reported until no save holds it any more, so a
/// report that omits a version means every blob sealed to it is already in the database,
/// where retire's count finds it.
pub struct SealerReporter {
    kek: Arc<dyn KekStore>,
    clock: crate::clock::SharedClock,
    node_id: String,
    draining: Vec<Arc<KekSealer>>,
    reported: Option<(Vec<String>, Instant)>,
}

impl std::fmt::Debug for SealerReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealerReporter")
            .field("node_id", &self.node_id)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

impl SealerReporter {
    pub fn new(kek: Arc<dyn KekStore>, clock: crate::clock::SharedClock, node_id: String) -> SealerReporter {
        SealerReporter {
            kek,
            clock,
            node_id,
            draining: Vec::new(),
            reported: None,
        }
    }

    /// Reports if the versions changed or the last report is [`REPORT_EVERY`] old.
    pub async fn tick(&mut self, sealer: &SealerCell) {
        self.draining.retain(|old| Arc::strong_count(old) > 1);
        let mut ids = vec![sealer.current().kek_id().to_owned()];
        for old in &self.draining {
            if !ids.iter().any(|id| id == old.kek_id()) {
                ids.push(old.kek_id().to_owned());
            }
        }
        let due = match &self.reported {
            Some((last, at)) => *last != ids || at.elapsed() >= REPORT_EVERY,
            None => true,
        };
        if !due {
            return;
        }
        match self.kek.report_sealer(&self.node_id, &ids, self.clock.now()).await {
            Ok(()) => self.reported = Some((ids, Instant::now())),
            Err(e) => tracing::warn!(target: "keyward::kek", error = %e, "cannot report the sealing KEK version"),
        }
    }

    /// Removes this node's row (a clean stop).
    pub async fn forget(&self) {
        if let Err(e) = self.kek.forget_sealer(&self.node_id).await {
            tracing::warn!(target: "keyward::kek", error = %e, "cannot remove this node's sealing report");
        }
    }
}

/// What `serve` needs to re-wrap in the background (`KEYWARD_KEK_REWRAP=background`).
#[derive(Clone)]
pub struct BackgroundRewrap {
    pub store: Arc<dyn Store>,
    pub kek: Arc<dyn KekStore>,
    pub worker: WorkerCommand,
}

impl std::fmt::Debug for BackgroundRewrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundRewrap").finish_non_exhaustive()
    }
}

/// A task aborted when this handle drops (so a re-wrap, and its worker, end with `serve`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl BackgroundRewrap {
    /// Blobs per page, and the pause after each, so a re-wrap of many keys leaves room for
    /// the calls being served meanwhile.
    const BATCH: u32 = 100;
    const PAUSE: Duration = Duration::from_millis(20);

    /// Starts [`rewrap`] (a no-op when every blob is under the primary already), logging
    /// its progress after each page.
    fn start(&self, backend: &KekBackend) -> AbortOnDrop {
        let (this, backend) = (self.clone(), backend.clone());
        AbortOnDrop(tokio::spawn(async move {
            let opts = RewrapOptions {
                batch: Self::BATCH,
                pause: Self::PAUSE,
            };
            let progress = |p: &RewrapProgress| {
                tracing::info!(target: "keyward::kek", kek_id = %p.target, to_move = p.to_move, rewrapped = p.rewrapped, changed_meanwhile = p.changed_meanwhile, failed = p.failed, "kek.rewrap_progress");
            };
            match rewrap(
                &backend,
                this.store.as_ref(),
                this.kek.as_ref(),
                &this.worker,
                &opts,
                progress,
            )
            .await
            {
                Ok(p) if p.to_move == 0 => {}
                Ok(p) => {
                    tracing::info!(target: "keyward::kek", kek_id = %p.target, rewrapped = p.rewrapped, failed = p.failed, seconds = p.seconds, "background re-wrap finished")
                }
                Err(e) => {
                    tracing::warn!(target: "keyward::kek", error = %e, "background re-wrap stopped; it runs again at the next start or rotation, or run `keyward kek rewrap`")
                }
            }
        }))
    }
}

/// Follows rotations and retirements while serving (see the module doc), from `seen` (the
/// state read before the workers started), and keeps this node's sealing report current.
/// With `rewrap`, moves saved keys to the primary in the background: once at start (what a
/// crash or stop interrupted) and after each switch to a new primary. Runs until the task
/// is aborted.
pub async fn watch(
    config: Config,
    mut seen: Option<local::LocalKekState>,
    workers: Arc<WorkerPool>,
    sealer: Arc<SealerCell>,
    reporter: Arc<tokio::sync::Mutex<SealerReporter>>,
    rewrap: Option<BackgroundRewrap>,
) {
    let backend = crate::runtime::kek_backend(&config);
    let mut rewrapping = rewrap.as_ref().map(|r| r.start(&backend));
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        reporter.lock().await.tick(&sealer).await;
        let now = match backend.observe() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "keyward::kek", error = %e, "cannot read the kek directory");
                continue;
            }
        };
        if seen.as_ref() == Some(&now) {
            continue;
        }
        if !backend.can_seal_to(&now) {
            // Half-copied onto this node: wait for the files rather than restart workers
            // that could not start.
            tracing::warn!(target: "keyward::kek", primary = now.primary, "primary KEK files not all present yet");
            continue;
        }
        let primary_changed = seen.as_ref().map(|s| s.primary) != Some(now.primary);
        tracing::info!(target: "keyward::kek", primary = now.primary, versions = ?now.private, "KEK versions changed: restarting workers");
        if !workers.recycle(Duration::from_secs(30)).await {
            // Never seal to a version that a worker may not hold: keep the old sealer and try
            // again on the next tick.
            tracing::error!(target: "keyward::kek", "not every worker restarted; still sealing to the old primary KEK");
            continue;
        }
        tracing::info!(target: "keyward::kek", "workers restarted with the current KEK versions");
        if primary_changed {
            // The version read before the restart: every worker started after that read,
            // so each holds it, whatever a later rotation has written since.
            match backend.sealer(now.primary).map_err(crate::RuntimeError::from) {
                Ok(s) => {
                    tracing::info!(target: "keyward::kek", kek_id = %s.kek_id(), "sealing to the new primary KEK");
                    let old = sealer.set(s);
                    {
                        let mut reporter = reporter.lock().await;
                        reporter.draining.push(old);
                        reporter.tick(&sealer).await;
                    }
                    if let Some(r) = &rewrap {
                        // A re-wrap toward the previous primary stops; this one moves
                        // everything, those included.
                        drop(rewrapping.take());
                        rewrapping = Some(r.start(&backend));
                    }
                }
                Err(e) => {
                    tracing::error!(target: "keyward::kek", error = %e, "cannot load the new primary KEK; still sealing to the old one");
                    continue;
                }
            }
        }
        seen = Some(now);
    }
}
