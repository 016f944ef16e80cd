//! The provisioning API (issue 22, part 2), through the real binary: idempotent replays,
//! one account from 20 concurrent creations (SQLite and PostgreSQL), a downgrade to free,
//! deleting an account (no ciphertext left in the database or its WAL, the chain closed and
//! verifiable), and bad input refused with nothing written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::db;
use keyward_testkit::files::contains;
use keyward_testkit::http::RawRequest;
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::sqlx;
use keyward_testkit::Keyward;
use reqwest::Method;
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;
use crate::services::create_service;

fn account_path(ext: &str) -> String {
    format!("/v1/external/accounts/{ext}")
}

fn user_path(ext: &str) -> String {
    format!("/v1/external/users/{ext}")
}

fn member_path(account: &str, user: &str) -> String {
    format!("/v1/external/accounts/{account}/members/{user}")
}

/// The account's audit chain as `audit export` prints it (works after deletion too).
fn exported(kw: &Keyward, account: &str) -> Vec<Value> {
    let out = kw.cli(&["audit", "export", "--account", account]);
    out.assert_success();
    out.json_lines()
}

fn actions(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_every_call_three_times_gives_the_same_state_and_no_extra_events() {
    let kw = start();
    let (_, svc) = create_service(&kw, "provisioning", &["accounts:manage"]);
    let http = kw.http();
    let mut answers: Vec<Value> = Vec::new();
    let replay = |r: keyward_testkit::Resp, status: u16| {
        r.expect_status(status);
        r.json.clone().unwrap_or(Value::Null)
    };
    // Each call three times: the same answer each time.
    let calls: Vec<(Method, String, Option<Value>, u16)> = vec![
        (
            Method::PUT,
            account_path("org-1"),
            Some(json!({"name": "Acme", "plan": "pro"})),
            200,
        ),
        (
            Method::PUT,
            user_path("u-1"),
            Some(json!({"email": "ana@acme.test"})),
            200,
        ),
        (
            Method::PUT,
            user_path("u-2"),
            Some(json!({"email": "bo@acme.test"})),
            200,
        ),
        (
            Method::PUT,
            member_path("org-1", "u-1"),
            Some(json!({"role": "owner"})),
            200,
        ),
        (
            Method::PUT,
            member_path("org-1", "u-2"),
            Some(json!({"role": "member"})),
            200,
        ),
        (
            Method::PUT,
            member_path("org-1", "u-2"),
            Some(json!({"role": "admin"})),
            200,
        ),
        (
            Method::PUT,
            user_path("u-2"),
            Some(json!({"email": "bo@new.acme.test"})),
            200,
        ),
        (
            Method::PUT,
            account_path("org-1"),
            Some(json!({"name": "Acme Inc", "plan": "business", "shared_credit_limit": 5000})),
            200,
        ),
        (
            Method::PUT,
            account_path("org-1"),
            Some(json!({"name": "Acme Inc", "plan": "free"})),
            200,
        ),
        (Method::GET, account_path("org-1"), None, 200),
        (Method::DELETE, member_path("org-1", "u-2"), None, 204),
    ];
    for (method, path, body, status) in &calls {
        let mut first: Option<Value> = None;
        for _ in 0..3 {
            let r = http.send(method.clone(), path, Some(&svc), body.as_ref()).await;
            let v = replay(r, *status);
            match &first {
                None => first = Some(v),
                Some(f) => assert_eq!(&v, f, "{method} {path}: a replay answered differently"),
            }
        }
        answers.push(first.unwrap_or(Value::Null));
    }
    let account = answers[0]["account_id"].as_str().unwrap().to_owned();
    assert!(is_hex_id(&account, "acc_"), "{}", answers[0]);
    assert_eq!(
        answers[0],
        json!({"account_id": account, "external_id": "org-1", "name": "Acme", "plan": "pro", "shared_credit_limit": 20000})
    );
    assert_eq!(answers[1]["external_id"], "u-1");
    assert_eq!(answers[4]["role"], "member");
    assert_eq!(answers[5]["role"], "admin");
    assert_eq!(answers[6]["email"], "bo@new.acme.test");
    assert_eq!(answers[6]["user_id"], answers[2]["user_id"], "the same user");
    assert_eq!(
        answers[9],
        json!({"account_id": account, "external_id": "org-1", "name": "Acme Inc", "plan": "free", "shared_credit_limit": 1000}),
        "GET answers what the last PUT set"
    );
    // Two plan changes, each once, in the chain, by the service.
    let events = exported(&kw, &account);
    assert_eq!(
        actions(&events),
        ["account.plan_changed", "account.plan_changed"],
        "{events:?}"
    );
    assert_eq!(
        events[0]["detail"],
        "pro -> business; shared_credit_limit 20000 -> 5000"
    );
    assert_eq!(
        events[1]["detail"],
        "business -> free; shared_credit_limit 5000 -> 1000"
    );
    assert!(
        events.iter().all(|e| e["actor"] == "service:provisioning"),
        "{events:?}"
    );
    // The account's DELETE: 204, then 404 for each replay.
    http.delete(&account_path("org-1"), Some(&svc)).await.expect_status(204);
    for _ in 0..2 {
        http.delete(&account_path("org-1"), Some(&svc))
            .await
            .expect_error(404, "not_found");
    }
    http.get(&account_path("org-1"), Some(&svc))
        .await
        .expect_error(404, "not_found");
    assert_eq!(
        actions(&exported(&kw, &account)).last().map(String::as_str),
        Some("account.deleted")
    );
    // The CLI's set-plan is audited the same way (actor cli), and not when nothing changes.
    let owner_account = kw.owner_account().to_owned();
    for _ in 0..3 {
        set_plan(&kw, &owner_account, "business");
    }
    let events = exported(&kw, &owner_account);
    let changes: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "account.plan_changed")
        .collect();
    assert_eq!(changes.len(), 1, "{events:?}");
    assert_eq!(
        (changes[0]["actor"].as_str(), changes[0]["detail"].as_str()),
        (
            Some("cli"),
            Some("pro -> business; shared_credit_limit 20000 -> 100000")
        )
    );
    assert_audit_ok(&kw, None);
}

/// 20 PUTs of one new external id at once: exactly one account. Returns the number of
/// accounts with that external id, read from the database.
async fn twenty_concurrent_creations(kws: &[Arc<Keyward>], token: &str) -> String {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let kw = kws[i % kws.len()].clone();
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            kw.http()
                .put(
                    &account_path("race-42"),
                    Some(&token),
                    &json!({"name": "Race", "plan": "pro"}),
                )
                .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        r.expect_status(200);
        ids.insert(r.json()["account_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "the 20 answers named {ids:?}");
    ids.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creations_make_one_account_on_sqlite() {
    let kw = Arc::new(start());
    let (_, svc) = create_service(&kw, "provisioning", &["accounts:manage"]);
    let id = twenty_concurrent_creations(std::slice::from_ref(&kw), &svc).await;
    let pool = kw.db().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts WHERE external_id = 'race-42'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let all: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
        .fetch_one(&pool)
        .await
        .unwrap();
    eprintln!("sqlite: 20 concurrent PUTs of one new external id made {n} account(s) ({id})");
    assert_eq!((n, all), (1, 2), "the first start's account and the raced one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creations_make_one_account_on_postgres_across_two_nodes() {
    let Some(server) = server_url("twenty_concurrent_creations_make_one_account_on_postgres") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let opts = || {
        keyward_testkit::Options::default()
            .env("KEYWARD_DATABASE_URL", &db.url)
            .log("info")
    };
    let a = start_with(opts());
    let b = start_with(opts().same_keys_as(&a));
    let (_, svc) = create_service(&a, "provisioning", &["accounts:manage"]);
    let nodes = [Arc::new(a), Arc::new(b)];
    let id = twenty_concurrent_creations(&nodes, &svc).await;
    let pool = db.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts WHERE external_id = 'race-42'")
        .fetch_one(&pool)
        .await
        .unwrap();
    eprintln!("postgres (two nodes): 20 concurrent PUTs of one new external id made {n} account(s) ({id})");
    assert_eq!(n, 1);
    assert_audit_ok(&nodes[0], Some(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_to_free_refuses_key_saves_and_sends_own_key_calls_to_the_shared_pool() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let shared = key_for("openai");
    fake.set_key(provider("openai"), &shared, Behaviour::Ok);
    set_shared_key(&kw, "openai", &shared);
    let (_, svc) = create_service(&kw, "provisioning", &["accounts:manage"]);
    let r = kw
        .http()
        .put(
            &account_path("org-9"),
            Some(&svc),
            &json!({"name": "Nine", "plan": "pro"}),
        )
        .await;
    r.expect_status(200);
    let account = r.json()["account_id"].as_str().unwrap().to_owned();
    // A provisioned account has no owner yet: give it one with a token (the CLI's user).
    let owner = create_user(&kw, "owner@nine.test");
    add_member(&kw, &account, &owner.email, "owner");
    let own = key_for("openai");
    fake.set_key(provider("openai"), &own, Behaviour::Ok);
    save_key(&kw, &owner.token, &account, "openai", &own).await;
    set_source(&kw, &owner.token, &account, "openai", "own").await;
    let chat = chat_body("openai", false, 20);
    let r = ai_call(&kw, &owner.token, &account, &chat).await;
    r.expect_status(200);
    assert_eq!(r.json()["key_source"], "own");

    // Downgrade: takes effect with the next call.
    kw.http()
        .put(
            &account_path("org-9"),
            Some(&svc),
            &json!({"name": "Nine", "plan": "free"}),
        )
        .await
        .expect_status(200);
    fake.clear_requests();
    let r = ai_call(&kw, &owner.token, &account, &chat).await;
    r.expect_status(200);
    assert_eq!(r.json()["key_source"], "shared", "{r}");
    assert!(r.json()["credits_charged"].as_i64().unwrap() > 0, "metered: {r}");
    let sent = fake.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let problems = key_placement_problems("openai", &sent[0], &shared);
    assert!(
        problems.is_empty(),
        "the call did not go out with the shared key: {problems:?}"
    );
    // The pass-through too.
    let r = crate::services::native_chat(&kw, "openai", &account, &owner.token, &[]).await;
    r.expect_status(200);
    let last = audit_events(&kw, &owner.token, &account).await;
    let calls: Vec<&Value> = last.iter().filter(|e| e["action"] == "ai.request").take(2).collect();
    for e in &calls {
        assert_eq!(
            (e["key_source"].as_str(), e["key_last4"].as_str()),
            (Some("shared"), None),
            "{e}"
        );
    }
    // Saving or switching to an own key: 403 plan_required. The saved key stays saved.
    kw.http()
        .put(
            &key_path(&account, "openai"),
            Some(&owner.token),
            &json!({"api_key": key_for("openai")}),
        )
        .await
        .expect_error(403, "plan_required");
    kw.http()
        .put(
            &key_path(&account, "anthropic"),
            Some(&owner.token),
            &json!({"api_key": key_for("anthropic")}),
        )
        .await
        .expect_error(403, "plan_required");
    set_source(&kw, &owner.token, &account, "openai", "shared").await;
    kw.http()
        .put(
            &source_path(&account, "openai"),
            Some(&owner.token),
            &json!({"source": "own"}),
        )
        .await
        .expect_error(403, "plan_required");
    let keys = list_keys(&kw, &owner.token, &account).await;
    assert_eq!(
        keys["openai"]["key"]["last4"].as_str(),
        Some(last4(&own)),
        "the key stays saved"
    );
    // The change is in the chain, by the service.
    let changes: Vec<Value> = exported(&kw, &account)
        .into_iter()
        .filter(|e| e["action"] == "account.plan_changed")
        .collect();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["actor"], "service:provisioning");
    assert!(
        changes[0]["detail"].as_str().unwrap().starts_with("pro -> free"),
        "{}",
        changes[0]
    );
    // Upgrading again lets the saved key be used again.
    kw.http()
        .put(
            &account_path("org-9"),
            Some(&svc),
            &json!({"name": "Nine", "plan": "pro"}),
        )
        .await
        .expect_status(200);
    set_source(&kw, &owner.token, &account, "openai", "own").await;
    let r = ai_call(&kw, &owner.token, &account, &chat).await;
    assert_eq!(r.json()["key_source"], "own", "{r}");
    assert_audit_ok(&kw, Some(&account));
}

/// Where pieces of `blob` (past its 12-byte common header, in 16-byte chunks) remain in the
/// data dir's database files (the database, its WAL and shared memory).
fn blob_remnants(kw: &Keyward, blob: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, bytes) in kw.data_files() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with("keyward.db") {
            continue;
        }
        for (i, chunk) in blob.get(12..).unwrap_or_default().chunks(16).enumerate() {
            if chunk.len() == 16 && contains(&bytes, chunk) {
                found.push(format!("{name}: blob bytes {}..{}", 12 + 16 * i, 12 + 16 * i + 16));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_leaves_no_ciphertext_and_its_chain_ends_in_account_deleted() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (_, svc) = create_service(&kw, "provisioning", &["accounts:manage"]);
    let r = kw
        .http()
        .put(
            &account_path("org-del"),
            Some(&svc),
            &json!({"name": "Doomed", "plan": "business"}),
        )
        .await;
    let account = r.json()["account_id"].as_str().unwrap().to_owned();
    let owner = create_user(&kw, "owner@doomed.test");
    add_member(&kw, &account, &owner.email, "owner");
    let mut last4s = Vec::new();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Ok);
        save_key(&kw, &owner.token, &account, p, &k).await;
        last4s.push((p, last4(&k).to_owned()));
    }
    set_source(&kw, &owner.token, &account, "google", "own").await;
    // Another account's key must stay.
    let (other_owner, other) = pro_owner(&kw, "other@else.test");
    save_key(&kw, &other_owner.token, &other, "openai", &key_for("openai")).await;
    let pool = kw.db().await;
    let blobs: Vec<Vec<u8>> = db::key_rows(&pool, &account)
        .await
        .into_iter()
        .map(|r| r.sealed)
        .collect();
    assert_eq!(blobs.len(), 3);
    pool.close().await;
    for b in &blobs {
        assert!(!blob_remnants(&kw, b).is_empty(), "the test must see the blob before");
    }

    let at = Instant::now();
    kw.http()
        .delete(&account_path("org-del"), Some(&svc))
        .await
        .expect_status(204);
    for b in &blobs {
        loop {
            let left = blob_remnants(&kw, b);
            if left.is_empty() {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(5),
                "ciphertext still in the database files 5 s after the delete: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "account deleted; its 3 blobs left the database and its WAL within {:?}",
        at.elapsed()
    );
    // The account is gone for its users; the other account is untouched.
    kw.http()
        .get(&keys_path(&account), Some(&owner.token))
        .await
        .expect_error(404, "not_found");
    let me = kw.http().get("/v1/me", Some(&owner.token)).await;
    assert_eq!(me.json()["accounts"], json!([]), "{me}");
    assert!(list_keys(&kw, &other_owner.token, &other).await["openai"]["key"].is_object());
    // The chain stays, verifies, and ends with the removals and account.deleted.
    let v = assert_audit_ok(&kw, Some(&account));
    assert!(v["events"].as_u64().unwrap() >= 5, "{v}");
    assert_audit_ok(&kw, None);
    let events = exported(&kw, &account);
    let tail: Vec<(String, Value, Value, Value)> = events[events.len() - 4..]
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["provider"].clone(),
                e["key_last4"].clone(),
                e["actor"].clone(),
            )
        })
        .collect();
    let mut sorted = last4s.clone();
    sorted.sort();
    let mut want: Vec<(String, Value, Value, Value)> = sorted
        .iter()
        .map(|(p, l)| {
            (
                "key.removed".to_owned(),
                json!(p),
                json!(l),
                json!("service:provisioning"),
            )
        })
        .collect();
    want.push((
        "account.deleted".to_owned(),
        Value::Null,
        Value::Null,
        json!("service:provisioning"),
    ));
    assert_eq!(tail, want);
    assert_eq!(events.last().unwrap()["detail"], "external id org-del");
    // Replays: 404, and nothing more in the chain.
    kw.http()
        .delete(&account_path("org-del"), Some(&svc))
        .await
        .expect_error(404, "not_found");
    assert_eq!(exported(&kw, &account).len(), events.len());
    // The external id is free again: a PUT makes a new account.
    let r = kw
        .http()
        .put(
            &account_path("org-del"),
            Some(&svc),
            &json!({"name": "Reborn", "plan": "pro"}),
        )
        .await;
    r.expect_status(200);
    assert_ne!(r.json()["account_id"].as_str(), Some(account.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provisioning_input_is_refused_with_422_and_nothing_is_written() {
    let kw = start();
    let (_, svc) = create_service(&kw, "provisioning", &["accounts:manage"]);
    let http = kw.http();
    let long = "x".repeat(129);
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "A", "plan": "pro", "owner": "x"}),
            "unknown field",
        ),
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "A", "plan": "enterprise"}),
            "plan",
        ),
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "A", "plan": "Pro"}),
            "plan",
        ),
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "", "plan": "pro"}),
            "name",
        ),
        (Method::PUT, account_path("org-1"), json!({"name": "A"}), "plan"),
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "A", "plan": "pro", "shared_credit_limit": -1}),
            "shared_credit_limit",
        ),
        (
            Method::PUT,
            account_path("org-1"),
            json!({"name": "A", "plan": "pro", "shared_credit_limit": "5"}),
            "wrong type",
        ),
        (
            Method::PUT,
            account_path(&long),
            json!({"name": "A", "plan": "pro"}),
            "external id",
        ),
        (
            Method::PUT,
            account_path("org%201"),
            json!({"name": "A", "plan": "pro"}),
            "external id",
        ),
        (Method::PUT, user_path("u-1"), json!({"email": "not-an-email"}), "email"),
        (
            Method::PUT,
            user_path("u-1"),
            json!({"email": "a@b.c", "name": "Ana"}),
            "unknown field",
        ),
        (Method::PUT, user_path("u 1"), json!({"email": "a@b.c"}), "external id"),
        (
            Method::PUT,
            member_path("org-1", "u-1"),
            json!({"role": "boss"}),
            "role",
        ),
        (
            Method::PUT,
            member_path("org-1", "u-1"),
            json!({"role": "member", "x": 1}),
            "unknown field",
        ),
    ];
    for (method, path, body, says) in &cases {
        let r = http.send(method.clone(), path, Some(&svc), Some(body)).await;
        r.expect_error(422, "validation_error");
        let message = r.error_message().unwrap_or_default();
        assert!(
            message.contains(says),
            "{method} {path} {body}: message should name {says:?}: {r}"
        );
    }
    // Not JSON, or not said to be JSON.
    let r = http
        .raw(
            RawRequest::new(Method::PUT, &account_path("org-1"))
                .token(&svc)
                .json_bytes("{"),
        )
        .await;
    r.expect_error(400, "invalid_json");
    let r = http
        .raw(
            RawRequest::new(Method::PUT, &account_path("org-1"))
                .token(&svc)
                .content_type("text/plain")
                .body(r#"{"name": "A", "plan": "pro"}"#),
        )
        .await;
    r.expect_error(415, "unsupported_media_type");
    // Too large, like every JSON route.
    let big = json!({"name": "A".repeat(70_000), "plan": "pro"});
    http.put(&account_path("org-1"), Some(&svc), &big)
        .await
        .expect_error(413, "payload_too_large");
    // Nothing was written.
    http.get(&account_path("org-1"), Some(&svc))
        .await
        .expect_error(404, "not_found");
    http.put(&member_path("org-1", "u-1"), Some(&svc), &json!({"role": "member"}))
        .await
        .expect_error(404, "not_found");
    assert_eq!(
        kw.cli(&["audit", "verify"]).json()["accounts"],
        1,
        "only the first start's account"
    );

    // Unknown account or user: 404. An email another user has: 409 conflict.
    http.put(&account_path("org-1"), Some(&svc), &json!({"name": "A", "plan": "pro"}))
        .await
        .expect_status(200);
    http.put(&member_path("org-1", "u-1"), Some(&svc), &json!({"role": "member"}))
        .await
        .expect_error(404, "not_found");
    http.delete(&member_path("org-1", "u-1"), Some(&svc))
        .await
        .expect_error(404, "not_found");
    http.delete(&member_path("org-9", "u-1"), Some(&svc))
        .await
        .expect_error(404, "not_found");
    let r = http
        .put(&user_path("u-1"), Some(&svc), &json!({"email": "owner@localhost"}))
        .await;
    r.expect_error(409, "conflict");
    http.put(&user_path("u-1"), Some(&svc), &json!({"email": "ana@acme.test"}))
        .await
        .expect_status(200);
    http.put(&user_path("u-2"), Some(&svc), &json!({"email": "ANA@acme.test"}))
        .await
        .expect_error(409, "conflict");
    http.get(&user_path("u-2"), Some(&svc)).await.expect_status(405);
}
