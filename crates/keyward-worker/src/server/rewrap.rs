//! `ToWorker::Rewrap`: move a sealed key to another KEK version inside the worker.
//!
//! The key is opened into a locked, non-dumpable page (the same pool calls use), sealed
//! again under a fresh DEK to the target version, checked to open, and the page is wiped
//! when it goes back to the pool. Only the new blob is sent back. See
//! `keyward_crypto::Keyring::rewrap` for why v1 blobs cannot keep their DEK.

use keyward_crypto::{Binding, CryptoError, SealedKey};

use super::{fail, Worker};
use keyward_worker_protocol::protocol::{FailKind, FromWorker, RewrapRequest};

impl Worker {
    pub(super) async fn rewrap(&self, r: &RewrapRequest) -> FromWorker {
        let started = std::time::Instant::now();
        let mut page = match self.pages.take() {
            Ok(p) => p,
            Err(e) => return fail(FailKind::Internal, &format!("locked memory: {e}")),
        };
        let binding = Binding {
            account_id: r.binding.owner.as_str(),
            provider: r.binding.provider.as_str(),
            key_id: r.binding.key_id.as_str(),
        };
        let blob = SealedKey::from_bytes(r.blob.clone());
        let answer = match self
            .opener
            .rewrap(&binding, &blob, &r.target_kek_id, page.page_mut())
            .await
        {
            Ok(sealed) => FromWorker::Sealed(sealed.into_bytes()),
            Err(e @ CryptoError::Backend { .. }) => fail(
                FailKind::KekUnavailable,
                &format!("the key-encryption backend is not answering: {e}"),
            ),
            Err(e) => fail(
                FailKind::OpenFailed,
                &format!("the sealed key could not be re-wrapped: {e}"),
            ),
        };
        drop(page);
        tracing::debug!(
            request_id = r.request_id,
            micros = started.elapsed().as_micros() as u64,
            ok = matches!(answer, FromWorker::Sealed(_)),
            "rewrap"
        );
        answer
    }
}
