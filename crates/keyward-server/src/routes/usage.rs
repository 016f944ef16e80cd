//! `GET /v1/accounts/{id}/usage`: this calendar month's shared-pool credits and the
//! requests and tokens per provider and key source.

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::{KeySource, Provider};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;

use crate::ai::period_of;
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<Value>> {
    let m = caller.member_of(&state, &account).await?;
    let (period, start, end) = period_of(state.clock.now());
    let report = state.store.usage(&m.account.id, &period).await?;
    let limit = m.account.shared_credit_limit;
    let mut by_provider = Map::new();
    for p in Provider::ALL {
        let mut sources = Map::new();
        for s in [KeySource::Own, KeySource::Shared] {
            let row = report.by_provider.iter().find(|u| u.provider == p && u.source == s);
            sources.insert(
                s.as_str().to_owned(),
                json!({
                    "requests": row.map_or(0, |r| r.requests),
                    "input_tokens": row.map_or(0, |r| r.input_tokens),
                    "output_tokens": row.map_or(0, |r| r.output_tokens),
                }),
            );
        }
        by_provider.insert(p.as_str().to_owned(), Value::Object(sources));
    }
    Ok(Json(json!({
        "plan": m.account.plan,
        "period_start": start.format(&Rfc3339).unwrap_or_default(),
        "period_end": end.format(&Rfc3339).unwrap_or_default(),
        "shared": {
            "credit_limit": limit,
            "credits_used": report.credits_used,
            "credits_remaining": (limit - report.credits_used).max(0),
        },
        "by_provider": by_provider,
    })))
}
