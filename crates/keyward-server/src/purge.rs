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

/// Runs until the process ends. A checkpoint blocked by readers is retried with backoff
/// (up to a second apart) until it completes, with a warning after five seconds.
pub async fn run(store: Arc<dyn Store>, handle: PurgeHandle) {
    loop {
        handle.wake.notified().await;
        let mut delay = Duration::from_millis(50);
        let started = std::time::Instant::now();
        let mut warned = false;
        loop {
            match store.purge_removed().await {
                Ok(true) => {
                    tracing::debug!(
                        millis = started.elapsed().as_millis() as u64,
                        "purged removed ciphertext"
                    );
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "purge failed; retrying"),
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                tracing::warn!("removed ciphertext is still in the write-ahead log after 5 s: a reader holds an old snapshot; still retrying");
                warned = true;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}
