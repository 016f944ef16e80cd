//! Criterion benchmarks of the AI hot path's inner pieces (`cargo bench -p keyward`):
//! - opening one sealed key (HPKE unwrap of the DEK, then the AEAD open);
//! - the worker round trip: a real `keyward worker` process (sandboxed, as in production),
//!   asked over its socket to open a key and answer, with no provider call (`OpenOnly`),
//!   next to a bare `Ping` round trip;
//! - a durable audit append: `finish_calls` on SQLite (one fsync'd transaction) for a batch
//!   of 1 and of 64 calls, which is what group commit divides among concurrent calls; next
//!   to it, the floor any durable append pays on this disk: one 512-byte write and
//!   `fdatasync` on a file in the same directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "a benchmark")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keyward_core::{AccountId, Email, KeySource, Last4, Plan, Provider, UnixMillis, UserId};
use keyward_crypto::{local, AuditChainKey, Binding};
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{AuditAction, AuditActor, CallRecord, NewAuditEvent, SqliteStore, Store};
use keyward_worker_protocol::protocol::OpenRequest;
use keyward_worker_protocol::WorkerConn;

const KEY: &[u8] = b"sk-proj-benchbenchbenchbenchbenchbenchbenchbenchbenchbenchbenchbench0001";

const BENCH_ACCOUNT: &str = "acc_0000000000000000000000000000bec4";
const BENCH_KEY: &str = "key_0000000000000000000000000000bec4";

fn binding() -> Binding<'static> {
    Binding {
        account_id: BENCH_ACCOUNT,
        provider: "openai",
        key_id: BENCH_KEY,
    }
}

fn open_sealed_key(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let sealer = local::load_sealer(dir.path()).unwrap();
    let opener = local::load_opener(dir.path()).unwrap();
    let blob = sealer.seal(&binding(), KEY).unwrap();
    let mut out = vec![0u8; 4096];
    let mut g = c.benchmark_group("crypto");
    g.bench_function("open_sealed_key", |b| {
        b.iter(|| opener.open_into(&binding(), &blob, &mut out).unwrap())
    });
    g.bench_function("seal_key", |b| b.iter(|| sealer.seal(&binding(), KEY).unwrap()));
    g.finish();
}

/// A `keyward worker` child of this process (the worker accepts only its parent).
struct Worker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_worker(data_dir: &Path, socket: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("worker")
        .env_clear()
        .env("KEYWARD_DATA_DIR", data_dir)
        .env("KEYWARD_KEK", "local")
        .env("KEYWARD_WORKER_SOCKET", socket)
        .env("KEYWARD_WORKER_PARENT", std::process::id().to_string())
        .env("KEYWARD_OPENAI_BASE_URL", "http://127.0.0.1:9")
        .env("KEYWARD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn worker_round_trip(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    local::ensure_kek(dir.path()).unwrap();
    let sealer = local::load_sealer(dir.path()).unwrap();
    let blob = sealer.seal(&binding(), KEY).unwrap();
    let socket = dir.path().join("worker.sock");
    let child = start_worker(dir.path(), &socket);
    let _worker = Worker { child, _dir: dir };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut conn = rt.block_on(async {
        for _ in 0..200 {
            if let Ok(mut c) = WorkerConn::connect(&socket).await {
                if c.ping().await.is_ok() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the worker did not answer");
    });
    let request = OpenRequest {
        request_id: 1,
        binding: keyward_core::KeyBinding {
            owner: keyward_core::KeyOwner::parse(BENCH_ACCOUNT).unwrap(),
            provider: Provider::OpenAi,
            key_id: keyward_core::KeyId::parse(BENCH_KEY).unwrap(),
        },
        blob: blob.as_bytes().to_vec(),
    };
    let mut g = c.benchmark_group("worker");
    g.bench_function("ping_round_trip", |b| b.iter(|| rt.block_on(conn.ping()).unwrap()));
    g.bench_function("open_round_trip", |b| {
        b.iter(|| {
            rt.block_on(async {
                if let Err(e) = conn.open_only(&request).await {
                    panic!("the worker did not open the key: {e}");
                }
            })
        })
    });
    g.finish();
}

fn record(account: &AccountId, n: i64) -> CallRecord {
    CallRecord {
        account_id: account.clone(),
        period: "2026-11".into(),
        provider: Provider::OpenAi,
        source: KeySource::Own,
        reserved: 0,
        charged: 0,
        input_tokens: 9,
        output_tokens: 2,
        audit: NewAuditEvent::new(
            account,
            UnixMillis(1_764_115_200_000 + n),
            &AuditActor("usr_bench".into()),
            AuditAction::AiRequest,
            Provider::OpenAi,
        )
        .key_source(KeySource::Own)
        .last4(Last4::from_stored("0001").as_ref())
        .model("gpt-6-luna")
        .request_id(Some(format!("req_{n}")))
        .tokens(9, 2)
        .feature(Some("drafting".into())),
        lease: None,
    }
}

fn audit_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let (store, account) = rt.block_on(async {
        let store = SqliteStore::open(
            &url,
            AuditChainKey::from_bytes_for_tests([7; 32]),
            SqliteOptions::default(),
        )
        .await
        .unwrap();
        let user = UserId::from_random([1; 16]);
        let account = AccountId::from_random([2; 16]);
        store
            .create_user(
                &user,
                &Email::parse("bench@example.com").unwrap(),
                "hash",
                UnixMillis(1),
            )
            .await
            .unwrap();
        store
            .create_account(&account, "Bench", Plan::Pro, &user, UnixMillis(2))
            .await
            .unwrap();
        (store, account)
    });
    let mut g = c.benchmark_group("audit");
    g.sample_size(30);
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::File::create(dir.path().join("sync-floor")).unwrap();
        let record = [b'x'; 512];
        g.bench_function("write_512_and_fdatasync", |b| {
            b.iter(|| {
                // Overwrite the same block (as SQLite's WAL does once it wraps).
                file.rewind().unwrap();
                file.write_all(&record).unwrap();
                file.sync_data().unwrap();
            })
        });
    }
    for batch in [1usize, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("finish_calls_batch_{batch}"), |b| {
            b.iter_batched(
                || (0..batch as i64).map(|n| record(&account, n)).collect::<Vec<_>>(),
                |records| rt.block_on(store.finish_calls(&records)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, open_sealed_key, worker_round_trip, audit_append);
criterion_main!(benches);
