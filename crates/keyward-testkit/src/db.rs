//! Direct access to keyward's SQLite database file: reading sealed blobs, opening them with
//! the KEK private half from the data dir, and tampering with rows.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

/// A pool of one connection on `path` (busy timeout 10 s). Does not create the file.
pub async fn connect(path: &Path) -> SqlitePool {
    let url = format!("sqlite://{}", path.display());
    let opts = SqliteConnectOptions::from_str(&url)
        .expect("sqlite URL")
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// One row of `provider_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub account_id: String,
    pub provider: String,
    pub key_id: String,
    pub sealed: Vec<u8>,
    pub last4: String,
}

/// The `provider_keys` row of (account, provider), if any.
pub async fn key_row(pool: &SqlitePool, account_id: &str, provider: &str) -> Option<KeyRow> {
    sqlx::query(
        "SELECT account_id, provider, key_id, sealed, last4 FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
    )
    .bind(account_id)
    .bind(provider)
    .fetch_optional(pool)
    .await
    .expect("read provider_keys")
    .map(|r| KeyRow {
        account_id: r.get("account_id"),
        provider: r.get("provider"),
        key_id: r.get("key_id"),
        sealed: r.get("sealed"),
        last4: r.get("last4"),
    })
}

/// Every `provider_keys` row of an account.
pub async fn key_rows(pool: &SqlitePool, account_id: &str) -> Vec<KeyRow> {
    sqlx::query(
        "SELECT account_id, provider, key_id, sealed, last4 FROM provider_keys WHERE account_id = ?1 ORDER BY provider",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
    .expect("read provider_keys")
    .into_iter()
    .map(|r| KeyRow {
        account_id: r.get("account_id"),
        provider: r.get("provider"),
        key_id: r.get("key_id"),
        sealed: r.get("sealed"),
        last4: r.get("last4"),
    })
    .collect()
}

/// Opens `sealed` with the KEK private halves in `data_dir` (the version the blob names),
/// bound to (account, provider, key_id). The plaintext, or the error as text.
pub fn open_blob(
    data_dir: &Path,
    account_id: &str,
    provider: &str,
    key_id: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, String> {
    let blob = keyward_crypto::SealedKey::from_bytes(sealed.to_vec());
    let opener = keyward_crypto::local::load_opener_for(data_dir, &blob).map_err(|e| e.to_string())?;
    let binding = keyward_crypto::Binding {
        account_id,
        provider,
        key_id,
    };
    let mut out = vec![0u8; sealed.len()];
    let n = opener.open_into(&binding, &blob, &mut out).map_err(|e| e.to_string())?;
    out.truncate(n);
    Ok(out)
}

/// Opens a row's blob with that row's own binding.
pub fn open_row(data_dir: &Path, row: &KeyRow) -> Result<Vec<u8>, String> {
    open_blob(data_dir, &row.account_id, &row.provider, &row.key_id, &row.sealed)
}

/// One `audit_events` row (the columns a test tampers with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub seq: i64,
    pub action: String,
    pub key_last4: Option<String>,
}

/// An account's audit rows, by seq.
pub async fn audit_rows(pool: &SqlitePool, account_id: &str) -> Vec<AuditRow> {
    sqlx::query("SELECT id, seq, action, key_last4 FROM audit_events WHERE account_id = ?1 ORDER BY seq")
        .bind(account_id)
        .fetch_all(pool)
        .await
        .expect("read audit_events")
        .into_iter()
        .map(|r| AuditRow {
            id: r.get("id"),
            seq: r.get("seq"),
            action: r.get("action"),
            key_last4: r.get("key_last4"),
        })
        .collect()
}
