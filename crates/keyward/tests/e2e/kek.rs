//! KEK versions through the real binary: rotate while serving, re-wrap in a worker, a re-wrap
//! killed with SIGKILL halfway and resumed, retirement, and a database copy taken before the
//! rotation that nothing can open afterwards.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::{db, sqlx, Keyward};
use serde_json::Value;

use crate::ai_support::*;
use crate::common::*;

/// The kek id a blob names (`local-1`, `pkcs11-…`, `awskms-…`), read by the crate's own
/// header parser.
pub fn kek_of(blob: &[u8]) -> String {
    keyward_crypto::SealedKey::from_bytes(blob.to_vec())
        .kek_id()
        .expect("a sealed key blob")
}

/// Every `provider_keys` row in a database file: key id → (account, provider, blob).
pub async fn all_blobs(pool: &sqlx::SqlitePool) -> BTreeMap<String, (String, String, Vec<u8>)> {
    use sqlx::Row;
    sqlx::query("SELECT account_id, provider, key_id, sealed FROM provider_keys")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get("key_id"),
                (r.get("account_id"), r.get("provider"), r.get("sealed")),
            )
        })
        .collect()
}

pub fn versions(blobs: &BTreeMap<String, (String, String, Vec<u8>)>) -> BTreeMap<String, usize> {
    let mut v = BTreeMap::new();
    for (_, _, b) in blobs.values() {
        *v.entry(kek_of(b)).or_insert(0) += 1;
    }
    v
}

/// Waits until the server's log has `needle` at least `times` times.
pub fn wait_log(kw: &Keyward, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while kw.output().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} ×{times} in the log:\n{}",
            kw.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One plain AI call with the account's own key; the fake answers 200 only for the key it
/// was given, so a 200 proves the worker opened the right key.
/// A consistent copy of the live database (`VACUUM INTO`), as an operator's backup would
/// be; the directory holding it is removed when the returned guard drops.
pub async fn backup_db(pool: &sqlx::SqlitePool) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.db");
    sqlx::query(&format!("VACUUM INTO '{}'", backup.display()))
        .execute(pool)
        .await
        .unwrap();
    (dir, backup)
}

/// Stops keyward, puts `backup` in place of its database and starts it again on it.
pub async fn restore_db(kw: &mut Keyward, backup: &std::path::Path) {
    kw.stop();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", kw.db_path().display()));
    }
    std::fs::copy(backup, kw.db_path()).unwrap();
    kw.start_again();
    wait_workers(kw, 2, &[], Duration::from_secs(30)).await;
}

async fn call_ok(kw: &Keyward, token: &str, account: &str, provider: &str) -> bool {
    let r = ai_call(kw, token, account, &chat_body(provider, false, 16)).await;
    r.status == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_killed_halfway_resume_retire_and_old_dumps_stay_shut() {
    let fake = FakeProviders::start().expect("start fakes");
    // The CLI's re-wrap is under test here, not the server's.
    let mut kw = start_on_fake(&fake, &[("KEYWARD_KEK_REWRAP", "manual")]);
    let (user, first) = pro_owner(&kw, "kek@example.com");
    let t = user.token.clone();
    // 4 accounts × 3 providers = 12 own keys, each used for calls.
    let mut keys: Vec<(String, &str)> = Vec::new();
    for i in 0..4 {
        let acc = if i == 0 {
            first.clone()
        } else {
            create_account(&kw, &format!("Acc {i}"), "pro", &user.email)
        };
        for p in PROVIDERS {
            let k = key_for(p);
            fake.set_key(provider(p), &k, Behaviour::Ok);
            save_key(&kw, &t, &acc, p, &k).await;
            set_source(&kw, &t, &acc, p, "own").await;
            keys.push((acc.clone(), p));
        }
    }
    for (acc, p) in &keys {
        assert!(call_ok(&kw, &t, acc, p).await, "{acc} {p} before rotation");
    }
    let ready = kw.http().get("/readyz", None).await;
    ready.expect_status(200);
    assert_eq!(
        (
            &ready.json()["kek"]["backend"],
            &ready.json()["kek"]["kek_id"],
            &ready.json()["kek"]["status"]
        ),
        (&Value::from("local"), &Value::from("local-1"), &Value::from("ok")),
        "{}",
        ready.json()
    );

    // The "backup taken before the rotation": a consistent copy of the database.
    let pool = kw.db().await;
    let (_backup_dir, backup) = backup_db(&pool).await;
    let before = all_blobs(&pool).await;
    assert_eq!(versions(&before), BTreeMap::from([("local-1".to_owned(), 12)]));

    // Rotate while serving: the gateway restarts its workers, then seals to local-2.
    let out = kw.cli(&["kek", "rotate"]);
    out.assert_success();
    assert_eq!(out.json()["created"], "local-2", "{out}");
    wait_log(&kw, "sealing to the new primary KEK", 1);
    let acc_new = create_account(&kw, "After rotation", "pro", &user.email);
    let k = key_for("openai");
    fake.set_key(provider("openai"), &k, Behaviour::Ok);
    save_key(&kw, &t, &acc_new, "openai", &k).await;
    set_source(&kw, &t, &acc_new, "openai", "own").await;
    let row = db::key_row(&pool, &acc_new, "openai").await.unwrap();
    assert_eq!(kek_of(&row.sealed), "local-2", "new keys are sealed to the new primary");
    // The readiness canary is sealed to the new primary and opened by a restarted worker.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ready = kw.http().get("/readyz", None).await;
    ready.expect_status(200);
    assert_eq!(ready.json()["kek"]["kek_id"], "local-2", "{}", ready.json());
    keys.push((acc_new.clone(), "openai"));
    for (acc, p) in &keys {
        assert!(
            call_ok(&kw, &t, acc, p).await,
            "{acc} {p} after rotation, before re-wrap"
        );
    }
    let st = kw.cli(&["kek", "status"]);
    st.assert_success();
    let st = st.json();
    assert_eq!(
        (st["primary"].as_str(), st["rewrap_remaining"].as_u64()),
        (Some("local-2"), Some(12)),
        "{st}"
    );

    // Re-wrap 2 keys a batch, paused between batches; SIGKILL it after the first batch.
    let mut child = kw
        .cli_command()
        .args(["kek", "rewrap", "--batch", "2", "--pause-ms", "2000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first_line: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first_line["progress"]["to_move"], 12, "{first_line}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let halfway = all_blobs(&pool).await;
    let v = versions(&halfway);
    let (v1, v2) = (
        v.get("local-1").copied().unwrap_or(0),
        v.get("local-2").copied().unwrap_or(0),
    );
    assert_eq!(v1 + v2, 13, "every blob under exactly one version: {v:?}");
    assert!(v1 > 0 && v2 > 1, "killed halfway: {v:?}");
    for (kid, (acc, p, blob)) in &halfway {
        let row = db::KeyRow {
            account_id: acc.clone(),
            provider: p.clone(),
            key_id: kid.clone(),
            sealed: blob.clone(),
            last4: String::new(),
        };
        assert!(db::open_row(kw.data_dir(), &row).is_ok(), "{kid} opens halfway");
    }
    for (acc, p) in &keys {
        assert!(call_ok(&kw, &t, acc, p).await, "{acc} {p} halfway");
    }
    // Retirement refuses a version still in use, and the primary.
    let r = kw.cli(&["kek", "retire", "--version", "1"]);
    assert!(!r.success() && r.to_string().contains("still wraps"), "{r}");
    let r = kw.cli(&["kek", "retire", "--version", "2"]);
    assert!(!r.success() && r.to_string().contains("primary"), "{r}");

    // Resume: the rest moves, nothing moves twice.
    let out = kw.cli(&["kek", "rewrap"]);
    out.assert_success();
    let done = out.json_lines().last().cloned().unwrap();
    assert_eq!(done["done"]["rewrapped"].as_u64(), Some(v1 as u64), "{out}");
    assert_eq!(done["done"]["failed"], 0, "{out}");
    let after = all_blobs(&pool).await;
    assert_eq!(versions(&after), BTreeMap::from([("local-2".to_owned(), 13)]));
    for (kid, (_, _, blob)) in &before {
        assert_ne!(&after[kid].2, blob, "{kid} was re-sealed");
    }
    let st = kw.cli(&["kek", "status"]).json();
    assert_eq!(st["rewrap_remaining"], 0, "{st}");
    // The audit chains are untouched by a re-wrap.
    assert_audit_ok(&kw, None);

    // Retire local-1: the key file is gone, the workers forget it, every key still works.
    let restarts = kw.output().matches(RESTARTED).count();
    let out = kw.cli(&["kek", "retire", "--version", "1"]);
    out.assert_success();
    assert_eq!(out.json()["retired"], "local-1");
    assert!(!kw.data_dir().join("kek/local-1.key").exists());
    assert!(!kw.data_dir().join("kek/local-1.pub").exists());
    wait_log(&kw, RESTARTED, restarts + 1);
    for (acc, p) in &keys {
        assert!(call_ok(&kw, &t, acc, p).await, "{acc} {p} after retirement");
    }

    // The pre-rotation dump: nothing can open any of its blobs any more.
    let old = db::connect(&backup).await;
    let old_blobs = all_blobs(&old).await;
    assert_eq!(old_blobs.len(), 12);
    for (kid, (acc, p, blob)) in &old_blobs {
        let err = db::open_blob(kw.data_dir(), acc, p, kid, blob).unwrap_err();
        assert!(err.contains("not available here"), "{kid}: {err}");
    }
    // Restored as the live database, the running gateway's worker refuses every key.
    restore_db(&mut kw, &backup).await;
    for (acc, p) in keys.iter().take(12) {
        let r = ai_call(&kw, &t, acc, &chat_body(p, false, 16)).await;
        assert_eq!(r.status, 500, "{acc} {p}: {r}");
    }
    let log = kw.output();
    assert!(
        log.contains("which is not available here (retired or not installed)"),
        "the worker names the missing KEK"
    );
    let st = kw.cli(&["kek", "status"]).json();
    let v1 = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kek_id"] == "local-1")
        .cloned();
    let v1 = v1.unwrap_or_else(|| panic!("{st}"));
    assert_eq!(
        (
            v1["retired"].as_bool(),
            v1["private_key"].as_bool(),
            v1["blobs"].as_u64()
        ),
        (Some(true), Some(false), Some(12)),
        "{st}"
    );
}

/// What the gateway logs once its workers hold the current KEK versions.
const RESTARTED: &str = "workers restarted with the current KEK versions";

/// Re-wrap throughput: `KEYWARD_REWRAP_BENCH_N` keys (default 10,000) written straight into
/// the database (sealed to local-1 with the real sealer, each bound to its own row), then a
/// rotation and one timed `keyward kek rewrap`. Ignored by default (a measurement, not a
/// check): `cargo test -p keyward --test e2e rewrap_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn rewrap_throughput() {
    #[allow(clippy::disallowed_methods, reason = "a test's own setting")]
    let n: usize = std::env::var("KEYWARD_REWRAP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let kw = start();
    let pool = kw.db().await;
    let sealer = keyward_crypto::local::load_sealer(kw.data_dir()).unwrap();
    let providers = ["anthropic", "openai", "google"];
    let mut tx = pool.begin().await.unwrap();
    for i in 0..n.div_ceil(3) {
        let acc = format!("acc_{:032x}", 0xbe00_0000u64 + i as u64);
        sqlx::query("INSERT INTO accounts (id, name, plan, created_at) VALUES (?1, 'bench', 'pro', 1)")
            .bind(&acc)
            .execute(&mut *tx)
            .await
            .unwrap();
        for (j, p) in providers.iter().enumerate().take(n - i * 3) {
            let key_id = format!("key_{:032x}", (i * 3 + j) as u64 + 1);
            let binding = keyward_crypto::Binding {
                account_id: &acc,
                provider: p,
                key_id: &key_id,
            };
            let sealed = sealer.seal(&binding, key_for(p).as_bytes()).unwrap();
            sqlx::query(
                "INSERT INTO provider_keys (account_id, provider, key_id, sealed, last4, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, 'abcd', 1, 1)",
            )
            .bind(&acc)
            .bind(p)
            .bind(&key_id)
            .bind(sealed.as_bytes())
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("local-1".to_owned(), n)])
    );
    kw.cli(&["kek", "rotate"]).assert_success();
    let started = Instant::now();
    let out = kw.cli(&["kek", "rewrap", "--batch", "500"]);
    let wall = started.elapsed();
    out.assert_success();
    let done = out.json_lines().last().cloned().unwrap();
    assert_eq!(done["done"]["rewrapped"].as_u64(), Some(n as u64), "{out}");
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("local-2".to_owned(), n)])
    );
    let secs = done["done"]["seconds"].as_f64().unwrap();
    println!(
        "re-wrapped {n} keys in {secs:.2} s ({:.0} keys/s; {:.2} s wall clock with process start)",
        n as f64 / secs,
        wall.as_secs_f64()
    );
}

/// The same life cycle with `KEYWARD_KEK=pkcs11:…` against SoftHSM2 (feature `pkcs11`):
/// the workers open keys through the token from inside their sandbox, rotation creates a
/// version in the token, re-wrap moves every key, retirement destroys the old version in
/// the token, and a pre-rotation copy of the database opens nowhere.
#[cfg(feature = "pkcs11")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_rotate_rewrap_retire_through_the_binary() {
    use keyward_crypto::pkcs11::{Pkcs11Config, Pkcs11Kek};
    let hsm = tempfile::tempdir().unwrap();
    let Some(token) = keyward_testenv::softhsm::token(hsm.path(), "kw") else {
        return;
    };
    let (conf, tokens) = (token.conf.clone(), token.tokens.clone());
    let kek = token.kek_for_workers("kek");
    // Version 1 before the first start (`serve` never holds the PIN, so it cannot make one).
    // Generated into a scratch data dir; its pin file (the public key's hash, without which
    // the gateway refuses the version) is seeded into the real one with `primary`. (The
    // token set SOFTHSM2_CONF for this process's module.)
    let scratch = hsm.path().join("data");
    let first = Pkcs11Kek::connect(&Pkcs11Config::parse(&kek).unwrap().with_data_dir(&scratch)).unwrap();
    first.generate(1).unwrap();
    let pin_1 = std::fs::read(first.pin_path(1).unwrap()).unwrap();
    let fake = FakeProviders::start().expect("start fakes");
    let mut opts = fake_options(
        &fake,
        &[("KEYWARD_KEK", &kek), ("SOFTHSM2_CONF", &conf.display().to_string())],
    );
    opts.seed.push(("kek/primary".into(), b"1\n".to_vec(), 0o600));
    opts.seed.push(("kek/pkcs11-kek-1.pin".into(), pin_1, 0o600));
    let mut kw = start_with(opts);
    let (user, acc) = pro_owner(&kw, "hsm@example.com");
    let t = user.token.clone();
    own_keys_everywhere(&fake, &kw, &t, &acc).await;
    let pool = kw.db().await;
    let before = all_blobs(&pool).await;
    assert_eq!(versions(&before), BTreeMap::from([("pkcs11-kek-1".to_owned(), 3)]));
    assert!(before.values().all(|(_, _, b)| b.starts_with(b"KWB\x02")));
    for p in PROVIDERS {
        assert!(
            call_ok(&kw, &t, &acc, p).await,
            "{p}: the sandboxed worker opens through the token"
        );
    }
    let (_backup_dir, backup) = backup_db(&pool).await;

    let out = kw.cli(&["kek", "rotate"]);
    out.assert_success();
    assert_eq!(out.json()["created"], "pkcs11-kek-2", "{out}");
    wait_log(&kw, "sealing to the new primary KEK", 1);
    // The server re-wraps in the background, in a worker of its own that logs in to the token.
    wait_log(&kw, "background re-wrap finished", 1);
    let out = kw.cli(&["kek", "rewrap"]);
    out.assert_success();
    assert_eq!(out.json_lines().last().unwrap()["done"]["to_move"], 0, "{out}");
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("pkcs11-kek-2".to_owned(), 3)])
    );
    for p in PROVIDERS {
        assert!(call_ok(&kw, &t, &acc, p).await, "{p} after re-wrap");
    }
    let r = kw.cli(&["kek", "retire", "--version", "2"]);
    assert!(!r.success(), "{r}");
    let out = kw.cli(&["kek", "retire", "--version", "1"]);
    out.assert_success();
    assert_eq!(out.json()["destroyed"], true, "{out}");
    for p in PROVIDERS {
        assert!(call_ok(&kw, &t, &acc, p).await, "{p} after retirement");
    }
    let st = kw.cli(&["kek", "status"]).json();
    assert_eq!(
        (st["primary"].as_str(), st["rewrap_remaining"].as_u64()),
        (Some("pkcs11-kek-2"), Some(0)),
        "{st}"
    );

    // The token goes away mid-run: calls and saves answer 503 kek_unavailable (after the
    // worker's bounded retries, no fallback), /readyz names the failing backend, and no
    // saved key is touched. SoftHSM2 does not come back inside a process that saw its
    // storage go, so recovery here is a restart once the token is back.
    let blobs_before_outage = all_blobs(&pool).await;
    let gone = hsm.path().join("tokens-gone");
    std::fs::rename(&tokens, &gone).unwrap();
    let r = ai_call(&kw, &t, &acc, &chat_body("openai", false, 16)).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("kek_unavailable")),
        "{r}"
    );
    let r = kw
        .http()
        .put(
            &key_path(&acc, "openai"),
            Some(&t),
            &serde_json::json!({ "api_key": key_for("openai") }),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("kek_unavailable")),
        "{r}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ready = kw.http().get("/readyz", None).await;
    assert_eq!(ready.status, 503, "{ready}");
    assert_eq!(
        (
            ready.json()["kek"]["backend"].as_str(),
            ready.json()["kek"]["status"].as_str()
        ),
        (Some("pkcs11"), Some("unavailable")),
        "{}",
        ready.json()
    );
    assert_eq!(
        all_blobs(&pool).await,
        blobs_before_outage,
        "no key changed during the outage"
    );
    std::fs::rename(&gone, &tokens).unwrap();
    kw.restart();
    wait_workers(&kw, 2, &[], Duration::from_secs(30)).await;
    for p in PROVIDERS {
        assert!(call_ok(&kw, &t, &acc, p).await, "{p} after the token came back");
    }
    assert_eq!(all_blobs(&pool).await, blobs_before_outage);

    // The pre-rotation copy, restored: the worker no longer has version 1 anywhere.
    restore_db(&mut kw, &backup).await;
    for p in PROVIDERS {
        let r = ai_call(&kw, &t, &acc, &chat_body(p, false, 16)).await;
        assert_eq!(r.status, 500, "{p}: {r}");
    }
    assert!(kw.output().contains("\"pkcs11-kek-1\", which is not available here"));
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Retirement must never destroy a version a running gateway may still seal a key to. A
/// frozen gateway (SIGSTOP) still seals to local-1 and said so moments ago: retire refuses
/// and destroys nothing. Thawed, it switches to local-2 while keys keep being saved, and
/// retire, retried meanwhile, goes through only once no save can land under local-1: every
/// key saved before, during and after opens.
#[tokio::test]
async fn retire_waits_until_no_running_gateway_can_seal_to_the_version() {
    let fake = FakeProviders::start().expect("start fakes");
    let kw = start_on_fake(&fake, &[]);
    let (user, acc) = pro_owner(&kw, "retire-race@example.com");
    let t = user.token.clone();
    let k = key_for("openai");
    fake.set_key(provider("openai"), &k, Behaviour::Ok);
    save_key(&kw, &t, &acc, "openai", &k).await;
    set_source(&kw, &t, &acc, "openai", "own").await;
    assert!(call_ok(&kw, &t, &acc, "openai").await);
    let pid = kw.pid().expect("running");

    signal(pid, "-STOP");
    kw.cli(&["kek", "rotate"]).assert_success();
    kw.cli(&["kek", "rewrap"]).assert_success();
    let r = kw.cli(&["kek", "retire", "--version", "1"]);
    signal(pid, "-CONT");
    assert!(
        !r.success() && r.to_string().contains("may still be sealed to by running gateway"),
        "retire while a live gateway seals to local-1: {r}"
    );
    assert!(
        kw.data_dir().join("kek").join("local-1.key").exists(),
        "a refused retire destroys nothing"
    );

    // Saves run on while the gateway switches; retire is tried every 100 ms meanwhile.
    let retired = std::sync::atomic::AtomicBool::new(false);
    let saves = async {
        let mut after_retire = 0;
        let mut n = 0;
        while after_retire < 6 {
            // Round robin over three rows: a blob landing under local-1 after the retire
            // would stay there and show below.
            let p = PROVIDERS[n % 3];
            let k = key_for(p);
            fake.set_key(provider(p), &k, Behaviour::Ok);
            save_key(&kw, &t, &acc, p, &k).await;
            n += 1;
            if retired.load(std::sync::atomic::Ordering::SeqCst) {
                after_retire += 1;
            }
        }
        n
    };
    let retire = async {
        let started = Instant::now();
        let mut refusals = 0;
        loop {
            let mut cmd = kw.cli_command();
            cmd.args(["kek", "retire", "--version", "1"]);
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            if out.status.success() {
                retired.store(true, std::sync::atomic::Ordering::SeqCst);
                return refusals;
            }
            // Both refusals are right here: the gateway may still seal to local-1, or saves
            // it sealed to local-1 before switching are stored and wait for the background
            // re-wrap. Anything else is not.
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                err.contains("may still be sealed to by running gateway") || err.contains("still wraps"),
                "retire refused for another reason: {err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "retire never allowed: {err}"
            );
            refusals += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (saved, _refusals) = tokio::join!(saves, retire);
    assert!(saved >= 6, "{saved} saves");
    assert!(
        !kw.data_dir().join("kek").join("local-1.key").exists(),
        "local-1 destroyed"
    );
    let pool = kw.db().await;
    let blobs = all_blobs(&pool).await;
    assert_eq!(versions(&blobs), BTreeMap::from([("local-2".to_owned(), 3)]));
    for p in PROVIDERS {
        set_source(&kw, &t, &acc, p, "own").await;
        assert!(call_ok(&kw, &t, &acc, p).await, "the last {p} key saved opens");
    }
}

/// `serve` moves saved keys to a new primary by itself: after a rotation while serving, and
/// at start for keys a stop or crash left under an older version.
#[tokio::test]
async fn serve_rewraps_in_the_background_after_rotation_and_at_start() {
    let fake = FakeProviders::start().expect("start fakes");
    let mut kw = start_on_fake(&fake, &[]);
    let (user, first) = pro_owner(&kw, "bg-rewrap@example.com");
    let t = user.token.clone();
    let mut keys = Vec::new();
    for i in 0..3 {
        let acc = if i == 0 {
            first.clone()
        } else {
            create_account(&kw, &format!("Bg {i}"), "pro", &user.email)
        };
        for p in PROVIDERS {
            let k = key_for(p);
            fake.set_key(provider(p), &k, Behaviour::Ok);
            save_key(&kw, &t, &acc, p, &k).await;
            set_source(&kw, &t, &acc, p, "own").await;
            keys.push((acc.clone(), p));
        }
    }
    let pool = kw.db().await;
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("local-1".to_owned(), 9)])
    );

    kw.cli(&["kek", "rotate"]).assert_success();
    wait_log(&kw, "background re-wrap finished", 1);
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("local-2".to_owned(), 9)])
    );
    assert!(kw.output().contains("kek.rewrap_progress"), "progress is logged");
    let st = kw.cli(&["kek", "status"]).json();
    assert_eq!(st["rewrap_remaining"].as_u64(), Some(0), "{st}");
    for (acc, p) in &keys {
        assert!(call_ok(&kw, &t, acc, p).await, "{acc} {p} after the background re-wrap");
    }

    // Killed, rotated while down, started again: the start-up re-wrap moves everything.
    kw.kill();
    kw.cli(&["kek", "rotate"]).assert_success();
    kw.start_again();
    wait_log(&kw, "background re-wrap finished", 2);
    assert_eq!(
        versions(&all_blobs(&pool).await),
        BTreeMap::from([("local-3".to_owned(), 9)])
    );
    for (acc, p) in &keys {
        assert!(call_ok(&kw, &t, acc, p).await, "{acc} {p} after the start-up re-wrap");
    }
    kw.cli(&["kek", "retire", "--version", "1"]).assert_success();
    // The killed server's last report named local-2 and is not 30 s old: it may be a live
    // node for all retire can tell, so local-2 waits.
    let r = kw.cli(&["kek", "retire", "--version", "2"]);
    assert!(
        !r.success() && r.to_string().contains("may still be sealed to by running gateway"),
        "{r}"
    );
}
