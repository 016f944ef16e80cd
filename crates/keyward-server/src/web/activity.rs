//! `GET /settings/ai/model-keys/activity` and `GET /settings/ai/model-keys/activity.csv`:
//! the account's audit log as a person reads it, for every member, read-only.
//!
//! Filters `?provider=&source=&last4=&month=YYYY-MM&page=` (and `account=`), applied in the
//! database ([`crate::engine::activity`]); [`PAGE_SIZE`] events a page, newest first, with
//! links to the next and previous pages that keep the filters. The CSV has every matching
//! event (not one page), a header row first, times in UTC, the columns provider dashboards
//! export first (time, model, input and output tokens, request id), RFC 4180 quoting, and
//! no cell that a spreadsheet would run as a formula. Neither shows more of a key than its
//! last four characters: the audit log holds nothing more.

use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_core::{ErrorCode, KeySource, Provider, UnixMillis};
use keyward_store::{AuditEvent, Membership};
use serde::Deserialize;

use super::common::{html, not_found_page, see_other, session, ACTIVITY_CSV_PATH, ACTIVITY_PATH, SETTINGS_PATH};
use super::pages::{self, esc, group};
use super::settings::{error_page, sentence};
use crate::engine::activity::{ActivityPage, ActivityQuery, ChainStatus, PAGE_SIZE};
use crate::engine::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The query as sent; checked by [`ActivityQuery::parse`].
#[derive(Debug, Default, Deserialize)]
struct RawFilters {
    account: Option<String>,
    provider: Option<String>,
    source: Option<String>,
    last4: Option<String>,
    month: Option<String>,
    page: Option<String>,
}

impl RawFilters {
    fn read(raw: Option<&str>) -> RawFilters {
        serde_urlencoded::from_str(raw.unwrap_or_default()).unwrap_or_default()
    }

    fn parse(&self) -> ApiResult<ActivityQuery> {
        ActivityQuery::parse(
            self.provider.as_deref(),
            self.source.as_deref(),
            self.last4.as_deref(),
            self.month.as_deref(),
            self.page.as_deref(),
        )
    }
}

/// The account named by `?account=` (404 for a non-member), or the user's first.
async fn account_of(state: &AppState, user: &keyward_store::User, account: Option<&str>) -> Result<Actor, Response> {
    let engine = &state.engine;
    match account.filter(|a| !a.is_empty()) {
        Some(a) => engine.actor(user, a).await.map_err(|e| error_page(&e)),
        None => match engine.memberships(user).await {
            Ok(m) => match m.into_iter().next() {
                Some(membership) => Ok(Actor::member(user.clone(), membership)),
                None => Err(not_found_page()),
            },
            Err(e) => Err(error_page(&e)),
        },
    }
}

/// The query string of a link to this page (or the CSV) with `q`'s filters and `page`.
fn link(path: &str, account: &str, q: &ActivityQuery, page: Option<u32>) -> String {
    let mut pairs: Vec<(&str, String)> = vec![("account", account.to_owned())];
    if let Some(p) = q.provider {
        pairs.push(("provider", p.as_str().to_owned()));
    }
    if let Some(s) = q.source {
        pairs.push(("source", s.as_str().to_owned()));
    }
    if let Some(l) = &q.last4 {
        pairs.push(("last4", l.clone()));
    }
    if let Some(m) = &q.month {
        pairs.push(("month", m.clone()));
    }
    if let Some(p) = page {
        pairs.push(("page", p.to_string()));
    }
    let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    format!("{path}?{query}")
}

/// `GET /settings/ai/model-keys/activity`.
pub async fn page(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return see_other("/login"),
        Err(page) => return page,
    };
    let raw = RawFilters::read(raw.as_deref());
    let actor = match account_of(&state, &s.view.user, raw.account.as_deref()).await {
        Ok(a) => a,
        Err(page) => return page,
    };
    let engine = &state.engine;
    let (q, body) = match raw.parse() {
        Ok(q) => {
            let body = match engine.activity_page(&actor, &q).await {
                Ok(p) => Body::Events(p),
                Err(e) => Body::Failed(e),
            };
            (q, body)
        }
        Err(e) => (
            ActivityQuery {
                page: 1,
                ..ActivityQuery::default()
            },
            Body::BadFilter(e),
        ),
    };
    let Some(current) = actor.membership() else {
        return not_found_page();
    };
    let chain = engine.chain_status(&actor).await;
    let status = match &body {
        Body::Events(_) => StatusCode::OK,
        Body::BadFilter(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Body::Failed(e) => StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    html(
        status,
        activity_page(&View {
            email: s.view.user.email.as_str(),
            csrf: &s.view.csrf,
            current: &current,
            query: &q,
            body: &body,
            chain: &chain,
        }),
    )
}

/// `GET /settings/ai/model-keys/activity.csv`: every event matching the filters.
pub async fn csv(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return see_other("/login"),
        Err(page) => return page,
    };
    let raw = RawFilters::read(raw.as_deref());
    let actor = match account_of(&state, &s.view.user, raw.account.as_deref()).await {
        Ok(a) => a,
        Err(page) => return page,
    };
    let exported = match raw.parse() {
        Ok(q) => state.engine.activity_export(&actor, &q).await.map(|e| (q, e)),
        Err(e) => Err(e),
    };
    let (q, (events, people)) = match exported {
        Ok(found) => found,
        Err(e) if e.code == ErrorCode::ValidationError => {
            return html(
                StatusCode::UNPROCESSABLE_ENTITY,
                pages::message_page(
                    "These filters cannot be used",
                    &sentence(&e.message),
                    Some((ACTIVITY_PATH, "Back to the activity")),
                ),
            )
        }
        Err(e) => return error_page(&e),
    };
    let name = format!(
        "keyward-activity-{}-{}.csv",
        actor.account_id(),
        q.month.as_deref().unwrap_or("all")
    );
    let mut res = (StatusCode::OK, csv_body(&events, &people)).into_response();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    res
}

/// The CSV's columns, in order: what provider dashboards export first.
pub const CSV_COLUMNS: [&str; 16] = [
    "time_utc",
    "model",
    "input_tokens",
    "output_tokens",
    "request_id",
    "what",
    "action",
    "who",
    "actor",
    "on_behalf_of",
    "feature",
    "provider",
    "key_source",
    "key_last4",
    "outcome",
    "detail",
];

/// Every event as one CSV row under the header row (CRLF line ends).
pub fn csv_body(events: &[AuditEvent], people: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(64 + events.len() * 200);
    push_row(&mut out, CSV_COLUMNS.iter().map(|c| (*c).to_owned()));
    for e in events {
        let num = |n: Option<i64>| n.map_or_else(String::new, |n| n.to_string());
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        push_row(
            &mut out,
            [
                UnixMillis(e.at).rfc3339(),
                opt(&e.model),
                num(e.input_tokens),
                num(e.output_tokens),
                opt(&e.provider_request_id),
                what(e),
                e.action.clone(),
                who(e, people),
                e.actor.clone(),
                opt(&e.on_behalf_of),
                opt(&e.feature),
                opt(&e.provider),
                opt(&e.key_source),
                opt(&e.key_last4),
                e.outcome.clone(),
                opt(&e.detail),
            ],
        );
    }
    out
}

fn push_row(out: &mut String, cells: impl IntoIterator<Item = String>) {
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&csv_cell(&cell));
    }
    out.push_str("\r\n");
}

/// One cell: a leading `'` on text a spreadsheet would run as a formula (`= + - @`, and tab
/// or carriage return), then RFC 4180 quoting when it holds a comma, quote or line break.
pub fn csv_cell(v: &str) -> String {
    let guarded = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{v}")
    } else {
        v.to_owned()
    };
    if guarded.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

/// What happened, in words.
pub fn what(e: &AuditEvent) -> String {
    match e.action.as_str() {
        "key.saved" => "Key saved".to_owned(),
        "key.rotated" => "Key rotated (replaced)".to_owned(),
        "key.removed" => "Key removed".to_owned(),
        "key.source_changed" => match e.key_source.as_deref() {
            Some("own") => "Key source switched to My key".to_owned(),
            Some("shared") => "Key source switched to Aiemaily shared".to_owned(),
            _ => "Key source switched".to_owned(),
        },
        "key.tested" => "Key tested".to_owned(),
        "ai.request" => "AI call".to_owned(),
        "account.plan_changed" => "Plan changed".to_owned(),
        "account.deleted" => "Account deleted".to_owned(),
        other => other.to_owned(),
    }
}

/// Who did it: a user's e-mail address where known, `service:<name>` with the user it acted
/// for, the admin CLI.
pub fn who(e: &AuditEvent, people: &HashMap<String, String>) -> String {
    let person = |id: &str| people.get(id).cloned().unwrap_or_else(|| id.to_owned());
    let actor = match e.actor.as_str() {
        "cli" => "administrator (CLI)".to_owned(),
        a if a.starts_with("service:") => a.to_owned(),
        a => person(a),
    };
    match &e.on_behalf_of {
        Some(u) => format!("{actor} for {}", person(u)),
        None => actor,
    }
}

/// How it ended, in words.
fn outcome_words(outcome: &str) -> String {
    if outcome == "ok" {
        return "OK".to_owned();
    }
    match outcome.split_once(':') {
        Some(("error", d)) => format!("Failed: {}", pages::diagnosis_label(d)),
        Some(("refused", d)) => format!("Refused: {}", pages::diagnosis_label(d)),
        _ => outcome.to_owned(),
    }
}

enum Body {
    Events(ActivityPage),
    BadFilter(ApiError),
    Failed(ApiError),
}

struct View<'a> {
    email: &'a str,
    csrf: &'a str,
    current: &'a Membership,
    query: &'a ActivityQuery,
    body: &'a Body,
    chain: &'a ChainStatus,
}

fn provider_name(p: &str) -> &str {
    match p.parse::<Provider>() {
        Ok(known) => known.display_name(),
        Err(_) => p,
    }
}

fn source_name(s: &str) -> &str {
    match s.parse::<KeySource>() {
        Ok(KeySource::Own) => "My key",
        Ok(KeySource::Shared) => "Aiemaily shared",
        Err(_) => s,
    }
}

fn chain_html(chain: &ChainStatus) -> String {
    match chain {
        ChainStatus::Intact { events } => format!(
            r#"<div class="notice ok" role="status" id="chain-status" data-chain="intact"><strong>The audit log verifies.</strong> All {} event{} of this account, from the first, are intact and in order (checked now against the audit chain's key, as <code>keyward audit verify</code> does).</div>"#,
            group(i64::try_from(*events).unwrap_or(i64::MAX)),
            if *events == 1 { "" } else { "s" }
        ),
        ChainStatus::Broken { seq, reason } => format!(
            r#"<div class="notice danger" role="alert" id="chain-status" data-chain="broken"><strong>The audit log does not verify.</strong> It breaks at event {seq}: {}. The events below may have been altered; tell your administrator (<code>keyward audit verify</code> shows the same).</div>"#,
            esc(reason)
        ),
        ChainStatus::Unknown { why } => format!(
            r#"<div class="notice warn" role="note" id="chain-status" data-chain="unknown"><strong>The audit log was not checked.</strong> {}.</div>"#,
            esc(sentence(why).trim_end_matches('.'))
        ),
    }
}

fn filters_html(v: &View<'_>) -> String {
    let q = v.query;
    let option = |value: &str, label: &str, selected: bool| {
        format!(
            r#"<option value="{}"{}>{}</option>"#,
            esc(value),
            if selected { " selected" } else { "" },
            esc(label)
        )
    };
    let mut providers = option("", "All providers", q.provider.is_none());
    for p in Provider::ALL {
        providers.push_str(&option(p.as_str(), p.display_name(), q.provider == Some(p)));
    }
    let sources = [
        option("", "Both sources", q.source.is_none()),
        option("own", "My key", q.source == Some(KeySource::Own)),
        option("shared", "Aiemaily shared", q.source == Some(KeySource::Shared)),
    ]
    .concat();
    let account = v.current.account.id.as_str();
    format!(
        r#"<form class="card filters" method="get" action="{ACTIVITY_PATH}" aria-label="Filter the activity">
<input type="hidden" name="account" value="{account}">
<div class="filter"><label for="f-provider">Provider</label><select id="f-provider" name="provider">{providers}</select></div>
<div class="filter"><label for="f-source">Key source</label><select id="f-source" name="source">{sources}</select></div>
<div class="filter"><label for="f-last4">Key (last 4)</label><input id="f-last4" name="last4" value="{last4}" maxlength="8" size="6" autocomplete="off" spellcheck="false"></div>
<div class="filter"><label for="f-month">Month (UTC)</label><input id="f-month" name="month" type="month" value="{month}" placeholder="YYYY-MM"></div>
<div class="filter actions"><button type="submit" class="secondary">Filter</button> <a href="{clear}">Clear filters</a> <a class="button secondary" id="csv-link" href="{csv}" download>Download CSV</a></div>
</form>"#,
        account = esc(account),
        last4 = esc(q.last4.as_deref().unwrap_or_default()),
        month = esc(q.month.as_deref().unwrap_or_default()),
        clear = esc(&format!("{ACTIVITY_PATH}?account={account}")),
        csv = esc(&link(ACTIVITY_CSV_PATH, account, q, None)),
    )
}

fn cell(v: Option<&str>) -> String {
    match v {
        Some(v) if !v.is_empty() => esc(v),
        _ => r#"<span class="muted">—</span>"#.to_owned(),
    }
}

fn rows_html(page: &ActivityPage) -> String {
    let mut rows = String::new();
    for e in &page.events {
        let at = UnixMillis(e.at);
        let tokens = |n: Option<i64>| n.map_or_else(|| cell(None), group);
        let outcome_class = if e.outcome == "ok" { "good" } else { "bad" };
        rows.push_str(&format!(
            r#"<tr data-event="{id}"><td><time datetime="{iso}">{when}</time></td><td>{what}</td><td>{who}</td><td>{feature}</td><td>{provider}</td><td>{source}</td><td>{last4}</td><td>{model}</td><td class="num">{input}</td><td class="num">{output}</td><td><span class="{outcome_class}" title="{raw_outcome}">{outcome}</span></td><td><code>{request}</code></td></tr>"#,
            id = e.id,
            iso = at.rfc3339(),
            when = esc(&pages::when(at)),
            what = esc(&what(e)),
            who = esc(&who(e, &page.people)),
            feature = cell(e.feature.as_deref()),
            provider = cell(e.provider.as_deref().map(provider_name)),
            source = cell(e.key_source.as_deref().map(source_name)),
            last4 = match &e.key_last4 {
                Some(l) => format!(r#"<span class="masked">••••{}</span>"#, esc(l)),
                None => cell(None),
            },
            model = cell(e.model.as_deref()),
            input = tokens(e.input_tokens),
            output = tokens(e.output_tokens),
            raw_outcome = esc(&e.outcome),
            outcome = esc(&outcome_words(&e.outcome)),
            request = cell(e.provider_request_id.as_deref()),
        ));
    }
    format!(
        r#"<div class="table-wrap" tabindex="0" role="region" aria-labelledby="events-caption"><table class="events" id="events">
<caption id="events-caption">Events, newest first (times in UTC)</caption>
<thead><tr><th scope="col">Time (UTC)</th><th scope="col">What happened</th><th scope="col">Who</th><th scope="col">Feature</th><th scope="col">Provider</th><th scope="col">Key source</th><th scope="col">Key</th><th scope="col">Model</th><th scope="col">Input tokens</th><th scope="col">Output tokens</th><th scope="col">Outcome</th><th scope="col">Provider request id</th></tr></thead>
<tbody>{rows}</tbody></table></div>"#
    )
}

fn pager_html(v: &View<'_>, page: &ActivityPage) -> String {
    let q = v.query;
    let account = v.current.account.id.as_str();
    let prev = (q.page > 1).then(|| {
        format!(
            r#"<a rel="prev" id="page-prev" href="{}">← Newer events</a>"#,
            esc(&link(ACTIVITY_PATH, account, q, Some(q.page - 1)))
        )
    });
    let next = page.more.then(|| {
        format!(
            r#"<a rel="next" id="page-next" href="{}">Older events →</a>"#,
            esc(&link(ACTIVITY_PATH, account, q, Some(q.page.saturating_add(1))))
        )
    });
    if prev.is_none() && next.is_none() {
        return String::new();
    }
    format!(
        r#"<nav class="pager" aria-label="Pages"><span>Page {}</span> {} {}</nav>"#,
        q.page,
        prev.unwrap_or_default(),
        next.unwrap_or_default()
    )
}

/// The activity page.
fn activity_page(v: &View<'_>) -> String {
    let account = &v.current.account;
    let mut main = String::new();
    main.push_str(&format!(
        r#"<nav class="crumbs" aria-label="Breadcrumb"><ol><li>Settings</li><li>AI</li><li><a href="{SETTINGS_PATH}?account={id}">Model keys</a></li><li><span aria-current="page">Activity</span></li></ol></nav>
<div class="page-head"><div><h1>Activity</h1>
<p class="lede">Every key action and AI call of {name}, as its audit log records it: who did what, when (UTC), with which provider, key source and key (last four characters only), and the provider's request id, so you can match it with your provider's usage dashboard.</p></div>
<div class="account-pill"><span class="muted">Account</span> <strong>{name}</strong></div></div>"#,
        id = esc(account.id.as_str()),
        name = esc(&account.name),
    ));
    main.push_str(&chain_html(v.chain));
    main.push_str(&filters_html(v));
    match v.body {
        Body::BadFilter(e) => main.push_str(&format!(
            r#"<div class="notice warn" role="alert" id="activity-error"><strong>These filters cannot be used.</strong> {}</div>"#,
            esc(&sentence(&e.message))
        )),
        Body::Failed(e) => {
            tracing::warn!(code = e.code.as_str(), "activity page: events not read");
            main.push_str(
                r#"<div class="notice danger" role="alert" id="activity-error"><strong>The activity could not be read.</strong> keyward could not read this account's audit log just now (its database did not answer). Nothing is wrong with your keys; reload the page in a moment.</div>"#,
            );
        }
        Body::Events(page) if page.events.is_empty() => {
            let text = if v.query.filtered() {
                "No events match these filters. Clear the filters to see every event."
            } else if v.query.page > 1 {
                "There are no events on this page: the activity has fewer pages."
            } else {
                "No activity yet: no key has been saved, tested or switched, and no AI call has been made in this account."
            };
            main.push_str(&format!(
                r#"<p class="card empty" id="activity-empty">{}</p>"#,
                esc(text)
            ));
        }
        Body::Events(page) => {
            main.push_str(&rows_html(page));
            main.push_str(&pager_html(v, page));
        }
    }
    main.push_str(&format!(
        r#"<p class="footnote">Read-only: the activity cannot be changed here, by anyone. {PAGE_SIZE} events a page; the CSV has every event that matches the filters.</p>"#
    ));
    pages::document_page("Activity · Model keys · Settings", &pages::who(v.email, v.csrf), &main)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("-2"), "'-2");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("\tx"), "'\tx");
        assert_eq!(csv_cell(""), "");
    }

    #[test]
    fn every_action_has_words() {
        use keyward_store::AuditAction::*;
        for a in [
            KeySaved,
            KeyRotated,
            KeyRemoved,
            KeySourceChanged,
            KeyTested,
            AiRequest,
            PlanChanged,
            AccountDeleted,
        ] {
            let e = keyward_store::NewAuditEvent::new(
                &keyward_core::AccountId::from_random([1; 16]),
                UnixMillis(0),
                &keyward_store::AuditActor("cli".into()),
                a,
                Provider::OpenAi,
            )
            .into_event(1);
            assert_ne!(what(&e), a.as_str(), "{a:?}");
        }
    }

    #[test]
    fn who_names_people_and_services() {
        let mut e = keyward_store::NewAuditEvent::new(
            &keyward_core::AccountId::from_random([1; 16]),
            UnixMillis(0),
            &keyward_store::AuditActor("service:drafting".into()),
            keyward_store::AuditAction::AiRequest,
            Provider::OpenAi,
        )
        .on_behalf_of(Some("usr_1".into()))
        .into_event(1);
        let people = HashMap::from([("usr_1".to_owned(), "ana@example.com".to_owned())]);
        assert_eq!(who(&e, &people), "service:drafting for ana@example.com");
        e.on_behalf_of = None;
        e.actor = "usr_1".into();
        assert_eq!(who(&e, &people), "ana@example.com");
        e.actor = "usr_2".into();
        assert_eq!(who(&e, &people), "usr_2");
    }
}
