//! Browser sessions, kept in the database; one-time login codes, kept in memory.
//!
//! A session id is 32 random bytes (base64url) held only by the browser, in an `HttpOnly`,
//! `SameSite=Strict` cookie. The database keeps only its SHA-256 (the `sessions` table: user,
//! when it began, when it was last used, the message for its next page view), so a copy of
//! the database does not hand out live cookies. The session's CSRF token is derived from the
//! id ([`csrf_token`]) and never stored. A session ends after [`SESSION_IDLE_MS`] without
//! use, after [`SESSION_MAX_MS`] in all, at `/logout`, or at "Sign out everywhere".
//!
//! Every request reads its session from the database (there is no per-node cache), so any
//! node serves any session, a restart keeps them, and a sign-out on one node holds on every
//! node at once. Expired rows are deleted when met and by [`sweep`], every
//! [`SWEEP_EVERY`] on each node.
//!
//! A login code (printed by the first start of `serve` as a one-time login URL) is random,
//! single use, and expires after [`LOGIN_CODE_TTL_MS`]; it stays in the memory of the node
//! that printed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use keyward_core::{Provider, UnixMillis};
use keyward_store::{SessionLimits, Store, StoreResult, User};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clock::SharedClock;

/// A session ends after this long without a request.
pub const SESSION_IDLE_MS: i64 = 12 * 60 * 60 * 1000;
/// A session ends this long after its login, however busy.
pub const SESSION_MAX_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// A one-time login code expires this long after it was made.
pub const LOGIN_CODE_TTL_MS: i64 = 15 * 60 * 1000;
/// At most this many login codes are kept.
const MAX_ENTRIES: usize = 100_000;
/// How often each node deletes expired sessions.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15 * 60);

/// The lifetimes every session has.
pub const LIMITS: SessionLimits = SessionLimits {
    idle_ms: SESSION_IDLE_MS,
    max_ms: SESSION_MAX_MS,
};

/// 32 random bytes, base64url: session ids, CSRF tokens, login codes.
pub fn random_secret() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// What the database keys a session by: the hex SHA-256 of its id.
pub fn id_hash(id: &str) -> String {
    hex::encode(digest(id))
}

/// The session's CSRF token: derived from its id under a label of its own, so it is neither
/// the id nor the stored hash, and cannot be turned back into either.
pub fn csrf_token(id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"keyward-csrf-v1\0");
    h.update(id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which control of the settings page a message belongs next to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// The key field and "Save".
    Key,
    /// The "Aiemaily shared / My key" switch.
    Source,
    /// "Test key".
    Test,
    /// "Remove".
    Remove,
}

/// A message for the next page view (after a form's redirect), shown next to its control.
/// It never holds a key: texts come from error messages (which never repeat a key) and from
/// the provider's message as the worker masked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flash {
    pub account: String,
    pub provider: Provider,
    pub control: Control,
    pub ok: bool,
    pub title: String,
    pub detail: Option<String>,
}

/// What a request learns from its session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub user: User,
    /// The token every state-changing form of this session must carry.
    pub csrf: String,
}

/// Starts a session for `user`; returns its id (for the cookie only).
pub async fn create(store: &dyn Store, user: &User, now: UnixMillis) -> StoreResult<Zeroizing<String>> {
    let id = random_secret();
    store.create_session(&id_hash(&id), &user.id, now).await?;
    Ok(id)
}

/// The live session with this id, marked as used now; an expired one is ended.
pub async fn get(store: &dyn Store, id: &str, now: UnixMillis) -> StoreResult<Option<SessionView>> {
    Ok(store
        .touch_session(&id_hash(id), now, LIMITS)
        .await?
        .map(|s| SessionView {
            user: s.user,
            csrf: csrf_token(id),
        }))
}

/// Ends a session; true when there was one.
pub async fn end(store: &dyn Store, id: &str) -> StoreResult<bool> {
    store.end_session(&id_hash(id)).await
}

/// Ends every session of `user`, on every node; how many there were.
pub async fn end_all(store: &dyn Store, user: &User) -> StoreResult<u64> {
    store.end_user_sessions(&user.id).await
}

/// Keeps a message for the session's next page view (best effort: a message that cannot be
/// kept is logged and dropped; the action it reports is done either way).
pub async fn set_flash(store: &dyn Store, id: &str, flash: &Flash) {
    let kept = match serde_json::to_string(flash) {
        Ok(json) => store.set_session_flash(&id_hash(id), &json).await,
        Err(e) => {
            tracing::warn!(error = %e, "page message not kept");
            return;
        }
    };
    if let Err(e) = kept {
        tracing::warn!(error = %e, "page message not kept");
    }
}

/// The message kept for this page view, once.
pub async fn take_flash(store: &dyn Store, id: &str) -> StoreResult<Option<Flash>> {
    Ok(store
        .take_session_flash(&id_hash(id))
        .await?
        .and_then(|json| serde_json::from_str(&json).ok()))
}

/// Deletes expired sessions every [`SWEEP_EVERY`] (each node; the deletes are idempotent).
pub async fn sweep(store: Arc<dyn Store>, clock: SharedClock) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        match store.prune_sessions(clock.now(), LIMITS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "expired sessions deleted"),
            Err(e) => tracing::warn!(error = %e, "expired sessions not deleted; next sweep retries"),
        }
    }
}

/// One-time login codes: random, single use, short-lived.
#[derive(Default)]
pub struct LoginCodes {
    map: Mutex<HashMap<[u8; 32], (User, UnixMillis)>>,
}

impl std::fmt::Debug for LoginCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginCodes")
            .field("count", &lock(&self.map).len())
            .finish()
    }
}

impl LoginCodes {
    /// A fresh code for `user`, valid for [`LOGIN_CODE_TTL_MS`] from `now`.
    pub fn issue(&self, user: User, now: UnixMillis) -> Zeroizing<String> {
        let code = random_secret();
        let mut map = lock(&self.map);
        map.retain(|_, (_, expires)| *expires > now);
        if map.len() < MAX_ENTRIES {
            map.insert(digest(&code), (user, UnixMillis(now.as_i64() + LOGIN_CODE_TTL_MS)));
        }
        code
    }

    /// The user of a live code; the code is spent whatever the answer.
    pub fn redeem(&self, code: &str, now: UnixMillis) -> Option<User> {
        let (user, expires) = lock(&self.map).remove(&digest(code))?;
        (expires > now).then_some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::{Email, UserId};

    fn user() -> User {
        User {
            id: UserId::from_random([7; 16]),
            email: Email::parse("ana@example.com").unwrap(),
        }
    }

    #[test]
    fn csrf_tokens_are_derived_and_differ_from_the_id_and_its_hash() {
        let (a, b) = (random_secret(), random_secret());
        assert_ne!(*a, *b);
        assert_eq!(csrf_token(&a), csrf_token(&a));
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert!(csrf_token(&a).len() >= 43);
        assert_ne!(csrf_token(&a), *a);
        assert_ne!(csrf_token(&a), id_hash(&a));
        assert!(!id_hash(&a).contains(a.as_str()));
        assert_eq!(id_hash(&a).len(), 64);
    }

    #[test]
    fn flashes_round_trip_as_json() {
        let flash = Flash {
            account: "acc_x".into(),
            provider: Provider::OpenAi,
            control: Control::Test,
            ok: true,
            title: "ok".into(),
            detail: None,
        };
        let json = serde_json::to_string(&flash).unwrap();
        assert_eq!(serde_json::from_str::<Flash>(&json).unwrap(), flash);
    }

    #[test]
    fn login_codes_are_single_use_and_expire() {
        let c = LoginCodes::default();
        let code = c.issue(user(), UnixMillis(0));
        assert_eq!(c.redeem(&code, UnixMillis(1)), Some(user()));
        assert_eq!(c.redeem(&code, UnixMillis(2)), None);
        let code = c.issue(user(), UnixMillis(0));
        assert_eq!(c.redeem(&code, UnixMillis(LOGIN_CODE_TTL_MS)), None);
        assert_eq!(c.redeem("made-up", UnixMillis(0)), None);
    }
}
