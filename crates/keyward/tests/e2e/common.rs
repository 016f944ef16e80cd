//! Helpers shared by the e2e tests: starting keyward, CLI shortcuts, key makers, leak checks.

use std::path::Path;

use keyward_testkit::canary::{random_string, shared_chunk, KEY_ALPHABET};
use keyward_testkit::{Keyward, Options, Resp};
use serde_json::{json, Value};

pub const PROVIDERS: [&str; 3] = ["anthropic", "openai", "google"];

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keyward"))
}

/// A fresh keyward on its own temp dir, logging at trace.
pub fn start() -> Keyward {
    Keyward::start(bin(), Options::default())
}

pub fn start_with(opts: Options) -> Keyward {
    Keyward::start(bin(), opts)
}

/// A user made by `admin create-user`.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub email: String,
    pub token: String,
}

impl User {
    pub fn tok(&self) -> Option<&str> {
        Some(&self.token)
    }
}

pub fn is_hex_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

pub fn create_user(kw: &Keyward, email: &str) -> User {
    let out = kw.cli(&["admin", "create-user", "--email", email]);
    out.assert_success();
    let v = out.json();
    let id = v["user_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no user_id: {out}"))
        .to_owned();
    let token = v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {out}"))
        .to_owned();
    assert!(is_hex_id(&id, "usr_"), "user id {id:?}");
    assert!(token.starts_with("kw_") && token.len() > 20, "token {token:?}");
    User {
        id,
        email: email.to_owned(),
        token,
    }
}

pub fn create_account(kw: &Keyward, name: &str, plan: &str, owner_email: &str) -> String {
    let out = kw.cli(&[
        "admin",
        "create-account",
        "--name",
        name,
        "--plan",
        plan,
        "--owner",
        owner_email,
    ]);
    out.assert_success();
    let id = out.json()["account_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no account_id: {out}"))
        .to_owned();
    assert!(is_hex_id(&id, "acc_"), "account id {id:?}");
    id
}

pub fn add_member(kw: &Keyward, account: &str, email: &str, role: &str) -> Value {
    let out = kw.cli(&[
        "admin",
        "add-member",
        "--account",
        account,
        "--email",
        email,
        "--role",
        role,
    ]);
    out.assert_success();
    let v = out.json();
    assert_eq!(v["account_id"], account, "{out}");
    assert_eq!(v["role"], role, "{out}");
    assert!(v["user_id"].as_str().is_some_and(|u| is_hex_id(u, "usr_")), "{out}");
    v
}

pub fn set_plan(kw: &Keyward, account: &str, plan: &str) -> Value {
    let out = kw.cli(&["admin", "set-plan", "--account", account, "--plan", plan]);
    out.assert_success();
    let v = out.json();
    assert_eq!(v["account_id"], account, "{out}");
    assert_eq!(v["plan"], plan, "{out}");
    assert!(v.get("shared_credit_limit").is_some(), "{out}");
    v
}

/// A user owning a fresh `pro` account: the common start of a test.
pub fn pro_owner(kw: &Keyward, email: &str) -> (User, String) {
    let user = create_user(kw, email);
    let account = create_account(kw, "Acme", "pro", email);
    (user, account)
}

/// A valid anthropic key, `len` characters in all, ending in `last4` when given.
pub fn anthropic_key_len(len: usize) -> String {
    let mut k = String::from("sk-ant-api03-");
    k.push_str(&random_string(len - k.len(), KEY_ALPHABET));
    k
}

pub fn openai_key_len(len: usize) -> String {
    let mut k = String::from("sk-proj-");
    k.push_str(&random_string(len - k.len(), KEY_ALPHABET));
    k
}

/// A valid Google auth key, the kind AI Studio issues today (`AQ.Ab8RN6` and 44 more, as
/// seen in the wild).
pub fn google_key() -> String {
    format!("AQ.Ab8RN6{}", random_string(44, KEY_ALPHABET))
}

/// A valid Google standard key (always 39 characters), which Google no longer accepts.
pub fn google_standard_key() -> String {
    format!("AIza{}", random_string(35, KEY_ALPHABET))
}

pub fn anthropic_key() -> String {
    anthropic_key_len(108)
}

pub fn openai_key() -> String {
    openai_key_len(64)
}

/// A valid key for `provider`.
pub fn key_for(provider: &str) -> String {
    match provider {
        "anthropic" => anthropic_key(),
        "openai" => openai_key(),
        "google" => google_key(),
        other => panic!("no such provider {other}"),
    }
}

/// A valid key for `provider` whose last four characters are `last4` (letters/digits).
pub fn key_ending(provider: &str, last4: &str) -> String {
    let k = key_for(provider);
    format!("{}{last4}", &k[..k.len() - 4])
}

pub fn last4(key: &str) -> &str {
    let k = key.trim();
    &k[k.len() - 4..]
}

pub fn keys_path(account: &str) -> String {
    format!("/v1/accounts/{account}/model-keys")
}

pub fn key_path(account: &str, provider: &str) -> String {
    format!("/v1/accounts/{account}/model-keys/{provider}")
}

pub fn source_path(account: &str, provider: &str) -> String {
    format!("/v1/accounts/{account}/model-keys/{provider}/source")
}

pub fn audit_path(account: &str) -> String {
    format!("/v1/accounts/{account}/audit")
}

/// PUT a key; panics unless 200.
pub async fn save_key(kw: &Keyward, token: &str, account: &str, provider: &str, key: &str) -> Value {
    let r = kw
        .http()
        .put(&key_path(account, provider), Some(token), &json!({ "api_key": key }))
        .await;
    r.expect_status(200);
    assert_no_leak(&r.text, key, &r.to_string());
    r.json().clone()
}

pub async fn set_source(kw: &Keyward, token: &str, account: &str, provider: &str, source: &str) -> Value {
    let r = kw
        .http()
        .put(
            &source_path(account, provider),
            Some(token),
            &json!({ "source": source }),
        )
        .await;
    r.expect_status(200);
    r.json().clone()
}

/// The `model-keys` listing, as provider → ProviderState.
pub async fn list_keys(kw: &Keyward, token: &str, account: &str) -> std::collections::BTreeMap<String, Value> {
    let r = kw.http().get(&keys_path(account), Some(token)).await;
    r.expect_status(200);
    let providers = r.json()["providers"]
        .as_array()
        .unwrap_or_else(|| panic!("no providers array: {r}"));
    let map: std::collections::BTreeMap<String, Value> = providers
        .iter()
        .map(|p| {
            (
                p["provider"]
                    .as_str()
                    .unwrap_or_else(|| panic!("provider name: {r}"))
                    .to_owned(),
                p.clone(),
            )
        })
        .collect();
    assert_eq!(providers.len(), 3, "always all three providers: {r}");
    assert_eq!(
        map.keys().map(String::as_str).collect::<Vec<_>>(),
        ["anthropic", "google", "openai"],
        "{r}"
    );
    map
}

/// All audit events of an account via the API (newest first), following `before` pages.
pub async fn audit_events(kw: &Keyward, token: &str, account: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let q = match all.last().and_then(|e| e["id"].as_i64()) {
            None => format!("{}?limit=100", audit_path(account)),
            Some(b) => format!("{}?limit=100&before={b}", audit_path(account)),
        };
        let r = kw.http().get(&q, Some(token)).await;
        r.expect_status(200);
        let page = r.json()["events"]
            .as_array()
            .unwrap_or_else(|| panic!("no events array: {r}"))
            .clone();
        let done = page.len() < 100;
        all.extend(page);
        if done || all.len() > 100_000 {
            return all;
        }
    }
}

/// The key-management events (`key.*`), oldest first.
pub async fn key_events(kw: &Keyward, token: &str, account: &str) -> Vec<Value> {
    let mut ev: Vec<Value> = audit_events(kw, token, account)
        .await
        .into_iter()
        .filter(|e| e["action"].as_str().is_some_and(|a| a.starts_with("key.")))
        .collect();
    ev.reverse();
    ev
}

/// Panics if `text` holds `secret` (trimmed), or any 12-character piece of it.
#[track_caller]
pub fn assert_no_leak(text: &str, secret: &str, context: &str) {
    let s = secret.trim();
    if s.is_empty() {
        return;
    }
    if let Some(chunk) = shared_chunk(text, s, 12) {
        panic!("leak: {chunk:?} (a piece of the key) appears in: {context}");
    }
}

/// `audit verify` (optionally for one account); returns (exit ok, stdout JSON, the run).
pub fn audit_verify(kw: &Keyward, account: Option<&str>) -> (bool, Value, keyward_testkit::CliOutput) {
    let mut args = vec!["audit", "verify"];
    if let Some(a) = account {
        args.extend(["--account", a]);
    }
    let out = kw.cli(&args);
    let v = out.json();
    (out.success(), v, out)
}

/// Asserts `audit verify` passes, returning its JSON.
#[track_caller]
pub fn assert_audit_ok(kw: &Keyward, account: Option<&str>) -> Value {
    let (ok, v, out) = audit_verify(kw, account);
    assert!(ok, "audit verify should pass: {out}");
    assert_eq!(v["ok"], true, "{out}");
    assert!(
        v["accounts"].as_u64().is_some() && v["events"].as_u64().is_some(),
        "{out}"
    );
    v
}

/// Shorthand for a response's error code, for tables.
pub fn code(r: &Resp) -> &str {
    r.error_code().unwrap_or("<none>")
}
