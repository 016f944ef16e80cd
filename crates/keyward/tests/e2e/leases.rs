//! Nothing lost when the gateway dies mid-call (issue 24): shared calls in flight when
//! `keyward serve` is `kill -9`ed have their reservations released (at the node's next start,
//! or by another node once the lease expires), each call ends on record exactly once (`ok`
//! for those the client saw answered, `error:abandoned` for the rest), and the credits
//! charged are exactly the usage of the answers the client received.

use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::{reqwest, sqlx, Keyward};
use serde_json::Value;

use crate::ai_support::*;
use crate::common::*;

/// The calls started before the kill: which door, how the fake answers, and how many.
struct Plan {
    provider: &'static str,
    stream: bool,
    count: usize,
}

/// 5 answered at once (Anthropic, plain and streamed), 3 OpenAI plain calls answered after
/// 1.5 s, 7 OpenAI streams that trickle (1.5 s between chunks, 10.5 s in all) and 5 Google
/// plain calls that wait 30 s: 12 in flight at the kill, 3 s after the last call started.
const PLANS: [Plan; 5] = [
    Plan {
        provider: "anthropic",
        stream: false,
        count: 3,
    },
    Plan {
        provider: "anthropic",
        stream: true,
        count: 2,
    },
    Plan {
        provider: "openai",
        stream: true,
        count: 7,
    },
    Plan {
        provider: "openai",
        stream: false,
        count: 3,
    },
    Plan {
        provider: "google",
        stream: false,
        count: 5,
    },
];

/// A generous output bound: each call reserves far more than the fakes' four-word answers cost,
/// so a charge of the reservation instead of the usage would show.
const MAX_TOKENS: u32 = 2_000;

/// What the client saw of one call.
#[derive(Debug)]
struct Seen {
    provider: &'static str,
    stream: bool,
    /// The complete answer's usage and charge: a plain 200 body, or a stream's `done`.
    answered: Option<(u64, u64, i64)>,
    /// Text deltas received (streams).
    deltas: usize,
}

/// Shared keys for the three providers at `fake`, with the behaviours the plans need.
fn shared_keys(fake: &FakeProviders, kw: &Keyward) {
    for (p, behaviour) in [
        ("anthropic", Behaviour::Ok),
        ("openai", Behaviour::SlowStream(Duration::from_millis(1_500))),
        ("google", Behaviour::SlowStream(Duration::from_secs(30))),
    ] {
        let key = key_for(p);
        fake.set_key(provider(p), &key, behaviour);
        set_shared_key(kw, p, &key);
    }
}

/// Starts every call of [`PLANS`] against `kw`; each task reports what its client saw.
fn start_calls(kw: &Keyward, token: &str, account: &str) -> Vec<tokio::task::JoinHandle<Seen>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let url = format!("{}{}", kw.base_url(), ai_path(account));
    let mut tasks = Vec::new();
    for plan in &PLANS {
        for _ in 0..plan.count {
            let (client, url, token) = (client.clone(), url.clone(), token.to_owned());
            let (p, stream) = (plan.provider, plan.stream);
            tasks.push(tokio::spawn(async move {
                let body = chat_body(p, stream, MAX_TOKENS);
                let mut seen = Seen {
                    provider: p,
                    stream,
                    answered: None,
                    deltas: 0,
                };
                let Ok(mut r) = client.post(&url).bearer_auth(&token).json(&body).send().await else {
                    return seen;
                };
                let status = r.status().as_u16();
                let mut bytes = Vec::new();
                // A killed gateway breaks the body off: what arrived until then is what the
                // client has.
                while let Ok(Some(chunk)) = r.chunk().await {
                    bytes.extend_from_slice(&chunk);
                }
                let text = String::from_utf8_lossy(&bytes);
                if status != 200 {
                    return seen;
                }
                let usage_of = |v: &Value| {
                    Some((
                        v["usage"]["input_tokens"].as_u64()?,
                        v["usage"]["output_tokens"].as_u64()?,
                        v["credits_charged"].as_i64()?,
                    ))
                };
                if stream {
                    let events = parse_sse(&text);
                    seen.deltas = events.iter().filter(|e| e.name == "delta").count();
                    seen.answered = events.iter().find(|e| e.name == "done").and_then(|e| usage_of(&e.data));
                } else if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    seen.answered = usage_of(&v);
                }
                seen
            }));
        }
    }
    tasks
}

/// (credits used, credits reserved, lease rows) of the account's current month, read from
/// the database.
async fn db_credits_sqlite(kw: &Keyward, account: &str) -> (i64, i64, i64) {
    let db = kw.db().await;
    let (used, reserved): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(credits_used), 0), COALESCE(SUM(credits_reserved), 0) FROM credit_periods WHERE account_id = ?1",
    )
    .bind(account)
    .fetch_one(&db)
    .await
    .unwrap();
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservation_leases")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    (used, reserved, leases)
}

async fn db_credits_pg(db: &TempDatabase, account: &str) -> (i64, i64, i64) {
    let pool = db.pool().await;
    let (used, reserved): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(credits_used), 0)::bigint, COALESCE(SUM(credits_reserved), 0)::bigint
         FROM credit_periods WHERE account_id = $1",
    )
    .bind(account)
    .fetch_one(&pool)
    .await
    .unwrap();
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservation_leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    (used, reserved, leases)
}

/// Waits until the fake has every call's request and the in-flight ones have begun to
/// answer (the streams sent their first text), then returns the calls answered before.
async fn wait_until_in_flight(fake: &FakeProviders, tasks: &mut Vec<tokio::task::JoinHandle<Seen>>) -> Vec<Seen> {
    let total: usize = PLANS.iter().map(|p| p.count).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests().len() < total {
        assert!(
            Instant::now() < deadline,
            "the fake saw {} of {total} calls",
            fake.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The Anthropic calls answer at once and the OpenAI plain ones after 1.5 s; the streams
    // end 10.5 s after they start and the Google calls after 30 s, so this wait leaves every
    // slow call mid-way, far from the moment it settles (the streams have sent text by now).
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let mut done = Vec::new();
    let mut running = Vec::new();
    for t in tasks.drain(..) {
        if t.is_finished() {
            done.push(t.await.unwrap());
        } else {
            running.push(t);
        }
    }
    *tasks = running;
    done
}

/// The account's `ai.request` events (newest first).
async fn ai_events(kw: &Keyward, token: &str, account: &str) -> Vec<Value> {
    audit_events(kw, token, account)
        .await
        .into_iter()
        .filter(|e| e["action"] == "ai.request")
        .collect()
}

/// Checks the end state after the kill: no reservation left, one event per call (`ok` for
/// each answered one, `error:abandoned` for the others), and credits used equal to what the
/// answers the client received cost. Returns (answered, abandoned, credits).
async fn check_nothing_lost(
    kw: &Keyward,
    token: &str,
    account: &str,
    seen: &[Seen],
    (used, reserved, leases): (i64, i64, i64),
) -> (usize, usize, i64) {
    let total: usize = PLANS.iter().map(|p| p.count).sum();
    assert_eq!(seen.len(), total);
    assert_eq!((reserved, leases), (0, 0), "every reservation released");
    let answered: Vec<&Seen> = seen.iter().filter(|s| s.answered.is_some()).collect();
    // What the answers the client received cost, from their usage and the catalogue.
    let mut expected = 0i64;
    for s in &answered {
        let (input, output, charged) = s.answered.unwrap_or_default();
        let credits = expected_credits(
            s.provider,
            &default_model(s.provider),
            PROMPT.len() as u64,
            u64::from(MAX_TOKENS),
            input,
            output,
        ) as i64;
        assert_eq!(charged, credits, "{s:?}: the answer's credits_charged");
        expected += credits;
    }
    assert_eq!(
        used, expected,
        "credits charged = the usage of the calls the client saw answered"
    );

    let events = ai_events(kw, token, account).await;
    assert_eq!(events.len(), total, "one ai.request event per call: {events:#?}");
    let ok = events.iter().filter(|e| e["outcome"] == "ok").count();
    let abandoned: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "error:abandoned").collect();
    assert_eq!(ok, answered.len(), "an ok event for each call the client saw answered");
    assert_eq!(
        abandoned.len(),
        total - answered.len(),
        "error:abandoned for each other call"
    );
    for e in &abandoned {
        assert_eq!(e["key_source"], "shared", "{e}");
        assert_eq!(e["input_tokens"], 0, "{e}");
        assert!(e["model"].is_string() && e["actor"].is_string(), "{e}");
    }
    // Every client that saw no answer lost its call to the kill; the ones that did were
    // the fast ones.
    for s in seen {
        if s.answered.is_none() {
            assert!(
                s.provider != "anthropic",
                "{s:?} should have been answered before the kill"
            );
        }
    }
    assert_audit_ok(kw, Some(account));
    (answered.len(), abandoned.len(), used)
}

/// SQLite, one node: the restarted node releases its last run's leases at start, long before
/// they would expire (the lease is 60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_with_shared_calls_in_flight_loses_nothing_sqlite() {
    let fake = FakeProviders::start().unwrap();
    let mut kw = start_with(fake_options(&fake, &[("KEYWARD_RESERVATION_LEASE_SECS", "60")]).log("info"));
    let (token, account) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    shared_keys(&fake, &kw);
    set_limit(&kw, &account, 1_000_000);

    let mut tasks = start_calls(&kw, &token, &account);
    let mut seen = wait_until_in_flight(&fake, &mut tasks).await;
    let before = db_credits_sqlite(&kw, &account).await;
    assert!(before.1 > 0 && before.2 == tasks.len() as i64, "in flight: {before:?}");
    kw.kill();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    let partial = seen
        .iter()
        .filter(|s| s.stream && s.answered.is_none() && s.deltas > 0)
        .count();
    assert!(partial > 0, "some streams were cut mid-way: {seen:?}");
    // Still held while the node is down: nothing else would release them for 60 s.
    assert_eq!(db_credits_sqlite(&kw, &account).await.2, before.2);

    let restarted = Instant::now();
    kw.start_again();
    let after = db_credits_sqlite(&kw, &account).await;
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "released at start, not at expiry ({took:?})"
    );
    let (answered, abandoned, credits) = check_nothing_lost(&kw, &token, &account, &seen, after).await;
    eprintln!(
        "sqlite: kill -9 with {} calls in flight ({} reserved credits, {partial} streams mid-way): \
         {answered} answered and charged {credits} credits, {abandoned} released as abandoned at restart ({took:?})",
        before.2, before.1
    );
    assert!(kw
        .output()
        .contains("released the reservation of a call that was never settled"));
}

/// PostgreSQL, two nodes: node A is killed with the calls in flight and stays down; node B
/// releases A's leases once they expire (a 3 s lease). A, restarted, finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_with_shared_calls_in_flight_loses_nothing_postgres() {
    let Some(server) = server_url("a_gateway_killed_with_shared_calls_in_flight_loses_nothing_postgres") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let opts = |o: keyward_testkit::Options| {
        o.env("KEYWARD_DATABASE_URL", &db.url)
            .env("KEYWARD_RESERVATION_LEASE_SECS", "3")
            .log("info")
    };
    let mut a = start_with(opts(fake_options(&fake, &[])));
    let b = start_with(opts(fake_options(&fake, &[]).same_keys_as(&a)));
    let (token, account) = (a.owner_token().to_owned(), a.owner_account().to_owned());
    shared_keys(&fake, &a);
    set_limit(&a, &account, 1_000_000);

    let mut tasks = start_calls(&a, &token, &account);
    let mut seen = wait_until_in_flight(&fake, &mut tasks).await;
    // A renews its leases while the calls run (the wait above outlasted a 3 s lease's
    // first renewal), so B has released none of them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = db_credits_pg(&db, &account).await;
    assert!(
        before.1 > 0 && before.2 == tasks.len() as i64,
        "in flight, renewed: {before:?}"
    );
    a.kill();
    let killed = Instant::now();
    for t in tasks {
        seen.push(t.await.unwrap());
    }

    // B releases them after expiry: within the lease and a sweep or two.
    let after = loop {
        let now = db_credits_pg(&db, &account).await;
        if now.2 == 0 || killed.elapsed() > Duration::from_secs(30) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = killed.elapsed();
    assert!(b
        .output()
        .contains("released the reservation of a call that was never settled"));
    let (answered, abandoned, credits) = check_nothing_lost(&b, &token, &account, &seen, after).await;

    // A restarts: its earlier run's leases are gone already, and nothing is released twice.
    a.start_again();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(db_credits_pg(&db, &account).await, after);
    assert_eq!(ai_events(&b, &token, &account).await.len(), seen.len());
    eprintln!(
        "postgres: node A killed with {} calls in flight: {answered} answered and charged {credits} credits, \
         {abandoned} released as abandoned by node B {took:?} after the kill (lease 3 s)",
        before.2
    );
}
