//! `keyward-bench gateway`: what keyward adds to an AI call, next to the direct call (and,
//! with `--litellm`, next to LiteLLM proxy), all in one run against one fake provider.
//!
//! The fake is nginx returning fixed answers in each provider's format (`bench/nginx.conf`),
//! so that it is never the bottleneck. keyward is the release binary on SQLite with the
//! local KEK; the account uses its own OpenAI key, so every call opens its sealed key in a
//! worker and commits a durable audit event. Targets:
//! - `direct`: the fake itself, `POST /v1/chat/completions`;
//! - `ai/messages`: keyward's own route;
//! - `passthrough`: keyward's OpenAI-compatible route (what the OpenAI SDK calls);
//! - `litellm`: LiteLLM proxy in front of the same fake (only with `--litellm`);
//! - `… (baseline)`: the same two routes on another keyward build (`--baseline-bin PATH`;
//!   `bench/run.sh --baseline REV` builds one), for a change's before and after in one run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_testkit::{Http, Keyward, Options};
use serde_json::json;

use crate::load::{self, RunStats, Target};
use crate::procs::{self, PeakRss};
use crate::{arg, keyward_bin, start_fakes, Served};

const OPENAI_KEY: &str = "sk-proj-benchbenchbenchbenchbench0001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-benchbenchbenchbenchbenchbench0001";

/// A fake provider served by nginx from a configuration in its own directory.
struct Nginx {
    served: Served,
    _dir: tempfile::TempDir,
}

/// A loopback port free right now (for a server that must bind a known port).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(url: &str, what: &str) {
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    for _ in 0..600 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on {addr}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start_nginx() -> Option<Nginx> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = std::fs::read_to_string(repo_root().join("bench/nginx.conf"))
        .unwrap()
        .replace("__PREFIX__", &dir.path().display().to_string())
        .replace("__PORT__", &port.to_string());
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let served = Served {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_for_port(&served.url, "nginx");
    Some(Nginx { served, _dir: dir })
}

/// LiteLLM proxy (2 workers) in front of the fake; killed on drop.
struct LiteLlm {
    served: Served,
    master_key: String,
    _dir: tempfile::TempDir,
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        // uvicorn's workers are its children: end the whole group (`served` then reaps
        // the parent).
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.served.child.id()))
            .status();
    }
}

fn start_litellm(exe: &str, fake_url: &str) -> LiteLlm {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = std::fs::read_to_string(repo_root().join("bench/litellm.yaml"))
        .unwrap()
        .replace("__FAKE_URL__", fake_url);
    let conf_path = dir.path().join("litellm.yaml");
    std::fs::write(&conf_path, conf).unwrap();
    let master_key = "sk-bench-litellm-master".to_owned();
    let child = Command::new(exe)
        .arg("--config")
        .arg(&conf_path)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--num_workers", "2"])
        .env("LITELLM_MASTER_KEY", &master_key)
        .env("LITELLM_LOG", "ERROR")
        .env("NO_PROXY", "*")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let litellm = LiteLlm {
        served: Served {
            child,
            url: format!("http://127.0.0.1:{port}"),
        },
        master_key,
        _dir: dir,
    };
    wait_for_port(&litellm.served.url, "litellm");
    litellm
}

/// One measured cell: a target at a load.
#[derive(Debug, Clone, Default)]
struct Cell {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    first_error: Option<String>,
    rss_mib: f64,
    /// CPU time of the measured server's processes per request, in microseconds.
    cpu_us: f64,
}

fn cell(stats: &RunStats, rss_mib: f64, cpu_s: f64) -> Cell {
    Cell {
        rps: stats.rps(),
        p50: stats.ms(0.50),
        p90: stats.ms(0.90),
        p99: stats.ms(0.99),
        max: stats.max_ms(),
        errors: stats.errors,
        first_error: stats.first_error.clone(),
        rss_mib,
        cpu_us: cpu_s * 1e6 / (stats.requests.max(1) as f64),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median of each field over the runs (errors: the largest).
fn median_cell(cells: &[Cell]) -> Cell {
    let m = |f: fn(&Cell) -> f64| median(cells.iter().map(f).collect());
    Cell {
        rps: m(|c| c.rps),
        p50: m(|c| c.p50),
        p90: m(|c| c.p90),
        p99: m(|c| c.p99),
        max: m(|c| c.max),
        errors: cells.iter().map(|c| c.errors).max().unwrap_or(0),
        first_error: cells.iter().find_map(|c| c.first_error.clone()),
        rss_mib: m(|c| c.rss_mib),
        cpu_us: m(|c| c.cpu_us),
    }
}

/// Runs one load against a target.
type LoadFn = dyn Fn(&Target) -> RunStats;

struct Server {
    name: &'static str,
    target: Target,
    /// The process tree measured for memory and CPU (none for the fake itself).
    root_pid: Option<u32>,
}

fn measure(server: &Server, run: &dyn Fn(&Target) -> RunStats) -> Cell {
    let sampler = server.root_pid.map(PeakRss::start);
    let pids = server.root_pid.map(procs::tree).unwrap_or_default();
    let cpu0 = procs::cpu_seconds(&pids);
    let stats = run(&server.target);
    let cpu = procs::cpu_seconds(&pids) - cpu0;
    let rss = sampler.map_or(0.0, PeakRss::finish);
    procs::wait_idle(&pids, Duration::from_secs(180));
    cell(&stats, rss, cpu)
}

/// A keyward under test, set up as every target expects: the owner's own OpenAI and
/// Anthropic keys, registered at the fake (Anthropic's stream with chunks 10 ms apart).
struct Started {
    keyward: Keyward,
    token: String,
    account: String,
}

fn start_keyward(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    fake_url: &str,
    fakes_url: &str,
    server_env: &[(String, String)],
) -> Started {
    // Anthropic goes to keyward-fakes, for the streaming measurement (chunks 10 ms apart).
    let mut options = Options::default()
        .log("warn")
        .env("KEYWARD_OPENAI_BASE_URL", fake_url)
        .env("KEYWARD_ANTHROPIC_BASE_URL", fakes_url);
    for (name, value) in server_env {
        options = options.env(name, value);
    }
    let keyward = Keyward::start(bin, options);
    let token = keyward.owner_token().to_owned();
    let account = keyward.owner_account().to_owned();
    rt.block_on(async {
        let c = keyward_testkit::reqwest::Client::builder().no_proxy().build().unwrap();
        for key in [OPENAI_KEY, ANTHROPIC_KEY] {
            let r = c
                .post(format!("{fakes_url}/_fake/keys"))
                .json(&json!({ "key": key, "behaviour": "slow_stream", "delay_ms": 10 }))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "fake key registration: {}", r.status());
        }
        let http = Http::new(keyward.base_url());
        for (provider, key) in [("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)] {
            http.put(
                &format!("/v1/accounts/{account}/model-keys/{provider}"),
                Some(&token),
                &json!({ "api_key": key }),
            )
            .await
            .expect_status(200);
            http.put(
                &format!("/v1/accounts/{account}/model-keys/{provider}/source"),
                Some(&token),
                &json!({ "source": "own" }),
            )
            .await
            .expect_status(200);
        }
    });
    Started {
        keyward,
        token,
        account,
    }
}

pub fn gateway(args: &[String]) {
    let seconds = arg(args, "--seconds", 5);
    let runs = arg(args, "--runs", 1).max(1);
    let rate = arg(args, "--rate", 4000);
    let litellm_exe = args.windows(2).find(|w| w[0] == "--litellm").map(|w| w[1].clone());
    let conns: Vec<usize> = args
        .windows(2)
        .find(|w| w[0] == "--connections")
        .map_or("1,32,256", |w| w[1].as_str())
        .split(',')
        .filter_map(|c| c.parse().ok())
        .collect();

    // `--server-env NAME=VALUE` (repeatable): a setting for keyward, for tuning runs.
    let server_env: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--server-env")
        .filter_map(|w| w[1].split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let nginx = start_nginx();
    let fakes = start_fakes();
    let fakes_url = fakes.url.clone();
    let (fake_url, fake_name) = match &nginx {
        Some(n) => (n.served.url.clone(), "nginx (fixed answers)"),
        None => (fakes_url.clone(), "keyward-fakes (nginx not installed)"),
    };
    // `--baseline-bin PATH`: another keyward build (e.g. main before a change), measured in
    // the same run against the same fake, so a change's effect is read from one table.
    let baseline_bin = args
        .windows(2)
        .find(|w| w[0] == "--baseline-bin")
        .map(|w| PathBuf::from(&w[1]));
    let kw = start_keyward(&rt, &keyward_bin(), &fake_url, &fakes_url, &server_env);
    let baseline = baseline_bin
        .as_deref()
        .map(|bin| start_keyward(&rt, bin, &fake_url, &fakes_url, &server_env));
    let litellm = litellm_exe.as_deref().map(|exe| start_litellm(exe, &fake_url));

    let native_body = serde_json::to_vec(&json!({
        "model": "gpt-6-luna",
        "messages": [{ "role": "user", "content": "Say hello" }],
        "max_completion_tokens": 5
    }))
    .unwrap();
    let messages_body = serde_json::to_vec(&json!({
        "provider": "openai", "model": "gpt-6-luna",
        "messages": [{ "role": "user", "content": "Say hello" }], "max_tokens": 5
    }))
    .unwrap();
    let json_ct = ("content-type", "application/json");
    let bearer_key = format!("Bearer {OPENAI_KEY}");
    let mut servers = vec![Server {
        name: "direct",
        target: Target::post(
            &format!("{fake_url}/v1/chat/completions"),
            &[json_ct, ("authorization", &bearer_key)],
            &native_body,
        ),
        root_pid: None,
    }];
    let kws: Vec<(&Started, [&'static str; 2])> = std::iter::once((&kw, ["ai/messages", "passthrough"]))
        .chain(
            baseline
                .as_ref()
                .map(|b| (b, ["ai/messages (baseline)", "passthrough (baseline)"])),
        )
        .collect();
    for (k, [messages_name, passthrough_name]) in &kws {
        let bearer_token = format!("Bearer {}", k.token);
        let base = k.keyward.base_url();
        let account = &k.account;
        servers.push(Server {
            name: messages_name,
            target: Target::post(
                &format!("{base}/v1/accounts/{account}/ai/messages"),
                &[json_ct, ("authorization", &bearer_token)],
                &messages_body,
            ),
            root_pid: k.keyward.pid(),
        });
        servers.push(Server {
            name: passthrough_name,
            target: Target::post(
                &format!("{base}/v1/accounts/{account}/providers/openai/v1/chat/completions"),
                &[json_ct, ("authorization", &bearer_token)],
                &native_body,
            ),
            root_pid: k.keyward.pid(),
        });
    }
    if let Some(l) = &litellm {
        let bearer_master = format!("Bearer {}", l.master_key);
        servers.push(Server {
            name: "litellm",
            target: Target::post(
                &format!("{}/v1/chat/completions", l.served.url),
                &[json_ct, ("authorization", &bearer_master)],
                &native_body,
            ),
            root_pid: Some(l.served.child.id()),
        });
    }

    // Warm up every path (connections, worker pools, SQLite caches).
    for s in &servers {
        let w = rt.block_on(load::closed_loop(&s.target, 8, Duration::from_secs(1)));
        assert!(
            w.errors == 0 || s.name == "litellm",
            "{} fails during warm-up: {:?}",
            s.name,
            w.first_error
        );
    }

    let duration = Duration::from_secs(seconds);
    // Loads: closed loop at each connection count, then open loop at `rate`.
    let mut loads: Vec<(String, Box<LoadFn>)> = Vec::new();
    for &c in &conns {
        let rt2 = rt.handle().clone();
        loads.push((
            format!("closed {c}"),
            Box::new(move |t: &Target| rt2.block_on(load::closed_loop(t, c, duration))),
        ));
    }
    {
        let rt2 = rt.handle().clone();
        loads.push((
            format!("open {rate}/s"),
            Box::new(move |t: &Target| rt2.block_on(load::open_loop(t, rate, 256, duration))),
        ));
    }

    let started = Instant::now();
    // results[load][server] = cells over runs
    let mut results: Vec<Vec<Vec<Cell>>> = vec![vec![Vec::new(); servers.len()]; loads.len()];
    for _ in 0..runs {
        for (li, (_, run)) in loads.iter().enumerate() {
            for (si, s) in servers.iter().enumerate() {
                results[li][si].push(measure(s, run.as_ref()));
            }
        }
    }

    println!();
    println!("keyward gateway benchmark: fake provider = {fake_name}; keyward release build, SQLite, local KEK, own OpenAI key;");
    println!(
        "{seconds} s per cell, median of {runs} run(s); load generator, fake and servers share this machine ({} cores); {:.0} s in all",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| load | path | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | peak RSS MiB | server CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut medians: Vec<Vec<Cell>> = Vec::new();
    for (li, (lname, _)) in loads.iter().enumerate() {
        let row: Vec<Cell> = results[li].iter().map(|cells| median_cell(cells)).collect();
        for (si, s) in servers.iter().enumerate() {
            let c = &row[si];
            let rss = if s.root_pid.is_some() {
                format!("{:.1}", c.rss_mib)
            } else {
                "-".into()
            };
            let cpu = if s.root_pid.is_some() {
                format!("{:.0}", c.cpu_us)
            } else {
                "-".into()
            };
            println!(
                "| {lname} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {rss} | {cpu} |",
                s.name, c.rps, c.p50, c.p90, c.p99, c.max, c.errors
            );
        }
        medians.push(row);
    }
    println!();
    println!("Ratios (through minus direct, same run):");
    for (li, (lname, _)) in loads.iter().enumerate() {
        let direct = &medians[li][0];
        for (si, s) in servers.iter().enumerate().skip(1) {
            let c = &medians[li][si];
            println!(
                "- {lname}, {}: added p50 {:.3} ms, added p99 {:.3} ms; throughput {:.3} x direct; errors {}{}; peak RSS {:.1} MiB",
                s.name,
                c.p50 - direct.p50,
                c.p99 - direct.p99,
                c.rps / direct.rps.max(1e-9),
                c.errors,
                c.first_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})")),
                c.rss_mib
            );
        }
        if let Some(li_idx) = servers.iter().position(|s| s.name == "litellm") {
            let l = &medians[li][li_idx];
            for (si, s) in servers.iter().enumerate().skip(1).take(2) {
                let c = &medians[li][si];
                println!(
                    "- {lname}, {} vs litellm: {:.1} x the throughput, p50 {:.3} ms vs {:.3} ms, memory {:.1} vs {:.1} MiB",
                    s.name,
                    c.rps / l.rps.max(1e-9),
                    c.p50,
                    l.p50,
                    c.rss_mib,
                    l.rss_mib
                );
            }
        }
    }

    // Streaming: time to the first text, chunks 10 ms apart (Anthropic format, keyward-fakes).
    let samples = 21;
    let stream_native = serde_json::to_vec(&json!({
        "model": "claude-haiku-5-5", "max_tokens": 8, "stream": true,
        "messages": [{ "role": "user", "content": "Say hello" }]
    }))
    .unwrap();
    let stream_messages = serde_json::to_vec(&json!({
        "provider": "anthropic", "model": "claude-haiku-5-5", "max_tokens": 8, "stream": true,
        "messages": [{ "role": "user", "content": "Say hello" }]
    }))
    .unwrap();
    let mut stream_targets = vec![(
        "direct",
        Target::post(
            &format!("{fakes_url}/v1/messages"),
            &[
                json_ct,
                ("x-api-key", ANTHROPIC_KEY),
                ("anthropic-version", "2023-06-01"),
            ],
            &stream_native,
        ),
        &b"text_delta"[..],
    )];
    for (k, [messages_name, passthrough_name]) in &kws {
        let bearer_token = format!("Bearer {}", k.token);
        let base = k.keyward.base_url();
        let account = &k.account;
        stream_targets.push((
            messages_name,
            Target::post(
                &format!("{base}/v1/accounts/{account}/ai/messages"),
                &[json_ct, ("authorization", &bearer_token)],
                &stream_messages,
            ),
            &b"event: delta"[..],
        ));
        stream_targets.push((
            passthrough_name,
            Target::post(
                &format!("{base}/v1/accounts/{account}/providers/anthropic/v1/messages"),
                &[json_ct, ("x-api-key", &k.token), ("anthropic-version", "2023-06-01")],
                &stream_native,
            ),
            &b"text_delta"[..],
        ));
    }
    println!();
    println!("Streaming (Anthropic format, chunks 10 ms apart): time to first text, median of {samples}");
    let mut direct_ttft = 0.0;
    for (name, target, marker) in &stream_targets {
        let mut ttft = Vec::new();
        let mut total = Vec::new();
        for _ in 0..samples {
            let (f, e) = rt
                .block_on(load::time_to(target, marker))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            ttft.push(f.as_secs_f64() * 1e3);
            total.push(e.as_secs_f64() * 1e3);
        }
        let (f, e) = (median(ttft), median(total));
        if *name == "direct" {
            direct_ttft = f;
            println!("- {name}: first text {f:.3} ms, whole stream {e:.3} ms");
        } else {
            println!(
                "- {name}: first text {f:.3} ms (added {:.3} ms), whole stream {e:.3} ms",
                f - direct_ttft
            );
        }
    }
    drop(litellm);
    drop(kw);
    drop(baseline);
    drop(nginx);
    drop(fakes);
}
