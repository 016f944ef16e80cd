//! `keyward-bench soak`: load shaped like real traffic, with faults injected while it runs.
//!
//! N clients (default 2,000), each a loop "start a streaming call, read it to its end, start
//! another", for S seconds (default 60) against the release `keyward serve` (SQLite, or a
//! fresh database on `--postgres URL`). Every call streams from `keyward-fakes` for about
//! 2 s (`long_stream`: the first text at once, the rest spread over the stream). The calls
//! are mixed: two accounts (one on its own keys, one on the metered shared pool), the three
//! providers, and both doors (`ai/messages` and the native pass-through: Anthropic
//! `/v1/messages`, OpenAI `/v1/chat/completions`, Google `:streamGenerateContent?alt=sse`).
//!
//! Faults, at a quarter, half and three quarters of the run: one worker is `kill -9`ed; the
//! gateway is `kill -9`ed and started again at once on the same data dir and port; on
//! PostgreSQL, every connection to the database is terminated.
//!
//! Every call the clients started ends in one of three classes, read the way a client reads
//! it (no retry of a started call, nothing guessed):
//! - **answered**: a 200 stream with its end event (`event: done`; `message_stop`;
//!   `data: [DONE]`; Google's chunk with a `finishReason`);
//! - **failed, clear**: an error status with its body, or an error event in the stream;
//! - **lost**: the connection cut with no error, no byte for `--timeout` seconds, or a
//!   stream that ended without its end event and without an error.
//!
//! A connection the gateway refuses (while it restarts) starts no call: the client connects
//! again after 50 ms (nothing was sent, so this is always safe) and counts the retry.
//!
//! After the load, the bench waits until the shared account holds no reserved credits (or
//! `--settle` seconds), then reads the database: `ai.request` audit events by outcome, and
//! the credits charged, compared with what the answered calls used (their usage times the
//! catalogue's prices). Results: a Markdown table on stdout and a JSON file.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_core::{Catalogue, Provider};
use keyward_testkit::{Keyward, Options};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::Target;
use crate::{arg, keyward_bin, start_fakes};

const PROMPT: &str = "Say hello to the soak test";
const MAX_TOKENS: u32 = 16;
/// How many examples of each failure or loss the report keeps.
const EXAMPLES: usize = 3;

fn str_arg(args: &[String], name: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

/// Which door a call comes in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Messages,
    Native,
}

/// One of the twelve kinds of call: account (own or shared keys), provider, door.
#[derive(Debug, Clone)]
struct Kind {
    shared: bool,
    provider: Provider,
    door: Door,
    target: Target,
}

impl Kind {
    fn name(&self) -> String {
        format!(
            "{} {} {}",
            if self.shared { "shared" } else { "own" },
            self.provider.as_str(),
            match self.door {
                Door::Messages => "ai/messages",
                Door::Native => "native",
            }
        )
    }
}

/// How a call ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    Answered,
    Failed(String),
    Lost(String),
}

#[derive(Debug, Clone)]
struct CallRecord {
    kind: u8,
    /// Since the run started.
    started: Duration,
    ended: Duration,
    ttft: Option<Duration>,
    class: Class,
    /// What the client read last (for the examples of failures and losses).
    detail: String,
    /// Usage from the stream's final event (answered calls).
    usage: Option<(u64, u64)>,
    /// `credits_charged` of `ai/messages`' `done` event.
    charged: Option<i64>,
    model: Option<String>,
    /// Whether the call ran on a connection opened again after a refusal.
    reconnected: bool,
}

/// The sampled peaks of the gateway and its workers.
#[derive(Debug, Default, Clone)]
struct Peaks {
    gateway_rss_kib: u64,
    workers_rss_sum_kib: u64,
    worker_rss_max_kib: u64,
    gateway_fds: u64,
    workers_fds_sum: u64,
    worker_fds_max: u64,
    workers_seen: u64,
    samples: u64,
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Samples the gateway (whichever process it is now) and its children every 200 ms.
fn sample_peaks(gateway: Arc<AtomicU32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Peaks> {
    std::thread::spawn(move || {
        let mut p = Peaks::default();
        let mut seen = std::collections::BTreeSet::new();
        while !stop.load(Ordering::Relaxed) {
            let gw = gateway.load(Ordering::Relaxed);
            if gw != 0 {
                let tree = crate::procs::tree(gw);
                p.gateway_rss_kib = p.gateway_rss_kib.max(crate::procs::rss_kib(gw));
                p.gateway_fds = p.gateway_fds.max(fd_count(gw));
                let (mut rss_sum, mut fds_sum) = (0, 0);
                for w in tree.iter().copied().filter(|w| *w != gw) {
                    seen.insert(w);
                    let rss = crate::procs::rss_kib(w);
                    let fds = fd_count(w);
                    p.worker_rss_max_kib = p.worker_rss_max_kib.max(rss);
                    p.worker_fds_max = p.worker_fds_max.max(fds);
                    rss_sum += rss;
                    fds_sum += fds;
                }
                p.workers_rss_sum_kib = p.workers_rss_sum_kib.max(rss_sum);
                p.workers_fds_sum = p.workers_fds_sum.max(fds_sum);
                p.samples += 1;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        p.workers_seen = seen.len() as u64;
        p
    })
}

/// Raises this process's descriptor limit to its hard limit (children inherit it): each
/// stream holds a descriptor in the client, the gateway (two: client and worker), a worker
/// (two) and the fake.
fn raise_nofile(concurrency: usize) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    let raised = Rlimit {
        current: hard,
        maximum: hard,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        eprintln!("soak: could not raise RLIMIT_NOFILE: {e}");
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let needed = (concurrency as u64) * 2 + 1024;
    if now < needed {
        eprintln!(
            "soak: RLIMIT_NOFILE is {now}; {concurrency} streams need about {needed} in the gateway (raise the hard limit: ulimit -Hn)"
        );
    }
    now
}

/// Keys the fake knows, in each provider's format.
fn fake_key(provider: Provider, shared: bool) -> String {
    let tag = if shared { "sharedpool" } else { "ownkey0000" };
    match provider {
        Provider::Anthropic => format!("sk-ant-api03-soak{tag}benchbenchbenchbenchbench0001"),
        Provider::OpenAi => format!("sk-proj-soak{tag}benchbenchbenchbench0001"),
        Provider::Google => format!("AQ.Ab8RN6soak{tag}benchbenchbenchbench0001"),
    }
}

struct Setup {
    own_token: String,
    own_account: String,
    shared_token: String,
    shared_account: String,
}

fn cli_json(kw: &Keyward, args: &[&str], stdin: Option<&[u8]>) -> Value {
    let out = kw.cli_with_stdin(args, stdin);
    out.assert_success();
    if out.stdout.trim().is_empty() {
        Value::Null
    } else {
        out.json()
    }
}

fn set_up_accounts(rt: &tokio::runtime::Runtime, kw: &Keyward, fakes_url: &str, stream_ms: u64) -> Setup {
    let own_token = kw.owner_token().to_owned();
    let own_account = kw.owner_account().to_owned();
    let user = cli_json(
        kw,
        &["admin", "create-user", "--email", "soak-shared@example.com"],
        None,
    );
    let shared_token = user["token"].as_str().unwrap().to_owned();
    let account = cli_json(
        kw,
        &[
            "admin",
            "create-account",
            "--name",
            "Soak shared",
            "--plan",
            "pro",
            "--owner",
            "soak-shared@example.com",
        ],
        None,
    );
    let shared_account = account["account_id"].as_str().unwrap().to_owned();
    // Enough shared credits for any run: the cap must not be what fails calls.
    cli_json(
        kw,
        &[
            "admin",
            "set-plan",
            "--account",
            &shared_account,
            "--plan",
            "pro",
            "--shared-credit-limit",
            "1000000000",
        ],
        None,
    );
    for p in Provider::ALL {
        let key = fake_key(p, true);
        cli_json(
            kw,
            &["admin", "set-shared-key", "--provider", p.as_str()],
            Some(format!("{key}\n").as_bytes()),
        );
    }
    rt.block_on(async {
        let c = keyward_testkit::reqwest::Client::builder().no_proxy().build().unwrap();
        for p in Provider::ALL {
            for shared in [false, true] {
                let r = c
                    .post(format!("{fakes_url}/_fake/keys"))
                    .json(&json!({ "key": fake_key(p, shared), "behaviour": "long_stream", "delay_ms": stream_ms }))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "fake key registration: {}", r.status());
            }
        }
        let http = kw.http();
        for p in Provider::ALL {
            let path = format!("/v1/accounts/{own_account}/model-keys/{}", p.as_str());
            http.put(&path, Some(&own_token), &json!({ "api_key": fake_key(p, false) }))
                .await
                .expect_status(200);
            http.put(&format!("{path}/source"), Some(&own_token), &json!({ "source": "own" }))
                .await
                .expect_status(200);
            let path = format!("/v1/accounts/{shared_account}/model-keys/{}/source", p.as_str());
            http.put(&path, Some(&shared_token), &json!({ "source": "shared" }))
                .await
                .expect_status(200);
        }
    });
    Setup {
        own_token,
        own_account,
        shared_token,
        shared_account,
    }
}

fn kinds(base: &str, s: &Setup, catalogue: &Catalogue) -> Vec<Kind> {
    let ct = ("content-type", "application/json");
    let mut out = Vec::new();
    for shared in [false, true] {
        let (token, account) = if shared {
            (&s.shared_token, &s.shared_account)
        } else {
            (&s.own_token, &s.own_account)
        };
        let bearer = format!("Bearer {token}");
        for provider in Provider::ALL {
            let model = catalogue.default_model(provider).unwrap().id.clone();
            let messages = serde_json::to_vec(&json!({
                "provider": provider.as_str(), "stream": true, "max_tokens": MAX_TOKENS,
                "messages": [{ "role": "user", "content": PROMPT }],
            }))
            .unwrap();
            out.push(Kind {
                shared,
                provider,
                door: Door::Messages,
                target: Target::post(
                    &format!("{base}/v1/accounts/{account}/ai/messages"),
                    &[ct, ("authorization", &bearer)],
                    &messages,
                ),
            });
            let native_base = format!("{base}/v1/accounts/{account}/providers/{}", provider.as_str());
            let target = match provider {
                Provider::Anthropic => Target::post(
                    &format!("{native_base}/v1/messages"),
                    &[ct, ("x-api-key", token), ("anthropic-version", "2023-06-01")],
                    &serde_json::to_vec(&json!({
                        "model": model, "max_tokens": MAX_TOKENS, "stream": true,
                        "messages": [{ "role": "user", "content": PROMPT }],
                    }))
                    .unwrap(),
                ),
                Provider::OpenAi => Target::post(
                    &format!("{native_base}/v1/chat/completions"),
                    &[ct, ("authorization", &bearer)],
                    &serde_json::to_vec(&json!({
                        "model": model, "max_completion_tokens": MAX_TOKENS, "stream": true,
                        "stream_options": { "include_usage": true },
                        "messages": [{ "role": "user", "content": PROMPT }],
                    }))
                    .unwrap(),
                ),
                Provider::Google => Target::post(
                    &format!("{native_base}/v1beta/models/{model}:streamGenerateContent?alt=sse"),
                    &[ct, ("x-goog-api-key", token)],
                    &serde_json::to_vec(&json!({
                        "contents": [{ "role": "user", "parts": [{ "text": PROMPT }] }],
                        "generationConfig": { "maxOutputTokens": MAX_TOKENS },
                    }))
                    .unwrap(),
                ),
            };
            out.push(Kind {
                shared,
                provider,
                door: Door::Native,
                target,
            });
        }
    }
    out
}

/// What one server-sent event said.
#[derive(Debug, Default)]
struct Seen {
    text: bool,
    end: bool,
    error: Option<String>,
    input: Option<u64>,
    output: Option<u64>,
    charged: Option<i64>,
    model: Option<String>,
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_u64()
}

/// Reads one event (`event:`/`data:` lines) of `kind`'s stream into `seen`.
fn read_event(kind: &Kind, raw: &[u8], seen: &mut Seen) {
    let text = String::from_utf8_lossy(raw);
    let (mut name, mut data) = ("", String::new());
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if data == "[DONE]" {
        seen.end = true;
        return;
    }
    let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
    match (kind.door, kind.provider) {
        (Door::Messages, _) => match name {
            "delta" => seen.text = true,
            "done" => {
                seen.end = true;
                seen.input = u64_at(&v, &["usage", "input_tokens"]);
                seen.output = u64_at(&v, &["usage", "output_tokens"]);
                seen.charged = v.get("credits_charged").and_then(Value::as_i64);
                seen.model = v.get("model").and_then(Value::as_str).map(str::to_owned);
            }
            "error" => {
                seen.error = Some(format!(
                    "error event {}",
                    v["error"]["code"].as_str().or(v["code"].as_str()).unwrap_or("?")
                ));
            }
            _ => {}
        },
        (Door::Native, Provider::Anthropic) => match name {
            "content_block_delta" => seen.text = true,
            "message_start" => seen.input = u64_at(&v, &["message", "usage", "input_tokens"]),
            "message_delta" => seen.output = u64_at(&v, &["usage", "output_tokens"]),
            "message_stop" => seen.end = true,
            "error" => seen.error = Some(format!("error event {}", v["error"]["type"].as_str().unwrap_or("?"))),
            _ => {}
        },
        (Door::Native, Provider::OpenAi) => {
            if let Some(e) = v.get("error") {
                seen.error = Some(format!(
                    "error event {}",
                    e["code"].as_str().or(e["type"].as_str()).unwrap_or("?")
                ));
            } else if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                seen.text = true;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                seen.input = u64_at(u, &["prompt_tokens"]);
                seen.output = u64_at(u, &["completion_tokens"]);
            }
        }
        (Door::Native, Provider::Google) => {
            if let Some(e) = v.get("error") {
                seen.error = Some(format!("error event {}", e["status"].as_str().unwrap_or("?")));
                return;
            }
            let candidate = &v["candidates"][0];
            if candidate["content"]["parts"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                seen.text = true;
            }
            if candidate.get("finishReason").is_some() {
                seen.end = true;
                seen.input = u64_at(&v, &["usageMetadata", "promptTokenCount"]);
                seen.output = u64_at(&v, &["usageMetadata", "candidatesTokenCount"]);
            }
        }
    }
}

/// The end of the event that starts at `from`: (end, start of the next), for `\n\n` and
/// `\r\n\r\n` alike.
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// The code in an error answer's body, whatever the envelope.
fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    e["code"]
        .as_str()
        .or(e["type"].as_str())
        .or(e["status"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned())
}

/// A client's connection and its buffers.
struct Client {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    body: Vec<u8>,
    connect_retries: u64,
}

enum Read {
    Bytes,
    Closed,
    Failed(String),
    Idle,
}

impl Client {
    async fn read_more(&mut self, idle: Duration) -> Read {
        let Some(stream) = self.stream.as_mut() else {
            return Read::Failed("no connection".into());
        };
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match tokio::time::timeout(idle, stream.read_buf(&mut self.buf)).await {
            Err(_) => Read::Idle,
            Ok(Ok(0)) => Read::Closed,
            Ok(Ok(_)) => Read::Bytes,
            Ok(Err(e)) => Read::Failed(e.to_string()),
        }
    }

    /// Connects, again after 50 ms while the gateway refuses (it is restarting), until
    /// `give_up`. `false`: no connection, so no call.
    async fn connect(&mut self, target: &Target, give_up: Instant) -> Option<bool> {
        if self.stream.is_some() {
            return Some(false);
        }
        let mut retried = false;
        loop {
            match TcpStream::connect(target.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.stream = Some(s);
                    return Some(retried);
                }
                Err(_) if Instant::now() < give_up => {
                    retried = true;
                    self.connect_retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// One call on the connection, read to its end.
    async fn call(&mut self, kind: &Kind, idle: Duration, t0: Instant) -> (Class, Option<Duration>, Seen, String) {
        let mut seen = Seen::default();
        let lost = |why: String, seen: Seen, detail: String| (Class::Lost(why), None, seen, detail);
        if let Err(e) = self.stream.as_mut().unwrap().write_all(&kind.target.request).await {
            return lost(format!("cut before the answer (write: {e})"), seen, String::new());
        }
        self.buf.clear();
        self.body.clear();
        // The head.
        let (status, head_len, chunked, length, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let (mut chunked, mut length, mut close) = (false, None, false);
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("transfer-encoding") && h.value.eq_ignore_ascii_case(b"chunked")
                        {
                            chunked = true;
                        } else if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok());
                        } else if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
                            close = true;
                        }
                    }
                    break (resp.code.unwrap_or(0), n, chunked, length, close);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return lost(format!("unreadable answer head: {e}"), seen, String::new()),
            }
            match self.read_more(idle).await {
                Read::Bytes => {}
                Read::Closed => return lost("cut before the answer (closed)".into(), seen, String::new()),
                Read::Failed(e) => return lost(format!("cut before the answer ({e})"), seen, String::new()),
                Read::Idle => return lost(format!("no answer for {} s", idle.as_secs()), seen, String::new()),
            }
        };
        let mut ttft = None;
        let mut pos = head_len; // next undecoded byte of `buf`
        let mut scan = 0; // next unread event byte of `body`
        let ok = (200..300).contains(&status);
        let finished: Result<(), String> = loop {
            // Decode what is buffered.
            let mut done = false;
            if chunked {
                loop {
                    let rest = &self.buf[pos..];
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let size = std::str::from_utf8(&rest[..eol])
                        .ok()
                        .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
                    let Some(size) = size else {
                        break;
                    };
                    if rest.len() < eol + 2 + size + 2 {
                        break;
                    }
                    self.body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                    pos += eol + 2 + size + 2;
                    if size == 0 {
                        done = true;
                        break;
                    }
                }
            } else {
                self.body.extend_from_slice(&self.buf[pos..]);
                pos = self.buf.len();
                done = length.is_some_and(|l| self.body.len() >= l);
            }
            if ok {
                while let Some((end, next)) = event_end(&self.body, scan) {
                    let raw = self.body[scan..end].to_vec();
                    read_event(kind, &raw, &mut seen);
                    if seen.text && ttft.is_none() {
                        ttft = Some(t0.elapsed());
                    }
                    scan = next;
                }
            }
            if done {
                break Ok(());
            }
            match self.read_more(idle).await {
                Read::Bytes => {}
                Read::Closed if !chunked && length.is_none() => break Ok(()),
                Read::Closed => break Err("closed".to_owned()),
                Read::Failed(e) => break Err(e),
                Read::Idle => break Err(format!("no byte for {} s", idle.as_secs())),
            }
        };
        let tail = String::from_utf8_lossy(&self.body[self.body.len().saturating_sub(200)..]).into_owned();
        if close || finished.is_err() {
            self.stream = None;
        }
        if !ok {
            // An error status is a clear answer, even if its body was cut.
            return (
                Class::Failed(format!("HTTP {status} {}", error_code(&self.body))),
                ttft,
                seen,
                tail,
            );
        }
        if let Some(e) = seen.error.clone() {
            return (Class::Failed(e), ttft, seen, tail);
        }
        if seen.end {
            return (Class::Answered, ttft, seen, tail);
        }
        let why = match finished {
            Ok(()) => "stream ended without its end event or an error".to_owned(),
            Err(e) if e.starts_with("no byte") => e,
            Err(e) => format!("cut mid-stream ({e})"),
        };
        (Class::Lost(why), ttft, seen, tail)
    }
}

async fn run_client(
    id: usize,
    kinds: Arc<Vec<Kind>>,
    started: Instant,
    deadline: Instant,
    idle: Duration,
    retries: Arc<AtomicU64>,
) -> Vec<CallRecord> {
    let mut client = Client {
        stream: None,
        buf: Vec::with_capacity(16 * 1024),
        body: Vec::with_capacity(8 * 1024),
        connect_retries: 0,
    };
    let mut out = Vec::new();
    let mut n = id;
    while Instant::now() < deadline {
        let k = n % kinds.len();
        n += 1;
        let kind = &kinds[k];
        let Some(reconnected) = client.connect(&kind.target, deadline).await else {
            break;
        };
        let t0 = Instant::now();
        let (class, ttft, seen, detail) = client.call(kind, idle, t0).await;
        if matches!(class, Class::Lost(_)) {
            // Whatever broke, the next call starts on a new connection.
            client.stream = None;
        }
        let usage = match (&class, seen.input, seen.output) {
            (Class::Answered, Some(i), Some(o)) => Some((i, o)),
            (Class::Answered, None, Some(o)) => Some((0, o)),
            _ => None,
        };
        out.push(CallRecord {
            kind: k as u8,
            started: t0 - started,
            ended: started.elapsed(),
            ttft,
            class,
            detail,
            usage,
            charged: seen.charged,
            model: seen.model,
            reconnected,
        });
    }
    retries.fetch_add(client.connect_retries, Ordering::Relaxed);
    out
}

/// A fault and when it happened (seconds since the run started).
#[derive(Debug, Clone)]
struct Fault {
    at: f64,
    what: String,
}

/// The database, for the counts after the run.
enum Db {
    Sqlite(keyward_testkit::sqlx::SqlitePool),
    Pg(keyward_testkit::sqlx::PgPool),
}

macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Pg($pool) => $body,
        }
    };
}

impl Db {
    /// (credits used, credits reserved) of the shared account, all periods.
    async fn credits(&self, account: &str) -> (i64, i64) {
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(credits_used), 0) AS BIGINT), CAST(COALESCE(SUM(credits_reserved), 0) AS BIGINT) \
             FROM credit_periods WHERE account_id = '{account}'"
        );
        on_db!(self, |pool| keyward_testkit::sqlx::query_as::<_, (i64, i64)>(&sql)
            .fetch_one(pool)
            .await
            .unwrap())
    }

    /// `ai.request` events: (account, key source, outcome, provider, model, input, output).
    async fn ai_events(&self) -> Vec<(String, String, String, String, String, i64, i64)> {
        let sql = "SELECT account_id, COALESCE(key_source, ''), outcome, COALESCE(provider, ''), COALESCE(model, ''), \
                   CAST(COALESCE(input_tokens, 0) AS BIGINT), CAST(COALESCE(output_tokens, 0) AS BIGINT) \
                   FROM audit_events WHERE action = 'ai.request'";
        on_db!(self, |pool| keyward_testkit::sqlx::query_as::<
            _,
            (String, String, String, String, String, i64, i64),
        >(sql)
        .fetch_all(pool)
        .await
        .unwrap())
    }
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    crate::percentile(sorted, q).as_secs_f64() * 1e3
}

pub fn soak(args: &[String]) {
    let concurrency = arg(args, "--concurrency", 2000) as usize;
    let duration = Duration::from_secs(arg(args, "--duration", 60));
    let stream_ms = arg(args, "--stream-ms", 2000);
    let idle = Duration::from_secs(arg(args, "--timeout", 30));
    let settle = Duration::from_secs(arg(args, "--settle", 120));
    let faults_on = !args.iter().any(|a| a == "--no-faults");
    let pg_server = str_arg(args, "--postgres");
    let server_env: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--server-env")
        .filter_map(|w| w[1].split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let backend = if pg_server.is_some() { "postgresql" } else { "sqlite" };
    let json_path = str_arg(args, "--json").unwrap_or_else(|| format!("target/soak-{backend}.json"));

    let nofile = raise_nofile(concurrency);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fakes = start_fakes();
    let catalogue = Catalogue::builtin();
    let db = pg_server
        .as_deref()
        .map(|url| rt.block_on(keyward_testkit::pg::TempDatabase::create(url)));
    let port = crate::gateway::free_port();
    let mut options = Options::default()
        .log("warn")
        .env("KEYWARD_LISTEN", &format!("127.0.0.1:{port}"))
        .env("KEYWARD_ANTHROPIC_BASE_URL", &fakes.url)
        .env("KEYWARD_OPENAI_BASE_URL", &fakes.url)
        .env("KEYWARD_GOOGLE_BASE_URL", &fakes.url);
    options.ready_timeout = Duration::from_secs(60);
    if let Some(db) = &db {
        options = options.env("KEYWARD_DATABASE_URL", &db.url);
    }
    for (k, v) in &server_env {
        options = options.env(k, v);
    }
    let mut kw = Keyward::start(&keyward_bin(), options);
    let setup = set_up_accounts(&rt, &kw, &fakes.url, stream_ms);
    let kinds = Arc::new(kinds(kw.base_url(), &setup, &catalogue));

    println!(
        "soak: {concurrency} clients for {} s, {backend}, streams of {stream_ms} ms, {} kinds of call, faults {}, RLIMIT_NOFILE {nofile}",
        duration.as_secs(),
        kinds.len(),
        if faults_on { "on" } else { "off" }
    );

    let gateway = Arc::new(AtomicU32::new(kw.pid().unwrap_or(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peaks(gateway.clone(), stop.clone());
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| rt.spawn(run_client(i, kinds.clone(), started, deadline, idle, retries.clone())))
        .collect();

    // The faults, from this thread while the clients run on the runtime.
    let faults = Arc::new(Mutex::new(Vec::<Fault>::new()));
    let note = |what: String| {
        let at = started.elapsed().as_secs_f64();
        println!("  {at:6.1} s  {what}");
        faults.lock().unwrap().push(Fault { at, what });
    };
    let sleep_until = |frac: f64| {
        let when = started + duration.mul_f64(frac);
        if let Some(d) = when.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    let mut gateway_kill_at = None;
    let mut gateway_back_at = None;
    if faults_on {
        sleep_until(0.25);
        let gw = gateway.load(Ordering::Relaxed);
        let workers: Vec<u32> = crate::procs::tree(gw).into_iter().filter(|p| *p != gw).collect();
        match workers.first() {
            Some(w) => {
                let ok = std::process::Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                note(format!(
                    "kill -9 worker pid {w} (of {} workers){}",
                    workers.len(),
                    if ok { "" } else { ": kill failed" }
                ));
            }
            None => note("no worker process found to kill".to_owned()),
        }
        sleep_until(0.5);
        let old = gateway.load(Ordering::Relaxed);
        gateway_kill_at = Some(started.elapsed());
        kw.kill();
        note(format!("kill -9 gateway pid {old}"));
        let t = Instant::now();
        kw.start_again();
        gateway.store(kw.pid().unwrap_or(0), Ordering::Relaxed);
        gateway_back_at = Some(started.elapsed());
        note(format!(
            "gateway started again (pid {}), listening after {:.2} s",
            kw.pid().unwrap_or(0),
            t.elapsed().as_secs_f64()
        ));
        if let Some(db) = &db {
            sleep_until(0.75);
            let n = rt.block_on(db.kill_connections());
            note(format!("PostgreSQL: terminated {n} connections to the database"));
        }
    }

    let mut calls: Vec<CallRecord> = Vec::new();
    for t in tasks {
        calls.extend(rt.block_on(t).unwrap_or_default());
    }
    let load_elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler.join().unwrap_or_default();
    println!(
        "  {:6.1} s  load over: {} calls started",
        load_elapsed.as_secs_f64(),
        calls.len()
    );

    // Settlement: every reservation released (or the wait is over).
    let dbc = rt.block_on(async {
        match &db {
            Some(db) => Db::Pg(db.pool().await),
            None => Db::Sqlite(keyward_testkit::db::connect(&kw.db_path()).await),
        }
    });
    let settle_started = Instant::now();
    let (mut used, mut reserved) = rt.block_on(dbc.credits(&setup.shared_account));
    while reserved != 0 && settle_started.elapsed() < settle {
        std::thread::sleep(Duration::from_secs(1));
        (used, reserved) = rt.block_on(dbc.credits(&setup.shared_account));
    }
    let settled_after = settle_started.elapsed().as_secs_f64();
    let events = rt.block_on(dbc.ai_events());

    // Client-side counts.
    let answered: Vec<&CallRecord> = calls.iter().filter(|c| c.class == Class::Answered).collect();
    let mut reasons: BTreeMap<(String, String), (u64, Vec<String>)> = BTreeMap::new();
    let mut lost_at_kill = 0u64;
    for c in &calls {
        let (class, why) = match &c.class {
            Class::Answered => continue,
            Class::Failed(w) => ("failed", w.clone()),
            Class::Lost(w) => {
                // Sent to the killed gateway (before the new one listened; a connection in
                // the dying process's accept queue counts too), cut within 2 s of the kill.
                let at_kill = match (gateway_kill_at, gateway_back_at) {
                    (Some(k), Some(back)) => c.started < back && c.ended >= k && c.ended <= k + Duration::from_secs(2),
                    _ => false,
                };
                lost_at_kill += u64::from(at_kill);
                (
                    "lost",
                    if at_kill {
                        format!("{w} [in flight at the gateway kill]")
                    } else {
                        w.clone()
                    },
                )
            }
        };
        let e = reasons.entry((class.to_owned(), why)).or_default();
        e.0 += 1;
        if e.1.len() < EXAMPLES {
            e.1.push(format!(
                "{} started {:.2} s, ended {:.2} s{}: {}",
                kinds[c.kind as usize].name(),
                c.started.as_secs_f64(),
                c.ended.as_secs_f64(),
                if c.reconnected { " (after reconnect)" } else { "" },
                c.detail.replace('\n', "\\n").chars().take(160).collect::<String>()
            ));
        }
    }
    let failed = calls.iter().filter(|c| matches!(c.class, Class::Failed(_))).count();
    let lost = calls.iter().filter(|c| matches!(c.class, Class::Lost(_))).count();
    let mut ttft: Vec<Duration> = answered.iter().filter_map(|c| c.ttft).collect();
    ttft.sort_unstable();
    let answered_shared = answered.iter().filter(|c| kinds[c.kind as usize].shared).count();
    let answered_own = answered.len() - answered_shared;
    let price = |p: Provider, model: &str, i: u64, o: u64| -> i64 {
        catalogue
            .model(p, model)
            .map_or(0, |m| i64::try_from(m.credits_for(i, o)).unwrap_or(i64::MAX))
    };
    // What the answered shared calls used, at the catalogue's prices.
    let client_credits: i64 = answered
        .iter()
        .filter(|c| kinds[c.kind as usize].shared)
        .map(|c| {
            let k = &kinds[c.kind as usize];
            let model = c
                .model
                .clone()
                .unwrap_or_else(|| catalogue.default_model(k.provider).unwrap().id.clone());
            let (i, o) = c.usage.unwrap_or((0, 0));
            price(k.provider, &model, i, o)
        })
        .sum();
    let done_charged: i64 = answered.iter().filter_map(|c| c.charged).sum();

    // Audit.
    let mut by_outcome: BTreeMap<String, u64> = BTreeMap::new();
    let (mut audit_ok_shared, mut audit_ok_own, mut audit_credits) = (0u64, 0u64, 0i64);
    for (account, source, outcome, provider, model, i, o) in &events {
        *by_outcome.entry(outcome.clone()).or_default() += 1;
        if outcome == "ok" {
            if source == "shared" {
                audit_ok_shared += 1;
                if let Ok(p) = provider.parse::<Provider>() {
                    audit_credits += price(p, model, *i as u64, *o as u64);
                }
            } else {
                audit_ok_own += 1;
            }
        }
        let _ = account;
    }

    let secs = duration.as_secs_f64();
    let lost_other = lost as u64 - lost_at_kill;
    let row = |k: &str, v: String| println!("| {k} | {v} |");
    println!();
    println!(
        "### Soak: {concurrency} streaming calls at once for {} s, {backend}, {} cores",
        duration.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    row("calls started", calls.len().to_string());
    row(
        "calls completed per second (answered / run length)",
        format!("{:.1}", answered.len() as f64 / secs),
    );
    row(
        "time to first text p50 / p99 (answered)",
        format!("{:.1} ms / {:.1} ms", pct(&ttft, 0.5), pct(&ttft, 0.99)),
    );
    row(
        "answered (own / shared)",
        format!("{} ({answered_own} / {answered_shared})", answered.len()),
    );
    row("failed with a clear error", failed.to_string());
    row(
        "lost (in flight at the gateway kill / other)",
        format!("{lost} ({lost_at_kill} / {lost_other})"),
    );
    row(
        "connection refused, connected again (no call started)",
        retries.load(Ordering::Relaxed).to_string(),
    );
    row(
        "peak RSS gateway / workers sum / largest worker",
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            peaks.gateway_rss_kib as f64 / 1024.0,
            peaks.workers_rss_sum_kib as f64 / 1024.0,
            peaks.worker_rss_max_kib as f64 / 1024.0
        ),
    );
    row(
        "peak open descriptors gateway / workers sum / largest worker",
        format!(
            "{} / {} / {}",
            peaks.gateway_fds, peaks.workers_fds_sum, peaks.worker_fds_max
        ),
    );
    row(
        "audit ai.request events (all outcomes)",
        format!(
            "{} ({})",
            events.len(),
            by_outcome
                .iter()
                .map(|(o, n)| format!("{o}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row(
        "audit ok events vs answered calls (own; shared)",
        format!("{audit_ok_own} vs {answered_own}; {audit_ok_shared} vs {answered_shared}"),
    );
    row(
        "shared credits charged (database) vs used by answered calls (usage x catalogue)",
        format!("{used} vs {client_credits} (ai/messages done events say {done_charged} of it)"),
    );
    row(
        "shared credits of the ok audit events (tokens x catalogue)",
        audit_credits.to_string(),
    );
    row(
        "shared credits still reserved after settlement",
        format!("{reserved} (waited {settled_after:.0} s)"),
    );
    println!();
    if !reasons.is_empty() {
        println!("Failures and losses, by reason (up to {EXAMPLES} examples each):");
        for ((class, why), (n, examples)) in &reasons {
            println!("- {class}: {why}: {n}");
            for e in examples {
                println!("    - {e}");
            }
        }
    }

    let faults = faults.lock().unwrap().clone();
    let report = json!({
        "concurrency": concurrency,
        "duration_s": duration.as_secs(),
        "backend": backend,
        "stream_ms": stream_ms,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "faults": faults.iter().map(|f| json!({"at_s": f.at, "what": f.what})).collect::<Vec<_>>(),
        "calls_started": calls.len(),
        "calls_completed_per_s": answered.len() as f64 / secs,
        "ttft_ms": { "p50": pct(&ttft, 0.5), "p99": pct(&ttft, 0.99), "max": ttft.last().map_or(0.0, |d| d.as_secs_f64() * 1e3) },
        "answered": { "all": answered.len(), "own": answered_own, "shared": answered_shared },
        "failed": failed,
        "lost": { "all": lost, "in_flight_at_gateway_kill": lost_at_kill, "other": lost_other },
        "connect_retries": retries.load(Ordering::Relaxed),
        "reasons": reasons.iter().map(|((class, why), (n, ex))| json!({"class": class, "reason": why, "count": n, "examples": ex})).collect::<Vec<_>>(),
        "peak": {
            "gateway_rss_mib": peaks.gateway_rss_kib as f64 / 1024.0,
            "workers_rss_sum_mib": peaks.workers_rss_sum_kib as f64 / 1024.0,
            "worker_rss_max_mib": peaks.worker_rss_max_kib as f64 / 1024.0,
            "gateway_fds": peaks.gateway_fds,
            "workers_fds_sum": peaks.workers_fds_sum,
            "worker_fds_max": peaks.worker_fds_max,
            "worker_processes_seen": peaks.workers_seen,
            "samples": peaks.samples,
        },
        "audit": {
            "ai_request_events": events.len(),
            "by_outcome": by_outcome,
            "ok_own": audit_ok_own,
            "ok_shared": audit_ok_shared,
        },
        "credits": {
            "charged": used,
            "reserved_after_settlement": reserved,
            "settlement_wait_s": settled_after,
            "answered_shared_usage_at_catalogue_prices": client_credits,
            "ai_messages_done_credits_charged": done_charged,
            "ok_audit_events_at_catalogue_prices": audit_credits,
        },
    });
    if let Some(dir) = std::path::Path::new(&json_path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!();
    println!("JSON: {json_path}");
    drop(dbc);
    drop(kw);
    drop(db);
    drop(fakes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_blank_lines_of_either_kind() {
        let body = b"event: delta\ndata: {}\n\ndata: {\"a\":1}\r\n\r\nrest";
        assert_eq!(event_end(body, 0), Some((21, 23)));
        assert_eq!(event_end(body, 23), Some((37, 40)));
        assert_eq!(event_end(body, 40), None);
    }
}
