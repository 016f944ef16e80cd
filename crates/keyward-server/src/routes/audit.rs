//! `GET /v1/accounts/{id}/audit`: the account's audit events, newest first
//! ([`crate::engine::audit`]).

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;

use crate::api::{AuditListBody, ErrorBody};
use crate::auth::Caller;
use crate::engine::actor::Access;
use crate::engine::audit::event_body;
use crate::error::ApiResult;
use crate::extract::ApiQuery;
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// 1 to 500 (default 50).
    limit: Option<u32>,
    /// Only events older than this event id.
    before: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/audit",
    tag = "usage and audit",
    params(("account_id" = String, Path), AuditQuery),
    responses(
        (status = 200, description = "Events, newest first", body = AuditListBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "A service token without the audit:read scope", body = ErrorBody),
        (status = 404, description = "Not a member of this account; no such account (a service)", body = ErrorBody),
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
    let actor = caller.in_account(&state, &account, Access::ReadAudit).await?;
    let events = state.engine.audit_page(&actor, q.limit, q.before).await?;
    Ok(Json(AuditListBody {
        events: events.iter().map(event_body).collect(),
    }))
}
