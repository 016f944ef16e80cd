//! The account's audit log, as the API and the CLI's export show it.

use keyward_core::UnixMillis;
use keyward_store::AuditEvent;
use serde_json::Value;

use super::{Actor, Engine};
use crate::api::AuditEventBody;
use crate::error::{ApiError, ApiResult};

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;

/// The public shape of an event (API.md `AuditEvent`).
pub fn event_body(e: &AuditEvent) -> AuditEventBody {
    AuditEventBody {
        id: e.id,
        at: UnixMillis(e.at).rfc3339(),
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
        on_behalf_of: e.on_behalf_of.clone(),
    }
}

/// [`event_body`] as JSON.
pub fn event_json(e: &AuditEvent) -> Value {
    serde_json::to_value(event_body(e)).unwrap_or(Value::Null)
}

impl Engine {
    /// Up to `limit` (1 to [`MAX_PAGE`], default [`DEFAULT_PAGE`]) of the account's events
    /// older than event `before`, newest first. Any member.
    pub async fn audit_page(
        &self,
        actor: &Actor,
        limit: Option<u32>,
        before: Option<i64>,
    ) -> ApiResult<Vec<AuditEvent>> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(ApiError::validation(format!("limit must be from 1 to {MAX_PAGE}")));
        }
        Ok(self.store.audit_page(actor.account_id(), limit, before).await?)
    }
}
