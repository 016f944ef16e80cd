//! The providers as they are today (December 2026), through the real binary against
//! `keyward-fakes`: Google auth keys, the catalogue's lifecycle (retired models refused with
//! their replacement, current ones served), "Test key" telling a bad key from a missing model,
//! rate-limit headroom, a key the provider reports as leaked, and `keyward catalogue`.

use keyward_core::{ModelStatus, Provider};
use keyward_fakes::{Behaviour, FakeProviders};
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;

/// The models of the product page's 2024 list, which the providers have since retired or
/// deprecated, with what keyward now says about each.
const SEED_MODELS: [(&str, &str); 8] = [
    ("anthropic", "claude-3-5-sonnet-20241022"),
    ("anthropic", "claude-3-haiku-20240307"),
    ("anthropic", "claude-3-opus-20240229"),
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4-turbo"),
    ("google", "gemini-1.5-pro"),
    ("google", "gemini-1.5-flash"),
];

/// An own-key account on `fake` for every provider, each key answering `ok`.
async fn own_keys_everywhere(
    kw: &keyward_testkit::Keyward,
    fake: &FakeProviders,
    email: &str,
) -> (User, String, Vec<String>) {
    let (user, acc) = pro_owner(kw, email);
    let mut keys = Vec::new();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Ok);
        save_key(kw, &user.token, &acc, p, &k).await;
        set_source(kw, &user.token, &acc, p, "own").await;
        keys.push(k);
    }
    (user, acc, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_key_is_saved_shown_by_last4_and_used_for_calls() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "auth-key@example.com");
    let t = user.token.as_str();
    let key = google_key();
    assert!(key.starts_with("AQ.") && key.len() == 53);
    fake.set_key(Provider::Google, &key, Behaviour::Ok);
    let saved = save_key(&kw, t, &acc, "google", &key).await;
    assert_eq!(saved["key"]["last4"], last4(&key));
    assert_eq!(saved["key"]["kind"], "google_auth");
    assert!(
        saved["key"]["notice"].is_null(),
        "an auth key needs no warning: {saved}"
    );
    set_source(&kw, t, &acc, "google", "own").await;

    fake.clear_requests();
    for stream in [false, true] {
        let r = ai_call(&kw, t, &acc, &chat_body("google", stream, 50)).await;
        r.expect_status(200);
        if !stream {
            assert_eq!(r.json()["content"], fake_reply("google"), "{r}");
            assert_eq!(r.json()["model"], default_model("google"), "{r}");
        }
    }
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    for req in &reqs {
        assert_eq!(
            req.header("x-goog-api-key"),
            Some(key.as_str()),
            "the auth key, in its header"
        );
        assert!(req.query.as_deref().is_none_or(|q| !q.contains("key=")));
    }
    let events = audit_events(&kw, t, &acc).await;
    let calls: Vec<&Value> = events.iter().filter(|e| e["action"] == "ai.request").collect();
    assert_eq!(calls.len(), 2);
    assert!(calls
        .iter()
        .all(|e| e["key_last4"] == last4(&key) && e["outcome"] == "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_google_key_is_saved_with_the_warning_and_its_refusal_says_what_to_do() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "standard-key@example.com");
    let t = user.token.as_str();
    let key = google_standard_key();
    // Registered as fine: Google refuses standard keys anyway.
    fake.set_key(Provider::Google, &key, Behaviour::Ok);
    let saved = save_key(&kw, t, &acc, "google", &key).await;
    assert_eq!(saved["key"]["kind"], "google_standard");
    let notice = saved["key"]["notice"].as_str().unwrap_or_default();
    assert!(
        notice.contains("stopped accepting standard keys") && notice.contains("auth key"),
        "{saved}"
    );
    let listed = list_keys(&kw, t, &acc).await;
    assert_eq!(listed["google"]["key"]["notice"], notice);

    let r = key_test(&kw, t, &acc, "google").await;
    let v = r.json();
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (json!(false), json!("invalid_key")),
        "{r}"
    );
    assert_eq!(v["provider_status"], 400, "{r}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("API key not valid"),
        "{r}"
    );
    assert_eq!(v["advice"], notice, "the advice names the kind of key: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_seed_models_are_refused_naming_the_replacement_and_current_ones_are_served() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc, _) = own_keys_everywhere(&kw, &fake, "models@example.com").await;
    let t = user.token.as_str();
    let cat = catalogue();

    for (p, model) in SEED_MODELS {
        let entry = cat.model(provider(p), model).unwrap();
        let mut body = chat_body(p, false, 8);
        body["model"] = json!(model);
        fake.clear_requests();
        let r = ai_call(&kw, t, &acc, &body).await;
        match entry.status {
            ModelStatus::Retired => {
                let replacement = entry.replaced_by.as_deref().unwrap();
                r.expect_error(422, "model_retired");
                assert_eq!(r.json()["error"]["replaced_by"], replacement, "{r}");
                let msg = r.error_message().unwrap_or_default();
                assert!(
                    msg.contains(model) && msg.contains(replacement) && msg.contains("retired"),
                    "{p} {model}: {msg}"
                );
                assert!(fake.requests().is_empty(), "{model}: nothing reached the provider");
            }
            // The 2024 GPT-4o models are deprecated, not yet shut down: still served.
            ModelStatus::Deprecated => {
                r.expect_status(200);
                assert_eq!(r.json()["model"], model, "{r}");
            }
            ModelStatus::Active => panic!("{model} is no longer active at its provider"),
        }
    }
    // Through the pass-through too, in the provider's own error envelope.
    let r = kw
        .http()
        .raw(
            keyward_testkit::http::RawRequest::new(
                keyward_testkit::reqwest::Method::POST,
                &format!("/v1/accounts/{acc}/providers/anthropic/v1/messages"),
            )
            .header("x-api-key", t)
            .header("anthropic-version", "2023-06-01")
            .json_bytes(
                json!({"model": "claude-3-haiku-20240307", "max_tokens": 8, "messages": [{"role": "user", "content": PROMPT}]})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    assert_eq!(r.json()["type"], "error", "{r}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("claude-haiku-5-5"),
        "{r}"
    );

    // Every chat model keyward offers today is served, for every provider.
    for p in PROVIDERS {
        for m in cat.served_chat(provider(p)) {
            let mut body = chat_body(p, false, 8);
            body["model"] = json!(m.id);
            let r = ai_call(&kw, t, &acc, &body).await;
            r.expect_status(200);
            assert_eq!(r.json()["model"], m.id.as_str(), "{r}");
        }
    }
    // The listing shows the served chat models only.
    let listed = list_keys(&kw, t, &acc).await;
    for p in PROVIDERS {
        let ids: Vec<String> = cat.served_chat(provider(p)).map(|m| m.id.clone()).collect();
        assert_eq!(listed[p]["models"], json!(ids), "{p}");
    }
    // An embedding model is not a chat model: refused, saying which route takes it.
    let mut body = chat_body("openai", false, 8);
    body["model"] = json!("text-embedding-3-small");
    let r = ai_call(&kw, t, &acc, &body).await;
    r.expect_error(422, "validation_error");
    assert!(r.error_message().unwrap_or_default().contains("embedding model"), "{r}");
    assert_audit_ok(&kw, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_test_tells_a_missing_model_from_a_bad_key() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc, keys) = own_keys_everywhere(&kw, &fake, "probe@example.com").await;
    let t = user.token.as_str();
    for (p, key) in PROVIDERS.iter().zip(&keys) {
        let probe = probe_model(p);
        // The provider took the probe model away (a retirement keyward has not heard of).
        fake.set_model_available(provider(p), &probe, false);
        fake.clear_requests();
        let r = key_test(&kw, t, &acc, p).await;
        let v = r.json();
        assert_eq!(v["ok"], false, "{r}");
        assert_eq!(v["status"], "model_not_available", "{r}");
        assert_eq!(v["key_valid"], true, "{p}: the key itself works: {r}");
        let expected: Vec<String> = catalogue()
            .served_chat(provider(p))
            .filter(|m| m.id != probe)
            .map(|m| m.id.clone())
            .collect();
        assert_eq!(v["models"], json!(expected), "{p}: {r}");
        // The probe, then the free listing, both with the key in its header.
        let reqs = fake.requests();
        assert_eq!(reqs.len(), 2, "{p}");
        assert_eq!(reqs[1].method, "GET");
        assert!(reqs.iter().all(|q| key_placement_problems(p, q, key).is_empty()), "{p}");
        let listed = list_keys(&kw, t, &acc).await;
        let last = &listed[*p]["key"]["last_test"];
        assert_eq!(
            (last["ok"].clone(), last["status"].clone()),
            (json!(false), json!("model_not_available")),
            "{last}"
        );
        assert_eq!(last["key_valid"], true, "{last}");
        // A bad key is still a bad key.
        fake.remove_key(provider(p), key);
        let r = key_test(&kw, t, &acc, p).await;
        assert_eq!(r.json()["status"], "invalid_key", "{r}");
        assert!(r.json()["key_valid"].is_null(), "{r}");
        fake.set_model_available(provider(p), &probe, true);
        fake.set_key(provider(p), key, Behaviour::Ok);
    }
    // The provider's not-found answers are counted by model.
    let metrics = kw.http().get("/metrics", None).await.text;
    for p in PROVIDERS {
        let line = format!(
            "keyward_model_not_found_total{{provider=\"{p}\",model=\"{}\"}} 1",
            probe_model(p)
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_test_reports_the_rate_limit_headroom_google_says_it_sends_none() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc, _) = own_keys_everywhere(&kw, &fake, "headroom@example.com").await;
    let t = user.token.as_str();
    for p in PROVIDERS {
        let r = key_test(&kw, t, &acc, p).await;
        let v = r.json();
        assert_eq!(v["ok"], true, "{r}");
        let stored = list_keys(&kw, t, &acc).await[p]["key"]["last_test"].clone();
        match p {
            "google" => {
                assert!(v["rate_limits"].is_null(), "{r}");
                assert!(
                    v["rate_limits_note"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("no rate-limit headers"),
                    "{r}"
                );
                assert_eq!(stored["rate_limits_note"], v["rate_limits_note"]);
            }
            _ => {
                let requests = &v["rate_limits"]["requests"];
                assert!(
                    requests["limit"].as_u64().unwrap_or(0) > requests["remaining"].as_u64().unwrap_or(u64::MAX),
                    "{p}: {r}"
                );
                assert!(
                    requests["reset"].is_string() && v["rate_limits"]["tokens"]["limit"].is_u64(),
                    "{r}"
                );
                assert_eq!(stored["rate_limits"], v["rate_limits"], "{p}: kept as last_test");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reported_as_leaked_stops_its_calls_until_it_is_replaced() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "leaked@example.com");
    let t = user.token.as_str();
    // A shared pool that would answer: calls must still not fall back to it.
    let pool = key_for("google");
    fake.set_key(Provider::Google, &pool, Behaviour::Ok);
    set_shared_key(&kw, "google", &pool);
    let key = google_key();
    fake.set_key(Provider::Google, &key, Behaviour::Leaked);
    save_key(&kw, t, &acc, "google", &key).await;
    set_source(&kw, t, &acc, "google", "own").await;

    let r = key_test(&kw, t, &acc, "google").await;
    let v = r.json();
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (json!(false), json!("key_reported_leaked")),
        "{r}"
    );
    assert_eq!(v["provider_status"], 403);
    assert!(v["advice"].as_str().unwrap_or_default().contains("leaked"), "{r}");
    let listed = list_keys(&kw, t, &acc).await;
    assert!(
        listed["google"]["key"]["reported_leaked_at"].is_string(),
        "{}",
        listed["google"]
    );

    // Calls on it are refused before any provider is asked, and audited.
    fake.clear_requests();
    for stream in [false, true] {
        let r = ai_call(&kw, t, &acc, &chat_body("google", stream, 8)).await;
        r.expect_error(409, "key_reported_leaked");
        let msg = r.error_message().unwrap_or_default();
        assert!(msg.contains("leaked") && msg.contains(last4(&key)), "{msg}");
    }
    assert!(fake.requests().is_empty(), "no call reached Google, on either key");
    let events = audit_events(&kw, t, &acc).await;
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["outcome"] == "refused:key_reported_leaked")
        .collect();
    assert_eq!(refused.len(), 2);
    assert!(refused
        .iter()
        .all(|e| e["key_last4"] == last4(&key) && e["key_source"] == "own"));

    // A new key replaces it, and calls work again.
    let fresh = google_key();
    fake.set_key(Provider::Google, &fresh, Behaviour::Ok);
    save_key(&kw, t, &acc, "google", &fresh).await;
    assert!(list_keys(&kw, t, &acc).await["google"]["key"]["reported_leaked_at"].is_null());
    ai_call(&kw, t, &acc, &chat_body("google", false, 8))
        .await
        .expect_status(200);

    // An AI call that meets the provider's leaked answer marks the key as well.
    fake.set_key(Provider::Google, &fresh, Behaviour::Leaked);
    let r = ai_call(&kw, t, &acc, &chat_body("google", false, 8)).await;
    r.expect_error(502, "provider_error");
    ai_call(&kw, t, &acc, &chat_body("google", false, 8))
        .await
        .expect_error(409, "key_reported_leaked");
    assert_audit_ok(&kw, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_check_names_the_models_a_provider_dropped() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    // No shared key yet: nothing can be asked.
    let out = kw.cli(&["catalogue", "check"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.json()["providers"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("set-shared-key"),
        "{out}"
    );

    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Ok);
        set_shared_key(&kw, p, &k);
    }
    fake.clear_requests();
    let out = kw.cli(&["catalogue", "check"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let v = out.json();
    for (i, p) in PROVIDERS.iter().enumerate() {
        let report = &v["providers"][i];
        assert_eq!(
            (report["provider"].clone(), report["ok"].clone()),
            (json!(p), json!(true)),
            "{out}"
        );
        // Only the retired models are missing, and they are expected to be.
        let missing = report["not_listed"].as_array().unwrap();
        assert!(
            missing
                .iter()
                .all(|m| m["status"] == "retired" && m["expected"] == true),
            "{out}"
        );
    }
    // One listing per provider, through a worker, with the shared key in its header.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert!(reqs.iter().all(|r| r.method == "GET"));

    // A provider drops its cheapest model and one other active one.
    fake.set_model_available(Provider::OpenAi, "gpt-6-luna", false);
    fake.set_model_available(Provider::OpenAi, "gpt-6.1-terra", false);
    let out = kw.cli(&["catalogue", "check"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("openai/gpt-6-luna (probe)") && out.stderr.contains("openai/gpt-6.1-terra"),
        "{out}"
    );
    let openai = &out.json()["providers"][1];
    assert_eq!(openai["ok"], false, "{out}");
    // One provider at a time.
    let out = kw.cli(&["catalogue", "check", "--provider", "google"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.json()["providers"].as_array().map(Vec::len), Some(1), "{out}");
    let out = kw.cli(&["catalogue", "check", "--provider", "mistral"]);
    assert!(!out.success(), "{out}");
}

#[test]
fn catalogue_show_prints_the_catalogue_and_a_bad_file_is_refused_at_start() {
    let kw = start();
    let out = kw.cli(&["catalogue", "show"]);
    out.assert_success();
    let v = out.json();
    let haiku = v["anthropic"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude-3-haiku-20240307")
        .cloned()
        .unwrap();
    assert_eq!(haiku["status"], "retired");
    assert_eq!(haiku["replaced_by"], "claude-haiku-5-5");
    for p in PROVIDERS {
        let probes: Vec<&Value> = v[p].as_array().unwrap().iter().filter(|m| m["probe"] == true).collect();
        assert_eq!(probes.len(), 1, "{p}");
        assert_eq!(probes[0]["status"], "active");
    }

    // A catalogue file with an unknown field, or no active probe, stops serve at start,
    // naming the problem.
    let dir = tempfile::tempdir().unwrap();
    let builtin = include_str!("../../../keyward-core/catalogue.toml");
    for (name, text, says) in [
        (
            "unknown-field.toml",
            builtin.replace("id = \"claude-haiku-5-5\"", "id = \"claude-haiku-5-5\"\nprobed = true"),
            "probed",
        ),
        (
            "no-probe.toml",
            builtin.replace("probe = true", "probe = false"),
            "no model has probe = true",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = std::process::Command::new(bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KEYWARD_") {
                cmd.env_remove(&k);
            }
        }
        let data = dir.path().join(format!("data-{name}"));
        let mut child = cmd
            .args(["serve"])
            .env("KEYWARD_ALLOW_SAME_USER", "1")
            .env("KEYWARD_DATA_DIR", &data)
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .env("KEYWARD_CATALOGUE", &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: serve started with a bad catalogue");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let run = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{name}: serve must refuse to start");
        assert!(
            stderr.contains("KEYWARD_CATALOGUE") && stderr.contains(says),
            "{name}: {stderr}"
        );
        let show = std::process::Command::new(bin())
            .args(["catalogue", "show"])
            .env("KEYWARD_DATA_DIR", &data)
            .env("KEYWARD_CATALOGUE", &path)
            .output()
            .unwrap();
        assert!(!show.status.success(), "{name}: catalogue show refuses it too");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_refusals_name_the_header_each_sdk_uses() {
    use keyward_testkit::http::RawRequest;
    use keyward_testkit::reqwest::Method;
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let acc = kw.owner_account().to_owned();
    let base = format!("/v1/accounts/{acc}/providers");
    let google = format!("{base}/google/v1beta/models/gemini-3.1-flash-lite:generateContent");
    let body = json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}).to_string();

    // A token in the URL is refused, saying where it goes; it is never used.
    let r = kw
        .http()
        .raw(RawRequest::new(Method::POST, &format!("{google}?key={}", kw.owner_token())).json_bytes(body.clone()))
        .await;
    assert_eq!(r.status, 422, "{r}");
    assert_eq!(r.json()["error"]["status"], "INVALID_ARGUMENT", "{r}");
    let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("x-goog-api-key") && msg.contains("?key="), "{msg}");
    assert!(!msg.contains("unsupported method"), "{msg}");
    assert!(!r.text.contains(kw.owner_token()), "the token is not repeated: {r}");

    // No token: each provider's 401 names that SDK's own header.
    for (path, header) in [
        (google.clone(), "x-goog-api-key"),
        (format!("{base}/anthropic/v1/messages"), "x-api-key"),
        (format!("{base}/openai/v1/chat/completions"), "Authorization: Bearer"),
    ] {
        let r = kw
            .http()
            .raw(RawRequest::new(Method::POST, &path).json_bytes(body.clone()))
            .await;
        assert_eq!(r.status, 401, "{r}");
        assert!(r.text.contains(header), "{path}: {r}");
        if header != "Authorization: Bearer" {
            assert!(!r.text.contains("Authorization: Bearer"), "{path}: {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_shared_key_the_advice_fits_the_account() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "advice@example.com");
    let t = user.token.as_str();
    // No shared key and no own key: save one.
    let r = ai_call(&kw, t, &acc, &chat_body("anthropic", false, 8)).await;
    r.expect_error(503, "shared_pool_unavailable");
    assert!(
        r.error_message()
            .unwrap_or_default()
            .contains("save your own Anthropic key"),
        "{r}"
    );
    // A saved key with the switch on shared: switch, not save.
    save_key(&kw, t, &acc, "anthropic", &key_for("anthropic")).await;
    let r = ai_call(&kw, t, &acc, &chat_body("anthropic", false, 8)).await;
    r.expect_error(503, "shared_pool_unavailable");
    let msg = r.error_message().unwrap_or_default();
    assert!(
        msg.contains("saved but not in use") && msg.contains("switch Anthropic to My key"),
        "{msg}"
    );
    assert!(!msg.contains("save your own"), "{msg}");
    // Through the SDK pass-through it is a configuration error, not an overload.
    let r = kw
        .http()
        .raw(
            keyward_testkit::http::RawRequest::new(
                keyward_testkit::reqwest::Method::POST,
                &format!("/v1/accounts/{acc}/providers/anthropic/v1/messages"),
            )
            .header("x-api-key", t)
            .json_bytes(
                json!({"model": "claude-haiku-5-5", "max_tokens": 8, "messages": [{"role": "user", "content": PROMPT}]})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(r.status, 503, "{r}");
    assert_eq!(r.json()["error"]["type"], "api_error", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywards_own_connection_failure_is_not_what_the_provider_said() {
    // A provider that cannot be reached: nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let kw = start_with(
        keyward_testkit::Options::default()
            .env("KEYWARD_OPENAI_BASE_URL", &url)
            .env("KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS", "1000"),
    );
    let web = crate::web::login_with_code(&kw).await;
    let acc = kw.owner_account().to_owned();
    save_key(&kw, kw.owner_token(), &acc, "openai", &key_for("openai")).await;
    web.act(&acc, "openai", "test", &[]).await;
    let page = web.page(&acc).await;
    let shown = crate::web::region(&page.text, "msg-openai-test");
    assert!(shown.contains("keyward&#39;s connection to OpenAI failed"), "{shown}");
    assert!(!shown.contains("OpenAI said"), "{shown}");
    assert!(
        !page.text.contains("The provider said: “OpenAI could not be reached"),
        "{page}"
    );
}
