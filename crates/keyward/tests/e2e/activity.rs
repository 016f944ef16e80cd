//! The activity page and its CSV (issue 23), and a key's health on its card, over HTTP
//! through the real binary on the fake providers. The same pages in Chromium are in
//! `browser.rs` (`activity_and_a_failing_key_in_a_real_browser`).

use std::collections::BTreeMap;

use keyward_core::Provider;
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::Keyward;
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;
use crate::web::{location, login_with_token, Web};

pub const ACTIVITY: &str = "/settings/ai/model-keys/activity";
pub const ACTIVITY_CSV: &str = "/settings/ai/model-keys/activity.csv";

/// The rows of the events table: `data-event` id → the row's HTML.
fn rows(html: &str) -> Vec<(i64, String)> {
    html.split("<tr data-event=\"")
        .skip(1)
        .map(|r| {
            let (id, rest) = r.split_once('"').unwrap();
            (id.parse().unwrap(), rest[..rest.find("</tr>").unwrap()].to_owned())
        })
        .collect()
}

/// A CSV as rows of cells (RFC 4180: quoted cells may hold commas, quotes, line breaks).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let (mut row, mut cell, mut quoted, mut chars) = (Vec::new(), String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                out.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(cell.is_empty() && row.is_empty(), "the CSV must end with a line break");
    out
}

/// The CSV as maps of column → value (after the header row).
fn csv_records(text: &str) -> Vec<BTreeMap<String, String>> {
    let rows = parse_csv(text);
    let header = rows[0].clone();
    assert_eq!(
        header[..5],
        ["time_utc", "model", "input_tokens", "output_tokens", "request_id"],
        "the columns provider dashboards export come first"
    );
    rows[1..]
        .iter()
        .map(|r| {
            assert_eq!(r.len(), header.len(), "{r:?}");
            header.iter().cloned().zip(r.iter().cloned()).collect()
        })
        .collect()
}

async fn csv_of(web: &Web<'_>, query: &str) -> String {
    let r = web.get(&format!("{ACTIVITY_CSV}?{query}")).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.content_type(), "text/csv; charset=utf-8", "{r}");
    let disposition = r
        .headers
        .get("content-disposition")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.starts_with("attachment; filename=\"keyward-activity-"),
        "{disposition}"
    );
    assert!(r.text.starts_with("time_utc,model,"), "header row first: {r}");
    r.text.clone()
}

/// No more of any key than its last four characters.
#[track_caller]
fn assert_no_key(text: &str, keys: &[&String], what: &str) {
    for k in keys {
        assert_no_leak(text, k, what);
        let cut = &k[..k.len() - 4];
        assert!(
            !text.contains(&cut[cut.len() - 6..]),
            "a piece of a key before its last4 is in {what}"
        );
    }
}

/// Owner saves, rotates, switches, tests and calls (own key and shared); a member reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_page_and_csv_show_every_event_with_filters_for_members_only() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let member = create_user(&kw, "member@example.com");
    add_member(&kw, &acc, &member.email, "member");
    let stranger = create_user(&kw, "stranger@example.com");

    // openai: saved, rotated, switched to own, tested, called. anthropic: shared, called.
    let first = key_ending("openai", "ab1c");
    let own = key_ending("openai", "zz9q");
    let shared = key_for("anthropic");
    fake.set_key(Provider::OpenAi, &first, Behaviour::Ok);
    fake.set_key(Provider::OpenAi, &own, Behaviour::Ok);
    fake.set_key(Provider::Anthropic, &shared, Behaviour::Ok);
    set_shared_key(&kw, "anthropic", &shared);
    save_key(&kw, &token, &acc, "openai", &first).await;
    save_key(&kw, &token, &acc, "openai", &own).await;
    set_source(&kw, &token, &acc, "openai", "own").await;
    key_test(&kw, &token, &acc, "openai").await.expect_status(200);
    let mut body = chat_body("openai", false, 5);
    body["feature"] = json!("drafting");
    ai_call(&kw, &token, &acc, &body).await.expect_status(200);
    ai_call(&kw, &member.token, &acc, &chat_body("anthropic", false, 5))
        .await
        .expect_status(200);
    // A service's call on behalf of the member, with its feature.
    let (_, service) = crate::services::create_service(&kw, "autopilot", &["ai:call"]);
    crate::services::ai_call_with(
        &kw,
        &service,
        &acc,
        &chat_body("anthropic", false, 5),
        &[("keyward-on-behalf-of", &member.id), ("keyward-feature", "autopilot")],
    )
    .await
    .expect_status(200);
    // Newest first, as the page shows them.
    let events = audit_events(&kw, &token, &acc).await;
    let keys = [&first, &own, &shared];

    let web = login_with_token(&kw, &token).await;
    // The model-keys page links to the activity.
    let keys_page = web.page(&acc).await;
    assert!(
        keys_page.text.contains(&format!(r#"href="{ACTIVITY}?account={acc}""#)),
        "{keys_page}"
    );

    let page = web.get(&format!("{ACTIVITY}?account={acc}")).await;
    assert_eq!(page.status, 200, "{page}");
    assert!(
        page.text.contains(r#"data-chain="intact""#),
        "the chain verifies: {page}"
    );
    assert!(page.text.contains(&format!("All {} events", events.len())), "{page}");
    let shown = rows(&page.text);
    assert_eq!(shown.len(), events.len(), "every event is on the page: {page}");
    // Newest first, like the API.
    let ids: Vec<i64> = shown.iter().map(|(id, _)| *id).collect();
    let api_ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, api_ids);
    for (id, row) in &shown {
        let e = events.iter().find(|e| e["id"].as_i64() == Some(*id)).unwrap();
        let want = match e["action"].as_str().unwrap() {
            "key.saved" => "Key saved",
            "key.rotated" => "Key rotated",
            "key.source_changed" => "Key source switched to My key",
            "key.tested" => "Key tested",
            "ai.request" => "AI call",
            other => panic!("unexpected event {other}"),
        };
        assert!(row.contains(want), "{want}: {row}");
        if let Some(l4) = e["key_last4"].as_str() {
            assert!(row.contains(&format!("••••{l4}")), "{row}");
        }
        for field in ["model", "provider_request_id", "feature"] {
            if let Some(v) = e[field].as_str() {
                assert!(row.contains(v), "{field} {v}: {row}");
            }
        }
        if e["action"] == "ai.request" {
            assert!(row.contains(&e["input_tokens"].to_string()), "{row}");
            assert!(row.contains(&e["output_tokens"].to_string()), "{row}");
            assert!(row.contains(">OK<"), "{row}");
        }
        let who = if e["actor"] == "service:autopilot" {
            "service:autopilot for member@example.com"
        } else if e["actor"] == member.id.as_str() {
            "member@example.com"
        } else {
            "owner@localhost"
        };
        assert!(row.contains(who), "{who}: {row}");
    }
    let own_call = shown
        .iter()
        .find(|(_, r)| r.contains("AI call") && r.contains("drafting"))
        .unwrap();
    assert!(
        own_call.1.contains("My key") && own_call.1.contains("••••zz9q"),
        "{own_call:?}"
    );
    let shared_call = shown
        .iter()
        .find(|(_, r)| r.contains("AI call") && r.contains("Anthropic") && r.contains(">member@example.com<"))
        .unwrap();
    assert!(shared_call.1.contains("Aiemaily shared"), "{shared_call:?}");

    // The CSV: every event, the same fields, UTC times.
    let csv = csv_of(&web, &format!("account={acc}")).await;
    let records = csv_records(&csv);
    assert_eq!(records.len(), events.len(), "{csv}");
    for (r, e) in records.iter().zip(events.iter()) {
        assert_eq!(r["time_utc"], e["at"].as_str().unwrap(), "UTC, as the API gives it");
        assert!(r["time_utc"].ends_with('Z'));
        assert_eq!(r["action"], e["action"].as_str().unwrap());
        assert_eq!(r["actor"], e["actor"].as_str().unwrap());
        for (col, field) in [
            ("model", "model"),
            ("request_id", "provider_request_id"),
            ("provider", "provider"),
            ("key_source", "key_source"),
            ("key_last4", "key_last4"),
            ("outcome", "outcome"),
            ("feature", "feature"),
            ("on_behalf_of", "on_behalf_of"),
        ] {
            assert_eq!(r[col], e[field].as_str().unwrap_or_default(), "{col}: {r:?}");
        }
        for col in ["input_tokens", "output_tokens"] {
            let want = e[col].as_i64().map(|n| n.to_string()).unwrap_or_default();
            assert_eq!(r[col], want, "{col}");
        }
    }
    let by_service = records.iter().find(|r| r["actor"] == "service:autopilot").unwrap();
    assert_eq!(by_service["who"], "service:autopilot for member@example.com");
    assert_eq!(by_service["feature"], "autopilot");
    assert_no_key(&page.text, &keys, "the activity page");
    assert_no_key(&csv, &keys, "the activity CSV");

    // Filters, in the page and the CSV alike.
    let count = |q: &'static str| {
        let web = web.clone();
        let acc = acc.clone();
        async move {
            let page = web.get(&format!("{ACTIVITY}?account={acc}&{q}")).await;
            assert_eq!(page.status, 200, "{q}: {page}");
            let csv = csv_of(&web, &format!("account={acc}&{q}")).await;
            let (n, m) = (rows(&page.text).len(), csv_records(&csv).len());
            assert_eq!(n, m, "{q}: the page and the CSV disagree");
            (n, page.text)
        }
    };
    let of = |pred: &dyn Fn(&Value) -> bool| events.iter().filter(|e| pred(e)).count();
    assert_eq!(count("provider=openai").await.0, of(&|e| e["provider"] == "openai"));
    assert_eq!(
        count("provider=anthropic").await.0,
        2,
        "the member's and the service's calls"
    );
    assert_eq!(count("source=shared").await.0, of(&|e| e["key_source"] == "shared"));
    assert_eq!(count("last4=zz9q").await.0, of(&|e| e["key_last4"] == "zz9q"));
    assert_eq!(count("last4=ab1c").await.0, 1, "the first key's save only");
    let month = events[0]["at"].as_str().unwrap()[..7].to_owned();
    let this_month = format!("month={month}");
    let q: &'static str = Box::leak(this_month.into_boxed_str());
    assert_eq!(count(q).await.0, events.len());
    let (none, empty) = count("month=2001-01").await;
    assert_eq!(none, 0);
    assert!(empty.contains("No events match these filters"), "{empty}");
    // The filter form keeps what was chosen; a bad filter is explained, not an error page.
    let (_, chosen) = count("provider=openai&source=own").await;
    assert!(chosen.contains(r#"<option value="openai" selected>"#), "{chosen}");
    assert!(
        chosen.contains("source=own"),
        "the CSV link keeps the filters: {chosen}"
    );
    let bad = web.get(&format!("{ACTIVITY}?account={acc}&month=2026-13")).await;
    assert_eq!(bad.status, 422, "{bad}");
    assert!(bad.text.contains("Month must be YYYY-MM."), "{bad}");

    // A member reads it, with no form that changes anything; a stranger gets 404.
    let as_member = login_with_token(&kw, &member.token).await;
    let theirs = as_member.get(&format!("{ACTIVITY}?account={acc}")).await;
    assert_eq!(theirs.status, 200, "{theirs}");
    assert_eq!(rows(&theirs.text).len(), events.len());
    let posts: Vec<&str> = theirs
        .text
        .match_indices(r#"method="post""#)
        .map(|(i, _)| &theirs.text[i..(i + 60).min(theirs.text.len())])
        .collect();
    assert!(
        posts.iter().all(|f| f.contains(r#"action="/logout"#)),
        "only the sign-out forms post: {posts:?}"
    );
    assert!(!theirs.text.contains("api_key"), "{theirs}");
    assert_eq!(
        as_member.get(&format!("{ACTIVITY_CSV}?account={acc}")).await.status,
        200
    );
    let outsider = login_with_token(&kw, &stranger.token).await;
    for path in [ACTIVITY, ACTIVITY_CSV] {
        let r = outsider.get(&format!("{path}?account={acc}")).await;
        assert_eq!(r.status, 404, "{path}: {r}");
        assert!(!r.text.contains("owner@localhost"));
    }
    // Without a session: the login page.
    let r = kw.http().get(&format!("{ACTIVITY}?account={acc}"), None).await;
    assert_eq!((r.status, location(&r)), (303, "/login".to_owned()));
}

/// 55 calls: two pages, newest first, the links keep the filters; the CSV has all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_is_paged_newest_first_and_the_csv_has_every_row() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let shared = key_for("openai");
    fake.set_key(Provider::OpenAi, &shared, Behaviour::Ok);
    set_shared_key(&kw, "openai", &shared);
    for _ in 0..55 {
        ai_call(&kw, &token, &acc, &chat_body("openai", false, 3))
            .await
            .expect_status(200);
    }
    let web = login_with_token(&kw, &token).await;
    let empty = web.get(&format!("{ACTIVITY}?account={acc}&provider=google")).await;
    assert!(empty.text.contains("No events match"), "{empty}");
    let first = web.get(&format!("{ACTIVITY}?account={acc}&provider=openai")).await;
    let page1 = rows(&first.text);
    assert_eq!(page1.len(), 50);
    assert!(!first.text.contains(r#"id="page-prev""#));
    let next = format!("{ACTIVITY}?account={acc}&amp;provider=openai&amp;page=2");
    assert!(
        first.text.contains(&format!(r#"id="page-next" href="{next}""#)),
        "{first}"
    );
    let second = web.get(&next.replace("&amp;", "&")).await;
    let page2 = rows(&second.text);
    assert_eq!(page2.len(), 5);
    assert!(second.text.contains(r#"id="page-prev""#) && !second.text.contains(r#"id="page-next""#));
    let all: Vec<i64> = page1.iter().chain(page2.iter()).map(|(id, _)| *id).collect();
    assert!(
        all.windows(2).all(|w| w[0] > w[1]),
        "newest first across pages: {all:?}"
    );
    let csv = csv_of(&web, &format!("account={acc}&provider=openai&page=2")).await;
    assert_eq!(
        csv_records(&csv).len(),
        55,
        "the CSV has every matching row, not one page"
    );
    assert_no_key(&csv, &[&shared], "the CSV");
    assert_no_key(&first.text, &[&shared], "the page");
}

/// The page of `acc` and the card of `p` in it.
async fn card(web: &Web<'_>, acc: &str, p: &str) -> String {
    let page = web.page(acc).await;
    between(&page.text, &format!(r#"id="provider-{p}""#), "</section>")
}

/// `html` from `start` to the first `end` after it.
fn between(html: &str, start: &str, end: &str) -> String {
    let at = html.find(start).unwrap_or_else(|| panic!("no {start} in:\n{html}"));
    let rest = &html[at..];
    rest[..rest.find(end).unwrap_or(rest.len())].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_shows_a_warning_with_its_diagnosis_until_a_call_works_and_never_falls_back() {
    let fake = FakeProviders::start().unwrap();
    let kw: Keyward = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let own = key_for("openai");
    let shared = key_for("openai");
    fake.set_key(Provider::OpenAi, &shared, Behaviour::Ok);
    set_shared_key(&kw, "openai", &shared);
    fake.set_key(Provider::OpenAi, &own, Behaviour::Ok);
    save_key(&kw, &token, &acc, "openai", &own).await;
    set_source(&kw, &token, &acc, "openai", "own").await;
    let web = login_with_token(&kw, &token).await;
    let fresh = card(&web, &acc, "openai").await;
    assert!(fresh.contains("No call has worked on this key yet"), "{fresh}");
    assert!(fresh.contains("no failed calls in the last 24 h"), "{fresh}");
    assert!(!fresh.contains("failing-openai"));

    ai_call(&kw, &token, &acc, &chat_body("openai", false, 3))
        .await
        .expect_status(200);
    let ok = card(&web, &acc, "openai").await;
    assert!(ok.contains("Last worked"), "{ok}");

    for (behaviour, diagnosis, advice) in [
        (Behaviour::NoCredit, "no_credit", "Add credit"),
        (
            Behaviour::MissingPermission,
            "missing_permission",
            "Give the key the permissions",
        ),
        (Behaviour::RateLimited, "rate_limited", "Slow down"),
    ] {
        fake.set_key(Provider::OpenAi, &own, behaviour);
        let r = ai_call(&kw, &token, &acc, &chat_body("openai", false, 3)).await;
        assert!(!r.is_success(), "{r}");
        let failing = card(&web, &acc, "openai").await;
        assert!(
            failing.contains(&format!(r#"id="failing-openai" data-diagnosis="{diagnosis}""#)),
            "{diagnosis}: {failing}"
        );
        assert!(failing.contains(advice), "{diagnosis}: {failing}");
        assert!(failing.contains("not moved to Aiemaily shared"), "{failing}");
    }
    // An invalid key: "replace the key", with the counts of the last 24 h by diagnosis.
    fake.set_key(Provider::OpenAi, &own, Behaviour::EchoKey);
    for _ in 0..2 {
        let r = ai_call(&kw, &token, &acc, &chat_body("openai", false, 3)).await;
        assert_eq!(r.status, 502, "{r}");
    }
    let failing = card(&web, &acc, "openai").await;
    assert!(failing.contains(r#"data-diagnosis="invalid_key""#), "{failing}");
    assert!(failing.contains("Replace the key"), "{failing}");
    let health = between(&failing, r#"id="health-openai""#, "</dd>");
    assert!(
        health.contains(
            "5 failed calls in the last 24 h: 2 invalid key, 1 missing permission, 1 no credit, 1 rate limited"
        ),
        "{health}"
    );
    assert!(health.contains("AI calls do not record it"), "{health}");
    assert_no_leak(&failing, &own, "the failing card");

    // No fallback: the shared key never reached the provider for this account's calls.
    let shared_used = fake
        .requests()
        .iter()
        .filter(|r| format!("{:?}", r.headers).contains(shared.as_str()))
        .count();
    assert_eq!(shared_used, 0, "a failing own key was swapped for the shared pool");

    // A later success clears the warning; the failures of the day are still counted.
    fake.set_key(Provider::OpenAi, &own, Behaviour::Ok);
    ai_call(&kw, &token, &acc, &chat_body("openai", false, 3))
        .await
        .expect_status(200);
    let healed = card(&web, &acc, "openai").await;
    assert!(!healed.contains("failing-openai"), "{healed}");
    assert!(
        healed.contains("Last worked") && healed.contains("5 failed calls"),
        "{healed}"
    );
    // A rotation starts the new key's record afresh.
    let new = key_for("openai");
    fake.set_key(Provider::OpenAi, &new, Behaviour::Ok);
    save_key(&kw, &token, &acc, "openai", &new).await;
    let rotated = card(&web, &acc, "openai").await;
    assert!(
        rotated.contains("No call has worked on this key yet") && rotated.contains("no failed calls"),
        "{rotated}"
    );
}
