//! Envelope encryption through the real database: blobs are bound to their row.

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::canary::find_forms;
use keyward_testkit::{db, sqlx};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_blob_copied_to_another_row_does_not_open() {
    // Providers are a recording fake, to see whether a moved blob ever reaches one.
    let fake = FakeProviders::start().expect("start fakes");
    let kw = crate::ai_support::start_on_fake(&fake, &[]);
    let (user_a, acc_a) = pro_owner(&kw, "a@example.com");
    let (user_b, acc_b) = pro_owner(&kw, "b@example.com");
    let (ka, ko, kb) = (anthropic_key(), openai_key(), anthropic_key());
    for k in [&ka, &ko, &kb] {
        fake.set_key(None, k, Behaviour::EchoKey);
    }
    save_key(&kw, &user_a.token, &acc_a, "anthropic", &ka).await;
    save_key(&kw, &user_a.token, &acc_a, "openai", &ko).await;
    save_key(&kw, &user_b.token, &acc_b, "anthropic", &kb).await;

    let pool = kw.db().await;
    let ra = db::key_row(&pool, &acc_a, "anthropic").await.expect("row");
    let ro = db::key_row(&pool, &acc_a, "openai").await.expect("row");
    let rb = db::key_row(&pool, &acc_b, "anthropic").await.expect("row");
    let dir = kw.data_dir();

    // Each blob is a versioned envelope holding no form of its key, and opens in its own row.
    for (row, key) in [(&ra, &ka), (&ro, &ko), (&rb, &kb)] {
        assert!(row.sealed.starts_with(b"KWB\x01"), "blob header {:?}", &row.sealed[..4]);
        assert!(
            find_forms(&row.sealed, key.as_bytes()).is_empty(),
            "the blob contains the key"
        );
        assert_eq!(db::open_row(dir, row).expect("opens in its own row"), key.as_bytes());
    }
    let ids = [&ra.key_id, &ro.key_id, &rb.key_id];
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "key ids are per row: {ids:?}"
    );

    // Every wrong part of the binding fails.
    assert!(
        db::open_blob(dir, &acc_b, "anthropic", &ra.key_id, &ra.sealed).is_err(),
        "other account"
    );
    assert!(
        db::open_blob(dir, &acc_a, "openai", &ra.key_id, &ra.sealed).is_err(),
        "other provider"
    );
    assert!(
        db::open_blob(dir, &acc_a, "anthropic", &rb.key_id, &ra.sealed).is_err(),
        "other key id"
    );

    // Copy A's anthropic blob onto B's anthropic row and onto A's openai row, in the database.
    for (acc, provider) in [(&acc_b, "anthropic"), (&acc_a, "openai")] {
        sqlx::query("UPDATE provider_keys SET sealed = ?1 WHERE account_id = ?2 AND provider = ?3")
            .bind(&ra.sealed)
            .bind(acc)
            .bind(provider)
            .execute(&pool)
            .await
            .expect("copy blob");
        let moved = db::key_row(&pool, acc, provider).await.expect("row");
        assert_eq!(moved.sealed, ra.sealed);
        let err = db::open_row(dir, &moved).expect_err("a copied blob must not open in another row");
        assert!(!err.is_empty());
    }
    // The original still opens where it belongs.
    let ra_again = db::key_row(&pool, &acc_a, "anthropic").await.expect("row");
    assert_eq!(db::open_row(dir, &ra_again).expect("opens"), ka.as_bytes());

    // Through the server: A's own test reaches the provider with A's key (the control) ...
    let r = kw
        .http()
        .post(
            &format!("{}/test", key_path(&acc_a, "anthropic")),
            user_a.tok(),
            &json!({}),
        )
        .await;
    r.expect_status(200);
    let sent = |k: &str| {
        fake.requests()
            .iter()
            .filter(|q| q.header("x-api-key") == Some(k))
            .count()
    };
    assert_eq!(sent(&ka), 1, "A's probe should reach the provider with A's key");
    // ... while B, whose row now holds A's blob, never gets A's key sent on its behalf.
    let before = fake.requests().len();
    let probe = kw
        .http()
        .post(
            &format!("{}/test", key_path(&acc_b, "anthropic")),
            user_b.tok(),
            &json!({}),
        )
        .await;
    assert!(
        probe.json.as_ref().is_none_or(|v| v["ok"] != true),
        "a moved blob must not test ok: {probe}"
    );
    assert!(
        probe.status < 500 || probe.error_code().is_some(),
        "a stable error code, not a bare failure: {probe}"
    );
    set_source(&kw, &user_b.token, &acc_b, "anthropic", "own").await;
    let body = json!({"provider": "anthropic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let call = kw
        .http()
        .post(&format!("/v1/accounts/{acc_b}/ai/messages"), user_b.tok(), &body)
        .await;
    assert!(!call.is_success(), "an AI call with a moved blob must fail: {call}");
    assert!(call.error_code().is_some(), "with a stable error code: {call}");
    assert_eq!(
        fake.requests().len(),
        before,
        "no outbound call may be made with a blob that did not open"
    );
    assert_eq!(sent(&ka), 1, "A's key was sent on B's behalf");
}

#[tokio::test]
async fn every_save_seals_afresh() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "fresh@example.com");
    let acc2 = create_account(&kw, "Second", "pro", &user.email);
    let k = openai_key();
    let pool = kw.db().await;
    save_key(&kw, &user.token, &acc, "openai", &k).await;
    let r1 = db::key_row(&pool, &acc, "openai").await.expect("row");
    // The same key saved again (a rotation to itself) and in another account.
    save_key(&kw, &user.token, &acc, "openai", &k).await;
    save_key(&kw, &user.token, &acc2, "openai", &k).await;
    let r2 = db::key_row(&pool, &acc, "openai").await.expect("row");
    let r3 = db::key_row(&pool, &acc2, "openai").await.expect("row");
    assert_ne!(r1.key_id, r2.key_id, "a rotation draws a new key_id");
    assert_ne!(r1.sealed, r2.sealed, "a rotation seals with a fresh data key");
    assert_ne!(r2.sealed, r3.sealed);
    // Fresh randomness throughout: no 16-byte run shared past the common header.
    for (x, y) in [(&r1, &r2), (&r2, &r3), (&r1, &r3)] {
        for chunk in x.sealed[12..].chunks(16).filter(|c| c.len() == 16) {
            assert!(!keyward_testkit::files::contains(&y.sealed, chunk), "blobs share bytes");
        }
    }
    for r in [&r2, &r3] {
        assert_eq!(db::open_row(kw.data_dir(), r).expect("opens"), k.as_bytes());
    }
}
