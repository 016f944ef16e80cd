//! Browser sessions and one-time login codes, kept in the gateway's memory.
//!
//! A session id is 32 random bytes (base64url) held only by the browser, in an `HttpOnly`,
//! `SameSite=Strict` cookie; the map is keyed by its SHA-256, so a dump of this process's
//! memory does not hand out live cookies. Each session holds its user, its CSRF token, when it
//! began and when it was last used: it ends after [`SESSION_IDLE_MS`] without use, after
//! [`SESSION_MAX_MS`] in all, or at `/logout`.
//!
//! Sessions live in one gateway process: a deployment with several nodes needs sticky
//! sessions until sessions move to the database.
//!
//! A login code (printed by the first start of `serve` as a one-time login URL) is random,
//! single use, and expires after [`LOGIN_CODE_TTL_MS`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use base64::Engine;
use keyward_core::{Provider, UnixMillis};
use keyward_store::User;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A session ends after this long without a request.
pub const SESSION_IDLE_MS: i64 = 12 * 60 * 60 * 1000;
/// A session ends this long after its login, however busy.
pub const SESSION_MAX_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// A one-time login code expires this long after it was made.
pub const LOGIN_CODE_TTL_MS: i64 = 15 * 60 * 1000;
/// At most this many sessions (or codes) are kept; past it the least recently used go first.
const MAX_ENTRIES: usize = 100_000;

/// 32 random bytes, base64url: session ids, CSRF tokens, login codes.
pub fn random_secret() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which control of the settings page a message belongs next to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub account: String,
    pub provider: Provider,
    pub control: Control,
    pub ok: bool,
    pub title: String,
    pub detail: Option<String>,
}

struct Session {
    user: User,
    csrf: Zeroizing<String>,
    created: UnixMillis,
    last_seen: UnixMillis,
    flash: Option<Flash>,
}

impl Session {
    fn live(&self, now: UnixMillis) -> bool {
        now.as_i64().saturating_sub(self.last_seen.as_i64()) < SESSION_IDLE_MS
            && now.as_i64().saturating_sub(self.created.as_i64()) < SESSION_MAX_MS
    }
}

/// What a request learns from its session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub user: User,
    /// The token every state-changing form of this session must carry.
    pub csrf: String,
}

/// The sessions of this gateway process.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("count", &self.len()).finish()
    }
}

impl Sessions {
    /// Starts a session for `user`; returns its id (for the cookie only).
    pub fn create(&self, user: User, now: UnixMillis) -> Zeroizing<String> {
        let id = random_secret();
        let session = Session {
            user,
            csrf: random_secret(),
            created: now,
            last_seen: now,
            flash: None,
        };
        let mut map = lock(&self.map);
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, s| s.live(now));
        }
        if map.len() >= MAX_ENTRIES {
            let oldest = map.iter().min_by_key(|(_, s)| s.last_seen.as_i64()).map(|(k, _)| *k);
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        map.insert(digest(&id), session);
        id
    }

    /// The live session with this id, marked as used now; an expired one is ended.
    pub fn get(&self, id: &str, now: UnixMillis) -> Option<SessionView> {
        let key = digest(id);
        let mut map = lock(&self.map);
        let live = map.get(&key).map(|s| s.live(now))?;
        if !live {
            map.remove(&key);
            return None;
        }
        let s = map.get_mut(&key)?;
        s.last_seen = now;
        Some(SessionView {
            user: s.user.clone(),
            csrf: s.csrf.as_str().to_owned(),
        })
    }

    /// Ends a session; true when there was one.
    pub fn end(&self, id: &str) -> bool {
        lock(&self.map).remove(&digest(id)).is_some()
    }

    /// Keeps a message for the session's next page view.
    pub fn set_flash(&self, id: &str, flash: Flash) {
        if let Some(s) = lock(&self.map).get_mut(&digest(id)) {
            s.flash = Some(flash);
        }
    }

    /// The message kept for this page view, once.
    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        lock(&self.map).get_mut(&digest(id)).and_then(|s| s.flash.take())
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn sessions_expire_when_idle_and_at_their_maximum_and_end_on_logout() {
        let s = Sessions::default();
        let id = s.create(user(), UnixMillis(0));
        let v = s.get(&id, UnixMillis(1000)).unwrap();
        assert_eq!(v.user, user());
        assert!(v.csrf.len() >= 43);
        assert!(s.get("not-a-session", UnixMillis(1000)).is_none());
        // Used within the idle limit: stays alive.
        assert!(s.get(&id, UnixMillis(SESSION_IDLE_MS)).is_some());
        // Unused for the idle limit: gone.
        assert!(s.get(&id, UnixMillis(2 * SESSION_IDLE_MS + 1)).is_none());
        assert!(s.is_empty());

        let id = s.create(user(), UnixMillis(0));
        let mut t = 0;
        while t + SESSION_IDLE_MS / 2 < SESSION_MAX_MS {
            t += SESSION_IDLE_MS / 2;
            assert!(s.get(&id, UnixMillis(t)).is_some(), "at {t}");
        }
        assert!(s.get(&id, UnixMillis(SESSION_MAX_MS)).is_none());

        let id = s.create(user(), UnixMillis(0));
        assert!(s.end(&id));
        assert!(!s.end(&id));
        assert!(s.get(&id, UnixMillis(1)).is_none());
    }

    #[test]
    fn sessions_have_distinct_ids_and_csrf_tokens_and_keep_one_flash() {
        let s = Sessions::default();
        let a = s.create(user(), UnixMillis(0));
        let b = s.create(user(), UnixMillis(0));
        assert_ne!(*a, *b);
        let (va, vb) = (s.get(&a, UnixMillis(0)).unwrap(), s.get(&b, UnixMillis(0)).unwrap());
        assert_ne!(va.csrf, vb.csrf);
        assert_ne!(va.csrf, *a);
        let flash = Flash {
            account: "acc_x".into(),
            provider: Provider::OpenAi,
            control: Control::Test,
            ok: true,
            title: "ok".into(),
            detail: None,
        };
        s.set_flash(&a, flash.clone());
        assert_eq!(s.take_flash(&b), None);
        assert_eq!(s.take_flash(&a), Some(flash));
        assert_eq!(s.take_flash(&a), None);
        // The map never holds the id itself.
        assert!(!format!("{s:?}").contains(a.as_str()));
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
