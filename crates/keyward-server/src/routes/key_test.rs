//! `POST /v1/accounts/{id}/model-keys/{provider}/test`: "Test key".
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

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::{ErrorCode, KeyKind, KeySource, Provider, UnixMillis};
use keyward_providers::{
    build_list_models, build_probe, parse_chat, parse_model_page, rate_limits, rate_limits_note, Diagnosis,
    ProviderFailure,
};
use keyward_store::{AuditAction, LastTest, Membership, NewAuditEvent};

use crate::ai::{open_and_call, CallFailure, KeyChoice};
use crate::api::{ErrorBody, KeyTestBody, KeyTestFindings};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

/// Largest answer read from a probe or a model listing.
const MAX_PROBE_ANSWER: usize = 1024 * 1024;

/// Probes allowed per account and provider per minute (a fixed one-minute window).
#[derive(Debug, Default)]
pub struct ProbeLimiter {
    windows: Mutex<HashMap<(String, Provider), (i64, u32)>>,
}

impl ProbeLimiter {
    pub fn allow(&self, account: &str, provider: Provider, now: UnixMillis, per_minute: u32) -> bool {
        let minute = now.as_i64() / 60_000;
        let Ok(mut w) = self.windows.lock() else { return false };
        if w.len() > 100_000 {
            w.retain(|_, (m, _)| *m == minute);
        }
        let entry = w.entry((account.to_owned(), provider)).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 += 1;
        entry.1 <= per_minute
    }
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{account_id}/model-keys/{provider}/test",
    tag = "model keys",
    params(("account_id" = String, Path), ("provider" = String, Path, description = "anthropic, openai or google")),
    responses(
        (status = 200, description = "The probe's result: ok with the rate-limit headroom, or the diagnosis and the provider's message", body = KeyTestBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Role does not allow it", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
        (status = 409, description = "No key saved", body = ErrorBody),
        (status = 429, description = "Too many tests this minute", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn test_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, provider)): Path<(String, String)>,
) -> ApiResult<Json<KeyTestBody>> {
    let (m, provider) = caller.manager_for(&state, &account, &provider, "testing a key").await?;
    let result = run_key_test(&state, &caller, &m, provider).await?;
    Ok(Json(result.to_body()))
}

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

/// Runs "Test key" for `provider` of `m`'s account: the saved key (else `no_key_saved`),
/// the per-minute limit, one minimal probe through a worker (and, when the model is what
/// failed, the provider's model listing), the result kept as the key's `last_test` and
/// audited (`key.tested`). The caller has checked membership and role. Used by the JSON API
/// and the settings page alike.
pub async fn run_key_test(
    state: &AppState,
    caller: &Caller,
    m: &Membership,
    provider: Provider,
) -> ApiResult<KeyTestResult> {
    let key = state.store.sealed_key(&m.account.id, provider).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoKeySaved,
            "no key is saved for this provider: save one, then test it",
        )
    })?;
    if !state.probe_limiter.allow(
        m.account.id.as_str(),
        provider,
        state.clock.now(),
        state.key_tests_per_minute,
    ) {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "at most {} key tests a minute per provider; wait a moment",
                state.key_tests_per_minute
            ),
        ));
    }
    let model = state
        .catalogue
        .probe_model(provider)
        .cloned()
        .ok_or_else(|| ApiError::internal(&"no probe model in the catalogue"))?;
    let kind = state
        .store
        .provider_state(&m.account.id, provider)
        .await?
        .key
        .and_then(|k| k.kind);
    let key_id = key.key_id.clone();
    let last4 = key.last4.clone();
    let choice = KeyChoice {
        source: KeySource::Own,
        key,
        binding_account: m.account.id.to_string(),
    };

    let mut result = probe(state, provider, &choice, &model.id).await?;
    if result.diagnosis == Some(Diagnosis::ModelNotAvailable) {
        list_usable_models(state, provider, &choice, &mut result).await?;
    }
    if result.diagnosis == Some(Diagnosis::InvalidKey) && kind == Some(KeyKind::GoogleStandard) {
        // Google's own answer does not say the key is of a kind it stopped taking; keyward knows.
        result.found.advice = KeyKind::GoogleStandard.notice().map(str::to_owned);
    }
    if result.found.rate_limits.is_none() {
        result.found.rate_limits_note = rate_limits_note(provider).map(str::to_owned);
    }
    result.found.status = Some(result.status().to_owned());

    let now = state.clock.now();
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
    let mut event = NewAuditEvent::key_action(
        &m.account.id,
        now,
        caller.user.id.as_str(),
        AuditAction::KeyTested,
        provider,
        Some(&last4),
        Some(message),
    );
    event.key_source = Some(KeySource::Own);
    event.model = Some(model.id.clone());
    event.outcome = match result.diagnosis {
        None => "ok".to_owned(),
        Some(d) => format!("error:{}", d.as_str()),
    };
    state
        .store
        .record_key_test(&m.account.id, provider, &key_id, &stored, &event)
        .await?;
    if result.diagnosis == Some(Diagnosis::KeyReportedLeaked) {
        crate::routes::ai::mark_leaked(state, &m.account.id, provider, &key_id).await;
    }
    if result.diagnosis == Some(Diagnosis::ModelNotAvailable) && result.provider_status == Some(404) {
        crate::routes::ai::note_model_not_found(state, provider, &model.id);
    }
    state.metrics.record_probe(provider, event.outcome.as_str());
    Ok(result)
}

/// The probe itself: one minimal generation with the key.
async fn probe(state: &AppState, provider: Provider, choice: &KeyChoice, model: &str) -> ApiResult<KeyTestResult> {
    let mut up = match open_and_call(state, provider, choice, build_probe(provider, model)).await {
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

/// After the probe model was refused: asks the provider's free model listing with the same
/// key. A listing is `key_valid: true` and the catalogued models it lists; a listing refused
/// for the key's sake is `key_valid: false`; anything else (unreachable, unreadable) leaves
/// `key_valid` unknown.
async fn list_usable_models(
    state: &AppState,
    provider: Provider,
    choice: &KeyChoice,
    result: &mut KeyTestResult,
) -> ApiResult<()> {
    let listed = match open_and_call(state, provider, choice, build_list_models(provider, None)).await {
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
                state
                    .catalogue
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
