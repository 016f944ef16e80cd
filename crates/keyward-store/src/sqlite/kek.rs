//! The SQLite implementation of [`crate::kek::KekStore`].

use super::{exec, get, read_all, SqliteStore};
use crate::kek::{BlobCursor, BlobOwner, KekStore, SealedBlobRow, SealerReport};
use crate::{StoreError, StoreResult, SHARED_KEY_ACCOUNT};
use async_trait::async_trait;
use keyward_core::UnixMillis;
use keyward_crypto::SealedKey;

fn row_of(owner: BlobOwner, row: &rusqlite::Row<'_>) -> StoreResult<SealedBlobRow> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("sealed blob row: {what}"));
    let provider: String = get(row, "provider")?;
    Ok(SealedBlobRow {
        owner,
        account_id: get(row, "account_id")?,
        provider: provider.parse().map_err(|_| corrupt("provider"))?,
        key_id: get(row, "key_id")?,
        sealed: SealedKey::from_bytes(get(row, "sealed")?),
    })
}

#[async_trait]
impl KekStore for SqliteStore {
    async fn sealed_blobs(&self, after: Option<&BlobCursor>, limit: u32) -> StoreResult<Vec<SealedBlobRow>> {
        let limit = i64::from(limit.max(1));
        let mut out = Vec::new();
        let (owner, from) = match after {
            None => (BlobOwner::Account, ""),
            Some(c) => (c.owner, c.key_id.as_str()),
        };
        if owner == BlobOwner::Account {
            out = self.reader.read(|c| {
                read_all(
                    c,
                    "SELECT account_id, provider, key_id, sealed FROM provider_keys \
                     WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
                    (from, limit),
                    |row| row_of(BlobOwner::Account, row),
                )
            })?;
        }
        let left = limit - i64::try_from(out.len()).unwrap_or(limit);
        if left > 0 {
            let from = if owner == BlobOwner::Platform { from } else { "" };
            let shared = self.reader.read(|c| {
                read_all(
                    c,
                    "SELECT ?3 AS account_id, provider, key_id, sealed FROM shared_keys \
                     WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
                    (from, left, SHARED_KEY_ACCOUNT),
                    |row| row_of(BlobOwner::Platform, row),
                )
            })?;
            out.extend(shared);
        }
        Ok(out)
    }

    async fn replace_sealed_blob(
        &self,
        owner: BlobOwner,
        key_id: &str,
        old: &SealedKey,
        new: &SealedKey,
    ) -> StoreResult<bool> {
        let sql = match owner {
            BlobOwner::Account => "UPDATE provider_keys SET sealed = ?1 WHERE key_id = ?2 AND sealed = ?3",
            BlobOwner::Platform => "UPDATE shared_keys SET sealed = ?1 WHERE key_id = ?2 AND sealed = ?3",
        };
        let (key_id, old, new) = (key_id.to_owned(), old.clone(), new.clone());
        let replaced = self
            .writer
            .write(move |conn| exec(conn, sql, (new.as_bytes(), key_id.as_str(), old.as_bytes())))
            .await?;
        Ok(replaced == 1)
    }

    async fn report_sealer(&self, node_id: &str, kek_ids: &[String], at: UnixMillis) -> StoreResult<()> {
        let (node_id, kek_ids) = (node_id.to_owned(), kek_ids.join(","));
        self.writer
            .write(move |conn| {
                exec(
                    conn,
                    "INSERT INTO kek_sealers (node_id, kek_ids, reported_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (node_id) DO UPDATE SET kek_ids = excluded.kek_ids, reported_at = excluded.reported_at",
                    (node_id.as_str(), kek_ids.as_str(), at.as_i64()),
                )
            })
            .await?;
        Ok(())
    }

    async fn forget_sealer(&self, node_id: &str) -> StoreResult<()> {
        let node_id = node_id.to_owned();
        self.writer
            .write(move |conn| exec(conn, "DELETE FROM kek_sealers WHERE node_id = ?1", (node_id.as_str(),)))
            .await?;
        Ok(())
    }

    async fn sealers_since(&self, since: UnixMillis) -> StoreResult<Vec<SealerReport>> {
        self.reader.read(|c| {
            read_all(
                c,
                "SELECT node_id, kek_ids, reported_at FROM kek_sealers WHERE reported_at >= ?1 ORDER BY node_id",
                (since.as_i64(),),
                |r| {
                    Ok(SealerReport {
                        node_id: get(r, "node_id")?,
                        kek_ids: get::<String>(r, "kek_ids")?
                            .split(',')
                            .filter(|id| !id.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        reported_at: UnixMillis(get(r, "reported_at")?),
                    })
                },
            )
        })
    }
}
