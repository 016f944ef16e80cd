//! What keyward's tests need from outside the workspace, and what happens when it is missing.
//!
//! A test that needs an outside program (PostgreSQL, Chromium, axe-core's npm, SoftHSM2, moto, Python) calls
//! [`skip`] when it is not there. Under `KEYWARD_TEST_REQUIRE_ALL=1` (as in CI) that is a
//! failure. Otherwise the test says so on stderr and, when `KEYWARD_TEST_SKIP_LOG` names a
//! file (`scripts/test` sets it), appends one line `reason<TAB>test` to it, so the suite's
//! summary can count the skips per reason: the test harness itself reports a skipped test as
//! "ok".
//!
//! It also starts the outside programs the KEK backend tests share, once for all of them:
//! a SoftHSM2 token ([`softhsm`]) and moto's KMS server ([`moto`]). Each skips (with its
//! reason, through [`skip`]) when its program is missing.
//!
//! Must never: be used to skip anything but a missing outside program.

#![allow(
    clippy::panic,
    clippy::disallowed_methods,
    reason = "test support: a required program that is missing must stop the test loudly; the test settings are read here"
)]

use std::io::Write;

pub mod moto;
pub mod softhsm;

/// Whether every outside program is required (`KEYWARD_TEST_REQUIRE_ALL=1`).
pub fn required() -> bool {
    std::env::var("KEYWARD_TEST_REQUIRE_ALL").as_deref() == Ok("1")
}

/// A test's own setting from the environment (not keyward's configuration): `None` when
/// unset or blank.
pub fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The running test cannot run because `reason` (what is missing, and how to get it). Panics
/// when every outside program is required; else says so and records it for the summary. The
/// caller then returns without testing anything. The test is named by its thread (the test
/// harness names each test's thread after it).
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    skip_named(thread.name().unwrap_or("a test"), reason);
}

/// [`skip`], naming the test.
pub fn skip_named(test: &str, reason: &str) {
    if required() {
        panic!("{test}: {reason}, and KEYWARD_TEST_REQUIRE_ALL=1 requires it");
    }
    eprintln!("skipped: {test}: {reason} (set KEYWARD_TEST_REQUIRE_ALL=1 to make this a failure)");
    if let Some(path) = setting("KEYWARD_TEST_SKIP_LOG") {
        let line = format!("{}\t{}\n", one_line(reason), one_line(test));
        // Appends of one short line are atomic enough across the parallel tests.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// The reasons the suite skips for, so every site says the same words.
pub mod reasons {
    pub const POSTGRES: &str =
        "PostgreSQL: KEYWARD_TEST_POSTGRES_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/postgres)";
    pub const BROWSER: &str =
        "Chromium: chromium or chromedriver is not installed (apt-get install -y chromium chromium-driver)";
    pub const SOFTHSM: &str = "SoftHSM2: not installed (apt-get install -y softhsm2)";
    pub const AXE: &str =
        "axe-core: node and npm are not installed, so `npm ci --prefix tests/a11y` cannot fetch it (apt-get install -y nodejs npm)";
    pub const OIDC: &str =
        "oidc-provider: node and npm are not installed, so `npm ci --prefix tests/oidc` cannot fetch it (apt-get install -y nodejs npm)";
    pub const POSTGRES_TLS: &str =
        "PostgreSQL TLS: KEYWARD_TEST_POSTGRES_TLS_DIR is not set (as root on a test-only PostgreSQL: export KEYWARD_TEST_POSTGRES_TLS_DIR=$(scripts/pg-tls-setup))";
    pub const MOTO: &str =
        "moto: its server is not installed (pip install 'moto[server]', or KEYWARD_TEST_MOTO_PYTHON)";
}
