//! `KEYWARD_KEK=awskms:…` through the real binary (feature `awskms`), against moto's KMS on
//! loopback: keys saved and opened by sandboxed workers through KMS, `/readyz` naming the
//! backend, KMS going away mid-run (refusing, then silent) and coming back, and rotate →
//! re-wrap → retire.
//!
//! KMS is reached through a small TCP proxy written here, whose forwarding can be switched
//! off: refusing (new connections closed at once, open ones cut) or silent (connections
//! accepted and never answered).

#![cfg(feature = "awskms")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyward_crypto::awskms::{AwsKmsConfig, AwsKmsKek};
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::Keyward;
use secrecy::SecretString;

use crate::ai_support::*;
use crate::common::*;
use crate::kek::{all_blobs, backup_db, restore_db, versions, wait_log};

// ---- moto (keyward-testenv) ---------------------------------------------------------------

use keyward_testenv::moto::start as moto;

// ---- a switchable loopback proxy ---------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward to moto.
    On,
    /// Close new connections at once; cut open ones.
    Refuse,
    /// Accept and never answer; cut open ones.
    Silent,
}

struct Proxy {
    port: u16,
    mode: tokio::sync::watch::Sender<Mode>,
}

impl Proxy {
    async fn start(upstream_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = tokio::sync::watch::channel(Mode::On);
        let modes = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = modes.subscribe();
                tokio::spawn(async move {
                    let now = *rx.borrow_and_update();
                    match now {
                        Mode::Refuse => drop(client),
                        Mode::Silent => {
                            // Held open, unanswered, until the mode changes.
                            let _ = rx.changed().await;
                        }
                        Mode::On => {
                            let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                                // Any switch cuts the connection.
                                _ = rx.changed() => {}
                            }
                        }
                    }
                });
            }
        });
        Proxy { port, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

// ---- helpers -----------------------------------------------------------------------------

fn credentials_file(dir: &std::path::Path, name: &str, access: &str, secret: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("access_key_id={access}\nsecret_access_key={secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn readyz_kek(kw: &Keyward) -> (u16, serde_json::Value) {
    // The probe's answer is reused for one second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = kw.http().get("/readyz", None).await;
    (r.status, r.json()["kek"].clone())
}

/// Every saved key opens (the fake answers 200 only for the exact key it was given).
async fn all_calls_ok(kw: &Keyward, token: &str, account: &str, when: &str) {
    for p in PROVIDERS {
        let r = ai_call(kw, token, account, &chat_body(p, false, 16)).await;
        assert_eq!(r.status, 200, "{p} {when}: {r}");
    }
}

async fn put_key(kw: &Keyward, token: &str, account: &str, p: &str) -> keyward_testkit::Resp {
    kw.http()
        .put(
            &key_path(account, p),
            Some(token),
            &serde_json::json!({ "api_key": key_for(p) }),
        )
        .await
}

/// Asserts a 503 `kek_unavailable`, and returns how long it took.
async fn expect_kek_unavailable(what: &str, f: impl std::future::Future<Output = keyward_testkit::Resp>) -> Duration {
    let started = Instant::now();
    let r = f.await;
    let took = started.elapsed();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("kek_unavailable")),
        "{what}: {r}"
    );
    took
}

// ---- the test ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awskms_calls_outage_and_recovery_rotate_rewrap_retire_through_the_binary() {
    let Some(moto) = moto() else { return };
    let proxy = Proxy::start(moto.port).await;
    let dir = tempfile::tempdir().unwrap();
    const GATEWAY_SECRET: &str = "gw-SECRET-4f1c9e";
    const WORKER_SECRET: &str = "wk-SECRET-93ab20";
    const ADMIN_SECRET: &str = "ad-SECRET-77d0e1";
    let gateway = credentials_file(dir.path(), "gateway.creds", "AKIAGATEWAY", GATEWAY_SECRET);
    let worker = credentials_file(dir.path(), "worker.creds", "AKIAWORKER", WORKER_SECRET);
    let admin = credentials_file(dir.path(), "admin.creds", "AKIAADMIN", ADMIN_SECRET);
    // Version 1: a key made in KMS beforehand (straight to moto, not through the proxy).
    let direct = |key_id: &str| {
        AwsKmsConfig::parse(&format!(
            "awskms:key-id={key_id};region=eu-west-1;endpoint={}",
            moto.url
        ))
        .unwrap()
    };
    let secret = || SecretString::from(ADMIN_SECRET.to_owned());
    let key_1 = AwsKmsKek::create_key(&direct("-"), "AKIAADMIN", &secret())
        .await
        .unwrap();
    let kek = format!(
        "awskms:key-id={key_1};region=eu-west-1;endpoint={};gateway-credentials-file={};worker-credentials-file={}",
        proxy.url(),
        gateway.display(),
        worker.display()
    );
    let fake = FakeProviders::start().expect("start fakes");
    let mut kw = start_with(fake_options(&fake, &[("KEYWARD_KEK", &kek)]));
    let (user, acc) = pro_owner(&kw, "kms@example.com");
    let t = user.token.clone();
    own_keys_everywhere(&fake, &kw, &t, &acc).await;
    let pool = kw.db().await;
    let saved = all_blobs(&pool).await;
    assert_eq!(versions(&saved), BTreeMap::from([("awskms-1".to_owned(), 3)]));
    assert_eq!(
        std::fs::read_to_string(kw.data_dir().join("kek/awskms-1.keyid"))
            .unwrap()
            .trim(),
        key_1
    );
    all_calls_ok(&kw, &t, &acc, "with KMS up").await;
    // The platform's shared-pool key, sealed by the CLI with the gateway's credentials.
    let pool_key = key_for("google");
    fake.set_key(provider("google"), &pool_key, Behaviour::Ok);
    set_shared_key(&kw, "google", &pool_key);
    let (other, acc_2) = pro_owner(&kw, "pool@example.com");
    set_source(&kw, &other.token, &acc_2, "google", "shared").await;
    let r = ai_call(&kw, &other.token, &acc_2, &chat_body("google", false, 16)).await;
    assert_eq!(r.status, 200, "the shared-pool key opens through KMS: {r}");
    let (status, ready) = readyz_kek(&kw).await;
    assert_eq!(
        (status, ready["backend"].as_str(), ready["status"].as_str()),
        (200, Some("awskms"), Some("ok")),
        "{ready}"
    );

    // Neither side's credentials reach a worker's argv or environment; the worker is not
    // even told where the gateway's file is.
    let workers = wait_workers(&kw, 2, &[], Duration::from_secs(30)).await;
    for pid in workers {
        for what in ["cmdline", "environ"] {
            let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{what}")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes);
            for needle in [GATEWAY_SECRET, WORKER_SECRET, "gateway.creds"] {
                assert!(!text.contains(needle), "worker {pid} {what} holds {needle}");
            }
        }
    }

    // KMS refuses connections: calls, saves and /readyz answer 503 kek_unavailable quickly.
    proxy.set(Mode::Refuse);
    let took = expect_kek_unavailable(
        "call, KMS refusing",
        ai_call(&kw, &t, &acc, &chat_body("openai", false, 16)),
    )
    .await;
    assert!(took < Duration::from_secs(3), "bounded: {took:?}");
    println!("awskms e2e: call with KMS refusing answered 503 in {took:?}");
    expect_kek_unavailable("save, KMS refusing", put_key(&kw, &t, &acc, "openai")).await;
    let (status, ready) = readyz_kek(&kw).await;
    assert_eq!(
        (status, ready["backend"].as_str(), ready["status"].as_str()),
        (503, Some("awskms"), Some("unavailable")),
        "{ready}"
    );
    assert!(ready["message"].as_str().unwrap_or("").contains("awskms"), "{ready}");

    // KMS accepts and never answers: every KMS call times out (2 s), so a call ends after
    // the worker's three tries, a save after one, /readyz after one; nothing hangs.
    proxy.set(Mode::Silent);
    let took = expect_kek_unavailable(
        "call, KMS silent",
        ai_call(&kw, &t, &acc, &chat_body("anthropic", false, 16)),
    )
    .await;
    assert!(
        (Duration::from_secs(5)..Duration::from_secs(10)).contains(&took),
        "three tries, each cut at 2 s: {took:?}"
    );
    println!("awskms e2e: call with KMS silent answered 503 in {took:?}");
    let took = expect_kek_unavailable("save, KMS silent", put_key(&kw, &t, &acc, "google")).await;
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&took),
        "one try, cut at 2 s: {took:?}"
    );
    println!("awskms e2e: save with KMS silent answered 503 in {took:?}");
    let started = Instant::now();
    let (status, ready) = readyz_kek(&kw).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(
        (status, ready["status"].as_str()),
        (503, Some("unavailable")),
        "{ready}"
    );
    assert_eq!(
        all_blobs(&pool).await,
        saved,
        "nothing saved or changed during the outage"
    );

    // KMS back: every saved key opens again, none changed; saves work.
    proxy.set(Mode::On);
    all_calls_ok(&kw, &t, &acc, "after KMS came back").await;
    assert_eq!(all_blobs(&pool).await, saved);
    let (status, ready) = readyz_kek(&kw).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ok")), "{ready}");
    let k = key_for("openai");
    fake.set_key(provider("openai"), &k, Behaviour::Ok);
    save_key(&kw, &t, &acc, "openai", &k).await;
    all_calls_ok(&kw, &t, &acc, "after a save once KMS came back").await;

    // Open latency through the binary: an own-key call, KMS Decrypt on loopback included.
    let runs = 20;
    let started = Instant::now();
    for _ in 0..runs {
        let r = ai_call(&kw, &t, &acc, &chat_body("openai", false, 16)).await;
        assert_eq!(r.status, 200, "{r}");
    }
    println!(
        "awskms e2e (moto on loopback, debug build): {:?} per own-key call",
        started.elapsed() / runs
    );

    // A database copy taken before the rotation.
    let (_backup_dir, backup) = backup_db(&pool).await;

    // Rotate (a new KMS key, with the admin credentials), re-wrap in the background, retire.
    let admin_arg = admin.display().to_string();
    let out = kw.cli(&["kek", "rotate", "--credentials-file", &admin_arg]);
    out.assert_success();
    assert_eq!(out.json()["created"], "awskms-2", "{out}");
    let key_2 = std::fs::read_to_string(kw.data_dir().join("kek/awskms-2.keyid")).unwrap();
    assert_ne!(key_2.trim(), key_1);
    wait_log(&kw, "sealing to the new primary KEK", 1);
    wait_log(&kw, "background re-wrap finished", 1);
    let out = kw.cli(&["kek", "rewrap"]);
    out.assert_success();
    assert_eq!(out.json_lines().last().unwrap()["done"]["to_move"], 0, "{out}");
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("awskms-2".to_owned(), 3)])
    );
    all_calls_ok(&kw, &t, &acc, "after re-wrap").await;
    let r = kw.cli(&["kek", "retire", "--version", "2", "--credentials-file", &admin_arg]);
    assert!(!r.success(), "the primary is never retired: {r}");
    let out = kw.cli(&["kek", "retire", "--version", "1", "--credentials-file", &admin_arg]);
    out.assert_success();
    assert_eq!(out.json()["destroyed"], true, "{out}");
    assert!(kw.data_dir().join("kek/awskms-1.retired").exists());
    let state = AwsKmsKek::new(&direct(&key_1), 1, "AKIAADMIN", &secret())
        .key_state()
        .await
        .unwrap();
    assert_eq!(state, "PendingDeletion", "disabled and scheduled for deletion in KMS");
    all_calls_ok(&kw, &t, &acc, "after retirement").await;
    let st = kw.cli(&["kek", "status"]).json();
    assert_eq!(
        (
            st["backend"].as_str(),
            st["primary"].as_str(),
            st["rewrap_remaining"].as_u64()
        ),
        (Some("awskms"), Some("awskms-2"), Some(0)),
        "{st}"
    );
    assert_eq!(st["versions"][0]["retired"], true, "{st}");
    assert_eq!(st["versions"][1]["kms_key_id"].as_str(), Some(key_2.trim()), "{st}");

    // The pre-rotation copy, restored: no worker loads the retired version any more.
    restore_db(&mut kw, &backup).await;
    for p in PROVIDERS {
        let r = ai_call(&kw, &t, &acc, &chat_body(p, false, 16)).await;
        assert_eq!(r.status, 500, "{p}: {r}");
    }
    assert!(kw.output().contains("\"awskms-1\", which is not available here"));

    // No secret and no data key in anything keyward printed.
    let printed = format!("{}{}", kw.output(), String::from_utf8_lossy(&kw.cli_output_bytes()));
    for needle in [GATEWAY_SECRET, WORKER_SECRET, ADMIN_SECRET, "\"Plaintext\""] {
        assert!(!printed.contains(needle), "the log holds {needle}");
    }
}
