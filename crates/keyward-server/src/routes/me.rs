//! `GET /v1/me`: who the token belongs to and where they are a member.

use axum::extract::State;
use axum::Json;

use crate::api::{AccountSummary, ErrorBody, MeBody};
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "me",
    responses(
        (status = 200, description = "The caller and their accounts", body = MeBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "A service token (no scope covers this route)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn me(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<MeBody>> {
    let user = caller.user()?;
    let memberships = state.engine.memberships(user).await?;
    let accounts = memberships
        .iter()
        .map(|m| AccountSummary {
            account_id: m.account.id.to_string(),
            name: m.account.name.clone(),
            plan: m.account.plan.as_str().to_owned(),
            role: m.role.as_str().to_owned(),
        })
        .collect();
    Ok(Json(MeBody {
        user_id: user.id.to_string(),
        email: user.email.to_string(),
        accounts,
    }))
}
