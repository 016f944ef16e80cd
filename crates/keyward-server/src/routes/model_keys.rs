//! The model-keys API: list, save or rotate, remove, switch source.
//!
//! Checks run in a fixed order so answers leak nothing: token (401), membership (404),
//! provider name (404 `unknown_provider`), role (403), plan (403), body (413/415/400/422),
//! key format (422).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keyward_core::{ApiKey, ErrorCode, KeyId, KeyKind, KeySource, Plan, Provider};
use keyward_crypto::Binding;
use keyward_store::{Actor, Membership, NewKey, ProviderState, Saved};
use secrecy::ExposeSecret;

use crate::api::{
    ErrorBody, KeyBody, KeyTestFindings, LastTestBody, ProviderListBody, ProviderStateBody, SaveKeyRequest,
    SourceRequest,
};
use crate::app::AppState;
use crate::auth::{random_id_bytes, Caller};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;

pub fn parse_provider(raw: &str) -> ApiResult<Provider> {
    raw.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::UnknownProvider,
            "unknown provider: expected anthropic, openai or google",
        )
    })
}

/// The API's view of one provider (API.md `ProviderState`).
pub fn state_body(state: &AppState, s: &ProviderState) -> ProviderStateBody {
    ProviderStateBody {
        provider: s.provider.as_str().to_owned(),
        source: s.source.as_str().to_owned(),
        key: s.key.as_ref().map(|k| KeyBody {
            last4: k.last4.as_str().to_owned(),
            created_at: rfc3339(k.created_at),
            updated_at: rfc3339(k.updated_at),
            last_test: k.last_test.as_ref().map(|t| LastTestBody {
                ok: t.ok,
                at: rfc3339(t.at),
                message: t.message.clone(),
                found: test_findings(t),
            }),
            kind: k.kind.map(|kind| kind.as_str().to_owned()),
            notice: k.kind.and_then(KeyKind::notice).map(str::to_owned),
            reported_leaked_at: k.reported_leaked_at.map(rfc3339),
        }),
        models: state.catalogue.model_ids(s.provider),
    }
}

/// What a stored test found, as it was kept; a detail that does not read is left out (it
/// is only ever written by this version's key test).
pub fn test_findings(t: &keyward_store::LastTest) -> Option<KeyTestFindings> {
    t.detail.as_deref().and_then(|d| serde_json::from_str(d).ok())
}

/// A sealing failure: a KEK backend that does not answer is `503 kek_unavailable` (retry
/// later, nothing was saved); anything else is keyward's own fault.
fn seal_error(e: &keyward_crypto::CryptoError) -> ApiError {
    match e {
        keyward_crypto::CryptoError::Backend { .. } => ApiError::new(
            ErrorCode::KekUnavailable,
            crate::ai::kek_unavailable_message(&e.to_string()),
        ),
        _ => ApiError::internal(e),
    }
}

fn actor(caller: &Caller) -> Actor {
    Actor(caller.user.id.to_string())
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/model-keys",
    tag = "model keys",
    params(("account_id" = String, Path)),
    responses(
        (status = 200, description = "All three providers, keys shown by last4 only", body = ProviderListBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<ProviderListBody>> {
    let m = caller.member_of(&state, &account).await?;
    let states = state.store.provider_states(&m.account.id).await?;
    let providers = states.iter().map(|s| state_body(&state, s)).collect();
    Ok(Json(ProviderListBody { providers }))
}

/// Own keys need a paid plan: else `403 plan_required`.
pub fn require_paid(m: &Membership) -> ApiResult<()> {
    if m.account.plan == Plan::Free {
        return Err(ApiError::new(
            ErrorCode::PlanRequired,
            format!(
                "saving your own key needs a paid plan ({} or business); this account is on {}",
                Plan::FIRST_PAID,
                m.account.plan
            ),
        ));
    }
    Ok(())
}

#[utoipa::path(
    put,
    path = "/v1/accounts/{account_id}/model-keys/{provider}",
    tag = "model keys",
    params(("account_id" = String, Path), ("provider" = String, Path, description = "anthropic, openai or google")),
    request_body = SaveKeyRequest,
    responses(
        (status = 200, description = "Saved (or rotated); the source is unchanged", body = ProviderStateBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
        (status = 403, description = "Role or plan does not allow it", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad key format or body", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn save(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, provider)): Path<(String, String)>,
    body: JsonBody,
) -> ApiResult<Json<ProviderStateBody>> {
    let (m, provider) = caller.manager_for(&state, &account, &provider, "saving a key").await?;
    require_paid(&m)?;
    let body: SaveKeyRequest = body.parse()?;
    let saved = store_key(&state, &caller, &m, provider, body.api_key.expose_secret()).await?;
    drop(body);
    Ok(Json(state_body(&state, &saved.state)))
}

/// Saves or rotates `provider`'s key of `m`'s account: the key format check, sealing, the
/// store call (with its audit event), the purge after a rotation, metrics. The caller has
/// checked membership, role ([`Caller::manager_for`]) and plan ([`require_paid`]). Used by
/// the JSON API and the settings page alike.
pub async fn store_key(
    state: &AppState,
    caller: &Caller,
    m: &Membership,
    provider: Provider,
    raw_key: &str,
) -> ApiResult<Saved> {
    let key =
        ApiKey::parse(provider, raw_key).map_err(|e| ApiError::new(ErrorCode::InvalidKeyFormat, e.to_string()))?;

    let key_id = KeyId::from_random(random_id_bytes());
    let binding = Binding {
        account_id: m.account.id.as_str(),
        provider: provider.as_str(),
        key_id: key_id.as_str(),
    };
    // Held until the blob is stored: while it is, this gateway keeps reporting this KEK
    // version as one it seals to, so `kek retire` cannot destroy it under this save.
    let sealer = state.sealer.current();
    let sealed = sealer
        .seal_async(&binding, key.expose_secret().as_bytes())
        .await
        .map_err(|e| seal_error(&e))?;
    let new = NewKey {
        key_id,
        sealed,
        last4: key.last4().clone(),
        kind: key.kind(),
    };
    drop(key);

    let saved = state
        .store
        .save_key(&m.account.id, provider, new, &actor(caller), state.clock.now())
        .await?;
    drop(sealer);
    if saved.rotated {
        state.purge.request();
    }
    let action = if saved.rotated { "key.rotated" } else { "key.saved" };
    state.metrics.record_key_action(action, provider.as_str());
    tracing::info!(account = %m.account.id, %provider, action, "key saved");
    Ok(saved)
}

#[utoipa::path(
    delete,
    path = "/v1/accounts/{account_id}/model-keys/{provider}",
    tag = "model keys",
    params(("account_id" = String, Path), ("provider" = String, Path, description = "anthropic, openai or google")),
    responses(
        (status = 204, description = "Removed; the source falls back to shared"),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
        (status = 403, description = "Role does not allow it", body = ErrorBody),
        (status = 409, description = "No key saved", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, provider)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (m, provider) = caller
        .manager_for(&state, &account, &provider, "removing a key")
        .await?;
    delete_key(&state, &caller, &m, provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes `provider`'s key of `m`'s account (audited; the ciphertext is purged within
/// seconds). The caller has checked membership and role.
pub async fn delete_key(state: &AppState, caller: &Caller, m: &Membership, provider: Provider) -> ApiResult<()> {
    state
        .store
        .remove_key(&m.account.id, provider, &actor(caller), state.clock.now())
        .await?;
    state.purge.request();
    state.metrics.record_key_action("key.removed", provider.as_str());
    tracing::info!(account = %m.account.id, %provider, "key removed");
    Ok(())
}

#[utoipa::path(
    put,
    path = "/v1/accounts/{account_id}/model-keys/{provider}/source",
    tag = "model keys",
    params(("account_id" = String, Path), ("provider" = String, Path, description = "anthropic, openai or google")),
    request_body = SourceRequest,
    responses(
        (status = 200, description = "The provider's state after the switch", body = ProviderStateBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
        (status = 403, description = "Role does not allow it", body = ErrorBody),
        (status = 409, description = "own with no saved key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad body", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn set_source(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, provider)): Path<(String, String)>,
    body: JsonBody,
) -> ApiResult<Json<ProviderStateBody>> {
    let (m, provider) = caller
        .manager_for(&state, &account, &provider, "switching the key source")
        .await?;
    // `source` is read as a string and matched, so `true`/`1`/`null` get a clear 422.
    let body: SourceRequest = body.parse()?;
    let source = parse_source(&body.source)?;
    let after = switch_source(&state, &caller, &m, provider, source).await?;
    Ok(Json(state_body(&state, &after)))
}

/// `own` or `shared`, else `validation_error`.
pub fn parse_source(raw: &str) -> ApiResult<KeySource> {
    raw.parse()
        .map_err(|_| ApiError::validation("source must be \"own\" or \"shared\""))
}

/// Switches which key pays for `provider`'s calls (audited); `own` with no saved key is
/// `no_key_saved`. The caller has checked membership and role.
pub async fn switch_source(
    state: &AppState,
    caller: &Caller,
    m: &Membership,
    provider: Provider,
    source: KeySource,
) -> ApiResult<ProviderState> {
    let after = state
        .store
        .set_source(&m.account.id, provider, source, &actor(caller), state.clock.now())
        .await?;
    state.metrics.record_key_action("key.source_changed", provider.as_str());
    Ok(after)
}
