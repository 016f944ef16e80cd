//! Roles and tenancy over every route under `/v1/accounts/{id}/`.

use keyward_testkit::canary::{random_string, ALNUM};
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use keyward_testkit::{db, Keyward, Resp};
use serde_json::{json, Value};

use crate::common::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GET model-keys`: every member may.
    List,
    /// Key management (`PUT`, `DELETE`, `source`): owners and admins only.
    Manage,
    /// Routes whose role rules API.md leaves open, or which may not exist yet.
    Other,
}

#[derive(Debug, Clone)]
struct Route {
    name: &'static str,
    kind: Kind,
    method: Method,
    path: String,
    body: Option<Value>,
}

/// Every route under /v1/accounts/{acc}/, with `provider` in the provider routes.
fn routes(acc: &str, provider: &str) -> Vec<Route> {
    let valid_key = key_for(if ["anthropic", "openai", "google"].contains(&provider) {
        provider
    } else {
        "openai"
    });
    vec![
        Route {
            name: "list keys",
            kind: Kind::List,
            method: Method::GET,
            path: keys_path(acc),
            body: None,
        },
        Route {
            name: "save key",
            kind: Kind::Manage,
            method: Method::PUT,
            path: key_path(acc, provider),
            body: Some(json!({ "api_key": valid_key })),
        },
        Route {
            name: "remove key",
            kind: Kind::Manage,
            method: Method::DELETE,
            path: key_path(acc, provider),
            body: None,
        },
        Route {
            name: "set source",
            kind: Kind::Manage,
            method: Method::PUT,
            path: source_path(acc, provider),
            body: Some(json!({ "source": "shared" })),
        },
        Route {
            name: "test key",
            kind: Kind::Other,
            method: Method::POST,
            path: format!("{}/test", key_path(acc, provider)),
            body: Some(json!({})),
        },
        Route {
            name: "ai messages",
            kind: Kind::Other,
            method: Method::POST,
            path: format!("/v1/accounts/{acc}/ai/messages"),
            body: Some(json!({"provider": "openai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})),
        },
        Route {
            name: "usage",
            kind: Kind::Other,
            method: Method::GET,
            path: format!("/v1/accounts/{acc}/usage"),
            body: None,
        },
        Route {
            name: "audit",
            kind: Kind::Other,
            method: Method::GET,
            path: audit_path(acc),
            body: None,
        },
    ]
}

async fn call(kw: &Keyward, route: &Route, token: Option<&str>) -> Resp {
    kw.http()
        .send(route.method.clone(), &route.path, token, route.body.as_ref())
        .await
}

struct World {
    owner: User,
    admin: User,
    member: User,
    outsider: User,
    /// pro account: owner, admin, member.
    acc: String,
    /// free account: same people.
    free: String,
    /// the outsider's own pro account.
    other: String,
}

fn world(kw: &Keyward) -> World {
    let owner = create_user(kw, "owner@acme.test");
    let admin = create_user(kw, "admin@acme.test");
    let member = create_user(kw, "member@acme.test");
    let outsider = create_user(kw, "outsider@else.test");
    let acc = create_account(kw, "Acme", "pro", &owner.email);
    let free = create_account(kw, "Acme Free", "free", &owner.email);
    let other = create_account(kw, "Elsewhere", "pro", &outsider.email);
    for a in [&acc, &free] {
        add_member(kw, a, &admin.email, "admin");
        add_member(kw, a, &member.email, "member");
    }
    World {
        owner,
        admin,
        member,
        outsider,
        acc,
        free,
        other,
    }
}

fn unknown_token() -> String {
    format!("kw_{}", random_string(43, ALNUM))
}

fn random_account() -> String {
    format!("acc_{}", random_string(32, b"0123456789abcdef"))
}

#[tokio::test]
async fn authentication_is_required_on_every_account_route() {
    let kw = start();
    let w = world(&kw);
    let mut failures = Vec::new();
    for acc in [w.acc.clone(), random_account()] {
        for route in routes(&acc, "openai") {
            let cases: Vec<(&str, RawRequest)> = vec![
                ("no token", RawRequest::new(route.method.clone(), &route.path)),
                (
                    "unknown token",
                    RawRequest::new(route.method.clone(), &route.path).token(&unknown_token()),
                ),
                (
                    "empty bearer",
                    RawRequest::new(route.method.clone(), &route.path).header("authorization", "Bearer "),
                ),
                (
                    "basic auth",
                    RawRequest::new(route.method.clone(), &route.path).header("authorization", "Basic b3duZXI6cHc="),
                ),
                (
                    "token without Bearer",
                    RawRequest::new(route.method.clone(), &route.path).header("authorization", &w.owner.token),
                ),
            ];
            for (what, mut req) in cases {
                if let Some(b) = &route.body {
                    req = req.json_bytes(serde_json::to_vec(b).expect("json"));
                }
                let r = kw.http().raw(req).await;
                if r.status != 401 || r.error_code() != Some("unauthorized") {
                    failures.push(format!(
                        "{} with {what}: expected 401 unauthorized, got {r}",
                        route.name
                    ));
                }
            }
        }
    }
    // /v1/me too.
    let r = kw.http().get("/v1/me", None).await;
    if r.status != 401 || r.error_code() != Some("unauthorized") {
        failures.push(format!("/v1/me without token: {r}"));
    }
    let r = kw.http().get("/v1/me", Some(&unknown_token())).await;
    if r.status != 401 || r.error_code() != Some("unauthorized") {
        failures.push(format!("/v1/me with unknown token: {r}"));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn non_members_get_not_found_on_every_account_route() {
    let kw = start();
    let w = world(&kw);
    // Something to find, were the check missing.
    let k = openai_key();
    save_key(&kw, &w.owner.token, &w.acc, "openai", &k).await;
    let pool = kw.db().await;
    let before = db::key_row(&pool, &w.acc, "openai").await.expect("row");
    let events_before = db::audit_rows(&pool, &w.acc).await.len();

    let mut failures = Vec::new();
    let mut bodies = Vec::new();
    for provider in ["openai", "mistral", "Anthropic"] {
        for route in routes(&w.acc, provider) {
            // A member of another account, an unknown account, a malformed account id.
            let r = call(&kw, &route, w.outsider.tok()).await;
            if r.status != 404 || r.error_code() != Some("not_found") {
                failures.push(format!(
                    "outsider, {} ({provider}): expected 404 not_found, got {r}",
                    route.name
                ));
            } else {
                bodies.push(r.text.replace(&w.acc, "{account}"));
            }
            assert_no_leak(&r.text, &k, &r.to_string());
        }
        for acc in [random_account(), "acc_nothex".to_owned(), w.other.clone()] {
            for route in routes(&acc, provider) {
                let r = call(&kw, &route, w.owner.tok()).await;
                if r.status != 404 || r.error_code() != Some("not_found") {
                    failures.push(format!(
                        "owner of another account on {acc}, {} ({provider}): expected 404 not_found, got {r}",
                        route.name
                    ));
                } else {
                    bodies.push(r.text.replace(&acc, "{account}"));
                }
            }
        }
    }
    // No enumeration: "not a member" and "no such account" answer the same body (up to the
    // account id itself).
    bodies.sort();
    bodies.dedup();
    assert!(bodies.len() <= 1, "404 bodies differ (account enumeration): {bodies:?}");

    // Nothing changed.
    assert_eq!(db::key_row(&pool, &w.acc, "openai").await.as_ref(), Some(&before));
    assert_eq!(db::audit_rows(&pool, &w.acc).await.len(), events_before);
    assert!(db::key_rows(&pool, &w.other).await.is_empty());
    // The outsider still sees only their own account.
    let me = kw.http().get("/v1/me", w.outsider.tok()).await;
    me.expect_status(200);
    let ids: Vec<&str> = me.json()["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .filter_map(|a| a["account_id"].as_str())
        .collect();
    assert_eq!(ids, [w.other.as_str()], "{me}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn roles_decide_key_management() {
    let kw = start();
    let w = world(&kw);
    let http = kw.http();
    let pool = kw.db().await;
    let owner_key = openai_key();
    save_key(&kw, &w.owner.token, &w.acc, "openai", &owner_key).await;

    // /v1/me shows each user's role.
    for (u, role) in [(&w.owner, "owner"), (&w.admin, "admin"), (&w.member, "member")] {
        let me = http.get("/v1/me", u.tok()).await;
        me.expect_status(200);
        let accs = me.json()["accounts"].as_array().expect("accounts").clone();
        for acc in [&w.acc, &w.free] {
            let a = accs
                .iter()
                .find(|a| a["account_id"] == acc.as_str())
                .unwrap_or_else(|| panic!("{acc} missing: {me}"));
            assert_eq!(a["role"], role, "{me}");
        }
    }

    // Members: may list, may not manage; refused before plan and format checks.
    let events_before = db::audit_rows(&pool, &w.acc).await.len();
    let m = w.member.tok();
    let list = list_keys(&kw, &w.member.token, &w.acc).await;
    assert_eq!(list["openai"]["key"]["last4"], last4(&owner_key));
    let refused = [
        (
            "PUT valid key",
            http.put(&key_path(&w.acc, "anthropic"), m, &json!({"api_key": anthropic_key()}))
                .await,
        ),
        (
            "PUT over owner's key",
            http.put(&key_path(&w.acc, "openai"), m, &json!({"api_key": openai_key()}))
                .await,
        ),
        (
            "PUT malformed key",
            http.put(&key_path(&w.acc, "openai"), m, &json!({"api_key": "nope"}))
                .await,
        ),
        ("DELETE", http.delete(&key_path(&w.acc, "openai"), m).await),
        (
            "source own",
            http.put(&source_path(&w.acc, "openai"), m, &json!({"source": "own"}))
                .await,
        ),
        (
            "source shared",
            http.put(&source_path(&w.acc, "openai"), m, &json!({"source": "shared"}))
                .await,
        ),
        (
            "PUT on free plan",
            http.put(&key_path(&w.free, "openai"), m, &json!({"api_key": openai_key()}))
                .await,
        ),
    ];
    for (what, r) in &refused {
        assert_eq!((r.status, code(r)), (403, "forbidden"), "member {what}: {r}");
        r.expect_error(403, "forbidden");
    }
    // Nothing changed, nothing audited.
    let row = db::key_row(&pool, &w.acc, "openai").await.expect("row");
    assert_eq!(row.last4, last4(&owner_key));
    assert!(db::key_row(&pool, &w.acc, "anthropic").await.is_none());
    assert_eq!(
        db::audit_rows(&pool, &w.acc).await.len(),
        events_before,
        "refused calls must not be audited as actions"
    );
    assert_eq!(
        list_keys(&kw, &w.owner.token, &w.acc).await["openai"]["source"],
        "shared"
    );

    // Admins and owners manage keys.
    for u in [&w.admin, &w.owner] {
        let t = u.tok();
        let k = anthropic_key();
        let r = http
            .put(&key_path(&w.acc, "anthropic"), t, &json!({"api_key": k}))
            .await;
        r.expect_status(200);
        assert_eq!(r.json()["key"]["last4"], last4(&k), "{r}");
        http.put(&source_path(&w.acc, "anthropic"), t, &json!({"source": "own"}))
            .await
            .expect_status(200);
        http.put(&source_path(&w.acc, "anthropic"), t, &json!({"source": "shared"}))
            .await
            .expect_status(200);
        http.delete(&key_path(&w.acc, "anthropic"), t).await.expect_status(204);
        list_keys(&kw, &u.token, &w.acc).await;
        http.put(&key_path(&w.acc, "mistral"), t, &json!({"api_key": k}))
            .await
            .expect_error(404, "unknown_provider");
        // The audit log names who did it.
        let ev = key_events(&kw, &u.token, &w.acc).await;
        let mine: Vec<&str> = ev
            .iter()
            .filter(|e| e["actor"] == u.id.as_str() && e["provider"] == "anthropic")
            .filter_map(|e| e["action"].as_str())
            .collect();
        assert_eq!(
            mine,
            ["key.saved", "key.source_changed", "key.source_changed", "key.removed"],
            "{ev:?}"
        );
    }

    // Free plan: role check first (above), then the plan, then the format.
    for u in [&w.admin, &w.owner] {
        let t = u.tok();
        http.put(&key_path(&w.free, "openai"), t, &json!({"api_key": openai_key()}))
            .await
            .expect_error(403, "plan_required");
        http.put(&key_path(&w.free, "openai"), t, &json!({"api_key": "not-a-key"}))
            .await
            .expect_error(403, "plan_required");
        http.put(&key_path(&w.free, "google"), t, &json!({"api_key": anthropic_key()}))
            .await
            .expect_error(403, "plan_required");
        list_keys(&kw, &u.token, &w.free).await;
    }
    assert!(db::key_rows(&pool, &w.free).await.is_empty());

    // Roles and plans are read on every request: promote, downgrade, and back.
    add_member(&kw, &w.acc, &w.member.email, "admin");
    let k = google_key();
    http.put(&key_path(&w.acc, "google"), m, &json!({"api_key": k}))
        .await
        .expect_status(200);
    add_member(&kw, &w.acc, &w.member.email, "member");
    http.delete(&key_path(&w.acc, "google"), m)
        .await
        .expect_error(403, "forbidden");
    set_plan(&kw, &w.acc, "free");
    http.put(
        &key_path(&w.acc, "google"),
        w.owner.tok(),
        &json!({"api_key": google_key()}),
    )
    .await
    .expect_error(403, "plan_required");
    let v = kw.cli(&[
        "admin",
        "set-plan",
        "--account",
        &w.acc,
        "--plan",
        "business",
        "--shared-credit-limit",
        "1234",
    ]);
    v.assert_success();
    assert_eq!(
        v.json(),
        json!({"account_id": w.acc, "plan": "business", "shared_credit_limit": 1234}),
        "{v}"
    );
    let k2 = google_key();
    http.put(&key_path(&w.acc, "google"), w.owner.tok(), &json!({"api_key": k2}))
        .await
        .expect_status(200);
    let me = http.get("/v1/me", w.owner.tok()).await;
    let a = me.json()["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["account_id"] == w.acc.as_str())
        .cloned();
    assert_eq!(a.map(|a| a["plan"].clone()), Some(json!("business")), "{me}");
}

#[tokio::test]
async fn other_account_routes_hold_the_tenancy_line() {
    // Routes whose role rules are open (or which may not exist yet): members get no 401/5xx,
    // outsiders get 404, strangers 401, and an owner can read the audit log.
    let kw = start();
    let w = world(&kw);
    save_key(&kw, &w.owner.token, &w.acc, "openai", &openai_key()).await;
    let mut failures = Vec::new();
    for route in routes(&w.acc, "openai").into_iter().filter(|r| r.kind == Kind::Other) {
        let r = call(&kw, &route, w.outsider.tok()).await;
        if (r.status, code(&r)) != (404, "not_found") {
            failures.push(format!("outsider {}: {r}", route.name));
        }
        let r = call(&kw, &route, None).await;
        if (r.status, code(&r)) != (401, "unauthorized") {
            failures.push(format!("no token {}: {r}", route.name));
        }
        for u in [&w.owner, &w.admin, &w.member] {
            let r = call(&kw, &route, u.tok()).await;
            if r.status == 401 || r.status >= 500 && r.status != 502 && r.status != 503 {
                failures.push(format!("{} {}: {r}", u.email, route.name));
            }
        }
    }
    let r = kw.http().get(&audit_path(&w.acc), w.owner.tok()).await;
    if r.status != 200 {
        failures.push(format!("owner reading the audit log: {r}"));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn unknown_provider_is_named_to_every_member() {
    // Fixed decision: a key-management route for a provider that is not one of the three
    // answers 404 unknown_provider to members (any role); only non-members get not_found.
    let kw = start();
    let w = world(&kw);
    let http = kw.http();
    let mut failures = Vec::new();
    for u in [&w.owner, &w.admin, &w.member] {
        for provider in ["mistral", "Anthropic", "open-ai"] {
            let answers = [
                (
                    "PUT",
                    http.put(&key_path(&w.acc, provider), u.tok(), &json!({"api_key": openai_key()}))
                        .await,
                ),
                ("DELETE", http.delete(&key_path(&w.acc, provider), u.tok()).await),
                (
                    "source",
                    http.put(&source_path(&w.acc, provider), u.tok(), &json!({"source": "shared"}))
                        .await,
                ),
            ];
            for (what, r) in answers {
                if (r.status, code(&r)) != (404, "unknown_provider") {
                    failures.push(format!(
                        "{} {what} {provider}: expected 404 unknown_provider, got {r}",
                        u.email
                    ));
                }
            }
        }
        let r = http
            .put(
                &key_path(&w.acc, "mistral"),
                w.outsider.tok(),
                &json!({"api_key": openai_key()}),
            )
            .await;
        if (r.status, code(&r)) != (404, "not_found") {
            failures.push(format!("outsider PUT mistral: expected 404 not_found, got {r}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
