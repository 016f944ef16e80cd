//! The settings page over HTTP: login (token and first-start code), sessions, logout, CSRF,
//! security headers, tenancy, the login limit, the forms doing what the API does, and HTTPS.
//! The same page in a real browser is in `browser.rs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward_core::Provider;
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use keyward_testkit::{Keyward, Resp};
use serde_json::json;

use crate::ai_support::{fake_options, usage_path};
use crate::common::*;

pub const SETTINGS: &str = "/settings/ai/model-keys";
pub const LOGIN_URL_PREFIX: &str = "keyward: one-time login URL: ";

/// The one-time login URL the first start printed.
pub fn login_url(kw: &Keyward) -> String {
    kw.stdout()
        .lines()
        .find_map(|l| l.strip_prefix(LOGIN_URL_PREFIX))
        .map(|u| u.trim().to_owned())
        .unwrap_or_else(|| panic!("no one-time login URL printed:\n{}", kw.stdout()))
}

/// `application/x-www-form-urlencoded` for `pairs`.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                other => format!("%{other:02X}"),
            })
            .collect()
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Every `Set-Cookie` of an answer.
pub fn set_cookies(r: &Resp) -> Vec<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// `name=value` of the cookie `name` an answer sets (non-empty), if any.
pub fn cookie_pair(r: &Resp, name: &str) -> Option<String> {
    set_cookies(r).iter().find_map(|c| {
        let pair = c.split(';').next()?.trim();
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| pair.to_owned())
    })
}

/// The value of the first `name="csrf"` hidden field of a page.
pub fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no csrf field in:\n{html}"));
    let rest = &html[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

pub fn location(r: &Resp) -> String {
    r.headers
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A browser-less client of the settings page: a session cookie and its CSRF token.
#[derive(Debug, Clone)]
pub struct Web<'a> {
    pub kw: &'a Keyward,
    /// `keyward_session=…`
    pub cookie: String,
}

impl<'a> Web<'a> {
    pub async fn get(&self, path: &str) -> Resp {
        self.kw
            .http()
            .raw(RawRequest::new(Method::GET, path).header("cookie", &self.cookie))
            .await
    }

    pub async fn post(&self, path: &str, pairs: &[(&str, &str)]) -> Resp {
        self.kw
            .http()
            .raw(
                RawRequest::new(Method::POST, path)
                    .header("cookie", &self.cookie)
                    .content_type("application/x-www-form-urlencoded")
                    .body(form_body(pairs)),
            )
            .await
    }

    /// The session's CSRF token, read from the page.
    pub async fn csrf(&self) -> String {
        let r = self.get(SETTINGS).await;
        r.expect_status(200);
        csrf_of(&r.text)
    }

    /// A form action on `provider` of `account`, with the session's CSRF token.
    pub async fn act(&self, account: &str, provider: &str, action: &str, extra: &[(&str, &str)]) -> Resp {
        let csrf = self.csrf().await;
        let mut pairs = vec![("csrf", csrf.as_str()), ("account", account)];
        pairs.extend_from_slice(extra);
        self.post(&format!("{SETTINGS}/{provider}/{action}"), &pairs).await
    }

    /// The page of `account`.
    pub async fn page(&self, account: &str) -> Resp {
        let r = self.get(&format!("{SETTINGS}?account={account}")).await;
        r.expect_status(200);
        r
    }
}

/// Logs in with the first-start URL.
pub async fn login_with_code(kw: &Keyward) -> Web<'_> {
    let url = login_url(kw);
    let path = url
        .strip_prefix(kw.base_url())
        .unwrap_or_else(|| panic!("{url} is not on {}", kw.base_url()));
    let r = kw.http().get(path, None).await;
    assert_eq!(r.status, 303, "{r}");
    assert_eq!(location(&r), SETTINGS, "{r}");
    let cookie = cookie_pair(&r, "keyward_session").unwrap_or_else(|| panic!("no session cookie: {r:?}"));
    Web { kw, cookie }
}

/// Logs in with a token through the login form (with its double-submit cookie).
pub async fn login_with_token<'a>(kw: &'a Keyward, token: &str) -> Web<'a> {
    let r = try_login(kw, token).await;
    assert_eq!(r.status, 303, "login with a good token: {r}");
    assert_eq!(location(&r), SETTINGS);
    let cookie = cookie_pair(&r, "keyward_session").unwrap_or_else(|| panic!("no session cookie: {r:?}"));
    Web { kw, cookie }
}

/// GET /login, then POST the form with `token`.
pub async fn try_login(kw: &Keyward, token: &str) -> Resp {
    let form = kw.http().get("/login", None).await;
    form.expect_status(200);
    let login_cookie = cookie_pair(&form, "keyward_login").unwrap_or_else(|| panic!("no login cookie: {form:?}"));
    let csrf = csrf_of(&form.text);
    kw.http()
        .raw(
            RawRequest::new(Method::POST, "/login")
                .header("cookie", &login_cookie)
                .content_type("application/x-www-form-urlencoded")
                .body(form_body(&[("csrf", &csrf), ("token", token)])),
        )
        .await
}

#[track_caller]
fn assert_page_headers(r: &Resp) {
    let h = |name: &str| {
        r.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {name} on {r}"))
    };
    assert_eq!(
        h("content-security-policy"),
        "default-src 'self'; frame-ancestors 'none'",
        "{r}"
    );
    assert_eq!(h("x-content-type-options"), "nosniff", "{r}");
    assert_eq!(h("referrer-policy"), "no-referrer", "{r}");
    assert_eq!(h("cache-control"), "no-store", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_prints_a_single_use_login_url_before_listening() {
    let kw = start();
    let out = kw.stdout();
    let url_line = out.find(LOGIN_URL_PREFIX).expect("login URL line");
    let listening = out.find("keyward: listening on ").expect("listening line");
    assert!(
        url_line < listening,
        "the login URL comes before the listening line:\n{out}"
    );
    let url = login_url(&kw);
    assert!(url.starts_with(&format!("{}/login?code=", kw.base_url())), "{url}");
    assert!(!url.contains(kw.owner_token()), "a token is never put in a URL: {url}");

    // The code logs in once, and the redirect leaves it out of the address bar.
    let web = login_with_code(&kw).await;
    let page = web.get(SETTINGS).await;
    page.expect_status(200);
    assert!(page.text.contains("owner@localhost"), "{page}");
    assert!(page.text.contains("Model keys"), "{page}");

    let path = url.strip_prefix(kw.base_url()).unwrap();
    let again = kw.http().get(path, None).await;
    assert_eq!(again.status, 401, "a spent code: {again}");
    assert!(cookie_pair(&again, "keyward_session").is_none(), "{again:?}");
    assert!(again.text.contains("expired or was already used"), "{again}");
    let made_up = kw.http().get("/login?code=not-a-code", None).await;
    assert_eq!(made_up.status, 401, "{made_up}");
    assert!(cookie_pair(&made_up, "keyward_session").is_none());

    // A restart prints no new code (the owner exists), and the old one stays dead.
    let mut kw = kw;
    kw.restart();
    assert_eq!(kw.stdout().matches(LOGIN_URL_PREFIX).count(), 1, "{}", kw.stdout());
    let after = kw.http().get(path, None).await;
    assert_eq!(after.status, 401, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_pages_carry_the_security_headers() {
    let kw = start();
    let acc = kw.owner_account().to_owned();

    let login = kw.http().get("/login", None).await;
    login.expect_status(200);
    assert_page_headers(&login);
    assert!(login.content_type().starts_with("text/html"), "{login}");
    // The login form posts the token: it never travels in a URL.
    assert!(login
        .text
        .contains(r#"<form class="card login" method="post" action="/login">"#));
    assert!(login
        .text
        .contains(r#"type="password" id="token" name="token" autocomplete="off""#));
    let login_cookie = set_cookies(&login).join("\n");
    assert!(
        login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"),
        "{login_cookie}"
    );

    let unauthenticated = kw.http().get(SETTINGS, None).await;
    assert_eq!(unauthenticated.status, 303, "{unauthenticated}");
    assert_eq!(location(&unauthenticated), "/login");
    assert_page_headers(&unauthenticated);

    let url = login_url(&kw);
    let code_login = kw.http().get(url.strip_prefix(kw.base_url()).unwrap(), None).await;
    assert_page_headers(&code_login);
    let session = set_cookies(&code_login)
        .into_iter()
        .find(|c| c.starts_with("keyward_session="))
        .expect("session cookie");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.split("; ").any(|p| p == part), "{part} missing: {session}");
    }
    assert!(!session.contains("Secure"), "plain HTTP: no Secure flag: {session}");
    let web = Web {
        kw: &kw,
        cookie: session.split(';').next().unwrap().to_owned(),
    };

    let page = web.page(&acc).await;
    assert_page_headers(&page);
    assert!(
        page.headers.get("strict-transport-security").is_none(),
        "no HSTS over HTTP"
    );
    // Nothing inline: the policy would refuse it. Assets come from keyward itself.
    assert!(
        !page.text.contains("<script>") && !page.text.contains(" style="),
        "{page}"
    );
    assert!(
        !page.text.contains("http://") && !page.text.contains("https://"),
        "{page}"
    );
    for asset in ["/assets/keyward.css", "/assets/model-keys.js", "/assets/favicon.svg"] {
        assert!(page.text.contains(asset), "{asset} linked");
        let r = kw.http().get(asset, None).await;
        r.expect_status(200);
        assert_page_headers(&r);
        // (The SVG namespace is a name, not an address that is fetched.)
        let text = r.text.replace("http://www.w3.org/2000/svg", "");
        assert!(!text.contains("http://") && !text.contains("https://"), "{asset}");
    }
    assert_eq!(
        kw.http().get("/assets/keyward.css", None).await.content_type(),
        "text/css; charset=utf-8"
    );

    let action = web.act(&acc, "openai", "save", &[("api_key", &openai_key())]).await;
    assert_eq!(action.status, 303, "{action}");
    assert_page_headers(&action);
    let refused = web.post(&format!("{SETTINGS}/openai/save"), &[("account", &acc)]).await;
    assert_page_headers(&refused);
    let missing = web
        .get(&format!("{SETTINGS}?account=acc_00000000000000000000000000000000"))
        .await;
    assert_page_headers(&missing);
    let logout = web.post("/logout", &[("csrf", &web.csrf().await)]).await;
    assert_page_headers(&logout);

    // Accessibility basics: every input has its label; messages sit in live regions.
    let page = login_with_code_again(&kw).await.page(&acc).await;
    for id in ["key-anthropic", "key-openai", "key-google"] {
        assert!(page.text.contains(&format!(r#"<label for="{id}">"#)), "label for {id}");
        assert!(page.text.contains(&format!(r#"id="{id}""#)), "input {id}");
    }
    assert!(page.text.matches(r#"aria-live="polite""#).count() >= 12, "{page}");
    assert!(page.text.contains(r#"<html lang="en">"#));
}

/// A fresh session for the owner, through the token form (the code is spent).
async fn login_with_code_again(kw: &Keyward) -> Web<'_> {
    login_with_token(kw, kw.owner_token()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_right_csrf_token_are_refused() {
    let kw = start();
    let acc = kw.owner_account().to_owned();
    let web = login_with_code(&kw).await;
    let other = login_with_token(&kw, kw.owner_token()).await;
    let csrf = web.csrf().await;
    let other_csrf = other.csrf().await;
    assert_ne!(csrf, other_csrf, "each session has its own token");
    let key = openai_key();
    let save = format!("{SETTINGS}/openai/save");
    let wrong = "x".repeat(43);

    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no token", vec![("account", &acc), ("api_key", &key)]),
        ("empty token", vec![("csrf", ""), ("account", &acc), ("api_key", &key)]),
        (
            "wrong token",
            vec![("csrf", &wrong), ("account", &acc), ("api_key", &key)],
        ),
        (
            "another session's token",
            vec![("csrf", &other_csrf), ("account", &acc), ("api_key", &key)],
        ),
    ];
    for (what, pairs) in &cases {
        let r = web.post(&save, pairs).await;
        assert_eq!(r.status, 403, "{what}: {r}");
        assert!(r.text.contains("refused"), "{what}: {r}");
        assert_no_leak(&r.text, &key, what);
    }
    for action in ["source", "test", "remove"] {
        let r = web
            .post(
                &format!("{SETTINGS}/openai/{action}"),
                &[("account", &acc), ("source", "shared"), ("confirm", "yes")],
            )
            .await;
        assert_eq!(r.status, 403, "{action} without a token: {r}");
    }
    // The right token from another site is refused too.
    let cross = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, &save)
                .header("cookie", &web.cookie)
                .header("origin", "https://evil.example")
                .content_type("application/x-www-form-urlencoded")
                .body(form_body(&[("csrf", &csrf), ("account", &acc), ("api_key", &key)])),
        )
        .await;
    assert_eq!(cross.status, 403, "{cross}");
    let list = list_keys(&kw, kw.owner_token(), &acc).await;
    assert!(list["openai"]["key"].is_null(), "nothing was saved: {list:?}");

    // Logout needs the token as well.
    let r = web.post("/logout", &[]).await;
    assert_eq!(r.status, 403, "{r}");
    web.get(SETTINGS).await.expect_status(200);

    // The login form: without its cookie, or with a token that does not match it.
    let form = kw.http().get("/login", None).await;
    let login_csrf = csrf_of(&form.text);
    let no_cookie = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, "/login")
                .content_type("application/x-www-form-urlencoded")
                .body(form_body(&[("csrf", &login_csrf), ("token", kw.owner_token())])),
        )
        .await;
    assert_eq!(no_cookie.status, 403, "{no_cookie}");
    assert!(cookie_pair(&no_cookie, "keyward_session").is_none());
    let mismatched = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, "/login")
                .header("cookie", "keyward_login=somethingelse")
                .content_type("application/x-www-form-urlencoded")
                .body(form_body(&[("csrf", &login_csrf), ("token", kw.owner_token())])),
        )
        .await;
    assert_eq!(mismatched.status, 403, "{mismatched}");
    assert!(cookie_pair(&mismatched, "keyward_session").is_none());
    assert_no_leak(&mismatched.text, kw.owner_token(), "login refusal");

    // With the token the same POST works.
    let ok = web
        .post(&save, &[("csrf", &csrf), ("account", &acc), ("api_key", &key)])
        .await;
    assert_eq!(ok.status, 303, "{ok}");
    let list = list_keys(&kw, kw.owner_token(), &acc).await;
    assert_eq!(list["openai"]["key"]["last4"], last4(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_page_answers_404() {
    let kw = start();
    let own = kw.owner_account().to_owned();
    let (bo, bos) = pro_owner(&kw, "bo@example.com");
    let bo_key = openai_key();
    save_key(&kw, &bo.token, &bos, "openai", &bo_key).await;

    let web = login_with_code(&kw).await;
    web.page(&own).await;
    let r = web.get(&format!("{SETTINGS}?account={bos}")).await;
    assert_eq!(r.status, 404, "{r}");
    assert!(!r.text.contains("Acme") && !r.text.contains(last4(&bo_key)), "{r}");
    for probe in ["acc_00000000000000000000000000000000", "nonsense", "%3Cscript%3E"] {
        let r = web.get(&format!("{SETTINGS}?account={probe}")).await;
        assert_eq!(r.status, 404, "{probe}: {r}");
        assert!(!r.text.contains("<script>"), "{r}");
    }

    // Forms naming bo's account change nothing, and answer exactly as a made-up account does.
    for (action, extra) in [
        ("save", vec![("api_key", "sk-proj-aaaaaaaaaaaaaaaaaaaaaaaaaaaa")]),
        ("source", vec![("source", "own")]),
        ("test", vec![]),
        ("remove", vec![("confirm", "yes")]),
    ] {
        let r = web.act(&bos, "openai", action, &extra).await;
        assert_eq!(r.status, 404, "{action} on another account: {r}");
        let made_up = web
            .act("acc_00000000000000000000000000000000", "openai", action, &extra)
            .await;
        assert_eq!(
            (made_up.status, made_up.text.clone()),
            (r.status, r.text.clone()),
            "{action}"
        );
    }
    let list = list_keys(&kw, &bo.token, &bos).await;
    assert_eq!(list["openai"]["key"]["last4"], last4(&bo_key));
    assert_eq!(list["openai"]["source"], "shared");

    // An unknown provider or action is a 404 too.
    assert_eq!(web.act(&own, "mistral", "save", &[]).await.status, 404);
    assert_eq!(web.act(&own, "openai", "explode", &[]).await.status, 404);

    // Bo sees his own account, and only that one (no switcher).
    let bo_web = login_with_token(&kw, &bo.token).await;
    let page = bo_web.get(SETTINGS).await;
    page.expect_status(200);
    assert!(page.text.contains("Acme") && page.text.contains(&format!("••••{}", last4(&bo_key))));
    assert!(
        !page.text.contains(r#"<select id="account""#),
        "one account: no switcher"
    );
    assert_eq!(bo_web.get(&format!("{SETTINGS}?account={own}")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_the_session() {
    let kw = start();
    let acc = kw.owner_account().to_owned();
    let web = login_with_code(&kw).await;
    let csrf = web.csrf().await;
    let out = web.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303, "{out}");
    assert_eq!(location(&out), "/login?signed_out=1");
    // The page it leads to says so.
    let page = web.get("/login?signed_out=1").await;
    assert!(page.text.contains("You are signed out."), "{page}");
    assert!(!web.get("/login").await.text.contains("You are signed out."));
    let cleared = set_cookies(&out).join("\n");
    assert!(
        cleared.contains("keyward_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    // The old cookie no longer opens the page nor runs a form.
    let r = web.get(SETTINGS).await;
    assert_eq!((r.status, location(&r)), (303, "/login".to_owned()), "{r}");
    let r = web
        .post(
            &format!("{SETTINGS}/openai/save"),
            &[("csrf", &csrf), ("account", &acc), ("api_key", &openai_key())],
        )
        .await;
    assert_eq!((r.status, location(&r)), (303, "/login".to_owned()), "{r}");
    assert!(list_keys(&kw, kw.owner_token(), &acc).await["openai"]["key"].is_null());
    // Logging out twice is harmless.
    let again = web.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!((again.status, location(&again)), (303, "/login".to_owned()));
    // A made-up session id is no session.
    let forged = Web {
        kw: &kw,
        cookie: "keyward_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
    };
    assert_eq!(forged.get(SETTINGS).await.status, 303);
    // A new login works, with a new session and a new CSRF token.
    let again = login_with_token(&kw, kw.owner_token()).await;
    assert_ne!(again.cookie, web.cookie);
    assert_ne!(again.csrf().await, csrf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_rate_limited() {
    let kw = start();
    let mut statuses = Vec::new();
    for i in 0..10 {
        let r = try_login(&kw, &format!("kw_wrong{i}")).await;
        statuses.push(r.status);
        assert!(r.text.contains("not recognised"), "{r}");
        assert!(
            !r.text.contains(&format!("kw_wrong{i}")),
            "the token is never echoed: {r}"
        );
    }
    assert_eq!(statuses, vec![401; 10]);
    let r = try_login(&kw, "kw_wrong-again").await;
    assert_eq!(r.status, 429, "{r}");
    assert!(r.text.contains("Too many login attempts"), "{r}");
    // Over the limit even the right token and the first-start code are turned away.
    let r = try_login(&kw, kw.owner_token()).await;
    assert_eq!(r.status, 429, "{r}");
    assert!(cookie_pair(&r, "keyward_session").is_none());
    let url = login_url(&kw);
    let r = kw.http().get(url.strip_prefix(kw.base_url()).unwrap(), None).await;
    assert_eq!(r.status, 429, "{r}");
    // The API's bearer tokens are not affected.
    kw.http().get("/v1/me", Some(kw.owner_token())).await.expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_forms_do_what_the_api_does_and_show_errors_next_to_their_control() {
    let fake = FakeProviders::start().unwrap();
    let kw = Keyward::start(bin(), fake_options(&fake, &[]));
    let acc = kw.owner_account().to_owned();
    let t = kw.owner_token().to_owned();
    let web = login_with_code(&kw).await;

    // Save: the API sees it, the page shows only last4, the audit log has key.saved by the owner.
    let key = openai_key();
    fake.set_key(Provider::OpenAi, &key, Behaviour::Ok);
    let r = web
        .act(&acc, "openai", "save", &[("api_key", &format!("  {key}\n"))])
        .await;
    assert_eq!(r.status, 303, "{r}");
    assert_eq!(location(&r), format!("{SETTINGS}?account={acc}#provider-openai"));
    let page = web.page(&acc).await;
    assert_no_leak(&page.text, &key, "page after save");
    assert!(page.text.contains(&format!("••••{}", last4(&key))), "{page}");
    assert!(page.text.contains("Key saved."), "{page}");
    assert_eq!(list_keys(&kw, &t, &acc).await["openai"]["key"]["last4"], last4(&key));
    let events = key_events(&kw, &t, &acc).await;
    let saved = events.last().unwrap();
    assert_eq!(
        (saved["action"].as_str(), saved["provider"].as_str()),
        (Some("key.saved"), Some("openai"))
    );
    // The message is shown once.
    assert!(!web.page(&acc).await.text.contains("Key saved."));

    // A malformed key: refused with the API's words, next to the key field, never echoed.
    let bad = format!("sk-ant-api03-{}", "x".repeat(40));
    let r = web.act(&acc, "openai", "save", &[("api_key", &bad)]).await;
    assert_eq!(r.status, 303);
    let page = web.page(&acc).await;
    assert_no_leak(&page.text, &bad, "page after a refused key");
    let key_msg = region(&page.text, "msg-openai-key");
    assert!(
        key_msg.contains("Key not saved.") && key_msg.contains("Anthropic key"),
        "{key_msg}"
    );
    // The field is invalid and described by its hint and by the error text itself.
    assert!(page
        .text
        .contains(r#"aria-describedby="hint-openai msg-openai-key-text" aria-invalid="true""#));
    assert!(
        key_msg.contains(r#"<p class="msg err" id="msg-openai-key-text">"#),
        "{key_msg}"
    );
    assert_eq!(list_keys(&kw, &t, &acc).await["openai"]["key"]["last4"], last4(&key));

    // Switch to own and back: the API's source follows; own without a key is refused in words.
    web.act(&acc, "openai", "source", &[("source", "own")]).await;
    assert_eq!(list_keys(&kw, &t, &acc).await["openai"]["source"], "own");
    assert!(region(&web.page(&acc).await.text, "msg-openai-source").contains("Now using My key."));
    web.act(&acc, "openai", "source", &[("source", "shared")]).await;
    let list = list_keys(&kw, &t, &acc).await;
    assert_eq!(list["openai"]["source"], "shared");
    assert_eq!(
        list["openai"]["key"]["last4"],
        last4(&key),
        "switching back keeps the key"
    );
    web.act(&acc, "google", "source", &[("source", "own")]).await;
    let g = region(&web.page(&acc).await.text, "msg-google-source");
    assert!(
        g.contains("Key source not changed.") && g.contains("No key is saved"),
        "{g}"
    );

    // Test key through the worker: the result is shown and kept as last_test.
    web.act(&acc, "openai", "test", &[]).await;
    let page = web.page(&acc).await;
    let test = region(&page.text, "msg-openai-test");
    assert!(
        test.contains("Key works.") && test.contains("gpt-6-luna answered in"),
        "{test}"
    );
    assert_eq!(list_keys(&kw, &t, &acc).await["openai"]["key"]["last_test"]["ok"], true);
    // The script's variant answers JSON with the same message.
    let csrf = web.csrf().await;
    let js = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, &format!("{SETTINGS}/openai/test"))
                .header("cookie", &web.cookie)
                .header("x-keyward-fetch", "1")
                .content_type("application/x-www-form-urlencoded")
                .body(form_body(&[("csrf", &csrf), ("account", &acc)])),
        )
        .await;
    js.expect_status(200);
    assert_eq!(js.json()["ok"], true, "{js}");
    assert!(js.json()["html"].as_str().unwrap().contains("Key works."), "{js}");

    // Rotate: a new key over the saved one.
    let rotated = openai_key();
    web.act(&acc, "openai", "save", &[("api_key", &rotated)]).await;
    let page = web.page(&acc).await;
    assert!(region(&page.text, "msg-openai-key").contains("Key replaced."));
    assert_no_leak(&page.text, &rotated, "page after rotation");
    assert_eq!(key_events(&kw, &t, &acc).await.last().unwrap()["action"], "key.rotated");

    // Remove needs the confirmation.
    let r = web.act(&acc, "openai", "remove", &[]).await;
    assert_eq!(r.status, 303);
    assert!(region(&web.page(&acc).await.text, "msg-openai-remove").contains("Key not removed."));
    assert!(!list_keys(&kw, &t, &acc).await["openai"]["key"].is_null());
    web.act(&acc, "openai", "remove", &[("confirm", "yes")]).await;
    assert!(region(&web.page(&acc).await.text, "msg-openai-remove").contains("Key removed."));
    assert!(list_keys(&kw, &t, &acc).await["openai"]["key"].is_null());
    assert_eq!(key_events(&kw, &t, &acc).await.last().unwrap()["action"], "key.removed");

    // A free plan: saving is refused with the plan's reason; the page explains it.
    set_plan(&kw, &acc, "free");
    let page = web.page(&acc).await;
    assert!(page.text.contains("Your own keys need a paid plan."), "{page}");
    assert!(!page.text.contains(r#"type="password""#), "no key field on a free plan");
    // The usage panel does not promise uncapped own keys to a plan that cannot have them.
    assert!(!page.text.contains("Calls on your own key are not capped"), "{page}");
    assert!(page.text.contains("need the Pro or Business plan"), "{page}");
    web.act(&acc, "anthropic", "save", &[("api_key", &anthropic_key())])
        .await;
    let a = region(&web.page(&acc).await.text, "msg-anthropic-key");
    assert!(a.contains("Key not saved.") && a.contains("paid plan"), "{a}");

    // A member: view only, and forms posted anyway are refused by role.
    set_plan(&kw, &acc, "pro");
    let mo = create_user(&kw, "mo@example.com");
    add_member(&kw, &acc, &mo.email, "member");
    let member = login_with_token(&kw, &mo.token).await;
    let page = member.page(&acc).await;
    assert!(page.text.contains("View only."), "{page}");
    assert!(
        !page.text.contains("<form class=\"control"),
        "no controls for a member: {page}"
    );
    let csrf = csrf_of(&page.text);
    let r = member
        .post(
            &format!("{SETTINGS}/anthropic/save"),
            &[("csrf", &csrf), ("account", &acc), ("api_key", &anthropic_key())],
        )
        .await;
    assert_eq!(r.status, 303, "{r}");
    let m = region(&member.page(&acc).await.text, "msg-anthropic");
    assert!(m.contains("owner or admin"), "{m}");
    assert!(list_keys(&kw, &t, &acc).await["anthropic"]["key"].is_null());
    assert_audit_ok(&kw, None);

    // The shared-pool usage of the month, as the usage API reports it.
    let usage = kw.http().get(&usage_path(&acc), Some(&t)).await;
    let limit = usage.json()["shared"]["credit_limit"].as_i64().unwrap();
    assert_eq!(limit, 20_000);
    let page = web.page(&acc).await;
    assert!(
        page.text.contains("<strong>0</strong> of 20,000 credits used"),
        "{page}"
    );
    assert!(
        page.text.contains(r#"<progress id="usage-bar" max="20000" value="0""#),
        "{page}"
    );
}

/// The inner HTML of the element with `id` (up to its first closing `</div>`).
pub fn region(html: &str, id: &str) -> String {
    let start = html
        .find(&format!(r#"id="{id}""#))
        .unwrap_or_else(|| panic!("no #{id} in:\n{html}"));
    let rest = &html[start..];
    rest[..rest.find("</div>").unwrap_or(rest.len())].to_owned()
}

/// A `keyward serve` the harness cannot start (it expects plain HTTP): run by hand, with the
/// harness's hygiene (no inherited `KEYWARD_*`, providers on a closed port), killed on drop.
struct TlsServer {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls(data: &Path, cert: &Path, key: &Path) -> (TlsServer, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARD_") {
            cmd.env_remove(&name);
        }
    }
    cmd.arg("serve")
        .env("KEYWARD_ALLOW_SAME_USER", "1")
        .env("KEYWARD_DATA_DIR", data)
        .env("KEYWARD_LISTEN", "127.0.0.1:0")
        .env("KEYWARD_TLS_CERT", cert)
        .env("KEYWARD_TLS_KEY", key)
        .env("KEYWARD_ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
        .env("KEYWARD_OPENAI_BASE_URL", "http://127.0.0.1:9")
        .env("KEYWARD_GOOGLE_BASE_URL", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut o = sink.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    let server = TlsServer { child, out };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = server.out.lock().unwrap().clone();
        if let Some(url) = text.lines().find_map(|l| l.strip_prefix("keyward: listening on ")) {
            return (server, text.clone() + url);
        }
        assert!(Instant::now() < deadline, "HTTPS keyward did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_generated_certificate_saves_a_key() {
    use keyward_testkit::reqwest;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    // A CA, and a server certificate it signs for 127.0.0.1 and localhost.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyward test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, leaf.pem()).unwrap();
    std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();

    let data = dir.path().join("data");
    let (_server, out) = start_tls(&data, &cert_pem, &key_pem);
    let base = out.lines().last().unwrap().trim().to_owned();
    assert!(base.starts_with("https://127.0.0.1:"), "{out}");
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("keyward: owner token (shown once): "))
        .unwrap()
        .trim()
        .to_owned();
    let acc = out
        .lines()
        .find_map(|l| l.strip_prefix("keyward: owner account: "))
        .unwrap()
        .trim()
        .to_owned();
    let code_url = out
        .lines()
        .find_map(|l| l.strip_prefix(LOGIN_URL_PREFIX))
        .unwrap()
        .trim()
        .to_owned();
    assert!(code_url.starts_with(&format!("{base}/login?code=")), "{code_url}");

    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .https_only(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Every answer carries HSTS.
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.headers()["strict-transport-security"].to_str().unwrap(),
        "max-age=31536000"
    );

    // The JSON API saves a key through TLS.
    let key = openai_key();
    let saved = client
        .put(format!("{base}{}", key_path(&acc, "openai")))
        .bearer_auth(&token)
        .json(&json!({ "api_key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 200);
    let saved: serde_json::Value = saved.json().await.unwrap();
    assert_eq!(saved["key"]["last4"], last4(&key));

    // The page: the one-time URL over HTTPS, a Secure __Host- cookie, a form save.
    let login = client.get(&code_url).send().await.unwrap();
    assert_eq!(login.status(), 303);
    let cookie_line = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("__Host-keyward_session="))
        .expect("a __Host- session cookie over TLS");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(cookie_line.split("; ").any(|p| p == part), "{part}: {cookie_line}");
    }
    let cookie = cookie_line.split(';').next().unwrap().to_owned();
    let page = client
        .get(format!("{base}{SETTINGS}"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(
        page.headers()["strict-transport-security"].to_str().unwrap(),
        "max-age=31536000"
    );
    let html = page.text().await.unwrap();
    let csrf = csrf_of(&html);
    let google = google_key();
    let r = client
        .post(format!("{base}{SETTINGS}/google/save"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[("csrf", &csrf), ("account", &acc), ("api_key", &google)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let list: serde_json::Value = client
        .get(format!("{base}{}", keys_path(&acc)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let google_state = list["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "google")
        .unwrap();
    assert_eq!(google_state["key"]["last4"], last4(&google));

    // Plain HTTP on the TLS port gets no answer a client could mistake for the page.
    let http_base = base.replace("https://", "http://");
    let plain_client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let plain = plain_client.get(format!("{http_base}{SETTINGS}")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}
