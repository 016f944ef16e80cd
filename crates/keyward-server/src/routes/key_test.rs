//! `POST /v1/accounts/{id}/model-keys/{provider}/test`: "Test key".
//!
//! One minimal generation (a single output token) on the provider's cheapest catalogued
//! model, with the saved key, through a worker like any call. The answer is always 200:
//! `ok: true` with the model and latency, or `ok: false` with the diagnosis, the
//! provider's status and its own message (with any echo of the key masked by the worker).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::{ErrorCode, KeySource, Provider, UnixMillis};
use keyward_providers::{build_probe, parse_chat, Diagnosis, ProviderFailure};
use keyward_store::{AuditAction, LastTest, Membership, NewAuditEvent};

use crate::ai::{open_and_call, CallFailure, KeyChoice};
use crate::api::{ErrorBody, KeyTestBody};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

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
        (status = 200, description = "The probe's result: ok, or the diagnosis and the provider's message", body = KeyTestBody),
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
pub enum KeyTestResult {
    /// The provider answered the probe.
    Ok { model: String, latency_ms: u128 },
    /// The provider refused it (or could not be reached): the diagnosis, the provider's
    /// status and its own message, with any echo of the key masked by the worker.
    Failed {
        diagnosis: Diagnosis,
        provider_status: Option<u16>,
        message: String,
    },
}

impl KeyTestResult {
    /// The JSON API's answer.
    pub fn to_body(&self) -> KeyTestBody {
        match self {
            KeyTestResult::Ok { model, latency_ms } => KeyTestBody {
                ok: true,
                status: "ok".to_owned(),
                model: Some(model.clone()),
                latency_ms: Some(u64::try_from(*latency_ms).unwrap_or(u64::MAX)),
                provider_status: None,
                message: None,
            },
            KeyTestResult::Failed {
                diagnosis,
                provider_status,
                message,
            } => KeyTestBody {
                ok: false,
                status: diagnosis.as_str().to_owned(),
                model: None,
                latency_ms: None,
                provider_status: Some(*provider_status),
                message: Some(message.clone()),
            },
        }
    }
}

/// Runs "Test key" for `provider` of `m`'s account: the saved key (else `no_key_saved`),
/// the per-minute limit, one minimal probe through a worker, the result kept as the key's
/// `last_test` and audited (`key.tested`). The caller has checked membership and role. Used
/// by the JSON API and the settings page alike.
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
    let key_id = key.key_id.clone();
    let last4 = key.last4.clone();
    let choice = KeyChoice {
        source: KeySource::Own,
        key,
        binding_account: m.account.id.to_string(),
    };

    let outcome: Result<u128, ProviderFailure> =
        match open_and_call(state, provider, &choice, build_probe(provider, &model.id)).await {
            Ok(mut up) => match up.collect(1024 * 1024).await {
                Ok(body) => parse_chat(provider, up.status, &body).map(|_| up.started.elapsed().as_millis()),
                Err(CallFailure::Provider(f)) => Err(f),
                Err(other) => return Err(other.into_api_error()),
            },
            Err(CallFailure::Provider(f)) => Err(f),
            Err(other) => return Err(other.into_api_error()),
        };
    let now = state.clock.now();
    let (answer, result) = match &outcome {
        Ok(ms) => (
            KeyTestResult::Ok {
                model: model.id.clone(),
                latency_ms: *ms,
            },
            LastTest {
                ok: true,
                at: now,
                message: format!("ok: {} answered in {ms} ms", model.id),
            },
        ),
        Err(f) => (
            KeyTestResult::Failed {
                diagnosis: f.diagnosis,
                provider_status: f.status,
                message: f.message.clone(),
            },
            LastTest {
                ok: false,
                at: now,
                message: format!("{}: {}", f.diagnosis.as_str(), f.message),
            },
        ),
    };
    let mut event = NewAuditEvent::key_action(
        &m.account.id,
        now,
        caller.user.id.as_str(),
        AuditAction::KeyTested,
        provider,
        Some(&last4),
        Some(result.message.clone()),
    );
    event.key_source = Some(KeySource::Own);
    event.model = Some(model.id.clone());
    event.outcome = match &outcome {
        Ok(_) => "ok".to_owned(),
        Err(f) => format!("error:{}", f.diagnosis.as_str()),
    };
    state
        .store
        .record_key_test(&m.account.id, provider, &key_id, &result, &event)
        .await?;
    state.metrics.record_probe(provider, event.outcome.as_str());
    Ok(answer)
}
