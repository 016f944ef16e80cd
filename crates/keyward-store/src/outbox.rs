//! The webhook outbox: which changes become events for the product's webhook endpoints, and
//! what those events say.
//!
//! Events are written by the store itself, in the transaction of the change that causes
//! them (a transactional outbox), so an event exists exactly when its change committed:
//! - an audit event becomes a webhook event where one applies ([`trigger`]): every key
//!   change, a failed Test key, a plan change; its `webhook-id` is derived from the audit
//!   event's MAC, so it is unique and stable;
//! - own-key `ai.request` events feed each saved key's failure streak ([`walk_streak`]):
//!   `key.failing` once when it reaches [`OutboxRules::key_failing_after`], `key.recovered`
//!   when a call works again after that;
//! - shared-pool settlements and refusals announce 80% and 100% of a month's credits once
//!   each ([`thresholds_crossed`]).
//!
//! Delivery (signing, posting, retrying) is the gateway's; the store only hands out due
//! events under a lease and records what happened ([`crate::Store::claim_webhooks`]).
//!
//! Must never: put any part of a key but last4, or any prompt or answer text, in a payload.

use keyward_core::{AccountId, UnixMillis};
use serde_json::{json, Map, Value};

use crate::audit::{AuditAction, NewAuditEvent};

/// What a store needs to know to write webhook events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxRules {
    /// Whether to write events at all: off when no endpoint is configured, so nothing piles
    /// up for endpoints that do not exist.
    pub enabled: bool,
    /// Own-key calls failing in a row with a key diagnosis before `key.failing` is sent.
    pub key_failing_after: u32,
}

impl Default for OutboxRules {
    fn default() -> Self {
        OutboxRules {
            enabled: true,
            key_failing_after: DEFAULT_KEY_FAILING_AFTER,
        }
    }
}

pub const DEFAULT_KEY_FAILING_AFTER: u32 = 3;

/// The provider diagnoses that say the key itself is the problem (not the provider, not the
/// request): these, and only these, count towards a key's failure streak.
pub const KEY_DIAGNOSES: [&str; 4] = ["invalid_key", "no_credit", "missing_permission", "key_reported_leaked"];

/// A webhook event type (API.md "Webhooks").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    KeySaved,
    KeyRotated,
    KeyRemoved,
    KeySourceChanged,
    KeyTestFailed,
    KeyFailing,
    KeyRecovered,
    SharedQuotaThreshold,
    AccountPlanChanged,
}

impl WebhookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::KeySaved => "key.saved",
            WebhookKind::KeyRotated => "key.rotated",
            WebhookKind::KeyRemoved => "key.removed",
            WebhookKind::KeySourceChanged => "key.source_changed",
            WebhookKind::KeyTestFailed => "key.test_failed",
            WebhookKind::KeyFailing => "key.failing",
            WebhookKind::KeyRecovered => "key.recovered",
            WebhookKind::SharedQuotaThreshold => "shared.quota_threshold",
            WebhookKind::AccountPlanChanged => "account.plan_changed",
        }
    }
}

/// One outbox row, as the delivery task and `keyward webhooks list` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// The row id: the order events are delivered in, per account.
    pub id: i64,
    /// The Standard Webhooks `webhook-id` (`msg_…`), the same on every attempt.
    pub event_id: String,
    pub account_id: String,
    pub kind: String,
    /// The JSON body, exactly as signed and sent.
    pub payload: String,
    pub created_at: UnixMillis,
    pub attempts: i64,
    pub next_attempt_at: UnixMillis,
    /// Indices of the endpoints that accepted it so far.
    pub delivered_to: Vec<usize>,
    pub delivered_at: Option<UnixMillis>,
    pub dead_at: Option<UnixMillis>,
    pub last_error: Option<String>,
}

/// Which events `keyward webhooks list` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFilter {
    All,
    /// Not delivered yet (retrying or dead).
    Undelivered,
    /// Not delivered after at least one failed attempt (retrying or dead): what
    /// `keyward webhooks list --failed` shows.
    Failed,
    /// Given up on after the retry period: what `replay` is for.
    Dead,
}

/// What one delivery attempt of a claimed event came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Every endpoint has accepted it.
    Delivered,
    /// Some endpoint has not: try again at `next_attempt_at`.
    Retry { next_attempt_at: UnixMillis, error: String },
    /// Retries are over: keep it for `webhooks list --failed` and `replay`.
    Dead { error: String },
}

/// The outbox's backlog, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxBacklog {
    /// Events not delivered and not dead.
    pub pending: i64,
    /// When the oldest pending event was written.
    pub oldest_pending_at: Option<UnixMillis>,
}

/// An attempt's outcome as the outbox columns it sets: (delivered_at, next_attempt_at,
/// dead_at, last_error).
pub(crate) fn attempt_columns(
    outcome: &AttemptOutcome,
    now: UnixMillis,
) -> (Option<i64>, Option<i64>, Option<i64>, Option<String>) {
    match outcome {
        AttemptOutcome::Delivered => (Some(now.as_i64()), None, None, None),
        AttemptOutcome::Retry { next_attempt_at, error } => {
            (None, Some(next_attempt_at.as_i64()), None, Some(error.clone()))
        }
        AttemptOutcome::Dead { error } => (None, None, Some(now.as_i64()), Some(error.clone())),
    }
}

/// The `delivered_to` column's form: comma-separated endpoint indices.
pub(crate) fn endpoints_to_column(done: &[usize]) -> String {
    done.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

pub(crate) fn endpoints_from_column(s: &str) -> Vec<usize> {
    s.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// What an appended audit event means for the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trigger {
    None,
    /// A webhook event of this kind, now.
    Event(WebhookKind),
    /// An own-key call: how it bears on the key's failure streak.
    KeyCall(CallHealth),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallHealth {
    /// Failed with a key diagnosis.
    Failed(String),
    Worked,
    /// Failed for a reason that says nothing about the key (the provider was down, the
    /// request was bad): the streak stays as it is.
    Neutral,
}

/// The diagnosis in an outcome (`error:invalid_key` or `refused:key_reported_leaked` →
/// `invalid_key`, `key_reported_leaked`).
fn diagnosis(outcome: keyward_core::Outcome) -> Option<&'static str> {
    match outcome {
        keyward_core::Outcome::Ok => None,
        keyward_core::Outcome::Error(why) => Some(why),
        keyward_core::Outcome::Refused(code) => Some(code.as_str()),
    }
}

pub(crate) fn trigger(rules: &OutboxRules, e: &NewAuditEvent) -> Trigger {
    if !rules.enabled {
        return Trigger::None;
    }
    match e.action {
        AuditAction::KeySaved => Trigger::Event(WebhookKind::KeySaved),
        AuditAction::KeyRotated => Trigger::Event(WebhookKind::KeyRotated),
        AuditAction::KeyRemoved => Trigger::Event(WebhookKind::KeyRemoved),
        AuditAction::KeySourceChanged => Trigger::Event(WebhookKind::KeySourceChanged),
        AuditAction::KeyTested if !e.outcome.is_ok() => Trigger::Event(WebhookKind::KeyTestFailed),
        AuditAction::PlanChanged => Trigger::Event(WebhookKind::AccountPlanChanged),
        AuditAction::AiRequest if e.key_source == Some(keyward_core::KeySource::Own) => {
            Trigger::KeyCall(match diagnosis(e.outcome) {
                None => CallHealth::Worked,
                Some(d) if KEY_DIAGNOSES.contains(&d) => CallHealth::Failed(d.to_owned()),
                Some(_) => CallHealth::Neutral,
            })
        }
        _ => Trigger::None,
    }
}

/// Walks a key's failure streak through calls in the order they were audited. Returns the
/// new streak and, per call index, the event it causes: `key.failing` (with the diagnosis)
/// when the streak reaches `after`, `key.recovered` when a call works after that.
pub(crate) fn walk_streak<'a>(
    start: i64,
    after: u32,
    calls: impl IntoIterator<Item = &'a CallHealth>,
) -> (i64, Vec<(usize, WebhookKind, Option<String>)>) {
    let after = i64::from(after.max(1));
    let mut streak = start;
    let mut events = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        match call {
            CallHealth::Failed(d) => {
                streak = streak.saturating_add(1);
                if streak == after {
                    events.push((i, WebhookKind::KeyFailing, Some(d.clone())));
                }
            }
            CallHealth::Worked => {
                if streak >= after {
                    events.push((i, WebhookKind::KeyRecovered, None));
                }
                streak = 0;
            }
            CallHealth::Neutral => {}
        }
    }
    (streak, events)
}

/// The shared-credit thresholds (80, 100) a period has reached and not yet announced.
/// 100 is reached when the credits used reach the limit, or when, past 80%, `refused_amount`
/// (a reservation the cap refused) could not be paid even with no call in flight: the pool
/// is then spent for such calls, although the used credits may stop short of the limit.
pub(crate) fn thresholds_crossed(
    used: i64,
    limit: Option<i64>,
    announced: i64,
    refused_amount: Option<i64>,
) -> Vec<i64> {
    let Some(limit) = limit.filter(|l| *l > 0) else {
        return Vec::new();
    };
    let mut reached = 0;
    if used.saturating_mul(100) >= limit.saturating_mul(80) {
        reached = 80;
    }
    if used >= limit || (reached == 80 && refused_amount.is_some_and(|a| used.saturating_add(a) > limit)) {
        reached = 100;
    }
    [80, 100]
        .into_iter()
        .filter(|p| *p > announced && *p <= reached)
        .collect()
}

/// The `webhook-id` of the event an audit event causes: from its MAC, which is unique.
pub(crate) fn event_id_for_audit(mac: &[u8]) -> String {
    let n = mac.len().min(16);
    format!("msg_{}", hex::encode(&mac[..n]))
}

/// The `webhook-id` of a threshold event: one per (account, period, percent), so a replayed
/// settlement cannot announce it twice.
pub(crate) fn event_id_for_threshold(account: &str, period: &str, percent: i64) -> String {
    format!("msg_quota_{}_{}_{percent}", account.trim_start_matches("acc_"), period)
}

/// The body of an event caused by an audit event: API.md `{"type", "timestamp", "data"}`.
/// `data` holds the account (keyward and external id), provider, key source and last4 where
/// they apply, the diagnosis, and for a plan change the plan now in force. Never any other
/// part of a key, and never text from a call.
pub(crate) fn body_for_audit(
    kind: WebhookKind,
    e: &NewAuditEvent,
    external_id: Option<&str>,
    plan: Option<&str>,
    diagnosis_override: Option<&str>,
) -> String {
    let mut data = Map::new();
    account_fields(&mut data, &e.account_id, external_id);
    if let Some(p) = e.provider {
        data.insert("provider".into(), json!(p.as_str()));
    }
    if let Some(l) = &e.key_last4 {
        data.insert("key_last4".into(), json!(l.as_str()));
    }
    if kind == WebhookKind::KeySourceChanged {
        if let Some(s) = e.key_source {
            data.insert("key_source".into(), json!(s.as_str()));
        }
    }
    let diag = diagnosis_override.or_else(|| diagnosis(e.outcome));
    if matches!(kind, WebhookKind::KeyTestFailed | WebhookKind::KeyFailing) {
        if let Some(d) = diag {
            data.insert("diagnosis".into(), json!(d));
        }
    }
    if kind == WebhookKind::AccountPlanChanged {
        if let Some(p) = plan {
            data.insert("plan".into(), json!(p));
        }
        if let Some(d) = &e.detail {
            data.insert("detail".into(), json!(d));
        }
    }
    data.insert("actor".into(), json!(e.actor));
    envelope(kind, e.at, data)
}

pub(crate) fn body_for_threshold(
    account: &str,
    external_id: Option<&str>,
    period: &str,
    percent: i64,
    used: i64,
    limit: i64,
    at: UnixMillis,
) -> String {
    let mut data = Map::new();
    data.insert("account_id".into(), json!(account));
    if let Some(x) = external_id {
        data.insert("external_account_id".into(), json!(x));
    }
    data.insert("percent".into(), json!(percent));
    data.insert("period".into(), json!(period));
    data.insert("credits_used".into(), json!(used));
    data.insert("credit_limit".into(), json!(limit));
    envelope(WebhookKind::SharedQuotaThreshold, at, data)
}

fn account_fields(data: &mut Map<String, Value>, account: &AccountId, external_id: Option<&str>) {
    data.insert("account_id".into(), json!(account.as_str()));
    if let Some(x) = external_id {
        data.insert("external_account_id".into(), json!(x));
    }
}

fn envelope(kind: WebhookKind, at: UnixMillis, data: Map<String, Value>) -> String {
    json!({"type": kind.as_str(), "timestamp": at.rfc3339(), "data": data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> CallHealth {
        CallHealth::Failed("invalid_key".into())
    }

    #[test]
    fn a_streak_sends_failing_once_and_recovered_once() {
        let calls = [
            fail(),
            fail(),
            CallHealth::Neutral,
            fail(),
            fail(),
            fail(),
            CallHealth::Worked,
            CallHealth::Worked,
        ];
        let (streak, events) = walk_streak(0, 3, &calls);
        assert_eq!(streak, 0);
        assert_eq!(
            events,
            vec![
                (3, WebhookKind::KeyFailing, Some("invalid_key".into())),
                (6, WebhookKind::KeyRecovered, None)
            ]
        );
    }

    #[test]
    fn a_streak_carries_over_batches_and_short_streaks_recover_silently() {
        let (s, e) = walk_streak(2, 3, &[fail()]);
        assert_eq!((s, e.len()), (3, 1));
        let (s, e) = walk_streak(3, 3, &[fail(), fail()]);
        assert_eq!((s, e.len()), (5, 0), "one event per streak");
        let (s, e) = walk_streak(2, 3, &[CallHealth::Worked]);
        assert_eq!((s, e.len()), (0, 0), "no recovery without a failing event");
    }

    #[test]
    fn thresholds_are_announced_once_each() {
        assert_eq!(thresholds_crossed(79, Some(100), 0, None), Vec::<i64>::new());
        assert_eq!(thresholds_crossed(80, Some(100), 0, None), vec![80]);
        assert_eq!(thresholds_crossed(85, Some(100), 80, None), Vec::<i64>::new());
        assert_eq!(thresholds_crossed(100, Some(100), 0, None), vec![80, 100]);
        assert_eq!(
            thresholds_crossed(97, Some(100), 80, Some(5)),
            vec![100],
            "spent for a 5-credit call"
        );
        assert_eq!(
            thresholds_crossed(10, Some(100), 0, Some(95)),
            Vec::<i64>::new(),
            "a big call alone is not 100%"
        );
        assert_eq!(thresholds_crossed(10, None, 0, None), Vec::<i64>::new());
    }
}
