//! PostgreSQL for tests: a fresh database per test, dropped afterwards.
//!
//! The server comes from `KEYWARD_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`). Without it a test skips with a clear
//! line on stderr, unless `KEYWARD_TEST_REQUIRE_ALL=1`, where a skip is a failure.

use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

use crate::canary::random_u64;

/// A database that exists for one test.
#[derive(Debug)]
pub struct TempDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

/// The PostgreSQL server to use, or `None` after printing why the test is skipped.
#[allow(
    clippy::disallowed_methods,
    reason = "test configuration, read where the test needs it"
)]
pub fn server_url(test: &str) -> Option<String> {
    match keyward_testenv::setting("KEYWARD_TEST_POSTGRES_URL") {
        Some(url) => Some(url),
        None => {
            keyward_testenv::skip_named(test, keyward_testenv::reasons::POSTGRES);
            None
        }
    }
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

impl TempDatabase {
    pub async fn create(server: &str) -> TempDatabase {
        let name = format!("kw_e2e_{:016x}", random_u64());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(server)
            .await
            .expect("connect to PostgreSQL");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        admin.close().await;
        TempDatabase {
            admin_url: server.to_owned(),
            url: with_database(server, &name),
            name,
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Ends every other session on this database (an outage, as seen by keyward).
    pub async fn kill_connections(&self) -> u64 {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin_url)
            .await
            .expect("connect");
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&admin)
        .await
        .expect("terminate backends");
        admin.close().await;
        u64::try_from(n).unwrap_or(0)
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: Drop may run inside a runtime.
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&admin).await {
                    let _ = pool
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_swapped_in() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
