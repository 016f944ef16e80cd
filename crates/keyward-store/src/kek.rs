//! What KEK rotation needs from the database: walk every sealed blob, and move one blob to a
//! new KEK version with a compare-and-swap.
//!
//! Kept apart from [`crate::Store`] (its own trait, implemented in `sqlite/kek.rs` and
//! `postgres/kek.rs`) because only the `keyward kek` commands use it. Blobs are read in
//! pages in a stable order (account keys by key id, then the platform's shared keys by key
//! id), so a re-wrap can stop anywhere and start again. A replacement is one conditional
//! `UPDATE … WHERE key_id = ? AND sealed = <the old bytes>`: it changes nothing if the key
//! was rotated, removed or already re-wrapped meanwhile, and each blob is at every instant
//! under exactly one KEK version. A re-wrap is not a key change: `updated_at`, `last4` and
//! the audit chain are left alone.
//!
//! Must never: see a plaintext key (it moves blobs only), or parse a blob beyond its kek id.

use std::collections::BTreeMap;

use async_trait::async_trait;
use keyward_core::{Provider, UnixMillis};
use keyward_crypto::SealedKey;

use crate::StoreResult;

/// Which table a sealed blob lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlobOwner {
    /// An account's key (`provider_keys`), bound to (account, provider, key id).
    Account,
    /// The platform's shared-pool key (`shared_keys`), bound to
    /// ([`crate::SHARED_KEY_ACCOUNT`], provider, key id).
    Platform,
}

/// One sealed blob and what it is bound to. `Debug` shows the blob's length and kek id only.
#[derive(Debug, Clone)]
pub struct SealedBlobRow {
    pub owner: BlobOwner,
    /// The binding's account id (`platform` for shared keys).
    pub account_id: String,
    pub provider: Provider,
    pub key_id: String,
    pub sealed: SealedKey,
}

impl SealedBlobRow {
    /// Where the next page starts.
    pub fn cursor(&self) -> BlobCursor {
        BlobCursor {
            owner: self.owner,
            key_id: self.key_id.clone(),
        }
    }
}

/// A position in the walk: after (owner, key id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCursor {
    pub owner: BlobOwner,
    pub key_id: String,
}

/// What one serving gateway last said it seals new keys to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealerReport {
    /// The node (listen address, process id and a random part; new at every start).
    pub node_id: String,
    /// The versions it may seal to: its primary, and an older one while a save sealed to it
    /// is still in flight.
    pub kek_ids: Vec<String>,
    pub reported_at: UnixMillis,
}

/// The database side of KEK rotation.
#[async_trait]
pub trait KekStore: Send + Sync + 'static {
    /// Up to `limit` sealed blobs after `after` (from the start when `None`): account keys
    /// by key id, then shared keys by key id.
    async fn sealed_blobs(&self, after: Option<&BlobCursor>, limit: u32) -> StoreResult<Vec<SealedBlobRow>>;

    /// Replaces the blob of (`owner`, `key_id`) with `new` only if it is still exactly `old`.
    /// Returns whether it did.
    async fn replace_sealed_blob(
        &self,
        owner: BlobOwner,
        key_id: &str,
        old: &SealedKey,
        new: &SealedKey,
    ) -> StoreResult<bool>;

    /// Records (insert or replace) that `node_id` may seal new keys to `kek_ids` (none
    /// contains a comma), as of `at`.
    async fn report_sealer(&self, node_id: &str, kek_ids: &[String], at: UnixMillis) -> StoreResult<()>;

    /// Removes `node_id`'s report (a gateway stopping cleanly).
    async fn forget_sealer(&self, node_id: &str) -> StoreResult<()>;

    /// Every report made at or after `since`, by node id.
    async fn sealers_since(&self, since: UnixMillis) -> StoreResult<Vec<SealerReport>>;
}

/// The kek id a blob names, or `<malformed>`.
pub fn kek_id_of(blob: &SealedKey) -> String {
    blob.kek_id().unwrap_or_else(|_| "<malformed>".to_owned())
}

/// Counts every sealed blob per kek id (a full walk, `page` rows at a time).
pub async fn count_by_kek(store: &dyn KekStore, page: u32) -> StoreResult<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    let mut after: Option<BlobCursor> = None;
    loop {
        let rows = store.sealed_blobs(after.as_ref(), page).await?;
        for row in &rows {
            *counts.entry(kek_id_of(&row.sealed)).or_insert(0u64) += 1;
        }
        match rows.last() {
            Some(last) if rows.len() >= page as usize => after = Some(last.cursor()),
            _ => return Ok(counts),
        }
    }
}
