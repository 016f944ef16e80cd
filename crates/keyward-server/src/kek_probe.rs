//! The readiness check of the key-encryption backend (`/readyz`'s `kek`).
//!
//! It does what a call does, with nothing of anyone's: seal a random canary with the
//! gateway's sealer (the seal side of the backend: the local public key, the token's public
//! key, KMS `Encrypt`), then have a worker open it and wipe it (`OpenOnly`: the private half,
//! the token's decrypt, KMS `Decrypt`). The answer is kept for a second so a busy load
//! balancer does not turn into load on an HSM or KMS.

use std::time::{Duration, Instant};

use keyward_crypto::{Binding, CryptoError};
use keyward_worker::protocol::{CallRequest, FailKind, FromWorker, Method, ToWorker};
use rand::RngCore;
use tokio::sync::Mutex;

use crate::api::KekReady;
use crate::app::AppState;

/// How long one answer is reused.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The binding of the canary: no account, provider or key row has these values.
const CANARY_ACCOUNT: &str = "keyward:readyz";
const CANARY_PROVIDER: &str = "keyward:readyz";
const CANARY_KEY_ID: &str = "keyward:readyz";

#[derive(Default)]
pub struct KekProbe {
    last: Mutex<Option<(Instant, KekReady)>>,
}

impl std::fmt::Debug for KekProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekProbe").finish_non_exhaustive()
    }
}

impl KekProbe {
    /// The backend's state, checked now or at most [`FRESH_FOR`] ago. One check at a time.
    pub async fn check(&self, state: &AppState) -> KekReady {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return ready.clone();
            }
        }
        let ready = check_now(state).await;
        *last = Some((Instant::now(), ready.clone()));
        ready
    }
}

async fn check_now(state: &AppState) -> KekReady {
    let sealer = state.sealer.current();
    let report = |status: &str, message: Option<String>| KekReady {
        backend: sealer.backend().to_owned(),
        kek_id: sealer.kek_id().to_owned(),
        status: status.to_owned(),
        message,
    };
    let mut canary = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(canary.as_mut());
    let binding = Binding {
        account_id: CANARY_ACCOUNT,
        provider: CANARY_PROVIDER,
        key_id: CANARY_KEY_ID,
    };
    let blob = match sealer.seal(&binding, canary.as_ref()).await {
        Ok(blob) => blob,
        Err(e @ CryptoError::Backend { .. }) => return report("unavailable", Some(format!("sealing: {e}"))),
        Err(e) => return report("failing", Some(format!("sealing: {e}"))),
    };
    let Ok(mut lease) = state.workers.lease().await else {
        return report("unchecked", Some("no worker is ready to open the canary".to_owned()));
    };
    let request = CallRequest {
        request_id: 0,
        provider: CANARY_PROVIDER.to_owned(),
        account_id: CANARY_ACCOUNT.to_owned(),
        key_id: CANARY_KEY_ID.to_owned(),
        blob: blob.into_bytes(),
        method: Method::Get,
        path_and_query: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout_ms: state.provider_timeout_ms,
    };
    if lease.conn.send(&ToWorker::OpenOnly(request)).await.is_err() {
        return report("unchecked", Some("the worker went away".to_owned()));
    }
    match lease.conn.recv().await {
        Ok(FromWorker::End) => {
            lease.release();
            report("ok", None)
        }
        Ok(FromWorker::Fail { kind, message }) => {
            lease.release();
            let status = if kind == FailKind::KekUnavailable {
                "unavailable"
            } else {
                "failing"
            };
            report(status, Some(message))
        }
        Ok(_) => report("failing", Some("worker protocol: unexpected frame".to_owned())),
        Err(_) => report("unchecked", Some("the worker went away".to_owned())),
    }
}
