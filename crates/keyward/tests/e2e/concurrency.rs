//! Racing writers: the stored key, its row and its audit trail stay consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keyward_testkit::db;
use keyward_testkit::reqwest::Method;
use serde_json::json;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_saves_leave_one_key_that_opens() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "race@example.com");
    let first = key_ending("openai", "FRST");
    save_key(&kw, &user.token, &acc, "openai", &first).await;

    let keys: Vec<String> = (1..=50).map(|i| key_ending("openai", &format!("{i:04}"))).collect();
    let barrier = Arc::new(Barrier::new(keys.len()));
    let mut set = JoinSet::new();
    for (i, k) in keys.iter().enumerate() {
        let (http, token, path, k, barrier) = (
            kw.http().clone(),
            user.token.clone(),
            key_path(&acc, "openai"),
            k.clone(),
            Arc::clone(&barrier),
        );
        set.spawn(async move {
            barrier.wait().await;
            (i, http.put(&path, Some(&token), &json!({ "api_key": k })).await)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.expect("task");
        if r.status != 200 {
            failures.push(format!("PUT #{i}: {r}"));
        } else if r.json()["key"]["last4"] != last4(&keys[i]) {
            failures.push(format!("PUT #{i} answered another key's state: {r}"));
        }
        assert_no_leak(&r.text, &keys[i], &r.to_string());
    }
    assert!(
        failures.is_empty(),
        "{} of 50 concurrent PUTs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Exactly one row; it opens with its own binding to one of the 50 keys, matching last4.
    let pool = kw.db().await;
    let rows = db::key_rows(&pool, &acc).await;
    assert_eq!(rows.len(), 1, "one row per account and provider: {rows:?}");
    let row = &rows[0];
    assert_eq!(row.provider, "openai");
    let plain = String::from_utf8(db::open_row(kw.data_dir(), row).expect("the surviving blob opens")).expect("utf8");
    assert!(
        keys.contains(&plain),
        "the stored key is not one of the 50 that were sent"
    );
    assert_eq!(row.last4, last4(&plain), "row last4 and stored key disagree");
    let list = list_keys(&kw, &user.token, &acc).await;
    assert_eq!(list["openai"]["key"]["last4"], row.last4.as_str());

    // 51 events: one key.saved, fifty key.rotated (one per PUT), a chain that verifies,
    // and the newest event describes the key that won.
    let events = key_events(&kw, &user.token, &acc).await;
    assert_eq!(events.len(), 51, "{events:?}");
    assert_eq!(events[0]["action"], "key.saved");
    assert_eq!(events[0]["key_last4"], "FRST");
    let rotated: BTreeSet<String> = events[1..]
        .iter()
        .map(|e| {
            assert_eq!(e["action"], "key.rotated", "{e}");
            e["key_last4"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    let sent: BTreeSet<String> = keys.iter().map(|k| last4(k).to_owned()).collect();
    assert_eq!(rotated, sent, "each PUT is audited once with its own last4");
    assert_eq!(
        events[50]["key_last4"],
        row.last4.as_str(),
        "the last rotation audited is the key kept"
    );
    let v = assert_audit_ok(&kw, Some(&acc));
    assert_eq!(v["events"], 51, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_key_actions_stay_consistent() {
    let kw = start();
    let (user, acc1) = pro_owner(&kw, "mixed@example.com");
    let acc2 = create_account(&kw, "Second", "business", &user.email);
    let barrier = Arc::new(Barrier::new(2 * 3 * 6 + 2 * 3));
    let mut set = JoinSet::new();
    let mut sent: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for acc in [&acc1, &acc2] {
        for p in PROVIDERS {
            let keys: Vec<String> = (0..3).map(|_| key_for(p)).collect();
            sent.insert((acc.clone(), p.to_owned()), keys.clone());
            let mut jobs: Vec<(&'static str, Method, String, Option<serde_json::Value>)> = keys
                .into_iter()
                .map(|k| ("put", Method::PUT, key_path(acc, p), Some(json!({ "api_key": k }))))
                .collect();
            jobs.push(("delete", Method::DELETE, key_path(acc, p), None));
            jobs.push(("own", Method::PUT, source_path(acc, p), Some(json!({"source": "own"}))));
            jobs.push((
                "shared",
                Method::PUT,
                source_path(acc, p),
                Some(json!({"source": "shared"})),
            ));
            for (what, method, path, body) in jobs {
                let (http, token, barrier) = (kw.http().clone(), user.token.clone(), Arc::clone(&barrier));
                set.spawn(async move {
                    barrier.wait().await;
                    (what, http.send(method, &path, Some(&token), body.as_ref()).await)
                });
            }
        }
        for _ in 0..3 {
            let (http, token, barrier, path) = (
                kw.http().clone(),
                user.token.clone(),
                Arc::clone(&barrier),
                keys_path(acc),
            );
            set.spawn(async move {
                barrier.wait().await;
                ("list", http.get(&path, Some(&token)).await)
            });
        }
    }
    let mut failures = Vec::new();
    let (mut puts_ok, mut deletes_ok) = (0usize, 0usize);
    while let Some(joined) = set.join_next().await {
        let (what, r) = joined.expect("task");
        let allowed: &[u16] = match what {
            "put" | "shared" | "list" => &[200],
            "delete" => &[204, 409],
            _ => &[200, 409],
        };
        if !allowed.contains(&r.status) {
            failures.push(format!("{what}: {r}"));
        }
        if r.status == 409 {
            r.expect_error(409, "no_key_saved");
        }
        puts_ok += usize::from(what == "put" && r.status == 200);
        deletes_ok += usize::from(what == "delete" && r.status == 204);
    }
    assert!(
        failures.is_empty(),
        "{} unexpected answers:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every (account, provider): the listing, the row and the blob agree; `own` has a key.
    let pool = kw.db().await;
    for acc in [&acc1, &acc2] {
        let list = list_keys(&kw, &user.token, acc).await;
        for p in PROVIDERS {
            let state = &list[p];
            match db::key_row(&pool, acc, p).await {
                Some(row) => {
                    let plain =
                        String::from_utf8(db::open_row(kw.data_dir(), &row).expect("blob opens")).expect("utf8");
                    assert!(
                        sent[&(acc.clone(), p.to_owned())].contains(&plain),
                        "{acc} {p}: stored key was never sent"
                    );
                    assert_eq!(row.last4, last4(&plain));
                    assert_eq!(state["key"]["last4"], row.last4.as_str(), "{state}");
                }
                None => {
                    assert!(state["key"].is_null(), "{state}");
                    assert_eq!(
                        state["source"], "shared",
                        "no key, so the source must be shared: {state}"
                    );
                }
            }
        }
    }
    // Every successful save and removal was audited, and the chains verify.
    let mut saves = 0;
    let mut removals = 0;
    for acc in [&acc1, &acc2] {
        for e in key_events(&kw, &user.token, acc).await {
            saves += usize::from(e["action"] == "key.saved" || e["action"] == "key.rotated");
            removals += usize::from(e["action"] == "key.removed");
        }
    }
    assert_eq!(
        (saves, removals),
        (puts_ok, deletes_ok),
        "audited saves/removals vs successful calls"
    );
    assert_audit_ok(&kw, None);
}
