//! Bad input gets a stable code and a readable message, and loses nothing.

use keyward_testkit::canary::{random_string, ALNUM};
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use keyward_testkit::{db, Keyward};
use serde_json::json;

use crate::common::*;

/// One bad request and the answer it must get.
struct Case {
    what: String,
    req: RawRequest,
    status: u16,
    code: &'static str,
}

fn case(what: &str, req: RawRequest, status: u16, code: &'static str) -> Case {
    Case {
        what: what.to_owned(),
        req,
        status,
        code,
    }
}

fn json_req(method: Method, path: &str, token: &str, body: &str) -> RawRequest {
    RawRequest::new(method, path)
        .token(token)
        .json_bytes(body.as_bytes().to_vec())
}

async fn run_cases(kw: &Keyward, cases: Vec<Case>) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        // Oversized bodies go over plain TCP so an early 413 is heard (see `raw_tcp`).
        let r = if c.req.body.len() > 60 * 1024 {
            kw.http().raw_tcp(c.req).await
        } else {
            kw.http().raw(c.req).await
        };
        let ok = r.status == c.status
            && r.error_code() == Some(c.code)
            && r.error_message().is_some_and(|m| m.trim().len() >= 8 && m != c.code)
            && r.content_type().starts_with("application/json");
        if !ok {
            failures.push(format!(
                "{}: expected {} {} with a readable message, got {r}",
                c.what, c.status, c.code
            ));
        }
    }
    failures
}

#[tokio::test]
async fn bad_input_gets_stable_codes_and_loses_nothing() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "bad@example.com");
    let t = user.token.as_str();
    let saved = anthropic_key();
    save_key(&kw, t, &acc, "anthropic", &saved).await;
    set_source(&kw, t, &acc, "anthropic", "own").await;
    let pool = kw.db().await;
    let before = db::key_row(&pool, &acc, "anthropic").await.expect("row");
    let events_before = db::audit_rows(&pool, &acc).await.len();
    let kp = key_path(&acc, "anthropic");
    let sp = source_path(&acc, "anthropic");
    let fresh = anthropic_key();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));

    let cases = vec![
        // Malformed JSON.
        case(
            "truncated JSON",
            json_req(Method::PUT, &kp, t, r#"{"api_key": "#),
            400,
            "invalid_json",
        ),
        case(
            "trailing comma",
            json_req(Method::PUT, &kp, t, &format!(r#"{{"api_key": "{fresh}",}}"#)),
            400,
            "invalid_json",
        ),
        case(
            "single quotes",
            json_req(Method::PUT, &kp, t, &format!("{{'api_key': '{fresh}'}}")),
            400,
            "invalid_json",
        ),
        case("empty body", json_req(Method::PUT, &kp, t, ""), 400, "invalid_json"),
        case(
            "two documents",
            json_req(Method::PUT, &kp, t, &format!(r#"{{"api_key": "{fresh}"}} {{}}"#)),
            400,
            "invalid_json",
        ),
        case(
            "invalid UTF-8",
            RawRequest::new(Method::PUT, &kp)
                .token(t)
                .json_bytes(b"{\"api_key\": \"sk-ant-\xff\xfe\"}".to_vec()),
            400,
            "invalid_json",
        ),
        case(
            "malformed source body",
            json_req(Method::PUT, &sp, t, r#"{"source": own}"#),
            400,
            "invalid_json",
        ),
        // Wrong types, missing and unknown fields.
        case(
            "api_key a number",
            json_req(Method::PUT, &kp, t, r#"{"api_key": 123}"#),
            422,
            "validation_error",
        ),
        case(
            "api_key null",
            json_req(Method::PUT, &kp, t, r#"{"api_key": null}"#),
            422,
            "validation_error",
        ),
        case(
            "api_key an object",
            json_req(Method::PUT, &kp, t, r#"{"api_key": {"k": "v"}}"#),
            422,
            "validation_error",
        ),
        case(
            "body a string",
            json_req(Method::PUT, &kp, t, &format!("\"{fresh}\"")),
            422,
            "validation_error",
        ),
        case(
            "body an array",
            json_req(Method::PUT, &kp, t, "[]"),
            422,
            "validation_error",
        ),
        case(
            "body null",
            json_req(Method::PUT, &kp, t, "null"),
            422,
            "validation_error",
        ),
        case(
            "missing api_key",
            json_req(Method::PUT, &kp, t, "{}"),
            422,
            "validation_error",
        ),
        case(
            "misspelt api_key",
            json_req(Method::PUT, &kp, t, &format!(r#"{{"apikey": "{fresh}"}}"#)),
            422,
            "validation_error",
        ),
        case(
            "unknown field next to a valid key",
            json_req(
                Method::PUT,
                &kp,
                t,
                &format!(r#"{{"api_key": "{fresh}", "source": "own"}}"#),
            ),
            422,
            "validation_error",
        ),
        case(
            "duplicate api_key",
            json_req(
                Method::PUT,
                &kp,
                t,
                &format!(r#"{{"api_key": "{fresh}", "api_key": "{fresh}"}}"#),
            ),
            422,
            "validation_error",
        ),
        case(
            "unknown source",
            json_req(Method::PUT, &sp, t, r#"{"source": "mine"}"#),
            422,
            "validation_error",
        ),
        case(
            "source upper case",
            json_req(Method::PUT, &sp, t, r#"{"source": "OWN"}"#),
            422,
            "validation_error",
        ),
        case(
            "source a bool",
            json_req(Method::PUT, &sp, t, r#"{"source": true}"#),
            422,
            "validation_error",
        ),
        case(
            "source a number",
            json_req(Method::PUT, &sp, t, r#"{"source": 1}"#),
            422,
            "validation_error",
        ),
        case(
            "source null",
            json_req(Method::PUT, &sp, t, r#"{"source": null}"#),
            422,
            "validation_error",
        ),
        case(
            "missing source",
            json_req(Method::PUT, &sp, t, "{}"),
            422,
            "validation_error",
        ),
        case(
            "unknown field on source",
            json_req(Method::PUT, &sp, t, r#"{"source": "shared", "x": 1}"#),
            422,
            "validation_error",
        ),
        // Content types.
        case(
            "no content type",
            RawRequest::new(Method::PUT, &kp)
                .token(t)
                .body(format!(r#"{{"api_key": "{fresh}"}}"#)),
            415,
            "unsupported_media_type",
        ),
        case(
            "text/plain",
            RawRequest::new(Method::PUT, &kp)
                .token(t)
                .content_type("text/plain")
                .body(format!(r#"{{"api_key": "{fresh}"}}"#)),
            415,
            "unsupported_media_type",
        ),
        case(
            "form encoded",
            RawRequest::new(Method::PUT, &kp)
                .token(t)
                .content_type("application/x-www-form-urlencoded")
                .body(format!("api_key={fresh}")),
            415,
            "unsupported_media_type",
        ),
        // Unknown providers (exact lower-case names only).
        case(
            "unknown provider PUT",
            json_req(
                Method::PUT,
                &key_path(&acc, "mistral"),
                t,
                &format!(r#"{{"api_key": "{fresh}"}}"#),
            ),
            404,
            "unknown_provider",
        ),
        case(
            "capitalised provider",
            json_req(
                Method::PUT,
                &key_path(&acc, "Anthropic"),
                t,
                &format!(r#"{{"api_key": "{fresh}"}}"#),
            ),
            404,
            "unknown_provider",
        ),
        case(
            "unknown provider DELETE",
            RawRequest::new(Method::DELETE, &key_path(&acc, "gemini")).token(t),
            404,
            "unknown_provider",
        ),
        case(
            "unknown provider source",
            json_req(Method::PUT, &source_path(&acc, "azure"), t, r#"{"source": "own"}"#),
            404,
            "unknown_provider",
        ),
        // Oversized bodies.
        case(
            "64 KiB + 1 body",
            json_req(
                Method::PUT,
                &kp,
                t,
                &format!(r#"{{"api_key": "{}"}}"#, "a".repeat(64 * 1024 + 1 - 15)),
            ),
            413,
            "payload_too_large",
        ),
        case(
            "1 MiB body",
            json_req(
                Method::PUT,
                &kp,
                t,
                &format!(r#"{{"api_key": "{}"}}"#, random_string(1024 * 1024, ALNUM)),
            ),
            413,
            "payload_too_large",
        ),
        case(
            "oversized source body",
            json_req(
                Method::PUT,
                &sp,
                t,
                &format!(r#"{{"source": "own", "pad": "{}"}}"#, "x".repeat(100 * 1024)),
            ),
            413,
            "payload_too_large",
        ),
        // Wrong methods and unknown routes.
        case(
            "PATCH a key",
            json_req(Method::PATCH, &kp, t, &format!(r#"{{"api_key": "{fresh}"}}"#)),
            405,
            "method_not_allowed",
        ),
        case(
            "POST the list",
            json_req(Method::POST, &keys_path(&acc), t, "{}"),
            405,
            "method_not_allowed",
        ),
        case(
            "DELETE /v1/me",
            RawRequest::new(Method::DELETE, "/v1/me").token(t),
            405,
            "method_not_allowed",
        ),
        case(
            "unknown route",
            RawRequest::new(Method::GET, "/v1/nope").token(t),
            404,
            "not_found",
        ),
        case(
            "unknown account sub-route",
            RawRequest::new(Method::GET, &format!("/v1/accounts/{acc}/nope")).token(t),
            404,
            "not_found",
        ),
        case(
            "unknown key sub-route",
            RawRequest::new(Method::GET, &format!("{kp}/nope")).token(t),
            404,
            "not_found",
        ),
    ];
    let mut failures = run_cases(&kw, cases).await;

    // Pathological nesting: any 4xx with a stable code, never a crash.
    let r = kw.http().raw(json_req(Method::PUT, &kp, t, &deep)).await;
    if !(r.status == 400 || r.status == 422)
        || !matches!(r.error_code(), Some("invalid_json") | Some("validation_error"))
    {
        failures.push(format!("deeply nested JSON: {r}"));
    }
    // Bad query parameters on the audit listing: a 4xx with a code, not a 5xx.
    for q in [
        "limit=0",
        "limit=abc",
        "limit=-1",
        "before=xyz",
        "limit=99999999999999999999",
    ] {
        let r = kw.http().get(&format!("{}?{q}", audit_path(&acc)), Some(t)).await;
        if !(400..500).contains(&r.status) || r.error_code().is_none() {
            failures.push(format!("audit ?{q}: expected a 4xx error body, got {r}"));
        }
    }

    // Nothing was lost or changed: same key row, same blob, it opens, same source, no events.
    let after = db::key_row(&pool, &acc, "anthropic")
        .await
        .expect("the saved key is still there");
    assert_eq!(after, before, "the saved key row changed");
    assert_eq!(db::open_row(kw.data_dir(), &after).expect("opens"), saved.as_bytes());
    let list = list_keys(&kw, t, &acc).await;
    assert_eq!(list["anthropic"]["key"]["last4"], last4(&saved));
    assert_eq!(list["anthropic"]["source"], "own");
    assert_eq!(
        db::audit_rows(&pool, &acc).await.len(),
        events_before,
        "bad requests must not append events"
    );
    assert_audit_ok(&kw, Some(&acc));

    // And the server still serves, including writes.
    assert_eq!(kw.http().get("/healthz", None).await.status, 200);
    save_key(&kw, t, &acc, "openai", &openai_key()).await;
    assert!(
        failures.is_empty(),
        "{} bad-input cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn a_flood_of_bad_requests_does_not_hurt_the_service() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "flood@example.com");
    let saved = google_key();
    save_key(&kw, &user.token, &acc, "google", &saved).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (http, token, kp) = (kw.http().clone(), user.token.clone(), key_path(&acc, "google"));
        set.spawn(async move {
            let body = match i % 4 {
                0 => b"{\"api_key\": ".to_vec(),
                1 => serde_json::to_vec(&json!({"api_key": 1})).unwrap_or_default(),
                2 => serde_json::to_vec(&json!({"api_key": "AIza-too-short"})).unwrap_or_default(),
                _ => vec![b'x'; 70 * 1024],
            };
            http.raw_tcp(RawRequest::new(Method::PUT, &kp).token(&token).json_bytes(body))
                .await
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        let r = joined.expect("task");
        if !((400..500).contains(&r.status) && r.error_code().is_some()) {
            failures.push(r.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let list = list_keys(&kw, &user.token, &acc).await;
    assert_eq!(list["google"]["key"]["last4"], last4(&saved));
    let pool = kw.db().await;
    let row = db::key_row(&pool, &acc, "google").await.expect("row");
    assert_eq!(db::open_row(kw.data_dir(), &row).expect("opens"), saved.as_bytes());
    assert_eq!(kw.http().get("/healthz", None).await.status, 200);
}
