//! What a person reads of an account's audit log: the activity page and its CSV
//! (`web::activity`), whether the chain verifies, and a key's health on its card.
//!
//! Filtering and paging happen in the database ([`keyward_store::Store::audit_search`]); the
//! chain is checked with the same function as `keyward audit verify`
//! ([`keyward_store::audit::verify_chain`]).

use std::collections::{BTreeSet, HashMap};

use keyward_core::{KeySource, Last4, Provider, UnixMillis, UserId};
use keyward_store::audit::verify_chain;
use keyward_store::{AuditEvent, AuditFilter, KeyCallHealth, ProviderState};

use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};

/// Events on one page of the activity page.
pub const PAGE_SIZE: u32 = 50;
/// The window of a key's recent failures.
pub const HEALTH_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// The activity page's filters as given (`?provider=&source=&last4=&month=YYYY-MM&page=`);
/// empty values mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityQuery {
    pub provider: Option<Provider>,
    pub source: Option<KeySource>,
    pub last4: Option<String>,
    /// `YYYY-MM`, UTC.
    pub month: Option<String>,
    /// 1-based.
    pub page: u32,
}

impl ActivityQuery {
    /// Checks raw filter values: a known provider and source, last4 as keyward shows it (up
    /// to 4 characters of a key), a real month, a page from 1. `validation_error` otherwise.
    pub fn parse(
        provider: Option<&str>,
        source: Option<&str>,
        last4: Option<&str>,
        month: Option<&str>,
        page: Option<&str>,
    ) -> ApiResult<ActivityQuery> {
        fn given(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let provider = given(provider)
            .map(|p| {
                p.parse::<Provider>()
                    .map_err(|_| ApiError::validation("provider must be anthropic, openai or google"))
            })
            .transpose()?;
        let source = given(source)
            .map(|s| {
                s.parse::<KeySource>()
                    .map_err(|_| ApiError::validation("source must be \"own\" or \"shared\""))
            })
            .transpose()?;
        let last4 = given(last4)
            .map(|l| {
                let l = l.trim_start_matches('•');
                Last4::from_stored(l)
                    .map(|l| l.as_str().to_owned())
                    .ok_or_else(|| ApiError::validation("last4 must be the last four characters of a key"))
            })
            .transpose()?;
        let month = given(month).map(|m| month_range(m).map(|_| m.to_owned())).transpose()?;
        let page = match given(page) {
            None => 1,
            Some(p) => p
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=1_000_000).contains(p))
                .ok_or_else(|| ApiError::validation("page must be a number from 1"))?,
        };
        Ok(ActivityQuery {
            provider,
            source,
            last4,
            month,
            page,
        })
    }

    /// The store's filter for these values.
    pub fn filter(&self) -> AuditFilter {
        let range = self.month.as_deref().and_then(|m| month_range(m).ok());
        AuditFilter {
            provider: self.provider,
            key_source: self.source,
            last4: self.last4.clone(),
            from: range.map(|(from, _)| from),
            until: range.map(|(_, until)| until),
        }
    }

    /// Any filter set.
    pub fn filtered(&self) -> bool {
        self.provider.is_some() || self.source.is_some() || self.last4.is_some() || self.month.is_some()
    }
}

/// `YYYY-MM` → its first instant and the next month's (UTC).
pub fn month_range(label: &str) -> ApiResult<(UnixMillis, UnixMillis)> {
    let bad = || ApiError::validation("month must be YYYY-MM");
    let (y, m) = label.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u8 = m.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(month).map_err(|_| bad())?;
    let first = time::Date::from_calendar_date(year, month, 1).map_err(|_| bad())?;
    let start = UnixMillis::from_datetime(first.midnight().assume_utc());
    let range = start.month();
    Ok((range.start, range.end))
}

/// One page of events, newest first.
#[derive(Debug, Clone)]
pub struct ActivityPage {
    pub events: Vec<AuditEvent>,
    /// There is a page after this one.
    pub more: bool,
    /// E-mail addresses of the users the events name (as actor or acting user), by id.
    pub people: HashMap<String, String>,
}

/// Whether the account's audit chain verifies, checked when the page is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainStatus {
    /// Every event from the first verifies, and the head matches.
    Intact { events: usize },
    /// Where it breaks, in words.
    Broken { seq: i64, reason: String },
    /// The check itself could not run (the chain key or the database).
    Unknown { why: String },
}

impl Engine {
    /// A page of the account's events matching `q` ([`PAGE_SIZE`] each). Any member.
    pub async fn activity_page(&self, actor: &Actor, q: &ActivityQuery) -> ApiResult<ActivityPage> {
        let offset = u64::from(q.page.saturating_sub(1)) * u64::from(PAGE_SIZE);
        let mut events = self
            .store
            .audit_search(actor.account_id(), &q.filter(), Some(PAGE_SIZE + 1), offset)
            .await?;
        let more = events.len() > PAGE_SIZE as usize;
        events.truncate(PAGE_SIZE as usize);
        let people = self.people(&events).await?;
        Ok(ActivityPage { events, more, people })
    }

    /// Every event of the account matching `q` (the page number is ignored), newest first,
    /// with the people they name. Any member.
    pub async fn activity_export(
        &self,
        actor: &Actor,
        q: &ActivityQuery,
    ) -> ApiResult<(Vec<AuditEvent>, HashMap<String, String>)> {
        let events = self
            .store
            .audit_search(actor.account_id(), &q.filter(), None, 0)
            .await?;
        let people = self.people(&events).await?;
        Ok((events, people))
    }

    /// E-mail addresses of the users `events` name, by user id.
    async fn people(&self, events: &[AuditEvent]) -> ApiResult<HashMap<String, String>> {
        let ids: BTreeSet<UserId> = events
            .iter()
            .flat_map(|e| [Some(e.actor.as_str()), e.on_behalf_of.as_deref()])
            .flatten()
            .filter_map(|id| UserId::parse(id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<UserId> = ids.into_iter().collect();
        Ok(self
            .store
            .users_by_ids(&ids)
            .await?
            .into_iter()
            .map(|u| (u.id.to_string(), u.email.as_str().to_owned()))
            .collect())
    }

    /// Verifies the account's whole chain, as `keyward audit verify --account` does.
    pub async fn chain_status(&self, actor: &Actor) -> ChainStatus {
        let Some(key) = self.audit_key.as_deref() else {
            return ChainStatus::Unknown {
                why: "this node cannot read the audit-chain key".to_owned(),
            };
        };
        let account = actor.account_id();
        match self.store.audit_chain(account).await {
            Ok((events, head)) => match verify_chain(key, account.as_str(), &events, head.as_ref()) {
                Ok(n) => ChainStatus::Intact { events: n },
                Err(b) => ChainStatus::Broken {
                    seq: b.seq,
                    reason: b.reason,
                },
            },
            Err(e) => {
                tracing::warn!(error = %e, "audit chain not read for the activity page");
                ChainStatus::Unknown {
                    why: "the audit log could not be read".to_owned(),
                }
            }
        }
    }

    /// Each saved key's health from the audit log: its newest working call since it was
    /// saved, and its failed calls of the last 24 hours by diagnosis. Any member.
    pub async fn key_health(
        &self,
        actor: &Actor,
        states: &[ProviderState],
    ) -> ApiResult<Vec<(Provider, KeyCallHealth)>> {
        let now = self.clock.now();
        let window_start = UnixMillis(now.as_i64().saturating_sub(HEALTH_WINDOW_MS));
        let mut out = Vec::new();
        for s in states {
            if let Some(k) = &s.key {
                let h = self
                    .store
                    .key_call_health(actor.account_id(), s.provider, k.updated_at, window_start)
                    .await?;
                out.push((s.provider, h));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        let q = ActivityQuery::parse(
            Some("openai"),
            Some("own"),
            Some("••••ab_-"),
            Some("2026-02"),
            Some("3"),
        )
        .unwrap();
        assert_eq!(q.provider, Some(Provider::OpenAi));
        assert_eq!(q.source, Some(KeySource::Own));
        assert_eq!(q.last4.as_deref(), Some("ab_-"));
        assert_eq!(q.page, 3);
        let f = q.filter();
        assert_eq!(f.from.map(|t| t.rfc3339()).as_deref(), Some("2026-02-01T00:00:00Z"));
        assert_eq!(f.until.map(|t| t.rfc3339()).as_deref(), Some("2026-03-01T00:00:00Z"));
        let dec = month_range("2025-12").unwrap();
        assert_eq!(dec.1.rfc3339(), "2026-01-01T00:00:00Z");
        let none = ActivityQuery::parse(Some(""), None, Some(" "), Some(""), None).unwrap();
        assert_eq!(
            none,
            ActivityQuery {
                page: 1,
                ..Default::default()
            }
        );
        assert!(!none.filtered());
        for (p, s, l, m, pg) in [
            (Some("azure"), None, None, None, None),
            (None, Some("mine"), None, None, None),
            (None, None, Some("abcde"), None, None),
            (None, None, Some("a\"<>"), None, None),
            (None, None, None, Some("2026-13"), None),
            (None, None, None, Some("2026-1"), None),
            (None, None, None, Some("26-01"), None),
            (None, None, None, None, Some("0")),
            (None, None, None, None, Some("x")),
        ] {
            assert!(
                ActivityQuery::parse(p, s, l, m, pg).is_err(),
                "{p:?} {s:?} {l:?} {m:?} {pg:?}"
            );
        }
    }
}
