//! The audit log: the API listing, `audit export`, and `audit verify` against tampering.

use keyward_testkit::{db, sqlx, Keyward};
use serde_json::{json, Value};

use crate::common::*;

const EVENT_FIELDS: [&str; 14] = [
    "id",
    "at",
    "actor",
    "action",
    "provider",
    "key_source",
    "key_last4",
    "model",
    "outcome",
    "detail",
    "provider_request_id",
    "input_tokens",
    "output_tokens",
    "feature",
];

/// Seven key actions on a fresh pro account; returns (user, account, expected actions oldest first).
async fn seven_events(kw: &Keyward, email: &str) -> (User, String, Vec<(&'static str, &'static str)>) {
    let (user, acc) = pro_owner(kw, email);
    let t = &user.token;
    save_key(kw, t, &acc, "anthropic", &anthropic_key()).await;
    save_key(kw, t, &acc, "openai", &openai_key()).await;
    save_key(kw, t, &acc, "anthropic", &anthropic_key()).await;
    set_source(kw, t, &acc, "openai", "own").await;
    set_source(kw, t, &acc, "openai", "shared").await;
    kw.http()
        .delete(&key_path(&acc, "openai"), Some(t))
        .await
        .expect_status(204);
    save_key(kw, t, &acc, "google", &google_key()).await;
    let expected = vec![
        ("key.saved", "anthropic"),
        ("key.saved", "openai"),
        ("key.rotated", "anthropic"),
        ("key.source_changed", "openai"),
        ("key.source_changed", "openai"),
        ("key.removed", "openai"),
        ("key.saved", "google"),
    ];
    (user, acc, expected)
}

/// Runs `audit verify` (for `account`, or all accounts) and checks it reports a break in
/// `acc`; returns the report.
#[track_caller]
fn assert_verify_fails(kw: &Keyward, account: Option<&str>, acc: &str) -> Value {
    let (ok, v, out) = audit_verify(kw, account);
    assert!(!ok, "audit verify should fail: {out}");
    assert_eq!(out.code(), Some(1), "exit code 1 on a broken chain: {out}");
    assert_eq!(v["ok"], false, "{out}");
    assert_eq!(v["account_id"], acc, "{out}");
    assert!(v["seq"].is_i64(), "seq must be an integer: {out}");
    assert!(v["event_id"].is_i64() || v["event_id"].is_null(), "{out}");
    assert!(
        v["reason"].as_str().is_some_and(|r| r.len() > 5),
        "a readable reason: {out}"
    );
    v
}

async fn ids_by_seq(kw: &Keyward, acc: &str) -> Vec<(i64, i64)> {
    let pool = kw.db().await;
    let rows = db::audit_rows(&pool, acc).await;
    pool.close().await;
    rows.into_iter().map(|r| (r.seq, r.id)).collect()
}

#[tokio::test]
async fn audit_verify_passes_on_an_intact_log() {
    let kw = start();
    let (_, acc, expected) = seven_events(&kw, "intact@example.com").await;
    let (user2, acc2) = pro_owner(&kw, "intact2@example.com");
    save_key(&kw, &user2.token, &acc2, "openai", &openai_key()).await;
    save_key(&kw, &user2.token, &acc2, "openai", &openai_key()).await;

    let v = assert_audit_ok(&kw, Some(&acc));
    assert_eq!(v["accounts"], 1, "{v}");
    assert_eq!(v["events"], expected.len(), "{v}");
    let v = assert_audit_ok(&kw, Some(&acc2));
    assert_eq!(
        (v["accounts"].as_u64(), v["events"].as_u64()),
        (Some(1), Some(2)),
        "{v}"
    );
    let v = assert_audit_ok(&kw, None);
    assert!(v["accounts"].as_u64().is_some_and(|n| n >= 2), "{v}");
    assert_eq!(v["events"], expected.len() + 2, "{v}");
    // An account with no events verifies too (the owner's "Personal").
    let v = assert_audit_ok(&kw, Some(kw.owner_account()));
    assert_eq!(v["events"], 0, "{v}");
    // And still after a restart.
    let mut kw = kw;
    kw.restart();
    assert_audit_ok(&kw, None);
}

#[tokio::test]
async fn audit_verify_detects_each_edited_field_while_running() {
    let kw = start();
    let (_, acc, _) = seven_events(&kw, "edit@example.com").await;
    let (_, other) = pro_owner(&kw, "edit-other@example.com");
    let ids = ids_by_seq(&kw, &acc).await;
    let (seq, id) = ids[2];
    assert_eq!(seq, 3);
    assert_audit_ok(&kw, None);

    // (column, SQL expression giving it a new value)
    let edits = [
        ("at", "at + 1"),
        ("actor", "'cli'"),
        ("action", "'key.tested'"),
        ("provider", "'google'"),
        ("key_source", "'own'"),
        ("key_last4", "'XXXX'"),
        ("model", "'gpt-4o'"),
        ("outcome", "'error'"),
        ("detail", "'forged'"),
        ("provider_request_id", "'req_1'"),
        ("input_tokens", "7"),
        ("output_tokens", "7"),
        ("feature", "'drafting'"),
        ("mac", "zeroblob(32)"),
        ("seq", "seq"), // a no-op: must keep verifying
    ];
    let pool = kw.db().await;
    for (column, expr) in edits {
        // Remember the original value (as stored), edit, verify, restore.
        let backup: (Option<Vec<u8>>, String) = sqlx::query_as(&format!(
            "SELECT CAST({column} AS BLOB), typeof({column}) FROM audit_events WHERE id = ?1"
        ))
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("backup");
        let changed = sqlx::query(&format!("UPDATE audit_events SET {column} = {expr} WHERE id = ?1"))
            .bind(id)
            .execute(&pool)
            .await
            .expect("edit")
            .rows_affected();
        assert_eq!(changed, 1);
        if column == "seq" {
            assert_audit_ok(&kw, Some(&acc));
            continue;
        }
        for scope in [Some(acc.as_str()), None] {
            let v = assert_verify_fails(&kw, scope, &acc);
            assert_eq!(
                (v["event_id"].as_i64(), v["seq"].as_i64()),
                (Some(id), Some(3)),
                "edited {column}: {v}"
            );
        }
        // The other account's chain is not affected.
        assert_audit_ok(&kw, Some(&other));
        let restore = match backup.1.as_str() {
            "null" => "NULL".to_owned(),
            "integer" => "CAST(CAST(?2 AS TEXT) AS INTEGER)".to_owned(),
            "text" => "CAST(?2 AS TEXT)".to_owned(),
            _ => "?2".to_owned(),
        };
        sqlx::query(&format!("UPDATE audit_events SET {column} = {restore} WHERE id = ?1"))
            .bind(id)
            .bind(backup.0)
            .execute(&pool)
            .await
            .expect("restore");
        assert_audit_ok(&kw, Some(&acc));
    }
    // Still serving, still appending to a good chain.
    let t = kw.owner_token().to_owned();
    save_key(&kw, &t, kw.owner_account(), "openai", &openai_key()).await;
    assert_audit_ok(&kw, None);
}

#[tokio::test]
async fn audit_verify_detects_a_deleted_middle_event() {
    let mut kw = start();
    let (_, acc, _) = seven_events(&kw, "delete@example.com").await;
    let (user2, other) = pro_owner(&kw, "delete-other@example.com");
    save_key(&kw, &user2.token, &other, "google", &google_key()).await;
    let ids = ids_by_seq(&kw, &acc).await;
    kw.stop();
    let pool = kw.db().await;
    sqlx::query("DELETE FROM audit_events WHERE id = ?1")
        .bind(ids[2].1)
        .execute(&pool)
        .await
        .expect("delete");
    pool.close().await;
    for scope in [Some(acc.as_str()), None] {
        let v = assert_verify_fails(&kw, scope, &acc);
        // The first event that no longer fits is the one after the hole (was seq 4).
        assert_eq!(v["event_id"].as_i64(), Some(ids[3].1), "{v}");
        assert!(matches!(v["seq"].as_i64(), Some(3) | Some(4)), "{v}");
    }
    assert_audit_ok(&kw, Some(&other));
}

#[tokio::test]
async fn audit_verify_detects_reordered_events() {
    let kw = start();
    let (_, acc, _) = seven_events(&kw, "reorder@example.com").await;
    let ids = ids_by_seq(&kw, &acc).await;
    let (id2, id4) = (ids[1].1, ids[3].1);
    // Swap the seq of events 2 and 4 (through a free value: (account_id, seq) is unique).
    let pool = kw.db().await;
    let mut tx = pool.begin().await.expect("begin");
    for (id, seq) in [(id2, -1i64), (id4, 2), (id2, 4)] {
        sqlx::query("UPDATE audit_events SET seq = ?2 WHERE id = ?1")
            .bind(id)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .expect("swap");
    }
    tx.commit().await.expect("commit");
    pool.close().await;
    for scope in [Some(acc.as_str()), None] {
        let v = assert_verify_fails(&kw, scope, &acc);
        let id = v["event_id"].as_i64();
        assert!(
            id == Some(id2) || id == Some(id4),
            "names one of the swapped events ({id2}, {id4}): {v}"
        );
        assert!(matches!(v["seq"].as_i64(), Some(2) | Some(4)), "{v}");
    }
}

#[tokio::test]
async fn audit_verify_detects_a_truncated_tail() {
    let mut kw = start();
    let (_, acc, expected) = seven_events(&kw, "truncate@example.com").await;
    let n = expected.len() as i64;
    let ids = ids_by_seq(&kw, &acc).await;
    kw.stop();
    let pool = kw.db().await;
    // Drop the newest event, then the one before it.
    for (k, (seq, id)) in ids.iter().rev().take(2).enumerate() {
        sqlx::query("DELETE FROM audit_events WHERE id = ?1")
            .bind(id)
            .execute(&pool)
            .await
            .expect("delete");
        let remaining = n - 1 - k as i64;
        assert_eq!(*seq, remaining + 1);
        for scope in [Some(acc.as_str()), None] {
            let v = assert_verify_fails(&kw, scope, &acc);
            assert!(v["event_id"].is_null(), "a truncated tail has no event to name: {v}");
            let s = v["seq"].as_i64();
            assert!(
                s == Some(remaining) || s == Some(remaining + 1),
                "seq should point at the end of what remains ({remaining}): {v}"
            );
        }
    }
    pool.close().await;
}

#[tokio::test]
async fn audit_api_lists_newest_first_and_paginates() {
    let kw = start();
    let (user, acc, expected) = seven_events(&kw, "list@example.com").await;
    let (user2, acc2) = pro_owner(&kw, "list-other@example.com");
    save_key(&kw, &user2.token, &acc2, "openai", &openai_key()).await;
    let http = kw.http();
    let t = user.tok();

    let all = audit_events(&kw, &user.token, &acc).await;
    assert_eq!(all.len(), expected.len(), "{all:?}");
    let mut prev: Option<i64> = None;
    for (e, (action, provider)) in all.iter().zip(expected.iter().rev()) {
        let obj = e.as_object().unwrap_or_else(|| panic!("event is not an object: {e}"));
        for f in EVENT_FIELDS {
            assert!(obj.contains_key(f), "event lacks {f:?}: {e}");
        }
        let id = e["id"].as_i64().unwrap_or_else(|| panic!("id must be an integer: {e}"));
        if let Some(p) = prev {
            assert!(id < p, "newest first: {id} after {p}");
        }
        prev = Some(id);
        assert_eq!(e["action"], *action, "{e}");
        assert_eq!(e["provider"], *provider, "{e}");
        assert_eq!(e["actor"], user.id.as_str(), "{e}");
        assert!(!e["at"].is_null(), "{e}");
        assert!(e["outcome"].as_str().is_some_and(|o| !o.is_empty()), "{e}");
        assert!(
            e["key_last4"].as_str().is_some_and(|l| l.len() == 4),
            "key actions carry last4: {e}"
        );
        for f in [
            "model",
            "provider_request_id",
            "input_tokens",
            "output_tokens",
            "feature",
        ] {
            assert!(e[f].is_null(), "{f} does not apply to a key action: {e}");
        }
    }
    // The other account's event is not here.
    let other = audit_events(&kw, &user2.token, &acc2).await;
    assert_eq!(other.len(), 1);
    assert!(all.iter().all(|e| e["id"] != other[0]["id"]));

    // limit and before.
    let r = http.get(&format!("{}?limit=3", audit_path(&acc)), t).await;
    r.expect_status(200);
    let page = r.json()["events"].as_array().expect("events").clone();
    assert_eq!(page, all[..3].to_vec(), "{r}");
    let mut paged: Vec<Value> = Vec::new();
    let mut before: Option<i64> = None;
    for _ in 0..10 {
        let q = match before {
            None => format!("{}?limit=3", audit_path(&acc)),
            Some(b) => format!("{}?limit=3&before={b}", audit_path(&acc)),
        };
        let r = http.get(&q, t).await;
        r.expect_status(200);
        let page = r.json()["events"].as_array().expect("events").clone();
        assert!(page.len() <= 3, "{r}");
        if page.is_empty() {
            break;
        }
        if let Some(b) = before {
            assert!(
                page.iter().all(|e| e["id"].as_i64().is_some_and(|id| id < b)),
                "before is exclusive: {r}"
            );
        }
        before = page.last().and_then(|e| e["id"].as_i64());
        paged.extend(page);
    }
    assert_eq!(paged, all, "paging with before= yields the whole log, in order");
    let r = http
        .get(&format!("{}?before={}", audit_path(&acc), all[2]["id"]), t)
        .await;
    r.expect_status(200);
    assert_eq!(r.json()["events"], json!(all[3..].to_vec()), "{r}");
}

#[tokio::test]
async fn audit_export_prints_json_lines_oldest_first() {
    let kw = start();
    let (user, acc, expected) = seven_events(&kw, "export@example.com").await;
    let out = kw.cli(&["audit", "export", "--account", &acc]);
    out.assert_success();
    let lines = out.json_lines();
    assert_eq!(lines.len(), expected.len(), "{out}");
    assert_eq!(
        out.stdout.lines().filter(|l| !l.trim().is_empty()).count(),
        expected.len(),
        "one event per line: {out}"
    );
    let api = audit_events(&kw, &user.token, &acc).await;
    for (i, (line, (action, provider))) in lines.iter().zip(expected.iter()).enumerate() {
        for f in EVENT_FIELDS {
            assert!(line.get(f).is_some(), "line lacks {f:?}: {line}");
        }
        assert_eq!(line["seq"], i as i64 + 1, "oldest first: {line}");
        assert_eq!(line["action"], *action, "{line}");
        assert_eq!(line["provider"], *provider, "{line}");
        let mac = line["mac"]
            .as_str()
            .unwrap_or_else(|| panic!("mac must be a hex string: {line}"));
        assert!(
            mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit()),
            "mac {mac:?}"
        );
        // The same event as the API's (which lists newest first).
        let same = &api[api.len() - 1 - i];
        for f in EVENT_FIELDS {
            assert_eq!(line[f], same[f], "{f} differs between export and API");
        }
    }
    // Distinct MACs: a chain, not a constant.
    let mut macs: Vec<&str> = lines.iter().filter_map(|l| l["mac"].as_str()).collect();
    macs.sort();
    macs.dedup();
    assert_eq!(macs.len(), expected.len());
    // An unknown account is an error on stderr, not an empty success.
    let out = kw.cli(&["audit", "export", "--account", "acc_00000000000000000000000000000000"]);
    assert!(!out.success() || out.stdout.trim().is_empty(), "{out}");
}

#[tokio::test]
async fn events_are_durable_before_the_answer_even_if_the_server_is_killed() {
    let mut kw = start();
    let (user, acc) = pro_owner(&kw, "durable@example.com");
    let t = user.token.clone();
    save_key(&kw, &t, &acc, "anthropic", &anthropic_key()).await;
    save_key(&kw, &t, &acc, "openai", &openai_key()).await;
    let last = anthropic_key();
    save_key(&kw, &t, &acc, "anthropic", &last).await;
    // SIGKILL right after the answer: no shutdown, no final checkpoint.
    kw.kill();
    let v = assert_audit_ok(&kw, Some(&acc));
    assert_eq!(v["events"], 3, "every answered action must be durable: {v}");
    let pool = kw.db().await;
    let row = db::key_row(&pool, &acc, "anthropic").await.expect("row");
    assert_eq!(db::open_row(kw.data_dir(), &row).expect("opens"), last.as_bytes());
    pool.close().await;
    // It starts again on the same data and carries on with the same chain.
    kw.start_again();
    let list = list_keys(&kw, &t, &acc).await;
    assert_eq!(list["anthropic"]["key"]["last4"], last4(&last));
    kw.http()
        .delete(&key_path(&acc, "openai"), Some(&t))
        .await
        .expect_status(204);
    let v = assert_audit_ok(&kw, Some(&acc));
    assert_eq!(v["events"], 4, "{v}");
}
