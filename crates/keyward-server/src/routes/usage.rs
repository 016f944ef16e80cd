//! `GET /v1/accounts/{id}/usage`: this calendar month's shared-pool credits and the
//! requests and tokens per provider and key source ([`crate::engine::usage`]).

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::{KeySource, Provider};

use crate::api::{Counts, ErrorBody, SharedCredits, SourceCounts, UsageBody};
use crate::auth::Caller;
use crate::engine::actor::Access;
use crate::engine::usage::MonthUsage;
use crate::engine::Actor;
use crate::error::ApiResult;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/usage",
    tag = "usage and audit",
    params(("account_id" = String, Path)),
    responses(
        (status = 200, description = "This calendar month (UTC)", body = UsageBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "A service token (no scope covers this route)", body = ErrorBody),
        (status = 404, description = "Not a member of this account", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<UsageBody>> {
    let actor = caller.in_account(&state, &account, Access::ReadAccount).await?;
    let u = state.engine.month_usage(&actor).await?;
    Ok(Json(usage_body(&u, &actor)))
}

/// The JSON API's answer.
pub fn usage_body(u: &MonthUsage, actor: &Actor) -> UsageBody {
    let counts = |p, s| {
        let (requests, input_tokens, output_tokens) = u.of(p, s);
        Counts {
            requests,
            input_tokens,
            output_tokens,
        }
    };
    let by_provider = Provider::ALL
        .iter()
        .map(|&p| {
            let sources = SourceCounts {
                own: counts(p, KeySource::Own),
                shared: counts(p, KeySource::Shared),
            };
            (p.as_str().to_owned(), sources)
        })
        .collect();
    UsageBody {
        plan: actor.account().plan.as_str().to_owned(),
        period_start: u.month.start.rfc3339(),
        period_end: u.month.end.rfc3339(),
        shared: SharedCredits {
            credit_limit: u.credit_limit,
            credits_used: u.credits_used(),
            credits_remaining: u.credits_remaining(),
        },
        by_provider,
    }
}
