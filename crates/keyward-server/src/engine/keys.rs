//! Model keys: list, save or rotate, remove, switch source.
//!
//! A key is format-checked, sealed to the primary KEK version (the gateway can seal, never
//! open) under a fresh key id, and stored with its audit event in one transaction. A
//! rotation overwrites the old ciphertext, and a removal deletes it; both ask for a purge
//! so no copy lingers in the database files.

use keyward_core::{ApiKey, ErrorCode, KeyId, KeySource, Provider};
use keyward_crypto::Binding;
use keyward_store::{NewKey, ProviderState, Saved};

use super::calls::kek_unavailable_message;
use super::identity::random_id_bytes;
use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};

/// `anthropic`, `openai` or `google`, else `404 unknown_provider`.
pub fn parse_provider(raw: &str) -> ApiResult<Provider> {
    raw.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::UnknownProvider,
            "unknown provider: expected anthropic, openai or google",
        )
    })
}

/// `own` or `shared`, else `validation_error`.
pub fn parse_source(raw: &str) -> ApiResult<KeySource> {
    raw.parse()
        .map_err(|_| ApiError::validation("source must be \"own\" or \"shared\""))
}

/// A sealing failure: a KEK backend that does not answer is `503 kek_unavailable` (retry
/// later, nothing was saved); anything else is keyward's own fault.
fn seal_error(e: &keyward_crypto::CryptoError) -> ApiError {
    match e {
        keyward_crypto::CryptoError::Backend { .. } => {
            ApiError::new(ErrorCode::KekUnavailable, kek_unavailable_message(&e.to_string()))
        }
        _ => ApiError::internal(e),
    }
}

impl Engine {
    /// Every provider's state in the actor's account (keys by last4 only). Any member.
    pub async fn provider_states(&self, actor: &Actor) -> ApiResult<Vec<ProviderState>> {
        Ok(self.store.provider_states(actor.account_id()).await?)
    }

    /// One provider's state in the actor's account. Any member.
    pub async fn provider_state(&self, actor: &Actor, provider: Provider) -> ApiResult<ProviderState> {
        Ok(self.store.provider_state(actor.account_id(), provider).await?)
    }

    /// Saves or rotates `provider`'s key: role (403), plan (403), the key format (422),
    /// sealing, the store call with its audit event, the purge after a rotation, metrics.
    /// The source is left as it was.
    pub async fn save_key(&self, actor: &Actor, provider: Provider, raw_key: &str) -> ApiResult<Saved> {
        actor.may_manage_keys("saving a key")?;
        actor.may_own_keys()?;
        let key =
            ApiKey::parse(provider, raw_key).map_err(|e| ApiError::new(ErrorCode::InvalidKeyFormat, e.to_string()))?;

        let account = actor.account_id();
        let key_id = KeyId::from_random(random_id_bytes());
        let binding = Binding {
            account_id: account.as_str(),
            provider: provider.as_str(),
            key_id: key_id.as_str(),
        };
        // Held until the blob is stored: while it is, this gateway keeps reporting this KEK
        // version as one it seals to, so `kek retire` cannot destroy it under this save.
        let sealer = self.sealer.current();
        let sealed = sealer
            .seal(&binding, key.expose_secret().as_bytes())
            .await
            .map_err(|e| seal_error(&e))?;
        let new = NewKey {
            key_id,
            sealed,
            last4: key.last4().clone(),
            kind: key.kind(),
        };
        drop(key);

        let saved = self
            .store
            .save_key(account, provider, new, &actor.audit_actor(), self.clock.now())
            .await?;
        drop(sealer);
        if saved.rotated {
            self.purge.request();
        }
        let action = if saved.rotated { "key.rotated" } else { "key.saved" };
        self.metrics.record_key_action(action, provider.as_str());
        tracing::info!(%account, %provider, action, "key saved");
        Ok(saved)
    }

    /// Removes `provider`'s key (audited; the ciphertext is purged within seconds); the
    /// source falls back to shared. Role (403), then `409 no_key_saved`.
    pub async fn remove_key(&self, actor: &Actor, provider: Provider) -> ApiResult<()> {
        actor.may_manage_keys("removing a key")?;
        let account = actor.account_id();
        self.store
            .remove_key(account, provider, &actor.audit_actor(), self.clock.now())
            .await?;
        self.purge.request();
        self.metrics.record_key_action("key.removed", provider.as_str());
        tracing::info!(%account, %provider, "key removed");
        Ok(())
    }

    /// Switches which key pays for `provider`'s calls (audited when it changes). Role (403);
    /// `own` with no saved key is `409 no_key_saved`.
    pub async fn switch_source(
        &self,
        actor: &Actor,
        provider: Provider,
        source: KeySource,
    ) -> ApiResult<ProviderState> {
        actor.may_manage_keys("switching the key source")?;
        if source == KeySource::Own {
            actor.may_own_keys()?;
        }
        let after = self
            .store
            .set_source(
                actor.account_id(),
                provider,
                source,
                &actor.audit_actor(),
                self.clock.now(),
            )
            .await?;
        self.metrics.record_key_action("key.source_changed", provider.as_str());
        Ok(after)
    }
}
