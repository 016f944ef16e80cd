//! The storage conformance suite: every behaviour the server relies on, written once
//! against `&dyn Store` and run on each backend. A backend is correct when it passes
//! all of it.

use std::sync::Arc;

use keyward_core::{AccountId, Email, KeyId, KeySource, Last4, Plan, Provider, Role, UnixMillis, UserId};
use keyward_crypto::{AuditChainKey, SealedKey};
use keyward_store::audit::verify_chain;
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{Actor, AuditAction, NewAuditEvent, NewKey, SqliteStore, Store, StoreError};

const CHAIN_KEY: [u8; 32] = [42; 32];

struct Backend {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = SqliteStore::open(
        &url,
        AuditChainKey::from_bytes_for_tests(CHAIN_KEY),
        SqliteOptions::default(),
    )
    .await
    .unwrap();
    Backend {
        store: Arc::new(store),
        _dir: dir,
    }
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

    let (other, _) = owner_with_account(s, 2, Plan::Free).await;
    assert!(s.membership(&account, &other).await.unwrap().is_none());
    s.set_membership(&account, &other, Role::Member, t(4)).await.unwrap();
    assert_eq!(
        s.membership(&account, &other).await.unwrap().unwrap().role,
        Role::Member
    );
    s.set_membership(&account, &other, Role::Admin, t(5)).await.unwrap();
    assert_eq!(s.membership(&account, &other).await.unwrap().unwrap().role, Role::Admin);
    assert_eq!(s.memberships_of(&other).await.unwrap().len(), 2);

    s.set_plan(&account, Plan::Business, Some(77)).await.unwrap();
    let a = s.account(&account).await.unwrap().unwrap();
    assert_eq!((a.plan, a.shared_credit_limit), (Plan::Business, 77));
    s.set_plan(&account, Plan::Pro, None).await.unwrap();
    assert_eq!(
        s.account(&account).await.unwrap().unwrap().shared_credit_limit,
        77,
        "None keeps the override"
    );
    assert!(matches!(
        s.set_plan(&id(AccountId::from_random, 99), Plan::Pro, None).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.account_ids().await.unwrap().len(), 2);
}

async fn key_lifecycle_with_audit(s: &dyn Store) {
    let (user, account) = owner_with_account(s, 1, Plan::Pro).await;
    let actor = Actor(user.to_string());
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
        let mut e = NewAuditEvent::key_action(acc, t(n), "cli", AuditAction::AiRequest, Provider::Google, None, None);
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
        let (s, account, actor) = (s.clone(), account.clone(), Actor(user.to_string()));
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
        &Actor(user.to_string()),
        t(1),
    )
    .await
    .unwrap();
    s.remove_key(&account, Provider::Google, &Actor(user.to_string()), t(2))
        .await
        .unwrap();
    assert!(s.purge_removed().await.unwrap());
    s.ping().await.unwrap();
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {

            #[tokio::test]
            async fn users_tokens_and_memberships() {
                let b = super::$backend().await;
                super::users_tokens_and_memberships(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn key_lifecycle_with_audit() {
                let b = super::$backend().await;
                super::key_lifecycle_with_audit(b.store.as_ref()).await;
            }
            #[tokio::test]
            async fn audit_batches_chain_per_account() {
                let b = super::$backend().await;
                super::audit_batches_chain_per_account(b.store.as_ref()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_saves_leave_one_consistent_key() {
                let b = super::$backend().await;
                super::concurrent_saves_leave_one_consistent_key(b.store.clone()).await;
            }
            #[tokio::test]
            async fn purge_completes() {
                let b = super::$backend().await;
                super::purge_completes(b.store.as_ref()).await;
            }
        }
    };
}

conformance!(sqlite);
