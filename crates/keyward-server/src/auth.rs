//! Tokens and the caller behind a request.
//!
//! A token is `kw_` + 32 random bytes (base64url). Only its SHA-256 is stored: tokens are
//! high-entropy, so a fast hash suffices and lookups stay one indexed read.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use keyward_core::AccountId;
use keyward_store::{CallKey, Membership, User};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::app::AppState;
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

/// An authenticated user (from `Authorization: Bearer kw_…`).
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        authenticate(state, bearer_token(parts)?).await
    }
}

/// The token of an `Authorization: Bearer …` header, or 401.
fn bearer_token(parts: &Parts) -> ApiResult<&str> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)
}

/// The stored hash of a token that has a token's shape, or 401 without a lookup.
fn well_formed_token_hash(token: &str) -> ApiResult<String> {
    let token = token.trim();
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Err(ApiError::unauthorized());
    }
    Ok(hash_token(token))
}

/// The user a token belongs to, or 401.
pub async fn authenticate(state: &AppState, token: &str) -> ApiResult<Caller> {
    let user = state
        .store
        .user_by_token(&well_formed_token_hash(token)?)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Caller { user })
}

/// The user a token belongs to and their membership of `account`, in one read (the AI
/// routes' first step): 401 for an unknown token, then 404 (never 403) for a non-member.
pub async fn authenticate_member(state: &AppState, token: &str, account: &str) -> ApiResult<(Caller, Membership)> {
    let token_hash = well_formed_token_hash(token)?;
    // An account id that cannot exist still needs the token checked first (401 before 404).
    let Ok(account) = AccountId::parse(account) else {
        authenticate(state, token).await?;
        return Err(ApiError::not_found());
    };
    let (user, membership) = state
        .store
        .member_by_token(&token_hash, &account)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok((Caller { user }, membership.ok_or_else(ApiError::not_found)?))
}

/// [`authenticate_member`] and the account's key for `provider`, in one read: the whole
/// lookup of an AI call before its key is opened. 401, then 404; a non-member's lookup
/// reads no key.
pub async fn authenticate_member_with_key(
    state: &AppState,
    token: &str,
    account: &str,
    provider: keyward_core::Provider,
) -> ApiResult<(Caller, Membership, CallKey)> {
    let token_hash = well_formed_token_hash(token)?;
    let Ok(account) = AccountId::parse(account) else {
        authenticate(state, token).await?;
        return Err(ApiError::not_found());
    };
    let (user, member) = state
        .store
        .member_and_call_key(&token_hash, &account, provider)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    let (membership, key) = member.ok_or_else(ApiError::not_found)?;
    Ok((Caller { user }, membership, key))
}

/// An authenticated caller who is a member of the `{account_id}` in the path, found with
/// one read.
#[derive(Debug, Clone)]
pub struct AccountMember {
    pub caller: Caller,
    pub membership: Membership,
}

impl FromRequestParts<AppState> for AccountMember {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<AccountMember> {
        AccountMemberClaim::from_request_parts(parts, state)
            .await?
            .check(state)
            .await
    }
}

/// A request's bearer token and `{account_id}`, not yet checked beyond the token's shape
/// (401 without a lookup): for a route that reads something else while the membership is
/// checked ([`AccountMemberClaim::check`]). `Debug` shows the account only.
pub struct AccountMemberClaim {
    token: Zeroizing<String>,
    account: String,
}

impl std::fmt::Debug for AccountMemberClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountMemberClaim")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl FromRequestParts<AppState> for AccountMemberClaim {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<AccountMemberClaim> {
        // Owned (and wiped on drop): reading the path parameters needs `parts` mutably.
        let token = Zeroizing::new(bearer_token(parts)?.to_owned());
        well_formed_token_hash(&token)?;
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        let account = params
            .iter()
            .find(|(k, _)| *k == "account_id")
            .map(|(_, v)| v.to_owned())
            .ok_or_else(ApiError::not_found)?;
        Ok(AccountMemberClaim { token, account })
    }
}

impl AccountMemberClaim {
    /// The `{account_id}` as the path gave it (unchecked).
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The caller and their membership, with one read: 401, then 404.
    pub async fn check(&self, state: &AppState) -> ApiResult<AccountMember> {
        let (caller, membership) = authenticate_member(state, &self.token, &self.account).await?;
        Ok(AccountMember { caller, membership })
    }

    /// [`AccountMemberClaim::check`] and the account's key for `provider`, with one read.
    pub async fn check_with_key(
        &self,
        state: &AppState,
        provider: keyward_core::Provider,
    ) -> ApiResult<(AccountMember, CallKey)> {
        let (caller, membership, key) =
            authenticate_member_with_key(state, &self.token, &self.account, provider).await?;
        Ok((AccountMember { caller, membership }, key))
    }
}

impl Caller {
    /// The caller's membership of `account`, or 404 (never 403) when they are not a
    /// member, so account ids cannot be probed.
    pub async fn member_of(&self, state: &AppState, account: &str) -> ApiResult<Membership> {
        let account = AccountId::parse(account).map_err(|_| ApiError::not_found())?;
        state
            .store
            .membership(&account, &self.user.id)
            .await?
            .ok_or_else(ApiError::not_found)
    }

    /// For key management: membership (404), then the provider name (404
    /// `unknown_provider`), then the role (403).
    pub async fn manager_for(
        &self,
        state: &AppState,
        account: &str,
        provider: &str,
        what: &str,
    ) -> ApiResult<(Membership, keyward_core::Provider)> {
        let m = self.member_of(state, account).await?;
        let provider = crate::routes::model_keys::parse_provider(provider)?;
        if !m.role.can_manage_keys() {
            return Err(ApiError::forbidden(what));
        }
        Ok((m, provider))
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
