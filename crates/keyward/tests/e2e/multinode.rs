//! Several nodes on one PostgreSQL (issue 6): each node its own data dir and workers, the
//! same KEK and audit-chain key (copied from the first node, as the README says), one
//! database. Caps, the audit chain and key rotation must hold across nodes, and a database
//! outage must give clean 503s and lose nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::{Keyward, Options};
use serde_json::json;

use crate::ai_support::*;
use crate::common::*;

/// Node A (first start: owner and account) and node B (same keys), both on `db`.
fn two_nodes(fake: &FakeProviders, db: &TempDatabase) -> (Keyward, Keyward) {
    let opts = |o: Options| o.env("KEYWARD_DATABASE_URL", &db.url).log("info");
    let a = start_with(opts(fake_options(fake, &[])));
    let b = start_with(opts(fake_options(fake, &[]).same_keys_as(&a)));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_hold_across_two_nodes() {
    let Some(server) = server_url("caps_hold_across_two_nodes") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let (a, b) = two_nodes(&fake, &db);
    let (token, account) = (a.owner_token().to_owned(), a.owner_account().to_owned());
    let shared = key_for("openai");
    fake.set_key(None, &shared, Behaviour::Ok);
    set_shared_key(&a, "openai", &shared);
    // Each call reserves its input bytes plus max_tokens; a limit of 10 credits fits a few.
    set_limit(&a, &account, 10);
    let nodes = Arc::new([a, b]);
    let mut tasks = Vec::new();
    for i in 0..80 {
        let (nodes, token, account) = (nodes.clone(), token.clone(), account.clone());
        tasks.push(tokio::spawn(async move {
            let node = &nodes[i % 2];
            let body = json!({"provider": "openai", "model": "gpt-6-luna", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2000});
            node.http().post(&ai_path(&account), Some(&token), &body).await
        }));
    }
    let (mut ok, mut refused, mut charged) = (0, 0, 0i64);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => {
                ok += 1;
                charged += r.json()["credits_charged"].as_i64().unwrap();
            }
            429 => {
                assert_eq!(code(&r), "shared_quota_exhausted", "{r}");
                refused += 1;
            }
            _ => panic!("unexpected answer: {r}"),
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    eprintln!("two nodes: {ok} shared calls served, {refused} refused, {charged} of 10 credits charged");
    assert!(charged <= 10, "charged {charged} credits past a limit of 10");
    let usage = nodes[1].http().get(&usage_path(&account), Some(&token)).await;
    assert_eq!(usage.json()["shared"]["credits_used"].as_i64().unwrap(), charged);
    assert_audit_ok(&nodes[0], Some(&account));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_actions_on_two_nodes_leave_one_valid_chain_and_rotation_is_seen_everywhere() {
    let Some(server) = server_url("concurrent_actions_on_two_nodes") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let (a, b) = two_nodes(&fake, &db);
    let (token, account) = (a.owner_token().to_owned(), a.owner_account().to_owned());
    let first = key_for("anthropic");
    fake.set_key(None, &first, Behaviour::Ok);
    save_key(&a, &token, &account, "anthropic", &first).await;
    set_source(&b, &token, &account, "anthropic", "own").await;

    let nodes = Arc::new([a, b]);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (nodes, token, account) = (nodes.clone(), token.clone(), account.clone());
        let key = key_for("openai");
        tasks.push(tokio::spawn(async move {
            let node = &nodes[i % 2];
            if i % 2 == 0 {
                node.http()
                    .put(&key_path(&account, "openai"), Some(&token), &json!({"api_key": key}))
                    .await
                    .status
            } else {
                ai_call(node, &token, &account, &chat_body("anthropic", i % 4 == 1, 8))
                    .await
                    .status
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_audit_ok(&nodes[0], Some(&account));

    // Rotate on A; the next call through B uses the new key.
    let second = key_for("anthropic");
    fake.set_key(None, &second, Behaviour::Ok);
    save_key(&nodes[0], &token, &account, "anthropic", &second).await;
    fake.clear_requests();
    let r = ai_call(&nodes[1], &token, &account, &chat_body("anthropic", false, 8)).await;
    assert_eq!(r.status, 200, "{r}");
    let seen: Vec<_> = fake
        .requests()
        .iter()
        .filter_map(|q| q.header("x-api-key").map(str::to_owned))
        .collect();
    assert_eq!(
        seen,
        vec![second.clone()],
        "node B must call with the key rotated on node A"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_gives_clean_503s_and_loses_nothing() {
    let Some(server) = server_url("a_database_outage") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let kw = start_with(
        fake_options(&fake, &[])
            .env("KEYWARD_DATABASE_URL", &db.url)
            .log("info"),
    );
    let (token, account) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let key = key_for("openai");
    fake.set_key(None, &key, Behaviour::Ok);
    save_key(&kw, &token, &account, "openai", &key).await;
    set_source(&kw, &token, &account, "openai", "own").await;

    let kw = Arc::new(kw);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (kw, token, account, stop) = (kw.clone(), token.clone(), account.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut unavailable) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = ai_call(&kw, &token, &account, &chat_body("openai", false, 8)).await;
                match r.status {
                    200 => ok += 1,
                    503 => {
                        assert!(matches!(code(&r), "database_unavailable"), "{r}");
                        unavailable += 1;
                    }
                    _ => panic!("during an outage only 200 or 503 may answer: {r}"),
                }
            }
            (ok, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Kill every connection a few times over a second: the outage.
    let mut killed = 0;
    for _ in 0..5 {
        killed += db.kill_connections().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(killed > 0, "there were connections to kill");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, unavailable) = caller.await.unwrap();
    eprintln!("outage: {killed} connections killed; {ok} calls answered 200, {unavailable} answered 503");

    // Recovered by itself: ready, and a call succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if kw.http().get("/readyz", None).await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "keyward did not recover after the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ai_call(&kw, &token, &account, &chat_body("openai", false, 8))
            .await
            .status,
        200
    );

    // Nothing lost: every call answered 200 has its ai.request event (plus the last one).
    let events = audit_events(&kw, &token, &account).await;
    let ai_ok = events
        .iter()
        .filter(|e| e["action"] == "ai.request" && e["outcome"] == "ok")
        .count() as u64;
    assert!(
        ai_ok > ok,
        "{ai_ok} ai.request events for {} answered calls ({unavailable} 503s)",
        ok + 1
    );
    assert_audit_ok(&kw, Some(&account));
    // The saved key is intact.
    assert_eq!(
        list_keys(&kw, &token, &account).await["openai"]["key"]["last4"],
        last4(&key)
    );
}
