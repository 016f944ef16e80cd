//! Start-up shared by `serve` and the CLI: the data dir, the key files, the store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyward_crypto::{local, AuditChainKey, CryptoError, KekSealer};
use keyward_store::kek::KekStore;
use keyward_store::postgres::PgOptions;
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{PgStore, SqliteStore, Store, StoreError};

use crate::config::{Config, DatabaseBackend, KekConfig};

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

/// Creates the data dir (0700) and, on first use, the local KEK pair and the audit chain
/// key inside it.
pub fn prepare_data_dir(config: &Config) -> Result<(), RuntimeError> {
    let dir = &config.data_dir;
    let err = |e: std::io::Error| RuntimeError::DataDir {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    restrict_dir(dir).map_err(err)?;
    match &config.kek {
        KekConfig::Local => local::ensure_kek(dir)?,
        // Versions live in the token; `keyward kek rotate` creates them (it needs the PIN,
        // which `serve` never reads).
        #[cfg(feature = "pkcs11")]
        KekConfig::Pkcs11(_) => {}
        // `key-id=` is version 1: recorded (with `primary`) on first start, checked after.
        #[cfg(feature = "awskms")]
        KekConfig::AwsKms(c) => keyward_crypto::awskms::bootstrap(c)?,
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
    let version = match &config.kek {
        KekConfig::Local => local::primary_version(&config.data_dir)?,
        #[cfg(feature = "pkcs11")]
        KekConfig::Pkcs11(_) => local::primary_file_version(&config.data_dir)?.ok_or_else(|| {
            RuntimeError::Other(
                "KEYWARD_KEK=pkcs11: no KEK version yet; create one with `keyward kek rotate`".to_owned(),
            )
        })?,
        #[cfg(feature = "awskms")]
        KekConfig::AwsKms(c) => keyward_crypto::awskms::primary(c)?,
    };
    load_sealer_version(config, version)
}

/// The seal-only half of KEK `version` (the watcher loads the version its workers were
/// restarted for, not whatever `kek/primary` says a moment later).
pub fn load_sealer_version(config: &Config, version: u32) -> Result<KekSealer, RuntimeError> {
    match &config.kek {
        KekConfig::Local => Ok(KekSealer::Local(local::load_sealer_version(&config.data_dir, version)?)),
        #[cfg(feature = "pkcs11")]
        KekConfig::Pkcs11(c) => {
            let kek = keyward_crypto::pkcs11::Pkcs11Kek::connect(c)?;
            Ok(KekSealer::Pkcs11(kek.sealer(version)?))
        }
        // The gateway's credentials (encrypt-only) are read here; never the worker's.
        #[cfg(feature = "awskms")]
        KekConfig::AwsKms(c) => Ok(KekSealer::AwsKms(keyward_crypto::awskms::sealer(c, version)?)),
    }
}

/// Opens the database named by the configuration: the backend is chosen here, once, by the
/// URL's scheme; everything after sees only `dyn Store`.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, RuntimeError> {
    Ok(open_stores(config).await?.0)
}

/// [`open_store`], also as the [`KekStore`] (one set of connections).
pub async fn open_stores(config: &Config) -> Result<(Arc<dyn Store>, Arc<dyn KekStore>), RuntimeError> {
    let chain_key = AuditChainKey::load(&config.data_dir)?;
    let url = config.database_url.as_str();
    Ok(match config.database_url.backend() {
        DatabaseBackend::Sqlite => {
            let s = Arc::new(SqliteStore::open(url, chain_key, SqliteOptions::default()).await?);
            (s.clone(), s)
        }
        DatabaseBackend::Postgres => {
            let s = Arc::new(PgStore::open(url, chain_key, pg_options(config)).await?);
            (s.clone(), s)
        }
    })
}

pub(crate) fn pg_options(config: &Config) -> PgOptions {
    PgOptions {
        pool_size: config.database_pool_size,
        statement_timeout: Duration::from_millis(u64::from(config.database_statement_timeout_ms)),
        connect_timeout: Duration::from_millis(u64::from(config.database_connect_timeout_ms)),
    }
}
