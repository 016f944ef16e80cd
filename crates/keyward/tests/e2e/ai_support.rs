//! Helpers for the tests that make AI calls through `keyward-fakes` (fake Anthropic, OpenAI
//! and Google on loopback): starting keyward against a fake, the AI and "Test key" routes,
//! server-sent events, where a key travelled, worker processes and their memory.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use keyward_core::{Catalogue, Provider};
use keyward_fakes::{FakeProviders, RecordedRequest};
use keyward_testkit::canary::find_forms;
use keyward_testkit::{Keyward, Options, Resp};
use serde_json::{json, Value};

use crate::common::*;

/// The user message every call sends: five words (the fakes count words as tokens).
pub const PROMPT: &str = "Say hello to the test";
pub const PROMPT_WORDS: u64 = 5;

pub fn provider(p: &str) -> Provider {
    p.parse().unwrap_or_else(|_| panic!("not a provider: {p}"))
}

/// What the fakes answer for `p`: "Hello from fake {p}." (four words).
pub fn fake_reply(p: &str) -> String {
    format!("Hello from fake {p}.")
}

/// Options pointing every provider at `fake`, plus `extra` environment.
pub fn fake_options(fake: &FakeProviders, extra: &[(&str, &str)]) -> Options {
    let url = fake.base_url();
    let mut o = Options::default()
        .env("KEYWARD_ANTHROPIC_BASE_URL", &url)
        .env("KEYWARD_OPENAI_BASE_URL", &url)
        .env("KEYWARD_GOOGLE_BASE_URL", &url);
    for (k, v) in extra {
        o = o.env(k, v);
    }
    o
}

/// A keyward whose providers are `fake`.
pub fn start_on_fake(fake: &FakeProviders, extra: &[(&str, &str)]) -> Keyward {
    start_with(fake_options(fake, extra))
}

/// Saves an own key for every provider in `account` (registered at `fake` as working) and
/// switches each provider to it: the keys, by provider. (Used by the KEK backends' tests.)
#[cfg(any(feature = "pkcs11", feature = "awskms"))]
pub async fn own_keys_everywhere(
    fake: &FakeProviders,
    kw: &Keyward,
    token: &str,
    account: &str,
) -> Vec<(&'static str, String)> {
    let mut keys = Vec::new();
    for p in PROVIDERS {
        let k = key_for(p);
        fake.set_key(provider(p), &k, keyward_fakes::Behaviour::Ok);
        save_key(kw, token, account, p, &k).await;
        set_source(kw, token, account, p, "own").await;
        keys.push((p, k));
    }
    keys
}

pub fn ai_path(account: &str) -> String {
    format!("/v1/accounts/{account}/ai/messages")
}

pub fn test_path(account: &str, provider: &str) -> String {
    format!("{}/test", key_path(account, provider))
}

pub fn usage_path(account: &str) -> String {
    format!("/v1/accounts/{account}/usage")
}

/// An `ai/messages` body with [`PROMPT`].
pub fn chat_body(provider: &str, stream: bool, max_tokens: u32) -> Value {
    json!({
        "provider": provider,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

pub async fn ai_call(kw: &Keyward, token: &str, account: &str, body: &Value) -> Resp {
    kw.http().post(&ai_path(account), Some(token), body).await
}

pub async fn key_test(kw: &Keyward, token: &str, account: &str, provider: &str) -> Resp {
    kw.http()
        .post(&test_path(account, provider), Some(token), &json!({}))
        .await
}

/// The catalogue compiled into keyward (and into the fakes).
pub fn catalogue() -> Catalogue {
    Catalogue::builtin()
}

/// The model keyward uses when a call names none: the provider's first active model.
pub fn default_model(p: &str) -> String {
    catalogue()
        .default_model(provider(p))
        .map(|m| m.id.clone())
        .unwrap_or_else(|| panic!("no model for {p}"))
}

/// The model "Test key" probes with.
pub fn probe_model(p: &str) -> String {
    catalogue()
        .probe_model(provider(p))
        .map(|m| m.id.clone())
        .unwrap_or_else(|| panic!("no probe model for {p}"))
}

/// Credits a shared call reserves (`credits_for(input bytes, max_tokens)`, at least 1) and
/// is charged (`min(credits_for(usage), reserved)`).
pub fn expected_credits(p: &str, model: &str, input_bytes: u64, max_tokens: u64, input: u64, output: u64) -> u64 {
    let cat = catalogue();
    let m = cat
        .model(provider(p), model)
        .unwrap_or_else(|| panic!("{model} is not catalogued for {p}"));
    let reserved = m.credits_for(input_bytes, max_tokens).max(1);
    m.credits_for(input, output).min(reserved)
}

/// Sets the shared-pool key of `provider` through the CLI (the key on standard input).
pub fn set_shared_key(kw: &Keyward, provider: &str, key: &str) {
    let out = kw.cli_with_stdin(
        &["admin", "set-shared-key", "--provider", provider],
        Some(format!("{key}\n").as_bytes()),
    );
    out.assert_success();
    assert_eq!(out.json()["last4"], last4(key), "{out}");
}

/// `admin set-plan … --shared-credit-limit N`.
pub fn set_limit(kw: &Keyward, account: &str, limit: i64) {
    let out = kw.cli(&[
        "admin",
        "set-plan",
        "--account",
        account,
        "--plan",
        "pro",
        "--shared-credit-limit",
        &limit.to_string(),
    ]);
    out.assert_success();
    assert_eq!(out.json()["shared_credit_limit"], limit, "{out}");
}

/// One server-sent event: its name and its data as JSON (`Value::Null` when not JSON).
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub raw: String,
}

/// The events of a `text/event-stream` body.
pub fn parse_sse(text: &str) -> Vec<Event> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.trim_start());
                }
            }
            Event {
                name,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
                raw: block.to_owned(),
            }
        })
        .collect()
}

/// Asserts `r` is a 200 event stream; returns its events.
#[track_caller]
pub fn sse_of(r: &Resp) -> Vec<Event> {
    assert_eq!(r.status, 200, "a streamed call should answer 200: {r}");
    assert!(
        r.content_type().starts_with("text/event-stream"),
        "content type {:?}: {r}",
        r.content_type()
    );
    parse_sse(&r.text)
}

/// For a failed streamed call: the error as (code, message, provider_status), whether it came
/// as a JSON error answer (status 502/503…) or as the `error` event that ends a started
/// stream. Panics (naming the problem) on a stream that does not end with exactly one
/// `error` event, or that also has a `done`.
#[track_caller]
pub fn stream_failure(r: &Resp) -> (u16, String, String, Value) {
    if r.status != 200 {
        let e = &r.json()["error"];
        return (
            r.status,
            e["code"].as_str().unwrap_or_default().to_owned(),
            e["message"].as_str().unwrap_or_default().to_owned(),
            e["provider_status"].clone(),
        );
    }
    let events = sse_of(r);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert!(
        !names.contains(&"done"),
        "a failed stream must not send `done`: events {names:?}: {r}"
    );
    let last = events
        .last()
        .unwrap_or_else(|| panic!("the stream ended with no event at all: {r}"));
    assert_eq!(
        last.name, "error",
        "the stream must end with an `error` event: {names:?}: {r}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "error").count(),
        1,
        "exactly one `error` event: {names:?}: {r}"
    );
    for e in &events[..events.len() - 1] {
        assert_eq!(e.name, "delta", "only `delta` events before the end: {names:?}: {r}");
    }
    (
        200,
        last.data["code"].as_str().unwrap_or_default().to_owned(),
        last.data["message"].as_str().unwrap_or_default().to_owned(),
        last.data["provider_status"].clone(),
    )
}

/// The header that carries the key at `provider`, and the prefix of its value.
pub fn key_header(provider: &str) -> (&'static str, &'static str) {
    match provider {
        "anthropic" => ("x-api-key", ""),
        "openai" => ("authorization", "Bearer "),
        "google" => ("x-goog-api-key", ""),
        other => panic!("no such provider {other}"),
    }
}

/// Everything wrong with where `key` travelled in `req`: it must be in its provider's header
/// (with `anthropic-version` next to it for Anthropic) and in no other header, not in the
/// path or query and not in the body, in any encoding.
pub fn key_placement_problems(provider: &str, req: &RecordedRequest, key: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let (name, prefix) = key_header(provider);
    let expected = format!("{prefix}{key}");
    let values: Vec<&str> = req
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect();
    if values != [expected.as_str()] {
        problems.push(format!(
            "{provider}: expected exactly one `{name}: {prefix}<key>` header, got {} such header(s){}",
            values.len(),
            if values.is_empty() { "" } else { " with another value" }
        ));
    }
    if provider == "anthropic" && req.header("anthropic-version").is_none_or(|v| v.trim().is_empty()) {
        problems.push("anthropic: no anthropic-version header".to_owned());
    }
    for (k, v) in &req.headers {
        if k.eq_ignore_ascii_case(name) {
            continue;
        }
        let found = find_forms(v.as_bytes(), key.as_bytes());
        if !found.is_empty() {
            problems.push(format!("{provider}: the key ({found:?}) is also in header {k}"));
        }
    }
    let target = format!("{}?{}", req.path, req.query.clone().unwrap_or_default());
    let found = find_forms(target.as_bytes(), key.as_bytes());
    if !found.is_empty() {
        problems.push(format!("{provider}: the key ({found:?}) is in the URL {target}"));
    }
    let found = find_forms(&req.body, key.as_bytes());
    if !found.is_empty() {
        problems.push(format!("{provider}: the key ({found:?}) is in the request body"));
    }
    problems
}

/// The path a chat call for `provider` goes to (Google: the model is in the path).
pub fn chat_path_ok(provider: &str, path: &str, model: &str, stream: bool) -> bool {
    match provider {
        "anthropic" => path == "/v1/messages",
        "openai" => path == "/v1/chat/completions",
        _ => {
            let method = if stream {
                "streamGenerateContent"
            } else {
                "generateContent"
            };
            path == format!("/v1beta/models/{model}:{method}")
        }
    }
}

/// The requested output-token limit in a provider request body.
pub fn requested_max_tokens(provider: &str, body: &Value) -> Value {
    match provider {
        "anthropic" => body["max_tokens"].clone(),
        "openai" => {
            if body.get("max_completion_tokens").is_some() {
                body["max_completion_tokens"].clone()
            } else {
                body["max_tokens"].clone()
            }
        }
        _ => body["generationConfig"]["maxOutputTokens"].clone(),
    }
}

/// The model named in a provider request (Google: from the path).
pub fn requested_model(provider: &str, req: &RecordedRequest) -> String {
    match provider {
        "google" => req
            .path
            .strip_prefix("/v1beta/models/")
            .and_then(|r| r.split(':').next())
            .unwrap_or_default()
            .to_owned(),
        _ => req
            .body_json()
            .and_then(|b| b["model"].as_str().map(str::to_owned))
            .unwrap_or_default(),
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// Waits (up to 5 s) until connecting to `addr` is refused.
pub async fn wait_refused(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts 5 s after the fake stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The children of process `pid` (every thread's `children` file).
/// (Two OS users: the workers are the children of the worker supervisor, itself a child.)
pub fn children_of(pid: u32) -> Vec<u32> {
    keyward_testkit::users::workers_of(pid)
}

/// `/readyz` → `workers_ready`.
pub async fn workers_ready(kw: &Keyward) -> u64 {
    let r = kw.http().get("/readyz", None).await;
    r.json.as_ref().and_then(|v| v["workers_ready"].as_u64()).unwrap_or(0)
}

/// Waits (up to `max`) until `/readyz` reports `n` workers ready and the server has `n`
/// live worker children that are not in `not`; returns their pids.
pub async fn wait_workers(kw: &Keyward, n: usize, not: &[u32], max: Duration) -> Vec<u32> {
    let pid = kw.pid().expect("keyward is running");
    let deadline = Instant::now() + max;
    loop {
        let kids: Vec<u32> = children_of(pid)
            .into_iter()
            .filter(|c| !not.contains(c) && is_alive(*c))
            .collect();
        let ready = workers_ready(kw).await;
        if kids.len() == n && ready == n as u64 {
            return kids;
        }
        assert!(
            Instant::now() < deadline,
            "after {max:?}: /readyz says {ready} workers ready, live new children {kids:?} (wanted {n}, not {not:?})\n{}",
            tail(&kw.output(), 40)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        }
        Err(_) => false,
    }
}

/// SIGKILL to one process we know by pid.
pub fn sigkill(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -KILL {pid} failed");
}

/// The value of a `Name:\tvalue` line of `/proc/<pid>/status`.
pub fn proc_status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_owned())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One readable private mapping of a process, read from `/proc/<pid>/mem`.
#[derive(Debug)]
pub struct Region {
    pub start: u64,
    pub line: String,
    pub bytes: Vec<u8>,
}

/// The memory of `pid` that can hold data it made at run time: every readable private
/// mapping that is anonymous (heap, stacks, anonymous maps) or writable. Read-only mappings
/// of files (program text, read-only data) only hold the file's bytes and are skipped.
/// Returns the regions read and the mappings that could not be read (with why).
pub fn read_private_memory(pid: u32) -> (Vec<Region>, Vec<String>) {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_else(|e| panic!("read /proc/{pid}/maps: {e}"));
    let mut mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    let mut regions = Vec::new();
    let mut unread = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms)) = (fields.first(), fields.get(1)) else {
            continue;
        };
        let path = fields.get(5).copied().unwrap_or("");
        let p = perms.as_bytes();
        if p.first() != Some(&b'r') || p.get(3) != Some(&b'p') {
            continue;
        }
        if matches!(path, "[vvar]" | "[vsyscall]" | "[vvar_vclock]") {
            continue;
        }
        let anonymous = path.is_empty() || path.starts_with('[');
        let writable = p.get(1) == Some(&b'w');
        if !anonymous && !writable {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut bytes = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        let read = mem
            .seek(SeekFrom::Start(start))
            .and_then(|_| mem.read_exact(&mut bytes));
        match read {
            Ok(()) => regions.push(Region {
                start,
                line: line.to_owned(),
                bytes,
            }),
            Err(e) => unread.push(format!("{line}: {e}")),
        }
    }
    (regions, unread)
}

/// Offsets of `needle` in `hay` (fast enough unoptimised: scans for the first byte).
pub fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let Some(&first) = needle.first() else { return out };
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..].iter().position(|&b| b == first) {
            None => break,
            Some(p) => {
                let s = i + p;
                if hay.get(s..s + needle.len()) == Some(needle) {
                    out.push(s);
                }
                i = s + 1;
            }
        }
    }
    out
}
