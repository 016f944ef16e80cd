//! `keyward serve`: start-up, the first-start bootstrap, and graceful shutdown.

use std::io::Write;
use std::sync::Arc;

use keyward_core::Catalogue;
use tokio::net::TcpListener;

use crate::admin;
use crate::app::{router, AppState};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::purge::{self, PurgeHandle};
use crate::routes::key_test::ProbeLimiter;
use crate::runtime::{load_sealer, open_store, prepare_data_dir, RuntimeError};
use crate::workers::{WorkerCommand, WorkerPool};

/// A line for the operator on stdout (logs go to stderr).
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "keyward: {line}");
    let _ = out.flush();
}

pub async fn serve(config: Config, worker: WorkerCommand) -> Result<(), RuntimeError> {
    if config.tls_cert.is_some() {
        return Err(RuntimeError::Other(
            "KEYWARD_TLS_CERT: HTTPS is not built yet; unset it and terminate TLS in front of keyward".into(),
        ));
    }
    prepare_data_dir(&config)?;
    let sealer = load_sealer(&config)?;
    let store = open_store(&config).await?;
    let clock: SharedClock = Arc::new(SystemClock);

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| RuntimeError::Other(format!("KEYWARD_LISTEN {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| RuntimeError::Other(e.to_string()))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plain HTTP on a non-loopback address: keys pasted into keyward would cross the network unencrypted; set KEYWARD_TLS_CERT/KEYWARD_TLS_KEY or keep it on loopback behind a TLS proxy");
    }

    if let Some(first) = admin::first_start(store.as_ref(), clock.as_ref()).await? {
        announce(&format!(
            "first start: created user {} and account Personal (plan pro)",
            admin::FIRST_OWNER_EMAIL
        ));
        announce(&format!("owner token (shown once): {}", first.token.as_str()));
        announce(&format!("owner account: {}", first.account_id));
    }

    let metrics = Arc::new(Metrics::default());
    let workers = WorkerPool::start(config.workers, config.data_dir.join("run"), worker, metrics.clone())
        .map_err(|e| RuntimeError::Other(format!("worker pool: {e}")))?;
    let purge = PurgeHandle::default();
    let state = AppState {
        store: store.clone(),
        sealer: Arc::new(sealer),
        clock,
        catalogue: Arc::new(load_catalogue(&config)?),
        metrics,
        purge: purge.clone(),
        workers,
        ledger: Ledger::start(store.clone()),
        probe_limiter: Arc::new(ProbeLimiter::default()),
        provider_timeout_ms: config.provider_timeout_ms,
        key_tests_per_minute: config.key_tests_per_minute,
        max_body_bytes: config.max_body_bytes,
        max_ai_body_bytes: config.max_ai_body_bytes,
    };
    let purger = tokio::spawn(purge::run(store.clone(), purge.clone()));
    // A purge at start covers removals that a crash interrupted before their checkpoint.
    purge.request();

    announce(&format!("listening on http://{addr}"));
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "keyward serving");
    let app = router(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    purger.abort();
    // Leave no removed ciphertext in the WAL behind us.
    if let Err(e) = store.purge_removed().await {
        tracing::warn!(error = %e, "final checkpoint failed");
    }
    tracing::info!("keyward stopped");
    served.map_err(|e| RuntimeError::Other(format!("server: {e}")))
}

/// The built-in catalogue, or `KEYWARD_CATALOGUE`'s file.
fn load_catalogue(config: &Config) -> Result<Catalogue, RuntimeError> {
    let Some(path) = &config.catalogue else {
        return Ok(Catalogue::builtin());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| RuntimeError::Other(format!("KEYWARD_CATALOGUE {}: {e}", path.display())))?;
    Catalogue::from_toml(&text).map_err(|e| RuntimeError::Other(format!("KEYWARD_CATALOGUE {}: {e}", path.display())))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
