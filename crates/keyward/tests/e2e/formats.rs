//! The key-format table of API.md, rule by rule, through `PUT …/model-keys/{provider}`.

use keyward_testkit::canary::{random_string, KEY_ALPHABET};
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use serde_json::json;

use crate::common::*;

/// What a case must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// 200 and this last4 (of the trimmed key).
    Saved,
    /// 422 invalid_key_format.
    Refused,
    /// 422 invalid_key_format with a message containing this text.
    RefusedSaying(&'static str),
}

fn body(n: usize) -> String {
    random_string(n, KEY_ALPHABET)
}

/// Every rule, for every provider, both sides of every bound.
fn cases() -> Vec<(&'static str, &'static str, String, Want)> {
    use Want::*;
    let mut c: Vec<(&'static str, &'static str, String, Want)> = Vec::new();
    // Length bounds: anthropic and openai 20..=256 characters in all.
    for (p, prefix) in [("anthropic", "sk-ant-"), ("openai", "sk-")] {
        // Bodies start with a letter that cannot make "admin" or "ant-".
        let k = |n: usize| format!("{prefix}x{}", body(n - prefix.len() - 1));
        c.push((p, "19 characters", k(19), Refused));
        c.push((p, "20 characters", k(20), Saved));
        c.push((p, "21 characters", k(21), Saved));
        c.push((p, "255 characters", k(255), Saved));
        c.push((p, "256 characters", k(256), Saved));
        c.push((
            p,
            "256 characters and surrounding spaces",
            format!("  {}\n", k(256)),
            Saved,
        ));
        c.push((p, "257 characters", k(257), Refused));
        c.push((p, "just the prefix", prefix.to_owned(), Refused));
    }
    // google auth keys: "AQ." and what follows, '.' included, 20..=256 in all.
    let g = |n: usize| format!("AQ.Ab8RN6{}", body(n - 9));
    c.push(("google", "auth key, 19 characters", g(19), Refused));
    c.push(("google", "auth key, 20 characters", g(20), Saved));
    c.push(("google", "auth key, 53 characters (as issued)", g(53), Saved));
    c.push(("google", "auth key, 256 characters", g(256), Saved));
    c.push(("google", "auth key, 257 characters", g(257), Refused));
    c.push((
        "google",
        "auth key with dots",
        format!("AQ.Ab8R.{}.x{}", body(20), body(20)),
        Saved,
    ));
    c.push(("google", "auth key prefix only", "AQ.".to_owned(), Refused));
    c.push((
        "google",
        "auth key, lower-case prefix",
        format!("aq.{}", body(50)),
        Refused,
    ));
    // google standard keys: "AIza" and exactly 35 more (accepted, with a warning).
    c.push((
        "google",
        "standard key, 38 characters",
        format!("AIza{}", body(34)),
        Refused,
    ));
    c.push((
        "google",
        "standard key, 39 characters",
        format!("AIza{}", body(35)),
        Saved,
    ));
    c.push((
        "google",
        "standard key, 40 characters",
        format!("AIza{}", body(36)),
        Refused,
    ));
    c.push((
        "google",
        "standard key with a dot",
        format!("AIza{}.{}", body(17), body(17)),
        Refused,
    ));
    c.push(("google", "just the standard prefix", "AIza".to_owned(), Refused));
    c.push((
        "google",
        "lower-case standard prefix",
        format!("aiza{}", body(35)),
        Refused,
    ));
    // openai: project, service-account and legacy keys.
    c.push((
        "openai",
        "project key (164 characters)",
        format!("sk-proj-{}", body(156)),
        Saved,
    ));
    c.push((
        "openai",
        "service-account key (167 characters)",
        format!("sk-svcacct-{}", body(156)),
        Saved,
    ));
    c.push((
        "openai",
        "legacy key (51 characters)",
        format!("sk-{}", body(48)),
        Saved,
    ));

    for p in PROVIDERS {
        let valid = key_for(p);
        let (head, tail) = valid.split_at(valid.len() / 2);
        // Bad characters inside (same total length where it matters).
        for (what, bad) in [
            ("CR LF inside", "\r\n"),
            ("LF inside", "\n"),
            ("tab inside", "\t"),
            ("space inside", " "),
            ("NUL inside", "\0"),
            ("é inside", "é"),
            ("Cyrillic inside", "ключ"),
            ("emoji inside", "🔑"),
            ("plus inside", "+"),
            ("slash inside", "/"),
            ("equals inside", "="),
            ("dot inside", "."),
            ("quote inside", "\""),
            ("backslash inside", "\\"),
        ] {
            let k = format!("{head}{bad}{tail}");
            // Google auth keys may hold a '.'.
            let want = if p == "google" && bad == "." { Saved } else { Refused };
            c.push((p, what, k, want));
        }
        // Surrounding white space is trimmed and the key accepted.
        c.push((p, "surrounding spaces", format!("  {valid}  "), Saved));
        c.push((p, "surrounding CR LF and tab", format!("\t{valid}\r\n"), Saved));
        c.push((p, "leading newline", format!("\n\n{valid}"), Saved));
        // Not keys at all.
        c.push((p, "empty", String::new(), Refused));
        c.push((p, "only white space", " \t\r\n ".to_owned(), Refused));
        c.push((p, "unknown prefix", format!("pk-live-{}", body(40)), Refused));
        c.push((p, "Bearer prefix", format!("Bearer {valid}"), Refused));
        c.push((p, "quoted key", format!("\"{valid}\""), Refused));
        c.push((p, "10 KB key", format!("sk-ant-{}", body(10 * 1024)), Refused));
        // Keys that cannot run models are refused in every slot, saying which to create.
        c.push((
            p,
            "anthropic admin key",
            format!("sk-ant-admin01-{}", body(93)),
            RefusedSaying("Admin API key"),
        ));
        c.push((
            p,
            "openai admin key",
            format!("sk-admin-{}", body(124)),
            RefusedSaying("admin key"),
        ));
        c.push((
            p,
            "claude subscription access token",
            format!("sk-ant-oat01-{}", body(80)),
            RefusedSaying("subscription token"),
        ));
        c.push((
            p,
            "claude subscription refresh token",
            format!("sk-ant-ort01-{}", body(80)),
            RefusedSaying("Create an API key"),
        ));
    }
    // "sk-ant" without its dash is an ordinary OpenAI key.
    c.push(("openai", "sk-antelope key", format!("sk-antelope{}", body(30)), Saved));
    c.push((
        "anthropic",
        "sk-antelope key in the anthropic slot",
        format!("sk-antelope{}", body(30)),
        RefusedSaying("OpenAI"),
    ));
    // A 10 KB key that is otherwise well formed for its own slot.
    c.push((
        "openai",
        "10 KB openai-shaped key",
        format!("sk-x{}", body(10 * 1024)),
        Refused,
    ));
    c.push((
        "anthropic",
        "10 KB anthropic-shaped key",
        format!("sk-ant-x{}", body(10 * 1024)),
        Refused,
    ));
    // Wrong slot: the message names the right provider as a person reads it.
    let wrong = [
        ("openai", anthropic_key(), "anthropic"),
        ("google", anthropic_key(), "anthropic"),
        ("anthropic", openai_key(), "openai"),
        ("google", openai_key(), "openai"),
        ("anthropic", google_key(), "google"),
        ("openai", google_key(), "google"),
    ];
    for (slot, k, right) in wrong {
        let what: &'static str = match right {
            "anthropic" => "anthropic key in wrong slot",
            "openai" => "openai key in wrong slot",
            _ => "google key in wrong slot",
        };
        let saying: &'static str = match right {
            "anthropic" => "save it under Anthropic",
            "openai" => "save it under OpenAI",
            _ => "save it under Google AI (Gemini)",
        };
        c.push((slot, what, k, RefusedSaying(saying)));
    }
    c
}

#[tokio::test]
async fn key_format_table() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "formats@example.com");
    let http = kw.http();
    let mut failures = Vec::new();
    let mut last_saved: std::collections::BTreeMap<&str, String> = Default::default();

    for (provider, what, key, want) in cases() {
        let r = http
            .put(&key_path(&acc, provider), user.tok(), &json!({ "api_key": key }))
            .await;
        let label = format!("[{provider}: {what}]");
        match want {
            Want::Saved => {
                if r.status != 200 {
                    failures.push(format!("{label} expected 200, got {r}"));
                    continue;
                }
                let got = r.json()["key"]["last4"].as_str().unwrap_or_default().to_owned();
                if got != last4(&key) {
                    failures.push(format!("{label} last4 {got:?}, expected {:?}", last4(&key)));
                }
                // A standard Google key is saved with the warning that Google refuses them.
                let notice = r.json()["key"]["notice"].as_str().unwrap_or_default().to_owned();
                let standard = key.trim().starts_with("AIza");
                if standard != notice.contains("auth key") {
                    failures.push(format!("{label} notice {notice:?}"));
                }
                last_saved.insert(provider, key.trim().to_owned());
            }
            Want::Refused | Want::RefusedSaying(_) => {
                if r.status != 422 || r.error_code() != Some("invalid_key_format") {
                    failures.push(format!("{label} expected 422 invalid_key_format, got {r}"));
                    continue;
                }
                let msg = r.error_message().unwrap_or_default();
                if msg.trim().len() < 8 {
                    failures.push(format!("{label} message is not a sentence: {r}"));
                }
                if let Want::RefusedSaying(s) = want {
                    if !msg.contains(s) {
                        failures.push(format!("{label} message should contain {s:?}: {msg:?}"));
                    }
                }
            }
        }
        // No response ever repeats the input, nor a 12-character piece of it.
        if let Some(chunk) = keyward_testkit::canary::shared_chunk(&r.text, key.trim(), 12) {
            failures.push(format!("{label} response repeats part of the input ({chunk:?}): {r}"));
        }
    }

    // Refusals changed nothing: each slot holds the last key that was accepted, and it opens.
    let list = list_keys(&kw, &user.token, &acc).await;
    let pool = kw.db().await;
    for (p, k) in &last_saved {
        assert_eq!(list[*p]["key"]["last4"], last4(k), "{p}");
        let row = keyward_testkit::db::key_row(&pool, &acc, p).await.expect("row");
        assert_eq!(
            keyward_testkit::db::open_row(kw.data_dir(), &row).expect("open"),
            k.as_bytes(),
            "{p}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} key-format cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn three_megabyte_body_is_payload_too_large() {
    let kw = start();
    let (user, acc) = pro_owner(&kw, "big@example.com");
    let big_key = format!("sk-ant-{}", random_string(3 * 1024 * 1024, KEY_ALPHABET));
    let body = serde_json::to_vec(&json!({ "api_key": big_key })).expect("json");
    // Over plain TCP, so the early answer is read even if the server stops reading the body.
    let r = kw
        .http()
        .raw_tcp(
            RawRequest::new(Method::PUT, &key_path(&acc, "anthropic"))
                .token(&user.token)
                .json_bytes(body),
        )
        .await;
    r.expect_error(413, "payload_too_large");
    assert_no_leak(&r.text, &big_key, &r.to_string());
    // The limit is 64 KiB: just over it is refused too, and a 10 KB key is a format error.
    let just_over = format!("{{\"api_key\": \"sk-ant-{}\"}}", random_string(64 * 1024, KEY_ALPHABET));
    let r = kw
        .http()
        .raw_tcp(
            RawRequest::new(Method::PUT, &key_path(&acc, "anthropic"))
                .token(&user.token)
                .json_bytes(just_over),
        )
        .await;
    r.expect_error(413, "payload_too_large");
    assert_eq!(kw.http().get("/healthz", None).await.status, 200);
}
