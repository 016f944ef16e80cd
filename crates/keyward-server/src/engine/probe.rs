//! "Test key" (`POST /v1/accounts/{id}/model-keys/{provider}/test` and the settings page's button).
//!
//! One minimal generation (a single output token) on the provider's probe model (its
//! cheapest active catalogued one), with the saved key, through a worker like any call. The
//! answer is always 200: `ok: true` with the model, the latency and the rate-limit headroom
//! the provider reported, or `ok: false` with the diagnosis, the provider's status and its
//! own message (with any echo of the key masked by the worker) and, where known, what to do.
//!
//! When the provider says the probe model does not exist or is not available to this key,
//! the key is checked against the provider's free model listing (same key, same worker
//! path): `model_not_available` then says whether the key itself is valid and which
//! catalogued models it can use, so a retired model is never mistaken for a bad key.
//!
//! A provider that reports the key as leaked marks it: calls on it stop
//! (`409 key_reported_leaked`) until the key is replaced or a later test succeeds.

use keyward_core::{ErrorCode, KeyKind, KeyOwner, KeySource, Outcome, Provider};
use keyward_providers::{
    build_list_models, build_probe, parse_chat, parse_model_page, rate_limits, rate_limits_note, Diagnosis,
    ProviderFailure,
};
use keyward_store::{AuditAction, LastTest, NewAuditEvent};

use super::calls::{CallFailure, KeyChoice};
use super::{Actor, Engine};
use crate::api::{KeyTestBody, KeyTestFindings};
use crate::error::{ApiError, ApiResult};

/// Largest answer read from a probe or a model listing.
const MAX_PROBE_ANSWER: usize = 1024 * 1024;

/// What one "Test key" found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTestResult {
    pub ok: bool,
    /// The probe model.
    pub model: String,
    pub latency_ms: u64,
    /// The diagnosis of a failure.
    pub diagnosis: Option<Diagnosis>,
    pub provider_status: Option<u16>,
    /// The provider's own message (failures), the key's echo masked by the worker.
    pub message: Option<String>,
    pub found: KeyTestFindings,
}

impl KeyTestResult {
    /// The JSON API's answer.
    pub fn to_body(&self) -> KeyTestBody {
        // `status` is the body's own field; the findings repeat it only when stored.
        let found = KeyTestFindings {
            status: None,
            ..self.found.clone()
        };
        if self.ok {
            KeyTestBody {
                ok: true,
                status: "ok".to_owned(),
                model: Some(self.model.clone()),
                latency_ms: Some(self.latency_ms),
                provider_status: None,
                message: None,
                found,
            }
        } else {
            KeyTestBody {
                ok: false,
                status: self.status().to_owned(),
                model: None,
                latency_ms: None,
                provider_status: Some(self.provider_status),
                message: self.message.clone(),
                found,
            }
        }
    }

    /// `ok` or the diagnosis.
    pub fn status(&self) -> &'static str {
        self.diagnosis.map_or("ok", Diagnosis::as_str)
    }
}

/// What a stored test found, as it was kept; a detail that does not read is left out (it
/// is only ever written by this version's key test).
pub fn test_findings(t: &LastTest) -> Option<KeyTestFindings> {
    t.detail.as_deref().and_then(|d| serde_json::from_str(d).ok())
}

impl Engine {
    /// Runs "Test key" for `provider` of the actor's account: the role (403), the saved key
    /// (else `no_key_saved`), the per-minute limit, one minimal probe through a worker (and,
    /// when the model is what failed, the provider's model listing), the result kept as the
    /// key's `last_test` and audited (`key.tested`).
    pub async fn test_key(&self, actor: &Actor, provider: Provider) -> ApiResult<KeyTestResult> {
        actor.may_manage_keys("testing a key")?;
        let account = actor.account_id();
        let key = self.store.sealed_key(account, provider).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoKeySaved,
                "no key is saved for this provider: save one, then test it",
            )
        })?;
        if !self
            .probe_limiter
            .allow(account.as_str(), provider, self.clock.now(), self.key_tests_per_minute)
        {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "at most {} key tests a minute per provider; wait a moment",
                    self.key_tests_per_minute
                ),
            ));
        }
        let model = self
            .catalogue
            .probe_model(provider)
            .cloned()
            .ok_or_else(|| ApiError::internal(&"no probe model in the catalogue"))?;
        let kind = self
            .store
            .provider_state(account, provider)
            .await?
            .key
            .and_then(|k| k.kind);
        let key_id = key.key_id.clone();
        let last4 = key.last4.clone();
        let choice = KeyChoice {
            source: KeySource::Own,
            key,
            owner: KeyOwner::Account(account.clone()),
        };

        let mut result = self.probe(provider, &choice, &model.id).await?;
        if result.diagnosis == Some(Diagnosis::ModelNotAvailable) {
            self.list_usable_models(provider, &choice, &mut result).await?;
        }
        if result.diagnosis == Some(Diagnosis::InvalidKey) && kind == Some(KeyKind::GoogleStandard) {
            // Google's own answer does not say the key is of a kind it stopped taking; keyward knows.
            result.found.advice = KeyKind::GoogleStandard.notice().map(str::to_owned);
        }
        if result.found.rate_limits.is_none() {
            result.found.rate_limits_note = rate_limits_note(provider).map(str::to_owned);
        }
        result.found.status = Some(result.status().to_owned());

        let now = self.clock.now();
        let message = match &result.message {
            None => format!("ok: {} answered in {} ms", model.id, result.latency_ms),
            Some(msg) => format!("{}: {msg}", result.status()),
        };
        let stored = LastTest {
            ok: result.ok,
            at: now,
            message: message.clone(),
            detail: serde_json::to_string(&result.found).ok(),
        };
        let outcome = result.diagnosis.map_or(Outcome::Ok, |d| Outcome::Error(d.as_str()));
        let event = NewAuditEvent::new(account, now, &actor.audit_actor(), AuditAction::KeyTested, provider)
            .last4(Some(&last4))
            .key_source(KeySource::Own)
            .model(&model.id)
            .outcome(outcome)
            .detail(Some(message));
        self.store
            .record_key_test(account, provider, &key_id, &stored, &event)
            .await?;
        if result.diagnosis == Some(Diagnosis::KeyReportedLeaked) {
            self.mark_leaked(account, provider, &key_id).await;
        }
        if result.diagnosis == Some(Diagnosis::ModelNotAvailable) && result.provider_status == Some(404) {
            self.note_model_not_found(provider, &model.id);
        }
        self.metrics.record_probe(provider, outcome);
        Ok(result)
    }

    /// The probe itself: one minimal generation with the key.
    async fn probe(&self, provider: Provider, choice: &KeyChoice, model: &str) -> ApiResult<KeyTestResult> {
        let mut up = match self.open_and_call(provider, choice, build_probe(provider, model)).await {
            Ok(up) => up,
            Err(CallFailure::Provider(f)) => return Ok(failed(model, f, None)),
            Err(other) => return Err(other.into_api_error()),
        };
        let limits = rate_limits(provider, &up.headers);
        let outcome = match up.collect(MAX_PROBE_ANSWER).await {
            Ok(body) => parse_chat(provider, up.status, &body).map(|_| ()),
            Err(CallFailure::Provider(f)) => Err(f),
            Err(other) => return Err(other.into_api_error()),
        };
        Ok(match outcome {
            Ok(()) => KeyTestResult {
                ok: true,
                model: model.to_owned(),
                latency_ms: u64::try_from(up.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                diagnosis: None,
                provider_status: None,
                message: None,
                found: KeyTestFindings {
                    rate_limits: limits,
                    ..KeyTestFindings::default()
                },
            },
            Err(f) => failed(model, f, limits),
        })
    }
}

fn failed(model: &str, f: ProviderFailure, limits: Option<keyward_providers::RateLimits>) -> KeyTestResult {
    KeyTestResult {
        ok: false,
        model: model.to_owned(),
        latency_ms: 0,
        diagnosis: Some(f.diagnosis),
        provider_status: f.status,
        message: Some(f.message),
        found: KeyTestFindings {
            advice: f.advice.map(str::to_owned),
            rate_limits: limits,
            ..KeyTestFindings::default()
        },
    }
}

impl Engine {
    /// After the probe model was refused: asks the provider's free model listing with the same
    /// key. A listing is `key_valid: true` and the catalogued models it lists; a listing refused
    /// for the key's sake is `key_valid: false`; anything else (unreachable, unreadable) leaves
    /// `key_valid` unknown.
    async fn list_usable_models(
        &self,
        provider: Provider,
        choice: &KeyChoice,
        result: &mut KeyTestResult,
    ) -> ApiResult<()> {
        let listed = match self
            .open_and_call(provider, choice, build_list_models(provider, None))
            .await
        {
            Ok(mut up) => match up.collect(MAX_PROBE_ANSWER).await {
                Ok(body) => parse_model_page(provider, up.status, &body),
                Err(CallFailure::Provider(f)) => Err(f),
                Err(other) => return Err(other.into_api_error()),
            },
            Err(CallFailure::Provider(f)) => Err(f),
            Err(other) => return Err(other.into_api_error()),
        };
        match listed {
            Ok(page) => {
                result.found.key_valid = Some(true);
                result.found.models = Some(
                    self.catalogue
                        .served_chat(provider)
                        .filter(|m| page.ids.iter().any(|id| id == &m.id))
                        .map(|m| m.id.clone())
                        .collect(),
                );
            }
            Err(f) if f.is_key_failure() => {
                result.found.key_valid = Some(false);
                if result.found.advice.is_none() {
                    result.found.advice = f.advice.map(str::to_owned);
                }
            }
            Err(f) => {
                tracing::info!(%provider, diagnosis = %f.diagnosis, "model listing after a refused probe failed");
            }
        }
        Ok(())
    }
}
