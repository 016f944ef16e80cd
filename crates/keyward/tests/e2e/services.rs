//! The product's services (issue 22, part 1): `kws_` tokens with scopes, through the real
//! binary. Each scope allows exactly its routes; every route refuses every token without
//! the scope; no service touches keys; a revoked token is refused at once (on every node of
//! a PostgreSQL deployment); a service's calls are audited with its name, the acting user
//! and the feature.

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::http::RawRequest;
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::{Keyward, Resp};
use reqwest::Method;
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;

/// A service made by `admin create-service`: (id, token).
pub fn create_service(kw: &Keyward, name: &str, scopes: &[&str]) -> (String, String) {
    let mut args = vec!["admin", "create-service", "--name", name];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    let out = kw.cli(&args);
    out.assert_success();
    let v = out.json();
    let id = v["service_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no service_id: {out}"))
        .to_owned();
    let token = v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {out}"))
        .to_owned();
    assert!(is_hex_id(&id, "svc_"), "service id {id:?}");
    assert!(token.starts_with("kws_") && token.len() > 40, "token {token:?}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{out}");
    (id, token)
}

/// The pass-through path of an OpenAI chat completion (optionally with a feature segment).
pub fn openai_chat_path(account: &str, feature: Option<&str>) -> String {
    match feature {
        Some(f) => format!("/v1/accounts/{account}/features/{f}/providers/openai/v1/chat/completions"),
        None => format!("/v1/accounts/{account}/providers/openai/v1/chat/completions"),
    }
}

/// An SDK-shaped pass-through call: the token in `provider`'s own header.
pub async fn native_chat(kw: &Keyward, provider: &str, account: &str, token: &str, headers: &[(&str, &str)]) -> Resp {
    let (path, body) = match provider {
        "anthropic" => (
            format!("/v1/accounts/{account}/providers/anthropic/v1/messages"),
            json!({"model": "claude-haiku-5-5", "max_tokens": 20, "messages": [{"role": "user", "content": PROMPT}]}),
        ),
        "openai" => (
            openai_chat_path(account, None),
            json!({"model": "gpt-6-luna", "max_tokens": 20, "messages": [{"role": "user", "content": PROMPT}]}),
        ),
        "google" => (
            format!("/v1/accounts/{account}/providers/google/v1beta/models/gemini-3.8-flash:generateContent"),
            json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": 20}}),
        ),
        other => panic!("no provider {other}"),
    };
    let (name, prefix) = key_header(provider);
    let mut req = RawRequest::new(Method::POST, &path)
        .header(name, &format!("{prefix}{token}"))
        .json_bytes(body.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    kw.http().raw(req).await
}

/// `ai/messages` with extra headers.
pub async fn ai_call_with(kw: &Keyward, token: &str, account: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    let mut req = RawRequest::new(Method::POST, &ai_path(account))
        .token(token)
        .json_bytes(body.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    kw.http().raw(req).await
}

/// A keyward on the fakes with a working shared key for every provider.
fn start_with_shared_pool(fake: &FakeProviders) -> Keyward {
    let kw = start_on_fake(fake, &[]);
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, Behaviour::Ok);
        set_shared_key(&kw, p, &k);
    }
    kw
}

/// What a route answered a token, for the matrix: 2xx/404 ("allowed": the route ran, or the
/// thing it names does not exist) or the refusal's (status, code).
fn verdict(r: &Resp) -> String {
    match r.status {
        200..=299 => "ok".to_owned(),
        _ => {
            // The pass-through answers in the provider's own envelope, whose message says
            // which scope is missing.
            let code = r.error_code().map(str::to_owned).unwrap_or_else(|| {
                if r.status == 403 && r.text.contains("scope") {
                    "scope_required".to_owned()
                } else {
                    format!("(provider envelope) {}", r.text)
                }
            });
            format!("{} {code}", r.status)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_allows_exactly_its_routes_and_no_service_touches_keys() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_with_shared_pool(&fake);
    let (owner, account) = pro_owner(&kw, "owner@acme.test");
    let own = key_for("openai");
    fake.set_key(provider("openai"), &own, Behaviour::Ok);
    save_key(&kw, &owner.token, &account, "openai", &own).await;
    let before = list_keys(&kw, &owner.token, &account).await;

    let sets: [(&str, &[&str]); 5] = [
        ("caller", &["ai:call"]),
        ("reader", &["audit:read"]),
        ("provisioner", &["accounts:manage"]),
        ("all-scopes", &["ai:call", "audit:read", "accounts:manage"]),
        ("caller-reader", &["ai:call", "audit:read"]),
    ];
    let mut table = Vec::new();
    for (name, scopes) in sets {
        let (_, token) = create_service(&kw, name, scopes);
        let has = |s: &str| scopes.contains(&s);
        let expect = |scope: &str| {
            if has(scope) {
                "ok".to_owned()
            } else {
                "403 scope_required".to_owned()
            }
        };
        let http = kw.http();
        let chat = chat_body("openai", false, 20);
        let rows: Vec<(&str, Resp, String)> = vec![
            (
                "POST ai/messages",
                http.post(&ai_path(&account), Some(&token), &chat).await,
                expect("ai:call"),
            ),
            (
                "POST pass-through (openai)",
                native_chat(&kw, "openai", &account, &token, &[]).await,
                expect("ai:call"),
            ),
            (
                "POST pass-through (anthropic, x-api-key)",
                native_chat(&kw, "anthropic", &account, &token, &[]).await,
                expect("ai:call"),
            ),
            (
                "POST pass-through (google, x-goog-api-key)",
                native_chat(&kw, "google", &account, &token, &[]).await,
                expect("ai:call"),
            ),
            (
                "GET audit",
                http.get(&audit_path(&account), Some(&token)).await,
                expect("audit:read"),
            ),
            (
                "PUT /v1/external/accounts",
                http.put(
                    "/v1/external/accounts/matrix-1",
                    Some(&token),
                    &json!({"name": "M", "plan": "pro"}),
                )
                .await,
                expect("accounts:manage"),
            ),
            (
                "GET /v1/external/accounts",
                http.get("/v1/external/accounts/matrix-1", Some(&token)).await,
                expect("accounts:manage"),
            ),
            (
                "PUT model key (save)",
                http.put(
                    &key_path(&account, "anthropic"),
                    Some(&token),
                    &json!({"api_key": key_for("anthropic")}),
                )
                .await,
                "403 forbidden".to_owned(),
            ),
            (
                "PUT model key (rotate)",
                http.put(
                    &key_path(&account, "openai"),
                    Some(&token),
                    &json!({"api_key": key_for("openai")}),
                )
                .await,
                "403 forbidden".to_owned(),
            ),
            (
                "DELETE model key (remove)",
                http.delete(&key_path(&account, "openai"), Some(&token)).await,
                "403 forbidden".to_owned(),
            ),
            (
                "POST test key",
                http.post(&test_path(&account, "openai"), Some(&token), &json!({}))
                    .await,
                "403 forbidden".to_owned(),
            ),
            (
                "PUT source (switch)",
                http.put(
                    &source_path(&account, "openai"),
                    Some(&token),
                    &json!({"source": "own"}),
                )
                .await,
                "403 forbidden".to_owned(),
            ),
            (
                "GET /v1/me",
                http.get("/v1/me", Some(&token)).await,
                "403 scope_required".to_owned(),
            ),
            (
                "GET usage",
                http.get(&usage_path(&account), Some(&token)).await,
                "403 scope_required".to_owned(),
            ),
            (
                "GET model keys",
                http.get(&keys_path(&account), Some(&token)).await,
                "403 scope_required".to_owned(),
            ),
        ];
        for (route, r, want) in rows {
            let got = verdict(&r);
            table.push(format!("{name:<14} {route:<44} {got}"));
            assert_eq!(got, want, "{name} on {route}: {r}");
        }
    }
    eprintln!("scope matrix:\n{}", table.join("\n"));
    // Nothing was changed by any refused attempt.
    assert_eq!(list_keys(&kw, &owner.token, &account).await, before);

    // An account that does not exist is 404 for a service with the scope (a malformed id too),
    // and the scope is checked first for one without it.
    let (_, caller) = create_service(&kw, "caller-2", &["ai:call", "audit:read"]);
    let (_, manager) = create_service(&kw, "manager-2", &["accounts:manage"]);
    let ghost = "acc_0123456789abcdef0123456789abcdef";
    let chat = chat_body("openai", false, 20);
    kw.http()
        .post(&ai_path(ghost), Some(&caller), &chat)
        .await
        .expect_error(404, "not_found");
    kw.http()
        .post(&ai_path("nope"), Some(&caller), &chat)
        .await
        .expect_error(404, "not_found");
    kw.http()
        .get(&audit_path(ghost), Some(&caller))
        .await
        .expect_error(404, "not_found");
    assert_eq!(native_chat(&kw, "openai", ghost, &caller, &[]).await.status, 404);
    kw.http()
        .post(&ai_path(ghost), Some(&manager), &chat)
        .await
        .expect_error(403, "scope_required");
    // A user's token on the provisioning API, and an unknown service token anywhere.
    kw.http()
        .get("/v1/external/accounts/matrix-1", Some(&owner.token))
        .await
        .expect_error(403, "scope_required");
    let forged = format!("kws_{}", "A".repeat(43));
    kw.http()
        .post(&ai_path(&account), Some(&forged), &chat)
        .await
        .expect_error(401, "unauthorized");
    kw.http()
        .get("/v1/external/accounts/matrix-1", Some(&forged))
        .await
        .expect_error(401, "unauthorized");
    // Users' tokens work as before.
    kw.http().get("/v1/me", Some(&owner.token)).await.expect_status(200);
    kw.http()
        .post(&ai_path(&account), Some(&owner.token), &chat)
        .await
        .expect_status(200);
    assert_audit_ok(&kw, Some(&account));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_calls_are_audited_with_the_service_the_acting_user_and_the_feature() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_with_shared_pool(&fake);
    let (owner, account) = pro_owner(&kw, "owner@acme.test");
    let bo = create_user(&kw, "bo@acme.test");
    add_member(&kw, &account, &bo.email, "member");
    let stranger = create_user(&kw, "stranger@elsewhere.test");
    let (_, drafting) = create_service(&kw, "drafting", &["ai:call", "audit:read"]);
    let (_, prov) = create_service(&kw, "prov", &["accounts:manage"]);
    // A user the product knows by its own id, made a member through the provisioning API.
    let ana = kw
        .http()
        .put(
            "/v1/external/users/u-ana",
            Some(&prov),
            &json!({"email": "ana@acme.test"}),
        )
        .await;
    ana.expect_status(200);
    let ana_id = ana.json()["user_id"].as_str().unwrap().to_owned();
    // The account has no external id: make Ana a member with the CLI.
    add_member(&kw, &account, "ana@acme.test", "member");

    // ai/messages: acting user by user id, feature by header.
    let chat = chat_body("openai", false, 20);
    let r = ai_call_with(
        &kw,
        &drafting,
        &account,
        &chat,
        &[("keyward-on-behalf-of", &bo.id), ("keyward-feature", "drafting")],
    )
    .await;
    r.expect_status(200);
    // The pass-through: acting user by external id, feature in the base URL.
    let body = json!({"model": "gpt-6-luna", "max_tokens": 20, "messages": [{"role": "user", "content": PROMPT}]});
    let r = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, &openai_chat_path(&account, Some("autopilot")))
                .header("authorization", &format!("Bearer {drafting}"))
                .header("keyward-on-behalf-of", "u-ana")
                .json_bytes(body.to_string()),
        )
        .await;
    r.expect_status(200);
    // And with no acting user: the service alone.
    native_chat(&kw, "anthropic", &account, &drafting, &[("keyward-feature", "triage")])
        .await
        .expect_status(200);

    let calls: Vec<Value> = audit_events(&kw, &drafting, &account)
        .await
        .into_iter()
        .filter(|e| e["action"] == "ai.request")
        .collect();
    let seen: Vec<(String, Value, Value, String)> = calls
        .iter()
        .rev()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["on_behalf_of"].clone(),
                e["feature"].clone(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "service:drafting".to_owned(),
                json!(bo.id),
                json!("drafting"),
                "ok".to_owned()
            ),
            (
                "service:drafting".to_owned(),
                json!(ana_id),
                json!("autopilot"),
                "ok".to_owned()
            ),
            (
                "service:drafting".to_owned(),
                Value::Null,
                json!("triage"),
                "ok".to_owned()
            ),
        ]
    );

    // An acting user who is not a member, or does not exist: 404, as for users; nothing called.
    fake.clear_requests();
    for who in [stranger.id.as_str(), "u-nobody", "usr_0123456789abcdef0123456789abcdef"] {
        ai_call_with(&kw, &drafting, &account, &chat, &[("keyward-on-behalf-of", who)])
            .await
            .expect_error(404, "not_found");
        let r = native_chat(&kw, "openai", &account, &drafting, &[("keyward-on-behalf-of", who)]).await;
        assert_eq!(r.status, 404, "{r}");
    }
    ai_call_with(
        &kw,
        &drafting,
        &account,
        &chat,
        &[("keyward-on-behalf-of", "not an id!")],
    )
    .await
    .expect_error(422, "validation_error");
    // A bad feature: 422, in the header, in the path and in the body.
    ai_call_with(&kw, &drafting, &account, &chat, &[("keyward-feature", "no spaces")])
        .await
        .expect_error(422, "validation_error");
    let r = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, &openai_chat_path(&account, Some(&"x".repeat(65))))
                .header("authorization", &format!("Bearer {drafting}"))
                .json_bytes(body.to_string()),
        )
        .await;
    assert_eq!(r.status, 422, "{r}");
    let mut bad = chat.clone();
    bad["feature"] = json!("drafting");
    ai_call_with(&kw, &drafting, &account, &bad, &[("keyward-feature", "autopilot")])
        .await
        .expect_error(422, "validation_error");
    assert!(fake.requests().is_empty(), "a refused call reached a provider");

    // Users: keyward-feature works as the body's feature did; keyward-on-behalf-of is for services.
    ai_call_with(&kw, &owner.token, &account, &chat, &[("keyward-feature", "drafting")])
        .await
        .expect_status(200);
    ai_call_with(&kw, &owner.token, &account, &bad, &[])
        .await
        .expect_status(200);
    ai_call_with(&kw, &owner.token, &account, &chat, &[("keyward-on-behalf-of", &bo.id)])
        .await
        .expect_error(422, "validation_error");
    let last: Vec<Value> = audit_events(&kw, &owner.token, &account)
        .await
        .into_iter()
        .take(2)
        .collect();
    for e in &last {
        assert_eq!(
            (e["actor"].as_str(), e["feature"].as_str()),
            (Some(owner.id.as_str()), Some("drafting")),
            "{e}"
        );
        assert_eq!(e["on_behalf_of"], Value::Null, "{e}");
    }
    assert_audit_ok(&kw, Some(&account));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_listed_without_tokens_and_a_revoked_token_is_refused_at_once() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_with_shared_pool(&fake);
    let (_, account) = pro_owner(&kw, "owner@acme.test");
    let (id, token) = create_service(&kw, "drafting", &["ai:call"]);
    let chat = chat_body("openai", false, 20);
    kw.http()
        .post(&ai_path(&account), Some(&token), &chat)
        .await
        .expect_status(200);

    // Bad command lines: a clear message and a failing exit code, nothing created.
    for (args, what) in [
        (
            vec!["admin", "create-service", "--name", "x", "--scope", "keys:manage"],
            "keys:manage",
        ),
        (vec!["admin", "create-service", "--name", "x"], "--scope"),
        (
            vec!["admin", "create-service", "--name", "Bad Name", "--scope", "ai:call"],
            "--name",
        ),
        (
            vec!["admin", "create-service", "--name", "drafting", "--scope", "ai:call"],
            "already exists",
        ),
        (vec!["admin", "revoke-service", "--name", "nobody"], "no live service"),
    ] {
        let out = kw.cli(&args);
        assert!(!out.success(), "{args:?} should fail: {out}");
        assert!(out.to_string().contains(what), "{args:?} should say {what:?}: {out}");
    }

    let list = kw.cli(&["admin", "list-services"]);
    list.assert_success();
    assert!(!list.to_string().contains(&token[4..]), "a token was listed: {list}");
    assert_eq!(
        list.json()["services"],
        json!([{"service_id": id, "name": "drafting", "scopes": ["ai:call"],
                "created_at": list.json()["services"][0]["created_at"], "revoked_at": null}])
    );

    let out = kw.cli(&["admin", "revoke-service", "--name", "drafting"]);
    out.assert_success();
    assert_eq!(out.json()["service_id"], json!(id), "{out}");
    assert!(out.json()["revoked_at"].is_string(), "{out}");
    // The very next request is refused, on every surface.
    kw.http()
        .post(&ai_path(&account), Some(&token), &chat)
        .await
        .expect_error(401, "unauthorized");
    for p in PROVIDERS {
        let r = native_chat(&kw, p, &account, &token, &[]).await;
        assert_eq!(r.status, 401, "{p}: {r}");
    }
    kw.http()
        .get("/v1/external/accounts/a", Some(&token))
        .await
        .expect_error(401, "unauthorized");
    // The name may be used again, with a new token; the old one stays refused.
    let (id2, token2) = create_service(&kw, "drafting", &["ai:call"]);
    assert_ne!(id, id2);
    kw.http()
        .post(&ai_path(&account), Some(&token2), &chat)
        .await
        .expect_status(200);
    kw.http()
        .post(&ai_path(&account), Some(&token), &chat)
        .await
        .expect_error(401, "unauthorized");
    // The token never reached the logs or the database files.
    for t in [&token, &token2] {
        assert!(
            !keyward_testkit::files::contains(&kw.output_bytes(), t.as_bytes()),
            "token in the logs"
        );
        for (path, bytes) in kw.data_files() {
            assert!(
                !keyward_testkit::files::contains(&bytes, t.as_bytes()),
                "token in {}",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_service_token_is_refused_at_once_on_every_node() {
    let Some(server) = server_url("a_revoked_service_token_is_refused_at_once_on_every_node") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let opts = |o: keyward_testkit::Options| o.env("KEYWARD_DATABASE_URL", &db.url).log("info");
    let a = start_with(opts(fake_options(&fake, &[])));
    let b = start_with(opts(fake_options(&fake, &[]).same_keys_as(&a)));
    let shared = key_for("openai");
    fake.set_key(None, &shared, Behaviour::Ok);
    set_shared_key(&a, "openai", &shared);
    let account = a.owner_account().to_owned();
    let (_, token) = create_service(&a, "drafting", &["ai:call"]);
    let chat = chat_body("openai", false, 20);
    for node in [&a, &b] {
        node.http()
            .post(&ai_path(&account), Some(&token), &chat)
            .await
            .expect_status(200);
        native_chat(node, "openai", &account, &token, &[])
            .await
            .expect_status(200);
    }
    // Revoked through node B's CLI: both nodes refuse the next request.
    b.cli(&["admin", "revoke-service", "--name", "drafting"])
        .assert_success();
    for node in [&a, &b] {
        node.http()
            .post(&ai_path(&account), Some(&token), &chat)
            .await
            .expect_error(401, "unauthorized");
        assert_eq!(native_chat(node, "openai", &account, &token, &[]).await.status, 401);
    }
    assert_audit_ok(&a, Some(&account));
}
