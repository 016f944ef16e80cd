//! The audit chain: what an event is, its canonical bytes, and how a chain is verified.
//!
//! Each account's events form a chain: event `seq` n carries
//! `mac_n = HMAC(chain key, mac_{n-1} || canonical(event_n))`, with `mac_0 = GENESIS_MAC`,
//! and the account's head row holds the newest `(seq, mac)`. The chain key lives outside
//! the database, so whoever can write the database can delete or edit rows but cannot
//! make a consistent chain again: an edited, deleted, reordered or truncated event
//! breaks the chain at a place `verify_chain` names. (A writer who rolls the head back
//! together with the tail is not detected here; a signed checkpoint of every chain's head,
//! `keyward audit checkpoint`, is the anchor against that.)
//!
//! The platform's own actions (the shared pool's keys, KEK versions, plan changes made by
//! the CLI) form one more chain, [`PLATFORM_CHAIN`], built the same way with the same key
//! ([`PlatformEvent`]); its canonical form has a label of its own, so no event can be moved
//! between the platform's chain and an account's.

use keyward_core::{AccountId, KeySource, Last4, Outcome, Provider, UnixMillis};
use keyward_crypto::{AuditChainKey, GENESIS_MAC};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AuditAction {
    #[serde(rename = "key.saved")]
    KeySaved,
    #[serde(rename = "key.rotated")]
    KeyRotated,
    #[serde(rename = "key.removed")]
    KeyRemoved,
    #[serde(rename = "key.source_changed")]
    KeySourceChanged,
    #[serde(rename = "key.tested")]
    KeyTested,
    #[serde(rename = "ai.request")]
    AiRequest,
    /// The account's plan or shared-credit limit changed (provisioning API or CLI).
    #[serde(rename = "account.plan_changed")]
    PlanChanged,
    /// The account was deleted: the last event of its chain, kept for export.
    #[serde(rename = "account.deleted")]
    AccountDeleted,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::KeySaved => "key.saved",
            AuditAction::KeyRotated => "key.rotated",
            AuditAction::KeyRemoved => "key.removed",
            AuditAction::KeySourceChanged => "key.source_changed",
            AuditAction::KeyTested => "key.tested",
            AuditAction::AiRequest => "ai.request",
            AuditAction::PlanChanged => "account.plan_changed",
            AuditAction::AccountDeleted => "account.deleted",
        }
    }
}

/// Who did something, as written in the audit log (`usr_…`, `service:<name>` for one of
/// the product's services, or `cli` for the admin CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditActor(pub String);

/// An event to append, built with [`NewAuditEvent::new`] and its setters. The store
/// assigns `seq`, `id` and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuditEvent {
    pub account_id: AccountId,
    pub at: UnixMillis,
    pub actor: String,
    pub action: AuditAction,
    pub provider: Option<Provider>,
    pub key_source: Option<KeySource>,
    pub key_last4: Option<Last4>,
    pub model: Option<String>,
    pub outcome: Outcome,
    pub detail: Option<String>,
    pub provider_request_id: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub feature: Option<String>,
    /// The user a service said it acted for (`keyward-on-behalf-of`); `None` otherwise.
    pub on_behalf_of: Option<String>,
}

impl NewAuditEvent {
    /// `actor` did `action` on `provider` of `account_id` at `at`, and it went well; the
    /// setters below add what else the event knows.
    pub fn new(
        account_id: &AccountId,
        at: UnixMillis,
        actor: &AuditActor,
        action: AuditAction,
        provider: Provider,
    ) -> NewAuditEvent {
        NewAuditEvent {
            account_id: account_id.clone(),
            at,
            actor: actor.0.clone(),
            action,
            provider: Some(provider),
            key_source: None,
            key_last4: None,
            model: None,
            outcome: Outcome::Ok,
            detail: None,
            provider_request_id: None,
            input_tokens: None,
            output_tokens: None,
            feature: None,
            on_behalf_of: None,
        }
    }

    /// `actor` did `action` to the account itself (no provider): a plan change, a deletion.
    pub fn for_account(
        account_id: &AccountId,
        at: UnixMillis,
        actor: &AuditActor,
        action: AuditAction,
    ) -> NewAuditEvent {
        let mut e = NewAuditEvent::new(account_id, at, actor, action, Provider::OpenAi);
        e.provider = None;
        e
    }

    /// The key's last four characters (own keys only: a shared key's are never logged).
    #[must_use]
    pub fn last4(mut self, last4: Option<&Last4>) -> Self {
        self.key_last4 = last4.cloned();
        self
    }

    #[must_use]
    pub fn key_source(mut self, source: KeySource) -> Self {
        self.key_source = Some(source);
        self
    }

    #[must_use]
    pub fn model(mut self, model: &str) -> Self {
        self.model = Some(model.to_owned());
        self
    }

    #[must_use]
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    #[must_use]
    pub fn detail(mut self, detail: Option<String>) -> Self {
        self.detail = detail;
        self
    }

    #[must_use]
    pub fn request_id(mut self, id: Option<String>) -> Self {
        self.provider_request_id = id;
        self
    }

    /// The tokens the provider reported (saturating: a count past `i64` is kept as its max).
    #[must_use]
    pub fn tokens(mut self, input: u64, output: u64) -> Self {
        self.input_tokens = Some(i64::try_from(input).unwrap_or(i64::MAX));
        self.output_tokens = Some(i64::try_from(output).unwrap_or(i64::MAX));
        self
    }

    #[must_use]
    pub fn feature(mut self, feature: Option<String>) -> Self {
        self.feature = feature;
        self
    }

    #[must_use]
    pub fn on_behalf_of(mut self, user: Option<String>) -> Self {
        self.on_behalf_of = user;
        self
    }

    /// The row this event becomes at position `seq` of its chain.
    pub fn into_event(self, seq: i64) -> AuditEvent {
        AuditEvent {
            id: 0,
            account_id: self.account_id.as_str().to_owned(),
            seq,
            at: self.at.as_i64(),
            actor: self.actor,
            action: self.action.as_str().to_owned(),
            provider: self.provider.map(|p| p.as_str().to_owned()),
            key_source: self.key_source.map(|s| s.as_str().to_owned()),
            key_last4: self.key_last4.map(|l| l.as_str().to_owned()),
            model: self.model,
            outcome: self.outcome.to_string(),
            detail: self.detail,
            provider_request_id: self.provider_request_id,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            feature: self.feature,
            on_behalf_of: self.on_behalf_of,
            mac: Vec::new(),
        }
    }
}

/// An event as stored. Fields are kept as the raw column values so that verification
/// judges exactly what is in the database, even a value the code would never write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: i64,
    pub account_id: String,
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub provider: Option<String>,
    pub key_source: Option<String>,
    pub key_last4: Option<String>,
    pub model: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub provider_request_id: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub feature: Option<String>,
    pub on_behalf_of: Option<String>,
    pub mac: Vec<u8>,
}

/// The newest link of an account's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: i64,
    pub mac: Vec<u8>,
}

impl AuditEvent {
    /// The bytes the MAC covers: every field but the row id and the MAC itself, each
    /// tagged and length-prefixed so no two events share an encoding.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"keyward-audit-event-v1");
        put_str(&mut out, Some(&self.account_id));
        put_int(&mut out, Some(self.seq));
        put_int(&mut out, Some(self.at));
        put_str(&mut out, Some(&self.actor));
        put_str(&mut out, Some(&self.action));
        put_str(&mut out, self.provider.as_deref());
        put_str(&mut out, self.key_source.as_deref());
        put_str(&mut out, self.key_last4.as_deref());
        put_str(&mut out, self.model.as_deref());
        put_str(&mut out, Some(&self.outcome));
        put_str(&mut out, self.detail.as_deref());
        put_str(&mut out, self.provider_request_id.as_deref());
        put_int(&mut out, self.input_tokens);
        put_int(&mut out, self.output_tokens);
        put_str(&mut out, self.feature.as_deref());
        // Added in schema v5. Appended only when present, so every event written before
        // keeps its canonical bytes (and its MAC); the tag makes the two forms distinct.
        if let Some(user) = self.on_behalf_of.as_deref() {
            out.push(3);
            put_str(&mut out, Some(user));
        }
        out
    }

    /// Fills in `mac` as the link after `prev`.
    pub fn seal_link(&mut self, key: &AuditChainKey, prev: &[u8; 32]) -> [u8; 32] {
        let mac = key.chain(prev, &self.canonical());
        self.mac = mac.to_vec();
        mac
    }
}

/// The chain id of the platform's chain, in checkpoints and verification reports. Never an
/// account id (those start `acc_`).
pub const PLATFORM_CHAIN: &str = "platform";

/// What the platform did (see [`PLATFORM_CHAIN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformAction {
    /// `keyward admin set-shared-key`: a shared-pool key saved where there was none.
    SharedKeySaved,
    /// `keyward admin set-shared-key`: a shared-pool key replaced.
    SharedKeyRotated,
    /// `keyward kek rotate`: a KEK version created (primary, or staged).
    KekRotated,
    /// `keyward kek promote`: a staged KEK version made primary.
    KekPromoted,
    /// `keyward kek retire`: a KEK version destroyed.
    KekRetired,
    /// `keyward admin set-plan`: an account's plan or shared-credit limit changed.
    PlanChanged,
}

impl PlatformAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformAction::SharedKeySaved => "shared_key.saved",
            PlatformAction::SharedKeyRotated => "shared_key.rotated",
            PlatformAction::KekRotated => "kek.rotated",
            PlatformAction::KekPromoted => "kek.promoted",
            PlatformAction::KekRetired => "kek.retired",
            PlatformAction::PlanChanged => "account.plan_changed",
        }
    }
}

/// A platform event to append; the store assigns `seq`, `id` and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlatformEvent {
    pub at: UnixMillis,
    pub actor: String,
    pub action: PlatformAction,
    /// The shared-pool key's provider.
    pub provider: Option<Provider>,
    /// The shared-pool key's last four characters.
    pub key_last4: Option<Last4>,
    /// The account a plan change was for.
    pub account_id: Option<AccountId>,
    /// The KEK version acted on (`local-3`).
    pub kek_id: Option<String>,
    /// What else is worth knowing (`pro -> free`, `staged`, `destroyed`).
    pub detail: Option<String>,
}

impl NewPlatformEvent {
    /// `actor` did `action` at `at`; the fields it concerns are set directly.
    pub fn new(at: UnixMillis, actor: &AuditActor, action: PlatformAction) -> NewPlatformEvent {
        NewPlatformEvent {
            at,
            actor: actor.0.clone(),
            action,
            provider: None,
            key_last4: None,
            account_id: None,
            kek_id: None,
            detail: None,
        }
    }

    /// The row this event becomes at position `seq` of the platform's chain.
    pub fn into_event(self, seq: i64) -> PlatformEvent {
        PlatformEvent {
            id: 0,
            seq,
            at: self.at.as_i64(),
            actor: self.actor,
            action: self.action.as_str().to_owned(),
            provider: self.provider.map(|p| p.as_str().to_owned()),
            key_last4: self.key_last4.map(|l| l.as_str().to_owned()),
            account_id: self.account_id.map(|a| a.as_str().to_owned()),
            kek_id: self.kek_id,
            detail: self.detail,
            mac: Vec::new(),
        }
    }
}

/// A platform event as stored (raw column values, as for [`AuditEvent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformEvent {
    pub id: i64,
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub provider: Option<String>,
    pub key_last4: Option<String>,
    pub account_id: Option<String>,
    pub kek_id: Option<String>,
    pub detail: Option<String>,
    pub mac: Vec<u8>,
}

impl PlatformEvent {
    /// The bytes the MAC covers: every field but the row id and the MAC, tagged and
    /// length-prefixed as an account event's are, under a label of its own.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"keyward-platform-event-v1");
        put_int(&mut out, Some(self.seq));
        put_int(&mut out, Some(self.at));
        put_str(&mut out, Some(&self.actor));
        put_str(&mut out, Some(&self.action));
        put_str(&mut out, self.provider.as_deref());
        put_str(&mut out, self.key_last4.as_deref());
        put_str(&mut out, self.account_id.as_deref());
        put_str(&mut out, self.kek_id.as_deref());
        put_str(&mut out, self.detail.as_deref());
        out
    }

    /// Fills in `mac` as the link after `prev`.
    pub fn seal_link(&mut self, key: &AuditChainKey, prev: &[u8; 32]) -> [u8; 32] {
        let mac = key.chain(prev, &self.canonical());
        self.mac = mac.to_vec();
        mac
    }
}

impl ChainLink for PlatformEvent {
    fn row_id(&self) -> i64 {
        self.id
    }
    fn seq(&self) -> i64 {
        self.seq
    }
    fn chain_id(&self) -> &str {
        PLATFORM_CHAIN
    }
    fn canonical(&self) -> Vec<u8> {
        PlatformEvent::canonical(self)
    }
    fn mac(&self) -> &[u8] {
        &self.mac
    }
}

fn put_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn put_int(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => out.push(0),
        Some(n) => {
            out.push(2);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub account_id: String,
    /// The row id of the first event that does not verify (None when the tail is missing).
    pub event_id: Option<i64>,
    pub seq: i64,
    pub reason: String,
}

/// A stored link of a chain, as verification sees it.
pub trait ChainLink {
    /// The row id.
    fn row_id(&self) -> i64;
    fn seq(&self) -> i64;
    /// The chain the row says it belongs to.
    fn chain_id(&self) -> &str;
    /// The bytes its MAC covers.
    fn canonical(&self) -> Vec<u8>;
    fn mac(&self) -> &[u8];
}

impl ChainLink for AuditEvent {
    fn row_id(&self) -> i64 {
        self.id
    }
    fn seq(&self) -> i64 {
        self.seq
    }
    fn chain_id(&self) -> &str {
        &self.account_id
    }
    fn canonical(&self) -> Vec<u8> {
        AuditEvent::canonical(self)
    }
    fn mac(&self) -> &[u8] {
        &self.mac
    }
}

/// Checks one account's chain, oldest first. `Ok(n)` is the number of events verified.
pub fn verify_chain(
    key: &AuditChainKey,
    account_id: &str,
    events: &[AuditEvent],
    head: Option<&ChainHead>,
) -> Result<usize, ChainBreak> {
    verify_links(key, account_id, events, head)
}

/// Checks the platform's chain ([`PLATFORM_CHAIN`]), oldest first, as [`verify_chain`] does an
/// account's.
pub fn verify_platform_chain(
    key: &AuditChainKey,
    events: &[PlatformEvent],
    head: Option<&ChainHead>,
) -> Result<usize, ChainBreak> {
    verify_links(key, PLATFORM_CHAIN, events, head)
}

/// Checks any chain, oldest first: each link's seq follows the one before, its MAC chains
/// from the one before, and the head names the last link.
pub fn verify_links<E: ChainLink>(
    key: &AuditChainKey,
    account_id: &str,
    events: &[E],
    head: Option<&ChainHead>,
) -> Result<usize, ChainBreak> {
    let mut prev = GENESIS_MAC;
    let broken = |event: &E, reason: &str| ChainBreak {
        account_id: account_id.to_owned(),
        event_id: Some(event.row_id()),
        seq: event.seq(),
        reason: reason.to_owned(),
    };
    for (i, event) in events.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if event.chain_id() != account_id {
            return Err(broken(event, "event belongs to another chain"));
        }
        if event.seq() != expected_seq {
            return Err(broken(
                event,
                &format!(
                    "expected seq {expected_seq}, found {}: an event was deleted or reordered",
                    event.seq()
                ),
            ));
        }
        if !key.verify(&prev, &event.canonical(), event.mac()) {
            return Err(broken(
                event,
                "MAC does not match: the event was edited, moved or forged",
            ));
        }
        prev = event
            .mac()
            .try_into()
            .map_err(|_| broken(event, "MAC has the wrong length"))?;
    }
    let last_seq = events.len() as i64;
    match head {
        None if events.is_empty() => Ok(0),
        None => Err(ChainBreak {
            account_id: account_id.to_owned(),
            event_id: None,
            seq: last_seq,
            reason: "chain head is missing".to_owned(),
        }),
        Some(h) if h.seq != last_seq || h.mac != prev => Err(ChainBreak {
            account_id: account_id.to_owned(),
            event_id: None,
            seq: last_seq + 1,
            reason: format!(
                "chain head says {} events but {last_seq} verify: events after seq {last_seq} were deleted (tail truncated)",
                h.seq
            ),
        }),
        Some(_) => Ok(events.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_behalf_of_extends_the_canonical_form_only_when_present() {
        let base = NewAuditEvent::new(
            &AccountId::from_random([7; 16]),
            UnixMillis(1),
            &AuditActor("service:drafting".into()),
            AuditAction::AiRequest,
            Provider::OpenAi,
        );
        let plain = base.clone().into_event(1).canonical();
        // The v1 form ends with the feature: nothing follows it for an event without a user.
        assert_eq!(plain.last(), Some(&0u8));
        let acting = base.on_behalf_of(Some("usr_x".into())).into_event(1).canonical();
        assert!(acting.starts_with(&plain));
        assert_ne!(acting, plain);
    }

    fn key() -> AuditChainKey {
        AuditChainKey::from_bytes_for_tests([7; 32])
    }

    fn chain(n: usize) -> (Vec<AuditEvent>, ChainHead) {
        let acc = AccountId::from_random([1; 16]);
        let mut prev = GENESIS_MAC;
        let mut events = Vec::new();
        for i in 0..n {
            let mut e = NewAuditEvent::new(
                &acc,
                UnixMillis(1000 + i as i64),
                &AuditActor("cli".into()),
                AuditAction::KeySaved,
                Provider::OpenAi,
            )
            .into_event(i as i64 + 1);
            e.id = i as i64 + 10;
            prev = e.seal_link(&key(), &prev);
            events.push(e);
        }
        (
            events,
            ChainHead {
                seq: n as i64,
                mac: prev.to_vec(),
            },
        )
    }

    fn acc() -> String {
        AccountId::from_random([1; 16]).to_string()
    }

    #[test]
    fn intact_chain_verifies() {
        let (events, head) = chain(5);
        assert_eq!(verify_chain(&key(), &acc(), &events, Some(&head)), Ok(5));
        assert_eq!(verify_chain(&key(), &acc(), &[], None), Ok(0));
    }

    #[test]
    fn edit_delete_reorder_truncate_are_named() {
        let (events, head) = chain(5);
        let mut edited = events.clone();
        edited[2].outcome = "forged".into();
        assert_eq!(
            verify_chain(&key(), &acc(), &edited, Some(&head)).unwrap_err().event_id,
            Some(12)
        );

        let mut deleted = events.clone();
        deleted.remove(1);
        assert_eq!(
            verify_chain(&key(), &acc(), &deleted, Some(&head))
                .unwrap_err()
                .event_id,
            Some(12)
        );

        let mut reordered = events.clone();
        reordered.swap(1, 3);
        let (s1, s3) = (reordered[1].seq, reordered[3].seq);
        reordered[1].seq = s3;
        reordered[3].seq = s1;
        assert_eq!(
            verify_chain(&key(), &acc(), &reordered, Some(&head))
                .unwrap_err()
                .event_id,
            Some(13)
        );

        let truncated = &events[..3];
        let err = verify_chain(&key(), &acc(), truncated, Some(&head)).unwrap_err();
        assert_eq!((err.event_id, err.seq), (None, 4));
        assert!(err.reason.contains("truncated"));
    }

    #[test]
    fn platform_chain_verifies_and_an_edit_is_named() {
        let mut prev = GENESIS_MAC;
        let mut events = Vec::new();
        for (i, action) in [PlatformAction::KekRotated, PlatformAction::SharedKeySaved]
            .into_iter()
            .enumerate()
        {
            let mut e =
                NewPlatformEvent::new(UnixMillis(5), &AuditActor("cli".into()), action).into_event(i as i64 + 1);
            e.id = i as i64 + 1;
            prev = e.seal_link(&key(), &prev);
            events.push(e);
        }
        let head = ChainHead {
            seq: 2,
            mac: prev.to_vec(),
        };
        assert_eq!(verify_platform_chain(&key(), &events, Some(&head)), Ok(2));
        let mut edited = events.clone();
        edited[0].kek_id = Some("local-9".into());
        let err = verify_platform_chain(&key(), &edited, Some(&head)).unwrap_err();
        assert_eq!((err.account_id.as_str(), err.event_id), (PLATFORM_CHAIN, Some(1)));
        // An account event's MAC never verifies as a platform event's (distinct labels).
        assert_ne!(events[0].canonical()[..20], chain(1).0[0].canonical()[..20]);
    }

    #[test]
    fn another_key_cannot_verify() {
        let (events, head) = chain(2);
        let other = AuditChainKey::from_bytes_for_tests([8; 32]);
        assert!(verify_chain(&other, &acc(), &events, Some(&head)).is_err());
    }
}
