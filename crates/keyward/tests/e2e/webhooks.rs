//! Webhooks with several nodes (issue 22): two nodes on one PostgreSQL both deliver from the
//! one outbox; every event committed on either node reaches the endpoint, and each is sent by
//! one node (the lease), not by both. Signatures, retries and crashes are tested with the
//! Standard Webhooks reference library in tests/python/test_webhooks.py.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyward_fakes::FakeProviders;
use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::Keyward;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ai_support::*;
use crate::common::*;

/// An endpoint that answers 204 to every POST and counts deliveries per `webhook-id`.
async fn receiver() -> (String, Arc<Mutex<BTreeMap<String, u32>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let seen: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + length {
                        continue;
                    }
                    if let Some(id) = head.lines().find_map(|l| l.strip_prefix("webhook-id:")) {
                        *record.lock().unwrap().entry(id.trim().to_owned()).or_default() += 1;
                    }
                    buf.drain(..end + 4 + length);
                    let _ = conn
                        .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (url, seen)
}

fn secrets_file(dir: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("webhook-secrets");
    std::fs::write(&path, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

fn committed(kw: &Keyward) -> Vec<String> {
    kw.cli(&["webhooks", "list", "--limit", "10000"])
        .assert_success()
        .json_lines()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_deliver_every_event_once() {
    let Some(server) = server_url("two_nodes_deliver_every_event_once") else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let fake = FakeProviders::start().unwrap();
    let (url, seen) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let opts = |o: keyward_testkit::Options| {
        o.env("KEYWARD_DATABASE_URL", &db.url)
            .env("KEYWARD_WEBHOOK_URLS", &url)
            .env("KEYWARD_WEBHOOK_SECRETS_FILE", &secrets)
            .env("KEYWARD_WEBHOOK_POLL_MS", "20")
    };
    let a = start_with(opts(fake_options(&fake, &[])));
    let b = start_with(opts(fake_options(&fake, &[]).same_keys_as(&a)));
    let (token, account) = (a.owner_token().to_owned(), a.owner_account().to_owned());
    // Changes on both nodes at once: 3 providers × (save, rotate, own, shared) = 12 events.
    let mut tasks = Vec::new();
    let nodes = Arc::new([a, b]);
    for (i, provider) in ["anthropic", "openai", "google"].into_iter().enumerate() {
        let (nodes, token, account) = (nodes.clone(), token.clone(), account.clone());
        tasks.push(tokio::spawn(async move {
            let node = &nodes[i % 2];
            save_key(node, &token, &account, provider, &key_for(provider)).await;
            save_key(&nodes[(i + 1) % 2], &token, &account, provider, &key_for(provider)).await;
            set_source(node, &token, &account, provider, "own").await;
            set_source(&nodes[(i + 1) % 2], &token, &account, provider, "shared").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want = committed(&nodes[0]);
    assert_eq!(want.len(), 12, "{want:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = seen.lock().unwrap().clone();
        if want.iter().all(|id| got.contains_key(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every event arrived: {got:?} of {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a second sender would show by now
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
        want.iter().cloned().collect()
    );
    let duplicates: u32 = got.values().map(|n| n - 1).sum();
    eprintln!(
        "two nodes: {} events committed, {} delivered, {duplicates} sent twice",
        want.len(),
        got.len()
    );
    assert_eq!(duplicates, 0, "each event is sent by one node: {got:?}");
}
