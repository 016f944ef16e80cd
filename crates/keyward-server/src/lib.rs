//! keyward's gateway: configuration, the HTTP API, authentication, the audit log's
//! readers, metrics, and the operations the CLI runs (admin, audit verify/export, KEK
//! status/rotate/rewrap/retire in [`kek`]).
//!
//! Owns: turning requests into store calls and store results into answers, with one
//! error mapping ([`error`]). Must never: open a sealed key (it holds a `Sealer` only;
//! opening belongs to the isolated worker), log a body, a header or a key, or read the
//! environment anywhere but [`config::Config::load`].

pub mod admin;
pub mod ai;
pub mod api;
pub mod app;
pub mod audit_ops;
pub mod auth;
pub mod catalogue_ops;
pub mod clock;
pub mod config;
pub mod error;
pub mod extract;
pub mod kek;
pub mod kek_probe;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod purge;
pub mod routes;
pub mod runtime;
pub mod serve;
pub mod web;
pub mod workers;

pub use config::Config;
pub use runtime::RuntimeError;
