//! The isolated worker: killed mid-request (the call fails fast, the supervisor starts a new
//! one), its sandbox seen from outside (`/proc`) and from inside (`keyward worker-selftest`),
//! a canary run that searches, besides every byte keyward writes, the workers' memory, and
//! how many connections the gateway holds to its workers.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::canary::{find_forms, random_string, ALNUM};
use keyward_testkit::{Keyward, Resp};
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;

/// Problems with the sandbox of worker `pid`, as `/proc` shows it.
fn sandbox_problems(pid: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let nnp = proc_status_field(pid, "NoNewPrivs");
    if nnp.as_deref() != Some("1") {
        problems.push(format!("worker {pid}: NoNewPrivs {nnp:?}, expected 1"));
    }
    let seccomp = proc_status_field(pid, "Seccomp");
    if seccomp.as_deref() != Some("2") {
        problems.push(format!("worker {pid}: Seccomp {seccomp:?}, expected 2 (filter)"));
    }
    // Every thread, not only the first: a filter installed after a thread started would
    // not cover it.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for tid in &tasks {
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if field("Seccomp:").as_deref() != Some("2") {
            problems.push(format!("worker {pid} thread {tid}: not under a seccomp filter"));
        }
        // The refusal filters (EPERM, ENOSYS) and the allow-list.
        if field("Seccomp_filters:").as_deref() != Some("3") {
            problems.push(format!(
                "worker {pid} thread {tid}: Seccomp_filters {:?}, expected 3",
                field("Seccomp_filters:")
            ));
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let core: Option<Vec<&str>> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max core file size"))
        .map(|r| r.split_whitespace().collect());
    if core
        .as_ref()
        .is_none_or(|v| v.first() != Some(&"0") || v.get(1) != Some(&"0"))
    {
        problems.push(format!(
            "worker {pid}: max core file size {core:?}, expected 0 (soft and hard)"
        ));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_runs_sandboxed() {
    let kw = start();
    let pids = wait_workers(&kw, 2, &[], Duration::from_secs(10)).await;
    let problems: Vec<String> = pids.iter().flat_map(|p| sandbox_problems(*p)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_environment_holds_nothing_of_the_gateways() {
    // A secret in the gateway's environment (a cloud KMS credential, say). The worker clears
    // its environment before it touches a request (sandbox.rs: "nothing the gateway's
    // environment held is readable from the worker"); `/proc/<pid>/environ` is what the
    // worker itself reads at `/proc/self/environ`, which its Landlock rules let it read.
    let canary = format!("EnvCanary{}", random_string(30, ALNUM));
    let kw = start_with(keyward_testkit::Options::default().env("AWS_SECRET_ACCESS_KEY", &canary));
    let pids = wait_workers(&kw, 2, &[], Duration::from_secs(10)).await;
    let mut problems = Vec::new();
    for pid in &pids {
        let environ =
            std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_else(|e| panic!("read environ of {pid}: {e}"));
        if !find_all(&environ, canary.as_bytes()).is_empty() {
            let names: Vec<String> = environ
                .split(|b| *b == 0)
                .filter_map(|v| v.split(|b| *b == b'=').next())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .filter(|n| !n.is_empty())
                .collect();
            problems.push(format!(
                "worker {pid}: /proc/{pid}/environ (readable by the worker as /proc/self/environ) still holds the gateway's AWS_SECRET_ACCESS_KEY; it holds {} variables: {names:?}",
                names.len()
            ));
        }
        let (regions, _) = read_private_memory(*pid);
        let hits: Vec<String> = regions
            .iter()
            .flat_map(|r| {
                find_all(&r.bytes, canary.as_bytes())
                    .into_iter()
                    .map(move |o| format!("{:#x} in `{}`", r.start + o as u64, r.line))
            })
            .collect();
        if !hits.is_empty() {
            problems.push(format!(
                "worker {pid}: the gateway's secret is in the worker's memory at {hits:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `keyward worker-selftest <probe>` on its own, with a clean environment.
fn selftest(probe: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(bin())
        .args(["worker-selftest", probe])
        .env_clear()
        .env("KEYWARD_DATA_DIR", dir.path())
        .env("KEYWARD_LOG", "info")
        .output()
        .expect("run keyward worker-selftest")
}

#[test]
fn worker_selftest_write_is_refused_by_seccomp() {
    let out = selftest("write");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the sandbox must refuse the write: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    // EPERM is seccomp's answer to an open for writing; Landlock, behind it, says EACCES.
    assert!(
        stdout.contains("write refused") && stdout.contains("errno Some(1)"),
        "stdout {stdout:?} stderr {stderr:?}"
    );
}

/// Each probe that the allow-list must kill dies by SIGSYS, without getting to report that
/// its call returned.
#[test]
fn worker_selftest_exec_fork_ptrace_process_vm_readv_and_raw_socket_are_killed_by_sigsys() {
    let mut problems = Vec::new();
    for probe in ["exec", "fork", "ptrace", "process_vm_readv", "raw_socket"] {
        let out = selftest(probe);
        if out.status.signal() != Some(31) {
            problems.push(format!(
                "{probe}: {:?}, expected death by SIGSYS (31)\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// What the allow-list must let through: a new thread (glibc tries clone3, gets ENOSYS,
/// falls back to clone with CLONE_THREAD) and a name lookup through glibc's resolver
/// (the tests call providers by IP; production resolves their names).
#[test]
fn worker_selftest_threads_and_name_lookups_work_inside_the_sandbox() {
    for probe in ["thread", "resolve"] {
        let out = selftest(probe);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{probe} must work in the sandbox: {:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = selftest("resolve");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("localhost Ok("),
        "localhost resolves from /etc/hosts: {stdout}"
    );
}

/// Waits (up to 5 s) until the fake has received `n` requests.
async fn wait_requests(fake: &FakeProviders, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.requests().len() < n {
        assert!(
            Instant::now() < deadline,
            "the fake got {} requests, waited for {n}",
            fake.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Pro account on `kw` that calls OpenAI with its own key, which the fake answers normally.
async fn own_openai_account(fake: &FakeProviders, kw: &Keyward, email: &str) -> (User, String) {
    let (user, acc) = pro_owner(kw, email);
    let key = key_for("openai");
    fake.set_key(provider("openai"), &key, Behaviour::Ok);
    save_key(kw, &user.token, &acc, "openai", &key).await;
    set_source(kw, &user.token, &acc, "openai", "own").await;
    (user, acc)
}

/// A provider that reads a POST whole on a kept-alive connection and then closes it without
/// answering gets that POST once: the worker reports the failure (502 provider_error) and
/// never sends the request again on a new connection, since the provider may have acted on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_provider_read_before_closing_a_kept_alive_connection_reaches_it_once() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", "1")]);
    let (user, acc) = pro_owner(&kw, "once@example.com");
    let key = key_for("openai");
    fake.set_key(provider("openai"), &key, Behaviour::Ok);
    save_key(&kw, &user.token, &acc, "openai", &key).await;
    set_source(&kw, &user.token, &acc, "openai", "own").await;
    // The first call leaves a kept-alive connection to the provider in the worker's pool.
    ai_call(&kw, &user.token, &acc, &chat_body("openai", false, 5))
        .await
        .expect_status(200);
    fake.set_key(provider("openai"), &key, Behaviour::Drop);
    fake.clear_requests();
    let r = ai_call(&kw, &user.token, &acc, &chat_body("openai", false, 5)).await;
    r.expect_error(502, "provider_error");
    assert!(
        r.text.contains("not sent again"),
        "the error says the request was not repeated: {r}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts = fake.requests().iter().filter(|q| q.method == "POST").count();
    assert_eq!(posts, 1, "the provider read the POST {posts} times");
    // And the next call, on a fresh connection, works.
    fake.set_key(provider("openai"), &key, Behaviour::Ok);
    ai_call(&kw, &user.token, &acc, &chat_body("openai", false, 5))
        .await
        .expect_status(200);
}

/// A call that arrives while no worker is up (the only one was killed and is being
/// restarted; the same holds at start-up, before the first answers its ping) waits for the
/// next one rather than failing `worker_unavailable` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_while_no_worker_is_up_waits_for_the_next_one() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", "1")]);
    let (user, acc) = own_openai_account(&fake, &kw, "wait@example.com").await;
    let first = wait_workers(&kw, 1, &[], Duration::from_secs(10)).await;

    sigkill(first[0]);
    // The supervisor waits 50 ms before it starts the next worker: call inside that window,
    // once /readyz counts no worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers_ready(&kw).await != 0 {
        assert!(
            Instant::now() < deadline,
            "/readyz never counted 0 workers after the kill"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let r = ai_call(&kw, &user.token, &acc, &chat_body("openai", false, 5)).await;
    r.expect_status(200);
    assert_eq!(r.json()["content"], fake_reply("openai"), "{r}");
    let second = wait_workers(&kw, 1, &first, Duration::from_secs(10)).await;
    assert_ne!(second, first, "the call was served by the restarted worker");
}

/// Open connections to the workers of the keyward whose data directory is `data_dir`: the
/// workers' accepted sockets, which the kernel lists (`/proc/net/unix`) connected (state 03)
/// under their listener's path, `<data_dir>/run/worker-N.sock`.
fn worker_connections(data_dir: &std::path::Path) -> usize {
    let prefix = data_dir.join("run").join("worker-").display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .expect("read /proc/net/unix")
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(5) == Some(&"03") && f.get(7).is_some_and(|p| p.starts_with(&prefix)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_opens_no_more_worker_connections_than_calls_in_flight() {
    let fake = FakeProviders::start().expect("start fakes");
    let workers = 2;
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", &workers.to_string())]);
    let (user, acc) = own_openai_account(&fake, &kw, "conns@example.com").await;
    wait_workers(&kw, workers, &[], Duration::from_secs(10)).await;
    // Workers the gateway did not start itself (two OS users, KEYWARD_WORKER_SOCKETS) are
    // watched over one ping connection each, held open; calls never use those.
    let watching = if keyward_testkit::users::two_users_mode().is_some() {
        workers
    } else {
        0
    };

    // One call at a time, taking turns between the two workers: one connection serves them all.
    for _ in 0..20 {
        ai_call(&kw, &user.token, &acc, &chat_body("openai", false, 5))
            .await
            .expect_status(200);
    }
    assert_eq!(
        worker_connections(kw.data_dir()).saturating_sub(watching),
        1,
        "20 calls one after another should share one worker connection ({watching} watching)"
    );

    // At most 8 calls in flight: at most 8 connections.
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let http = kw.http().clone();
            let (t, a) = (user.token.clone(), acc.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    http.post(&ai_path(&a), Some(&t), &chat_body("openai", false, 5))
                        .await
                        .expect_status(200);
                }
            })
        })
        .collect();
    for c in callers {
        c.await.expect("caller");
    }
    let open = worker_connections(kw.data_dir()).saturating_sub(watching);
    assert!(
        (1..=8).contains(&open),
        "8 concurrent callers left {open} worker connections open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_request_fails_that_call_fast_and_is_replaced() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", "1")]);
    let (user, acc) = pro_owner(&kw, "kill@example.com");
    let t = user.token.clone();
    let key = key_for("anthropic");
    // The provider takes 20 s to answer: the call is in flight when the worker dies.
    fake.set_key(
        provider("anthropic"),
        &key,
        Behaviour::SlowStream(Duration::from_secs(20)),
    );
    save_key(&kw, &t, &acc, "anthropic", &key).await;
    set_source(&kw, &t, &acc, "anthropic", "own").await;
    let first = wait_workers(&kw, 1, &[], Duration::from_secs(10)).await;

    let http = kw.http().clone();
    let (t2, acc2) = (t.clone(), acc.clone());
    let call = tokio::spawn(async move {
        http.post(&ai_path(&acc2), Some(&t2), &chat_body("anthropic", false, 5))
            .await
    });
    wait_requests(&fake, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at = Instant::now();
    sigkill(first[0]);
    let r = call.await.expect("join");
    let took = at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the call should fail fast when its worker dies, took {took:?}: {r}"
    );
    match r.status {
        503 => r.expect_error(503, "worker_unavailable"),
        _ => r.expect_error(502, "provider_error"),
    };

    // The supervisor starts a new worker (a new process), sandboxed like the first.
    let second = wait_workers(&kw, 1, &first, Duration::from_secs(10)).await;
    assert_ne!(second, first, "a new worker process");
    let problems = sandbox_problems(second[0]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    fake.set_key(provider("anthropic"), &key, Behaviour::Ok);
    let r = ai_call(&kw, &t, &acc, &chat_body("anthropic", false, 50)).await;
    r.expect_status(200);
    assert_eq!(r.json()["content"], fake_reply("anthropic"), "{r}");

    let events: Vec<Value> = audit_events(&kw, &t, &acc)
        .await
        .into_iter()
        .filter(|e| e["action"] == "ai.request")
        .collect();
    let outcomes: Vec<&str> = events
        .iter()
        .rev()
        .map(|e| e["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes.len(), 2, "both calls audited: {events:?}");
    assert!(
        outcomes[0].starts_with("error"),
        "the killed call is audited as failed: {events:?}"
    );
    assert_eq!(outcomes[1], "ok", "{events:?}");
    assert_audit_ok(&kw, None);
}

/// The native pass-through has no keyward error event to send: a stream its worker died
/// under must reach the client as broken (the body aborted, no final chunk), never as a
/// clean end, which an SDK would take for a complete, shorter answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_on_the_native_route_breaks_the_body_off() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", "1")]);
    let (user, acc) = pro_owner(&kw, "kill-native@example.com");
    let key = key_for("openai");
    fake.set_key(
        provider("openai"),
        &key,
        Behaviour::SlowStream(Duration::from_millis(400)),
    );
    save_key(&kw, &user.token, &acc, "openai", &key).await;
    set_source(&kw, &user.token, &acc, "openai", "own").await;
    let first = wait_workers(&kw, 1, &[], Duration::from_secs(10)).await;

    let client = keyward_testkit::reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut resp = client
        .post(format!(
            "{}/v1/accounts/{acc}/providers/openai/v1/chat/completions",
            kw.base_url()
        ))
        .bearer_auth(&user.token)
        .json(
            &json!({"model": "gpt-6-luna", "max_completion_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "Say hello"}]}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !text.contains("\"content\"") {
            let c = resp
                .chunk()
                .await
                .expect("chunk")
                .expect("the stream ended before any text");
            text.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await
    .expect("a first text within 10 s");
    sigkill(first[0]);
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    })
    .await
    .expect("the stream should end after its worker died");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(end.is_err(), "a cut stream ended cleanly, as if complete: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_event() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[("KEYWARD_WORKERS", "1")]);
    let (user, acc) = pro_owner(&kw, "kill-stream@example.com");
    let key = key_for("openai");
    fake.set_key(
        provider("openai"),
        &key,
        Behaviour::SlowStream(Duration::from_millis(400)),
    );
    save_key(&kw, &user.token, &acc, "openai", &key).await;
    set_source(&kw, &user.token, &acc, "openai", "own").await;
    let first = wait_workers(&kw, 1, &[], Duration::from_secs(10)).await;

    let client = keyward_testkit::reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut resp = client
        .post(format!("{}{}", kw.base_url(), ai_path(&acc)))
        .bearer_auth(&user.token)
        .json(&chat_body("openai", true, 50))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    // Read until the first text arrives, then kill the worker.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !text.contains("event: delta") {
            let c = resp
                .chunk()
                .await
                .expect("chunk")
                .expect("the stream ended before any delta");
            text.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await
    .expect("a first delta within 10 s");
    let at = Instant::now();
    sigkill(first[0]);
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(c) = resp.chunk().await.expect("chunk") {
            text.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await
    .expect("the stream should end after its worker died");
    let took = at.elapsed();
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert!(
        took < Duration::from_secs(3),
        "the stream should end fast, took {took:?}: {names:?}"
    );
    assert!(!names.contains(&"done"), "{names:?}");
    let last = events.last().expect("events");
    assert_eq!(last.name, "error", "{names:?}\n{text}");
    assert!(
        matches!(
            last.data["code"].as_str(),
            Some("worker_unavailable" | "provider_error")
        ),
        "{}",
        last.raw
    );
    wait_workers(&kw, 1, &first, Duration::from_secs(10)).await;
    fake.set_key(provider("openai"), &key, Behaviour::Ok);
    let r = ai_call(&kw, &user.token, &acc, &chat_body("openai", true, 50)).await;
    assert_eq!(
        sse_of(&r).last().map(|e| e.name.clone()),
        Some("done".to_owned()),
        "{r}"
    );
}

/// Where the raw bytes of `key` (or all of it but its first or last character) are in the
/// readable private memory of `pid`.
fn memory_hits(pid: u32, regions: &[Region], key: &str) -> Vec<String> {
    let k = key.as_bytes();
    let mut hits = Vec::new();
    for (what, needle) in [
        ("the key", k),
        ("the key but its last character", &k[..k.len() - 1]),
        ("the key but its first character", &k[1..]),
    ] {
        for r in regions {
            for off in find_all(&r.bytes, needle) {
                hits.push(format!(
                    "worker {pid}: {what} at {:#x} in mapping `{}`",
                    r.start + off as u64,
                    r.line
                ));
            }
        }
        if !hits.is_empty() {
            break;
        }
    }
    hits
}

/// Per provider: a key test, and plain and streamed calls on the own-key and shared accounts.
async fn exercise(kw: &Keyward, t: &str, acc: &str, shared_acc: &str) -> Vec<Resp> {
    let mut out = Vec::new();
    for p in PROVIDERS {
        out.push(key_test(kw, t, acc, p).await);
        for a in [acc, shared_acc] {
            for stream in [false, true] {
                out.push(ai_call(kw, t, a, &chat_body(p, stream, 50)).await);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_keys_are_nowhere_not_even_in_worker_memory() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "canary-mem@example.com");
    let shared_acc = create_account(&kw, "Shared", "pro", &user.email);
    let t = user.token.clone();
    let mut keys: Vec<(String, String)> = Vec::new(); // (what, key)
    let mut answers: Vec<Resp> = Vec::new();
    let mut own = std::collections::BTreeMap::new();
    let mut shared = std::collections::BTreeMap::new();
    for p in PROVIDERS {
        let o = key_for(p);
        fake.set_key(provider(p), &o, Behaviour::Ok);
        save_key(&kw, &t, &acc, p, &o).await;
        set_source(&kw, &t, &acc, p, "own").await;
        keys.push((format!("{p} own key"), o.clone()));
        own.insert(p, o);
        let s = key_for(p);
        fake.set_key(provider(p), &s, Behaviour::Ok);
        set_shared_key(&kw, p, &s);
        keys.push((format!("{p} shared key"), s.clone()));
        shared.insert(p, s);
    }
    // Working keys: tests and calls, plain and streamed, own and shared.
    answers.extend(exercise(&kw, &t, &acc, &shared_acc).await);
    let working = answers.iter().filter(|r| r.status == 200).count();
    assert_eq!(working, answers.len(), "every call works with good keys: {answers:?}");
    // A rotation, then the rotated-in key at work.
    let a2 = key_for("anthropic");
    fake.set_key(provider("anthropic"), &a2, Behaviour::Ok);
    save_key(&kw, &t, &acc, "anthropic", &a2).await;
    keys.push(("anthropic own key (rotated in)".to_owned(), a2.clone()));
    own.insert("anthropic", a2);
    answers.push(ai_call(&kw, &t, &acc, &chat_body("anthropic", true, 50)).await);
    // A provider that echoes every key it gets.
    for p in PROVIDERS {
        fake.set_key(provider(p), &own[p], Behaviour::EchoKey);
        fake.set_key(provider(p), &shared[p], Behaviour::EchoKey);
    }
    answers.extend(exercise(&kw, &t, &acc, &shared_acc).await);
    for a in [&acc, &shared_acc] {
        answers.push(kw.http().get(&keys_path(a), Some(&t)).await);
        answers.push(kw.http().get(&format!("{}?limit=100", audit_path(a)), Some(&t)).await);
        answers.push(kw.http().get(&usage_path(a), Some(&t)).await);
    }
    let metrics = kw.http().get("/metrics", None).await;
    metrics.expect_status(200);
    answers.push(metrics);
    let mut exports = Vec::new();
    for a in [&acc, &shared_acc] {
        let out = kw.cli(&["audit", "export", "--account", a]);
        out.assert_success();
        exports.push(out.stdout);
    }

    // The workers' memory, once their requests are done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids = wait_workers(&kw, 2, &[], Duration::from_secs(10)).await;
    let marker = fake.addr().to_string();
    let mut problems: Vec<String> = Vec::new();
    for pid in &pids {
        let (regions, unread) = read_private_memory(*pid);
        let total: usize = regions.iter().map(|r| r.bytes.len()).sum();
        // Positive control: the worker keeps the provider's address; the search must see it.
        let seen = regions
            .iter()
            .any(|r| !find_all(&r.bytes, marker.as_bytes()).is_empty());
        assert!(
            seen && total > 0,
            "worker {pid}: the memory search cannot see the provider address {marker} ({total} bytes read; unreadable: {unread:?})"
        );
        for (what, key) in &keys {
            for hit in memory_hits(*pid, &regions, key) {
                problems.push(format!("{what}: {hit}"));
            }
        }
    }

    let mut kw: Keyward = kw;
    kw.stop();
    for (what, key) in &keys {
        for r in &answers {
            for f in find_forms(r.text.as_bytes(), key.as_bytes()) {
                problems.push(format!("{what}: {f} in the answer to {} {}", r.method, r.path));
            }
        }
        for f in find_forms(&kw.output_bytes(), key.as_bytes()) {
            problems.push(format!("{what}: {f} in the server output (trace)"));
        }
        for f in find_forms(&kw.cli_output_bytes(), key.as_bytes()) {
            problems.push(format!("{what}: {f} in CLI output"));
        }
        for e in &exports {
            for f in find_forms(e.as_bytes(), key.as_bytes()) {
                problems.push(format!("{what}: {f} in the audit export"));
            }
        }
        for (path, bytes) in kw.data_files() {
            for f in find_forms(&bytes, key.as_bytes()) {
                problems.push(format!("{what}: {f} in file {}", path.display()));
            }
        }
    }
    assert!(
        kw.stderr().lines().count() >= 10,
        "expected trace logs to search, got:\n{}",
        kw.output()
    );
    assert!(
        problems.is_empty(),
        "{} leaks:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
