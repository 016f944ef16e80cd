//! The storage conformance suite: every behaviour the server relies on, written once
//! against `&dyn Store` and run on each backend. A backend is correct when it passes
//! all of it.

// The suite's helpers are plain async fns called from `#[tokio::test]`s, so clippy does not
// see them as test code; a failing step should stop the test loudly, as in a `#[test]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use keyward_core::{
    AccountId, Email, ExternalId, KeyId, KeyKind, KeySource, Last4, Plan, Provider, Role, Scope, ServiceId, UnixMillis,
    UserId,
};
use keyward_crypto::{AuditChainKey, SealedKey};
use keyward_store::audit::verify_chain;
use keyward_store::postgres::PgOptions;
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{
    AccountSpec, AttemptOutcome, AuditAction, AuditActor, AuditFilter, CallRecord, KeyCallHealth, LastTest, LeaseId,
    LeaseRelease, LeasedCall, NewAuditEvent, NewKey, NewLease, PgStore, SessionLimits, SqliteStore, Store, StoreError,
    WebhookFilter, KEY_SOURCES,
};
use sqlx::Connection;

const CHAIN_KEY: [u8; 32] = [42; 32];

struct Backend {
    store: Arc<dyn Store>,
    /// A second, independent handle on the same database (its own connections), standing
    /// in for a second gateway process.
    twin: Arc<dyn Store>,
    /// Dropped after both handles (fields drop in order): removes the database.
    _cleanup: Cleanup,
}

#[allow(dead_code, reason = "held only to be dropped")]
enum Cleanup {
    Dir(tempfile::TempDir),
    Database(TestDatabase),
}

async fn sqlite() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = open_sqlite(&url, SqliteOptions::default()).await;
    let twin = open_sqlite(&url, SqliteOptions::default()).await;
    Some(Backend {
        store: Arc::new(store),
        twin: Arc::new(twin),
        _cleanup: Cleanup::Dir(dir),
    })
}

/// A SQLite store on `url` with the suite's chain key.
async fn open_sqlite(url: &str, opts: SqliteOptions) -> SqliteStore {
    SqliteStore::open(url, AuditChainKey::from_bytes_for_tests(CHAIN_KEY), opts)
        .await
        .unwrap()
}

/// A test's own setting from the environment (not keyward's configuration, which
/// `Config::load` reads).
#[allow(clippy::disallowed_methods, reason = "test settings, not keyward configuration")]
fn test_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A fresh database on the server named by `KEYWARD_TEST_POSTGRES_URL`, dropped (best
/// effort, also when the test fails) when this is dropped.
struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create(server: &str) -> TestDatabase {
        let name = format!("kw_test_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to KEYWARD_TEST_POSTGRES_URL: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        TestDatabase {
            url: with_database(server, &name),
            server: server.to_owned(),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                let done = sqlx::raw_sql(&sql).execute(&mut conn).await.ok();
                let _ = conn.close().await;
                done
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// `server` (a `postgres://` URL) with its database replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (scheme, rest) = server.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    format!("{scheme}://{authority}/{name}{query}")
}

/// A fresh PostgreSQL database, or `None` (after saying so) when no server is configured.
/// Fails instead when `KEYWARD_TEST_REQUIRE_ALL=1`.
async fn pg_database() -> Option<TestDatabase> {
    let Some(server) = test_env("KEYWARD_TEST_POSTGRES_URL") else {
        keyward_testenv::skip(keyward_testenv::reasons::POSTGRES);
        return None;
    };
    Some(TestDatabase::create(&server).await)
}

async fn pg_open(db: &TestDatabase, opts: PgOptions) -> Result<PgStore, StoreError> {
    PgStore::open(&db.url, AuditChainKey::from_bytes_for_tests(CHAIN_KEY), opts).await
}

fn pg_test_options() -> PgOptions {
    PgOptions {
        pool_size: 4,
        ..PgOptions::default()
    }
}

async fn postgres() -> Option<Backend> {
    let db = pg_database().await?;
    // Both nodes start at once on the empty database: the migration lock makes them take turns.
    let (store, twin) = tokio::join!(pg_open(&db, pg_test_options()), pg_open(&db, pg_test_options()));
    Some(Backend {
        store: Arc::new(store.unwrap()),
        twin: Arc::new(twin.unwrap()),
        _cleanup: Cleanup::Database(db),
    })
}

fn id<T>(f: fn([u8; 16]) -> T, n: u8) -> T {
    f([n; 16])
}

fn t(ms: i64) -> UnixMillis {
    UnixMillis(ms)
}

fn new_key(n: u8, last4: &str) -> NewKey {
    NewKey {
        key_id: id(KeyId::from_random, n),
        sealed: SealedKey::from_bytes(vec![n; 64]),
        last4: Last4::from_stored(last4).unwrap(),
        kind: KeyKind::OpenAiProject,
    }
}

/// A user `u` owning account `a` on `plan`.
async fn owner_with_account(s: &dyn Store, n: u8, plan: Plan) -> (UserId, AccountId) {
    let user = id(UserId::from_random, n);
    let email = Email::parse(&format!("user{n}@example.com")).unwrap();
    s.create_user(&user, &email, &format!("hash{n}"), t(1)).await.unwrap();
    let account = id(AccountId::from_random, n);
    s.create_account(&account, &format!("Account {n}"), plan, &user, t(2))
        .await
        .unwrap();
    (user, account)
}

async fn chain_ok(s: &dyn Store, account: &AccountId) -> usize {
    let (events, head) = s.audit_chain(account).await.unwrap();
    verify_chain(
        &AuditChainKey::from_bytes_for_tests(CHAIN_KEY),
        account.as_str(),
        &events,
        head.as_ref(),
    )
    .unwrap()
}

async fn users_tokens_and_memberships(s: &dyn Store) {
    assert_eq!(s.count_users().await.unwrap(), 0);
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    assert_eq!(s.count_users().await.unwrap(), 1);
    let found = s.user_by_token("hash1").await.unwrap().unwrap();
    assert_eq!(found.id, user);
    assert!(s.user_by_token("nope").await.unwrap().is_none());
    assert_eq!(
        s.user_by_email(&Email::parse("USER1@example.com").unwrap())
            .await
            .unwrap()
            .unwrap()
            .id,
        user
    );

    // Same email again is a conflict, and nothing half-created remains.
    let dup = s
        .create_user(
            &id(UserId::from_random, 9),
            &Email::parse("user1@example.com").unwrap(),
            "hash9",
            t(3),
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert!(s.user_by_token("hash9").await.unwrap().is_none());

    let m = s.membership(&account, &user).await.unwrap().unwrap();
    assert_eq!(
        (m.role, m.account.plan, m.account.shared_credit_limit),
        (Role::Owner, Plan::Pro, 20_000)
    );

    let (other, other_account) = owner_with_account(s, 2, Plan::Free).await;
    assert!(s.membership(&account, &other).await.unwrap().is_none());
    // The one-read form: unknown token, known token but not a member, member.
    assert!(s.member_by_token("nope", &account).await.unwrap().is_none());
    let (u, m) = s.member_by_token("hash2", &account).await.unwrap().unwrap();
    assert_eq!((u.id, m.map(|m| m.role)), (other.clone(), None));
    let (u, m) = s.member_by_token("hash1", &account).await.unwrap().unwrap();
    let m = m.unwrap();
    assert_eq!(
        (
            u.id,
            m.role,
            m.account.id,
            m.account.plan,
            m.account.shared_credit_limit
        ),
        (user.clone(), Role::Owner, account.clone(), Plan::Pro, 20_000)
    );
    let (_, m) = s.member_by_token("hash2", &other_account).await.unwrap().unwrap();
    assert_eq!(m.map(|m| (m.role, m.account.plan)), Some((Role::Owner, Plan::Free)));
    s.set_membership(&account, &other, Role::Member, t(4)).await.unwrap();
    assert_eq!(
        s.member_by_token("hash2", &account)
            .await
            .unwrap()
            .unwrap()
            .1
            .map(|m| m.role),
        Some(Role::Member)
    );
    assert_eq!(
        s.membership(&account, &other).await.unwrap().unwrap().role,
        Role::Member
    );
    s.set_membership(&account, &other, Role::Admin, t(5)).await.unwrap();
    assert_eq!(s.membership(&account, &other).await.unwrap().unwrap().role, Role::Admin);
    assert_eq!(s.memberships_of(&other).await.unwrap().len(), 2);

    let cli = AuditActor("cli".to_owned());
    s.set_plan(&account, Plan::Business, Some(77), &cli, t(6))
        .await
        .unwrap();
    let a = s.account(&account).await.unwrap().unwrap();
    assert_eq!((a.plan, a.shared_credit_limit), (Plan::Business, 77));
    s.set_plan(&account, Plan::Pro, None, &cli, t(7)).await.unwrap();
    assert_eq!(
        s.account(&account).await.unwrap().unwrap().shared_credit_limit,
        77,
        "None keeps the override"
    );
    assert!(matches!(
        s.set_plan(&id(AccountId::from_random, 99), Plan::Pro, None, &cli, t(8))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.account_ids().await.unwrap().len(), 2);
}

async fn key_lifecycle_with_audit(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let states = s.provider_states(&account).await.unwrap();
    assert_eq!(states.iter().map(|p| p.provider).collect::<Vec<_>>(), Provider::ALL);
    assert!(states.iter().all(|p| p.source == KeySource::Shared && p.key.is_none()));

    // own without a key is refused and changes nothing.
    assert!(matches!(
        s.set_source(&account, Provider::OpenAi, KeySource::Own, &actor, t(10))
            .await,
        Err(StoreError::NoKeySaved)
    ));

    let saved = s
        .save_key(&account, Provider::OpenAi, new_key(1, "aaaa"), &actor, t(11))
        .await
        .unwrap();
    assert!(!saved.rotated);
    assert_eq!(
        saved.state.source,
        KeySource::Shared,
        "saving does not switch the source"
    );
    assert_eq!(saved.state.key.as_ref().unwrap().last4.as_str(), "aaaa");

    let own = s
        .set_source(&account, Provider::OpenAi, KeySource::Own, &actor, t(12))
        .await
        .unwrap();
    assert_eq!(own.source, KeySource::Own);
    // Setting the same source again appends nothing.
    s.set_source(&account, Provider::OpenAi, KeySource::Own, &actor, t(13))
        .await
        .unwrap();

    let rotated = s
        .save_key(&account, Provider::OpenAi, new_key(2, "bbbb"), &actor, t(14))
        .await
        .unwrap();
    assert!(rotated.rotated);
    let meta = rotated.state.key.unwrap();
    assert_eq!(
        (meta.last4.as_str(), meta.created_at, meta.updated_at),
        ("bbbb", t(11), t(14))
    );
    assert_eq!(rotated.state.source, KeySource::Own, "rotation keeps the source");
    let stored = s.sealed_key(&account, Provider::OpenAi).await.unwrap().unwrap();
    assert_eq!(stored.sealed.as_bytes(), &[2u8; 64][..], "the old blob is replaced");
    assert_eq!(stored.key_id, id(KeyId::from_random, 2));

    s.remove_key(&account, Provider::OpenAi, &actor, t(15)).await.unwrap();
    let after = s.provider_state(&account, Provider::OpenAi).await.unwrap();
    assert_eq!((after.source, after.key), (KeySource::Shared, None));
    assert!(s.sealed_key(&account, Provider::OpenAi).await.unwrap().is_none());
    assert!(matches!(
        s.remove_key(&account, Provider::OpenAi, &actor, t(16)).await,
        Err(StoreError::NoKeySaved)
    ));

    let page = s.audit_page(&account, 10, None).await.unwrap();
    let actions: Vec<&str> = page.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["key.removed", "key.rotated", "key.source_changed", "key.saved"]
    );
    assert!(page
        .iter()
        .all(|e| e.provider.as_deref() == Some("openai") && e.actor == user.as_str()));
    assert_eq!(page[0].key_last4.as_deref(), Some("bbbb"));
    assert_eq!(page[1].detail.as_deref(), Some("replaced key ending aaaa"));
    let older = s.audit_page(&account, 2, Some(page[1].id)).await.unwrap();
    assert_eq!(older.iter().map(|e| e.id).collect::<Vec<_>>(), [page[2].id, page[3].id]);
    assert_eq!(chain_ok(s, &account).await, 4);
}

async fn audit_batches_chain_per_account(s: &dyn Store) {
    let (_, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s, 2, Plan::Pro).await;
    let ev = |acc: &AccountId, n: i64| {
        let mut e = NewAuditEvent::new(
            acc,
            t(n),
            &AuditActor("cli".into()),
            AuditAction::AiRequest,
            Provider::Google,
        );
        e.input_tokens = Some(n);
        e
    };
    let batch: Vec<_> = (0..10).map(|n| ev(if n % 3 == 0 { &b } else { &a }, n)).collect();
    s.append_audit(&batch).await.unwrap();
    s.append_audit(&[ev(&a, 100)]).await.unwrap();
    assert_eq!(chain_ok(s, &a).await, 7);
    assert_eq!(chain_ok(s, &b).await, 4);
    let (events, head) = s.audit_chain(&a).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(head.unwrap().seq, 7);
}

async fn concurrent_saves_leave_one_consistent_key(s: Arc<dyn Store>) {
    let (user, account) = owner_with_account(s.as_ref(), 1, Plan::Pro).await;
    let mut tasks = Vec::new();
    for n in 0..50u8 {
        let (s, account, actor) = (s.clone(), account.clone(), AuditActor(user.to_string()));
        tasks.push(tokio::spawn(async move {
            let last4 = format!("k{n:03}");
            s.save_key(
                &account,
                Provider::Anthropic,
                new_key(n, &last4),
                &actor,
                t(100 + i64::from(n)),
            )
            .await
        }));
    }
    let mut rotations = 0;
    for task in tasks {
        if task.await.unwrap().unwrap().rotated {
            rotations += 1;
        }
    }
    assert_eq!(rotations, 49, "exactly one save found the slot empty");
    let stored = s.sealed_key(&account, Provider::Anthropic).await.unwrap().unwrap();
    let n = stored.sealed.as_bytes()[0];
    assert_eq!(
        stored.key_id,
        id(KeyId::from_random, n),
        "blob and key id come from the same save"
    );
    assert_eq!(stored.last4.as_str(), format!("k{n:03}"));
    assert_eq!(chain_ok(s.as_ref(), &account).await, 50);
}

async fn purge_completes(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    s.save_key(
        &account,
        Provider::Google,
        new_key(3, "cccc"),
        &AuditActor(user.to_string()),
        t(1),
    )
    .await
    .unwrap();
    s.remove_key(&account, Provider::Google, &AuditActor(user.to_string()), t(2))
        .await
        .unwrap();
    assert!(s.purge_removed().await.unwrap());
    s.ping().await.unwrap();
}

async fn shared_keys_save_rotate_read(s: &dyn Store) {
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    for p in Provider::ALL {
        assert!(s.shared_key(p).await.unwrap().is_none());
    }
    assert!(!s
        .save_shared_key(Provider::Anthropic, new_key(1, "sh01"), t(10))
        .await
        .unwrap());
    assert!(!s
        .save_shared_key(Provider::Google, new_key(2, "sh02"), t(11))
        .await
        .unwrap());
    let got = s.shared_key(Provider::Anthropic).await.unwrap().unwrap();
    assert_eq!(
        (got.key_id, got.sealed.as_bytes(), got.last4.as_str()),
        (id(KeyId::from_random, 1), &[1u8; 64][..], "sh01")
    );

    // Rotation replaces blob, key id and last4 in place; other providers are untouched.
    assert!(s
        .save_shared_key(Provider::Anthropic, new_key(3, "sh03"), t(12))
        .await
        .unwrap());
    let got = s.shared_key(Provider::Anthropic).await.unwrap().unwrap();
    assert_eq!(
        (got.key_id, got.sealed.as_bytes(), got.last4.as_str()),
        (id(KeyId::from_random, 3), &[3u8; 64][..], "sh03")
    );
    assert_eq!(
        s.shared_key(Provider::Google).await.unwrap().unwrap().last4.as_str(),
        "sh02"
    );
    assert!(s.shared_key(Provider::OpenAi).await.unwrap().is_none());

    // Platform keys are not any account's keys, and leave no account audit trail.
    assert!(s.sealed_key(&account, Provider::Anthropic).await.unwrap().is_none());
    assert!(s
        .provider_states(&account)
        .await
        .unwrap()
        .iter()
        .all(|p| p.key.is_none()));
    assert_eq!(chain_ok(s, &account).await, 0);
    assert!(s.purge_removed().await.unwrap());
}

/// `call_key` (the AI hot path's one read) picks the key the source selects, and only it.
/// `call_key`, after checking that `member_and_call_key` (the AI routes' single read) gives
/// the same key and the membership of the account for `token_hash`'s user.
async fn both(s: &dyn Store, token_hash: &str, account: &AccountId, p: Provider) -> keyward_store::CallKey {
    let alone = s.call_key(account, p).await.unwrap();
    let (_, member) = s.member_and_call_key(token_hash, account, p).await.unwrap().unwrap();
    let (membership, joined) = member.expect("a member");
    assert_eq!(&membership.account.id, account);
    assert_eq!(joined.source, alone.source);
    let parts = |k: &keyward_store::CallKey| {
        k.key.as_ref().map(|k| {
            (
                k.key_id.to_string(),
                k.sealed.as_bytes().to_vec(),
                k.last4.as_str().to_owned(),
            )
        })
    };
    assert_eq!(parts(&joined), parts(&alone));
    alone
}

/// The AI routes' one read under a crowd (more lookups at once than the store has reader
/// connections) and under cancellation (lookups dropped at every point, as a client that
/// hangs up drops its call): every finished lookup answers the key, and none of the
/// dropped ones loses a connection for good, so a crowd still gets through afterwards.
async fn call_key_lookups_survive_crowds_and_cancellation(s: Arc<dyn Store>) {
    let (user, account) = owner_with_account(s.as_ref(), 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::OpenAi;
    s.save_key(&account, p, new_key(2, "mine"), &actor, t(11))
        .await
        .unwrap();
    s.set_source(&account, p, KeySource::Own, &actor, t(12)).await.unwrap();

    let crowd = |s: Arc<dyn Store>, account: AccountId| async move {
        let lookups = (0..48).map(|_| {
            let (s, account) = (s.clone(), account.clone());
            tokio::spawn(async move { s.member_and_call_key("hash1", &account, p).await })
        });
        for lookup in lookups.collect::<Vec<_>>() {
            let (_, member) = lookup.await.unwrap().unwrap().unwrap();
            let key = member.expect("a member").1.key.expect("a key");
            assert_eq!(key.last4.as_str(), "mine");
        }
    };
    let within = std::time::Duration::from_secs(20);
    tokio::time::timeout(within, crowd(s.clone(), account.clone()))
        .await
        .expect("a crowd of lookups finishes");
    for i in 0..200u64 {
        // Cut off after 0 to ~200 µs: before the lease, while waiting for SQLite, after.
        let cut = std::time::Duration::from_micros(i % 8 * 25);
        let _ = tokio::time::timeout(cut, s.member_and_call_key("hash1", &account, p)).await;
    }
    tokio::time::timeout(within, crowd(s.clone(), account.clone()))
        .await
        .expect("lookups cut off midway left no connection or permit behind");
}

async fn call_key_follows_the_source(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::OpenAi;
    let picked = |k: &keyward_store::CallKey| (k.source, k.key.as_ref().map(|k| k.last4.as_str().to_owned()));

    // Nothing configured: shared, and no key to use.
    assert_eq!(picked(&both(s, "hash1", &account, p).await), (KeySource::Shared, None));
    s.save_shared_key(p, new_key(1, "pool"), t(10)).await.unwrap();
    assert_eq!(
        picked(&both(s, "hash1", &account, p).await),
        (KeySource::Shared, Some("pool".to_owned()))
    );
    // A saved own key is kept but not used while the source is shared.
    s.save_key(&account, p, new_key(2, "mine"), &actor, t(11))
        .await
        .unwrap();
    let k = both(s, "hash1", &account, p).await;
    assert_eq!(picked(&k), (KeySource::Shared, Some("pool".to_owned())));
    assert_eq!(k.key.unwrap().sealed.as_bytes(), &[1u8; 64][..]);
    // Switched to own: the own key, with its blob and key id.
    s.set_source(&account, p, KeySource::Own, &actor, t(12)).await.unwrap();
    let k = both(s, "hash1", &account, p).await;
    assert_eq!(picked(&k), (KeySource::Own, Some("mine".to_owned())));
    let k = k.key.unwrap();
    assert_eq!(
        (k.key_id, k.sealed.as_bytes()),
        (id(KeyId::from_random, 2), &[2u8; 64][..])
    );
    // Other providers and other accounts are untouched.
    assert_eq!(
        picked(&both(s, "hash1", &account, Provider::Google).await),
        (KeySource::Shared, None)
    );
    let (user2, other) = owner_with_account(s, 2, Plan::Pro).await;
    // A non-member gets their user and no key; an unknown token gets nothing.
    let (u, member) = s.member_and_call_key("hash2", &account, p).await.unwrap().unwrap();
    assert_eq!(u.id, user2);
    assert!(member.is_none());
    assert!(s.member_and_call_key("nope", &account, p).await.unwrap().is_none());
    assert_eq!(
        picked(&both(s, "hash2", &other, p).await),
        (KeySource::Shared, Some("pool".to_owned()))
    );
    // Removing the own key switches the account back to the shared pool.
    s.remove_key(&account, p, &actor, t(13)).await.unwrap();
    assert_eq!(
        picked(&both(s, "hash1", &account, p).await),
        (KeySource::Shared, Some("pool".to_owned()))
    );
}

fn tested(account: &AccountId, at: i64, ok: bool) -> NewAuditEvent {
    NewAuditEvent::new(
        account,
        t(at),
        &AuditActor("usr_tester".into()),
        AuditAction::KeyTested,
        Provider::OpenAi,
    )
    .detail(Some(if ok { "ok" } else { "invalid_key" }.to_owned()))
}

async fn key_test_labels_only_the_current_key(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::OpenAi;

    // No key at all: nothing to label, but the test is still audited.
    let result = LastTest {
        ok: true,
        at: t(5),
        message: "ok".into(),
        detail: None,
    };
    let stray = id(KeyId::from_random, 9);
    assert!(!s
        .record_key_test(&account, p, &stray, &result, &tested(&account, 5, true))
        .await
        .unwrap());

    s.save_key(&account, p, new_key(1, "aaaa"), &actor, t(10))
        .await
        .unwrap();
    let first = s.sealed_key(&account, p).await.unwrap().unwrap().key_id;
    let ok = LastTest {
        ok: true,
        at: t(11),
        message: "ok".into(),
        detail: None,
    };
    assert!(s
        .record_key_test(&account, p, &first, &ok, &tested(&account, 11, true))
        .await
        .unwrap());
    let meta = s.provider_state(&account, p).await.unwrap().key.unwrap();
    assert_eq!(meta.last_test, Some(ok.clone()));

    // A rotation clears last_test; a test of the old key that finishes afterwards must not
    // label the new one, but is audited all the same.
    s.save_key(&account, p, new_key(2, "bbbb"), &actor, t(12))
        .await
        .unwrap();
    let stale = LastTest {
        ok: false,
        at: t(13),
        message: "Incorrect API key provided".into(),
        detail: None,
    };
    assert!(!s
        .record_key_test(&account, p, &first, &stale, &tested(&account, 13, false))
        .await
        .unwrap());
    let meta = s.provider_state(&account, p).await.unwrap().key.unwrap();
    assert_eq!((meta.last4.as_str(), meta.last_test), ("bbbb", None));

    let second = id(KeyId::from_random, 2);
    let bad = LastTest {
        ok: false,
        at: t(14),
        message: "Your credit balance is too low".into(),
        detail: None,
    };
    assert!(s
        .record_key_test(&account, p, &second, &bad, &tested(&account, 14, false))
        .await
        .unwrap());
    assert_eq!(
        s.provider_state(&account, p).await.unwrap().key.unwrap().last_test,
        Some(bad)
    );

    // An event for another account or action is refused before anything is written.
    let (_, other) = owner_with_account(s, 2, Plan::Pro).await;
    let wrong = s
        .record_key_test(&account, p, &second, &ok, &tested(&other, 15, true))
        .await;
    assert!(matches!(wrong, Err(StoreError::Invalid(_))), "{wrong:?}");
    let mut not_a_test = tested(&account, 15, true);
    not_a_test.action = AuditAction::KeySaved;
    let wrong = s.record_key_test(&account, p, &second, &ok, &not_a_test).await;
    assert!(matches!(wrong, Err(StoreError::Invalid(_))), "{wrong:?}");
    assert_eq!(
        s.provider_state(&account, p)
            .await
            .unwrap()
            .key
            .unwrap()
            .last_test
            .unwrap()
            .at,
        t(14)
    );

    let actions: Vec<String> = s
        .audit_page(&account, 10, None)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "key.tested",
            "key.saved",
            "key.tested",
            "key.rotated",
            "key.tested",
            "key.tested"
        ]
    );
    assert_eq!(chain_ok(s, &account).await, 6);
    assert_eq!(chain_ok(s, &other).await, 0);
}

const PERIOD: &str = "2026-11";

async fn reserve_refuses_past_the_limit(s: &dyn Store) {
    let (_, account) = owner_with_account(s, 1, Plan::Free).await;
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (0, 0));

    // A refusal on a fresh period leaves nothing behind.
    assert!(!s.reserve_credits(&account, PERIOD, 100, 101, t(1)).await.unwrap());
    assert_eq!(s.usage(&account, PERIOD).await.unwrap().credits_reserved, 0);

    assert!(s.reserve_credits(&account, PERIOD, 100, 60, t(1)).await.unwrap());
    assert!(
        s.reserve_credits(&account, PERIOD, 100, 40, t(1)).await.unwrap(),
        "exactly the limit is allowed"
    );
    assert!(!s.reserve_credits(&account, PERIOD, 100, 1, t(1)).await.unwrap());
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!(
        (usage.credits_used, usage.credits_reserved),
        (0, 100),
        "a refusal changes nothing"
    );

    // Used credits count against the limit too.
    s.finish_calls(&[call(&account, Provider::Google, KeySource::Shared, 60, 30, 1)])
        .await
        .unwrap();
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (30, 40));
    assert!(!s.reserve_credits(&account, PERIOD, 100, 31, t(1)).await.unwrap());
    assert!(s.reserve_credits(&account, PERIOD, 100, 30, t(1)).await.unwrap());
    // A lowered limit refuses everything new; a zero-credit reservation still fits a full pool.
    assert!(!s.reserve_credits(&account, PERIOD, 50, 1, t(1)).await.unwrap());
    assert!(s.reserve_credits(&account, PERIOD, 100, 0, t(1)).await.unwrap());
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (30, 70));

    // Periods are separate pools.
    assert!(s.reserve_credits(&account, "2026-12", 100, 100, t(1)).await.unwrap());
    assert_eq!(s.usage(&account, PERIOD).await.unwrap().credits_reserved, 70);

    // Bad input is refused, not written; an unknown account is not found.
    for (period, amount) in [("2026-13", 1), ("2026-1", 1), ("202611", 1), (PERIOD, -5)] {
        let r = s.reserve_credits(&account, period, 100, amount, t(1)).await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{period} {amount}: {r:?}");
    }
    let r = s
        .reserve_credits(&id(AccountId::from_random, 99), PERIOD, 100, 1, t(1))
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(s.usage(&account, PERIOD).await.unwrap().credits_reserved, 70);
}

async fn concurrent_reserves_hold_the_cap(s: Arc<dyn Store>, twin: Arc<dyn Store>) {
    let (_, account) = owner_with_account(s.as_ref(), 1, Plan::Pro).await;
    let mut tasks = Vec::new();
    for n in 0..40 {
        // Half through each handle: the cap must hold across processes, not just in one.
        let s = if n % 2 == 0 { s.clone() } else { twin.clone() };
        let account = account.clone();
        tasks.push(tokio::spawn(async move {
            s.reserve_credits(&account, PERIOD, 95, 10, t(1)).await
        }));
    }
    let mut granted = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 9);
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (0, 90));
}

/// A finished call and its `ai.request` event.
fn call(account: &AccountId, provider: Provider, source: KeySource, reserved: i64, charged: i64, n: i64) -> CallRecord {
    let input_tokens = 100 + n;
    let output_tokens = 10 + n;
    CallRecord {
        account_id: account.clone(),
        period: PERIOD.to_owned(),
        provider,
        source,
        reserved,
        charged,
        input_tokens,
        output_tokens,
        audit: NewAuditEvent {
            account_id: account.clone(),
            at: t(1_000 + n),
            actor: "usr_caller".into(),
            action: AuditAction::AiRequest,
            provider: Some(provider),
            key_source: Some(source),
            key_last4: (source == KeySource::Own).then(|| Last4::from_stored("own4").unwrap()),
            model: Some("some-model".into()),
            outcome: keyward_core::Outcome::Ok,
            detail: None,
            provider_request_id: Some(format!("req_{n}")),
            input_tokens: Some(input_tokens),
            output_tokens: Some(output_tokens),
            feature: Some("drafting".into()),
            on_behalf_of: None,
        },
        lease: None,
    }
}

fn row(report: &keyward_store::UsageReport, provider: Provider, source: KeySource) -> (i64, i64, i64) {
    let u = report
        .by_provider
        .iter()
        .find(|u| u.provider == provider && u.source == source)
        .unwrap();
    (u.requests, u.input_tokens, u.output_tokens)
}

/// One bad record in a batch of 64: the other 63 commit, exactly once and in order, and only
/// the bad one is answered with an error. Bad twice over: a call of an account deleted while
/// it was in flight (the database refuses its settlement: the foreign key to the account),
/// and a record the store's own checks refuse (negative tokens).
async fn a_bad_record_fails_alone_and_the_rest_of_the_batch_commits(s: &dyn Store) {
    let (_, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, gone) = owner_with_account(s, 2, Plan::Pro).await;
    // Even records are shared calls (reserve 3, charge 2), odd ones own-key calls.
    let record = |i: i64| {
        if i % 2 == 0 {
            call(&a, Provider::OpenAi, KeySource::Shared, 3, 2, i)
        } else {
            call(&a, Provider::Anthropic, KeySource::Own, 0, 0, i)
        }
    };
    for _ in 0..64 {
        assert!(s.reserve_credits(&a, PERIOD, 100_000, 3, t(1)).await.unwrap());
    }
    assert!(s.reserve_credits(&gone, PERIOD, 100_000, 3, t(1)).await.unwrap());
    s.delete_account(&gone, &AuditActor("cli".into()), None, t(3))
        .await
        .unwrap();
    let closed = chain_ok(s, &gone).await;

    const BAD: usize = 37;
    let mut batch: Vec<CallRecord> = (0..64).map(record).collect();
    batch[BAD] = call(&gone, Provider::OpenAi, KeySource::Shared, 3, 2, BAD as i64);
    let results = s.finish_calls_isolated(&batch).await;
    assert_eq!(results.len(), 64);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_err(), i == BAD, "record {i}: {r:?}");
    }
    // The 63 good ones, once each, in batch order; nothing of the bad one.
    let (events, _) = s.audit_chain(&a).await.unwrap();
    assert_eq!(chain_ok(s, &a).await, 63);
    let expected_at: Vec<i64> = (0..64).filter(|&i| i != BAD as i64).map(|i| 1_000 + i).collect();
    assert_eq!(events.iter().map(|e| e.at).collect::<Vec<_>>(), expected_at);
    let shared_good = (0..64).filter(|&i| i % 2 == 0 && i != BAD as i64).count() as i64;
    let own_good = 63 - shared_good;
    let usage = s.usage(&a, PERIOD).await.unwrap();
    // 32 shared calls (BAD is odd, so all even ones are good): 32 × 2 charged, and the
    // reservations of all 64 reserves minus the 32 settled ones still held.
    assert_eq!(
        (usage.credits_used, usage.credits_reserved),
        (shared_good * 2, (64 - shared_good) * 3)
    );
    assert_eq!(row(&usage, Provider::OpenAi, KeySource::Shared).0, shared_good);
    assert_eq!(row(&usage, Provider::Anthropic, KeySource::Own).0, own_good);
    assert_eq!(
        chain_ok(s, &gone).await,
        closed,
        "the deleted account's chain stays closed"
    );

    // A record the store's own checks refuse fails alone too.
    let mut batch: Vec<CallRecord> = (100..164)
        .map(|i| call(&a, Provider::Google, KeySource::Own, 0, 0, i))
        .collect();
    batch[5].input_tokens = -1;
    let results = s.finish_calls_isolated(&batch).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_err(), i == 5, "record {i}: {r:?}");
    }
    assert!(
        matches!(&results[5], Err(StoreError::Invalid(m)) if m.contains("call record 5")),
        "{:?}",
        results[5]
    );
    assert_eq!(chain_ok(s, &a).await, 63 + 63);
    assert_eq!(
        row(&s.usage(&a, PERIOD).await.unwrap(), Provider::Google, KeySource::Own).0,
        63
    );
    // An empty batch is no work.
    assert!(s.finish_calls_isolated(&[]).await.is_empty());
}

/// The platform's chain: appended in order, verified with the chain key, and its head listed
/// with every account's.
async fn platform_chain_appends_verifies_and_lists_heads(s: &dyn Store) {
    use keyward_store::audit::verify_platform_chain;
    use keyward_store::{NewPlatformEvent, PlatformAction, PLATFORM_CHAIN};
    let key = AuditChainKey::from_bytes_for_tests(CHAIN_KEY);
    let (events, head) = s.platform_chain().await.unwrap();
    assert_eq!(verify_platform_chain(&key, &events, head.as_ref()), Ok(0));
    let (_, a) = owner_with_account(s, 1, Plan::Pro).await;
    s.save_key(
        &a,
        Provider::OpenAi,
        new_key(1, "ab12"),
        &AuditActor("usr_x".into()),
        t(4),
    )
    .await
    .unwrap();
    let cli = AuditActor("cli".into());
    let mut kek = NewPlatformEvent::new(t(5), &cli, PlatformAction::KekRotated);
    kek.kek_id = Some("local-2".into());
    let mut shared = NewPlatformEvent::new(t(6), &cli, PlatformAction::SharedKeySaved);
    shared.provider = Some(Provider::Google);
    shared.key_last4 = Some(Last4::from_stored("zz99").unwrap());
    let mut plan = NewPlatformEvent::new(t(7), &cli, PlatformAction::PlanChanged);
    plan.account_id = Some(a.clone());
    plan.detail = Some("pro -> free".into());
    for e in [&kek, &shared, &plan] {
        s.append_platform_audit(e).await.unwrap();
    }
    let (events, head) = s.platform_chain().await.unwrap();
    assert_eq!(verify_platform_chain(&key, &events, head.as_ref()), Ok(3));
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["kek.rotated", "shared_key.saved", "account.plan_changed"]);
    assert_eq!(events[0].kek_id.as_deref(), Some("local-2"));
    assert_eq!(events[1].provider.as_deref(), Some("google"));
    assert_eq!(events[2].account_id.as_deref(), Some(a.as_str()));
    let heads = s.chain_heads().await.unwrap();
    let platform = heads.iter().find(|(c, _)| c == PLATFORM_CHAIN).unwrap();
    assert_eq!(Some(&platform.1), head.as_ref());
    let account = heads.iter().find(|(c, _)| c == a.as_str()).unwrap();
    assert_eq!(account.1.seq, 1);
    // Another key does not verify it.
    let other = AuditChainKey::from_bytes_for_tests([1; 32]);
    assert!(verify_platform_chain(&other, &events, head.as_ref()).is_err());
}

async fn finish_calls_settles_a_mixed_batch(s: &dyn Store) {
    let (_, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s, 2, Plan::Business).await;
    // Reservations for the shared calls below, as the gateway makes them before calling.
    for (acc, amount) in [(&a, 50), (&a, 30), (&b, 40)] {
        assert!(s.reserve_credits(acc, PERIOD, 1_000, amount, t(1)).await.unwrap());
    }
    let batch = vec![
        call(&a, Provider::Anthropic, KeySource::Shared, 50, 20, 0),
        call(&b, Provider::OpenAi, KeySource::Own, 0, 0, 1),
        call(&a, Provider::Anthropic, KeySource::Own, 0, 0, 2),
        call(&b, Provider::Google, KeySource::Shared, 40, 40, 3),
        call(&a, Provider::Anthropic, KeySource::Shared, 30, 5, 4),
        call(&b, Provider::OpenAi, KeySource::Own, 0, 0, 5),
    ];

    // One malformed record refuses the whole batch before anything is written.
    let mut bad = batch.clone();
    bad[3].audit.account_id = a.clone();
    let r = s.finish_calls(&bad).await;
    assert!(
        matches!(&r, Err(StoreError::Invalid(m)) if m.contains("call record 3")),
        "{r:?}"
    );
    let mut bad = batch.clone();
    bad[1].charged = -1;
    assert!(matches!(s.finish_calls(&bad).await, Err(StoreError::Invalid(_))));
    assert_eq!(s.usage(&a, PERIOD).await.unwrap().credits_reserved, 80);
    assert_eq!(chain_ok(s, &a).await, 0);

    s.finish_calls(&batch).await.unwrap();
    s.finish_calls(&[]).await.unwrap();

    let ua = s.usage(&a, PERIOD).await.unwrap();
    assert_eq!((ua.credits_used, ua.credits_reserved), (25, 0));
    let ub = s.usage(&b, PERIOD).await.unwrap();
    assert_eq!((ub.credits_used, ub.credits_reserved), (40, 0));

    // All six rows, in Provider::ALL × (shared, own) order, zeros where there were no calls.
    for report in [&ua, &ub] {
        let order: Vec<_> = report.by_provider.iter().map(|u| (u.provider, u.source)).collect();
        let expected: Vec<_> = Provider::ALL
            .iter()
            .flat_map(|p| KEY_SOURCES.iter().map(move |s| (*p, *s)))
            .collect();
        assert_eq!(order, expected);
    }
    assert_eq!(
        row(&ua, Provider::Anthropic, KeySource::Shared),
        (2, 100 + 104, 10 + 14)
    );
    assert_eq!(row(&ua, Provider::Anthropic, KeySource::Own), (1, 102, 12));
    assert_eq!(row(&ua, Provider::OpenAi, KeySource::Own), (0, 0, 0));
    assert_eq!(row(&ub, Provider::OpenAi, KeySource::Own), (2, 101 + 105, 11 + 15));
    assert_eq!(row(&ub, Provider::Google, KeySource::Shared), (1, 103, 13));
    assert_eq!(row(&ub, Provider::Anthropic, KeySource::Shared), (0, 0, 0));
    assert_eq!(ua.by_provider.iter().map(|u| u.requests).sum::<i64>(), 3);
    assert_eq!(ub.by_provider.iter().map(|u| u.requests).sum::<i64>(), 3);

    // Each account's chain holds its own calls, in batch order, and verifies.
    assert_eq!(chain_ok(s, &a).await, 3);
    assert_eq!(chain_ok(s, &b).await, 3);
    let (events, _) = s.audit_chain(&a).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.provider_request_id.as_deref().unwrap())
            .collect::<Vec<_>>(),
        ["req_0", "req_2", "req_4"]
    );
    assert!(events.iter().all(|e| e.action == "ai.request"));
    assert_eq!(events[1].key_source.as_deref(), Some("own"));
    assert_eq!(events[1].key_last4.as_deref(), Some("own4"));

    // A second batch adds to the same counters and continues the chains.
    assert!(s.reserve_credits(&a, PERIOD, 1_000, 10, t(1)).await.unwrap());
    s.finish_calls(&[call(&a, Provider::Anthropic, KeySource::Shared, 10, 10, 6)])
        .await
        .unwrap();
    let ua = s.usage(&a, PERIOD).await.unwrap();
    assert_eq!((ua.credits_used, ua.credits_reserved), (35, 0));
    assert_eq!(row(&ua, Provider::Anthropic, KeySource::Shared).0, 3);
    assert_eq!(chain_ok(s, &a).await, 4);
    // Other periods are untouched.
    let other = s.usage(&a, "2026-10").await.unwrap();
    assert_eq!((other.credits_used, other.credits_reserved), (0, 0));
    assert!(other.by_provider.iter().all(|u| u.requests == 0));
}

async fn release_credits_frees_without_charging(s: &dyn Store) {
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    assert!(s.reserve_credits(&account, PERIOD, 100, 70, t(1)).await.unwrap());
    assert!(!s.reserve_credits(&account, PERIOD, 100, 40, t(1)).await.unwrap());
    s.release_credits(&account, PERIOD, 70).await.unwrap();
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (0, 0));
    assert!(
        usage.by_provider.iter().all(|u| u.requests == 0),
        "a release is not a request"
    );
    assert!(
        s.reserve_credits(&account, PERIOD, 100, 100, t(1)).await.unwrap(),
        "the credits are free again"
    );

    s.release_credits(&account, PERIOD, 0).await.unwrap();
    assert!(matches!(
        s.release_credits(&account, PERIOD, -1).await,
        Err(StoreError::Invalid(_))
    ));
    // Releasing more than is reserved (a caller bug) clamps at zero rather than failing.
    s.release_credits(&account, PERIOD, 150).await.unwrap();
    assert_eq!(s.usage(&account, PERIOD).await.unwrap().credits_reserved, 0);
    assert_eq!(chain_ok(s, &account).await, 0, "releases are not audited calls");
}

async fn large_batch_commits_in_one_call(s: &dyn Store) {
    let (_, a) = owner_with_account(s, 1, Plan::Business).await;
    let (_, b) = owner_with_account(s, 2, Plan::Business).await;
    let mut batch = Vec::with_capacity(500);
    for n in 0..500i64 {
        let account = if n % 2 == 0 { &a } else { &b };
        let provider = Provider::ALL[(n % 3) as usize];
        if n % 5 == 0 {
            batch.push(call(account, provider, KeySource::Own, 0, 0, n));
        } else {
            assert!(s.reserve_credits(account, PERIOD, 100_000, 20, t(1)).await.unwrap());
            batch.push(call(account, provider, KeySource::Shared, 20, 7, n));
        }
    }
    // Measured on the 2-core dev VM (debug build, SQLite on ext4, WAL, synchronous=FULL):
    // the 500-record batch commits in about 8-18 ms (15-35 us a record: the audit inserts and
    // HMACs dominate; credits and counters fold to one statement per row touched), and a
    // 1-record finish_calls takes about 0.3-1.3 ms, mostly the commit's fsync, which is what
    // group commit amortizes. Printed below with `--nocapture`; not asserted.
    let started = Instant::now();
    s.finish_calls(&batch).await.unwrap();
    let batch_time = started.elapsed();

    let ua = s.usage(&a, PERIOD).await.unwrap();
    let ub = s.usage(&b, PERIOD).await.unwrap();
    // 400 shared calls (200 per account) of 7 credits each; nothing left reserved.
    assert_eq!((ua.credits_used, ua.credits_reserved), (1_400, 0));
    assert_eq!((ub.credits_used, ub.credits_reserved), (1_400, 0));
    let requests = |r: &keyward_store::UsageReport| r.by_provider.iter().map(|u| u.requests).sum::<i64>();
    assert_eq!((requests(&ua), requests(&ub)), (250, 250));
    assert_eq!(chain_ok(s, &a).await, 250);
    assert_eq!(chain_ok(s, &b).await, 250);

    assert!(s.reserve_credits(&a, PERIOD, 100_000, 20, t(1)).await.unwrap());
    let one = [call(&a, Provider::Google, KeySource::Shared, 20, 3, 1_000)];
    let started = Instant::now();
    s.finish_calls(&one).await.unwrap();
    let single_time = started.elapsed();
    assert_eq!(chain_ok(s, &a).await, 251);
    eprintln!("finish_calls: 500 records in {batch_time:?}, 1 record in {single_time:?}");
}

/// Two nodes (two handles on one database) working on one account at once: key saves, audit
/// batches and finished calls from both append to ONE chain that verifies, with every event
/// in it exactly once; of the racing first saves per provider exactly one reports "saved";
/// and 2 × 40 racing reservations never take more than the limit.
async fn two_nodes_share_one_chain_and_one_cap(s: Arc<dyn Store>, twin: Arc<dyn Store>) {
    let (user, account) = owner_with_account(s.as_ref(), 1, Plan::Business).await;
    let nodes = [s.clone(), twin.clone()];
    const LIMIT: i64 = 1_000;
    const AMOUNT: i64 = 30;

    let mut writers = Vec::new();
    for n in 0..48u8 {
        let node = nodes[usize::from(n % 2)].clone();
        let (account, actor) = (account.clone(), AuditActor(user.to_string()));
        writers.push(tokio::spawn(async move {
            match n % 3 {
                // A key save: one event, and a first save or a rotation.
                0 => {
                    let provider = Provider::ALL[usize::from(n / 3 % 3)];
                    let saved = node
                        .save_key(
                            &account,
                            provider,
                            new_key(n, &format!("n{n:03}")),
                            &actor,
                            t(100 + i64::from(n)),
                        )
                        .await
                        .unwrap();
                    (1usize, Some((provider, saved.rotated)))
                }
                // An audit batch of two events.
                1 => {
                    let ev = |k: i64| {
                        let mut e = NewAuditEvent::new(
                            &account,
                            t(k),
                            &AuditActor("cli".into()),
                            AuditAction::AiRequest,
                            Provider::Google,
                        );
                        e.provider_request_id = Some(format!("batch_{k}"));
                        e
                    };
                    node.append_audit(&[ev(i64::from(n) * 10), ev(i64::from(n) * 10 + 1)])
                        .await
                        .unwrap();
                    (2, None)
                }
                // A finished own-key call: one event and a counter bump.
                _ => {
                    node.finish_calls(&[call(&account, Provider::OpenAi, KeySource::Own, 0, 0, i64::from(n))])
                        .await
                        .unwrap();
                    (1, None)
                }
            }
        }));
    }
    let mut reservers = Vec::new();
    for n in 0..80 {
        let node = nodes[n % 2].clone();
        let account = account.clone();
        reservers.push(tokio::spawn(async move {
            node.reserve_credits(&account, PERIOD, LIMIT, AMOUNT, t(1))
                .await
                .unwrap()
        }));
    }

    let mut events = 0;
    let mut first_saves = std::collections::BTreeMap::new();
    let mut saves = 0;
    for w in writers {
        let (n, saved) = w.await.unwrap();
        events += n;
        if let Some((provider, rotated)) = saved {
            saves += 1;
            *first_saves.entry(provider).or_insert(0) += usize::from(!rotated);
        }
    }
    let mut granted = 0;
    for r in reservers {
        granted += i64::from(r.await.unwrap());
    }

    assert_eq!(events, 16 + 2 * 16 + 16);
    assert_eq!(
        chain_ok(s.as_ref(), &account).await,
        events,
        "one chain, every event once"
    );
    assert_eq!(
        chain_ok(twin.as_ref(), &account).await,
        events,
        "both nodes read the same chain"
    );
    let (chain, head) = s.audit_chain(&account).await.unwrap();
    assert_eq!(head.unwrap().seq, events as i64);
    let mut ids: Vec<i64> = chain.iter().map(|e| e.id).collect();
    let in_seq_order = ids.clone();
    ids.sort_unstable();
    assert_eq!(ids, in_seq_order, "ids grow along the chain");
    assert_eq!(
        chain
            .iter()
            .filter(|e| e.action == "key.saved" || e.action == "key.rotated")
            .count(),
        saves
    );
    for provider in Provider::ALL {
        assert_eq!(
            first_saves.get(&provider),
            Some(&1),
            "{provider}: exactly one save found the slot empty"
        );
        let stored = s.sealed_key(&account, provider).await.unwrap().unwrap();
        let n = stored.sealed.as_bytes()[0];
        assert_eq!(
            stored.key_id,
            id(KeyId::from_random, n),
            "blob and key id come from the same save"
        );
        assert_eq!(stored.last4.as_str(), format!("n{n:03}"));
    }
    let page = twin.audit_page(&account, 500, None).await.unwrap();
    assert_eq!(page.len(), events);

    assert_eq!(granted, LIMIT / AMOUNT, "as many as fit, and no more");
    let usage = twin.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (0, granted * AMOUNT));
    assert!(usage.credits_reserved <= LIMIT);
    assert_eq!(
        row(&usage, Provider::OpenAi, KeySource::Own).0,
        16,
        "every finished call is counted once"
    );
}

/// Text the store is handed on a provider's behalf (an error message in an audit event, a
/// key test's message) may hold any character, NUL included: it is stored (PostgreSQL
/// cannot hold NUL in text and keeps U+FFFD in its place) and the chain still verifies.
async fn odd_text_is_stored_and_chained(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let odd = "bad\0answer ✓ \u{1F600}";
    let mut event = NewAuditEvent::new(
        &account,
        t(5),
        &AuditActor("cli".into()),
        AuditAction::AiRequest,
        Provider::OpenAi,
    );
    event.detail = Some(odd.to_owned());
    event.model = Some("m\0".to_owned());
    s.append_audit(&[event]).await.unwrap();
    let (events, _) = s.audit_chain(&account).await.unwrap();
    let detail = events[0].detail.as_deref().unwrap();
    assert!(detail == odd || detail == odd.replace('\0', "\u{FFFD}"), "{detail:?}");
    s.save_key(
        &account,
        Provider::OpenAi,
        new_key(1, "aaaa"),
        &AuditActor(user.to_string()),
        t(6),
    )
    .await
    .unwrap();
    let result = LastTest {
        ok: false,
        at: t(7),
        message: odd.to_owned(),
        detail: None,
    };
    assert!(s
        .record_key_test(
            &account,
            Provider::OpenAi,
            &id(KeyId::from_random, 1),
            &result,
            &tested(&account, 7, false)
        )
        .await
        .unwrap());
    let stored = s
        .provider_state(&account, Provider::OpenAi)
        .await
        .unwrap()
        .key
        .unwrap()
        .last_test
        .unwrap();
    assert!(stored.message == odd || stored.message == odd.replace('\0', "\u{FFFD}"));
    assert_eq!(chain_ok(s, &account).await, 3);
}

/// The leaked mark: set only on the key it was found on, kept through failures, read with
/// the key on the call path, cleared by a rotation or a test that works.
async fn leaked_mark_follows_the_key(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::Google;
    let mut key = new_key(1, "b.x_");
    key.kind = KeyKind::GoogleAuth;
    s.save_key(&account, p, key, &actor, t(10)).await.unwrap();
    s.set_source(&account, p, KeySource::Own, &actor, t(11)).await.unwrap();
    let meta = s.provider_state(&account, p).await.unwrap().key.unwrap();
    assert_eq!(
        (meta.kind, meta.reported_leaked_at, meta.last4.as_str()),
        (Some(KeyKind::GoogleAuth), None, "b.x_")
    );
    let first = meta.key_id;

    // A stale key id marks nothing.
    assert!(!s
        .mark_key_leaked(&account, p, &id(KeyId::from_random, 9), t(12))
        .await
        .unwrap());
    assert!(s.mark_key_leaked(&account, p, &first, t(13)).await.unwrap());
    // The first time is kept.
    assert!(!s.mark_key_leaked(&account, p, &first, t(14)).await.unwrap());
    assert_eq!(
        s.provider_state(&account, p)
            .await
            .unwrap()
            .key
            .unwrap()
            .reported_leaked_at,
        Some(t(13))
    );
    assert_eq!(
        s.call_key(&account, p).await.unwrap().key.unwrap().reported_leaked_at,
        Some(t(13))
    );
    assert_eq!(
        s.sealed_key(&account, p).await.unwrap().unwrap().reported_leaked_at,
        Some(t(13))
    );
    let (_, member) = s.member_and_call_key("hash1", &account, p).await.unwrap().unwrap();
    assert_eq!(member.unwrap().1.key.unwrap().reported_leaked_at, Some(t(13)));

    // A failed test keeps it; its detail is stored as given.
    let failed = LastTest {
        ok: false,
        at: t(15),
        message: "key_reported_leaked: Your API key was reported as leaked.".into(),
        detail: Some(r#"{"advice":"replace it"}"#.into()),
    };
    let event = NewAuditEvent::new(&account, t(15), &AuditActor("usr_t".into()), AuditAction::KeyTested, p);
    assert!(s.record_key_test(&account, p, &first, &failed, &event).await.unwrap());
    let meta = s.provider_state(&account, p).await.unwrap().key.unwrap();
    assert_eq!((meta.reported_leaked_at, meta.last_test), (Some(t(13)), Some(failed)));

    // A test that works clears it.
    let worked = LastTest {
        ok: true,
        at: t(16),
        message: "ok".into(),
        detail: None,
    };
    let event = NewAuditEvent::new(&account, t(16), &AuditActor("usr_t".into()), AuditAction::KeyTested, p);
    assert!(s.record_key_test(&account, p, &first, &worked, &event).await.unwrap());
    assert_eq!(
        s.call_key(&account, p).await.unwrap().key.unwrap().reported_leaked_at,
        None
    );

    // Marked again, then rotated: the new key starts clean, with its own kind.
    assert!(s.mark_key_leaked(&account, p, &first, t(17)).await.unwrap());
    let mut second = new_key(2, "ZZZZ");
    second.kind = KeyKind::GoogleStandard;
    s.save_key(&account, p, second, &actor, t(18)).await.unwrap();
    let meta = s.provider_state(&account, p).await.unwrap().key.unwrap();
    assert_eq!(
        (meta.kind, meta.reported_leaked_at),
        (Some(KeyKind::GoogleStandard), None)
    );

    // The shared pool's keys are never marked.
    let mut pool = new_key(3, "pool");
    pool.kind = KeyKind::GoogleAuth;
    s.save_shared_key(p, pool, t(19)).await.unwrap();
    assert_eq!(s.shared_key(p).await.unwrap().unwrap().reported_leaked_at, None);
    chain_ok(s, &account).await;
}

/// The webhook events a store wrote, oldest first, as (type, payload JSON).
async fn outbox_of(s: &dyn Store) -> Vec<(String, serde_json::Value)> {
    let mut events = s.webhook_events(WebhookFilter::All, 1_000).await.unwrap();
    events.reverse();
    events
        .into_iter()
        .map(|e| (e.kind, serde_json::from_str(&e.payload).unwrap()))
        .collect()
}

async fn outbox_follows_key_changes_in_their_transactions(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::OpenAi;
    s.save_key(&account, p, new_key(1, "aaaa"), &actor, t(10))
        .await
        .unwrap();
    s.save_key(&account, p, new_key(2, "bbbb"), &actor, t(11))
        .await
        .unwrap();
    s.set_source(&account, p, KeySource::Own, &actor, t(12)).await.unwrap();
    s.set_source(&account, p, KeySource::Own, &actor, t(13)).await.unwrap(); // no change, no event
    let key_id = s.sealed_key(&account, p).await.unwrap().unwrap().key_id;
    let failed = LastTest {
        ok: false,
        at: t(14),
        message: "Incorrect API key".into(),
        detail: None,
    };
    let test_event = tested(&account, 14, false)
        .last4(Some(&Last4::from_stored("bbbb").unwrap()))
        .outcome(keyward_core::Outcome::Error("invalid_key"));
    s.record_key_test(&account, p, &key_id, &failed, &test_event)
        .await
        .unwrap();
    let passed = LastTest {
        ok: true,
        at: t(15),
        message: "ok".into(),
        detail: None,
    };
    s.record_key_test(&account, p, &key_id, &passed, &tested(&account, 15, true))
        .await
        .unwrap();
    s.remove_key(&account, p, &actor, t(16)).await.unwrap();

    let events = outbox_of(s).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "key.saved",
            "key.rotated",
            "key.source_changed",
            "key.test_failed",
            "key.removed"
        ],
        "one event per change, in order; a passed test and a no-op switch send nothing"
    );
    let (_, rotated) = &events[1];
    assert_eq!(rotated["type"], "key.rotated");
    assert_eq!(rotated["data"]["account_id"], account.as_str());
    assert_eq!(rotated["data"]["provider"], "openai");
    assert_eq!(rotated["data"]["key_last4"], "bbbb");
    assert_eq!(events[2].1["data"]["key_source"], "own");
    assert_eq!(events[3].1["data"]["diagnosis"], "invalid_key");
    for (_, body) in &events {
        let text = body.to_string();
        assert!(
            !text.contains("Incorrect API key"),
            "no provider text in a payload: {text}"
        );
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    let backlog = s.webhook_backlog().await.unwrap();
    assert_eq!(backlog.pending, 5);
    assert_eq!(backlog.oldest_pending_at, Some(t(10)));
}

async fn outbox_hands_out_each_accounts_events_in_order_under_a_lease(s: &dyn Store, twin: &dyn Store) {
    let (user, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s, 2, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    for (n, p) in Provider::ALL.into_iter().enumerate() {
        s.save_key(&a, p, new_key(10 + n as u8, "aaaa"), &actor, t(10 + n as i64))
            .await
            .unwrap();
    }
    s.save_key(&b, Provider::Google, new_key(20, "bbbb"), &actor, t(20))
        .await
        .unwrap();
    let now = t(100);

    // One event per account: a's oldest and b's only one.
    let first = s.claim_webhooks("node-a", now, t(1_100), 10).await.unwrap();
    assert_eq!(
        first.iter().map(|e| e.account_id.clone()).collect::<Vec<_>>(),
        [a.to_string(), b.to_string()]
    );
    assert!(first.iter().all(|e| e.event_id.starts_with("msg_")));
    // Claimed: another node gets nothing until the lease ends.
    assert!(twin
        .claim_webhooks("node-b", now, t(1_100), 10)
        .await
        .unwrap()
        .is_empty());

    // a's first is retried later: a's next event waits behind it (order per account).
    let a1 = &first[0];
    let retry = AttemptOutcome::Retry {
        next_attempt_at: t(500),
        error: "HTTP 503".into(),
    };
    assert!(s
        .record_webhook_attempt(a1.id, "node-a", &[], &retry, now)
        .await
        .unwrap());
    assert!(
        !twin
            .record_webhook_attempt(a1.id, "node-b", &[0], &AttemptOutcome::Delivered, now)
            .await
            .unwrap(),
        "only the claimant records"
    );
    assert!(s
        .claim_webhooks("node-a", t(200), t(1_200), 10)
        .await
        .unwrap()
        .iter()
        .all(|e| e.account_id != a.as_str()));
    let failed = s.webhook_events(WebhookFilter::Failed, 10).await.unwrap();
    assert_eq!(
        failed.iter().map(|e| e.id).collect::<Vec<_>>(),
        [a1.id],
        "only what failed an attempt"
    );
    let again = twin.claim_webhooks("node-b", t(500), t(1_500), 10).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        [a1.id],
        "due again, same event"
    );
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].last_error.as_deref(), Some("HTTP 503"));
    assert!(twin
        .record_webhook_attempt(a1.id, "node-b", &[0, 1], &AttemptOutcome::Delivered, t(501))
        .await
        .unwrap());

    // A node that died holding a claim: its lease runs out and another node takes the event.
    let held = s.claim_webhooks("node-a", t(600), t(700), 10).await.unwrap();
    assert_eq!(
        held.len(),
        1,
        "a's second event (b's is still claimed by node-a's first lease)"
    );
    assert!(twin
        .claim_webhooks("node-b", t(650), t(2_000), 10)
        .await
        .unwrap()
        .is_empty());
    let taken = twin.claim_webhooks("node-b", t(1_101), t(3_000), 10).await.unwrap();
    assert!(
        taken.iter().any(|e| e.id == held[0].id),
        "the expired claim is taken over"
    );

    // Given up on: dead events stop blocking their account and can be replayed.
    let dead = AttemptOutcome::Dead {
        error: "gave up after 24 h".into(),
    };
    assert!(twin
        .record_webhook_attempt(held[0].id, "node-b", &[], &dead, t(1_102))
        .await
        .unwrap());
    let listed = s.webhook_events(WebhookFilter::Dead, 10).await.unwrap();
    assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), [held[0].id]);
    let next = s.claim_webhooks("node-a", t(3_001), t(4_000), 10).await.unwrap();
    assert!(next.iter().any(|e| e.account_id == a.as_str() && e.id > held[0].id));
    assert!(s.replay_webhook(&held[0].event_id, t(3_002)).await.unwrap());
    assert!(!s.replay_webhook("msg_unknown", t(3_002)).await.unwrap());
    assert!(s.webhook_events(WebhookFilter::Dead, 10).await.unwrap().is_empty());
    let replayed = s.webhook_events(WebhookFilter::Undelivered, 10).await.unwrap();
    let r = replayed.iter().find(|e| e.id == held[0].id).unwrap();
    assert_eq!(
        (r.attempts, r.next_attempt_at, r.delivered_to.clone()),
        (0, t(3_002), vec![])
    );
    let delivered = s.webhook_events(WebhookFilter::All, 10).await.unwrap();
    let d = delivered.iter().find(|e| e.id == a1.id).unwrap();
    assert_eq!(
        (d.delivered_at, d.delivered_to.clone(), d.attempts),
        (Some(t(501)), vec![0, 1], 2)
    );
    // Delivered events are pruned after a while; undelivered and dead ones never are.
    assert_eq!(
        s.prune_webhooks(t(501)).await.unwrap(),
        0,
        "delivered at 501, not before"
    );
    assert_eq!(s.prune_webhooks(t(502)).await.unwrap(), 1);
    let left = s.webhook_events(WebhookFilter::All, 10).await.unwrap();
    assert!(left.iter().all(|e| e.id != a1.id) && left.iter().any(|e| e.id == held[0].id));
}

async fn outbox_claims_of_a_nodes_dead_runs_are_freed_at_its_start(s: &dyn Store, twin: &dyn Store) {
    let (user, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s, 2, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    s.save_key(&a, Provider::OpenAi, new_key(10, "aaaa"), &actor, t(10))
        .await
        .unwrap();
    s.save_key(&b, Provider::Google, new_key(20, "bbbb"), &actor, t(20))
        .await
        .unwrap();
    // Run 1 of node x holds a's event, node y holds b's; both until t(10_000).
    let x1 = s.claim_webhooks("node_x/run_1", t(100), t(10_000), 1).await.unwrap();
    let y1 = twin.claim_webhooks("node_y/run_1", t(100), t(10_000), 1).await.unwrap();
    assert_eq!(
        (x1.len(), y1.len(), x1[0].account_id.as_str(), y1[0].account_id.as_str()),
        (1, 1, a.as_str(), b.as_str())
    );
    // Node x restarts (run 1 died): only its own claims are freed, a prefix is not a LIKE.
    assert_eq!(s.release_webhook_claims("node_%/").await.unwrap(), 0);
    assert_eq!(s.release_webhook_claims("node_x/").await.unwrap(), 1);
    let x2 = s.claim_webhooks("node_x/run_2", t(200), t(10_000), 10).await.unwrap();
    assert_eq!(
        x2.iter().map(|e| e.id).collect::<Vec<_>>(),
        [x1[0].id],
        "a's event at once, long before the dead claim's lease; b's is still node y's"
    );
    // The dead run's claim is no longer its to record.
    assert!(!s
        .record_webhook_attempt(x1[0].id, "node_x/run_1", &[0], &AttemptOutcome::Delivered, t(201))
        .await
        .unwrap());
    assert!(s
        .record_webhook_attempt(x1[0].id, "node_x/run_2", &[0], &AttemptOutcome::Delivered, t(201))
        .await
        .unwrap());
    assert!(twin
        .record_webhook_attempt(y1[0].id, "node_y/run_1", &[0], &AttemptOutcome::Delivered, t(202))
        .await
        .unwrap());
}

async fn failing_key_streak_sends_one_event_per_streak(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    let p = Provider::Anthropic;
    s.save_key(&account, p, new_key(1, "own4"), &actor, t(10))
        .await
        .unwrap();
    let own = |n: i64, outcome: keyward_core::Outcome| {
        let mut c = call(&account, p, KeySource::Own, 0, 0, n);
        c.audit.outcome = outcome;
        c
    };
    let bad = keyward_core::Outcome::Error("invalid_key");
    let down = keyward_core::Outcome::Error("provider_unavailable");
    // Two failures, a provider outage (says nothing about the key), then three more in
    // another batch: the third key failure in a row sends key.failing, once.
    s.finish_calls(&[own(1, bad), own(2, bad), own(3, down)]).await.unwrap();
    s.finish_calls(&[own(4, bad), own(5, bad), own(6, bad)]).await.unwrap();
    s.finish_calls(&[own(7, keyward_core::Outcome::Ok), own(8, keyward_core::Outcome::Ok)])
        .await
        .unwrap();
    // A short streak that recovers sends nothing.
    s.finish_calls(&[own(9, bad), own(10, keyward_core::Outcome::Ok)])
        .await
        .unwrap();
    // Shared calls never count.
    s.finish_calls(&[call(&account, p, KeySource::Shared, 0, 0, 11)])
        .await
        .unwrap();
    let events = outbox_of(s).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["key.saved", "key.failing", "key.recovered"]);
    assert_eq!(events[1].1["data"]["diagnosis"], "invalid_key");
    assert_eq!(events[1].1["data"]["key_last4"], "own4");
    // A new key starts a new streak.
    s.finish_calls(&[own(12, bad), own(13, bad)]).await.unwrap();
    s.save_key(&account, p, new_key(2, "new4"), &actor, t(20))
        .await
        .unwrap();
    s.finish_calls(&[own(14, bad)]).await.unwrap();
    assert_eq!(
        outbox_of(s).await.len(),
        4,
        "key.rotated only: the new key's first failure is not a streak of 3"
    );
    assert_eq!(chain_ok(s, &account).await, 16);
}

async fn shared_credit_thresholds_are_announced_once(s: &dyn Store) {
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    let shared =
        |n: i64, reserved: i64, charged: i64| call(&account, Provider::OpenAi, KeySource::Shared, reserved, charged, n);
    assert!(s.reserve_credits(&account, PERIOD, 100, 50, t(1)).await.unwrap());
    s.finish_calls(&[shared(1, 50, 50)]).await.unwrap();
    assert!(outbox_of(s).await.is_empty(), "50% announces nothing");
    assert!(s.reserve_credits(&account, PERIOD, 100, 40, t(1)).await.unwrap());
    s.finish_calls(&[shared(2, 40, 35)]).await.unwrap();
    assert!(s.reserve_credits(&account, PERIOD, 100, 5, t(1)).await.unwrap());
    s.finish_calls(&[shared(3, 5, 5)]).await.unwrap();
    let events = outbox_of(s).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "shared.quota_threshold");
    assert_eq!(events[0].1["data"]["percent"], 80);
    assert_eq!(events[0].1["data"]["period"], PERIOD);
    // 90 used: a 20-credit call cannot be paid: the pool is spent for it (100%), once.
    assert!(!s.reserve_credits(&account, PERIOD, 100, 20, t(1)).await.unwrap());
    assert!(!s.reserve_credits(&account, PERIOD, 100, 20, t(1)).await.unwrap());
    let events = outbox_of(s).await;
    assert_eq!(
        events
            .iter()
            .map(|e| e.1["data"]["percent"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [80, 100]
    );
    assert_eq!(s.usage(&account, PERIOD).await.unwrap().credits_reserved, 0);
}

const LIMITS: SessionLimits = SessionLimits {
    idle_ms: 1_000,
    max_ms: 10_000,
};

/// Sessions: created by hash, seen by any handle (another node), expired idle and at their
/// maximum (and then deleted), ended one by one or all of a user's at once, with a flash
/// read once; only the hash is ever stored.
async fn sessions_live_in_the_store(s: &dyn Store, twin: &dyn Store) {
    let (user, _) = owner_with_account(s, 1, Plan::Pro).await;
    let (other, _) = owner_with_account(s, 2, Plan::Pro).await;
    s.create_session("h1", &user, t(100)).await.unwrap();
    assert!(matches!(
        s.create_session("h1", &other, t(100)).await,
        Err(StoreError::Conflict(_))
    ));
    // Seen on the other handle, marked as used.
    let seen = twin.touch_session("h1", t(900), LIMITS).await.unwrap().unwrap();
    assert_eq!(seen.user.id, user);
    assert_eq!(seen.user.email.as_str(), "user1@example.com");
    assert_eq!((seen.created_at, seen.last_seen_at), (t(100), t(900)));
    // A clock behind does not move last_seen back.
    let back = s.touch_session("h1", t(800), LIMITS).await.unwrap().unwrap();
    assert_eq!(back.last_seen_at, t(900));
    assert!(s.touch_session("nope", t(900), LIMITS).await.unwrap().is_none());
    // Idle for the limit: gone, and deleted.
    assert!(s.touch_session("h1", t(1_900), LIMITS).await.unwrap().is_none());
    assert!(
        !s.end_session("h1").await.unwrap(),
        "an expired session is deleted when met"
    );

    // Kept busy, it still ends at its maximum.
    s.create_session("h2", &user, t(0)).await.unwrap();
    let mut now = 0;
    while now + 500 < 10_000 {
        now += 500;
        assert!(
            s.touch_session("h2", t(now), LIMITS).await.unwrap().is_some(),
            "at {now}"
        );
    }
    assert!(s.touch_session("h2", t(10_000), LIMITS).await.unwrap().is_none());

    // A flash is read once, on any handle.
    s.create_session("h3", &user, t(0)).await.unwrap();
    assert_eq!(s.take_session_flash("h3").await.unwrap(), None);
    s.set_session_flash("h3", "{\"title\":\"one\"}").await.unwrap();
    s.set_session_flash("h3", "{\"title\":\"two\"}").await.unwrap();
    assert_eq!(
        twin.take_session_flash("h3").await.unwrap().as_deref(),
        Some("{\"title\":\"two\"}")
    );
    assert_eq!(s.take_session_flash("h3").await.unwrap(), None);
    s.set_session_flash("missing", "x").await.unwrap();
    assert_eq!(s.take_session_flash("missing").await.unwrap(), None);

    // Ending one ends it everywhere; ending a user's ends all theirs and no one else's.
    assert!(twin.end_session("h3").await.unwrap());
    assert!(s.touch_session("h3", t(1), LIMITS).await.unwrap().is_none());
    for h in ["a1", "a2", "a3"] {
        s.create_session(h, &user, t(0)).await.unwrap();
    }
    s.create_session("b1", &other, t(0)).await.unwrap();
    assert_eq!(twin.end_user_sessions(&user).await.unwrap(), 3);
    for h in ["a1", "a2", "a3"] {
        assert!(s.touch_session(h, t(1), LIMITS).await.unwrap().is_none());
    }
    assert!(s.touch_session("b1", t(1), LIMITS).await.unwrap().is_some());

    // The sweep deletes what expired and keeps what lives.
    s.create_session("old", &other, t(0)).await.unwrap();
    s.create_session("new", &other, t(5_000)).await.unwrap();
    assert_eq!(s.prune_sessions(t(5_500), LIMITS).await.unwrap(), 2, "old and b1");
    assert!(s.touch_session("new", t(5_600), LIMITS).await.unwrap().is_some());
}

/// A call event on `provider` for the audit-search tests.
fn call_event(
    account: &AccountId,
    at: i64,
    provider: Provider,
    source: KeySource,
    last4: Option<&str>,
    outcome: keyward_core::Outcome,
) -> NewAuditEvent {
    NewAuditEvent::new(
        account,
        t(at),
        &AuditActor("cli".into()),
        AuditAction::AiRequest,
        provider,
    )
    .key_source(source)
    .last4(last4.map(|l| Last4::from_stored(l).unwrap()).as_ref())
    .model("m")
    .outcome(outcome)
}

/// The activity page's search: filters and paging in the database, newest first, one
/// account only.
async fn audit_search_filters_and_pages(s: &dyn Store) {
    use keyward_core::Outcome;
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, other) = owner_with_account(s, 2, Plan::Pro).await;
    let mut events = Vec::new();
    for i in 0..30i64 {
        let (p, src, l4) = match i % 3 {
            0 => (Provider::OpenAi, KeySource::Own, Some("aaaa")),
            1 => (Provider::OpenAi, KeySource::Shared, None),
            _ => (Provider::Anthropic, KeySource::Own, Some("bbbb")),
        };
        events.push(call_event(&account, 1_000 + i * 100, p, src, l4, Outcome::Ok));
    }
    events.push(call_event(
        &other,
        1_500,
        Provider::OpenAi,
        KeySource::Own,
        Some("aaaa"),
        Outcome::Ok,
    ));
    s.append_audit(&events).await.unwrap();

    let all = s
        .audit_search(&account, &AuditFilter::default(), None, 0)
        .await
        .unwrap();
    assert_eq!(all.len(), 30);
    assert!(all.windows(2).all(|w| w[0].at > w[1].at), "newest first");
    assert!(all.iter().all(|e| e.account_id == account.as_str()));
    let page = s
        .audit_search(&account, &AuditFilter::default(), Some(10), 10)
        .await
        .unwrap();
    assert_eq!(page, all[10..20].to_vec());
    let tail = s
        .audit_search(&account, &AuditFilter::default(), Some(10), 25)
        .await
        .unwrap();
    assert_eq!(tail.len(), 5);

    let acc = &account;
    let by = |f: AuditFilter| async move { s.audit_search(acc, &f, None, 0).await.unwrap() };
    let openai = by(AuditFilter {
        provider: Some(Provider::OpenAi),
        ..Default::default()
    })
    .await;
    assert_eq!(openai.len(), 20);
    let own_openai = by(AuditFilter {
        provider: Some(Provider::OpenAi),
        key_source: Some(KeySource::Own),
        ..Default::default()
    })
    .await;
    assert_eq!(own_openai.len(), 10);
    assert!(own_openai.iter().all(|e| e.key_last4.as_deref() == Some("aaaa")));
    let bbbb = by(AuditFilter {
        last4: Some("bbbb".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(bbbb.len(), 10);
    assert!(bbbb.iter().all(|e| e.provider.as_deref() == Some("anthropic")));
    // A time window: [2000, 2500) holds events 10..=14.
    let window = by(AuditFilter {
        from: Some(t(2_000)),
        until: Some(t(2_500)),
        ..Default::default()
    })
    .await;
    assert_eq!(
        window.iter().map(|e| e.at).collect::<Vec<_>>(),
        vec![2_400, 2_300, 2_200, 2_100, 2_000]
    );
    let none = by(AuditFilter {
        last4: Some("zzzz".into()),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());
}

/// A key's health from its own-key calls: the newest success since the key was saved, and
/// the failures in the window by diagnosis; shared calls and other providers do not count.
async fn key_call_health_reads_the_audit_log(s: &dyn Store) {
    use keyward_core::Outcome;
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    let own =
        |at: i64, outcome: Outcome| call_event(&account, at, Provider::OpenAi, KeySource::Own, Some("aaaa"), outcome);
    let none = s.key_call_health(&account, Provider::OpenAi, t(0), t(0)).await.unwrap();
    assert_eq!(none, KeyCallHealth::default());
    assert!(!none.failing());
    s.append_audit(&[
        own(100, Outcome::Ok),
        own(200, Outcome::Error("invalid_key")),
        own(1_000, Outcome::Ok),
        own(1_100, Outcome::Error("invalid_key")),
        own(1_200, Outcome::Error("invalid_key")),
        own(1_300, Outcome::Error("no_credit")),
        own(1_400, Outcome::Refused(keyward_core::ErrorCode::KeyReportedLeaked)),
        call_event(
            &account,
            1_500,
            Provider::OpenAi,
            KeySource::Shared,
            None,
            Outcome::Error("invalid_key"),
        ),
        call_event(
            &account,
            1_500,
            Provider::Anthropic,
            KeySource::Own,
            Some("bbbb"),
            Outcome::Ok,
        ),
    ])
    .await
    .unwrap();
    let h = s
        .key_call_health(&account, Provider::OpenAi, t(50), t(500))
        .await
        .unwrap();
    assert_eq!(h.last_ok_at, Some(t(1_000)));
    assert_eq!(
        h.failures
            .iter()
            .map(|f| (f.diagnosis.as_str(), f.count, f.last_at))
            .collect::<Vec<_>>(),
        vec![("invalid_key", 2, t(1_200)), ("no_credit", 1, t(1_300))]
    );
    assert!(h.failing());
    assert_eq!(h.failed(), 3);
    // Since a later save: the older success does not count.
    let h = s
        .key_call_health(&account, Provider::OpenAi, t(1_050), t(0))
        .await
        .unwrap();
    assert_eq!(h.last_ok_at, None);
    assert_eq!(h.failed(), 3);
    // A later success: not failing any more, the failures still counted.
    s.append_audit(&[own(2_000, Outcome::Ok)]).await.unwrap();
    let h = s
        .key_call_health(&account, Provider::OpenAi, t(50), t(500))
        .await
        .unwrap();
    assert_eq!(h.last_ok_at, Some(t(2_000)));
    assert!(!h.failing());
    assert_eq!(h.failed(), 3);
    // Users by id: those that exist.
    let (u3, _) = owner_with_account(s, 3, Plan::Pro).await;
    let found = s
        .users_by_ids(&[u3.clone(), id(UserId::from_random, 99)])
        .await
        .unwrap();
    assert_eq!(found.iter().map(|u| u.id.clone()).collect::<Vec<_>>(), vec![u3]);
    assert!(s.users_by_ids(&[]).await.unwrap().is_empty());
}

// ---- services and the provisioning API ------------------------------------------------

async fn services_are_created_found_by_token_and_revoked(s: &dyn Store) {
    let a = id(ServiceId::from_random, 1);
    s.create_service(
        &a,
        "drafting",
        &[Scope::AuditRead, Scope::AiCall, Scope::AiCall],
        "svc-hash-1",
        t(10),
    )
    .await
    .unwrap();
    let found = s.service_by_token("svc-hash-1").await.unwrap().unwrap();
    assert_eq!((found.id.clone(), found.name.as_str()), (a.clone(), "drafting"));
    assert_eq!(
        found.scopes,
        vec![Scope::AiCall, Scope::AuditRead],
        "deduplicated, in order"
    );
    assert_eq!((found.created_at, found.revoked_at), (t(10), None));
    assert!(s.service_by_token("nope").await.unwrap().is_none());
    // A live name is unique.
    let e = s
        .create_service(
            &id(ServiceId::from_random, 2),
            "drafting",
            &[Scope::AiCall],
            "svc-hash-2",
            t(11),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Conflict(ref m) if m.contains("drafting")),
        "{e:?}"
    );
    // Revoked: the token stops at once; the name may be used again; the row stays listed.
    let revoked = s.revoke_service("drafting", t(12)).await.unwrap().unwrap();
    assert_eq!((revoked.id.clone(), revoked.revoked_at), (a.clone(), Some(t(12))));
    assert!(s.service_by_token("svc-hash-1").await.unwrap().is_none());
    assert!(s.revoke_service("drafting", t(13)).await.unwrap().is_none());
    let b = id(ServiceId::from_random, 3);
    s.create_service(&b, "drafting", &[Scope::AccountsManage], "svc-hash-3", t(14))
        .await
        .unwrap();
    let all = s.services().await.unwrap();
    assert_eq!(
        all.iter().map(|x| (x.id.clone(), x.revoked_at)).collect::<Vec<_>>(),
        vec![(a, Some(t(12))), (b, None)]
    );
    assert_eq!(
        s.service_by_token("svc-hash-3").await.unwrap().unwrap().scopes,
        vec![Scope::AccountsManage]
    );
}

fn spec(name: &str, plan: Plan, limit: Option<i64>) -> AccountSpec {
    AccountSpec {
        name: name.to_owned(),
        plan,
        shared_credit_limit: limit,
    }
}

fn service_actor() -> AuditActor {
    AuditActor("service:provisioning".to_owned())
}

/// (action, detail, actor) of every event, oldest first.
async fn events_of(s: &dyn Store, account: &AccountId) -> Vec<(String, Option<String>, String)> {
    let (events, _) = s.audit_chain(account).await.unwrap();
    events.into_iter().map(|e| (e.action, e.detail, e.actor)).collect()
}

async fn external_accounts_are_put_idempotently_and_plan_changes_audited(s: &dyn Store) {
    let ext = ExternalId::parse("org:42").unwrap();
    assert!(s.account_by_external_id(&ext).await.unwrap().is_none());
    let first = id(AccountId::from_random, 1);
    let put = s
        .put_external_account(&ext, &first, &spec("Acme", Plan::Pro, None), &service_actor(), t(10))
        .await
        .unwrap();
    assert!(put.created && !put.plan_changed);
    assert_eq!(put.account.account.id, first);
    assert_eq!(put.account.external_id, ext);
    assert_eq!(
        put.account.account.shared_credit_limit,
        Plan::Pro.default_shared_credit_limit()
    );
    // No owner yet: nobody is a member, and that is fine.
    assert!(events_of(s, &first).await.is_empty(), "creation is not a plan change");
    // Replays change nothing and add nothing, whatever id they would have used.
    for n in 2..5 {
        let again = s
            .put_external_account(
                &ext,
                &id(AccountId::from_random, n),
                &spec("Acme", Plan::Pro, None),
                &service_actor(),
                t(11),
            )
            .await
            .unwrap();
        assert_eq!((again.created, again.plan_changed), (false, false));
        assert_eq!(again.account, put.account);
    }
    assert!(events_of(s, &first).await.is_empty());
    // A rename alone is no plan change.
    let renamed = s
        .put_external_account(
            &ext,
            &id(AccountId::from_random, 5),
            &spec("Acme Inc", Plan::Pro, None),
            &service_actor(),
            t(12),
        )
        .await
        .unwrap();
    assert_eq!(
        (renamed.account.account.name.as_str(), renamed.plan_changed),
        ("Acme Inc", false)
    );
    // A downgrade is, once.
    for _ in 0..3 {
        s.put_external_account(
            &ext,
            &id(AccountId::from_random, 6),
            &spec("Acme Inc", Plan::Free, None),
            &service_actor(),
            t(13),
        )
        .await
        .unwrap();
    }
    let got = s.account_by_external_id(&ext).await.unwrap().unwrap();
    assert_eq!((got.account.plan, got.account.shared_credit_limit), (Plan::Free, 1_000));
    assert_eq!(
        events_of(s, &first).await,
        vec![(
            "account.plan_changed".to_owned(),
            Some("pro -> free; shared_credit_limit 20000 -> 1000".to_owned()),
            "service:provisioning".to_owned()
        )]
    );
    // A limit of its own; then the CLI's set_plan, audited the same way (and not when nothing changes).
    let limited = s
        .put_external_account(
            &ext,
            &id(AccountId::from_random, 7),
            &spec("Acme Inc", Plan::Free, Some(50)),
            &service_actor(),
            t(14),
        )
        .await
        .unwrap();
    assert!(limited.plan_changed);
    assert_eq!(limited.account.account.shared_credit_limit, 50);
    let cli = AuditActor("cli".to_owned());
    assert!(s.set_plan(&first, Plan::Business, None, &cli, t(15)).await.unwrap());
    assert!(!s.set_plan(&first, Plan::Business, None, &cli, t(16)).await.unwrap());
    assert!(!s.set_plan(&first, Plan::Business, Some(50), &cli, t(17)).await.unwrap());
    let e = s
        .set_plan(&id(AccountId::from_random, 99), Plan::Pro, None, &cli, t(18))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound), "{e:?}");
    let ev = events_of(s, &first).await;
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!(ev[1].1.as_deref(), Some("shared_credit_limit 1000 -> 50"));
    assert_eq!(
        (ev[2].1.as_deref(), ev[2].2.as_str()),
        (Some("free -> business"), "cli")
    );
    assert_eq!(chain_ok(s, &first).await, 3);
    assert_eq!(s.account(&first).await.unwrap().unwrap().plan, Plan::Business);
}

async fn concurrent_puts_of_one_external_id_make_one_account(s: Arc<dyn Store>, twin: Arc<dyn Store>) -> usize {
    let ext = ExternalId::parse("race-1").unwrap();
    let mut tasks = Vec::new();
    for n in 0..20u8 {
        let store = if n % 2 == 0 { s.clone() } else { twin.clone() };
        let ext = ext.clone();
        tasks.push(tokio::spawn(async move {
            store
                .put_external_account(
                    &ext,
                    &id(AccountId::from_random, n + 1),
                    &spec("Race", Plan::Pro, None),
                    &service_actor(),
                    t(1),
                )
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let put = task.await.unwrap();
        created += usize::from(put.created);
        ids.insert(put.account.account.id);
    }
    let accounts = s.account_ids().await.unwrap();
    assert_eq!(
        (created, ids.len(), accounts.len()),
        (1, 1, 1),
        "ids {ids:?}, accounts {accounts:?}"
    );
    accounts.len()
}

async fn deleting_an_account_removes_its_keys_and_closes_its_chain(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = AuditActor(user.to_string());
    s.save_key(&account, Provider::OpenAi, new_key(1, "aaaa"), &actor, t(3))
        .await
        .unwrap();
    s.save_key(&account, Provider::Google, new_key(2, "bbbb"), &actor, t(4))
        .await
        .unwrap();
    s.set_source(&account, Provider::OpenAi, KeySource::Own, &actor, t(5))
        .await
        .unwrap();
    let (_, other) = owner_with_account(s, 2, Plan::Pro).await;
    s.save_key(&other, Provider::OpenAi, new_key(3, "cccc"), &actor, t(5))
        .await
        .unwrap();

    let removed = s
        .delete_account(&account, &service_actor(), Some("external id org:1".to_owned()), t(6))
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert!(s.account(&account).await.unwrap().is_none());
    assert!(s.membership(&account, &user).await.unwrap().is_none());
    assert!(s.sealed_key(&account, Provider::OpenAi).await.unwrap().is_none());
    assert!(s.sealed_key(&account, Provider::Google).await.unwrap().is_none());
    assert!(
        s.sealed_key(&other, Provider::OpenAi).await.unwrap().is_some(),
        "another account's key stays"
    );
    assert!(!s.account_ids().await.unwrap().contains(&account));
    assert!(
        s.chain_account_ids().await.unwrap().contains(&account),
        "the chain is kept"
    );
    let ev = events_of(s, &account).await;
    let tail: Vec<(&str, Option<&str>)> = ev[ev.len() - 3..]
        .iter()
        .map(|(a, d, _)| (a.as_str(), d.as_deref()))
        .collect();
    assert_eq!(
        tail,
        vec![
            ("key.removed", None),
            ("key.removed", None),
            ("account.deleted", Some("external id org:1"))
        ]
    );
    let (events, _) = s.audit_chain(&account).await.unwrap();
    let n = events.len();
    assert_eq!(
        events[n - 3..]
            .iter()
            .map(|e| (e.provider.clone(), e.key_last4.clone()))
            .collect::<Vec<_>>(),
        vec![
            (Some("google".to_owned()), Some("bbbb".to_owned())),
            (Some("openai".to_owned()), Some("aaaa".to_owned())),
            (None, None)
        ]
    );
    assert_eq!(chain_ok(s, &account).await, n);
    let e = s
        .delete_account(&account, &service_actor(), None, t(7))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound), "{e:?}");
    assert_eq!(events_of(s, &account).await.len(), n, "a second delete adds nothing");
    // The user stays; an account with no keys deletes too.
    assert!(s
        .user_by_email(&Email::parse("user1@example.com").unwrap())
        .await
        .unwrap()
        .is_some());
    assert_eq!(s.delete_account(&other, &service_actor(), None, t(8)).await.unwrap(), 1);
    assert!(s.purge_removed().await.is_ok());
}

async fn external_users_and_memberships(s: &dyn Store) {
    let ext = ExternalId::parse("user-7").unwrap();
    let email = Email::parse("ana@example.com").unwrap();
    let u = s
        .put_external_user(&ext, &id(UserId::from_random, 1), &email, t(1))
        .await
        .unwrap();
    assert_eq!(
        (u.user.id.clone(), u.user.email.clone(), u.external_id.clone()),
        (id(UserId::from_random, 1), email.clone(), ext.clone())
    );
    for n in 2..5 {
        let again = s
            .put_external_user(&ext, &id(UserId::from_random, n), &email, t(2))
            .await
            .unwrap();
        assert_eq!(again, u);
    }
    assert_eq!(s.count_users().await.unwrap(), 1);
    assert!(
        s.user_by_token("anything").await.unwrap().is_none(),
        "no token was made"
    );
    let new_email = Email::parse("ana@new.example.com").unwrap();
    let moved = s
        .put_external_user(&ext, &id(UserId::from_random, 5), &new_email, t(3))
        .await
        .unwrap();
    assert_eq!(
        (moved.user.id.clone(), moved.user.email.clone()),
        (u.user.id.clone(), new_email.clone())
    );
    assert_eq!(s.user_by_external_id(&ext).await.unwrap(), Some(moved.clone()));
    // Another user's email: a conflict, nothing written.
    let (_, account) = owner_with_account(s, 9, Plan::Pro).await;
    let taken = Email::parse("user9@example.com").unwrap();
    let e = s
        .put_external_user(&ext, &id(UserId::from_random, 6), &taken, t(4))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Conflict(ref m) if m.contains("user9@example.com")),
        "{e:?}"
    );
    let other = ExternalId::parse("user-8").unwrap();
    let e = s
        .put_external_user(&other, &id(UserId::from_random, 7), &taken, t(4))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    assert!(s.user_by_external_id(&other).await.unwrap().is_none());
    assert_eq!(
        s.user_by_external_id(&ext).await.unwrap().unwrap().user.email,
        new_email
    );
    // Memberships: added, changed, removed once.
    s.set_membership(&account, &u.user.id, Role::Member, t(5))
        .await
        .unwrap();
    s.set_membership(&account, &u.user.id, Role::Admin, t(5)).await.unwrap();
    assert_eq!(
        s.membership(&account, &u.user.id).await.unwrap().unwrap().role,
        Role::Admin
    );
    assert!(s.remove_membership(&account, &u.user.id).await.unwrap());
    assert!(!s.remove_membership(&account, &u.user.id).await.unwrap());
    assert!(s.membership(&account, &u.user.id).await.unwrap().is_none());
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {

            #[tokio::test]
            async fn sessions_live_in_the_store() {
                let Some(b) = super::$backend().await else { return };
                super::sessions_live_in_the_store(b.store.as_ref(), b.twin.as_ref()).await;
            }
            #[tokio::test]
            async fn audit_search_filters_and_pages() {
                let Some(b) = super::$backend().await else { return };
                super::audit_search_filters_and_pages(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn key_call_health_reads_the_audit_log() {
                let Some(b) = super::$backend().await else { return };
                super::key_call_health_reads_the_audit_log(b.store.as_ref()).await;
            }

            #[tokio::test]
            async fn outbox_follows_key_changes_in_their_transactions() {
                let Some(b) = super::$backend().await else { return };
                super::outbox_follows_key_changes_in_their_transactions(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn outbox_hands_out_each_accounts_events_in_order_under_a_lease() {
                let Some(b) = super::$backend().await else { return };
                super::outbox_hands_out_each_accounts_events_in_order_under_a_lease(b.store.as_ref(), b.twin.as_ref())
                    .await;
            }
            #[tokio::test]
            async fn outbox_claims_of_a_nodes_dead_runs_are_freed_at_its_start() {
                let Some(b) = super::$backend().await else { return };
                super::outbox_claims_of_a_nodes_dead_runs_are_freed_at_its_start(b.store.as_ref(), b.twin.as_ref())
                    .await;
            }
            #[tokio::test]
            async fn failing_key_streak_sends_one_event_per_streak() {
                let Some(b) = super::$backend().await else { return };
                super::failing_key_streak_sends_one_event_per_streak(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn shared_credit_thresholds_are_announced_once() {
                let Some(b) = super::$backend().await else { return };
                super::shared_credit_thresholds_are_announced_once(b.store.as_ref()).await;
            }

            #[tokio::test]
            async fn users_tokens_and_memberships() {
                let Some(b) = super::$backend().await else { return };
                super::users_tokens_and_memberships(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn leaked_mark_follows_the_key() {
                let Some(b) = super::$backend().await else { return };
                super::leaked_mark_follows_the_key(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn key_lifecycle_with_audit() {
                let Some(b) = super::$backend().await else { return };
                super::key_lifecycle_with_audit(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn audit_batches_chain_per_account() {
                let Some(b) = super::$backend().await else { return };
                super::audit_batches_chain_per_account(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_saves_leave_one_consistent_key() {
                let Some(b) = super::$backend().await else { return };
                super::concurrent_saves_leave_one_consistent_key(b.store.clone()).await;
            }
            #[tokio::test]
            async fn purge_completes() {
                let Some(b) = super::$backend().await else { return };
                super::purge_completes(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn call_key_lookups_survive_crowds_and_cancellation() {
                let Some(b) = super::$backend().await else { return };
                super::call_key_lookups_survive_crowds_and_cancellation(b.store.clone()).await;
            }
            #[tokio::test]
            async fn call_key_follows_the_source() {
                let Some(b) = super::$backend().await else { return };
                super::call_key_follows_the_source(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn shared_keys_save_rotate_read() {
                let Some(b) = super::$backend().await else { return };
                super::shared_keys_save_rotate_read(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn key_test_labels_only_the_current_key() {
                let Some(b) = super::$backend().await else { return };
                super::key_test_labels_only_the_current_key(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn reserve_refuses_past_the_limit() {
                let Some(b) = super::$backend().await else { return };
                super::reserve_refuses_past_the_limit(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_reserves_hold_the_cap() {
                let Some(b) = super::$backend().await else { return };
                super::concurrent_reserves_hold_the_cap(b.store.clone(), b.twin.clone()).await;
            }
            #[tokio::test]
            async fn a_bad_record_fails_alone_and_the_rest_of_the_batch_commits() {
                let Some(b) = super::$backend().await else { return };
                super::a_bad_record_fails_alone_and_the_rest_of_the_batch_commits(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn platform_chain_appends_verifies_and_lists_heads() {
                let Some(b) = super::$backend().await else { return };
                super::platform_chain_appends_verifies_and_lists_heads(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn finish_calls_settles_a_mixed_batch() {
                let Some(b) = super::$backend().await else { return };
                super::finish_calls_settles_a_mixed_batch(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn release_credits_frees_without_charging() {
                let Some(b) = super::$backend().await else { return };
                super::release_credits_frees_without_charging(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn large_batch_commits_in_one_call() {
                let Some(b) = super::$backend().await else { return };
                super::large_batch_commits_in_one_call(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn two_nodes_share_one_chain_and_one_cap() {
                let Some(b) = super::$backend().await else { return };
                super::two_nodes_share_one_chain_and_one_cap(b.store.clone(), b.twin.clone()).await;
            }
            #[tokio::test]
            async fn services_are_created_found_by_token_and_revoked() {
                let Some(b) = super::$backend().await else { return };
                super::services_are_created_found_by_token_and_revoked(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn external_accounts_are_put_idempotently_and_plan_changes_audited() {
                let Some(b) = super::$backend().await else { return };
                super::external_accounts_are_put_idempotently_and_plan_changes_audited(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_puts_of_one_external_id_make_one_account() {
                let Some(b) = super::$backend().await else { return };
                let n =
                    super::concurrent_puts_of_one_external_id_make_one_account(b.store.clone(), b.twin.clone()).await;
                eprintln!(
                    "{}: 20 concurrent PUTs of one external id made {n} account(s)",
                    stringify!($backend)
                );
            }
            #[tokio::test]
            async fn deleting_an_account_removes_its_keys_and_closes_its_chain() {
                let Some(b) = super::$backend().await else { return };
                super::deleting_an_account_removes_its_keys_and_closes_its_chain(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn external_users_and_memberships() {
                let Some(b) = super::$backend().await else { return };
                super::external_users_and_memberships(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn odd_text_is_stored_and_chained() {
                let Some(b) = super::$backend().await else { return };
                super::odd_text_is_stored_and_chained(b.store.as_ref()).await;
            }
        }
    };
}

conformance!(sqlite);
conformance!(postgres);

// ---- shared-pool reservations as leases ----------------------------------------------------

/// A lease for `amount` credits in [`PERIOD`], held by `node` in `run` until `expires`.
fn lease(account: &AccountId, amount: i64, node: &str, run: &str, expires: i64) -> NewLease {
    NewLease {
        account_id: account.clone(),
        period: PERIOD.to_owned(),
        amount,
        node: node.to_owned(),
        run: run.to_owned(),
        expires_at: t(expires),
        call: LeasedCall {
            actor: AuditActor("usr_caller".into()),
            provider: Provider::Anthropic,
            model: "claude-test".into(),
            key_source: KeySource::Shared,
            feature: Some("drafting".into()),
            on_behalf_of: Some("usr_member".into()),
        },
    }
}

/// The call settling `lease_id`: `reserved` released, `charged` charged.
fn settle(account: &AccountId, lease_id: LeaseId, reserved: i64, charged: i64, n: i64) -> CallRecord {
    CallRecord {
        lease: Some(lease_id),
        ..call(account, Provider::Anthropic, KeySource::Shared, reserved, charged, n)
    }
}

async fn take(s: &dyn Store, l: &NewLease, limit: i64) -> LeaseId {
    s.reserve_lease(l, limit, t(1))
        .await
        .unwrap()
        .expect("the cap allows this lease")
}

/// (credits used, credits reserved) in [`PERIOD`].
async fn credits(s: &dyn Store, account: &AccountId) -> (i64, i64) {
    let u = s.usage(account, PERIOD).await.unwrap();
    (u.credits_used, u.credits_reserved)
}

/// The account's `ai.request` events by outcome, oldest first.
async fn call_outcomes(s: &dyn Store, account: &AccountId) -> Vec<keyward_store::AuditEvent> {
    let (events, _) = s.audit_chain(account).await.unwrap();
    events.into_iter().filter(|e| e.action == "ai.request").collect()
}

async fn leases_are_taken_renewed_settled_and_released_once_expired(s: &dyn Store) {
    let (_, account) = owner_with_account(s, 1, Plan::Pro).await;
    let one = take(s, &lease(&account, 30, "node_a", "run_1", 10_000), 100).await;
    // Past the cap: refused, and no lease is left behind (the sweep below finds none).
    assert_eq!(
        s.reserve_lease(&lease(&account, 80, "node_a", "run_1", 10_000), 100, t(1))
            .await
            .unwrap(),
        None
    );
    let two = take(s, &lease(&account, 20, "node_a", "run_1", 10_000), 100).await;
    let three = take(s, &lease(&account, 10, "node_a", "run_1", 10_000), 100).await;
    assert!(one < two && two < three, "{one} {two} {three}");
    assert_eq!(credits(s, &account).await, (0, 60));
    let bad = s
        .reserve_lease(&lease(&account, 1, "node_a", "", 10_000), 100, t(1))
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");

    // Renewal: only the holding run renews.
    assert_eq!(s.renew_leases("run_1", &[one, two], t(50_000)).await.unwrap().len(), 2);
    assert!(s
        .renew_leases("run_other", &[three], t(50_000))
        .await
        .unwrap()
        .is_empty());

    // Settling `two`: its reservation is released and the charge made.
    s.finish_calls(&[settle(&account, two, 20, 15, 1)]).await.unwrap();
    assert_eq!(credits(s, &account).await, (15, 40));

    // At 20 s only `three` has expired (`one` was renewed, `two` is settled).
    let released = s.release_leases(LeaseRelease::Expired, t(20_000), 100).await.unwrap();
    assert_eq!(released.len(), 1, "{released:?}");
    let r = &released[0];
    assert_eq!(
        (r.id, &r.account_id, r.provider, r.key_source, r.amount, r.node.as_str()),
        (three, &account, Provider::Anthropic, KeySource::Shared, 10, "node_a")
    );
    assert_eq!(credits(s, &account).await, (15, 30));
    // Exactly once: a second sweep finds nothing.
    assert!(s
        .release_leases(LeaseRelease::Expired, t(20_000), 100)
        .await
        .unwrap()
        .is_empty());
    let calls = call_outcomes(s, &account).await;
    assert_eq!(
        calls.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>(),
        ["ok", "error:abandoned"]
    );
    let abandoned = &calls[1];
    assert_eq!(abandoned.actor, "usr_caller");
    assert_eq!(abandoned.at, 20_000);
    assert_eq!(
        (
            abandoned.provider.as_deref(),
            abandoned.key_source.as_deref(),
            abandoned.model.as_deref(),
            abandoned.feature.as_deref(),
            abandoned.on_behalf_of.as_deref(),
        ),
        (
            Some("anthropic"),
            Some("shared"),
            Some("claude-test"),
            Some("drafting"),
            Some("usr_member")
        )
    );
    assert_eq!((abandoned.input_tokens, abandoned.output_tokens), (Some(0), Some(0)));
    let detail = abandoned.detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("node_a") && detail.contains("10 reserved credits"),
        "{detail}"
    );
    // The abandoned call is counted as a request with no tokens.
    let u = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!(row(&u, Provider::Anthropic, KeySource::Shared), (2, 101, 11));

    // A settled lease is never released, by id or by expiry; the renewed one goes when it
    // expires.
    assert!(s
        .release_leases(LeaseRelease::One(two), t(20_000), 1)
        .await
        .unwrap()
        .is_empty());
    let late = s.release_leases(LeaseRelease::Expired, t(60_000), 100).await.unwrap();
    assert_eq!(late.iter().map(|l| l.id).collect::<Vec<_>>(), [one]);
    assert_eq!(credits(s, &account).await, (15, 0));

    // A released lease is never settled: the record is refused (naming it), nothing changes.
    let refused = s.finish_calls(&[settle(&account, one, 30, 30, 2)]).await;
    match refused {
        Err(StoreError::Invalid(m)) => assert!(m.contains("call record 0") && m.contains("released"), "{m}"),
        other => panic!("a settlement of a released lease must be refused: {other:?}"),
    }
    assert_eq!(credits(s, &account).await, (15, 0));
    assert_eq!(call_outcomes(s, &account).await.len(), 3);
    assert_eq!(chain_ok(s, &account).await, 3);

    // One lease released at once, whatever its expiry (a call that could not be recorded).
    let four = take(s, &lease(&account, 5, "node_a", "run_1", 90_000), 100).await;
    let now = s.release_leases(LeaseRelease::One(four), t(61_000), 1).await.unwrap();
    assert_eq!(now.len(), 1);
    assert!(call_outcomes(s, &account).await[3]
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("could not be recorded")));
    assert_eq!(credits(s, &account).await, (15, 0));
}

async fn a_node_releases_its_earlier_runs_and_no_other_nodes_leases(s: &dyn Store) {
    let (_, a) = owner_with_account(s, 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s, 2, Plan::Pro).await;
    let far = 1_000_000_000;
    let old_1 = take(s, &lease(&a, 10, "node_a", "run_old", far), 1_000).await;
    let old_2 = take(s, &lease(&b, 20, "node_a", "run_old", far), 1_000).await;
    let _live = take(s, &lease(&a, 30, "node_a", "run_new", far), 1_000).await;
    let other = take(s, &lease(&a, 40, "node_b", "run_old", far), 1_000).await;
    assert_eq!(credits(s, &a).await, (0, 80));

    let released = s
        .release_leases(
            LeaseRelease::EarlierRuns {
                node: "node_a",
                current: "run_new",
            },
            t(5),
            100,
        )
        .await
        .unwrap();
    let mut ids: Vec<_> = released.iter().map(|l| l.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [old_1, old_2], "only node_a's earlier run");
    assert_eq!(credits(s, &a).await, (0, 70));
    assert_eq!(credits(s, &b).await, (0, 0));
    for acc in [&a, &b] {
        let calls = call_outcomes(s, acc).await;
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].outcome, "error:abandoned");
        assert!(calls[0].detail.as_deref().unwrap_or_default().contains("restarted"));
    }
    // Nothing left of node_a's earlier runs; node_b's lease and node_a's live one stay.
    assert!(s
        .release_leases(
            LeaseRelease::EarlierRuns {
                node: "node_a",
                current: "run_new"
            },
            t(6),
            100
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.renew_leases("run_old", &[other], t(far + 1)).await.unwrap(),
        [other],
        "node_b's lease is still held"
    );
    assert_eq!(chain_ok(s, &a).await, 1);
}

/// Two sweepers (one per handle, standing for two nodes) release 60 expired leases while
/// their calls try to settle 30 of them: each lease ends exactly once, settled or released.
async fn two_sweepers_and_settlements_end_each_lease_once(s: Arc<dyn Store>, twin: Arc<dyn Store>) {
    let (_, a) = owner_with_account(s.as_ref(), 1, Plan::Pro).await;
    let (_, b) = owner_with_account(s.as_ref(), 2, Plan::Pro).await;
    let mut leases = Vec::new();
    for n in 0..60 {
        let account = if n % 2 == 0 { &a } else { &b };
        let node = if n % 3 == 0 { "node_a" } else { "node_b" };
        leases.push((
            account.clone(),
            take(s.as_ref(), &lease(account, 10, node, "run_1", 1_000), 10_000).await,
        ));
    }
    let start = Arc::new(tokio::sync::Barrier::new(4 + 30));
    let mut sweepers = Vec::new();
    for k in 0..4 {
        let node = if k % 2 == 0 { s.clone() } else { twin.clone() };
        let start = start.clone();
        sweepers.push(tokio::spawn(async move {
            start.wait().await;
            let mut mine = Vec::new();
            loop {
                let got = node.release_leases(LeaseRelease::Expired, t(5_000), 3).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|l| l.id));
            }
        }));
    }
    let mut settlers = Vec::new();
    for (n, (account, id)) in leases.iter().take(30).cloned().enumerate() {
        let node = if n % 2 == 0 { s.clone() } else { twin.clone() };
        let start = start.clone();
        settlers.push(tokio::spawn(async move {
            start.wait().await;
            let r = node.finish_calls(&[settle(&account, id, 10, 7, n as i64)]).await;
            match r {
                Ok(()) => Some(id),
                Err(StoreError::Invalid(_)) => None,
                Err(e) => panic!("settlement failed otherwise: {e}"),
            }
        }));
    }
    let mut released = Vec::new();
    for t in sweepers {
        released.extend(t.await.unwrap());
    }
    let mut settled = Vec::new();
    for t in settlers {
        settled.extend(t.await.unwrap());
    }
    let mut all: Vec<LeaseId> = released.iter().chain(&settled).copied().collect();
    all.sort_unstable();
    let mut expected: Vec<LeaseId> = leases.iter().map(|(_, id)| *id).collect();
    expected.sort_unstable();
    assert_eq!(all, expected, "each lease released or settled, exactly once");
    eprintln!(
        "two sweepers and 30 settlements: {} leases released, {} settled",
        released.len(),
        settled.len()
    );
    let (mut used, mut reserved, mut abandoned, mut ok) = (0, 0, 0, 0);
    for acc in [&a, &b] {
        let (u, r) = credits(s.as_ref(), acc).await;
        used += u;
        reserved += r;
        for e in call_outcomes(s.as_ref(), acc).await {
            match e.outcome.as_str() {
                "ok" => ok += 1,
                "error:abandoned" => abandoned += 1,
                other => panic!("unexpected outcome {other}"),
            }
        }
        chain_ok(s.as_ref(), acc).await;
    }
    assert_eq!(reserved, 0);
    assert_eq!(used, 7 * settled.len() as i64, "each settled call charged once");
    assert_eq!((ok, abandoned), (settled.len(), released.len()), "one event per call");
}

macro_rules! leases {
    ($backend:ident, $suite:ident) => {
        mod $suite {
            #[tokio::test]
            async fn leases_are_taken_renewed_settled_and_released_once_expired() {
                let Some(b) = super::$backend().await else { return };
                super::leases_are_taken_renewed_settled_and_released_once_expired(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn a_node_releases_its_earlier_runs_and_no_other_nodes_leases() {
                let Some(b) = super::$backend().await else { return };
                super::a_node_releases_its_earlier_runs_and_no_other_nodes_leases(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn two_sweepers_and_settlements_end_each_lease_once() {
                let Some(b) = super::$backend().await else { return };
                super::two_sweepers_and_settlements_end_each_lease_once(b.store.clone(), b.twin.clone()).await;
            }
        }
    };
}

leases!(sqlite, sqlite_leases);
leases!(postgres, postgres_leases);

/// What only the PostgreSQL backend has: a server to lose, connections to be cut, and a
/// statement timeout bounding lock waits. Each maps to `Unavailable` (503), and the store
/// recovers once the cause is gone.
mod postgres_only {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let r = PgStore::open(
            "postgres://postgres@127.0.0.1:1/keyward",
            AuditChainKey::from_bytes_for_tests(CHAIN_KEY),
            PgOptions {
                connect_timeout: Duration::from_millis(500),
                ..PgOptions::default()
            },
        )
        .await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        let r = PgStore::open(
            "postgres://[oops",
            AuditChainKey::from_bytes_for_tests(CHAIN_KEY),
            PgOptions::default(),
        )
        .await;
        assert!(
            matches!(&r, Err(StoreError::Unavailable(m)) if !m.contains("oops")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn lock_waits_end_at_the_statement_timeout() {
        let Some(db) = pg_database().await else { return };
        let store = pg_open(
            &db,
            PgOptions {
                pool_size: 2,
                statement_timeout: Duration::from_millis(300),
                ..PgOptions::default()
            },
        )
        .await
        .unwrap();
        let (_, account) = owner_with_account(&store, 1, Plan::Pro).await;
        let ev = |n: i64| {
            NewAuditEvent::new(
                &account,
                t(n),
                &AuditActor("cli".into()),
                AuditAction::AiRequest,
                Provider::Google,
            )
        };
        store.append_audit(&[ev(1)]).await.unwrap();

        // Another session holds the chain's head (as a stuck node would).
        let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT * FROM audit_heads FOR UPDATE;")
            .execute(&mut other)
            .await
            .unwrap();
        let started = Instant::now();
        let r = store.append_audit(&[ev(2)]).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();

        store.append_audit(&[ev(3)]).await.unwrap();
        assert_eq!(
            chain_ok(&store, &account).await,
            2,
            "the timed-out append left nothing behind"
        );
    }

    #[tokio::test]
    async fn cut_connections_recover() {
        let Some(db) = pg_database().await else { return };
        let store = pg_open(&db, pg_test_options()).await.unwrap();
        let (_, account) = owner_with_account(&store, 1, Plan::Pro).await;
        // An administrator (or a failover) ends every session of the database: 57P01.
        let mut admin = sqlx::PgConnection::connect(&db.server).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db.name)
        .execute(&mut admin)
        .await
        .unwrap();
        // The first call may see the cut (and say Unavailable); the pool then reconnects.
        match store.account(&account).await {
            Ok(found) => assert!(found.is_some()),
            Err(StoreError::Unavailable(_)) => {}
            Err(other) => panic!("a cut connection must be Unavailable, got {other:?}"),
        }
        assert!(store.account(&account).await.unwrap().is_some());
        store.ping().await.unwrap();
    }
}

/// KEK rotation's storage methods ([`keyward_store::KekStore`]), on each backend: the walk
/// over every sealed blob and the compare-and-swap that moves one blob.
mod kek {
    use super::*;
    use keyward_store::kek::{count_by_kek, BlobOwner, KekStore};

    /// The store twice over the same handle: as `Store` (to save keys) and as `KekStore`.
    type Handles = (Arc<dyn Store>, Arc<dyn KekStore>, Cleanup);

    async fn kek_sqlite() -> Option<Handles> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let store = Arc::new(
            SqliteStore::open(
                &url,
                AuditChainKey::from_bytes_for_tests(CHAIN_KEY),
                SqliteOptions::default(),
            )
            .await
            .unwrap(),
        );
        Some((store.clone(), store, Cleanup::Dir(dir)))
    }

    async fn kek_postgres() -> Option<Handles> {
        let db = pg_database().await?;
        let store = Arc::new(pg_open(&db, pg_test_options()).await.unwrap());
        Some((store.clone(), store, Cleanup::Database(db)))
    }

    /// Blob bytes with a v1 header naming `kek_id` (the store parses nothing beyond it).
    fn blob(kek_id: &str, fill: u8) -> SealedKey {
        let mut b = b"KWB\x01".to_vec();
        b.push(u8::try_from(kek_id.len()).unwrap());
        b.extend_from_slice(kek_id.as_bytes());
        b.extend_from_slice(&[fill; 100]);
        SealedKey::from_bytes(b)
    }

    async fn walk_and_swap(s: &dyn Store, k: &dyn KekStore) {
        assert!(k.sealed_blobs(None, 10).await.unwrap().is_empty());
        // Three accounts with keys for every provider, and two platform keys: 11 blobs.
        let mut saved = Vec::new();
        for a in 1..=3u8 {
            let (_, account) = owner_with_account(s, a, Plan::Pro).await;
            for (i, p) in Provider::ALL.into_iter().enumerate() {
                let n = a * 10 + u8::try_from(i).unwrap();
                let key = NewKey {
                    sealed: blob("local-1", n),
                    ..new_key(n, "ab12")
                };
                s.save_key(&account, p, key, &AuditActor("cli".into()), t(5))
                    .await
                    .unwrap();
                saved.push((account.clone(), p, id(KeyId::from_random, n)));
            }
        }
        for (n, p) in [(90u8, Provider::Anthropic), (91, Provider::OpenAi)] {
            let key = NewKey {
                sealed: blob("local-1", n),
                ..new_key(n, "sh01")
            };
            s.save_shared_key(p, key, t(6)).await.unwrap();
        }

        // A walk in pages of 4 sees every blob once, account keys first, with its binding.
        let mut rows = Vec::new();
        let mut after = None;
        loop {
            let page = k.sealed_blobs(after.as_ref(), 4).await.unwrap();
            assert!(page.len() <= 4);
            let Some(last) = page.last() else { break };
            after = Some(last.cursor());
            rows.extend(page);
        }
        assert_eq!(rows.len(), 11);
        assert!(rows.iter().take(9).all(|r| r.owner == BlobOwner::Account));
        assert!(rows
            .iter()
            .skip(9)
            .all(|r| r.owner == BlobOwner::Platform && r.account_id == "platform"));
        for (account, p, key_id) in &saved {
            let row = rows.iter().find(|r| r.key_id == key_id.as_str()).unwrap();
            assert_eq!((row.account_id.as_str(), row.provider), (account.as_str(), *p));
            let stored = s.sealed_key(account, *p).await.unwrap().unwrap();
            assert_eq!(row.sealed.as_bytes(), stored.sealed.as_bytes());
        }
        let counts = count_by_kek(k, 3).await.unwrap();
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), vec![("local-1".to_owned(), 11)]);

        // Compare-and-swap: a stale "old" changes nothing; the right one moves the blob and
        // nothing else (no updated_at, no audit event); a second swap of the same old fails.
        let (account, p, key_id) = saved.first().cloned().unwrap();
        let old = s.sealed_key(&account, p).await.unwrap().unwrap().sealed;
        let before = s.provider_state(&account, p).await.unwrap();
        let events = chain_ok(s, &account).await;
        let new = blob("local-2", 200);
        assert!(!k
            .replace_sealed_blob(BlobOwner::Account, key_id.as_str(), &blob("local-1", 7), &new)
            .await
            .unwrap());
        assert_eq!(s.sealed_key(&account, p).await.unwrap().unwrap().sealed, old);
        assert!(k
            .replace_sealed_blob(BlobOwner::Account, key_id.as_str(), &old, &new)
            .await
            .unwrap());
        assert_eq!(s.sealed_key(&account, p).await.unwrap().unwrap().sealed, new);
        assert_eq!(s.provider_state(&account, p).await.unwrap(), before);
        assert_eq!(chain_ok(s, &account).await, events);
        assert!(!k
            .replace_sealed_blob(BlobOwner::Account, key_id.as_str(), &old, &blob("local-3", 1))
            .await
            .unwrap());
        // The owner matters: an account key id is not a shared key's.
        assert!(!k
            .replace_sealed_blob(BlobOwner::Platform, key_id.as_str(), &new, &old)
            .await
            .unwrap());

        let shared = s.shared_key(Provider::OpenAi).await.unwrap().unwrap();
        assert!(k
            .replace_sealed_blob(
                BlobOwner::Platform,
                shared.key_id.as_str(),
                &shared.sealed,
                &blob("local-2", 201)
            )
            .await
            .unwrap());
        assert_eq!(
            s.shared_key(Provider::OpenAi).await.unwrap().unwrap().sealed,
            blob("local-2", 201)
        );
        let counts = count_by_kek(k, 100).await.unwrap();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![("local-1".to_owned(), 9), ("local-2".to_owned(), 2)]
        );
        // A removed key leaves the walk.
        s.remove_key(&account, Provider::Google, &AuditActor("cli".into()), t(7))
            .await
            .unwrap();
        assert_eq!(count_by_kek(k, 100).await.unwrap().values().sum::<u64>(), 10);
    }

    async fn sealer_reports(k: &dyn KekStore) {
        assert!(k.sealers_since(t(0)).await.unwrap().is_empty());
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        k.report_sealer("node-a", &ids(&["local-1"]), t(1_000)).await.unwrap();
        k.report_sealer("node-b", &ids(&["local-1"]), t(2_000)).await.unwrap();
        // A report replaces the node's previous one; a node may name two versions.
        k.report_sealer("node-a", &ids(&["local-1", "local-2"]), t(3_000))
            .await
            .unwrap();
        let all = k.sealers_since(t(0)).await.unwrap();
        let seen: Vec<(&str, Vec<String>, i64)> = all
            .iter()
            .map(|r| (r.node_id.as_str(), r.kek_ids.clone(), r.reported_at.as_i64()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("node-a", ids(&["local-1", "local-2"]), 3_000),
                ("node-b", ids(&["local-1"]), 2_000)
            ]
        );
        // Only reports at or after `since` count: an old one is a node that went away.
        let recent = k.sealers_since(t(2_500)).await.unwrap();
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].node_id, "node-a");
        k.forget_sealer("node-a").await.unwrap();
        k.forget_sealer("node-never-seen").await.unwrap();
        let left = k.sealers_since(t(0)).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].node_id, "node-b");
    }

    #[tokio::test]
    async fn sqlite_sealer_reports() {
        let Some((_s, k, _c)) = kek_sqlite().await else { return };
        sealer_reports(k.as_ref()).await;
    }

    #[tokio::test]
    async fn postgres_sealer_reports() {
        let Some((_s, k, _c)) = kek_postgres().await else {
            return;
        };
        sealer_reports(k.as_ref()).await;
    }

    #[tokio::test]
    async fn sqlite_walk_and_swap() {
        let Some((s, k, _c)) = kek_sqlite().await else { return };
        walk_and_swap(s.as_ref(), k.as_ref()).await;
    }

    #[tokio::test]
    async fn postgres_walk_and_swap() {
        let Some((s, k, _c)) = kek_postgres().await else { return };
        walk_and_swap(s.as_ref(), k.as_ref()).await;
    }
}

/// SQLite's writes all run on one thread that owns the read-write connection. A batch that
/// fails inside its transaction must leave nothing behind: no rows, no reservation released,
/// no write lock held; the next batch (on the same writer) and another process both commit.
#[tokio::test]
async fn sqlite_a_batch_failing_mid_write_rolls_back_and_the_writer_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let opts = SqliteOptions {
        busy_timeout: std::time::Duration::from_millis(500),
        ..SqliteOptions::default()
    };
    let s = open_sqlite(&url, opts.clone()).await;
    let twin = open_sqlite(&url, opts).await;
    let (_, account) = owner_with_account(&s, 1, Plan::Pro).await;
    assert!(s.reserve_credits(&account, PERIOD, 1_000, 50, t(1)).await.unwrap());
    // Refuse one event at the database: the batch fails after BEGIN, mid-write.
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON audit_events WHEN NEW.detail = 'boom'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let shared = call(&account, Provider::OpenAi, KeySource::Shared, 50, 20, 1);
    let mut boom = call(&account, Provider::Anthropic, KeySource::Own, 0, 0, 2);
    boom.audit.detail = Some("boom".into());
    let failed = s.finish_calls(&[shared.clone(), boom]).await;
    assert!(failed.is_err(), "the trigger must fail the batch");
    // Nothing of it stayed: no event, no counter, the reservation still held.
    assert_eq!(chain_ok(&s, &account).await, 0);
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (0, 50));
    assert_eq!(row(&usage, Provider::OpenAi, KeySource::Shared), (0, 0, 0));
    // No transaction was left open: another process can write at once (its busy timeout
    // is 0.5 s), and so can the same store's writer.
    twin.finish_calls(&[call(&account, Provider::Google, KeySource::Own, 0, 0, 3)])
        .await
        .unwrap();
    s.finish_calls(&[shared]).await.unwrap();
    assert_eq!(chain_ok(&s, &account).await, 2);
    let usage = s.usage(&account, PERIOD).await.unwrap();
    assert_eq!((usage.credits_used, usage.credits_reserved), (20, 0));
}
