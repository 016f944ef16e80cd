//! Start-up shared by `serve` and the CLI: the data dir, the key files, the KEK backend
//! (built here from the configuration, [`kek_backend`]), the store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyward_crypto::{AuditChainKey, CryptoError, KekBackend, KekSealer};
use keyward_store::kek::KekStore;
use keyward_store::postgres::PgOptions;
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{PgStore, SqliteStore, Store, StoreError};

use crate::config::{Config, DatabaseUrl};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("data dir {path}: {reason}")]
    DataDir { path: String, reason: String },
    // The wrapped errors are part of the message, not a `source`: `{:#}` (how `main` prints
    // errors) would otherwise say each of them twice.
    #[error("key files: {0}")]
    Crypto(CryptoError),
    #[error("database: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Other(String),
}

impl From<CryptoError> for RuntimeError {
    fn from(e: CryptoError) -> RuntimeError {
        RuntimeError::Crypto(e)
    }
}

impl From<StoreError> for RuntimeError {
    fn from(e: StoreError) -> RuntimeError {
        RuntimeError::Store(e)
    }
}

/// The configured KEK backend on the configured data directory: how the gateway, the CLI
/// and the worker reach it (every per-backend difference is inside keyward-crypto).
pub fn kek_backend(config: &Config) -> KekBackend {
    KekBackend::new(&config.kek, &config.data_dir)
}

/// Creates the data dir (0700), prepares the KEK backend in it (see
/// [`KekBackend::prepare`]: on first use, the local KEK pair) and, on first use, the audit
/// chain key.
pub fn prepare_data_dir(config: &Config) -> Result<(), RuntimeError> {
    let dir = &config.data_dir;
    let err = |e: std::io::Error| RuntimeError::DataDir {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    restrict_dir(dir).map_err(err)?;
    // Workers run as their own service (KEYWARD_WORKER_SOCKETS) hold the KEK's private half:
    // this data dir has only the public halves, copied from theirs, and makes no key pair.
    if config.worker.sockets.is_empty() {
        kek_backend(config).prepare()?;
    }
    AuditChainKey::ensure(dir)?;
    Ok(())
}

#[cfg(unix)]
fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The seal-only half of the primary KEK version: all the gateway ever loads.
pub fn load_sealer(config: &Config) -> Result<KekSealer, RuntimeError> {
    let kek = kek_backend(config);
    Ok(kek.sealer(kek.primary()?)?)
}

/// Opens the database named by the configuration: the backend is chosen here, once, by the
/// URL's scheme; everything after sees only `dyn Store`.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, RuntimeError> {
    Ok(open_stores(config).await?.0)
}

/// [`open_store`], also as the [`KekStore`] (one set of connections).
pub async fn open_stores(config: &Config) -> Result<(Arc<dyn Store>, Arc<dyn KekStore>), RuntimeError> {
    let chain_key = AuditChainKey::load(&config.data_dir)?;
    Ok(match config.database_url() {
        DatabaseUrl::Sqlite(path) => {
            let s = Arc::new(
                SqliteStore::open_file(
                    &path,
                    chain_key,
                    SqliteOptions {
                        outbox: outbox_rules(config),
                        ..SqliteOptions::default()
                    },
                )
                .await?,
            );
            (s.clone(), s)
        }
        DatabaseUrl::Postgres(url) => {
            let s = Arc::new(PgStore::open(&url, chain_key, pg_options(config)).await?);
            (s.clone(), s)
        }
    })
}

pub(crate) fn pg_options(config: &Config) -> PgOptions {
    PgOptions {
        pool_size: config.database.pool_size,
        statement_timeout: Duration::from_millis(u64::from(config.database.statement_timeout_ms)),
        connect_timeout: Duration::from_millis(u64::from(config.database.connect_timeout_ms)),
        outbox: outbox_rules(config),
    }
}

/// Webhook events are written only when there is an endpoint to send them to.
fn outbox_rules(config: &Config) -> keyward_store::OutboxRules {
    keyward_store::OutboxRules {
        enabled: !config.webhook.urls.is_empty(),
        key_failing_after: config.key_failing_after,
    }
}
