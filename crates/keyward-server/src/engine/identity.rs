//! Tokens, and who a token is.
//!
//! A user's token is `kw_` + 32 random bytes (base64url), a service's `kws_` + 32 random
//! bytes. Only their SHA-256 is stored: tokens are high-entropy, so a fast hash suffices and
//! lookups stay one indexed read (made on every request: no cache, so a revoked service
//! token is refused at once on every node). Answers keep a fixed order so they leak
//! nothing: an unknown token is 401 before anything else, a service outside its scopes 403
//! before any account is looked up, and a user who is not a member of an account (or an
//! account that does not exist) 404 (never 403), so account ids cannot be probed.

use base64::Engine as _;
use keyward_core::{AccountId, ExternalId, Provider, UserId};
use keyward_store::{CallKey, Membership, User};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::actor::{Access, Principal};
use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};

/// A user's token: `kw_` + 32 random bytes.
pub const TOKEN_PREFIX: &str = "kw_";
/// A service's token: `kws_` + 32 random bytes.
pub const SERVICE_TOKEN_PREFIX: &str = "kws_";

fn fresh_token(prefix: &str) -> (Zeroizing<String>, String) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    let token = Zeroizing::new(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())
    ));
    let hash = hash_token(&token);
    (token, hash)
}

/// A fresh user token (shown once) and the hash to store.
pub fn new_token() -> (Zeroizing<String>, String) {
    fresh_token(TOKEN_PREFIX)
}

/// A fresh service token (shown once) and the hash to store.
pub fn new_service_token() -> (Zeroizing<String>, String) {
    fresh_token(SERVICE_TOKEN_PREFIX)
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

/// Whose a token is, by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    User,
    Service,
}

/// The kind and stored hash of a token that has a token's shape, or 401 without a lookup.
fn token_hash(token: &str) -> ApiResult<(TokenKind, String)> {
    let token = token.trim();
    if token.len() > 128 {
        return Err(ApiError::unauthorized());
    }
    let kind = if token.starts_with(SERVICE_TOKEN_PREFIX) {
        TokenKind::Service
    } else if token.starts_with(TOKEN_PREFIX) {
        TokenKind::User
    } else {
        return Err(ApiError::unauthorized());
    };
    Ok((kind, hash_token(token)))
}

/// The stored hash of a token (a user's or a service's) that has a token's shape, or 401
/// without a lookup.
pub fn well_formed_token_hash(token: &str) -> ApiResult<String> {
    token_hash(token).map(|(_, hash)| hash)
}

/// The header a service names the user it acts for in.
pub const ON_BEHALF_OF_HEADER: &str = "keyward-on-behalf-of";

impl Engine {
    /// The user a user's token belongs to, or 401 (a service token is no user's).
    pub async fn user_by_token(&self, token: &str) -> ApiResult<User> {
        match token_hash(token)? {
            (TokenKind::User, hash) => self
                .store
                .user_by_token(&hash)
                .await?
                .ok_or_else(ApiError::unauthorized),
            (TokenKind::Service, _) => Err(ApiError::unauthorized()),
        }
    }

    /// Whoever a token belongs to (a user, or a live service: read from the database on
    /// every request, so a revoked service token is refused at once on every node), or 401.
    pub async fn principal_by_token(&self, token: &str) -> ApiResult<Principal> {
        match token_hash(token)? {
            (TokenKind::User, hash) => Ok(Principal::User(
                self.store
                    .user_by_token(&hash)
                    .await?
                    .ok_or_else(ApiError::unauthorized)?,
            )),
            (TokenKind::Service, hash) => Ok(Principal::Service(
                self.store
                    .service_by_token(&hash)
                    .await?
                    .ok_or_else(ApiError::unauthorized)?,
            )),
        }
    }

    /// The token's owner acting in `account` for `access`: 401 for an unknown token; a
    /// service without the scope 403 (before the account is looked up, so it learns nothing
    /// about accounts); then 404 for a non-member or an account that does not exist.
    pub async fn actor_by_token(&self, token: &str, account: &str, access: Access) -> ApiResult<Actor> {
        let (kind, token_hash) = token_hash(token)?;
        if kind == TokenKind::Service {
            let principal = self.principal_by_token(token).await?;
            return self.principal_actor(&principal, account, access).await;
        }
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
        Ok(Actor::member(user, membership.ok_or_else(ApiError::not_found)?))
    }

    /// [`Engine::actor_by_token`] for an AI call, with the account's key for `provider`: a
    /// user's whole lookup is one read (a non-member's reads no key).
    pub async fn actor_and_call_key(
        &self,
        token: &str,
        account: &str,
        provider: Provider,
    ) -> ApiResult<(Actor, CallKey)> {
        let (kind, token_hash) = token_hash(token)?;
        if kind == TokenKind::Service {
            let actor = self.actor_by_token(token, account, Access::Call).await?;
            let key = self.store.call_key(actor.account_id(), provider).await?;
            return Ok((actor, key));
        }
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
        Ok((Actor::member(user, membership), key))
    }

    /// `user` acting in `account`, or 404 (never 403) when they are not a member.
    pub async fn actor(&self, user: &User, account: &str) -> ApiResult<Actor> {
        let account = AccountId::parse(account).map_err(|_| ApiError::not_found())?;
        let membership = self
            .store
            .membership(&account, &user.id)
            .await?
            .ok_or_else(ApiError::not_found)?;
        Ok(Actor::member(user.clone(), membership))
    }

    /// `principal` acting in `account` for `access`: a user as a member (404 otherwise; their
    /// role is checked by the engine function); a service within its scopes (403), in an
    /// account that exists (404).
    pub async fn principal_actor(&self, principal: &Principal, account: &str, access: Access) -> ApiResult<Actor> {
        match principal {
            Principal::User(user) => self.actor(user, account).await,
            Principal::Service(service) => {
                principal.may(access)?;
                let account = AccountId::parse(account).map_err(|_| ApiError::not_found())?;
                let account = self.store.account(&account).await?.ok_or_else(ApiError::not_found)?;
                Ok(Actor::service(service.clone(), account))
            }
        }
    }

    /// Records the member a service acts for (`keyward-on-behalf-of`: a user id `usr_…`
    /// or the product's external user id). A user who is not a member of the account, or
    /// does not exist, is 404, as for users (no enumeration). A user's own token may not
    /// name anyone (`422`): their calls are on their own behalf.
    pub async fn act_for(&self, actor: &mut Actor, raw: Option<&str>) -> ApiResult<()> {
        let Some(raw) = raw.map(str::trim) else {
            return Ok(());
        };
        if !matches!(actor.who, super::actor::Who::Service(_)) {
            return Err(ApiError::validation(format!(
                "{ON_BEHALF_OF_HEADER} is for service tokens: a user's calls are on their own behalf"
            )));
        }
        let user = match UserId::parse(raw) {
            Ok(id) => id,
            Err(_) => {
                let external = ExternalId::parse(raw).map_err(|e| {
                    ApiError::validation(format!("{ON_BEHALF_OF_HEADER}: expected a user id (usr_…) or {e}"))
                })?;
                self.store
                    .user_by_external_id(&external)
                    .await?
                    .ok_or_else(ApiError::not_found)?
                    .user
                    .id
            }
        };
        self.store
            .membership(actor.account_id(), &user)
            .await?
            .ok_or_else(ApiError::not_found)?;
        actor.on_behalf_of = Some(user);
        Ok(())
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
        let (s, hs) = new_service_token();
        assert!(s.starts_with("kws_") && s.len() == 4 + 43);
        assert_eq!(token_hash(&s).unwrap(), (TokenKind::Service, hs));
        assert_eq!(token_hash(&a).unwrap().0, TokenKind::User);
        assert!(token_hash("sk-ant-x").is_err());
    }
}
