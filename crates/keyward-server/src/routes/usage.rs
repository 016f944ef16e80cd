//! `GET /v1/accounts/{id}/usage`: this calendar month's shared-pool credits and the
//! requests and tokens per provider and key source.

use axum::extract::{Path, State};
use axum::Json;
use keyward_core::{KeySource, Provider};
use keyward_store::{Membership, UsageReport};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::ai::period_of;
use crate::api::{Counts, ErrorBody, SharedCredits, SourceCounts, UsageBody};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/usage",
    tag = "usage and audit",
    params(("account_id" = String, Path)),
    responses(
        (status = 200, description = "This calendar month (UTC)", body = UsageBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "Not a member of this account", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<UsageBody>> {
    let m = caller.member_of(&state, &account).await?;
    let u = month_usage(&state, &m).await?;
    Ok(Json(u.to_body(&m)))
}

/// An account's usage in the current calendar month (UTC).
#[derive(Debug, Clone)]
pub struct MonthUsage {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    pub credit_limit: i64,
    pub report: UsageReport,
}

impl MonthUsage {
    pub fn credits_used(&self) -> i64 {
        self.report.credits_used
    }

    pub fn credits_remaining(&self) -> i64 {
        (self.credit_limit - self.report.credits_used).max(0)
    }

    /// (requests, input tokens, output tokens) of one provider and source.
    pub fn of(&self, provider: Provider, source: KeySource) -> (i64, i64, i64) {
        let row = self
            .report
            .by_provider
            .iter()
            .find(|u| u.provider == provider && u.source == source);
        (
            row.map_or(0, |r| r.requests),
            row.map_or(0, |r| r.input_tokens),
            row.map_or(0, |r| r.output_tokens),
        )
    }

    /// The JSON API's answer.
    pub fn to_body(&self, m: &Membership) -> UsageBody {
        let counts = |p, s| {
            let (requests, input_tokens, output_tokens) = self.of(p, s);
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
            plan: m.account.plan.as_str().to_owned(),
            period_start: self.start.format(&Rfc3339).unwrap_or_default(),
            period_end: self.end.format(&Rfc3339).unwrap_or_default(),
            shared: SharedCredits {
                credit_limit: self.credit_limit,
                credits_used: self.credits_used(),
                credits_remaining: self.credits_remaining(),
            },
            by_provider,
        }
    }
}

/// This month's usage of `m`'s account, read from the store. The caller has checked
/// membership. Used by the JSON API and the settings page alike.
pub async fn month_usage(state: &AppState, m: &Membership) -> ApiResult<MonthUsage> {
    let (period, start, end) = period_of(state.clock.now());
    let report = state.store.usage(&m.account.id, &period).await?;
    Ok(MonthUsage {
        start,
        end,
        credit_limit: m.account.shared_credit_limit,
        report,
    })
}
