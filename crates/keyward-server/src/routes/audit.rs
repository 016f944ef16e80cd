//! `GET /v1/accounts/{id}/audit`: the account's audit events, newest first.

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::UnixMillis;
use keyward_store::AuditEvent;
use serde::Deserialize;
use serde_json::Value;

use crate::api::{AuditEventBody, AuditListBody, ErrorBody};
use crate::app::AppState;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// 1 to 500 (default 50).
    limit: Option<u32>,
    /// Only events older than this event id.
    before: Option<i64>,
}

/// The public shape of an event (API.md `AuditEvent`).
pub fn event_body(e: &AuditEvent) -> AuditEventBody {
    AuditEventBody {
        id: e.id,
        at: rfc3339(UnixMillis(e.at)),
        actor: e.actor.clone(),
        action: e.action.clone(),
        provider: e.provider.clone(),
        key_source: e.key_source.clone(),
        key_last4: e.key_last4.clone(),
        model: e.model.clone(),
        outcome: e.outcome.clone(),
        detail: e.detail.clone(),
        provider_request_id: e.provider_request_id.clone(),
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        feature: e.feature.clone(),
    }
}

pub fn event_json(e: &AuditEvent) -> Value {
    serde_json::to_value(event_body(e)).unwrap_or(Value::Null)
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/audit",
    tag = "usage and audit",
    params(("account_id" = String, Path), AuditQuery),
    responses(
        (status = 200, description = "Events, newest first", body = AuditListBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account", body = ErrorBody),
        (status = 422, description = "Bad query", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditListBody>> {
    let m = caller.member_of(&state, &account).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::validation(format!("limit must be from 1 to {MAX_LIMIT}")));
    }
    let events = state.store.audit_page(&m.account.id, limit, q.before).await?;
    Ok(Json(AuditListBody {
        events: events.iter().map(event_body).collect(),
    }))
}
