//! Group commit for finished AI calls.
//!
//! Every AI call must have a durable audit event (and its credits settled) before its
//! answer returns, and one fsync per call would cap throughput at the disk's sync rate.
//! So calls hand their records to one writer task and wait: the writer takes everything
//! queued, commits it in one transaction (one fsync), and wakes every waiter. Under load
//! batches grow by themselves; a lone call commits at once.
//!
//! One bad record does not cost the others their commit: the store settles the rest of
//! the batch and refuses only that record ([`Store::finish_calls_isolated`]), whose call is
//! answered with the error, logged here by account, provider and batch position (a call
//! record holds no secret; the error names no value of it).

use keyward_store::{CallRecord, Store, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 1024;

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::Sender<(CallRecord, Waiter)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the audit writer is gone")]
    Closed,
    #[error("could not commit the audit batch: {0}")]
    Store(String),
}

impl Ledger {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>) -> Ledger {
        let (tx, rx) = mpsc::channel(8 * MAX_BATCH);
        tokio::spawn(write_batches(store, rx));
        Ledger { tx }
    }

    /// Queues a record and waits until it is committed.
    pub async fn commit(&self, record: CallRecord) -> Result<(), LedgerError> {
        let (done, wait) = oneshot::channel();
        self.tx.send((record, done)).await.map_err(|_| LedgerError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LedgerError::Store(e)),
            Err(_) => Err(LedgerError::Closed),
        }
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(CallRecord, Waiter)>) {
    let mut records = Vec::with_capacity(MAX_BATCH);
    let mut waiters = Vec::with_capacity(MAX_BATCH);
    while let Some((record, waiter)) = rx.recv().await {
        records.push(record);
        waiters.push(waiter);
        while records.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((r, w)) => {
                    records.push(r);
                    waiters.push(w);
                }
                Err(_) => break,
            }
        }
        let results = store.finish_calls_isolated(&records).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::error!(batch = records.len(), failed, "audit batch: records not committed");
        }
        for (i, ((record, result), w)) in records.iter().zip(results).zip(waiters.drain(..)).enumerate() {
            let answer = result.map_err(|e: StoreError| {
                tracing::error!(
                    error = %e,
                    account = %record.account_id,
                    provider = record.provider.as_str(),
                    position = i,
                    "call record refused; its call is answered with an error"
                );
                e.to_string()
            });
            let _ = w.send(answer);
        }
        records.clear();
    }
}
