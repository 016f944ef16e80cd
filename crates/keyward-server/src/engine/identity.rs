//! Tokens, and who a token is.
//!
//! A token is `kw_` + 32 random bytes (base64url). Only its SHA-256 is stored: tokens are
//! high-entropy, so a fast hash suffices and lookups stay one indexed read. Answers keep a
//! fixed order so they leak nothing: an unknown token is 401 before anything else, and a
//! user who is not a member of an account gets 404 (never 403), so account ids cannot be
//! probed.

use base64::Engine as _;
use keyward_core::{AccountId, Provider};
use keyward_store::{CallKey, Membership, User};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};

pub const TOKEN_PREFIX: &str = "kw_";

/// A fresh token (shown once) and the hash to store.
pub fn new_token() -> (Zeroizing<String>, String) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let token = Zeroizing::new(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())
    ));
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// 16 random bytes for an id.
pub fn random_id_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// The stored hash of a token that has a token's shape, or 401 without a lookup.
pub fn well_formed_token_hash(token: &str) -> ApiResult<String> {
    let token = token.trim();
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Err(ApiError::unauthorized());
    }
    Ok(hash_token(token))
}

impl Engine {
    /// The user a token belongs to, or 401.
    pub async fn user_by_token(&self, token: &str) -> ApiResult<User> {
        self.store
            .user_by_token(&well_formed_token_hash(token)?)
            .await?
            .ok_or_else(ApiError::unauthorized)
    }

    /// The user a token belongs to, acting in `account`, in one read: 401 for an unknown
    /// token, then 404 for a non-member.
    pub async fn actor_by_token(&self, token: &str, account: &str) -> ApiResult<Actor> {
        let token_hash = well_formed_token_hash(token)?;
        // An account id that cannot exist still needs the token checked first (401 before 404).
        let Ok(account) = AccountId::parse(account) else {
            self.user_by_token(token).await?;
            return Err(ApiError::not_found());
        };
        let (user, membership) = self
            .store
            .member_by_token(&token_hash, &account)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        Ok(Actor {
            user,
            membership: membership.ok_or_else(ApiError::not_found)?,
        })
    }

    /// [`Engine::actor_by_token`] and the account's key for `provider`, in one read: the
    /// whole lookup of an AI call before its key is opened. A non-member's lookup reads no key.
    pub async fn actor_and_call_key(
        &self,
        token: &str,
        account: &str,
        provider: Provider,
    ) -> ApiResult<(Actor, CallKey)> {
        let token_hash = well_formed_token_hash(token)?;
        let Ok(account) = AccountId::parse(account) else {
            self.user_by_token(token).await?;
            return Err(ApiError::not_found());
        };
        let (user, member) = self
            .store
            .member_and_call_key(&token_hash, &account, provider)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let (membership, key) = member.ok_or_else(ApiError::not_found)?;
        Ok((Actor { user, membership }, key))
    }

    /// `user` acting in `account`, or 404 (never 403) when they are not a member.
    pub async fn actor(&self, user: &User, account: &str) -> ApiResult<Actor> {
        let account = AccountId::parse(account).map_err(|_| ApiError::not_found())?;
        let membership = self
            .store
            .membership(&account, &user.id)
            .await?
            .ok_or_else(ApiError::not_found)?;
        Ok(Actor {
            user: user.clone(),
            membership,
        })
    }

    /// Every account `user` is a member of, with their role.
    pub async fn memberships(&self, user: &User) -> ApiResult<Vec<Membership>> {
        Ok(self.store.memberships_of(&user.id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let (a, ha) = new_token();
        let (b, hb) = new_token();
        assert!(a.starts_with("kw_") && a.len() == 3 + 43);
        assert_ne!(*a, *b);
        assert_ne!(ha, hb);
        assert_eq!(ha, hash_token(&a));
        assert!(!ha.contains(&a[3..]));
    }
}
