//! The model-keys API: list, save or rotate, remove, switch source. Each handler reads the
//! request, hands it to the [`crate::engine`] and shapes the answer.
//!
//! Checks run in a fixed order so answers leak nothing: token (401), membership (404),
//! provider name (404 `unknown_provider`), role (403), plan (403), body (413/415/400/422),
//! key format (422).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keyward_core::KeyKind;
use keyward_store::ProviderState;
use secrecy::ExposeSecret;

use crate::api::{
    ErrorBody, KeyBody, LastTestBody, ProviderListBody, ProviderStateBody, SaveKeyRequest, SourceRequest,
};
use crate::auth::Caller;
use crate::engine::actor::Access;
use crate::engine::keys::{parse_provider, parse_source};
use crate::engine::probe::test_findings;
use crate::error::ApiResult;
use crate::extract::{JsonBody, SecretJsonBody};
use crate::state::AppState;

/// The API's view of one provider (API.md `ProviderState`).
pub fn state_body(state: &AppState, s: &ProviderState) -> ProviderStateBody {
    ProviderStateBody {
        provider: s.provider.as_str().to_owned(),
        source: s.source.as_str().to_owned(),
        key: s.key.as_ref().map(|k| KeyBody {
            last4: k.last4.as_str().to_owned(),
            created_at: k.created_at.rfc3339(),
            updated_at: k.updated_at.rfc3339(),
            last_test: k.last_test.as_ref().map(|t| LastTestBody {
                ok: t.ok,
                at: t.at.rfc3339(),
                message: t.message.clone(),
                found: test_findings(t),
            }),
            kind: k.kind.map(|kind| kind.as_str().to_owned()),
            notice: k.kind.and_then(KeyKind::notice).map(str::to_owned),
            reported_leaked_at: k.reported_leaked_at.map(|t| t.rfc3339()),
        }),
        models: state.engine.catalogue.model_ids(s.provider),
    }
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/model-keys",
    tag = "model keys",
    params(("account_id" = String, Path)),
    responses(
        (status = 200, description = "All three providers, keys shown by last4 only", body = ProviderListBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "A service token (no scope covers this route)", body = ErrorBody),
        (status = 404, description = "Not a member of this account, or unknown provider", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<ProviderListBody>> {
    let actor = caller.in_account(&state, &account, Access::ReadAccount).await?;
    let states = state.engine.provider_states(&actor).await?;
    let providers = states.iter().map(|s| state_body(&state, s)).collect();
    Ok(Json(ProviderListBody { providers }))
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
        (status = 403, description = "Role or plan does not allow it; a service token (never allowed to manage keys)", body = ErrorBody),
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
    body: SecretJsonBody,
) -> ApiResult<Json<ProviderStateBody>> {
    let actor = caller.in_account(&state, &account, Access::ManageKeys).await?;
    let provider = parse_provider(&provider)?;
    actor.may_manage_keys("saving a key")?;
    actor.may_own_keys()?;
    let body: SaveKeyRequest = body.parse()?;
    let saved = state
        .engine
        .save_key(&actor, provider, body.api_key.expose_secret())
        .await?;
    drop(body);
    Ok(Json(state_body(&state, &saved.state)))
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
        (status = 403, description = "Role does not allow it (or the plan, for own); a service token (never allowed to manage keys)", body = ErrorBody),
        (status = 409, description = "No key saved", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, provider)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let actor = caller.in_account(&state, &account, Access::ManageKeys).await?;
    let provider = parse_provider(&provider)?;
    state.engine.remove_key(&actor, provider).await?;
    Ok(StatusCode::NO_CONTENT)
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
        (status = 403, description = "Role does not allow it (or the plan, for own); a service token (never allowed to manage keys)", body = ErrorBody),
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
    let actor = caller.in_account(&state, &account, Access::ManageKeys).await?;
    let provider = parse_provider(&provider)?;
    actor.may_manage_keys("switching the key source")?;
    // `source` is read as a string and matched, so `true`/`1`/`null` get a clear 422.
    let body: SourceRequest = body.parse()?;
    let source = parse_source(&body.source)?;
    let after = state.engine.switch_source(&actor, provider, source).await?;
    Ok(Json(state_body(&state, &after)))
}
