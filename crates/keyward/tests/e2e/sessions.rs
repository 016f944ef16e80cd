//! Settings-page sessions in the database (issue 23): a restart keeps them, only the
//! session id's hash is stored, any node serves them, a sign-out on one node holds on every
//! node at once, and "Sign out everywhere" ends all of a user's sessions.

use keyward_fakes::FakeProviders;
use keyward_testkit::files::contains;
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::{Keyward, Options};
use sha2::{Digest, Sha256};

use crate::ai_support::fake_options;
use crate::common::*;
use crate::web::{csrf_of, location, login_with_token, Web, SETTINGS};

/// The session id in `keyward_session=<id>`.
fn session_id(web: &Web<'_>) -> String {
    web.cookie
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

#[track_caller]
fn assert_signed_out(r: &keyward_testkit::Resp, what: &str) {
    assert_eq!((r.status, location(r)), (303, "/login".to_owned()), "{what}: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_sessions_and_only_the_ids_hash_is_stored() {
    let mut kw = start();
    let token = kw.owner_token().to_owned();
    let web = login_with_token(&kw, &token).await;
    let id = session_id(&web);
    let csrf = web.csrf().await;
    let cookie = web.cookie.clone();

    kw.restart();
    let web = Web { kw: &kw, cookie };
    let page = web.get(SETTINGS).await;
    assert_eq!(page.status, 200, "the session must survive a restart: {page}");
    assert_eq!(
        csrf_of(&page.text),
        csrf,
        "the CSRF token is the session's, after a restart too"
    );
    // A form works with the same session after the restart.
    let acc = kw.owner_account().to_owned();
    let r = web
        .post(
            &format!("{SETTINGS}/openai/save"),
            &[("csrf", &csrf), ("account", &acc), ("api_key", &openai_key())],
        )
        .await;
    assert_eq!(r.status, 303, "{r}");
    assert!(!list_keys(&kw, &token, &acc).await["openai"]["key"].is_null());

    // Neither the session id nor the CSRF token is anywhere in the data directory; the
    // id's SHA-256 is (that is how the session was found after the restart).
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    let mut hash_found = false;
    for (path, bytes) in kw.data_files() {
        assert!(
            !contains(&bytes, id.as_bytes()),
            "the session id is in {}",
            path.display()
        );
        assert!(
            !contains(&bytes, csrf.as_bytes()),
            "the CSRF token is in {}",
            path.display()
        );
        hash_found |= contains(&bytes, hash.as_bytes());
    }
    assert!(hash_found, "the session's hash should be in the database");
    assert_no_leak(&kw.output(), &id, "server output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_everywhere_ends_every_session_of_the_user_and_no_one_elses() {
    let kw = start();
    let token = kw.owner_token().to_owned();
    let other = create_user(&kw, "other@example.com");
    let first = login_with_token(&kw, &token).await;
    let second = login_with_token(&kw, &token).await;
    let theirs = login_with_token(&kw, &other.token).await;
    assert_ne!(first.cookie, second.cookie);
    let page = first.get(SETTINGS).await;
    assert!(page.text.contains(r#"action="/logout/everywhere""#), "{page}");

    // A wrong CSRF token changes nothing.
    let refused = first.post("/logout/everywhere", &[("csrf", "wrong")]).await;
    assert_eq!(refused.status, 403, "{refused}");
    assert_eq!(second.get(SETTINGS).await.status, 200);

    let csrf = first.csrf().await;
    let out = first.post("/logout/everywhere", &[("csrf", &csrf)]).await;
    assert_eq!(
        (out.status, location(&out)),
        (303, "/login?signed_out=everywhere".to_owned()),
        "{out}"
    );
    let notice = kw.http().get("/login?signed_out=everywhere", None).await;
    assert!(notice.text.contains("signed out everywhere"), "{notice}");
    assert_signed_out(&first.get(SETTINGS).await, "the session that asked");
    assert_signed_out(&second.get(SETTINGS).await, "the user's other session");
    assert_eq!(theirs.get(SETTINGS).await.status, 200, "another user's session stays");
}

/// Node A (first start) and node B (same keys), both on `db`.
fn two_nodes(fake: &FakeProviders, db: &TempDatabase) -> (Keyward, Keyward) {
    let opts = |o: Options| o.env("KEYWARD_DATABASE_URL", &db.url).log("info");
    let a = start_with(opts(fake_options(fake, &[])));
    let b = start_with(opts(fake_options(fake, &[]).same_keys_as(&a)));
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_from_node_a_works_on_node_b_and_signing_out_on_a_ends_it_on_b() {
    let Some(server) = server_url("a_session_from_node_a_works_on_node_b") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let (a, b) = two_nodes(&fake, &db);
    let (token, acc) = (a.owner_token().to_owned(), a.owner_account().to_owned());
    let on_a = login_with_token(&a, &token).await;
    let on_b = Web {
        kw: &b,
        cookie: on_a.cookie.clone(),
    };
    let page = on_b.get(SETTINGS).await;
    assert_eq!(page.status, 200, "node B must serve node A's session: {page}");
    let csrf = csrf_of(&page.text);
    assert_eq!(csrf, on_a.csrf().await, "one CSRF token on both nodes");

    // A form posted to B, its message shown by A (the flash is in the database too).
    let r = on_b
        .post(
            &format!("{SETTINGS}/openai/save"),
            &[("csrf", &csrf), ("account", &acc), ("api_key", &openai_key())],
        )
        .await;
    assert_eq!(r.status, 303, "{r}");
    let shown = on_a.get(&location(&r)).await;
    assert!(
        shown.text.contains("Key saved."),
        "the message of B's form, on A: {shown}"
    );

    // Signed out on A: B no longer knows the session, at once.
    let out = on_a.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303, "{out}");
    assert_signed_out(&on_b.get(SETTINGS).await, "node B after the sign-out on A");
    assert_signed_out(&on_a.get(SETTINGS).await, "node A after its sign-out");

    // Sign out everywhere on B ends the user's sessions made on A.
    let again_a = login_with_token(&a, &token).await;
    let again_b = login_with_token(&b, &token).await;
    let csrf = again_b.csrf().await;
    let out = again_b.post("/logout/everywhere", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303, "{out}");
    assert_signed_out(
        &again_a.get(SETTINGS).await,
        "A's session after sign-out everywhere on B",
    );
    assert_signed_out(&again_b.get(SETTINGS).await, "B's session after sign-out everywhere");
}
