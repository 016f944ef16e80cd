//! keyward's gateway: configuration, the HTTP API, authentication, the audit log's
//! readers, metrics, and the operations the CLI runs (admin, audit verify/export, KEK
//! status/rotate/rewrap/retire in [`kek`]).
//!
//! Layers: [`routes`] (JSON), [`web`] (the settings page) and the native pass-through
//! translate HTTP into calls of the [`engine`], the application layer, which works on the
//! store, the KEK sealer and the worker pool; [`error`] is the one error mapping. Must never: open a sealed key (it holds a `Sealer` only;
//! opening belongs to the isolated worker), log a body, a header or a key, or read the
//! environment anywhere but [`config::Config::load`].

pub mod admin;
pub mod api;
pub mod app;
pub mod audit_ops;
pub mod auth;
pub mod catalogue_ops;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod extract;
pub mod kek;
pub mod kek_probe;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod outbound;
pub mod process_guard;
pub mod purge;
pub mod routes;
pub mod runtime;
pub mod serve;
pub mod state;
pub mod users;
pub mod web;
pub mod webhooks;
pub mod wiped;
pub mod workers;

pub use config::Config;
pub use runtime::RuntimeError;
