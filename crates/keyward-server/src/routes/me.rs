//! `GET /v1/me`: who the token belongs to and where they are a member.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

pub async fn me(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let memberships = state.store.memberships_of(&caller.user.id).await?;
    let accounts: Vec<Value> = memberships
        .iter()
        .map(|m| json!({ "account_id": m.account.id, "name": m.account.name, "plan": m.account.plan, "role": m.role }))
        .collect();
    Ok(Json(
        json!({ "user_id": caller.user.id, "email": caller.user.email, "accounts": accounts }),
    ))
}
