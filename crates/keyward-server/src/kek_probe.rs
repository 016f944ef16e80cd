//! The readiness check of the key-encryption backend (`/readyz`'s `kek`).
//!
//! It does what a call does, with nothing of anyone's: seal a random canary with the
//! gateway's sealer (the seal side of the backend: the local public key, the token's public
//! key, KMS `Encrypt`), then have a worker open it and wipe it (`OpenOnly`: the private half,
//! the token's decrypt, KMS `Decrypt`). The answer is kept for a second so a busy load
//! balancer does not turn into load on an HSM or KMS.

use std::time::{Duration, Instant};

use keyward_core::{KeyBinding, KeyId, KeyOwner, Provider};
use keyward_crypto::{Binding, CryptoError};
use keyward_worker_protocol::protocol::{FailKind, OpenRequest};
use keyward_worker_protocol::WorkerError;
use rand::RngCore;
use tokio::sync::Mutex;

use crate::api::KekReady;
use crate::engine::Engine;

/// How long one answer is reused.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The binding of the canary: its owner is no account and not the shared pool, so no
/// saved key shares it.
fn canary_binding() -> KeyBinding {
    KeyBinding {
        owner: KeyOwner::ReadinessCanary,
        provider: Provider::OpenAi,
        key_id: KeyId::from_random([0; 16]),
    }
}

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
    pub async fn check(&self, engine: &Engine) -> KekReady {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return ready.clone();
            }
        }
        let ready = check_now(engine).await;
        *last = Some((Instant::now(), ready.clone()));
        ready
    }
}

async fn check_now(engine: &Engine) -> KekReady {
    let sealer = engine.sealer.current();
    let report = |status: &str, message: Option<String>| KekReady {
        backend: sealer.backend().to_owned(),
        kek_id: sealer.kek_id().to_owned(),
        status: status.to_owned(),
        message,
    };
    let mut canary = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(canary.as_mut());
    let canary_binding = canary_binding();
    let binding = Binding {
        account_id: canary_binding.owner.as_str(),
        provider: canary_binding.provider.as_str(),
        key_id: canary_binding.key_id.as_str(),
    };
    let blob = match sealer.seal(&binding, canary.as_ref()).await {
        Ok(blob) => blob,
        Err(e @ CryptoError::Backend { .. }) => return report("unavailable", Some(format!("sealing: {e}"))),
        Err(e) => return report("failing", Some(format!("sealing: {e}"))),
    };
    let Ok(mut lease) = engine.workers.lease().await else {
        return report("unchecked", Some("no worker is ready to open the canary".to_owned()));
    };
    let request = OpenRequest {
        request_id: 0,
        binding: canary_binding,
        blob: blob.into_bytes(),
    };
    match lease.open_only(&request).await {
        Ok(()) => {
            lease.release();
            report("ok", None)
        }
        Err(WorkerError::Refused { kind, message }) => {
            lease.release();
            let status = if kind == FailKind::KekUnavailable {
                "unavailable"
            } else {
                "failing"
            };
            report(status, Some(message))
        }
        Err(WorkerError::Gone(_)) => report("unchecked", Some("the worker went away".to_owned())),
    }
}
