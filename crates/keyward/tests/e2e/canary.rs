//! Leak canaries: plant keys, provoke every error with them, then search every byte keyward
//! wrote (data dir files, server stdout/stderr at trace, CLI output, HTTP answers) for any
//! form of them; and check that rotated and removed ciphertext is really gone from the
//! database files.

use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::canary::{find_forms, random_string, MultiSearch, ALNUM};
use keyward_testkit::files::contains;
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use keyward_testkit::{db, Keyward, Options, Resp};
use serde_json::json;

use crate::common::*;

/// The canaries of one run: random cores, and the keys built from them.
#[derive(Default)]
struct Canaries {
    secrets: Vec<String>,
}

impl Canaries {
    /// A fresh 40-character random core, remembered.
    fn core(&mut self) -> String {
        let c = format!("CaNaRy{}", random_string(34, ALNUM));
        self.secrets.push(c.clone());
        c
    }

    /// A remembered full key.
    fn key(&mut self, key: String) -> String {
        self.secrets.push(key.clone());
        key
    }

    fn anthropic(&mut self) -> String {
        let (c, d) = (self.core(), self.core());
        self.key(format!("sk-ant-api03-{c}{d}"))
    }

    fn openai(&mut self) -> String {
        let (c, d) = (self.core(), self.core());
        self.key(format!("sk-proj-{c}{d}"))
    }

    /// A Google auth key (`AQ.…`, what AI Studio issues today), with a `.` inside.
    fn google(&mut self) -> String {
        let (c, d) = (self.core(), self.core());
        self.key(format!("AQ.Ab8RN6{c}.{d}"))
    }

    /// A Google standard key: AIza + 35, a core of its own, cut to fit.
    fn google_standard(&mut self) -> String {
        let c = format!("Cy{}", random_string(33, ALNUM));
        self.secrets.push(c.clone());
        self.key(format!("AIza{c}"))
    }

    /// Every secret found (in any form) in `bytes`, with the forms.
    fn found_in(&self, bytes: &[u8]) -> Vec<String> {
        self.secrets
            .iter()
            .flat_map(|s| {
                find_forms(bytes, s.as_bytes())
                    .into_iter()
                    .map(move |f| format!("{f} of {s}"))
            })
            .collect()
    }
}

/// Where pieces of `blob` (past its 12-byte common header, in 16-byte chunks) remain in the
/// data dir's database files.
fn blob_remnants(kw: &Keyward, blob: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, bytes) in kw.data_files() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with("keyward.db") {
            continue;
        }
        for (i, chunk) in blob.get(12..).unwrap_or_default().chunks(16).enumerate() {
            if chunk.len() == 16 && contains(&bytes, chunk) {
                found.push(format!("{name}: blob bytes {}..{}", 12 + 16 * i, 12 + 16 * i + 16));
            }
        }
    }
    found
}

/// Polls (up to 5 s after `since`) until no piece of `blob` is in the database files.
async fn assert_blob_gone(kw: &Keyward, blob: &[u8], since: Instant, what: &str) {
    loop {
        let left = blob_remnants(kw, blob);
        if left.is_empty() {
            return;
        }
        if since.elapsed() > Duration::from_secs(5) {
            panic!("{what}: the old ciphertext is still in the database files 5 s later: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Run {
    kw: Keyward,
    canaries: Canaries,
    answers: Vec<Resp>,
    wrong: Vec<String>,
}

impl Run {
    #[track_caller]
    fn expect(&mut self, r: Resp, status: u16, code: Option<&str>) {
        let ok = r.status == status && (code.is_none() || r.error_code() == code);
        if !ok {
            self.wrong
                .push(format!("expected {status} {}, got {r}", code.unwrap_or("")));
        }
        self.answers.push(r);
    }
}

async fn canary_scenario(opts: Options) {
    let kw = start_with(opts);
    let mut run = Run {
        kw,
        canaries: Canaries::default(),
        answers: Vec::new(),
        wrong: Vec::new(),
    };
    let kw = &run.kw;
    let (user, acc) = pro_owner(kw, "canary@example.com");
    let member = create_user(kw, "canary-member@example.com");
    add_member(kw, &acc, &member.email, "member");
    let free = create_account(kw, "Free", "free", &user.email);
    let outsider = create_user(kw, "canary-outsider@example.com");
    let http = kw.http().clone();
    let pool = kw.db().await;
    let t = user.tok();
    let c = &mut run.canaries;
    let (a1, a2, o1, g1, g2) = (
        c.anthropic(),
        c.anthropic(),
        c.openai(),
        c.google(),
        c.google_standard(),
    );

    // Save, rotate, remove: old ciphertext must leave the database files within 5 s.
    for (p, k) in [("anthropic", &a1), ("openai", &o1), ("google", &g1)] {
        let r = http.put(&key_path(&acc, p), t, &json!({ "api_key": k })).await;
        run.expect(r, 200, None);
    }
    let old = db::key_row(&pool, &acc, "anthropic").await.expect("row").sealed;
    // Positive control: the search does find a live blob in the database files.
    assert!(
        !blob_remnants(&run.kw, &old).is_empty(),
        "the blob search cannot see a live blob"
    );
    let r = http
        .put(&key_path(&acc, "anthropic"), t, &json!({ "api_key": a2 }))
        .await;
    let at = Instant::now();
    run.expect(r, 200, None);
    assert_blob_gone(&run.kw, &old, at, "anthropic rotation").await;

    let old = db::key_row(&pool, &acc, "openai").await.expect("row").sealed;
    let r = http
        .put(&source_path(&acc, "openai"), t, &json!({"source": "own"}))
        .await;
    run.expect(r, 200, None);
    let r = http.delete(&key_path(&acc, "openai"), t).await;
    let at = Instant::now();
    run.expect(r, 204, None);
    assert_blob_gone(&run.kw, &old, at, "openai removal").await;

    let old1 = db::key_row(&pool, &acc, "google").await.expect("row").sealed;
    let r = http.put(&key_path(&acc, "google"), t, &json!({ "api_key": g2 })).await;
    run.expect(r, 200, None);
    let old2 = db::key_row(&pool, &acc, "google").await.expect("row").sealed;
    let r = http.delete(&key_path(&acc, "google"), t).await;
    let at = Instant::now();
    run.expect(r, 204, None);
    assert_blob_gone(&run.kw, &old1, at, "google rotation then removal (first blob)").await;
    assert_blob_gone(&run.kw, &old2, at, "google removal (second blob)").await;

    // Every error, each carrying a canary.
    let c = &mut run.canaries;
    let bad_chars = format!("{}\n{}", c.anthropic(), c.core());
    let bad_unicode = format!("{}é{}", c.openai(), c.core());
    let too_long = format!("sk-ant-api03-{}", (0..8).map(|_| c.core()).collect::<String>());
    let wrong_slot_a = c.anthropic();
    let wrong_slot_g = c.google();
    let admin_a = format!("sk-ant-admin01-{}", c.core());
    let admin_o = format!("sk-admin-{}", c.core());
    let oauth_access = format!("sk-ant-oat01-{}", c.core());
    let oauth_refresh = format!("sk-ant-ort01-{}", c.core());
    let auth_bad_chars = format!("AQ.Ab8RN6{}/{}", c.core(), c.core());
    let free_key = c.openai();
    let member_key = c.anthropic();
    let outsider_key = c.anthropic();
    let unknown_provider_key = c.anthropic();
    let oversize = format!("{}{}", c.anthropic(), random_string(70 * 1024, ALNUM));
    let invalid_json = c.anthropic();
    let invalid_json2 = c.anthropic();
    let field_name_key = c.anthropic();
    let extra_field_key = c.anthropic();
    let array_key = c.anthropic();
    let source_key = c.anthropic();
    let text_plain_key = c.anthropic();
    let bearer_key = c.anthropic();
    let x_api_key = c.anthropic();
    let valid_extra = key_for("anthropic");

    let kp = key_path(&acc, "anthropic");
    let cases: Vec<(RawRequest, u16, &str)> = vec![
        (
            put_json(&kp, t, json!({ "api_key": bad_chars })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&key_path(&acc, "openai"), t, json!({ "api_key": bad_unicode })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&kp, t, json!({ "api_key": too_long })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&key_path(&acc, "openai"), t, json!({ "api_key": wrong_slot_a })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&kp, t, json!({ "api_key": wrong_slot_g })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&kp, t, json!({ "api_key": admin_a })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&key_path(&acc, "openai"), t, json!({ "api_key": admin_o })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&kp, t, json!({ "api_key": oauth_access })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&kp, t, json!({ "api_key": oauth_refresh })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&key_path(&acc, "google"), t, json!({ "api_key": auth_bad_chars })),
            422,
            "invalid_key_format",
        ),
        (
            put_json(&key_path(&free, "openai"), t, json!({ "api_key": free_key })),
            403,
            "plan_required",
        ),
        (
            put_json(&kp, member.tok(), json!({ "api_key": member_key })),
            403,
            "forbidden",
        ),
        (
            put_json(&kp, outsider.tok(), json!({ "api_key": outsider_key })),
            404,
            "not_found",
        ),
        (
            put_json(
                &key_path(&acc, "mistral"),
                t,
                json!({ "api_key": unknown_provider_key }),
            ),
            404,
            "unknown_provider",
        ),
        (
            raw_put(&kp, t, format!("{{\"api_key\": \"{oversize}\"}}")),
            413,
            "payload_too_large",
        ),
        (
            raw_put(&kp, t, format!("{{\"api_key\": \"{invalid_json}\"")),
            400,
            "invalid_json",
        ),
        (
            raw_put(
                &kp,
                t,
                format!("{{\"api_key\": \"{invalid_json2}\" \"{invalid_json2}\"}}"),
            ),
            400,
            "invalid_json",
        ),
        (
            put_json(&kp, t, json!({ field_name_key.clone(): "x" })),
            422,
            "validation_error",
        ),
        (
            put_json(&kp, t, json!({ "api_key": valid_extra, "note": extra_field_key })),
            422,
            "validation_error",
        ),
        (
            put_json(&kp, t, json!({ "api_key": [array_key] })),
            422,
            "validation_error",
        ),
        (
            put_json(&source_path(&acc, "anthropic"), t, json!({ "source": source_key })),
            422,
            "validation_error",
        ),
        (
            RawRequest::new(Method::PUT, &kp)
                .token(&user.token)
                .content_type("text/plain")
                .body(text_plain_key.clone()),
            415,
            "unsupported_media_type",
        ),
        (
            RawRequest::new(Method::GET, &keys_path(&acc)).token(&bearer_key),
            401,
            "unauthorized",
        ),
        (
            RawRequest::new(Method::GET, &keys_path(&acc)).header("x-api-key", &x_api_key),
            401,
            "unauthorized",
        ),
    ];
    for (req, status, code) in cases {
        let r = if req.body.len() > 60 * 1024 {
            http.raw_tcp(req).await
        } else {
            http.raw(req).await
        };
        run.expect(r, status, Some(code));
    }

    // The saved key still opens, and the chain verifies (CLI output is searched too).
    let row = db::key_row(&pool, &acc, "anthropic").await.expect("row");
    assert_eq!(db::open_row(run.kw.data_dir(), &row).expect("open"), a2.as_bytes());
    drop(pool);
    assert_audit_ok(&run.kw, None);
    run.kw.cli(&["audit", "export", "--account", &acc]).assert_success();
    let r = http.get(&audit_path(&acc), t).await;
    run.expect(r, 200, None);
    let r = http.get(&keys_path(&acc), t).await;
    run.expect(r, 200, None);
    for path in ["/metrics", "/readyz", "/healthz", "/v1/me"] {
        let r = http.get(path, t).await;
        run.expect(r, 200, None);
    }

    // Stop gracefully so every log line is flushed, then search everything.
    let mut kw = run.kw;
    kw.stop();
    let mut leaks = search_everything(&kw, &run.canaries, &run.answers);
    // The search must have had something to search: trace logs were captured.
    assert!(
        kw.stderr().lines().count() >= 10,
        "expected trace logs on stderr, got:\n{}",
        kw.output()
    );
    // User tokens are credentials too: printed once by the CLI, never logged, stored hashed.
    let files = kw.data_files();
    for token in [&user.token, &member.token, &outsider.token] {
        if keyward_testkit::files::contains(&kw.output_bytes(), token.as_bytes()) {
            leaks.push(format!(
                "server output contains the bearer token of a user ({}…)",
                &token[..6]
            ));
        }
        for (path, bytes) in &files {
            if keyward_testkit::files::contains(bytes, token.as_bytes()) {
                leaks.push(format!(
                    "file {} contains a user's bearer token in clear",
                    path.display()
                ));
            }
        }
    }
    assert!(
        leaks.is_empty() && run.wrong.is_empty(),
        "{} leaks:\n{}\n{} unexpected answers:\n{}",
        leaks.len(),
        leaks.join("\n"),
        run.wrong.len(),
        run.wrong.join("\n")
    );
}

/// Every form of every canary found in the HTTP answers, the data dir files, the server's
/// output and the CLI's output.
fn search_everything(kw: &Keyward, canaries: &Canaries, answers: &[Resp]) -> Vec<String> {
    let mut leaks = Vec::new();
    for r in answers {
        for f in canaries.found_in(r.text.as_bytes()) {
            leaks.push(format!("HTTP answer to {} {}: {f}", r.method, r.path));
        }
    }
    for (path, bytes) in kw.data_files() {
        for f in canaries.found_in(&bytes) {
            leaks.push(format!("file {}: {f}", path.display()));
        }
    }
    for f in canaries.found_in(&kw.output_bytes()) {
        leaks.push(format!("server output: {f}"));
    }
    for f in canaries.found_in(&kw.cli_output_bytes()) {
        leaks.push(format!("CLI output: {f}"));
    }
    leaks
}

fn put_json(path: &str, token: Option<&str>, body: serde_json::Value) -> RawRequest {
    let mut r = RawRequest::new(Method::PUT, path).json_bytes(serde_json::to_vec(&body).expect("json"));
    if let Some(t) = token {
        r = r.token(t);
    }
    r
}

fn raw_put(path: &str, token: Option<&str>, body: String) -> RawRequest {
    let mut r = RawRequest::new(Method::PUT, path).json_bytes(body);
    if let Some(t) = token {
        r = r.token(t);
    }
    r
}

#[tokio::test]
async fn canary_keys_leave_no_trace_text_logs() {
    canary_scenario(Options::default().log("trace")).await;
}

#[tokio::test]
async fn canary_keys_leave_no_trace_json_logs() {
    canary_scenario(Options::default().log("trace").env("KEYWARD_LOG_FORMAT", "json")).await;
}

#[tokio::test]
async fn a_provider_quoting_the_key_back_is_not_repeated() {
    // The fake providers answer every call with these keys with their invalid-key error,
    // quoting the key they got.
    let fake = FakeProviders::start().expect("start fakes");
    let kw = crate::ai_support::start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "echo@example.com");
    let t = user.tok();
    let http = kw.http().clone();
    let mut canaries = Canaries::default();
    let keys = [
        ("anthropic", canaries.anthropic(), 401),
        ("openai", canaries.openai(), 401),
        ("google", canaries.google(), 400),
    ];
    let mut answers = Vec::new();
    let mut wrong = Vec::new();
    for (_, k, _) in &keys {
        fake.set_key(None, k, Behaviour::EchoKey);
    }
    for (p, k, provider_status) in &keys {
        save_key(&kw, &user.token, &acc, p, k).await;
        // Test key: 200, ok false, diagnosed, the provider's message without the key.
        let r = http.post(&format!("{}/test", key_path(&acc, p)), t, &json!({})).await;
        let v = r.json.clone().unwrap_or_default();
        if r.status != 200
            || v["ok"] != false
            || v["status"] != "invalid_key"
            || v["provider_status"] != *provider_status
            || v["message"].as_str().is_none_or(|m| m.trim().is_empty())
        {
            wrong.push(format!(
                "test {p}: expected 200 ok=false invalid_key {provider_status} with a message, got {r}"
            ));
        }
        // Positive control: the provider did quote the key (the worker masked it with `*`).
        if !v["message"].as_str().is_some_and(|m| m.contains(&"*".repeat(k.len()))) {
            wrong.push(format!(
                "test {p}: the provider's message should quote the key, masked: {r}"
            ));
        }
        answers.push(r);
        let r = http.get(&keys_path(&acc), t).await;
        answers.push(r);
        // An own-key AI call fails with the provider's error, without the key.
        set_source(&kw, &user.token, &acc, p, "own").await;
        let body = json!({"provider": p, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        let r = http.post(&format!("/v1/accounts/{acc}/ai/messages"), t, &body).await;
        if r.status != 502
            || r.error_code() != Some("provider_error")
            || r.json()["error"]["provider_status"] != *provider_status
        {
            wrong.push(format!(
                "ai call {p}: expected 502 provider_error with provider_status {provider_status}, got {r}"
            ));
        }
        answers.push(r);
    }
    let list = list_keys(&kw, &user.token, &acc).await;
    for (p, _, _) in &keys {
        let last = &list[*p]["key"]["last_test"];
        if last["ok"] != false || !last["message"].is_string() {
            wrong.push(format!("{p}: last_test should keep the failed result: {last}"));
        }
    }
    let r = http.get(&audit_path(&acc), t).await;
    answers.push(r);

    // Where the key travelled: only in its provider's header, never in a URL; probes ask
    // for one output token.
    let requests = fake.requests();
    for (p, k, _) in &keys {
        let (path_part, header, value) = match *p {
            "anthropic" => ("/v1/messages", "x-api-key", k.clone()),
            "openai" => ("/chat/completions", "authorization", format!("Bearer {k}")),
            _ => ("generateContent", "x-goog-api-key", k.clone()),
        };
        let mine: Vec<_> = requests.iter().filter(|r| r.path.contains(path_part)).collect();
        if mine.len() < 2 {
            wrong.push(format!(
                "{p}: expected a probe and an AI call at the provider, got {} requests",
                mine.len()
            ));
            continue;
        }
        for r in &mine {
            let target = match &r.query {
                Some(q) => format!("{}?{q}", r.path),
                None => r.path.clone(),
            };
            if r.header(header) != Some(value.as_str()) {
                wrong.push(format!(
                    "{p}: the key did not arrive in {header} ({} {target})",
                    r.method
                ));
            }
            if !find_forms(target.as_bytes(), k.as_bytes()).is_empty() {
                wrong.push(format!("{p}: the key is in the URL {target}"));
            }
        }
        let probe = mine[0].body_json().unwrap_or_default();
        let one = match *p {
            "anthropic" => &probe["max_tokens"],
            "openai" => &probe["max_completion_tokens"],
            _ => &probe["generationConfig"]["maxOutputTokens"],
        };
        if *one != 1 {
            wrong.push(format!("{p}: the probe should ask for one output token: {probe}"));
        }
    }

    let mut kw = kw;
    kw.stop();
    let leaks = search_everything(&kw, &canaries, &answers);
    assert!(
        leaks.is_empty() && wrong.is_empty(),
        "{} leaks:\n{}\n{} unexpected answers:\n{}",
        leaks.len(),
        leaks.join("\n"),
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test]
async fn the_cli_takes_keys_on_stdin_only_and_never_prints_one() {
    let kw = start();
    let mut canaries = Canaries::default();
    let shared = canaries.openai();
    // From standard input: accepted, answered with last4 only.
    let out = kw.cli_with_stdin(
        &["admin", "set-shared-key", "--provider", "openai"],
        Some(format!("{shared}\n").as_bytes()),
    );
    out.assert_success();
    assert_eq!(out.json()["last4"], last4(&shared), "{out}");
    let mut runs = vec![("set-shared-key with the key on stdin", out)];
    // On the command line: refused, and not repeated.
    let on_argv = canaries.openai();
    let out = kw.cli(&["admin", "set-shared-key", "--provider", "openai", &on_argv]);
    assert!(!out.success(), "a key on the command line must be refused: {out}");
    runs.push(("set-shared-key with the key as a positional argument", out));
    let as_flag = canaries.anthropic();
    let out2 = kw.cli(&["admin", "set-shared-key", "--provider", "anthropic", "--key", &as_flag]);
    assert!(!out2.success(), "a key on the command line must be refused: {out2}");
    runs.push(("set-shared-key --key <key>", out2));
    // Bad keys on stdin: refused with the format rule, not repeated.
    let wrong_slot = canaries.anthropic();
    let out3 = kw.cli_with_stdin(
        &["admin", "set-shared-key", "--provider", "openai"],
        Some(wrong_slot.as_bytes()),
    );
    assert!(
        !out3.success() && out3.stderr.contains("save it under Anthropic"),
        "{out3}"
    );
    runs.push(("set-shared-key with a wrong-slot key on stdin", out3));
    let admin = format!("sk-admin-{}", canaries.core());
    let out4 = kw.cli_with_stdin(
        &["admin", "set-shared-key", "--provider", "openai"],
        Some(admin.as_bytes()),
    );
    assert!(!out4.success() && out4.stderr.contains("admin key"), "{out4}");
    runs.push(("set-shared-key with an admin key on stdin", out4));
    let mut leaks = Vec::new();
    for (what, out) in &runs {
        for f in canaries.found_in(format!("{}{}", out.stdout, out.stderr).as_bytes()) {
            leaks.push(format!("`keyward admin {what}` printed {f}"));
        }
    }

    let mut kw = kw;
    kw.stop();
    leaks.extend(
        search_everything(&kw, &canaries, &[])
            .into_iter()
            .filter(|l| !l.starts_with("CLI output")),
    );
    assert!(leaks.is_empty(), "{} leaks:\n{}", leaks.len(), leaks.join("\n"));
}

/// The key saves of the gateway-memory test, and the other requests around them.
const SAVES: usize = 20;
const OTHER_REQUESTS: usize = 1_000;
/// Requests run in this many concurrent lanes, so several kept-alive connections are in use.
const LANES: usize = 4;

/// One of the gateway-memory test's background requests: reads, AI calls and key tests,
/// and bad requests. Returns what it was and whether the answer was the expected one.
async fn other_request(kw: &Keyward, web: &crate::web::Web<'_>, t: &str, acc: &str, n: usize) -> Option<String> {
    let http = kw.http();
    let p = PROVIDERS[n % PROVIDERS.len()];
    let (what, r, want) = match n % 16 {
        0 => ("list keys", http.get(&keys_path(acc), Some(t)).await, 200),
        1 => ("me", http.get("/v1/me", Some(t)).await, 200),
        2 => (
            "usage",
            http.get(&crate::ai_support::usage_path(acc), Some(t)).await,
            200,
        ),
        3 => ("audit", http.get(&audit_path(acc), Some(t)).await, 200),
        4 => (
            "settings page",
            web.get(&format!("{}?account={acc}", crate::web::SETTINGS)).await,
            200,
        ),
        5 => ("readyz", http.get("/readyz", None).await, 200),
        6 | 7 => {
            let body = crate::ai_support::chat_body(p, n.is_multiple_of(2), 20);
            ("AI call", crate::ai_support::ai_call(kw, t, acc, &body).await, 200)
        }
        // At most 10 key tests a minute per provider: past that, a clear 429.
        8 => {
            let r = crate::ai_support::key_test(kw, t, acc, p).await;
            let want = if r.status == 429 { 429 } else { 200 };
            ("key test", r, want)
        }
        9 => (
            "invalid JSON",
            http.raw(
                RawRequest::new(Method::PUT, &key_path(acc, p))
                    .token(t)
                    .json_bytes("{\"api_key\": "),
            )
            .await,
            400,
        ),
        10 => (
            "bad token",
            http.get(&keys_path(acc), Some("kw_not_a_token")).await,
            401,
        ),
        11 => (
            "unknown provider",
            http.put(&key_path(acc, "mistral"), Some(t), &json!({"api_key": "x"}))
                .await,
            404,
        ),
        12 => (
            "text/plain",
            http.raw(
                RawRequest::new(Method::PUT, &key_path(acc, p))
                    .token(t)
                    .content_type("text/plain")
                    .body("api_key"),
            )
            .await,
            415,
        ),
        13 => (
            "bad source",
            http.put(&source_path(acc, p), Some(t), &json!({"source": "nobody"}))
                .await,
            422,
        ),
        14 => (
            "bad key format",
            http.put(&key_path(acc, p), Some(t), &json!({"api_key": "sk-short"}))
                .await,
            422,
        ),
        _ => ("no such route", http.get("/v1/no-such-route", Some(t)).await, 404),
    };
    (r.status != want).then(|| format!("{what}: expected {want}, got {r}"))
}

/// Whether an answer closes its connection (so the gateway frees the buffer the request was
/// read into).
fn closes(r: &Resp) -> bool {
    r.headers.get("connection").is_some_and(|v| v.as_bytes() == b"close")
}

/// Saves `key` for `provider` (the answer must close its connection), through the API or (`csrf` given: the session's token) the
/// settings page's form.
async fn save_one(
    kw: &Keyward,
    web: &crate::web::Web<'_>,
    t: &str,
    acc: &str,
    provider: &str,
    key: &str,
    csrf: Option<&str>,
) -> Option<String> {
    if let Some(csrf) = csrf {
        // The outcome is a flash on the session, which the other lanes' page reads may take:
        // the audit events, counted at the end, say whether each save landed.
        let path = format!("{}/{provider}/save", crate::web::SETTINGS);
        let r = web
            .post(&path, &[("csrf", csrf), ("account", acc), ("api_key", key)])
            .await;
        (r.status != 303 || !closes(&r)).then(|| format!("page save of {provider}: {r:?}"))
    } else {
        let r = kw
            .http()
            .put(&key_path(acc, provider), Some(t), &json!({ "api_key": key }))
            .await;
        (r.status != 200 || !closes(&r)).then(|| format!("API save of {provider}: {r:?}"))
    }
}

/// Issue 24 (8): a key pasted into the gateway, through the API or the settings page, is not
/// left in the gateway's memory. 20 saves of distinct keys (API and page alternating, the
/// three providers in turn): half of them among 1,000 other requests (reads, AI calls and key
/// tests, bad requests) in four concurrent lanes, the other half at the end; one second later the gateway's whole writable memory
/// (heap, stacks, anonymous and writable mappings, read from `/proc/<pid>/mem`) is searched
/// for every key: whole, any piece of 24 characters of it, hex and base64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pasted_keys_are_not_left_in_the_gateways_memory() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = crate::ai_support::start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "memory@example.com");
    let t = user.token.clone();
    let web = crate::web::login_with_token(&kw, &user.token).await;
    let csrf = web.csrf().await;
    let mut canaries = Canaries::default();
    // The keys, made up front: save i is of provider i % 3, by the page when i is odd.
    let keys: Vec<(&str, String, bool)> = (0..SAVES)
        .map(|i| {
            let p = PROVIDERS[i % PROVIDERS.len()];
            let k = match p {
                "anthropic" => canaries.anthropic(),
                "openai" => canaries.openai(),
                _ => canaries.google(),
            };
            fake.set_key(crate::ai_support::provider(p), &k, Behaviour::Ok);
            (p, k, i % 2 == 1)
        })
        .collect();
    // A first key of each provider, then own keys pay for the calls.
    let mut wrong = Vec::new();
    for (p, k, by_page) in keys.iter().take(PROVIDERS.len()) {
        wrong.extend(save_one(&kw, &web, &t, &acc, p, k, by_page.then_some(csrf.as_str())).await);
        set_source(&kw, &t, &acc, p, "own").await;
    }
    // Half the saves among the 1,000 other requests, in concurrent lanes; the other half
    // last, one after another: the hardest case, as no later request reuses the buffers
    // those saves freed.
    let per_lane = OTHER_REQUESTS / LANES;
    let (during, last) = keys.split_at(SAVES / 2);
    let during: Vec<&(&str, String, bool)> = during.iter().skip(PROVIDERS.len()).collect();
    let lanes = (0..LANES).map(|lane| {
        let (kw, web, t, acc, csrf) = (&kw, &web, &t, &acc, &csrf);
        let mine: Vec<&(&str, String, bool)> = during.iter().copied().skip(lane).step_by(LANES).collect();
        async move {
            let mut wrong = Vec::new();
            let run = per_lane / (mine.len() + 1);
            let mut saves = mine.into_iter();
            for n in 0..per_lane {
                wrong.extend(other_request(kw, web, t, acc, lane * per_lane + n).await);
                if (n + 1).is_multiple_of(run) {
                    if let Some((p, k, by_page)) = saves.next() {
                        wrong.extend(save_one(kw, web, t, acc, p, k, by_page.then_some(csrf.as_str())).await);
                    }
                }
            }
            wrong
        }
    });
    for w in futures_util::future::join_all(lanes).await {
        wrong.extend(w);
    }
    for (p, k, by_page) in last {
        wrong.extend(save_one(&kw, &web, &t, &acc, p, k, by_page.then_some(csrf.as_str())).await);
    }
    assert!(
        wrong.is_empty(),
        "{} unexpected answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = kw.pid().expect("keyward is running");
    let (regions, unread) = crate::ai_support::read_private_memory(pid);
    let total: usize = regions.iter().map(|r| r.bytes.len()).sum();
    // Positive control: the gateway keeps the providers' base URL (its configuration) for as
    // long as it runs; a search that cannot see it sees nothing.
    let marker = fake.base_url();
    let seen = regions
        .iter()
        .any(|r| !crate::ai_support::find_all(&r.bytes, marker.as_bytes()).is_empty());
    assert!(
        seen,
        "the memory search cannot see the provider URL {marker} ({total} bytes read; unreadable: {unread:?})"
    );
    let secrets: Vec<&[u8]> = keys.iter().map(|(_, k, _)| k.as_bytes()).collect();
    // Any 24-character piece of a key (11 or more random characters in it) counts as a copy.
    let search = MultiSearch::new(&secrets, 24);
    let mut hits: std::collections::BTreeMap<usize, Vec<String>> = std::collections::BTreeMap::new();
    for r in &regions {
        for f in search.find(&r.bytes) {
            hits.entry(f.secret).or_default().push(format!(
                "{} at {:#x} in `{}`",
                f.form,
                r.start + f.offset as u64,
                r.line
            ));
        }
    }
    eprintln!(
        "gateway memory canary: {} of {SAVES} pasted keys found ({} MB of memory searched, {} mappings unreadable)",
        hits.len(),
        total / (1024 * 1024),
        unread.len()
    );
    let report: Vec<String> = hits
        .iter()
        .map(|(i, where_)| {
            let (p, _, by_page) = &keys[*i];
            let how = if *by_page { "page" } else { "API" };
            format!(
                "save {i} ({p}, by the {how}): {} matches, e.g. {}",
                where_.len(),
                where_[..where_.len().min(3)].join("; ")
            )
        })
        .collect();
    // Every save landed (one audit event each): asked only now, so that no request after
    // the last saves reuses what they freed before the search.
    let saved = key_events(&kw, &t, &acc)
        .await
        .iter()
        .filter(|e| matches!(e["action"].as_str(), Some("key.saved" | "key.rotated")))
        .count();
    assert_eq!(saved, SAVES, "audited key saves");
    assert!(
        hits.is_empty(),
        "{} of {SAVES} pasted keys are in the gateway's memory:\n{}",
        hits.len(),
        report.join("\n")
    );
}

/// Issue 24 (8): the gateway cannot be core-dumped (`RLIMIT_CORE` 0) or read by another
/// process of its own user without `CAP_SYS_PTRACE` (`PR_SET_DUMPABLE` 0): opening
/// `/proc/<pid>/mem` makes the same access check as `ptrace(PTRACE_ATTACH)`. The probe runs
/// as the gateway's uid without any capability, which is what an ordinary process of that
/// user is: as the gateway user when the tests run with two OS users; run as root in one,
/// the gateway, the probe and a control are all started without capabilities (`setpriv`).
/// The control, an ordinary dumpable process of the same uid, shows the probe can read what
/// is not guarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_cannot_be_core_dumped_or_attached_to() {
    let root = keyward_testkit::users::is_root();
    let two_users = keyward_testkit::users::two_users_mode().is_some();
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let setpriv = match (root, setpriv) {
        (false, _) => None,
        (true, Some(s)) => Some(s),
        (true, None) => {
            keyward_testenv::skip("setpriv: not installed (apt-get install -y util-linux)");
            return;
        }
    };
    let capless = ["--bounding-set=-all", "--inh-caps=-all", "--"];
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = match setpriv {
        // Root in one: the gateway is started through a wrapper that drops every capability.
        Some(setpriv) if !two_users => {
            let wrapper = dir.path().join("keyward-capless");
            let script = format!(
                "#!/bin/sh\nexec {setpriv} {} {} \"$@\"\n",
                capless.join(" "),
                bin().display()
            );
            std::fs::write(&wrapper, script).expect("write wrapper");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
            wrapper
        }
        _ => bin().to_owned(),
    };
    let kw = Keyward::start(&bin, Options::default().log("info"));
    let pid = kw.pid().expect("keyward is running");
    let caps = crate::ai_support::proc_status_field(pid, "CapEff").unwrap_or_default();
    assert_eq!(
        caps, "0000000000000000",
        "the gateway should run without capabilities here"
    );
    // How to run a process as the gateway's uid, without capabilities.
    let uid = keyward_testkit::users::ids(pid, "Uid:");
    let gid = keyward_testkit::users::ids(pid, "Gid:");
    let as_gateway: Vec<String> = match setpriv {
        None => Vec::new(),
        Some(setpriv) if two_users => vec![
            setpriv.to_owned(),
            format!("--reuid={}", uid[0]),
            format!("--regid={}", gid[0]),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ],
        Some(setpriv) => std::iter::once(setpriv).chain(capless).map(str::to_owned).collect(),
    };
    let command = |args: &[&str]| {
        let mut all: Vec<String> = as_gateway.clone();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = std::process::Command::new(&all[0]);
        cmd.args(&all[1..]);
        cmd
    };

    // No core file: the soft and hard limits are 0.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let core: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max core file size"))
        .map(|rest| rest.split_whitespace().take(2).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    if core != ["0", "0"] {
        problems.push(format!("core file size limit (soft, hard) is {core:?}, not 0 0"));
    }

    // Not readable by a process of the same uid without CAP_SYS_PTRACE.
    let mut control = command(&["sleep", "60"]).spawn().expect("start the control process");
    // Probed only once it is `sleep`: before its exec it is still setpriv, with the
    // capabilities the probe lacks, and the kernel would refuse the probe for that alone.
    let exec_deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::ai_support::proc_status_field(control.id(), "Name").as_deref() != Some("sleep") {
        assert!(
            std::time::Instant::now() < exec_deadline,
            "the control process never became sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let probe = |target: u32| {
        let out = command(&[
            "dd",
            &format!("if=/proc/{target}/mem"),
            "of=/dev/null",
            "count=0",
            "status=none",
        ])
        .output()
        .expect("run the probe");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    let (control_read, control_err) = probe(control.id());
    let (gateway_read, gateway_err) = probe(pid);
    let _ = control.kill();
    let _ = control.wait();
    assert!(
        control_read,
        "the probe (uid {uid:?}) cannot open the memory of an ordinary process of its own uid ({control_err}): it would prove nothing"
    );
    if gateway_read {
        problems.push(format!(
            "a process of the gateway's uid {uid:?} without CAP_SYS_PTRACE opened /proc/{pid}/mem (the gateway is dumpable)"
        ));
    } else if !gateway_err.contains("Permission denied") {
        problems.push(format!(
            "the probe failed for another reason than the access check: {gateway_err}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
