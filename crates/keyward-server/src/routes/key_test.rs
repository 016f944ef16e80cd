//! `POST /v1/accounts/{id}/model-keys/{provider}/test`: "Test key" ([`crate::engine::probe`]).
//! Always 200 once membership, role and a saved key hold: the result says how it went.

use axum::extract::{Path, State};
use axum::Json;

use crate::api::{ErrorBody, KeyTestBody};
use crate::auth::Caller;
use crate::engine::actor::Access;
use crate::engine::keys::parse_provider;
use crate::error::ApiResult;
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/v1/accounts/{account_id}/model-keys/{provider}/test",
    tag = "model keys",
    params(("account_id" = String, Path), ("provider" = String, Path, description = "anthropic, openai or google")),
    responses(
        (status = 200, description = "The probe's result: ok with the rate-limit headroom, or the diagnosis and the provider's message", body = KeyTestBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Role does not allow it; a service token (never allowed to manage keys)", body = ErrorBody),
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
    let actor = caller.in_account(&state, &account, Access::ManageKeys).await?;
    let provider = parse_provider(&provider)?;
    let result = state.engine.test_key(&actor, provider).await?;
    Ok(Json(result.to_body()))
}
