//! The month's shared-pool credits, and requests and tokens per provider and key source.

use keyward_core::{CalendarMonth, KeySource, Provider};
use keyward_store::UsageReport;

use super::{Actor, Engine};
use crate::error::ApiResult;

/// An account's usage in the current calendar month (UTC).
#[derive(Debug, Clone)]
pub struct MonthUsage {
    pub month: CalendarMonth,
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
}

impl Engine {
    /// This month's usage of the actor's account. Any member.
    pub async fn month_usage(&self, actor: &Actor) -> ApiResult<MonthUsage> {
        let month = self.clock.now().month();
        let report = self.store.usage(actor.account_id(), &month.label).await?;
        Ok(MonthUsage {
            month,
            credit_limit: actor.account().shared_credit_limit,
            report,
        })
    }
}
