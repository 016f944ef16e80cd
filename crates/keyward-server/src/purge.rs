//! Secure deletion on SQLite: after a rotation or removal, a background task checkpoints
//! the WAL with TRUNCATE so the old ciphertext is gone from the database files within
//! seconds (with `secure_delete` on, freed cells in the main file are already zeroed).
//! A checkpoint cannot finish while a reader holds an old snapshot, so it retries.

use std::sync::Arc;
use std::time::Duration;

use keyward_store::Store;
use tokio::sync::Notify;

#[derive(Debug, Clone, Default)]
pub struct PurgeHandle {
    wake: Arc<Notify>,
}

impl PurgeHandle {
    /// Asks for a purge soon. Many requests in a burst collapse into one purge.
    pub fn request(&self) {
        self.wake.notify_one();
    }
}

/// Runs until the process ends.
pub async fn run(store: Arc<dyn Store>, handle: PurgeHandle) {
    loop {
        handle.wake.notified().await;
        for attempt in 0..50u32 {
            match store.purge_removed().await {
                Ok(true) => {
                    tracing::debug!(attempt, "purged removed ciphertext from the WAL");
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "purge failed; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
