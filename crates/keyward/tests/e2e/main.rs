//! keyward end-to-end tests: each test runs the real `keyward` binary on its own temp data
//! directory (through `keyward-testkit`) and drives it over HTTP and its CLI.
//!
//! One integration test binary on purpose: each extra one costs a link.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failed expectation must stop the test loudly"
)]

mod activity;
mod ai_calls;
mod ai_support;
mod audit;
mod awskms;
mod bad_input;
mod browser;
mod canary;
mod cli;
mod common;
mod concurrency;
mod crypto;
mod formats;
mod kek;
mod lifecycle;
mod multinode;
mod oidc;
mod postgres_tls;
mod providers_today;
mod provisioning;
mod relay;
mod services;
mod sessions;
mod tenancy;
mod users;
mod web;
mod webhooks;
mod worker;
