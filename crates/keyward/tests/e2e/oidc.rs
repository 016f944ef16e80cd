//! Single sign-on with OpenID Connect (issue 23), against a real OpenID provider on loopback:
//! the npm package `oidc-provider` (OpenID-certified), run by `tests/oidc/provider.mjs`
//! (installed with `npm ci --prefix tests/oidc` when missing). The browser is played by an
//! HTTP client that follows redirects by hand and keeps each side's cookies.
//!
//! What is oidc-provider's own behaviour: discovery, JWKS, the authorization endpoint (with
//! PKCE S256 required), the token endpoint, ID tokens, key rotation (a new signing key,
//! the old one gone from the JWKS), the end-session endpoint. What is test-only: the
//! interaction step logs the configured account in without a form; and for the wrong
//! audience, issuer, expiry, nonce and the unknown key, the provider script alters the ID
//! token after oidc-provider made it and signs it again with the provider's own key (or, for
//! "unknown key", with a fresh key that is in no JWKS).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::{self, Method};
use keyward_testkit::{Keyward, Options, Resp};
use serde_json::json;

use crate::browser::program;
use crate::common::*;
use crate::services::create_service;
use crate::web::{cookie_pair, csrf_of, location, Web, SETTINGS};

const SECRET: &str = "oidc-test-client-secret-0123456789";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oidc")
}

static INSTALL: Mutex<()> = Mutex::new(());

/// node, with oidc-provider installed (`npm ci --prefix tests/oidc` when missing); None after
/// recording a skip when node or npm is missing (a failure under KEYWARD_TEST_REQUIRE_ALL=1).
fn node(test: &str) -> Option<PathBuf> {
    let dir = oidc_dir();
    let _one = INSTALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (Some(node), Some(npm)) = (program("node"), program("npm")) else {
        keyward_testenv::skip_named(test, keyward_testenv::reasons::OIDC);
        return None;
    };
    if !dir.join("node_modules/oidc-provider/package.json").is_file() {
        let out = Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm ci --prefix tests/oidc failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(node)
}

/// oidc-provider on loopback; killed when dropped.
pub(crate) struct Op {
    child: Child,
    issuer: String,
    http: reqwest::Client,
}

impl Drop for Op {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Op {
    async fn control(&self, path_and_query: &str) {
        let r = self
            .http
            .post(format!("{}/__test/{path_and_query}", self.issuer))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "{path_and_query}");
    }

    pub(crate) async fn account(&self, sub: &str, email: &str, verified: bool) {
        let v = if verified { "1" } else { "0" };
        self.control(&format!("account?sub={sub}&email={email}&verified={v}"))
            .await;
    }
}

/// A free loopback port for keyward (its redirect URI is registered before it starts).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The provider, and keyward configured for it (`extra` settings on top).
pub(crate) async fn setup(test: &str, extra: &[(&str, &str)]) -> Option<(Op, Keyward, tempfile::TempDir)> {
    let node = node(test)?;
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(node)
        .arg(oidc_dir().join("provider.mjs"))
        .args([
            format!("{public}/login/oidc/callback"),
            format!("{public}/login?signed_out=1"),
            SECRET.to_owned(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    // The provider goes on printing (notices): keep reading, or its writes would fail.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let issuer = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("provider did not start: {line:?}"))
        .to_owned();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let op = Op { child, issuer, http };

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut opts = Options::default()
        .env("KEYWARD_LISTEN", &format!("127.0.0.1:{port}"))
        .env("KEYWARD_OIDC_ISSUER", &op.issuer)
        .env("KEYWARD_OIDC_CLIENT_ID", "keyward")
        .env("KEYWARD_OIDC_CLIENT_SECRET_FILE", secret.to_str().unwrap())
        .env("KEYWARD_OIDC_PUBLIC_URL", &public);
    for (k, v) in extra {
        opts = opts.env(k, v);
    }
    let kw = start_with(opts);
    Some((op, kw, dir))
}

/// `name=value` pairs a response sets, into a jar.
fn remember(jar: &mut BTreeMap<String, String>, headers: &reqwest::header::HeaderMap) {
    for v in headers.get_all("set-cookie") {
        let Some(pair) = v.to_str().unwrap().split(';').next() else {
            continue;
        };
        if let Some((k, v)) = pair.trim().split_once('=') {
            jar.insert(k.to_owned(), v.to_owned());
        }
    }
}

fn header(jar: &BTreeMap<String, String>) -> String {
    jar.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The browser's side of a sign-in: `/login/oidc` on keyward, the provider's redirects (with
/// its cookies), then keyward's callback with the pending-login cookie. Returns the callback
/// URL the provider sent the browser to, and keyward's answer to it.
async fn sign_in(op: &Op, kw: &Keyward) -> (String, String, Resp) {
    let start = kw.http().get("/login/oidc", None).await;
    assert_eq!(start.status, 303, "{start}");
    let pending = cookie_pair(&start, "keyward_oidc").unwrap_or_else(|| panic!("no pending cookie: {start:?}"));
    let mut url = location(&start);
    assert!(url.starts_with(&op.issuer), "to the provider: {url}");
    for want in [
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "scope=openid",
    ] {
        assert!(url.contains(want), "{want} in {url}");
    }
    let mut jar = BTreeMap::new();
    let callback = loop {
        let r = op.http.get(&url).header("cookie", header(&jar)).send().await.unwrap();
        remember(&mut jar, r.headers());
        let status = r.status().as_u16();
        let Some(next) = r.headers().get("location").map(|v| v.to_str().unwrap().to_owned()) else {
            panic!(
                "provider answered {status} without a redirect: {}",
                r.text().await.unwrap()
            );
        };
        let next = if next.starts_with('/') {
            format!("{}{next}", op.issuer)
        } else {
            next
        };
        if next.starts_with(kw.base_url()) {
            break next;
        }
        url = next;
    };
    let path = callback.strip_prefix(kw.base_url()).unwrap().to_owned();
    assert!(path.starts_with("/login/oidc/callback?"), "{path}");
    let r = kw
        .http()
        .raw(RawRequest::new(Method::GET, &path).header("cookie", &pending))
        .await;
    (pending, path, r)
}

/// The session cookie a successful callback set (and it opens the page).
async fn signed_in<'a>(kw: &'a Keyward, r: &Resp) -> Web<'a> {
    assert_eq!(r.status, 200, "the signed-in page: {r}");
    assert!(r.text.contains(&format!("url={SETTINGS}")), "{r}");
    let cookie = cookie_pair(r, "keyward_session").unwrap_or_else(|| panic!("no session cookie: {r:?}"));
    let web = Web { kw, cookie };
    let page = web.get(SETTINGS).await;
    assert_eq!(page.status, 200, "{page}");
    web
}

#[track_caller]
fn assert_refused(r: &Resp, status: u16, words: &str) {
    assert_eq!(r.status, status, "{r}");
    assert!(r.text.contains("Single sign-on failed"), "{r}");
    assert!(r.text.contains(words), "{words:?} in {r}");
    assert!(
        cookie_pair(r, "keyward_session").is_none(),
        "no session on a failure: {r:?}"
    );
}

/// The external user `ext` with `email`, made through the provisioning API.
pub(crate) async fn external_user(kw: &Keyward, ext: &str, email: &str) {
    let (_, svc) = create_service(kw, "provisioning", &["accounts:manage"]);
    kw.http()
        .put(
            &format!("/v1/external/users/{ext}"),
            Some(&svc),
            &json!({ "email": email }),
        )
        .await
        .expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_signs_a_known_user_in_and_out_at_keyward_and_the_provider() {
    let test = "sso_signs_a_known_user_in_and_out_at_keyward_and_the_provider";
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    external_user(&kw, "ana-1", "ana@acme.test").await;
    add_member(&kw, kw.owner_account(), "ana@acme.test", "member");
    op.account("ana-1", "ana@acme.test", true).await;

    let login = kw.http().get("/login", None).await;
    login.expect_status(200);
    assert!(login.text.contains(r#"href="/login/oidc""#), "{login}");
    assert!(login.text.contains("Sign in with 127.0.0.1"), "{login}");

    let (_, _, r) = sign_in(&op, &kw).await;
    let web = signed_in(&kw, &r).await;
    assert!(cookie_pair(&r, "keyward_sso").is_some(), "{r:?}");
    let page = web.get(SETTINGS).await;
    assert!(page.text.contains("ana@acme.test"), "{page}");

    // Sign-out: the session ends, and the browser goes on to the provider's end-session
    // endpoint (RP-initiated logout) with the client id and where to come back to.
    let csrf = csrf_of(&page.text);
    let out = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, "/logout")
                .header("cookie", &format!("{}; keyward_sso=1", web.cookie))
                .content_type("application/x-www-form-urlencoded")
                .body(format!("csrf={csrf}")),
        )
        .await;
    assert_eq!(out.status, 303, "{out}");
    let to = location(&out);
    assert!(to.starts_with(&format!("{}/session/end?", op.issuer)), "{to}");
    assert!(to.contains("client_id=keyward"), "{to}");
    assert!(to.contains("post_logout_redirect_uri="), "{to}");
    let end = op.http.get(&to).send().await.unwrap();
    assert_eq!(end.status().as_u16(), 200, "the provider takes the logout request");
    let end_page = end.text().await.unwrap();
    assert!(!end_page.contains("invalid_request"), "{end_page}");
    let after = web.get(SETTINGS).await;
    assert_eq!((after.status, location(&after)), (303, "/login".to_owned()), "{after}");

    // No token or secret in keyward's output.
    assert_no_leak(&kw.output(), SECRET, "server output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_refused_without_jit_and_created_with_it() {
    let test = "an_unknown_user_is_refused_without_jit_and_created_with_it";
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    op.account("newcomer-7", "new@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    assert_refused(&r, 403, "no keyward user for you");
    drop(kw);

    let Some((op, kw, _dir)) = setup(test, &[("KEYWARD_OIDC_JIT", "1")]).await else {
        return;
    };
    op.account("newcomer-7", "new@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    let web = signed_in(&kw, &r).await;
    // The user was created (with the token's email): an owner can add them to an account.
    assert!(web.get(SETTINGS).await.text.contains("No account yet"));
    add_member(&kw, kw.owner_account(), "new@acme.test", "member");
    assert!(web.get(SETTINGS).await.text.contains("new@acme.test"));
    // The second time, the same user (found by the external id).
    let (_, _, r) = sign_in(&op, &kw).await;
    let again = signed_in(&kw, &r).await;
    assert!(again.get(SETTINGS).await.text.contains("new@acme.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_replayed_state_is_refused() {
    let test = "a_wrong_or_replayed_state_is_refused";
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    external_user(&kw, "ana-1", "ana@acme.test").await;
    op.account("ana-1", "ana@acme.test", true).await;
    let (pending, path, r) = sign_in(&op, &kw).await;
    signed_in(&kw, &r).await;

    // The same callback again (the code is spent at the provider): no second session.
    let again = kw
        .http()
        .raw(RawRequest::new(Method::GET, &path).header("cookie", &pending))
        .await;
    assert_refused(&again, 400, "already used");

    // Another state than the pending login's.
    let (pending, path, _) = {
        let start = kw.http().get("/login/oidc", None).await;
        let pending = cookie_pair(&start, "keyward_oidc").unwrap();
        (
            pending,
            "/login/oidc/callback?code=abc&state=not-the-state".to_owned(),
            (),
        )
    };
    let r = kw
        .http()
        .raw(RawRequest::new(Method::GET, &path).header("cookie", &pending))
        .await;
    assert_refused(&r, 400, "did not start in this browser");
    // No pending login at all.
    let r = kw.http().get("/login/oidc/callback?code=abc&state=x", None).await;
    assert_refused(&r, 400, "did not start in this browser");
    // A pending cookie that was tampered with.
    let mut bad = pending.clone();
    bad.push('A');
    let r = kw
        .http()
        .raw(RawRequest::new(Method::GET, &path).header("cookie", &bad))
        .await;
    assert_refused(&r, 400, "did not start in this browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_fetched_once_and_sign_in_goes_on() {
    let test = "a_rotated_signing_key_is_fetched_once_and_sign_in_goes_on";
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    external_user(&kw, "ana-1", "ana@acme.test").await;
    op.account("ana-1", "ana@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    signed_in(&kw, &r).await;
    // A new key at the provider (the old one gone): keyward's cached JWKS does not hold it.
    op.control("rotate").await;
    op.account("ana-1", "ana@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    signed_in(&kw, &r).await;
}

/// Each ID-token fault: refused, with a clear page and no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_with_a_wrong_audience_issuer_nonce_expiry_or_key_are_refused() {
    let test = "id_tokens_with_a_wrong_audience_issuer_nonce_expiry_or_key_are_refused";
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    external_user(&kw, "ana-1", "ana@acme.test").await;
    op.account("ana-1", "ana@acme.test", true).await;
    for mode in ["aud", "iss", "exp", "nonce", "key"] {
        op.control(&format!("tamper?mode={mode}")).await;
        let (_, _, r) = sign_in(&op, &kw).await;
        assert_eq!(r.status, 401, "{mode}: {r}");
        assert_refused(&r, 401, "so you were not signed in");
    }
    // The same provider, untampered: signed in.
    op.control("tamper?mode=none").await;
    let (_, _, r) = sign_in(&op, &kw).await;
    signed_in(&kw, &r).await;
    let log = kw.output();
    let rejected: Vec<&str> = log.lines().filter(|l| l.contains("ID token rejected")).collect();
    eprintln!("{}", rejected.join("\n"));
    assert_eq!(rejected.len(), 5, "each refusal is logged:\n{log}");
    // Each for its own reason, in order.
    for (line, why) in rejected.iter().zip([
        "Invalid audiences",
        "Invalid issuer",
        "Expired",
        "Invalid nonce",
        "Signature verification failed",
    ]) {
        assert!(line.contains(why), "{why:?} in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_found_by_a_configured_claim_or_by_verified_email_when_asked() {
    let test = "users_are_found_by_a_configured_claim_or_by_verified_email_when_asked";
    // The product's own user id in the claim `uid` (sub is something else).
    let Some((op, kw, _dir)) = setup(test, &[("KEYWARD_OIDC_USER_CLAIM", "uid")]).await else {
        return;
    };
    external_user(&kw, "prod-42", "bo@acme.test").await;
    add_member(&kw, kw.owner_account(), "bo@acme.test", "member");
    op.control("account?sub=opaque-sub-9&email=bo@acme.test&verified=1&uid=prod-42")
        .await;
    let (_, _, r) = sign_in(&op, &kw).await;
    let web = signed_in(&kw, &r).await;
    assert!(web.get(SETTINGS).await.text.contains("bo@acme.test"));
    drop(kw);

    // A user with no external id (made by an operator), found by email only when
    // KEYWARD_OIDC_MATCH_EMAIL=1 and the provider says the email is verified.
    let Some((op, kw, _dir)) = setup(test, &[("KEYWARD_OIDC_MATCH_EMAIL", "1")]).await else {
        return;
    };
    create_user(&kw, "cy@acme.test");
    add_member(&kw, kw.owner_account(), "cy@acme.test", "member");
    op.account("cy-sub", "cy@acme.test", false).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    assert_refused(&r, 403, "no keyward user for you");
    op.account("cy-sub", "cy@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    let web = signed_in(&kw, &r).await;
    assert!(web.get(SETTINGS).await.text.contains("cy@acme.test"));
    drop(kw);

    // Without KEYWARD_OIDC_MATCH_EMAIL, a verified email alone does not sign anyone in.
    let Some((op, kw, _dir)) = setup(test, &[]).await else {
        return;
    };
    create_user(&kw, "cy@acme.test");
    op.account("cy-sub", "cy@acme.test", true).await;
    let (_, _, r) = sign_in(&op, &kw).await;
    assert_refused(&r, 403, "no keyward user for you");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_login_can_be_turned_off() {
    let test = "token_login_can_be_turned_off";
    let Some((_op, kw, _dir)) = setup(test, &[("KEYWARD_TOKEN_LOGIN", "0")]).await else {
        return;
    };
    let login = kw.http().get("/login", None).await;
    login.expect_status(200);
    assert!(!login.text.contains(r#"name="token""#), "{login}");
    assert!(login.text.contains(r#"href="/login/oidc""#), "{login}");
    let r = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, "/login")
                .content_type("application/x-www-form-urlencoded")
                .body(format!("csrf=x&token={}", kw.owner_token())),
        )
        .await;
    assert_eq!(r.status, 403, "{r}");
    assert!(r.text.contains("Token login is turned off"), "{r}");
    assert!(cookie_pair(&r, "keyward_session").is_none());
}
