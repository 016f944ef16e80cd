//! `keyward-bench`: measures the real binary over loopback. Run through `bench/run.sh`,
//! which builds everything in release mode first.
//!
//! `keyward-bench save-list [--clients N] [--seconds S]`: N clients each loop "save a key
//! (PUT, a rotation after the first), then list (GET)" for S seconds against a fresh
//! keyward on SQLite; prints saves/s and latency percentiles, plus the in-process time to
//! seal and open one key and the sealed blob's size.
//!
//! `keyward-bench soak`: many long streaming calls at once, with faults (see `soak.rs`).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark tool: report or stop"
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod gateway;
mod load;
mod procs;
mod soak;

use keyward_crypto::{local, Binding};
use keyward_testkit::{Http, Keyward, Options};
use serde_json::json;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn keyward_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().join("keyward")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("save-list") => save_list(&args),
        Some("nodes") => nodes(&args),
        Some("gateway") => gateway::gateway(&args),
        Some("soak") => soak::soak(&args),
        _ => {
            eprintln!("usage: keyward-bench gateway [--seconds S] [--runs N] [--rate R] [--connections 1,32,256] | save-list [--clients N] [--seconds S] | nodes | soak [--concurrency N] [--duration S] [--postgres URL] [--stream-ms MS] [--timeout S] [--settle S] [--no-faults] [--json PATH]");
            std::process::exit(2);
        }
    }
}

/// A server process a benchmark runs (a fake provider, LiteLLM), with its base URL; killed on
/// drop, so a benchmark that panics (a closed stdout pipe is enough) does not leave it running.
pub(crate) struct Served {
    pub(crate) child: std::process::Child,
    pub(crate) url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `keyward-fakes` (a separate process, so it does not share the load generator's
/// runtime).
fn start_fakes() -> Served {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap().parent().unwrap().join("keyward-fakes");
    let mut child = std::process::Command::new(exe)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run keyward-fakes (bench/run.sh builds it)");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    Served { child, url }
}

struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// `clients` closed-loop clients for `seconds`, each sending `make()`'s request.
fn closed_loop(
    rt: &tokio::runtime::Runtime,
    clients: usize,
    seconds: u64,
    make: Arc<dyn Fn(&keyward_testkit::reqwest::Client) -> keyward_testkit::reqwest::RequestBuilder + Send + Sync>,
) -> Run {
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let make = make.clone();
            tasks.push(tokio::spawn(async move {
                let client = keyward_testkit::reqwest::Client::builder().no_proxy().build().unwrap();
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match make(&client).send().await {
                        Ok(r) => {
                            let ok = r.status().is_success();
                            let _ = r.bytes().await;
                            errors += u64::from(!ok);
                        }
                        Err(_) => errors += 1,
                    }
                    lat.push(t.elapsed());
                }
                (lat, errors)
            }));
        }
        let (mut lat, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort();
        Run {
            rps: lat.len() as f64 / secs,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            errors,
        }
    })
}

/// Saves/s and AI calls/s (own key, fake provider): SQLite on one node, PostgreSQL on one
/// node, PostgreSQL on two nodes (clients split between them), in one run.
#[allow(clippy::disallowed_methods, reason = "the bench reads where its PostgreSQL is")]
fn nodes(args: &[String]) {
    let seconds = arg(args, "--seconds", 5);
    let clients = arg(args, "--clients", 32) as usize;
    let pg = std::env::var("KEYWARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let fakes = start_fakes();
    let fake_url = fakes.url.clone();
    let key = "sk-proj-benchbenchbenchbenchbench0001";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = keyward_testkit::reqwest::Client::builder().no_proxy().build().unwrap();
        c.post(format!("{fake_url}/_fake/keys"))
            .json(&json!({ "key": key, "behaviour": "ok" }))
            .send()
            .await
            .unwrap();
    });
    let base = |o: Options| o.log("warn").env("KEYWARD_OPENAI_BASE_URL", &fake_url);
    println!("{clients} clients, {seconds} s per run, fake OpenAI on loopback, own key");
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "setup", "saves/s", "save p99", "ai calls/s", "ai p50", "ai p99", "errors"
    );
    let db = rt.block_on(keyward_testkit::pg::TempDatabase::create(&pg));
    let setups: Vec<(&str, Vec<Keyward>)> = vec![
        (
            "SQLite, 1 node",
            vec![Keyward::start(&keyward_bin(), base(Options::default()))],
        ),
        (
            "PostgreSQL, 1 node",
            vec![Keyward::start(
                &keyward_bin(),
                base(Options::default()).env("KEYWARD_DATABASE_URL", &db.url),
            )],
        ),
    ];
    let mut runs = setups;
    // Two nodes on a second, fresh database.
    let db2 = rt.block_on(keyward_testkit::pg::TempDatabase::create(&pg));
    let a = Keyward::start(
        &keyward_bin(),
        base(Options::default()).env("KEYWARD_DATABASE_URL", &db2.url),
    );
    let b = Keyward::start(
        &keyward_bin(),
        base(Options::default())
            .env("KEYWARD_DATABASE_URL", &db2.url)
            .same_keys_as(&a),
    );
    runs.push(("PostgreSQL, 2 nodes", vec![a, b]));
    for (name, nodes) in &runs {
        let token = nodes[0].owner_token().to_owned();
        let account = nodes[0].owner_account().to_owned();
        rt.block_on(async {
            let http = Http::new(nodes[0].base_url());
            http.put(
                &format!("/v1/accounts/{account}/model-keys/openai"),
                Some(&token),
                &json!({ "api_key": key }),
            )
            .await
            .expect_status(200);
            http.put(
                &format!("/v1/accounts/{account}/model-keys/openai/source"),
                Some(&token),
                &json!({ "source": "own" }),
            )
            .await
            .expect_status(200);
        });
        let urls: Vec<String> = nodes.iter().map(|n| n.base_url().to_owned()).collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (u, t, a, n) = (urls.clone(), token.clone(), account.clone(), next.clone());
        let saves = closed_loop(
            &rt,
            clients,
            seconds,
            Arc::new(move |c| {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c.put(format!("{}/v1/accounts/{a}/model-keys/google", u[i % u.len()]))
                    .bearer_auth(&t)
                    .json(&json!({ "api_key": format!("AQ.Ab8RN6{i:044}") }))
            }),
        );
        let (u, t, a, n) = (urls.clone(), token.clone(), account.clone(), next.clone());
        let body = json!({ "provider": "openai", "model": "gpt-6-luna", "messages": [{ "role": "user", "content": "Say hello" }], "max_tokens": 5 });
        let calls = closed_loop(
            &rt,
            clients,
            seconds,
            Arc::new(move |c| {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c.post(format!("{}/v1/accounts/{a}/ai/messages", u[i % u.len()]))
                    .bearer_auth(&t)
                    .json(&body)
            }),
        );
        println!(
            "{:<22} {:>10.0} {:>10} {:>12.0} {:>10} {:>10} {:>10}",
            name,
            saves.rps,
            ms(saves.p99),
            calls.rps,
            ms(calls.p50),
            ms(calls.p99),
            saves.errors + calls.errors
        );
    }
    drop(runs);
    drop((db, db2));
    drop(fakes);
}

fn save_list(args: &[String]) {
    let clients = arg(args, "--clients", 16) as usize;
    let seconds = arg(args, "--seconds", 10);
    let kw = Keyward::start(&keyward_bin(), Options::default().log("warn"));
    let token = kw.owner_token().to_owned();
    let account = kw.owner_account().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (saves, lists, errors, elapsed) = rt.block_on(async {
        let http = Arc::new(Http::new(kw.base_url()));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (http, token, account) = (http.clone(), token.clone(), account.clone());
            tasks.push(tokio::spawn(async move {
                let (mut saves, mut lists, mut errors) = (Vec::new(), Vec::new(), 0u64);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let key = format!("sk-proj-bench{c:04}x{n:012}abcdefghijklmnop");
                    let t = Instant::now();
                    let r = http
                        .put(
                            &format!("/v1/accounts/{account}/model-keys/openai"),
                            Some(&token),
                            &json!({ "api_key": key }),
                        )
                        .await;
                    saves.push(t.elapsed());
                    errors += u64::from(r.status != 200);
                    let t = Instant::now();
                    let r = http
                        .get(&format!("/v1/accounts/{account}/model-keys"), Some(&token))
                        .await;
                    lists.push(t.elapsed());
                    errors += u64::from(r.status != 200);
                }
                (saves, lists, errors)
            }));
        }
        let (mut saves, mut lists, mut errors) = (Vec::new(), Vec::new(), 0);
        for t in tasks {
            let (s, l, e) = t.await.unwrap();
            saves.extend(s);
            lists.extend(l);
            errors += e;
        }
        (saves, lists, errors, started.elapsed())
    });
    let (mut saves, mut lists) = (saves, lists);
    saves.sort();
    lists.sort();
    let secs = elapsed.as_secs_f64();
    println!("save-and-list, SQLite, {clients} clients, {secs:.1} s, {errors} errors");
    println!(
        "  saves: {:>8.0}/s  p50 {}  p99 {}  max {}",
        saves.len() as f64 / secs,
        ms(percentile(&saves, 0.5)),
        ms(percentile(&saves, 0.99)),
        ms(*saves.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  lists: {:>8.0}/s  p50 {}  p99 {}  max {}",
        lists.len() as f64 / secs,
        ms(percentile(&lists, 0.5)),
        ms(percentile(&lists, 0.99)),
        ms(*lists.last().unwrap_or(&Duration::ZERO))
    );

    // In-process: seal and open one key, and the blob's size.
    let dir = tempfile::tempdir().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let sealer = local::load_sealer(dir.path()).unwrap();
    let opener = local::load_opener(dir.path()).unwrap();
    let binding = Binding {
        account_id: "acc_00000000000000000000000000000000",
        provider: "openai",
        key_id: "key_00000000000000000000000000000000",
    };
    let key =
        b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwx";
    let n = 2000u32;
    let t = Instant::now();
    let mut blob = sealer.seal(&binding, key).unwrap();
    for _ in 1..n {
        blob = sealer.seal(&binding, key).unwrap();
    }
    let seal = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        let opened = opener.open(&binding, &blob).unwrap();
        assert_eq!(opened.expose(), key);
    }
    let open = t.elapsed() / n;
    println!("  seal one key: {}  open one key: {}", ms(seal), ms(open));
    println!(
        "  sealed blob: {} bytes for a {}-byte key (113 + kek id + key)",
        blob.as_bytes().len(),
        key.len()
    );
}
