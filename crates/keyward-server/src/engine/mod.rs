//! The application layer: what keyward does, whichever door a request came in by.
//!
//! The JSON routes (`routes/`), the settings page (`web/`), the native pass-through and the
//! CLI all call the [`Engine`]; they only translate between their medium (HTTP, HTML forms,
//! SDK envelopes, argv) and these functions. Every function here takes an [`Actor`] (who
//! acts, in which account, with which role), never an HTTP extractor, and checks what that
//! actor may do itself, so no door can skip a check.
//!
//! - [`identity`]: tokens, and turning a token into a user, a service or an [`Actor`]
//!   ([`actor`]: who may do what, by role or by a service's scopes).
//! - [`provisioning`]: accounts, users and memberships keyed by the product's own ids.
//! - [`keys`]: list, save or rotate, remove a key; switch its source.
//! - [`calls`]: an AI call: choose the key, reserve shared credits, open the key in a
//!   worker and call the provider, settle and audit ([`leases`]: a shared reservation is a
//!   lease, renewed while the call runs, released if its holder dies).
//! - [`native`]: a native pass-through call (the provider's own request and answer).
//! - [`probe`]: "Test key" ([`throttle`]: how often).
//! - [`usage`]: the month's shared credits and counts.
//! - [`audit`]: the account's audit log, as the API shows it.
//! - [`activity`]: the audit log as a person reads it (the activity page, its CSV, whether
//!   the chain verifies) and a key's health from it.
//!
//! Must never: hold a plaintext key (keys are sealed here and opened only in a worker),
//! know about HTTP status lines, headers or HTML, or read the environment.

pub mod activity;
pub mod actor;
pub mod audit;
pub mod calls;
pub mod identity;
pub mod keys;
pub mod leases;
pub mod native;
pub mod probe;
pub mod provisioning;
pub mod throttle;
pub mod usage;

use std::sync::Arc;

use keyward_core::Catalogue;
use keyward_store::Store;

use crate::clock::SharedClock;
use crate::kek::SealerCell;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::purge::PurgeHandle;
use crate::workers::WorkerPool;

pub use actor::Actor;

/// What the engine works with. One reference count to clone: calls that outlive their
/// request (a stream being relayed, a call whose client went away) hold a clone.
#[derive(Clone)]
pub struct Engine(Arc<EngineParts>);

/// The engine's parts, built once by `serve`.
pub struct EngineParts {
    pub store: Arc<dyn Store>,
    /// The gateway can seal keys (to the primary KEK version); it holds no way to open one.
    pub sealer: Arc<SealerCell>,
    pub clock: SharedClock,
    pub catalogue: Arc<Catalogue>,
    pub metrics: Arc<Metrics>,
    pub purge: PurgeHandle,
    pub workers: Arc<WorkerPool>,
    pub ledger: Ledger,
    /// This node's shared-pool reservation leases.
    pub leases: Arc<leases::Leases>,
    pub probe_limiter: throttle::ProbeLimiter,
    /// Longest wait for a provider's answer to start, and between two chunks of it.
    pub provider_timeout_ms: u32,
    /// "Test key" runs per account and provider per minute.
    pub key_tests_per_minute: u32,
    /// The audit-chain key, for the activity page's check of the chain (`None`: not readable
    /// by this node, and the page says the chain was not checked).
    pub audit_key: Option<Arc<keyward_crypto::AuditChainKey>>,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Engine {
        Engine(Arc::new(parts))
    }
}

impl std::ops::Deref for Engine {
    type Target = EngineParts;
    fn deref(&self) -> &EngineParts {
        &self.0
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for EngineParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("sealer", &self.sealer)
            .finish_non_exhaustive()
    }
}
