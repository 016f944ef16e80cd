//! AI calls, "Test key", usage and caps, through the real binary against `keyward-fakes`
//! (fake Anthropic, OpenAI and Google on loopback): answers and streams, where keys travel,
//! the audit trail, every diagnosis, hostile and broken providers, and shared-pool caps
//! under 40 racing calls.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::canary::{find_forms, shared_chunk};
use keyward_testkit::{Keyward, Resp};
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;

/// The `ai.request` events of an account, oldest first.
async fn ai_events(kw: &Keyward, token: &str, account: &str) -> Vec<Value> {
    let mut ev: Vec<Value> = audit_events(kw, token, account)
        .await
        .into_iter()
        .filter(|e| e["action"] == "ai.request")
        .collect();
    ev.reverse();
    ev
}

/// The `key.tested` events of an account, oldest first.
async fn tested_events(kw: &Keyward, token: &str, account: &str) -> Vec<Value> {
    key_events(kw, token, account)
        .await
        .into_iter()
        .filter(|e| e["action"] == "key.tested")
        .collect()
}

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.to_lowercase().contains(&needle.to_lowercase())
}

/// One call of the matrix and what its answer said.
struct Call {
    account: String,
    provider: &'static str,
    source: &'static str,
    stream: bool,
    model: String,
    key: String,
    summary: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_answers_with_shared_and_own_keys_plain_and_streamed() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, shared_acc) = pro_owner(&kw, "calls@example.com");
    let own_acc = create_account(&kw, "Own keys", "pro", &user.email);
    let t = user.token.as_str();
    let mut shared_keys = BTreeMap::new();
    let mut own_keys = BTreeMap::new();
    for p in PROVIDERS {
        let s = key_for(p);
        fake.set_key(provider(p), &s, Behaviour::Ok);
        set_shared_key(&kw, p, &s);
        shared_keys.insert(p, s);
        let o = key_for(p);
        fake.set_key(provider(p), &o, Behaviour::Ok);
        save_key(&kw, t, &own_acc, p, &o).await;
        set_source(&kw, t, &own_acc, p, "own").await;
        own_keys.insert(p, o);
    }

    let mut problems: Vec<String> = Vec::new();
    let mut calls: Vec<Call> = Vec::new();
    for (acc, source, keys) in [(&shared_acc, "shared", &shared_keys), (&own_acc, "own", &own_keys)] {
        for p in PROVIDERS {
            for stream in [false, true] {
                let what = format!("{source} {p} {}", if stream { "streamed" } else { "plain" });
                // Plain calls name a model; streamed ones take the provider's default.
                let model = if stream { default_model(p) } else { probe_model(p) };
                let mut body = chat_body(p, stream, 50);
                if !stream {
                    body["model"] = json!(model);
                }
                body["feature"] = json!("drafting");
                fake.clear_requests();
                let r = ai_call(&kw, t, acc, &body).await;
                let summary = if stream {
                    let events = sse_of(&r);
                    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
                    let deltas = names.iter().filter(|n| **n == "delta").count();
                    if deltas == 0
                        || names.last() != Some(&"done")
                        || names.iter().filter(|n| **n == "done").count() != 1
                        || deltas + 1 != names.len()
                    {
                        problems.push(format!(
                            "{what}: expected delta events then one done, got {names:?}: {r}"
                        ));
                    }
                    let text: String = events
                        .iter()
                        .filter(|e| e.name == "delta")
                        .map(|e| e.data["text"].as_str().unwrap_or("<no text>").to_owned())
                        .collect();
                    if text != fake_reply(p) {
                        problems.push(format!(
                            "{what}: the deltas spell {text:?}, expected {:?}",
                            fake_reply(p)
                        ));
                    }
                    let done = events.last().map(|e| e.data.clone()).unwrap_or(Value::Null);
                    if done.get("content").is_some() {
                        problems.push(format!("{what}: `done` carries content: {done}"));
                    }
                    done
                } else {
                    if r.status != 200 {
                        problems.push(format!("{what}: expected 200, got {r}"));
                        continue;
                    }
                    let v = r.json().clone();
                    if v["content"] != fake_reply(p) {
                        problems.push(format!("{what}: content {} expected {:?}", v["content"], fake_reply(p)));
                    }
                    v
                };
                // The answer's fields.
                let expected_credits = if source == "shared" {
                    expected_credits(p, &model, PROMPT.len() as u64, 50, PROMPT_WORDS, 4)
                } else {
                    0
                };
                let checks = [
                    ("id", summary["id"].as_str().is_some_and(|s| !s.is_empty())),
                    ("provider", summary["provider"] == p),
                    ("model", summary["model"] == model.as_str()),
                    ("key_source", summary["key_source"] == source),
                    (
                        "stop_reason",
                        summary["stop_reason"].as_str().is_some_and(|s| !s.is_empty()),
                    ),
                    ("usage.input_tokens", summary["usage"]["input_tokens"] == PROMPT_WORDS),
                    ("usage.output_tokens", summary["usage"]["output_tokens"] == 4),
                    ("credits_charged", summary["credits_charged"] == expected_credits),
                ];
                for (field, ok) in checks {
                    if !ok {
                        problems.push(format!("{what}: wrong `{field}` in {summary}"));
                    }
                }
                if source == "shared" && summary["credits_charged"].as_u64().unwrap_or(0) == 0 {
                    problems.push(format!("{what}: a shared call must charge credits: {summary}"));
                }
                // What the provider received.
                let reqs = fake.requests();
                if reqs.len() != 1 {
                    problems.push(format!("{what}: the provider got {} requests, expected 1", reqs.len()));
                }
                for req in &reqs {
                    problems.extend(
                        key_placement_problems(p, req, &keys[p])
                            .into_iter()
                            .map(|x| format!("{what}: {x}")),
                    );
                    if !chat_path_ok(p, &req.path, &model, stream) {
                        problems.push(format!("{what}: called {} {}", req.method, req.path));
                    }
                    if p == "google" && stream && req.query.as_deref() != Some("alt=sse") {
                        problems.push(format!("{what}: query {:?}", req.query));
                    }
                    if requested_model(p, req) != model {
                        problems.push(format!(
                            "{what}: the provider was asked for {:?}",
                            requested_model(p, req)
                        ));
                    }
                    let b = req.body_json().unwrap_or_default();
                    if requested_max_tokens(p, &b) != 50 {
                        problems.push(format!("{what}: max tokens sent: {b}"));
                    }
                    // A key of the other source must not travel either.
                    let other = if source == "shared" {
                        &own_keys[p]
                    } else {
                        &shared_keys[p]
                    };
                    let raw = format!("{:?}{:?}{}", req.headers, req.query, String::from_utf8_lossy(&req.body));
                    if !find_forms(raw.as_bytes(), other.as_bytes()).is_empty() {
                        problems.push(format!(
                            "{what}: the {} key travelled too",
                            if source == "shared" { "own" } else { "shared" }
                        ));
                    }
                }
                calls.push(Call {
                    account: acc.to_string(),
                    provider: p,
                    source,
                    stream,
                    model,
                    key: keys[p].clone(),
                    summary,
                });
            }
        }
    }

    // One `ai.request` per call, in order, with what the design lists.
    for acc in [&shared_acc, &own_acc] {
        let events = ai_events(&kw, t, acc).await;
        let mine: Vec<&Call> = calls.iter().filter(|c| &c.account == acc).collect();
        if events.len() != mine.len() {
            problems.push(format!(
                "{acc}: {} ai.request events for {} calls: {events:?}",
                events.len(),
                mine.len()
            ));
            continue;
        }
        for (e, c) in events.iter().zip(mine) {
            let what = format!(
                "audit of {} {} {}",
                c.source,
                c.provider,
                if c.stream { "streamed" } else { "plain" }
            );
            let last4_ok = match c.source {
                "own" => e["key_last4"] == last4(&c.key),
                _ => e["key_last4"].is_null(),
            };
            let rid = e["provider_request_id"].as_str().unwrap_or("");
            let rid_ok = match c.provider {
                "anthropic" => rid.starts_with("req_"),
                "openai" => rid.starts_with("req_"),
                _ => !rid.is_empty() && c.summary["id"] == rid,
            };
            let checks = [
                ("provider", e["provider"] == c.provider),
                ("key_source", e["key_source"] == c.source),
                ("key_last4", last4_ok),
                ("model", e["model"] == c.model.as_str()),
                ("outcome", e["outcome"] == "ok"),
                ("provider_request_id", rid_ok),
                ("input_tokens", e["input_tokens"] == PROMPT_WORDS),
                ("output_tokens", e["output_tokens"] == 4),
                ("feature", e["feature"] == "drafting"),
                ("actor", e["actor"] == user.id.as_str()),
            ];
            for (field, ok) in checks {
                if !ok {
                    problems.push(format!("{what}: wrong `{field}` in {e}"));
                }
            }
            if !find_forms(e.to_string().as_bytes(), c.key.as_bytes()).is_empty() {
                problems.push(format!("{what}: the event holds the key"));
            }
        }
    }

    // Usage: shared calls metered against credits, own calls counted but free.
    let charged: u64 = calls
        .iter()
        .filter(|c| c.source == "shared")
        .map(|c| c.summary["credits_charged"].as_u64().unwrap_or(0))
        .sum();
    for (acc, source, credits) in [(&shared_acc, "shared", charged), (&own_acc, "own", 0)] {
        let r = kw.http().get(&usage_path(acc), Some(t)).await;
        r.expect_status(200);
        let u = r.json();
        if u["shared"]["credits_used"] != credits {
            problems.push(format!(
                "usage of the {source} account: credits_used should be {credits}: {u}"
            ));
        }
        if u["shared"]["credits_remaining"]
            .as_i64()
            .zip(u["shared"]["credit_limit"].as_i64())
            .map(|(rem, lim)| lim - rem)
            != Some(credits as i64)
        {
            problems.push(format!("usage of the {source} account: remaining ≠ limit − used: {u}"));
        }
        for p in PROVIDERS {
            let row = &u["by_provider"][p][source];
            if row["requests"] != 2 || row["input_tokens"] != 2 * PROMPT_WORDS || row["output_tokens"] != 8 {
                problems.push(format!(
                    "usage of the {source} account, {p}: {row} (expected 2 requests, 10 in, 8 out)"
                ));
            }
        }
    }
    assert_audit_ok(&kw, None);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// One failure a key test must diagnose: the fake's behaviour (`None`: an unknown key), the
/// diagnosis, the provider status per provider [anthropic, openai, google], and a piece of
/// each provider's own message.
type DiagnosisRow = (Option<Behaviour>, &'static str, [u64; 3], [&'static str; 3]);

/// Every failure a key test must diagnose from the provider's answer.
fn diagnosis_table() -> Vec<DiagnosisRow> {
    vec![
        (
            None, // an unknown key
            "invalid_key",
            [401, 401, 400],
            ["invalid x-api-key", "Incorrect API key provided", "API key not valid"],
        ),
        (
            Some(Behaviour::NoCredit),
            "no_credit",
            [400, 429, 429],
            [
                "credit balance is too low",
                "exceeded your current quota",
                "prepayment credits are depleted",
            ],
        ),
        // OpenAI answers a restricted key's missing scopes with 401.
        (
            Some(Behaviour::MissingPermission),
            "missing_permission",
            [403, 401, 403],
            [
                "does not have permission",
                "insufficient permissions",
                "does not have permission",
            ],
        ),
        (
            Some(Behaviour::RateLimited),
            "rate_limited",
            [429, 429, 429],
            ["rate limit", "Rate limit reached", "exceeded your current quota"],
        ),
        (
            Some(Behaviour::Unavailable),
            "provider_unavailable",
            [529, 503, 503],
            ["Overloaded", "overloaded", "overloaded"],
        ),
    ]
}

fn index_of(p: &str) -> usize {
    PROVIDERS.iter().position(|x| *x == p).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_test_probes_once_for_one_token_and_diagnoses_every_failure() {
    let fake = FakeProviders::start().expect("start fakes");
    let addr = fake.addr();
    let kw = start_on_fake(&fake, &[("KEYWARD_KEY_TESTS_PER_MINUTE", "1000")]);
    let (user, acc) = pro_owner(&kw, "tests@example.com");
    let t = user.token.as_str();
    let mut keys = BTreeMap::new();
    for p in PROVIDERS {
        let k = key_for(p);
        save_key(&kw, t, &acc, p, &k).await;
        keys.insert(p, k);
    }
    let mut problems: Vec<String> = Vec::new();
    let mut expected_outcomes: Vec<(String, String)> = Vec::new();

    for p in PROVIDERS {
        let key = &keys[p];
        fake.set_key(provider(p), key, Behaviour::Ok);
        // Success: one request, one output token, the cheapest model, the key in its header.
        fake.clear_requests();
        let r = key_test(&kw, t, &acc, p).await;
        r.expect_status(200);
        let v = r.json();
        if v["ok"] != true || v["status"] != "ok" || v["model"] != probe_model(p).as_str() || !v["latency_ms"].is_u64()
        {
            problems.push(format!(
                "{p}: success should be {{ok:true,status:ok,model,latency_ms}}: {r}"
            ));
        }
        expected_outcomes.push((p.to_owned(), "ok".to_owned()));
        let reqs = fake.requests();
        if reqs.len() != 1 {
            problems.push(format!(
                "{p}: the test sent {} requests, expected exactly 1",
                reqs.len()
            ));
        }
        for req in &reqs {
            problems.extend(key_placement_problems(p, req, key));
            let b = req.body_json().unwrap_or_default();
            if requested_max_tokens(p, &b) != 1 {
                problems.push(format!("{p}: the probe should ask for exactly one output token: {b}"));
            }
            if requested_model(p, req) != probe_model(p) {
                problems.push(format!(
                    "{p}: probed {:?}, not the cheapest model",
                    requested_model(p, req)
                ));
            }
            if !chat_path_ok(p, &req.path, &probe_model(p), false) {
                problems.push(format!("{p}: probe went to {}", req.path));
            }
        }
        let list = list_keys(&kw, t, &acc).await;
        let last = &list[p]["key"]["last_test"];
        if last["ok"] != true || !last["at"].is_string() || !last["message"].is_string() {
            problems.push(format!("{p}: last_test after a good test: {last}"));
        }

        // Every failure the provider can report.
        for (behaviour, diagnosis, statuses, messages) in diagnosis_table() {
            match behaviour {
                Some(b) => fake.set_key(provider(p), key, b),
                None => fake.remove_key(provider(p), key),
            }
            fake.clear_requests();
            let r = key_test(&kw, t, &acc, p).await;
            let what = format!("{p} {diagnosis}");
            if r.status != 200 {
                problems.push(format!("{what}: a failed test still answers 200: {r}"));
                continue;
            }
            let v = r.json();
            let i = index_of(p);
            let message = v["message"].as_str().unwrap_or("");
            if v["ok"] != false
                || v["status"] != diagnosis
                || v["provider_status"] != statuses[i]
                || !contains_ci(message, messages[i])
            {
                problems.push(format!(
                    "{what}: expected ok:false status:{diagnosis} provider_status:{} and the provider's message ({:?}), got {r}",
                    statuses[i], messages[i]
                ));
            }
            expected_outcomes.push((p.to_owned(), format!("error:{diagnosis}")));
            if fake.requests().len() != 1 {
                problems.push(format!("{what}: {} requests, expected 1", fake.requests().len()));
            }
            let list = list_keys(&kw, t, &acc).await;
            let last = &list[p]["key"]["last_test"];
            if last["ok"] != false || last["message"].as_str().is_none_or(|m| m.trim().is_empty()) {
                problems.push(format!("{what}: last_test should keep the failure: {last}"));
            }
        }
    }

    // The provider is gone: unreachable, with no provider status.
    drop(fake);
    wait_refused(addr).await;
    for p in PROVIDERS {
        let r = key_test(&kw, t, &acc, p).await;
        r.expect_status(200);
        let v = r.json();
        if v["ok"] != false
            || v["status"] != "unreachable"
            || !v["provider_status"].is_null()
            || v["message"].as_str().is_none_or(|m| m.trim().is_empty())
        {
            problems.push(format!(
                "{p} with the provider stopped: expected ok:false unreachable, got {r}"
            ));
        }
        expected_outcomes.push((p.to_owned(), "error:unreachable".to_owned()));
        let list = list_keys(&kw, t, &acc).await;
        if list[p]["key"]["last_test"]["ok"] != false {
            problems.push(format!(
                "{p}: last_test after unreachable: {}",
                list[p]["key"]["last_test"]
            ));
        }
    }

    // Every test audited as key.tested, in order.
    let events = tested_events(&kw, t, &acc).await;
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["provider"].as_str().unwrap_or("").to_owned(),
                e["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    if got != expected_outcomes {
        problems.push(format!("key.tested events {got:?}\nexpected {expected_outcomes:?}"));
    }
    for e in &events {
        let p = e["provider"].as_str().unwrap_or("");
        if !PROVIDERS.contains(&p) {
            continue;
        }
        if e["key_last4"] != last4(&keys[p]) || e["model"] != probe_model(p).as_str() || e["actor"] != user.id.as_str()
        {
            problems.push(format!("key.tested event lacks last4/model/actor: {e}"));
        }
    }
    assert_audit_ok(&kw, None);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_test_on_a_model_the_provider_does_not_offer_is_model_not_available() {
    let fake = FakeProviders::start().expect("start fakes");
    // A catalogue whose probe models the (fake) providers do not serve.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalogue.toml");
    let mut toml = String::new();
    for (p, id) in [
        ("anthropic", "claude-retired-20200101"),
        ("openai", "gpt-retired"),
        ("google", "gemini-retired"),
    ] {
        toml.push_str(&format!(
            "[[{p}]]\nid = \"{id}\"\nname = \"Retired\"\ninput_per_mtok = 1\noutput_per_mtok = 1\nprobe = true\n\n"
        ));
    }
    std::fs::write(&path, toml).expect("write catalogue");
    let kw = start_on_fake(&fake, &[("KEYWARD_CATALOGUE", path.to_str().expect("utf-8 path"))]);
    let (user, acc) = pro_owner(&kw, "retired@example.com");
    let t = user.token.as_str();
    let mut problems = Vec::new();
    for (p, id) in [
        ("anthropic", "claude-retired-20200101"),
        ("openai", "gpt-retired"),
        ("google", "gemini-retired"),
    ] {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Ok);
        save_key(&kw, t, &acc, p, &k).await;
        let r = key_test(&kw, t, &acc, p).await;
        r.expect_status(200);
        let v = r.json();
        if v["ok"] != false || v["status"] != "model_not_available" || v["provider_status"] != 404 {
            problems.push(format!("{p}: expected ok:false model_not_available 404, got {r}"));
        }
        if v["message"].as_str().is_none_or(|m| !m.contains(id)) {
            problems.push(format!(
                "{p}: the provider's message (naming {id}) should be passed on: {r}"
            ));
        }
        // An AI call on it fails with the provider's 404.
        set_source(&kw, t, &acc, p, "own").await;
        let r = ai_call(&kw, t, &acc, &chat_body(p, false, 5)).await;
        if r.status != 502 || r.error_code() != Some("provider_error") || r.json()["error"]["provider_status"] != 404 {
            problems.push(format!(
                "{p}: an AI call on a model the provider lacks: expected 502 provider_error 404, got {r}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eleventh_key_test_in_a_minute_is_rate_limited() {
    // Providers on a closed port: each test is a quick `unreachable`.
    let url = format!("http://127.0.0.1:{}", closed_port());
    let kw = start_with(
        keyward_testkit::Options::default()
            .env("KEYWARD_ANTHROPIC_BASE_URL", &url)
            .env("KEYWARD_OPENAI_BASE_URL", &url)
            .env("KEYWARD_GOOGLE_BASE_URL", &url),
    );
    let (user, acc) = pro_owner(&kw, "limit@example.com");
    let t = user.token.as_str();
    for p in ["anthropic", "openai"] {
        save_key(&kw, t, &acc, p, &key_for(p)).await;
    }
    // The window is a calendar minute: keep all eleven inside one.
    #[allow(
        clippy::disallowed_methods,
        reason = "the server's one-minute window follows the wall clock: the test reads the same clock"
    )]
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        % 60.0;
    if secs > 45.0 {
        tokio::time::sleep(Duration::from_secs_f64(60.5 - secs)).await;
    }
    for i in 1..=10 {
        let r = key_test(&kw, t, &acc, "anthropic").await;
        r.expect_status(200);
        assert_eq!(r.json()["ok"], false, "test {i}: {r}");
        assert_eq!(r.json()["status"], "unreachable", "test {i} on a closed port: {r}");
        assert!(r.json()["provider_status"].is_null(), "test {i}: {r}");
    }
    let r = key_test(&kw, t, &acc, "anthropic").await;
    r.expect_error(429, "rate_limited");
    // The limit is per provider.
    let r = key_test(&kw, t, &acc, "openai").await;
    r.expect_status(200);
    assert_eq!(r.json()["status"], "unreachable", "{r}");
    let events = tested_events(&kw, t, &acc).await;
    let anthropic = events.iter().filter(|e| e["provider"] == "anthropic").count();
    assert_eq!(anthropic, 10, "ten anthropic tests ran and were audited: {events:?}");
    assert_audit_ok(&kw, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_echoing_the_key_leaks_it_nowhere() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, own_acc) = pro_owner(&kw, "echo@example.com");
    let shared_acc = create_account(&kw, "Shared", "pro", &user.email);
    let t = user.token.as_str();
    let mut keys: Vec<String> = Vec::new();
    let mut answers: Vec<Resp> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    // The provider's own words, which must still reach the user (minus the key).
    let said = [
        ("anthropic", "invalid x-api-key", 401),
        ("openai", "Incorrect API key provided", 401),
        ("google", "API key not valid", 400),
    ];
    for (p, words, status) in said {
        let own = key_for(p);
        let shared = key_for(p);
        fake.set_key(provider(p), &own, Behaviour::EchoKey);
        fake.set_key(provider(p), &shared, Behaviour::EchoKey);
        save_key(&kw, t, &own_acc, p, &own).await;
        set_source(&kw, t, &own_acc, p, "own").await;
        set_shared_key(&kw, p, &shared);
        keys.push(own);
        keys.push(shared);

        let r = key_test(&kw, t, &own_acc, p).await;
        let v = r.json.clone().unwrap_or_default();
        if r.status != 200
            || v["ok"] != false
            || v["status"] != "invalid_key"
            || !v["message"].as_str().is_some_and(|m| m.contains(words))
        {
            problems.push(format!(
                "{p} test: expected ok:false invalid_key with the provider's message, got {r}"
            ));
        }
        answers.push(r);
        for acc in [&own_acc, &shared_acc] {
            let r = ai_call(&kw, t, acc, &chat_body(p, false, 5)).await;
            if r.status != 502
                || r.error_code() != Some("provider_error")
                || r.json()["error"]["provider_status"] != status
                || !r.error_message().is_some_and(|m| m.contains(words))
            {
                problems.push(format!(
                    "{p} plain call: expected 502 provider_error {status} with the provider's message, got {r}"
                ));
            }
            answers.push(r);
            let r = ai_call(&kw, t, acc, &chat_body(p, true, 5)).await;
            let (_, code, message, _) = stream_failure(&r);
            if code != "provider_error" || !message.contains(words) {
                problems.push(format!(
                    "{p} streamed call: expected provider_error with the provider's message, got {r}"
                ));
            }
            answers.push(r);
        }
    }
    // No silent fallback: each key was used exactly for its own calls (own: the test and
    // two calls; shared: two calls).
    let reqs = fake.requests();
    for (i, key) in keys.iter().enumerate() {
        let used = reqs
            .iter()
            .filter(|r| format!("{:?}", r.headers).contains(key.as_str()))
            .count();
        let expected = if i % 2 == 0 { 3 } else { 2 };
        if used != expected {
            problems.push(format!(
                "the {} key of provider {} reached the provider {used} times, expected {expected}",
                if i % 2 == 0 { "own" } else { "shared" },
                PROVIDERS[i / 2]
            ));
        }
    }
    // Failed calls are audited with the provider's request id (Anthropic and OpenAI send one
    // with their errors) and, for own keys, last4.
    for acc in [&own_acc, &shared_acc] {
        let events = ai_events(&kw, t, acc).await;
        if events.len() != 6 {
            problems.push(format!("{acc}: 6 ai.request events expected: {events:?}"));
        }
        for e in &events {
            if e["outcome"] != "error:invalid_key" {
                problems.push(format!("outcome should be error:invalid_key: {e}"));
            }
            if e["provider"] != "google" && !e["provider_request_id"].as_str().is_some_and(|r| r.starts_with("req_")) {
                problems.push(format!("the provider's request id is missing: {e}"));
            }
            if e["key_source"] == "own" && e["key_last4"].as_str().is_none_or(|l| l.len() != 4) {
                problems.push(format!("an own-key ai.request must carry key_last4: {e}"));
            }
        }
    }
    for acc in [&own_acc, &shared_acc] {
        answers.push(kw.http().get(&keys_path(acc), Some(t)).await);
        answers.push(kw.http().get(&format!("{}?limit=100", audit_path(acc)), Some(t)).await);
        answers.push(kw.http().get(&usage_path(acc), Some(t)).await);
    }
    answers.push(kw.http().get("/metrics", None).await);
    let mut exports = Vec::new();
    for acc in [&own_acc, &shared_acc] {
        let out = kw.cli(&["audit", "export", "--account", acc]);
        out.assert_success();
        exports.push(out.stdout.clone());
    }
    assert_audit_ok(&kw, None);
    let mut kw = kw;
    kw.stop();

    for key in &keys {
        for r in &answers {
            for f in find_forms(r.text.as_bytes(), key.as_bytes()) {
                problems.push(format!("answer to {} {}: {f} of a key", r.method, r.path));
            }
            if let Some(piece) = shared_chunk(&r.text, key, 12) {
                problems.push(format!(
                    "answer to {} {}: a 12-character piece {piece:?} of a key",
                    r.method, r.path
                ));
            }
        }
        for f in find_forms(&kw.output_bytes(), key.as_bytes()) {
            problems.push(format!("server output (trace): {f} of a key"));
        }
        if let Some(piece) = shared_chunk(&kw.output(), key, 12) {
            problems.push(format!("server output (trace): a piece {piece:?} of a key"));
        }
        for e in &exports {
            for f in find_forms(e.as_bytes(), key.as_bytes()) {
                problems.push(format!("audit export: {f} of a key"));
            }
        }
        for (path, bytes) in kw.data_files() {
            for f in find_forms(&bytes, key.as_bytes()) {
                problems.push(format!("file {}: {f} of a key", path.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_answers_never_followed() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "redirect@example.com");
    let t = user.token.as_str();
    let mut problems = Vec::new();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Redirect);
        save_key(&kw, t, &acc, p, &k).await;
        set_source(&kw, t, &acc, p, "own").await;
        let r = ai_call(&kw, t, &acc, &chat_body(p, false, 5)).await;
        if r.status != 502 || r.error_code() != Some("provider_error") || r.json()["error"]["provider_status"] != 307 {
            problems.push(format!("{p} plain: expected 502 provider_error 307, got {r}"));
        }
        if !r.error_message().is_some_and(|m| contains_ci(m, "redirect")) {
            problems.push(format!("{p} plain: the message should say it was a redirect: {r}"));
        }
        let r = ai_call(&kw, t, &acc, &chat_body(p, true, 5)).await;
        let (_, code, _, _) = stream_failure(&r);
        if code != "provider_error" {
            problems.push(format!("{p} streamed: expected provider_error, got {r}"));
        }
        let r = key_test(&kw, t, &acc, p).await;
        if r.status != 200 || r.json()["ok"] != false {
            problems.push(format!("{p} test: a redirect is not a working key: {r}"));
        }
    }
    let stolen = fake.stolen_requests();
    assert!(
        stolen.is_empty(),
        "a redirect was followed: the fake's /_fake/stolen got {stolen:?}"
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 9, "three calls per provider, none more: {reqs:?}");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_is_a_clear_timeout_within_the_configured_time() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_PROVIDER_TIMEOUT_MS", "1000")]);
    let (user, acc) = pro_owner(&kw, "stall@example.com");
    let slow_acc = create_account(&kw, "Slow", "pro", &user.email);
    let t = user.token.clone();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Stall);
        save_key(&kw, &t, &acc, p, &k).await;
        set_source(&kw, &t, &acc, p, "own").await;
        // Answers, but pauses 5 s between stream chunks: longer than the timeout.
        let s = key_for(p);
        fake.set_key(provider(p), &s, Behaviour::SlowStream(Duration::from_secs(5)));
        save_key(&kw, &t, &slow_acc, p, &s).await;
        set_source(&kw, &t, &slow_acc, p, "own").await;
    }
    let timeout_ok = |what: &str, took: Duration, problems: &mut Vec<String>| {
        if took < Duration::from_millis(900) || took > Duration::from_millis(3500) {
            problems.push(format!("{what}: took {took:?}; the timeout is 1000 ms"));
        }
    };
    // The three providers at once (each case waits out the timeout).
    let runs = PROVIDERS.map(|p| {
        let http = kw.http().clone();
        let (t, acc, slow_acc) = (t.clone(), acc.clone(), slow_acc.clone());
        tokio::spawn(async move {
            let mut problems = Vec::new();
            for stream in [false, true] {
                let what = format!("{p} {}", if stream { "streamed" } else { "plain" });
                let at = Instant::now();
                let r = http.post(&ai_path(&acc), Some(&t), &chat_body(p, stream, 5)).await;
                timeout_ok(&what, at.elapsed(), &mut problems);
                let (status, code, message, provider_status) = if stream {
                    stream_failure(&r)
                } else {
                    let e = r.json.clone().unwrap_or_default();
                    (
                        r.status,
                        r.error_code().unwrap_or("").to_owned(),
                        r.error_message().unwrap_or("").to_owned(),
                        e["error"]["provider_status"].clone(),
                    )
                };
                if (!stream && status != 502)
                    || code != "provider_error"
                    || !provider_status.is_null()
                    || !message.contains("unreachable")
                    || !(message.contains("1000 ms") || contains_ci(&message, "time"))
                {
                    problems.push(format!(
                        "{what}: expected 502 provider_error, unreachable, saying it timed out; got {r}"
                    ));
                }
            }
            let at = Instant::now();
            let r = http.post(&test_path(&acc, p), Some(&t), &json!({})).await;
            timeout_ok(&format!("{p} test"), at.elapsed(), &mut problems);
            let v = r.json.clone().unwrap_or_default();
            if r.status != 200 || v["ok"] != false || v["status"] != "unreachable" || !v["provider_status"].is_null() {
                problems.push(format!("{p} test: expected ok:false unreachable, got {r}"));
            }
            // A stream that stops mid-way for longer than the timeout ends with an error.
            let at = Instant::now();
            let r = http.post(&ai_path(&slow_acc), Some(&t), &chat_body(p, true, 5)).await;
            let took = at.elapsed();
            if took > Duration::from_millis(4000) {
                problems.push(format!("{p} stalled mid-stream: took {took:?}, the timeout is 1000 ms"));
            }
            let (_, code, message, _) = stream_failure(&r);
            if code != "provider_error" || !(message.contains("1000 ms") || contains_ci(&message, "time")) {
                problems.push(format!(
                    "{p} stalled mid-stream: expected a provider_error timeout event, got {r}"
                ));
            }
            problems
        })
    });
    let mut problems = Vec::new();
    for run in runs {
        problems.extend(run.await.expect("join"));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_answers_are_clear_provider_errors() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_PROVIDER_TIMEOUT_MS", "3000")]);
    let (user, acc) = pro_owner(&kw, "garbage@example.com");
    let t = user.token.as_str();
    let mut problems = Vec::new();
    let mut used_keys = Vec::new();
    for (behaviour, name) in [
        (Behaviour::Garbage, "garbage"),
        (Behaviour::Truncated, "truncated"),
        (Behaviour::DropMidStream, "dropped mid-way"),
    ] {
        for p in PROVIDERS {
            let k = key_for(p);
            fake.set_key(provider(p), &k, behaviour);
            save_key(&kw, t, &acc, p, &k).await;
            set_source(&kw, t, &acc, p, "own").await;
            used_keys.push(k.clone());
            used_keys.push(k);
            let r = ai_call(&kw, t, &acc, &chat_body(p, false, 5)).await;
            let message = r.error_message().unwrap_or("").to_owned();
            if r.status != 502 || r.error_code() != Some("provider_error") {
                problems.push(format!("{name} {p} plain: expected 502 provider_error, got {r}"));
            } else if message.trim().len() < 20 || !message.contains(provider(p).display_name()) {
                problems.push(format!(
                    "{name} {p} plain: the message should say clearly what the provider did: {message:?}"
                ));
            }
            let r = ai_call(&kw, t, &acc, &chat_body(p, true, 5)).await;
            let (_, code, message, _) = stream_failure(&r);
            if code != "provider_error" || message.trim().len() < 20 {
                problems.push(format!(
                    "{name} {p} streamed: expected a provider_error with a clear message, got {r}"
                ));
            }
        }
    }
    // Each failure is audited as a failed ai.request.
    let events = ai_events(&kw, t, &acc).await;
    let failed = events
        .iter()
        .filter(|e| e["outcome"].as_str().is_some_and(|o| o.starts_with("error")))
        .count();
    if failed != 18 || events.len() != 18 {
        problems.push(format!(
            "expected 18 failed ai.request events, got {failed} of {}: {events:?}",
            events.len()
        ));
    }
    for (e, k) in events.iter().zip(&used_keys) {
        if e["key_source"] != "own" || e["key_last4"] != last4(k) {
            problems.push(format!(
                "a failed own-key ai.request must carry the key's last4 {}: {e}",
                last4(k)
            ));
        }
    }
    assert_audit_ok(&kw, None);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_mid_way_ends_with_an_error_event() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_PROVIDER_TIMEOUT_MS", "3000")]);
    let (user, acc) = pro_owner(&kw, "drop@example.com");
    let shared_acc = create_account(&kw, "Shared", "pro", &user.email);
    let t = user.token.as_str();
    let mut problems = Vec::new();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::DropMidStream);
        save_key(&kw, t, &acc, p, &k).await;
        set_source(&kw, t, &acc, p, "own").await;
        let s = key_for(p);
        fake.set_key(provider(p), &s, Behaviour::DropMidStream);
        set_shared_key(&kw, p, &s);
        for a in [&acc, &shared_acc] {
            // A long answer, so "mid-way" has some text before it.
            let r = ai_call(&kw, t, a, &chat_body(p, true, 50)).await;
            let (status, code, message, _) = stream_failure(&r);
            if status != 200 || code != "provider_error" || message.trim().is_empty() {
                problems.push(format!(
                    "{p}: expected a 200 stream ending in a provider_error event, got {r}"
                ));
            }
        }
    }
    let events = ai_events(&kw, t, &acc).await;
    if events.len() != 3 || events.iter().any(|e| e["outcome"] == "ok") {
        problems.push(format!("three failed ai.request events expected: {events:?}"));
    }
    assert_audit_ok(&kw, None);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// `n` shared calls at once on `account`, every other one streamed; returns the answers.
async fn race(kw: &Keyward, token: &str, account: &str, body: &Value, n: usize) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let http = kw.http().clone();
            let mut body = body.clone();
            body["stream"] = json!(i % 2 == 1);
            let (token, path) = (token.to_owned(), ai_path(account));
            tokio::spawn(async move { http.post(&path, Some(&token), &body).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("join"));
    }
    out
}

/// Checks one race: answers are 200 or 429 `shared_quota_exhausted` telling the user to add
/// their own key; the successes' charges sum to at most `limit` and match usage.
async fn check_race(kw: &Keyward, token: &str, account: &str, limit: u64, answers: &[Resp], each: u64) -> (u64, usize) {
    let mut charged = 0;
    let mut ok = 0;
    for r in answers {
        match r.status {
            200 => {
                ok += 1;
                let summary = if r.content_type().starts_with("text/event-stream") {
                    let events = sse_of(r);
                    let last = events.last().unwrap_or_else(|| panic!("an empty stream: {r}"));
                    assert_eq!(last.name, "done", "{r}");
                    last.data.clone()
                } else {
                    r.json().clone()
                };
                let c = summary["credits_charged"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no credits_charged: {r}"));
                assert_eq!(c, each, "each call should be charged {each}: {r}");
                assert_eq!(summary["key_source"], "shared", "{r}");
                charged += c;
            }
            _ => {
                r.expect_error(429, "shared_quota_exhausted");
                let m = r.error_message().unwrap_or("").to_lowercase();
                assert!(
                    m.contains("own") && m.contains("key"),
                    "the refusal should tell the user they can add their own key: {r}"
                );
            }
        }
    }
    assert!(ok >= 1, "at least one call fits the limit: {answers:?}");
    assert!(
        charged <= limit,
        "the successes charged {charged} credits, over the limit {limit}"
    );
    let r = kw.http().get(&usage_path(account), Some(token)).await;
    r.expect_status(200);
    let u = r.json();
    assert_eq!(u["shared"]["credit_limit"], limit, "{r}");
    assert_eq!(
        u["shared"]["credits_used"], charged,
        "usage must match the charges: {r}"
    );
    assert!(u["shared"]["credits_used"].as_u64().unwrap_or(u64::MAX) <= limit, "{r}");
    assert_eq!(u["shared"]["credits_remaining"], limit - charged, "{r}");
    (charged, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_credits_hold_under_forty_racing_calls_and_own_keys_stay_uncapped() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "caps@example.com");
    let heavy_acc = create_account(&kw, "Heavy", "pro", &user.email);
    let t = user.token.as_str();
    for p in PROVIDERS {
        let s = key_for(p);
        fake.set_key(provider(p), &s, Behaviour::Ok);
        set_shared_key(&kw, p, &s);
    }

    // Round 1: every call reserves 1 credit and costs 1; a limit of 5 fits exactly 5.
    set_limit(&kw, &acc, 5);
    let model = "claude-sonnet-5-5";
    let body = json!({"provider": "anthropic", "model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4});
    let each = expected_credits("anthropic", model, 11, 4, 2, 4);
    assert_eq!(each, 1, "the arithmetic of this test");
    let answers = race(&kw, t, &acc, &body, 40).await;
    let (charged, ok) = check_race(&kw, t, &acc, 5, &answers, each).await;
    assert_eq!(
        (ok, charged),
        (5, 5),
        "5 calls of 1 credit fit a limit of 5, whatever the race"
    );
    let u = kw.http().get(&usage_path(&acc), Some(t)).await;
    assert_eq!(u.json()["by_provider"]["anthropic"]["shared"]["requests"], 5, "{u}");

    // The pool is spent for every provider of the account; own keys are never capped.
    let r = ai_call(&kw, t, &acc, &chat_body("openai", false, 4)).await;
    r.expect_error(429, "shared_quota_exhausted");
    let own = key_for("anthropic");
    fake.set_key(provider("anthropic"), &own, Behaviour::Ok);
    save_key(&kw, t, &acc, "anthropic", &own).await;
    set_source(&kw, t, &acc, "anthropic", "own").await;
    for stream in [false, true] {
        let r = ai_call(&kw, t, &acc, &chat_body("anthropic", stream, 50)).await;
        let summary = if stream {
            sse_of(&r).last().map(|e| e.data.clone()).unwrap_or_default()
        } else {
            r.expect_status(200);
            r.json().clone()
        };
        assert_eq!(summary["key_source"], "own", "{r}");
        assert_eq!(summary["credits_charged"], 0, "{r}");
    }
    let r = kw.http().get(&usage_path(&acc), Some(t)).await;
    assert_eq!(r.json()["shared"]["credits_used"], 5, "own calls cost no credits: {r}");
    assert_eq!(r.json()["by_provider"]["anthropic"]["own"]["requests"], 2, "{r}");

    // Round 2: calls reserve more than they cost (the input's bytes bound its tokens), so
    // settling hands credits back mid-race; still never past the limit.
    set_limit(&kw, &heavy_acc, 20);
    let model = "claude-opus-5-5";
    let words = vec!["w"; 1000].join(" ");
    let body = json!({"provider": "anthropic", "model": model, "messages": [{"role": "user", "content": words}], "max_tokens": 4});
    let each = expected_credits("anthropic", model, words.len() as u64, 4, 1000, 4);
    let reserve = catalogue()
        .model(provider("anthropic"), model)
        .map(|m| m.credits_for(words.len() as u64, 4))
        .unwrap_or(0);
    assert!(
        reserve > each && 2 * reserve <= 20 && 3 * reserve > 20,
        "the arithmetic of this test: {reserve} {each}"
    );
    let answers = race(&kw, t, &heavy_acc, &body, 40).await;
    let (charged, ok) = check_race(&kw, t, &heavy_acc, 20, &answers, each).await;
    assert!(
        ok <= 4,
        "{ok} calls of {each} (reserving {reserve}) cannot all fit 20: {charged} charged"
    );
    assert_audit_ok(&kw, None);
}

/// OpenAI answers a bad key with its first 8 and last 4 characters ("sk-abcde****wxyz");
/// for a legacy `sk-` key those 8 hold 5 secret characters. Only last4 may ever be shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_partial_echo_of_a_key_shows_no_more_than_last4() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, account) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    // A legacy-format key the fake does not know: its invalid-key error echoes it masked.
    let key = format!(
        "sk-{}",
        keyward_testkit::canary::random_string(48, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    );
    save_key(&kw, &token, &account, "openai", &key).await;
    set_source(&kw, &token, &account, "openai", "own").await;
    let secret_start = &key[..8];

    let probe = key_test(&kw, &token, &account, "openai").await;
    assert_eq!(probe.json()["status"], "invalid_key", "{probe}");
    let call = ai_call(&kw, &token, &account, &chat_body("openai", false, 8)).await;
    assert_eq!(call.status, 502, "{call}");
    let audit = kw.cli(&["audit", "export", "--account", &account]).stdout;
    for (what, text) in [
        ("test answer", probe.text.as_str()),
        ("call answer", call.text.as_str()),
        ("audit", audit.as_str()),
    ] {
        assert!(
            text.contains("Incorrect API key provided"),
            "{what}: the provider's message is passed on: {text}"
        );
        assert!(
            !text.contains(secret_start),
            "{what} shows the key's first characters: {text}"
        );
    }
}
