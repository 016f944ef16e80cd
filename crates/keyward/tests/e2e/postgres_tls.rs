//! PostgreSQL over TLS (issue 24): `sslmode=verify-full` with the CA of the server's
//! certificate connects, and every connection keyward holds is encrypted; a wrong CA, or a
//! host name the certificate does not hold, stops `serve` with a message that says which.
//!
//! Needs a PostgreSQL whose certificate comes from a CA of the test's own:
//! `scripts/pg-tls-setup` (run by .ci/run) makes one and prints the directory, which the
//! tests find in `KEYWARD_TEST_POSTGRES_TLS_DIR`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward_testkit::pg::{server_url, TempDatabase};
use keyward_testkit::{sqlx, Options};

use crate::common::*;

/// The directory `scripts/pg-tls-setup` wrote, or `None` after recording the skip.
fn tls_dir(test: &str) -> Option<PathBuf> {
    match keyward_testenv::setting("KEYWARD_TEST_POSTGRES_TLS_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            keyward_testenv::skip_named(test, keyward_testenv::reasons::POSTGRES_TLS);
            None
        }
    }
}

/// `url` (`postgres://user@host:port/db`, as `TempDatabase` makes it) with its host swapped
/// for `host` and verify-full against `ca` asked for.
fn tls_url(url: &str, host: &str, ca: &std::path::Path) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.split_once('@').unwrap();
    let port_and_db = &rest[rest.find([':', '/']).unwrap()..];
    let port_and_db = port_and_db.split('?').next().unwrap();
    format!(
        "{scheme}://{user}@{host}{port_and_db}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    )
}

/// The database name in `url`.
fn db_name(url: &str) -> String {
    let path = url.rsplit('/').next().unwrap();
    path.split('?').next().unwrap().to_owned()
}

/// Runs `keyward serve` on a fresh data dir against `db_url` and waits for it to exit
/// (it must: the database cannot be reached). Returns its exit code and stderr.
fn serve_refused(db_url: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .arg("serve")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("KEYWARD_ALLOW_SAME_USER", "1")
        .env("KEYWARD_DATA_DIR", dir.path())
        .env("KEYWARD_LISTEN", "127.0.0.1:0")
        .env("KEYWARD_DATABASE_URL", db_url)
        .env("KEYWARD_DATABASE_CONNECT_TIMEOUT_MS", "3000")
        .env("KEYWARD_ALLOW_SAME_USER", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (status.code(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        assert!(
            Instant::now() < deadline,
            "serve did not give up on an untrusted database"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_connects_and_every_connection_is_encrypted() {
    let test = "verify_full_with_the_right_ca_connects_and_every_connection_is_encrypted";
    let (Some(server), Some(dir)) = (server_url(test), tls_dir(test)) else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let url = tls_url(&db.url, "localhost", &dir.join("ca.pem"));
    let kw = start_with(Options::default().env("KEYWARD_DATABASE_URL", &url));
    // Something that reads and writes the database.
    let u = create_user(&kw, "tls@example.com");
    let r = kw.http().get("/v1/me", u.tok()).await;
    assert_eq!(r.status, 200, "{r}");

    let admin = db.pool().await;
    let db_name = db_name(&db.url);
    let rows: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND a.application_name = 'keyward'",
    )
    .bind(&db_name)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "keyward holds no connection to its database");
    for (ssl, version) in &rows {
        assert!(ssl, "a keyward connection without TLS: {rows:?}");
        assert!(version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")), "{rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_saying_the_certificate_is_not_signed_by_it() {
    let test = "a_wrong_ca_is_refused_saying_the_certificate_is_not_signed_by_it";
    let (Some(server), Some(dir)) = (server_url(test), tls_dir(test)) else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    let (code, stderr) = serve_refused(&tls_url(&db.url, "localhost", &dir.join("other-ca.pem")));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("TLS to PostgreSQL refused: the server's certificate is not signed by the CA in sslrootcert"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_the_certificate_does_not_hold_is_refused_saying_so() {
    let test = "a_host_name_the_certificate_does_not_hold_is_refused_saying_so";
    let (Some(server), Some(dir)) = (server_url(test), tls_dir(test)) else {
        return;
    };
    let db = TempDatabase::create(&server).await;
    // The certificate names `localhost` only; 127.0.0.1 is the same server.
    let (code, stderr) = serve_refused(&tls_url(&db.url, "127.0.0.1", &dir.join("ca.pem")));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("TLS to PostgreSQL refused: the server's certificate does not name the host in the URL"),
        "{stderr}"
    );
}
