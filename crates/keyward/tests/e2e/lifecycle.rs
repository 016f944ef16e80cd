//! The whole life of a user's keys over HTTP, and what a first start leaves behind.

use std::os::unix::fs::PermissionsExt;

use keyward_testkit::db;
use serde_json::{json, Value};

use crate::common::*;

/// Checks the shape of one ProviderState.
#[track_caller]
fn assert_state(state: &Value, provider: &str, source: &str, last4: Option<&str>) {
    assert_eq!(state["provider"], provider, "{state}");
    assert_eq!(state["source"], source, "{state}");
    assert!(state["models"].is_array(), "models must be an array: {state}");
    match last4 {
        None => assert!(state["key"].is_null(), "key should be null: {state}"),
        Some(l4) => {
            let key = &state["key"];
            assert_eq!(key["last4"], l4, "{state}");
            assert!(!key["created_at"].is_null() && !key["updated_at"].is_null(), "{state}");
            assert!(
                key.get("last_test").is_some(),
                "last_test must be present (null or object): {state}"
            );
            let fields: Vec<&str> = key
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            for f in &fields {
                assert!(
                    [
                        "last4",
                        "created_at",
                        "updated_at",
                        "last_test",
                        "kind",
                        "notice",
                        "reported_leaked_at"
                    ]
                    .contains(f),
                    "unexpected field {f:?} in a saved key's state: {state}"
                );
            }
        }
    }
}

#[tokio::test]
async fn full_key_lifecycle_over_http() {
    let kw = start();
    let http = kw.http();
    let alice = create_user(&kw, "alice@example.com");
    let acc = create_account(&kw, "Acme", "pro", "alice@example.com");
    let tok = alice.tok();
    let mut responses: Vec<String> = Vec::new();

    // Who am I.
    let me = http.get("/v1/me", tok).await;
    me.expect_status(200);
    assert_eq!(me.json()["user_id"], alice.id.as_str(), "{me}");
    assert_eq!(me.json()["email"], "alice@example.com", "{me}");
    let accounts = me.json()["accounts"].as_array().expect("accounts").clone();
    assert_eq!(accounts.len(), 1, "{me}");
    assert_eq!(
        accounts[0],
        json!({"account_id": acc, "name": "Acme", "plan": "pro", "role": "owner"}),
        "{me}"
    );

    // Nothing saved yet.
    let list = list_keys(&kw, &alice.token, &acc).await;
    for p in PROVIDERS {
        assert_state(&list[p], p, "shared", None);
    }

    // Save one key per provider.
    let keys = [
        ("anthropic", anthropic_key()),
        ("openai", openai_key()),
        ("google", google_key()),
    ];
    for (p, k) in &keys {
        let r = http.put(&key_path(&acc, p), tok, &json!({ "api_key": k })).await;
        r.expect_status(200);
        assert_state(r.json(), p, "shared", Some(last4(k)));
        assert!(
            r.json()["key"]["last_test"].is_null(),
            "a fresh key has not been tested: {r}"
        );
        responses.push(r.text.clone());
    }
    let r = http.get(&keys_path(&acc), tok).await;
    responses.push(r.text.clone());
    let list = list_keys(&kw, &alice.token, &acc).await;
    for (p, k) in &keys {
        assert_state(&list[*p], p, "shared", Some(last4(k)));
    }

    // Each row opens, with its binding, to exactly the key that was pasted.
    let pool = kw.db().await;
    for (p, k) in &keys {
        let row = db::key_row(&pool, &acc, p).await.expect("row");
        assert_eq!(row.last4, last4(k));
        assert_eq!(db::open_row(kw.data_dir(), &row).expect("open"), k.as_bytes());
    }

    // Switch openai to own and back; the key is kept.
    let r = http
        .put(&source_path(&acc, "openai"), tok, &json!({"source": "own"}))
        .await;
    r.expect_status(200);
    assert_state(r.json(), "openai", "own", Some(last4(&keys[1].1)));
    responses.push(r.text.clone());
    assert_eq!(list_keys(&kw, &alice.token, &acc).await["openai"]["source"], "own");
    let r = http
        .put(&source_path(&acc, "openai"), tok, &json!({"source": "shared"}))
        .await;
    r.expect_status(200);
    assert_state(r.json(), "openai", "shared", Some(last4(&keys[1].1)));
    responses.push(r.text.clone());
    let list = list_keys(&kw, &alice.token, &acc).await;
    assert_state(&list["openai"], "openai", "shared", Some(last4(&keys[1].1)));

    // Rotate anthropic: new last4, new key_id, old created_at kept, new blob opens to the new key.
    let old_row = db::key_row(&pool, &acc, "anthropic").await.expect("row");
    let created_before = list["anthropic"]["key"]["created_at"].clone();
    let new_anthropic = key_ending("anthropic", "R0t8");
    let r = http
        .put(&key_path(&acc, "anthropic"), tok, &json!({ "api_key": new_anthropic }))
        .await;
    r.expect_status(200);
    assert_state(r.json(), "anthropic", "shared", Some("R0t8"));
    assert_eq!(
        r.json()["key"]["created_at"],
        created_before,
        "created_at is when the first key was saved: {r}"
    );
    responses.push(r.text.clone());
    let new_row = db::key_row(&pool, &acc, "anthropic").await.expect("row");
    assert_ne!(new_row.key_id, old_row.key_id, "a rotation draws a new key_id");
    assert_ne!(new_row.sealed, old_row.sealed);
    assert_eq!(
        db::open_row(kw.data_dir(), &new_row).expect("open"),
        new_anthropic.as_bytes()
    );
    assert_eq!(
        db::key_rows(&pool, &acc).await.len(),
        3,
        "rotation replaces, never adds"
    );

    // Remove google while it is the source: 204, source back to shared, key null.
    set_source(&kw, &alice.token, &acc, "google", "own").await;
    let r = http.delete(&key_path(&acc, "google"), tok).await;
    r.expect_status(204);
    assert!(r.text.is_empty(), "204 has no body: {r}");
    let list = list_keys(&kw, &alice.token, &acc).await;
    assert_state(&list["google"], "google", "shared", None);
    assert_state(&list["anthropic"], "anthropic", "shared", Some("R0t8"));
    assert_state(&list["openai"], "openai", "shared", Some(last4(&keys[1].1)));
    assert!(
        db::key_row(&pool, &acc, "google").await.is_none(),
        "the google row is gone"
    );
    // `own` without a key is refused.
    let r = http
        .put(&source_path(&acc, "google"), tok, &json!({"source": "own"}))
        .await;
    r.expect_error(409, "no_key_saved");

    // The audit log tells the story, actor = the user, with the last4 of the key concerned.
    let events = key_events(&kw, &alice.token, &acc).await;
    let story: Vec<(String, String, Option<String>)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["actor"], alice.id.as_str(), "{e}");
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["provider"].as_str().unwrap_or_default().to_owned(),
                e["key_last4"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let l4 = |k: &str| Some(last4(k).to_owned());
    let expected = vec![
        ("key.saved".to_owned(), "anthropic".to_owned(), l4(&keys[0].1)),
        ("key.saved".to_owned(), "openai".to_owned(), l4(&keys[1].1)),
        ("key.saved".to_owned(), "google".to_owned(), l4(&keys[2].1)),
        ("key.source_changed".to_owned(), "openai".to_owned(), l4(&keys[1].1)),
        ("key.source_changed".to_owned(), "openai".to_owned(), l4(&keys[1].1)),
        (
            "key.rotated".to_owned(),
            "anthropic".to_owned(),
            Some("R0t8".to_owned()),
        ),
        ("key.source_changed".to_owned(), "google".to_owned(), l4(&keys[2].1)),
        ("key.removed".to_owned(), "google".to_owned(), l4(&keys[2].1)),
    ];
    assert_eq!(story, expected, "audit story");
    assert_audit_ok(&kw, Some(&acc));

    // `GET /v1/me` still answers, and the full keys were in no response.
    let me = http.get("/v1/me", tok).await;
    me.expect_status(200);
    responses.push(me.text.clone());
    responses.push(serde_json::to_string(&audit_events(&kw, &alice.token, &acc).await).unwrap_or_default());
    for text in &responses {
        for (_, k) in &keys {
            assert_no_leak(text, k, text);
        }
        assert_no_leak(text, &new_anthropic, text);
    }
}

#[tokio::test]
async fn first_start_creates_owner_prints_token_once_and_protects_key_files() {
    let mut kw = start();
    let token = kw.owner_token().to_owned();
    let account = kw.owner_account().to_owned();
    assert!(token.starts_with("kw_"), "{token}");
    assert!(is_hex_id(&account, "acc_"), "{account}");

    let me = kw.http().get("/v1/me", Some(&token)).await;
    me.expect_status(200);
    assert_eq!(me.json()["email"], "owner@localhost", "{me}");
    assert!(
        is_hex_id(me.json()["user_id"].as_str().unwrap_or_default(), "usr_"),
        "{me}"
    );
    assert_eq!(
        me.json()["accounts"],
        json!([{"account_id": account, "name": "Personal", "plan": "pro", "role": "owner"}]),
        "{me}"
    );
    assert_eq!(kw.http().get("/healthz", None).await.status, 200);

    // Files of the data dir, with private halves 0600.
    let dir = kw.data_dir().to_owned();
    for f in ["keyward.db", "kek/local-1.pub", "kek/local-1.key", "audit-chain.key"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    for f in ["kek/local-1.key", "audit-chain.key"] {
        let mode = std::fs::metadata(dir.join(f)).expect("stat").permissions().mode() & 0o777;
        // Two OS users: the private half is the worker user's, read-only (README, Deployment).
        let expected =
            if f.ends_with(".key") && f.starts_with("kek/") && keyward_testkit::users::two_users_mode().is_some() {
                0o400
            } else {
                0o600
            };
        assert_eq!(mode, expected, "{f} has mode {mode:o}");
    }

    // The token is shown once: a restart on the same data dir does not print it again.
    let printed_before = kw.stdout().matches("owner token").count();
    assert_eq!(printed_before, 1, "{}", kw.stdout());
    kw.restart();
    assert_eq!(
        kw.stdout().matches("owner token").count(),
        1,
        "token printed again on restart:\n{}",
        kw.stdout()
    );
    assert!(!kw.stdout().contains(&format!("{token}\n{token}")));
    let me = kw.http().get("/v1/me", Some(&token)).await;
    me.expect_status(200);
    assert_eq!(me.json()["accounts"][0]["account_id"], account.as_str(), "{me}");

    // The owner's pro account can save a key right away, and it survives a restart.
    let k = openai_key();
    save_key(&kw, &token, &account, "openai", &k).await;
    kw.restart();
    let list = list_keys(&kw, &token, &account).await;
    assert_eq!(list["openai"]["key"]["last4"], last4(&k));
}

/// Child processes of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            // Two OS users: the workers are the children of the worker supervisor.
            if keyward_testkit::users::is_supervisor(child) {
                out.extend(children_of(child));
            } else {
                out.push(child);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_takes_the_workers_along() {
    let mut kw = start();
    let pid = kw.pid().expect("running");
    // KEYWARD_WORKERS defaults to 2 isolated worker processes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let workers = loop {
        let c = children_of(pid);
        if c.len() >= 2 || std::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        workers.len(),
        2,
        "expected 2 worker processes under serve (pid {pid}), found {workers:?}"
    );
    let status = kw.stop().expect("was running");
    assert!(
        status.success(),
        "keyward serve should exit 0 on SIGTERM, got {status}\n{}",
        kw.output()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while workers.iter().any(|w| alive(*w)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left: Vec<u32> = workers.into_iter().filter(|w| alive(*w)).collect();
    assert!(left.is_empty(), "worker processes outlived serve: {left:?}");
    // The data dir is intact: it starts again, with no new owner token.
    kw.start_again();
    assert_eq!(kw.stdout().matches("owner token").count(), 1);
    let me = kw.http().get("/v1/me", Some(kw.owner_token())).await;
    me.expect_status(200);
}

/// Waits until `pid` has at least `n` children (polling every `every`), up to 10 s.
async fn wait_children(pid: u32, n: usize, every: std::time::Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let c = children_of(pid);
        if c.len() >= n || std::time::Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits up to 5 s for `workers` to exit; kills (by pid) and returns those still alive, so a
/// failing test leaves no orphan behind.
async fn reap_survivors(workers: &[u32]) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while workers.iter().any(|w| alive(*w)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left: Vec<u32> = workers.iter().copied().filter(|w| alive(*w)).collect();
    for w in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &w.to_string()])
            .status();
    }
    left
}

#[tokio::test]
async fn workers_do_not_outlive_a_killed_server() {
    let mut kw = start();
    let pid = kw.pid().expect("running");
    let workers = wait_children(pid, 2, std::time::Duration::from_millis(50)).await;
    assert_eq!(workers.len(), 2, "expected 2 worker processes, found {workers:?}");
    // Let them finish starting (sandboxing included), then crash the gateway (SIGKILL: no
    // chance to stop its workers itself).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    kw.kill();
    let left = reap_survivors(&workers).await;
    assert!(
        left.is_empty(),
        "worker processes (holding the KEK private key) outlived a killed gateway by 5 s: {left:?}"
    );
}

#[tokio::test]
async fn workers_do_not_outlive_a_server_killed_while_starting_them() {
    // The same crash, right as the workers are spawned (a gateway in a crash loop): a worker
    // must not survive because it had not armed its parent-death signal yet.
    for round in 0..3 {
        let mut kw = start();
        let pid = kw.pid().expect("running");
        let workers = wait_children(pid, 1, std::time::Duration::from_millis(1)).await;
        kw.kill();
        assert!(!workers.is_empty(), "no worker process appeared");
        let left = reap_survivors(&workers).await;
        assert!(
            left.is_empty(),
            "round {round}: worker processes outlived a gateway killed while starting them, by 5 s \
             (reparented to init, still holding the KEK private key): {left:?}"
        );
    }
}
