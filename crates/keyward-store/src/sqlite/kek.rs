//! The SQLite implementation of [`crate::kek::KekStore`].

use async_trait::async_trait;
use keyward_core::UnixMillis;
use keyward_crypto::SealedKey;
use sqlx::Row;

use super::{map_err, SqliteStore};
use crate::kek::{BlobCursor, BlobOwner, KekStore, SealedBlobRow, SealerReport};
use crate::{StoreError, StoreResult, SHARED_KEY_ACCOUNT};

fn row_of(owner: BlobOwner, row: &sqlx::sqlite::SqliteRow) -> StoreResult<SealedBlobRow> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("sealed blob row: {what}"));
    let provider: String = row.try_get("provider").map_err(|_| corrupt("provider"))?;
    Ok(SealedBlobRow {
        owner,
        account_id: row.try_get("account_id").map_err(|_| corrupt("account_id"))?,
        provider: provider.parse().map_err(|_| corrupt("provider"))?,
        key_id: row.try_get("key_id").map_err(|_| corrupt("key_id"))?,
        sealed: SealedKey::from_bytes(row.try_get("sealed").map_err(|_| corrupt("sealed"))?),
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
            let mut r = self.reader.lease().await?;
            let rows = sqlx::query(
                "SELECT account_id, provider, key_id, sealed FROM provider_keys \
                 WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
            )
            .bind(from)
            .bind(limit)
            .fetch_all(&mut r.conn)
            .await
            .map_err(map_err)?;
            r.release();
            for row in &rows {
                out.push(row_of(BlobOwner::Account, row)?);
            }
        }
        let left = limit - i64::try_from(out.len()).unwrap_or(limit);
        if left > 0 {
            let from = if owner == BlobOwner::Platform { from } else { "" };
            let mut r = self.reader.lease().await?;
            let rows = sqlx::query(
                "SELECT ?3 AS account_id, provider, key_id, sealed FROM shared_keys \
                 WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
            )
            .bind(from)
            .bind(left)
            .bind(SHARED_KEY_ACCOUNT)
            .fetch_all(&mut r.conn)
            .await
            .map_err(map_err)?;
            r.release();
            for row in &rows {
                out.push(row_of(BlobOwner::Platform, row)?);
            }
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
        let done = sqlx::query(sql)
            .bind(new.as_bytes())
            .bind(key_id)
            .bind(old.as_bytes())
            .execute(&self.writer)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn report_sealer(&self, node_id: &str, kek_ids: &[String], at: UnixMillis) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO kek_sealers (node_id, kek_ids, reported_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (node_id) DO UPDATE SET kek_ids = excluded.kek_ids, reported_at = excluded.reported_at",
        )
        .bind(node_id)
        .bind(kek_ids.join(","))
        .bind(at.as_i64())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn forget_sealer(&self, node_id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM kek_sealers WHERE node_id = ?1")
            .bind(node_id)
            .execute(&self.writer)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn sealers_since(&self, since: UnixMillis) -> StoreResult<Vec<SealerReport>> {
        let mut r = self.reader.lease().await?;
        let rows = sqlx::query(
            "SELECT node_id, kek_ids, reported_at FROM kek_sealers WHERE reported_at >= ?1 ORDER BY node_id",
        )
        .bind(since.as_i64())
        .fetch_all(&mut r.conn)
        .await
        .map_err(map_err)?;
        r.release();
        rows.iter()
            .map(|r: &sqlx::sqlite::SqliteRow| {
                let corrupt = |_| StoreError::Corrupt("kek_sealers row".to_owned());
                Ok(SealerReport {
                    node_id: r.try_get("node_id").map_err(corrupt)?,
                    kek_ids: r
                        .try_get::<String, _>("kek_ids")
                        .map_err(corrupt)?
                        .split(',')
                        .filter(|id| !id.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    reported_at: UnixMillis(r.try_get("reported_at").map_err(corrupt)?),
                })
            })
            .collect()
    }
}
