//! Shared-pool reservations held as leases.
//!
//! A shared call's reservation is a row of `reservation_leases` besides the credits it adds
//! to `credit_periods.credits_reserved`: the node that holds it (a stable node id and the
//! id of the node's current run), when it expires, and what its `ai.request` event needs
//! should the call never be settled. The holder renews the lease while the call runs. The
//! row leaves the table in exactly one of two ways, each one transaction that deletes it
//! first and acts only if the delete found it:
//! - **settled** ([`crate::Store::finish_calls`], the record naming the lease): the charge,
//!   the counters and the call's own `ai.request` event;
//! - **released** ([`crate::Store::release_leases`]): the credits return, and one
//!   `ai.request` event with outcome `error:abandoned` goes on the account's chain through
//!   the ordinary append path (webhook triggers included).
//!
//! Because both start with that conditional delete, a settled lease is never also released
//! and a released one is never also settled (the later one finds no row: `finish_calls`
//! refuses the record, `release_leases` skips it), and two nodes sweeping at once release
//! each lease once. Ids are never reused (SQLite `AUTOINCREMENT`, a PostgreSQL identity), so
//! a late settlement cannot meet another call's lease under an old id.

use keyward_core::{AccountId, KeySource, Outcome, Provider, UnixMillis};

use crate::audit::{AuditAction, AuditActor, NewAuditEvent};
use crate::{check_amount, check_period, StoreError, StoreResult};

/// A lease's id, assigned by the database.
pub type LeaseId = i64;

/// The outcome of the `ai.request` event of a call whose lease was released.
pub const ABANDONED: Outcome = Outcome::Error("abandoned");

/// A reservation to take as a lease ([`crate::Store::reserve_lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    pub account_id: AccountId,
    /// The metering period (`YYYY-MM`) the credits are reserved in.
    pub period: String,
    /// Credits reserved (0 or more).
    pub amount: i64,
    /// The holder: its stable node id, and the id of this run of it (a restarted node is the
    /// same node in a new run).
    pub node: String,
    pub run: String,
    pub expires_at: UnixMillis,
    /// What the call's `ai.request` event says if the call is abandoned.
    pub call: LeasedCall,
}

/// The call a lease reserves for, as its audit event needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedCall {
    pub actor: AuditActor,
    pub provider: Provider,
    pub model: String,
    pub key_source: KeySource,
    pub feature: Option<String>,
    pub on_behalf_of: Option<String>,
}

/// Which leases [`crate::Store::release_leases`] releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRelease<'a> {
    /// Every lease whose expiry is before `now`: its holder stopped renewing it. Any node
    /// sweeps these.
    Expired,
    /// The leases of `node` held by any run but `current`: a node releases those of its
    /// earlier runs when it starts (they died with the process), without waiting for expiry.
    EarlierRuns { node: &'a str, current: &'a str },
    /// One lease, whatever its expiry: its holder could not settle the call.
    One(LeaseId),
}

impl LeaseRelease<'_> {
    /// Why the leases it picks are released (what their events say).
    pub(crate) fn why(self) -> Why {
        match self {
            LeaseRelease::Expired => Why::Expired,
            LeaseRelease::EarlierRuns { .. } => Why::Restarted,
            LeaseRelease::One(_) => Why::NotRecorded,
        }
    }
}

/// Why a lease is released: the abandoned event's detail says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Expired,
    Restarted,
    NotRecorded,
}

impl Why {
    fn detail(self, row: &LeaseRow) -> String {
        let why = match self {
            Why::Expired => format!(
                "gateway node {} stopped renewing the call's reservation before the call was settled",
                row.node
            ),
            Why::Restarted => format!("gateway node {} restarted before the call was settled", row.node),
            Why::NotRecorded => "the call could not be recorded".to_owned(),
        };
        format!("{why}; its {} reserved credits were returned", row.amount)
    }
}

/// A released lease, as [`crate::Store::release_leases`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedLease {
    pub id: LeaseId,
    pub account_id: AccountId,
    pub provider: Provider,
    pub key_source: KeySource,
    /// The credits returned.
    pub amount: i64,
    /// The node that held it.
    pub node: String,
}

/// A lease row as a backend reads it back to release it.
#[derive(Debug, Clone)]
pub(crate) struct LeaseRow {
    pub id: LeaseId,
    pub account_id: String,
    pub period: String,
    pub amount: i64,
    pub node: String,
    pub actor: String,
    pub provider: String,
    pub model: String,
    pub key_source: String,
    pub feature: Option<String>,
    pub on_behalf_of: Option<String>,
}

impl LeaseRow {
    /// The call's `ai.request` event, `error:abandoned`, dated `now`; and what to report.
    pub(crate) fn abandoned(&self, why: Why, now: UnixMillis) -> StoreResult<(NewAuditEvent, ReleasedLease)> {
        let corrupt = |c: &str| StoreError::Corrupt(format!("reservation_leases.{c}"));
        let account = AccountId::parse(&self.account_id).map_err(|_| corrupt("account_id"))?;
        let provider: Provider = self.provider.parse().map_err(|_| corrupt("provider"))?;
        let source: KeySource = self.key_source.parse().map_err(|_| corrupt("key_source"))?;
        let event = NewAuditEvent::new(
            &account,
            now,
            &AuditActor(self.actor.clone()),
            AuditAction::AiRequest,
            provider,
        )
        .key_source(source)
        .model(&self.model)
        .outcome(ABANDONED)
        .tokens(0, 0)
        .feature(self.feature.clone())
        .on_behalf_of(self.on_behalf_of.clone())
        .detail(Some(why.detail(self)));
        let released = ReleasedLease {
            id: self.id,
            account_id: account,
            provider,
            key_source: source,
            amount: self.amount,
            node: self.node.clone(),
        };
        Ok((event, released))
    }
}

/// Checks a lease before it is written.
pub(crate) fn check_lease(lease: &NewLease) -> StoreResult<()> {
    check_period(&lease.period)?;
    check_amount("amount", lease.amount)?;
    if lease.node.is_empty() || lease.run.is_empty() {
        return Err(StoreError::Invalid("a lease needs its node and run".to_owned()));
    }
    Ok(())
}

/// The refusal of a record whose lease was released before it could be settled.
pub(crate) fn lease_gone(id: LeaseId) -> StoreError {
    StoreError::Invalid(format!(
        "reservation lease {id} was already released (its call was audited as abandoned and its credits returned)"
    ))
}
