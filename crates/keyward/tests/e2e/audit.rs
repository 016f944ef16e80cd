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

/// `audit export --platform`, as JSON lines.
fn platform_events(kw: &Keyward) -> Vec<Value> {
    let out = kw.cli(&["audit", "export", "--platform"]);
    out.assert_success();
    out.json_lines()
}

#[tokio::test]
async fn platform_actions_are_chained_and_tampering_them_is_detected() {
    let mut kw = start();
    let acc = kw.owner_account().to_owned();
    // The CLI's platform actions, with no gateway running (none has to be).
    kw.stop();
    let out = kw.cli(&["kek", "rotate", "--staged"]);
    out.assert_success();
    assert_eq!(out.json()["created"], "local-2", "{out}");
    kw.cli(&["kek", "promote", "--version", "2"]).assert_success();
    let (k1, k2) = (openai_key(), openai_key());
    crate::ai_support::set_shared_key(&kw, "openai", &k1);
    crate::ai_support::set_shared_key(&kw, "openai", &k2);
    set_plan(&kw, &acc, "business");
    // Unchanged: not an action, not audited.
    set_plan(&kw, &acc, "business");
    let out = kw.cli(&["kek", "retire", "--version", "1"]);
    out.assert_success();

    let events = platform_events(&kw);
    let summary: Vec<(String, Value, Value, Value, Value, Value)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["kek_id"].clone(),
                e["provider"].clone(),
                e["key_last4"].clone(),
                e["account_id"].clone(),
                e["detail"].clone(),
            )
        })
        .collect();
    let n = Value::Null;
    assert_eq!(
        summary,
        vec![
            (
                "kek.rotated".into(),
                json!("local-2"),
                n.clone(),
                n.clone(),
                n.clone(),
                json!("staged")
            ),
            (
                "kek.promoted".into(),
                json!("local-2"),
                n.clone(),
                n.clone(),
                n.clone(),
                n.clone()
            ),
            (
                "shared_key.saved".into(),
                n.clone(),
                json!("openai"),
                json!(last4(&k1)),
                n.clone(),
                n.clone()
            ),
            (
                "shared_key.rotated".into(),
                n.clone(),
                json!("openai"),
                json!(last4(&k2)),
                n.clone(),
                n.clone()
            ),
            (
                "account.plan_changed".into(),
                n.clone(),
                n.clone(),
                n.clone(),
                json!(acc),
                json!("pro -> business; shared_credit_limit 20000 -> 100000")
            ),
            (
                "kek.retired".into(),
                json!("local-1"),
                n.clone(),
                n.clone(),
                n.clone(),
                json!("destroyed")
            ),
        ],
        "{events:?}"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1, "{e}");
        assert_eq!(e["actor"], "cli", "{e}");
        assert!(e["mac"].as_str().is_some_and(|m| m.len() == 64), "{e}");
    }
    let v = assert_audit_ok(&kw, None);
    assert_eq!(v["platform_events"], 6, "{v}");
    // The account's own chain still has its plan change too.
    let account_events = kw.cli(&["audit", "export", "--account", &acc]).json_lines();
    assert_eq!(account_events.len(), 1, "{account_events:?}");
    assert_eq!(account_events[0]["action"], "account.plan_changed");

    // Tampering: an edited event, then a deleted newest event, each named on the platform chain.
    let pool = kw.db().await;
    let id = events[2]["id"].as_i64().unwrap();
    sqlx::query("UPDATE platform_audit_events SET key_last4 = 'XXXX' WHERE id = ?1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let v = assert_verify_fails(&kw, None, "platform");
    assert_eq!((v["event_id"].as_i64(), v["seq"].as_i64()), (Some(id), Some(3)), "{v}");
    sqlx::query("UPDATE platform_audit_events SET key_last4 = ?2 WHERE id = ?1")
        .bind(id)
        .bind(last4(&k1))
        .execute(&pool)
        .await
        .unwrap();
    assert_audit_ok(&kw, None);
    sqlx::query("DELETE FROM platform_audit_events WHERE seq = 6")
        .execute(&pool)
        .await
        .unwrap();
    let v = assert_verify_fails(&kw, None, "platform");
    assert!(
        v["event_id"].is_null() && v["reason"].as_str().unwrap().contains("truncated"),
        "{v}"
    );
    // One account's verification does not read the platform's chain.
    assert_audit_ok(&kw, Some(&acc));
    pool.close().await;
}

/// Rolls `chain` back to `keep` events, head and tail together, as someone who can write the
/// database (but has no chain key) would: the newest events deleted, the head set back to the
/// last link kept. Returns the row ids deleted.
async fn roll_back(pool: &sqlx::SqlitePool, chain: &str, keep: i64) -> usize {
    let (events, heads, head_key) = if chain == "platform" {
        ("platform_audit_events", "platform_audit_head", "id = 1")
    } else {
        ("audit_events", "audit_heads", "account_id = ?2")
    };
    let by_chain = if chain == "platform" {
        "1 = 1"
    } else {
        "account_id = ?2"
    };
    let mac: Vec<u8> = sqlx::query_scalar(&format!("SELECT mac FROM {events} WHERE seq = ?1 AND {by_chain}"))
        .bind(keep)
        .bind(chain)
        .fetch_one(pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let deleted = sqlx::query(&format!("DELETE FROM {events} WHERE seq > ?1 AND {by_chain}"))
        .bind(keep)
        .bind(chain)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    sqlx::query(&format!("UPDATE {heads} SET seq = ?1, mac = ?3 WHERE {head_key}"))
        .bind(keep)
        .bind(chain)
        .bind(mac)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    deleted as usize
}

#[tokio::test]
async fn a_checkpoint_catches_a_chain_rolled_back_head_and_tail() {
    let key_dir = tempfile::tempdir().unwrap();
    let key_path = key_dir.path().join("keys/checkpoint.key");
    let mut kw =
        start_with(keyward_testkit::Options::default().env("KEYWARD_AUDIT_CHECKPOINT_KEY", key_path.to_str().unwrap()));
    let (user, acc, _) = seven_events(&kw, "checkpoint@example.com").await;
    let (_, other, _) = seven_events(&kw, "checkpoint-other@example.com").await;
    set_plan(&kw, &other, "business");
    set_plan(&kw, &acc, "business");

    let cp = kw.data_dir().join("../checkpoint-1.json");
    let out = kw.cli(&["audit", "checkpoint", "--out", cp.to_str().unwrap()]);
    out.assert_success();
    // The key was made on first use, outside the data dir, owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!kw.data_dir().join("audit-checkpoint.key").exists());
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    let chains = file["chains"].as_array().unwrap();
    let seq_of = |c: &str| chains.iter().find(|x| x["chain"] == c).map(|x| x["seq"].clone());
    assert_eq!(seq_of(&acc), Some(json!(8)), "{file}");
    assert_eq!(seq_of(&other), Some(json!(8)), "{file}");
    assert_eq!(seq_of("platform"), Some(json!(2)), "{file}");
    assert!(
        file["at"].is_string() && file["signature"].as_str().is_some_and(|s| s.len() == 128),
        "{file}"
    );
    // On standard output too.
    let printed = kw.cli(&["audit", "checkpoint"]);
    printed.assert_success();
    assert_eq!(printed.json()["chains"].as_array().map(Vec::len), Some(chains.len()));

    let verify_cp =
        |kw: &Keyward, file: &std::path::Path| kw.cli(&["audit", "verify", "--checkpoint", file.to_str().unwrap()]);
    let ok = verify_cp(&kw, &cp);
    ok.assert_success();
    assert_eq!(
        ok.json()["checkpoint_chains"].as_u64(),
        Some(chains.len() as u64),
        "{ok}"
    );
    // Chains that grew since still reach it.
    save_key(&kw, &user.token, &acc, "openai", &openai_key()).await;
    set_plan(&kw, &acc, "pro");
    verify_cp(&kw, &cp).assert_success();

    // Roll back the account's chain and the platform's behind the checkpoint, head and tail.
    kw.stop();
    let pool = kw.db().await;
    assert_eq!(roll_back(&pool, &acc, 5).await, 5);
    assert_eq!(roll_back(&pool, "platform", 1).await, 2);
    pool.close().await;
    // The chains alone verify: nothing in them is inconsistent ...
    let v = assert_audit_ok(&kw, None);
    assert_eq!(v["platform_events"], 1, "{v}");
    // ... and the checkpoint names both.
    let bad = verify_cp(&kw, &cp);
    assert_eq!(bad.code(), Some(1), "{bad}");
    let v = bad.json();
    assert_eq!(v["ok"], false, "{bad}");
    let named: Vec<&str> = v["behind_checkpoint"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["chain"].as_str())
        .collect();
    assert_eq!(named.len(), 2, "{bad}");
    assert!(named.contains(&acc.as_str()) && named.contains(&"platform"), "{bad}");
    assert!(!named.contains(&other.as_str()), "{bad}");
    assert!(bad.stderr.contains(&acc) && bad.stderr.contains("rolled back"), "{bad}");
    // --account limits it to that chain.
    let one = kw.cli(&[
        "audit",
        "verify",
        "--account",
        &other,
        "--checkpoint",
        cp.to_str().unwrap(),
    ]);
    one.assert_success();

    // A checkpoint edited to match the rolled-back chain is refused: its signature fails.
    let mut forged = file.clone();
    for c in forged["chains"].as_array_mut().unwrap() {
        if c["chain"] == acc.as_str() {
            c["seq"] = json!(5);
        }
    }
    let forged_path = kw.data_dir().join("../checkpoint-forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let refused = verify_cp(&kw, &forged_path);
    assert_eq!(refused.code(), Some(1), "{refused}");
    assert_eq!(refused.json()["checkpoint"], "refused", "{refused}");
    assert!(refused.stderr.contains("signature"), "{refused}");
    // So is one whose signature bytes are damaged.
    let mut damaged = file.clone();
    let sig = damaged["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    damaged["signature"] = json!(format!("{flipped}{}", &sig[1..]));
    std::fs::write(&forged_path, damaged.to_string()).unwrap();
    let refused = verify_cp(&kw, &forged_path);
    assert_eq!(refused.code(), Some(1), "{refused}");
    assert_eq!(refused.json()["checkpoint"], "refused", "{refused}");
    // And one signed under another key (a checkpoint key the verifier does not hold).
    let other_key = key_dir.path().join("keys/other.key");
    let other_cp = kw.data_dir().join("../checkpoint-other.json");
    let mut cmd = kw.cli_command();
    let status = cmd
        .env("KEYWARD_AUDIT_CHECKPOINT_KEY", &other_key)
        .args(["audit", "checkpoint", "--out", other_cp.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let refused = verify_cp(&kw, &other_cp);
    assert_eq!(refused.code(), Some(1), "{refused}");
    assert!(refused.stderr.contains("another key"), "{refused}");

    // A deleted account's chain is kept (closed by account.deleted) and checkpointed like
    // any other; a chain removed whole afterwards is named.
    kw.start_again();
    let (_, svc) = crate::services::create_service(&kw, "provisioning", &["accounts:manage"]);
    let r = kw
        .http()
        .put(
            "/v1/external/accounts/org-gone",
            Some(&svc),
            &json!({"name": "Gone", "plan": "pro"}),
        )
        .await;
    r.expect_status(200);
    let gone = r.json()["account_id"].as_str().unwrap().to_owned();
    set_plan(&kw, &gone, "business");
    kw.http()
        .delete("/v1/external/accounts/org-gone", Some(&svc))
        .await
        .expect_status(204);
    let out = kw.cli(&["audit", "checkpoint", "--out", cp.to_str().unwrap()]);
    out.assert_success();
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    let closed = file["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["chain"] == gone.as_str())
        .map(|c| c["seq"].clone());
    assert!(
        closed.as_ref().and_then(Value::as_i64).is_some_and(|n| n >= 2),
        "at least the plan change and account.deleted: {file}"
    );
    verify_cp(&kw, &cp).assert_success();
    kw.stop();
    let pool = kw.db().await;
    for table in ["audit_events", "audit_heads"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE account_id = ?1"))
            .bind(&gone)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    // Without its rows the deleted account is simply unknown to a plain verify ...
    assert_audit_ok(&kw, None);
    // ... but not to the checkpoint.
    let bad = verify_cp(&kw, &cp);
    assert_eq!(bad.code(), Some(1), "{bad}");
    assert_eq!(bad.json()["chain"], gone.as_str(), "{bad}");
    assert!(bad.stderr.contains("gone: deleted"), "{bad}");
}
