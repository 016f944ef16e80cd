//! `GET /v1/accounts/{id}/audit`: the account's audit events, newest first.

use axum::extract::{Path, State};
use axum::Json;
use keyward_store::AuditEvent;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use keyward_core::UnixMillis;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

/// The public shape of an event (API.md `AuditEvent`).
pub fn event_json(e: &AuditEvent) -> Value {
    json!({
        "id": e.id,
        "at": rfc3339(UnixMillis(e.at)),
        "actor": e.actor,
        "action": e.action,
        "provider": e.provider,
        "key_source": e.key_source,
        "key_last4": e.key_last4,
        "model": e.model,
        "outcome": e.outcome,
        "detail": e.detail,
        "provider_request_id": e.provider_request_id,
        "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens,
        "feature": e.feature,
    })
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let m = caller.member_of(&state, &account).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::validation(format!("limit must be from 1 to {MAX_LIMIT}")));
    }
    let events = state.store.audit_page(&m.account.id, limit, q.before).await?;
    Ok(Json(
        json!({ "events": events.iter().map(event_json).collect::<Vec<_>>() }),
    ))
}
